//! [`CowLayer`]: a client's private, block-granular copy-on-write overlay over a shared,
//! never-written base.
//!
//! Reads of blocks the client has written come from its overlay, all others from the base
//! (through the shared caches). A write covering part of a block first copies that block
//! from the base (read-modify-write, under a per-block lock so concurrent writes to one
//! block never lose each other). Zeroing or trimming whole blocks stores no data: the
//! overlay keeps a zero marker per block (ranges of them), so `fstrim`, `mkfs` or
//! `blkdiscard` cost nothing, the base shows through nowhere the client changed, and the
//! blocks show as zero extents in block status.
//!
//! Where overlay blocks live is an [`OverlayStore`]: [`RamOverlay`] (bounded: when full,
//! writes fail with `NoSpace`, never hang), [`DiskOverlay`] (a sparse file plus a block
//! map, made durable by `flush`), and [`SpillOverlay`] (RAM first, least recently written
//! blocks spill to a disk overlay).

mod disk;
mod ranges;
mod store;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

pub use disk::DiskOverlay;
pub use store::{OverlayStore, RamOverlay, Slot, SlotKind, SpillOverlay};

use crate::chunks::Chunks;
use crate::error::Result;
use crate::layer::Layer;
use crate::source::{
    BlockSource, Capability, DynSource, Extent, ExtentKind, Geometry, ReadOpts, SourceInfo,
    WriteOpts, ZeroOpts, check_range,
};

/// Most overlay blocks one `extents` call looks at: a client asking about a whole large
/// disk gets the first part and asks again from there.
const EXTENT_SCAN_BLOCKS: u64 = 1 << 16;

/// Zeroes handed out for zeroed blocks without allocating.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// `len` bytes of zeroes as shared static slices.
fn zero_parts(len: usize, parts: &mut Vec<Bytes>) {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len());
        parts.push(Bytes::from_static(&ZEROES[..n]));
        left -= n;
    }
}

/// The overlay of one session, shared by every connection of that session.
pub struct CowLayer {
    state: Arc<CowState>,
}

struct CowState {
    store: Box<dyn OverlayStore>,
    block_size: u64,
    /// Striped locks serialising read-modify-write of a block.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for CowLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowLayer")
            .field("store", &self.state.store)
            .field("block_size", &self.state.block_size)
            .finish()
    }
}

impl CowLayer {
    /// An overlay of `block_size`-byte blocks kept in `store`.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(store: Box<dyn OverlayStore>, block_size: u64) -> Self {
        assert!(block_size > 0, "overlay block size must be positive");
        CowLayer {
            state: Arc::new(CowState {
                store,
                block_size,
                stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            }),
        }
    }

    /// Bytes the overlay holds in RAM and on disk.
    pub fn usage(&self) -> (u64, u64) {
        self.state.store.usage()
    }
}

impl Layer for CowLayer {
    fn name(&self) -> &str {
        "cow"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        let mut info = inner.info().clone();
        // The client's view changes with its writes, not with the base alone.
        info.generation = format!("{}+cow", info.generation);
        Arc::new(CowSource {
            inner,
            info,
            state: self.state.clone(),
        })
    }
}

struct CowSource {
    inner: DynSource,
    info: SourceInfo,
    state: Arc<CowState>,
}

impl fmt::Debug for CowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowSource")
            .field("inner", &self.inner)
            .finish()
    }
}

impl CowSource {
    fn span(&self, block: u64) -> (u64, usize) {
        let start = block * self.state.block_size;
        (
            start,
            ((start + self.state.block_size).min(self.info.size) - start) as usize,
        )
    }

    /// The whole current content of `block`: overlay, else base.
    async fn current(&self, block: u64) -> Result<Bytes> {
        let (start, len) = self.span(block);
        match self.state.store.get(block).await? {
            Slot::Data(data) => Ok(data),
            Slot::Zero => Ok(Bytes::from_static(&ZEROES[..len])),
            Slot::Base => Ok(self
                .inner
                .read_at(start, len, ReadOpts::default())
                .await?
                .into_bytes()),
        }
    }

    /// Reads `from..to` of the base (one call, through the shared caches) onto `parts`.
    async fn read_base(
        &self,
        (from, to): (u64, u64),
        opts: ReadOpts,
        parts: &mut Vec<Bytes>,
    ) -> Result<()> {
        let chunks = self.inner.read_at(from, (to - from) as usize, opts).await?;
        parts.extend(chunks.parts().iter().cloned());
        Ok(())
    }

