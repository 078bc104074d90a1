//! [`FencedSource`]: a private vdisk's image, or a session's shared write overlay, as one
//! holding of its session writes it.
//!
//! Writes are refused once the session ended, was replaced or was taken by another
//! server (its guard's `ended` token), and while this server's heartbeat is too old to
//! be sure nobody else took it (`holds_lease`). A flush, and a write with FUA, is only
//! acknowledged after the catalog confirmed the lock is still this holding's: a server
//! that lost the lock while paused acknowledges nothing more. What already reached
//! storage that cannot be fenced (a file, a block device, NFS) before the holding learnt
//! of it may still land; images that can be fenced at the storage (chunked S3, through
//! the lock token) commit nothing under an old lock.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::chunks::Chunks;
use crate::error::{Error, ErrorKind, Result};
use crate::sessions::{LockToken, SessionDirectory};
use crate::source::{
    BlockSource, Capability, DynSource, Extent, Geometry, ReadOpts, SourceInfo, WriteOpts, ZeroOpts,
};

/// The source a private session's connection, or a shared overlay's, writes through.
pub(crate) struct FencedSource {
    inner: DynSource,
    lock: LockToken,
    directory: Arc<dyn SessionDirectory>,
    ended: CancellationToken,
}

impl fmt::Debug for FencedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedSource")
            .field("lock", &self.lock)
            .field("inner", &self.inner)
            .finish()
    }
}

impl FencedSource {
    pub(crate) fn new(
        inner: DynSource,
        lock: LockToken,
        directory: Arc<dyn SessionDirectory>,
        ended: CancellationToken,
    ) -> Self {
        FencedSource {
            inner,
            lock,
            directory,
            ended,
        }
    }

    /// Refuses a write-class call this holding may no longer make.
    async fn admit(&self, op: &'static str) -> Result<()> {
        let why = if self.ended.is_cancelled() {
            "the session was closed, replaced or taken by another server"
        } else if self.directory.holds_lease() {
            return Ok(());
        } else if self.directory.renew_lease(&self.lock).await.is_ok() {
            // A stall (a paused process, a slow catalog) during which nobody took over.
            return Ok(());
        } else {
            "this server could not confirm with the catalog that it still holds it"
        };
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "session {} may no longer write {}: {why}; nothing was written",
                self.lock.session,
                self.lock.guards()
            ),
        )
        .with_op(op))
    }

    /// After a write-class call: confirms with the catalog that the lock still holds
    /// before the client is told its data is durable.
    async fn confirm(&self) -> Result<()> {
        self.directory.check_lock(&self.lock).await.inspect_err(|err| {
            tracing::warn!(session = %self.lock.session, vdisk = %self.lock.vdisk, %err, "fenced: a write of a lost lock was refused");
            self.ended.cancel();
        })
    }
}

#[async_trait]
impl BlockSource for FencedSource {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        self.inner.read_at(offset, len, opts).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.admit("write_at").await?;
        self.inner.write_at(offset, data, opts).await?;
        if opts.fua {
            self.confirm().await
        } else {
            Ok(())
        }
    }

    async fn flush(&self) -> Result<()> {
        self.admit("flush").await?;
        self.inner.flush().await?;
        self.confirm().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.admit("trim").await?;
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.admit("write_zeroes").await?;
        self.inner.write_zeroes(offset, len, opts).await?;
        if opts.fua {
            self.confirm().await
        } else {
            Ok(())
        }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

/// A source under a generation of the engine's choosing: the image's own generation plus
/// how many times a private vdisk took it to write, so caches never serve blocks read
/// before such writes (a block device's generation does not change when it is written).
pub(crate) struct Regenerated {
    inner: DynSource,
    info: SourceInfo,
}

impl fmt::Debug for Regenerated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Regenerated")
            .field("generation", &self.info.generation)
            .field("inner", &self.inner)
            .finish()
    }
}

impl Regenerated {
    /// `inner` under its generation plus `+w<epoch>`; `inner` itself when `epoch` is 0.
    pub(crate) fn wrap(inner: DynSource, epoch: u64) -> DynSource {
        if epoch == 0 {
            return inner;
        }
        let mut info = inner.info().clone();
        info.generation = format!("{}+w{epoch}", info.generation);
        Arc::new(Regenerated { inner, info })
    }
}

#[async_trait]
impl BlockSource for Regenerated {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        self.inner.read_at(offset, len, opts).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}
