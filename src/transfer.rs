//! `osstream vdisk import` and `osstream vdisk export`: moving whole images between a
//! local file and a backend, verified by SHA-256.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use osstream_catalog::{Catalog, SqlCatalog, Vdisk, VdiskChanges};
use osstream_core::{
    BlockSourceExt, DynBackend, DynSource, Error, ErrorKind, ImportOptions, OpenMode, Result,
    validate_image_name,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::args::{VdiskExport, VdiskImport};
use crate::config::Config;
use crate::progress::Progress;
use crate::wiring::{backend_named, register_vdisk};

/// Bytes per read when hashing or exporting.
const PIECE: u64 = 8 << 20;
/// Pieces read from a backend at once.
const PARALLEL_PIECES: usize = 4;

/// What `vdisk export` did.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub vdisk: String,
    pub file: PathBuf,
    pub size: u64,
    /// `raw` or `qcow2`.
    pub format: String,
    /// SHA-256 of the raw image (also for a qcow2 export, whose file differs).
    pub sha256: String,
}

/// Listens for Ctrl-C and SIGTERM while an import runs: the first cancels `token` (the
/// import stops and cleans up), a second exits at once. Stops listening when dropped.
struct Interrupts(tokio::task::JoinHandle<()>);

impl Interrupts {
    fn listen(token: osstream_core::CancellationToken) -> Interrupts {
        Interrupts(tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            for round in 0.. {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if round == 0 {
                    eprintln!(
                        "\ninterrupted: stopping the import and removing what was stored \
                         (interrupt again to exit at once)"
                    );
                    token.cancel();
                } else {
                    eprintln!("interrupted again: exiting; the backend may keep a partial upload");
                    std::process::exit(130);
                }
            }
        }))
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn interrupted() -> Error {
    Error::new(ErrorKind::Shutdown, "import interrupted").with_op("import")
}

/// A temporary image (converted input, or raw output before conversion), removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The format qemu-img sees in `file`, or a guess from the magic bytes without it.
fn image_format(file: &Path) -> Result<String> {
    match std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(file)
        .output()
    {
        Ok(out) if out.status.success() => {
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("qemu-img info printed no JSON: {e}"),
                )
            })?;
            // A backing file would be read by the conversion: any file on this host could
            // end up in the vdisk. Flatten such images where they were made.
            if let Some(backing) = info["backing-filename"].as_str() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{} has a backing file ({backing}); flatten it first: \
                         qemu-img convert -O raw {} disk.raw",
                        file.display(),
                        file.display()
                    ),
                ));
            }
            Ok(info["format"].as_str().unwrap_or("raw").to_owned())
        }
        Ok(out) => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "qemu-img cannot read {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
        Err(_) => {
            // No qemu-img: recognise the common non-raw formats by their magic so they
            // are refused rather than uploaded as if they were raw disks.
            let mut magic = [0u8; 8];
            let file_handle = std::fs::File::open(file)
                .map_err(|e| Error::from_io(e, format!("cannot open {}", file.display())))?;
            let n = file_handle.read_at(&mut magic, 0).unwrap_or(0);
            let magic = &magic[..n];
            let format = if magic.starts_with(b"QFI\xfb") {
                "qcow2"
            } else if magic.starts_with(b"KDMV") {
                "vmdk"
            } else if magic.starts_with(b"vhdxfile") {
                "vhdx"
            } else if magic.starts_with(b"conectix") {
                "vpc"
            } else {
                "raw"
            };
            Ok(format.to_owned())
        }
    }
}

/// Runs `qemu-img check` on a non-raw image: a truncated or corrupt qcow2 converts
/// "successfully" into zeroes where its clusters are missing, so it is refused here,
/// before anything is converted or uploaded.
fn check_image(file: &Path, format: &str) -> Result<()> {
    let out = match std::process::Command::new("qemu-img")
        .args(["check", "--output=json", "-f", format])
        .arg(file)
        .output()
    {
        Ok(out) => out,
        // No qemu-img: the conversion below says so.
        Err(_) => return Ok(()),
    };
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    // Exit codes of qemu-img check: 0 clean, 1 check failed, 2 corrupt, 3 only leaked
    // clusters (harmless for reading), 63 the format cannot be checked.
    match out.status.code() {
        Some(0 | 3 | 63) => {
            // A file cut by less than a cluster passes the check, but its clusters reach past
            // the end: the end offset the check computes is beyond the file's size.
            // Compressed clusters end anywhere in their last cluster: skip those images
            // (a truncated one fails to decompress in the conversion instead).
            let size = std::fs::metadata(file).map_or(u64::MAX, |m| m.len());
            if let Some(end) = report["image-end-offset"].as_u64()
                && end > size
                && count("compressed-clusters") == 0
            {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{} is a truncated {format} image: its data reaches byte {end} but the file has {size} \
                     bytes; nothing was imported",
                        file.display()
                    ),
                ));
            }
            Ok(())
        }
        Some(2) => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} is a corrupt {format} image ({} corruption(s) found by `qemu-img check`; \
                 a truncated copy looks like this); nothing was imported",
                file.display(),
                count("corruptions").max(1)
            ),
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "`qemu-img check` could not check {} ({format}): {}; nothing was imported",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
    }
}

