//! Session exports: how a client's token becomes its own view of a vdisk.
//!
//! The catalog (outside the engine) implements [`SessionDirectory`]; [`crate::Exports`]
//! turns a resolved [`SessionTarget`] into a source: the vdisk's image under the shared
//! layers, plus the client's copy-on-write overlay for standard vdisks, or opened
//! read-write under the vdisk's lock for private ones. One overlay serves every
//! connection of a session; a new session of the same client replaces the old one and
//! ends its connections.
//!
//! A session is held by one server at a time (the catalog records which, with a
//! heartbeat), lives on while it has no connection for a grace period (a booting client
//! connects several times), and a private session's writes are fenced by its lock's
//! epoch: once the lock moved on, nothing more is acknowledged under it.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::cow::CowLayer;
use crate::error::{Error, ErrorKind, Result};

/// Where a standard-mode session's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Server RAM, bounded; full means `NoSpace` on writes.
    Ram,
    /// RAM first, spilling to a per-session file on the server's disk.
    RamOverflowDisk,
    /// A file on the server's disk, discarded when the client's next session starts.
    ServerDisk,
    /// A file on the server's disk, kept across the client's sessions.
    ServerDiskPersistent,
    /// A file in the folder every server shares ([`OverlaySettings::shared_dir`]),
    /// discarded like [`OverlayKind::ServerDisk`]; its writes are fenced by the session's
    /// epoch, so the session can move to another server when its own dies.
    SharedDisk,
}

impl OverlayKind {
    /// Whether the overlay lives where every server reaches it, so the session may move.
    pub fn is_shared(self) -> bool {
        self == OverlayKind::SharedDisk
    }
}

/// What a session token resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTarget {
    /// The session id (for logs, accounting and overlay reuse).
    pub session: String,
    /// The client's identity (its MAC).
    pub client: String,
    /// The client's group, if it has one (for `[limits]`).
    pub group: Option<String>,
    /// The vdisk's name.
    pub vdisk: String,
    /// The backend holding the image.
    pub backend: String,
    /// The image's name on that backend.
    pub image: String,
    /// `Some(kind)` for standard vdisks (an overlay of that kind); `None` for private
    /// vdisks, which are opened read-write.
    pub overlay: Option<OverlayKind>,
    /// For listings and logs.
    pub description: String,
    /// When the session was opened (Unix milliseconds): a newer session of the client
    /// replaces an older one, never the other way round.
    pub started_at: i64,
}

impl SessionTarget {
    /// A private vdisk's session (written in place, under the vdisk's lock).
    pub fn is_private(&self) -> bool {
        self.overlay.is_none()
    }
}

/// A private vdisk's lock as one holding of its session has it, or a session's hold on
/// its shared write overlay ([`OverlayKind::SharedDisk`]). Every write of that holding is
/// fenced by it: once the catalog's lock moved on (the session ended or was replaced, or
/// another server took it, which grows the epoch), nothing more is acknowledged or
/// committed under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken {
    /// The vdisk.
    pub vdisk: String,
    /// The session holding the lock.
    pub session: String,
    /// The identity of the vdisk's image ([`crate::ImageBackend::identity`]).
    pub image: String,
    /// Grows with each holder: of the image (a private vdisk's lock), or of the session
    /// (a shared overlay's).
    pub epoch: u64,
    /// True: the lock fences the session's shared write overlay, not the vdisk's image
    /// (which it never writes); `epoch` is then the session's.
    pub overlay: bool,
}

impl LockToken {
    /// What the lock guards, in words: `private vdisk "x"` or `the shared write overlay
    /// of vdisk "x"`.
    pub fn guards(&self) -> String {
        if self.overlay {
            format!("the shared write overlay of vdisk {:?}", self.vdisk)
        } else {
            format!("private vdisk {:?}", self.vdisk)
        }
    }
}

/// What [`SessionDirectory::attach`] grants one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// For a private vdisk: the lock its writes are fenced with.
    pub lock: Option<LockToken>,
    /// How many times a private vdisk took the image to write it: caches key blocks by
    /// it too, so no block read before such writes is served after them.
    pub image_epoch: u64,
}

/// Where an image stands for readers of its plain name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageState {
    /// Who writes it now (a private vdisk's session, in words), if anyone.
    pub writer: Option<String>,
    /// See [`Grant::image_epoch`].
    pub epoch: u64,
}

