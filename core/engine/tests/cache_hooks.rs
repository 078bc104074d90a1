//! How the cache layer schedules its side work: a tier put never holds up a reader, and
//! demand reads go before prefetch. Timings are real but generous (a slow step takes
//! seconds, a quick one must take under one), so a busy machine does not flip them.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use osstream_core::{
    BlockKey, BlockSourceExt, CacheLayer, CacheTier, DynSource, Layer, RamTier, ReadOpts, Result,
    TierStats, async_trait,
};
use osstream_testkit::{InstrumentedSource, MemSource, pattern};
use tokio::task::JoinHandle;

const BLOCK: u64 = 65_536;

/// Fast enough for any step that must not wait on a slow one.
const QUICK: Duration = Duration::from_secs(1);

/// A RAM tier whose `put` takes `put_delay` (a disk tier writing), and that counts.
#[derive(Debug)]
struct SlowPutTier {
    inner: RamTier,
    put_delay: Duration,
    puts_started: AtomicU64,
    puts_done: AtomicU64,
    gets_found: AtomicU64,
}

impl SlowPutTier {
    fn new(put_delay: Duration) -> Arc<Self> {
        Arc::new(SlowPutTier {
            inner: RamTier::new(64 << 20),
            put_delay,
            puts_started: AtomicU64::new(0),
            puts_done: AtomicU64::new(0),
            gets_found: AtomicU64::new(0),
        })
    }

    fn puts_started(&self) -> u64 {
        self.puts_started.load(Ordering::SeqCst)
    }

    fn puts_done(&self) -> u64 {
        self.puts_done.load(Ordering::SeqCst)
    }

    fn gets_found(&self) -> u64 {
        self.gets_found.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CacheTier for SlowPutTier {
    fn name(&self) -> &str {
        "slow-put"
    }

    async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>> {
        let found = self.inner.get(key).await?;
        if found.is_some() {
            self.gets_found.fetch_add(1, Ordering::SeqCst);
        }
        Ok(found)
    }

    async fn put(&self, key: BlockKey, block: Bytes) -> Result<()> {
        self.puts_started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.put_delay).await;
        self.inner.put(key, block).await?;
        self.puts_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn remove(&self, key: &BlockKey) -> Result<()> {
        self.inner.remove(key).await
    }

    async fn invalidate(&self, image: u128, generation: u128) -> Result<u64> {
        self.inner.invalidate(image, generation).await
    }

    fn stats(&self) -> TierStats {
        self.inner.stats()
    }
}

/// A read made in a task of its own: its result, how long it took, and how many tier puts
/// had finished when it returned.
fn timed_read(
    source: &DynSource,
    tier: &Arc<SlowPutTier>,
    offset: u64,
    len: usize,
) -> JoinHandle<(Result<Vec<u8>>, Duration, u64)> {
    let (source, tier) = (source.clone(), tier.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let got = source.read_bytes(offset, len).await.map(|b| b.to_vec());
        (got, started.elapsed(), tier.puts_done())
    })
}

/// A demand read in a task of its own: its bytes and how long it took.
fn demand_read(source: &DynSource, offset: u64, len: usize) -> JoinHandle<(Vec<u8>, Duration)> {
    let source = source.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let got = source.read_bytes(offset, len).await.expect("demand read");
        (got.to_vec(), started.elapsed())
    })
}

/// Prefetches `blocks` blocks from block `first` in a task of its own.
fn prefetch(source: &DynSource, first: u64, blocks: u64) -> JoinHandle<Result<()>> {
    let source = source.clone();
    tokio::spawn(async move {
        source
            .prefetch(first * BLOCK, (blocks * BLOCK) as usize)
            .await
    })
}

