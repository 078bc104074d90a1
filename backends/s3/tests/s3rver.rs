//! The S3 backend against a real S3-compatible server (s3rver, from npm) that the test
//! starts on loopback with its own port and folder.
//!
//! `scripts/test.sh` installs s3rver and sets `TEST_S3RVER`; without it the
//! tests look for `s3rver` on `PATH` and fail with a message saying how to get it.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use osstream_backend_s3::{Layout, S3Backend, S3Config};
use osstream_core::{
    BlockSourceExt, ByteSize, Bytes, ErrorKind, ImageBackend, ImportOptions, OpenMode, ReadOpts,
    WriteOpts,
};
use osstream_testkit::{conformance, pattern};

const BUCKET: &str = "vdisks";

struct S3rver {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for S3rver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3rver_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TEST_S3RVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("s3rver"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        panic!(
            "s3rver not found: run scripts/test.sh (it installs it), or `npm install s3rver@3` \
             and set TEST_S3RVER=/path/to/node_modules/.bin/s3rver"
        )
    })
}

impl S3rver {
    fn start() -> S3rver {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(s3rver_binary())
            .args(["-d"])
            .arg(dir.path())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-s"])
            .args(["--configure-bucket", BUCKET])
            .stdout(Stdio::null())
            .spawn()
            .expect("s3rver starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3rver did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3rver {
            child,
            port,
            _dir: dir,
        }
    }

    /// Every key under `prefix`, listed by a separate S3 client.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_region("us-east-1")
            .with_access_key_id("S3RVER")
            .with_secret_access_key("S3RVER")
            .with_allow_http(true)
            .build()
            .unwrap();
        let prefix = object_store::path::Path::from(prefix);
        let objects: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
        objects
            .into_iter()
            .map(|o| o.location.to_string())
            .collect()
    }

    fn config(&self, layout: Layout) -> S3Config {
        toml::from_str::<S3Config>(&format!(
            "bucket = \"{BUCKET}\"\nprefix = \"site/a\"\nendpoint = \"http://127.0.0.1:{}\"\n\
             region = \"us-east-1\"\naccess_key_id = \"S3RVER\"\nsecret_access_key = \"S3RVER\"\n\
             allow_http = true\nlayout = \"{}\"\n",
            self.port,
            match layout {
                Layout::Object => "object",
                Layout::Chunked => "chunked",
            }
        ))
        .unwrap()
    }
}

/// A file of `len` pattern bytes with two all-zero MiB in the middle (sparse chunks).
fn image_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
    let mut data = pattern(7, len);
    if len > 3 << 20 {
        data[1 << 20..3 << 20].fill(0);
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    (file, data)
}

#[tokio::test]
async fn object_layout_imports_with_multipart_and_passes_the_read_suite() {
    let server = S3rver::start();
    let mut config = server.config(Layout::Object);
    config.part_size = ByteSize::mib(5);
    let backend = S3Backend::new("bucket", config).unwrap();
    // 12.5 MiB: three multipart parts of 5 MiB, the last one short.
    let (file, data) = image_file(12 * 1024 * 1024 + 512 * 1024);
    let reported = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = reported.clone();
    let options = ImportOptions {
        progress: Some(Arc::new(move |n| {
            seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        })),
        ..ImportOptions::default()
    };
    let stat = backend.import("disk", file.path(), &options).await.unwrap();
    assert_eq!(stat.size, data.len() as u64);
    assert!(!stat.writable);
    assert_eq!(
        reported.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );

    let source = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    assert_eq!(source.info().generation, stat.generation);
    conformance::read_suite(source.clone(), &data).await;
    // A read larger than part_size is split into parallel GETs and reassembled in order.
    let big = source.read_bytes(1000, 11 << 20).await.unwrap();
    assert!(big[..] == data[1000..1000 + (11 << 20)]);

    let err = backend
        .open("disk", OpenMode::ReadWrite)
        .await
        .expect_err("a single object cannot be written");
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(err.to_string().contains("chunked"), "{err}");

    // Importing over it needs --replace; a replaced object fails reads of the old source
    // (If-Match) instead of mixing versions.
    let err = backend
        .import("disk", file.path(), &ImportOptions::default())
        .await
        .expect_err("an existing image is not overwritten silently");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let (other, other_data) = image_file(1 << 20);
    let replaced = backend
        .import(
            "disk",
            other.path(),
            &ImportOptions {
                replace: true,
                ..ImportOptions::default()
            },
        )
        .await
        .unwrap();
    assert_ne!(replaced.generation, stat.generation);
    assert_eq!(replaced.size, other_data.len() as u64);
    let err = source
        .read_at(0, 4096, ReadOpts::default())
        .await
        .expect_err("the old source must not read the new object");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}

