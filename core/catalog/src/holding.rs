//! Servers and the sessions they hold: one server at a time serves a session, others
//! refuse its token until that server lets go or its heartbeat lapses; a session with no
//! connection ends `grace` after its last one; every taking of a private vdisk's lock
//! grows the image's epoch, which fences every write.
//!
//! Times compared across servers (heartbeats, detach times) use the database's clock.

use std::collections::HashSet;

use osstream_core::{Error, ErrorKind, LockToken, Result};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::model::{Server, Session};
use crate::sql::{SqlCatalog, db_error, now_ms, session_from_row};

/// This server, as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRef {
    /// Kept in the data directory: the same after a restart.
    pub id: String,
    /// New for every start of the process.
    pub instance: String,
}

/// The timers of session ownership, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimers {
    /// A session with no connection ends this long after its last one closed.
    pub grace_ms: i64,
    /// A session nobody ever connected to ends this long after it was opened.
    pub lease_ms: i64,
    /// A server whose heartbeat is older than this is gone: its sessions are released.
    pub server_timeout_ms: i64,
}

/// What [`SqlCatalog::attach_session`] grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The lock epoch a private session's writes are fenced with (0 for standard).
    pub epoch: u64,
    /// The epoch of the image itself: how many times a private vdisk took it to write.
    /// Caches key blocks by it too, so none read before such writes is served after.
    pub image_epoch: u64,
    /// The image's identity as the catalog recorded it for the vdisk: what the lock's
    /// epoch is kept under, the same for every server whatever each one's backends call
    /// the image locally.
    pub image: String,
    /// The server this attach took the session from, in words, when that server was
    /// gone (a failover), for the log.
    pub taken_from: Option<String>,
}

/// Which image a check is about: the identity this server's backend gives it, and the
/// vdisk's backend and key (servers sharing a catalog configure the same backends, so
/// `backend/key` names one image on all of them, even where identities differ per host:
/// a block device's major:minor, a mount path).
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    /// [`osstream_core::ImageBackend::identity`] on this server.
    pub identity: &'a str,
    /// The backend's configured name.
    pub backend: &'a str,
    /// The image's key on it.
    pub key: &'a str,
}

/// SQL matching the vdisks (table alias `v`) of the image `$i` (identity), `$b/$k`.
fn same_image(i: usize, b: usize, k: usize) -> String {
    format!("(v.image_id = ${i} OR (v.backend = ${b} AND v.image_key = ${k}))")
}

/// Where an image stands for readers that are not its private vdisk's session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageUse {
    /// The private vdisk writing it now and its session, if any.
    pub writer: Option<(String, String)>,
    /// See [`Holding::image_epoch`].
    pub epoch: u64,
}

/// Why a session ended, when nobody closed it explicitly.
pub mod reasons {
    /// A standard session whose RAM overlay died with the server process.
    pub const RAM_OVERLAY_LOST: &str = "the server restarted and the session's RAM write overlay was lost; the client must boot again";
    /// The same, at a clean stop.
    pub const RAM_OVERLAY_STOPPED: &str = "the server stopped and the session's RAM write overlay went with it; the client must boot again";
}

/// A statement assembled from this crate's constant fragments and numbers (the database's
/// clock, durations); every value from outside is bound, never formatted in.
pub(crate) fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

fn server_from_row(row: &AnyRow) -> Result<Server> {
    let map = |e| db_error(e, "read server");
    Ok(Server {
        id: row.try_get("id").map_err(map)?,
        instance: row.try_get("instance").map_err(map)?,
        name: row.try_get("name").map_err(map)?,
        nbd_address: row.try_get("nbd_address").map_err(map)?,
        started_at: row.try_get("started_at").map_err(map)?,
        heartbeat_at: row.try_get("heartbeat_at").map_err(map)?,
        stopped_at: row.try_get("stopped_at").map_err(map)?,
        heartbeat_age: row.try_get("heartbeat_age").map_err(map)?,
        http_url: row.try_get("http_url").map_err(map)?,
        capacity: row.try_get::<i64, _>("capacity_milli").map_err(map)? as f64 / 1000.0,
        subnets: row
            .try_get::<String, _>("subnets")
            .map_err(map)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        draining: row.try_get::<i64, _>("draining").map_err(map)? != 0,
        bytes_per_sec: row.try_get::<i64, _>("bytes_per_sec").map_err(map)?.max(0) as u64,
        sessions: row.try_get::<i64, _>("sessions").map_err(map)?.max(0) as u64,
        shared_overlays: row.try_get::<i64, _>("shared_overlays").map_err(map)? != 0,
        server_timeout_ms: row.try_get("server_timeout_ms").map_err(map)?,
    })
}

