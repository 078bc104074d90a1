//! The `s3` image backend: images in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW...),
//! through the `object_store` crate.
//!
//! Two layouts, both found by name under the configured prefix:
//! - **object**: the image `NAME` is the object `PREFIX/NAME`, read with range GETs.
//!   Read-only (an S3 object cannot be changed in place). The generation is its ETag,
//!   and every read carries `If-Match`, so a replaced object fails reads instead of
//!   mixing old and new bytes.
//! - **chunked**: `PREFIX/NAME/osstream-manifest.json` plus chunk objects, written by
//!   `osstream vdisk import` with `layout = "chunked"`. All-zero chunks are not stored.
//!   Writable when the backend is `writable = true` (private vdisks): read-modify-write
//!   of whole chunks, uploaded on flush.
//!
//! Reads larger than `part_size` become parallel range GETs; every request of the
//! backend shares a limit of `concurrency` requests in flight. Temporary failures (429,
//! 5xx, timeouts, resets, short bodies) are retried with exponential backoff, and a body
//! whose length or `Content-Range` differs from the range asked for never reaches a
//! client.
//!
//! ```toml
//! [backends.bucket]
//! kind = "s3"
//! bucket = "vdisks"
//! prefix = "site-a"                       # optional "folder" in the bucket
//! endpoint = "http://minio.lan:9000"      # omit for AWS
//! region = "us-east-1"
//! access_key_id = "..."                   # or AWS_ACCESS_KEY_ID
//! secret_access_key = "..."               # or AWS_SECRET_ACCESS_KEY
//! allow_http = true                       # needed for a plain http:// endpoint
//! layout = "object"                       # or "chunked": how imports are stored
//! ```

mod chunked;
mod config;
mod object;
mod store;
mod upload;

use std::sync::Arc;

use object_store::path::Path;
use osstream_core::{
    BackendContext, DynBackend, DynSource, Error, ErrorKind, ImageBackend, ImageLedger, ImageStat,
    ImportOptions, OpenMode, Registry, Result, SourceInfo, async_trait, validate_image_name,
};

pub use config::{Layout, S3Config};

use chunked::{ChunkedSource, Committer, MANIFEST, Manifest};
use object::ObjectSource;
use store::Store;

/// The registry kind.
pub const KIND: &str = "s3";

/// Adds the `s3` kind to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_backend::<S3Config>();
}

impl osstream_core::BackendKind for S3Config {
    const KIND: &'static str = KIND;

    fn build(self, ctx: &BackendContext, name: &str) -> Result<DynBackend> {
        Ok(Arc::new(S3Backend::new(name, self)?.with_ledger(ctx.ledger.clone())) as DynBackend)
    }
}

/// Images in one bucket (under one prefix).
#[derive(Debug)]
pub struct S3Backend {
    name: String,
    config: S3Config,
    store: Arc<Store>,
    /// The writable source of each chunked image that has one, and its committer: every
    /// read-write open of an image (one holding) shares the source, so their writes meet
    /// in one set of dirty chunks instead of overwriting each other's chunks at flush.
    writers: std::sync::Mutex<std::collections::HashMap<String, Writer>>,
    /// Where fenced writes are committed and read back (the catalog); `None` where no
    /// catalog is at hand, and then writes replace chunks in place.
    ledger: Option<Arc<dyn ImageLedger>>,
}

/// The writable source of an image, and its committer (which outlives the source while
/// the source's last chunks are uploaded).
type Writer = (
    std::sync::Weak<ChunkedSource>,
    std::sync::Weak<chunked::Committer>,
);

/// Where an image lives and how it is laid out.
enum Found {
    Object(object_store::ObjectMeta),
    Chunked(Manifest, Path),
}

impl S3Backend {
    /// The chunk versions the ledger has committed for `manifest`'s data (none without a
    /// ledger).
    async fn committed_versions(
        &self,
        manifest: &Manifest,
    ) -> Result<std::collections::HashMap<u64, String>> {
        match &self.ledger {
            Some(ledger) => ledger.chunk_versions(&manifest.data).await,
            None => Ok(Default::default()),
        }
    }

