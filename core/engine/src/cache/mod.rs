//! Caching: [`CacheTier`] stores blocks, [`CacheLayer`] decides what to store.
//!
//! The policy (read-through, block alignment, single-flight fills, write invalidation)
//! lives once in [`CacheLayer`]; a tier ([`RamTier`], later a server-disk tier) only keeps
//! blocks and chooses what to evict. Keys carry the image and its generation, so a changed
//! image never serves stale blocks.

mod layer;
mod ram;
mod tier;

pub use layer::{CacheLayer, CacheStats};
pub use ram::{EvictionPolicy, RamTier, RamTierConfig};
pub use tier::{BlockKey, CacheTier, DynTier, TierStats, stable_hash};
