//! A plain HTTP/1.1 GET, just enough to fetch `/agent/TOKEN` from the server (a small
//! client keeps the agent small: no TLS stack, no HTTP library).

use std::time::Duration;

use osstream_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest body the agent accepts (a boot set of a few hundred thousand blocks).
const MAX_BODY: usize = 16 << 20;

/// `http://HOST:PORT/PATH` split into the address to connect to and the path.
pub fn split_url(url: &str) -> Result<(String, String)> {
    let bad = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{:?} is not an http://HOST[:PORT]/PATH address (https is not supported)",
                osstream_core::shorten(url, 30)
            ),
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(bad());
    }
    let address = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((address, path.to_owned()))
}

/// GETs `url` and returns the body of a 200 answer; any other status is an error
/// carrying the server's message.
pub async fn get(url: &str, timeout: Duration) -> Result<String> {
    let (address, path) = split_url(url)?;
    // Paths carry session tokens: only their start reaches messages.
    let shown = osstream_core::shorten(&path, 14).into_owned();
    let work = async {
        let io = |e: std::io::Error| Error::from_io(e, format!("GET http://{address}{shown}"));
        let mut stream = TcpStream::connect(&address).await.map_err(io)?;
        let host = address.as_str();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: osstream-agent\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut answer)
            .await
            .map_err(io)?;
        parse_response(&answer)
            .map_err(|why| Error::new(ErrorKind::Io, format!("GET http://{address}{shown}: {why}")))
    };
    let (status, body) = tokio::time::timeout(timeout, work).await.map_err(|_| {
        Error::new(
            ErrorKind::Io,
            format!("GET {url:?} had no answer in {timeout:?}"),
        )
        .set_temporary()
    })??;
    match status {
        200 => Ok(body),
        // The server's message already starts with its kind ("not found: ..."), as the
        // error's own display will.
        404 => Err(Error::new(
            ErrorKind::NotFound,
            body.trim().trim_start_matches("not found: ").to_owned(),
        )),
        403 => Err(Error::new(
            ErrorKind::PermissionDenied,
            body.trim()
                .trim_start_matches("permission denied: ")
                .to_owned(),
        )),
        _ => Err(Error::new(
            ErrorKind::Io,
            format!("HTTP {status}: {}", body.trim()),
        )),
    }
}

/// Splits a whole HTTP/1.1 response into its status and body (by `Content-Length`, else
/// everything after the head).
pub fn parse_response(answer: &[u8]) -> std::result::Result<(u16, String), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete head")?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| "the head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut body = &answer[end + 4..];
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let len: usize = value.trim().parse().map_err(|_| "bad Content-Length")?;
            if len > body.len() {
                return Err("the body is shorter than its Content-Length".into());
            }
            if len > MAX_BODY {
                return Err("the body is too large".into());
            }
            body = &body[..len];
        }
    }
    let body = String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8")?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_an_address_and_a_path() {
        assert_eq!(
            split_url("http://10.0.0.1:8080/agent/tok").unwrap(),
            ("10.0.0.1:8080".into(), "/agent/tok".into())
        );
        assert_eq!(
            split_url("http://boot/x").unwrap(),
            ("boot:80".into(), "/x".into())
        );
        assert!(split_url("https://x/y").is_err());
        assert!(split_url("http:///y").is_err());
    }

    #[test]
    fn responses_parse_by_content_length_and_bad_ones_are_refused() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(ok).unwrap(), (200, "{}".into()));
        let gone = b"HTTP/1.1 404 Not Found\r\n\r\nno session";
        assert_eq!(parse_response(gone).unwrap(), (404, "no session".into()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