/// Waits (up to ten seconds) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn bytes_at(data: &[u8], offset: u64, len: usize) -> &[u8] {
    &data[offset as usize..offset as usize + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filler_and_its_waiters_return_before_a_slow_tier_put_finishes() {
    let data = pattern(30, 1 << 20);
    let backend = InstrumentedSource::counting(
        Arc::new(MemSource::new("m", data.clone())),
        Duration::from_millis(300),
    );
    let tier = SlowPutTier::new(Duration::from_secs(2));
    let layer = CacheLayer::new(tier.clone(), BLOCK);
    let source = layer.layer(backend.clone());

    let filler = timed_read(&source, &tier, 0, 4096);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = timed_read(&source, &tier, 1000, 2000);
    for (reader, offset, len) in [(filler, 0, 4096), (waiter, 1000, 2000)] {
        let (got, took, puts_done) = reader.await.unwrap();
        assert!(got.unwrap() == bytes_at(&data, offset, len));
        assert_eq!(puts_done, 0, "the read of {offset} waited for the tier put");
        assert!(took < QUICK, "the read of {offset} took {took:?}");
    }
    assert_eq!(backend.reads(), 1, "one fill, shared");
    let stats = layer.stats();
    assert_eq!((stats.misses, stats.coalesced), (1, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_put_is_under_way_is_served_without_the_backend_or_the_put() {
    let data = pattern(31, 1 << 20);
    let backend =
        InstrumentedSource::counting(Arc::new(MemSource::new("m", data.clone())), Duration::ZERO);
    let tier = SlowPutTier::new(Duration::from_secs(2));
    let layer = CacheLayer::new(tier.clone(), BLOCK);
    let source = layer.layer(backend.clone());

    let (got, _, _) = timed_read(&source, &tier, 0, 100).await.unwrap();
    assert!(got.unwrap() == data[..100]);
    until("the tier put starts", || tier.puts_started() == 1).await;

    // Arriving after the fill, while its put runs.
    let (got, took, puts_done) = timed_read(&source, &tier, 5000, 3000).await.unwrap();
    assert!(got.unwrap() == bytes_at(&data, 5000, 3000));
    assert_eq!(puts_done, 0, "the read waited for the tier put");
    assert!(took < QUICK, "took {took:?}");
    assert_eq!(backend.reads(), 1, "the filled block was read again");
    assert_eq!(layer.stats().hits, 1, "{:?}", layer.stats());

    // Once stored, the block comes from the tier.
    until("the tier put is done", || tier.puts_done() == 1).await;
    let (got, _, _) = timed_read(&source, &tier, 60_000, 5536).await.unwrap();
    assert!(got.unwrap() == bytes_at(&data, 60_000, 5536));
    assert_eq!(tier.gets_found(), 1, "not a tier hit");
    assert_eq!(backend.reads(), 1);
    let stats = layer.stats();
    assert_eq!((stats.hits, stats.misses, stats.coalesced), (2, 1, 0));
}

/// Without a tokio runtime there is nobody to hand the put to: it is done inline, so the
/// block is in the tier when the read returns.
#[test]
fn without_a_runtime_the_put_is_made_inline() {
    let data = pattern(32, 1 << 20);
    let layer = CacheLayer::new(Arc::new(RamTier::new(16 << 20)), BLOCK);
    let source = layer.layer(Arc::new(MemSource::new("m", data.clone())));
    // Every step below the read is ready at once, so one poll runs it to the end.
    let mut read = pin!(source.read_at(10, 100, ReadOpts::default()));
    let Poll::Ready(got) = read.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("the read did not complete in one poll");
    };
    assert!(got.unwrap() == data[10..110]);
    assert_eq!(layer.tier().stats().entries, 1, "the block was not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_reads_take_over_blocks_of_running_and_queued_prefetch() {
    let data = pattern(33, 64 * BLOCK as usize);
    let backend = InstrumentedSource::builder(Arc::new(MemSource::new("m", data.clone())))
        .prefetch_delay(Duration::from_secs(2))
        .build();
    let layer =
        CacheLayer::new(Arc::new(RamTier::new(64 << 20)), BLOCK).with_prefetch_concurrency(1);
    let source = layer.layer(backend.clone());

    // One prefetch reads blocks 0..16 (one 2 s backend read); a second one has claimed
    // blocks 16..48 and queues behind it at the gate.
    let running = prefetch(&source, 0, 16);
    until("the first prefetch reads", || backend.prefetch_reads() == 1).await;
    let queued = prefetch(&source, 16, 32);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend.prefetch_reads(),
        1,
        "the gate let the second prefetch by"
    );

    let in_queued = demand_read(&source, 20 * BLOCK + 123, 1000);
    let in_running = demand_read(&source, 5 * BLOCK + 7, 3 * BLOCK as usize);
    for (reader, offset, len) in [
        (in_queued, 20 * BLOCK + 123, 1000),
        (in_running, 5 * BLOCK + 7, 3 * BLOCK as usize),
    ] {
        let (got, took) = reader.await.unwrap();
        assert!(
            got == bytes_at(&data, offset, len),
            "wrong bytes at {offset}"
        );
        assert!(took < QUICK, "the demand read at {offset} took {took:?}");
    }
    assert!(
        !running.is_finished() && !queued.is_finished(),
        "the demand reads did not go first"
    );
    let stats = layer.stats();
    assert_eq!(stats.preempted, 1 + 4, "block 20, blocks 5..=8: {stats:?}");
    assert_eq!(
        backend.reads() - backend.prefetch_reads(),
        2,
        "one demand backend read each"
    );

    for task in [running, queued] {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("prefetch hung")
            .unwrap()
            .expect("prefetch");
    }
    let reads = backend.reads();
    assert!(
        source.read_bytes(0, 48 * BLOCK as usize).await.unwrap() == data[..48 * BLOCK as usize]
    );
    assert_eq!(
        backend.reads(),
        reads,
        "the prefetched blocks were not cached"
    );
}

/// A demand read took block 2 over from a prefetch; the prefetch, cancelled, must not
/// remove the demand fill's entry, so a second demand reader still waits for that fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_fill_leaves_the_blocks_a_demand_read_took_over_alone() {
    let data = pattern(34, 16 * BLOCK as usize);
    let backend = InstrumentedSource::builder(Arc::new(MemSource::new("m", data.clone())))
        .delay(Duration::from_millis(600))
        .prefetch_delay(Duration::from_secs(2))
        .build();
    let layer = CacheLayer::new(Arc::new(RamTier::new(64 << 20)), BLOCK);
    let source = layer.layer(backend.clone());

    let running = prefetch(&source, 0, 4);
    until("the prefetch reads", || backend.prefetch_reads() == 1).await;
    let first = demand_read(&source, 2 * BLOCK, 100);
    until("the demand read reads", || backend.reads() == 2).await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    let second = demand_read(&source, 2 * BLOCK + 50, 100);

    for (reader, offset) in [(first, 2 * BLOCK), (second, 2 * BLOCK + 50)] {
        let (got, _) = reader.await.unwrap();
        assert!(
            got == bytes_at(&data, offset, 100),
            "wrong bytes at {offset}"
        );
    }
    assert_eq!(
        backend.reads(),
        2,
        "the second demand reader read the backend"
    );
    let stats = layer.stats();
    assert_eq!((stats.preempted, stats.coalesced), (1, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_read_waits_for_a_demand_fill() {
    let data = pattern(35, 1 << 20);
    let backend = InstrumentedSource::counting(
        Arc::new(MemSource::new("m", data.clone())),
        Duration::from_millis(300),
    );
    let layer = CacheLayer::new(Arc::new(RamTier::new(16 << 20)), BLOCK);
    let source = layer.layer(backend.clone());

    let demand = demand_read(&source, 100, 1000);
    until("the demand read reads", || backend.reads() == 1).await;
    let got = source
        .read_at(0, 4096, ReadOpts { prefetch: true })
        .await
        .unwrap();
    assert!(got == data[..4096]);
    let (got, _) = demand.await.unwrap();
    assert!(got == bytes_at(&data, 100, 1000));
    assert_eq!(backend.reads(), 1, "the prefetch read the backend too");
    assert_eq!(layer.stats().coalesced, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_backend_reads_pass_a_bounded_gate_and_demand_reads_do_not() {
    for (concurrency, layer) in [
        (2, CacheLayer::new(Arc::new(RamTier::new(64 << 20)), BLOCK)),
        (
            3,
            CacheLayer::new(Arc::new(RamTier::new(64 << 20)), BLOCK).with_prefetch_concurrency(3),
        ),
    ] {
        let data = pattern(36, 16 * BLOCK as usize);
        let backend = InstrumentedSource::builder(Arc::new(MemSource::new("m", data.clone())))
            .delay(Duration::from_millis(500))
            .build();
        let source = layer.layer(backend.clone());

        // Disjoint prefetches, all at once: no more than the gate allows reach the backend.
        let prefetches: Vec<_> = (0..6).map(|i| prefetch(&source, i * 2, 2)).collect();
        for task in prefetches {
            task.await.unwrap().unwrap();
        }
        assert_eq!(backend.peak_concurrent_reads(), concurrency, "{layer:?}");

        // Demand reads are not gated: all of them run at once.
        let demands: Vec<_> = (0..4)
            .map(|i| demand_read(&source, (12 + i) * BLOCK, 10))
            .collect();
        for (i, task) in demands.into_iter().enumerate() {
            let (got, _) = task.await.unwrap();
            assert!(got == bytes_at(&data, (12 + i as u64) * BLOCK, 10));
        }
        assert_eq!(backend.peak_concurrent_reads(), 4, "{layer:?}");
    }
}
