//! [`ImageLedger`]: where images that several servers may write are committed, fenced by
//! a private vdisk's lock.
//!
//! Storage that cannot refuse a late write itself (S3 has no enforced conditional PUT in
//! every implementation) stays safe this way: a writer stores new data under names of
//! its own (a chunk version named by its lock's epoch), then switches the image to them
//! with one commit here, which succeeds only while its lock is still the image's lock. A
//! writer that lost the lock (paused past its server's timeout, or its session replaced)
//! can still upload, but only to names nobody reads. The catalog implements it, shared
//! by every server.

use std::collections::HashMap;
use std::fmt::Debug;

use async_trait::async_trait;

use crate::error::Result;
use crate::sessions::LockToken;

/// The committed state of fenced images.
///
/// # Contract
/// - `chunk_versions` returns the version committed last for each chunk written since
///   the data set `data` (one import of an image, named uniquely) was stored; chunks never
///   committed are absent (they read from the data set itself).
/// - `commit_chunks` makes `chunks` (`(index, version)`) current for `data` in one step,
///   if and only if `lock` is still its vdisk's lock (its session holds the vdisk's lock
///   at `lock.epoch`); otherwise it changes nothing and fails with `Conflict`. A later
///   `chunk_versions` (on any server) sees a successful commit.
#[async_trait]
pub trait ImageLedger: Send + Sync + Debug {
    /// The current version of every committed chunk of `data`.
    async fn chunk_versions(&self, data: &str) -> Result<HashMap<u64, String>>;
    /// Switches chunks of `data` to new versions, fenced by `lock`.
    async fn commit_chunks(
        &self,
        lock: &LockToken,
        data: &str,
        chunks: &[(u64, String)],
    ) -> Result<()>;
}
