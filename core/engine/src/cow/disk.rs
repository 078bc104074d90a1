//! [`DiskOverlay`]: an overlay's blocks in a sparse file on the server's disk, with a map
//! file saying which blocks the client wrote and which it zeroed.
//!
//! `overlay.data` holds block `n` at offset `n * block_size`; zeroed blocks are punched
//! out of it, so trimming a disk keeps the file small. `overlay.map` is rewritten whole
//! and atomically (temporary file, `fsync`, `rename`) on `flush`, after the data is synced:
//! a crash between the two leaves the old map, which never names a block whose data is
//! not on disk. Map layout (little-endian u64 words): [`MAP_MAGIC`], block size, image
//! size, the number of bitmap words, the bitmap of written blocks, the number of zeroed
//! ranges, then each range as start and end block. Maps written before zero markers
//! existed (no magic: block size, image size, bitmap) are still read.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::ranges::BlockRanges;
use super::store::{OverlayStore, Slot, SlotKind};
use crate::blocking::run_blocking;
use crate::error::{Error, ErrorKind, Result};

/// First word of a map file with zero markers ("OSOVMAP" and format 2).
const MAP_MAGIC: u64 = u64::from_le_bytes(*b"OSOVMAP\x02");

/// Blocks in a sparse file on the server's disk, with a map of written and zeroed blocks.
pub struct DiskOverlay {
    data: Arc<File>,
    map_path: PathBuf,
    block_size: u64,
    image_size: u64,
    map: Mutex<BlockMap>,
    /// Held across a whole flush: a second FLUSH must not return while the first one is
    /// still making earlier writes durable, nor race it on the map file.
    flushing: tokio::sync::Mutex<()>,
}

/// Which blocks the overlay holds (`present`) or reads as zeroes (`zeroes`); never both.
#[derive(Debug, Default)]
struct BlockMap {
    present: Vec<u64>,
    zeroes: BlockRanges,
    dirty: bool,
}

