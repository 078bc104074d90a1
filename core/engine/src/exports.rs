//! [`Exports`]: the names protocols serve, resolved to layered sources.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::attach::{AttachContext, AttachRequest, Attachment, ExportName, Hold, Hooks, Intent};
use crate::backend::{DynBackend, ImageStat, OpenMode, validate_image_name};
use crate::cow::{CowLayer, DiskOverlay, OverlayStore, RamOverlay, SpillOverlay};
use crate::error::{Error, ErrorKind, Result};
use crate::fence::{FencedSource, Regenerated};
use crate::layer::Layer;
use crate::limits::Limits;
use crate::sessions::{
    Grant, LiveSessions, OverlayKind, OverlaySettings, ReadImage, SessionDirectory, SessionTarget,
};
use crate::source::DynSource;

/// How long a private session waits for its image's previous holder to close (less than
/// the NBD handshake's default timeout, so the client hears why).
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(8);
/// How often it asks the catalog meanwhile.
const HANDOVER_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// One name a client may open, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// The name to ask for: the image name, or `BACKEND/IMAGE` when two backends hold an
    /// image of the same name.
    pub name: String,
    /// A human-readable line for listings.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Opened read-write.
    pub writable: bool,
}

/// A session's disk as [`Exports::session_view`] describes it, without attaching.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// What the token resolved to.
    pub target: SessionTarget,
    /// The base image's identity.
    pub identity: String,
    /// The base image's generation as the layers key it.
    pub generation: String,
    /// Size in bytes.
    pub size: u64,
}

/// Resolves export names to images on the configured backends and wraps each opened
/// image in the configured layers, in order (the first layer sits next to the backend).
///
/// Listing and opening ask the backends every time, so images added to or removed from a
/// backend show up without a restart. Layers hold the shared state (one RAM cache for all
/// clients), so opening per connection is cheap.
#[derive(Debug)]
pub struct Exports {
    backends: Vec<DynBackend>,
    layers: Vec<Arc<dyn Layer>>,
    sessions: Option<(Arc<dyn SessionDirectory>, OverlaySettings)>,
    live: Arc<LiveSessions>,
    /// Set by [`Exports::single`]: the one export and its prebuilt source.
    single: Option<(ExportEntry, DynSource)>,
    /// `[limits]` for session clients.
    limits: Option<Arc<Limits>>,
}

impl Exports {
    /// Exports over `backends`, wrapped in `layers`.
    pub fn new(backends: Vec<DynBackend>, layers: Vec<Arc<dyn Layer>>) -> Self {
        Exports {
            backends,
            layers,
            sessions: None,
            live: Arc::default(),
            single: None,
            limits: None,
        }
    }

    /// Exports of one prebuilt `source` under `name`, served as the source allows
    /// (read-write when it is writable): the client agent's disk, which the agent
    /// assembles from its own layers. Any other name is `NotFound`; no layer hook runs.
    pub fn single(name: &str, description: &str, source: DynSource) -> Self {
        let entry = ExportEntry {
            name: name.to_owned(),
            description: description.to_owned(),
            size: source.info().size,
            writable: source.capability().write,
        };
        Exports {
            single: Some((entry, source)),
            ..Exports::new(Vec::new(), Vec::new())
        }
    }

    /// Serves session exports (`s/<token>`) resolved by `directory`, with overlays built
    /// as `overlays` says.
    pub fn with_sessions(
        mut self,
        directory: Arc<dyn SessionDirectory>,
        overlays: OverlaySettings,
    ) -> Self {
        self.sessions = Some((directory, overlays));
        self
    }

    /// Limits session clients' bandwidth and IOPS as `limits` says.
    pub fn with_limits(mut self, limits: Option<Arc<Limits>>) -> Self {
        self.limits = limits;
        self
    }

