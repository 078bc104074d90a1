//! TFTP packets, sans IO (RFC 1350, options per RFC 2347: blksize 2348, timeout and tsize
//! 2349, windowsize 7440). Parsing never panics on any input (it is fuzzed).

use std::fmt::Write as _;

/// Read request.
pub const OP_RRQ: u16 = 1;
/// Write request.
pub const OP_WRQ: u16 = 2;
/// Data block.
pub const OP_DATA: u16 = 3;
/// Acknowledgement.
pub const OP_ACK: u16 = 4;
/// Error.
pub const OP_ERROR: u16 = 5;
/// Option acknowledgement.
pub const OP_OACK: u16 = 6;

/// Error codes of RFC 1350 and 2347.
pub mod code {
    /// Not defined, see the message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL: u16 = 4;
    /// Unknown transfer ID.
    pub const UNKNOWN_TID: u16 = 5;
    /// Option negotiation refused (RFC 2347).
    pub const OPTION_REFUSED: u16 = 8;
}

/// The options a read request may carry; `None` when not asked for (or not valid, which
/// RFC 2347 lets a server ignore).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Block size, 8..=65464 (RFC 2348).
    pub blksize: Option<u16>,
    /// Transfer size asked for (the client sends 0 in a read request).
    pub tsize: bool,
    /// Retransmission timeout in seconds, 1..=255 (RFC 2349).
    pub timeout: Option<u8>,
    /// Blocks sent before an ACK is awaited, 1..=65535 (RFC 7440).
    pub windowsize: Option<u16>,
}

impl Options {
    /// Whether any option was asked for (then the server answers with an OACK).
    pub fn any(&self) -> bool {
        self.blksize.is_some() || self.tsize || self.timeout.is_some() || self.windowsize.is_some()
    }
}

/// A read (or write) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name as sent.
    pub filename: String,
    /// The transfer mode, lowercased (`octet`, `netascii`, `mail`).
    pub mode: String,
    /// The options recognised.
    pub options: Options,
}

/// One packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// RRQ.
    Read(Request),
    /// WRQ.
    Write(Request),
    /// DATA.
    Data {
        /// Block number (rolls over past 65535).
        block: u16,
        /// Up to the block size.
        data: &'a [u8],
    },
    /// ACK.
    Ack(u16),
    /// ERROR.
    Error {
        /// Error code.
        code: u16,
        /// Text.
        message: String,
    },
    /// OACK.
    Oack,
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(why: impl Into<String>) -> Malformed {
    Malformed(why.into())
}

/// Splits NUL-terminated strings; the buffer must end with a NUL.
fn strings(body: &[u8]) -> Result<Vec<String>, Malformed> {
    let Some((&0, body)) = body.split_last() else {
        return Err(bad("a request's last field is not NUL-terminated"));
    };
    body.split(|&b| b == 0)
        .map(|field| {
            std::str::from_utf8(field)
                .map(str::to_owned)
                .map_err(|_| bad("a request field is not text"))
        })
        .collect()
}

fn request(body: &[u8]) -> Result<Request, Malformed> {
    let fields = strings(body)?;
    if fields.len() < 2 {
        return Err(bad("a request needs a file name and a mode"));
    }
    if fields.len() % 2 != 0 {
        return Err(bad("an option without a value"));
    }
    let filename = fields[0].clone();
    if filename.is_empty() {
        return Err(bad("an empty file name"));
    }
    let mode = fields[1].to_ascii_lowercase();
    let mut options = Options::default();
    for pair in fields[2..].chunks(2) {
        let (name, value) = (pair[0].to_ascii_lowercase(), pair[1].trim());
        match name.as_str() {
            "blksize" => {
                options.blksize = value
                    .parse::<u16>()
                    .ok()
                    .filter(|v| (8..=65464).contains(v))
            }
            "tsize" => options.tsize = value.parse::<u64>().is_ok(),
            "timeout" => options.timeout = value.parse::<u8>().ok().filter(|v| *v >= 1),
            "windowsize" => options.windowsize = value.parse::<u16>().ok().filter(|v| *v >= 1),
            _ => {} // Unknown options are ignored (RFC 2347).
        }
    }
    Ok(Request {
        filename,
        mode,
        options,
    })
}

/// Parses one datagram.
pub fn parse(datagram: &[u8]) -> Result<Packet<'_>, Malformed> {
    if datagram.len() < 2 {
        return Err(bad(format!(
            "{} bytes is too short for a packet",
            datagram.len()
        )));
    }
    let opcode = u16::from_be_bytes([datagram[0], datagram[1]]);
    let body = &datagram[2..];
    let number = || -> Result<u16, Malformed> {
        body.get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("a packet without its block number"))
    };
    match opcode {
        OP_RRQ => Ok(Packet::Read(request(body)?)),
        OP_WRQ => Ok(Packet::Write(request(body)?)),
        OP_DATA => Ok(Packet::Data {
            block: number()?,
            data: &body[2..],
        }),
        OP_ACK if body.len() == 2 => Ok(Packet::Ack(number()?)),
        OP_ACK => Err(bad(format!("an ACK of {} bytes", datagram.len()))),
        OP_ERROR => {
            let code = number()?;
            let text = body[2..].split(|&b| b == 0).next().unwrap_or_default();
            Ok(Packet::Error {
                code,
                message: String::from_utf8_lossy(text).into_owned(),
            })
        }
        OP_OACK => Ok(Packet::Oack),
        other => Err(bad(format!("unknown opcode {other}"))),
    }
}

