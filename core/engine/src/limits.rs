//! `[limits]`: bandwidth and IOPS limits per client and per group, as token buckets, so
//! one client (a machine copying its whole disk, a runaway backup) cannot starve a boot
//! storm.
//!
//! A client's connections share its buckets (opening more connections buys nothing), and
//! the clients of a group may also share a group-wide bucket. A protocol asks for tokens
//! before it serves a request ([`ClientLimit::acquire`]); the wait is the bucket's
//! deficit, so a request larger than the bucket is served too, only later. Waiting
//! stops the protocol from reading the client's next requests: the client sees
//! backpressure, not errors. Plain image names (read-only, no client identity) and the
//! agent's local socket are not limited.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::Result;
use crate::units::{ByteSize, Seconds};

/// One set of rates; unset means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rates {
    /// Bytes per second read and written (payloads), e.g. `"100MiB"`.
    pub bandwidth: Option<ByteSize>,
    /// Requests per second.
    pub iops: Option<u64>,
}

impl Rates {
    fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.iops.is_none()
    }

    fn check(&self, key: &str) -> Result<()> {
        let bad = |m: String| Err(crate::registry::config_error("limits", &m));
        if self.bandwidth.is_some_and(|b| b.bytes() < 4096) {
            return bad(format!(
                "{key}bandwidth must be at least 4KiB (per second), or left out for no limit"
            ));
        }
        if self.iops == Some(0) {
            return bad(format!(
                "{key}iops = 0 would stop every client; give at least 1, or leave it out for no limit"
            ));
        }
        Ok(())
    }
}

/// A group's limits: per client of the group (replacing the default), and for all its
/// clients together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupLimits {
    /// Each client of the group (instead of `[limits]`' own rates).
    #[serde(flatten)]
    pub per_client: Rates,
    /// All the group's clients together.
    pub total: Rates,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Each client (all its connections together), unless its group says otherwise.
    #[serde(flatten)]
    pub per_client: Rates,
    /// How much a client may use at once after being idle, in seconds of its rate.
    /// Default: `1s`.
    pub burst: Seconds,
    /// By group name (`osstream client add --group`).
    pub groups: BTreeMap<String, GroupLimits>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_client: Rates::default(),
            burst: Seconds(Duration::from_secs(1)),
            groups: BTreeMap::new(),
        }
    }
}

impl LimitsConfig {
    /// Checks the values; the error names the key.
    pub fn check(&self) -> Result<()> {
        self.per_client.check("")?;
        if self.burst.0 < Duration::from_millis(10) || self.burst.0 > Duration::from_secs(60) {
            return Err(crate::registry::config_error(
                "limits",
                &format!("burst = {} must be from 10ms to 60s", self.burst),
            ));
        }
        for (name, group) in &self.groups {
            group.per_client.check(&format!("groups.{name}."))?;
            group.total.check(&format!("groups.{name}.total."))?;
        }
        Ok(())
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        !self.per_client.is_unlimited()
            || self
                .groups
                .values()
                .any(|g| !g.per_client.is_unlimited() || !g.total.is_unlimited())
    }
}

/// A token bucket: `rate` tokens a second, at most `rate * burst` saved up. Takers may
/// drive it below zero; each waits until its own tokens have been earned, so takers are
/// served in the order they came.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    depth: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64, burst: Duration) -> Self {
        let rate = rate as f64;
        let depth = (rate * burst.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            depth,
            state: Mutex::new((depth, Instant::now())),
        }
    }

    /// Whether the bucket has refilled to its depth: forgetting it now and making a new
    /// one later gives nobody tokens they had not earned.
    fn is_full(&self) -> bool {
        let (tokens, last) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        tokens + last.elapsed().as_secs_f64() * self.rate >= self.depth
    }

    /// Takes `n` tokens; how long the taker must wait for them.
    fn take(&self, n: u64) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.depth);
        let left = tokens - n as f64;
        *state = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// The buckets of one set of rates.
#[derive(Debug)]
struct RateBuckets {
    bytes: Option<Bucket>,
    requests: Option<Bucket>,
}

impl RateBuckets {
    fn new(rates: &Rates, burst: Duration) -> Option<Arc<Self>> {
        if rates.is_unlimited() {
            return None;
        }
        Some(Arc::new(RateBuckets {
            bytes: rates.bandwidth.map(|b| Bucket::new(b.bytes(), burst)),
            requests: rates.iops.map(|n| Bucket::new(n, burst)),
        }))
    }

    /// See [`Bucket::is_full`].
    fn is_full(&self) -> bool {
        self.bytes.as_ref().is_none_or(Bucket::is_full)
            && self.requests.as_ref().is_none_or(Bucket::is_full)
    }

    fn take(&self, bytes: u64, requests: u64) -> Duration {
        let by_bytes = self
            .bytes
            .as_ref()
            .map_or(Duration::ZERO, |b| b.take(bytes));
        let by_requests = match (&self.requests, requests) {
            (Some(bucket), 1..) => bucket.take(requests),
            _ => Duration::ZERO,
        };
        by_bytes.max(by_requests)
    }
}

/// What limits one client: its own buckets and its group's shared ones.
#[derive(Debug)]
pub struct ClientLimit {
    own: Option<Arc<RateBuckets>>,
    group: Option<Arc<RateBuckets>>,
}

