//! [`CowLayer`]: a client's private, block-granular copy-on-write overlay over a shared,
//! never-written base.
//!
//! Reads of blocks the client has written come from its overlay, all others from the base
//! (through the shared caches). A write covering part of a block first copies that block
//! from the base (read-modify-write, under a per-block lock so concurrent writes to one
//! block never lose each other). Trim and zeroing store zero blocks, so the base shows
//! through nowhere the client changed.
//!
//! Where overlay blocks live is an [`OverlayStore`]: [`RamOverlay`] (bounded: when full,
//! writes fail with `NoSpace`, never hang), [`DiskOverlay`] (a sparse file plus a block
//! map, made durable by `flush`), and [`SpillOverlay`] (RAM first, least recently written
//! blocks spill to a disk overlay).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::chunks::Chunks;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::Layer;
use crate::source::{
    BlockSource, Capability, DynSource, Extent, Geometry, ReadOpts, SourceInfo, WriteOpts,
    ZeroOpts, check_range,
};

/// Storage for the blocks of one overlay.
///
/// # Contract
/// - `get` returns the last block `put` under that index (always `block_size` long,
///   except the image's last block), or `None`.
/// - `put` fails with `NoSpace` when the store is full, and then stores nothing.
/// - After `flush` returns, every block `put` before it survives a crash of the server
///   (stores that live in RAM say so in [`OverlayStore::durable`]).
#[async_trait]
pub trait OverlayStore: Send + Sync + fmt::Debug {
    /// The block, if the client wrote it.
    async fn get(&self, block: u64) -> Result<Option<Bytes>>;
    /// Stores one whole block.
    async fn put(&self, block: u64, data: Bytes) -> Result<()>;
    /// Makes every earlier `put` durable.
    async fn flush(&self) -> Result<()>;
    /// Whether `flush` survives a crash of the server.
    fn durable(&self) -> bool;
    /// Bytes held in RAM and on disk.
    fn usage(&self) -> (u64, u64);
}

/// Blocks in RAM, at most `capacity` bytes.
#[derive(Debug)]
pub struct RamOverlay {
    blocks: Mutex<HashMap<u64, Bytes>>,
    bytes: Mutex<u64>,
    capacity: u64,
}

impl RamOverlay {
    /// An empty overlay that holds at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        RamOverlay {
            blocks: Mutex::new(HashMap::new()),
            bytes: Mutex::new(0),
            capacity,
        }
    }

    /// The block's current buffer, if held.
    fn peek(&self, block: u64) -> Option<Bytes> {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&block)
            .cloned()
    }

    /// Drops the block only if it still holds exactly `expected` (not rewritten since).
    fn remove_if_same(&self, block: u64, expected: &Bytes) -> bool {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let same = blocks
            .get(&block)
            .is_some_and(|b| b.as_ptr() == expected.as_ptr() && b.len() == expected.len());
        if same {
            blocks.remove(&block);
            *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) -= expected.len() as u64;
        }
        same
    }

    /// Stores a block; returns whether it was not held before.
    fn insert(&self, block: u64, data: Bytes) -> Result<bool> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let old = blocks.get(&block).map(|b| b.len() as u64);
        let new_total = *bytes - old.unwrap_or(0) + data.len() as u64;
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
        *bytes = new_total;
        blocks.insert(block, data);
        Ok(old.is_none())
    }
}

#[async_trait]
impl OverlayStore for RamOverlay {
    async fn get(&self, block: u64) -> Result<Option<Bytes>> {
        Ok(self
            .blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&block)
            .cloned())
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        self.insert(block, data).map(drop)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn durable(&self) -> bool {
        false
    }

    fn usage(&self) -> (u64, u64) {
        (*self.bytes.lock().unwrap_or_else(|p| p.into_inner()), 0)
    }
}

/// Blocks in a sparse file on the server's disk (block `n` at offset `n * block_size`),
/// with a map file of which blocks are present, rewritten atomically on `flush`.
pub struct DiskOverlay {
    data: Arc<File>,
    map_path: PathBuf,
    block_size: u64,
    image_size: u64,
    present: Mutex<Vec<u64>>,
    dirty: Mutex<bool>,
    /// Held across a whole flush: a second FLUSH must not return while the first one is
    /// still making earlier writes durable, nor race it on the map file.
    flushing: tokio::sync::Mutex<()>,
}

