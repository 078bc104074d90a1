use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// A shared, type-erased cache tier.
pub type DynTier = Arc<dyn CacheTier>;

/// Names one cached block: which image, which version of it, which block.
///
/// `image` and `generation` are [`stable_hash`]es of the image name and generation string,
/// so keys stay valid across restarts (for tiers that persist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// Hash of the backend and image name.
    pub image: u64,
    /// Hash of the image generation.
    pub generation: u64,
    /// Block index (offset / block size).
    pub block: u64,
}

/// Counters a tier keeps about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierStats {
    /// Blocks held now.
    pub entries: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// The most bytes the tier will hold.
    pub capacity: u64,
    /// Blocks evicted to make room since start.
    pub evictions: u64,
}

/// Storage for cached blocks, and nothing else.
///
/// # Contract
/// - `get` returns exactly the bytes last `put` under that key, or `None`.
/// - `put` may drop the block (full, too large) without error; a tier never grows past
///   its capacity.
/// - Errors are for broken storage only; [`crate::CacheLayer`] logs them and falls
///   through to the backend, so a tier error never fails a read.
#[async_trait]
pub trait CacheTier: Send + Sync + Debug {
    /// A short name for logs and stats (`ram`, `disk`).
    fn name(&self) -> &str;

    /// Looks one block up.
    async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>>;

    /// Stores one block, evicting others if needed.
    async fn put(&self, key: BlockKey, block: Bytes) -> Result<()>;

    /// Drops one block if present.
    async fn remove(&self, key: &BlockKey) -> Result<()>;

    /// Drops every block of `image` at `generation`; returns how many were dropped.
    async fn invalidate(&self, image: u64, generation: u64) -> Result<u64>;

    /// Current counters.
    fn stats(&self) -> TierStats;
}

/// FNV-1a, 64 bit: a hash that is the same in every process and release, for cache keys.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}
