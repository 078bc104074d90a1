use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::tier::{BlockKey, CacheTier, TierStats};
use crate::error::Result;
use crate::registry::{BackendContext, TierKind, config_error};
use crate::units::ByteSize;

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
}

impl Default for RamTierConfig {
    fn default() -> Self {
        RamTierConfig {
            enabled: true,
            capacity: ByteSize::gib(1),
            block_size: ByteSize::kib(64),
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
        Ok(())
    }

    fn build(self, _ctx: &BackendContext) -> Result<std::sync::Arc<dyn crate::Layer>> {
        tracing::info!(capacity = %self.capacity, block_size = %self.block_size, "RAM cache on");
        Ok(std::sync::Arc::new(super::CacheLayer::new(
            std::sync::Arc::new(RamTier::new(self.capacity.bytes())),
            self.block_size.bytes(),
        )))
    }
}

const SHARDS: usize = 16;

/// A bounded in-memory tier shared by every client of every image.
///
/// Blocks are spread over 16 shards, each a hash map plus a CLOCK (second chance) ring,
/// so lookups from many connections rarely wait on one lock and a sequential scan does
/// not flush blocks that are read again and again. Capacity is in bytes; a block larger
/// than a shard's share is not cached.
#[derive(Debug)]
pub struct RamTier {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: u64,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<BlockKey, usize, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    hand: usize,
    bytes: u64,
}

#[derive(Debug)]
struct Slot {
    key: BlockKey,
    data: Option<Bytes>,
    referenced: bool,
}

impl RamTier {
    /// A tier holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        RamTier {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS as u64,
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &BlockKey) -> std::sync::MutexGuard<'_, Shard> {
        let mut hasher = KeyHasher::default();
        std::hash::Hash::hash(key, &mut hasher);
        // The top bits are the best mixed; the low bits pick the slot inside the map.
        let index = (hasher.finish() >> 60) as usize % SHARDS;
        // A poisoned shard only means another thread panicked mid-update of plain data;
        // the map and ring stay consistent at every await-free step, so keep using it.
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_now(&self, key: &BlockKey) -> Option<Bytes> {
        let mut shard = self.shard(key);
        let slot = *shard.index.get(key)?;
        let entry = &mut shard.slots[slot];
        entry.referenced = true;
        entry.data.clone()
    }

    fn put_now(&self, key: BlockKey, data: Bytes) {
        let len = data.len() as u64;
        if len > self.shard_capacity {
            return;
        }
        let mut shard = self.shard(&key);
        if let Some(&slot) = shard.index.get(&key) {
            let old = shard.slots[slot]
                .data
                .replace(data)
                .map_or(0, |d| d.len() as u64);
            shard.bytes = shard.bytes - old + len;
        } else {
            let mut evicted = 0;
            while shard.bytes + len > self.shard_capacity {
                shard.evict_one();
                evicted += 1;
            }
            if evicted > 0 {
                self.evictions.fetch_add(evicted, Ordering::Relaxed);
            }
            let slot = Slot {
                key,
                data: Some(data),
                referenced: false,
            };
            let position = match shard.free.pop() {
                Some(position) => {
                    shard.slots[position] = slot;
                    position
                }
                None => {
                    shard.slots.push(slot);
                    shard.slots.len() - 1
                }
            };
            shard.index.insert(key, position);
            shard.bytes += len;
        }
    }
}

impl Shard {
    /// Advances the clock hand to the first unreferenced block and drops it.
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if slot.data.is_some() {
                if slot.referenced {
                    slot.referenced = false;
                } else {
                    let key = slot.key;
                    self.remove_slot(self.hand);
                    self.index.remove(&key);
                    self.hand += 1;
                    return;
                }
            }
            self.hand += 1;
        }
    }

    fn remove_slot(&mut self, position: usize) {
        if let Some(data) = self.slots[position].data.take() {
            self.bytes -= data.len() as u64;
            self.free.push(position);
        }
    }

    fn entries(&self) -> u64 {
        self.index.len() as u64
    }
}

#[async_trait]
impl CacheTier for RamTier {
    fn name(&self) -> &str {
        "ram"
    }

    async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>> {
        Ok(self.get_now(key))
    }

    async fn put(&self, key: BlockKey, block: Bytes) -> Result<()> {
        self.put_now(key, block);
        Ok(())
    }

    async fn remove(&self, key: &BlockKey) -> Result<()> {
        let mut shard = self.shard(key);
        if let Some(position) = shard.index.remove(key) {
            shard.remove_slot(position);
        }
        Ok(())
    }

    async fn invalidate(&self, image: u128, generation: u128) -> Result<u64> {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let doomed: Vec<(BlockKey, usize)> = shard
                .index
                .iter()
                .filter(|(k, _)| k.image == image && k.generation == generation)
                .map(|(k, v)| (*k, *v))
                .collect();
            for (key, position) in doomed {
                shard.index.remove(&key);
                shard.remove_slot(position);
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    fn stats(&self) -> TierStats {
        let mut stats = TierStats {
            capacity: self.shard_capacity * SHARDS as u64,
            evictions: self.evictions.load(Ordering::Relaxed),
            ..TierStats::default()
        };
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            stats.entries += shard.entries();
            stats.bytes += shard.bytes;
        }
        stats
    }
}

/// A fast hasher for [`BlockKey`]: its fields are already well-distributed hashes and
/// block numbers, so a multiply-rotate mix is enough (SipHash would dominate a hit).
#[derive(Debug, Default)]
struct KeyHasher(u64);

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

    #[tokio::test]
    async fn stays_within_capacity_and_counts_evictions() {
        let tier = RamTier::new(16 * 4096 * 4);
        for block in 0..1000 {
            tier.put(key(block), Bytes::from(vec![block as u8; 4096]))
                .await
                .unwrap();
        }
        let stats = tier.stats();
        assert!(stats.bytes <= stats.capacity, "{stats:?}");
        assert!(stats.evictions >= 1000 - 64, "{stats:?}");
        assert_eq!(tier.get(&key(999)).await.unwrap().unwrap()[0], 999u64 as u8);
    }

    #[tokio::test]
    async fn referenced_blocks_survive_a_scan() {
        let tier = RamTier::new(16 * 4096 * 8);
        let hot = key(0);
        tier.put(hot, Bytes::from(vec![7; 4096])).await.unwrap();
        for block in 1..200 {
            assert!(
                tier.get(&hot).await.unwrap().is_some(),
                "hot block evicted at {block}"
            );
            tier.put(key(block * 16), Bytes::from(vec![1; 4096]))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn invalidate_drops_one_generation_only() {
        let tier = RamTier::new(1 << 20);
        tier.put(key(1), Bytes::from_static(b"old")).await.unwrap();
        let other = BlockKey {
            generation: 3,
            ..key(1)
        };
        tier.put(other, Bytes::from_static(b"new")).await.unwrap();
        assert_eq!(tier.invalidate(1, 2).await.unwrap(), 1);
        assert!(tier.get(&key(1)).await.unwrap().is_none());
        assert_eq!(
            tier.get(&other).await.unwrap().unwrap(),
            Bytes::from_static(b"new")
        );
        assert_eq!(tier.stats().bytes, 3);
    }
}
