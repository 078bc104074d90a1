//! [`MemLedger`]: an in-memory [`ImageLedger`] with the catalog's fencing rules, for
//! backends' tests without a database.

use std::collections::HashMap;
use std::sync::Mutex;

use osstream_core::{Error, ErrorKind, ImageLedger, LockToken, Result, async_trait};

/// Lock epochs per image, lock holders per vdisk, committed chunk versions.
#[derive(Debug, Default)]
pub struct MemLedger {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    epochs: HashMap<String, u64>,
    holders: HashMap<String, String>,
    chunks: HashMap<String, HashMap<u64, String>>,
}

impl MemLedger {
    /// Gives `vdisk`'s lock to `session` for `image`, growing the image's epoch (what a
    /// server's attach does); returns the new holder's token.
    pub fn take(&self, vdisk: &str, session: &str, image: &str) -> LockToken {
        let mut state = self.state.lock().unwrap();
        let epoch = state.epochs.entry(image.to_owned()).or_default();
        *epoch += 1;
        let epoch = *epoch;
        state.holders.insert(vdisk.to_owned(), session.to_owned());
        LockToken {
            vdisk: vdisk.to_owned(),
            session: session.to_owned(),
            image: image.to_owned(),
            epoch,
            overlay: false,
        }
    }
}

#[async_trait]
impl ImageLedger for MemLedger {
    async fn chunk_versions(&self, data: &str) -> Result<HashMap<u64, String>> {
        let state = self.state.lock().unwrap();
        Ok(state.chunks.get(data).cloned().unwrap_or_default())
    }

    async fn commit_chunks(
        &self,
        lock: &LockToken,
        data: &str,
        chunks: &[(u64, String)],
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let current = state.epochs.get(&lock.image).copied().unwrap_or(0);
        if current != lock.epoch || state.holders.get(&lock.vdisk) != Some(&lock.session) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "session {} lost the lock (epoch {} now)",
                    lock.session, current
                ),
            ));
        }
        let versions = state.chunks.entry(data.to_owned()).or_default();
        for (chunk, version) in chunks {
            versions.insert(*chunk, version.clone());
        }
        Ok(())
    }
}
