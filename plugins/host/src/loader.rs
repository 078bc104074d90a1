//! Finding, checking and loading a plugin library; calling into it.

use std::ffi::{CStr, c_int};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use osstream_core::{Error, ErrorKind, Result};
use osstream_plugin_abi as abi;

use crate::error::from_plugin;

/// A plugin library that passed every check, with its table copied out.
pub struct LoadedPlugin {
    path: PathBuf,
    name: String,
    version: String,
    abi_minor: u32,
    table: abi::PluginTable,
    /// Held during every callback when the plugin asks to be serialised.
    serial: Option<Mutex<()>>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("abi_minor", &self.abi_minor)
            .field("serialized", &self.serial.is_some())
            .finish()
    }
}

impl LoadedPlugin {
    /// The plugin's own name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The library path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ABI minor version the plugin was built against.
    pub fn abi_minor(&self) -> u32 {
        self.abi_minor
    }

    pub(crate) fn table(&self) -> &abi::PluginTable {
        &self.table
    }

    /// Runs `call` (which invokes one callback) on the blocking pool, serialised if the
    /// plugin asked, and maps a `-1` to an error naming the plugin and `op`.
    pub(crate) async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        op: &'static str,
        call: impl FnOnce(&abi::PluginTable, *mut abi::PluginError) -> (c_int, T) + Send + 'static,
    ) -> Result<T> {
        let plugin = self.clone();
        tokio::task::spawn_blocking(move || plugin.call_now(op, call))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("plugin call task failed: {e}"),
                )
            })?
    }

    /// Runs `call` on this thread (for `close`, `unload` and start-up).
    pub(crate) fn call_now<T>(
        &self,
        op: &'static str,
        call: impl FnOnce(&abi::PluginTable, *mut abi::PluginError) -> (c_int, T),
    ) -> Result<T> {
        let _serial = self
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        let mut error = abi::PluginError::empty();
        let (rc, value) = call(&self.table, &mut error);
        if rc == 0 {
            Ok(value)
        } else {
            Err(from_plugin(&error, &self.name, op))
        }
    }
}

fn refuse(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("plugin {}: {message}", path.display()),
    )
    .with_op("load_plugin")
}

/// Refuses a path that a user other than root (or the one osstream runs as) could
/// replace: the file and every folder above it must not be writable by them. Sticky
/// folders such as `/tmp` are allowed: others cannot rename what they do not own there.
fn check_path(path: &Path) -> Result<PathBuf> {
    if !path.is_absolute() {
        return Err(refuse(
            path,
            "the path must be absolute (plugins load only from admin-configured absolute paths)",
        ));
    }
    let canonical =
        std::fs::canonicalize(path).map_err(|e| refuse(path, format!("cannot open: {e}")))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for (i, current) in canonical.ancestors().enumerate() {
        let meta = std::fs::metadata(current)
            .map_err(|e| refuse(path, format!("cannot stat {}: {e}", current.display())))?;
        if i == 0 && !meta.is_file() {
            return Err(refuse(path, "not a regular file"));
        }
        let mode = meta.mode();
        let sticky = meta.is_dir() && mode & 0o1000 != 0;
        let trusted_owner = meta.uid() == 0 || meta.uid() == me;
        let bad = if sticky {
            false
        } else {
            mode & 0o002 != 0
                || (mode & 0o020 != 0 && meta.gid() != 0)
                || (!trusted_owner && mode & 0o200 != 0)
        };
        if bad {
            return Err(refuse(
                path,
                format!(
                    "{} (mode {:o}, owner uid {}) is writable by a non-root user; refusing to load",
                    current.display(),
                    mode & 0o7777,
                    meta.uid()
                ),
            ));
        }
    }
    Ok(canonical)
}

/// Writes a plugin's log line to osstream's log.
unsafe extern "C" fn host_log(level: u32, message: *const u8, len: usize) {
    if message.is_null() {
        return;
    }
    // SAFETY: the plugin passes `len` readable bytes at `message` for this call.
    let bytes = unsafe { std::slice::from_raw_parts(message, len) };
    let text = String::from_utf8_lossy(bytes);
    match level {
        abi::LOG_ERROR => tracing::error!(target: "plugin", "{text}"),
        abi::LOG_WARN => tracing::warn!(target: "plugin", "{text}"),
        abi::LOG_INFO => tracing::info!(target: "plugin", "{text}"),
        _ => tracing::debug!(target: "plugin", "{text}"),
    }
}