impl BlockMap {
    fn is_present(&self, block: u64) -> bool {
        self.present
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn set_present(&mut self, block: u64) {
        let word = (block / 64) as usize;
        if word >= self.present.len() {
            self.present.resize(word + 1, 0);
        }
        self.present[word] |= 1 << (block % 64);
        self.zeroes.remove(block);
        self.dirty = true;
    }

    fn set_zero(&mut self, blocks: Range<u64>) {
        // Whole words at once in the middle, bit by bit at the edges.
        let mut block = blocks.start;
        while block < blocks.end {
            let word = (block / 64) as usize;
            if word >= self.present.len() {
                break;
            }
            if block.is_multiple_of(64) && block + 64 <= blocks.end {
                self.present[word] = 0;
                block += 64;
            } else {
                self.present[word] &= !(1 << (block % 64));
                block += 1;
            }
        }
        self.zeroes.insert(blocks);
        self.dirty = true;
    }

    fn encode(&self, block_size: u64, image_size: u64) -> Vec<u8> {
        let words = [MAP_MAGIC, block_size, image_size, self.present.len() as u64]
            .into_iter()
            .chain(self.present.iter().copied())
            .chain(std::iter::once(self.zeroes.len() as u64))
            .chain(self.zeroes.iter().flat_map(|r| [r.start, r.end]));
        words.flat_map(u64::to_le_bytes).collect()
    }

    /// Reads a map file's bytes; `Err` names what does not fit `block_size`/`image_size`.
    fn decode(bytes: &[u8], block_size: u64, image_size: u64) -> std::result::Result<Self, String> {
        let mut words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
        let first = words.next().ok_or("the map is empty")?;
        let v2 = first == MAP_MAGIC;
        let stored_block = if v2 { words.next() } else { Some(first) };
        let stored_size = words.next();
        if stored_block != Some(block_size) || stored_size != Some(image_size) {
            return Err(format!(
                "made for {stored_block:?}-byte blocks of a {stored_size:?}-byte image, not \
                 {block_size} of {image_size}"
            ));
        }
        let bitmap_words = image_size.div_ceil(block_size).div_ceil(64) as usize;
        let mut map = BlockMap::default();
        if !v2 {
            map.present = words.take(bitmap_words).collect();
            return Ok(map);
        }
        let count = words.next().ok_or("the map is cut short")? as usize;
        if count > bitmap_words {
            return Err(format!(
                "the map holds {count} bitmap words, more than {bitmap_words}"
            ));
        }
        map.present = words.by_ref().take(count).collect();
        let ranges = words.next().ok_or("the map is cut short")?;
        for _ in 0..ranges {
            let (Some(start), Some(end)) = (words.next(), words.next()) else {
                return Err("the map is cut short".into());
            };
            map.zeroes.insert(start..end);
        }
        if map.present.len() != count {
            return Err("the map is cut short".into());
        }
        Ok(map)
    }
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
        let io = |e, what: &str| Error::from_io(e, format!("overlay {}: {what}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(e, "create"))?;
        let data_path = dir.join("overlay.data");
        let map_path = dir.join("overlay.map");
        if !keep {
            let _ = std::fs::remove_file(&data_path);
            let _ = std::fs::remove_file(&map_path);
        }
        let map = match std::fs::read(&map_path) {
            Ok(bytes) => BlockMap::decode(&bytes, block_size, image_size).map_err(|why| {
                Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "overlay {} was {why}; the base changed under a persistent overlay \
                         (remove the folder to start over)",
                        dir.display()
                    ),
                )
            })?,
            Err(_) => BlockMap::default(),
        };
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
            map: Mutex::new(map),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BlockMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Punches `offset..offset+len` out of `file`; a filesystem that cannot punch holes just
/// keeps the (now unused) bytes.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor stays open for
    // the whole call because `file` is borrowed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

#[async_trait]
impl OverlayStore for DiskOverlay {
    async fn get(&self, block: u64) -> Result<Slot> {
        match self.kind(block) {
            SlotKind::Base => return Ok(Slot::Base),
            SlotKind::Zero => return Ok(Slot::Zero),
            SlotKind::Data => {}
        }
        let (file, offset, len) = (
            self.data.clone(),
            block * self.block_size,
            self.block_size as usize,
        );
        run_blocking("read the write overlay", move || {
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
            Ok(Slot::Data(Bytes::from(buf)))
        })
        .await
    }

    fn kind(&self, block: u64) -> SlotKind {
        let map = self.map();
        if map.is_present(block) {
            SlotKind::Data
        } else if map.zeroes.contains(block) {
            SlotKind::Zero
        } else {
            SlotKind::Base
        }
    }

    async fn put(&self, block: u64, data: Bytes) -> Result<()> {
        let (file, offset) = (self.data.clone(), block * self.block_size);
        run_blocking("write the write overlay", move || {
            file.write_all_at(&data, offset)
                .map_err(|e| Error::from_io(e, "write the write overlay"))
        })
        .await?;
        self.map().set_present(block);
        Ok(())
    }

    async fn zero(&self, blocks: Range<u64>) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        // The marker first: from now on the blocks read as zeroes, whatever the file holds.
        self.map().set_zero(blocks.clone());
        let (file, offset, len) = (
            self.data.clone(),
            blocks.start * self.block_size,
            (blocks.end - blocks.start) * self.block_size,
        );
        run_blocking("trim the write overlay", move || {
            punch_hole(&file, offset, len)
                .map_err(|e| Error::from_io(e, "punch a hole in the write overlay"))
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        let _flushing = self.flushing.lock().await;
        let map = {
            let mut map = self.map();
            if !map.dirty {
                return Ok(());
            }
            map.dirty = false;
            map.encode(self.block_size, self.image_size)
        };
        let (file, map_path) = (self.data.clone(), self.map_path.clone());
        let outcome = run_blocking("flush the write overlay", move || {
            // Data first, then the map that points at it.
            let sync = || -> std::io::Result<()> {
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
            };
            sync().map_err(|e| Error::from_io(e, "flush the write overlay"))
        })
        .await;
        if outcome.is_err() {
            self.map().dirty = true;
        }
        outcome
    }

    fn durable(&self) -> bool {
        true
    }

    fn usage(&self) -> (u64, u64) {
        let blocks: u64 = self
            .map()
            .present
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        (0, blocks * self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_old_maps_still_read() {
        let mut map = BlockMap::default();
        map.set_present(3);
        map.set_present(130);
        map.set_zero(10..100);
        map.set_present(20);
        let bytes = map.encode(4096, 64 << 20);
        let back = BlockMap::decode(&bytes, 4096, 64 << 20).unwrap();
        assert!(back.is_present(3) && back.is_present(130) && back.is_present(20));
        assert!(!back.is_present(10) && back.zeroes.contains(10) && !back.zeroes.contains(20));
        assert!(back.zeroes.contains(99) && !back.zeroes.contains(100));
        assert!(BlockMap::decode(&bytes, 512, 64 << 20).is_err());
        assert!(BlockMap::decode(&bytes[..bytes.len() - 8], 4096, 64 << 20).is_err());
        // Version 1: block size, image size, bitmap.
        let old: Vec<u8> = [4096u64, 64 << 20, 0b1010]
            .into_iter()
            .flat_map(u64::to_le_bytes)
            .collect();
        let back = BlockMap::decode(&old, 4096, 64 << 20).unwrap();
        assert!(back.is_present(1) && back.is_present(3) && !back.is_present(2));
    }

    #[test]
    fn zeroing_clears_written_blocks_in_whole_words_and_at_the_edges() {
        let mut map = BlockMap::default();
        for block in 0..300 {
            map.set_present(block);
        }
        map.set_zero(5..260);
        for block in 0..300 {
            assert_eq!(map.is_present(block), !(5..260).contains(&block), "{block}");
        }
    }
}
