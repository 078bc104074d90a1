//! The catalog as the engine's session directory: tokens to vdisks, with the checks the
//! catalog owns (session live, vdisk assigned and enabled, private lock held, one server
//! at a time), and the loop that keeps this server's view and the catalog's in step.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use osstream_catalog::{Catalog, ImageRef, ServerRef, SessionTimers, SqlCatalog, VdiskMode, ended};
use osstream_core::{
    Error, ErrorKind, Exports, Grant, ImageState, LockToken, OverlayKind, OverlaySettings, Result,
    SessionDirectory, SessionTarget, async_trait,
};
use tokio_util::sync::CancellationToken;

/// Resolves `s/<token>` exports through the catalog, as the server `me`.
#[derive(Debug)]
pub struct CatalogSessions {
    catalog: SqlCatalog,
    me: ServerRef,
    timers: SessionTimers,
    /// The moment the lease runs out (milliseconds after `epoch`): this server's last
    /// heartbeat that reached the catalog, plus half the server timeout. Another server
    /// takes this one's sessions only after a whole timeout without a heartbeat.
    lease_until: AtomicU64,
    epoch: Instant,
}

impl CatalogSessions {
    pub fn new(catalog: SqlCatalog, me: ServerRef, timers: SessionTimers) -> Self {
        let sessions = CatalogSessions {
            catalog,
            me,
            timers,
            lease_until: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        sessions.extend_lease(Instant::now());
        sessions
    }

    /// Extends the lease from `sent`, the moment the heartbeat that reached the catalog
    /// was sent.
    fn extend_lease(&self, sent: Instant) {
        let valid = Duration::from_millis(self.timers.server_timeout_ms.max(0) as u64 / 2);
        let until = (sent + valid).saturating_duration_since(self.epoch);
        self.lease_until
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }
}

#[async_trait]
impl SessionDirectory for CatalogSessions {
    async fn resolve(&self, token: &str, peer: &str) -> Result<SessionTarget> {
        let session = self.catalog.session_by_token(token).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, "unknown session token").with_context("peer", peer)
            } else {
                e
            }
        })?;
        if session.closed_at.is_some() {
            return Err(ended(&session).with_context("peer", peer));
        }
        let vdisk = self.catalog.vdisk(&session.vdisk).await?;
        if !vdisk.enabled {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("vdisk {:?} is disabled", vdisk.name),
            ));
        }
        let assigned = self
            .catalog
            .assignments(&session.mac)
            .await?
            .iter()
            .any(|a| a.vdisk == vdisk.name);
        if !assigned {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "vdisk {:?} is not assigned to client {}",
                    vdisk.name, session.mac
                ),
            )
            .with_context("peer", peer));
        }
        if vdisk.mode == VdiskMode::Private
            && vdisk.locked_by.as_deref() != Some(session.id.as_str())
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "private vdisk {:?} is locked by {}",
                    vdisk.name,
                    vdisk
                        .locked_by
                        .as_deref()
                        .map_or("nobody (the lock was cleared)".to_owned(), |s| format!(
                            "session {s}"
                        ))
                ),
            ));
        }
        // For [limits]: a client removed meanwhile simply has no group.
        let group = self
            .catalog
            .client(&session.mac)
            .await
            .ok()
            .and_then(|c| c.group);
        let overlay = vdisk.overlay();
        Ok(SessionTarget {
            group,
            session: session.id,
            client: session.mac.to_string(),
            vdisk: vdisk.name.clone(),
            backend: vdisk.backend,
            // The image it started on, even after the vdisk's image was replaced.
            image: session.image_key.unwrap_or(vdisk.key),
            overlay,
            started_at: session.started_at,
            description: if vdisk.description.is_empty() {
                vdisk.name
            } else {
                vdisk.description
            },
        })
    }

    async fn attach(&self, target: &SessionTarget, image: &str, peer: &str) -> Result<Grant> {
        let image = ImageRef {
            identity: image,
            backend: &target.backend,
            key: &target.image,
        };
        let holding = self
            .catalog
            .attach_session(&target.session, &self.me, image, peer, &self.timers)
            .await
            .map_err(|e| e.with_context("peer", peer))?;
        if let Some(gone) = &holding.taken_from {
            tracing::info!(session = %target.session, vdisk = %target.vdisk, epoch = holding.epoch,
                "took the session over from {gone}, whose heartbeat lapsed");
        }
        let shared = target.overlay.is_some_and(OverlayKind::is_shared);
        Ok(Grant {
            lock: (target.is_private() || shared).then(|| LockToken {
                vdisk: target.vdisk.clone(),
                session: target.session.clone(),
                image: holding.image.clone(),
                epoch: holding.epoch,
                overlay: shared,
            }),
            image_epoch: holding.image_epoch,
        })
    }

    async fn detached(&self, target: &SessionTarget, read: u64, written: u64, last: bool) {
        if let Err(err) = self.catalog.record_io(&target.session, read, written).await {
            tracing::warn!(session = %target.session, %err, "cannot record session I/O");
        }
        match self
            .catalog
            .detach_session(&target.session, &self.me, last, target.is_private())
            .await
        {
            Ok(None) if last => {
                tracing::info!(session = %target.session, vdisk = %target.vdisk, grace = ?Duration::from_millis(self.timers.grace_ms as u64),
                    "the session's last connection here closed; it ends after the grace period unless the client comes back")
            }
            Ok(Some(why)) => {
                tracing::info!(session = %target.session, vdisk = %target.vdisk,
                    "the session's last connection here closed; the session had ended: {why}")
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(session = %target.session, %err, "cannot record the session's detach")
            }
        }
    }

    async fn check_lock(&self, lock: &LockToken) -> Result<()> {
        self.catalog.check_lock(lock).await
    }

    fn holds_lease(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.lease_until.load(Ordering::Relaxed)
    }

    async fn renew_lease(&self, lock: &LockToken) -> Result<()> {
        let sent = Instant::now();
        self.catalog.heartbeat(&self.me).await?;
        self.catalog.check_lock(lock).await?;
        // The epoch is still this holding's: nobody took over during the stall, and with
        // the heartbeat just sent nobody can for another lease.
        self.extend_lease(sent);
        Ok(())
    }

    async fn image_state(&self, image: &str, backend: &str, key: &str) -> Result<ImageState> {
        let image_use = self
            .catalog
            .image_use(ImageRef {
                identity: image,
                backend,
                key,
            })
            .await?;
        Ok(ImageState {
            writer: image_use
                .writer
                .map(|(vdisk, session)| format!("private vdisk {vdisk:?} (session {session})")),
            epoch: image_use.epoch,
        })
    }
}