    /// Applies `fill(block_start, buf)` to each block of `offset..offset+len`.
    async fn modify(&self, offset: u64, len: u64, fill: impl Fn(u64, &mut [u8])) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.state.block_size;
        let end = offset + len;
        for block in offset / bs..=(end - 1) / bs {
            let (start, block_len) = self.span(block);
            let from = offset.max(start);
            let to = end.min(start + block_len as u64);
            let _guard = self.state.stripes[(block % 64) as usize].lock().await;
            let mut buf = if from == start && to == start + block_len as u64 {
                BytesMut::zeroed(block_len)
            } else {
                BytesMut::from(&self.current(block).await?[..])
            };
            fill(
                from,
                &mut buf[(from - start) as usize..(to - start) as usize],
            );
            self.state.store.put(block, buf.freeze()).await?;
        }
        Ok(())
    }

    /// The blocks wholly inside `offset..offset+len` (the last block of the image counts
    /// as whole when the range reaches the image's end).
    fn whole_blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let bs = self.state.block_size;
        let end = offset + len;
        let first = offset.div_ceil(bs);
        let last = if end == self.info.size {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        first..last.max(first)
    }

    /// Makes `offset..offset+len` read as zeroes: zero markers for whole blocks, and with
    /// `edges` the partial blocks at either end zero-filled too (trim may leave them).
    async fn zero_range(&self, offset: u64, len: u64, edges: bool) -> Result<()> {
        let whole = self.whole_blocks(offset, len);
        let bs = self.state.block_size;
        let end = offset + len;
        if whole.is_empty() {
            return if edges {
                self.modify(offset, len, |_, buf| buf.fill(0)).await
            } else {
                Ok(())
            };
        }
        if edges {
            let head_end = (whole.start * bs).min(end);
            self.modify(offset, head_end - offset, |_, buf| buf.fill(0))
                .await?;
            let tail_start = (whole.end * bs).min(end);
            self.modify(tail_start, end - tail_start, |_, buf| buf.fill(0))
                .await?;
        }
        self.state.store.zero(whole).await
    }

    /// The overlay's view of `offset..offset+len` block by block, as runs of one kind;
    /// at most [`EXTENT_SCAN_BLOCKS`] blocks are looked at (extents may cover a prefix).
    fn runs(&self, offset: u64, len: u64) -> Vec<(SlotKind, u64, u64)> {
        let bs = self.state.block_size;
        let end = offset + len;
        let mut runs: Vec<(SlotKind, u64, u64)> = Vec::new();
        let last = ((end - 1) / bs).min(offset / bs + EXTENT_SCAN_BLOCKS - 1);
        for block in offset / bs..=last {
            let (start, block_len) = self.span(block);
            let from = offset.max(start);
            let to = end.min(start + block_len as u64);
            let kind = self.state.store.kind(block);
            match runs.last_mut() {
                Some((last, _, run_to)) if *last == kind => *run_to = to,
                _ => runs.push((kind, from, to)),
            }
        }
        runs
    }
}

#[async_trait]
impl BlockSource for CowSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        Capability {
            write: true,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            extents: true,
            // One session may use several connections: they share this overlay.
            multi_conn: true,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        let bs = self.state.block_size;
        let end = offset + len as u64;
        let mut parts = Vec::new();
        let mut base_run: Option<(u64, u64)> = None;
        for block in offset / bs..=(end - 1) / bs {
            let (start, block_len) = self.span(block);
            let from = offset.max(start);
            let to = end.min(start + block_len as u64);
            let slot = self.state.store.get(block).await?;
            if matches!(slot, Slot::Base) {
                // Runs of base blocks are read with one call, through the shared caches.
                base_run = Some((base_run.map_or(from, |(f, _)| f), to));
                continue;
            }
            if let Some(run) = base_run.take() {
                self.read_base(run, opts, &mut parts).await?;
            }
            match slot {
                Slot::Data(data) => {
                    parts.push(data.slice((from - start) as usize..(to - start) as usize))
                }
                _ => zero_parts((to - from) as usize, &mut parts),
            }
        }
        if let Some(run) = base_run {
            self.read_base(run, opts, &mut parts).await?;
        }
        Ok(Chunks::from_parts(parts))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        self.modify(offset, data.len() as u64, |at, buf| {
            let from = (at - offset) as usize;
            buf.copy_from_slice(&data[from..from + buf.len()]);
        })
        .await?;
        if opts.fua {
            self.state.store.flush().await
        } else {
            Ok(())
        }
    }

    async fn flush(&self) -> Result<()> {
        self.state.store.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        // Trimmed whole blocks read as zeroes, so the base never shows through; the
        // partial blocks at the edges keep what they hold (trim promises nothing there).
        check_range(&self.info, "trim", offset, len)?;
        self.zero_range(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        check_range(&self.info, "write_zeroes", offset, len)?;
        self.zero_range(offset, len, true).await?;
        if opts.fua {
            self.state.store.flush().await
        } else {
            Ok(())
        }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.info, "extents", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |extent: Extent| match extents.last_mut() {
            Some(last) if last.kind == extent.kind => last.length += extent.length,
            _ => extents.push(extent),
        };
        for (kind, from, to) in self.runs(offset, len) {
            match kind {
                SlotKind::Data => push(Extent {
                    length: to - from,
                    kind: ExtentKind::Data,
                }),
                SlotKind::Zero => push(Extent {
                    length: to - from,
                    kind: ExtentKind::Zero,
                }),
                SlotKind::Base => {
                    // The base tells its own holes; it may describe less than asked, and
                    // then the answer stops there (extents need only cover a prefix).
                    let base = self.inner.extents(from, to - from).await?;
                    let covered: u64 = base.iter().map(|e| e.length).sum();
                    for extent in base {
                        push(extent);
                    }
                    if covered < to - from {
                        break;
                    }
                }
            }
        }
        Ok(extents)
    }
}
