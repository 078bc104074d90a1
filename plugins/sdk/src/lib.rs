//! Write an osstream backend plugin in safe Rust.
//!
//! Implement [`Plugin`] (one backend instance, built from its JSON configuration) and
//! [`Image`] (one open image), then export them with [`export_plugin!`]. Build the crate as
//! a `cdylib`; osstream loads it with `[backends.NAME] kind = "plugin", path = "..."`.
//!
//! Every callback runs inside `catch_unwind`: a panic becomes an error for that one
//! request (kind `Unexpected`, with the panic message), never a crash of the server.
//!
//! ```
//! use osstream_plugin_sdk::{Image, ImageInfo, Plugin, PluginError, export_plugin};
//!
//! /// Serves one image of zeroes whose size comes from the configuration.
//! struct Zeroes { size: u64 }
//! struct ZeroImage { size: u64 }
//!
//! impl Plugin for Zeroes {
//!     const NAME: &'static str = "zeroes";
//!     const VERSION: &'static str = "1.0.0";
//!     type Image = ZeroImage;
//!
//!     fn load(config: serde_json::Value) -> Result<Self, PluginError> {
//!         let size = config["size"].as_u64().ok_or_else(|| PluginError::invalid("`size` (bytes) is required"))?;
//!         Ok(Zeroes { size })
//!     }
//!     fn list(&self) -> Result<Vec<ImageInfo>, PluginError> {
//!         Ok(vec![ImageInfo { name: "zero".into(), size: self.size, generation: "1".into() }])
//!     }
//!     fn open(&self, name: &str, _writable: bool) -> Result<ZeroImage, PluginError> {
//!         if name != "zero" { return Err(PluginError::not_found(format!("no image {name}"))); }
//!         Ok(ZeroImage { size: self.size })
//!     }
//! }
//!
//! impl Image for ZeroImage {
//!     fn size(&self) -> Result<u64, PluginError> { Ok(self.size) }
//!     fn pread(&self, buf: &mut [u8], _offset: u64) -> Result<(), PluginError> {
//!         buf.fill(0);
//!         Ok(())
//!     }
//! }
//!
//! export_plugin!(Zeroes);
//! ```

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use osstream_plugin_abi as abi;
use osstream_plugin_abi::{HostInfo, ListEmit, PluginError as RawError, PluginTable};
pub use serde_json;

/// Whether the host may run this plugin's callbacks concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadModel {
    /// Callbacks may run at once on many threads (the plugin is `Sync` for real).
    Parallel,
    /// The host runs one callback at a time.
    Serialize,
}

/// A failure to report to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// One of the `abi::ERROR_*` kinds.
    pub kind: u32,
    /// Retrying the same call may succeed.
    pub temporary: bool,
    /// A message for the administrator.
    pub message: String,
}

impl PluginError {
    /// An error of `kind` (`abi::ERROR_*`).
    pub fn new(kind: u32, message: impl Into<String>) -> Self {
        PluginError {
            kind,
            temporary: false,
            message: message.into(),
        }
    }
    /// The image does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(abi::ERROR_NOT_FOUND, message)
    }
    /// Bad configuration or name.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(abi::ERROR_INVALID_INPUT, message)
    }
    /// The operation is not implemented.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(abi::ERROR_UNSUPPORTED, message)
    }
    /// An I/O failure; `temporary` marks it retryable.
    pub fn io(message: impl Into<String>, temporary: bool) -> Self {
        PluginError {
            temporary,
            ..Self::new(abi::ERROR_IO, message)
        }
    }
}

impl From<std::io::Error> for PluginError {
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => abi::ERROR_NOT_FOUND,
            K::PermissionDenied => abi::ERROR_PERMISSION_DENIED,
            K::InvalidInput | K::InvalidData => abi::ERROR_INVALID_INPUT,
            K::StorageFull => abi::ERROR_NO_SPACE,
            K::UnexpectedEof => abi::ERROR_OUT_OF_RANGE,
            _ => abi::ERROR_IO,
        };
        let temporary = matches!(err.kind(), K::Interrupted | K::TimedOut | K::WouldBlock);
        PluginError {
            kind,
            temporary,
            message: err.to_string(),
        }
    }
}

/// One image, as [`Plugin::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image name (`[A-Za-z0-9._-]`, not starting with `.`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Changes whenever the content may have changed; keys osstream's caches.
    pub generation: String,
}

