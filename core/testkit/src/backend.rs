//! [`MemBackend`]: a backend whose images are [`MemSource`]s, counting what it is asked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use osstream_core::{
    BlockSource, DynSource, Error, ErrorKind, ImageBackend, ImageStat, OpenMode, Result,
    async_trait, validate_image_name,
};

use crate::MemSource;

/// Read-only images held in memory under plain names; counts `stat` and `open` calls.
#[derive(Debug)]
pub struct MemBackend {
    name: String,
    images: BTreeMap<String, Arc<MemSource>>,
    stats: AtomicU64,
    opens: AtomicU64,
}

impl MemBackend {
    /// An empty backend configured as `name`.
    pub fn new(name: &str) -> Self {
        MemBackend {
            name: name.to_owned(),
            images: BTreeMap::new(),
            stats: AtomicU64::new(0),
            opens: AtomicU64::new(0),
        }
    }

    /// Adds the read-only image `image` holding `data`, identified as on this backend.
    pub fn with_image(mut self, image: &str, data: Vec<u8>) -> Self {
        let source = MemSource::new(image, data).with_identity(&self.identity_of(image));
        self.images.insert(image.to_owned(), Arc::new(source));
        self
    }

    /// Look-ups so far: `stat` calls and `open` (which looks the image up); `open_stat`
    /// makes none.
    pub fn stat_calls(&self) -> u64 {
        self.stats.load(Ordering::Relaxed)
    }

    /// `open` and `open_stat` calls so far.
    pub fn open_calls(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    fn identity_of(&self, image: &str) -> String {
        format!("mem:{}/{image}", self.name)
    }

    fn image(&self, image: &str) -> Result<&Arc<MemSource>> {
        validate_image_name(image)?;
        self.images.get(image).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no image {image:?}")).with_op("stat")
        })
    }

    fn stat_of(&self, image: &str) -> Result<ImageStat> {
        let info = self.image(image)?.info();
        Ok(ImageStat {
            name: image.to_owned(),
            size: info.size,
            generation: info.generation.clone(),
            writable: false,
        })
    }
}

#[async_trait]
impl ImageBackend for MemBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "mem"
    }

    fn identity(&self, image: &str) -> Result<String> {
        validate_image_name(image)?;
        Ok(self.identity_of(image))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        self.images.keys().map(|name| self.stat_of(name)).collect()
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        self.stats.fetch_add(1, Ordering::Relaxed);
        self.stat_of(image)
    }

    /// Looks the image up as real backends do (counted as a `stat`).
    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        self.stats.fetch_add(1, Ordering::Relaxed);
        self.open_found(image, mode)
    }

    /// Takes the caller's stat: no look-up of its own.
    async fn open_stat(&self, stat: &ImageStat, mode: OpenMode) -> Result<DynSource> {
        self.open_found(&stat.name, mode)
    }
}

impl MemBackend {
    fn open_found(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        self.opens.fetch_add(1, Ordering::Relaxed);
        let source = self.image(image)?;
        if mode.is_writable() {
            return Err(osstream_core::read_only_error(source.info(), "open"));
        }
        Ok(source.clone() as DynSource)
    }
}