    /// Attaches a client to an export: a session (`s/<token>`) or a plain image name.
    ///
    /// A session gives the vdisk under the shared layers, plus the client's overlay
    /// (standard) or read-write under the vdisk's lock (private). A plain name is always
    /// read-only, also on a writable backend: writes reach an image only through a
    /// private vdisk's session, which holds its lock; an image a private session writes
    /// is refused (`PermissionDenied`), and the attachment's `ended` token fires when one
    /// starts writing it later. With [`Intent::Probe`] nothing of a live session is
    /// taken and no layer hook runs.
    pub async fn attach(&self, request: AttachRequest<'_>) -> Result<Attachment> {
        if let Some((entry, source)) = &self.single {
            if request.name != entry.name {
                return Err(not_found(request.name));
            }
            let context = AttachContext {
                protocol: request.protocol,
                peer: request.peer.to_owned(),
                export: entry.name.clone(),
                client: None,
                session: None,
                vdisk: None,
                image: source.info().identity.clone(),
                generation: source.info().generation.clone(),
            };
            let attachment =
                Attachment::new(source.clone(), entry.clone(), context, Hold::Nothing, None);
            return Ok(attachment);
        }
        match ExportName::parse(request.name) {
            ExportName::Session(token) => self.attach_session(token, &request).await,
            ExportName::Image(name) => self.attach_image(name, &request).await,
        }
    }

