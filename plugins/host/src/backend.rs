//! [`PluginBackend`] and its sources: the engine's traits over a loaded plugin.

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::Arc;

use osstream_core::{
    BlockSource, Bytes, Capability, Chunks, DynSource, Error, ErrorKind, Extent, Geometry,
    ImageBackend, ImageStat, OpenMode, ReadOpts, Result, SourceInfo, WriteOpts, ZeroOpts,
    async_trait, check_range, read_only_error, validate_image_name,
};
use osstream_plugin_abi as abi;

use crate::config::PluginConfig;
use crate::loader::{LoadedPlugin, load};

/// A raw pointer owned by the plugin (an instance or a handle), moved between threads.
///
/// Always read it through [`Opaque::get`] inside closures, so the closure captures the
/// `Send` wrapper and not the raw pointer field.
#[derive(Debug, Clone, Copy)]
struct Opaque(*mut c_void);
// SAFETY: the ABI requires instances and handles to be usable from any thread; the host
// serialises calls when the plugin's thread model asks for it.
unsafe impl Send for Opaque {}
// SAFETY: as above.
unsafe impl Sync for Opaque {}

impl Opaque {
    fn get(self) -> *mut c_void {
        self.0
    }
}

/// One backend instance of a plugin; unloaded (not the library, only the instance) when
/// the last source opened from it is gone.
#[derive(Debug)]
struct Instance {
    plugin: Arc<LoadedPlugin>,
    ptr: Opaque,
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(unload) = self.plugin.table().unload {
            let ptr = self.ptr;
            let _ = self.plugin.call_now("unload", |_, _| {
                // SAFETY: `ptr` came from this plugin's `load` and is never used again.
                unsafe { unload(ptr.get()) };
                (0, ())
            });
        }
    }
}

/// `[backends.NAME]` with `kind = "plugin"`.
#[derive(Debug)]
pub struct PluginBackend {
    name: String,
    instance: Arc<Instance>,
    /// `plugin:LIBRARY#CONFIG`: the library's real path and a hash of the configuration it
    /// was given, so two backend names for one plugin setup share an identity and two
    /// setups never do (the ABI has no way for a plugin to name its storage yet).
    location: String,
}

impl PluginBackend {
    /// Loads the plugin library (checks included) and creates one instance from `config`.
    pub fn new(name: &str, config: &PluginConfig) -> Result<Self> {
        let plugin = load(&config.path)?;
        let json = serde_json::to_vec(&config.config).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("[backends.{name}] config cannot be encoded: {e}"),
            )
        })?;
        let load_fn = plugin.table().load.expect("checked at load");
        let ptr = plugin
            .call_now("load", |_, error| {
                let mut instance: *mut c_void = std::ptr::null_mut();
                // SAFETY: the JSON buffer and out-pointers are valid for the call.
                let rc = unsafe { load_fn(json.as_ptr(), json.len(), &mut instance, error) };
                (rc, Opaque(instance))
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "[backends.{name}] plugin '{}' refused its configuration: {e}",
                        plugin.name()
                    ),
                )
            })?;
        tracing::info!(backend = %name, plugin = plugin.name(), version = plugin.version(), "plugin backend ready");
        let library = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
        let config_hash = osstream_core::stable_hash(&[&String::from_utf8_lossy(&json)]);
        Ok(PluginBackend {
            name: name.to_owned(),
            instance: Arc::new(Instance { plugin, ptr }),
            location: format!("plugin:{}#{config_hash:032x}", library.display()),
        })
    }

    fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.instance.plugin
    }

    async fn list_images(&self) -> Result<Option<Vec<ImageStat>>> {
        let Some(list) = self.plugin().table().list else {
            return Ok(None);
        };
        let instance = self.instance.ptr;
        let mut images = self
            .plugin()
            .call("list", move |_, error| {
                let mut found: Vec<ImageStat> = Vec::new();
                // SAFETY: `emit` receives `found` as its context for the duration of the call.
                let rc = unsafe { list(instance.get(), emit, (&raw mut found).cast(), error) };
                (rc, found)
            })
            .await?;
        images.retain(|stat| validate_image_name(&stat.name).is_ok());
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(images))
    }
}

/// Collects one listed image into the `Vec<ImageStat>` behind `ctx`.
unsafe extern "C" fn emit(
    ctx: *mut c_void,
    name: *const c_char,
    size: u64,
    generation: *const c_char,
) {
    if ctx.is_null() || name.is_null() {
        return;
    }
    // SAFETY: `ctx` is the `Vec<ImageStat>` passed by `list_images`, alive during the call;
    // the strings are NUL-terminated per the ABI.
    let (found, name) = unsafe { (&mut *ctx.cast::<Vec<ImageStat>>(), CStr::from_ptr(name)) };
    let generation = if generation.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated per the ABI.
        unsafe { CStr::from_ptr(generation) }
            .to_string_lossy()
            .into_owned()
    };
    found.push(ImageStat {
        name: name.to_string_lossy().into_owned(),
        size,
        generation: format!("{generation}-{size}"),
        writable: false,
    });
}

