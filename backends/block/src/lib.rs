//! The `block` image backend: raw block devices as vdisks.
//!
//! SAN LUNs (iSCSI, Fibre Channel), device-mapper or LVM volumes and local disks are
//! listed by the administrator, one image name per device; nothing else on the host is
//! reachable. The size comes from `BLKGETSIZE64` and the logical block size from
//! `BLKSSZGET` (a regular file, for tests or a pre-allocated image, goes through the same
//! code with its length and 512-byte sectors). With `direct = true` the device is opened
//! `O_DIRECT`: reads and writes bypass the host's page cache and are done in aligned
//! buffers, unaligned requests being widened to whole sectors. Devices are read-only
//! unless `writable = true` (for private vdisks).
//!
//! ```toml
//! [backends.san]
//! kind = "block"
//! devices = { win11 = "/dev/mapper/mpatha", build = "/dev/disk/by-id/wwn-0x5000c5003b3c6e2d" }
//! direct = true
//! writable = false
//! generation = "1"     # bump after rewriting a LUN behind osstream's back
//! ```

mod config;
mod device;
mod error;

use std::sync::Arc;

use osstream_core::{
    BackendContext, DynBackend, DynSource, Error, ErrorKind, ImageBackend, ImageStat, OpenMode,
    Registry, Result, async_trait, validate_image_name,
};

pub use config::BlockConfig;
pub use device::{DeviceGeometry, DeviceSource, probe};

/// The registry kind.
pub const KIND: &str = "block";

/// The identity of a listed device: `block:MAJOR:MINOR` of the device node (so two paths
/// to one LUN, such as `/dev/sdb` and its `/dev/disk/by-id` link, are one image), or the
/// file's identity for a regular file; a path that cannot be read is named as configured.
pub fn device_identity(path: &std::path::Path) -> String {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            // glibc's encoding of dev_t (what major(3) and minor(3) decode).
            let dev = meta.rdev();
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
            let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
            format!("block:{major}:{minor}")
        }
        Ok(_) => osstream_core::file_identity(path),
        Err(_) => format!("block:unavailable:{}", path.display()),
    }
}

/// Adds the `block` kind to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_backend::<BlockConfig>();
}

impl osstream_core::BackendKind for BlockConfig {
    const KIND: &'static str = KIND;

    fn build(self, _ctx: &BackendContext, name: &str) -> Result<DynBackend> {
        Ok(Arc::new(BlockBackend::new(name, self)?) as DynBackend)
    }
}

/// Administrator-listed block devices.
#[derive(Debug)]
pub struct BlockBackend {
    name: String,
    config: BlockConfig,
}

impl BlockBackend {
    /// A backend named `name` over the devices in `config`.
    pub fn new(name: &str, config: BlockConfig) -> Result<Self> {
        for (image, path) in &config.devices {
            validate_image_name(image)?;
            if !path.is_absolute() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "[backends.{name}] device path for {image:?} must be absolute: {}",
                        path.display()
                    ),
                ));
            }
        }
        Ok(BlockBackend {
            name: name.to_owned(),
            config,
        })
    }

    fn device(&self, image: &str) -> Result<&std::path::Path> {
        validate_image_name(image)?;
        self.config
            .devices
            .get(image)
            .map(|p| p.as_path())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("backend '{}' has no device named '{image}'", self.name),
                )
                .with_op("open")
            })
    }

    async fn stat_device(&self, image: &str) -> Result<ImageStat> {
        let path = self.device(image)?.to_path_buf();
        let geometry = tokio::task::spawn_blocking(move || probe(&path))
            .await
            .map_err(|e| Error::new(ErrorKind::Unexpected, format!("probe task failed: {e}")))??;
        Ok(ImageStat {
            name: image.to_owned(),
            size: geometry.size,
            generation: format!("{}-{}", self.config.generation, geometry.size),
            writable: self.config.writable,
        })
    }
}

#[async_trait]
impl ImageBackend for BlockBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn identity(&self, image: &str) -> Result<String> {
        Ok(device_identity(self.device(image)?))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        let mut images = Vec::new();
        for image in self.config.devices.keys() {
            match self.stat_device(image).await {
                Ok(stat) => images.push(stat),
                Err(err) => {
                    tracing::warn!(backend = %self.name, %image, %err, "block device unavailable")
                }
            }
        }
        Ok(images)
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        self.stat_device(image).await
    }

    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        let path = self.device(image)?.to_path_buf();
        let writable = mode.is_writable();
        if writable && !self.config.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("device '{image}' of backend '{}' is read-only (set writable = true in [backends.{}])", self.name, self.name),
            )
            .with_op("open"));
        }
        let (name, direct, generation) = (
            image.to_owned(),
            self.config.direct,
            self.config.generation.clone(),
        );
        let source = tokio::task::spawn_blocking(move || {
            let identity = device_identity(&path);
            DeviceSource::open(&path, name, identity, writable, direct, &generation)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("open task failed: {e}")))??;
        Ok(Arc::new(source))
    }
}
