//! The file backend passes the conformance suites, alone and under the RAM cache, and
//! keeps to its root and its read-only default.

use std::sync::Arc;

use figment::value::{Dict, Value};
use osstream_backend_file::{FileBackend, FileConfig};
use osstream_core::{
    BackendContext, CacheLayer, ErrorKind, ExtentKind, ImageBackend, Layer, OpenMode, RamTier,
    Registry, WriteOpts,
};
use osstream_testkit::{conformance, pattern};

fn backend(dir: &std::path::Path, writable: bool) -> FileBackend {
    let ctx = BackendContext::new(dir.to_path_buf());
    FileBackend::new(
        &ctx,
        "images",
        FileConfig {
            root: "images".into(),
            writable,
            extension: "img".into(),
        },
    )
}

fn setup(len: usize) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let data = pattern(11, len);
    std::fs::write(dir.path().join("images/disk.img"), &data).unwrap();
    (dir, data)
}

#[tokio::test]
async fn file_backend_passes_read_suite() {
    let (dir, data) = setup(3_000_001);
    let backend = backend(dir.path(), false);
    let source = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    conformance::read_suite(source.clone(), &data).await;
    let cached = CacheLayer::new(Arc::new(RamTier::new(64 << 20)), 65_536).layer(source);
    conformance::read_suite(cached.clone(), &data).await;
    conformance::read_suite(cached, &data).await;
}

#[tokio::test]
async fn writable_file_backend_passes_write_suite_and_reports_holes() {
    let (dir, _) = setup(4 << 20);
    let backend = backend(dir.path(), true);
    let source = backend.open("disk", OpenMode::ReadWrite).await.unwrap();
    conformance::write_suite(source.clone()).await;
    source.trim(1 << 20, 1 << 20).await.unwrap();
    let extents = source.extents(0, 4 << 20).await.unwrap();
    assert!(
        extents.iter().any(|e| e.kind == ExtentKind::Hole),
        "{extents:?}"
    );
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
}

