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
//! `flush` (or a FUA write) uploads them. All writable opens of one image (one holding of
//! its lock) share one source (see `S3Backend::open`), and a source uploads what is still
//! dirty when its last user lets go of it. How an upload becomes the image's content
//! depends on how the image was opened:
//! - **fenced** (the server, under a private vdisk's lock): each upload writes the chunks
//!   under new names, `NNNNNNNNNNNN.E-S` (E: the lock's epoch, S: this holding's upload
//!   count), then switches the chunks to them with one commit in the catalog's
//!   [`ImageLedger`], which succeeds only while the lock is still this holding's. Readers
//!   ask the ledger which version of each chunk is current. A holder that lost the lock
//!   (paused past its server's timeout, its session replaced) may still upload, but only
//!   to names nobody reads, and its flush fails; S3 needs no conditional PUT for this.
//!   Superseded versions are deleted after each commit.
//! - **direct** (no catalog at hand: tests and tools): a PUT replaces the chunk object in
//!   place, atomically, so a crash loses at most the writes not yet flushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::try_join_all;
use object_store::path::Path;
use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, Geometry, ImageLedger,
    LockToken, ReadOpts, Result, SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range,
    read_only_error,
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

/// The key of chunk `index` of the import `data` of the image at `base`: as imported
/// (`version` `None`) or as a fenced upload stored it.
pub(crate) fn chunk_path(base: &Path, data: &str, index: u64, version: Option<&str>) -> Path {
    let name = match version {
        None => format!("{index:012}"),
        Some(version) => format!("{index:012}.{version}"),
    };
    data_prefix(base, data).join(name.as_str())
}

/// The version of a chunk committed as all zeroes: it has no object.
const ZERO_VERSION: &str = "z";

/// How often a read follows a chunk to a newer version before it gives up.
const VERSION_RETRIES: usize = 4;

