use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Semaphore, watch};

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

/// How many prefetch backend reads a layer runs at once unless told otherwise: enough to
/// keep a backend busy between demand reads, few enough not to queue ahead of them.
const DEFAULT_PREFETCH_CONCURRENCY: usize = 2;

/// Read-through block cache in front of any source, over any [`crate::CacheTier`].
///
/// - Reads are split into aligned blocks of `block_size`; hits come from the tier
///   without copying when a read lies inside one block.
/// - Misses are **single-flight**: while one reader fills a block, every other reader of
///   that block (from any connection, for the same image generation) waits for that fill
///   instead of reading the backend again. Adjacent missing blocks are filled with one
///   backend read.
/// - A tier `put` never holds up a reader: the filling reader and its waiters get the
///   bytes as soon as the backend returns them, and the blocks are stored in the tier
///   afterwards, by a task of its own (one per backend read; inline when there is no
///   tokio runtime). Until that put is done, the filled blocks stay in flight and are
///   served from there, so a reader arriving meanwhile neither reads the backend again
///   nor waits for the tier. Errors are never stored: their blocks leave the in-flight
///   set at once.
/// - **Demand reads go before prefetch** ([`ReadOpts::prefetch`]): prefetch fills pass a
///   gate of a few concurrent backend reads ([`CacheLayer::with_prefetch_concurrency`]),
///   demand fills never do. A demand read finding a block claimed by a prefetch fill does
///   not wait for it (the fill may be queued behind other prefetch work, or be one long
///   read of many blocks): it takes the block over and reads it itself, and later demand
///   readers of the block wait for that demand fill. A prefetch read waits for whatever
///   fill it finds in flight, demand or prefetch: it must return the bytes too, and
///   waiting costs no backend read.
/// - Only read-only sources are cached. A writable source (a private vdisk) is returned
///   unwrapped: its generation moves with its own writes, so connections opened at
///   different moments would key its blocks differently and could read stale ones. Its
///   file still sits in the kernel's page cache, and per-client overlays sit *above* this
///   layer, so the shared base under them is cached.
/// - A tier error is logged and the read falls through to the backend: the cache never
///   fails a read the backend could serve.
pub struct CacheLayer {
    state: Arc<CacheState>,
    /// Bounds the prefetch backend reads of every source layered from here on.
    prefetch_gate: Arc<Semaphore>,
    prefetch_concurrency: usize,
}

struct CacheState {
    tier: DynTier,
    block_size: u64,
    inflight: Mutex<HashMap<BlockKey, InFlight>>,
    /// Numbers fills, so a fill only ever removes the in-flight entries it still owns.
    next_fill: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    preempted: AtomicU64,
    backend_reads: AtomicU64,
    backend_bytes: AtomicU64,
    tier_errors: AtomicU64,
}

/// A block being filled, or filled and still being stored in the tier.
struct InFlight {
    /// The fill that owns the entry.
    fill: u64,
    /// The fill is a prefetch, which demand reads take over instead of waiting for.
    prefetch: bool,
    /// `None` while the backend read runs; then the bytes until the tier put is done.
    result: watch::Receiver<Fill>,
}