#[tokio::test]
async fn chunked_layout_is_sparse_writable_and_durable_after_flush() {
    let server = S3rver::start();
    let mut config = server.config(Layout::Chunked);
    config.chunk_size = ByteSize::kib(256);
    config.writable = true;
    let backend = S3Backend::new("bucket", config).unwrap();
    let (file, data) = image_file(5 * 1024 * 1024 + 1234);
    let stat = backend
        .import("chunky", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(stat.size, data.len() as u64);
    assert!(stat.writable);
    // The two zero MiB were not stored: 21 chunks in all, 8 of them zero.
    assert_eq!(server.keys("site/a/chunky/chunks").await.len(), 13);

    let reader = backend.open("chunky", OpenMode::ReadOnly).await.unwrap();
    conformance::read_suite(reader.clone(), &data).await;

    let writer = backend.open("chunky", OpenMode::ReadWrite).await.unwrap();
    assert_ne!(
        writer.info().generation,
        reader.info().generation,
        "a read-write open starts a new generation"
    );
    conformance::write_suite(writer.clone()).await;
    // A write across a chunk boundary and into a zero (unstored) chunk, then flush.
    let patch = Bytes::from(pattern(3, 300_000));
    writer
        .write_at((1 << 20) + 100, patch.clone(), WriteOpts::default())
        .await
        .unwrap();
    writer.flush().await.unwrap();
    let expected = writer.read_all().await.unwrap();
    drop(writer);

    // A fresh open (as after a server restart) sees exactly what was flushed.
    let again = backend.open("chunky", OpenMode::ReadOnly).await.unwrap();
    let got = again.read_all().await.unwrap();
    assert!(got == expected, "flushed writes did not survive a reopen");
    // No stored chunk went missing: the 13 of the import, plus any the writes stored in
    // chunks that were zero until then.
    assert!(server.keys("site/a/chunky/chunks").await.len() >= 13);
    assert!(got[(1 << 20) + 100..(1 << 20) + 100 + patch.len()] == patch[..]);

    let images = backend.list().await.unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].name, "chunky");
    assert_eq!(images[0].size, data.len() as u64);
}