/// What a committed chunk holds, as [`ChunkedSource::read_committed`] finds it.
enum Committed {
    /// The asked range.
    Bytes(Bytes),
    /// Committed as all zeroes.
    Zeroes,
    /// The imported chunk has no object: zeroes, once the manifest is confirmed.
    Missing,
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

/// How uploads become the image's content (see the module docs).
#[derive(Debug)]
pub(crate) enum Commit {
    /// Chunk objects are replaced in place.
    Direct,
    /// Chunks are uploaded under new names and switched in the ledger under `lock`.
    Fenced {
        ledger: Arc<dyn ImageLedger>,
        lock: LockToken,
    },
}

/// One holding's view of a chunked image and how its uploads are committed. Shared by
/// every source of the holding on this server, and kept by the task that uploads a
/// source's last unflushed chunks when it is dropped, so a source opened meanwhile
/// commits after it and reads the versions it committed.
#[derive(Debug)]
pub(crate) struct Committer {
    /// Names this committer's uploads apart from any other's (also after a restart).
    id: String,
    name: String,
    store: Arc<Store>,
    base: Path,
    manifest: Manifest,
    commit: Commit,
    /// The version committed last of each chunk written since the import (fenced mode).
    versions: Mutex<HashMap<u64, String>>,
    /// Counts this holding's uploads, to name their chunk objects.
    uploads: AtomicU64,
    /// One upload and commit at a time, so two never switch one chunk out of order.
    committing: tokio::sync::Mutex<()>,
    /// A commit was refused: this holding lost the lock and writes nothing more.
    fenced: AtomicBool,
    /// Chunks a dropped source handed over for its last upload, until committed: a
    /// source opened meanwhile reads (and writes on top of) them, not the older version.
    pending: Mutex<HashMap<u64, Bytes>>,
}

impl Committer {
    /// A committer for the image `name` (at `base`, described by `manifest`) that starts
    /// from the committed `versions` and commits as `commit` says.
    pub fn new(
        name: &str,
        store: Arc<Store>,
        base: Path,
        manifest: Manifest,
        versions: HashMap<u64, String>,
        commit: Commit,
    ) -> Committer {
        let id = unique_id();
        Committer {
            // The random half of the identifier: short, and unique enough per holding.
            id: id
                .rsplit('-')
                .next()
                .unwrap_or(&id)
                .chars()
                .take(8)
                .collect(),
            name: name.to_owned(),
            store,
            base,
            manifest,
            commit,
            versions: Mutex::new(versions),
            uploads: AtomicU64::new(0),
            committing: tokio::sync::Mutex::new(()),
            fenced: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Bytes>> {
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Commits the last unflushed chunks of a dropped source. They are visible to the
    /// holding's other sources until the commit is done (or failed).
    async fn commit_handed_over(&self, chunks: Vec<(u64, Bytes)>) -> Result<()> {
        let outcome = self.commit(chunks.clone()).await;
        let mut pending = self.pending();
        for (index, chunk) in chunks {
            if pending
                .get(&index)
                .is_some_and(|held| held.as_ptr() == chunk.as_ptr())
            {
                pending.remove(&index);
            }
        }
        outcome
    }

    /// The import whose chunks it reads and writes.
    pub fn data(&self) -> &str {
        &self.manifest.data
    }

    /// The lock epoch it commits under (fenced committers only).
    pub fn epoch(&self) -> Option<u64> {
        match &self.commit {
            Commit::Fenced { lock, .. } => Some(lock.epoch),
            Commit::Direct => None,
        }
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.versions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The object holding chunk `index` now: `None` when it reads as zeroes regardless.
    fn current_object(&self, index: u64) -> Option<(Path, bool)> {
        match self.versions().get(&index).map(String::as_str) {
            Some(ZERO_VERSION) => None,
            Some(version) => Some((
                chunk_path(&self.base, &self.manifest.data, index, Some(version)),
                true,
            )),
            None => Some((
                chunk_path(&self.base, &self.manifest.data, index, None),
                false,
            )),
        }
    }

    fn check_not_fenced(&self) -> Result<()> {
        if self.fenced.load(Ordering::Relaxed) {
            return Err(self.lost_lock());
        }
        Ok(())
    }

    fn lost_lock(&self) -> Error {
        let who = match &self.commit {
            Commit::Fenced { lock, .. } => {
                format!("session {} (epoch {})", lock.session, lock.epoch)
            }
            Commit::Direct => "this writer".to_owned(),
        };
        Error::new(
            ErrorKind::Conflict,
            format!(
                "{who} lost the lock of chunked image '{}'; nothing more is written for it",
                self.name
            ),
        )
        .with_op("flush")
    }

    /// Makes `chunks` (whole chunks as written) the image's content.
    async fn commit(&self, chunks: Vec<(u64, Bytes)>) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        self.check_not_fenced()?;
        let _one_at_a_time = self.committing.lock().await;
        match &self.commit {
            Commit::Direct => {
                try_join_all(chunks.into_iter().map(|(index, bytes)| async move {
                    let path = chunk_path(&self.base, &self.manifest.data, index, None);
                    if bytes.iter().all(|&b| b == 0) {
                        self.store.delete(&path).await
                    } else {
                        self.store.put(&path, bytes).await.map(drop)
                    }
                }))
                .await?;
                Ok(())
            }
            Commit::Fenced { ledger, lock } => self.commit_fenced(ledger, lock, chunks).await,
        }
    }

    async fn commit_fenced(
        &self,
        ledger: &Arc<dyn ImageLedger>,
        lock: &LockToken,
        chunks: Vec<(u64, Bytes)>,
    ) -> Result<()> {
        let upload = self.uploads.fetch_add(1, Ordering::Relaxed) + 1;
        let version = format!("{}-{}-{upload}", lock.epoch, self.id);
        let stored = futures_util::future::join_all(chunks.into_iter().map(|(index, bytes)| {
            let version = version.clone();
            async move {
                if bytes.iter().all(|&b| b == 0) {
                    return (index, ZERO_VERSION.to_owned(), Ok(()));
                }
                let path = chunk_path(&self.base, &self.manifest.data, index, Some(&version));
                let outcome = self.store.put(&path, bytes).await.map(drop);
                (index, version, outcome)
            }
        }))
        .await;
        let uploaded: Vec<Path> = stored
            .iter()
            .filter(|(_, version, outcome)| version != ZERO_VERSION && outcome.is_ok())
            .map(|(index, version, _)| {
                chunk_path(&self.base, &self.manifest.data, *index, Some(version))
            })
            .collect();
        if let Some((_, _, Err(err))) = stored.iter().find(|(_, _, outcome)| outcome.is_err()) {
            let err = err.clone();
            self.remove(&uploaded).await;
            return Err(err);
        }
        let switched: Vec<(u64, String)> = stored.into_iter().map(|(i, v, _)| (i, v)).collect();
        if let Err(err) = ledger
            .commit_chunks(lock, &self.manifest.data, &switched)
            .await
        {
            if err.kind() == ErrorKind::Conflict {
                self.fenced.store(true, Ordering::Relaxed);
                tracing::warn!(backend = %self.store.backend, image = %self.name, session = %lock.session,
                    epoch = lock.epoch, "the lock moved on: uploaded chunks were not committed and are removed");
                // Refused for certain: nobody reads them.
                self.remove(&uploaded).await;
            }
            // Any other failure may have committed after all (a reply lost on the way):
            // the objects stay, unread if the commit did not happen.
            return Err(err);
        }
        let superseded: Vec<Path> = {
            let mut versions = self.versions();
            switched
                .into_iter()
                .filter_map(|(index, version)| {
                    versions
                        .insert(index, version.clone())
                        .filter(|old| old != ZERO_VERSION && *old != version)
                        .map(|old| chunk_path(&self.base, &self.manifest.data, index, Some(&old)))
                })
                .collect()
        };
        self.remove(&superseded).await;
        Ok(())
    }

    /// Deletes objects nobody reads (best effort: a leftover costs space, not data).
    async fn remove(&self, paths: &[Path]) {
        for path in paths {
            if let Err(err) = self.store.delete(path).await {
                tracing::warn!(backend = %self.store.backend, %path, %err, "cannot remove an unused chunk object");
            }
        }
    }
}

/// One chunked image.
#[derive(Debug)]
pub(crate) struct ChunkedSource {
    info: SourceInfo,
    committer: Arc<Committer>,
    writable: bool,
    /// Written chunks not yet uploaded, whole.
    dirty: Mutex<HashMap<u64, Vec<u8>>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    dirty_limit: u64,
}

impl ChunkedSource {
    /// A source over `committer`'s view of the image; writable when `writable` (then its
    /// uploads go through the committer).
    pub fn new(committer: Arc<Committer>, writable: bool, dirty_limit: u64) -> ChunkedSource {
        let manifest = &committer.manifest;
        ChunkedSource {
            info: SourceInfo {
                name: committer.name.clone(),
                // The same string as `S3Backend::identity`: the image's key under the bucket.
                identity: format!("{}/{}", committer.store.location, committer.base),
                size: manifest.size,
                generation: manifest.id.clone(),
            },
            writable,
            committer,
            dirty: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            dirty_limit,
        }
    }

    /// The committer this source writes through.
    pub fn committer(&self) -> &Arc<Committer> {
        &self.committer
    }

    fn manifest(&self) -> &Manifest {
        &self.committer.manifest
    }

    /// `(chunk index, offset in chunk, length)` for each chunk `offset..offset+len` touches.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let chunk = self.manifest().chunk_size;
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

    fn stripe_of(index: u64) -> usize {
        (index % STRIPES as u64) as usize
    }

    fn stripe(&self, index: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[Self::stripe_of(index)]
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
        if let Some(chunk) = self.committer.pending().get(&index) {
            return Ok(vec![chunk.slice(within as usize..(within + len) as usize)]);
        }
        match self.read_committed(index, within..within + len).await? {
            Committed::Bytes(bytes) => Ok(vec![bytes]),
            Committed::Zeroes => Ok(zeroes(len)),
            Committed::Missing => {
                self.check_current().await?;
                Ok(zeroes(len))
            }
        }
    }

    /// `range` of chunk `index` as committed. A committed version can vanish while it is
    /// read, when this holding's own next commit replaces and removes it: the read then
    /// follows the newer version.
    async fn read_committed(&self, index: u64, range: std::ops::Range<u64>) -> Result<Committed> {
        let chunk_len = self.manifest().chunk_len(index);
        for _ in 0..VERSION_RETRIES {
            let Some((path, versioned)) = self.committer.current_object(index) else {
                return Ok(Committed::Zeroes);
            };
            match self
                .committer
                .store
                .get_range(&path, range.clone(), chunk_len, None)
                .await?
            {
                Some(bytes) => return Ok(Committed::Bytes(bytes)),
                None if !versioned => return Ok(Committed::Missing),
                None if self.committer.current_object(index).map(|(p, _)| p) != Some(path) => {
                    continue;
                }
                None => break,
            }
        }
        Err(self.version_gone(index))
    }

    /// A committed chunk version that is gone: a newer holder replaced (and removed) it
    /// after this reader looked the versions up.
    fn version_gone(&self, index: u64) -> Error {
        Error::new(
            ErrorKind::Conflict,
            format!(
                "chunk {index} of chunked image '{}' was rewritten by its private vdisk's next writer while \
                 being read; reconnect to read the new content",
                self.info.name
            ),
        )
        .with_op("read_at")
        .with_context("backend", &self.committer.store.backend)
    }

    /// Confirms that the manifest still names this source's chunks, before a missing
    /// chunk is answered as zeroes.
    async fn check_current(&self) -> Result<()> {
        let store = &self.committer.store;
        let path = self.committer.base.clone().join(MANIFEST);
        let current = match store.get_all(&path).await? {
            Some((bytes, _)) => Some(Manifest::parse(&bytes, &path)?),
            None => None,
        };
        match current {
            Some(current) if current.data == self.manifest().data => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "chunked image '{}' was replaced or removed while being served; reconnect to read the new content",
                    self.info.name
                ),
            )
            .with_op("read_at")
            .with_context("backend", &store.backend)),
        }
    }

