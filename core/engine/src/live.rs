//! The attachments open in this process now, with their byte counters, for a live view
//! of who reads what (`<data_dir>/stats.json`, read by `osstream top`).
//!
//! One list per process, like the metrics registry ([`crate::metrics::global`]): every
//! protocol attaches through [`crate::Attachment`], which registers itself here, so no
//! handle is threaded through the protocols. The list holds a weak reference to each
//! attachment's [`IoCounters`]: an attachment leaves it by being dropped, with nothing
//! to forget on any of its exit paths.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde::{Deserialize, Serialize};

use crate::attach::{AttachContext, IoCounters};

/// How many sessions' first-attach times (and, in [`crate::metrics`], boot times) are
/// kept: a boot server sees far fewer live sessions, and older ones are of no interest.
pub const SESSIONS_KEPT: usize = 4096;

/// One open attachment as [`snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveAttachment {
    /// The protocol serving it (`nbd`, `http`, `tftp`, `agent`).
    pub protocol: String,
    /// The client's address.
    pub peer: String,
    /// The export name, session tokens shortened.
    pub export: String,
    /// The client's MAC, for a session.
    pub client: Option<String>,
    /// The session id, for a session.
    pub session: Option<String>,
    /// The vdisk, for a session.
    pub vdisk: Option<String>,
    /// When it attached (Unix milliseconds).
    pub connected_at: i64,
    /// Requests received.
    pub requests: u64,
    /// Bytes the client read.
    pub read_bytes: u64,
    /// Bytes the client wrote.
    pub written_bytes: u64,
    /// Requests that failed or were refused.
    pub errors: u64,
}

/// How far the boot of a session with an open attachment got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionBoot {
    /// The session id.
    pub session: String,
    /// When the session first attached here (Unix milliseconds): where its boot began.
    pub first_attached_at: Option<i64>,
    /// Seconds from the first attach to boot complete, once the boot is complete
    /// ([`crate::metrics::Metrics::boot_complete`]).
    pub boot_seconds: Option<f64>,
}

/// The open attachments and the boot progress of their sessions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveSnapshot {
    /// Every attachment open now, oldest first.
    pub attachments: Vec<LiveAttachment>,
    /// One entry per session among `attachments`.
    pub sessions: Vec<SessionBoot>,
}

/// A map that keeps its `capacity` newest keys: inserting more forgets the oldest.
#[derive(Debug)]
pub(crate) struct Recent<V> {
    values: HashMap<String, V>,
    order: VecDeque<String>,
    capacity: usize,
}

/// Keeps [`SESSIONS_KEPT`] keys.
impl<V> Default for Recent<V> {
    fn default() -> Self {
        Recent::new(SESSIONS_KEPT)
    }
}

