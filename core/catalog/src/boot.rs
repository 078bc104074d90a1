//! The catalog as the engine's [`BootDirectory`]: clients, boot menus, the unknown-client
//! policy and sessions, as plain engine records. Built on the [`Catalog`] operations alone,
//! so the boot path gets the same validation and messages as the admin commands.

use std::net::Ipv4Addr;

use osstream_core::{
    BootChoice, BootClient, BootDirectory, BootKind, BootSession, Error, ErrorKind, Lease,
    LeaseStore, OverlayKind, Result, UnknownPolicy, async_trait,
};

use crate::Catalog;
use crate::model::{
    Assignment, BootMethod, Client, Mac, Session, UnknownClientPolicy, Vdisk, VdiskMode, WriteCache,
};
use crate::sql::SqlCatalog;

fn boot_client(client: Client) -> BootClient {
    BootClient {
        mac: client.mac.into(),
        ip: client.ip,
        name: client.name,
        hostname: client.hostname,
        group: client.group,
        first_seen: client.first_seen,
        last_seen: client.last_seen,
    }
}

fn boot_kind(method: BootMethod) -> BootKind {
    match method {
        BootMethod::LinuxNbd => BootKind::LinuxNbd,
        BootMethod::LinuxNbdDracut => BootKind::LinuxNbdDracut,
        BootMethod::Sanboot => BootKind::Sanboot,
    }
}

fn boot_choice(assignment: &Assignment, vdisk: Vdisk) -> BootChoice {
    BootChoice {
        vdisk: vdisk.name,
        description: vdisk.description,
        is_default: assignment.is_default,
        boot: boot_kind(vdisk.boot),
        kernel: vdisk.kernel,
        initrd: vdisk.initrd,
        cmdline: vdisk.cmdline,
        backend: vdisk.backend,
        enabled: vdisk.enabled,
    }
}

fn boot_session(session: Session, overlay: Option<OverlayKind>) -> BootSession {
    BootSession {
        export: session.export_name(),
        id: session.id,
        token: session.token,
        mac: session.mac.into(),
        vdisk: session.vdisk,
        overlay,
    }
}

impl Vdisk {
    /// The write overlay a session of this vdisk gets: `None` for a private vdisk,
    /// written in place.
    pub fn overlay(&self) -> Option<OverlayKind> {
        match self.mode {
            VdiskMode::Private => None,
            VdiskMode::Standard => Some(match self.write_cache {
                WriteCache::Ram => OverlayKind::Ram,
                WriteCache::RamOverflowDisk => OverlayKind::RamOverflowDisk,
                WriteCache::ServerDisk => OverlayKind::ServerDisk,
                WriteCache::ServerDiskPersistent => OverlayKind::ServerDiskPersistent,
                WriteCache::SharedDisk => OverlayKind::SharedDisk,
            }),
        }
    }
}

