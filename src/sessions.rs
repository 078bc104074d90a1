//! The catalog as the engine's session directory: tokens to vdisks, with the checks the
//! catalog owns (session live, vdisk assigned and enabled, private lock held).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use osstream_catalog::{Catalog, SqlCatalog, VdiskMode, WriteCache};
use osstream_core::{
    Error, ErrorKind, Exports, OverlayKind, Result, SessionDirectory, SessionTarget, async_trait,
};
use tokio_util::sync::CancellationToken;

/// Resolves `s/<token>` exports through the catalog.
#[derive(Debug)]
pub struct CatalogSessions {
    catalog: SqlCatalog,
}

impl CatalogSessions {
    pub fn new(catalog: SqlCatalog) -> Self {
        CatalogSessions { catalog }
    }
}

fn overlay_kind(cache: WriteCache) -> OverlayKind {
    match cache {
        WriteCache::Ram => OverlayKind::Ram,
        WriteCache::RamOverflowDisk => OverlayKind::RamOverflowDisk,
        WriteCache::ServerDisk => OverlayKind::ServerDisk,
        WriteCache::ServerDiskPersistent => OverlayKind::ServerDiskPersistent,
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
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "session {} has ended (the client booted again, or an administrator closed it)",
                    session.id
                ),
            )
            .with_context("peer", peer));
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
        self.catalog.touch_client(&session.mac).await?;
        self.catalog.set_session_peer(&session.id, peer).await?;
        Ok(SessionTarget {
            session: session.id,
            client: session.mac.to_string(),
            vdisk: vdisk.name.clone(),
            backend: vdisk.backend,
            image: vdisk.key,
            overlay: (vdisk.mode == VdiskMode::Standard).then(|| overlay_kind(vdisk.write_cache)),
            started_at: session.started_at,
            description: if vdisk.description.is_empty() {
                vdisk.name
            } else {
                vdisk.description
            },
        })
    }

    async fn detached(&self, target: &SessionTarget, read: u64, written: u64, last: bool) {
        if let Err(err) = self.catalog.record_io(&target.session, read, written).await {
            tracing::warn!(session = %target.session, %err, "cannot record session I/O");
        }
        // A private vdisk's lock goes with its writer: the last connection gone ends it.
        if last && target.overlay.is_none() {
            match self.catalog.close_session(&target.session).await {
                Ok(()) => {
                    tracing::info!(session = %target.session, vdisk = %target.vdisk, "private session ended; lock released")
                }
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(session = %target.session, %err, "cannot close the private session")
                }
            }
        }
    }
}

/// Every `period`, ends the connections of sessions the catalog no longer has live, so
/// `osstream session close`, `vdisk rm --force` and `client rm` reach running clients.
///
/// Every quarter `lease`, marks this server's connected sessions active and closes the
/// sessions nobody has used for a whole `lease` (on any server sharing the catalog): the
/// lock of a private vdisk whose server crashed is released that way.
pub async fn reconcile(
    catalog: SqlCatalog,
    exports: Arc<Exports>,
    period: Duration,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let heartbeat = (lease / 4).max(period);
    let mut last_heartbeat: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if last_heartbeat.is_none_or(|at| at.elapsed() >= heartbeat) {
            last_heartbeat = Some(std::time::Instant::now());
            if let Err(err) = catalog.touch_sessions(&exports.connected_sessions()).await {
                tracing::warn!(%err, "cannot mark connected sessions active");
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            match catalog
                .expire_sessions(now_ms - lease.as_millis() as i64)
                .await
            {
                Ok(expired) => {
                    for session in expired {
                        tracing::info!(session = %session.id, client = %session.mac, vdisk = %session.vdisk, "session lease expired");
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot expire idle sessions"),
            }
        }
        match catalog.sessions(false).await {
            Ok(sessions) => {
                let live: HashSet<String> = sessions.into_iter().map(|s| s.id).collect();
                exports.retain_sessions(|id| live.contains(id));
            }
            Err(err) => tracing::warn!(%err, "cannot read live sessions from the catalog"),
        }
    }
}