/// Counters of one [`CacheLayer`], in blocks unless named otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Blocks served without a backend read or a wait: found in the tier, or in a
    /// finished fill whose tier put was still under way.
    pub hits: u64,
    /// Blocks this layer had to read from the backend.
    pub misses: u64,
    /// Blocks a reader got by waiting for another reader's fill (single-flight).
    pub coalesced: u64,
    /// Blocks a demand read took over from a prefetch fill still under way, and read
    /// itself (the prefetch reads them too).
    pub preempted: u64,
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
                next_fill: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
                preempted: AtomicU64::new(0),
                backend_reads: AtomicU64::new(0),
                backend_bytes: AtomicU64::new(0),
                tier_errors: AtomicU64::new(0),
            }),
            prefetch_gate: Arc::new(Semaphore::new(DEFAULT_PREFETCH_CONCURRENCY)),
            prefetch_concurrency: DEFAULT_PREFETCH_CONCURRENCY,
        }
    }

    /// Lets at most `reads` prefetch backend reads (at least one) run at once, over all
    /// the sources layered after this call; the default is 2. Demand reads are never
    /// counted against it.
    pub fn with_prefetch_concurrency(mut self, reads: usize) -> Self {
        let reads = reads.max(1);
        self.prefetch_gate = Arc::new(Semaphore::new(reads));
        self.prefetch_concurrency = reads;
        self
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
            preempted: s.preempted.load(Ordering::Relaxed),
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
            .field("prefetch_concurrency", &self.prefetch_concurrency)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Layer for CacheLayer {
    fn name(&self) -> &str {
        "cache"
    }

    fn log_summary(&self) {
        let stats = self.stats();
        let tier = self.state.tier.stats();
        tracing::info!(
            tier = %self.state.tier.name(),
            hits = stats.hits,
            misses = stats.misses,
            coalesced = stats.coalesced,
            preempted = stats.preempted,
            backend_reads = stats.backend_reads,
            backend_bytes = stats.backend_bytes,
            evictions = tier.evictions,
            cached_bytes = tier.bytes,
            "cache statistics (blocks)"
        );
    }

    fn forget(&self, identity: &str, generation: &str) {
        let (image, generation) = (stable_hash(&[identity]), stable_hash(&[generation]));
        let state = self.state.clone();
        let drop_blocks = async move {
            match state.tier.invalidate(image, generation).await {
                Ok(dropped) => tracing::debug!(
                    tier = state.tier.name(),
                    dropped,
                    "dropped the blocks of a deleted image"
                ),
                Err(err) => {
                    tracing::warn!(tier = state.tier.name(), %err, "cannot drop the blocks of a deleted image")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(drop_blocks);
            }
            Err(_) => tracing::debug!("no runtime: the deleted image's blocks age out instead"),
        }
    }

    fn report(&self) -> Option<crate::layer::LayerReport> {
        let stats = self.stats();
        let tier = self.state.tier.stats();
        Some(crate::layer::LayerReport::new(
            format!("cache:{}", self.state.tier.name()),
            &[
                ("hits", stats.hits),
                ("misses", stats.misses),
                ("coalesced", stats.coalesced),
                ("preempted", stats.preempted),
                ("backend_reads", stats.backend_reads),
                ("backend_bytes", stats.backend_bytes),
                ("tier_errors", stats.tier_errors),
                ("entries", tier.entries),
                ("bytes", tier.bytes),
                ("capacity", tier.capacity),
                ("evictions", tier.evictions),
            ],
        ))
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
            prefetch_gate: self.prefetch_gate.clone(),
        })
    }
}

impl CacheState {
    fn inflight(&self) -> MutexGuard<'_, HashMap<BlockKey, InFlight>> {
        // A poisoned map only means a panic elsewhere mid-update of plain data; every
        // update is one insert or remove, so the map is consistent.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the in-flight entries of `keys` that `fill` still owns; a demand fill may
    /// have taken some over, and those are its own to remove.
    fn release<'k>(&self, fill: u64, keys: impl IntoIterator<Item = &'k BlockKey>) {
        let mut inflight = self.inflight();
        for key in keys {
            if inflight.get(key).is_some_and(|entry| entry.fill == fill) {
                inflight.remove(key);
            }
        }
    }

    async fn tier_put(&self, key: BlockKey, data: Bytes) {
        if let Err(err) = self.tier.put(key, data).await {
            self.tier_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(tier = self.tier.name(), %err, "cache tier put failed");
        }
    }
}

