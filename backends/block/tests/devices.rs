//! The block backend on a real block device (a loop device the test attaches) and on a
//! regular file through the same code, buffered and with O_DIRECT.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use figment::value::{Dict, Value};
use osstream_backend_block::{BlockBackend, BlockConfig, probe};
use osstream_core::{
    BlockSourceExt, CacheLayer, ErrorKind, ImageBackend, Layer, OpenMode, RamTier, Registry,
    WriteOpts,
};
use osstream_testkit::{conformance, pattern};

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup failed (the block backend tests need root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn backend(devices: &[(&str, &Path)], direct: bool, writable: bool) -> BlockBackend {
    let config = BlockConfig {
        devices: devices
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_path_buf()))
            .collect(),
        direct,
        writable,
        generation: "1".into(),
    };
    BlockBackend::new("san", config).unwrap()
}

#[tokio::test]
async fn a_loop_device_passes_the_suites_buffered_and_direct() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun.raw");
    let data = pattern(41, 24 << 20);
    std::fs::write(&file, &data).unwrap();
    let dev = Loop::attach(&file);
    let geometry = probe(&dev.0).unwrap();
    assert!(geometry.is_block_device);
    assert_eq!(geometry.size, data.len() as u64, "size from BLKGETSIZE64");
    assert_eq!(geometry.logical_block, 512, "sector size from BLKSSZGET");
    for direct in [false, true] {
        let backend = backend(&[("lun0", &dev.0)], direct, false);
        let source = backend.open("lun0", OpenMode::ReadOnly).await.unwrap();
        conformance::read_suite(source.clone(), &data).await;
        let cached = CacheLayer::new(Arc::new(RamTier::new(64 << 20)), 65_536).layer(source);
        conformance::read_suite(cached, &data).await;
    }
    let writable = backend(&[("lun0", &dev.0)], true, true);
    let source = writable.open("lun0", OpenMode::ReadWrite).await.unwrap();
    conformance::write_suite(source.clone()).await;
    // An unaligned direct write patches its sectors without touching the neighbours.
    let before = source.read_bytes(1000, 3000).await.unwrap();
    source
        .write_at(
            1500,
            bytes::Bytes::from_static(b"unaligned"),
            WriteOpts { fua: true },
        )
        .await
        .unwrap();
    let after = source.read_bytes(1000, 3000).await.unwrap();
    assert_eq!(&after[500..509], b"unaligned");
    assert!(after[..500] == before[..500] && after[509..] == before[509..]);
    drop(source);
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(
        &on_disk[1500..1509],
        b"unaligned",
        "writes reach the device"
    );
}

#[tokio::test]
async fn a_regular_file_goes_through_the_same_code() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    let data = pattern(42, 3 << 20);
    std::fs::write(&file, &data).unwrap();
    let geometry = probe(&file).unwrap();
    assert!(!geometry.is_block_device);
    assert_eq!(
        (geometry.size, geometry.logical_block),
        (data.len() as u64, 512)
    );
    let backend = backend(&[("disk", &file)], false, false);
    conformance::read_suite(
        backend.open("disk", OpenMode::ReadOnly).await.unwrap(),
        &data,
    )
    .await;
    let listed = backend.list().await.unwrap();
    assert_eq!(listed[0].name, "disk");
}

#[tokio::test]
async fn only_configured_devices_are_reachable_and_read_only_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![1u8; 1 << 20]).unwrap();
    let backend = backend(&[("disk", &file)], false, false);
    assert_eq!(
        backend
            .open("sda", OpenMode::ReadOnly)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        backend
            .open("../disk", OpenMode::ReadOnly)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let err = backend.open("disk", OpenMode::ReadWrite).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(err.to_string().contains("writable = true"), "{err}");

    let mut registry = Registry::new();
    osstream_backend_block::register(&mut registry);
    let ctx = osstream_core::BackendContext::new(dir.path().to_path_buf());
    let mut table = Dict::new();
    table.insert("kind".into(), Value::from("block"));
    let mut devices = Dict::new();
    devices.insert("lun".into(), Value::from("relative/path"));
    table.insert("devices".into(), Value::from(devices));
    let err = registry.build_backend(&ctx, "san", table).unwrap_err();
    assert!(err.to_string().contains("must be absolute"), "{err}");
}
