//! [`OverlayStore`]: where an overlay's blocks live, and the two stores that keep them in
//! RAM: [`RamOverlay`] (bounded) and [`SpillOverlay`] (RAM first, then disk).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::disk::DiskOverlay;
use super::ranges::BlockRanges;
use crate::error::{Error, ErrorKind, Result};

/// What an overlay holds for one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Nothing: the client never changed the block, it reads from the base.
    Base,
    /// The client zeroed or trimmed the whole block: it reads as zeroes, whatever the base
    /// holds, and costs no data.
    Zero,
    /// The block as the client wrote it (always `block_size` long, except the image's
    /// last block).
    Data(Bytes),
}

/// [`Slot`] without the data: what [`OverlayStore::kind`] answers without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// See [`Slot::Base`].
    Base,
    /// See [`Slot::Zero`].
    Zero,
    /// See [`Slot::Data`].
    Data,
}

/// Storage for the blocks of one overlay.
///
/// # Contract
/// - `get` returns the last `put` block, or [`Slot::Zero`] for a block `zero`ed since, or
///   [`Slot::Base`] for a block never changed; `kind` says which without reading data.
/// - `put` fails with `NoSpace` when the store is full, and then stores nothing.
/// - `zero` marks whole blocks as reading zeroes and frees what they held; it never fails
///   for lack of space.
/// - After `flush` returns, every `put` and `zero` before it survives a crash of the
///   server (stores that live in RAM say so in [`OverlayStore::durable`]).
#[async_trait]
pub trait OverlayStore: Send + Sync + fmt::Debug {
    /// What the overlay holds for `block`.
    async fn get(&self, block: u64) -> Result<Slot>;
    /// What kind of slot `block` is, without reading its data.
    fn kind(&self, block: u64) -> SlotKind;
    /// Stores one whole block (ending any zero marker on it).
    async fn put(&self, block: u64, data: Bytes) -> Result<()>;
    /// Makes every block of `blocks` read as zeroes.
    async fn zero(&self, blocks: Range<u64>) -> Result<()>;
    /// Makes every earlier `put` and `zero` durable.
    async fn flush(&self) -> Result<()>;
    /// Whether `flush` survives a crash of the server.
    fn durable(&self) -> bool;
    /// Bytes held in RAM and on disk.
    fn usage(&self) -> (u64, u64);
}

/// Blocks in RAM, at most `capacity` bytes of block data (zero markers cost a few bytes
/// per zeroed range and are not counted).
#[derive(Debug)]
pub struct RamOverlay {
    state: Mutex<RamState>,
    capacity: u64,
}

#[derive(Debug, Default)]
struct RamState {
    blocks: HashMap<u64, Bytes>,
    zeroes: BlockRanges,
    bytes: u64,
}

impl RamOverlay {
    /// An empty overlay that holds at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        RamOverlay {
            state: Mutex::new(RamState::default()),
            capacity,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block's current buffer, if held.
    fn peek(&self, block: u64) -> Option<Bytes> {
        self.state().blocks.get(&block).cloned()
    }

    /// Drops the block only if it still holds exactly `expected` (not rewritten since).
    fn remove_if_same(&self, block: u64, expected: &Bytes) -> bool {
        let mut state = self.state();
        let same = state
            .blocks
            .get(&block)
            .is_some_and(|b| b.as_ptr() == expected.as_ptr() && b.len() == expected.len());
        if same {
            state.blocks.remove(&block);
            state.bytes -= expected.len() as u64;
        }
        same
    }

