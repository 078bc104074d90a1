//! The `plugin` image backend: vendors' backends loaded from shared libraries.
//!
//! ```toml
//! [backends.vendor]
//! kind = "plugin"
//! path = "/usr/lib/osstream/plugins/libvendor.so"   # absolute; not writable by non-root
//! config = { endpoint = "http://storage:8080", chunk_cache = 64 }   # handed to the plugin as JSON
//! ```
//!
//! The library exports `osstream_plugin_init` (see `osstream-plugin-abi`). The host
//! refuses relative paths and files or folders that a non-root user could replace,
//! refuses a null table, another ABI major version or a missing required callback with a
//! message naming the plugin and its path, copies `min(struct_size)` bytes of the table
//! (newer fields are absent), never unloads the library, and runs every callback on the
//! blocking thread pool (one at a time when the plugin's thread model asks for it).

mod backend;
mod config;
mod error;
mod loader;

use std::sync::Arc;

use osstream_core::{BackendContext, DynBackend, Registry, Result};

pub use backend::PluginBackend;
pub use config::PluginConfig;
pub use loader::{LoadedPlugin, load};

/// The registry kind.
pub const KIND: &str = "plugin";

/// Adds the `plugin` kind to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_backend::<PluginConfig>();
}

impl osstream_core::BackendKind for PluginConfig {
    const KIND: &'static str = KIND;

    fn build(self, _ctx: &BackendContext, name: &str) -> Result<DynBackend> {
        Ok(Arc::new(PluginBackend::new(name, &self)?) as DynBackend)
    }
}
