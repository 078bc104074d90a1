//! Prometheus metrics: counters and histograms the request path bumps with a few relaxed
//! atomics, rendered in the text exposition format (0.0.4) when `/metrics` is scraped.
//!
//! One registry per process ([`global`]): protocols, the engine and layers in different
//! crates all report to it without threading a handle through every constructor, as a
//! process has one `/metrics`. Families whose numbers live elsewhere (cache tiers, live
//! sessions) are read at scrape time by collectors ([`Metrics::add_collector`]).
//!
//! Labels stay bounded: vdisks, protocols, backends and live sessions (a session's series
//! go with it), never clients' addresses or request offsets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::chunks::Chunks;
use crate::error::Result;
use crate::source::{
    BlockSource, Capability, DynSource, Extent, Geometry, ReadOpts, SourceInfo, WriteOpts, ZeroOpts,
};

/// Request latency buckets, in seconds: 50 µs (a RAM hit over loopback) to 10 s (a
/// stalled backend).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Boot duration buckets, in seconds (attach to boot complete).
pub const BOOT_BUCKETS: &[f64] = &[
    5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
];

fn relaxed_add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative; the last is above every bound).
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        relaxed_add(&self.counts[bucket], 1);
        relaxed_add(
            &self.sum_nanos,
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// What clients did with one vdisk over one protocol.
#[derive(Debug)]
pub struct IoMetrics {
    /// Attachments (connections, HTTP SAN or TFTP transfers) made.
    pub attaches: AtomicU64,
    /// Attachments open now.
    pub live: AtomicI64,
    /// Read requests.
    pub read_requests: AtomicU64,
    /// Write, trim and zero requests.
    pub write_requests: AtomicU64,
    /// Flush, cache, block-status and other requests.
    pub other_requests: AtomicU64,
    /// Bytes clients read.
    pub read_bytes: AtomicU64,
    /// Bytes clients wrote.
    pub written_bytes: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Requests answered ENOSPC (a full write cache).
    pub no_space: AtomicU64,
    /// Time from a read request's arrival to its reply.
    pub read_latency: Histogram,
    /// Same for writes (trim and zeroes included).
    pub write_latency: Histogram,
}

impl Default for IoMetrics {
    fn default() -> Self {
        IoMetrics {
            attaches: AtomicU64::new(0),
            live: AtomicI64::new(0),
            read_requests: AtomicU64::new(0),
            write_requests: AtomicU64::new(0),
            other_requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            no_space: AtomicU64::new(0),
            read_latency: Histogram::new(LATENCY_BUCKETS),
            write_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

/// Which kind of request finished, for [`IoMetrics::finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A read.
    Read,
    /// A write, trim or zeroing.
    Write,
    /// Anything else (flush, cache, block status).
    Other,
}

impl IoMetrics {
    /// Records a finished request and how long it took.
    pub fn finished(&self, kind: RequestKind, elapsed: Duration) {
        match kind {
            RequestKind::Read => {
                relaxed_add(&self.read_requests, 1);
                self.read_latency.observe(elapsed);
            }
            RequestKind::Write => {
                relaxed_add(&self.write_requests, 1);
                self.write_latency.observe(elapsed);
            }
            RequestKind::Other => relaxed_add(&self.other_requests, 1),
        }
    }
}

/// Requests the engine sent one backend.
#[derive(Debug)]
pub struct BackendMetrics {
    /// Reads, writes, flushes... sent.
    pub requests: AtomicU64,
    /// Those that failed.
    pub errors: AtomicU64,
    /// Bytes read from it.
    pub read_bytes: AtomicU64,
    /// Bytes written to it.
    pub written_bytes: AtomicU64,
    /// Time per request.
    pub latency: Histogram,
}

impl Default for BackendMetrics {
    fn default() -> Self {
        BackendMetrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

/// Writes families in the text exposition format; each family's samples together, as
/// the format requires.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: Labels<'_>, extra: Option<(&str, &str)>) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .copied()
        .chain(extra)
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

impl Exposition {
    /// Starts a family: `kind` is `counter`, `gauge` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{} {value}", label_text(labels, None));
    }

    /// The series of one histogram of the current family.
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, histogram: &Histogram) {
        let mut cumulative = 0;
        for (i, count) in histogram.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = histogram
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                self.out,
                "{name}_bucket{} {cumulative}",
                label_text(labels, Some(("le", &bound)))
            );
        }
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let labels = label_text(labels, None);
        let _ = writeln!(self.out, "{name}_sum{labels} {sum}");
        let _ = writeln!(self.out, "{name}_count{labels} {cumulative}");
    }

    /// The text so far.
    pub fn finish(self) -> String {
        self.out
    }
}

type Collector = Box<dyn Fn(&mut Exposition) + Send + Sync>;

/// The process's metrics.
#[derive(Default)]
pub struct Metrics {
    io: Mutex<BTreeMap<(String, String), Arc<IoMetrics>>>,
    backends: Mutex<BTreeMap<String, Arc<BackendMetrics>>>,
    boots: Mutex<BTreeMap<String, Arc<Histogram>>>,
    /// Each recent session's boot time, for the live view (`osstream top`).
    boot_times: Mutex<crate::live::Recent<Duration>>,
    collectors: Mutex<Vec<Collector>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// The counters of `vdisk` over `protocol` (created on first use).
    pub fn io(&self, vdisk: &str, protocol: &str) -> Arc<IoMetrics> {
        lock(&self.io)
            .entry((vdisk.to_owned(), protocol.to_owned()))
            .or_default()
            .clone()
    }

    /// Bytes clients read and wrote since the process started, every vdisk and protocol:
    /// what a server reports as its load.
    pub fn client_bytes(&self) -> u64 {
        lock(&self.io)
            .values()
            .map(|io| {
                io.read_bytes.load(Ordering::Relaxed) + io.written_bytes.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// The counters of backend `name`.
    pub fn backend(&self, name: &str) -> Arc<BackendMetrics> {
        lock(&self.backends)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Records a boot of `vdisk` by `session` that took `elapsed` from attach to boot
    /// complete.
    pub fn boot_complete(&self, vdisk: &str, session: &str, elapsed: Duration) {
        lock(&self.boots)
            .entry(vdisk.to_owned())
            .or_insert_with(|| Arc::new(Histogram::new(BOOT_BUCKETS)))
            .observe(elapsed);
        lock(&self.boot_times).insert(session, elapsed);
    }

    /// How long `session`'s boot took, once it is complete (for the last
    /// [`crate::live::SESSIONS_KEPT`] sessions that booted).
    pub fn boot_seconds(&self, session: &str) -> Option<Duration> {
        lock(&self.boot_times).get(session).copied()
    }

    /// Adds families read at scrape time (each call must write whole families).
    pub fn add_collector(&self, collector: impl Fn(&mut Exposition) + Send + Sync + 'static) {
        lock(&self.collectors).push(Box::new(collector));
    }

    /// Every family, in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.render_io(&mut out);
        self.render_backends(&mut out);
        let boots: Vec<_> = lock(&self.boots)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.family(
            "osstream_boot_seconds",
            "histogram",
            "Time from a session's first attach to its boot being complete (the client said so, or its boot profile's recording ended).",
        );
        for (vdisk, histogram) in &boots {
            out.histogram("osstream_boot_seconds", &[("vdisk", vdisk)], histogram);
        }
        for collector in lock(&self.collectors).iter() {
            collector(&mut out);
        }
        out.finish()
    }

    fn render_io(&self, out: &mut Exposition) {
        let io: Vec<Series<IoMetrics>> = lock(&self.io)
            .iter()
            .map(|((vdisk, protocol), m)| {
                (
                    vec![("vdisk", vdisk.clone()), ("protocol", protocol.clone())],
                    m.clone(),
                )
            })
            .collect();
        out.family(
            "osstream_attachments",
            "gauge",
            "Attachments open now, per vdisk and protocol.",
        );
        for (labels, m) in &io {
            out.sample(
                "osstream_attachments",
                &borrowed(labels),
                m.live.load(Ordering::Relaxed),
            );
        }
        render_counters(
            out,
            &io,
            &[
                (
                    "osstream_attaches_total",
                    "Attachments made (NBD connections, HTTP SAN and TFTP transfers).",
                    |m| &m.attaches,
                ),
                (
                    "osstream_read_requests_total",
                    "Read requests served.",
                    |m| &m.read_requests,
                ),
                (
                    "osstream_write_requests_total",
                    "Write, trim and zero requests served.",
                    |m| &m.write_requests,
                ),
                (
                    "osstream_other_requests_total",
                    "Flush, cache and block-status requests served.",
                    |m| &m.other_requests,
                ),
                ("osstream_read_bytes_total", "Bytes clients read.", |m| {
                    &m.read_bytes
                }),
                (
                    "osstream_written_bytes_total",
                    "Bytes clients wrote.",
                    |m| &m.written_bytes,
                ),
                (
                    "osstream_request_errors_total",
                    "Requests answered with an error.",
                    |m| &m.errors,
                ),
                (
                    "osstream_no_space_errors_total",
                    "Requests answered ENOSPC: a session's write cache was full.",
                    |m| &m.no_space,
                ),
            ],
        );
        render_histograms(
            out,
            &io,
            &[
                (
                    "osstream_read_latency_seconds",
                    "Time from a read request's arrival to its reply.",
                    |m| &m.read_latency,
                ),
                (
                    "osstream_write_latency_seconds",
                    "Time from a write (trim, zero) request's arrival to its reply.",
                    |m| &m.write_latency,
                ),
            ],
        );
    }

    fn render_backends(&self, out: &mut Exposition) {
        let backends: Vec<Series<BackendMetrics>> = lock(&self.backends)
            .iter()
            .map(|(name, m)| (vec![("backend", name.clone())], m.clone()))
            .collect();
        render_counters(
            out,
            &backends,
            &[
                (
                    "osstream_backend_requests_total",
                    "Requests sent to the backend (reads, writes, flushes...).",
                    |m| &m.requests,
                ),
                (
                    "osstream_backend_errors_total",
                    "Backend requests that failed.",
                    |m| &m.errors,
                ),
                (
                    "osstream_backend_read_bytes_total",
                    "Bytes read from the backend.",
                    |m| &m.read_bytes,
                ),
                (
                    "osstream_backend_written_bytes_total",
                    "Bytes written to the backend.",
                    |m| &m.written_bytes,
                ),
            ],
        );
        render_histograms(
            out,
            &backends,
            &[(
                "osstream_backend_latency_seconds",
                "Time per backend request.",
                |m| &m.latency,
            )],
        );
    }
}

/// A family to render: its name, help, and which counter or histogram of a series.
type Family<'a, M, T> = (&'a str, &'a str, fn(&M) -> &T);

/// One labelled set of metrics: its label pairs and its counters.
type Series<M> = (Vec<(&'static str, String)>, Arc<M>);

fn borrowed<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Counter families over `series`: (name, help, which counter).
fn render_counters<M>(
    out: &mut Exposition,
    series: &[Series<M>],
    families: &[Family<'_, M, AtomicU64>],
) {
    for (name, help, pick) in families {
        out.family(name, "counter", help);
        for (labels, m) in series {
            out.sample(name, &borrowed(labels), pick(m).load(Ordering::Relaxed));
        }
    }
}

/// Histogram families over `series`: (name, help, which histogram).
fn render_histograms<M>(
    out: &mut Exposition,
    series: &[Series<M>],
    families: &[Family<'_, M, Histogram>],
) {
    for (name, help, pick) in families {
        out.family(name, "histogram", help);
        for (labels, m) in series {
            out.histogram(name, &borrowed(labels), pick(m));
        }
    }
}

/// `source` with every request counted in backend `name`'s metrics.
pub(crate) fn metered(source: DynSource, name: &str) -> DynSource {
    Arc::new(MeteredSource {
        inner: source,
        metrics: global().backend(name),
    })
}

#[derive(Debug)]
struct MeteredSource {
    inner: DynSource,
    metrics: Arc<BackendMetrics>,
}

impl MeteredSource {
    fn record<T>(&self, started: Instant, outcome: &Result<T>) {
        let m = &self.metrics;
        relaxed_add(&m.requests, 1);
        if outcome.is_err() {
            relaxed_add(&m.errors, 1);
        }
        m.latency.observe(started.elapsed());
    }
}

#[async_trait]
impl BlockSource for MeteredSource {
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
        let started = Instant::now();
        let outcome = self.inner.read_at(offset, len, opts).await;
        self.record(started, &outcome);
        if outcome.is_ok() {
            relaxed_add(&self.metrics.read_bytes, len as u64);
        }
        outcome
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        let (started, len) = (Instant::now(), data.len() as u64);
        let outcome = self.inner.write_at(offset, data, opts).await;
        self.record(started, &outcome);
        if outcome.is_ok() {
            relaxed_add(&self.metrics.written_bytes, len);
        }
        outcome
    }

    async fn flush(&self) -> Result<()> {
        let started = Instant::now();
        let outcome = self.inner.flush().await;
        self.record(started, &outcome);
        outcome
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let started = Instant::now();
        let outcome = self.inner.trim(offset, len).await;
        self.record(started, &outcome);
        outcome
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        let started = Instant::now();
        let outcome = self.inner.write_zeroes(offset, len, opts).await;
        self.record(started, &outcome);
        outcome
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        // Answered from metadata by most backends: not a data request.
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = Exposition::default();
        out.family("x_seconds", "histogram", "test");
        out.histogram("x_seconds", &[("vdisk", "a\"b")], &h);
        let text = out.finish();
        assert!(
            text.contains("x_seconds_bucket{vdisk=\"a\\\"b\",le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{vdisk=\"a\\\"b\",le=\"0.01\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{vdisk=\"a\\\"b\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_count{vdisk=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn a_boot_is_timed_per_vdisk_and_remembered_per_session() {
        let metrics = Metrics::default();
        metrics.boot_complete("deb", "s1", Duration::from_millis(23_100));
        let text = metrics.render();
        assert!(
            text.contains("osstream_boot_seconds_count{vdisk=\"deb\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            metrics.boot_seconds("s1"),
            Some(Duration::from_millis(23_100))
        );
        assert_eq!(metrics.boot_seconds("s2"), None);
    }

    #[test]
    fn io_counters_render_per_vdisk_and_protocol() {
        let metrics = Metrics::default();
        let io = metrics.io("deb", "nbd");
        io.finished(RequestKind::Read, Duration::from_micros(80));
        relaxed_add(&io.read_bytes, 4096);
        let text = metrics.render();
        assert!(
            text.contains("osstream_read_requests_total{vdisk=\"deb\",protocol=\"nbd\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("osstream_read_bytes_total{vdisk=\"deb\",protocol=\"nbd\"} 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE osstream_read_latency_seconds histogram\n"),
            "{text}"
        );
    }
}
