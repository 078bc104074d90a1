//! The RAM tier: bounded bytes, shared by every client of every image, with the eviction
//! policy chosen by `[cache.ram] policy`.

mod clock;
mod lru;
mod s3fifo;

use std::fmt::Debug;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::tier::{BlockKey, CacheTier, TierStats};
use crate::error::Result;
use crate::registry::{BackendContext, TierKind, config_error};
use crate::units::ByteSize;

/// How the RAM tier picks the block to drop when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    /// CLOCK (second chance): a block read since the hand last passed is kept one more
    /// round. Cheap hits (a flag), resists one sequential scan. Our own, 16 shards.
    Clock,
    /// Least recently used: the `lru` crate, 16 shards. A long scan flushes everything.
    Lru,
    /// S3-FIFO: new blocks enter a small probation queue and only those read again move to
    /// the main one, so a one-off scan (a client reading its whole disk) cannot flush the
    /// boot blocks everyone shares. The `quick_cache` crate. The default: the best hit
    /// ratio on recorded boots when RAM is tight (`osstream bench cache`).
    #[default]
    S3fifo,
}

impl EvictionPolicy {
    /// Every policy, by its configuration name.
    pub const ALL: [EvictionPolicy; 3] = [
        EvictionPolicy::Clock,
        EvictionPolicy::Lru,
        EvictionPolicy::S3fifo,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            EvictionPolicy::Clock => "clock",
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::S3fifo => "s3fifo",
        }
    }
}

impl std::str::FromStr for EvictionPolicy {
    type Err = crate::Error;

    fn from_str(text: &str) -> Result<Self> {
        EvictionPolicy::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| {
                crate::Error::new(
                    crate::ErrorKind::InvalidInput,
                    format!("unknown eviction policy {text:?}: use clock, lru or s3fifo"),
                )
            })
    }
}

/// `[cache.ram]`: the RAM tier shared by every client of every image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RamTierConfig {
    /// Cache in RAM at all (while `[cache] tiers` lists `ram`). Default: true.
    pub enabled: bool,
    /// Most bytes held. Default: `1GiB`.
    pub capacity: ByteSize,
    /// Cache block size: reads are filled from the backend in aligned blocks of this
    /// size. Default: `64KiB`.
    pub block_size: ByteSize,
    /// Eviction policy: `clock`, `lru` or `s3fifo`. Default: `s3fifo`.
    pub policy: EvictionPolicy,
    /// Prefetch backend reads (boot profiles, NBD `CACHE`) in flight at once, over all
    /// clients; demand reads never wait for these slots. Default: 8.
    pub prefetch_concurrency: usize,
}

impl Default for RamTierConfig {
    fn default() -> Self {
        RamTierConfig {
            enabled: true,
            capacity: ByteSize::gib(1),
            block_size: ByteSize::kib(64),
            policy: EvictionPolicy::default(),
            prefetch_concurrency: 8,
        }
    }
}

impl TierKind for RamTierConfig {
    const KIND: &'static str = "ram";

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        let block = self.block_size.bytes();
        if !(512..=16 << 20).contains(&block) || !block.is_power_of_two() {
            return Err(config_error(
                "cache.ram",
                &format!(
                    "block_size = {} must be a power of two from 512 bytes to 16MiB",
                    self.block_size
                ),
            ));
        }
        if !(1..=256).contains(&self.prefetch_concurrency) {
            return Err(config_error(
                "cache.ram",
                &format!(
                    "prefetch_concurrency = {} must be from 1 to 256",
                    self.prefetch_concurrency
                ),
            ));
        }
        Ok(())
    }

    fn build(self, _ctx: &BackendContext) -> Result<Arc<dyn crate::Layer>> {
        tracing::info!(capacity = %self.capacity, block_size = %self.block_size,
            policy = self.policy.name(), "RAM cache on");
        Ok(Arc::new(
            super::CacheLayer::new(
                Arc::new(RamTier::for_blocks(
                    self.capacity.bytes(),
                    self.policy,
                    self.block_size.bytes(),
                )),
                self.block_size.bytes(),
            )
            .with_prefetch_concurrency(self.prefetch_concurrency),
        ))
    }
}