/// The catalog as the engine sees it.
///
/// # Contract
/// - `resolve` fails with `NotFound` for unknown or ended sessions (saying why it
///   ended), `PermissionDenied` when the vdisk is no longer assigned to the client or
///   disabled, and `Conflict` when a private vdisk is locked by another session. It
///   changes nothing (probes use it alone); `attach` records the peer.
/// - `attach` makes this server the session's holder for one more connection, or fails
///   with `Conflict` naming the server that holds it; a *temporary* `Conflict` means an
///   earlier holder of the image is still closing its connections: retry shortly.
/// - `detached` is called once for every successful `attach` when its connection ends,
///   with the bytes it moved; `last` is true when this server has no other connection
///   of the session left.
/// - `check_lock` fails with `Conflict` once `lock` is no longer the vdisk's lock.
/// - `holds_lease` does no I/O: it says whether this server's heartbeat reached the
///   catalog recently enough that no other server can have taken its sessions.
///   `renew_lease` sends a heartbeat and checks `lock` (failing like `check_lock`), and
///   renews the lease when both succeed.
#[async_trait]
pub trait SessionDirectory: Send + Sync + Debug {
    /// Looks a token up for a client connecting from `peer`.
    async fn resolve(&self, token: &str, peer: &str) -> Result<SessionTarget>;
    /// Takes the session for one more connection from `peer`; `image` is the identity
    /// of the target's image.
    async fn attach(&self, target: &SessionTarget, image: &str, peer: &str) -> Result<Grant>;
    /// Accounts for a finished connection.
    async fn detached(&self, target: &SessionTarget, read: u64, written: u64, last: bool);
    /// Whether `lock` still holds.
    async fn check_lock(&self, lock: &LockToken) -> Result<()>;
    /// Whether this server may still write for the sessions it holds.
    fn holds_lease(&self) -> bool;
    /// Renews this server's lease at once, if `lock` still holds: after a stall (the
    /// process paused, the catalog slow) a write need not fail when nobody took over.
    async fn renew_lease(&self, lock: &LockToken) -> Result<()>;
    /// Who writes an image now, for plain-name readers: `image` is its identity here,
    /// `backend` and `key` what the configuration calls it (the same on every server).
    async fn image_state(&self, image: &str, backend: &str, key: &str) -> Result<ImageState>;
}

/// How overlays are built.
#[derive(Debug, Clone)]
pub struct OverlaySettings {
    /// Folder for disk overlays: `<dir>/<client>/<vdisk>/`.
    pub dir: PathBuf,
    /// Folder for `shared-disk` overlays, the same on every server (an NFS mount), laid
    /// out like `dir`; `None`: this server serves no such vdisk.
    pub shared_dir: Option<PathBuf>,
    /// RAM a `ram` or `ram-overflow-disk` overlay may use, per session.
    pub ram_capacity: u64,
    /// Overlay block size (copy-on-write granularity).
    pub block_size: u64,
}

/// The live sessions of this server (one overlay per client, shared by its connections)
/// and the readers of plain names (ended when a private session starts writing).
#[derive(Debug, Default)]
pub(crate) struct LiveSessions {
    by_client: Mutex<HashMap<String, LiveSession>>,
    readers: Mutex<HashMap<String, Readers>>,
    /// Per session: held while a connection joins and is granted, or leaves and is
    /// detached, so the catalog hears of this server's connections in the order they
    /// came and went (an attach overtaken by an earlier detach would leave a connected
    /// session marked disconnected).
    orders: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    /// Numbers live-session entries (see `LiveSession::generation`).
    generations: std::sync::atomic::AtomicU64,
}

/// A live session's write overlay on this server (`Exports::overlay_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayUsage {
    /// The session id.
    pub session: String,
    /// The client (its MAC).
    pub client: String,
    /// Bytes held in RAM.
    pub ram: u64,
    /// Bytes held on the server's disk.
    pub disk: u64,
}

/// See `LiveSessions::orders`.
pub(crate) type Order = Arc<tokio::sync::Mutex<()>>;