    async fn attach_session(&self, token: &str, request: &AttachRequest<'_>) -> Result<Attachment> {
        let Some((directory, overlays)) = &self.sessions else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "this server has no sessions configured",
            )
            .with_op("open_session"));
        };
        let peer = request.peer;
        let target = directory.resolve(token, peer).await?;
        let backend = self.backend(&target)?;
        let identity = backend.identity(&target.image)?;
        let entry = |source: &DynSource| ExportEntry {
            name: ExportName::of_session(&target.session),
            description: target.description.clone(),
            size: source.info().size,
            writable: true,
        };
        let context_of = |source: &DynSource| AttachContext {
            protocol: request.protocol,
            peer: peer.to_owned(),
            export: loggable_export_name(request.name).into_owned(),
            client: Some(target.client.clone()),
            session: Some(target.session.clone()),
            vdisk: Some(target.vdisk.clone()),
            image: identity.clone(),
            generation: source.info().generation.clone(),
        };
        if request.intent == Intent::Probe {
            let base = backend.open(&target.image, OpenMode::ReadOnly).await?;
            let context = context_of(&base);
            let source = self.stack(backend.name(), base, None);
            // Reads of the base, writes nowhere: what a client probing the export sees.
            let source =
                CowLayer::new(Box::new(RamOverlay::new(0)), overlays.block_size).layer(source);
            let entry = entry(&source);
            return Ok(Attachment::new(source, entry, context, Hold::Nothing, None));
        }
        // Joined and granted in order with this session's other connections coming and
        // going here (see `LiveSessions::orders`).
        let order = self.live.order(&target.session);
        let in_order = order.lock().await;
        let mut guard = self.live.join(&target, peer, directory.clone())?;
        let grant = self.grant(directory, &target, &identity, peer).await?;
        self.live.granted(&mut guard);
        drop(in_order);
        let (source, hooks) = match (&grant.lock, target.overlay) {
            (Some(lock), None) if !lock.overlay => {
                // Nobody reads this image by its plain name while it is written.
                self.live.end_readers(|image| {
                    image.identity == identity
                        || (image.backend == target.backend && image.key == target.image)
                });
                let base = backend
                    .open(&target.image, OpenMode::Locked(lock.clone()))
                    .await?;
                let mut hooks = Hooks::new(context_of(&base));
                let source = self.stack(backend.name(), base, Some(&mut hooks));
                let fenced = Arc::new(FencedSource::new(
                    source,
                    lock.clone(),
                    directory.clone(),
                    guard.ended.clone(),
                )) as DynSource;
                (fenced, hooks)
            }
            (lock, Some(kind)) if lock.as_ref().is_some_and(|l| l.overlay) == kind.is_shared() => {
                let base = backend.open(&target.image, OpenMode::ReadOnly).await?;
                let base = Regenerated::wrap(base, grant.image_epoch);
                let mut hooks = Hooks::new(context_of(&base));
                let source = self.stack(backend.name(), base, Some(&mut hooks));
                let image_size = source.info().size;
                let base_generation = source.info().generation.clone();
                let overlay = self.live.overlay(&target, &base_generation, || {
                    let store = make_overlay(overlays, &target, kind, image_size)?;
                    Ok(Arc::new(CowLayer::new(store, overlays.block_size)))
                })?;
                let source = overlay.layer(source);
                match lock {
                    // Another server may take the session when this one goes quiet:
                    // writes stop here once it may have.
                    Some(lock) => (
                        Arc::new(FencedSource::new(
                            source,
                            lock.clone(),
                            directory.clone(),
                            guard.ended.clone(),
                        )) as DynSource,
                        hooks,
                    ),
                    None => (source, hooks),
                }
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Unexpected,
                    format!(
                        "the catalog granted session {} a lock that does not fit its vdisk {:?}",
                        target.session, target.vdisk
                    ),
                ));
            }
        };
        let entry = entry(&source);
        let context = hooks.context().clone();
        let limit = self
            .limits
            .as_ref()
            .and_then(|l| l.for_client(&target.client, target.group.as_deref()));
        Ok(
            Attachment::new(source, entry, context, Hold::Session(guard), Some(hooks))
                .with_limit(limit),
        )
    }

    /// Describes session `token`'s disk (vdisk, base image, generation, size) for a
    /// client at `peer`, checking the token as an attach would; takes nothing of the
    /// session.
    pub async fn session_view(&self, token: &str, peer: &str) -> Result<SessionView> {
        let Some((directory, _)) = &self.sessions else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "this server has no sessions configured",
            )
            .with_op("open_session"));
        };
        let target = directory.resolve(token, peer).await?;
        let backend = self.backend(&target)?;
        let identity = backend.identity(&target.image)?;
        let state = directory
            .image_state(&identity, backend.name(), &target.image)
            .await?;
        let base = backend.open(&target.image, OpenMode::ReadOnly).await?;
        let base = Regenerated::wrap(base, state.epoch);
        Ok(SessionView {
            identity,
            generation: base.info().generation.clone(),
            size: base.info().size,
            target,
        })
    }

    /// The client of session `token` says its boot is complete: the layers recording
    /// its boot end the recording now. Returns the session id and whether a recording
    /// ended (none: not recorded, or already over).
    pub async fn boot_complete(&self, token: &str, peer: &str) -> Result<(String, bool)> {
        let Some((directory, _)) = &self.sessions else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "this server has no sessions configured",
            )
            .with_op("open_session"));
        };
        let target = directory.resolve(token, peer).await?;
        let mut ended = false;
        for layer in &self.layers {
            ended |= layer.boot_complete(&target.session);
        }
        Ok((target.session, ended))
    }

    /// Wraps `base` in every shared layer, the first next to the backend; with `hooks`,
    /// tells each layer of the attachment (the hooks tell them of its end when dropped).
    /// The write overlays of the live sessions on this server, with their sizes.
    pub fn overlay_usage(&self) -> Vec<crate::sessions::OverlayUsage> {
        self.live.overlay_usage()
    }

    /// `base` (from `backend`, counted in its `/metrics`) under every layer.
    fn stack(&self, backend: &str, base: DynSource, mut hooks: Option<&mut Hooks>) -> DynSource {
        let mut source = crate::metrics::metered(base, backend);
        for layer in &self.layers {
            source = layer.layer(source);
            if let Some(hooks) = hooks.as_deref_mut() {
                hooks.attach(layer, &source);
            }
        }
        source
    }

    /// Asks the catalog for the session, waiting (a few seconds at most) while an
    /// earlier holder of a private vdisk's image still has connections open (its
    /// server ends them when it sees the catalog's change, within a reconcile interval).
    async fn grant(
        &self,
        directory: &Arc<dyn SessionDirectory>,
        target: &SessionTarget,
        identity: &str,
        peer: &str,
    ) -> Result<Grant> {
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        loop {
            match directory.attach(target, identity, peer).await {
                Err(err)
                    if err.kind() == ErrorKind::Conflict
                        && err.is_temporary()
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(session = %target.session, %err, "waiting for the previous holder to let go");
                    tokio::time::sleep(HANDOVER_POLL).await;
                }
                outcome => return outcome,
            }
        }
    }

    fn backend(&self, target: &SessionTarget) -> Result<&DynBackend> {
        self.backend_named(&target.backend, &target.vdisk)
    }

    fn backend_named(&self, backend: &str, vdisk: &str) -> Result<&DynBackend> {
        self.backends
            .iter()
            .find(|b| b.name() == backend)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "vdisk {vdisk:?} lives on backend {backend:?}, which this server does not configure"
                    ),
                )
            })
    }

    /// Deletes the image `key` from `backend` (a retired image whose last session ended)
    /// and tells every layer to drop what it keeps of it. `Ok(false)` if this server does
    /// not configure `backend` (another server sharing the catalog may); an image already
    /// gone is the backend's `NotFound`.
    pub async fn remove_image(&self, backend: &str, key: &str) -> Result<bool> {
        let Some(store) = self.backends.iter().find(|b| b.name() == backend) else {
            return Ok(false);
        };
        let identity = store.identity(key)?;
        let generation = store.stat(key).await.map(|stat| stat.generation);
        store.remove(key).await?;
        if let Ok(generation) = generation {
            for layer in &self.layers {
                layer.forget(&identity, &generation);
            }
        }
        Ok(true)
    }

    /// The names of the configured backends (`[backends.NAME]`).
    pub fn backend_names(&self) -> Vec<&str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    /// Opens a boot file of `vdisk` (its kernel or initrd: `key` on `backend`, or
    /// `BACKEND/NAME` on another backend) read-only,
    /// under the shared layers, so a kernel many clients fetch is read from its backend
    /// once. Boot files are not exports: no session, no hooks.
    pub async fn open_boot_file(&self, vdisk: &str, backend: &str, key: &str) -> Result<DynSource> {
        // `BACKEND/NAME` names a boot file of another backend (a disk on S3, its kernel
        // in a file backend's boot folder).
        let (backend, key) = key.split_once('/').unwrap_or((backend, key));
        let backend = self.backend_named(backend, vdisk)?;
        let base = backend.open_boot_file(key).await?;
        Ok(self.stack(backend.name(), base, None))
    }

    /// Ids of the sessions with at least one connection on this server.
    pub fn connected_sessions(&self) -> Vec<String> {
        self.live.connected()
    }

    /// Ends the connections of the sessions this server held before `as_of` that
    /// `is_live` no longer accepts (closed in the catalog, or held by another server).
    /// Returns the ids of the sessions whose connections it ended.
    pub fn retain_sessions(
        &self,
        is_live: impl Fn(&str) -> bool,
        as_of: std::time::Instant,
    ) -> Vec<String> {
        self.live.retain(is_live, as_of)
    }

    /// Runs `check(connections)` with the number of this server's connections of
    /// session `id`, while no connection of it joins or leaves here: for a caller that
    /// brings the catalog's record of this server's attachments in line. `None` (and
    /// `check` is not run) while a connection of the session is joining or leaving.
    pub async fn with_connections<T>(
        &self,
        id: &str,
        check: impl AsyncFnOnce(usize) -> T,
    ) -> Option<T> {
        let order = self.live.order(id);
        let _in_order = order.try_lock().ok()?;
        Some(check(self.live.connections(id)).await)
    }

    /// Ends the plain-name readers of the images `doomed` names (given each image's
    /// identity here, its backend and its key): a private session writes them now.
    pub fn end_readers(&self, doomed: impl Fn(&str, &str, &str) -> bool) -> usize {
        self.live
            .end_readers(|image| doomed(image.identity, image.backend, image.key))
    }

    async fn all_images(&self) -> Result<Vec<(DynBackend, ImageStat)>> {
        let mut all = Vec::new();
        for backend in &self.backends {
            for stat in backend.list().await? {
                all.push((backend.clone(), stat));
            }
        }
        Ok(all)
    }

    /// Every export, sorted by name: images a private session writes are left out (they
    /// are refused by their plain names).
    pub async fn list(&self) -> Result<Vec<ExportEntry>> {
        if let Some((entry, _)) = &self.single {
            return Ok(vec![entry.clone()]);
        }
        let mut images = self.all_images().await?;
        // Counted before images a private session writes are left out: a name is bare
        // only when it resolves to one image, as `resolve` sees them all.
        let mut owners: BTreeMap<String, usize> = BTreeMap::new();
        for (_, stat) in &images {
            *owners.entry(stat.name.clone()).or_default() += 1;
        }
        if let Some((directory, _)) = &self.sessions {
            let mut kept = Vec::with_capacity(images.len());
            for (backend, stat) in images {
                let identity = backend.identity(&stat.name)?;
                let state = directory
                    .image_state(&identity, backend.name(), &stat.name)
                    .await?;
                if state.writer.is_none() {
                    kept.push((backend, stat));
                }
            }
            images = kept;
        }
        let mut entries: Vec<ExportEntry> = images
            .iter()
            .map(|(backend, stat)| {
                let name = if owners[stat.name.as_str()] == 1 {
                    stat.name.clone()
                } else {
                    format!("{}/{}", backend.name(), stat.name)
                };
                ExportEntry {
                    name,
                    description: describe(backend, stat),
                    size: stat.size,
                    writable: false,
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Attaches a reader of the plain name `name` (`IMAGE` or `BACKEND/IMAGE`).
    async fn attach_image(&self, name: &str, request: &AttachRequest<'_>) -> Result<Attachment> {
        let (backend, stat) = self.resolve(name).await?;
        let identity = backend.identity(&stat.name)?;
        // Counted before the catalog is asked: a private session taking the image after
        // the answer ends this reader. A probe reads nothing later, so it is not counted.
        let probe = request.intent == Intent::Probe;
        let reader = (!probe).then(|| {
            self.live.add_reader(ReadImage {
                identity: &identity,
                backend: backend.name(),
                key: &stat.name,
            })
        });
        let mut epoch = 0;
        if let Some((directory, _)) = &self.sessions {
            let state = directory
                .image_state(&identity, backend.name(), &stat.name)
                .await?;
            if let Some(writer) = state.writer {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "export {name:?} refused: {writer} writes this image; plain names never serve an \
                         image a private session is writing"
                    ),
                )
                .with_op("open_export"));
            }
            epoch = state.epoch;
        }
        let base = backend.open_stat(&stat, OpenMode::ReadOnly).await?;
        let base = Regenerated::wrap(base, epoch);
        let context = AttachContext {
            protocol: request.protocol,
            peer: request.peer.to_owned(),
            export: name.to_owned(),
            client: None,
            session: None,
            vdisk: None,
            image: identity,
            generation: base.info().generation.clone(),
        };
        let mut hooks = (!probe).then(|| Hooks::new(context.clone()));
        let source = self.stack(backend.name(), base, hooks.as_mut());
        let entry = ExportEntry {
            name: name.to_owned(),
            description: describe(&backend, &stat),
            size: source.info().size,
            writable: false,
        };
        let hold = reader.map_or(Hold::Nothing, Hold::Reader);
        Ok(Attachment::new(source, entry, context, hold, hooks))
    }

    async fn resolve(&self, name: &str) -> Result<(DynBackend, ImageStat)> {
        if let Some((backend_name, image)) = name.split_once('/') {
            validate_image_name(image)?;
            let backend = self
                .backends
                .iter()
                .find(|b| b.name() == backend_name)
                .ok_or_else(|| not_found(name))?;
            let stat = backend.stat(image).await.map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    not_found(name)
                } else {
                    e
                }
            })?;
            return Ok((backend.clone(), stat));
        }
        validate_image_name(name)?;
        let mut matches = Vec::new();
        for backend in &self.backends {
            match backend.stat(name).await {
                Ok(stat) => matches.push((backend.clone(), stat)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match matches.len() {
            0 => Err(not_found(name)),
            1 => Ok(matches.remove(0)),
            _ => {
                let names: Vec<String> = matches
                    .iter()
                    .map(|(b, _)| format!("{}/{name}", b.name()))
                    .collect();
                Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "export {name:?} is ambiguous; ask for one of: {}",
                        names.join(", ")
                    ),
                )
                .with_op("open_export"))
            }
        }
    }
}

