use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[backends.NAME]` with `kind = "block"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Image name -> absolute device path. Only these devices are served.
    pub devices: BTreeMap<String, PathBuf>,
    /// Open with `O_DIRECT` (bypass the host page cache; aligned I/O). Default: false.
    #[serde(default)]
    pub direct: bool,
    /// Open read-write (private vdisks). Default: false.
    #[serde(default)]
    pub writable: bool,
    /// Part of every image's generation: bump it after rewriting a device behind
    /// osstream's back so caches drop its old blocks. Default: `"1"`.
    #[serde(default = "default_generation")]
    pub generation: String,
}

fn default_generation() -> String {
    "1".to_owned()
}