impl fmt::Debug for DiskOverlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskOverlay")
            .field("map", &self.map_path)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl DiskOverlay {
    /// Opens the overlay in `dir` (created if missing) for an image of `image_size`
    /// bytes. With `keep` false, an existing overlay there is discarded first (a new
    /// session of a `server-disk` vdisk). A kept overlay made for another block size or
    /// image size is refused: laying it over a changed base would corrupt the client's view.
    pub fn open(dir: &Path, block_size: u64, image_size: u64, keep: bool) -> Result<Self> {
        let blocks = image_size.div_ceil(block_size);
        let io = |e, what: &str| Error::from_io(e, format!("overlay {}: {what}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(e, "create"))?;
        let data_path = dir.join("overlay.data");
        let map_path = dir.join("overlay.map");
        if !keep {
            let _ = std::fs::remove_file(&data_path);
            let _ = std::fs::remove_file(&map_path);
        }
        let words = blocks.div_ceil(64) as usize;
        let mut present = vec![0u64; words];
        if let Ok(bytes) = std::fs::read(&map_path) {
            // Layout: block size, image size (u64 LE each), then the bitmap words (u64 LE).
            let header = |i: usize| {
                bytes
                    .get(i * 8..i * 8 + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            };
            let (stored_block, stored_size) = (header(0), header(1));
            if stored_block != Some(block_size) || stored_size != Some(image_size) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "overlay {} was made for {:?}-byte blocks of a {:?}-byte image, not {block_size} of {image_size}; \
                         the base changed under a persistent overlay (remove the folder to start over)",
                        dir.display(),
                        stored_block,
                        stored_size
                    ),
                ));
            }
            for (i, word) in bytes[16..].chunks_exact(8).take(words).enumerate() {
                present[i] = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            }
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| io(e, "open"))?;
        Ok(DiskOverlay {
            data: Arc::new(data),
            map_path,
            block_size,
            image_size,
            present: Mutex::new(present),
            dirty: Mutex::new(false),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    fn is_present(&self, block: u64) -> bool {
        let present = self.present.lock().unwrap_or_else(|p| p.into_inner());
        present
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
}

#[async_trait]
impl OverlayStore for DiskOverlay {
    async fn get(&self, block: u64) -> Result<Option<Bytes>> {
        if !self.is_present(block) {
            return Ok(None);
        }
        let (file, offset, len) = (
            self.data.clone(),
            block * self.block_size,
            self.block_size as usize,
        );
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            // The last block of an image may be short; reading past the file end is fine.
            let mut filled = 0;
            while filled < len {
                match file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::from_io(e, "read the write overlay")),
                }
            }
            Ok(Some(Bytes::from(buf)))
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unexpected,
                format!("overlay read task failed: {e}"),
            )
        })?
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        let (file, offset) = (self.data.clone(), block * self.block_size);
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, offset)
                .map_err(|e| Error::from_io(e, "write the write overlay"))
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unexpected,
                format!("overlay write task failed: {e}"),
            )
        })??;
        let mut present = self.present.lock().unwrap_or_else(|p| p.into_inner());
        let word = (block / 64) as usize;
        if word >= present.len() {
            present.resize(word + 1, 0);
        }
        present[word] |= 1 << (block % 64);
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let _flushing = self.flushing.lock().await;
        {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            if !*dirty {
                return Ok(());
            }
            *dirty = false;
        }
        let mut map = Vec::new();
        map.extend_from_slice(&self.block_size.to_le_bytes());
        map.extend_from_slice(&self.image_size.to_le_bytes());
        for word in self
            .present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            map.extend_from_slice(&word.to_le_bytes());
        }
        let (file, map_path) = (self.data.clone(), self.map_path.clone());
        let outcome = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Data first, then the map that points at it: a crash between the two leaves
            // the old map, which never names a block whose data is not on disk.
            file.sync_data()?;
            let partial = map_path.with_extension("map.partial");
            let mut out = File::create(&partial)?;
            out.write_all(&map)?;
            out.sync_all()?;
            std::fs::rename(&partial, &map_path)?;
            if let Some(dir) = map_path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unexpected,
                format!("overlay flush task failed: {e}"),
            )
        })?;
        if let Err(e) = outcome {
            *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
            return Err(Error::from_io(e, "flush the write overlay"));
        }
        Ok(())
    }

    fn durable(&self) -> bool {
        true
    }

    fn usage(&self) -> (u64, u64) {
        let blocks: u64 = self
            .present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        (0, blocks * self.block_size)
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
}

#[async_trait]
impl OverlayStore for SpillOverlay {
    async fn get(&self, block: u64) -> Result<Option<Bytes>> {
        match self.ram.get(block).await? {
            Some(data) => Ok(Some(data)),
            None => self.disk.get(block).await,
        }
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        loop {
            match self.ram.insert(block, data.clone()) {
                Ok(new) => {
                    if new {
                        self.order
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back(block);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    let victim = self
                        .order
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
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
                        self.order
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_front(victim);
                        return Err(err);
                    }
                    if !self.ram.remove_if_same(victim, &old) {
                        // Rewritten meanwhile: the newer RAM copy stays and wins.
                        self.order
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back(victim);
                    }
                }
                Err(e) => return Err(e),
            }
        }
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

/// The overlay of one session, shared by every connection of that session.
pub struct CowLayer {
    state: Arc<CowState>,
}

struct CowState {
    store: Box<dyn OverlayStore>,
    block_size: u64,
    /// Striped locks serialising read-modify-write of a block.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for CowLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowLayer")
            .field("store", &self.state.store)
            .field("block_size", &self.state.block_size)
            .finish()
    }
}

impl CowLayer {
    /// An overlay of `block_size`-byte blocks kept in `store`.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn new(store: Box<dyn OverlayStore>, block_size: u64) -> Self {
        assert!(block_size > 0, "overlay block size must be positive");
        CowLayer {
            state: Arc::new(CowState {
                store,
                block_size,
                stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            }),
        }
    }