/// The per-source projection of a [`CacheLayer`].
struct CacheSource {
    inner: DynSource,
    state: Arc<CacheState>,
    prefetch_gate: Arc<Semaphore>,
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

/// One block a reader claimed to fill.
struct Claim {
    block: u64,
    key: BlockKey,
    result: watch::Sender<Fill>,
}

/// The blocks one reader claimed to fill. Dropped when the reader finishes or is
/// cancelled, it removes the in-flight entries of the claims it never settled; their
/// waiters then see a closed channel and retry.
struct FillGuard<'a> {
    state: &'a CacheState,
    fill: u64,
    claims: Vec<Claim>,
    /// `claims[..settled]` have their result sent, and their entries handed to a tier
    /// put (bytes) or removed (errors).
    settled: usize,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        // The senders are dropped after this (fields outlive `drop`), so a waiter woken by
        // its closed channel no longer finds the entry and claims the block itself.
        let unsettled = self.claims.get(self.settled..).unwrap_or_default();
        self.state
            .release(self.fill, unsettled.iter().map(|claim| &claim.key));
    }
}

/// The tier puts of one filled backend read. Its blocks stay in flight, serving their
/// bytes, until it has run or is dropped unrun (a runtime shutting down).
struct PendingPut {
    state: Arc<CacheState>,
    fill: u64,
    blocks: Vec<(BlockKey, Bytes)>,
}

impl PendingPut {
    async fn run(self) {
        for (key, data) in &self.blocks {
            self.state.tier_put(*key, data.clone()).await;
        }
    }
}

impl Drop for PendingPut {
    fn drop(&mut self) {
        self.state
            .release(self.fill, self.blocks.iter().map(|(key, _)| key));
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

    /// Returns blocks `first..=last`, each whole (clamped at the image end).
    async fn blocks(&self, first: u64, last: u64, opts: ReadOpts) -> Result<Vec<Bytes>> {
        let count = (last - first + 1) as usize;
        let mut found: Vec<Option<Bytes>> = Vec::with_capacity(count);
        for block in first..=last {
            found.push(self.tier_get(&self.key(block)).await);
        }
        let tier_hits = found.iter().filter(|b| b.is_some()).count();
        self.state
            .hits
            .fetch_add(tier_hits as u64, Ordering::Relaxed);
        if tier_hits == count {
            return Ok(found.into_iter().map(|b| b.unwrap_or_default()).collect());
        }

        // Take what finished fills hold, claim every missing block nobody else is filling
        // (or only prefetching, for a demand read), and wait for the rest.
        let mut guard = FillGuard {
            state: &self.state,
            fill: self.state.next_fill.fetch_add(1, Ordering::Relaxed),
            claims: Vec::new(),
            settled: 0,
        };
        let mut waiting: Vec<(u64, watch::Receiver<Fill>)> = Vec::new();
        {
            let mut inflight = self.state.inflight();
            let mut filled_hits = 0;
            for (i, slot) in found.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let block = first + i as u64;
                let key = self.key(block);
                if let Some(entry) = inflight.get(&key) {
                    if let Some(Ok(data)) = &*entry.result.borrow() {
                        // Filled; only its tier put is still running.
                        *slot = Some(data.clone());
                        filled_hits += 1;
                        continue;
                    }
                    if opts.prefetch || !entry.prefetch {
                        waiting.push((block, entry.result.clone()));
                        continue;
                    }
                    // A demand read does not queue behind prefetch work: the entry becomes
                    // ours, the prefetch fill keeps its own waiters.
                    self.state.preempted.fetch_add(1, Ordering::Relaxed);
                }
                let (result, receiver) = watch::channel(None);
                inflight.insert(
                    key,
                    InFlight {
                        fill: guard.fill,
                        prefetch: opts.prefetch,
                        result: receiver,
                    },
                );
                guard.claims.push(Claim { block, key, result });
            }
            self.state.hits.fetch_add(filled_hits, Ordering::Relaxed);
        }
        self.fill_claimed(&mut guard, first, &mut found, opts)
            .await?;
        drop(guard);

        for (block, rx) in waiting {
            self.state.coalesced.fetch_add(1, Ordering::Relaxed);
            let data = self.wait_for_fill(block, rx, opts).await?;
            found[(block - first) as usize] = Some(data);
        }
        Ok(found.into_iter().map(|b| b.unwrap_or_default()).collect())
    }