/// Every `period` (until `shutdown`): the heartbeat; ends the connections here of
/// sessions the catalog no longer has this server hold (closed, replaced, taken after a
/// lapse) and renews the lease; brings the catalog's record of this server's attachments
/// in line with its connections; ends plain-name readers of images a private session
/// writes. Its housekeeping (ending idle sessions, removing old overlays) runs in a task
/// of its own, so a slow round of it never delays the heartbeat.
pub async fn reconcile(
    directory: Arc<CatalogSessions>,
    registration: osstream_catalog::Registration,
    placement: Arc<crate::placement::CatalogPlacement>,
    exports: Arc<Exports>,
    period: Duration,
    overlays: OverlaySettings,
    shutdown: CancellationToken,
) {
    tokio::spawn(housekeeping(
        directory.clone(),
        exports.clone(),
        period,
        overlays,
        shutdown.clone(),
    ));
    let catalog = directory.catalog.clone();
    let me = directory.me.clone();
    let mut meter = crate::placement::LoadMeter::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        if let Err(err) = catalog
            .heartbeat_with_load(&me, meter.bytes_per_sec())
            .await
        {
            if err.kind() == ErrorKind::NotFound {
                // It was cut off long enough to look gone, and an admin removed it; it
                // holds no session the catalog knows of, so it may simply come back.
                match catalog.rejoin(&me, &registration).await {
                    Ok(()) => {
                        tracing::warn!(%err, "registered this server in the catalog again (a drain set before is not restored)")
                    }
                    Err(again) => {
                        tracing::warn!(%err, %again, "heartbeat failed and registering again failed too")
                    }
                }
            } else {
                tracing::warn!(%err, "heartbeat failed; writes of private sessions stop once the lease runs out");
            }
            continue;
        }
        placement.refresh().await;
        match catalog.held_sessions(&me).await {
            Ok(held) => {
                for id in exports.retain_sessions(|id| held.contains(id), sent) {
                    let why = match catalog.session(&id).await {
                        Ok(session) if session.closed_at.is_some() => format!(
                            "it ended: {}",
                            session.end_reason.as_deref().unwrap_or("closed")
                        ),
                        Ok(session) => format!(
                            "server {} holds it now",
                            session.owner.as_deref().unwrap_or("(none)")
                        ),
                        Err(err) => format!("it is gone from the catalog ({err})"),
                    };
                    tracing::info!(session = %id, "ending the session's connections here: {why}");
                }
                // Only now: a session another server took meanwhile is ended above
                // before this server may write again.
                directory.extend_lease(sent);
            }
            Err(err) => tracing::warn!(%err, "cannot read the sessions this server holds"),
        }
        match catalog.locked_images().await {
            Ok(locked) => {
                exports.end_readers(|identity, backend, key| {
                    locked.iter().any(|(recorded, b, k)| {
                        recorded.as_deref() == Some(identity) || (b == backend && k == key)
                    })
                });
            }
            Err(err) => tracing::warn!(%err, "cannot read locked images"),
        }
    }
}

