//! The RAM cache layer's hot paths against the source it fronts.
//!
//! - `hit/*`: reads served from the RAM tier (4 KiB inside one block, 1 MiB across 16),
//!   against the same read from a plain in-memory source.
//! - `cold/*`: a whole cold pass over a 64 MiB image through a fresh cache, at several
//!   block sizes: the cost of filling (backend read + split + tier insert).
//! - `evicting`: random 4 KiB reads over an image four times the cache capacity, so
//!   most reads miss and evict: the CLOCK ring and shard locks under churn.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use osstream_core::{CacheLayer, DynSource, Layer, RamTier, ReadOpts};
use osstream_testkit::{MemSource, pattern};

const IMAGE: usize = 64 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
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

criterion_group!(benches, hit, cold, evicting);
criterion_main!(benches);
