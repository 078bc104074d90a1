//! The transmission phase, free of sockets: one request in, one reply out.

use bytes::Bytes;
use osstream_core::{
    BlockSourceExt, Chunks, DynSource, Error, ErrorKind, ExtentKind, ReadOpts, WriteOpts, ZeroOpts,
};

use crate::proto::{self, BASE_ALLOCATION_ID, Request, alloc, cflag, chunk, cmd, errno};

/// One reply, ready for the wire: a small header and a body (read data, or a whole
/// structured chunk), written with one vectored write.
#[derive(Debug)]
pub(crate) struct Reply {
    head: [u8; 28],
    head_len: u8,
    pub body: Chunks,
}

impl Reply {
    fn with_head(head: &[u8], body: impl Into<Chunks>) -> Self {
        let mut buf = [0u8; 28];
        buf[..head.len()].copy_from_slice(head);
        Reply {
            head: buf,
            head_len: head.len() as u8,
            body: body.into(),
        }
    }

    /// The header bytes that precede the body.
    pub fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }
}

/// An attached export in transmission.
#[derive(Debug)]
pub(crate) struct Transmission {
    pub source: DynSource,
    pub structured: bool,
    pub base_allocation: bool,
    pub max_request: u32,
}

/// A refused or failed request: the NBD error and a message for the client and the log.
pub(crate) struct Failure {
    pub errno: u32,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(errno: u32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
        }
    }

    /// Maps an engine error for a command; `write_class` picks `ENOSPC` for writes past the end.
    fn from_error(err: &Error, write_class: bool) -> Self {
        let errno = match err.kind() {
            ErrorKind::OutOfRange if write_class => errno::ENOSPC,
            ErrorKind::OutOfRange | ErrorKind::InvalidInput | ErrorKind::Unsupported => {
                errno::EINVAL
            }
            ErrorKind::ReadOnly | ErrorKind::PermissionDenied => errno::EPERM,
            ErrorKind::NoSpace => errno::ENOSPC,
            ErrorKind::Shutdown => errno::ESHUTDOWN,
            _ => errno::EIO,
        };
        Failure::new(errno, err.to_string())
    }
}

/// Name of a command for logs.
pub(crate) fn command_name(command: u16) -> &'static str {
    match command {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    }
}