#[derive(Debug)]
struct LiveSession {
    session: String,
    started_at: i64,
    /// The client's overlay, and the generation of the base it was made over: its
    /// blocks are only meaningful over that base.
    overlay: Option<(Arc<CowLayer>, String)>,
    ended: CancellationToken,
    connections: usize,
    peers: HashSet<String>,
    /// When the catalog last granted it to this server (`None` while the first connection
    /// still waits for the catalog): a catalog snapshot older than that does not know it.
    held_since: Option<Instant>,
    /// Connections counted here that still wait for the catalog's grant: a catalog
    /// snapshot taken meanwhile may not list the session yet.
    pending: usize,
    /// Tells this entry from an earlier or later one of the same session (ended here and
    /// joined again), so a late leave of an old connection never counts down a new one.
    generation: u64,
}

#[derive(Debug)]
struct Readers {
    count: usize,
    ended: CancellationToken,
    /// The backend and key the image was opened by (its name on every server).
    backend: String,
    key: String,
}

/// A connection's hold on its session: ended when the session is replaced or closed.
/// Dropping it (a connection that failed before transmission) leaves the session too,
/// and tells the catalog in the background if the catalog had granted it.
#[derive(Debug)]
pub struct SessionGuard {
    /// What the token resolved to.
    pub target: SessionTarget,
    /// Cancelled when the session is replaced, closed, or taken by another server.
    pub ended: CancellationToken,
    live: Arc<LiveSessions>,
    directory: Arc<dyn SessionDirectory>,
    order: Order,
    /// The live-session entry it counts in.
    generation: u64,
    /// The catalog granted this connection (and must hear when it ends).
    pub(crate) granted: bool,
    left: bool,
}

impl SessionGuard {
    /// Leaves the session (once); returns whether that was its last connection here.
    fn leave(&mut self) -> bool {
        if std::mem::replace(&mut self.left, true) {
            return false;
        }
        self.live.leave(&self.target, self.generation, self.granted)
    }

    /// Ends this connection's hold and tells the catalog what it moved.
    pub(crate) async fn close(mut self, read: u64, written: u64) {
        let _in_order = self.order.clone().lock_owned().await;
        let last = self.leave();
        if self.granted {
            self.granted = false;
            self.directory
                .detached(&self.target, read, written, last)
                .await;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if self.granted => {
                // Leave and tell the catalog in order with this session's other
                // connections (see `LiveSessions::orders`).
                self.left = true;
                let (live, directory, target, order, generation) = (
                    self.live.clone(),
                    self.directory.clone(),
                    self.target.clone(),
                    self.order.clone(),
                    self.generation,
                );
                runtime.spawn(async move {
                    let _in_order = order.lock_owned().await;
                    let last = live.leave(&target, generation, true);
                    directory.detached(&target, 0, 0, last).await;
                });
            }
            _ => {
                self.leave();
            }
        }
    }
}

/// A connection's hold on a plain name: ended when a private session starts writing the
/// image behind it.
#[derive(Debug)]
pub struct ReaderGuard {
    /// Cancelled when a private session takes the image.
    pub ended: CancellationToken,
    identity: String,
    live: Arc<LiveSessions>,
}

/// An image as readers of its plain name opened it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadImage<'a> {
    /// Its identity on this server.
    pub identity: &'a str,
    /// The backend's configured name.
    pub backend: &'a str,
    /// Its key on that backend.
    pub key: &'a str,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.live.leave_reader(&self.identity, &self.ended);
    }
}

impl LiveSessions {
    /// Counts a connection of `target` on this server (starting the live session if it
    /// has none here): refused if a newer session of the client replaced it. The guard
    /// it returns is not granted yet (see [`SessionGuard`]).
    /// The lock that orders the catalog calls of `session`'s connections on this server.
    pub(crate) fn order(&self, session: &str) -> Order {
        let mut orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(order) = orders.get(session).and_then(std::sync::Weak::upgrade) {
            return order;
        }
        orders.retain(|_, order| order.strong_count() > 0);
        let order = Order::default();
        orders.insert(session.to_owned(), Arc::downgrade(&order));
        order
    }

    /// How many connections of the session `id` this server has.
    pub(crate) fn connections(&self, id: &str) -> usize {
        let live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        live.values()
            .filter(|s| s.session == id)
            .map(|s| s.connections)
            .sum()
    }