/// Corrects the catalog where it records this server's sessions as attached without a
/// connection here (a detach that failed), or detached while connections are open (a
/// server that missed heartbeats and came back).
async fn sync_attachments(catalog: &SqlCatalog, me: &ServerRef, exports: &Exports) {
    let held = match catalog.held_attachments(me).await {
        Ok(held) => held,
        Err(err) => {
            tracing::warn!(%err, "cannot read this server's attachments");
            return;
        }
    };
    for (id, attached, private, closed) in held {
        let fixed = exports
            .with_connections(&id, async |connections| {
                if attached && connections == 0 {
                    catalog
                        .detach_session(&id, me, true, private)
                        .await
                        .map(|_| Some("recorded as attached with no connection here: detached"))
                } else if !attached && connections > 0 && !closed {
                    catalog.reattach_session(&id, me).await.map(|()| {
                        Some("recorded as detached with connections here: attached again")
                    })
                } else {
                    Ok(None)
                }
            })
            .await;
        match fixed {
            Some(Ok(Some(what))) => tracing::info!(session = %id, "{what}"),
            // Nothing to correct, or a connection is joining or leaving: next round.
            Some(Ok(None)) | None => {}
            Some(Err(err)) => {
                tracing::warn!(session = %id, %err, "cannot correct the session's attachment")
            }
        }
    }
}

/// Every `period`: releases the sessions of servers that are gone and ends those past
/// their grace or lease (any server does it); now and then removes the overlay folders
/// of ended sessions.
async fn housekeeping(
    directory: Arc<CatalogSessions>,
    exports: Arc<Exports>,
    period: Duration,
    overlays: OverlaySettings,
    shutdown: CancellationToken,
) {
    let catalog = directory.catalog.clone();
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        sync_attachments(&catalog, &directory.me, &exports).await;
        match catalog
            .reap_sessions(&directory.me, &directory.timers)
            .await
        {
            Ok(changes) => {
                for (session, what) in changes {
                    tracing::info!(session = %session.id, client = %session.mac, vdisk = %session.vdisk, "session {what}");
                }
            }
            Err(err) => tracing::warn!(%err, "cannot end idle sessions"),
        }
        if last_sweep.elapsed() >= period * SWEEP_ROUNDS {
            last_sweep = Instant::now();
            sweep_overlays(&catalog, &exports, &overlays).await;
        }
        // Retired a few rounds ago at least: a session whose opening read the old key
        // just before the replace has committed by then.
        let grace = (period * SWEEP_ROUNDS).as_millis() as i64;
        delete_retired_images(&catalog, &exports, crate::stats::now_ms() - grace).await;
    }
}