#[async_trait]
impl ImageBackend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        crate::KIND
    }

    fn identity(&self, image: &str) -> Result<String> {
        validate_image_name(image)?;
        Ok(format!("{}/{image}", self.location))
    }

    async fn list(&self) -> Result<Vec<ImageStat>> {
        Ok(self.list_images().await?.unwrap_or_default())
    }

    async fn stat(&self, image: &str) -> Result<ImageStat> {
        validate_image_name(image)?;
        if let Some(images) = self.list_images().await? {
            return images.into_iter().find(|s| s.name == image).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("plugin backend '{}' has no image '{image}'", self.name),
                )
                .with_op("stat")
            });
        }
        let source = self.open(image, OpenMode::ReadOnly).await?;
        let info = source.info();
        Ok(ImageStat {
            name: info.name.clone(),
            size: info.size,
            generation: info.generation.clone(),
            writable: false,
        })
    }

    async fn open(&self, image: &str, mode: OpenMode) -> Result<DynSource> {
        validate_image_name(image)?;
        let writable = mode.is_writable();
        let table = *self.plugin().table();
        let open = table.open.expect("checked at load");
        let get_size = table.get_size.expect("checked at load");
        let name = CString::new(image).expect("validated names hold no NUL");
        let instance = self.instance.ptr;
        let opened = self
            .plugin()
            .call("open", move |_, error| {
                let mut handle: *mut c_void = std::ptr::null_mut();
                // SAFETY: valid instance, NUL-terminated name and out-pointers for the call.
                let rc = unsafe {
                    open(
                        instance.get(),
                        name.as_ptr(),
                        i32::from(writable),
                        &mut handle,
                        error,
                    )
                };
                (rc, Opaque(handle))
            })
            .await?;
        // From here the handle is owned by `handle`: closed on every path, also on errors.
        let handle = Handle {
            instance: self.instance.clone(),
            ptr: opened,
        };
        let ptr = handle.ptr;
        let size = self
            .plugin()
            .call("get_size", move |_, error| {
                let mut size = 0u64;
                // SAFETY: a live handle and an out-pointer valid for the call.
                let rc = unsafe { get_size(ptr.get(), &mut size, error) };
                (rc, size)
            })
            .await?;
        let mut generation = format!("size-{size}");
        if let Some(generation_fn) = table.generation {
            let text = self
                .plugin()
                .call("generation", move |_, error| {
                    let mut buf = [0u8; 256];
                    // SAFETY: a live handle and a buffer of the stated length.
                    let rc = unsafe {
                        generation_fn(ptr.get(), buf.as_mut_ptr().cast(), buf.len(), error)
                    };
                    // A plugin that forgot the NUL gets no generation, not an overread.
                    let text = CStr::from_bytes_until_nul(&buf)
                        .map(|text| text.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (rc, text)
                })
                .await?;
            if !text.is_empty() {
                generation = format!("{text}-{size}");
            }
        }
        let mut geometry = Geometry::default();
        if let Some(block_size) = table.block_size {
            let sizes = self
                .plugin()
                .call("block_size", move |_, error| {
                    let (mut min, mut pref, mut max) = (0u32, 0u32, 0u32);
                    // SAFETY: a live handle and out-pointers valid for the call.
                    let rc = unsafe { block_size(ptr.get(), &mut min, &mut pref, &mut max, error) };
                    (rc, (min, pref, max))
                })
                .await;
            if let Ok((min, pref, max)) = sizes
                && min.is_power_of_two()
                && pref >= min
                && max >= pref
            {
                geometry = Geometry {
                    minimum: min,
                    preferred: pref,
                    maximum: max,
                };
            }
        }
        let can_write = match table.can_write {
            Some(can_write) if writable => {
                self.plugin()
                    .call("can_write", move |_, _| {
                        // SAFETY: a live handle.
                        (0, unsafe { can_write(ptr.get()) } == 1)
                    })
                    .await?
            }
            _ => false,
        };
        if writable && !(can_write && table.pwrite.is_some()) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "plugin '{}' opened '{image}' read-only",
                    self.plugin().name()
                ),
            )
            .with_op("open"));
        }
        Ok(Arc::new(PluginSource {
            info: SourceInfo {
                name: image.to_owned(),
                identity: self.identity(image)?,
                size,
                generation,
            },
            geometry,
            writable,
            table,
            handle: Arc::new(handle),
        }))
    }
}