    /// A backend named `name`; fails on a configuration the S3 client refuses.
    pub fn new(name: &str, config: S3Config) -> Result<Self> {
        let store = Arc::new(Store::new(name, &config)?);
        Ok(S3Backend {
            name: name.to_owned(),
            config,
            store,
            writers: std::sync::Mutex::new(std::collections::HashMap::new()),
            ledger: None,
        })
    }

    /// Calls made to the bucket so far (retries of one call not counted).
    pub fn calls(&self) -> u64 {
        self.store.calls()
    }

    /// The same backend, committing fenced writes to `ledger` and reading them back.
    pub fn with_ledger(mut self, ledger: Option<Arc<dyn ImageLedger>>) -> Self {
        self.ledger = ledger;
        self
    }

    fn not_found(&self, image: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "no image {image:?} in bucket {:?} under prefix {:?} (neither an object {} nor a manifest {})",
                self.config.bucket,
                self.config.prefix,
                self.store.path(&[image]),
                self.store.path(&[image, MANIFEST]),
            ),
        )
        .with_context("backend", &self.name)
    }

    /// Finds `image` in either layout; the chunked one wins if both exist.
    async fn find(&self, image: &str) -> Result<Option<Found>> {
        validate_image_name(image)?;
        let base = self.store.path(&[image]);
        let manifest_path = base.clone().join(MANIFEST);
        if let Some((bytes, _)) = self.store.get_all(&manifest_path).await? {
            let manifest = Manifest::parse(&bytes, &manifest_path)?;
            return Ok(Some(Found::Chunked(manifest, base)));
        }
        match self.store.head(&base).await {
            Ok(meta) => Ok(Some(Found::Object(meta))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn stat_of(&self, image: &str, found: &Found) -> ImageStat {
        match found {
            Found::Object(meta) => ImageStat {
                name: image.to_owned(),
                size: meta.size,
                generation: object_generation(meta),
                writable: false,
            },
            Found::Chunked(manifest, _) => ImageStat {
                name: image.to_owned(),
                size: manifest.size,
                generation: manifest.id.clone(),
                writable: self.config.writable,
            },
        }
    }
}

fn object_generation(meta: &object_store::ObjectMeta) -> String {
    match (&meta.e_tag, &meta.version) {
        (_, Some(version)) => format!("v:{version}"),
        (Some(etag), None) => format!("etag:{}", etag.trim_matches('"')),
        (None, None) => format!(
            "{}-{}",
            meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
            meta.size
        ),
    }
}

#[async_trait]
impl ImageBackend for S3Backend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn identity(&self, image: &str) -> Result<String> {
        validate_image_name(image)?;
        Ok(format!(
            "{}/{}",
            self.store.location,
            self.store.path(&[image])
        ))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        let listing = self.store.list_dir(self.store.prefix()).await?;
        let mut images = Vec::new();
        for meta in &listing.objects {
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if validate_image_name(name).is_ok() {
                images.push(self.stat_of(name, &Found::Object(meta.clone())));
            }
        }
        for dir in &listing.common_prefixes {
            let Some(name) = dir.filename() else { continue };
            if validate_image_name(name).is_err() {
                continue;
            }
            let manifest_path = dir.clone().join(MANIFEST);
            match self.store.get_all(&manifest_path).await? {
                Some((bytes, _)) => match Manifest::parse(&bytes, &manifest_path) {
                    Ok(manifest) => {
                        images.retain(|i: &ImageStat| i.name != name);
                        images.push(self.stat_of(name, &Found::Chunked(manifest, dir.clone())));
                    }
                    Err(e) => tracing::debug!(backend = %self.name, %e, "skipping prefix"),
                },
                None => continue,
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        match self.find(image).await? {
            Some(found) => Ok(self.stat_of(image, &found)),
            None => Err(self.not_found(image)),
        }
    }

    /// A single object read-only is opened from the stat alone (its etag is in the
    /// generation; chunked images' generations are manifest ids, never `etag:`): no
    /// second `HEAD`. Chunked images read their manifest as `open` does.
    async fn open_stat(&self, stat: &ImageStat, mode: OpenMode) -> Result<DynSource> {
        match stat.generation.strip_prefix("etag:") {
            Some(etag) if !mode.is_writable() => Ok(Arc::new(ObjectSource::new(
                SourceInfo {
                    name: stat.name.clone(),
                    identity: self.identity(&stat.name)?,
                    size: stat.size,
                    generation: stat.generation.clone(),
                },
                self.store.clone(),
                self.store.path(&[&stat.name]),
                Some(format!("\"{etag}\"")),
                self.config.part_size.bytes().max(64 * 1024),
            ))),
            _ => self.open(&stat.name, mode).await,
        }
    }

    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        let found = self
            .find(image)
            .await?
            .ok_or_else(|| self.not_found(image))?;
        let (manifest, base) = match found {
            Found::Object(meta) if !mode.is_writable() => {
                return Ok(Arc::new(ObjectSource::new(
                    SourceInfo {
                        name: image.to_owned(),
                        identity: self.identity(image)?,
                        size: meta.size,
                        generation: object_generation(&meta),
                    },
                    self.store.clone(),
                    meta.location,
                    meta.e_tag,
                    self.config.part_size.bytes().max(64 * 1024),
                )));
            }
            Found::Object(_) => {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "image '{image}' on backend '{}' is a single S3 object, which cannot be written in place; \
                         import it with layout = \"chunked\" (and writable = true) to use it as a private vdisk",
                        self.name
                    ),
                )
                .with_op("open"));
            }
            Found::Chunked(manifest, base) => (manifest, base),
        };
        if mode.is_writable() && !self.config.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "image '{image}' on backend '{}' is not writable (set writable = true in [backends.{}])",
                    self.name, self.name
                ),
            )
            .with_op("open"));
        }
        let dirty_limit = self.config.dirty_limit.bytes();
        let commit = match mode {
            OpenMode::ReadOnly => None,
            OpenMode::Locked(lock) => match &self.ledger {
                Some(ledger) => Some(chunked::Commit::Fenced {
                    ledger: ledger.clone(),
                    lock,
                }),
                None => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "backend '{}' has no catalog to commit fenced writes of '{image}' to",
                            self.name
                        ),
                    )
                    .with_op("open"));
                }
            },
            OpenMode::ReadWrite if self.ledger.is_some() => {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "chunked image '{image}' on backend '{}' is written only through a private vdisk's \
                         session, whose lock fences every commit",
                        self.name
                    ),
                )
                .with_op("open"));
            }
            OpenMode::ReadWrite => Some(chunked::Commit::Direct),
        };
        let Some(commit) = commit else {
            let versions = self.committed_versions(&manifest).await?;
            let committer = Committer::new(
                image,
                self.store.clone(),
                base,
                manifest,
                versions,
                chunked::Commit::Direct,
            );
            return Ok(Arc::new(ChunkedSource::new(
                Arc::new(committer),
                false,
                dirty_limit,
            )));
        };
        let epoch = match &commit {
            chunked::Commit::Fenced { lock, .. } => Some(lock.epoch),
            chunked::Commit::Direct => None,
        };
        let data = manifest.data.clone();
        let same_holding =
            |committer: &Committer| committer.data() == data && committer.epoch() == epoch;
        let (source, committer) = {
            let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
            writers.retain(|_, (source, committer)| {
                source.strong_count() > 0 || committer.strong_count() > 0
            });
            writers
                .get(image)
                .map(|(source, committer)| (source.upgrade(), committer.upgrade()))
                .unwrap_or((None, None))
        };
        if let Some(source) = source.filter(|s| same_holding(s.committer())) {
            return Ok(source);
        }
        // A source of this holding being dropped may still be committing its last
        // chunks: the new source shares its committer, so it commits after it and reads
        // what it committed.
        let committer = committer.filter(|c| same_holding(c));
        let committer = match committer {
            Some(committer) => committer,
            None => {
                let manifest = if epoch.is_none() {
                    // Direct writes change the content under the manifest's generation: a
                    // new one keeps every cache from serving blocks read before them.
                    // (Fenced writes need none: readers add the image's lock epoch.)
                    let manifest = Manifest {
                        id: chunked::unique_id(),
                        ..manifest
                    };
                    self.store
                        .put(&base.clone().join(MANIFEST), manifest.to_bytes())
                        .await?;
                    manifest
                } else {
                    manifest
                };
                let versions = self.committed_versions(&manifest).await?;
                Arc::new(Committer::new(
                    image,
                    self.store.clone(),
                    base,
                    manifest,
                    versions,
                    commit,
                ))
            }
        };
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let (registered_source, registered_committer) = writers
            .get(image)
            .map(|(source, committer)| (source.upgrade(), committer.upgrade()))
            .unwrap_or((None, None));
        // Two first opens racing: the one registered first wins, the other's source
        // (with nothing written yet) is dropped.
        if let Some(winner) = registered_source.filter(|winner| same_holding(winner.committer())) {
            return Ok(winner);
        }
        // A committer of this holding registered meanwhile (its source is gone but its
        // last upload may still run): one committer per holding, so this one is dropped.
        let committer = registered_committer
            .filter(|registered| same_holding(registered))
            .unwrap_or(committer);
        let source = Arc::new(ChunkedSource::new(committer.clone(), true, dirty_limit));
        writers.insert(
            image.to_owned(),
            (Arc::downgrade(&source), Arc::downgrade(&committer)),
        );
        Ok(source)
    }

    async fn remove(&self, image: &str) -> Result<()> {
        self.delete_image(image).await
    }

    async fn import(
        &self,
        image: &str,
        from: &std::path::Path,
        options: &ImportOptions,
    ) -> Result<ImageStat> {
        validate_image_name(image)?;
        if options.writable && (self.config.layout == Layout::Object || !self.config.writable) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "backend '{}' would store {image:?} read-only; a private vdisk needs \
                     layout = \"chunked\" and writable = true in [backends.{}]",
                    self.name, self.name
                ),
            )
            .with_op("import"));
        }
        let existing = self.find(image).await?;
        if existing.is_some() && !options.replace {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "backend '{}' already has an image {image:?}; pass --replace to overwrite it",
                    self.name
                ),
            )
            .with_op("import"));
        }
        // The new image replaces the old one atomically (a PUT or a completed multipart
        // upload replaces an object; a chunked import writes new chunks, then the
        // manifest); only then is what belonged to the old one removed.
        let base = self.store.path(&[image]);
        let new_data = match self.config.layout {
            Layout::Object => {
                upload::object(
                    &self.store,
                    &self.store.path(&[image]),
                    from,
                    &self.config,
                    options,
                )
                .await?;
                None
            }
            Layout::Chunked => {
                let manifest = upload::chunked(
                    &self.store,
                    &self.store.path(&[image]),
                    from,
                    &self.config,
                    options,
                )
                .await?;
                Some(manifest.data)
            }
        };
        if let Some(old) = existing {
            self.remove_old(image, &base, old, new_data.as_deref())
                .await?;
        }
        self.stat(image).await
    }
}

