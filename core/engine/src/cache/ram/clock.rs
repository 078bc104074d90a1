//! CLOCK (second chance), our own: the `clock` policy.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use super::{KeyHash, SHARDS, Store, lock, shard_of};
use crate::cache::tier::BlockKey;

/// 16 shards, each a hash map plus a ring of slots the clock hand sweeps.
#[derive(Debug)]
pub(super) struct ClockStore {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: u64,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<BlockKey, usize, KeyHash>,
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

impl ClockStore {
    pub(super) fn new(capacity: u64) -> Self {
        ClockStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS as u64,
        }
    }
}

impl Store for ClockStore {
    fn get(&self, key: &BlockKey) -> Option<Bytes> {
        let mut shard = lock(&self.shards[shard_of(key)]);
        let slot = *shard.index.get(key)?;
        let entry = &mut shard.slots[slot];
        entry.referenced = true;
        entry.data.clone()
    }

    fn put(&self, key: BlockKey, data: Bytes) -> u64 {
        let len = data.len() as u64;
        if len > self.shard_capacity {
            return 0;
        }
        let mut shard = lock(&self.shards[shard_of(&key)]);
        if let Some(&slot) = shard.index.get(&key) {
            let old = shard.slots[slot]
                .data
                .replace(data)
                .map_or(0, |d| d.len() as u64);
            shard.bytes = shard.bytes - old + len;
            return 0;
        }
        let mut evicted = 0;
        while shard.bytes + len > self.shard_capacity {
            shard.evict_one();
            evicted += 1;
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
        evicted
    }

    fn remove(&self, key: &BlockKey) {
        let mut shard = lock(&self.shards[shard_of(key)]);
        if let Some(position) = shard.index.remove(key) {
            shard.remove_slot(position);
        }
    }

    fn invalidate(&self, image: u128, generation: u128) -> u64 {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
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
        dropped
    }

    fn usage(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(entries, bytes), shard| {
            let shard = lock(shard);
            (entries + shard.index.len() as u64, bytes + shard.bytes)
        })
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
}
