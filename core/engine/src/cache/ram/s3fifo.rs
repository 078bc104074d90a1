//! S3-FIFO, from the `quick_cache` crate: the `s3fifo` policy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, Weighter};

use super::{KeyHash, Store};
use crate::cache::tier::BlockKey;

/// `quick_cache`'s concurrent cache (its own shards and locks), weighted in bytes.
#[derive(Debug)]
pub(super) struct S3FifoStore {
    cache: Cache<BlockKey, Bytes, ByLength, KeyHash, CountEvictions>,
}

#[derive(Debug, Clone, Copy)]
struct ByLength;

impl Weighter<BlockKey, Bytes> for ByLength {
    fn weight(&self, _key: &BlockKey, block: &Bytes) -> u64 {
        // Never zero: zero-weight items are never evicted.
        (block.len() as u64).max(1)
    }
}

/// Counts evictions into the tier's counter.
#[derive(Debug, Clone)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<BlockKey, Bytes> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: BlockKey, _block: Bytes) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl S3FifoStore {
    /// A store of at most `capacity` bytes of `block_size` blocks, counting its evictions
    /// into `evictions` (the
    /// tier adds what `put` returns, which is 0 here: evictions happen inside the crate).
    pub(super) fn new(capacity: u64, block_size: u64, evictions: Arc<AtomicU64>) -> Self {
        // The crate sizes its tables, and keeps at least 32 items per shard, from this
        // estimate: with the real block size, a shard always holds whole blocks.
        let estimated = (capacity / block_size.max(512)).clamp(16, 1 << 24) as usize;
        S3FifoStore {
            cache: Cache::with(
                estimated,
                capacity.max(1),
                ByLength,
                KeyHash::default(),
                CountEvictions(evictions),
            ),
        }
    }
}

impl Store for S3FifoStore {
    fn get(&self, key: &BlockKey) -> Option<Bytes> {
        self.cache.get(key)
    }

    fn put(&self, key: BlockKey, data: Bytes) -> u64 {
        self.cache.insert(key, data);
        0
    }

    fn remove(&self, key: &BlockKey) {
        self.cache.remove(key);
    }

    fn invalidate(&self, image: u128, generation: u128) -> u64 {
        let before = self.cache.len();
        self.cache
            .retain(|k, _| !(k.image == image && k.generation == generation));
        before.saturating_sub(self.cache.len()) as u64
    }

    fn usage(&self) -> (u64, u64) {
        (self.cache.len() as u64, self.cache.weight())
    }
}
