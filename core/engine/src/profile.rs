//! Boot profiles: which blocks of a vdisk a booting client reads first, and in what order.
//!
//! A recorder (the `osstream-profile` crate's layer) notes, for one attachment, the blocks
//! the client touches for the first time until its boot is done, and hands the list to a
//! [`ProfileStore`] (the catalog), which merges it into the vdisk's [`BootProfile`] with
//! [`BootProfile::merge_boot`]. Later attachments of the same image generation stream
//! [`BootProfile::boot_set`] ahead of demand. The merge is pure and lives here, so every
//! store merges the same way.

use std::collections::HashMap;
use std::fmt::Debug;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// How much one boot weighs at most in a merged profile: the last ~16 boots decide what
/// is in it, so a profile follows an image whose boot changes (a service added) without
/// forgetting a block after one boot that skipped it.
const MIN_BOOT_WEIGHT: f64 = 1.0 / 16.0;

/// A block whose share of boots falls below this is dropped from the profile.
const FORGET_SHARE: f64 = 0.05;

/// A block is in the boot set when at least this share of (recent) boots read it.
const BOOT_SET_SHARE: f64 = 0.5;

/// The format version written into profiles, so an import of a future format is refused.
pub const PROFILE_FORMAT: u32 = 1;

/// The merged boot profile of one vdisk at one image generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootProfile {
    /// Format version ([`PROFILE_FORMAT`]).
    pub format: u32,
    /// The vdisk.
    pub vdisk: String,
    /// Where the image's bytes live ([`crate::SourceInfo::identity`]).
    pub image: String,
    /// The image generation the blocks were read from; a profile of another generation
    /// is never used.
    pub generation: String,
    /// Profile block size in bytes: block `n` is bytes `n * block_size ..`.
    pub block_size: u64,
    /// Boots merged into this profile.
    pub boots: u32,
    /// Blocks in the order a typical boot first reads them.
    pub blocks: Vec<ProfileBlock>,
}

/// One block of a [`BootProfile`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProfileBlock {
    /// Block number.
    pub block: u64,
    /// Share of recent boots that read it, from 0 to 1.
    pub share: f64,
    /// Where in those boots it was first read, from 0 (first) to 1 (last), averaged.
    pub position: f64,
}

impl BootProfile {
    /// An empty profile: no boot merged yet.
    pub fn new(vdisk: &str, image: &str, generation: &str, block_size: u64) -> Self {
        BootProfile {
            format: PROFILE_FORMAT,
            vdisk: vdisk.to_owned(),
            image: image.to_owned(),
            generation: generation.to_owned(),
            block_size,
            boots: 0,
            blocks: Vec::new(),
        }
    }

    /// Whether this profile was recorded from `image` at `generation` (and so may be used).
    pub fn matches(&self, image: &str, generation: &str) -> bool {
        self.image == image && self.generation == generation
    }

    /// Merges one boot: `touched` are the blocks it read, each once, in the order it first
    /// read them. Each block's share moves towards 1 if touched and towards 0 if not; its
    /// position towards where this boot read it. Blocks read by almost no recent boot
    /// are dropped.
    pub fn merge_boot(&mut self, touched: &[u64]) {
        self.boots = self.boots.saturating_add(1);
        let weight = (1.0 / f64::from(self.boots)).max(MIN_BOOT_WEIGHT);
        let count = touched.len().max(1) as f64;
        let mut this_boot: HashMap<u64, f64> = HashMap::with_capacity(touched.len());
        for (rank, &block) in touched.iter().enumerate() {
            this_boot.entry(block).or_insert(rank as f64 / count);
        }
        for entry in &mut self.blocks {
            let kept = entry.share * (1.0 - weight);
            match this_boot.remove(&entry.block) {
                Some(position) => {
                    entry.share = kept + weight;
                    entry.position = (entry.position * kept + position * weight) / entry.share;
                }
                None => entry.share = kept,
            }
        }
        self.blocks.retain(|b| b.share >= FORGET_SHARE);
        self.blocks
            .extend(this_boot.into_iter().map(|(block, position)| ProfileBlock {
                block,
                share: weight,
                position,
            }));
        self.blocks.sort_by(|a, b| {
            a.position
                .total_cmp(&b.position)
                .then(a.block.cmp(&b.block))
        });
    }