impl<V> Recent<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Recent {
            values: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Sets `key`'s value; a new key counts as the newest.
    pub(crate) fn insert(&mut self, key: &str, value: V) {
        if self.values.insert(key.to_owned(), value).is_none() {
            self.order.push_back(key.to_owned());
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.values.remove(&oldest);
                }
            }
        }
    }

    /// Sets `key`'s value unless it has one.
    pub(crate) fn insert_new(&mut self, key: &str, value: V) {
        if !self.values.contains_key(key) {
            self.insert(key, value);
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&V> {
        self.values.get(key)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }
}

struct Entry {
    context: AttachContext,
    counters: Weak<IoCounters>,
    connected_at: i64,
}

struct Registry {
    entries: Vec<Entry>,
    /// Dropped attachments are swept out when the list grows this long (twice what was
    /// live at the last sweep), so a process nobody snapshots does not grow for ever.
    sweep_at: usize,
    first_attached: Recent<i64>,
}

impl Registry {
    fn sweep(&mut self) {
        self.entries.retain(|e| e.counters.strong_count() > 0);
        self.sweep_at = (2 * self.entries.len()).max(64);
    }
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                entries: Vec::new(),
                sweep_at: 64,
                first_attached: Recent::default(),
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Lists an attachment until its counters are dropped.
pub(crate) fn register(context: &AttachContext, counters: &Arc<IoCounters>) {
    let now = now_ms();
    let mut registry = registry();
    if registry.entries.len() >= registry.sweep_at {
        registry.sweep();
    }
    if let Some(session) = &context.session {
        registry.first_attached.insert_new(session, now);
    }
    registry.entries.push(Entry {
        context: context.clone(),
        counters: Arc::downgrade(counters),
        connected_at: now,
    });
}

/// The attachments open now, their counts so far, and their sessions' boot progress.
pub fn snapshot() -> LiveSnapshot {
    let (attachments, first_attached) = {
        let mut registry = registry();
        registry.sweep();
        let attachments: Vec<LiveAttachment> = registry
            .entries
            .iter()
            .filter_map(|entry| {
                let counts = entry.counters.upgrade()?.snapshot();
                let c = &entry.context;
                Some(LiveAttachment {
                    protocol: c.protocol.to_owned(),
                    peer: c.peer.clone(),
                    export: c.export.clone(),
                    client: c.client.clone(),
                    session: c.session.clone(),
                    vdisk: c.vdisk.clone(),
                    connected_at: entry.connected_at,
                    requests: counts.requests,
                    read_bytes: counts.read_bytes,
                    written_bytes: counts.written_bytes,
                    errors: counts.errors,
                })
            })
            .collect();
        let first: HashMap<String, i64> = attachments
            .iter()
            .filter_map(|a| a.session.as_ref())
            .filter_map(|s| Some((s.clone(), *registry.first_attached.get(s)?)))
            .collect();
        (attachments, first)
    };
    let mut sessions: Vec<SessionBoot> = Vec::new();
    for session in attachments.iter().filter_map(|a| a.session.as_ref()) {
        if sessions.iter().any(|s| &s.session == session) {
            continue;
        }
        sessions.push(SessionBoot {
            session: session.clone(),
            first_attached_at: first_attached.get(session).copied(),
            boot_seconds: crate::metrics::global()
                .boot_seconds(session)
                .map(|d| d.as_secs_f64()),
        });
    }
    LiveSnapshot {
        attachments,
        sessions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(export: &str, session: Option<&str>) -> AttachContext {
        AttachContext {
            protocol: "nbd",
            peer: "127.0.0.1:4000".into(),
            export: export.into(),
            client: session.map(|_| "aa:bb:cc:dd:ee:01".into()),
            session: session.map(str::to_owned),
            vdisk: session.map(|_| "deb".into()),
            image: "mem:deb".into(),
            generation: "1".into(),
        }
    }

    #[test]
    fn an_attachment_is_listed_with_its_counts_until_its_counters_drop() {
        // The list is process-wide and other tests attach too: look for ours only.
        let counters = Arc::new(IoCounters::default());
        register(&context("live-test-a", Some("live-session-a")), &counters);
        counters.request();
        counters.read(4096);
        let ours = |snapshot: &LiveSnapshot| {
            snapshot
                .attachments
                .iter()
                .find(|a| a.export == "live-test-a")
                .cloned()
        };
        let snapshot = snapshot();
        let listed = ours(&snapshot).expect("listed while open");
        assert_eq!((listed.requests, listed.read_bytes), (1, 4096));
        assert_eq!(listed.vdisk.as_deref(), Some("deb"));
        let boot = snapshot
            .sessions
            .iter()
            .find(|s| s.session == "live-session-a")
            .expect("its session's progress");
        assert!(boot.first_attached_at.is_some() && boot.boot_seconds.is_none());
        crate::metrics::global().boot_complete(
            "deb",
            "live-session-a",
            std::time::Duration::from_millis(23_100),
        );
        let boot = snapshot_boot("live-session-a");
        assert_eq!(boot.and_then(|b| b.boot_seconds), Some(23.1));
        drop(counters);
        assert_eq!(ours(&super::snapshot()), None);
    }

    fn snapshot_boot(session: &str) -> Option<SessionBoot> {
        snapshot()
            .sessions
            .into_iter()
            .find(|s| s.session == session)
    }

    #[test]
    fn recent_forgets_the_oldest_keys_beyond_its_capacity() {
        let mut recent = Recent::new(2);
        recent.insert("a", 1);
        recent.insert("b", 2);
        recent.insert("a", 3); // not new: keeps its place
        recent.insert("c", 4);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent.get("a"), None);
        assert_eq!((recent.get("b"), recent.get("c")), (Some(&2), Some(&4)));
        recent.insert_new("c", 5);
        assert_eq!(recent.get("c"), Some(&4));
    }
}
