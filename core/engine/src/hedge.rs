//! [`HedgeLayer`]: a backend read that takes far longer than its backend usually does gets
//! a twin, and the first answer wins.
//!
//! A booting client waits on every read, so one stalled backend request (an S3 node that
//! stops answering, a retransmission storm on NFS) freezes the boot for as long as the
//! request's timeout. Retrying only after that timeout is too late. Like Dean and Barroso's
//! "hedged requests", this layer sends the same read again once the first has waited well
//! past the backend's usual latency: `factor` times its recent 95th percentile, and never
//! sooner than `min_delay`. Whichever answers first is returned, the other dropped
//! (cancelled); if one fails, the other's answer is awaited. A token bucket of `budget`
//! hedges per second caps the extra load a slow backend can be put under.
//!
//! Latencies are tracked per storage kind (the part of the source's identity before the
//! first `:`: `file`, `s3`, `nfs`, a plugin's kind), so a local disk's microseconds do not
//! set the bar for S3. Prefetch reads are never hedged: no client waits on them. The layer
//! sits next to the backend, below the caches, so it serves every backend alike (NFS and
//! plugins included).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::chunks::Chunks;
use crate::error::Result;
use crate::layer::{Layer, LayerReport};
use crate::source::{
    BlockSource, Capability, DynSource, Extent, Geometry, ReadOpts, SourceInfo, WriteOpts, ZeroOpts,
};
use crate::units::Seconds;

/// Latencies kept per storage kind.
const WINDOW: usize = 256;
/// Until this many reads were timed, hedge only after `min_delay` times this.
const WARMUP: usize = 16;
const COLD_FACTOR: u32 = 4;

/// `[hedge]`: tail-tolerant backend reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// Send a slow read again. Default: true.
    pub enabled: bool,
    /// Never hedge a read sooner than this. Default: `50ms`.
    pub min_delay: Seconds,
    /// Hedge once a read has taken this many times its backend's recent 95th percentile.
    /// Default: 4.
    pub factor: u32,
    /// At most this many hedged reads per second over all backends. Default: 20.
    pub budget: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            enabled: true,
            min_delay: Seconds(Duration::from_millis(50)),
            factor: 4,
            budget: 20,
        }
    }
}

impl HedgeConfig {
    /// Checks the values; the error names the key.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(crate::registry::config_error("hedge", &m));
        if self.min_delay.0 < Duration::from_millis(1) {
            return bad(format!(
                "min_delay = {} must be at least 1ms",
                self.min_delay
            ));
        }
        if !(1..=100).contains(&self.factor) {
            return bad(format!("factor = {} must be from 1 to 100", self.factor));
        }
        Ok(())
    }
}

/// Sends a backend read again when it is slow: see the module documentation.
pub struct HedgeLayer {
    state: Arc<HedgeState>,
}

struct HedgeState {
    config: HedgeConfig,
    latencies: Mutex<HashMap<String, Window>>,
    tokens: Mutex<Bucket>,
    reads: AtomicU64,
    hedged: AtomicU64,
    hedge_won: AtomicU64,
    over_budget: AtomicU64,
}

/// The last [`WINDOW`] latencies of one storage kind, and their 95th percentile.
#[derive(Debug, Default)]
struct Window {
    samples: Vec<Duration>,
    next: usize,
    p95: Duration,
    since_sorted: usize,
}

