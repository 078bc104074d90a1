//! The chunked layout: `NAME/osstream-manifest.json` plus fixed-size chunk objects
//! `NAME/chunks/DATA/NNNNNNNNNNNN` (DATA: an identifier of the import that wrote them,
//! named in the manifest; NNN: the chunk index, 12 decimal digits). A chunk object that
//! does not exist reads as zeroes, so all-zero chunks cost nothing.
//!
//! Every import writes its chunks under a new DATA and then the manifest, so replacing an
//! image is atomic: readers of the old manifest keep reading the old chunks, and a read
//! that finds a chunk missing checks that the manifest still names its DATA before it
//! answers zeroes, so a reader whose image was replaced or removed gets an error, never
//! zeroes or another image's bytes.
//!
//! Writes (private vdisks) are read-modify-write of whole chunks held in memory until
//! `flush` (or a FUA write) uploads them; a PUT replaces a chunk atomically, so a crash
//! loses at most the writes not yet flushed, never part of a chunk. All writable opens
//! of one image share one source (see `S3Backend::open`), and a source uploads what is
//! still dirty when its last user lets go of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::try_join_all;
use object_store::path::Path;
use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, Geometry, ReadOpts, Result,
    SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
};
use serde::{Deserialize, Serialize};

use crate::store::Store;

/// The manifest object's name inside an image's prefix.
pub(crate) const MANIFEST: &str = "osstream-manifest.json";
/// The `format` field of a manifest this version writes and reads.
pub(crate) const FORMAT: &str = "osstream-chunked-v1";

/// Zeroes handed out for missing chunks without allocating.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// Locks serialising read-modify-write per chunk (chunk index modulo the count).
const STRIPES: usize = 64;

/// What `NAME/osstream-manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub format: String,
    pub size: u64,
    pub chunk_size: u64,
    /// New for every import and every read-write open: the image's generation.
    pub id: String,
    /// The import that wrote the chunks: they live under `NAME/chunks/DATA/`.
    pub data: String,
}

impl Manifest {
    pub fn new(size: u64, chunk_size: u64) -> Manifest {
        let id = unique_id();
        Manifest {
            format: FORMAT.to_owned(),
            size,
            chunk_size,
            data: id.clone(),
            id,
        }
    }

    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{path} is not an osstream chunked-image manifest: {e}"),
            )
        })?;
        if manifest.format != FORMAT {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{path} has format {:?}; this osstream reads {FORMAT:?}",
                    manifest.format
                ),
            ));
        }
        if manifest.chunk_size == 0 || manifest.chunk_size > 1 << 30 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{path}: chunk_size {} is out of range", manifest.chunk_size),
            ));
        }
        Ok(manifest)
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("a manifest serialises"))
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk_size).min(self.chunk_size)
    }
}

/// A fresh identifier: time and process-local entropy, unique enough to tell imports apart.
pub(crate) fn unique_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    format!("{nanos:x}-{:016x}", hasher.finish())
}

/// The prefix of the chunks the import `data` wrote for the image at `base`.
pub(crate) fn data_prefix(base: &Path, data: &str) -> Path {
    base.clone().join("chunks").join(data)
}

/// The key of chunk `index` of the import `data` of the image at `base`.
pub(crate) fn chunk_path(base: &Path, data: &str, index: u64) -> Path {
    data_prefix(base, data).join(format!("{index:012}").as_str())
}

/// Zeroes of `len` bytes, as shared static slices.
fn zeroes(len: u64) -> Vec<Bytes> {
    let mut parts = Vec::new();
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(ZEROES.len());
        parts.push(Bytes::from_static(&ZEROES[..n]));
        left -= n;
    }
    parts
}

/// One chunked image.
#[derive(Debug)]
pub(crate) struct ChunkedSource {
    info: SourceInfo,
    store: Arc<Store>,
    base: Path,
    manifest: Manifest,
    writable: bool,
    /// Written chunks not yet uploaded, whole.
    dirty: Mutex<HashMap<u64, Vec<u8>>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    dirty_limit: u64,
}