#[tokio::test]
async fn list_and_stat_see_both_layouts_and_missing_images_are_not_found() {
    let server = S3rver::start();
    let object = S3Backend::new("bucket", server.config(Layout::Object)).unwrap();
    let chunked = S3Backend::new("bucket", server.config(Layout::Chunked)).unwrap();
    let (file, data) = image_file(300_000);
    object
        .import("one", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    chunked
        .import("two", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    let names: Vec<_> = object
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.size))
        .collect();
    let size = data.len() as u64;
    assert_eq!(
        names,
        vec![("one".to_owned(), size), ("two".to_owned(), size)]
    );
    for name in ["one", "two"] {
        let source = object.open(name, OpenMode::ReadOnly).await.unwrap();
        assert!(source.read_all().await.unwrap()[..] == data[..], "{name}");
    }
    let err = object.stat("nope").await.expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("nope"), "{err}");
    let err = object.stat("../etc").await.expect_err("bad name");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn opening_an_object_from_its_stat_asks_the_bucket_nothing_more() {
    let server = S3rver::start();
    let object = S3Backend::new("bucket", server.config(Layout::Object)).unwrap();
    let (file, data) = image_file(200_000);
    object
        .import("one", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    let before = object.calls();
    let stat = object.stat("one").await.unwrap();
    let after_stat = object.calls();
    let source = object.open_stat(&stat, OpenMode::ReadOnly).await.unwrap();
    assert_eq!(
        object.calls(),
        after_stat,
        "open_stat made calls of its own ({} for the stat)",
        after_stat - before
    );
    assert_eq!(source.info().generation, stat.generation);
    // The etag taken from the stat still guards the reads: they succeed on the same object.
    assert!(source.read_all().await.unwrap()[..] == data[..]);
    // Replaced under the source: a read fails instead of mixing old and new bytes.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), pattern(8, 200_000)).unwrap();
    let replace = ImportOptions {
        replace: true,
        ..ImportOptions::default()
    };
    object.import("one", other.path(), &replace).await.unwrap();
    let err = source
        .read_at(0, 4096, Default::default())
        .await
        .expect_err("the object changed");
    assert_ne!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_temporary_error_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config: S3Config = toml::from_str(&format!(
        "bucket = \"b\"\nendpoint = \"http://127.0.0.1:{port}\"\nregion = \"us-east-1\"\n\
         access_key_id = \"k\"\nsecret_access_key = \"s\"\nallow_http = true\nretries = 1\n\
         timeout = \"2s\"\n"
    ))
    .unwrap();
    let backend = S3Backend::new("dead", config).unwrap();
    let started = Instant::now();
    let err = backend.stat("disk").await.expect_err("nothing listens");
    assert!(err.is_temporary(), "{err}");
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adjacent_reads_are_coalesced_and_each_gets_its_own_bytes() {
    let server = S3rver::start();
    let mut config = server.config(Layout::Object);
    // One request slot: while one GET runs, the others wait and are merged.
    config.concurrency = 1;
    config.part_size = ByteSize::kib(256);
    let backend = S3Backend::new("bucket", config).unwrap();
    let (file, data) = image_file(2 << 20);
    backend
        .import("disk", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    let source = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    // 200 reads of odd sizes, adjacent and overlapping, in flight at once; a few are
    // cancelled half-way, which must not strand the reads merged with them.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let source = source.clone();
        let (offset, len) = ((i * 7919) % (2 << 20), 1 + (i as usize * 131) % 9000);
        let len = len.min((2 << 20) - offset as usize);
        tasks.push(tokio::spawn(async move {
            let read = source.read_bytes(offset, len);
            if i % 17 == 0 {
                let _ = tokio::time::timeout(Duration::from_micros(50), read).await;
                return None;
            }
            Some((offset, read.await.unwrap()))
        }));
    }
    for task in tasks {
        if let Some((offset, bytes)) = task.await.unwrap() {
            assert!(
                bytes[..] == data[offset as usize..offset as usize + bytes.len()],
                "wrong bytes at {offset}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_opens_share_one_source_and_unflushed_writes_are_uploaded_on_last_close() {
    let server = S3rver::start();
    let mut config = server.config(Layout::Chunked);
    config.chunk_size = ByteSize::kib(64);
    config.writable = true;
    let backend = S3Backend::new("bucket", config).unwrap();
    let (file, data) = image_file(1 << 20);
    backend
        .import("dev", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    // Two connections of one private session write the two halves of one chunk and
    // flush in turn: neither flush may erase the other's write.
    let a = backend.open("dev", OpenMode::ReadWrite).await.unwrap();
    let b = backend.open("dev", OpenMode::ReadWrite).await.unwrap();
    a.write_at(0, Bytes::from(vec![0xaa; 4096]), WriteOpts::default())
        .await
        .unwrap();
    b.write_at(4096, Bytes::from(vec![0xbb; 4096]), WriteOpts::default())
        .await
        .unwrap();
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    // A write nobody flushes, then both connections go away.
    b.write_at(100_000, Bytes::from(vec![0xcc; 10]), WriteOpts::default())
        .await
        .unwrap();
    drop((a, b));

    let mut expected = data.clone();
    expected[..4096].fill(0xaa);
    expected[4096..8192].fill(0xbb);
    expected[100_000..100_010].fill(0xcc);
    let reader = backend.open("dev", OpenMode::ReadOnly).await.unwrap();
    assert!(reader.read_all().await.unwrap()[..] == expected[..]);
}

#[tokio::test]
async fn a_reader_of_a_replaced_chunked_image_gets_an_error_not_zeroes() {
    let server = S3rver::start();
    let mut config = server.config(Layout::Chunked);
    config.chunk_size = ByteSize::kib(256);
    let backend = S3Backend::new("bucket", config).unwrap();
    let (file, data) = image_file(4 << 20);
    backend
        .import("os", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    let old = backend.open("os", OpenMode::ReadOnly).await.unwrap();
    assert!(old.read_bytes(0, 4096).await.unwrap()[..] == data[..4096]);
    let (other, other_data) = image_file(4 << 20 | 4096);
    let replace = ImportOptions {
        replace: true,
        ..ImportOptions::default()
    };
    backend.import("os", other.path(), &replace).await.unwrap();
    // The old chunks are gone: the old source must not answer zeroes (or new bytes).
    let err = old
        .read_bytes(8192, 4096)
        .await
        .expect_err("the image was replaced");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    // Zero chunks of the old image, too (they have no object either way).
    let err = old.read_bytes(1 << 20, 4096).await.expect_err("replaced");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let new = backend.open("os", OpenMode::ReadOnly).await.unwrap();
    assert!(new.read_all().await.unwrap()[..] == other_data[..]);
    // Only the new import's chunks are left.
    let keys = server.keys("site/a/os/chunks").await;
    assert_eq!(keys.len(), 9, "{keys:?}");
}

#[tokio::test]
async fn a_cancelled_import_leaves_nothing_behind() {
    let server = S3rver::start();
    for layout in [Layout::Object, Layout::Chunked] {
        let mut config = server.config(layout);
        config.part_size = ByteSize::mib(5);
        config.chunk_size = ByteSize::kib(256);
        let backend = S3Backend::new("bucket", config).unwrap();
        let (file, _) = image_file(12 << 20);
        let options = ImportOptions::default();
        let cancel = options.cancel.clone();
        let reporter = cancel.clone();
        let options = ImportOptions {
            // Interrupted once the first part or chunk is stored.
            progress: Some(Arc::new(move |_| reporter.cancel())),
            ..options
        };
        let err = backend
            .import("half", file.path(), &options)
            .await
            .expect_err("interrupted");
        assert!(cancel.is_cancelled());
        assert_eq!(err.kind(), ErrorKind::Shutdown, "{err}");
        let err = backend.stat("half").await.expect_err("nothing registered");
        assert_eq!(err.kind(), ErrorKind::NotFound, "{layout:?}");
        assert!(
            server.keys("site/a/half").await.is_empty(),
            "{layout:?} left objects behind"
        );
    }
}

/// A writable chunked backend on a fresh s3rver whose writes commit to an in-memory
/// ledger, holding the 1 MiB image `dev` (64 KiB chunks) and its bytes.
async fn fenced_image() -> (S3rver, S3Backend, Arc<osstream_testkit::MemLedger>, Vec<u8>) {
    let server = S3rver::start();
    let mut config = server.config(Layout::Chunked);
    config.chunk_size = ByteSize::kib(64);
    config.writable = true;
    let ledger = Arc::new(osstream_testkit::MemLedger::default());
    let backend = S3Backend::new("bucket", config)
        .unwrap()
        .with_ledger(Some(ledger.clone()));
    let (file, data) = image_file(1 << 20);
    backend
        .import("dev", file.path(), &ImportOptions::default())
        .await
        .unwrap();
    (server, backend, ledger, data)
}

/// Issue 12, item 10: writes of a chunked image are fenced by the lock's epoch. A holder
/// that lost the lock (its session replaced while it still held unflushed chunks, or its
/// server paused past its timeout) uploads only to names nobody reads, its flush fails,
/// and the new holder's flushed writes stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_the_lock_commits_nothing() {
    let (server, backend, ledger, data) = fenced_image().await;
    let image = backend.identity("dev").unwrap();
    let write = |source: &osstream_core::DynSource, offset: u64, byte: u8| {
        let source = source.clone();
        async move {
            source
                .write_at(offset, Bytes::from(vec![byte; 4096]), WriteOpts::default())
                .await
        }
    };
    // Without a lock, a backend with a ledger refuses to write.
    let err = backend.open("dev", OpenMode::ReadWrite).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");

    let first = ledger.take("devbox", "s1", &image);
    let a = backend.open("dev", OpenMode::Locked(first)).await.unwrap();
    write(&a, 0, 0xa1).await.unwrap();
    a.flush().await.unwrap();
    // Committed: a reader sees it, through the ledger.
    let reader = backend.open("dev", OpenMode::ReadOnly).await.unwrap();
    assert_eq!(reader.read_bytes(0, 4096).await.unwrap()[..], [0xa1; 4096]);
    // A writes chunk 1 without flushing; the lock moves to the next holder.
    write(&a, 65_536, 0xa2).await.unwrap();
    let second = ledger.take("devbox", "s2", &image);
    let b = backend.open("dev", OpenMode::Locked(second)).await.unwrap();
    assert_eq!(b.read_bytes(0, 4096).await.unwrap()[..], [0xa1; 4096]);
    write(&b, 65_536, 0xb2).await.unwrap();
    b.flush().await.unwrap();
    // A flushes late, then goes away with more unflushed data: nothing of it lands.
    let err = a.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("lost the lock"), "{err}");
    assert_eq!(
        write(&a, 131_072, 0xa3).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    drop(a);
    let after = backend.open("dev", OpenMode::ReadOnly).await.unwrap();
    let mut expected = data.clone();
    expected[..4096].fill(0xa1);
    expected[65_536..65_536 + 4096].fill(0xb2);
    assert!(
        after.read_all().await.unwrap()[..] == expected[..],
        "B's flushed write stays"
    );
    // No object of the lost holding stays behind: per written chunk, one current version.
    let keys = server.keys("site/a/dev/chunks").await;
    let versioned: Vec<&String> = keys.iter().filter(|k| k.contains('.')).collect();
    assert_eq!(versioned.len(), 2, "{versioned:?}");
    drop(b);
}

/// A holding's sources come and go (a connection closes, the client's next connection
/// opens the image again under the same lock): each commits under its own names, so a
/// later source never overwrites, then removes, a chunk version an earlier one committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successive_sources_of_one_holding_never_reuse_a_chunk_name() {
    let (_server, backend, ledger, data) = fenced_image().await;
    let lock = ledger.take("devbox", "s1", &backend.identity("dev").unwrap());
    let mut expected = data.clone();
    for round in 0..3u8 {
        let source = backend
            .open("dev", OpenMode::Locked(lock.clone()))
            .await
            .unwrap();
        let offset = u64::from(round) * 1000;
        source
            .write_at(
                offset,
                Bytes::from(vec![round + 1; 1000]),
                WriteOpts::default(),
            )
            .await
            .unwrap();
        source.flush().await.unwrap();
        expected[offset as usize..offset as usize + 1000].fill(round + 1);
        drop(source);
        let reader = backend.open("dev", OpenMode::ReadOnly).await.unwrap();
        assert!(
            reader.read_all().await.unwrap()[..] == expected[..],
            "round {round}: a committed chunk went missing"
        );
    }
}
