//! The plugin host against real plugins: the C example (and deliberately broken builds of
//! it), the Rust chunk store and the faulty test plugin. Every plugin passes the
//! conformance suite through the host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use osstream_core::{
    BlockSourceExt, CacheLayer, ErrorKind, ImageBackend, Layer, OpenMode, RamTier, ReadOpts,
};
use osstream_plugin_host::{PluginBackend, PluginConfig};
use osstream_testkit::{conformance, pattern};

const HEADER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../abi/include");
const RAWFILE_C: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/c-rawfile/rawfile.c"
);

/// Builds the C example with extra `-D` flags into `dir`.
fn build_c(dir: &Path, name: &str, defines: &[&str]) -> PathBuf {
    let out = dir.join(format!("lib{name}.so"));
    let status = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I", HEADER_DIR, "-o",
        ])
        .arg(&out)
        .arg(RAWFILE_C)
        .args(defines.iter().map(|d| format!("-D{d}")))
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc failed for {name}");
    out
}

/// A Rust example plugin built by `cargo build --workspace` (scripts/test.sh does that
/// before the tests run).
fn rust_plugin(crate_name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = target
        .join("debug")
        .join(format!("lib{}.so", crate_name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    std::fs::canonicalize(path).unwrap()
}

fn backend(path: &Path, config: serde_json::Value) -> osstream_core::Result<PluginBackend> {
    PluginBackend::new(
        "vendor",
        &PluginConfig {
            path: path.to_path_buf(),
            config,
        },
    )
}

struct RawDir {
    dir: tempfile::TempDir,
    data: Vec<u8>,
}

fn raw_images() -> RawDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let data = pattern(21, 3 << 20);
    std::fs::write(dir.path().join("images/disk.img"), &data).unwrap();
    RawDir { dir, data }
}

#[tokio::test]
async fn c_plugin_passes_the_conformance_suites() {
    let raw = raw_images();
    let lib = build_c(raw.dir.path(), "rawfile", &[]);
    let root = raw.dir.path().join("images");
    let plugin = backend(&lib, serde_json::json!({ "root": root, "writable": true })).unwrap();
    let list = plugin.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "disk");
    assert_eq!(list[0].size, raw.data.len() as u64);
    let source = plugin.open("disk", OpenMode::ReadOnly).await.unwrap();
    assert!(!source.capability().write);
    conformance::read_suite(source.clone(), &raw.data).await;
    let cached = CacheLayer::new(Arc::new(RamTier::new(64 << 20)), 65_536).layer(source);
    conformance::read_suite(cached, &raw.data).await;
    let writable = plugin.open("disk", OpenMode::ReadWrite).await.unwrap();
    assert!(writable.capability().write && writable.capability().trim);
    conformance::write_suite(writable).await;
}

#[tokio::test]
async fn header_and_rust_types_have_the_same_layout() {
    use osstream_plugin_abi::{HostInfo, PluginError, PluginTable};
    use std::mem::{offset_of, size_of};
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("layout.c");
    std::fs::write(
        &program,
        r#"#include <stdio.h>
#include "osstream_plugin.h"
#define F(T, f) printf(#T "." #f " %zu\n", offsetof(struct T, f))
int main(void) {
  printf("osstream_plugin %zu\nosstream_host %zu\nosstream_error %zu\n",
         sizeof(struct osstream_plugin), sizeof(struct osstream_host), sizeof(struct osstream_error));
  F(osstream_plugin, name); F(osstream_plugin, load); F(osstream_plugin, open);
  F(osstream_plugin, pread); F(osstream_plugin, pwrite); F(osstream_plugin, trim);
  F(osstream_plugin, generation); F(osstream_host, log); F(osstream_error, message);
  return 0;
}"#,
    )
    .unwrap();
    let exe = dir.path().join("layout");
    assert!(
        Command::new("cc")
            .arg("-I")
            .arg(HEADER_DIR)
            .arg("-o")
            .arg(&exe)
            .arg(&program)
            .status()
            .unwrap()
            .success()
    );
    let output = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let expected = [
        ("osstream_plugin", size_of::<PluginTable>()),
        ("osstream_host", size_of::<HostInfo>()),
        ("osstream_error", size_of::<PluginError>()),
        ("osstream_plugin.name", offset_of!(PluginTable, name)),
        ("osstream_plugin.load", offset_of!(PluginTable, load)),
        ("osstream_plugin.open", offset_of!(PluginTable, open)),
        ("osstream_plugin.pread", offset_of!(PluginTable, pread)),
        ("osstream_plugin.pwrite", offset_of!(PluginTable, pwrite)),
        ("osstream_plugin.trim", offset_of!(PluginTable, trim)),
        (
            "osstream_plugin.generation",
            offset_of!(PluginTable, generation),
        ),
        ("osstream_host.log", offset_of!(HostInfo, log)),
        ("osstream_error.message", offset_of!(PluginError, message)),
    ];
    for (what, value) in expected {
        let line = format!("{what} {value}");
        assert!(
            output.lines().any(|l| l == line),
            "C says otherwise for {what}: expected `{line}` in\n{output}"
        );
    }
}

