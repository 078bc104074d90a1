//! Images replaced under running clients: the old image stays until its last session
//! ends, then it is deleted (by a server's housekeeping, or by the import itself when no
//! session reads it).

use serde::Serialize;
use sqlx::Row;

use osstream_core::Result;

use crate::Catalog;
use crate::sql::{SqlCatalog, db_error, now_ms};

/// An image a vdisk no longer uses, kept while sessions that started on it live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetiredImage {
    /// Its backend.
    pub backend: String,
    /// Its key there.
    pub key: String,
    /// The vdisk it belonged to.
    pub vdisk: String,
    /// When it was replaced (Unix milliseconds).
    pub retired_at: i64,
}

impl SqlCatalog {
    /// Points `vdisk` at the image `new_key` (of `size` bytes, stored at `image_id`) and
    /// retires its old image; returns the old key. Sessions already open keep the old
    /// image; sessions opened from now on get the new one.
    pub async fn replace_image(
        &self,
        vdisk: &str,
        new_key: &str,
        size: u64,
        image_id: Option<&str>,
    ) -> Result<String> {
        let record = self.vdisk(vdisk).await?;
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        // An image another vdisk also boots is not retired: only its last user may go.
        sqlx::query(
            "INSERT INTO retired_images (backend, image_key, vdisk, retired_at) \
             SELECT $1, $2, $3, $4 WHERE NOT EXISTS \
             (SELECT 1 FROM vdisks WHERE backend = $1 AND image_key = $2 AND name <> $3) \
             ON CONFLICT (backend, image_key) DO NOTHING",
        )
        .bind(&record.backend)
        .bind(&record.key)
        .bind(vdisk)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "retire the old image"))?;
        // Sessions from before version 5 have no key of their own: they started on the
        // image being retired.
        sqlx::query("UPDATE sessions SET image_key = $2 WHERE vdisk = $1 AND image_key IS NULL AND closed_at IS NULL")
            .bind(vdisk)
            .bind(&record.key)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "pin sessions to the old image"))?;
        sqlx::query("UPDATE vdisks SET image_key = $2, size = $3, image_id = $4 WHERE name = $1")
            .bind(vdisk)
            .bind(new_key)
            .bind(size as i64)
            .bind(image_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "point the vdisk at the new image"))?;
        tx.commit()
            .await
            .map_err(|e| db_error(e, "replace the image"))?;
        Ok(record.key)
    }

    /// Every retired image not deleted yet, oldest first.
    pub async fn retired_images(&self) -> Result<Vec<RetiredImage>> {
        self.retired_before(i64::MAX).await
    }

    /// The retired images retired before `before` (Unix milliseconds), oldest first:
    /// the ones old enough to delete (a session whose opening read the vdisk's key just
    /// before the replace may commit a moment after it).
    pub async fn retired_before(&self, before: i64) -> Result<Vec<RetiredImage>> {
        let rows = sqlx::query(
            "SELECT backend, image_key, vdisk, retired_at FROM retired_images WHERE retired_at < $1 \
             ORDER BY retired_at, image_key",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list retired images"))?;
        rows.iter()
            .map(|row| {
                let map = |e| db_error(e, "read a retired image");
                Ok(RetiredImage {
                    backend: row.try_get("backend").map_err(map)?,
                    key: row.try_get("image_key").map_err(map)?,
                    vdisk: row.try_get("vdisk").map_err(map)?,
                    retired_at: row.try_get("retired_at").map_err(map)?,
                })
            })
            .collect()
    }

    /// How many live sessions read the retired image `key` of `backend`, and vdisks use
    /// it (a vdisk added on that key since it was retired).
    pub async fn readers_of_retired(&self, image: &RetiredImage) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM sessions s JOIN vdisks v ON v.name = s.vdisk \
             WHERE s.closed_at IS NULL AND s.image_key = $2 AND v.backend = $1) \
             + (SELECT COUNT(*) FROM vdisks WHERE backend = $1 AND image_key = $2)",
        )
        .bind(&image.backend)
        .bind(&image.key)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error(e, "count the readers of a retired image"))?;
        Ok(count as u64)
    }

    /// Forgets a retired image (it was deleted, or is gone).
    pub async fn forget_retired(&self, image: &RetiredImage) -> Result<()> {
        sqlx::query("DELETE FROM retired_images WHERE backend = $1 AND image_key = $2")
            .bind(&image.backend)
            .bind(&image.key)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "forget a retired image"))?;
        Ok(())
    }
}