/// Deletes every retired image (a vdisk's image replaced under running clients) retired
/// before `before` (Unix milliseconds) that no live session reads any more, through
/// `exports` (which drops its cached blocks too); an image of a backend this server does
/// not configure is left to a server that has it.
async fn delete_retired_images(catalog: &SqlCatalog, exports: &Exports, before: i64) {
    let retired = match catalog.retired_before(before).await {
        Ok(retired) => retired,
        Err(err) => {
            tracing::warn!(%err, "cannot list retired images");
            return;
        }
    };
    for image in retired {
        match catalog.readers_of_retired(&image).await {
            Ok(0) => {}
            Ok(_) => continue,
            Err(err) => {
                tracing::warn!(%err, "cannot count the readers of a retired image");
                return;
            }
        }
        let outcome = match exports.remove_image(&image.backend, &image.key).await {
            Ok(true) => "deleted: its last session ended".to_owned(),
            // Not a backend of this server: one that has it deletes it.
            Ok(false) => continue,
            // Another server or an admin got there first.
            Err(err) if err.kind() == ErrorKind::NotFound => "already gone".to_owned(),
            Err(err) if err.kind() == ErrorKind::Unsupported => format!("left in place: {err}"),
            Err(err) => {
                tracing::warn!(backend = %image.backend, key = %image.key, %err, "cannot delete a retired image; trying again later");
                continue;
            }
        };
        tracing::info!(vdisk = %image.vdisk, backend = %image.backend, key = %image.key, "old image of a replaced vdisk {outcome}");
        if let Err(err) = catalog.forget_retired(&image).await {
            tracing::warn!(%err, "cannot forget a retired image");
        }
    }
}

/// Every this many reconcile rounds, the overlay folders of ended sessions are removed.
const SWEEP_ROUNDS: u32 = 5;

/// Removes the folders `<overlays>/<client>/<vdisk>/session-<id>` of sessions that are
/// no longer live (persistent overlays stay), then empty client and vdisk folders. In
/// the shared overlay folder, which every server sweeps, only folders of sessions the
/// catalog says have ended go: a folder of a session another server just opened (newer
/// than the list of live ones read here) stays.
pub async fn sweep_overlays(catalog: &SqlCatalog, exports: &Exports, overlays: &OverlaySettings) {
    let live = match catalog.live_session_ids().await {
        Ok(live) => live,
        Err(err) => {
            tracing::warn!(%err, "cannot read live sessions to remove old overlays");
            return;
        }
    };
    let connected = exports.connected_sessions();
    let dir = overlays.dir.clone();
    let live_here = live.clone();
    let swept = osstream_core::run_blocking("sweep overlays", move || {
        remove_ended_overlays(&dir, &|id| {
            live_here.contains(id) || connected.iter().any(|c| c == id)
        });
        Ok(())
    })
    .await;
    if let Err(err) = swept {
        tracing::warn!(%err, "cannot remove old write overlays");
    }
    let Some(shared) = overlays.shared_dir.clone() else {
        return;
    };
    // Listed off the runtime's threads: the shared folder is a network mount.
    let listed = {
        let shared = shared.clone();
        osstream_core::run_blocking("list shared overlays", move || Ok(session_folders(&shared)))
            .await
    };
    let folders = match listed {
        Ok(folders) => folders,
        Err(err) => {
            tracing::warn!(%err, "cannot list the shared write overlays");
            return;
        }
    };
    let mut ended = std::collections::HashSet::new();
    for id in folders {
        if live.contains(&id) {
            continue;
        }
        if let Ok(session) = catalog.session(&id).await
            && session.closed_at.is_some()
        {
            ended.insert(id);
        }
    }
    if ended.is_empty() {
        return;
    }
    let swept = osstream_core::run_blocking("sweep shared overlays", move || {
        remove_ended_overlays(&shared, &|id| !ended.contains(id));
        Ok(())
    })
    .await;
    if let Err(err) = swept {
        tracing::warn!(%err, "cannot remove old shared write overlays");
    }
}

