//! One helper for work that blocks a thread (file I/O, `fsync`): run it on tokio's
//! blocking pool and map a failed task once, here.

use crate::error::{Error, ErrorKind, Result};

/// Runs `work` on the blocking pool; `what` names it if the task itself fails (a panic).
pub async fn run_blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Error::new(
            ErrorKind::Unexpected,
            format!("blocking task ({what}) failed: {e}"),
        )
        .with_op(what)
    })?
}
