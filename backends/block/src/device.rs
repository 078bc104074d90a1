//! One open block device: probing, aligned direct I/O, positional reads and writes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, Error, ErrorKind, Extent, Geometry, ReadOpts, Result,
    SourceInfo, WriteOpts, ZeroOpts, async_trait, check_range, read_only_error,
};

use crate::error::io_error;

/// `_IOR(0x12, 114, u64)`: the device size in bytes (not exported by the libc crate).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// What a device reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGeometry {
    /// Size in bytes.
    pub size: u64,
    /// Logical block (sector) size in bytes.
    pub logical_block: u32,
    /// Whether it is a block device (else a regular file standing in for one).
    pub is_block_device: bool,
}

/// Size and logical block size of `file`: by ioctl for a block device, by length (and
/// 512-byte sectors) for a regular file.
fn geometry_of(file: &File, path: &Path) -> Result<DeviceGeometry> {
    let meta = file.metadata().map_err(|e| io_error(e, "stat", path))?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`,
        // alive for the call; the descriptor is open because `file` is borrowed.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io_error(
                std::io::Error::last_os_error(),
                "BLKGETSIZE64",
                path,
            ));
        }
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points to `sector`.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::BLKSSZGET,
                &mut sector as *mut libc::c_int,
            )
        };
        if rc != 0 {
            return Err(io_error(std::io::Error::last_os_error(), "BLKSSZGET", path));
        }
        Ok(DeviceGeometry {
            size,
            logical_block: u32::try_from(sector).unwrap_or(512).max(512),
            is_block_device: true,
        })
    } else if meta.is_file() {
        Ok(DeviceGeometry {
            size: meta.len(),
            logical_block: 512,
            is_block_device: false,
        })
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is neither a block device nor a file", path.display()),
        ))
    }
}

/// Opens `path` read-only and reports its geometry.
pub fn probe(path: &Path) -> Result<DeviceGeometry> {
    let file = File::open(path).map_err(|e| io_error(e, "open", path))?;
    geometry_of(&file, path)
}

/// A buffer of `len` bytes whose start is aligned to `align`, made without `unsafe` by
/// over-allocating and skipping to the first aligned byte.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let misalignment = storage.as_ptr() as usize % align;
        let start = if misalignment == 0 {
            0
        } else {
            align - misalignment
        };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes `from..from+len` of the buffer, without copying.
    fn into_bytes(self, from: usize, len: usize) -> Bytes {
        Bytes::from(self.storage).slice(self.start + from..self.start + from + len)
    }
}

/// Reads into `buf` at `offset` until it is full or the device ends; returns bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// One open device.
#[derive(Debug)]
pub struct DeviceSource {
    file: Arc<File>,
    path: Arc<PathBuf>,
    info: SourceInfo,
    geometry: DeviceGeometry,
    writable: bool,
    direct: bool,
    /// Serialises read-modify-write of partial sectors under `O_DIRECT`.
    rmw: Arc<Mutex<()>>,
}

impl DeviceSource {
    /// Opens `path` (read-write if `writable`, `O_DIRECT` if `direct`) as image `name`.
    pub fn open(
        path: &Path,
        name: String,
        identity: String,
        writable: bool,
        direct: bool,
        generation: &str,
    ) -> Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} does not support O_DIRECT; set direct = false",
                        path.display()
                    ),
                )
            } else {
                io_error(e, "open", path)
            }
        })?;
        let geometry = geometry_of(&file, path)?;
        Ok(DeviceSource {
            info: SourceInfo {
                name,
                identity,
                size: geometry.size,
                generation: format!("{generation}-{}", geometry.size),
            },
            file: Arc::new(file),
            path: Arc::new(path.to_path_buf()),
            geometry,
            writable,
            direct,
            rmw: Arc::new(Mutex::new(())),
        })
    }

    fn sector(&self) -> u64 {
        u64::from(self.geometry.logical_block)
    }

    /// The sector-aligned span covering `offset..offset+len`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let sector = self.sector();
        let start = offset / sector * sector;
        let end = (offset + len).div_ceil(sector) * sector;
        (start, end - start)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&DeviceSource) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = DeviceSource {
            file: self.file.clone(),
            path: self.path.clone(),
            info: self.info.clone(),
            geometry: self.geometry,
            writable: self.writable,
            direct: self.direct,
            rmw: self.rmw.clone(),
        };
        tokio::task::spawn_blocking(move || work(&this))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("device I/O task failed: {e}"),
                )
            })?
    }

    fn read_now(&self, offset: u64, len: usize) -> Result<Bytes> {
        let short = || {
            Error::new(
                ErrorKind::Io,
                format!("{} ended before the requested range", self.path.display()),
            )
            .with_op("read_at")
        };
        if !self.direct {
            let mut buf = vec![0u8; len];
            if read_full(&self.file, &mut buf, offset)
                .map_err(|e| io_error(e, "read_at", &self.path))?
                != len
            {
                return Err(short());
            }
            return Ok(Bytes::from(buf));
        }
        let (start, span) = self.widen(offset, len as u64);
        let mut buf = AlignedBuf::new(span as usize, self.sector().max(4096) as usize);
        let got = read_full(&self.file, buf.as_mut(), start)
            .map_err(|e| io_error(e, "read_at", &self.path))?;
        let skip = (offset - start) as usize;
        if got < skip + len {
            return Err(short());
        }
        Ok(buf.into_bytes(skip, len))
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let map = |e| io_error(e, "write_at", &self.path);
        if !self.direct {
            self.file.write_all_at(data, offset).map_err(map)?;
        } else {
            let (start, span) = self.widen(offset, data.len() as u64);
            let partial = start != offset || span != data.len() as u64;
            // Partial sectors are read, patched and written back, one at a time.
            let _guard = partial.then(|| self.rmw.lock().unwrap_or_else(|p| p.into_inner()));
            let mut buf = AlignedBuf::new(span as usize, self.sector().max(4096) as usize);
            if partial {
                read_full(&self.file, buf.as_mut(), start).map_err(map)?;
            }
            let skip = (offset - start) as usize;
            buf.as_mut()[skip..skip + data.len()].copy_from_slice(data);
            self.file.write_all_at(buf.as_ref(), start).map_err(map)?;
        }
        if fua {
            self.file
                .sync_data()
                .map_err(|e| io_error(e, "fdatasync", &self.path))?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockSource for DeviceSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        Capability {
            write: self.writable,
            flush: self.writable,
            fua: self.writable,
            trim: false,
            write_zeroes: self.writable,
            extents: false,
            multi_conn: true,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            // Unaligned requests work (they are widened), but whole sectors are cheaper.
            minimum: 1,
            preferred: self.geometry.logical_block.max(4096),
            maximum: 32 * 1024 * 1024,
        }
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        Ok(Chunks::from(
            self.blocking(move |dev| dev.read_now(offset, len)).await?,
        ))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if !self.writable {
            return Err(read_only_error(&self.info, "write_at"));
        }
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        self.blocking(move |dev| dev.write_now(offset, &data, opts.fua))
            .await
    }

    async fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.blocking(|dev| {
            dev.file
                .sync_data()
                .map_err(|e| io_error(e, "fdatasync", &dev.path))
        })
        .await
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "trim is not offered on block devices yet",
        )
        .with_op("trim"))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if !self.writable {
            return Err(read_only_error(&self.info, "write_zeroes"));
        }
        check_range(&self.info, "write_zeroes", offset, len)?;
        self.blocking(move |dev| {
            const STEP: u64 = 1 << 20;
            let zeroes = vec![0u8; STEP.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = STEP.min(len - done) as usize;
                dev.write_now(offset + done, &zeroes[..n], false)?;
                done += n as u64;
            }
            if opts.fua {
                dev.file
                    .sync_data()
                    .map_err(|e| io_error(e, "fdatasync", &dev.path))?;
            }
            Ok(())
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        osstream_core::all_data(&self.info, offset, len)
    }
}
