//! The cache layer over the RAM tier passes the conformance suites, is single-flight,
//! survives eviction pressure, never caches errors and drops blocks on writes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use osstream_core::{CacheLayer, ErrorKind, Layer, RamTier, ReadOpts, WriteOpts};
use osstream_testkit::{InstrumentedSource, MemSource, conformance, pattern};

fn cache(capacity: u64, block_size: u64) -> CacheLayer {
    CacheLayer::new(Arc::new(RamTier::new(capacity)), block_size)
}

#[tokio::test]
async fn mem_source_passes_read_suite() {
    let data = pattern(1, 1_000_003);
    conformance::read_suite(Arc::new(MemSource::new("m", data.clone())), &data).await;
}

#[tokio::test]
async fn cache_layer_passes_read_suite_at_several_block_sizes() {
    let data = pattern(2, 1_000_003);
    for block_size in [512, 3000, 4096, 65_536, 1 << 20] {
        let layer = cache(64 << 20, block_size);
        let source = layer.layer(Arc::new(MemSource::new("m", data.clone())));
        conformance::read_suite(source.clone(), &data).await;
        // A second pass is served from the tier and must be just as right.
        conformance::read_suite(source, &data).await;
        assert!(
            layer.stats().hits > 0,
            "block size {block_size}: {:?}",
            layer.stats()
        );
    }
}

#[tokio::test]
async fn cache_layer_under_eviction_pressure_stays_correct() {
    let data = pattern(3, 4 << 20);
    let layer = cache(256 << 10, 16 << 10);
    let source = layer.layer(Arc::new(MemSource::new("m", data.clone())));
    conformance::read_suite(source.clone(), &data).await;
    conformance::read_suite(source, &data).await;
    let tier = layer.tier().stats();
    assert!(
        tier.evictions > 0 && tier.bytes <= tier.capacity,
        "{tier:?}"
    );
}

#[tokio::test]
async fn cache_layer_is_single_flight() {
    conformance::single_flight_suite(&cache(16 << 20, 64 << 10)).await;
}

#[tokio::test]
async fn adjacent_misses_share_one_backend_read() {
    let data = pattern(4, 1 << 20);
    let counter =
        InstrumentedSource::counting(Arc::new(MemSource::new("m", data.clone())), Duration::ZERO);
    let layer = cache(16 << 20, 4096);
    let source = layer.layer(counter.clone());
    let got = source
        .read_at(100, 200_000, ReadOpts::default())
        .await
        .unwrap();
    assert!(got == data[100..200_100]);
    assert_eq!(counter.reads(), 1);
    assert_eq!(layer.stats().misses, 49);
}

#[tokio::test]
async fn errors_reach_every_waiter_and_are_not_cached() {
    let data = pattern(5, 1 << 20);
    // Every second backend read fails: #1 (warm-up) works, #2 (the shared fill) fails,
    // #3 (the retry) works.
    let flaky = InstrumentedSource::builder(Arc::new(MemSource::new("m", data.clone())))
        .delay(Duration::from_millis(30))
        .fail_every(2)
        .build();
    let source = cache(16 << 20, 65_536).layer(flaky.clone());
    source
        .read_at(5 * 65_536, 10, ReadOpts::default())
        .await
        .unwrap();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.read_at(0, 4096, ReadOpts::default()).await })
        })
        .collect();
    for reader in readers {
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(err.is_temporary());
    }
    assert_eq!(flaky.reads(), 2, "waiters share the failed fill");

    // The failure was not cached: the same layer reads the block again, and serves it.
    assert!(source.read_at(0, 4096, ReadOpts::default()).await.unwrap() == data[..4096]);
    assert_eq!(flaky.reads(), 3);
}

