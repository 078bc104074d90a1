//! Copy-on-write overlays: isolation between sessions, the base never written, bounded
//! RAM, durable disk overlays, spilling, and the conformance suites.

use std::sync::Arc;

use bytes::Bytes;
use osstream_core::{
    BlockSourceExt, CowLayer, DiskOverlay, ErrorKind, Extent, ExtentKind, Layer, RamOverlay,
    SpillOverlay, WriteOpts, ZeroOpts,
};
use osstream_testkit::{MemSource, conformance, pattern};

const BS: u64 = 4096;

fn base(len: usize) -> (Arc<MemSource>, Vec<u8>) {
    let data = pattern(3, len);
    (Arc::new(MemSource::new("base", data.clone())), data)
}

#[tokio::test]
async fn sessions_see_only_their_own_writes_and_the_base_is_never_written() {
    let (base, data) = base(1 << 20);
    let a = CowLayer::new(Box::new(RamOverlay::new(1 << 20)), BS).layer(base.clone());
    let b = CowLayer::new(Box::new(RamOverlay::new(1 << 20)), BS).layer(base.clone());
    a.write_at(
        100,
        Bytes::from_static(b"client A was here"),
        WriteOpts::default(),
    )
    .await
    .unwrap();
    b.write_at(100, Bytes::from_static(b"client B"), WriteOpts::default())
        .await
        .unwrap();
    let got_a = a.read_bytes(0, 8192).await.unwrap();
    let got_b = b.read_bytes(0, 8192).await.unwrap();
    assert_eq!(&got_a[100..117], b"client A was here");
    assert_eq!(&got_b[100..108], b"client B");
    // Read-modify-write kept the rest of the block.
    assert!(got_a[..100] == data[..100] && got_a[117..8192] == data[117..8192]);
    assert!(got_b[108..8192] == data[108..8192]);
    assert!(base.snapshot() == data, "the base image is never written");
}

#[tokio::test]
async fn cow_source_passes_the_conformance_suites() {
    let (base, data) = base(1_000_003);
    let layer = CowLayer::new(Box::new(RamOverlay::new(4 << 20)), BS);
    conformance::read_suite(layer.layer(base.clone()), &data).await;
    let written = layer.layer(base.clone());
    conformance::write_suite(written).await;
    assert!(base.snapshot() == data);
}

