//! Least recently used, from the `lru` crate: the `lru` policy.

use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

use super::{KeyHash, SHARDS, Store, lock, shard_of};
use crate::cache::tier::BlockKey;

/// 16 shards, each an unbounded `LruCache` kept within its share of bytes by hand (the
/// crate bounds entries, not bytes).
#[derive(Debug)]
pub(super) struct LruStore {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: u64,
}

#[derive(Debug)]
struct Shard {
    blocks: LruCache<BlockKey, Bytes, KeyHash>,
    bytes: u64,
}

impl LruStore {
    pub(super) fn new(capacity: u64) -> Self {
        LruStore {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        blocks: LruCache::unbounded_with_hasher(KeyHash::default()),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_capacity: capacity / SHARDS as u64,
        }
    }
}

impl Store for LruStore {
    fn get(&self, key: &BlockKey) -> Option<Bytes> {
        lock(&self.shards[shard_of(key)]).blocks.get(key).cloned()
    }

    fn put(&self, key: BlockKey, data: Bytes) -> u64 {
        let len = data.len() as u64;
        if len > self.shard_capacity {
            return 0;
        }
        let mut shard = lock(&self.shards[shard_of(&key)]);
        if let Some(old) = shard.blocks.pop(&key) {
            shard.bytes -= old.len() as u64;
        }
        let mut evicted = 0;
        while shard.bytes + len > self.shard_capacity {
            let Some((_, old)) = shard.blocks.pop_lru() else {
                break;
            };
            shard.bytes -= old.len() as u64;
            evicted += 1;
        }
        shard.blocks.put(key, data);
        shard.bytes += len;
        evicted
    }

    fn remove(&self, key: &BlockKey) {
        let mut shard = lock(&self.shards[shard_of(key)]);
        if let Some(old) = shard.blocks.pop(key) {
            shard.bytes -= old.len() as u64;
        }
    }

    fn invalidate(&self, image: u128, generation: u128) -> u64 {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let doomed: Vec<BlockKey> = shard
                .blocks
                .iter()
                .filter(|(k, _)| k.image == image && k.generation == generation)
                .map(|(k, _)| *k)
                .collect();
            for key in doomed {
                if let Some(old) = shard.blocks.pop(&key) {
                    shard.bytes -= old.len() as u64;
                    dropped += 1;
                }
            }
        }
        dropped
    }

    fn usage(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(entries, bytes), shard| {
            let shard = lock(shard);
            (entries + shard.blocks.len() as u64, bytes + shard.bytes)
        })
    }
}