impl S3Backend {
    /// Deletes `image` in whichever layout it is stored: the object, or the manifest first
    /// (so nobody finds a half-deleted image) and then its chunks.
    async fn delete_image(&self, image: &str) -> Result<()> {
        match self.find(image).await? {
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("backend '{}' has no image {image:?}", self.name),
            )
            .with_op("remove")),
            Some(Found::Object(meta)) => self.store.delete(&meta.location).await,
            Some(Found::Chunked(manifest, base)) => {
                self.store.delete(&base.clone().join(MANIFEST)).await?;
                let chunks = chunked::data_prefix(&base, &manifest.data);
                for meta in self.store.list_all(&chunks).await? {
                    self.store.delete(&meta.location).await?;
                }
                Ok(())
            }
        }
    }

    /// Removes what belonged to the replaced image `old`, after the new one is complete:
    /// the old chunks (and, if the new image is a single object, the manifest that would
    /// otherwise hide it), or the old object if the new image is chunked.
    async fn remove_old(
        &self,
        image: &str,
        base: &Path,
        old: Found,
        new_data: Option<&str>,
    ) -> Result<()> {
        tracing::info!(backend = %self.name, image, "removing what belonged to the replaced image");
        match old {
            Found::Object(meta) => {
                if new_data.is_some() {
                    self.store.delete(&meta.location).await?;
                }
                Ok(())
            }
            Found::Chunked(manifest, _) => {
                if new_data.is_none() {
                    self.store.delete(&base.clone().join(MANIFEST)).await?;
                }
                if new_data != Some(manifest.data.as_str()) {
                    let old_chunks = chunked::data_prefix(base, &manifest.data);
                    for meta in self.store.list_all(&old_chunks).await? {
                        self.store.delete(&meta.location).await?;
                    }
                }
                Ok(())
            }
        }
    }
}
