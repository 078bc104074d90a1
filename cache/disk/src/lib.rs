//! The server-disk cache tier (`[cache.disk]`): blocks kept in a file on the server's
//! disk, bounded, surviving restarts.
//!
//! # Layout
//! `DIR/blocks.dat` holds `slots` fixed-size slots of `block_size` bytes; `DIR/index.dat`
//! one 64-byte record per slot naming the block in it (image, generation, block number),
//! its length and a CRC-32 of its bytes, the record sealed by its own CRC; `DIR/meta.json`
//! the geometry both were made with (a changed `block_size` or `capacity` starts the
//! cache afresh).
//!
//! # Crash safety without fsync
//! A put writes the block's bytes into a free slot, then its record. Every read checks
//! the bytes against the record's checksum, so a torn write, a record that reached the
//! disk before its data (or the other way round) or any other corruption is a miss,
//! never wrong data, and frees the slot. A record with a bad seal is ignored at start.
//! Removed and invalidated blocks get an empty record, so they do not come back after a
//! restart.
//!
//! # Space
//! When a put finds more than `high_watermark` of the slots in use, it reclaims down to
//! `low_watermark` at once, least recently used first (a use is a put or a hit; the
//! order starts afresh at a restart), so reclaim runs in bursts, not on every put.
//! Pinned blocks (the client agent's boot set) are never reclaimed. Eviction only changes the
//! in-memory map: an evicted block's record stays valid until its slot is reused, and is
//! simply found again after a restart.
//!
//! All file I/O runs on the blocking pool; the map is one mutex, held for in-memory
//! changes only.

mod config;
mod index;
mod tier;

pub use config::DiskTierConfig;
pub use tier::DiskTier;