    /// The blocks a boot will most likely read, in the order it will read them: those
    /// read by at least half of the recent boots.
    pub fn boot_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks
            .iter()
            .filter(|b| b.share >= BOOT_SET_SHARE)
            .map(|b| b.block)
    }

    /// Bytes of the boot set.
    pub fn boot_set_bytes(&self) -> u64 {
        (self.boot_set().count() as u64).saturating_mul(self.block_size)
    }

    /// The profile as JSON (what `osstream profile export` writes and the catalog keeps).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a profile always serialises")
    }

    /// Reads a profile written by [`BootProfile::to_json`], checking it makes sense.
    pub fn from_json(text: &str) -> Result<Self> {
        let profile: BootProfile = serde_json::from_str(text)
            .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("not a boot profile: {e}")))?;
        if profile.format != PROFILE_FORMAT {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "boot profile format {} is not one this release reads ({PROFILE_FORMAT})",
                    profile.format
                ),
            ));
        }
        if !(512..=16 << 20).contains(&profile.block_size) || !profile.block_size.is_power_of_two()
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "boot profile block size {} is not a power of two from 512 bytes to 16 MiB",
                    profile.block_size
                ),
            ));
        }
        if profile.blocks.len() > 1 << 24 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "boot profile has {} blocks; at most 2^24",
                    profile.blocks.len()
                ),
            ));
        }
        let bad = |b: &ProfileBlock| {
            !(0.0..=1.0).contains(&b.share) || !(0.0..=1.0).contains(&b.position)
        };
        if let Some(block) = profile.blocks.iter().find(|b| bad(b)) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "boot profile block {} has a share or position outside 0..1",
                    block.block
                ),
            ));
        }
        Ok(profile)
    }
}

/// One recorded boot, on its way to the [`ProfileStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedBoot {
    /// The vdisk booted.
    pub vdisk: String,
    /// The image's identity.
    pub image: String,
    /// The image generation read.
    pub generation: String,
    /// Block size of `touched`.
    pub block_size: u64,
    /// Blocks first read, in order, each once.
    pub touched: Vec<u64>,
}

/// Where boot profiles are kept (the catalog).
///
/// # Contract
/// - `profile` returns the vdisk's stored profile, whatever its generation (callers check
///   [`BootProfile::matches`]); `None` when there is none.
/// - `record_boot` merges `boot` into the stored profile when that one is of the same
///   image, generation and block size, and otherwise replaces it with a profile of that
///   boot alone (a changed image starts over). Concurrent calls (several servers) each
///   get merged: none is lost. A vdisk that no longer exists is `NotFound`.
/// - `put_profile` stores `profile` as the vdisk's (an import), replacing any other.
/// - `clear_profile` removes it; returns whether there was one.
#[async_trait]
pub trait ProfileStore: Send + Sync + Debug {
    /// The stored profile of `vdisk`.
    async fn profile(&self, vdisk: &str) -> Result<Option<BootProfile>>;
    /// Merges one boot into its vdisk's profile; returns the profile as stored.
    async fn record_boot(&self, boot: &RecordedBoot) -> Result<BootProfile>;
    /// Stores `profile` as its vdisk's.
    async fn put_profile(&self, profile: &BootProfile) -> Result<()>;
    /// Removes `vdisk`'s profile.
    async fn clear_profile(&self, vdisk: &str) -> Result<bool>;
}

