//! Hedged reads: a stalled backend read is sent again and the first answer wins; the
//! budget caps hedges; errors wait for the twin; prefetch reads are never hedged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, DynSource, Error, ErrorKind, Extent, Geometry,
    HedgeConfig, HedgeLayer, Layer, ReadOpts, Result, Seconds, SourceInfo, WriteOpts, ZeroOpts,
    async_trait,
};
use osstream_testkit::{MemSource, pattern};

/// Reads whose number (1-based) is listed in `slow` stall: the first for `stall`, later
/// ones twice as long; those also in `fail` then fail.
#[derive(Debug)]
struct Flaky {
    inner: MemSource,
    slow: Vec<u64>,
    fail: Vec<u64>,
    stall: Duration,
    calls: AtomicU64,
}

#[async_trait]
impl BlockSource for Flaky {
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
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(position) = self.slow.iter().position(|c| *c == call) {
            tokio::time::sleep(self.stall * (position as u32 + 1)).await;
            if self.fail.contains(&call) {
                return Err(Error::new(ErrorKind::Io, "injected failure"));
            }
        }
        self.inner.read_at(offset, len, opts).await
    }
    async fn write_at(&self, o: u64, d: Bytes, w: WriteOpts) -> Result<()> {
        self.inner.write_at(o, d, w).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, o: u64, l: u64) -> Result<()> {
        self.inner.trim(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, z: ZeroOpts) -> Result<()> {
        self.inner.write_zeroes(o, l, z).await
    }
    async fn extents(&self, o: u64, l: u64) -> Result<Vec<Extent>> {
        self.inner.extents(o, l).await
    }
}

fn flaky(slow: &[u64], stall: Duration, fail: &[u64]) -> Arc<Flaky> {
    Arc::new(Flaky {
        inner: MemSource::new("img", pattern(1, 1 << 20)),
        slow: slow.to_vec(),
        fail: fail.to_vec(),
        stall,
        calls: AtomicU64::new(0),
    })
}

fn layer(budget: u32) -> HedgeLayer {
    HedgeLayer::new(HedgeConfig {
        min_delay: Seconds(Duration::from_millis(5)),
        budget,
        ..HedgeConfig::default()
    })
}

async fn read(source: &DynSource, opts: ReadOpts) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let bytes = source.read_at(4096, 4096, opts).await.unwrap().to_vec();
    (bytes, started.elapsed())
}

#[tokio::test]
async fn a_stalled_read_is_sent_again_and_the_twin_answers() {
    let backend = flaky(&[20], Duration::from_secs(5), &[]);
    let hedge = layer(10);
    let source = hedge.layer(backend.clone());
    let want = pattern(1, 1 << 20)[4096..8192].to_vec();
    for _ in 0..19 {
        assert_eq!(read(&source, ReadOpts::default()).await.0, want);
    }
    let (bytes, took) = read(&source, ReadOpts::default()).await;
    assert_eq!(bytes, want);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let stats = hedge.stats();
    assert_eq!((stats.hedged, stats.hedge_won), (1, 1), "{stats:?}");
    assert_eq!(backend.calls.load(Ordering::SeqCst), 21);
}

#[tokio::test]
async fn without_budget_a_slow_read_is_waited_out() {
    let backend = flaky(&[1], Duration::from_millis(300), &[]);
    let hedge = layer(0);
    let source = hedge.layer(backend.clone());
    let (_, took) = read(&source, ReadOpts::default()).await;
    assert!(took >= Duration::from_millis(300));
    let stats = hedge.stats();
    assert_eq!((stats.hedged, stats.over_budget), (0, 1), "{stats:?}");
}

#[tokio::test]
async fn a_failed_first_read_waits_for_its_twin() {
    // Read 1 stalls 100 ms then fails; its twin (read 2, sent at about 20 ms) stalls
    // 200 ms and answers: the failure arrives first and the twin is awaited.
    let backend = flaky(&[1, 2], Duration::from_millis(100), &[1]);
    let hedge = layer(10);
    let source = hedge.layer(backend.clone());
    let (bytes, took) = read(&source, ReadOpts::default()).await;
    assert_eq!(bytes, pattern(1, 1 << 20)[4096..8192].to_vec());
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert_eq!(hedge.stats().hedge_won, 1);
}

#[tokio::test]
async fn prefetch_reads_are_not_hedged_and_a_disabled_layer_adds_nothing() {
    let backend = flaky(&[1], Duration::from_millis(100), &[]);
    let hedge = layer(10);
    let source = hedge.layer(backend.clone());
    read(&source, ReadOpts { prefetch: true }).await;
    assert_eq!(hedge.stats(), Default::default());
    let off = HedgeLayer::new(HedgeConfig {
        enabled: false,
        ..HedgeConfig::default()
    });
    let inner: DynSource = backend;
    assert!(Arc::ptr_eq(&off.layer(inner.clone()), &inner));
}
