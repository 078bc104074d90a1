//! A plugin for tests of the host: one image, `pattern`, whose byte at offset `i` is
//! `(i / 4096 + i) as u8`. Reads touching `panic_at` panic; reads touching `fail_at` fail
//! with a temporary I/O error; reads touching `slow_at` take `slow_ms` milliseconds.
//! Configuration: `{ "size": 16777216, "panic_at": 8388608, "fail_at": 4194304,
//! "slow_at": 0, "slow_ms": 1000, "serialize": false }` (all optional).

use osstream_plugin_sdk::{Image, ImageInfo, Plugin, PluginError, export_plugin};

/// The instance.
#[derive(Debug)]
pub struct Faulty {
    size: u64,
    panic_at: Option<u64>,
    fail_at: Option<u64>,
    slow_at: Option<u64>,
    slow_ms: u64,
}

/// The one image.
#[derive(Debug)]
pub struct PatternImage {
    size: u64,
    panic_at: Option<u64>,
    fail_at: Option<u64>,
    slow_at: Option<u64>,
    slow_ms: u64,
}

impl Plugin for Faulty {
    const NAME: &'static str = "faulty";
    const VERSION: &'static str = "0.1.0";
    type Image = PatternImage;

    fn load(config: serde_json::Value) -> Result<Self, PluginError> {
        Ok(Faulty {
            size: config["size"].as_u64().unwrap_or(16 << 20),
            panic_at: config["panic_at"].as_u64(),
            fail_at: config["fail_at"].as_u64(),
            slow_at: config["slow_at"].as_u64(),
            slow_ms: config["slow_ms"].as_u64().unwrap_or(1000),
        })
    }

    fn list(&self) -> Result<Vec<ImageInfo>, PluginError> {
        Ok(vec![ImageInfo {
            name: "pattern".into(),
            size: self.size,
            generation: "1".into(),
        }])
    }

    fn open(&self, name: &str, _writable: bool) -> Result<PatternImage, PluginError> {
        if name != "pattern" {
            return Err(PluginError::not_found(format!("no image {name}")));
        }
        Ok(PatternImage {
            size: self.size,
            panic_at: self.panic_at,
            fail_at: self.fail_at,
            slow_at: self.slow_at,
            slow_ms: self.slow_ms,
        })
    }
}

impl Image for PatternImage {
    fn size(&self) -> Result<u64, PluginError> {
        Ok(self.size)
    }

    fn generation(&self) -> Result<String, PluginError> {
        Ok("1".into())
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), PluginError> {
        let range = offset..offset + buf.len() as u64;
        if self.panic_at.is_some_and(|at| range.contains(&at)) {
            panic!("asked to panic at offset {offset}");
        }
        if self.slow_at.is_some_and(|at| range.contains(&at)) {
            std::thread::sleep(std::time::Duration::from_millis(self.slow_ms));
        }
        if self.fail_at.is_some_and(|at| range.contains(&at)) {
            return Err(PluginError::io(
                format!("injected failure at offset {offset}"),
                true,
            ));
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = (at / 4096 + at) as u8;
        }
        Ok(())
    }
}

export_plugin!(Faulty);