#[tokio::test]
async fn a_cancelled_filler_does_not_strand_its_waiters() {
    let data = pattern(6, 1 << 20);
    let slow = InstrumentedSource::counting(
        Arc::new(MemSource::new("m", data.clone())),
        Duration::from_millis(200),
    );
    let source = cache(16 << 20, 65_536).layer(slow.clone());
    let leader = {
        let source = source.clone();
        tokio::spawn(async move { source.read_at(0, 10, ReadOpts::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiter = {
        let source = source.clone();
        tokio::spawn(async move { source.read_at(5, 10, ReadOpts::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    leader.abort();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("waiter hung")
        .unwrap()
        .unwrap();
    assert!(got == data[5..15]);
    assert_eq!(
        slow.reads(),
        2,
        "the waiter refilled after the leader was cancelled"
    );
}

#[tokio::test]
async fn writable_sources_are_not_cached_so_every_connection_sees_every_write() {
    let data = pattern(7, 1 << 20);
    let layer = cache(16 << 20, 65_536);
    let writable = Arc::new(MemSource::writable("w", data.clone()));
    let source = layer.layer(writable.clone());
    // Two connections of one private vdisk, opened at different generations.
    let other = layer.layer(writable);
    assert!(source.read_at(0, 100, ReadOpts::default()).await.unwrap() == data[..100]);
    source
        .write_at(10, Bytes::from_static(b"fresh"), WriteOpts::default())
        .await
        .unwrap();
    let got = other.read_at(0, 100, ReadOpts::default()).await.unwrap();
    assert_eq!(&got.to_vec()[10..15], b"fresh");
    assert_eq!(
        layer.stats().hits + layer.stats().misses,
        0,
        "nothing went through the tier"
    );
    conformance::write_suite(source).await;
}

#[tokio::test]
async fn changed_generation_is_not_served_stale() {
    let layer = cache(16 << 20, 65_536);
    let old = layer.layer(Arc::new(MemSource::new("img", vec![1; 8192])));
    old.read_at(0, 8192, ReadOpts::default()).await.unwrap();
    // Same name, new content and generation: a different key space.
    let mut new_source = MemSource::new("img", vec![2; 8192]);
    new_source = MemSource::renamed_generation(new_source, "mem-2");
    let new = layer.layer(Arc::new(new_source));
    assert!(
        new.read_at(0, 8192, ReadOpts::default())
            .await
            .unwrap()
            .to_vec()
            .iter()
            .all(|&b| b == 2)
    );
}

#[tokio::test]
async fn multi_block_reads_hand_out_the_cached_blocks_without_copying() {
    let data = pattern(8, 1 << 20);
    let source = cache(16 << 20, 65_536).layer(Arc::new(MemSource::new("m", data.clone())));
    let got = source
        .read_at(65_536 - 10, 65_536 + 20, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(
        got.parts().len(),
        3,
        "head of block 0, all of block 1, tail of block 2"
    );
    assert!(got == data[65_526..131_082]);
    let again = source
        .read_at(65_536 - 10, 65_536 + 20, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(
        got.parts()[1].as_ptr(),
        again.parts()[1].as_ptr(),
        "both reads share the cached block's memory"
    );
}

/// Issue 12, item 1: two backends holding an image of the same name, size and generation
/// but different bytes never share cached blocks; the key is the image's identity.
#[tokio::test]
async fn images_of_one_name_on_two_backends_never_share_cached_blocks() {
    let layer = cache(16 << 20, 64 << 10);
    let (a_data, b_data) = (pattern(40, 1 << 20), pattern(41, 1 << 20));
    let a = layer.layer(Arc::new(
        MemSource::new("win11", a_data.clone()).with_identity("file:/srv/a/win11.img"),
    ));
    let b = layer.layer(Arc::new(
        MemSource::new("win11", b_data.clone()).with_identity("file:/srv/b/win11.img"),
    ));
    assert_eq!(a.info().generation, b.info().generation);
    use osstream_core::BlockSourceExt;
    assert_eq!(a.read_all().await.unwrap(), Bytes::from(a_data));
    assert_eq!(b.read_all().await.unwrap(), Bytes::from(b_data.clone()));
    // And one place reached through two backend names is one set of blocks.
    let c = layer.layer(Arc::new(
        MemSource::new("other-name", b_data.clone()).with_identity("file:/srv/b/win11.img"),
    ));
    let misses = layer.stats().misses;
    assert_eq!(c.read_all().await.unwrap(), Bytes::from(b_data));
    assert_eq!(
        layer.stats().misses,
        misses,
        "served from b's cached blocks"
    );
}
