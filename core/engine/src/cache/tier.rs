use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// A shared, type-erased cache tier.
pub type DynTier = Arc<dyn CacheTier>;

/// Names one cached block: which image, which version of it, which block.
///
/// `image` is the [`stable_hash`] of the image's identity ([`crate::SourceInfo::identity`]:
/// backend kind, canonical location and key, never the configured backend name), and
/// `generation` that of its generation string, so two backends never share blocks, two
/// names for one place do, and keys stay valid across restarts (for tiers that persist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// Hash of the image's identity.
    pub image: u128,
    /// Hash of the image generation.
    pub generation: u128,
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
    async fn invalidate(&self, image: u128, generation: u128) -> Result<u64>;

    /// Current counters.
    fn stats(&self) -> TierStats;
}

/// FNV-1a, 128 bit: a hash that is the same in every process and release, for cache keys.
/// 128 bits make an accidental collision of two images' keys (which would serve one
/// image's bytes for the other) practically impossible.
pub fn stable_hash(parts: &[&str]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut hash = OFFSET;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u128::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_and_separates_parts() {
        // Fixed forever: a persistent tier's keys depend on it.
        assert_eq!(stable_hash(&[]), 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
        assert_ne!(
            stable_hash(&["file:/a/x.img"]),
            stable_hash(&["file:/b/x.img"])
        );
    }
}
