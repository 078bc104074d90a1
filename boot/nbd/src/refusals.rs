//! Log lines for refused exports, without a flood: a client that retries a refusal every
//! second (an agent waiting out a dead server's heartbeat, a machine with a stale token)
//! gets one line per export and reason per [`WINDOW`], and the next line says how many
//! were left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use osstream_core::loggable_export_name;

/// How long a refusal logged once stays quiet when it repeats.
pub(crate) const WINDOW: Duration = Duration::from_secs(30);

/// Entries kept before the expired ones are dropped (one per export and reason).
const KEPT: usize = 4096;

/// Repeats of one refusal since it was last logged.
#[derive(Default)]
pub(crate) struct Repeats {
    seen: HashMap<(String, String), Seen>,
}

struct Seen {
    logged_at: Instant,
    left_out: u64,
}

impl Repeats {
    /// Whether a refusal of `export` for `reason` is logged at `now`: `Some(n)` with the
    /// number of its repeats left out since it was last logged, `None` to leave it out.
    pub(crate) fn admit(&mut self, export: &str, reason: &str, now: Instant) -> Option<u64> {
        if self.seen.len() >= KEPT {
            self.seen
                .retain(|_, seen| now.duration_since(seen.logged_at) < WINDOW);
        }
        let key = (export.to_owned(), reason.to_owned());
        match self.seen.get_mut(&key) {
            Some(seen) if now.duration_since(seen.logged_at) < WINDOW => {
                seen.left_out += 1;
                None
            }
            Some(seen) => {
                let left_out = seen.left_out;
                *seen = Seen {
                    logged_at: now,
                    left_out: 0,
                };
                Some(left_out)
            }
            None => {
                self.seen.insert(
                    key,
                    Seen {
                        logged_at: now,
                        left_out: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// One server's refusals as logged so far.
#[derive(Default)]
pub(crate) struct Refusals(Mutex<Repeats>);

impl Refusals {
    /// Logs that `export` was refused to `peer` for `reason`, unless the same refusal was
    /// logged less than [`WINDOW`] ago. Session exports log as warnings (a booting
    /// machine is turned away), plain names as information.
    pub(crate) fn log(&self, peer: &str, export: &str, reason: &str, is_session: bool) {
        let admitted = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(export, &without_peer(reason, peer), Instant::now());
        let Some(left_out) = admitted else { return };
        let export = loggable_export_name(export);
        let what = if is_session {
            "session export refused"
        } else {
            "export refused"
        };
        match (is_session, left_out) {
            (true, 0) => tracing::warn!(%peer, %export, %reason, "{what}"),
            (true, n) => {
                tracing::warn!(%peer, %export, %reason, "{what} ({n} more like it since the last such line)")
            }
            (false, 0) => tracing::info!(%peer, %export, %reason, "{what}"),
            (false, n) => {
                tracing::info!(%peer, %export, %reason, "{what} ({n} more like it since the last such line)")
            }
        }
    }
}

/// `reason` with the peer's address taken out: a retry comes from a new port, and the
/// reason may quote it, which must not make every repeat look new.
fn without_peer(reason: &str, peer: &str) -> String {
    reason.replace(peer, "PEER")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_refusal_is_logged_once_per_window_with_the_count_left_out() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit("s/abc", "held by a", start), Some(0));
        for i in 1..=5 {
            assert_eq!(
                repeats.admit("s/abc", "held by a", start + Duration::from_secs(i)),
                None
            );
        }
        // Another reason or another export is news.
        assert_eq!(repeats.admit("s/abc", "it ended", start), Some(0));
        assert_eq!(repeats.admit("s/def", "held by a", start), Some(0));
        assert_eq!(repeats.admit("s/abc", "held by a", start + WINDOW), Some(5));
        assert_eq!(
            repeats.admit("s/abc", "held by a", start + WINDOW * 2),
            Some(0)
        );
    }

    #[test]
    fn retries_from_new_ports_are_the_same_refusal() {
        let reason = |port| format!("conflict: held by server a (peer: 10.0.0.5:{port})");
        let mut repeats = Repeats::default();
        let now = Instant::now();
        let first = without_peer(&reason(50_001), "10.0.0.5:50001");
        let again = without_peer(&reason(50_002), "10.0.0.5:50002");
        assert_eq!(repeats.admit("s/abc", &first, now), Some(0));
        assert_eq!(repeats.admit("s/abc", &again, now), None);
    }

    #[test]
    fn expired_refusals_are_dropped_when_many_are_kept() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        for i in 0..KEPT {
            repeats.admit(&format!("s/{i}"), "gone", start);
        }
        repeats.admit("s/new", "gone", start + WINDOW);
        assert_eq!(repeats.seen.len(), 1);
    }
}
