//! The NBD wire format, sans I/O: bytes in, typed frames out, and back.
//!
//! Nothing here touches a socket, so every frame can be tested with byte fixtures and
//! fuzzed. The names follow the protocol document (`doc/proto.md` of the NBD project):
//! fixed newstyle negotiation, simple and structured replies, `base:allocation`.

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: opens the newstyle greeting and every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types; errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values carried in replies.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod alloc {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The longest option payload a server accepts; longer ones close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest string (export name, query) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Size of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The frame starts with the wrong magic number: the stream cannot be resynchronised.
    BadMagic { expected: u64, found: u64 },
    /// An option announces more data than the server accepts.
    OptionTooLong(u32),
    /// The option's data does not parse (lengths that overrun, bad UTF-8, NUL bytes...).
    Malformed(&'static str),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadMagic { expected, found } => {
                write!(f, "bad magic {found:#x} (expected {expected:#x})")
            }
            ProtoError::OptionTooLong(len) => {
                write!(
                    f,
                    "option of {len} bytes exceeds the {MAX_OPTION_LEN}-byte limit"
                )
            }
            ProtoError::Malformed(what) => write!(f, "malformed option data: {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// The 18-byte newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header; refuses bad magic and data longer than
    /// [`MAX_OPTION_LEN`] before anything is allocated for it.
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if length > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong(length));
        }
        Ok(OptionHeader { option, length })
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: the old way to pick an export and start transmission.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS` (not offered).
    StartTls,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO` (`go == true`).
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    MetaContext {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    /// An option this server does not know, or known data where none is allowed.
    Unsupported(u32),
}

/// Reads big-endian fields off the front of a slice, failing instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn string(&mut self, len: usize, what: &'static str) -> Result<String, ProtoError> {
        if len > MAX_STRING_LEN {
            return Err(ProtoError::Malformed(what));
        }
        let bytes = self.take(len, what)?;
        if bytes.contains(&0) {
            return Err(ProtoError::Malformed(what));
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::Malformed(what))
    }

    fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed(what))
        }
    }
}

/// Decodes the data of option `option`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    let mut cur = Cursor(data);
    let parsed = match option {
        opt::EXPORT_NAME => ClientOption::ExportName(cur.string(data.len(), "export name")?),
        opt::ABORT => ClientOption::Abort,
        opt::LIST => {
            cur.finish("NBD_OPT_LIST carries no data")?;
            ClientOption::List
        }
        opt::STARTTLS => ClientOption::StartTls,
        opt::INFO | opt::GO => {
            let len = cur.u32("export name length")? as usize;
            let name = cur.string(len, "export name")?;
            let count = cur.u16("information request count")? as usize;
            let mut requests = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                requests.push(cur.u16("information request")?);
            }
            cur.finish("trailing bytes after information requests")?;
            ClientOption::Info {
                go: option == opt::GO,
                name,
                requests,
            }
        }
        opt::STRUCTURED_REPLY => {
            cur.finish("NBD_OPT_STRUCTURED_REPLY carries no data")?;
            ClientOption::StructuredReply
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let len = cur.u32("export name length")? as usize;
            let name = cur.string(len, "export name")?;
            let count = cur.u32("query count")? as usize;
            let mut queries = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                let len = cur.u32("query length")? as usize;
                queries.push(cur.string(len, "query")?);
            }
            cur.finish("trailing bytes after queries")?;
            ClientOption::MetaContext {
                set: option == opt::SET_META_CONTEXT,
                name,
                queries,
            }
        }
        other => ClientOption::Unsupported(other),
    };
    Ok(parsed)
}

/// Appends one option reply.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Appends an error reply whose data is a message for humans (cut to the string limit).
pub fn put_option_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    put_option_reply(out, option, reply, &message.as_bytes()[..end]);
}

/// Data of an `NBD_REP_SERVER` reply for one export.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    data
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&info::EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    data
}

/// Data of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&kind.to_be_bytes());
    data.extend_from_slice(&text.as_bytes()[..text.len().min(MAX_STRING_LEN)]);
    data
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&minimum.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&maximum.to_be_bytes());
    data
}

