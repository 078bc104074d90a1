use std::time::Duration;

use osstream_core::{ByteSize, Error, ErrorKind, Result, Seconds};
use serde::{Deserialize, Serialize};

/// `[profile]`: recording boot profiles and streaming them ahead of demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Record what booting clients read first. Default: true.
    pub record: bool,
    /// Stream a vdisk's recorded boot set into the server's cache when a client attaches.
    /// Needs a cache tier (`[cache] tiers`). Default: true.
    pub prefetch: bool,
    /// A boot is done when no new block was read for this long. Default: `15s`.
    pub quiet: Seconds,
    /// ... or at the latest this long after the client attached. Default: `3m`.
    pub window: Seconds,
    /// A client that has read this many distinct bytes is scanning its disk, not booting:
    /// its recording stops and is not kept. Default: `1GiB`.
    pub max_bytes: ByteSize,
    /// A connection that read fewer distinct bytes than this was not a boot (a probe,
    /// a partition scan); it is not recorded. Default: `1MiB`.
    pub min_bytes: ByteSize,
    /// Profile granularity; best equal to the cache's block size. Default: `64KiB`.
    pub block_size: ByteSize,
    /// Largest prefetch read: neighbouring blocks of the boot set are read together up to
    /// this size. Default: `1MiB`.
    pub read_size: ByteSize,
    /// Prefetch reads one client's attachment keeps in flight. Default: 4.
    pub depth: usize,
    /// Also write every read of each recorded boot to `DIR/VDISK-SESSION.trace` (the
    /// input of `osstream bench cache`); relative to `data_dir`. Default: unset (off).
    pub trace_dir: Option<std::path::PathBuf>,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            record: true,
            prefetch: true,
            quiet: Seconds(Duration::from_secs(15)),
            window: Seconds(Duration::from_secs(180)),
            max_bytes: ByteSize::gib(1),
            min_bytes: ByteSize::mib(1),
            block_size: ByteSize::kib(64),
            read_size: ByteSize::mib(1),
            depth: 4,
            trace_dir: None,
        }
    }
}

impl ProfileConfig {
    /// Whether the layer has anything to do.
    pub fn enabled(&self) -> bool {
        self.record || self.prefetch
    }

    /// Checks the values make sense; the error names the key.
    pub fn check(&self) -> Result<()> {
        let bad = |message: String| {
            Err(Error::new(
                ErrorKind::Config,
                format!("[profile] {message}"),
            ))
        };
        let block = self.block_size.bytes();
        if !(512..=16 << 20).contains(&block) || !block.is_power_of_two() {
            return bad(format!(
                "block_size = {} must be a power of two from 512 bytes to 16MiB",
                self.block_size
            ));
        }
        if self.read_size.bytes() < block || self.read_size.bytes() > 64 << 20 {
            return bad(format!(
                "read_size = {} must be at least block_size ({}) and at most 64MiB",
                self.read_size, self.block_size
            ));
        }
        if !(1..=64).contains(&self.depth) {
            return bad(format!("depth = {} must be from 1 to 64", self.depth));
        }
        if self.quiet.0.is_zero() || self.window.0.is_zero() {
            return bad("quiet and window must be longer than 0s".to_owned());
        }
        if self.min_bytes.bytes() > self.max_bytes.bytes() {
            return bad(format!(
                "min_bytes = {} is larger than max_bytes = {}",
                self.min_bytes, self.max_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_name_their_key() {
        ProfileConfig::default().check().unwrap();
        let odd = ProfileConfig {
            block_size: ByteSize(1000),
            ..ProfileConfig::default()
        };
        assert!(odd.check().unwrap_err().to_string().contains("block_size"));
        let small = ProfileConfig {
            read_size: ByteSize::kib(4),
            ..ProfileConfig::default()
        };
        assert!(small.check().unwrap_err().to_string().contains("read_size"));
        let deep = ProfileConfig {
            depth: 0,
            ..ProfileConfig::default()
        };
        assert!(deep.check().unwrap_err().to_string().contains("depth"));
    }
}
