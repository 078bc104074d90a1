use std::collections::HashMap;
use std::sync::Mutex;

use osstream_core::{
    BootProfile, Error, ErrorKind, ProfileStore, RecordedBoot, Result, async_trait, merged_profile,
};

/// Boot profiles kept in memory, merged as the catalog merges them.
#[derive(Debug, Default)]
pub struct MemProfiles {
    profiles: Mutex<HashMap<String, BootProfile>>,
    /// Vdisks that exist; empty means any.
    vdisks: Vec<String>,
}

impl MemProfiles {
    /// A store for profiles of these vdisks only (others are `NotFound`).
    pub fn of(vdisks: &[&str]) -> Self {
        MemProfiles {
            profiles: Mutex::default(),
            vdisks: vdisks.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn check(&self, vdisk: &str) -> Result<()> {
        if self.vdisks.is_empty() || self.vdisks.iter().any(|v| v == vdisk) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("no vdisk named {vdisk:?}"),
            ))
        }
    }
}

#[async_trait]
impl ProfileStore for MemProfiles {
    async fn profile(&self, vdisk: &str) -> Result<Option<BootProfile>> {
        Ok(self.profiles.lock().unwrap().get(vdisk).cloned())
    }

    async fn record_boot(&self, boot: &RecordedBoot) -> Result<BootProfile> {
        self.check(&boot.vdisk)?;
        let mut profiles = self.profiles.lock().unwrap();
        let profile = merged_profile(profiles.remove(&boot.vdisk), boot);
        profiles.insert(boot.vdisk.clone(), profile.clone());
        Ok(profile)
    }

    async fn put_profile(&self, profile: &BootProfile) -> Result<()> {
        self.check(&profile.vdisk)?;
        self.profiles
            .lock()
            .unwrap()
            .insert(profile.vdisk.clone(), profile.clone());
        Ok(())
    }

    async fn clear_profile(&self, vdisk: &str) -> Result<bool> {
        Ok(self.profiles.lock().unwrap().remove(vdisk).is_some())
    }
}