/// `file` as a raw image: itself, or a converted copy in `work_dir`.
fn raw_image(file: &Path, work_dir: &Path, name: &str) -> Result<(PathBuf, Option<TempFile>)> {
    let format = image_format(file)?;
    if format == "raw" {
        return Ok((file.to_path_buf(), None));
    }
    check_image(file, &format)?;
    std::fs::create_dir_all(work_dir)
        .map_err(|e| Error::from_io(e, format!("cannot create {}", work_dir.display())))?;
    let out = work_dir.join(format!(".import-{}-{name}.raw", std::process::id()));
    let converted = TempFile(out.clone());
    eprintln!(
        "{} is a {format} image: converting it to raw with qemu-img (in {})",
        file.display(),
        work_dir.display()
    );
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", "-f", &format])
        .arg(file)
        .arg(&out)
        .status();
    match status {
        Ok(status) if status.success() => Ok((out, Some(converted))),
        Ok(status) => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("qemu-img convert of {} failed ({status})", file.display()),
        )),
        Err(e) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} is a {format} image and qemu-img is not available to convert it ({e}); \
                 install qemu-utils, or convert it yourself: qemu-img convert -O raw {} disk.raw",
                file.display(),
                file.display()
            ),
        )),
    }
}

/// SHA-256 of a local file.
async fn hash_file(
    path: &Path,
    quiet: bool,
    cancel: &osstream_core::CancellationToken,
) -> Result<String> {
    let path = path.to_path_buf();
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|e| Error::from_io(e, format!("cannot open {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| Error::from_io(e, format!("cannot stat {}", path.display())))?
            .len();
        let progress = Progress::new("hash", size, quiet);
        let mut hasher = Sha256::new();
        let mut buf = vec![0; PIECE as usize];
        let mut offset = 0;
        while offset < size {
            if cancel.is_cancelled() {
                return Err(interrupted());
            }
            let n = PIECE.min(size - offset) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .map_err(|e| Error::from_io(e, format!("cannot read {}", path.display())))?;
            hasher.update(&buf[..n]);
            offset += n as u64;
            progress.set(offset);
        }
        progress.finish();
        Ok(hex(&hasher.finalize()))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Unexpected, format!("hash task failed: {e}")))?
}