#[tokio::test]
async fn a_plugin_built_against_an_older_minor_loads_with_newer_fields_absent() {
    let raw = raw_images();
    let lib = build_c(raw.dir.path(), "rawfile_old", &["OSSTREAM_TEST_OLD_MINOR"]);
    let root = raw.dir.path().join("images");
    let plugin = backend(&lib, serde_json::json!({ "root": root, "writable": true })).unwrap();
    let source = plugin.open("disk", OpenMode::ReadWrite).await.unwrap();
    // `generation` is past the old table's end: the host falls back to the size.
    assert_eq!(source.info().generation, format!("size-{}", raw.data.len()));
    // `trim` is absent too: accepted as advisory, the data stays.
    source.trim(0, 4096).await.unwrap();
    assert!(source.read_bytes(0, 4096).await.unwrap()[..] == raw.data[..4096]);
    conformance::read_suite(
        plugin.open("disk", OpenMode::ReadOnly).await.unwrap(),
        &raw.data,
    )
    .await;
}

#[tokio::test]
async fn broken_plugins_are_refused_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({ "root": "/" });
    let cases = [
        (
            "major2",
            vec!["OSSTREAM_TEST_MAJOR=2"],
            "built for plugin ABI 2.0, this osstream speaks 1.x",
        ),
        (
            "nulltable",
            vec!["OSSTREAM_TEST_NULL_TABLE"],
            "returned no table (NULL)",
        ),
        (
            "nopread",
            vec!["OSSTREAM_TEST_NO_PREAD"],
            "plugin 'rawfile' lacks required callbacks: pread",
        ),
    ];
    for (name, defines, message) in cases {
        let lib = build_c(dir.path(), name, &defines);
        let err = backend(&lib, config.clone()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{name}: {err}");
        let text = err.to_string();
        assert!(text.contains(message), "{name}: {text}");
        assert!(
            text.contains(&lib.display().to_string()),
            "{name} names the path: {text}"
        );
    }
}

#[tokio::test]
async fn unsafe_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_c(dir.path(), "rawfile", &[]);
    let err = backend(Path::new("librawfile.so"), serde_json::json!({})).unwrap_err();
    assert!(err.to_string().contains("must be absolute"), "{err}");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    let exposed = open.join("librawfile.so");
    std::fs::copy(&lib, &exposed).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = backend(&exposed, serde_json::json!({})).unwrap_err();
    assert!(
        err.to_string().contains("writable by a non-root user"),
        "{err}"
    );
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = backend(&exposed, serde_json::json!({})).unwrap_err();
    assert!(
        err.to_string().contains("writable by a non-root user"),
        "{err}"
    );
    let err = backend(&dir.path().join("missing.so"), serde_json::json!({})).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[tokio::test]
async fn a_plugin_rejecting_its_config_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_c(dir.path(), "rawfile", &[]);
    let err = backend(&lib, serde_json::json!({ "rot": "/x" })).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("refused its configuration") && text.contains("\"root\""),
        "{text}"
    );
}

#[tokio::test]
async fn rust_chunkstore_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    // Repeated and zero regions exercise dedup and sparse chunks.
    let mut data = pattern(31, 5 << 20);
    data[(1 << 20)..(2 << 20)].fill(0);
    let copy = data[..1 << 20].to_vec();
    data[(3 << 20)..(4 << 20)].copy_from_slice(&copy);
    data.truncate((5 << 20) - 12_345);
    let raw = dir.path().join("os.raw");
    std::fs::write(&raw, &data).unwrap();
    let store = dir.path().join("store");
    let packer =
        rust_plugin("osstream-example-chunkstore").with_file_name("osstream-chunkstore-pack");
    let out = Command::new(&packer)
        .arg(&raw)
        .arg(&store)
        .arg("os")
        .arg("1048576")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("1 shared, 1 zero"), "{summary}");
    let plugin = backend(
        &rust_plugin("osstream-example-chunkstore"),
        serde_json::json!({ "root": store }),
    )
    .unwrap();
    assert_eq!(plugin.list().await.unwrap()[0].size, data.len() as u64);
    let source = plugin.open("os", OpenMode::ReadOnly).await.unwrap();
    conformance::read_suite(source.clone(), &data).await;
    assert_eq!(source.geometry().preferred, 1 << 20);
    let err = plugin.open("os", OpenMode::ReadWrite).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    let err = plugin.open("nope", OpenMode::ReadOnly).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn a_panicking_plugin_fails_one_request_and_keeps_serving() {
    let plugin = backend(
        &rust_plugin("osstream-example-faulty"),
        serde_json::json!({ "size": 8 << 20, "panic_at": 4 << 20, "fail_at": 6 << 20 }),
    )
    .unwrap();
    let source = plugin.open("pattern", OpenMode::ReadOnly).await.unwrap();
    let err = source
        .read_at((4 << 20) - 10, 100, ReadOpts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unexpected);
    assert!(
        err.to_string().contains("plugin panicked: asked to panic"),
        "{err}"
    );
    let err = source
        .read_at(6 << 20, 10, ReadOpts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.is_temporary(), "{err}");
    let good = source.read_bytes(0, 8192).await.unwrap();
    assert_eq!(good[4097], ((4097u64 / 4096 + 4097) as u8));
}