    /// The whole chunk as stored (zeroes if it has no object).
    async fn load(&self, index: u64) -> Result<Vec<u8>> {
        if let Some(chunk) = self.committer.pending().get(&index) {
            return Ok(chunk.to_vec());
        }
        let len = self.manifest().chunk_len(index);
        Ok(match self.read_committed(index, 0..len).await? {
            Committed::Bytes(bytes) => bytes.to_vec(),
            Committed::Zeroes | Committed::Missing => vec![0; len as usize],
        })
    }

    /// Uploads the given dirty chunks and forgets them once committed. Writers of those
    /// chunks wait meanwhile (their stripes are held), so what is forgotten is exactly
    /// what was committed.
    async fn upload(&self, indexes: Vec<u64>) -> Result<()> {
        self.committer.check_not_fenced()?;
        let mut stripes: Vec<usize> = indexes.iter().map(|&i| Self::stripe_of(i)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            held.push(self.stripes[stripe].lock().await);
        }
        let snapshot: Vec<(u64, Bytes)> = {
            let dirty = self.dirty();
            indexes
                .iter()
                .filter_map(|i| dirty.get(i).map(|c| (*i, Bytes::copy_from_slice(c))))
                .collect()
        };
        let done: Vec<u64> = snapshot.iter().map(|(i, _)| *i).collect();
        self.committer.commit(snapshot).await?;
        let mut dirty = self.dirty();
        for index in done {
            dirty.remove(&index);
        }
        Ok(())
    }