/// Builds the overlay store of a session that has none on this server yet.
///
/// Folders are per session (`<dir>/<client>/<vdisk>/session-<id>/`), so a replaced
/// session still finishing requests never writes into its successor's files; the folders
/// of ended sessions are removed by the server's sweep. Persistent overlays share
/// `<dir>/<client>/<vdisk>/persistent/`. A `server-disk` session that had an overlay here
/// before (the server restarted within the session) gets it back, and a `shared-disk`
/// one gets the overlay its previous server flushed to the shared folder.
fn make_overlay(
    overlays: &OverlaySettings,
    target: &SessionTarget,
    kind: OverlayKind,
    image_size: u64,
) -> Result<Box<dyn OverlayStore>> {
    let base = overlays
        .dir
        .join(overlay_folder(&target.client, &target.vdisk));
    if kind == OverlayKind::ServerDiskPersistent {
        return Ok(Box::new(DiskOverlay::open(
            &base.join("persistent"),
            overlays.block_size,
            image_size,
            true,
        )?));
    }
    let session_folder = format!("session-{}", target.session);
    if kind == OverlayKind::SharedDisk {
        let Some(shared) = &overlays.shared_dir else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "vdisk {:?} keeps its writes in a shared-disk overlay, and this server has no \
                     [sessions] shared_overlay_dir (a folder every server mounts)",
                    target.vdisk
                ),
            )
            .with_op("open_session"));
        };
        // Reopened as it was last flushed when the session moves here from a server
        // that died.
        let dir = shared
            .join(overlay_folder(&target.client, &target.vdisk))
            .join(session_folder);
        return Ok(Box::new(DiskOverlay::open(
            &dir,
            overlays.block_size,
            image_size,
            true,
        )?));
    }
    let dir = base.join(session_folder);
    Ok(match kind {
        OverlayKind::Ram => Box::new(RamOverlay::new(overlays.ram_capacity)),
        OverlayKind::RamOverflowDisk => Box::new(SpillOverlay::new(
            overlays.ram_capacity,
            DiskOverlay::open(&dir, overlays.block_size, image_size, false)?,
        )),
        // Kept when the *server* restarts within the session; a new session has a new folder.
        _ => Box::new(DiskOverlay::open(
            &dir,
            overlays.block_size,
            image_size,
            true,
        )?),
    })
}