static HOST_INFO: abi::HostInfo = abi::HostInfo {
    struct_size: std::mem::size_of::<abi::HostInfo>() as u32,
    abi_major: abi::ABI_MAJOR,
    abi_minor: abi::ABI_MINOR,
    log: Some(host_log),
};

/// Loads and checks the plugin at `path`. The library stays loaded for the life of the
/// process, whatever happens to the backends that use it.
pub fn load(path: &Path) -> Result<Arc<LoadedPlugin>> {
    let canonical = check_path(path)?;
    // SAFETY: loading a library runs its initialisers. That is the point of a plugin, and
    // the path passed the ownership checks above: only root or osstream's own user can
    // have put this code there, as with any other program they install.
    let library = unsafe { libloading::Library::new(&canonical) }
        .map_err(|e| refuse(path, format!("cannot load: {e}")))?;
    // Never unloaded: plugin statics, threads and function pointers stay valid.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol's type is the ABI's documented init signature.
    let init: libloading::Symbol<'static, abi::InitFn> =
        unsafe { library.get(abi::INIT_SYMBOL) }
            .map_err(|e| refuse(path, format!("does not export osstream_plugin_init: {e}")))?;
    // SAFETY: calling the plugin's init with the host's static info, as the ABI defines.
    let raw = unsafe { init(&HOST_INFO) };
    if raw.is_null() {
        return Err(refuse(
            path,
            "osstream_plugin_init returned no table (NULL)",
        ));
    }
    // SAFETY: a non-null table starts with the three u32 version fields.
    let header = unsafe { std::ptr::read_unaligned(raw.cast::<[u32; 3]>()) };
    let [struct_size, abi_major, abi_minor] = header;
    if abi_major != abi::ABI_MAJOR {
        return Err(refuse(
            path,
            format!(
                "built for plugin ABI {abi_major}.{abi_minor}, this osstream speaks {}.x; rebuild the plugin against osstream-plugin-abi {}.x",
                abi::ABI_MAJOR,
                abi::ABI_MAJOR
            ),
        ));
    }
    let struct_size = struct_size as usize;
    if struct_size < abi::TABLE_HEADER_SIZE {
        return Err(refuse(
            path,
            format!("table of {struct_size} bytes is too small to be a plugin table"),
        ));
    }
    let mut table = std::mem::MaybeUninit::<abi::PluginTable>::zeroed();
    let copy = struct_size.min(std::mem::size_of::<abi::PluginTable>());
    // SAFETY: the plugin promises `struct_size` readable bytes at `raw`; we copy at most
    // that and at most our table's size into a zeroed table, in which every field is an
    // integer, a pointer or an `Option` of a function pointer, for all of which zero is a
    // valid value (0 / null / None: the field is absent).
    let table = unsafe {
        std::ptr::copy_nonoverlapping(raw.cast::<u8>(), table.as_mut_ptr().cast::<u8>(), copy);
        table.assume_init()
    };
    let text = |ptr: *const std::ffi::c_char, what: &str| -> Result<String> {
        if ptr.is_null() {
            return Err(refuse(path, format!("the table has no {what}")));
        }
        // SAFETY: non-null name/version pointers are NUL-terminated static strings per the ABI.
        Ok(unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned())
    };
    let name = text(table.name, "name")?;
    let version = text(table.version, "version")?;
    let missing: Vec<&str> = [
        ("load", table.load.is_none()),
        ("open", table.open.is_none()),
        ("close", table.close.is_none()),
        ("get_size", table.get_size.is_none()),
        ("pread", table.pread.is_none()),
    ]
    .into_iter()
    .filter_map(|(field, absent)| absent.then_some(field))
    .collect();
    if !missing.is_empty() {
        return Err(refuse(
            path,
            format!(
                "plugin '{name}' lacks required callbacks: {}",
                missing.join(", ")
            ),
        ));
    }
    if table.thread_model > abi::THREAD_MODEL_SERIALIZE {
        return Err(refuse(
            path,
            format!(
                "plugin '{name}' asks for unknown thread model {}",
                table.thread_model
            ),
        ));
    }
    tracing::info!(plugin = %name, %version, abi = format_args!("{abi_major}.{abi_minor}"), path = %canonical.display(), "plugin loaded");
    Ok(Arc::new(LoadedPlugin {
        serial: (table.thread_model == abi::THREAD_MODEL_SERIALIZE).then(|| Mutex::new(())),
        path: canonical,
        name,
        version,
        abi_minor,
        table,
    }))
}
