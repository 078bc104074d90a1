//! [`ImageBackend`]: the catalogue of one storage system (a directory, a bucket, a LUN...).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::source::DynSource;

/// A shared, type-erased backend.
pub type DynBackend = Arc<dyn ImageBackend>;

/// How an image is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads only; write-class calls fail with [`ErrorKind::ReadOnly`].
    ReadOnly,
    /// Reads and writes with no lock (tests and maintenance tools).
    ReadWrite,
    /// Reads and writes under a private vdisk's lock: what the server uses. Backends
    /// that fence writes at their storage commit under it (through the context's
    /// [`crate::ImageLedger`]); the others treat it as [`OpenMode::ReadWrite`] and rely
    /// on the engine's checks.
    Locked(crate::LockToken),
}

impl OpenMode {
    /// Whether the source may be written.
    pub fn is_writable(&self) -> bool {
        !matches!(self, OpenMode::ReadOnly)
    }
}

/// What a backend knows about one image without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStat {
    /// The image name inside the backend.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Changes whenever the content may have changed (see [`crate::SourceInfo`]).
    pub generation: String,
    /// The backend would open it [`OpenMode::ReadWrite`].
    pub writable: bool,
}

/// Refuses an image `stat` says its backend (named `backend`) serves read-only: a private
/// vdisk is written by its client. The common part of every
/// [`ImageBackend::check_private`].
pub fn refuse_read_only(backend: &str, stat: &ImageStat) -> Result<()> {
    if stat.writable {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::ReadOnly,
        format!(
            "backend {backend:?} serves {:?} read-only; a private vdisk is written by its \
             client: set writable = true in [backends.{backend}]",
            stat.name
        ),
    )
    .with_op("check_private"))
}

/// One storage system holding images.
///
/// # Contract
/// - Image names are plain names (`[A-Za-z0-9._-]`, not starting with `.`); a name that
///   could escape the backend's root is [`ErrorKind::InvalidInput`], a missing image
///   [`ErrorKind::NotFound`]. [`validate_image_name`] does the check for every backend.
/// - `open` returns a source whose [`crate::SourceInfo`] matches what `stat` said at that
///   moment; `ReadWrite` on a backend or image that is not writable is
///   [`ErrorKind::ReadOnly`].
/// - `list` is cheap enough to call on every protocol-level listing.
#[async_trait]
pub trait ImageBackend: Send + Sync + Debug {
    /// The instance name from the configuration (`[backends.NAME]`).
    fn name(&self) -> &str;

    /// The registry kind (`file`, `s3`, ...).
    fn kind(&self) -> &'static str;

    /// Where the bytes of `image` live, independent of the backend's configured name:
    /// `KIND:` followed by the canonical location and the key (the real path of a file,
    /// the device number of a block device, endpoint + bucket + prefix + key on S3,
    /// server + export + path on NFS). Two backends, or two names for one place, that
    /// reach the same bytes give the same identity; different bytes never do. Caches key
    /// blocks by it, and the catalog refuses to put one image under two vdisk modes by it.
    ///
    /// # Contract
    /// Cheap and local: no network round trip (a `stat` of a local path at most). It is
    /// the same string [`crate::SourceInfo::identity`] of an opened source carries, and
    /// does not change when the image's content does. Names are checked as by `stat`.
    fn identity(&self, image: &str) -> Result<String>;

    /// Every image this backend holds, sorted by name.
    async fn list(&self) -> Result<Vec<ImageStat>>;

    /// Size and generation of one image.
    async fn stat(&self, image: &str) -> Result<ImageStat>;

    /// Opens one image as a block source.
    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource>;

    /// Makes what the backend keeps inside the server's own state, as the server starts
    /// (a `file` backend's folder inside `data_dir`, made on the first start as
    /// `data_dir` is). Called by the server before it serves, never by admin commands;
    /// storage the admin provides (a mount, a bucket) is not made. The default: nothing.
    async fn prepare(&self) -> Result<()> {
        Ok(())
    }

    /// Whether a private vdisk's session could write the image `stat` (made just now)
    /// describes: what `open` in [`OpenMode::Locked`] would refuse about the image itself
    /// (a file with hard links), checked when an admin makes a vdisk private, not at its
    /// client's first connection. Opens nothing and writes nothing. The default:
    /// [`refuse_read_only`].
    async fn check_private(&self, stat: &ImageStat) -> Result<()> {
        refuse_read_only(self.name(), stat)
    }