/// The catalog's record of `mac`, or `None` if it has none.
async fn find_client(catalog: &SqlCatalog, mac: &Mac) -> Result<Option<Client>> {
    match catalog.client(mac).await {
        Ok(client) => Ok(Some(client)),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Adds `mac` as `osstream client add` would, then gives it `assignments` (a template's
/// menu) as `osstream client assign [--default]` would, in order. On failure the client
/// is removed again, so a retry starts from scratch.
async fn add_with_assignments(
    catalog: &SqlCatalog,
    mac: &Mac,
    notes: String,
    assignments: &[Assignment],
) -> Result<()> {
    catalog
        .add_client(&Client {
            mac: mac.clone(),
            ip: None,
            name: None,
            hostname: None,
            group: None,
            notes,
            first_seen: None,
            last_seen: None,
            created_at: 0,
        })
        .await?;
    for assignment in assignments {
        if let Err(err) = catalog
            .assign(mac, &assignment.vdisk, assignment.is_default)
            .await
        {
            if let Err(cleanup) = catalog.remove_client(mac).await {
                tracing::warn!(%mac, error = %cleanup, "cannot remove a half-registered client");
            }
            return Err(err);
        }
    }
    Ok(())
}

#[async_trait]
impl BootDirectory for SqlCatalog {
    async fn known_client(&self, mac: &str) -> Result<Option<BootClient>> {
        let mac: Mac = mac.parse()?;
        Ok(find_client(self, &mac).await?.map(boot_client))
    }

    async fn boot_menu(&self, mac: &str) -> Result<Vec<BootChoice>> {
        let mac: Mac = mac.parse()?;
        let mut menu = Vec::new();
        for assignment in self.assignments(&mac).await? {
            match self.vdisk(&assignment.vdisk).await {
                Ok(vdisk) => menu.push(boot_choice(&assignment, vdisk)),
                // Removed since the assignments were read (its assignments went with it).
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(menu)
    }

    async fn unknown_policy(&self) -> Result<UnknownPolicy> {
        Ok(match self.unknown_client_policy().await? {
            UnknownClientPolicy::Ignore => UnknownPolicy::Ignore,
            UnknownClientPolicy::Register => UnknownPolicy::Register,
            UnknownClientPolicy::RegisterAndAssign { template } => {
                UnknownPolicy::RegisterAndAssign {
                    template: template.into(),
                }
            }
        })
    }

    async fn register_client(&self, mac: &str, notes: &str) -> Result<BootClient> {
        let mac: Mac = mac.parse()?;
        let policy = self.unknown_client_policy().await?;
        let assignments = match &policy {
            UnknownClientPolicy::Ignore => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "client {mac} is not registered, and the unknown-client policy \
                         ({policy}) registers no one: add it (osstream client add {mac}) or \
                         change the policy (osstream policy set register)"
                    ),
                ));
            }
            UnknownClientPolicy::Register => Vec::new(),
            UnknownClientPolicy::RegisterAndAssign { template } => {
                // Checked first: a client removed after the policy was set would leave
                // every newcomer registered without vdisks.
                if find_client(self, template).await?.is_none() {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "cannot register client {mac}: the template client {template} of the \
                             unknown-client policy {policy} no longer exists"
                        ),
                    ));
                }
                self.assignments(template).await?
            }
        };
        // Why the client is there, for whoever reads `osstream client list` later.
        let mut record =
            format!("registered on its first boot by the unknown-client policy {policy}");
        if !notes.is_empty() {
            record.push_str(": ");
            record.push_str(notes);
        }
        add_with_assignments(self, &mac, record, &assignments).await?;
        // Registered now: a failure to note when it was seen must not leave a client
        // that a retry would refuse as already known.
        if let Err(err) = self.touch_client(&mac).await {
            tracing::warn!(client = %mac, %err, "registered, but cannot record when it was seen");
        }
        Ok(boot_client(self.client(&mac).await?))
    }

    async fn open_boot_session(
        &self,
        mac: &str,
        vdisk: &str,
        peer: Option<&str>,
    ) -> Result<BootSession> {
        let mac: Mac = mac.parse()?;
        // Read first: a failure after the session opened would leave it open with its
        // token lost. A vdisk's mode does not change while it has live sessions
        // (`update_vdisk` refuses), so this is the session's mode.
        let overlay = self.vdisk(vdisk).await?.overlay();
        let session = self.open_session(&mac, vdisk, peer).await?;
        Ok(boot_session(session, overlay))
    }

    async fn client_seen(&self, mac: &str) -> Result<()> {
        self.touch_client(&mac.parse()?).await
    }

    async fn session_boot(&self, token: &str) -> Result<(BootSession, BootChoice)> {
        let gone = || Error::new(ErrorKind::NotFound, "no live session has this token");
        let session = match self.session_by_token(token).await {
            Ok(session) if session.closed_at.is_none() => session,
            Ok(_) => return Err(gone()),
            Err(err) if err.kind() == ErrorKind::NotFound => return Err(gone()),
            Err(err) => return Err(err),
        };
        let vdisk = self.vdisk(&session.vdisk).await?;
        if !vdisk.enabled {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("vdisk {:?} is disabled", vdisk.name),
            ));
        }
        let assignment = self
            .assignments(&session.mac)
            .await?
            .into_iter()
            .find(|a| a.vdisk == vdisk.name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "vdisk {:?} is no longer assigned to client {}",
                        vdisk.name, session.mac
                    ),
                )
            })?;
        let overlay = vdisk.overlay();
        let choice = boot_choice(&assignment, vdisk);
        Ok((boot_session(session, overlay), choice))
    }
}