/// An open plugin handle, closed when dropped.
#[derive(Debug)]
struct Handle {
    instance: Arc<Instance>,
    ptr: Opaque,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let close = self.instance.plugin.table().close.expect("checked at load");
        let ptr = self.ptr;
        let _ = self.instance.plugin.call_now("close", |_, _| {
            // SAFETY: the handle came from `open` and is never used again.
            unsafe { close(ptr.get()) };
            (0, ())
        });
    }
}

/// One image opened through a plugin.
#[derive(Debug)]
struct PluginSource {
    info: SourceInfo,
    geometry: Geometry,
    writable: bool,
    table: abi::PluginTable,
    handle: Arc<Handle>,
}

impl PluginSource {
    fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.handle.instance.plugin
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(read_only_error(&self.info, op))
        }
    }

    /// Writes `data` at `offset` in requests of at most `u32::MAX` bytes.
    async fn pwrite(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let pwrite = self
            .table
            .pwrite
            .ok_or_else(|| read_only_error(&self.info, "write_at"))?;
        let ptr = self.handle.ptr;
        let handle = self.handle.clone();
        self.plugin()
            .call("pwrite", move |_, error| {
                let _keep = handle;
                let flags = if fua { abi::WRITE_FUA } else { 0 };
                // SAFETY: a live handle; `data` is readable for `data.len()` bytes.
                let rc = unsafe {
                    pwrite(
                        ptr.get(),
                        data.as_ptr(),
                        data.len() as u32,
                        offset,
                        flags,
                        error,
                    )
                };
                (rc, ())
            })
            .await
    }
}

#[async_trait]
impl BlockSource for PluginSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        let write = self.writable;
        Capability {
            write,
            flush: write,
            fua: write,
            trim: write,
            write_zeroes: write,
            extents: false,
            // Read-only images are consistent across connections by construction; for
            // writes we cannot know how the plugin caches, so clients get one connection.
            multi_conn: !write,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        let count = u32::try_from(len).map_err(|_| {
            Error::new(ErrorKind::InvalidInput, "plugin reads are limited to 4 GiB")
                .with_op("read_at")
        })?;
        let pread = self.table.pread.expect("checked at load");
        let ptr = self.handle.ptr;
        let handle = self.handle.clone();
        let data = self
            .plugin()
            .call("pread", move |_, error| {
                let _keep = handle;
                let mut buf = vec![0u8; len];
                // SAFETY: a live handle and a buffer of `count` writable bytes.
                let rc = unsafe { pread(ptr.get(), buf.as_mut_ptr(), count, offset, error) };
                (rc, buf)
            })
            .await
            .map_err(|e| e.with_context("offset", offset))?;
        Ok(Chunks::from(data))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.check_writable("write_at")?;
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.pwrite(offset, data, opts.fua).await
    }

    async fn flush(&self) -> Result<()> {
        let Some(flush) = self.table.flush.filter(|_| self.writable) else {
            return Ok(());
        };
        let ptr = self.handle.ptr;
        let handle = self.handle.clone();
        self.plugin()
            .call("flush", move |_, error| {
                let _keep = handle;
                // SAFETY: a live handle.
                (unsafe { flush(ptr.get(), error) }, ())
            })
            .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("trim")?;
        check_range(&self.info, "trim", offset, len)?;
        let Some(trim) = self.table.trim else {
            return Ok(()); // advisory: keeping the data is correct
        };
        let ptr = self.handle.ptr;
        let handle = self.handle.clone();
        let mut done = 0u64;
        while done < len {
            let count = (len - done).min(u64::from(u32::MAX)) as u32;
            let at = offset + done;
            let handle = handle.clone();
            self.plugin()
                .call("trim", move |_, error| {
                    let _keep = handle;
                    // SAFETY: a live handle.
                    (unsafe { trim(ptr.get(), count, at, error) }, ())
                })
                .await?;
            done += u64::from(count);
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.check_writable("write_zeroes")?;
        check_range(&self.info, "write_zeroes", offset, len)?;
        // The ABI has no zeroing call (yet): write zero buffers in bounded steps.
        const STEP: u64 = 1 << 20;
        let zeroes = Bytes::from(vec![0u8; STEP.min(len) as usize]);
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done) as usize;
            self.pwrite(offset + done, zeroes.slice(..n), opts.fua)
                .await?;
            done += n as u64;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        osstream_core::all_data(&self.info, offset, len)
    }
}