impl ChunkedSource {
    pub fn new(
        name: &str,
        store: Arc<Store>,
        base: Path,
        manifest: Manifest,
        writable: bool,
        dirty_limit: u64,
    ) -> ChunkedSource {
        ChunkedSource {
            info: SourceInfo {
                name: name.to_owned(),
                // The same string as `S3Backend::identity`: the image's key under the bucket.
                identity: format!("{}/{base}", store.location),
                size: manifest.size,
                generation: manifest.id.clone(),
            },
            store,
            base,
            manifest,
            writable,
            dirty: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            dirty_limit,
        }
    }

    /// The import whose chunks this source reads.
    pub fn data(&self) -> &str {
        &self.manifest.data
    }

    /// `(chunk index, offset in chunk, length)` for each chunk `offset..offset+len` touches.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let chunk = self.manifest.chunk_size;
        let mut pieces = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let index = at / chunk;
            let within = at % chunk;
            let n = (chunk - within).min(end - at);
            pieces.push((index, within, n));
            at += n;
        }
        pieces
    }

    fn stripe(&self, index: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[(index % STRIPES as u64) as usize]
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<u8>>> {
        self.dirty
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    async fn read_piece(&self, index: u64, within: u64, len: u64) -> Result<Vec<Bytes>> {
        if let Some(chunk) = self.dirty().get(&index) {
            let at = within as usize;
            return Ok(vec![Bytes::copy_from_slice(&chunk[at..at + len as usize])]);
        }
        let path = chunk_path(&self.base, &self.manifest.data, index);
        let chunk_len = self.manifest.chunk_len(index);
        match self
            .store
            .get_range(&path, within..within + len, chunk_len, None)
            .await?
        {
            Some(bytes) => Ok(vec![bytes]),
            None => {
                self.check_current().await?;
                Ok(zeroes(len))
            }
        }
    }

    /// Confirms that the manifest still names this source's chunks, before a missing
    /// chunk is answered as zeroes.
    async fn check_current(&self) -> Result<()> {
        let path = self.base.clone().join(MANIFEST);
        let current = match self.store.get_all(&path).await? {
            Some((bytes, _)) => Some(Manifest::parse(&bytes, &path)?),
            None => None,
        };
        match current {
            Some(current) if current.data == self.manifest.data => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "chunked image '{}' was replaced or removed while being served; reconnect to read the new content",
                    self.info.name
                ),
            )
            .with_op("read_at")
            .with_context("backend", &self.store.backend)),
        }
    }

    /// The whole chunk as stored (zeroes if it has no object).
    async fn load(&self, index: u64) -> Result<Vec<u8>> {
        let len = self.manifest.chunk_len(index);
        let path = chunk_path(&self.base, &self.manifest.data, index);
        Ok(
            match self.store.get_range(&path, 0..len, len, None).await? {
                Some(bytes) => bytes.to_vec(),
                None => vec![0; len as usize],
            },
        )
    }

    /// Uploads the given dirty chunks (in parallel) and forgets them once stored.
    async fn upload(&self, indexes: Vec<u64>) -> Result<()> {
        try_join_all(indexes.into_iter().map(|index| async move {
            let _guard = self.stripe(index).lock().await;
            let Some(snapshot) = self.dirty().get(&index).map(|c| Bytes::copy_from_slice(c)) else {
                return Ok(());
            };
            let path = chunk_path(&self.base, &self.manifest.data, index);
            if snapshot.iter().all(|&b| b == 0) {
                self.store.delete(&path).await?;
            } else {
                self.store.put(&path, snapshot).await?;
            }
            self.dirty().remove(&index);
            Ok::<(), Error>(())
        }))
        .await
        .map(drop)
    }

    fn dirty_bytes(&self) -> u64 {
        self.dirty().len() as u64 * self.manifest.chunk_size
    }

    async fn write_pieces(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let mut touched = Vec::new();
        let mut consumed = 0usize;
        for (index, within, len) in self.pieces(offset, data.len() as u64) {
            let _guard = self.stripe(index).lock().await;
            let whole = within == 0 && len == self.manifest.chunk_len(index);
            if !self.dirty().contains_key(&index) {
                let chunk = if whole {
                    vec![0; len as usize]
                } else {
                    self.load(index).await?
                };
                self.dirty().entry(index).or_insert(chunk);
            }
            let part = &data[consumed..consumed + len as usize];
            let mut dirty = self.dirty();
            let chunk = dirty
                .get_mut(&index)
                .expect("inserted above under the stripe lock");
            chunk[within as usize..(within + len) as usize].copy_from_slice(part);
            consumed += len as usize;
            touched.push(index);
        }
        if fua {
            self.upload(touched).await
        } else if self.dirty_bytes() > self.dirty_limit {
            tracing::debug!(backend = %self.store.backend, image = %self.info.name, "dirty limit reached, uploading written chunks");
            self.flush().await
        } else {
            Ok(())
        }
    }
}