/// The live sessions a server holds or was placed on, as a column of `servers`.
pub(crate) const SESSIONS_OF_SERVER: &str = "(SELECT COUNT(*) FROM sessions s WHERE s.closed_at IS NULL \
     AND COALESCE(s.owner, s.placed_on) = servers.id)";

fn text(row: &AnyRow, column: &str) -> Result<Option<String>> {
    row.try_get(column).map_err(|e| db_error(e, "read session"))
}

fn seconds(ms: i64) -> String {
    format!("{:.0}s", ms.max(0) as f64 / 1000.0)
}

impl SqlCatalog {
    /// `NOW - ms`, as SQL, for comparisons on the database's clock.
    pub(crate) fn ago_sql(&self, ms: i64) -> String {
        format!("({} - {ms})", self.now_sql())
    }

    /// The condition "server `column` names is gone" (stopped, or heartbeat older than
    /// `timeout_ms`), as SQL.
    fn gone_sql(&self, column: &str, timeout_ms: i64) -> String {
        format!(
            "{column} IN (SELECT id FROM servers WHERE stopped_at IS NOT NULL OR heartbeat_at < {})",
            self.ago_sql(timeout_ms)
        )
    }

    /// Records this server's start: a new instance under its lasting id.
    pub async fn register_server(&self, me: &ServerRef, name: &str) -> Result<()> {
        let now = self.now_sql();
        sqlx::query(sql(format!(
            "INSERT INTO servers (id, instance, name, nbd_address, started_at, heartbeat_at, stopped_at) \
             VALUES ($1, $2, $3, NULL, $4, {now}, NULL) \
             ON CONFLICT (id) DO UPDATE SET instance = $2, name = $3, nbd_address = NULL, started_at = $4, \
             heartbeat_at = {now}, stopped_at = NULL"
        )))
        .bind(&me.id)
        .bind(&me.instance)
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "register the server"))?;
        Ok(())
    }

    /// Records the `HOST:PORT` clients reach this server's NBD listener at.
    pub async fn set_server_address(&self, me: &ServerRef, address: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE servers SET nbd_address = $3 WHERE id = $1 AND instance = $2")
            .bind(&me.id)
            .bind(&me.instance)
            .bind(address)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "record the server's address"))?;
        Ok(())
    }

    /// Marks this server alive now. Fails if another instance took its id (two servers
    /// started on one data directory on different hosts).
    pub async fn heartbeat(&self, me: &ServerRef) -> Result<()> {
        self.beat(me, None).await
    }

    /// [`SqlCatalog::heartbeat`] that also reports the bytes per second this server's
    /// clients moved since the last one (the traffic placement weighs), in one update.
    pub async fn heartbeat_with_load(&self, me: &ServerRef, bytes_per_sec: u64) -> Result<()> {
        self.beat(me, Some(bytes_per_sec.min(i64::MAX as u64) as i64))
            .await
    }

    async fn beat(&self, me: &ServerRef, bytes_per_sec: Option<i64>) -> Result<()> {
        let done = sqlx::query(sql(format!(
            "UPDATE servers SET heartbeat_at = {}, bytes_per_sec = COALESCE($3, bytes_per_sec) \
             WHERE id = $1 AND instance = $2",
            self.now_sql()
        )))
        .bind(&me.id)
        .bind(&me.instance)
        .bind(bytes_per_sec)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "heartbeat"))?;
        if done.rows_affected() == 0 {
            let registered = sqlx::query("SELECT 1 FROM servers WHERE id = $1")
                .bind(&me.id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db_error(e, "heartbeat"))?;
            return Err(if registered.is_some() {
                Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "server id {} was taken by another osstream instance; two servers must not share one data_dir",
                        me.id
                    ),
                )
            } else {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "server id {} was removed from the catalog (osstream server rm) while this server was not heard from",
                        me.id
                    ),
                )
            });
        }
        Ok(())
    }

    /// Every server that shares the catalog, with the age of its heartbeat.
    pub async fn servers(&self) -> Result<Vec<Server>> {
        let rows = sqlx::query(sql(format!(
            "SELECT *, {} - heartbeat_at AS heartbeat_age, {SESSIONS_OF_SERVER} AS sessions FROM servers ORDER BY name, id",
            self.now_sql()
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list servers"))?;
        rows.iter().map(server_from_row).collect()
    }

    /// One server, if registered, read inside `tx`.
    async fn server_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        id: &str,
    ) -> Result<Option<Server>> {
        let row = sqlx::query(sql(format!(
            "SELECT *, {} - heartbeat_at AS heartbeat_age, {SESSIONS_OF_SERVER} AS sessions FROM servers WHERE id = $1",
            self.now_sql()
        )))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(|e| db_error(e, "read server"))?;
        row.as_ref().map(server_from_row).transpose()
    }

    /// The servers alive now (heartbeat younger than `timeout_ms`, not stopped).
    pub async fn live_servers(&self, timeout_ms: i64) -> Result<Vec<Server>> {
        Ok(self
            .servers()
            .await?
            .into_iter()
            .filter(|s| s.stopped_at.is_none() && s.heartbeat_age <= timeout_ms)
            .collect())
    }

    /// Makes this server the session's holder for one more connection.
    ///
    /// Refused (`Conflict`) while another live server holds it, naming that server; a
    /// standard session whose write overlay stayed on another server is never moved,
    /// unless the overlay is shared (`shared-disk`) and that server is gone: then it is
    /// taken with a new session epoch, which fences the old holding's writes. A
    /// private session taken anew (first connection here, or after another server let
    /// go) grows the image's epoch; while connections of an earlier holder of the image
    /// are still open on a live server, the refusal is *temporary*: retry shortly.
    /// `image` is the identity of the vdisk's image, as the backend names it now.
    pub async fn attach_session(
        &self,
        id: &str,
        me: &ServerRef,
        image: ImageRef<'_>,
        peer: &str,
        timers: &SessionTimers,
    ) -> Result<Holding> {
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        // Writing first takes the row lock (PostgreSQL) and the write lock (SQLite), so
        // two connections of one session attach one after the other.
        sqlx::query("UPDATE sessions SET peer = $2, last_active = $3 WHERE id = $1")
            .bind(id)
            .bind(peer)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "attach session"))?;
        let row = sqlx::query(
            "SELECT s.*, v.mode AS vdisk_mode, v.write_cache AS vdisk_cache, v.locked_by AS vdisk_locked_by, \
             v.image_id AS vdisk_image FROM sessions s LEFT JOIN vdisks v ON v.name = s.vdisk WHERE s.id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(e, "attach session"))?
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no session {id:?}")))?;
        let session = session_from_row(&row)?;
        sqlx::query("UPDATE clients SET last_seen = $2, first_seen = COALESCE(first_seen, $2) WHERE mac = $1")
            .bind(session.mac.as_str())
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "attach session"))?;
        // The key the lock's epoch lives under: recorded once per vdisk, so every server
        // uses the same one.
        let recorded = match text(&row, "vdisk_image")? {
            Some(recorded) => recorded,
            None => {
                sqlx::query("UPDATE vdisks SET image_id = $2 WHERE name = $1 AND image_id IS NULL")
                    .bind(&session.vdisk)
                    .bind(image.identity)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(e, "attach session"))?;
                image.identity.to_owned()
            }
        };
        let instance = text(&row, "owner_instance")?;
        let private = text(&row, "vdisk_mode")?.as_deref() == Some("private");
        // A standard session whose overlay every server reaches: it moves like a private
        // one, fenced by the session's own epoch.
        let shared = !private && text(&row, "vdisk_cache")?.as_deref() == Some("shared-disk");
        if session.closed_at.is_some() {
            return Err(ended(&session));
        }
        if private && text(&row, "vdisk_locked_by")?.as_deref() != Some(id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "session {id} no longer holds the lock of private vdisk {:?}",
                    session.vdisk
                ),
            ));
        }
        self.check_image_is_free(&mut tx, &session, private, image, &recorded)
            .await?;
        if instance.as_deref() == Some(me.instance.as_str()) {
            // Another connection of a session this process holds already.
            sqlx::query("UPDATE sessions SET attached = 1, detached_at = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "attach session"))?;
            let image_epoch = image_epoch(&mut tx, image, &recorded).await?;
            tx.commit()
                .await
                .map_err(|e| db_error(e, "attach session"))?;
            return Ok(Holding {
                epoch: session.epoch,
                image_epoch,
                image: recorded,
                taken_from: None,
            });
        }
        let mut taken_from = None;
        if let Some(owner) = session.owner.as_deref().filter(|o| *o != me.id) {
            let server = self.server_in(&mut tx, owner).await?;
            let gone = server.as_ref().is_none_or(|s| {
                s.stopped_at.is_some() || s.heartbeat_age > timers.server_timeout_ms
            });
            let named = server.as_ref().map_or_else(
                || format!("server {owner}"),
                |s| {
                    format!(
                        "server {} ({})",
                        s.name,
                        s.nbd_address.as_deref().unwrap_or("no NBD address")
                    )
                },
            );
            let movable = private || (shared && gone);
            if !movable {
                let state = if gone {
                    "which is gone"
                } else {
                    "which holds it"
                };
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "session {id} keeps its write overlay on {named}, {state}; {}",
                        if gone {
                            "the client must boot again (a new session)"
                        } else if shared {
                            // Still "connect there": agents look for those words.
                            "connect there, or wait: the overlay is shared, so the session moves \
                             here once that server's heartbeat lapses"
                        } else {
                            "connect there"
                        }
                    ),
                ));
            }
            if gone {
                taken_from = Some(named);
            } else {
                let age = server.as_ref().map_or(0, |s| s.heartbeat_age);
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "session {id} is attached on {named} (heartbeat {} ago); connect there, or wait until it \
                         lets go (its connections close, or its heartbeat lapses after {})",
                        seconds(age),
                        seconds(timers.server_timeout_ms)
                    ),
                ));
            }
        }
        let mut epoch = 0;
        if shared {
            // Whatever an earlier holding of the overlay still sends is refused from now.
            epoch = session.epoch + 1;
        }
        if private {
            // An earlier holder of this image (a replaced or closed session) may still be
            // finishing requests on a live server: wait for it to let go.
            let busy = sqlx::query(sql(format!(
                "SELECT s.id, s.owner FROM sessions s JOIN vdisks v ON v.name = s.vdisk \
                 WHERE s.id <> $1 AND s.attached = 1 AND (v.name = $2 OR v.image_id = $6 OR {}) \
                 AND s.owner IS NOT NULL AND NOT ({})",
                same_image(3, 4, 5),
                self.gone_sql("s.owner", timers.server_timeout_ms)
            )))
            .bind(id)
            .bind(&session.vdisk)
            .bind(image.identity)
            .bind(image.backend)
            .bind(image.key)
            .bind(&recorded)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(e, "attach session"))?;
            if let Some(busy) = busy {
                let other: String = busy
                    .try_get("id")
                    .map_err(|e| db_error(e, "attach session"))?;
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "private vdisk {:?}: the previous holder, session {other}, still has connections open; \
                         waiting for them to close",
                        session.vdisk
                    ),
                )
                .set_temporary());
            }
            // Above every epoch any name of the image had, kept under the recorded id
            // (what check_lock and commits compare with).
            epoch = image_epoch(&mut tx, image, &recorded).await? + 1;
            sqlx::query(
                "INSERT INTO image_epochs (image_id, epoch) VALUES ($1, $2) \
                 ON CONFLICT (image_id) DO UPDATE SET epoch = $2",
            )
            .bind(&recorded)
            .bind(epoch as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "take the lock epoch"))?;
        }
        sqlx::query(
            "UPDATE sessions SET owner = $2, owner_instance = $3, attached = 1, detached_at = NULL, \
             epoch = $4, last_active = $5 WHERE id = $1 AND closed_at IS NULL",
        )
        .bind(id)
        .bind(&me.id)
        .bind(&me.instance)
        .bind(epoch as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "attach session"))?;
        let image_epoch = image_epoch(&mut tx, image, &recorded).await?;
        tx.commit()
            .await
            .map_err(|e| db_error(e, "attach session"))?;
        Ok(Holding {
            epoch,
            image_epoch,
            image: recorded,
            taken_from,
        })
    }

    /// Refuses a standard session of an image a private session writes, and a private
    /// session of an image standard sessions read (only reachable through registrations
    /// made before the catalog checked them, or backends reconfigured to overlap).
    async fn check_image_is_free(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        session: &Session,
        private: bool,
        image: ImageRef<'_>,
        recorded: &str,
    ) -> Result<()> {
        let same = format!("(v.image_id = $5 OR {})", same_image(2, 3, 4));
        // $1 the vdisk, $2-$4 the image as this server names it, $5 as recorded.
        let query = |text: String| {
            sqlx::query(sql(text))
                .bind(session.vdisk.clone())
                .bind(image.identity.to_owned())
                .bind(image.backend.to_owned())
                .bind(image.key.to_owned())
                .bind(recorded.to_owned())
        };
        if private {
            let row = query(format!(
                "SELECT s.id, s.vdisk FROM sessions s JOIN vdisks v ON v.name = s.vdisk \
                 WHERE {same} AND v.name <> $1 AND s.closed_at IS NULL"
            ))
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| db_error(e, "check image"))?;
            if let Some(row) = row {
                let other: Option<String> = text(&row, "vdisk")?;
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "private vdisk {:?} shares its image with vdisk {:?}, which has live sessions; close them first",
                        session.vdisk,
                        other.unwrap_or_default()
                    ),
                ));
            }
            return Ok(());
        }
        let row = query(format!(
            "SELECT v.name, v.locked_by FROM vdisks v WHERE {same} AND v.name <> $1 \
             AND v.mode = 'private' AND v.locked_by IS NOT NULL"
        ))
        .fetch_optional(&mut **tx)
        .await
        .map_err(|e| db_error(e, "check image"))?;
        if let Some(row) = row {
            let (name, holder) = (text(&row, "name")?, text(&row, "locked_by")?);
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the image of vdisk {:?} is being written by private vdisk {:?} (session {}); \
                     standard sessions of it are refused until that session ends",
                    session.vdisk,
                    name.unwrap_or_default(),
                    holder.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    /// A connection of a session held by this server ended; with `last`, none is left
    /// here: the session counts as detached from now (it ends `grace` later), and a
    /// private session is let go, so another server may take it. Returns why the session
    /// had ended already (replaced by a new boot, closed by an admin), `None` while it
    /// lives.
    pub async fn detach_session(
        &self,
        id: &str,
        me: &ServerRef,
        last: bool,
        private: bool,
    ) -> Result<Option<String>> {
        if !last {
            return Ok(None);
        }
        let release = "closed_at IS NOT NULL OR $3 = 1";
        sqlx::query(sql(format!(
            "UPDATE sessions SET attached = 0, detached_at = {}, \
             owner = CASE WHEN {release} THEN NULL ELSE owner END, \
             owner_instance = CASE WHEN {release} THEN NULL ELSE owner_instance END \
             WHERE id = $1 AND owner_instance = $2",
            self.now_sql()
        )))
        .bind(id)
        .bind(&me.instance)
        .bind(i64::from(private))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "detach session"))?;
        let session = self.session(id).await?;
        Ok(session
            .closed_at
            .map(|_| session.end_reason.unwrap_or_else(|| "closed".to_owned())))
    }

    /// What the catalog records of this server instance's sessions: `(id, attached,
    /// private, closed)` for the live ones it holds and the closed ones it still shows
    /// attached, so the server can correct a record that went astray (a detach that
    /// failed, a server that missed heartbeats and came back).
    pub async fn held_attachments(
        &self,
        me: &ServerRef,
    ) -> Result<Vec<(String, bool, bool, bool)>> {
        let rows = sqlx::query(
            "SELECT s.id, s.attached, s.closed_at, v.mode FROM sessions s LEFT JOIN vdisks v ON v.name = s.vdisk \
             WHERE s.owner_instance = $1 AND (s.closed_at IS NULL OR s.attached = 1)",
        )
        .bind(&me.instance)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list held sessions"))?;
        rows.iter()
            .map(|row| {
                let map = |e| db_error(e, "list held sessions");
                let closed: Option<i64> = row.try_get("closed_at").map_err(map)?;
                Ok((
                    row.try_get("id").map_err(map)?,
                    row.try_get::<i64, _>("attached").map_err(map)? != 0,
                    text(row, "mode")?.as_deref() == Some("private"),
                    closed.is_some(),
                ))
            })
            .collect()
    }

    /// Marks a live session this instance holds as attached again (it has connections
    /// here, whatever the catalog recorded meanwhile).
    pub async fn reattach_session(&self, id: &str, me: &ServerRef) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET attached = 1, detached_at = NULL WHERE id = $1 AND owner_instance = $2 \
             AND closed_at IS NULL",
        )
        .bind(id)
        .bind(&me.instance)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "reattach session"))?;
        Ok(())
    }

    /// Ids of the live sessions this server instance holds.
    pub async fn held_sessions(&self, me: &ServerRef) -> Result<HashSet<String>> {
        self.live_ids("owner_instance = $1", Some(&me.instance))
            .await
    }

    /// One session by id, live or not.
    pub async fn session(&self, id: &str) -> Result<Session> {
        let row = sqlx::query("SELECT * FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read session"))?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no session {id:?}")))?;
        session_from_row(&row)
    }

    /// Ids of every live session.
    pub async fn live_session_ids(&self) -> Result<HashSet<String>> {
        self.live_ids("1 = 1", None).await
    }

    /// Ids of the live sessions matching `condition` (SQL; `$1` is `value`).
    async fn live_ids(&self, condition: &str, value: Option<&str>) -> Result<HashSet<String>> {
        let query = sqlx::query(sql(format!(
            "SELECT id FROM sessions WHERE closed_at IS NULL AND {condition}"
        )));
        let rows = match value {
            Some(value) => query.bind(value.to_owned()),
            None => query,
        }
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list live sessions"))?;
        rows.iter()
            .map(|r| {
                r.try_get("id")
                    .map_err(|e| db_error(e, "list live sessions"))
            })
            .collect()
    }

    /// Closes `id` with `reason` if `condition` (SQL over the session row) still holds,
    /// releasing its lock; returns whether it closed it.
    pub(crate) async fn close_if(&self, id: &str, reason: &str, condition: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        let closed = sqlx::query(sql(format!(
            "UPDATE sessions SET closed_at = $2, end_reason = $3 WHERE id = $1 AND closed_at IS NULL AND {condition}"
        )))
        .bind(id)
        .bind(now_ms())
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "close session"))?;
        if closed.rows_affected() == 0 {
            let _ = tx.rollback().await;
            return Ok(false);
        }
        sqlx::query("UPDATE vdisks SET locked_by = NULL WHERE locked_by = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "close session"))?;
        tx.commit()
            .await
            .map_err(|e| db_error(e, "close session"))?;
        Ok(true)
    }

    /// The periodic clean-up every server runs: releases the sessions of servers that
    /// are gone, then ends sessions with no connection for `grace` and sessions nobody
    /// connected to within `lease`. Returns `(session, why)` for each change, for logs.
    pub async fn reap_sessions(
        &self,
        me: &ServerRef,
        timers: &SessionTimers,
    ) -> Result<Vec<(Session, String)>> {
        let mut done = Vec::new();
        // Sessions another server may take: private ones, and those with a shared overlay.
        let movable = "vdisk IN (SELECT name FROM vdisks WHERE mode = 'private' OR write_cache = 'shared-disk')";
        let gone = self.gone_sql("owner", timers.server_timeout_ms);
        let lapsed_filter = format!(
            "owner IS NOT NULL AND owner <> $1 AND {gone} AND (attached = 1 OR closed_at IS NOT NULL OR {movable})"
        );
        let lapsed = sqlx::query(sql(format!("SELECT * FROM sessions WHERE {lapsed_filter}")))
            .bind(&me.id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "find sessions of gone servers"))?;
        if !lapsed.is_empty() {
            let release = format!("closed_at IS NOT NULL OR {movable}");
            sqlx::query(sql(format!(
                "UPDATE sessions SET detached_at = CASE WHEN attached = 1 THEN {} ELSE detached_at END, attached = 0, \
                 owner = CASE WHEN {release} THEN NULL ELSE owner END, \
                 owner_instance = CASE WHEN {release} THEN NULL ELSE owner_instance END \
                 WHERE {lapsed_filter}",
                self.now_sql()
            )))
            .bind(&me.id)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "release sessions of gone servers"))?;
            for row in &lapsed {
                let session = session_from_row(row)?;
                if session.closed_at.is_none() {
                    let why = format!(
                        "released: its server {} stopped or missed heartbeats for {}",
                        session.owner.as_deref().unwrap_or("?"),
                        seconds(timers.server_timeout_ms)
                    );
                    done.push((session, why));
                }
            }
        }
        let graced = format!(
            "attached = 0 AND detached_at IS NOT NULL AND detached_at < {}",
            self.ago_sql(timers.grace_ms)
        );
        let never = format!(
            "attached = 0 AND detached_at IS NULL AND owner IS NULL AND started_at < {}",
            now_ms() - timers.lease_ms
        );
        for (condition, reason) in [
            (
                graced,
                format!(
                    "no connection for {} after its last one closed",
                    seconds(timers.grace_ms)
                ),
            ),
            (
                never,
                format!(
                    "nobody connected within the lease ({}) after it was opened",
                    seconds(timers.lease_ms)
                ),
            ),
        ] {
            let rows = sqlx::query(sql(format!(
                "SELECT * FROM sessions WHERE closed_at IS NULL AND {condition}"
            )))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "find sessions to end"))?;
            for row in rows {
                let session = session_from_row(&row)?;
                if self.close_if(&session.id, &reason, &condition).await? {
                    done.push((session, format!("ended: {reason}")));
                }
            }
        }
        Ok(done)
    }

    /// At start-up: takes over what the previous instance of this server held. Closed
    /// sessions and private sessions are let go (no connection is left), standard
    /// sessions with a disk overlay stay here and count as detached, and standard
    /// sessions whose overlay was in RAM end. Returns `(session, what happened)`.
    pub async fn adopt_sessions(&self, me: &ServerRef) -> Result<Vec<(Session, String)>> {
        let rows = sqlx::query(
            "SELECT s.*, v.mode AS vdisk_mode, v.write_cache AS vdisk_cache FROM sessions s \
             LEFT JOIN vdisks v ON v.name = s.vdisk \
             WHERE s.owner = $1 AND COALESCE(s.owner_instance, '') <> $2",
        )
        .bind(&me.id)
        .bind(&me.instance)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "adopt sessions"))?;
        let mut done = Vec::new();
        let detached_now = format!(
            "detached_at = CASE WHEN attached = 1 OR detached_at IS NULL THEN {} ELSE detached_at END, attached = 0",
            self.now_sql()
        );
        for row in rows {
            let session = session_from_row(&row)?;
            let mode = text(&row, "vdisk_mode")?;
            let cache = text(&row, "vdisk_cache")?;
            let ram = matches!(cache.as_deref(), Some("ram" | "ram-overflow-disk"));
            let (statement, what) = if session.closed_at.is_some() {
                ("UPDATE sessions SET owner = NULL, owner_instance = NULL, attached = 0 WHERE id = $1".to_owned(), None)
            } else if mode.as_deref() == Some("private") {
                (
                    format!("UPDATE sessions SET owner = NULL, owner_instance = NULL, {detached_now} WHERE id = $1"),
                    Some("private session let go after the restart; it ends unless its client reconnects".to_owned()),
                )
            } else if ram {
                if self
                    .close_if(&session.id, reasons::RAM_OVERLAY_LOST, "owner IS NOT NULL")
                    .await?
                {
                    done.push((session, format!("ended: {}", reasons::RAM_OVERLAY_LOST)));
                }
                continue;
            } else {
                (
                    format!(
                        "UPDATE sessions SET owner_instance = $2, {detached_now} WHERE id = $1"
                    ),
                    Some("kept: its disk write overlay is still here".to_owned()),
                )
            };
            sqlx::query(sql(statement))
                .bind(&session.id)
                .bind(&me.instance)
                .execute(&self.pool)
                .await
                .map_err(|e| db_error(e, "adopt sessions"))?;
            if let Some(what) = what {
                done.push((session, what));
            }
        }
        Ok(done)
    }

    /// At a clean stop: ends the live standard sessions held here whose overlay is in
    /// RAM (it goes with the process) and marks the server stopped, so other servers
    /// release what it held at once. Returns the sessions it ended.
    pub async fn stop_server(&self, me: &ServerRef) -> Result<Vec<Session>> {
        let rows = sqlx::query(
            "SELECT s.* FROM sessions s JOIN vdisks v ON v.name = s.vdisk WHERE s.owner_instance = $1 \
             AND s.closed_at IS NULL AND v.mode = 'standard' AND v.write_cache IN ('ram', 'ram-overflow-disk')",
        )
        .bind(&me.instance)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "stop the server"))?;
        let mut ended = Vec::new();
        for row in rows {
            let session = session_from_row(&row)?;
            if self
                .close_if(
                    &session.id,
                    reasons::RAM_OVERLAY_STOPPED,
                    "owner IS NOT NULL",
                )
                .await?
            {
                ended.push(session);
            }
        }
        sqlx::query("UPDATE servers SET stopped_at = $3 WHERE id = $1 AND instance = $2")
            .bind(&me.id)
            .bind(&me.instance)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "stop the server"))?;
        Ok(ended)
    }

    /// Ok while `lock` is the private vdisk's current lock: held by its session, at its
    /// epoch. `Conflict` once it moved (the session ended or was replaced, another server
    /// took it): the holder must not acknowledge another write.
    pub async fn check_lock(&self, lock: &LockToken) -> Result<()> {
        if lock.overlay {
            return self.check_overlay_lock(lock).await;
        }
        let row = sqlx::query(
            "SELECT v.locked_by, (SELECT epoch FROM image_epochs WHERE image_id = $2) AS epoch \
             FROM vdisks v WHERE v.name = $1",
        )
        .bind(&lock.vdisk)
        .bind(&lock.image)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error(e, "check the lock"))?;
        let (holder, epoch) = match &row {
            Some(row) => (
                text(row, "locked_by")?,
                row.try_get::<Option<i64>, _>("epoch")
                    .map_err(|e| db_error(e, "check the lock"))?
                    .unwrap_or(0) as u64,
            ),
            None => (None, 0),
        };
        if holder.as_deref() == Some(lock.session.as_str()) && epoch == lock.epoch {
            return Ok(());
        }
        Err(lost_lock(lock, holder.as_deref(), epoch))
    }

    /// Ok while `lock` is the session's hold on its shared write overlay: the session
    /// is live and no other server took it since (which grows its epoch).
    async fn check_overlay_lock(&self, lock: &LockToken) -> Result<()> {
        let row = sqlx::query("SELECT epoch, closed_at FROM sessions WHERE id = $1")
            .bind(&lock.session)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "check the lock"))?;
        let now = match &row {
            None => "the session is gone from the catalog".to_owned(),
            Some(row) => {
                let closed: Option<i64> = row
                    .try_get("closed_at")
                    .map_err(|e| db_error(e, "check the lock"))?;
                let epoch = row
                    .try_get::<i64, _>("epoch")
                    .map_err(|e| db_error(e, "check the lock"))? as u64;
                if closed.is_some() {
                    "the session ended".to_owned()
                } else if epoch != lock.epoch {
                    format!(
                        "another server took the session (epoch {epoch}, this holding has {})",
                        lock.epoch
                    )
                } else {
                    return Ok(());
                }
            }
        };
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "session {} lost {}: {now}; this write was not acknowledged",
                lock.session,
                lock.guards()
            ),
        )
        .with_op("fence"))
    }

    /// Where an image stands for plain-name readers: who writes it now, and its epoch.
    pub async fn image_use(&self, image: ImageRef<'_>) -> Result<ImageUse> {
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        let writer = sqlx::query(sql(format!(
            "SELECT v.name, v.locked_by FROM vdisks v WHERE {} AND v.mode = 'private' AND v.locked_by IS NOT NULL",
            same_image(1, 2, 3)
        )))
        .bind(image.identity)
        .bind(image.backend)
        .bind(image.key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(e, "check image"))?;
        let writer = match writer {
            Some(row) => Some((
                text(&row, "name")?.unwrap_or_default(),
                text(&row, "locked_by")?.unwrap_or_default(),
            )),
            None => None,
        };
        let epoch = image_epoch(&mut tx, image, image.identity).await?;
        let _ = tx.rollback().await;
        Ok(ImageUse { writer, epoch })
    }

    /// The images a private session holds the lock of now: `(recorded identity,
    /// backend, key)` of each such vdisk.
    pub async fn locked_images(&self) -> Result<Vec<(Option<String>, String, String)>> {
        let rows = sqlx::query(
            "SELECT image_id, backend, image_key FROM vdisks WHERE mode = 'private' AND locked_by IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list locked images"))?;
        rows.iter()
            .map(|r| {
                let map = |e| db_error(e, "list locked images");
                Ok((
                    r.try_get("image_id").map_err(map)?,
                    r.try_get("backend").map_err(map)?,
                    r.try_get("image_key").map_err(map)?,
                ))
            })
            .collect()
    }
}

