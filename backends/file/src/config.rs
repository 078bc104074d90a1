use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[backends.NAME]` with `kind = "file"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The directory holding the images; relative paths are resolved against `data_dir`.
    pub root: PathBuf,
    /// Open images read-write (private vdisks, maintenance). Default: false.
    #[serde(default)]
    pub writable: bool,
    /// The file extension that marks an image. Default: `img`.
    #[serde(default = "default_extension")]
    pub extension: String,
}

fn default_extension() -> String {
    "img".to_owned()
}
