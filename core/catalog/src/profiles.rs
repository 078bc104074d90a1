//! The catalog as the engine's [`ProfileStore`]: one merged boot profile per vdisk.

use osstream_core::{
    BootProfile, Error, ErrorKind, ProfileStore, RecordedBoot, Result, async_trait, merged_profile,
};
use sqlx::Row;

use crate::Catalog;
use crate::sql::{SqlCatalog, db_error, now_ms};

/// How often a merge is retried when another server wrote the same profile meanwhile
/// (a lab booting at once finishes many recordings together), with a growing, jittered
/// pause between attempts.
const MERGE_ATTEMPTS: usize = 40;

/// Waits a little longer after each lost race: 5 ms, 10 ms, ... up to 200 ms, jittered
/// so racing writers do not meet again.
async fn back_off(attempt: usize) {
    let base = (5 * (attempt as u64 + 1)).min(200);
    let jitter = u64::from(std::process::id() ^ now_ms() as u32) % (base + 1);
    tokio::time::sleep(std::time::Duration::from_millis(base / 2 + jitter)).await;
}

impl SqlCatalog {
    /// The stored profile (`None` if unreadable) and its revision; `None` without a row.
    async fn profile_row(&self, vdisk: &str) -> Result<Option<(Option<BootProfile>, i64)>> {
        let row = sqlx::query("SELECT profile, revision FROM boot_profiles WHERE vdisk = $1")
            .bind(vdisk)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read the boot profile"))?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row
            .try_get("profile")
            .map_err(|e| db_error(e, "read the boot profile"))?;
        let revision: i64 = row
            .try_get("revision")
            .map_err(|e| db_error(e, "read the boot profile"))?;
        match BootProfile::from_json(&text) {
            Ok(profile) => Ok(Some((Some(profile), revision))),
            Err(err) => {
                // A damaged row (edited by hand, written by a future release) must not
                // stop the vdisk's profiling for good: the next boot replaces it.
                tracing::warn!(vdisk, %err, "the stored boot profile is unreadable; treating it as none");
                Ok(Some((None, revision)))
            }
        }
    }

    /// Writes `profile` if the stored revision is still `expected` (`None`: no row).
    /// Returns whether it was written.
    async fn write_profile(&self, profile: &BootProfile, expected: Option<i64>) -> Result<bool> {
        let query = match expected {
            Some(_) => {
                "UPDATE boot_profiles SET image = $2, generation = $3, boots = $4, \
                 revision = revision + 1, profile = $5, updated_at = $6 \
                 WHERE vdisk = $1 AND revision = $7"
            }
            None => {
                "INSERT INTO boot_profiles (vdisk, image, generation, boots, revision, profile, updated_at) \
                 VALUES ($1, $2, $3, $4, 1, $5, $6) ON CONFLICT (vdisk) DO NOTHING"
            }
        };
        let mut statement = sqlx::query(query)
            .bind(&profile.vdisk)
            .bind(&profile.image)
            .bind(&profile.generation)
            .bind(i64::from(profile.boots))
            .bind(profile.to_json())
            .bind(now_ms());
        if let Some(revision) = expected {
            statement = statement.bind(revision);
        }
        let done = statement
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "store the boot profile"))?;
        Ok(done.rows_affected() == 1)
    }
}

#[async_trait]
impl ProfileStore for SqlCatalog {
    async fn profile(&self, vdisk: &str) -> Result<Option<BootProfile>> {
        Ok(self
            .profile_row(vdisk)
            .await?
            .and_then(|(profile, _)| profile))
    }

    async fn record_boot(&self, boot: &RecordedBoot) -> Result<BootProfile> {
        let vdisk = self.vdisk(&boot.vdisk).await?;
        // A session still on a replaced image must not overwrite the profile of the
        // image the vdisk boots now (and the other way round at its next boot).
        if let Some(current) = &vdisk.image_id
            && current != &boot.image
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the boot read {} but vdisk {:?} boots {current} now (its image was replaced): not merged",
                    boot.image, boot.vdisk
                ),
            ));
        }
        for attempt in 0..MERGE_ATTEMPTS {
            let (stored, revision) = match self.profile_row(&boot.vdisk).await? {
                Some((profile, revision)) => (profile, Some(revision)),
                None => (None, None),
            };
            let profile = merged_profile(stored, boot);
            if self.write_profile(&profile, revision).await? {
                return Ok(profile);
            }
            back_off(attempt).await;
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the boot profile of vdisk {:?} changed under {MERGE_ATTEMPTS} merges in a row",
                boot.vdisk
            ),
        )
        .set_temporary())
    }

    async fn put_profile(&self, profile: &BootProfile) -> Result<()> {
        self.vdisk(&profile.vdisk).await?;
        for attempt in 0..MERGE_ATTEMPTS {
            let revision = self.profile_row(&profile.vdisk).await?.map(|(_, r)| r);
            if self.write_profile(profile, revision).await? {
                return Ok(());
            }
            back_off(attempt).await;
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the boot profile of vdisk {:?} kept changing; try again",
                profile.vdisk
            ),
        )
        .set_temporary())
    }

    async fn clear_profile(&self, vdisk: &str) -> Result<bool> {
        self.vdisk(vdisk).await?;
        let done = sqlx::query("DELETE FROM boot_profiles WHERE vdisk = $1")
            .bind(vdisk)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "clear the boot profile"))?;
        Ok(done.rows_affected() > 0)
    }
}
