//! Session exports: how a client's token becomes its own view of a vdisk.
//!
//! The catalog (outside the engine) implements [`SessionDirectory`]; [`crate::Exports`]
//! turns a resolved [`SessionTarget`] into a source: the vdisk's image under the shared
//! layers, plus the client's copy-on-write overlay for standard vdisks, or opened
//! read-write for private ones. One overlay serves every connection of a session; a new
//! session of the same client replaces the old one and ends its connections.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::cow::CowLayer;
use crate::error::Result;

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
}

/// What a session token resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTarget {
    /// The session id (for logs, accounting and overlay reuse).
    pub session: String,
    /// The client's identity (its MAC).
    pub client: String,
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

/// The catalog as the engine sees it.
///
/// # Contract
/// - `resolve` fails with `NotFound` for unknown or ended sessions, `PermissionDenied`
///   when the vdisk is no longer assigned to the client or disabled, and `Conflict` when
///   a private vdisk is locked by another session.
/// - `detached` is called when a connection of the session ends, with the bytes it moved;
///   `last` is true when no other connection of the session remains.
#[async_trait]
pub trait SessionDirectory: Send + Sync + Debug {
    /// Looks a token up for a client connecting from `peer`.
    async fn resolve(&self, token: &str, peer: &str) -> Result<SessionTarget>;
    /// Accounts for a finished connection.
    async fn detached(&self, target: &SessionTarget, read: u64, written: u64, last: bool);
}

/// How overlays are built.
#[derive(Debug, Clone)]
pub struct OverlaySettings {
    /// Folder for disk overlays: `<dir>/<client>/<vdisk>/`.
    pub dir: PathBuf,
    /// RAM a `ram` or `ram-overflow-disk` overlay may use, per session.
    pub ram_capacity: u64,
    /// Overlay block size (copy-on-write granularity).
    pub block_size: u64,
}

/// The live sessions of this server: one overlay per client, shared by its connections.
#[derive(Debug, Default)]
pub(crate) struct LiveSessions {
    by_client: Mutex<HashMap<String, LiveSession>>,
}

#[derive(Debug)]
struct LiveSession {
    session: String,
    started_at: i64,
    overlay: Option<Arc<CowLayer>>,
    ended: CancellationToken,
    connections: usize,
    peers: HashSet<String>,
    /// A private session whose last connection left: it is being closed in the catalog
    /// (its lock released), so no connection may join it any more, not even one that
    /// resolved its token just before.
    closing: bool,
}

/// A connection's hold on its session: ended when the session is replaced or closed.
/// Dropping it (a connection that failed before transmission) leaves the session too.
#[derive(Debug)]
pub struct SessionGuard {
    /// What the token resolved to.
    pub target: SessionTarget,
    /// Cancelled when a newer session of the same client replaces this one.
    pub ended: CancellationToken,
    live: Arc<LiveSessions>,
    left: bool,
}

impl SessionGuard {
    /// Leaves the session (once); returns whether that was its last connection. With
    /// `closing` (the caller ends a private session in the catalog next if it was the
    /// last), no connection may join the session from this moment, so none can write once
    /// its lock is released. A guard merely dropped leaves without closing.
    pub(crate) fn leave(&mut self, closing: bool) -> bool {
        if std::mem::replace(&mut self.left, true) {
            return false;
        }
        self.live.leave(&self.target, closing)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.leave(false);
    }
}