/// What one eviction policy keeps: blocks by key, within a byte budget.
trait Store: Send + Sync + Debug {
    fn get(&self, key: &BlockKey) -> Option<Bytes>;
    /// Stores `data`; returns how many blocks were evicted for it.
    fn put(&self, key: BlockKey, data: Bytes) -> u64;
    fn remove(&self, key: &BlockKey);
    /// Drops every block of `image` at `generation`; returns how many.
    fn invalidate(&self, image: u128, generation: u128) -> u64;
    /// (blocks, bytes) held now.
    fn usage(&self) -> (u64, u64);
}

/// A bounded in-memory tier shared by every client of every image.
///
/// Capacity is in bytes; a block larger than a shard's share of it is not cached. The
/// policy ([`EvictionPolicy`]) decides what is dropped when it is full.
#[derive(Debug)]
pub struct RamTier {
    store: Box<dyn Store>,
    policy: EvictionPolicy,
    capacity: u64,
    evictions: Arc<AtomicU64>,
}

impl RamTier {
    /// A CLOCK tier holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_policy(capacity, EvictionPolicy::Clock)
    }

    /// A tier holding at most `capacity` bytes of 64 KiB blocks, evicting by `policy`.
    pub fn with_policy(capacity: u64, policy: EvictionPolicy) -> Self {
        Self::for_blocks(capacity, policy, 64 << 10)
    }

    /// A tier holding at most `capacity` bytes of `block_size` blocks (what the cache
    /// layer above it fills), evicting by `policy`.
    pub fn for_blocks(capacity: u64, policy: EvictionPolicy, block_size: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let store: Box<dyn Store> = match policy {
            EvictionPolicy::Clock => Box::new(clock::ClockStore::new(capacity)),
            EvictionPolicy::Lru => Box::new(lru::LruStore::new(capacity)),
            EvictionPolicy::S3fifo => Box::new(s3fifo::S3FifoStore::new(
                capacity,
                block_size,
                evictions.clone(),
            )),
        };
        RamTier {
            store,
            policy,
            capacity,
            evictions,
        }
    }

    /// The eviction policy.
    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }
}

#[async_trait]
impl CacheTier for RamTier {
    fn name(&self) -> &str {
        "ram"
    }

    async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>> {
        Ok(self.store.get(key))
    }

