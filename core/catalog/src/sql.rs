//! [`SqlCatalog`]: the catalog on SQLite or PostgreSQL through sqlx's `Any` driver.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use osstream_core::{Error, ErrorKind, Result, async_trait};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::model::{Assignment, Client, Mac, Session, UnknownClientPolicy, Vdisk, validate_name};
use crate::{Catalog, ClientChanges, VdiskChanges};

/// Migrations, in order. Each runs once, in a transaction, recorded in
/// `osstream_migrations`. The SQL is portable between SQLite and PostgreSQL.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_ownership.sql")),
    (3, include_str!("../migrations/0003_dhcp.sql")),
    (4, include_str!("../migrations/0004_profiles.sql")),
    (5, include_str!("../migrations/0005_image_swap.sql")),
    (6, include_str!("../migrations/0006_placement.sql")),
    (
        7,
        include_str!("../migrations/0007_session_count_index.sql"),
    ),
];

const POLICY_KEY: &str = "unknown_client_policy";

/// `url` with SQLite's `mode=rwc` (create the file if missing) unless it sets a mode.
fn with_mode(url: &str, flavour: &str) -> String {
    if flavour == "sqlite" && !url.contains("mode=") {
        format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
    } else {
        url.to_owned()
    }
}

/// The catalog over a SQL database.
#[derive(Debug, Clone)]
pub struct SqlCatalog {
    pub(crate) pool: AnyPool,
    /// `sqlite` or `postgres`, for logs.
    flavour: &'static str,
}

