//! Conformance suites: the [`osstream_core::BlockSource`] contract, checked the same way
//! for every implementation.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use osstream_testkit::{MemSource, conformance, pattern};
//! let data = pattern(7, 300_000);
//! conformance::read_suite(Arc::new(MemSource::new("t", data.clone())), &data).await;
//! # });
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use osstream_core::{BlockSourceExt, DynSource, ErrorKind, Layer, ReadOpts, WriteOpts, ZeroOpts};

use crate::sources::{InstrumentedSource, MemSource, pattern};

/// Checks every read-side promise of `source`, whose content must equal `expected`.
///
/// Whole read; unaligned head and tail reads; reads crossing any block boundary; a
/// zero-length read; reads past the end and overflowing offsets fail with
/// `OutOfRange`; 16 concurrent readers of one block all get the same bytes; extents
/// cover the requested range and never more.
///
/// # Panics
/// On the first broken promise, with a message naming it.
pub async fn read_suite(source: DynSource, expected: &[u8]) {
    let size = expected.len() as u64;
    assert_eq!(source.info().size, size, "info().size");
    let all = source.read_all().await.expect("whole read");
    assert!(
        all[..] == expected[..],
        "whole read differs from the expected content"
    );

    let read = |offset: u64, len: usize| {
        let source = source.clone();
        async move { source.read_at(offset, len, ReadOpts::default()).await }
    };
    // Unaligned head, tail, middle, and reads that straddle common block sizes.
    let cases: Vec<(u64, usize)> = vec![
        (0, 1),
        (1, 511),
        (511, 2),
        (4095, 4097),
        (65_535, 3),
        (65_536 - 100, 200),
        (size / 2 + 7, 12_345),
        (size - 1, 1),
        (size - 4097, 4097),
    ];
    for (offset, len) in cases {
        if offset + len as u64 > size {
            continue;
        }
        let got = read(offset, len)
            .await
            .unwrap_or_else(|e| panic!("read {len}@{offset}: {e}"));
        let want = &expected[offset as usize..offset as usize + len];
        assert!(got == want[..], "read {len}@{offset} returned wrong bytes");
    }
    assert_eq!(read(size / 3, 0).await.expect("zero-length read").len(), 0);

    for (offset, len) in [
        (size, 1),
        (size - 1, 2),
        (u64::MAX - 1, 4),
        (size + 4096, 0),
    ] {
        let err = read(offset, len)
            .await
            .expect_err("read past the end must fail");
        assert_eq!(
            err.kind(),
            ErrorKind::OutOfRange,
            "read {len}@{offset}: {err}"
        );
    }

    let offset = (size / 2) & !4095;
    let len = 4096.min((size - offset) as usize);
    let readers: Vec<_> = (0..16).map(|_| tokio::spawn(read(offset, len))).collect();
    for reader in readers {
        let got = reader.await.expect("reader task").expect("concurrent read");
        assert!(
            got == expected[offset as usize..offset as usize + len],
            "concurrent reader got wrong bytes"
        );
    }

    let extents = source.extents(0, size).await.expect("extents");
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert!(
        covered > 0 && covered <= size,
        "extents cover {covered} of {size} bytes"
    );
}

/// Checks the write-side promises of a writable `source` (its content is overwritten).
///
/// Writes read back, also across block boundaries; `write_zeroes` reads back as zeroes;
/// `flush` succeeds; writes past the end fail with `OutOfRange`.
///
/// # Panics
/// On the first broken promise.
pub async fn write_suite(source: DynSource) {
    let size = source.info().size;
    assert!(
        source.capability().write,
        "write_suite needs a writable source"
    );
    let data = Bytes::from(pattern(99, 70_000));
    let offset = 4096 * 3 - 17;
    source
        .write_at(offset, data.clone(), WriteOpts::default())
        .await
        .expect("write");
    let got = source
        .read_at(offset, data.len(), ReadOpts::default())
        .await
        .expect("read back");
    assert!(got == data[..], "write did not read back");
    source
        .write_at(0, Bytes::from_static(b"x"), WriteOpts { fua: true })
        .await
        .expect("fua write");
    assert_eq!(
        &source
            .read_at(0, 1, ReadOpts::default())
            .await
            .unwrap()
            .to_vec()[..],
        b"x"
    );
    source
        .write_zeroes(
            offset + 100,
            5000,
            ZeroOpts {
                fua: false,
                may_trim: true,
            },
        )
        .await
        .expect("write_zeroes");
    let got = source
        .read_at(offset + 100, 5000, ReadOpts::default())
        .await
        .unwrap();
    assert!(
        got.to_vec().iter().all(|&b| b == 0),
        "write_zeroes did not read back as zeroes"
    );
    source.flush().await.expect("flush");
    let err = source
        .write_at(size - 1, Bytes::from_static(b"ab"), WriteOpts::default())
        .await
        .expect_err("write past the end must fail");
    assert_eq!(err.kind(), ErrorKind::OutOfRange, "{err}");
}

