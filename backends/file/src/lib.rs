//! The `file` image backend: raw images in a directory.
//!
//! The directory may be on a local disk or on a kernel NFS/NAS mount. Each `NAME.img` file
//! directly inside `root` is the image `NAME`. Reads and writes are positional
//! (`pread`/`pwrite` on a blocking-pool thread), so concurrent requests never serialise on
//! a shared file cursor. Images open read-write only when the backend is configured
//! `writable = true`; `flush` is `fdatasync`. The generation is the file's mtime and
//! size, so a replaced image never serves stale cached blocks.
//!
//! ```toml
//! [backends.images]
//! kind = "file"
//! root = "images"      # relative to data_dir
//! writable = false
//! ```

mod config;
mod error;
mod source;
mod tree;

use std::path::PathBuf;
use std::sync::Arc;

use osstream_core::{
    BackendContext, DynBackend, DynSource, Error, ErrorKind, ImageBackend, ImageStat,
    ImportOptions, OpenMode, Registry, Result, async_trait, file_identity, validate_image_name,
};

pub use config::FileConfig;
use error::io_error;
use source::FileSource;
pub use tree::FileTree;

/// The registry kind.
pub const KIND: &str = "file";

/// The folder under `root` that holds boot files (kernels, initrds).
pub const BOOT_DIR: &str = "boot";

/// Adds the `file` kind to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_backend::<FileConfig>();
}

impl osstream_core::BackendKind for FileConfig {
    const KIND: &'static str = KIND;

    fn build(self, ctx: &BackendContext, name: &str) -> Result<DynBackend> {
        Ok(Arc::new(FileBackend::new(ctx, name, self)) as DynBackend)
    }
}

/// Raw images in one directory.
#[derive(Debug)]
pub struct FileBackend {
    name: String,
    root: PathBuf,
    config: FileConfig,
}

impl FileBackend {
    /// A backend named `name` over `config.root` (resolved against the data directory).
    pub fn new(ctx: &BackendContext, name: &str, config: FileConfig) -> Self {
        FileBackend {
            name: name.to_owned(),
            root: ctx.resolve(&config.root),
            config,
        }
    }

    /// The directory images are read from.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    fn path_of(&self, image: &str) -> Result<PathBuf> {
        validate_image_name(image)?;
        Ok(self.root.join(format!("{image}.{}", self.config.extension)))
    }

    fn stat_path(&self, image: &str, path: &std::path::Path) -> Result<ImageStat> {
        let meta = std::fs::metadata(path).map_err(|e| {
            io_error(e, "stat", path)
                .with_context("image", image)
                .with_context("backend", &self.name)
        })?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{} is not a regular file", path.display()),
            )
            .with_op("stat")
            .with_context("backend", &self.name));
        }
        Ok(ImageStat {
            name: image.to_owned(),
            size: meta.len(),
            generation: source::generation_of(&meta),
            writable: self.config.writable && !meta.permissions().readonly(),
        })
    }
}