/// One backend instance: `[backends.NAME]` with `kind = "plugin"`.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// The plugin's name, for logs and errors.
    const NAME: &'static str;
    /// The plugin's version.
    const VERSION: &'static str;
    /// Whether callbacks may run concurrently. Default: parallel.
    const THREAD_MODEL: ThreadModel = ThreadModel::Parallel;
    /// An open image.
    type Image: Image;

    /// Builds the instance from the `config` table of its backend, as JSON.
    fn load(config: serde_json::Value) -> Result<Self, PluginError>;
    /// Every image, sorted by name.
    fn list(&self) -> Result<Vec<ImageInfo>, PluginError>;
    /// Opens one image; `writable` only when the host needs writes.
    fn open(&self, name: &str, writable: bool) -> Result<Self::Image, PluginError>;
}

/// One open image.
pub trait Image: Send + Sync + 'static {
    /// Size in bytes; fixed while open.
    fn size(&self) -> Result<u64, PluginError>;
    /// Fills `buf` with the bytes at `offset` (the host keeps requests inside the image).
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), PluginError>;
    /// Changes whenever the content may have changed. Default: empty (the size alone).
    fn generation(&self) -> Result<String, PluginError> {
        Ok(String::new())
    }
    /// Minimum, preferred and maximum request sizes. Default: none.
    fn block_size(&self) -> Option<(u32, u32, u32)> {
        None
    }
    /// Whether `pwrite` is accepted. Default: false (read-only).
    fn can_write(&self) -> bool {
        false
    }
    /// Writes `buf` at `offset`; durable on return if `fua`.
    fn pwrite(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<(), PluginError> {
        Err(PluginError::new(
            abi::ERROR_READ_ONLY,
            "this image is read-only",
        ))
    }
    /// Makes earlier writes durable. Default: nothing to do.
    fn flush(&self) -> Result<(), PluginError> {
        Ok(())
    }
    /// Discards a range (advisory). Default: keeps the data.
    fn trim(&self, _count: u32, _offset: u64) -> Result<(), PluginError> {
        Ok(())
    }
}

/// The host's log function, set at init; zero until then.
static HOST_LOG: AtomicUsize = AtomicUsize::new(0);

/// Writes one line to osstream's log at an `abi::LOG_*` level.
pub fn log(level: u32, message: &str) {
    let raw = HOST_LOG.load(Ordering::Acquire);
    if raw != 0 {
        // SAFETY: HOST_LOG only ever holds a non-null `log` function pointer the host
        // passed to init (stored by `__init`), and the host outlives the plugin.
        let log: unsafe extern "C" fn(u32, *const u8, usize) = unsafe { std::mem::transmute(raw) };
        // SAFETY: the pointer and length describe `message`, valid for the call.
        unsafe { log(level, message.as_ptr(), message.len()) };
    }
}

fn fill_error(out: *mut RawError, err: &PluginError) {
    if out.is_null() {
        return;
    }
    // SAFETY: the host passes a valid, exclusive pointer to a PluginError for the call.
    let out = unsafe { &mut *out };
    out.kind = if err.kind == 0 {
        abi::ERROR_UNEXPECTED
    } else {
        err.kind
    };
    out.temporary = u32::from(err.temporary);
    let mut len = err.message.len().min(abi::ERROR_MESSAGE_MAX);
    while !err.message.is_char_boundary(len) {
        len -= 1;
    }
    out.message[..len].copy_from_slice(&err.message.as_bytes()[..len]);
    out.message_len = len as u32;
}

/// Runs `body`, turning an error or a panic into `-1` and a filled error.
fn guard(error: *mut RawError, body: impl FnOnce() -> Result<(), PluginError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(err)) => {
            fill_error(error, &err);
            -1
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            fill_error(
                error,
                &PluginError::new(abi::ERROR_UNEXPECTED, format!("plugin panicked: {what}")),
            );
            -1
        }
    }
}

/// The trampolines [`export_plugin!`] puts in the table. Not for direct use.
#[doc(hidden)]
pub mod trampolines {
    use super::*;