impl LiveSessions {
    /// Joins (or starts) the live session of `target`; `make_overlay` builds its overlay
    /// the first time. Returns the overlay and the guard.
    pub(crate) fn join(
        self: &Arc<Self>,
        target: &SessionTarget,
        peer: &str,
        make_overlay: impl FnOnce() -> Result<Option<Arc<CowLayer>>>,
    ) -> Result<(Option<Arc<CowLayer>>, SessionGuard)> {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let host = peer
            .rsplit_once(':')
            .map_or(peer, |(host, _)| host)
            .to_owned();
        if let Some(newer) = live
            .get(&target.client)
            .filter(|s| s.session != target.session && s.started_at > target.started_at)
        {
            return Err(crate::Error::new(
                crate::ErrorKind::NotFound,
                format!(
                    "session {} was replaced by the client's newer session {}",
                    target.session, newer.session
                ),
            )
            .with_op("open_session"));
        }
        let current = live
            .get_mut(&target.client)
            .filter(|s| s.session == target.session);
        let entry = match current {
            Some(entry) if entry.closing => {
                return Err(crate::Error::new(
                    crate::ErrorKind::NotFound,
                    format!(
                        "session {} of private vdisk {:?} ended with its last connection; open a new session",
                        target.session, target.vdisk
                    ),
                )
                .with_op("open_session"));
            }
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
                let overlay = make_overlay()?;
                live.entry(target.client.clone()).or_insert(LiveSession {
                    session: target.session.clone(),
                    started_at: target.started_at,
                    overlay,
                    ended: CancellationToken::new(),
                    connections: 0,
                    peers: HashSet::new(),
                    closing: false,
                })
            }
        };
        entry.connections += 1;
        entry.peers.insert(host);
        Ok((
            entry.overlay.clone(),
            SessionGuard {
                target: target.clone(),
                ended: entry.ended.clone(),
                live: self.clone(),
                left: false,
            },
        ))
    }

    /// Ends the connections of every live session whose id `is_live` rejects (closed by
    /// an administrator, or the client removed), so catalog changes reach running clients.
    pub(crate) fn retain(&self, is_live: impl Fn(&str) -> bool) {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|client, session| {
            // A closing private session stays as a tombstone (it has no connections) so
            // that a connection which resolved its token before the close still cannot
            // join; a newer session of the client replaces it.
            let keep = session.closing || is_live(&session.session);
            if !keep {
                tracing::info!(%client, session = %session.session, "session closed in the catalog; ending its connections");
                session.ended.cancel();
            }
            keep
        });
    }

    /// Ids of sessions with at least one connection.
    pub(crate) fn connected(&self) -> Vec<String> {
        let live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        live.values()
            .filter(|s| s.connections > 0)
            .map(|s| s.session.clone())
            .collect()
    }

    /// Leaves the session; returns whether that was its last connection. With `closing`,
    /// a private session left without connections refuses joins from then on.
    fn leave(&self, target: &SessionTarget, closing: bool) -> bool {
        let mut live = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        match live
            .get_mut(&target.client)
            .filter(|s| s.session == target.session)
        {
            Some(entry) => {
                entry.connections = entry.connections.saturating_sub(1);
                if entry.connections == 0 {
                    entry.peers.clear();
                    // A private session ends with its last connection (the caller closes
                    // it in the catalog next): refuse joins from now on, so a reconnect
                    // racing that close cannot write after the lock is released.
                    entry.closing = closing && target.overlay.is_none();
                }
                entry.connections == 0
            }
            // Replaced meanwhile: this was the old session's last word.
            None => true,
        }
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    fn target(session: &str, overlay: Option<OverlayKind>) -> SessionTarget {
        SessionTarget {
            session: session.to_owned(),
            client: "aa:bb:cc:dd:ee:ff".to_owned(),
            vdisk: "dev".to_owned(),
            backend: "images".to_owned(),
            image: "dev".to_owned(),
            overlay,
            description: String::new(),
            started_at: 1,
        }
    }

    #[test]
    fn a_private_session_refuses_joins_once_its_last_connection_left() {
        let live = Arc::new(LiveSessions::default());
        let private = target("s1", None);
        let (_, mut a) = live.join(&private, "10.0.0.1:1000", || Ok(None)).unwrap();
        let (_, mut b) = live.join(&private, "10.0.0.1:1001", || Ok(None)).unwrap();
        assert!(!a.leave(true), "one connection is still there");
        assert!(b.leave(true), "the last one");
        live.retain(|_| false);
        let err = live
            .join(&private, "10.0.0.1:1002", || Ok(None))
            .expect_err("the session is being closed");
        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
        assert!(err.to_string().contains("open a new session"), "{err}");
        // A new session of the client is welcome.
        let newer = SessionTarget {
            started_at: 2,
            ..target("s2", None)
        };
        live.join(&newer, "10.0.0.1:1003", || Ok(None)).unwrap();
    }

    #[test]
    fn a_standard_session_can_be_rejoined_after_its_last_connection() {
        let live = Arc::new(LiveSessions::default());
        let standard = target("s1", Some(OverlayKind::Ram));
        let (_, mut a) = live.join(&standard, "10.0.0.1:1000", || Ok(None)).unwrap();
        assert!(a.leave(true));
        live.join(&standard, "10.0.0.1:1001", || Ok(None)).unwrap();
    }

    #[test]
    fn a_private_connection_that_never_reached_transmission_does_not_end_the_session() {
        let live = Arc::new(LiveSessions::default());
        let private = target("s1", None);
        // A guard dropped after OPT_GO failed: the session stays open in the catalog, so
        // the client's reconnect with the same token is welcome.
        drop(live.join(&private, "10.0.0.1:1000", || Ok(None)).unwrap());
        live.join(&private, "10.0.0.1:1001", || Ok(None)).unwrap();
    }
}