#[async_trait]
impl ImageBackend for FileBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn identity(&self, image: &str) -> Result<String> {
        Ok(file_identity(&self.path_of(image)?))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) => {
                return Err(io_error(e, "list", &self.root).with_context("backend", &self.name));
            }
        };
        let suffix = format!(".{}", self.config.extension);
        let mut images = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(image) = file_name.to_str().and_then(|n| n.strip_suffix(&suffix)) else {
                continue;
            };
            if validate_image_name(image).is_err() {
                tracing::debug!(backend = %self.name, file = ?file_name, "skipping file whose name is not a valid image name");
                continue;
            }
            match self.stat_path(image, &entry.path()) {
                Ok(stat) => images.push(stat),
                Err(e) => tracing::debug!(backend = %self.name, %e, "skipping entry"),
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        let path = self.path_of(image)?;
        self.stat_path(image, &path)
    }

    /// A relative root lies inside `data_dir`: this server's own state, made on the first
    /// start. An absolute root (a NAS mount) is the admin's and must exist.
    async fn prepare(&self) -> Result<()> {
        if !self.config.root.is_relative() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.root).map_err(|e| {
            Error::from_io(
                e,
                format!("cannot create the image folder {}", self.root.display()),
            )
        })
    }

    async fn check_private(&self, stat: &ImageStat) -> Result<()> {
        osstream_core::refuse_read_only(&self.name, stat)?;
        refuse_hard_links(&stat.name, &self.path_of(&stat.name)?)
    }

    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        let path = self.path_of(image)?;
        let stat = self.stat_path(image, &path)?;
        let writable = match mode {
            OpenMode::ReadOnly => false,
            _ if stat.writable => {
                refuse_hard_links(image, &path)?;
                true
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "image '{image}' on backend '{}' is not writable (set writable = true in [backends.{}])",
                        self.name, self.name
                    ),
                )
                .with_op("open"));
            }
        };
        let identity = file_identity(&path);
        let source =
            tokio::task::spawn_blocking(move || FileSource::open(path, identity, stat, writable))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Unexpected, format!("open task failed: {e}"))
                })??;
        Ok(Arc::new(source))
    }

    /// Boot files live in `ROOT/boot/`, under their own names (`vmlinuz`, not
    /// `vmlinuz.img`), so the image list shows disks only.
    /// Names never lead out of `boot/` (a symbolic link out is refused, as in TFTP).
    async fn open_boot_file(&self, key: &str) -> Result<DynSource> {
        validate_image_name(key)?;
        let home = self.root.join(BOOT_DIR);
        FileTree::open_root(&home)
            .map_err(|e| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("backend '{}' has no boot files ({e})", self.name),
                )
            })?
            .open(key)
            .await
            .map_err(|e| e.with_context("backend", &self.name))
    }

    async fn remove(&self, image: &str) -> Result<()> {
        let path = self.path_of(image)?;
        std::fs::remove_file(&path).map_err(|e| {
            crate::error::io_error(e, "remove", &path).with_context("backend", &self.name)
        })
    }

    async fn import(
        &self,
        image: &str,
        from: &std::path::Path,
        options: &ImportOptions,
    ) -> Result<ImageStat> {
        let path = self.path_of(image)?;
        if options.writable && !self.config.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "backend '{}' serves images read-only; a private vdisk needs writable = true in [backends.{}]",
                    self.name, self.name
                ),
            )
            .with_op("import"));
        }
        if path.exists() && !options.replace {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} exists already; pass --replace to overwrite it",
                    path.display()
                ),
            )
            .with_op("import"));
        }
        let (from, options) = (from.to_path_buf(), options.clone());
        let target = path.clone();
        tokio::task::spawn_blocking(move || copy_sparse(&from, &target, &options))
            .await
            .map_err(|e| Error::new(ErrorKind::Unexpected, format!("import task failed: {e}")))??;
        self.stat_path(image, &path)
    }
}

/// Refuses to write a file that has hard links: images are told apart by their real path
/// (symlinks resolved), so another name of the same file would reach the bytes of a
/// private vdisk without its lock.
fn refuse_hard_links(image: &str, path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let links = std::fs::metadata(path)
        .map_err(|e| io_error(e, "stat", path))?
        .nlink();
    if links > 1 {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "image '{image}' ({}) has {links} hard links: another name of the file would reach a \
                 private vdisk's bytes without its lock, so it is never written; give the image one name \
                 (copy it: cp --reflink=auto)",
                path.display()
            ),
        )
        .with_op("open"));
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary file in the same folder, renamed into place
/// once complete and synced; all-zero pieces are left as holes.
fn copy_sparse(
    from: &std::path::Path,
    to: &std::path::Path,
    options: &ImportOptions,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 8 << 20;
    let source = std::fs::File::open(from).map_err(|e| io_error(e, "open", from))?;
    let size = source
        .metadata()
        .map_err(|e| io_error(e, "stat", from))?
        .len();
    let file_name = to.file_name().map(|n| n.to_string_lossy().into_owned());
    let temp = to.with_file_name(format!(
        ".{}.import-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let out = std::fs::File::create(&temp).map_err(|e| io_error(e, "create", &temp))?;
        let mut buf = vec![0; PIECE];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(PIECE as u64) as usize;
            source
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| io_error(e, "read", from))?;
            for run in
                osstream_core::sparse::data_runs(&buf[..n], osstream_core::sparse::HOLE_GRANULE)
            {
                out.write_all_at(&buf[run.clone()], offset + run.start as u64)
                    .map_err(|e| io_error(e, "write", &temp))?;
            }
            offset += n as u64;
            options.report(offset);
            options.check_cancelled()?;
        }
        out.set_len(size)
            .map_err(|e| io_error(e, "truncate", &temp))?;
        out.sync_all().map_err(|e| io_error(e, "fsync", &temp))?;
        std::fs::rename(&temp, to).map_err(|e| io_error(e, "rename", to))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
