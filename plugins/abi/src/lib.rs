//! The C ABI between osstream (the host) and a backend plugin (a shared library).
//!
//! `#[repr(C)]` types and constants only, no dependencies. `include/osstream_plugin.h`
//! mirrors this file for plugins written in C; a test builds a C plugin against the header
//! and loads it, so the two stay in step.
//!
//! # How a plugin is loaded
//! The host opens the library and calls its exported [`INIT_SYMBOL`],
//! `osstream_plugin_init(const struct osstream_host *host)`, which returns a pointer to a
//! static [`PluginTable`]. The table starts with `struct_size`, `abi_major`, `abi_minor`.
//!
//! # Versioning promise
//! - Fields are only ever appended to [`PluginTable`] and [`HostInfo`]; none is removed,
//!   reordered or retyped within a major version. Appending bumps [`ABI_MINOR`].
//! - The host copies `min(struct_size, its own size)` bytes of the table and treats every
//!   field past the plugin's `struct_size` as absent (null). A plugin built against an
//!   older minor therefore loads unchanged; a newer plugin on an older host loses only the
//!   fields that host does not know.
//! - A different [`ABI_MAJOR`] is refused with a message naming the plugin and its path.
//! - The host never unloads a plugin library, so static data and threads a plugin starts
//!   stay valid for the life of the process.
//!
//! # Calling convention
//! Every callback that can fail returns `0` on success or `-1` on failure, after filling
//! the [`PluginError`] it was given. Callbacks run on the host's blocking thread pool;
//! with [`THREAD_MODEL_SERIALIZE`] the host never runs two callbacks of the plugin at once.

#![no_std]

use core::ffi::{c_char, c_int, c_void};

/// The major version: incompatible changes only.
pub const ABI_MAJOR: u32 = 1;
/// The minor version: fields appended to [`PluginTable`] or [`HostInfo`].
pub const ABI_MINOR: u32 = 0;

/// The symbol every plugin exports (NUL-terminated for `dlsym`).
pub const INIT_SYMBOL: &[u8] = b"osstream_plugin_init\0";

/// Callbacks may run concurrently on many threads.
pub const THREAD_MODEL_PARALLEL: u32 = 0;
/// The host runs at most one callback of this plugin at a time.
pub const THREAD_MODEL_SERIALIZE: u32 = 1;

/// Error kinds, as in osstream's `ErrorKind`.
pub const ERROR_NOT_FOUND: u32 = 1;
/// The request reaches past the end of the image.
pub const ERROR_OUT_OF_RANGE: u32 = 2;
/// The operation is not implemented.
pub const ERROR_UNSUPPORTED: u32 = 3;
/// A write-class call on a read-only image.
pub const ERROR_READ_ONLY: u32 = 4;
/// Malformed input (configuration, image name).
pub const ERROR_INVALID_INPUT: u32 = 5;
/// Access refused by the storage.
pub const ERROR_PERMISSION_DENIED: u32 = 6;
/// Storage is full.
pub const ERROR_NO_SPACE: u32 = 7;
/// An I/O error from the storage.
pub const ERROR_IO: u32 = 8;
/// Anything else (the SDK reports panics as this).
pub const ERROR_UNEXPECTED: u32 = 9;

/// `pwrite` flag: the data must be durable when the call returns.
pub const WRITE_FUA: u32 = 1;

/// Log levels for [`HostInfo::log`].
pub const LOG_ERROR: u32 = 1;
/// Warnings.
pub const LOG_WARN: u32 = 2;
/// Information.
pub const LOG_INFO: u32 = 3;
/// Debugging detail.
pub const LOG_DEBUG: u32 = 4;

/// Bytes of message a [`PluginError`] carries.
pub const ERROR_MESSAGE_MAX: usize = 1024;

/// A failure reported by a callback. The host owns it and zeroes it before each call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginError {
    /// One of the `ERROR_*` kinds.
    pub kind: u32,
    /// Non-zero if retrying the same call may succeed.
    pub temporary: u32,
    /// Bytes of `message` in use (UTF-8, not NUL-terminated).
    pub message_len: u32,
    /// A message for the administrator.
    pub message: [u8; ERROR_MESSAGE_MAX],
}

impl PluginError {
    /// An empty error, as the host passes it.
    pub const fn empty() -> Self {
        PluginError {
            kind: 0,
            temporary: 0,
            message_len: 0,
            message: [0; ERROR_MESSAGE_MAX],
        }
    }
}