impl Transmission {
    /// Checks a request before any I/O: command, flags, range, size and capability.
    pub(crate) fn validate(&self, req: &Request) -> Result<(), Failure> {
        let cap = self.source.capability();
        let allowed = match req.command {
            cmd::READ => cflag::FUA | cflag::DF,
            cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE,
            cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
            other => {
                return Err(Failure::new(
                    errno::EINVAL,
                    format!("unknown command {other}"),
                ));
            }
        };
        if req.flags & !allowed != 0 {
            return Err(Failure::new(
                errno::EINVAL,
                format!(
                    "flags {:#x} are not valid for {}",
                    req.flags,
                    command_name(req.command)
                ),
            ));
        }
        let write_class = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if write_class && !cap.write {
            return Err(Failure::new(errno::EPERM, "the export is read-only"));
        }
        let needs = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Failure::new(
                    errno::EINVAL,
                    format!("{what} is not supported on this export"),
                ))
            }
        };
        match req.command {
            cmd::TRIM => needs(cap.trim, "TRIM")?,
            cmd::WRITE_ZEROES => needs(cap.write_zeroes, "WRITE_ZEROES")?,
            cmd::BLOCK_STATUS => {
                needs(self.base_allocation, "BLOCK_STATUS without base:allocation")?
            }
            _ => {}
        }
        if req.command == cmd::BLOCK_STATUS && req.length == 0 {
            return Err(Failure::new(errno::EINVAL, "BLOCK_STATUS of zero bytes"));
        }
        if matches!(req.command, cmd::READ | cmd::WRITE) && req.length > self.max_request {
            return Err(Failure::new(
                errno::EINVAL,
                format!(
                    "request of {} bytes exceeds the maximum of {} bytes",
                    req.length, self.max_request
                ),
            ));
        }
        if req.command != cmd::FLUSH {
            let size = self.source.info().size;
            let in_range = req
                .offset
                .checked_add(u64::from(req.length))
                .is_some_and(|end| end <= size);
            if !in_range {
                let errno = if matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES) {
                    errno::ENOSPC
                } else {
                    errno::EINVAL
                };
                return Err(Failure::new(
                    errno,
                    format!(
                        "{} bytes at offset {} reach past the end of the export ({size} bytes)",
                        req.length, req.offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs one validated request. `payload` is the data of a `WRITE`.
    pub(crate) async fn execute(&self, req: Request, payload: Bytes) -> Result<Reply, Failure> {
        let fua = req.flags & cflag::FUA != 0;
        let write_class = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        let map = |e: Error| Failure::from_error(&e, write_class);
        let source = &self.source;
        let len = req.length as usize;
        match req.command {
            cmd::READ => {
                let data = source
                    .read_at(req.offset, len, ReadOpts::default())
                    .await
                    .map_err(map)?;
                if data.len() != len {
                    return Err(Failure::new(errno::EIO, "short read from the source"));
                }
                if len == 0 && self.structured {
                    // An OFFSET_DATA chunk must carry at least one byte.
                    return Ok(Reply::with_head(
                        &proto::chunk_header(req.cookie, chunk::FLAG_DONE, chunk::NONE, 0),
                        Chunks::new(),
                    ));
                }
                Ok(self.data_reply(req, data))
            }
            cmd::WRITE => {
                source
                    .write_at(req.offset, payload, WriteOpts { fua })
                    .await
                    .map_err(map)?;
                Ok(self.ok_reply(req))
            }
            cmd::FLUSH => {
                source.flush().await.map_err(map)?;
                Ok(self.ok_reply(req))
            }
            cmd::TRIM => {
                source
                    .trim(req.offset, u64::from(req.length))
                    .await
                    .map_err(map)?;
                if fua {
                    source.flush().await.map_err(map)?;
                }
                Ok(self.ok_reply(req))
            }
            cmd::WRITE_ZEROES => {
                let opts = ZeroOpts {
                    fua,
                    may_trim: req.flags & cflag::NO_HOLE == 0,
                };
                source
                    .write_zeroes(req.offset, u64::from(req.length), opts)
                    .await
                    .map_err(map)?;
                Ok(self.ok_reply(req))
            }
            cmd::CACHE => {
                // Warm the caches below in bounded steps; the client only waits for the ack.
                let mut done = 0usize;
                while done < len {
                    let step = (len - done).min(self.max_request as usize);
                    source
                        .prefetch(req.offset + done as u64, step)
                        .await
                        .map_err(map)?;
                    done += step;
                }
                Ok(self.ok_reply(req))
            }
            cmd::BLOCK_STATUS => {
                let extents = source
                    .extents(req.offset, u64::from(req.length))
                    .await
                    .map_err(map)?;
                let mut descriptors: Vec<(u32, u32)> = Vec::with_capacity(extents.len());
                for extent in extents.into_iter().filter(|e| e.length > 0) {
                    let flags = match extent.kind {
                        ExtentKind::Data => 0,
                        ExtentKind::Zero => alloc::ZERO,
                        ExtentKind::Hole => alloc::HOLE | alloc::ZERO,
                    };
                    let length = u32::try_from(extent.length).unwrap_or(u32::MAX);
                    match descriptors.last_mut() {
                        Some((last_len, last_flags)) if *last_flags == flags => {
                            *last_len = last_len.saturating_add(length)
                        }
                        _ => descriptors.push((length, flags)),
                    }
                }
                // The spec caps a chunk at 2^20 descriptors; a shorter answer is allowed.
                descriptors.truncate(1 << 20);
                if descriptors.is_empty() {
                    descriptors.push((req.length, 0));
                }
                if req.flags & cflag::REQ_ONE != 0 {
                    descriptors.truncate(1);
                    descriptors[0].0 = descriptors[0].0.min(req.length);
                }
                Ok(Reply::with_head(
                    &[],
                    proto::block_status_chunk(req.cookie, BASE_ALLOCATION_ID, &descriptors),
                ))
            }
            _ => Err(Failure::new(errno::EINVAL, "unknown command")),
        }
    }

    fn ok_reply(&self, req: Request) -> Reply {
        Reply::with_head(&proto::simple_reply(req.cookie, 0), Chunks::new())
    }

    fn data_reply(&self, req: Request, data: Chunks) -> Reply {
        if self.structured {
            Reply::with_head(
                &proto::offset_data_header(req.cookie, req.offset, data.len()),
                data,
            )
        } else {
            Reply::with_head(&proto::simple_reply(req.cookie, 0), data)
        }
    }

    /// The reply for a failed request: an error chunk when structured replies are on
    /// (required for reads, and it carries the message), else a simple error reply.
    pub(crate) fn error_reply(&self, req: &Request, failure: &Failure) -> Reply {
        if self.structured {
            Reply::with_head(
                &[],
                proto::error_chunk(req.cookie, failure.errno, &failure.message),
            )
        } else {
            Reply::with_head(
                &proto::simple_reply(req.cookie, failure.errno),
                Chunks::new(),
            )
        }
    }
}
