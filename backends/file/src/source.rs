use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, ExtentKind, Geometry,
    ImageStat, ReadOpts, Result, SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range,
    read_only_error,
};

use crate::error::io_error;

/// One open image file.
#[derive(Debug)]
pub(crate) struct FileSource {
    file: Arc<File>,
    path: Arc<PathBuf>,
    info: SourceInfo,
    writable: bool,
}

impl FileSource {
    pub(crate) fn open(
        path: PathBuf,
        identity: String,
        stat: ImageStat,
        writable: bool,
    ) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| io_error(e, "open", &path))?;
        Ok(FileSource {
            writable,
            ..FileSource::from_file(file, path, identity, stat)
        })
    }

    /// A read-only source over a file opened already (by [`crate::FileTree`]).
    pub(crate) fn from_file(file: File, path: PathBuf, identity: String, stat: ImageStat) -> Self {
        FileSource {
            file: Arc::new(file),
            path: Arc::new(path),
            info: SourceInfo {
                name: stat.name,
                identity,
                size: stat.size,
                generation: stat.generation,
            },
            writable: false,
        }
    }

    /// Runs `work` with the file on the blocking pool, where positional I/O belongs.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&File, &std::path::Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || work(&file, &path))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("blocking I/O task failed: {e}"),
                )
            })?
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(read_only_error(&self.info, op))
        }
    }
}

/// `fallocate` with `mode` over a range; `Ok(false)` when the filesystem does not support it.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<bool> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor stays open for
    // the whole call because `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

/// Reads at `offset + buf.len()` until `buf` holds `len` bytes, into capacity that is
/// never zero-filled first (on a cold read the memset cost as much as a tenth of the
/// server's CPU). With `nowait`, reads only what the page cache holds (`RWF_NOWAIT`) and
/// returns `Ok(false)` as soon as the kernel would have to wait for the disk; the caller
/// then finishes on the blocking pool. `Ok(true)`: `buf` is complete.
fn pread_fill(
    file: &File,
    buf: &mut Vec<u8>,
    len: usize,
    offset: u64,
    nowait: bool,
) -> std::io::Result<bool> {
    buf.reserve_exact(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let at = libc::off_t::try_from(offset + buf.len() as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let missing = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..missing];
        let n = if nowait {
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            // SAFETY: the one iovec points at `spare.len()` writable bytes (the vector's
            // unused capacity), preadv2 writes at most that many; `file` keeps the
            // descriptor open for the call.
            unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) }
        } else {
            // SAFETY: pread writes at most `spare.len()` bytes to a pointer valid for that
            // many writes (the vector's unused capacity); `file` keeps the descriptor open.
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) }
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not cached (EAGAIN), or no RWF_NOWAIT on this kernel or filesystem.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) if nowait => {
                    return Ok(false);
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: the read initialised the next `n` bytes, and `n <= spare.len()`.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(true)
}

/// Reads up to this size are first tried from the page cache on the calling thread.
const NOWAIT_MAX: usize = 2 << 20;

/// A file's generation: its modification time (ns) and size. Any write moves it.
pub(crate) fn generation_of(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{mtime}-{}", meta.len())
}

/// Fails when the read-only file under `file` is no longer the generation `expected`
/// (written in place behind osstream's back, `cp` over it): the bytes just read may be
/// old, new or a mix, so they are not returned. Checked after each read, so a change
/// that lands during the read is caught too.
fn check_unchanged(file: &File, path: &std::path::Path, expected: &str) -> Result<()> {
    let meta = file.metadata().map_err(|e| io_error(e, "fstat", path))?;
    if generation_of(&meta) == expected {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "{} was changed in place while clients read it (its size or modification time moved): \
             its reads fail rather than mix old and new bytes; replace images with \
             `osstream vdisk import --replace`, and reconnect to read the new one",
            path.display()
        ),
    )
    .with_op("read_at"))
}

fn read_error(e: std::io::Error, path: &std::path::Path, offset: u64) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::new(
            ErrorKind::Io,
            format!("{} is shorter than when it was opened", path.display()),
        )
        .with_op("read_at")
    } else {
        io_error(e, "read_at", path)
    }
    .with_context("offset", offset)
}