/// What [`ProfileStore::record_boot`] stores, given what is stored now: the one merge
/// every store runs.
pub fn merged(stored: Option<BootProfile>, boot: &RecordedBoot) -> BootProfile {
    let mut profile = match stored {
        Some(p) if p.matches(&boot.image, &boot.generation) && p.block_size == boot.block_size => p,
        _ => BootProfile::new(&boot.vdisk, &boot.image, &boot.generation, boot.block_size),
    };
    profile.merge_boot(&boot.touched);
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(touched: &[u64]) -> RecordedBoot {
        RecordedBoot {
            vdisk: "deb".into(),
            image: "file:/i/deb.img".into(),
            generation: "g1".into(),
            block_size: 65536,
            touched: touched.to_vec(),
        }
    }

    #[test]
    fn one_boot_is_its_own_profile_in_order() {
        let profile = merged(None, &boot(&[7, 3, 9, 4]));
        assert_eq!(profile.boots, 1);
        assert_eq!(profile.boot_set().collect::<Vec<_>>(), vec![7, 3, 9, 4]);
        assert_eq!(profile.boot_set_bytes(), 4 * 65536);
    }

    #[test]
    fn blocks_of_most_boots_stay_and_rare_ones_leave_the_boot_set() {
        let mut profile = merged(None, &boot(&[1, 2, 3, 50]));
        profile = merged(Some(profile), &boot(&[1, 2, 3]));
        profile = merged(Some(profile), &boot(&[1, 2, 3, 60]));
        let set: Vec<u64> = profile.boot_set().collect();
        assert_eq!(&set[..3], &[1, 2, 3], "{profile:?}");
        // 50 and 60 were each read by one boot of three.
        assert!(!set.contains(&50) && !set.contains(&60), "{set:?}");
        assert_eq!(profile.boots, 3);
    }

    #[test]
    fn the_order_is_the_typical_first_touch_order() {
        let mut profile = merged(None, &boot(&[10, 20, 30, 40]));
        profile = merged(Some(profile), &boot(&[20, 10, 30, 40]));
        profile = merged(Some(profile), &boot(&[20, 10, 30, 40]));
        assert_eq!(profile.boot_set().collect::<Vec<_>>(), vec![20, 10, 30, 40]);
    }

    #[test]
    fn a_new_generation_or_image_starts_over() {
        let profile = merged(None, &boot(&[1, 2]));
        let mut next = boot(&[5]);
        next.generation = "g2".into();
        let replaced = merged(Some(profile.clone()), &next);
        assert_eq!(replaced.boots, 1);
        assert_eq!(replaced.boot_set().collect::<Vec<_>>(), vec![5]);
        assert!(!replaced.matches("file:/i/deb.img", "g1"));
        let mut other = boot(&[6]);
        other.image = "s3:bucket/deb.img".into();
        assert_eq!(merged(Some(profile), &other).boots, 1);
    }

    #[test]
    fn old_boots_fade_so_a_changed_boot_is_followed() {
        let mut profile = None;
        for _ in 0..40 {
            profile = Some(merged(profile, &boot(&[1, 2])));
        }
        for _ in 0..12 {
            profile = Some(merged(profile, &boot(&[1, 3])));
        }
        let set: Vec<u64> = profile.unwrap().boot_set().collect();
        assert_eq!(set, vec![1, 3]);
    }

    #[test]
    fn json_round_trips_and_bad_profiles_are_refused() {
        let profile = merged(None, &boot(&[3, 1]));
        assert_eq!(BootProfile::from_json(&profile.to_json()).unwrap(), profile);
        let err = BootProfile::from_json("{}").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let mut future = profile.clone();
        future.format = 9;
        assert!(
            BootProfile::from_json(&future.to_json())
                .unwrap_err()
                .to_string()
                .contains("format 9")
        );
        let mut odd = profile;
        odd.block_size = 1000;
        assert!(BootProfile::from_json(&odd.to_json()).is_err());
    }
}
