use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use osstream_core::{
    BlockKey, Bytes, CacheTier, Error, ErrorKind, Result, TierStats, run_blocking,
};
use serde::{Deserialize, Serialize};

use crate::index::{RECORD, Record};

const FORMAT: u32 = 1;

/// A bounded, persistent, checksummed block store on the server's disk: see the crate
/// documentation.
#[derive(Debug, Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    data: File,
    index: File,
    /// Held for the tier's life: one process per cache directory.
    _lock: File,
    slot_size: u64,
    slots: u32,
    /// Reclaim starts above this many slots in use...
    high: u32,
    /// ...and stops at this many.
    low: u32,
    state: Mutex<State>,
    evictions: AtomicU64,
    checksum_failures: AtomicU64,
}

#[derive(Debug)]
struct State {
    map: HashMap<BlockKey, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Counts uses: a slot's `last_use` is the tick of its last put or hit.
    tick: u64,
    /// Blocks reclaim never evicts (the client agent's boot set).
    pinned: HashSet<BlockKey>,
    /// Slots held or being written.
    used: u32,
    /// Bytes of held blocks.
    bytes: u64,
    /// Numbers slot assignments, so a late writer or reader sees its slot was reused.
    next_version: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: Option<BlockKey>,
    len: u32,
    crc: u32,
    version: u64,
    use_: Use,
    last_use: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Use {
    #[default]
    Free,
    Writing,
    Held,
}

/// `meta.json`: the geometry the files were made with.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    block_size: u64,
    slots: u32,
}

fn io(err: std::io::Error, what: String) -> Error {
    Error::from_io(err, what).with_op("disk cache")
}

impl DiskTier {
    /// Opens (or creates) the cache in `dir`: `capacity` bytes in slots of `block_size`,
    /// reclaiming from `watermarks.0` down to `watermarks.1` percent of the slots.
    /// Blocks recorded by an earlier run with the same geometry are kept.
    pub fn open(dir: &Path, capacity: u64, block_size: u64, watermarks: (u8, u8)) -> Result<Self> {
        let slots = u32::try_from(capacity / block_size)
            .unwrap_or(u32::MAX)
            .max(1);
        std::fs::create_dir_all(dir).map_err(|e| {
            io(
                e,
                format!("cannot create the disk cache folder {}", dir.display()),
            )
        })?;
        let lock = File::create(dir.join("lock"))
            .map_err(|e| io(e, format!("cannot open {}", dir.join("lock").display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "another osstream process uses the disk cache in {}: give each server its own [cache.disk] dir",
                        dir.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(io(
                    err,
                    format!(
                        "cannot lock {} (does its file system support locks?)",
                        dir.join("lock").display()
                    ),
                ));
            }
        }
        let meta = Meta {
            format: FORMAT,
            block_size,
            slots,
        };
        let meta_path = dir.join("meta.json");
        let found: Option<Meta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
                .map_err(|e| io(e, format!("cannot open {}", dir.join(name).display())))
        };
        let (data, index) = (open("blocks.dat")?, open("index.dat")?);
        let sized = |file: &File, len: u64| file.metadata().is_ok_and(|m| m.len() == len);
        let fresh = found.as_ref() != Some(&meta)
            || !sized(&index, u64::from(slots) * RECORD as u64)
            || !sized(&data, u64::from(slots) * block_size);
        if fresh {
            if let Some(old) = &found {
                tracing::info!(dir = %dir.display(), old_block_size = old.block_size, old_slots = old.slots,
                    block_size, slots, "disk cache geometry changed: starting it afresh");
            }
            // The index goes first: a crash in between leaves no record naming old bytes.
            index
                .set_len(0)
                .and_then(|()| index.set_len(u64::from(slots) * RECORD as u64))
                .and_then(|()| data.set_len(u64::from(slots) * block_size))
                .map_err(|e| {
                    io(
                        e,
                        format!("cannot size the disk cache in {}", dir.display()),
                    )
                })?;
            std::fs::write(
                &meta_path,
                serde_json::to_vec(&meta).expect("meta serialises"),
            )
            .map_err(|e| io(e, format!("cannot write {}", meta_path.display())))?;
        }
        let percent = |p: u8| ((u64::from(slots) * u64::from(p)) / 100).max(1) as u32;
        let state = load(&index, slots, block_size).map_err(|e| {
            io(
                e,
                format!("cannot read {}", dir.join("index.dat").display()),
            )
        })?;
        Ok(DiskTier {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                data,
                index,
                _lock: lock,
                slot_size: block_size,
                slots,
                high: percent(watermarks.0),
                low: percent(watermarks.1).min(percent(watermarks.0).saturating_sub(1)),
                state: Mutex::new(state),
                evictions: AtomicU64::new(0),
                checksum_failures: AtomicU64::new(0),
            }),
        })
    }

    /// Blocks whose bytes did not match their checksum (served as misses) since start.
    pub fn checksum_failures(&self) -> u64 {
        self.inner.checksum_failures.load(Ordering::Relaxed)
    }

    /// The folder holding the cache files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes every block put so far durable (data, then index records): without it a
    /// power cut loses the blocks the kernel had not written back yet (they are misses
    /// after it, never wrong bytes). The client agent calls it now and then.
    pub async fn sync(&self) -> Result<()> {
        let inner = self.inner.clone();
        run_blocking("disk cache sync", move || {
            inner
                .data
                .sync_data()
                .and_then(|()| inner.index.sync_data())
                .map_err(|e| {
                    io(
                        e,
                        format!("cannot sync the disk cache in {}", inner.dir.display()),
                    )
                })
        })
        .await
    }

    /// Whether `key` is held now (no I/O, no effect on eviction order).
    pub fn holds(&self, key: &BlockKey) -> bool {
        self.inner.lock().map.contains_key(key)
    }

    /// Keeps `keys` from eviction from now on (held now or put later), in addition to
    /// those pinned before. Pins last for the tier's life in this process.
    pub fn pin(&self, keys: impl IntoIterator<Item = BlockKey>) {
        self.inner.lock().pinned.extend(keys);
    }

    /// How many pinned blocks are held now.
    pub fn pinned_held(&self) -> u64 {
        let state = self.inner.lock();
        state
            .pinned
            .iter()
            .filter(|k| state.map.contains_key(k))
            .count() as u64
    }

    /// Empties the cache in `dir` (what `osstream-agent clear` does); refused while a
    /// process has it open. Returns the bytes of block data it held.
    pub fn clear(dir: &Path) -> Result<u64> {
        let lock_path = dir.join("lock");
        let lock = match File::open(&lock_path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(io(err, format!("cannot open {}", lock_path.display()))),
        };
        if lock.try_lock().is_err() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the cache in {} is in use: stop the process using it first",
                    dir.display()
                ),
            ));
        }
        let held = std::fs::metadata(dir.join("blocks.dat")).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        for name in ["index.dat", "blocks.dat", "meta.json"] {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(io(
                        err,
                        format!("cannot remove {}", dir.join(name).display()),
                    ));
                }
            }
        }
        Ok(held)
    }
}