/// Data of `NBD_REP_META_CONTEXT`.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless the client asked for
/// `NO_ZEROES`, 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut data = Vec::with_capacity(134);
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        data.extend_from_slice(&[0u8; 124]);
    }
    data
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflag`).
    pub flags: u16,
    /// Command type (`cmd`).
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes (for `WRITE`, the payload that follows).
    pub length: u32,
}

impl Request {
    /// Decodes a request header; a bad magic means the stream is lost.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(Request {
            flags: u16::from_be_bytes(bytes[4..6].try_into().expect("2 bytes")),
            command: u16::from_be_bytes(bytes[6..8].try_into().expect("2 bytes")),
            cookie: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes the header (used by tests and the fuzz target to build frames).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The 16-byte header of a simple reply.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The 20-byte header of a structured reply chunk whose payload is `length` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// Header plus offset of a final `OFFSET_DATA` chunk carrying `len` data bytes; the data
/// follows it on the wire.
pub fn offset_data_header(cookie: u64, offset: u64, len: usize) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..20].copy_from_slice(&chunk_header(
        cookie,
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        8 + len as u32,
    ));
    out[20..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A final `ERROR` chunk with a message for humans.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Bytes {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let mut out = BytesMut::with_capacity(26 + message.len());
    out.put_slice(&chunk_header(
        cookie,
        chunk::FLAG_DONE,
        chunk::ERROR,
        6 + message.len() as u32,
    ));
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
    out.freeze()
}

/// A final `BLOCK_STATUS` chunk for context `context` with `(length, flags)` descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Bytes {
    let len = 4 + 8 * descriptors.len();
    let mut out = BytesMut::with_capacity(20 + len);
    out.put_slice(&chunk_header(
        cookie,
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        len as u32,
    ));
    out.put_u32(context);
    for (length, flags) in descriptors {
        out.put_u32(*length);
        out.put_u32(*flags);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        assert_eq!(&server_greeting()[..], b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn option_header_fixture() {
        let bytes: [u8; 16] = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a";
        assert_eq!(
            OptionHeader::parse(&bytes).unwrap(),
            OptionHeader {
                option: 7,
                length: 10
            }
        );
        let big: [u8; 16] = *b"IHAVEOPT\x00\x00\x00\x07\x00\x01\x00\x01";
        assert_eq!(
            OptionHeader::parse(&big).unwrap_err(),
            ProtoError::OptionTooLong(65537)
        );
        let bad: [u8; 16] = *b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_fixture() {
        // name "demo", two info requests: NAME, BLOCK_SIZE
        let data = b"\x00\x00\x00\x04demo\x00\x02\x00\x01\x00\x03";
        assert_eq!(
            parse_option(opt::GO, data).unwrap(),
            ClientOption::Info {
                go: true,
                name: "demo".into(),
                requests: vec![1, 3]
            }
        );
        assert_eq!(
            parse_option(opt::GO, b"\x00\x00\x00\x09demo").unwrap_err(),
            ProtoError::Malformed("export name")
        );
        assert!(parse_option(opt::INFO, b"\x00\x00\x00\x04demo\x00\x01\x00").is_err());
        assert!(
            parse_option(opt::INFO, b"\x00\x00\x00\x02a\x00\x00\x00").is_err(),
            "NUL in name"
        );
    }

    #[test]
    fn meta_context_fixture() {
        let data = b"\x00\x00\x00\x01x\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation";
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, data).unwrap(),
            ClientOption::MetaContext {
                set: true,
                name: "x".into(),
                queries: vec![BASE_ALLOCATION.into()]
            }
        );
        // a query count far beyond the data must fail, not allocate
        let lying = b"\x00\x00\x00\x01x\xff\xff\xff\xff";
        assert!(parse_option(opt::LIST_META_CONTEXT, lying).is_err());
    }

    #[test]
    fn request_and_replies_fixture() {
        let req = Request {
            flags: cflag::FUA,
            command: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let bytes = req.encode();
        assert_eq!(&bytes[..8], b"\x25\x60\x95\x13\x00\x01\x00\x01");
        assert_eq!(Request::parse(&bytes).unwrap(), req);
        let mut bad = bytes;
        bad[0] = 0;
        assert!(Request::parse(&bad).is_err());
        assert_eq!(
            &simple_reply(7, errno::EINVAL)[..],
            b"\x67\x44\x66\x98\x00\x00\x00\x16\x00\x00\x00\x00\x00\x00\x00\x07"
        );
        let chunk = error_chunk(9, errno::EIO, "boom");
        assert_eq!(&chunk[..8], b"\x66\x8e\x33\xef\x00\x01\x80\x01");
        assert_eq!(
            &chunk[16..],
            b"\x00\x00\x00\x0a\x00\x00\x00\x05\x00\x04boom"
        );
        let status = block_status_chunk(
            1,
            BASE_ALLOCATION_ID,
            &[(4096, 0), (8192, alloc::HOLE | alloc::ZERO)],
        );
        assert_eq!(status.len(), 20 + 4 + 16);
        assert_eq!(&status[16..20], &20u32.to_be_bytes());
    }

    #[test]
    fn option_reply_fixture() {
        let mut out = BytesMut::new();
        put_option_reply(&mut out, opt::LIST, rep::SERVER, &server_entry("demo", ""));
        assert_eq!(&out[..], b"\x00\x03\xe8\x89\x04\x55\x65\xa9\x00\x00\x00\x03\x00\x00\x00\x02\x00\x00\x00\x08\x00\x00\x00\x04demo");
    }

    /// Deterministic random bytes through every decoder: no panic, no huge allocation.
    #[test]
    fn decoders_survive_random_bytes() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for option in 0..12 {
                let _ = parse_option(option, &data);
            }
            if data.len() >= 28 {
                let _ = Request::parse(data[..28].try_into().unwrap());
                let _ = OptionHeader::parse(data[..16].try_into().unwrap());
            }
        }
    }
}
