//! Boot profiles, recorded and streamed.
//!
//! A booting machine reads the same few percent of its disk in every boot, one request at
//! a time, so every backend round trip lands on its boot time. [`ProfileLayer`] sits above
//! the cache tiers and does two things for each client that attaches to a vdisk through
//! a session:
//!
//! - **records** the blocks the client reads for the first time, in order, until its
//!   boot is done (a quiet period without new blocks, a time window, the end of the
//!   attachment, or a size cap), and merges that list into the vdisk's
//!   [`osstream_core::BootProfile`] in the catalog ([`osstream_core::ProfileStore`]);
//! - **prefetches**: when the vdisk's profile was recorded from the same image generation,
//!   it reads the profile's boot set through the cache below, ahead of the client, in
//!   large coalesced reads with a few in flight. Those reads are marked
//!   [`osstream_core::ReadOpts::prefetch`], so the cache layer gates them and lets demand
//!   reads overtake them.
//!
//! Only read-only bases are profiled (standard vdisks, whose writes go to the client's
//! overlay above this layer): a private vdisk changes with its client's writes.

mod config;
mod layer;
mod prefetch;
mod recording;

pub use config::ProfileConfig;
pub use layer::{ProfileLayer, ProfileStats};
pub use prefetch::coalesce;
