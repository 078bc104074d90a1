//! `<data_dir>/stats.json`: the running server's layer counters (cache tiers, boot
//! profiles), rewritten every few seconds and when it stops, for `osstream cache stats`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use osstream_core::{CancellationToken, Error, ErrorKind, Layer, LayerReport, Result};
use serde::{Deserialize, Serialize};

/// How often a running server rewrites the file.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What the file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// The server's id in the catalog.
    pub server: String,
    /// Its process id.
    pub pid: u32,
    /// `false` once it wrote its last counters on the way out.
    pub running: bool,
    /// When these counters were read (Unix milliseconds).
    pub updated_at: i64,
    /// Each layer's counters since the server started, nearest the backend first.
    pub layers: Vec<LayerReport>,
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("stats.json")
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Writes the counters of `layers` (atomically: a reader sees the old file or the new).
pub fn write(
    data_dir: &Path,
    server: &str,
    layers: &[Arc<dyn Layer>],
    running: bool,
) -> Result<()> {
    let stats = Stats {
        server: server.to_owned(),
        pid: std::process::id(),
        running,
        updated_at: now_ms(),
        layers: layers.iter().filter_map(|l| l.report()).collect(),
    };
    let text = serde_json::to_vec_pretty(&stats).expect("stats serialise");
    let target = path(data_dir);
    let temporary = data_dir.join(".stats.json.tmp");
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, &target))
        .map_err(|e| Error::from_io(e, format!("cannot write {}", target.display())))
}

/// Rewrites the file every [`INTERVAL`] until `stop`.
pub async fn keep_writing(
    data_dir: PathBuf,
    server: String,
    layers: Vec<Arc<dyn Layer>>,
    stop: CancellationToken,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        let (dir, id, list) = (data_dir.clone(), server.clone(), layers.clone());
        let written = tokio::task::spawn_blocking(move || write(&dir, &id, &list, true)).await;
        match written {
            Ok(Err(err)) if !warned => {
                warned = true;
                tracing::warn!(%err, "cannot write the cache statistics file; `osstream cache stats` will be stale");
            }
            _ => {}
        }
    }
}

/// Reads the file the server of `data_dir` writes.
pub fn read(data_dir: &Path) -> Result<Stats> {
    let file = path(data_dir);
    let text = std::fs::read(&file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "no statistics in {}: no server has run on this data_dir yet",
                    data_dir.display()
                ),
            )
        } else {
            Error::from_io(e, format!("cannot read {}", file.display()))
        }
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a statistics file: {e}", file.display()),
        )
    })
}