/// What the host tells the plugin at init.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostInfo {
    /// `size_of::<HostInfo>()` of the host.
    pub struct_size: u32,
    /// The host's [`ABI_MAJOR`].
    pub abi_major: u32,
    /// The host's [`ABI_MINOR`].
    pub abi_minor: u32,
    /// Writes one line to the host's log at a `LOG_*` level. Never null.
    pub log: Option<unsafe extern "C" fn(level: u32, message: *const u8, len: usize)>,
}

/// Receives one image from [`PluginTable::list`]: its NUL-terminated name, size, and a
/// NUL-terminated generation string (anything that changes when the content may have).
pub type ListEmit = unsafe extern "C" fn(
    ctx: *mut c_void,
    name: *const c_char,
    size: u64,
    generation: *const c_char,
);

/// The table a plugin returns from `osstream_plugin_init`. Fields marked *required* must
/// be non-null; the others may be null (absent).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginTable {
    /// `size_of` the table the plugin was built with.
    pub struct_size: u32,
    /// The plugin's [`ABI_MAJOR`].
    pub abi_major: u32,
    /// The plugin's [`ABI_MINOR`].
    pub abi_minor: u32,
    /// [`THREAD_MODEL_PARALLEL`] or [`THREAD_MODEL_SERIALIZE`].
    pub thread_model: u32,
    /// The plugin's name, NUL-terminated, static. Required.
    pub name: *const c_char,
    /// The plugin's version, NUL-terminated, static. Required.
    pub version: *const c_char,

    /// Required. Creates one backend instance from its configuration (JSON bytes).
    pub load: Option<
        unsafe extern "C" fn(
            config_json: *const u8,
            config_len: usize,
            instance: *mut *mut c_void,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Optional. Frees an instance (osstream calls it when a backend is dropped).
    pub unload: Option<unsafe extern "C" fn(instance: *mut c_void)>,
    /// Optional. Calls `emit` once per image; absent means images are opened by name only.
    pub list: Option<
        unsafe extern "C" fn(
            instance: *mut c_void,
            emit: ListEmit,
            ctx: *mut c_void,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Required. Opens image `name` (NUL-terminated); `writable` is 0 or 1.
    pub open: Option<
        unsafe extern "C" fn(
            instance: *mut c_void,
            name: *const c_char,
            writable: c_int,
            handle: *mut *mut c_void,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Required. Closes a handle from `open`.
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
    /// Required. The image size in bytes.
    pub get_size: Option<
        unsafe extern "C" fn(handle: *mut c_void, size: *mut u64, error: *mut PluginError) -> c_int,
    >,
    /// Optional. Minimum, preferred and maximum request sizes.
    pub block_size: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            minimum: *mut u32,
            preferred: *mut u32,
            maximum: *mut u32,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Optional. 1 if the handle accepts writes; absent means read-only.
    pub can_write: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Required. Reads exactly `count` bytes at `offset` into `buf`.
    pub pread: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *mut u8,
            count: u32,
            offset: u64,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Optional. Writes `count` bytes at `offset`; `flags` may hold [`WRITE_FUA`].
    pub pwrite: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *const u8,
            count: u32,
            offset: u64,
            flags: u32,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Optional. Makes earlier writes durable.
    pub flush: Option<unsafe extern "C" fn(handle: *mut c_void, error: *mut PluginError) -> c_int>,
    /// Optional. Discards `count` bytes at `offset` (advisory).
    pub trim: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            count: u32,
            offset: u64,
            error: *mut PluginError,
        ) -> c_int,
    >,
    /// Optional. Writes a NUL-terminated generation string of at most `len` bytes
    /// (including the NUL) for an open handle; absent means the generation is the size.
    pub generation: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            buf: *mut c_char,
            len: usize,
            error: *mut PluginError,
        ) -> c_int,
    >,
}

// SAFETY: by the ABI's contract a table is immutable once returned, `name` and `version`
// point to strings that live as long as the (never unloaded) library, and every callback
// may be called from any thread (serialisation is the host's job when asked for).
unsafe impl Send for PluginTable {}
// SAFETY: as above.
unsafe impl Sync for PluginTable {}

/// The signature of `osstream_plugin_init`.
pub type InitFn = unsafe extern "C" fn(host: *const HostInfo) -> *const PluginTable;

/// Bytes of the table up to and including `thread_model`, `name` and `version`: a
/// `struct_size` below this is not a table.
pub const TABLE_HEADER_SIZE: usize = core::mem::offset_of!(PluginTable, load);