impl ClientLimit {
    /// Waits until a request moving `bytes` of payload may be served.
    pub async fn acquire(&self, bytes: u64) {
        self.take(bytes, 1).await;
    }

    /// Waits until `bytes` more of a request already counted may be sent (the pieces of
    /// a long HTTP range).
    pub async fn acquire_bytes(&self, bytes: u64) {
        self.take(bytes, 0).await;
    }

    async fn take(&self, bytes: u64, requests: u64) {
        let own = self
            .own
            .as_ref()
            .map_or(Duration::ZERO, |b| b.take(bytes, requests));
        let group = self
            .group
            .as_ref()
            .map_or(Duration::ZERO, |b| b.take(bytes, requests));
        let wait = own.max(group);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The buckets of every client and group with a limit, shared by all their connections.
/// A bucket outlives its connections until it has refilled: a client that closes and
/// opens connections one after another gets no fresh burst with each.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    clients: Mutex<HashMap<String, Arc<RateBuckets>>>,
    groups: Mutex<HashMap<String, Arc<RateBuckets>>>,
}

fn shared(
    map: &Mutex<HashMap<String, Arc<RateBuckets>>>,
    key: &str,
    make: impl FnOnce() -> Option<Arc<RateBuckets>>,
) -> Option<Arc<RateBuckets>> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = map.get(key) {
        return Some(live.clone());
    }
    // Forgotten only once unused and refilled: a new one would start just as full.
    map.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full());
    let made = make()?;
    map.insert(key.to_owned(), made.clone());
    Some(made)
}

impl Limits {
    /// Limits as `config` sets them.
    pub fn new(config: LimitsConfig) -> Self {
        Limits {
            config,
            clients: Mutex::default(),
            groups: Mutex::default(),
        }
    }

    /// The limit of `client` (its MAC) in `group`; `None` when nothing limits it.
    pub fn for_client(&self, client: &str, group: Option<&str>) -> Option<Arc<ClientLimit>> {
        let burst = self.config.burst.0;
        let group_limits = group.and_then(|g| self.config.groups.get(g));
        let rates = group_limits.map_or(&self.config.per_client, |g| &g.per_client);
        let own = shared(&self.clients, client, || RateBuckets::new(rates, burst));
        let group = match (group, group_limits) {
            (Some(name), Some(limits)) => shared(&self.groups, name, || {
                RateBuckets::new(&limits.total, burst)
            }),
            _ => None,
        };
        if own.is_none() && group.is_none() {
            return None;
        }
        Some(Arc::new(ClientLimit { own, group }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(toml: &str) -> Limits {
        let config: LimitsConfig = toml::from_str(toml).unwrap();
        config.check().unwrap();
        Limits::new(config)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gets_its_rate_after_its_burst() {
        let limits = limits("bandwidth = \"1MiB\"\n");
        let client = limits.for_client("aa", None).unwrap();
        let started = Instant::now();
        // 1 MiB of burst at once, then 4 MiB more at 1 MiB/s.
        for _ in 0..5 {
            client.acquire(1 << 20).await;
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_millis(4100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_of_one_client_share_its_bucket_and_groups_share_theirs() {
        let limits =
            limits("iops = 100\n[groups.lab]\niops = 10\ntotal = { iops = 15 }\n[groups.free]\n");
        let (a1, a2) = (
            limits.for_client("a", Some("lab")).unwrap(),
            limits.for_client("a", Some("lab")).unwrap(),
        );
        let b = limits.for_client("b", Some("lab")).unwrap();
        let started = Instant::now();
        // Client a: 20 requests on a burst of 10 at 10/s; the group: 30 on 15 at 15/s.
        for _ in 0..10 {
            a1.acquire(0).await;
            a2.acquire(0).await;
            b.acquire(0).await;
        }
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // A group with no rates of its own leaves its clients unlimited.
        assert!(limits.for_client("c", Some("free")).is_none());
        assert!(limits.for_client("d", None).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_one_after_another_get_no_fresh_burst() {
        let limits = limits("bandwidth = \"1MiB\"\n");
        let started = Instant::now();
        // Each "connection" takes 1 MiB and closes: the first has the burst, the next
        // three wait for their tokens.
        for _ in 0..4 {
            let connection = limits.for_client("aa", None).unwrap();
            connection.acquire(1 << 20).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        // Once refilled and unused, a client's bucket is forgotten when another is made.
        tokio::time::sleep(Duration::from_secs(2)).await;
        limits.for_client("bb", None).unwrap();
        assert_eq!(limits.clients.lock().unwrap().len(), 1);
    }

    #[test]
    fn bad_values_name_their_key() {
        let config: LimitsConfig = toml::from_str("[groups.lab]\niops = 0\n").unwrap();
        let err = config.check().unwrap_err();
        assert!(err.to_string().contains("groups.lab.iops = 0"), "{err}");
        let config: LimitsConfig = toml::from_str("bandwidth = \"1KiB\"\n").unwrap();
        assert!(
            config
                .check()
                .unwrap_err()
                .to_string()
                .contains("bandwidth must be at least 4KiB")
        );
    }
}