fn ip_number(ip: Ipv4Addr) -> i64 {
    i64::from(u32::from(ip))
}

#[async_trait]
impl LeaseStore for SqlCatalog {
    async fn leases(&self, first: Ipv4Addr, last: Ipv4Addr) -> Result<Vec<Lease>> {
        let rows = sqlx::query(
            "SELECT ip, mac, expires_at FROM dhcp_leases WHERE ip >= $1 AND ip <= $2 \
             UNION ALL SELECT ip, mac, $3 AS expires_at FROM clients \
             WHERE ip IS NOT NULL AND ip >= $1 AND ip <= $2 ORDER BY ip",
        )
        .bind(ip_number(first))
        .bind(ip_number(last))
        .bind(i64::MAX)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| crate::sql::db_error(e, "list leases"))?;
        rows.iter()
            .map(|row| {
                use sqlx::Row;
                let map = |e| crate::sql::db_error(e, "read a lease");
                Ok(Lease {
                    ip: Ipv4Addr::from(row.try_get::<i64, _>("ip").map_err(map)? as u32),
                    mac: row.try_get("mac").map_err(map)?,
                    expires_at: row.try_get("expires_at").map_err(map)?,
                })
            })
            .collect()
    }

    async fn bind_lease(&self, ip: Ipv4Addr, mac: &str, expires_at: i64) -> Result<()> {
        let mac: Mac = mac.parse()?;
        let now = crate::sql::now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| crate::sql::db_error(e, "begin"))?;
        let reserved: Option<String> =
            sqlx::query_scalar("SELECT mac FROM clients WHERE ip = $1 AND mac <> $2")
                .bind(ip_number(ip))
                .bind(mac.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| crate::sql::db_error(e, "check reservations"))?;
        // Conflicts roll back at once: a transaction dropped with its write lock held
        // would be rolled back only when its connection returns to the pool, and the next
        // lease (on another connection) could find SQLite busy meanwhile.
        if let Some(owner) = reserved {
            let _ = tx.rollback().await;
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("address {ip} is reserved for {owner}"),
            ));
        }
        let taken = sqlx::query(
            "INSERT INTO dhcp_leases (ip, mac, expires_at, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, expires_at = excluded.expires_at, \
             updated_at = excluded.updated_at \
             WHERE dhcp_leases.mac = excluded.mac OR dhcp_leases.expires_at < $4",
        )
        .bind(ip_number(ip))
        .bind(mac.as_str())
        .bind(expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| crate::sql::db_error(e, "bind a lease"))?;
        if taken.rows_affected() == 0 {
            let _ = tx.rollback().await;
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("address {ip} is leased to another client"),
            ));
        }
        sqlx::query("DELETE FROM dhcp_leases WHERE mac = $1 AND ip <> $2")
            .bind(mac.as_str())
            .bind(ip_number(ip))
            .execute(&mut *tx)
            .await
            .map_err(|e| crate::sql::db_error(e, "end older leases"))?;
        tx.commit()
            .await
            .map_err(|e| crate::sql::db_error(e, "commit a lease"))
    }

    async fn release_lease(&self, ip: Ipv4Addr, mac: &str) -> Result<()> {
        let mac: Mac = mac.parse()?;
        sqlx::query("DELETE FROM dhcp_leases WHERE ip = $1 AND mac = $2")
            .bind(ip_number(ip))
            .bind(mac.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| crate::sql::db_error(e, "release a lease"))?;
        Ok(())
    }
}