    /// Bytes the overlay holds in RAM and on disk.
    pub fn usage(&self) -> (u64, u64) {
        self.state.store.usage()
    }
}

impl Layer for CowLayer {
    fn name(&self) -> &str {
        "cow"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        let mut info = inner.info().clone();
        // The client's view changes with its writes, not with the base alone.
        info.generation = format!("{}+cow", info.generation);
        Arc::new(CowSource {
            inner,
            info,
            state: self.state.clone(),
        })
    }
}

struct CowSource {
    inner: DynSource,
    info: SourceInfo,
    state: Arc<CowState>,
}

impl fmt::Debug for CowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowSource")
            .field("inner", &self.inner)
            .finish()
    }
}

impl CowSource {
    fn span(&self, block: u64) -> (u64, usize) {
        let start = block * self.state.block_size;
        (
            start,
            ((start + self.state.block_size).min(self.info.size) - start) as usize,
        )
    }

    /// The whole current content of `block`: overlay, else base.
    async fn current(&self, block: u64) -> Result<Bytes> {
        if let Some(data) = self.state.store.get(block).await? {
            return Ok(data);
        }
        let (start, len) = self.span(block);
        Ok(self
            .inner
            .read_at(start, len, ReadOpts::default())
            .await?
            .into_bytes())
    }

    /// Applies `fill(block_start, buf)` to each block of `offset..offset+len`.
    async fn modify(&self, offset: u64, len: u64, fill: impl Fn(u64, &mut [u8])) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.state.block_size;
        let end = offset + len;
        for block in offset / bs..=(end - 1) / bs {
            let (start, block_len) = self.span(block);
            let from = offset.max(start);
            let to = end.min(start + block_len as u64);
            let _guard = self.state.stripes[(block % 64) as usize].lock().await;
            let mut buf = if from == start && to == start + block_len as u64 {
                BytesMut::zeroed(block_len)
            } else {
                BytesMut::from(&self.current(block).await?[..])
            };
            fill(
                from,
                &mut buf[(from - start) as usize..(to - start) as usize],
            );
            self.state.store.put(block, buf.freeze()).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockSource for CowSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        Capability {
            write: true,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            extents: false,
            // One session may use several connections: they share this overlay.
            multi_conn: true,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        let bs = self.state.block_size;
        let end = offset + len as u64;
        let mut parts = Vec::new();
        let mut base_run: Option<(u64, u64)> = None;
        for block in offset / bs..=(end - 1) / bs {
            let (start, block_len) = self.span(block);
            let from = offset.max(start);
            let to = end.min(start + block_len as u64);
            match self.state.store.get(block).await? {
                Some(data) => {
                    if let Some((run_from, run_to)) = base_run.take() {
                        parts.extend(
                            self.inner
                                .read_at(run_from, (run_to - run_from) as usize, opts)
                                .await?
                                .parts()
                                .iter()
                                .cloned(),
                        );
                    }
                    parts.push(data.slice((from - start) as usize..(to - start) as usize));
                }
                // Runs of base blocks are read with one call, through the shared caches.
                None => base_run = Some((base_run.map_or(from, |(f, _)| f), to)),
            }
        }
        if let Some((run_from, run_to)) = base_run {
            parts.extend(
                self.inner
                    .read_at(run_from, (run_to - run_from) as usize, opts)
                    .await?
                    .parts()
                    .iter()
                    .cloned(),
            );
        }
        Ok(Chunks::from_parts(parts))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        self.modify(offset, data.len() as u64, |at, buf| {
            let from = (at - offset) as usize;
            buf.copy_from_slice(&data[from..from + buf.len()]);
        })
        .await?;
        if opts.fua {
            self.state.store.flush().await
        } else {
            Ok(())
        }
    }

    async fn flush(&self) -> Result<()> {
        self.state.store.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        // Trimmed ranges may read back anything; zeroes keep the base from showing through.
        check_range(&self.info, "trim", offset, len)?;
        self.modify(offset, len, |_, buf| buf.fill(0)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        check_range(&self.info, "write_zeroes", offset, len)?;
        self.modify(offset, len, |_, buf| buf.fill(0)).await?;
        if opts.fua {
            self.state.store.flush().await
        } else {
            Ok(())
        }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        crate::source::all_data(&self.info, offset, len)
    }
}