    /// # Safety
    /// Called by the host with a valid config buffer and out-pointers.
    pub unsafe extern "C" fn load<P: Plugin>(
        config: *const u8,
        len: usize,
        instance: *mut *mut c_void,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            let bytes: &[u8] = if len == 0 {
                b"{}"
            } else {
                // SAFETY: the host passes `len` readable bytes at `config`.
                unsafe { std::slice::from_raw_parts(config, len) }
            };
            let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
                PluginError::invalid(format!("configuration is not valid JSON: {e}"))
            })?;
            let plugin = P::load(value)?;
            // SAFETY: `instance` is a valid out-pointer from the host.
            unsafe { *instance = Box::into_raw(Box::new(plugin)).cast() };
            Ok(())
        })
    }

    /// # Safety
    /// `instance` came from `load` and is not used again.
    pub unsafe extern "C" fn unload<P: Plugin>(instance: *mut c_void) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `instance` is the Box<P> made by `load`, released exactly once.
            drop(unsafe { Box::from_raw(instance.cast::<P>()) });
        }));
    }

    /// # Safety
    /// `instance` came from `load`; `emit` and `ctx` are the host's.
    pub unsafe extern "C" fn list<P: Plugin>(
        instance: *mut c_void,
        emit: ListEmit,
        ctx: *mut c_void,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            // SAFETY: `instance` is a live Box<P> from `load`.
            let plugin = unsafe { &*instance.cast::<P>() };
            for image in plugin.list()? {
                let name = CString::new(image.name)
                    .map_err(|_| PluginError::invalid("image name contains NUL"))?;
                let generation = CString::new(image.generation)
                    .map_err(|_| PluginError::invalid("generation contains NUL"))?;
                // SAFETY: the host's callback with its own context and NUL-terminated strings.
                unsafe { emit(ctx, name.as_ptr(), image.size, generation.as_ptr()) };
            }
            Ok(())
        })
    }

    /// # Safety
    /// `instance` came from `load`; `name` is NUL-terminated; `handle` is an out-pointer.
    pub unsafe extern "C" fn open<P: Plugin>(
        instance: *mut c_void,
        name: *const c_char,
        writable: c_int,
        handle: *mut *mut c_void,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            // SAFETY: `instance` is a live Box<P>; `name` is a valid C string from the host.
            let (plugin, name) = unsafe { (&*instance.cast::<P>(), CStr::from_ptr(name)) };
            let name = name
                .to_str()
                .map_err(|_| PluginError::invalid("image name is not UTF-8"))?;
            let image = plugin.open(name, writable != 0)?;
            // SAFETY: `handle` is a valid out-pointer from the host.
            unsafe { *handle = Box::into_raw(Box::new(image)).cast() };
            Ok(())
        })
    }

    /// # Safety
    /// `handle` came from `open` and is not used again.
    pub unsafe extern "C" fn close<P: Plugin>(handle: *mut c_void) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `handle` is the Box<P::Image> made by `open`, released exactly once.
            drop(unsafe { Box::from_raw(handle.cast::<P::Image>()) });
        }));
    }

    /// Borrows the image behind a handle.
    ///
    /// # Safety
    /// `handle` came from `open` and is still open.
    unsafe fn image<'a, P: Plugin>(handle: *mut c_void) -> &'a P::Image {
        // SAFETY: per this function's contract.
        unsafe { &*handle.cast::<P::Image>() }
    }

    /// # Safety
    /// Host-provided handle and out-pointers.
    pub unsafe extern "C" fn get_size<P: Plugin>(
        handle: *mut c_void,
        size: *mut u64,
        error: *mut RawError,
    ) -> c_int {
        // SAFETY: host-provided handle and out-pointer.
        guard(error, || unsafe {
            *size = image::<P>(handle).size()?;
            Ok(())
        })
    }

    /// # Safety
    /// Host-provided handle and out-pointers.
    pub unsafe extern "C" fn block_size<P: Plugin>(
        handle: *mut c_void,
        minimum: *mut u32,
        preferred: *mut u32,
        maximum: *mut u32,
        error: *mut RawError,
    ) -> c_int {
        // SAFETY: host-provided handle and out-pointers.
        guard(error, || unsafe {
            let (min, pref, max) = image::<P>(handle)
                .block_size()
                .ok_or_else(|| PluginError::unsupported("no block size constraints"))?;
            (*minimum, *preferred, *maximum) = (min, pref, max);
            Ok(())
        })
    }

    /// # Safety
    /// Host-provided handle.
    pub unsafe extern "C" fn can_write<P: Plugin>(handle: *mut c_void) -> c_int {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: a live handle from `open`, per this function's contract.
            c_int::from(unsafe { image::<P>(handle) }.can_write())
        }))
        .unwrap_or(0)
    }

    /// # Safety
    /// `buf` holds `count` writable bytes.
    pub unsafe extern "C" fn pread<P: Plugin>(
        handle: *mut c_void,
        buf: *mut u8,
        count: u32,
        offset: u64,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            // SAFETY: the host passes `count` writable bytes at `buf` and a live handle.
            let (image, buf) = unsafe {
                (
                    image::<P>(handle),
                    std::slice::from_raw_parts_mut(buf, count as usize),
                )
            };
            image.pread(buf, offset)
        })
    }

    /// # Safety
    /// `buf` holds `count` readable bytes.
    pub unsafe extern "C" fn pwrite<P: Plugin>(
        handle: *mut c_void,
        buf: *const u8,
        count: u32,
        offset: u64,
        flags: u32,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            // SAFETY: the host passes `count` readable bytes at `buf` and a live handle.
            let (image, buf) = unsafe {
                (
                    image::<P>(handle),
                    std::slice::from_raw_parts(buf, count as usize),
                )
            };
            image.pwrite(buf, offset, flags & abi::WRITE_FUA != 0)
        })
    }

    /// # Safety
    /// Host-provided handle.
    pub unsafe extern "C" fn flush<P: Plugin>(handle: *mut c_void, error: *mut RawError) -> c_int {
        // SAFETY: host-provided handle.
        guard(error, || unsafe { image::<P>(handle) }.flush())
    }

    /// # Safety
    /// Host-provided handle.
    pub unsafe extern "C" fn trim<P: Plugin>(
        handle: *mut c_void,
        count: u32,
        offset: u64,
        error: *mut RawError,
    ) -> c_int {
        // SAFETY: host-provided handle.
        guard(error, || unsafe { image::<P>(handle) }.trim(count, offset))
    }

    /// # Safety
    /// `buf` holds `len` writable bytes.
    pub unsafe extern "C" fn generation<P: Plugin>(
        handle: *mut c_void,
        buf: *mut c_char,
        len: usize,
        error: *mut RawError,
    ) -> c_int {
        guard(error, || {
            // SAFETY: host-provided handle.
            let generation = unsafe { image::<P>(handle) }.generation()?;
            let bytes = generation.as_bytes();
            if bytes.len() + 1 > len || bytes.contains(&0) {
                return Err(PluginError::invalid(
                    "generation string too long or contains NUL",
                ));
            }
            // SAFETY: `buf` has `len` writable bytes and `bytes.len() + 1 <= len`.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
                *buf.add(bytes.len()) = 0;
            }
            Ok(())
        })
    }

    /// Records the host's log function.
    ///
    /// # Safety
    /// `host` is null or points to the host's `HostInfo`.
    pub unsafe fn init(host: *const HostInfo) {
        // SAFETY: per this function's contract.
        if let Some(log) = unsafe { host.as_ref() }.and_then(|host| host.log) {
            HOST_LOG.store(log as usize, Ordering::Release);
        }
    }

    /// The table for `P`. Its name and version strings are allocated once and never
    /// freed: the host never unloads a plugin.
    pub fn table<P: Plugin>() -> PluginTable {
        let leak = |text: &str| -> *const c_char {
            CString::new(text.replace('\0', ""))
                .unwrap_or_default()
                .into_raw()
        };
        let (name, version) = (leak(P::NAME), leak(P::VERSION));
        PluginTable {
            struct_size: std::mem::size_of::<PluginTable>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            thread_model: match P::THREAD_MODEL {
                ThreadModel::Parallel => abi::THREAD_MODEL_PARALLEL,
                ThreadModel::Serialize => abi::THREAD_MODEL_SERIALIZE,
            },
            name,
            version,
            load: Some(load::<P>),
            unload: Some(unload::<P>),
            list: Some(list::<P>),
            open: Some(open::<P>),
            close: Some(close::<P>),
            get_size: Some(get_size::<P>),
            block_size: Some(block_size::<P>),
            can_write: Some(can_write::<P>),
            pread: Some(pread::<P>),
            pwrite: Some(pwrite::<P>),
            flush: Some(flush::<P>),
            trim: Some(trim::<P>),
            generation: Some(generation::<P>),
        }
    }

    /// A table that lives in a `static` (the ABI type is `Send + Sync` by contract).
    #[derive(Debug)]
    pub struct StaticTable(pub PluginTable);
}

/// Exports a [`Plugin`] implementation as `osstream_plugin_init`.
///
/// Use it once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The entry point osstream looks up.
        ///
        /// # Safety
        /// Called by the host with a pointer to its `HostInfo` (or null).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn osstream_plugin_init(
            host: *const $crate::abi::HostInfo,
        ) -> *const $crate::abi::PluginTable {
            static TABLE: ::std::sync::OnceLock<$crate::trampolines::StaticTable> =
                ::std::sync::OnceLock::new();
            // SAFETY: forwarded from the host, per this function's contract.
            unsafe { $crate::trampolines::init(host) };
            &TABLE
                .get_or_init(|| {
                    $crate::trampolines::StaticTable($crate::trampolines::table::<$plugin>())
                })
                .0
        }
    };
}
