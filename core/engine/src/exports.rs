//! [`Exports`]: the names protocols serve, resolved to layered sources.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::{DynBackend, ImageStat, OpenMode, validate_image_name};
use crate::cow::{CowLayer, DiskOverlay, OverlayStore, RamOverlay, SpillOverlay};
use crate::error::{Error, ErrorKind, Result};
use crate::layer::Layer;
use crate::sessions::{LiveSessions, OverlayKind, OverlaySettings, SessionDirectory, SessionGuard};
use crate::source::DynSource;

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
}

impl Exports {
    /// Exports over `backends`, wrapped in `layers`.
    pub fn new(backends: Vec<DynBackend>, layers: Vec<Arc<dyn Layer>>) -> Self {
        Exports {
            backends,
            layers,
            sessions: None,
            live: Arc::default(),
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

    /// Opens the session export of `token` for a client at `peer`: the vdisk under the
    /// shared layers, plus the client's overlay (standard) or read-write (private).
    ///
    /// With `join` false (a client only asking about the export, NBD `OPT_INFO`), nothing
    /// of the live session is touched: the source has a throwaway overlay and no guard.
    pub async fn open_session(
        &self,
        token: &str,
        peer: &str,
        join: bool,
    ) -> Result<(DynSource, ExportEntry, Option<SessionGuard>)> {
        let Some((directory, overlays)) = &self.sessions else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "this server has no sessions configured",
            )
            .with_op("open_session"));
        };
        let target = directory.resolve(token, peer).await?;
        let backend = self
            .backends
            .iter()
            .find(|b| b.name() == target.backend)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "vdisk {:?} lives on backend {:?}, which this server does not configure",
                        target.vdisk, target.backend
                    ),
                )
            })?;
        let mode = if target.overlay.is_some() {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite
        };
        let mut source = backend.open(&target.image, mode).await?;
        for layer in &self.layers {
            source = layer.layer(source);
        }
        let image_size = source.info().size;
        if !join {
            if target.overlay.is_some() {
                source =
                    CowLayer::new(Box::new(RamOverlay::new(0)), overlays.block_size).layer(source);
            }
            let entry = ExportEntry {
                name: format!("s/{}", target.session),
                description: target.description.clone(),
                size: source.info().size,
                writable: true,
            };
            return Ok((source, entry, None));
        }
        let (overlay, guard) = self.live.join(&target, peer, || match target.overlay {
            None => Ok(None),
            Some(kind) => {
                let store = make_overlay(overlays, &target, kind, image_size)?;
                Ok(Some(Arc::new(CowLayer::new(store, overlays.block_size))))
            }
        })?;
        if let Some(overlay) = overlay {
            source = overlay.layer(source);
        }
        let entry = ExportEntry {
            name: format!("s/{}", target.session),
            description: target.description.clone(),
            size: source.info().size,
            writable: true,
        };
        Ok((source, entry, Some(guard)))
    }

    /// Ids of the sessions with at least one connection on this server.
    pub fn connected_sessions(&self) -> Vec<String> {
        self.live.connected()
    }

    /// Ends the connections of live sessions that `is_live` no longer accepts.
    pub fn retain_sessions(&self, is_live: impl Fn(&str) -> bool) {
        self.live.retain(is_live);
    }

    /// Ends a connection's hold on its session and accounts for its I/O.
    pub async fn close_session(&self, mut guard: SessionGuard, read: u64, written: u64) {
        let last = guard.leave(true);
        if let Some((directory, _)) = &self.sessions {
            directory.detached(&guard.target, read, written, last).await;
        }
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

    /// Every export, sorted by name.
    pub async fn list(&self) -> Result<Vec<ExportEntry>> {
        let images = self.all_images().await?;
        let mut owners: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, stat) in &images {
            *owners.entry(stat.name.as_str()).or_default() += 1;
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

    /// Opens the export `name` (`IMAGE` or `BACKEND/IMAGE`) with every layer applied.
    ///
    /// Plain names are always read-only, also on a writable backend: writes reach an image
    /// only through a private vdisk's session, which holds its lock.
    pub async fn open(&self, name: &str) -> Result<(DynSource, ExportEntry)> {
        let (backend, stat) = self.resolve(name).await?;
        let mut source = backend.open(&stat.name, OpenMode::ReadOnly).await?;
        for layer in &self.layers {
            source = layer.layer(source);
        }
        let entry = ExportEntry {
            name: name.to_owned(),
            description: describe(&backend, &stat),
            size: source.info().size,
            writable: false,
        };
        Ok((source, entry))
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
/// Folders are per session (`<dir>/<client>/<vdisk>/<session>/`), so a replaced session
/// still finishing requests never writes into its successor's files; older sessions'
/// folders are removed. Persistent overlays share `<dir>/<client>/<vdisk>/persistent/`.
fn make_overlay(
    overlays: &OverlaySettings,
    target: &crate::sessions::SessionTarget,
    kind: OverlayKind,
    image_size: u64,
) -> Result<Box<dyn OverlayStore>> {
    let base = overlays
        .dir
        .join(target.client.replace(':', "-"))
        .join(&target.vdisk);
    if kind == OverlayKind::ServerDiskPersistent {
        return Ok(Box::new(DiskOverlay::open(
            &base.join("persistent"),
            overlays.block_size,
            image_size,
            true,
        )?));
    }
    let dir = base.join(format!("session-{}", target.session));
    let existed = dir.exists();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("session-") && entry.path() != dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if existed && kind != OverlayKind::ServerDisk {
        // The session had a RAM overlay on this host before (the server restarted): its
        // writes are gone, and serving the base now would show the client's filesystem
        // an older state under its feet. Make it boot again instead.
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "session {} lost its RAM write overlay when the server restarted; the client must boot again",
                target.session
            ),
        )
        .with_op("open_session"));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::from_io(e, format!("cannot create {}", dir.display())))?;
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

fn describe(backend: &DynBackend, stat: &ImageStat) -> String {
    format!(
        "{} on {} backend '{}'",
        stat.name,
        backend.kind(),
        backend.name()
    )
}

/// An export name fit for logs: a session token (`s/<token>`, a bearer secret) shortened to
/// its first six characters, any other name as it is.
pub fn loggable_export_name(name: &str) -> std::borrow::Cow<'_, str> {
    match name.strip_prefix("s/") {
        Some(token) if token.chars().count() > 6 => {
            let prefix: String = token.chars().take(6).collect();
            std::borrow::Cow::Owned(format!("s/{prefix}…"))
        }
        _ => std::borrow::Cow::Borrowed(name),
    }
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no export named {name:?}")).with_op("open_export")
}