/// The session ids of the `<client>/<vdisk>/session-<id>` folders under `overlays`.
fn session_folders(overlays: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::new();
    walk_session_folders(overlays, &mut |id, _| ids.push(id.to_owned()));
    ids
}

/// Removes the `session-<id>` folders under `overlays` whose session `keep` rejects,
/// then empty client and vdisk folders.
fn remove_ended_overlays(overlays: &std::path::Path, keep: &dyn Fn(&str) -> bool) {
    walk_session_folders(overlays, &mut |id, folder| {
        if keep(id) {
            return;
        }
        match std::fs::remove_dir_all(folder) {
            Ok(()) => {
                tracing::info!(session = id, folder = %folder.display(), "removed the write overlay of an ended session")
            }
            Err(err) => {
                tracing::warn!(folder = %folder.display(), %err, "cannot remove an old write overlay")
            }
        }
    });
    let Ok(clients) = std::fs::read_dir(overlays) else {
        return;
    };
    for client in clients.flatten() {
        for vdisk in std::fs::read_dir(client.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            // Fails (and keeps the folder) while anything is left in it.
            let _ = std::fs::remove_dir(vdisk.path());
        }
        let _ = std::fs::remove_dir(client.path());
    }
}

/// Calls `visit(id, folder)` for each `<client>/<vdisk>/session-<id>` folder under
/// `overlays` (persistent overlays and anything else are passed over).
fn walk_session_folders(overlays: &std::path::Path, visit: &mut dyn FnMut(&str, &std::path::Path)) {
    let Ok(clients) = std::fs::read_dir(overlays) else {
        return;
    };
    for client in clients.flatten() {
        let Ok(vdisks) = std::fs::read_dir(client.path()) else {
            continue;
        };
        for vdisk in vdisks.flatten() {
            let Ok(folders) = std::fs::read_dir(vdisk.path()) else {
                continue;
            };
            for folder in folders.flatten() {
                let name = folder.file_name();
                if let Some(id) = name.to_str().and_then(|n| n.strip_prefix("session-")) {
                    visit(id, &folder.path());
                }
            }
        }
    }
}

/// This server's lasting id, kept in `<data_dir>/server-id` (made on first start), and a
/// lock on `<data_dir>/server.lock` held while the process runs: two servers on one data
/// directory would share overlays and an id.
pub fn server_identity(data_dir: &std::path::Path) -> Result<(ServerRef, std::fs::File)> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let lock_path = data_dir.join("server.lock");
    let mut lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::from_io(e, format!("cannot open {}", lock_path.display())))?;
    // SAFETY: flock only reads the descriptor, which `lock` keeps open for the call.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "another osstream server runs on data_dir {} (pid {}); give each server its own data_dir",
                data_dir.display(),
                holder.trim()
            ),
        ));
    }
    let _ = lock.set_len(0);
    let _ = write!(lock, "{}", std::process::id());
    let id_path = data_dir.join("server-id");
    let id = match std::fs::read_to_string(&id_path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let id = random_hex(8)?;
            std::fs::write(&id_path, format!("{id}\n"))
                .map_err(|e| Error::from_io(e, format!("cannot write {}", id_path.display())))?;
            id
        }
    };
    Ok((
        ServerRef {
            id,
            instance: random_hex(8)?,
        },
        lock,
    ))
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::from_io(e, "cannot read /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The host name, for the servers table.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
