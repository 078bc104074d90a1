//! The data plane: [`BlockSource`], what every backend, layer and protocol speaks.
//!
//! An NBD read, an HTTP `Range:` request, a TFTP block and the client agent's fetch are all
//! [`BlockSource::read_at`] on one [`DynSource`]. Backends implement the trait at the bottom
//! of a stack; layers (cache, copy-on-write, retry, metrics) implement it by wrapping another
//! source.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::chunks::Chunks;
use crate::error::{Error, ErrorKind, Result};

/// A shared, type-erased block source: what protocols hold.
pub type DynSource = Arc<dyn BlockSource>;

/// Identity of the bytes a source serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// The image (vdisk) name inside its backend.
    pub name: String,
    /// Where the bytes live, whatever the backend is called in the configuration: the
    /// backend kind, its canonical location and the image key, as
    /// [`crate::ImageBackend::identity`] gives it. Caches key blocks by it.
    pub identity: String,
    /// Size in bytes. Fixed for the life of the source.
    pub size: u64,
    /// Changes whenever the image's content may have changed (mtime+size, ETag, version
    /// id). Caches key blocks by it, so a changed image never serves stale blocks.
    pub generation: String,
}

/// What a source can do. Protocols advertise exactly this and nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capability {
    /// `write_at` is accepted.
    pub write: bool,
    /// `flush` makes earlier writes durable.
    pub flush: bool,
    /// A write with `fua` is durable when it returns.
    pub fua: bool,
    /// `trim` is accepted (it may be a no-op: trimmed ranges read back unspecified data).
    pub trim: bool,
    /// `write_zeroes` is accepted.
    pub write_zeroes: bool,
    /// `extents` reports holes and zero ranges (else everything is reported as data).
    pub extents: bool,
    /// Several connections to the same image see each other's flushed writes, so clients
    /// may open more than one connection (NBD `CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// Reads may come from a rotational medium (a hint for client schedulers).
    pub rotational: bool,
}

impl Capability {
    /// The capabilities of a plain read-only source that is safe for many connections.
    pub fn read_only() -> Self {
        Capability {
            multi_conn: true,
            ..Capability::default()
        }
    }
}

/// Preferred request sizes, as a client should issue them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Smallest unit of I/O; requests should be multiples of it.
    pub minimum: u32,
    /// The size that gives the best throughput without read-modify-write.
    pub preferred: u32,
    /// The largest single request the source takes.
    pub maximum: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            minimum: 1,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }
}

/// Hints for one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOpts {
    /// The read is speculative (prefetch, NBD `CACHE`): demand reads go first.
    pub prefetch: bool,
}

/// Hints for one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOpts {
    /// Force unit access: the data is durable when the call returns.
    pub fua: bool,
}

/// Options for [`BlockSource::write_zeroes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroOpts {
    /// Force unit access.
    pub fua: bool,
    /// The source may deallocate the range (punch a hole) instead of writing zeroes.
    pub may_trim: bool,
}

/// What a range of the source holds, as [`BlockSource::extents`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; the content is whatever was written.
    Data,
    /// Allocated and known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes.
    Hole,
}

/// One contiguous range of the same [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

/// A readable (and perhaps writable) array of bytes of fixed size.
///
/// Every method is required: a wrapper must decide for each call whether to forward it,
/// so nothing is inherited by accident. Conveniences live in [`BlockSourceExt`].
///
/// # Contract
/// - `read_at(offset, len)` returns exactly `len` bytes (in one or more [`Chunks`]) or
///   an error, never a short read.
///   `offset + len > size` is [`ErrorKind::OutOfRange`] and reads nothing.
/// - An operation absent from [`BlockSource::capability`] returns
///   [`ErrorKind::Unsupported`] (for writes on a read-only source: [`ErrorKind::ReadOnly`]).
/// - Temporary failures (timeouts, throttling) are marked [`Error::is_temporary`]; retry
///   layers rely on it. A source never returns wrong data to make a read succeed.
/// - All methods are safe to call concurrently from many tasks.
#[async_trait]
pub trait BlockSource: Send + Sync + Debug {
    /// Name, size and generation. Does no I/O.
    fn info(&self) -> &SourceInfo;

    /// What this source supports. Does no I/O and never changes.
    fn capability(&self) -> Capability;

    /// Preferred request sizes.
    fn geometry(&self) -> Geometry;

    /// Reads `len` bytes at `offset`.
    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks>;

    /// Writes `data` at `offset`. Durable after `flush`, or on return with `opts.fua`.
    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()>;

    /// Makes every write that returned before this call durable.
    async fn flush(&self) -> Result<()>;

    /// Tells the source that `len` bytes at `offset` are no longer needed.
    async fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()>;

    /// Describes `offset..offset+len` as a list of extents that starts at `offset`, covers
    /// at least one byte and at most `len` bytes. Sources that cannot tell report one
    /// [`ExtentKind::Data`] extent for the whole range.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// Checks that `offset..offset+len` lies inside a source of `size` bytes.
///
/// Implementations call this first in every ranged method, so every source reports
/// out-of-range requests the same way.
pub fn check_range(info: &SourceInfo, op: &'static str, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= info.size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "request of {len} bytes at offset {offset} reaches past the end of '{}' ({} bytes)",
                info.name, info.size
            ),
        )
        .with_op(op)),
    }
}

/// What [`BlockSource::extents`] answers for a source that cannot tell holes from data:
/// the checked range as one [`ExtentKind::Data`] extent.
pub fn all_data(info: &SourceInfo, offset: u64, len: u64) -> Result<Vec<Extent>> {
    check_range(info, "extents", offset, len)?;
    Ok(vec![Extent {
        length: len,
        kind: ExtentKind::Data,
    }])
}

/// The error every read-only source returns for write-class calls.
pub fn read_only_error(info: &SourceInfo, op: &'static str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!("'{}' is opened read-only", info.name),
    )
    .with_op(op)
}

/// Conveniences on top of [`BlockSource`]; implemented for every source.
#[async_trait]
pub trait BlockSourceExt: BlockSource {
    /// The size in bytes.
    fn size(&self) -> u64 {
        self.info().size
    }

    /// Reads the whole source into memory (for tests and small boot files).
    async fn read_all(&self) -> Result<Bytes> {
        let size = usize::try_from(self.size()).map_err(|_| {
            Error::new(
                ErrorKind::OutOfRange,
                "source is larger than memory can hold",
            )
        })?;
        self.read_bytes(0, size).await
    }

    /// Reads `len` bytes at `offset` into one contiguous buffer.
    async fn read_bytes(&self, offset: u64, len: usize) -> Result<Bytes> {
        Ok(self
            .read_at(offset, len, ReadOpts::default())
            .await?
            .into_bytes())
    }

    /// Reads a range and drops the data: warms the caches in the stack (NBD `CACHE`).
    async fn prefetch(&self, offset: u64, len: usize) -> Result<()> {
        self.read_at(offset, len, ReadOpts { prefetch: true })
            .await
            .map(drop)
    }
}

impl<T: BlockSource + ?Sized> BlockSourceExt for T {}