/// The folder of a client's overlays of one vdisk, relative to the overlay directory.
fn overlay_folder(client: &str, vdisk: &str) -> std::path::PathBuf {
    std::path::Path::new(&client.replace(':', "-")).join(vdisk)
}

fn describe(backend: &DynBackend, stat: &ImageStat) -> String {
    format!(
        "{} on {} backend '{}'",
        stat.name,
        backend.kind(),
        backend.name()
    )
}

/// An export name fit for logs: a session token (`s/<token>`, a bearer secret) shortened to
/// its first six characters, and so is anything else in the name that looks like a token
/// (a client that sent the bare token, or the token inside a mangled name).
pub fn loggable_export_name(name: &str) -> std::borrow::Cow<'_, str> {
    match ExportName::parse(name) {
        ExportName::Session(token) if token.chars().count() > 6 => {
            let prefix: String = token.chars().take(6).collect();
            std::borrow::Cow::Owned(ExportName::of_session(&format!("{prefix}…")))
        }
        _ => redact_tokens(name),
    }
}

/// `text` with every run of [`TOKEN_LIKE`] or more hexadecimal digits (what session
/// tokens are made of) cut to its first six: for logs and messages that may quote a
/// token a client or an admin mistyped.
pub fn redact_tokens(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if run >= TOKEN_LIKE {
            out.push_str(&text[copied..i + 6]);
            out.push('…');
            copied = i + run;
        }
        i += run.max(1);
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The shortest run of hexadecimal digits [`redact_tokens`] treats as a token (tokens
/// are 48).
const TOKEN_LIKE: usize = 24;

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no export named {:?}", loggable_export_name(name)),
    )
    .with_op("open_export")
}

#[cfg(test)]
mod token_tests {
    use super::{loggable_export_name, redact_tokens};

    #[test]
    fn anything_that_looks_like_a_token_is_cut_to_six_characters() {
        let token = "53b7c6e7c24e38fd772bea9959cc66f6641e36c94fce7f56";
        assert_eq!(loggable_export_name(&format!("s/{token}")), "s/53b7c6…");
        assert_eq!(loggable_export_name(token), "53b7c6…");
        assert_eq!(
            redact_tokens(&format!("127.0.0.1:21510,s/{token}: invalid port é")),
            "127.0.0.1:21510,s/53b7c6…: invalid port é"
        );
        assert_eq!(loggable_export_name("win11"), "win11");
        assert_eq!(redact_tokens("deadbeef cafe"), "deadbeef cafe");
    }
}