/// The epoch of the image (0 if no private vdisk ever took it): the highest of its own
/// identity's, the recorded identity's, and those of the vdisks on its backend and key
/// (another host's identity of it), inside a transaction.
async fn image_epoch(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    image: ImageRef<'_>,
    recorded: &str,
) -> Result<u64> {
    let row = sqlx::query(
        "SELECT MAX(epoch) AS epoch FROM image_epochs WHERE image_id = $1 OR image_id = $4 OR image_id IN \
         (SELECT image_id FROM vdisks WHERE backend = $2 AND image_key = $3 AND image_id IS NOT NULL)",
    )
    .bind(image.identity)
    .bind(image.backend)
    .bind(image.key)
    .bind(recorded)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| db_error(e, "read image epoch"))?;
    let epoch: Option<i64> = row
        .try_get("epoch")
        .map_err(|e| db_error(e, "read image epoch"))?;
    Ok(epoch.unwrap_or(0) as u64)
}

/// The refusal for a token of an ended session, with the reason the catalog kept.
pub fn ended(session: &Session) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "session {} has ended: {}",
            session.id,
            session
                .end_reason
                .as_deref()
                .unwrap_or("closed (the client booted again, or an administrator closed it)")
        ),
    )
}

fn lost_lock(lock: &LockToken, holder: Option<&str>, epoch: u64) -> Error {
    let now = match holder {
        Some(holder) if holder != lock.session => format!("session {holder} holds it now"),
        Some(_) => format!(
            "another holding of the session took it (epoch {epoch}, this one has {})",
            lock.epoch
        ),
        None => "nobody holds it (the session ended or an administrator cleared it)".to_owned(),
    };
    Error::new(
        ErrorKind::Conflict,
        format!(
            "session {} lost the lock of private vdisk {:?}: {now}; this write was not acknowledged",
            lock.session, lock.vdisk
        ),
    )
    .with_op("fence")
}
