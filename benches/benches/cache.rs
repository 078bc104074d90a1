//! The RAM cache layer's hot paths against the source it fronts.
//!
//! - `hit/*`: reads served from the RAM tier (4 KiB inside one block, 1 MiB across 16),
//!   against the same read from a plain in-memory source.
//! - `cold/*`: a whole cold pass over a 64 MiB image through a fresh cache, at several
//!   block sizes: the cost of filling (backend read + split + tier insert).
//! - `evicting`: random 4 KiB reads over an image four times the cache capacity, so
//!   most reads miss and evict: the CLOCK ring and shard locks under churn.
//! - `policy/*`: the RAM tier's hit path and its churn (as `evicting`) for each eviction
//!   policy (`clock`, `lru`, `s3fifo`).
//! - `layers/*`: one 4 KiB read through 0, 1 and 4 pass-through layers (the price of a
//!   layer: a boxed future and a dynamic call), through the hedge layer alone (a timer
//!   armed per read), and through the default server stack (hedge, RAM cache hit,
//!   profile recorder).

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use osstream_core::{
    BlockSource, Bytes, CacheLayer, Capability, Chunks, DynSource, EvictionPolicy, Extent,
    Geometry, HedgeConfig, HedgeLayer, Layer, RamTier, ReadOpts, Result, SourceInfo, WriteOpts,
    ZeroOpts, async_trait,
};
use osstream_testkit::{MemProfiles, MemSource, pattern};

const IMAGE: usize = 64 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn image() -> DynSource {
    Arc::new(MemSource::new("bench", pattern(1, IMAGE)))
}

fn hit(c: &mut Criterion) {
    let rt = runtime();
    let plain = image();
    let cached = CacheLayer::new(Arc::new(RamTier::new(256 << 20)), 64 << 10).layer(plain.clone());
    rt.block_on(async {
        for offset in (0..IMAGE as u64).step_by(1 << 20) {
            cached
                .read_at(offset, 1 << 20, ReadOpts::default())
                .await
                .unwrap();
        }
    });
    let mut group = c.benchmark_group("hit");
    for (label, len) in [("4KiB", 4096usize), ("1MiB", 1 << 20)] {
        group.throughput(Throughput::Bytes(len as u64));
        for (name, source) in [("mem-source", &plain), ("ram-cache", &cached)] {
            let mut offset = 0u64;
            group.bench_function(BenchmarkId::new(name, label), |b| {
                b.to_async(&rt).iter(|| {
                    offset = (offset + 7 * 65536 + 4096) % (IMAGE as u64 - len as u64);
                    let source = source.clone();
                    async move {
                        source
                            .read_at(offset, len, ReadOpts::default())
                            .await
                            .unwrap()
                    }
                })
            });
        }
    }
    group.finish();
}

fn cold(c: &mut Criterion) {
    let rt = runtime();
    let plain = image();
    let mut group = c.benchmark_group("cold");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(IMAGE as u64));
    for block_size in [4096u64, 64 << 10, 1 << 20] {
        group.bench_function(BenchmarkId::new("pass-64MiB", block_size), |b| {
            b.to_async(&rt).iter(|| {
                let cached = CacheLayer::new(Arc::new(RamTier::new(256 << 20)), block_size)
                    .layer(plain.clone());
                async move {
                    for offset in (0..IMAGE as u64).step_by(256 << 10) {
                        cached
                            .read_at(offset, 256 << 10, ReadOpts::default())
                            .await
                            .unwrap();
                    }
                }
            })
        });
    }
    group.finish();
}

