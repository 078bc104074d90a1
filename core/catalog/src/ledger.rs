//! The catalog as the [`ImageLedger`]: the current version of each chunk of a fenced
//! image, switched only by the holder of the image's current lock epoch.

use std::collections::HashMap;

use osstream_core::{Error, ErrorKind, ImageLedger, LockToken, Result, async_trait};
use sqlx::Row;

use crate::sql::{SqlCatalog, db_error};

#[async_trait]
impl ImageLedger for SqlCatalog {
    async fn chunk_versions(&self, data: &str) -> Result<HashMap<u64, String>> {
        let rows = sqlx::query("SELECT chunk, version FROM image_chunks WHERE data = $1")
            .bind(data)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "read chunk versions"))?;
        rows.iter()
            .map(|row| {
                let chunk: i64 = row
                    .try_get("chunk")
                    .map_err(|e| db_error(e, "read chunk versions"))?;
                let version: String = row
                    .try_get("version")
                    .map_err(|e| db_error(e, "read chunk versions"))?;
                Ok((chunk as u64, version))
            })
            .collect()
    }

    async fn commit_chunks(
        &self,
        lock: &LockToken,
        data: &str,
        chunks: &[(u64, String)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        // Matching the holder in an UPDATE takes the vdisk row's lock (first, in the order
        // attach takes them: vdisk, then epoch), so a release (session closed, replaced, unlocked) is ordered with this
        // commit too: before it (and this fails) or after it.
        let holder = sqlx::query(
            "UPDATE vdisks SET locked_by = locked_by WHERE name = $1 AND locked_by = $2",
        )
        .bind(&lock.vdisk)
        .bind(&lock.session)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "commit chunks"))?;
        // The compare-and-swap: this statement takes the epoch row's lock (PostgreSQL) or
        // the database's write lock (SQLite) and matches only while the epoch is ours, so
        // a new holder's epoch is taken either before (and this commit fails) or after it.
        let current =
            sqlx::query("UPDATE image_epochs SET epoch = epoch WHERE image_id = $1 AND epoch = $2")
                .bind(&lock.image)
                .bind(lock.epoch as i64)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "commit chunks"))?;
        if current.rows_affected() != 1 || holder.rows_affected() != 1 {
            let _ = tx.rollback().await;
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "session {} lost the lock of private vdisk {:?} (epoch {}): its writes were not committed",
                    lock.session, lock.vdisk, lock.epoch
                ),
            )
            .with_op("commit"));
        }
        for (chunk, version) in chunks {
            sqlx::query(
                "INSERT INTO image_chunks (image_id, data, chunk, version) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (data, chunk) DO UPDATE SET version = $4, image_id = $1",
            )
            .bind(&lock.image)
            .bind(data)
            .bind(*chunk as i64)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "commit chunks"))?;
        }
        tx.commit().await.map_err(|e| db_error(e, "commit chunks"))
    }
}
