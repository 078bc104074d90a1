use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[backends.NAME]` with `kind = "plugin"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Absolute path of the plugin library. It and every folder above it must not be
    /// writable by a non-root user (other than the one osstream runs as).
    pub path: PathBuf,
    /// The plugin's own configuration, handed to it as JSON. Default: `{}`.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