fn evicting(c: &mut Criterion) {
    let rt = runtime();
    let cached = CacheLayer::new(Arc::new(RamTier::new(16 << 20)), 64 << 10).layer(image());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut group = c.benchmark_group("evicting");
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("rand-4KiB-over-4x-capacity", |b| {
        b.to_async(&rt).iter(|| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let offset = (state % (IMAGE as u64 / 4096)) * 4096;
            let cached = cached.clone();
            async move {
                cached
                    .read_at(offset, 4096, ReadOpts::default())
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();
}

fn policy(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Bytes(4096));
    for policy in EvictionPolicy::ALL {
        let hot = CacheLayer::new(Arc::new(RamTier::with_policy(256 << 20, policy)), 64 << 10)
            .layer(image());
        rt.block_on(async {
            for offset in (0..IMAGE as u64).step_by(1 << 20) {
                hot.read_at(offset, 1 << 20, ReadOpts::default())
                    .await
                    .unwrap();
            }
        });
        let mut offset = 0u64;
        group.bench_function(BenchmarkId::new("hit-4KiB", policy.name()), |b| {
            b.to_async(&rt).iter(|| {
                offset = (offset + 7 * 65536 + 4096) % (IMAGE as u64 - 4096);
                let hot = hot.clone();
                async move {
                    hot.read_at(offset, 4096, ReadOpts::default())
                        .await
                        .unwrap()
                }
            })
        });
        let churn = CacheLayer::new(Arc::new(RamTier::with_policy(16 << 20, policy)), 64 << 10)
            .layer(image());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        group.bench_function(BenchmarkId::new("evicting-4KiB", policy.name()), |b| {
            b.to_async(&rt).iter(|| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let offset = (state % (IMAGE as u64 / 4096)) * 4096;
                let churn = churn.clone();
                async move {
                    churn
                        .read_at(offset, 4096, ReadOpts::default())
                        .await
                        .unwrap()
                }
            })
        });
    }
    group.finish();
}

/// A layer that adds nothing but itself: a wrapper passing every call on.
#[derive(Debug)]
struct PassThrough;

#[derive(Debug)]
struct Passed(DynSource);

impl Layer for PassThrough {
    fn name(&self) -> &str {
        "pass"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        Arc::new(Passed(inner))
    }
}

#[async_trait]
impl BlockSource for Passed {
    fn info(&self) -> &SourceInfo {
        self.0.info()
    }
    fn capability(&self) -> Capability {
        self.0.capability()
    }
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        self.0.read_at(offset, len, opts).await
    }
    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.0.write_at(offset, data, opts).await
    }
    async fn flush(&self) -> Result<()> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.0.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.0.write_zeroes(offset, len, opts).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.extents(offset, len).await
    }
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("layers");
    group.throughput(Throughput::Bytes(4096));
    let mut stacks: Vec<(String, DynSource)> = Vec::new();
    for count in [0usize, 1, 4] {
        let mut source = image();
        for _ in 0..count {
            source = PassThrough.layer(source);
        }
        stacks.push((format!("pass-through-{count}"), source));
    }
    stacks.push((
        "hedge-1".to_owned(),
        HedgeLayer::new(HedgeConfig::default()).layer(image()),
    ));
    // The default server stack over a warm cache: hedge next to the backend, the RAM
    // cache, the profile recorder on top.
    let stack: Vec<Arc<dyn Layer>> = vec![
        Arc::new(HedgeLayer::new(HedgeConfig::default())),
        Arc::new(CacheLayer::new(Arc::new(RamTier::new(256 << 20)), 64 << 10)),
        Arc::new(osstream_profile::ProfileLayer::new(
            osstream_profile::ProfileConfig::default(),
            Arc::new(MemProfiles::default()),
            true,
        )),
    ];
    let mut source = image();
    for layer in &stack {
        source = layer.layer(source);
    }
    rt.block_on(async {
        for offset in (0..IMAGE as u64).step_by(1 << 20) {
            source
                .read_at(offset, 1 << 20, ReadOpts::default())
                .await
                .unwrap();
        }
    });
    stacks.push(("default-stack-warm".to_owned(), source));
    for (name, source) in &stacks {
        let mut offset = 0u64;
        group.bench_function(BenchmarkId::new("read-4KiB", name), |b| {
            b.to_async(&rt).iter(|| {
                offset = (offset + 7 * 65536 + 4096) % (IMAGE as u64 - 4096);
                let source = source.clone();
                async move {
                    source
                        .read_at(offset, 4096, ReadOpts::default())
                        .await
                        .unwrap()
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hit, cold, evicting, policy, layers);
criterion_main!(benches);
