//! The disk tier on a real file system: the tier contract, persistence across a restart,
//! damaged bytes and records never served, watermarks, a changed geometry, one process
//! per folder, and the tier under a cache layer.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use osstream_cache_disk::DiskTier;
use osstream_core::{BlockKey, Bytes, CacheLayer, CacheTier, ErrorKind, Layer, ReadOpts};
use osstream_testkit::{InstrumentedSource, MemSource, conformance, pattern};

const BLOCK: u64 = 4096;

fn key(block: u64) -> BlockKey {
    BlockKey {
        image: 7,
        generation: 9,
        block,
    }
}

fn data(seed: u64) -> Bytes {
    Bytes::from(pattern(seed, BLOCK as usize))
}

fn open(dir: &Path, slots: u64) -> DiskTier {
    DiskTier::open(dir, slots * BLOCK, BLOCK, (90, 50)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_passes_the_tier_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance::tier_suite(Arc::new(open(dir.path(), 64))).await;
}

#[tokio::test]
async fn blocks_survive_a_restart_and_removed_ones_stay_gone() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 32);
    for n in 0..10 {
        tier.put(key(n), data(n)).await.unwrap();
    }
    tier.remove(&key(3)).await.unwrap();
    assert_eq!(tier.invalidate(7, 8).await.unwrap(), 0);
    drop(tier);
    let tier = open(dir.path(), 32);
    assert_eq!(tier.stats().entries, 9);
    for n in (0..10).filter(|n| *n != 3) {
        assert_eq!(tier.get(&key(n)).await.unwrap(), Some(data(n)), "block {n}");
    }
    assert!(tier.get(&key(3)).await.unwrap().is_none());
    assert_eq!(tier.invalidate(7, 9).await.unwrap(), 9);
    drop(tier);
    assert_eq!(
        open(dir.path(), 32).stats().entries,
        0,
        "invalidated blocks stay gone"
    );
}

#[tokio::test]
async fn damaged_bytes_or_records_are_misses_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 16);
    for n in 0..4 {
        tier.put(key(n), data(n)).await.unwrap();
    }
    drop(tier);
    let file = |name: &str| {
        OpenOptions::new()
            .write(true)
            .open(dir.path().join(name))
            .unwrap()
    };
    // Slot 0 holds block 0: flip a byte of its data (a torn write). Slot 1's record is
    // sealed wrong (a torn record).
    file("blocks.dat").write_all_at(&[0x55], 100).unwrap();
    file("index.dat").write_all_at(&[0xff], 64 + 10).unwrap();
    let tier = open(dir.path(), 16);
    assert_eq!(tier.stats().entries, 3, "the torn record is ignored");
    assert!(
        tier.get(&key(0)).await.unwrap().is_none(),
        "torn data is a miss"
    );
    assert_eq!(tier.checksum_failures(), 1);
    assert!(tier.get(&key(1)).await.unwrap().is_none());
    assert_eq!(tier.get(&key(2)).await.unwrap(), Some(data(2)));
    assert_eq!(
        tier.stats().entries,
        2,
        "the damaged block's slot was freed"
    );
    drop(tier);
    assert_eq!(
        open(dir.path(), 16).stats().entries,
        2,
        "and stays free after a restart"
    );
}

#[tokio::test]
async fn reclaim_runs_from_the_high_to_the_low_watermark_and_keeps_read_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 20); // high 18 slots, low 10
    for n in 0..18 {
        tier.put(key(n), data(n)).await.unwrap();
    }
    assert_eq!(tier.stats().evictions, 0);
    tier.get(&key(0)).await.unwrap().unwrap();
    tier.put(key(100), data(100)).await.unwrap();
    let stats = tier.stats();
    assert_eq!(
        stats.entries, 11,
        "reclaimed to 10, then one put: {stats:?}"
    );
    assert_eq!(stats.evictions, 8);
    assert!(
        tier.get(&key(0)).await.unwrap().is_some(),
        "a block read since survives"
    );
    assert!(stats.bytes <= stats.capacity);
}