    pub(crate) fn join(
        self: &Arc<Self>,
        target: &SessionTarget,
        peer: &str,
        directory: Arc<dyn SessionDirectory>,
    ) -> Result<SessionGuard> {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let host = peer
            .rsplit_once(':')
            .map_or(peer, |(host, _)| host)
            .to_owned();
        if let Some(newer) = live
            .get(&target.client)
            .filter(|s| s.session != target.session && s.started_at > target.started_at)
        {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "session {} was replaced by the client's newer session {}",
                    target.session, newer.session
                ),
            )
            .with_op("open_session"));
        }
        let entry = match live
            .get_mut(&target.client)
            .filter(|s| s.session == target.session)
        {
            Some(entry) => {
                if entry.connections > 0 && !entry.peers.contains(&host) {
                    tracing::warn!(client = %target.client, session = %target.session, new_peer = %peer,
                        existing = ?entry.peers, "two live peers claim one client: conflict");
                }
                entry
            }
            None => {
                if let Some(old) = live.remove(&target.client) {
                    tracing::info!(client = %target.client, old = %old.session, new = %target.session,
                        "a new session replaces the client's old one; closing its connections");
                    old.ended.cancel();
                }
                live.entry(target.client.clone()).or_insert(LiveSession {
                    session: target.session.clone(),
                    started_at: target.started_at,
                    overlay: None,
                    ended: CancellationToken::new(),
                    connections: 0,
                    peers: HashSet::new(),
                    held_since: None,
                    pending: 0,
                    generation: self
                        .generations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                })
            }
        };
        entry.connections += 1;
        entry.pending += 1;
        entry.peers.insert(host);
        let (ended, generation) = (entry.ended.clone(), entry.generation);
        drop(live);
        Ok(SessionGuard {
            target: target.clone(),
            ended,
            live: self.clone(),
            directory,
            order: self.order(&target.session),
            generation,
            granted: false,
            left: false,
        })
    }

    /// Records that the catalog granted `guard`'s connection now (for [`Self::retain`]):
    /// a catalog snapshot taken before this grant (when a private session was let go
    /// between two connections, say) must not end it.
    pub(crate) fn granted(&self, guard: &mut SessionGuard) {
        guard.granted = true;
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = live
            .get_mut(&guard.target.client)
            .filter(|s| s.session == guard.target.session && s.generation == guard.generation)
        {
            entry.held_since = Some(Instant::now());
            entry.pending = entry.pending.saturating_sub(1);
        }
    }

    /// The session's overlay on this server, made by `make` the first time.
    /// Each live session with an overlay here: session id, client, and the overlay's
    /// bytes in RAM and on disk.
    pub(crate) fn overlay_usage(&self) -> Vec<OverlayUsage> {
        let live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .filter_map(|(client, entry)| {
                let (overlay, _) = entry.overlay.as_ref()?;
                let (ram, disk) = overlay.usage();
                Some(OverlayUsage {
                    session: entry.session.clone(),
                    client: client.clone(),
                    ram,
                    disk,
                })
            })
            .collect()
    }

    pub(crate) fn overlay(
        &self,
        target: &SessionTarget,
        base_generation: &str,
        make: impl FnOnce() -> Result<Arc<CowLayer>>,
    ) -> Result<Arc<CowLayer>> {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live
            .get_mut(&target.client)
            .filter(|s| s.session == target.session)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("session {} ended while connecting", target.session),
                )
            })?;
        if let Some((overlay, made_over)) = &entry.overlay {
            if made_over != base_generation {
                // The image changed in place since the overlay was made (a file copied
                // over it): the client's writes would sit on another disk's blocks.
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the image of session {} changed in place while the session lived \
                         (generation {made_over} then, {base_generation} now): its overlay \
                         belongs to the old image; the client must boot again (a new session)",
                        target.session
                    ),
                )
                .with_op("attach"));
            }
            return Ok(overlay.clone());
        }
        let overlay = make()?;
        entry.overlay = Some((overlay.clone(), base_generation.to_owned()));
        Ok(overlay)
    }

    /// Ends the connections of every live session whose id `is_live` rejects (closed in
    /// the catalog, or held by another server now), among those this server held before
    /// `as_of` (the moment the catalog was asked).
    /// Returns the ids of the sessions whose open connections it ended.
    pub(crate) fn retain(&self, is_live: impl Fn(&str) -> bool, as_of: Instant) -> Vec<String> {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = Vec::new();
        live.retain(|_, session| {
            let keep = session.pending > 0
                || session.held_since.is_none_or(|since| since > as_of)
                || is_live(&session.session);
            if !keep {
                session.ended.cancel();
                if session.connections > 0 {
                    ended.push(session.session.clone());
                }
            }
            keep
        });
        ended
    }

    /// Ids of sessions with at least one connection.
    pub(crate) fn connected(&self) -> Vec<String> {
        let live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        live.values()
            .filter(|s| s.connections > 0)
            .map(|s| s.session.clone())
            .collect()
    }

    /// Leaves the session entry `generation` (of a connection the catalog `granted` or
    /// not); returns whether that was the session's last connection here.
    fn leave(&self, target: &SessionTarget, generation: u64, granted: bool) -> bool {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        match live
            .get_mut(&target.client)
            .filter(|s| s.session == target.session)
        {
            Some(entry) if entry.generation == generation => {
                entry.connections = entry.connections.saturating_sub(1);
                if !granted {
                    entry.pending = entry.pending.saturating_sub(1);
                }
                if entry.connections == 0 {
                    entry.peers.clear();
                }
                entry.connections == 0
            }
            // The session was ended here and joined again since: the new connections
            // hold it now.
            Some(_) => false,
            // Replaced or ended meanwhile: this was the old session's last word here.
            None => true,
        }
    }

    /// Counts a reader of the plain name of `image`.
    pub(crate) fn add_reader(self: &Arc<Self>, image: ReadImage<'_>) -> ReaderGuard {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        let entry = readers
            .entry(image.identity.to_owned())
            .or_insert_with(|| Readers {
                count: 0,
                ended: CancellationToken::new(),
                backend: image.backend.to_owned(),
                key: image.key.to_owned(),
            });
        entry.count += 1;
        ReaderGuard {
            ended: entry.ended.clone(),
            identity: image.identity.to_owned(),
            live: self.clone(),
        }
    }

    fn leave_reader(&self, identity: &str, ended: &CancellationToken) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = readers.get_mut(identity)
            && !entry.ended.is_cancelled()
            && !ended.is_cancelled()
        {
            entry.count -= 1;
            if entry.count == 0 {
                readers.remove(identity);
            }
        }
    }

    /// Ends the plain-name readers of every image `doomed` names; returns how many
    /// images had readers.
    pub(crate) fn end_readers(&self, doomed: impl Fn(ReadImage<'_>) -> bool) -> usize {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = 0;
        readers.retain(|identity, entry| {
            let image = ReadImage {
                identity,
                backend: &entry.backend,
                key: &entry.key,
            };
            if doomed(image) {
                tracing::info!(image = %identity, readers = entry.count, "a private session writes this image: ending its plain-name readers");
                entry.ended.cancel();
                ended += 1;
                false
            } else {
                true
            }
        });
        ended
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[derive(Debug)]
    struct NoCatalog;

    #[async_trait]
    impl SessionDirectory for NoCatalog {
        async fn resolve(&self, _: &str, _: &str) -> Result<SessionTarget> {
            Err(Error::new(ErrorKind::NotFound, "none"))
        }
        async fn attach(&self, _: &SessionTarget, _: &str, _: &str) -> Result<Grant> {
            Err(Error::new(ErrorKind::NotFound, "none"))
        }
        async fn detached(&self, _: &SessionTarget, _: u64, _: u64, _: bool) {}
        async fn check_lock(&self, _: &LockToken) -> Result<()> {
            Ok(())
        }
        fn holds_lease(&self) -> bool {
            true
        }
        async fn renew_lease(&self, _: &LockToken) -> Result<()> {
            Ok(())
        }
        async fn image_state(&self, _: &str, _: &str, _: &str) -> Result<ImageState> {
            Ok(ImageState::default())
        }
    }

    fn target(session: &str, started_at: i64) -> SessionTarget {
        SessionTarget {
            group: None,
            session: session.to_owned(),
            client: "aa:bb:cc:dd:ee:ff".to_owned(),
            vdisk: "dev".to_owned(),
            backend: "images".to_owned(),
            image: "dev".to_owned(),
            overlay: None,
            description: String::new(),
            started_at,
        }
    }

    #[test]
    fn a_newer_session_replaces_an_older_one_never_the_other_way() {
        let live = Arc::new(LiveSessions::default());
        let directory: Arc<dyn SessionDirectory> = Arc::new(NoCatalog);
        let old = live
            .join(&target("s1", 1), "10.0.0.1:1", directory.clone())
            .unwrap();
        let new = live
            .join(&target("s2", 2), "10.0.0.1:2", directory.clone())
            .unwrap();
        assert!(old.ended.is_cancelled() && !new.ended.is_cancelled());
        let err = live
            .join(&target("s1", 1), "10.0.0.1:3", directory)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("replaced by the client's newer session s2"),
            "{err}"
        );
    }

    #[test]
    fn a_catalog_snapshot_older_than_a_join_ends_nothing() {
        let live = Arc::new(LiveSessions::default());
        let directory: Arc<dyn SessionDirectory> = Arc::new(NoCatalog);
        let before = Instant::now();
        let mut guard = live
            .join(&target("s1", 1), "10.0.0.1:1", directory)
            .unwrap();
        live.retain(|_| false, Instant::now());
        assert!(
            !guard.ended.is_cancelled(),
            "not granted by the catalog yet"
        );
        live.granted(&mut guard);
        live.retain(|_| false, before);
        assert!(!guard.ended.is_cancelled(), "granted after the snapshot");
        live.retain(|_| false, Instant::now());
        assert!(guard.ended.is_cancelled());
        guard.granted = false;
    }

    #[test]
    fn a_reconnect_granted_after_a_snapshot_is_not_ended_by_it() {
        // A private session let go between two connections: the catalog snapshot taken
        // in between does not list it, but the reconnect was granted after it.
        let live = Arc::new(LiveSessions::default());
        let directory: Arc<dyn SessionDirectory> = Arc::new(NoCatalog);
        let mut first = live
            .join(&target("s1", 1), "10.0.0.1:1", directory.clone())
            .unwrap();
        live.granted(&mut first);
        assert!(first.leave());
        let snapshot = Instant::now();
        let mut second = live
            .join(&target("s1", 1), "10.0.0.1:2", directory)
            .unwrap();
        // Still waiting for the catalog when the snapshot is applied: kept.
        assert!(live.retain(|_| false, snapshot).is_empty());
        live.granted(&mut second);
        assert!(live.retain(|_| false, snapshot).is_empty());
        assert!(!second.ended.is_cancelled());
        second.granted = false; // nothing to tell the (absent) catalog
    }

    #[test]
    fn a_late_leave_of_an_ended_entry_never_counts_down_a_new_one() {
        let live = Arc::new(LiveSessions::default());
        let directory: Arc<dyn SessionDirectory> = Arc::new(NoCatalog);
        let mut old = live
            .join(&target("s1", 1), "10.0.0.1:1", directory.clone())
            .unwrap();
        live.granted(&mut old);
        // Ended here (taken elsewhere), then the client reconnects here.
        live.retain(|_| false, Instant::now());
        let mut new = live
            .join(&target("s1", 1), "10.0.0.1:2", directory)
            .unwrap();
        live.granted(&mut new);
        assert!(
            !old.leave(),
            "the old connection's leave is not the session's last"
        );
        assert_eq!(live.connections("s1"), 1);
        new.granted = false;
    }

    #[test]
    fn readers_of_an_image_end_when_a_private_session_takes_it() {
        let live = Arc::new(LiveSessions::default());
        let image = |identity: &'static str, key: &'static str| ReadImage {
            identity,
            backend: "images",
            key,
        };
        let a = live.add_reader(image("file:/x.img", "x"));
        let b = live.add_reader(image("file:/y.img", "y"));
        assert_eq!(live.end_readers(|i| i.identity == "file:/x.img"), 1);
        assert!(a.ended.is_cancelled() && !b.ended.is_cancelled());
        drop(a);
        // A new reader of the image after that is a new group; found by backend and key
        // too (another host's identity of the image).
        let c = live.add_reader(image("file:/x.img", "x"));
        assert!(!c.ended.is_cancelled());
        assert_eq!(
            live.end_readers(|i| i.backend == "images" && i.key == "x"),
            1
        );
        assert!(c.ended.is_cancelled());
    }
}