    fn dirty_bytes(&self) -> u64 {
        self.dirty().len() as u64 * self.manifest().chunk_size
    }

    async fn write_pieces(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.committer.check_not_fenced()?;
        let mut touched = Vec::new();
        let mut consumed = 0usize;
        for (index, within, len) in self.pieces(offset, data.len() as u64) {
            let _guard = self.stripe(index).lock().await;
            let whole = within == 0 && len == self.manifest().chunk_len(index);
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
            tracing::debug!(backend = %self.committer.store.backend, image = %self.info.name, "dirty limit reached, uploading written chunks");
            self.flush().await
        } else {
            Ok(())
        }
    }
}

impl Drop for ChunkedSource {
    /// Uploads chunks written but not flushed when the last user lets go (a client that
    /// disconnects without FLUSH). NBD promises nothing for unflushed writes, but a clean
    /// disconnect should not lose them; a holding that lost the lock commits nothing.
    /// The server flushes a private vdisk when its connection closes, before the session
    /// lets go, so this is a last resort (a source dropped without that close). On a
    /// multi-threaded runtime it uploads in place, so the next open of the image sees the
    /// chunks; on a single-threaded one (a per-CPU runtime) it can only start the upload
    /// in the background.
    fn drop(&mut self) {
        let dirty = std::mem::take(&mut *self.dirty());
        if dirty.is_empty() {
            return;
        }
        let count = dirty.len();
        let chunks: Vec<(u64, Bytes)> = dirty
            .into_iter()
            .map(|(index, chunk)| (index, Bytes::from(chunk)))
            .collect();
        let committer = self.committer.clone();
        committer.pending().extend(chunks.iter().cloned());
        let upload = async move {
            let (backend, name) = (committer.store.backend.clone(), committer.name.clone());
            match committer.commit_handed_over(chunks).await {
                Ok(()) => {
                    tracing::info!(backend = %backend, image = %name, chunks = count, "uploaded unflushed chunks after the last disconnect")
                }
                Err(err) => {
                    tracing::error!(backend = %backend, image = %name, chunks = count, %err, "unflushed chunks were not stored")
                }
            }
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