/// Writes zeroes by hand, in bounded chunks, where `fallocate` cannot.
fn write_zero_bytes(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// `lseek` with `whence` (`SEEK_DATA`/`SEEK_HOLE`); `None` past the last data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads its integer arguments; `file` keeps the descriptor open.
    // It moves the shared file offset, which this backend never uses (all I/O is
    // positional), so concurrent readers are unaffected.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Maps `offset..offset+len` to data and hole extents with `SEEK_DATA`/`SEEK_HOLE`.
fn map_extents(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut extents = Vec::new();
    let mut position = offset;
    while position < end {
        let data_start = seek(file, position, libc::SEEK_DATA)?
            .unwrap_or(end)
            .min(end);
        if data_start > position {
            extents.push(Extent {
                length: data_start - position,
                kind: ExtentKind::Hole,
            });
            position = data_start;
            continue;
        }
        let hole_start = seek(file, position, libc::SEEK_HOLE)?
            .unwrap_or(end)
            .min(end);
        let data_end = hole_start.max(position + 1).min(end);
        extents.push(Extent {
            length: data_end - position,
            kind: ExtentKind::Data,
        });
        position = data_end;
        if extents.len() >= 1024 {
            break; // enough for one reply; the client asks again for the rest
        }
    }
    Ok(extents)
}

#[async_trait]
impl BlockSource for FileSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        Capability {
            write: self.writable,
            flush: self.writable,
            fua: self.writable,
            trim: self.writable,
            write_zeroes: self.writable,
            extents: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry::default()
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        // Most reads of a served image hit the page cache: copy those on this thread
        // and skip the hand-off to the blocking pool and back (measured: the hand-offs
        // were the largest cost of cold-cache reads after the copies themselves).
        let mut buf = Vec::new();
        // A writable image changes with its own writes; a read-only one must not change.
        let expected = (!self.writable).then(|| self.info.generation.clone());
        if len <= NOWAIT_MAX {
            match pread_fill(&self.file, &mut buf, len, offset, true) {
                Ok(true) => {
                    if let Some(expected) = &expected {
                        check_unchanged(&self.file, &self.path, expected)?;
                    }
                    return Ok(Chunks::from(buf));
                }
                Ok(false) => {}
                Err(e) => return Err(read_error(e, &self.path, offset)),
            }
        }
        self.blocking(move |file, path| {
            pread_fill(file, &mut buf, len, offset, false)
                .map_err(|e| read_error(e, path, offset))?;
            if let Some(expected) = &expected {
                check_unchanged(file, path, expected)?;
            }
            Ok(Chunks::from(buf))
        })
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.check_writable("write_at")?;
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        self.blocking(move |file, path| {
            file.write_all_at(&data, offset)
                .map_err(|e| io_error(e, "write_at", path))?;
            if opts.fua {
                file.sync_data()
                    .map_err(|e| io_error(e, "fdatasync", path))?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.blocking(|file, path| file.sync_data().map_err(|e| io_error(e, "fdatasync", path)))
            .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("trim")?;
        check_range(&self.info, "trim", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |file, path| {
            // Trim is advisory: where holes cannot be punched, keeping the data is correct.
            fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .map(drop)
            .map_err(|e| io_error(e, "trim", path))
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.check_writable("write_zeroes")?;
        check_range(&self.info, "write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |file, path| {
            let map = |e| io_error(e, "write_zeroes", path);
            let done = if opts.may_trim {
                fallocate(
                    file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .map_err(map)?
            } else {
                fallocate(
                    file,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .map_err(map)?
            };
            if !done {
                write_zero_bytes(file, offset, len).map_err(map)?;
            }
            if opts.fua {
                file.sync_data()
                    .map_err(|e| io_error(e, "fdatasync", path))?;
            }
            Ok(())
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, "extents", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.blocking(move |file, path| {
            map_extents(file, offset, len).map_err(|e| io_error(e, "extents", path))
        })
        .await
    }
}
