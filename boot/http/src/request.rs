//! HTTP/1.1 requests and response heads, sans IO: bytes in, values out.
//!
//! Only what a boot client needs: `GET` and `HEAD` without a body, one byte range, keep-
//! alive. Everything else gets a precise status, never a panic: the parser is fuzzed.

use std::fmt::Write as _;

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 48;

/// The methods served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`: the body.
    Get,
    /// `HEAD`: the headers `GET` would send.
    Head,
}

/// One parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET` or `HEAD`.
    pub method: Method,
    /// The path, percent-decoded, without the query.
    pub path: String,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Host` header, if any (checked to be a plain `HOST[:PORT]`).
    pub host: Option<String>,
}

/// A request that cannot be served: the status to answer with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// For the client and the log.
    pub reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// Parses one request head from the start of `buf`.
///
/// `Ok(None)`: incomplete, read more (a head longer than [`MAX_HEAD`] is refused).
/// `Ok(Some((request, used)))`: the head took `used` bytes. `Err`: answer with the
/// refusal's status and close the connection.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let used = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Refusal::new(431, "request head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "too many request headers"));
        }
        Err(e) => return Err(Refusal::new(400, format!("malformed request: {e}"))),
    };
    if used > MAX_HEAD {
        return Err(Refusal::new(431, "request head too large"));
    }
    let method = match parsed.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some(other) => {
            return Err(Refusal::new(
                405,
                format!("method {other} is not served (GET and HEAD only)"),
            ));
        }
        None => return Err(Refusal::new(400, "no method")),
    };
    let version = parsed.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut range = None;
    let mut host = None;
    for header in parsed.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| Refusal::new(400, format!("header {} is not text", header.name)))?
            .trim();
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("range") {
            if range.is_some() {
                return Err(Refusal::new(400, "more than one Range header"));
            }
            range = Some(value.to_owned());
        } else if header.name.eq_ignore_ascii_case("host") {
            let plain = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !plain {
                return Err(Refusal::new(400, "the Host header is not HOST[:PORT]"));
            }
            host = Some(value.to_owned());
        } else if header.name.eq_ignore_ascii_case("transfer-encoding")
            || (header.name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            return Err(Refusal::new(
                413,
                "requests with a body are not served (GET and HEAD only)",
            ));
        }
    }
    let target = parsed.path.ok_or_else(|| Refusal::new(400, "no path"))?;
    let path = decode_path(target)?;
    Ok(Some((
        Request {
            method,
            path,
            keep_alive,
            range,
            host,
        },
        used,
    )))
}

/// The path of a request target, percent-decoded, without query or fragment. Refuses
/// anything that is not an absolute path of printable text, and `..` segments.
fn decode_path(target: &str) -> Result<String, Refusal> {
    let raw = target.split(['?', '#']).next().unwrap_or_default();
    if !raw.starts_with('/') {
        return Err(Refusal::new(
            400,
            "the request target is not an absolute path",
        ));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Refusal::new(400, "bad percent-encoding in the path"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let path = String::from_utf8(out).map_err(|_| Refusal::new(400, "the path is not UTF-8"))?;
    if path.chars().any(char::is_control) {
        return Err(Refusal::new(400, "control characters in the path"));
    }
    if path.split('/').any(|segment| segment == "..") {
        return Err(Refusal::new(400, "'..' in the path"));
    }
    Ok(path)
}

/// What a `Range` header asks of a body of a known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range: the whole body, `200`.
    Whole,
    /// Bytes `start..=end`, `206`.
    Part {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// Nothing of the body satisfies it: `416`.
    Unsatisfiable,
}

/// Reads one `Range` header against a body of `size` bytes (RFC 9110 section 14).
///
/// One range of `bytes` is served; several ranges, or another unit, get the whole body
/// (the RFC lets a server ignore a range it does not serve). A syntactically bad range
/// is ignored as well.
pub fn parse_range(header: &str, size: u64) -> RangeAnswer {
    let header = header.trim();
    let Some(spec) = header
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &header[6..])
    else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let number = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => RangeAnswer::Whole,
        },
        (first, last) => {
            let Some(start) = number(first) else {
                return RangeAnswer::Whole;
            };
            let end = match last {
                "" => u64::MAX,
                last => match number(last) {
                    Some(end) if end >= start => end,
                    _ => return RangeAnswer::Whole,
                },
            };
            if start >= size {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part {
                    start,
                    end: end.min(size - 1),
                }
            }
        }
    }
}

/// A response head being built.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    status: u16,
    headers: String,
}

impl ResponseHead {
    /// A response with `status`.
    pub fn new(status: u16) -> Self {
        ResponseHead {
            status,
            headers: String::new(),
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Adds a header; the value must not hold line breaks (they are replaced).
    pub fn header(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string().replace(['\r', '\n'], " ");
        let _ = write!(self.headers, "{name}: {value}\r\n");
        self
    }

    /// The head on the wire, with `Content-Length: length` and the connection's fate.
    pub fn encode(&self, length: u64, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        format!(
            "HTTP/1.1 {} {}\r\nServer: osstream\r\nContent-Length: {length}\r\nConnection: {connection}\r\n{}\r\n",
            self.status,
            reason_phrase(self.status),
            self.headers
        )
        .into_bytes()
    }
}

/// The standard reason phrase of the statuses this server sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<(Request, usize)>, Refusal> {
        parse_request(text.as_bytes())
    }

    #[test]
    fn a_get_with_a_range_keeps_the_connection_by_default() {
        let text = "GET /san/abc%2Fd?x=1 HTTP/1.1\r\nHost: h\r\nRange: bytes=0-511\r\n\r\nGET";
        let (request, used) = parse(text).unwrap().unwrap();
        assert_eq!(used, text.len() - 3);
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/san/abc/d");
        assert!(request.keep_alive);
        assert_eq!(request.range.as_deref(), Some("bytes=0-511"));
        assert_eq!(request.host.as_deref(), Some("h"));
    }

    #[test]
    fn http_1_0_closes_unless_asked_and_close_is_honoured() {
        let (r, _) = parse("HEAD / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        let (r, _) = parse("HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
        let (r, _) = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
    }

    #[test]
    fn bad_requests_are_refused_with_a_status() {
        assert_eq!(parse("GET / HTTP/1.1\r\n").unwrap(), None);
        let status = |t: &str| parse(t).unwrap_err().status;
        assert_eq!(status("POST / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), 413);
        assert_eq!(
            status("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            413
        );
        assert_eq!(status("GET /a/../b HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /%2e%2e/b HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /%zz HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /%0a HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400);
        assert_eq!(status("\x00\x01garbage\r\n\r\n"), 400);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&long), 431);
        let many: String = (0..60).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeAnswer::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Part { start: 0, end: 99 });
        assert_eq!(
            parse_range("bytes=990-", 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-10", 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Whole);
        assert_eq!(parse_range("items=0-1", 1000), Whole);
        assert_eq!(parse_range("bytes=x-1", 1000), Whole);
        assert_eq!(parse_range("bytes=+1-2", 1000), Whole);
    }

    #[test]
    fn response_heads_carry_length_and_connection() {
        let head = ResponseHead::new(206)
            .header("Content-Range", "bytes 0-1/10")
            .header("X-Evil", "a\r\nb")
            .encode(2, true);
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with("HTTP/1.1 206 Partial Content\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(text.contains("X-Evil: a  b\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
