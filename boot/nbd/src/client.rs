//! The client half of NBD, sans I/O: the frames the client agent sends to a server and
//! how it reads the server's answers (fixed newstyle, `NBD_OPT_GO`, simple replies).
//! Pure functions over bytes, like [`crate::proto`], so they are tested without sockets.

use crate::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    MAX_OPTION_LEN, MAX_STRING_LEN, NBD_MAGIC, OPTION_REPLY_MAGIC, ProtoError, SIMPLE_REPLY_MAGIC,
    info, opt,
};

/// Size of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Size of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a simple reply header (magic, error, cookie).
pub const SIMPLE_REPLY_LEN: usize = 16;

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// Checks the server's greeting and returns the client flags to answer it with. A server
/// that is not fixed newstyle is refused: the agent asks for exports by name with
/// `NBD_OPT_GO`, which needs it.
pub fn answer_greeting(greeting: &[u8; GREETING_LEN]) -> Result<[u8; 4], ProtoError> {
    let (magic, ihaveopt) = (be_u64(&greeting[..8]), be_u64(&greeting[8..16]));
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    if ihaveopt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: ihaveopt,
        });
    }
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::Malformed(
            "the server does not speak fixed newstyle negotiation",
        ));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    Ok(client.to_be_bytes())
}

/// `NBD_OPT_GO` for `export`, asking for no extra information (the server always sends
/// `NBD_INFO_EXPORT`).
pub fn opt_go(export: &str) -> Result<Vec<u8>, ProtoError> {
    if export.len() > MAX_STRING_LEN {
        return Err(ProtoError::Malformed("export name longer than 4096 bytes"));
    }
    let data_len = 4 + export.len() + 2;
    let mut out = Vec::with_capacity(16 + data_len);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(data_len as u32).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    Ok(out)
}

/// `NBD_OPT_STARTTLS`: asks the server to upgrade the connection to TLS.
pub fn opt_starttls() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&opt::STARTTLS.to_be_bytes());
    out
}

/// `NBD_OPT_ABORT`: what a client sends to leave politely during negotiation.
pub fn opt_abort() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&opt::ABORT.to_be_bytes());
    out
}

/// The header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// `rep::*`; errors have bit 31 set.
    pub reply: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionReply {
    /// Decodes an option reply header; its data must not exceed what a server may send.
    pub fn parse(bytes: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(&bytes[..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        let reply = OptionReply {
            option: be_u32(&bytes[8..12]),
            reply: be_u32(&bytes[12..16]),
            length: be_u32(&bytes[16..20]),
        };
        if reply.length > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong(reply.length));
        }
        Ok(reply)
    }

    /// An error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply & (1 << 31) != 0
    }
}

/// Reads `NBD_INFO_EXPORT` (size and transmission flags) out of an `NBD_REP_INFO`
/// payload; `None` for any other information type.
pub fn info_export(data: &[u8]) -> Result<Option<(u64, u16)>, ProtoError> {
    if data.len() < 2 {
        return Err(ProtoError::Malformed("NBD_REP_INFO shorter than its type"));
    }
    if u16::from_be_bytes([data[0], data[1]]) != info::EXPORT {
        return Ok(None);
    }
    if data.len() != 12 {
        return Err(ProtoError::Malformed("NBD_INFO_EXPORT is not 12 bytes"));
    }
    Ok(Some((
        be_u64(&data[2..10]),
        u16::from_be_bytes([data[10], data[11]]),
    )))
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or the errno the request failed with (`errno::*`).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Decodes a simple reply header; a bad magic means the stream is lost.
    pub fn parse(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&bytes[..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(SimpleReply {
            error: be_u32(&bytes[4..8]),
            cookie: be_u64(&bytes[8..16]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        ClientOption, OptionHeader, info_export as server_info_export, parse_option,
        put_option_reply, rep, server_greeting, simple_reply,
    };

    #[test]
    fn the_client_answers_this_servers_greeting_with_fixed_newstyle_and_no_zeroes() {
        let flags = answer_greeting(&server_greeting()).unwrap();
        assert_eq!(
            u32::from_be_bytes(flags),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        let mut old = server_greeting();
        old[17] = 0;
        assert!(answer_greeting(&old).is_err());
        let mut bad = server_greeting();
        bad[0] ^= 1;
        assert!(matches!(
            answer_greeting(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn opt_go_is_what_the_server_parses_as_go_with_that_name() {
        let frame = opt_go("s/token").unwrap();
        let header = OptionHeader::parse(frame[..16].try_into().unwrap()).unwrap();
        assert_eq!(header.option, opt::GO);
        match parse_option(header.option, &frame[16..]).unwrap() {
            ClientOption::Info { go, name, requests } => {
                assert!(go);
                assert_eq!(name, "s/token");
                assert!(requests.is_empty());
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(opt_go(&"x".repeat(5000)).is_err());
    }

    #[test]
    fn option_replies_and_export_info_decode_as_the_server_encodes_them() {
        let mut out = bytes::BytesMut::new();
        put_option_reply(
            &mut out,
            opt::GO,
            rep::INFO,
            &server_info_export(1 << 30, 0x4f),
        );
        let reply = OptionReply::parse(out[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            (reply.option, reply.reply, reply.length),
            (opt::GO, rep::INFO, 12)
        );
        assert!(!reply.is_error());
        assert_eq!(info_export(&out[20..]).unwrap(), Some((1 << 30, 0x4f)));
        assert_eq!(info_export(&[0, 2, 1, 2]).unwrap(), None);
        assert!(info_export(&[0]).is_err());
        assert!(info_export(&[0, 0, 1]).is_err());
        let mut error = bytes::BytesMut::new();
        put_option_reply(&mut error, opt::GO, rep::ERR_UNKNOWN, b"no such export");
        assert!(
            OptionReply::parse(error[..20].try_into().unwrap())
                .unwrap()
                .is_error()
        );
    }

    #[test]
    fn simple_replies_decode_and_a_bad_magic_is_refused() {
        let reply = SimpleReply::parse(&simple_reply(42, 5)).unwrap();
        assert_eq!(
            reply,
            SimpleReply {
                error: 5,
                cookie: 42
            }
        );
        let mut bad = simple_reply(1, 0);
        bad[0] ^= 0xff;
        assert!(SimpleReply::parse(&bad).is_err());
    }
}