    async fn put(&self, key: BlockKey, block: Bytes) -> Result<()> {
        let evicted = self.store.put(key, block);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn remove(&self, key: &BlockKey) -> Result<()> {
        self.store.remove(key);
        Ok(())
    }

    async fn invalidate(&self, image: u128, generation: u128) -> Result<u64> {
        Ok(self.store.invalidate(image, generation))
    }

    fn stats(&self) -> TierStats {
        let (entries, bytes) = self.store.usage();
        TierStats {
            entries,
            bytes,
            capacity: self.capacity,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

/// Shards of a single-threaded store, each behind its own lock, so lookups from many
/// connections rarely wait on one another.
const SHARDS: usize = 16;

fn shard_of(key: &BlockKey) -> usize {
    let mut hasher = KeyHasher::default();
    std::hash::Hash::hash(key, &mut hasher);
    // The top bits are the best mixed; the low bits pick the slot inside the map.
    (hasher.finish() >> 60) as usize % SHARDS
}

/// Locks a shard. A poisoned shard only means another thread panicked mid-update of
/// plain data; every store keeps its map consistent at each await-free step.
fn lock<T>(shard: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fast hasher for [`BlockKey`]: its fields are already well-distributed hashes and
/// block numbers, so a multiply-rotate mix is enough (SipHash would dominate a hit).
#[derive(Debug, Default, Clone)]
struct KeyHasher(u64);

type KeyHash = BuildHasherDefault<KeyHasher>;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u64) -> BlockKey {
        BlockKey {
            image: 1,
            generation: 2,
            block,
        }
    }

    fn tiers(capacity: u64) -> Vec<RamTier> {
        EvictionPolicy::ALL
            .into_iter()
            .map(|p| RamTier::with_policy(capacity, p))
            .collect()
    }

    #[tokio::test]
    async fn every_policy_stays_within_capacity_and_counts_evictions() {
        for tier in tiers(16 * 4096 * 4) {
            for block in 0..1000 {
                tier.put(key(block), Bytes::from(vec![block as u8; 4096]))
                    .await
                    .unwrap();
            }
            let stats = tier.stats();
            assert!(
                stats.bytes <= stats.capacity,
                "{:?} {stats:?}",
                tier.policy()
            );
            assert!(
                stats.evictions >= 1000 - 64,
                "{:?} {stats:?}",
                tier.policy()
            );
            assert_eq!(stats.entries * 4096, stats.bytes, "{:?}", tier.policy());
        }
    }

    #[tokio::test]
    async fn every_policy_returns_what_was_put_and_forgets_removed_blocks() {
        for tier in tiers(1 << 20) {
            tier.put(key(1), Bytes::from_static(b"one")).await.unwrap();
            tier.put(key(1), Bytes::from_static(b"uno")).await.unwrap();
            tier.put(key(2), Bytes::from_static(b"two")).await.unwrap();
            assert_eq!(tier.get(&key(1)).await.unwrap().unwrap(), "uno");
            tier.remove(&key(1)).await.unwrap();
            assert!(tier.get(&key(1)).await.unwrap().is_none());
            assert_eq!(tier.stats().bytes, 3, "{:?}", tier.policy());
        }
    }

    #[tokio::test]
    async fn hot_blocks_survive_a_scan_under_clock_and_s3fifo() {
        for tier in tiers(16 * 4096 * 8) {
            let hot: Vec<BlockKey> = (0..4).map(|b| key(b * 16 + 1)).collect();
            for &k in &hot {
                tier.put(k, Bytes::from(vec![7; 4096])).await.unwrap();
            }
            let mut lost = 0;
            for block in 1..400 {
                for &k in &hot {
                    if tier.get(&k).await.unwrap().is_none() {
                        lost += 1;
                        tier.put(k, Bytes::from(vec![7; 4096])).await.unwrap();
                    }
                }
                tier.put(key(100_000 + block), Bytes::from(vec![1; 4096]))
                    .await
                    .unwrap();
            }
            if tier.policy() != EvictionPolicy::Lru {
                assert_eq!(lost, 0, "{:?} lost hot blocks in a scan", tier.policy());
            }
        }
    }

    #[tokio::test]
    async fn a_one_off_scan_does_not_flush_a_reused_working_set_under_s3fifo() {
        // The boot set (read twice) and then a scan twice the cache's size.
        let (set, block) = (64u64, 4096usize);
        let capacity = 16 * 4096 * 16;
        let mut kept = Vec::new();
        for tier in tiers(capacity) {
            for round in 0..2 {
                for b in 0..set {
                    if round == 0 || tier.get(&key(b)).await.unwrap().is_none() {
                        tier.put(key(b), Bytes::from(vec![1; block])).await.unwrap();
                    }
                }
            }
            for b in 0..(2 * capacity / block as u64) {
                tier.put(key(1_000_000 + b), Bytes::from(vec![2; block]))
                    .await
                    .unwrap();
            }
            let mut hits = 0;
            for b in 0..set {
                hits += u64::from(tier.get(&key(b)).await.unwrap().is_some());
            }
            kept.push((tier.policy(), hits));
        }
        let of = |p| kept.iter().find(|(q, _)| *q == p).unwrap().1;
        assert_eq!(of(EvictionPolicy::Lru), 0, "{kept:?}");
        assert!(of(EvictionPolicy::S3fifo) > set / 2, "{kept:?}");
    }

    #[tokio::test]
    async fn invalidate_drops_one_generation_only_under_every_policy() {
        for tier in tiers(1 << 20) {
            tier.put(key(1), Bytes::from_static(b"old")).await.unwrap();
            let other = BlockKey {
                generation: 3,
                ..key(1)
            };
            tier.put(other, Bytes::from_static(b"new")).await.unwrap();
            assert_eq!(
                tier.invalidate(1, 2).await.unwrap(),
                1,
                "{:?}",
                tier.policy()
            );
            assert!(tier.get(&key(1)).await.unwrap().is_none());
            assert_eq!(tier.get(&other).await.unwrap().unwrap(), "new");
            assert_eq!(tier.stats().bytes, 3);
        }
    }

    #[tokio::test]
    async fn large_blocks_are_cached_under_every_policy() {
        for policy in EvictionPolicy::ALL {
            let tier = RamTier::for_blocks(64 << 20, policy, 2 << 20);
            for block in 0..8 {
                tier.put(key(block), Bytes::from(vec![1; 2 << 20]))
                    .await
                    .unwrap();
            }
            assert_eq!(tier.stats().entries, 8, "{policy:?}");
        }
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!(
            "s3fifo".parse::<EvictionPolicy>().unwrap(),
            EvictionPolicy::S3fifo
        );
        let err = "arc".parse::<EvictionPolicy>().unwrap_err();
        assert!(err.to_string().contains("clock, lru or s3fifo"), "{err}");
    }
}