    /// Reads the claimed blocks from the backend, one read per run of adjacent blocks,
    /// hands them to the waiters and to `found`, and leaves storing them in the tier to
    /// [`CacheSource::store`].
    async fn fill_claimed(
        &self,
        guard: &mut FillGuard<'_>,
        first: u64,
        found: &mut [Option<Bytes>],
        opts: ReadOpts,
    ) -> Result<()> {
        let mut start = 0;
        while start < guard.claims.len() {
            let mut end = start + 1;
            while end < guard.claims.len()
                && guard.claims[end].block == guard.claims[end - 1].block + 1
            {
                end += 1;
            }
            let run = &guard.claims[start..end];
            let (offset, _) = self.block_span(run[0].block);
            let (last_offset, last_len) = self.block_span(run[run.len() - 1].block);
            let len = (last_offset - offset) as usize + last_len;
            let data = match self.read_run(offset, len, run.len(), opts).await {
                Ok(data) => data,
                Err(err) => {
                    // Errors are not cached, not even while the waiters wake: a reader
                    // arriving from now on tries the backend again.
                    self.state
                        .release(guard.fill, run.iter().map(|claim| &claim.key));
                    for claim in run {
                        claim.result.send_replace(Some(Err(err.clone())));
                    }
                    guard.settled = end;
                    return Err(err);
                }
            };
            let mut filled = Vec::with_capacity(run.len());
            for claim in run {
                let (block_offset, block_len) = self.block_span(claim.block);
                let from = (block_offset - offset) as usize;
                let piece = data.slice(from..from + block_len);
                claim.result.send_replace(Some(Ok(piece.clone())));
                found[(claim.block - first) as usize] = Some(piece.clone());
                filled.push((claim.key, piece));
            }
            guard.settled = end;
            self.store(guard.fill, filled).await;
            start = end;
        }
        Ok(())
    }

    /// Reads one run of `blocks` claimed blocks (`len` bytes at `offset`) from the
    /// backend; a prefetch read first passes the prefetch gate.
    async fn read_run(
        &self,
        offset: u64,
        len: usize,
        blocks: usize,
        opts: ReadOpts,
    ) -> Result<Bytes> {
        // Held for the backend read only: the tier put runs ungated, after it. The gate is
        // never closed, so `acquire` cannot fail.
        let _permit = if opts.prefetch {
            self.prefetch_gate.acquire().await.ok()
        } else {
            None
        };
        self.state
            .misses
            .fetch_add(blocks as u64, Ordering::Relaxed);
        self.state.backend_reads.fetch_add(1, Ordering::Relaxed);
        self.state
            .backend_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let data = self.inner.read_at(offset, len, opts).await?;
        if data.len() != len {
            return Err(Error::new(
                ErrorKind::Unexpected,
                format!(
                    "backend returned {} bytes for a {len}-byte read",
                    data.len()
                ),
            )
            .with_op("read_at"));
        }
        Ok(data.into_bytes())
    }

    /// Stores the blocks of one filled backend read in the tier without holding up the
    /// reader: in a task of its own under a tokio runtime, inline without one. The
    /// blocks' in-flight entries serve them until the put is done.
    async fn store(&self, fill: u64, blocks: Vec<(BlockKey, Bytes)>) {
        let put = PendingPut {
            state: self.state.clone(),
            fill,
            blocks,
        };
        match tokio::runtime::Handle::try_current() {
            // Detached: nobody waits for the put, and the task cleans up after itself.
            Ok(runtime) => drop(runtime.spawn(put.run())),
            Err(_) => put.run().await,
        }
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