    /// Stores a block; returns whether it was not held before.
    fn insert(&self, block: u64, data: Bytes) -> Result<bool> {
        let mut state = self.state();
        let old = state.blocks.get(&block).map(|b| b.len() as u64);
        let new_total = state.bytes - old.unwrap_or(0) + data.len() as u64;
        if new_total > self.capacity {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "the RAM write overlay is full ({} bytes); the vdisk's write cache needs more room",
                    self.capacity
                ),
            )
            .with_op("write_at"));
        }
        state.bytes = new_total;
        state.blocks.insert(block, data);
        state.zeroes.remove(block);
        Ok(old.is_none())
    }

    /// Marks `blocks` zero and drops their data.
    fn zero_now(&self, blocks: Range<u64>) {
        let mut state = self.state();
        let state = &mut *state;
        if (blocks.end - blocks.start) as usize > state.blocks.len() {
            state.blocks.retain(|block, data| {
                let doomed = blocks.contains(block);
                if doomed {
                    state.bytes -= data.len() as u64;
                }
                !doomed
            });
        } else {
            for block in blocks.clone() {
                if let Some(data) = state.blocks.remove(&block) {
                    state.bytes -= data.len() as u64;
                }
            }
        }
        state.zeroes.insert(blocks);
    }
}

#[async_trait]
impl OverlayStore for RamOverlay {
    async fn get(&self, block: u64) -> Result<Slot> {
        let state = self.state();
        Ok(match state.blocks.get(&block) {
            Some(data) => Slot::Data(data.clone()),
            None if state.zeroes.contains(block) => Slot::Zero,
            None => Slot::Base,
        })
    }

    fn kind(&self, block: u64) -> SlotKind {
        let state = self.state();
        if state.blocks.contains_key(&block) {
            SlotKind::Data
        } else if state.zeroes.contains(block) {
            SlotKind::Zero
        } else {
            SlotKind::Base
        }
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        self.insert(block, data).map(drop)
    }

    async fn zero(&self, blocks: Range<u64>) -> Result<()> {
        self.zero_now(blocks);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn durable(&self) -> bool {
        false
    }

    fn usage(&self) -> (u64, u64) {
        (self.state().bytes, 0)
    }
}

/// RAM first; when RAM is full, the blocks written longest ago move to a disk overlay.
#[derive(Debug)]
pub struct SpillOverlay {
    ram: RamOverlay,
    disk: DiskOverlay,
    order: Mutex<VecDeque<u64>>,
}

impl SpillOverlay {
    /// `capacity` bytes of RAM in front of `disk`.
    pub fn new(capacity: u64, disk: DiskOverlay) -> Self {
        SpillOverlay {
            ram: RamOverlay::new(capacity),
            disk,
            order: Mutex::new(VecDeque::new()),
        }
    }

    fn order(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl OverlayStore for SpillOverlay {
    async fn get(&self, block: u64) -> Result<Slot> {
        match self.ram.get(block).await? {
            Slot::Base => self.disk.get(block).await,
            found => Ok(found),
        }
    }

    fn kind(&self, block: u64) -> SlotKind {
        match self.ram.kind(block) {
            SlotKind::Base => self.disk.kind(block),
            found => found,
        }
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        loop {
            match self.ram.insert(block, data.clone()) {
                Ok(new) => {
                    if new {
                        self.order().push_back(block);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    let victim = self.order().pop_front();
                    let Some(victim) = victim else {
                        // Nothing left to spill (a block larger than RAM): straight to disk.
                        return self.disk.put(block, data).await;
                    };
                    let Some(old) = self.ram.peek(victim) else {
                        continue;
                    };
                    // Disk first, RAM second: readers keep finding the block in RAM until
                    // the disk copy is in place, so they never see an older version.
                    if let Err(err) = self.disk.put(victim, old.clone()).await {
                        self.order().push_front(victim);
                        return Err(err);
                    }
                    if !self.ram.remove_if_same(victim, &old) {
                        // Rewritten meanwhile: the newer RAM copy stays and wins.
                        self.order().push_back(victim);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn zero(&self, blocks: Range<u64>) -> Result<()> {
        // Both halves: RAM answers first, and the disk drops (and punches out) what it held.
        self.ram.zero_now(blocks.clone());
        self.disk.zero(blocks).await
    }

    async fn flush(&self) -> Result<()> {
        self.disk.flush().await
    }

    fn durable(&self) -> bool {
        false
    }

    fn usage(&self) -> (u64, u64) {
        (self.ram.usage().0, self.disk.usage().1)
    }
}