/// Checks that `layer` is single-flight: 32 concurrent readers of one cold block cause one
/// read below the layer, and a second pass causes none.
///
/// # Panics
/// If more than one read reaches the source below.
pub async fn single_flight_suite(layer: &dyn Layer) {
    let data = pattern(5, 1 << 20);
    let counter = InstrumentedSource::counting(
        Arc::new(MemSource::new("single-flight", data.clone())),
        Duration::from_millis(50),
    );
    let source = layer.layer(counter.clone());
    let readers: Vec<_> = (0..32)
        .map(|i| {
            let source = source.clone();
            tokio::spawn(async move {
                source
                    .read_at(8192 + i * 16, 512, ReadOpts::default())
                    .await
            })
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap().expect("read");
        let start = 8192 + i * 16;
        assert!(
            got == data[start..start + 512],
            "reader {i} got wrong bytes"
        );
    }
    assert_eq!(
        counter.reads(),
        1,
        "32 concurrent misses on one block must cause one backend read"
    );
    source
        .read_at(8192, 512, ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(counter.reads(), 1, "a cached block must not be read again");
}

/// Checks the [`osstream_core::CacheTier`] contract on an empty `tier` of at least
/// 64 KiB capacity: what is put is got back exactly; a second put replaces; `remove`
/// and `invalidate` drop exactly their blocks; the tier never holds more than its
/// capacity; many tasks putting and getting at once only ever see whole, right blocks.
///
/// # Panics
/// On the first broken promise.
pub async fn tier_suite(tier: osstream_core::DynTier) {
    use osstream_core::BlockKey;
    let key = |generation: u128, block: u64| BlockKey {
        image: 0xfeed,
        generation,
        block,
    };
    let block = |seed: u64| Bytes::from(pattern(seed, 4096));
    assert!(tier.get(&key(1, 0)).await.unwrap().is_none(), "empty tier");
    tier.put(key(1, 0), block(1)).await.unwrap();
    tier.put(key(1, 1), block(2)).await.unwrap();
    tier.put(key(2, 0), block(3)).await.unwrap();
    assert_eq!(
        tier.get(&key(1, 0)).await.unwrap(),
        Some(block(1)),
        "get after put"
    );
    tier.put(key(1, 0), block(4)).await.unwrap();
    assert_eq!(
        tier.get(&key(1, 0)).await.unwrap(),
        Some(block(4)),
        "put replaces"
    );
    tier.remove(&key(1, 1)).await.unwrap();
    assert!(tier.get(&key(1, 1)).await.unwrap().is_none(), "removed");
    assert_eq!(
        tier.invalidate(0xfeed, 1).await.unwrap(),
        1,
        "one block of generation 1"
    );
    assert!(tier.get(&key(1, 0)).await.unwrap().is_none(), "invalidated");
    assert_eq!(
        tier.get(&key(2, 0)).await.unwrap(),
        Some(block(3)),
        "other generation kept"
    );

    let capacity = tier.stats().capacity;
    let blocks = (capacity / 4096) * 2;
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let tier = tier.clone();
        tasks.push(tokio::spawn(async move {
            for n in (worker..blocks).step_by(8) {
                tier.put(key(3, n), block(n)).await.unwrap();
                if let Some(got) = tier.get(&key(3, n / 2)).await.unwrap() {
                    assert_eq!(got, block(n / 2), "a whole, right block");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = tier.stats();
    assert!(stats.bytes <= stats.capacity, "within capacity: {stats:?}");
    assert!(stats.evictions > 0, "twice its capacity put: {stats:?}");
}
