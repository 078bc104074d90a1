//! The catalog as the [`ImageLedger`]: the current version of each chunk of a fenced
//! image, switched only by the holder of the image's current lock epoch.

use std::collections::HashMap;

use osstream_core::{Error, ErrorKind, ImageLedger, LockToken, Result, async_trait};
use sqlx::Row;

use crate::sql::{SqlCatalog, db_error};

#[async_trait]
impl ImageLedger for SqlCatalog {
    async fn chunk_versions(&self, image: &str, data: &str) -> Result<HashMap<u64, String>> {
        let rows = sqlx::query(
            "SELECT chunk, version FROM image_chunks WHERE image_id = $1 AND data = $2",
        )
        .bind(image)
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
        let holder: Option<String> = sqlx::query("SELECT locked_by FROM vdisks WHERE name = $1")
            .bind(&lock.vdisk)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(e, "commit chunks"))?
            .map(|row| row.try_get("locked_by"))
            .transpose()
            .map_err(|e| db_error(e, "commit chunks"))?
            .flatten();
        if current.rows_affected() != 1 || holder.as_deref() != Some(lock.session.as_str()) {
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
                 ON CONFLICT (image_id, data, chunk) DO UPDATE SET version = $4",
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
