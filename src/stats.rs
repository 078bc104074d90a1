//! `<data_dir>/stats.json`: the running server's layer counters (cache tiers, boot
//! profiles) and its open attachments with their sessions' boot progress, rewritten every
//! few seconds and when it stops, for `osstream cache stats` and `osstream top`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use osstream_core::live::{LiveAttachment, SessionBoot};
use osstream_core::{CancellationToken, Error, ErrorKind, Layer, LayerReport, Result};
use serde::{Deserialize, Serialize};

/// How often a running server rewrites the file: often enough for a live view of its
/// clients (`osstream top`), rarely enough to cost nothing.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// A running server's file older than this means the server is not working (it rewrites
/// the file every [`INTERVAL`]): hung, or unable to write.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

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
    /// The attachments (client connections, transfers) open when the file was written;
    /// missing in files of older servers.
    #[serde(default)]
    pub attachments: Vec<LiveAttachment>,
    /// The boot progress of the sessions among `attachments`.
    #[serde(default)]
    pub sessions: Vec<SessionBoot>,
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
    let live = osstream_core::live::snapshot();
    let stats = Stats {
        server: server.to_owned(),
        pid: std::process::id(),
        running,
        updated_at: now_ms(),
        layers: layers.iter().filter_map(|l| l.report()).collect(),
        attachments: live.attachments,
        sessions: live.sessions,
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
                tracing::warn!(%err, "cannot write the statistics file; `osstream cache stats` and `osstream top` will be stale");
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

/// Whether process `pid` exists (signal 0 asks without sending anything; a process of
/// another user answers EPERM, and exists).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only asks whether the process exists; it sends nothing.
    let answer = unsafe { libc::kill(pid, 0) };
    answer == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Reads the file of a server that runs now: an error says why there is none (no server
/// ever ran on `data_dir`, it stopped, it died, it stopped writing), and how to start it.
pub fn read_running(data_dir: &Path) -> Result<Stats> {
    let start = "start it with `osstream serve` (with this command's configuration)";
    let stats = read(data_dir).map_err(|err| match err.kind() {
        ErrorKind::NotFound => Error::new(
            ErrorKind::NotFound,
            format!(
                "no server has run on data_dir {} (it has no stats.json): start one with \
                 `osstream serve` (with this command's configuration)",
                data_dir.display()
            ),
        ),
        _ => err,
    })?;
    let age = Duration::from_millis((now_ms() - stats.updated_at).max(0) as u64);
    let (problem, fix) = if !stats.running {
        (format!("it stopped {}s ago", age.as_secs()), start)
    } else if !process_alive(stats.pid) {
        (
            format!(
                "its process {} is gone without a clean stop (killed or crashed); it last wrote its statistics {}s ago",
                stats.pid,
                age.as_secs()
            ),
            start,
        )
    } else if age > STALE_AFTER {
        (
            format!(
                "its process {} last wrote its statistics {}s ago (it does every {}s)",
                stats.pid,
                age.as_secs(),
                INTERVAL.as_secs()
            ),
            "it is hung or cannot write to data_dir (disk full?): see its log",
        )
    } else {
        return Ok(stats);
    };
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "the server on data_dir {} is not running: {problem}; {fix}",
            data_dir.display()
        ),
    ))
}