/// Reads `source` front to back, a few pieces in flight, handing each piece to `sink` in
/// order; returns the SHA-256 of the whole.
async fn stream_source(
    source: &DynSource,
    progress: &Progress,
    cancel: Option<&osstream_core::CancellationToken>,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<String> {
    let size = source.size();
    let mut hasher = Sha256::new();
    let mut pieces = futures_util::stream::iter((0..size).step_by(PIECE as usize))
        .map(|offset| {
            let source = source.clone();
            async move {
                let len = PIECE.min(size - offset) as usize;
                source.read_bytes(offset, len).await.map(|b| (offset, b))
            }
        })
        .buffered(PARALLEL_PIECES);
    while let Some(piece) = pieces.next().await {
        if cancel.is_some_and(|c| c.is_cancelled()) {
            return Err(interrupted());
        }
        let (offset, bytes) = piece?;
        hasher.update(&bytes);
        sink(offset, &bytes)?;
        progress.set(offset + bytes.len() as u64);
    }
    progress.finish();
    Ok(hex(&hasher.finalize()))
}

/// `osstream vdisk import`.
pub async fn import(config: &Config, catalog: &SqlCatalog, import: &VdiskImport) -> Result<Vdisk> {
    let add = &import.add;
    validate_image_name(&add.name)?;
    if !import.file.is_file() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{} is not a file", import.file.display()),
        ));
    }
    let existing = match catalog.vdisk(&add.name).await {
        Ok(vdisk) => Some(vdisk),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    // Replacing keeps the vdisk's key unless --key says otherwise (after a replace under
    // running clients, the key is no longer the vdisk's name).
    let key = add.key.clone().unwrap_or_else(|| {
        existing
            .as_ref()
            .filter(|_| import.replace)
            .map_or_else(|| add.name.clone(), |v| v.key.clone())
    });
    // A standard vdisk's new image goes under a new key, so sessions running on the old
    // one keep reading it until they end; a private vdisk is replaced in place (it has
    // at most one session, and that one is refused below).
    let swap = existing
        .as_ref()
        .is_some_and(|v| import.replace && v.mode == osstream_catalog::VdiskMode::Standard);
    if let Some(vdisk) = &existing {
        if !import.replace {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {:?} exists already; pass --replace to upload a new image for it",
                    add.name
                ),
            ));
        }
        if vdisk.backend != add.backend || vdisk.key != key {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {:?} uses image {:?} on backend {:?}, not {key:?} on {:?}; \
                     remove it first (osstream vdisk rm) to move it",
                    add.name, vdisk.key, vdisk.backend, add.backend
                ),
            ));
        }
        let live = catalog
            .sessions(false)
            .await?
            .into_iter()
            .filter(|session| session.vdisk == add.name)
            .count();
        if live > 0 && !swap {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {:?} has {live} live session(s); close them (osstream session close) \
                     or disable the vdisk before replacing its image",
                    add.name
                ),
            ));
        }
    }
    // Options are checked before anything is uploaded, so a typo costs no upload.
    let mode = add.mode.parse::<osstream_catalog::VdiskMode>()?;
    add.write_cache.parse::<osstream_catalog::WriteCache>()?;
    add.boot.parse::<osstream_catalog::BootMethod>()?;
    let backend: DynBackend = backend_named(config, &add.backend, Some(catalog))?;
    // Checked before the (slow) conversion and hashing; the backend checks again when it
    // stores the image.
    if backend.kind() == "file"
        && let Some(stem) = key.strip_suffix(".img")
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--key {key} ends in the file extension; keys are image names and the backend adds \
                 its extension: --key {stem}"
            ),
        ));
    }
    let old_key = key.clone();
    let key = if swap {
        next_image_key(&backend, catalog, &key).await?
    } else {
        key
    };
    let image_id = backend.identity(&key)?;
    crate::wiring::fill_image_ids(config, catalog).await?;
    catalog
        .check_image_modes(&add.name, mode, Some(&image_id))
        .await?;
    if !import.replace && !swap && backend.stat(&key).await.is_ok() {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "backend {:?} already has an image {key:?}; pass --replace to overwrite it",
                add.backend
            ),
        ));
    }
    let cancel = osstream_core::CancellationToken::new();
    let _interrupts = Interrupts::listen(cancel.clone());
    let (raw, _converted) = raw_image(&import.file, &config.data_dir, &add.name)?;
    let local = hash_file(&raw, import.quiet, &cancel).await?;

    let size = std::fs::metadata(&raw)
        .map_err(|e| Error::from_io(e, format!("cannot stat {}", raw.display())))?
        .len();
    let upload = Arc::new(Progress::new("upload", size, import.quiet));
    let reporter = upload.clone();
    let options = ImportOptions {
        replace: import.replace && !swap,
        writable: mode == osstream_catalog::VdiskMode::Private,
        progress: Some(Arc::new(move |done| reporter.set(done))),
        cancel: cancel.clone(),
    };
    let stored = backend.import(&key, &raw, &options).await;
    let stat = stored?;
    upload.finish();

    let source = backend.open(&key, OpenMode::ReadOnly).await?;
    let verify = Progress::new("verify", source.size(), import.quiet);
    let stored = stream_source(&source, &verify, Some(&cancel), |_, _| Ok(()))
        .await
        .map_err(|e| {
            if e.kind() == ErrorKind::Shutdown {
                Error::new(
                    ErrorKind::Shutdown,
                    format!(
                        "import interrupted while verifying: the image is stored on backend {:?} as {key:?} \
                         but not registered; run the import again with --replace",
                        add.backend
                    ),
                )
            } else {
                e
            }
        })?;
    if stored != local || stat.size != size {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "the stored image does not match the file: sha256 {stored} ({} bytes) on backend {:?}, \
                 {local} ({size} bytes) locally; run the import again with --replace",
                stat.size, add.backend
            ),
        ));
    }
    eprintln!(
        "sha256 {local} verified on backend {:?} as {key:?}",
        add.backend
    );

    if swap {
        catalog
            .replace_image(&add.name, &key, stat.size, Some(&image_id))
            .await?;
        let readers = catalog
            .sessions(false)
            .await?
            .into_iter()
            .filter(|s| s.vdisk == add.name && s.image_key.as_deref() == Some(old_key.as_str()))
            .count();
        eprintln!(
            "vdisk {:?} now boots image {key:?}; {readers} live session(s) keep reading {old_key:?} \
             until they end, then a running server deletes it",
            add.name
        );
        return catalog.vdisk(&add.name).await;
    }
    match existing {
        Some(_) => {
            let changes = VdiskChanges {
                size: Some(stat.size),
                ..VdiskChanges::default()
            };
            catalog.update_vdisk(&add.name, &changes).await
        }
        None => register_vdisk(catalog, &backend, add, key, &stat, image_id).await,
    }
}

