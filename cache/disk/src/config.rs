use std::path::PathBuf;
use std::sync::Arc;

use osstream_core::{BackendContext, ByteSize, CacheLayer, Layer, Result, TierKind, config_error};
use serde::{Deserialize, Serialize};

use crate::tier::DiskTier;

/// `[cache.disk]`: blocks on the server's disk, kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskTierConfig {
    /// Cache on disk at all (while `[cache] tiers` lists `disk`). Default: true.
    pub enabled: bool,
    /// Where the cache files live; relative to `data_dir`. Default: `cache`.
    pub dir: PathBuf,
    /// Most bytes held (the data file's size). Default: `10GiB`.
    pub capacity: ByteSize,
    /// Block size: reads are filled from the tier below in aligned blocks of this size;
    /// one slot each. Default: `64KiB`.
    pub block_size: ByteSize,
    /// When more than this percentage of the slots is in use, a put reclaims... Default: 95.
    pub high_watermark: u8,
    /// ...down to this percentage. Default: 85.
    pub low_watermark: u8,
    /// Prefetch reads filled through this tier at once. Default: 8.
    pub prefetch_concurrency: usize,
}

impl Default for DiskTierConfig {
    fn default() -> Self {
        DiskTierConfig {
            enabled: true,
            dir: PathBuf::from("cache"),
            capacity: ByteSize::gib(10),
            block_size: ByteSize::kib(64),
            high_watermark: 95,
            low_watermark: 85,
            prefetch_concurrency: 8,
        }
    }
}

impl TierKind for DiskTierConfig {
    const KIND: &'static str = "disk";

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        let bad = |message: String| Err(config_error("cache.disk", &message));
        let block = self.block_size.bytes();
        if !(4096..=16 << 20).contains(&block) || !block.is_power_of_two() {
            return bad(format!(
                "block_size = {} must be a power of two from 4KiB to 16MiB",
                self.block_size
            ));
        }
        if self.capacity.bytes() / block < 16 {
            return bad(format!(
                "capacity = {} holds fewer than 16 blocks of {}",
                self.capacity, self.block_size
            ));
        }
        if !(1..=100).contains(&self.high_watermark) {
            return bad(format!(
                "high_watermark = {} must be a percentage from 1 to 100",
                self.high_watermark
            ));
        }
        if self.low_watermark >= self.high_watermark {
            return bad(format!(
                "low_watermark = {} must be below high_watermark = {}",
                self.low_watermark, self.high_watermark
            ));
        }
        if !(1..=256).contains(&self.prefetch_concurrency) {
            return bad(format!(
                "prefetch_concurrency = {} must be from 1 to 256",
                self.prefetch_concurrency
            ));
        }
        Ok(())
    }

    fn build(self, ctx: &BackendContext) -> Result<Arc<dyn Layer>> {
        let dir = ctx.resolve(&self.dir);
        let tier = DiskTier::open(
            &dir,
            self.capacity.bytes(),
            self.block_size.bytes(),
            (self.high_watermark, self.low_watermark),
        )?;
        let stats = osstream_core::CacheTier::stats(&tier);
        tracing::info!(dir = %dir.display(), capacity = %self.capacity, block_size = %self.block_size,
            blocks = stats.entries, bytes = stats.bytes, "disk cache on");
        Ok(Arc::new(
            CacheLayer::new(Arc::new(tier), self.block_size.bytes())
                .with_prefetch_concurrency(self.prefetch_concurrency),
        ))
    }
}