impl Drop for ChunkedSource {
    /// Uploads chunks written but not flushed when the last user lets go (a client that
    /// disconnects without FLUSH). NBD promises nothing for unflushed writes, but a clean
    /// disconnect should not lose them. Runs on the current worker thread (the server's
    /// runtime has several) so the next open of the image sees the uploaded chunks.
    fn drop(&mut self) {
        let dirty = std::mem::take(&mut *self.dirty());
        if dirty.is_empty() {
            return;
        }
        let (store, base, data, name) = (
            self.store.clone(),
            self.base.clone(),
            self.manifest.data.clone(),
            self.info.name.clone(),
        );
        let upload = async move {
            let count = dirty.len();
            for (index, chunk) in dirty {
                let path = chunk_path(&base, &data, index);
                let result = if chunk.iter().all(|&b| b == 0) {
                    store.delete(&path).await
                } else {
                    store.put(&path, Bytes::from(chunk)).await.map(drop)
                };
                if let Err(e) = result {
                    tracing::error!(backend = %store.backend, image = %name, index, error = %e, "lost an unflushed chunk");
                }
            }
            tracing::info!(backend = %store.backend, image = %name, chunks = count, "uploaded unflushed chunks after the last disconnect");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(upload));
            }
            Ok(handle) => drop(handle.spawn(upload)),
            Err(_) => {
                tracing::error!(image = %self.info.name, "unflushed chunks dropped outside a runtime")
            }
        }
    }
}

#[async_trait]
impl BlockSource for ChunkedSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        if self.writable {
            Capability {
                write: true,
                flush: true,
                fua: true,
                write_zeroes: true,
                ..Capability::default()
            }
        } else {
            Capability::read_only()
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            minimum: 1,
            preferred: 64 * 1024,
            maximum: 32 * 1024 * 1024,
        }
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        let pieces = self.pieces(offset, len as u64);
        let reads = pieces
            .into_iter()
            .map(|(index, within, n)| self.read_piece(index, within, n));
        let parts = try_join_all(reads).await?;
        Ok(Chunks::from_parts(parts.into_iter().flatten().collect()))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if !self.writable {
            return Err(read_only_error(&self.info, "write_at"));
        }
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        self.write_pieces(offset, &data, opts.fua).await
    }

    async fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let indexes: Vec<u64> = self.dirty().keys().copied().collect();
        self.upload(indexes).await
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("'{}' does not support trim", self.info.name),
        )
        .with_op("trim"))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if !self.writable {
            return Err(read_only_error(&self.info, "write_zeroes"));
        }
        check_range(&self.info, "write_zeroes", offset, len)?;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZEROES.len() as u64);
            self.write_pieces(at, &ZEROES[..n as usize], false).await?;
            at += n;
        }
        if opts.fua { self.flush().await } else { Ok(()) }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        osstream_core::all_data(&self.info, offset, len)
    }
}