/// `osstream vdisk export`.
pub async fn export(
    backend: DynBackend,
    vdisk: &Vdisk,
    export: &VdiskExport,
) -> Result<ExportReport> {
    let format = match export.format.as_deref() {
        Some(format) => format.to_owned(),
        None if export.file.extension().is_some_and(|e| e == "qcow2") => "qcow2".to_owned(),
        None => "raw".to_owned(),
    };
    if format != "raw" && format != "qcow2" {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("--format {format:?}: use raw or qcow2"),
        ));
    }
    if export.file.exists() && !export.force {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} exists; pass --force to overwrite it",
                export.file.display()
            ),
        ));
    }
    let source = backend.open(&vdisk.key, OpenMode::ReadOnly).await?;
    // qcow2: the raw image is written next to the target first, then converted.
    let raw_path = if format == "qcow2" {
        let name = export
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        export
            .file
            .with_file_name(format!(".{name}.export-{}.raw", std::process::id()))
    } else {
        export.file.clone()
    };
    let _temporary = (format == "qcow2").then(|| TempFile(raw_path.clone()));
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if export.force || format == "qcow2" {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let file = open.open(&raw_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} exists; pass --force to overwrite it",
                    export.file.display()
                ),
            )
        } else {
            Error::from_io(e, format!("cannot create {}", export.file.display()))
        }
    })?;
    let progress = Progress::new("export", source.size(), export.quiet);
    let sha256 = stream_source(&source, &progress, None, |offset, bytes| {
        // Zero runs stay holes: a sparse vdisk exports to a sparse file.
        for run in osstream_core::sparse::data_runs(bytes, osstream_core::sparse::HOLE_GRANULE) {
            file.write_all_at(&bytes[run.clone()], offset + run.start as u64)
                .map_err(|e| {
                    Error::from_io(e, format!("cannot write {}", export.file.display()))
                })?;
        }
        Ok(())
    })
    .await?;
    file.set_len(source.size())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::from_io(e, format!("cannot finish {}", raw_path.display())))?;
    if format == "qcow2" {
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_path)
            .arg(&export.file)
            .status()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("qcow2 export needs qemu-img (qemu-utils): {e}"),
                )
            })?;
        if !status.success() {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "qemu-img convert to {} failed ({status})",
                    export.file.display()
                ),
            ));
        }
    }
    Ok(ExportReport {
        vdisk: vdisk.name.clone(),
        file: export.file.clone(),
        size: source.size(),
        format,
        sha256,
    })
}

/// The key a standard vdisk's replaced image is stored under: `BASE-vN` with the first
/// `N` from 2 that is neither on the backend nor waiting for deletion (BASE is the key
/// without an earlier `-vN`).
async fn next_image_key(backend: &DynBackend, catalog: &SqlCatalog, key: &str) -> Result<String> {
    let base = match key.rsplit_once("-v") {
        Some((base, n))
            if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            base
        }
        _ => key,
    };
    let retired = catalog.retired_images().await?;
    for n in 2..10_000u32 {
        let candidate = format!("{base}-v{n}");
        let waiting = retired
            .iter()
            .any(|r| r.backend == backend.name() && r.key == candidate);
        if candidate != key && !waiting && backend.stat(&candidate).await.is_err() {
            validate_image_name(&candidate)?;
            return Ok(candidate);
        }
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "no free key for a new image of {key:?} on backend {:?}",
            backend.name()
        ),
    ))
}