#[tokio::test]
async fn a_changed_geometry_starts_afresh_and_a_second_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 16);
    tier.put(key(1), data(1)).await.unwrap();
    let err = DiskTier::open(dir.path(), 16 * BLOCK, BLOCK, (90, 50)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string().contains("its own [cache.disk] dir"),
        "{err}"
    );
    drop(tier);
    let bigger = DiskTier::open(dir.path(), 16 * 8192, 8192, (90, 50)).unwrap();
    assert_eq!(bigger.stats().entries, 0);
    assert_eq!(bigger.stats().capacity, 16 * 8192);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_cache_layer_a_restarted_server_reads_from_disk_not_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let image = pattern(3, 1 << 20);
    let backend = InstrumentedSource::counting(
        Arc::new(MemSource::new("img", image.clone())),
        std::time::Duration::ZERO,
    );
    {
        let layer = CacheLayer::new(Arc::new(open(dir.path(), 512)), BLOCK);
        let source = layer.layer(backend.clone());
        let bytes = source
            .read_at(0, 1 << 20, ReadOpts::default())
            .await
            .unwrap();
        assert_eq!(bytes.to_vec(), image);
        // Puts run in the background: wait until they are all on disk.
        for _ in 0..200 {
            if layer.tier().stats().bytes == 1 << 20 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(layer.tier().stats().bytes, 1 << 20);
    }
    let reads = backend.reads();
    // The first layer's background puts may hold the tier (and its lock) a moment longer.
    let mut reopened = None;
    for _ in 0..100 {
        match DiskTier::open(dir.path(), 512 * BLOCK, BLOCK, (90, 50)) {
            Ok(tier) => {
                reopened = Some(tier);
                break;
            }
            Err(err) if err.kind() == ErrorKind::Conflict => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
    let layer = CacheLayer::new(Arc::new(reopened.expect("the tier reopens")), BLOCK);
    let source = layer.layer(backend.clone());
    let bytes = source
        .read_at(4096, 100_000, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(bytes.to_vec(), image[4096..104_096].to_vec());
    assert_eq!(backend.reads(), reads, "served from the disk tier");
}

#[tokio::test]
async fn reclaim_evicts_the_least_recently_used_and_never_a_pinned_block() {
    let dir = tempfile::tempdir().unwrap();
    // 20 slots, reclaim from 18 (90 %) down to 10 (50 %).
    let tier = open(dir.path(), 20);
    tier.pin([key(0), key(1)]);
    for n in 0..17 {
        tier.put(key(n), data(n)).await.unwrap();
    }
    // Used recently: 2..=5 were read after everything else was put.
    for n in 2..6 {
        assert!(tier.get(&key(n)).await.unwrap().is_some());
    }
    assert!(tier.holds(&key(16)));
    tier.put(key(17), data(17)).await.unwrap();
    tier.put(key(18), data(18)).await.unwrap();
    let held: Vec<u64> = (0..19).filter(|n| tier.holds(&key(*n))).collect();
    assert!(
        held.contains(&0) && held.contains(&1),
        "pinned blocks stay: {held:?}"
    );
    for n in 2..6 {
        assert!(held.contains(&n), "recently read block {n} stays: {held:?}");
    }
    assert!(
        !held.contains(&6),
        "the oldest unpinned, unread block goes first: {held:?}"
    );
    assert!(tier.stats().evictions > 0);
    assert_eq!(tier.pinned_held(), 2);
}

#[tokio::test]
async fn clear_empties_a_cache_but_not_one_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 8);
    tier.put(key(1), data(1)).await.unwrap();
    let err = DiskTier::clear(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    drop(tier);
    assert!(DiskTier::clear(dir.path()).unwrap() >= BLOCK);
    assert_eq!(open(dir.path(), 8).stats().entries, 0);
    assert_eq!(DiskTier::clear(&dir.path().join("never-made")).unwrap(), 0);
}