/// Rebuilds the map from the index file.
fn load(index: &File, slots: u32, slot_size: u64) -> std::io::Result<State> {
    let mut records = vec![0u8; slots as usize * RECORD];
    index.read_exact_at(&mut records, 0)?;
    let mut state = State {
        map: HashMap::new(),
        slots: vec![Slot::default(); slots as usize],
        free: Vec::new(),
        tick: 0,
        pinned: HashSet::new(),
        used: 0,
        bytes: 0,
        next_version: 1,
    };
    for (number, bytes) in records.chunks_exact(RECORD).enumerate().rev() {
        let number = number as u32;
        match Record::decode(bytes) {
            Some(record)
                if u64::from(record.len) <= slot_size && !state.map.contains_key(&record.key) =>
            {
                state.map.insert(record.key, number);
                state.slots[number as usize] = Slot {
                    key: Some(record.key),
                    len: record.len,
                    crc: record.crc,
                    version: 0,
                    use_: Use::Held,
                    last_use: 0,
                };
                state.used += 1;
                state.bytes += u64::from(record.len);
            }
            _ => state.free.push(number),
        }
    }
    Ok(state)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.slot_size
    }

    fn record_offset(slot: u32) -> u64 {
        u64::from(slot) * RECORD as u64
    }

    /// Writes an empty record for `slot`, so its old block does not return after a restart.
    fn clear_record(&self, slot: u32) -> std::io::Result<()> {
        self.index
            .write_all_at(&[0u8; RECORD], Inner::record_offset(slot))
    }
}

impl State {
    /// Frees `slot` (its block leaves the map if it is the one mapped there).
    fn release(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        if entry.use_ == Use::Free {
            return;
        }
        if entry.use_ == Use::Held {
            self.bytes -= u64::from(entry.len);
            if let Some(key) = entry.key
                && self.map.get(&key) == Some(&slot)
            {
                self.map.remove(&key);
            }
        }
        *entry = Slot {
            version: entry.version,
            ..Slot::default()
        };
        self.used -= 1;
        self.free.push(slot);
    }

    /// Evicts the least recently used held, unpinned blocks until at most `target`
    /// slots are in use (fewer evictions if pinned blocks fill the rest).
    fn reclaim(&mut self, target: u32) -> u64 {
        let excess = self.used.saturating_sub(target) as usize;
        if excess == 0 {
            return 0;
        }
        let mut candidates: Vec<(u64, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.use_ == Use::Held && s.key.is_some_and(|k| !self.pinned.contains(&k))
            })
            .map(|(n, s)| (s.last_use, n as u32))
            .collect();
        let excess = excess.min(candidates.len());
        if excess < candidates.len() {
            candidates.select_nth_unstable(excess);
        }
        for &(_, slot) in &candidates[..excess] {
            self.release(slot);
        }
        excess as u64
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn assign(&mut self, slot: u32, key: BlockKey, len: u32, crc: u32) -> u64 {
        self.next_version += 1;
        let last_use = self.touch();
        self.slots[slot as usize] = Slot {
            key: Some(key),
            len,
            crc,
            version: self.next_version,
            use_: Use::Writing,
            last_use,
        };
        self.used += 1;
        self.next_version
    }
}