/// A DATA packet: header and `data`.
pub fn data_packet(block: u16, data: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(4 + data.len());
    packet.extend_from_slice(&OP_DATA.to_be_bytes());
    packet.extend_from_slice(&block.to_be_bytes());
    packet.extend_from_slice(data);
    packet
}

/// An ERROR packet. The message is cut to printable ASCII and 200 bytes.
pub fn error_packet(code: u16, message: &str) -> Vec<u8> {
    let mut packet = Vec::with_capacity(5 + message.len());
    packet.extend_from_slice(&OP_ERROR.to_be_bytes());
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend(
        message
            .bytes()
            .map(|b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b
                } else {
                    b'?'
                }
            })
            .take(200),
    );
    packet.push(0);
    packet
}

/// An OACK packet with `options` (name, value) in order.
pub fn oack_packet(options: &[(&str, String)]) -> Vec<u8> {
    let mut packet = OP_OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        packet.extend_from_slice(name.as_bytes());
        packet.push(0);
        packet.extend_from_slice(value.as_bytes());
        packet.push(0);
    }
    packet
}

/// An ACK packet (what a client sends; for tests and benchmarks).
pub fn ack_packet(block: u16) -> Vec<u8> {
    let mut packet = OP_ACK.to_be_bytes().to_vec();
    packet.extend_from_slice(&block.to_be_bytes());
    packet
}

/// A read request with options (what a client sends; for tests and benchmarks).
pub fn read_request(filename: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = OP_RRQ.to_be_bytes().to_vec();
    let mut text = String::new();
    let _ = write!(text, "{filename}\0octet\0");
    for (name, value) in options {
        let _ = write!(text, "{name}\0{value}\0");
    }
    packet.extend_from_slice(text.as_bytes());
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_requests_carry_their_options() {
        let packet = read_request(
            "ipxe.efi",
            &[
                ("BLKSIZE", "1432"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "8"),
                ("x", "y"),
            ],
        );
        let Packet::Read(request) = parse(&packet).unwrap() else {
            panic!("not a read")
        };
        assert_eq!(request.filename, "ipxe.efi");
        assert_eq!(request.mode, "octet");
        assert_eq!(
            request.options,
            Options {
                blksize: Some(1432),
                tsize: true,
                timeout: Some(3),
                windowsize: Some(8),
            }
        );
    }

    #[test]
    fn out_of_range_options_are_ignored() {
        let packet = read_request(
            "f",
            &[
                ("blksize", "7"),
                ("timeout", "0"),
                ("windowsize", "0"),
                ("tsize", "x"),
            ],
        );
        let Packet::Read(request) = parse(&packet).unwrap() else {
            panic!()
        };
        assert!(!request.options.any());
        let packet = read_request("f", &[("blksize", "65465")]);
        let Packet::Read(request) = parse(&packet).unwrap() else {
            panic!()
        };
        assert_eq!(request.options.blksize, None);
    }

    #[test]
    fn malformed_datagrams_are_errors_not_panics() {
        for datagram in [
            &b""[..],
            b"\x00",
            b"\x00\x01",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01\x00octet\x00",
            b"\x00\x01f\x00octet\x00blksize\x00",
            b"\x00\x01\xff\xfe\x00octet\x00",
            b"\x00\x04\x00",
            b"\x00\x04\x00\x01\x02",
            b"\x00\x09\x00\x01",
            b"\x00\x03\x00",
        ] {
            assert!(parse(datagram).is_err(), "{datagram:?}");
        }
        assert_eq!(parse(b"\x00\x04\x12\x34").unwrap(), Packet::Ack(0x1234));
        assert_eq!(
            parse(b"\x00\x05\x00\x08refused\x00").unwrap(),
            Packet::Error {
                code: 8,
                message: "refused".into()
            }
        );
    }

    #[test]
    fn packets_encode_as_the_rfcs_say() {
        assert_eq!(data_packet(0x0102, b"ab"), b"\x00\x03\x01\x02ab");
        assert_eq!(error_packet(1, "no\nfile"), b"\x00\x05\x00\x01no?file\x00");
        assert_eq!(
            oack_packet(&[("blksize", "1432".into()), ("tsize", "9".into())]),
            b"\x00\x06blksize\x001432\x00tsize\x009\x00"
        );
    }
}
