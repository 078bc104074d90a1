//! [`FileTree`]: files of one folder reached by a relative path from the network, never
//! anything outside it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use osstream_core::{DynSource, Error, ErrorKind, ImageStat, Result};

use crate::error::io_error;
use crate::source::FileSource;

/// A read-only folder of files by relative path (`pxelinux.cfg/default`), as TFTP asks.
///
/// Every open resolves the path beneath the folder in the kernel (`openat2` with
/// `RESOLVE_BENEATH`): `..`, absolute paths and symbolic links that lead out are refused
/// however they are spelled, and a link swapped in mid-open cannot win a race. Symbolic
/// links that stay inside are followed. Only regular files open.
#[derive(Debug)]
pub struct FileTree {
    root: PathBuf,
    dir: File,
}

impl FileTree {
    /// Opens the folder `root`.
    pub fn open_root(root: &Path) -> Result<Self> {
        let dir = File::open(root).map_err(|e| io_error(e, "open", root))?;
        let meta = dir.metadata().map_err(|e| io_error(e, "stat", root))?;
        if !meta.is_dir() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{} is not a folder", root.display()),
            ));
        }
        Ok(FileTree {
            root: root.to_path_buf(),
            dir,
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `relative` read-only as a block source. `NotFound` for a missing file,
    /// `PermissionDenied` for a path that leads out of the folder or is not a regular
    /// file, `InvalidInput` for an empty name or one with a NUL.
    pub async fn open(&self, relative: &str) -> Result<DynSource> {
        let relative = relative.trim_start_matches('/');
        if relative.is_empty() || relative.contains('\0') {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{relative:?} is not a file name"),
            ));
        }
        let path = self.root.join(relative);
        let dir = self
            .dir
            .try_clone()
            .map_err(|e| io_error(e, "open", &self.root))?;
        let name = relative.to_owned();
        tokio::task::spawn_blocking(move || {
            let file = open_beneath(&dir, &name, &path)?;
            let meta = file.metadata().map_err(|e| io_error(e, "stat", &path))?;
            if !meta.is_file() {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!("{name:?} is not a regular file"),
                ));
            }
            let stat = ImageStat {
                name: name.clone(),
                size: meta.len(),
                generation: crate::source::generation_of(&meta),
                writable: false,
            };
            let identity = osstream_core::file_identity(&path);
            Ok(Arc::new(FileSource::from_file(file, path, identity, stat)) as DynSource)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("open task failed: {e}")))?
    }
}

/// The kernel's `struct open_how` (linux/openat2.h); libc's is non-exhaustive.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, name, O_RDONLY, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(dir: &File, name: &str, path: &Path) -> Result<File> {
    let c_name = CString::new(Path::new(name).as_os_str().as_bytes())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "a NUL in a file name"))?;
    let how = OpenHow {
        // O_NONBLOCK: a FIFO must not hold the thread until a writer comes (regular
        // files read the same either way).
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads the NUL-terminated name and the `open_how` of the given size,
    // both alive for the call; it returns a new descriptor or -1 and touches no memory of
    // ours otherwise.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => Error::new(
                ErrorKind::PermissionDenied,
                format!("{name:?} leads out of {}", dir_name(path, name)),
            ),
            Some(libc::ENOSYS) => Error::new(
                ErrorKind::Unsupported,
                "this kernel has no openat2 (Linux 5.6 or later is needed to serve files safely)",
            ),
            _ => io_error(err, "open", path),
        });
    }
    // SAFETY: the descriptor was just returned by openat2 and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// The folder `path` is `name` beneath, for messages.
fn dir_name(path: &Path, name: &str) -> String {
    let text = path.display().to_string();
    text.strip_suffix(name)
        .map_or(text.clone(), |d| d.trim_end_matches('/').to_owned())
}