    /// Opens the image `stat` describes, a stat the caller made just now: a backend whose
    /// `open` would ask its storage again (a `HEAD` on S3) takes size and generation from
    /// it instead. The default is `open`.
    async fn open_stat(&self, stat: &ImageStat, mode: OpenMode) -> Result<DynSource> {
        self.open(&stat.name, mode).await
    }

    /// Opens a boot file (a kernel, an initrd, a bootloader) read-only: what a vdisk's
    /// `--kernel` and `--initrd` keys and TFTP names reach. Boot files live in a home of
    /// their own, apart from images (the `file` backend's `boot/` folder), because they
    /// are served without a session: a key must never reach an image. Backends without
    /// such a home refuse (`Unsupported`, the default).
    async fn open_boot_file(&self, key: &str) -> Result<DynSource> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "backend '{}' (kind {}) keeps no boot files; put kernels, initrds and bootloaders on a file backend (its boot/ folder)",
                self.name(),
                self.kind()
            ),
        )
        .with_context("key", key)
        .with_op("open_boot_file"))
    }

    /// Deletes the image `image` from the storage: an image the catalog retired (a vdisk
    /// whose image was replaced while clients ran on it) once its last session ended.
    /// An image that is not there is `NotFound`; backends that cannot delete return
    /// [`ErrorKind::Unsupported`] (the default), and the admin removes it by hand.
    async fn remove(&self, image: &str) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "backend '{}' (kind {}) cannot delete images; remove {image:?} by hand",
                self.name(),
                self.kind()
            ),
        )
        .with_op("remove"))
    }

    /// Stores the raw image file `from` as the image `image` (`osstream vdisk import`).
    ///
    /// An existing image of that name is [`ErrorKind::Conflict`] unless
    /// `options.replace`. The new image becomes visible only once it is complete: a
    /// failed import leaves no half-written image behind under the name. Backends that
    /// cannot create images return [`ErrorKind::Unsupported`] (the default).
    async fn import(
        &self,
        image: &str,
        from: &std::path::Path,
        options: &ImportOptions,
    ) -> Result<ImageStat> {
        let _ = (from, options);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "backend '{}' (kind {}) cannot import images; copy {image:?} onto its storage by other means",
                self.name(),
                self.kind()
            ),
        )
        .with_op("import"))
    }
}

/// Called with the number of bytes done so far, from any task.
pub type ProgressFn = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Options of [`ImageBackend::import`].
#[derive(Clone, Default)]
pub struct ImportOptions {
    /// Replace an existing image of the same name.
    pub replace: bool,
    /// The image must open read-write afterwards (a private vdisk): a backend that could
    /// not do that refuses before storing anything.
    pub writable: bool,
    /// Told how many bytes of the file are stored so far.
    pub progress: Option<ProgressFn>,
    /// Cancelled when the administrator interrupts the import: the backend stops, removes
    /// what it stored so far (aborts a multipart upload) and returns `Shutdown`.
    pub cancel: crate::CancellationToken,
}

impl ImportOptions {
    /// `Err(Shutdown)` once the import was cancelled.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::new(ErrorKind::Shutdown, "import interrupted").with_op("import"))
        } else {
            Ok(())
        }
    }

    /// Reports `done` bytes to the progress callback, if any.
    pub fn report(&self, done: u64) {
        if let Some(progress) = &self.progress {
            progress(done);
        }
    }
}

impl Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("replace", &self.replace)
            .field("writable", &self.writable)
            .field("cancelled", &self.cancel.is_cancelled())
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The identity ([`ImageBackend::identity`]) of an image that is a file on this host:
/// `file:` and its real path, symlinks resolved, so every backend reaching the same file
/// (two `file` backends on one folder, a `block` backend listing it) names it alike. A
/// missing file is named by the real path of its folder.
pub fn file_identity(path: &std::path::Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| {
        match (path.parent().map(std::fs::canonicalize), path.file_name()) {
            (Some(Ok(folder)), Some(name)) => folder.join(name),
            _ => path.to_path_buf(),
        }
    });
    format!("file:{}", real.display())
}

/// Checks that `name` is a plain image name that cannot escape a backend's root.
pub fn validate_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid image name {name:?}: use letters, digits, '.', '_' and '-', \
                 not starting with '.'"
            ),
        )
        .with_op("validate_image_name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["", "..", "../etc/passwd", "a/b", ".hidden", "a\0b", "a b"] {
            assert_eq!(
                validate_image_name(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
        for good in ["demo", "win10.v2", "ubuntu-24_04"] {
            validate_image_name(good).unwrap();
        }
    }
}