#[tokio::test]
async fn read_only_by_default() {
    let (dir, _) = setup(1 << 20);
    let backend = backend(dir.path(), false);
    let err = backend.open("disk", OpenMode::ReadWrite).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(err.to_string().contains("writable = true"), "{err}");
    let source = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    assert!(!source.capability().write);
    let err = source
        .write_at(0, bytes::Bytes::from_static(b"x"), WriteOpts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
}

#[tokio::test]
async fn names_never_escape_the_root() {
    let (dir, _) = setup(4096);
    std::fs::write(dir.path().join("secret.img"), b"secret").unwrap();
    let backend = backend(dir.path(), false);
    for name in [
        "../secret",
        "..",
        "/etc/passwd",
        "images/../../x",
        ".hidden",
    ] {
        let err = backend.open(name, OpenMode::ReadOnly).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name}: {err}");
    }
    assert_eq!(
        backend
            .open("missing", OpenMode::ReadOnly)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn lists_images_and_changes_generation_when_replaced() {
    let (dir, _) = setup(8192);
    std::fs::write(dir.path().join("images/notes.txt"), b"not an image").unwrap();
    let backend = backend(dir.path(), false);
    let list = backend.list().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["disk"]
    );
    let before = backend.stat("disk").await.unwrap().generation;
    std::fs::write(dir.path().join("images/disk.img"), vec![1u8; 16384]).unwrap();
    let after = backend.stat("disk").await.unwrap();
    assert_ne!(before, after.generation);
    assert_eq!(after.size, 16384);
}

#[tokio::test]
async fn registry_builds_it_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::new();
    osstream_backend_file::register(&mut registry);
    let ctx = BackendContext::new(dir.path().to_path_buf());
    let mut table = Dict::new();
    table.insert("kind".into(), Value::from("file"));
    table.insert("root".into(), Value::from("images"));
    let backend = registry
        .build_backend(&ctx, "images", table.clone())
        .unwrap();
    assert_eq!(backend.kind(), "file");
    table.insert("rot".into(), Value::from("x"));
    let err = registry.build_backend(&ctx, "images", table).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("rot"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_pages_not_in_the_page_cache_are_complete() {
    use std::os::fd::AsRawFd;
    let (dir, data) = setup(8 << 20);
    let path = dir.path().join("images/disk.img");
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    let source = backend(dir.path(), false)
        .open("disk", OpenMode::ReadOnly)
        .await
        .unwrap();
    // Whole-file eviction: the kernel keeps partly covered large folios.
    let evict = || {
        // SAFETY: posix_fadvise only reads its integer arguments; `file` is open.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    };
    // Reads that go to the blocking pool from the start (nothing cached), reads that
    // start in the page cache (warmed by the read before them) and finish there, and
    // reads larger than the page-cache attempt.
    for (evict_first, offset, len) in [
        (true, 0u64, 64usize << 10),
        (false, 0, 2 << 20),
        (true, 3 << 20, 1 << 20),
        (false, (3 << 20) - 4096, 2 << 20),
        (true, 0, 8 << 20),
    ] {
        if evict_first {
            evict();
        }
        let got = source
            .read_at(offset, len, Default::default())
            .await
            .unwrap()
            .to_vec();
        assert!(
            got[..] == data[offset as usize..offset as usize + len],
            "{len} bytes at {offset}"
        );
    }
}

/// Issue 12, item 1: the identity names the real file, whatever the backend is called or
/// however its root is spelled, and matches the opened source's.
#[tokio::test]
async fn identity_is_the_real_path_of_the_image() {
    let (dir, _) = setup(4096);
    std::os::unix::fs::symlink(dir.path().join("images"), dir.path().join("alias")).unwrap();
    let direct = backend(dir.path(), false);
    let ctx = BackendContext::new(dir.path().to_path_buf());
    let through_link = FileBackend::new(
        &ctx,
        "other-name",
        FileConfig {
            root: "alias/../alias".into(),
            writable: false,
            extension: "img".into(),
        },
    );
    let identity = direct.identity("disk").unwrap();
    let real = std::fs::canonicalize(dir.path().join("images/disk.img")).unwrap();
    assert_eq!(identity, format!("file:{}", real.display()));
    assert_eq!(through_link.identity("disk").unwrap(), identity);
    let source = through_link.open("disk", OpenMode::ReadOnly).await.unwrap();
    assert_eq!(source.info().identity, identity);
    assert_ne!(direct.identity("other").unwrap(), identity);
    assert_eq!(
        direct.identity("../x").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn boot_files_live_in_boot_under_their_own_names_and_stay_inside() {
    let (dir, _) = setup(4096);
    let boot = dir
        .path()
        .join("images")
        .join(osstream_backend_file::BOOT_DIR);
    std::fs::create_dir(&boot).unwrap();
    std::fs::write(boot.join("vmlinuz"), b"kernel").unwrap();
    let backend = backend(dir.path(), true);
    let kernel = backend.open_boot_file("vmlinuz").await.unwrap();
    assert_eq!(kernel.info().size, 6);
    assert!(!kernel.capability().write);
    let bytes = kernel
        .read_at(0, 6, osstream_core::ReadOpts::default())
        .await
        .unwrap();
    assert_eq!(&bytes, &b"kernel"[..]);
    // Boot files are not images, and images are not boot files.
    let names: Vec<String> = backend
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["disk"]);
    let missing = backend.open_boot_file("disk").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    for name in ["../disk.img", "/etc/passwd", "a/b", ""] {
        let err = backend.open_boot_file(name).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name:?}");
    }
}

#[tokio::test]
async fn an_image_changed_in_place_fails_its_readers_and_removed_images_are_gone() {
    use std::os::unix::fs::FileExt;
    let (dir, data) = setup(1 << 20);
    let backend = backend(dir.path(), false);
    let source = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    let read = |source: osstream_core::DynSource| async move {
        source
            .read_at(4096, 4096, osstream_core::ReadOpts::default())
            .await
    };
    assert_eq!(
        read(source.clone()).await.unwrap().to_vec(),
        data[4096..8192]
    );
    // Written in place behind osstream's back (as `cp` over it does).
    std::thread::sleep(std::time::Duration::from_millis(10));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("images/disk.img"))
        .unwrap();
    file.write_all_at(&[0xAB; 4096], 4096).unwrap();
    let err = read(source.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("changed in place"), "{err}");
    // A source opened now reads the new bytes.
    let fresh = backend.open("disk", OpenMode::ReadOnly).await.unwrap();
    assert_eq!(read(fresh).await.unwrap().to_vec(), vec![0xAB; 4096]);

    backend.remove("disk").await.unwrap();
    assert!(!dir.path().join("images/disk.img").exists());
    let err = backend.remove("disk").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(
        backend.remove("../x").await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}
