use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::tier::{BlockKey, DynTier, stable_hash};
use crate::chunks::Chunks;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::Layer;
use crate::source::{
    BlockSource, Capability, DynSource, Extent, Geometry, ReadOpts, SourceInfo, WriteOpts,
    ZeroOpts, check_range,
};

/// The result of one block fill, shared with every reader that waited for it.
type Fill = Option<Result<Bytes>>;

/// Read-through block cache in front of any source, over any [`crate::CacheTier`].
///
/// - Reads are split into aligned blocks of `block_size`; hits come from the tier
///   without copying when a read lies inside one block.
/// - Misses are **single-flight**: while one reader fills a block, every other reader of
///   that block (from any connection, for the same image generation) waits for that fill
///   instead of reading the backend again. Adjacent missing blocks are filled with one
///   backend read.
/// - Only read-only sources are cached. A writable source (a private vdisk) is returned
///   unwrapped: its generation moves with its own writes, so connections opened at
///   different moments would key its blocks differently and could read stale ones. Its
///   file still sits in the kernel's page cache, and per-client overlays sit *above* this
///   layer, so the shared base under them is cached.
/// - A tier error is logged and the read falls through to the backend: the cache never
///   fails a read the backend could serve.
pub struct CacheLayer {
    state: Arc<CacheState>,
}

struct CacheState {
    tier: DynTier,
    block_size: u64,
    inflight: Mutex<HashMap<BlockKey, watch::Receiver<Fill>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    backend_reads: AtomicU64,
    backend_bytes: AtomicU64,
    tier_errors: AtomicU64,
}

/// Counters of one [`CacheLayer`], in blocks unless named otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Blocks found in the tier.
    pub hits: u64,
    /// Blocks this layer had to read from the backend.
    pub misses: u64,
    /// Blocks a reader got by waiting for another reader's fill (single-flight).
    pub coalesced: u64,
    /// Backend read calls made (adjacent misses share one call).
    pub backend_reads: u64,
    /// Bytes read from the backend.
    pub backend_bytes: u64,
    /// Tier calls that failed and were bypassed.
    pub tier_errors: u64,
}

impl CacheLayer {
    /// A layer caching `block_size`-aligned blocks in `tier`.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(tier: DynTier, block_size: u64) -> Self {
        assert!(block_size > 0, "cache block size must be positive");
        CacheLayer {
            state: Arc::new(CacheState {
                tier,
                block_size,
                inflight: Mutex::new(HashMap::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
                backend_reads: AtomicU64::new(0),
                backend_bytes: AtomicU64::new(0),
                tier_errors: AtomicU64::new(0),
            }),
        }
    }

    /// The tier blocks are kept in.
    pub fn tier(&self) -> &DynTier {
        &self.state.tier
    }

    /// Counters since start.
    pub fn stats(&self) -> CacheStats {
        let s = &self.state;
        CacheStats {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            coalesced: s.coalesced.load(Ordering::Relaxed),
            backend_reads: s.backend_reads.load(Ordering::Relaxed),
            backend_bytes: s.backend_bytes.load(Ordering::Relaxed),
            tier_errors: s.tier_errors.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("tier", &self.state.tier.name())
            .field("block_size", &self.state.block_size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Layer for CacheLayer {
    fn name(&self) -> &str {
        "cache"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        if inner.capability().write {
            return inner;
        }
        let info = inner.info();
        Arc::new(CacheSource {
            image: stable_hash(&[&info.identity]),
            generation: stable_hash(&[&info.generation]),
            inner,
            state: self.state.clone(),
        })
    }
}

/// The per-source projection of a [`CacheLayer`].
struct CacheSource {
    inner: DynSource,
    state: Arc<CacheState>,
    image: u128,
    generation: u128,
}

impl fmt::Debug for CacheSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheSource")
            .field("tier", &self.state.tier.name())
            .field("inner", &self.inner)
            .finish()
    }
}

/// Removes the in-flight entries of a fill when the filling reader finishes or is
/// cancelled; waiters then see either the result or a closed channel (and retry).
struct FillGuard<'a> {
    state: &'a CacheState,
    keys: Vec<BlockKey>,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .state
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            inflight.remove(key);
        }
    }
}

impl CacheSource {
    fn key(&self, block: u64) -> BlockKey {
        BlockKey {
            image: self.image,
            generation: self.generation,
            block,
        }
    }

    /// Byte range of `block`, clamped to the end of the image.
    fn block_span(&self, block: u64) -> (u64, usize) {
        let start = block * self.state.block_size;
        let end = (start + self.state.block_size).min(self.inner.info().size);
        (start, (end - start) as usize)
    }