#[async_trait]
impl CacheTier for DiskTier {
    fn name(&self) -> &str {
        "disk"
    }

    async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>> {
        let inner = &self.inner;
        let (slot, len, crc, version) = {
            let mut state = inner.lock();
            let Some(&slot) = state.map.get(key) else {
                return Ok(None);
            };
            let tick = state.touch();
            let entry = &mut state.slots[slot as usize];
            entry.last_use = tick;
            (slot, entry.len, entry.crc, entry.version)
        };
        let reader = inner.clone();
        let bytes = run_blocking("disk cache read", move || {
            let mut buffer = vec![0u8; len as usize];
            reader
                .data
                .read_exact_at(&mut buffer, reader.slot_offset(slot))
                .map_err(|e| {
                    io(
                        e,
                        format!("cannot read {}", reader.dir.join("blocks.dat").display()),
                    )
                })?;
            Ok(buffer)
        })
        .await?;
        let intact = crc32fast::hash(&bytes) == crc;
        {
            let mut state = inner.lock();
            let entry = state.slots[slot as usize];
            if entry.version != version || entry.use_ != Use::Held {
                // Reused while we read: whatever we read is not this block for sure.
                return Ok(None);
            }
            if intact {
                return Ok(Some(Bytes::from(bytes)));
            }
            state.release(slot);
        }
        {
            inner.checksum_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(dir = %inner.dir.display(), slot, block = key.block,
                "disk cache block failed its checksum (a torn write or damaged disk): dropped, read again from the backend");
            let clearer = inner.clone();
            let _ = run_blocking("disk cache clear", move || {
                clearer
                    .clear_record(slot)
                    .map_err(|e| io(e, "cannot clear a disk cache record".into()))
            })
            .await;
            Ok(None)
        }
    }

    async fn put(&self, key: BlockKey, block: Bytes) -> Result<()> {
        let inner = &self.inner;
        if block.len() as u64 > inner.slot_size {
            return Ok(());
        }
        let (len, crc) = (block.len() as u32, crc32fast::hash(&block));
        let (slot, version) = {
            let mut state = inner.lock();
            if state.used >= inner.high {
                let evicted = state.reclaim(inner.low);
                inner.evictions.fetch_add(evicted, Ordering::Relaxed);
            }
            let Some(slot) = state.free.pop() else {
                // Every slot is being written: skip this block.
                return Ok(());
            };
            (slot, state.assign(slot, key, len, crc))
        };
        let writer = inner.clone();
        let written = run_blocking("disk cache write", move || {
            let record = Record { key, len, crc }.encode();
            writer
                .data
                .write_all_at(&block, writer.slot_offset(slot))
                .and_then(|()| {
                    writer
                        .index
                        .write_all_at(&record, Inner::record_offset(slot))
                })
                .map_err(|e| {
                    io(
                        e,
                        format!("cannot write the disk cache in {}", writer.dir.display()),
                    )
                })
        })
        .await;
        let mut state = inner.lock();
        if state.slots[slot as usize].version != version {
            // Removed or invalidated while it was written.
            return written;
        }
        if let Err(err) = written {
            state.release(slot);
            return Err(err);
        }
        if let Some(old) = state.map.insert(key, slot) {
            // Another put of the same block finished first: keep one copy.
            if old != slot {
                state.slots[old as usize].key = None;
                state.release(old);
            }
        }
        let entry = &mut state.slots[slot as usize];
        entry.use_ = Use::Held;
        state.bytes += u64::from(len);
        Ok(())
    }

    async fn remove(&self, key: &BlockKey) -> Result<()> {
        let slot = {
            let mut state = self.inner.lock();
            let Some(slot) = state.map.get(key).copied() else {
                return Ok(());
            };
            state.release(slot);
            slot
        };
        let inner = self.inner.clone();
        run_blocking("disk cache remove", move || {
            inner
                .clear_record(slot)
                .map_err(|e| io(e, "cannot clear a disk cache record".into()))
        })
        .await
    }

    async fn invalidate(&self, image: u128, generation: u128) -> Result<u64> {
        let doomed: Vec<u32> = {
            let mut state = self.inner.lock();
            let doomed: Vec<u32> = state
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.use_ != Use::Free
                        && s.key
                            .is_some_and(|k| k.image == image && k.generation == generation)
                })
                .map(|(n, _)| n as u32)
                .collect();
            for &slot in &doomed {
                state.slots[slot as usize].version += 1;
                state.release(slot);
            }
            doomed
        };
        let inner = self.inner.clone();
        let count = doomed.len() as u64;
        run_blocking("disk cache invalidate", move || {
            for slot in doomed {
                inner
                    .clear_record(slot)
                    .map_err(|e| io(e, "cannot clear a disk cache record".into()))?;
            }
            Ok(())
        })
        .await?;
        Ok(count)
    }

    fn stats(&self) -> TierStats {
        let state = self.inner.lock();
        TierStats {
            entries: state.map.len() as u64,
            bytes: state.bytes,
            capacity: u64::from(self.inner.slots) * self.inner.slot_size,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
        }
    }
}