#[tokio::test]
async fn a_full_ram_overlay_refuses_writes_with_no_space() {
    let (base, _) = base(1 << 20);
    let source = CowLayer::new(Box::new(RamOverlay::new(8 * BS)), BS).layer(base);
    source
        .write_at(
            0,
            Bytes::from(vec![1u8; 8 * BS as usize]),
            WriteOpts::default(),
        )
        .await
        .unwrap();
    let err = source
        .write_at(8 * BS, Bytes::from(vec![2u8; 10]), WriteOpts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert!(err.to_string().contains("overlay is full"), "{err}");
    // Blocks already held can still be rewritten.
    source
        .write_at(0, Bytes::from(vec![3u8; 10]), WriteOpts::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_writes_to_one_block_both_survive() {
    let (base, _) = base(1 << 20);
    let source = CowLayer::new(Box::new(RamOverlay::new(1 << 20)), 65_536).layer(base);
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let source = source.clone();
            tokio::spawn(async move {
                source
                    .write_at(
                        u64::from(i) * 100,
                        Bytes::from(vec![i + 1; 100]),
                        WriteOpts::default(),
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let got = source.read_bytes(0, 1600).await.unwrap();
    for i in 0..16usize {
        assert!(
            got[i * 100..(i + 1) * 100]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "write {i} was lost"
        );
    }
}

#[tokio::test]
async fn a_flushed_disk_overlay_survives_reopening_and_a_discarded_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (base, data) = base(1 << 20);
    {
        let layer = CowLayer::new(
            Box::new(DiskOverlay::open(dir.path(), BS, 1 << 20, true).unwrap()),
            BS,
        );
        let source = layer.layer(base.clone());
        source
            .write_at(
                5000,
                Bytes::from_static(b"persistent"),
                WriteOpts::default(),
            )
            .await
            .unwrap();
        source.flush().await.unwrap();
        source
            .write_at(9000, Bytes::from_static(b"fua"), WriteOpts { fua: true })
            .await
            .unwrap();
    }
    let reopened = CowLayer::new(
        Box::new(DiskOverlay::open(dir.path(), BS, 1 << 20, true).unwrap()),
        BS,
    )
    .layer(base.clone());
    let got = reopened.read_bytes(0, 16384).await.unwrap();
    assert_eq!(&got[5000..5010], b"persistent");
    assert_eq!(&got[9000..9003], b"fua");
    assert!(got[..5000] == data[..5000]);
    let fresh = CowLayer::new(
        Box::new(DiskOverlay::open(dir.path(), BS, 1 << 20, false).unwrap()),
        BS,
    )
    .layer(base);
    assert!(
        fresh.read_bytes(0, 16384).await.unwrap()[..] == data[..16384],
        "a discarded overlay shows the base again"
    );
}

#[tokio::test]
async fn a_spill_overlay_moves_old_blocks_to_disk_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base(1 << 20);
    let disk = DiskOverlay::open(dir.path(), BS, 1 << 20, false).unwrap();
    let layer = CowLayer::new(Box::new(SpillOverlay::new(4 * BS, disk)), BS);
    let source = layer.layer(base);
    for block in 0..32u64 {
        source
            .write_at(
                block * BS,
                Bytes::from(vec![block as u8 + 1; BS as usize]),
                WriteOpts::default(),
            )
            .await
            .unwrap();
    }
    for block in 0..32u64 {
        let got = source.read_bytes(block * BS, BS as usize).await.unwrap();
        assert!(got.iter().all(|&b| b == block as u8 + 1), "block {block}");
    }
    let (ram, disk) = layer.usage();
    assert!(ram <= 4 * BS && disk >= 28 * BS, "ram {ram}, disk {disk}");
}

/// Issue 12, item 5: zeroing or trimming a whole disk on a small RAM overlay stores no
/// data: it succeeds, reads back zeroes, shows as zero extents, and leaves room to write.
#[tokio::test]
async fn whole_disk_zeroing_and_trim_fit_a_small_ram_overlay() {
    let (base, data) = base(64 * BS as usize);
    let layer = CowLayer::new(Box::new(RamOverlay::new(8 * BS)), BS);
    let source = layer.layer(base.clone());
    source
        .write_at(3, Bytes::from(vec![7u8; 5000]), WriteOpts::default())
        .await
        .unwrap();
    source
        .write_zeroes(0, 64 * BS, ZeroOpts::default())
        .await
        .unwrap();
    assert!(source.read_all().await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(layer.usage(), (0, 0), "zero markers hold no block data");
    assert_eq!(
        source.extents(0, 64 * BS).await.unwrap(),
        vec![Extent {
            length: 64 * BS,
            kind: ExtentKind::Zero
        }]
    );
    // The whole capacity is still there for writes.
    source
        .write_at(
            BS,
            Bytes::from(vec![9u8; 8 * BS as usize]),
            WriteOpts::default(),
        )
        .await
        .unwrap();
    let got = source.read_bytes(0, 10 * BS as usize).await.unwrap();
    assert!(got[..BS as usize].iter().all(|&b| b == 0));
    assert!(got[BS as usize..9 * BS as usize].iter().all(|&b| b == 9));
    assert!(got[9 * BS as usize..].iter().all(|&b| b == 0));
    // Trim of the whole disk too, and the base never shows through.
    source.trim(0, 64 * BS).await.unwrap();
    assert!(source.read_all().await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(layer.usage(), (0, 0));
    assert!(base.snapshot() == data, "the base is never written");
}

#[tokio::test]
async fn zeroing_part_of_a_block_fills_the_edges_and_extents_mix_kinds() {
    let (base, data) = base(16 * BS as usize);
    let layer = CowLayer::new(Box::new(RamOverlay::new(16 * BS)), BS);
    let source = layer.layer(base);
    // From the middle of block 1 to the middle of block 5: blocks 2-4 become markers,
    // blocks 1 and 5 are zero-filled copies.
    let (from, to) = (BS + 100, 5 * BS + 200);
    source
        .write_zeroes(from, to - from, ZeroOpts::default())
        .await
        .unwrap();
    let got = source.read_all().await.unwrap();
    assert!(got[from as usize..to as usize].iter().all(|&b| b == 0));
    assert!(got[..from as usize] == data[..from as usize]);
    assert!(got[to as usize..] == data[to as usize..]);
    assert_eq!(
        layer.usage().0,
        2 * BS,
        "only the two edge blocks hold data"
    );
    let extents = source.extents(0, 16 * BS).await.unwrap();
    let kinds: Vec<(u64, ExtentKind)> = extents.iter().map(|e| (e.length, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (BS, ExtentKind::Data),
            (BS, ExtentKind::Data),
            (3 * BS, ExtentKind::Zero),
            (BS, ExtentKind::Data),
            (10 * BS, ExtentKind::Data),
        ]
        .into_iter()
        .fold(
            Vec::new(),
            |mut merged: Vec<(u64, ExtentKind)>, (len, kind)| {
                match merged.last_mut() {
                    Some(last) if last.1 == kind => last.0 += len,
                    _ => merged.push((len, kind)),
                }
                merged
            }
        )
    );
    // A trim inside one block leaves it as it was.
    source.trim(12 * BS + 10, 100).await.unwrap();
    assert_eq!(
        source.read_bytes(12 * BS, BS as usize).await.unwrap()[..],
        data[12 * BS as usize..13 * BS as usize]
    );
}

#[tokio::test]
async fn zero_markers_of_a_disk_overlay_are_durable_and_its_file_stays_small() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * BS;
    let (base, _) = base(size as usize);
    {
        let layer = CowLayer::new(
            Box::new(DiskOverlay::open(dir.path(), BS, size, true).unwrap()),
            BS,
        );
        let source = layer.layer(base.clone());
        source
            .write_at(
                0,
                Bytes::from(vec![5u8; size as usize]),
                WriteOpts::default(),
            )
            .await
            .unwrap();
        source.flush().await.unwrap();
        source
            .write_zeroes(0, size, ZeroOpts::default())
            .await
            .unwrap();
        source.flush().await.unwrap();
        let blocks = std::fs::metadata(dir.path().join("overlay.data"))
            .unwrap()
            .blocks();
        assert!(
            blocks * 512 < 16 * BS,
            "the data file was punched: {blocks} sectors"
        );
    }
    let reopened = CowLayer::new(
        Box::new(DiskOverlay::open(dir.path(), BS, size, true).unwrap()),
        BS,
    )
    .layer(base);
    assert!(reopened.read_all().await.unwrap().iter().all(|&b| b == 0));
    let map = std::fs::metadata(dir.path().join("overlay.map"))
        .unwrap()
        .len();
    assert!(map < 4096, "a zeroed disk costs a small map: {map} bytes");
}

#[tokio::test]
async fn a_spill_overlay_zeroes_blocks_in_ram_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base(64 * BS as usize);
    let disk = DiskOverlay::open(dir.path(), BS, 64 * BS, false).unwrap();
    let layer = CowLayer::new(Box::new(SpillOverlay::new(4 * BS, disk)), BS);
    let source = layer.layer(base);
    source
        .write_at(
            0,
            Bytes::from(vec![3u8; 32 * BS as usize]),
            WriteOpts::default(),
        )
        .await
        .unwrap();
    source.trim(0, 64 * BS).await.unwrap();
    assert!(source.read_all().await.unwrap().iter().all(|&b| b == 0));
    source
        .write_at(10 * BS, Bytes::from(vec![4u8; 10]), WriteOpts::default())
        .await
        .unwrap();
    let got = source.read_bytes(10 * BS, BS as usize).await.unwrap();
    assert!(got[..10].iter().all(|&b| b == 4) && got[10..].iter().all(|&b| b == 0));
}