impl Window {
    fn record(&mut self, latency: Duration) {
        if self.samples.len() < WINDOW {
            self.samples.push(latency);
        } else {
            self.samples[self.next] = latency;
            self.next = (self.next + 1) % WINDOW;
        }
        self.since_sorted += 1;
        // Sorting 256 numbers every 16 reads keeps the estimate fresh at a small cost.
        if self.since_sorted >= 16 || self.samples.len() <= WARMUP {
            let mut sorted = self.samples.clone();
            sorted.sort_unstable();
            self.p95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
            self.since_sorted = 0;
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Counters of a [`HedgeLayer`] since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HedgeStats {
    /// Demand reads timed.
    pub reads: u64,
    /// Reads sent a second time.
    pub hedged: u64,
    /// Hedged reads the second request answered first.
    pub hedge_won: u64,
    /// Reads that were due a hedge but the budget was spent.
    pub over_budget: u64,
}

impl HedgeLayer {
    /// A layer hedging as `config` says.
    pub fn new(config: HedgeConfig) -> Self {
        let budget = f64::from(config.budget);
        HedgeLayer {
            state: Arc::new(HedgeState {
                config,
                latencies: Mutex::new(HashMap::new()),
                tokens: Mutex::new(Bucket {
                    tokens: budget,
                    at: Instant::now(),
                }),
                reads: AtomicU64::new(0),
                hedged: AtomicU64::new(0),
                hedge_won: AtomicU64::new(0),
                over_budget: AtomicU64::new(0),
            }),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> HedgeStats {
        let s = &self.state;
        HedgeStats {
            reads: s.reads.load(Ordering::Relaxed),
            hedged: s.hedged.load(Ordering::Relaxed),
            hedge_won: s.hedge_won.load(Ordering::Relaxed),
            over_budget: s.over_budget.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for HedgeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("config", &self.state.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl HedgeState {
    /// How long a read of `kind` may take before it is hedged.
    fn delay(&self, kind: &str) -> Duration {
        let floor = self.config.min_delay.0;
        let latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        match latencies.get(kind) {
            Some(window) if window.samples.len() >= WARMUP => {
                (window.p95 * self.config.factor).max(floor)
            }
            _ => floor * COLD_FACTOR,
        }
    }

    fn record(&self, kind: &str, latency: Duration) {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        match latencies.get_mut(kind) {
            Some(window) => window.record(latency),
            None => {
                let mut window = Window::default();
                window.record(latency);
                latencies.insert(kind.to_owned(), window);
            }
        }
    }

    /// Takes one hedge from the budget, if any is left.
    fn take_token(&self) -> bool {
        let mut bucket = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rate = f64::from(self.config.budget);
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Layer for HedgeLayer {
    fn name(&self) -> &str {
        "hedge"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        if !self.state.config.enabled {
            return inner;
        }
        let kind = inner
            .info()
            .identity
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        Arc::new(HedgedSource {
            inner,
            kind,
            state: self.state.clone(),
        })
    }

    fn log_summary(&self) {
        let s = self.stats();
        tracing::info!(
            reads = s.reads,
            hedged = s.hedged,
            hedge_won = s.hedge_won,
            over_budget = s.over_budget,
            "hedged read statistics"
        );
    }

    fn report(&self) -> Option<LayerReport> {
        let s = self.stats();
        Some(LayerReport::new(
            "hedge",
            &[
                ("reads", s.reads),
                ("hedged", s.hedged),
                ("hedge_won", s.hedge_won),
                ("over_budget", s.over_budget),
            ],
        ))
    }
}

struct HedgedSource {
    inner: DynSource,
    kind: String,
    state: Arc<HedgeState>,
}

impl fmt::Debug for HedgedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgedSource")
            .field("kind", &self.kind)
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlockSource for HedgedSource {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        if opts.prefetch {
            return self.inner.read_at(offset, len, opts).await;
        }
        let state = &self.state;
        state.reads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let delay = state.delay(&self.kind);
        let first = self.inner.read_at(offset, len, opts);
        tokio::pin!(first);
        tokio::select! {
            done = &mut first => {
                if done.is_ok() {
                    state.record(&self.kind, started.elapsed());
                }
                return done;
            }
            () = tokio::time::sleep(delay) => {}
        }
        if !state.take_token() {
            state.over_budget.fetch_add(1, Ordering::Relaxed);
            let done = first.await;
            if done.is_ok() {
                state.record(&self.kind, started.elapsed());
            }
            return done;
        }
        state.hedged.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(kind = %self.kind, offset, len, waited_ms = delay.as_millis() as u64,
            "slow backend read: sending it again");
        let resent = Instant::now();
        let second = self.inner.read_at(offset, len, opts);
        tokio::pin!(second);
        // The first answer that is not an error wins; an error waits for the other. The
        // winner's own latency is recorded, so the estimate follows a backend that got
        // slower instead of hedging everything against an old, fast percentile.
        let won_second = |state: &HedgeState| {
            state.hedge_won.fetch_add(1, Ordering::Relaxed);
            state.record(&self.kind, resent.elapsed());
        };
        tokio::select! {
            done = &mut first => match done {
                Ok(bytes) => {
                    state.record(&self.kind, started.elapsed());
                    Ok(bytes)
                }
                Err(_) => {
                    let done = second.await;
                    if done.is_ok() {
                        won_second(state);
                    }
                    done
                }
            },
            done = &mut second => match done {
                Ok(bytes) => {
                    won_second(state);
                    Ok(bytes)
                }
                Err(_) => {
                    let done = first.await;
                    if done.is_ok() {
                        state.record(&self.kind, started.elapsed());
                    }
                    done
                }
            },
        }
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_tracks_the_95th_percentile() {
        let mut window = Window::default();
        for n in 1..=96u64 {
            window.record(Duration::from_millis(n));
        }
        assert_eq!(window.p95, Duration::from_millis(92));
        for _ in 0..WINDOW {
            window.record(Duration::from_millis(2));
        }
        assert_eq!(window.p95, Duration::from_millis(2));
    }

    #[test]
    fn the_budget_refills_at_its_rate_and_no_faster() {
        let layer = HedgeLayer::new(HedgeConfig {
            budget: 3,
            ..HedgeConfig::default()
        });
        let taken = (0..10).filter(|_| layer.state.take_token()).count();
        assert_eq!(taken, 3);
        std::thread::sleep(Duration::from_millis(400));
        assert!(layer.state.take_token(), "refilled");
    }

    #[test]
    fn the_delay_is_the_floor_times_four_until_warm_then_factor_times_p95() {
        let layer = HedgeLayer::new(HedgeConfig::default());
        assert_eq!(layer.state.delay("s3"), Duration::from_millis(200));
        for _ in 0..WARMUP {
            layer.state.record("s3", Duration::from_millis(30));
        }
        assert_eq!(layer.state.delay("s3"), Duration::from_millis(120));
        assert_eq!(layer.state.delay("file"), Duration::from_millis(200));
        for _ in 0..WARMUP {
            layer.state.record("file", Duration::from_micros(80));
        }
        assert_eq!(layer.state.delay("file"), Duration::from_millis(50));
    }
}