pub(crate) fn db_error(err: sqlx::Error, what: &str) -> Error {
    match &err {
        sqlx::Error::RowNotFound => Error::new(ErrorKind::NotFound, format!("{what}: not found")),
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Error::new(ErrorKind::Conflict, format!("{what}: already exists")).with_source(err)
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => Error::new(
            ErrorKind::Io,
            format!("{what}: the catalog database is unreachable"),
        )
        .with_source(err)
        .set_temporary(),
        _ => Error::new(ErrorKind::Io, format!("{what}: catalog database error")).with_source(err),
    }
    .with_op("catalog")
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Kernel and initrd keys are plain names in their backend's boot-file home (served
/// without a session, they never name a path).
fn validate_boot_keys(vdisk: &Vdisk) -> Result<()> {
    for (what, key) in [("--kernel", &vdisk.kernel), ("--initrd", &vdisk.initrd)] {
        // `NAME`, in the vdisk's backend, or `BACKEND/NAME` (a disk on S3, its kernel on
        // a file backend's boot folder).
        let plain = |name: &str| osstream_core::validate_image_name(name).is_ok();
        if let Some(key) = key {
            let ok = match key.split_once('/') {
                Some((backend, name)) => validate_name("backend", backend).is_ok() && plain(name),
                None => plain(key),
            };
            if !ok {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{what} {key:?} is not a plain file name: boot files are named as they are in their backend's boot folder (images/boot/vmlinuz is --kernel vmlinuz), or BACKEND/NAME for another backend's"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `bytes` random bytes from the kernel, as lowercase hex.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::from_io(e, "cannot read /dev/urandom for a session token"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn not_found(what: &str, name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("{what} {name:?} does not exist"),
    )
    .with_op("catalog")
}

fn flag(value: bool) -> i64 {
    i64::from(value)
}

fn vdisk_from_row(row: &AnyRow) -> Result<Vdisk> {
    let get_text = |col: &str| {
        row.try_get::<String, _>(col)
            .map_err(|e| db_error(e, "read vdisk"))
    };
    let get_opt = |col: &str| {
        row.try_get::<Option<String>, _>(col)
            .map_err(|e| db_error(e, "read vdisk"))
    };
    let get_int = |col: &str| {
        row.try_get::<i64, _>(col)
            .map_err(|e| db_error(e, "read vdisk"))
    };
    Ok(Vdisk {
        name: get_text("name")?,
        backend: get_text("backend")?,
        key: get_text("image_key")?,
        size: get_int("size")? as u64,
        mode: get_text("mode")?.parse()?,
        write_cache: get_text("write_cache")?.parse()?,
        boot: get_text("boot")?.parse()?,
        kernel: get_opt("kernel")?,
        initrd: get_opt("initrd")?,
        cmdline: get_opt("cmdline")?,
        description: get_text("description")?,
        enabled: get_int("enabled")? != 0,
        locked_by: get_opt("locked_by")?,
        created_at: get_int("created_at")?,
        image_id: get_opt("image_id")?,
    })
}

fn client_from_row(row: &AnyRow) -> Result<Client> {
    let map = |e| db_error(e, "read client");
    Ok(Client {
        mac: row.try_get::<String, _>("mac").map_err(map)?.parse()?,
        name: row.try_get("name").map_err(map)?,
        hostname: row.try_get("hostname").map_err(map)?,
        ip: row
            .try_get::<Option<i64>, _>("ip")
            .map_err(map)?
            .map(|n| std::net::Ipv4Addr::from(n as u32)),
        group: row.try_get("client_group").map_err(map)?,
        notes: row.try_get("notes").map_err(map)?,
        first_seen: row.try_get("first_seen").map_err(map)?,
        last_seen: row.try_get("last_seen").map_err(map)?,
        created_at: row.try_get("created_at").map_err(map)?,
    })
}

pub(crate) fn session_from_row(row: &AnyRow) -> Result<Session> {
    let map = |e| db_error(e, "read session");
    Ok(Session {
        id: row.try_get("id").map_err(map)?,
        token: row.try_get("token").map_err(map)?,
        mac: row.try_get::<String, _>("mac").map_err(map)?.parse()?,
        vdisk: row.try_get("vdisk").map_err(map)?,
        peer: row.try_get("peer").map_err(map)?,
        started_at: row.try_get("started_at").map_err(map)?,
        last_active: row.try_get("last_active").map_err(map)?,
        bytes_read: row.try_get::<i64, _>("bytes_read").map_err(map)? as u64,
        bytes_written: row.try_get::<i64, _>("bytes_written").map_err(map)? as u64,
        closed_at: row.try_get("closed_at").map_err(map)?,
        end_reason: row.try_get("end_reason").map_err(map)?,
        owner: row.try_get("owner").map_err(map)?,
        placed_on: row.try_get("placed_on").map_err(map)?,
        attached: row.try_get::<i64, _>("attached").map_err(map)? != 0,
        detached_at: row.try_get("detached_at").map_err(map)?,
        epoch: row.try_get::<i64, _>("epoch").map_err(map)? as u64,
        image_key: row.try_get("image_key").map_err(map)?,
    })
}

fn assignment_from_row(row: &AnyRow) -> Result<Assignment> {
    let map = |e| db_error(e, "read assignment");
    Ok(Assignment {
        mac: row.try_get::<String, _>("mac").map_err(map)?.parse()?,
        vdisk: row.try_get("vdisk").map_err(map)?,
        position: row.try_get("position").map_err(map)?,
        is_default: row.try_get::<i64, _>("is_default").map_err(map)? != 0,
    })
}

fn validate_optional_name(what: &str, name: &Option<String>) -> Result<()> {
    name.as_deref().map_or(Ok(()), |n| validate_name(what, n))
}

/// SQLite's "database is locked" (SQLITE_BUSY, or one of its extended codes).
fn sqlite_busy(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|d| d.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == 5)
}

impl SqlCatalog {
    /// Connects to the catalog at `url` only if it was created before (by [`open`]):
    /// admin commands pointed at the wrong place must not leave an empty catalog there.
    /// A missing one is [`ErrorKind::NotFound`], naming where it was looked for.
    ///
    /// [`open`]: SqlCatalog::open
    pub async fn open_existing(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or(path);
            if path != ":memory:" && !std::path::Path::new(path).is_file() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("there is no catalog at {path}"),
                ));
            }
            return Self::open(url).await;
        }
        let catalog = Self::open_pool(url).await?;
        let created: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'osstream_migrations'",
        )
        .fetch_one(&catalog.pool)
        .await
        .map_err(|e| db_error(e, "look for the catalog's tables"))?;
        if created == 0 {
            catalog.pool.close().await;
            return Err(Error::new(
                ErrorKind::NotFound,
                "the PostgreSQL database holds no osstream catalog",
            ));
        }
        Self::open(url).await
    }

    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and applies migrations.
    /// A SQLite file is created if missing and runs in WAL mode.
    pub async fn open(url: &str) -> Result<Self> {
        let catalog = Self::open_pool(url).await?;
        let flavour = catalog.flavour;
        if catalog.migrate().await? {
            // Connections opened before a migration may keep the old schema's column
            // lists for their statements (sqlx's SQLite driver then fails on a `SELECT *`
            // of a widened table): start afresh.
            catalog.pool.close().await;
            return Ok(SqlCatalog {
                pool: Self::connect(&with_mode(url, flavour), flavour).await?,
                flavour,
            });
        }
        Ok(catalog)
    }

    /// Connects, without migrating.
    async fn open_pool(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let flavour = if url.starts_with("sqlite:") {
            "sqlite"
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            "postgres"
        } else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("catalog url {url:?} must start with sqlite:// or postgres://"),
            ));
        };
        let pool = Self::connect(&with_mode(url, flavour), flavour).await?;
        if flavour == "sqlite" {
            // Switching a new file to WAL needs it to itself; programs opening one new
            // catalog together (servers started at once) were seen to get "database is
            // locked" here despite busy_timeout, so they retry for up to 10 s.
            let mut tries = 0;
            loop {
                match sqlx::raw_sql("PRAGMA journal_mode = WAL;")
                    .execute(&pool)
                    .await
                {
                    Ok(_) => break,
                    Err(e) if tries < 100 && sqlite_busy(&e) => {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(db_error(e, "enable WAL")),
                }
            }
        }
        Ok(SqlCatalog { pool, flavour })
    }

    async fn connect(url: &str, flavour: &'static str) -> Result<AnyPool> {
        let mut options =
            AnyPoolOptions::new().max_connections(if flavour == "sqlite" { 4 } else { 8 });
        if flavour == "sqlite" {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    // Per connection: enforce references, wait for writers instead of failing.
                    sqlx::raw_sql("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        options.connect(url).await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot open the catalog ({flavour}): {e}"),
            )
            .with_op("catalog")
        })
    }

    /// `sqlite` or `postgres`.
    pub fn flavour(&self) -> &'static str {
        self.flavour
    }

    /// The database's "now" in Unix milliseconds, as SQL: heartbeats and detach times are
    /// written and compared with this one clock, so servers' clocks need not agree.
    pub(crate) fn now_sql(&self) -> &'static str {
        if self.flavour == "sqlite" {
            "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)"
        } else {
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        }
    }

    /// The vdisks other than `except` whose image is `image_id`.
    async fn vdisks_of_image(&self, image_id: &str, except: &str) -> Result<Vec<Vdisk>> {
        let rows =
            sqlx::query("SELECT * FROM vdisks WHERE image_id = $1 AND name <> $2 ORDER BY name")
                .bind(image_id)
                .bind(except)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| db_error(e, "find vdisks of an image"))?;
        rows.iter().map(vdisk_from_row).collect()
    }

    /// Refuses to put `image_id` under the vdisk `name` in `mode` when another vdisk has
    /// it and one of the two is private: a private vdisk's image is written in place, so
    /// nobody else may read it through a cache or an overlay of their own.
    pub async fn check_image_modes(
        &self,
        name: &str,
        mode: crate::VdiskMode,
        image_id: Option<&str>,
    ) -> Result<()> {
        let Some(image_id) = image_id else {
            return Ok(());
        };
        let others = self.vdisks_of_image(image_id, name).await?;
        let clash = others.iter().find(|other| {
            mode == crate::VdiskMode::Private || other.mode == crate::VdiskMode::Private
        });
        match clash {
            None => Ok(()),
            Some(other) => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {name:?} would use the same image as {} vdisk {:?} (image {:?} on backend {:?}, \
                     {image_id}); a private vdisk's image is written in place and belongs to that vdisk alone",
                    other.mode, other.name, other.key, other.backend
                ),
            )),
        }
    }

    /// Records where the bytes of each vdisk live (`(vdisk, identity)`), for vdisks that
    /// have no identity recorded yet. A recorded identity is kept: every server uses it
    /// for the lock's epoch, so it must not change with the server that looked last.
    /// Returns `(vdisk, recorded, seen)` for each vdisk whose identity this caller sees
    /// differently (another host's name for it, or a backend moved elsewhere).
    pub async fn set_image_ids(
        &self,
        ids: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>> {
        let mut differ = Vec::new();
        for (name, image_id) in ids {
            let recorded: Option<Option<String>> =
                sqlx::query("SELECT image_id FROM vdisks WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| db_error(e, "read image id"))?
                    .map(|row| row.try_get("image_id"))
                    .transpose()
                    .map_err(|e| db_error(e, "read image id"))?;
            match recorded {
                None => continue,
                Some(Some(old)) if &old == image_id => continue,
                Some(Some(old)) => {
                    differ.push((name.clone(), old, image_id.clone()));
                    continue;
                }
                Some(None) => {}
            }
            sqlx::query("UPDATE vdisks SET image_id = $2 WHERE name = $1 AND image_id IS NULL")
                .bind(name)
                .bind(image_id)
                .execute(&self.pool)
                .await
                .map_err(|e| db_error(e, "record image id"))?;
        }
        Ok(differ)
    }

    /// Applies the migrations not applied yet; returns whether it applied any.
    async fn migrate(&self) -> Result<bool> {
        let mut applied_any = false;
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS osstream_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "create the migrations table"))?;
        for (version, sql) in MIGRATIONS {
            let applied = sqlx::query("SELECT version FROM osstream_migrations WHERE version = $1")
                .bind(*version)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db_error(e, "read migrations"))?;
            if applied.is_some() {
                continue;
            }
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| db_error(e, "begin migration"))?;
            let outcome = async {
                sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                sqlx::query(
                    "INSERT INTO osstream_migrations (version, applied_at) VALUES ($1, $2)",
                )
                .bind(*version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                Ok::<(), sqlx::Error>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    tx.commit()
                        .await
                        .map_err(|e| db_error(e, "commit migration"))?;
                    tracing::info!(version, flavour = self.flavour, "catalog migration applied");
                    applied_any = true;
                }
                Err(err) => {
                    let _ = tx.rollback().await;
                    // Another server may have applied it at the same moment.
                    let done =
                        sqlx::query("SELECT version FROM osstream_migrations WHERE version = $1")
                            .bind(*version)
                            .fetch_optional(&self.pool)
                            .await
                            .map_err(|e| db_error(e, "read migrations"))?;
                    if done.is_none() {
                        return Err(db_error(err, "apply catalog migration"));
                    }
                    applied_any = true;
                }
            }
        }
        Ok(applied_any)
    }

    async fn live_sessions_of_vdisk(&self, name: &str) -> Result<Vec<Session>> {
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE vdisk = $1 AND closed_at IS NULL ORDER BY started_at",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, "list sessions"))?;
        rows.iter().map(session_from_row).collect()
    }

    async fn client_exists_with(
        &self,
        column: &str,
        value: &str,
        except: Option<&Mac>,
    ) -> Result<Option<String>> {
        let query = match column {
            "name" => "SELECT mac FROM clients WHERE name = $1",
            _ => "SELECT mac FROM clients WHERE hostname = $1",
        };
        let row = sqlx::query(query)
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "check client"))?;
        let mac: Option<String> = row
            .map(|r| r.try_get("mac"))
            .transpose()
            .map_err(|e| db_error(e, "check client"))?;
        Ok(mac.filter(|m| except.is_none_or(|e| e.as_str() != m)))
    }

    /// A reserved address belongs to one client.
    async fn check_unique_ip(
        &self,
        ip: Option<std::net::Ipv4Addr>,
        except: Option<&Mac>,
    ) -> Result<()> {
        let Some(ip) = ip else { return Ok(()) };
        let row = sqlx::query("SELECT mac FROM clients WHERE ip = $1")
            .bind(i64::from(u32::from(ip)))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "check client"))?;
        let owner: Option<String> = row
            .map(|r| r.try_get("mac"))
            .transpose()
            .map_err(|e| db_error(e, "check client"))?;
        match owner.filter(|m| except.is_none_or(|e| e.as_str() != m)) {
            Some(owner) => Err(Error::new(
                ErrorKind::Conflict,
                format!("address {ip} is already reserved for {owner}"),
            )),
            None => Ok(()),
        }
    }

    async fn check_unique_client_fields(
        &self,
        name: &Option<String>,
        hostname: &Option<String>,
        except: Option<&Mac>,
    ) -> Result<()> {
        if let Some(name) = name
            && let Some(owner) = self.client_exists_with("name", name, except).await?
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("client name {name:?} is already used by {owner}"),
            ));
        }
        if let Some(hostname) = hostname
            && let Some(owner) = self
                .client_exists_with("hostname", hostname, except)
                .await?
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("hostname {hostname:?} is already used by {owner}"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Catalog for SqlCatalog {
    async fn add_vdisk(&self, vdisk: &Vdisk) -> Result<()> {
        validate_name("vdisk name", &vdisk.name)?;
        validate_boot_keys(vdisk)?;
        if self.vdisk(&vdisk.name).await.is_ok() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("vdisk {:?} already exists", vdisk.name),
            ));
        }
        self.check_image_modes(&vdisk.name, vdisk.mode, vdisk.image_id.as_deref())
            .await?;
        sqlx::query(
            "INSERT INTO vdisks (name, backend, image_key, size, mode, write_cache, boot, kernel, initrd, cmdline, \
             description, enabled, locked_by, created_at, image_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13, $14)",
        )
        .bind(&vdisk.name)
        .bind(&vdisk.backend)
        .bind(&vdisk.key)
        .bind(vdisk.size as i64)
        .bind(vdisk.mode.as_str())
        .bind(vdisk.write_cache.as_str())
        .bind(vdisk.boot.as_str())
        .bind(vdisk.kernel.clone())
        .bind(vdisk.initrd.clone())
        .bind(vdisk.cmdline.clone())
        .bind(&vdisk.description)
        .bind(flag(vdisk.enabled))
        .bind(now_ms())
        .bind(vdisk.image_id.clone())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, &format!("add vdisk {:?}", vdisk.name)))?;
        Ok(())
    }

    async fn vdisks(&self) -> Result<Vec<Vdisk>> {
        let rows = sqlx::query("SELECT * FROM vdisks ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "list vdisks"))?;
        rows.iter().map(vdisk_from_row).collect()
    }

    async fn vdisk(&self, name: &str) -> Result<Vdisk> {
        let row = sqlx::query("SELECT * FROM vdisks WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read vdisk"))?;
        row.as_ref()
            .map(vdisk_from_row)
            .transpose()?
            .ok_or_else(|| not_found("vdisk", name))
    }

    async fn update_vdisk(&self, name: &str, changes: &VdiskChanges) -> Result<Vdisk> {
        let mut vdisk = self.vdisk(name).await?;
        if let Some(mode) = changes.mode {
            if mode != vdisk.mode && !self.live_sessions_of_vdisk(name).await?.is_empty() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "vdisk {name:?} has live sessions; close them before changing its mode"
                    ),
                ));
            }
            self.check_image_modes(name, mode, vdisk.image_id.as_deref())
                .await?;
            vdisk.mode = mode;
        }
        if let Some(write_cache) = changes.write_cache {
            vdisk.write_cache = write_cache;
        }
        if let Some(boot) = changes.boot {
            vdisk.boot = boot;
        }
        if let Some(kernel) = &changes.kernel {
            vdisk.kernel = kernel.clone();
        }
        if let Some(initrd) = &changes.initrd {
            vdisk.initrd = initrd.clone();
        }
        if let Some(cmdline) = &changes.cmdline {
            vdisk.cmdline = cmdline.clone();
        }
        if let Some(description) = &changes.description {
            vdisk.description = description.clone();
        }
        if let Some(enabled) = changes.enabled {
            vdisk.enabled = enabled;
        }
        if let Some(size) = changes.size {
            vdisk.size = size;
        }
        validate_boot_keys(&vdisk)?;
        sqlx::query(
            "UPDATE vdisks SET mode = $2, write_cache = $3, boot = $4, kernel = $5, initrd = $6, cmdline = $7, \
             description = $8, enabled = $9, size = $10 WHERE name = $1",
        )
        .bind(name)
        .bind(vdisk.mode.as_str())
        .bind(vdisk.write_cache.as_str())
        .bind(vdisk.boot.as_str())
        .bind(vdisk.kernel.clone())
        .bind(vdisk.initrd.clone())
        .bind(vdisk.cmdline.clone())
        .bind(&vdisk.description)
        .bind(flag(vdisk.enabled))
        .bind(vdisk.size as i64)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "update vdisk"))?;
        Ok(vdisk)
    }

    async fn remove_vdisk(&self, name: &str, force: bool) -> Result<()> {
        self.vdisk(name).await?;
        let live = self.live_sessions_of_vdisk(name).await?;
        if !live.is_empty() && !force {
            let who: Vec<String> = live
                .iter()
                .map(|s| format!("{} (client {})", s.id, s.mac))
                .collect();
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {name:?} has {} live session(s): {}; use --force to close them and remove it",
                    live.len(),
                    who.join(", ")
                ),
            ));
        }
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        for statement in [
            "UPDATE sessions SET closed_at = $2, end_reason = 'the vdisk was removed (osstream vdisk rm)' \
             WHERE vdisk = $1 AND closed_at IS NULL",
            "DELETE FROM assignments WHERE vdisk = $1",
            "DELETE FROM vdisks WHERE name = $1",
        ] {
            sqlx::query(statement)
                .bind(name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "remove vdisk"))?;
        }
        tx.commit().await.map_err(|e| db_error(e, "remove vdisk"))
    }

    async fn unlock_vdisk(&self, name: &str) -> Result<()> {
        let vdisk = self.vdisk(name).await?;
        if let Some(holder) = vdisk.locked_by {
            // The holder's session ends with its lock, so its connections are closed
            // before anyone else can take the vdisk.
            let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
            sqlx::query("UPDATE vdisks SET locked_by = NULL WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "unlock"))?;
            sqlx::query(
                "UPDATE sessions SET closed_at = $2, end_reason = 'its private lock was cleared by an administrator (osstream vdisk unlock)' \
                 WHERE id = $1 AND closed_at IS NULL",
            )
            .bind(&holder)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "unlock"))?;
            tx.commit().await.map_err(|e| db_error(e, "unlock"))?;
            tracing::info!(vdisk = %name, session = %holder, "private vdisk unlocked by the administrator; its session is closed");
        }
        Ok(())
    }

    async fn add_client(&self, client: &Client) -> Result<()> {
        validate_optional_name("client name", &client.name)?;
        validate_optional_name("hostname", &client.hostname)?;
        validate_optional_name("group", &client.group)?;
        if self.client(&client.mac).await.is_ok() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("client {} already exists", client.mac),
            ));
        }
        self.check_unique_client_fields(&client.name, &client.hostname, None)
            .await?;
        self.check_unique_ip(client.ip, None).await?;
        sqlx::query(
            "INSERT INTO clients (mac, name, hostname, client_group, notes, first_seen, last_seen, created_at, ip) \
             VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, $7)",
        )
        .bind(client.mac.as_str())
        .bind(client.name.clone())
        .bind(client.hostname.clone())
        .bind(client.group.clone())
        .bind(&client.notes)
        .bind(now_ms())
        .bind(client.ip.map(|ip| i64::from(u32::from(ip))))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, &format!("add client {}", client.mac)))?;
        Ok(())
    }

    async fn clients(&self) -> Result<Vec<Client>> {
        let rows = sqlx::query("SELECT * FROM clients ORDER BY mac")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "list clients"))?;
        rows.iter().map(client_from_row).collect()
    }

    async fn client(&self, mac: &Mac) -> Result<Client> {
        let row = sqlx::query("SELECT * FROM clients WHERE mac = $1")
            .bind(mac.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read client"))?;
        row.as_ref()
            .map(client_from_row)
            .transpose()?
            .ok_or_else(|| not_found("client", mac.as_str()))
    }

    async fn update_client(&self, mac: &Mac, changes: &ClientChanges) -> Result<Client> {
        let mut client = self.client(mac).await?;
        if let Some(name) = &changes.name {
            validate_optional_name("client name", name)?;
            client.name = name.clone();
        }
        if let Some(hostname) = &changes.hostname {
            validate_optional_name("hostname", hostname)?;
            client.hostname = hostname.clone();
        }
        if let Some(group) = &changes.group {
            validate_optional_name("group", group)?;
            client.group = group.clone();
        }
        if let Some(notes) = &changes.notes {
            client.notes = notes.clone();
        }
        if let Some(ip) = changes.ip {
            client.ip = ip;
        }
        self.check_unique_client_fields(&client.name, &client.hostname, Some(mac))
            .await?;
        self.check_unique_ip(client.ip, Some(mac)).await?;
        sqlx::query("UPDATE clients SET name = $2, hostname = $3, client_group = $4, notes = $5, ip = $6 WHERE mac = $1")
            .bind(mac.as_str())
            .bind(client.name.clone())
            .bind(client.hostname.clone())
            .bind(client.group.clone())
            .bind(&client.notes)
            .bind(client.ip.map(|ip| i64::from(u32::from(ip))))
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "update client"))?;
        Ok(client)
    }

    async fn remove_client(&self, mac: &Mac) -> Result<()> {
        self.client(mac).await?;
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        for statement in [
            "UPDATE vdisks SET locked_by = NULL WHERE locked_by IN (SELECT id FROM sessions WHERE mac = $1 AND closed_at IS NULL)",
            "UPDATE sessions SET closed_at = $2, end_reason = 'the client was removed (osstream client rm)' \
             WHERE mac = $1 AND closed_at IS NULL",
            "DELETE FROM assignments WHERE mac = $1",
            "DELETE FROM clients WHERE mac = $1",
        ] {
            let query = sqlx::query(statement).bind(mac.as_str());
            let query = if statement.contains("$2") {
                query.bind(now_ms())
            } else {
                query
            };
            query
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "remove client"))?;
        }
        tx.commit().await.map_err(|e| db_error(e, "remove client"))
    }

    async fn touch_client(&self, mac: &Mac) -> Result<()> {
        let now = now_ms();
        sqlx::query("UPDATE clients SET last_seen = $2, first_seen = COALESCE(first_seen, $2) WHERE mac = $1")
            .bind(mac.as_str())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "touch client"))?;
        Ok(())
    }

    async fn assign(&self, mac: &Mac, vdisk: &str, default: bool) -> Result<Assignment> {
        self.client(mac).await?;
        self.vdisk(vdisk).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, format!("cannot assign vdisk {vdisk:?} to {mac}: no such vdisk (see `osstream vdisk list`)"))
            } else {
                e
            }
        })?;
        let existing = self.assignments(mac).await?;
        let position = match existing.iter().find(|a| a.vdisk == vdisk) {
            Some(a) => a.position,
            None => existing.iter().map(|a| a.position + 1).max().unwrap_or(0),
        };
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        if default {
            sqlx::query("UPDATE assignments SET is_default = 0 WHERE mac = $1")
                .bind(mac.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "assign"))?;
        }
        let is_default = default
            || existing.is_empty()
            || existing.iter().any(|a| a.vdisk == vdisk && a.is_default);
        sqlx::query(
            "INSERT INTO assignments (mac, vdisk, position, is_default) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mac, vdisk) DO UPDATE SET is_default = $4",
        )
        .bind(mac.as_str())
        .bind(vdisk)
        .bind(position)
        .bind(flag(is_default))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "assign"))?;
        tx.commit().await.map_err(|e| db_error(e, "assign"))?;
        Ok(Assignment {
            mac: mac.clone(),
            vdisk: vdisk.to_owned(),
            position,
            is_default,
        })
    }

    async fn unassign(&self, mac: &Mac, vdisk: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM assignments WHERE mac = $1 AND vdisk = $2")
            .bind(mac.as_str())
            .bind(vdisk)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "unassign"))?;
        if done.rows_affected() == 0 {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("vdisk {vdisk:?} is not assigned to {mac}"),
            ));
        }
        Ok(())
    }

    async fn assignments(&self, mac: &Mac) -> Result<Vec<Assignment>> {
        let rows = sqlx::query("SELECT * FROM assignments WHERE mac = $1 ORDER BY position, vdisk")
            .bind(mac.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "list assignments"))?;
        rows.iter().map(assignment_from_row).collect()
    }

    async fn open_session(
        &self,
        mac: &Mac,
        vdisk_name: &str,
        peer: Option<&str>,
    ) -> Result<Session> {
        self.client(mac).await?;
        let vdisk = self.vdisk(vdisk_name).await?;
        if !vdisk.enabled {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("vdisk {vdisk_name:?} is disabled"),
            ));
        }
        if !self
            .assignments(mac)
            .await?
            .iter()
            .any(|a| a.vdisk == vdisk_name)
        {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("vdisk {vdisk_name:?} is not assigned to client {mac}"),
            ));
        }
        let now = now_ms();
        let session = Session {
            id: random_hex(8)?,
            token: random_hex(24)?,
            mac: mac.clone(),
            vdisk: vdisk_name.to_owned(),
            peer: peer.map(str::to_owned),
            started_at: now,
            last_active: now,
            bytes_read: 0,
            bytes_written: 0,
            closed_at: None,
            end_reason: None,
            owner: None,
            placed_on: None,
            attached: false,
            detached_at: None,
            epoch: 0,
            image_key: None,
        };
        let mut tx = self.pool.begin().await.map_err(|e| db_error(e, "begin"))?;
        // Touching the client row first takes its row lock on PostgreSQL, so two boots of
        // one client open their sessions one after the other (SQLite serialises anyway).
        sqlx::query("UPDATE clients SET last_seen = $2, first_seen = COALESCE(first_seen, $2) WHERE mac = $1")
            .bind(mac.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "open session"))?;
        // One client, one session: the new boot replaces the old one and its lock.
        sqlx::query("UPDATE vdisks SET locked_by = NULL WHERE locked_by IN (SELECT id FROM sessions WHERE mac = $1 AND closed_at IS NULL)")
            .bind(mac.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "open session"))?;
        sqlx::query(
            "UPDATE sessions SET closed_at = $2, end_reason = $3 WHERE mac = $1 AND closed_at IS NULL",
        )
        .bind(mac.as_str())
        .bind(now)
        .bind(format!(
            "replaced by the client's new session {} (one client, one session)",
            session.id
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "open session"))?;
        if vdisk.mode == crate::VdiskMode::Private {
            let locked = sqlx::query(
                "UPDATE vdisks SET locked_by = $2 WHERE name = $1 AND locked_by IS NULL",
            )
            .bind(vdisk_name)
            .bind(&session.id)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(e, "lock private vdisk"))?;
            if locked.rows_affected() == 0 {
                let _ = tx.rollback().await;
                let holder = self.vdisk(vdisk_name).await?.locked_by.unwrap_or_default();
                let detail = match self.session(&holder).await.ok() {
                    Some(s) => format!(
                        "session {} of client {} (peer {})",
                        s.id,
                        s.mac,
                        s.peer.as_deref().unwrap_or("unknown")
                    ),
                    None => format!("session {holder}"),
                };
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "private vdisk {vdisk_name:?} is in use by {detail}; `osstream vdisk unlock {vdisk_name}` clears a stale lock"
                    ),
                ));
            }
        }
        sqlx::query(
            // The image key is read in the insert itself, so a replace committed
            // meanwhile is seen (the session then starts on the new image).
            "INSERT INTO sessions (id, token, mac, vdisk, peer, started_at, last_active, bytes_read, bytes_written, closed_at, image_key) \
             SELECT $1, $2, $3, $4, $5, $6, $6, 0, 0, NULL, image_key FROM vdisks WHERE name = $4",
        )
        .bind(&session.id)
        .bind(&session.token)
        .bind(mac.as_str())
        .bind(vdisk_name)
        .bind(session.peer.clone())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, "open session"))?;
        tx.commit().await.map_err(|e| db_error(e, "open session"))?;
        // As stored: the image key was read by the insert.
        self.session(&session.id).await
    }

    async fn session_by_token(&self, token: &str) -> Result<Session> {
        let row = sqlx::query("SELECT * FROM sessions WHERE token = $1")
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read session"))?;
        row.as_ref()
            .map(session_from_row)
            .transpose()?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "unknown session token"))
    }

    async fn sessions(&self, all: bool) -> Result<Vec<Session>> {
        let query = if all {
            "SELECT * FROM sessions ORDER BY started_at DESC, id"
        } else {
            "SELECT * FROM sessions WHERE closed_at IS NULL ORDER BY started_at DESC, id"
        };
        let rows = sqlx::query(query)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error(e, "list sessions"))?;
        rows.iter().map(session_from_row).collect()
    }

    async fn close_session(&self, id: &str, reason: &str) -> Result<()> {
        if !self.close_if(id, reason, "1 = 1").await? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no live session with id {id:?} (see `osstream session list`)"),
            ));
        }
        Ok(())
    }

    async fn record_io(&self, id: &str, read: u64, written: u64) -> Result<()> {
        sqlx::query("UPDATE sessions SET bytes_read = bytes_read + $2, bytes_written = bytes_written + $3, last_active = $4 WHERE id = $1")
            .bind(id)
            .bind(read as i64)
            .bind(written as i64)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "record session I/O"))?;
        Ok(())
    }

    async fn set_session_peer(&self, id: &str, peer: &str) -> Result<()> {
        sqlx::query("UPDATE sessions SET peer = $2, last_active = $3 WHERE id = $1")
            .bind(id)
            .bind(peer)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "record session peer"))?;
        Ok(())
    }

    async fn unknown_client_policy(&self) -> Result<UnknownClientPolicy> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(POLICY_KEY)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error(e, "read settings"))?;
        match row {
            None => Ok(UnknownClientPolicy::Ignore),
            Some(row) => row
                .try_get::<String, _>("value")
                .map_err(|e| db_error(e, "read settings"))?
                .parse(),
        }
    }

    async fn set_unknown_client_policy(&self, policy: &UnknownClientPolicy) -> Result<()> {
        if let UnknownClientPolicy::RegisterAndAssign { template } = policy {
            self.client(template).await.map_err(|_| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("template client {template} does not exist"),
                )
            })?;
        }
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
            .bind(POLICY_KEY)
            .bind(policy.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "write settings"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_busy;

    /// A write while another connection holds the file exclusively, without waiting:
    /// the error the WAL switch retries on.
    #[tokio::test]
    async fn a_locked_sqlite_file_reads_as_busy() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
        let holder = sqlx::AnyPool::connect(&url).await.unwrap();
        let mut held = holder.acquire().await.unwrap();
        sqlx::raw_sql("CREATE TABLE t (x INTEGER); BEGIN EXCLUSIVE;")
            .execute(&mut *held)
            .await
            .unwrap();
        let other = sqlx::AnyPool::connect(&url).await.unwrap();
        let err = sqlx::raw_sql("PRAGMA busy_timeout = 0; INSERT INTO t VALUES (1);")
            .execute(&other)
            .await
            .unwrap_err();
        assert!(sqlite_busy(&err), "{err}");
        assert!(!sqlite_busy(&sqlx::Error::RowNotFound));
    }
}