    async fn tier_get(&self, key: &BlockKey) -> Option<Bytes> {
        match self.state.tier.get(key).await {
            Ok(found) => found,
            Err(err) => {
                self.state.tier_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tier = self.state.tier.name(), %err, "cache tier get failed; reading the backend");
                None
            }
        }
    }

    async fn tier_put(&self, key: BlockKey, data: Bytes) {
        if let Err(err) = self.state.tier.put(key, data).await {
            self.state.tier_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(tier = self.state.tier.name(), %err, "cache tier put failed");
        }
    }

    /// Returns blocks `first..=last`, each whole (clamped at the image end).
    async fn blocks(&self, first: u64, last: u64, opts: ReadOpts) -> Result<Vec<Bytes>> {
        let count = (last - first + 1) as usize;
        let mut found: Vec<Option<Bytes>> = Vec::with_capacity(count);
        for block in first..=last {
            found.push(self.tier_get(&self.key(block)).await);
        }
        let hits = found.iter().filter(|b| b.is_some()).count() as u64;
        self.state.hits.fetch_add(hits, Ordering::Relaxed);
        if hits == count as u64 {
            return Ok(found.into_iter().map(|b| b.unwrap_or_default()).collect());
        }

        // Claim every missing block nobody else is filling; wait for the rest.
        let mut claimed: Vec<(u64, watch::Sender<Fill>)> = Vec::new();
        let mut waiting: Vec<(u64, watch::Receiver<Fill>)> = Vec::new();
        {
            let mut inflight = self
                .state
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (i, slot) in found.iter().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let block = first + i as u64;
                let key = self.key(block);
                if let Some(rx) = inflight.get(&key) {
                    waiting.push((block, rx.clone()));
                } else {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key, rx);
                    claimed.push((block, tx));
                }
            }
        }
        let guard = FillGuard {
            state: &self.state,
            keys: claimed.iter().map(|(b, _)| self.key(*b)).collect(),
        };
        self.fill_claimed(&claimed, first, &mut found, opts).await?;
        drop(guard);

        for (block, rx) in waiting {
            self.state.coalesced.fetch_add(1, Ordering::Relaxed);
            let data = self.wait_for_fill(block, rx, opts).await?;
            found[(block - first) as usize] = Some(data);
        }
        Ok(found.into_iter().map(|b| b.unwrap_or_default()).collect())
    }

    /// Reads the claimed blocks from the backend, one read per run of adjacent blocks,
    /// stores them in the tier and hands them to waiters.
    async fn fill_claimed(
        &self,
        claimed: &[(u64, watch::Sender<Fill>)],
        first: u64,
        found: &mut [Option<Bytes>],
        opts: ReadOpts,
    ) -> Result<()> {
        let mut start = 0;
        while start < claimed.len() {
            let mut end = start + 1;
            while end < claimed.len() && claimed[end].0 == claimed[end - 1].0 + 1 {
                end += 1;
            }
            let run = &claimed[start..end];
            let (offset, _) = self.block_span(run[0].0);
            let (last_offset, last_len) = self.block_span(run[run.len() - 1].0);
            let len = (last_offset - offset) as usize + last_len;
            self.state
                .misses
                .fetch_add(run.len() as u64, Ordering::Relaxed);
            self.state.backend_reads.fetch_add(1, Ordering::Relaxed);
            self.state
                .backend_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            let data = match self.inner.read_at(offset, len, opts).await {
                Ok(data) if data.len() == len => data.into_bytes(),
                Ok(data) => {
                    let err = Error::new(
                        ErrorKind::Unexpected,
                        format!(
                            "backend returned {} bytes for a {len}-byte read",
                            data.len()
                        ),
                    )
                    .with_op("read_at");
                    for (_, tx) in run {
                        tx.send_replace(Some(Err(err.clone())));
                    }
                    return Err(err);
                }
                Err(err) => {
                    for (_, tx) in run {
                        tx.send_replace(Some(Err(err.clone())));
                    }
                    return Err(err);
                }
            };
            for (block, tx) in run {
                let (block_offset, block_len) = self.block_span(*block);
                let start = (block_offset - offset) as usize;
                let piece = data.slice(start..start + block_len);
                self.tier_put(self.key(*block), piece.clone()).await;
                tx.send_replace(Some(Ok(piece.clone())));
                found[(*block - first) as usize] = Some(piece);
            }
            start = end;
        }
        Ok(())
    }

    /// Waits for another reader's fill of `block`; if that reader went away without a
    /// result, reads the block as if it were a fresh miss.
    async fn wait_for_fill(
        &self,
        block: u64,
        mut rx: watch::Receiver<Fill>,
        opts: ReadOpts,
    ) -> Result<Bytes> {
        let outcome = rx
            .wait_for(|fill| fill.is_some())
            .await
            .ok()
            .and_then(|fill| fill.clone());
        match outcome {
            Some(result) => result,
            None => {
                let mut blocks = Box::pin(self.blocks(block, block, opts)).await?;
                Ok(blocks.pop().unwrap_or_default())
            }
        }
    }
}

#[async_trait]
impl BlockSource for CacheSource {
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
        check_range(self.info(), "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        let bs = self.state.block_size;
        let first = offset / bs;
        let last = (offset + len as u64 - 1) / bs;
        let blocks = self.blocks(first, last, opts).await?;
        // Hand out slices of the cached blocks themselves: no copy, no new buffer.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut position = offset;
        let end = offset + len as u64;
        for (i, block) in blocks.into_iter().enumerate() {
            let block_start = (first + i as u64) * bs;
            let from = (position - block_start) as usize;
            let to = ((end - block_start) as usize).min(block.len());
            parts.push(block.slice(from..to));
            position = block_start + to as u64;
        }
        Ok(Chunks::from_parts(parts))
    }

    // Only read-only sources are wrapped (see `layer`): write-class calls reach the
    // source, which refuses them.
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
