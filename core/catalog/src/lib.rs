//! The catalog: which vdisks exist, which clients are known, what each client may boot,
//! and which sessions are live.
//!
//! One implementation, [`SqlCatalog`], over SQLite (the embedded default: a file in the
//! data directory, WAL journal) or PostgreSQL (several servers sharing one catalog),
//! chosen by the URL. Both run the same migrations and the same queries. Every change is
//! visible to the running server at once: nothing is cached outside the database.
//!
//! Validation lives here, so every front end (CLI, HTTP API, boot path) refuses the same
//! bad input with the same message: MACs are normalised, duplicate names refused,
//! assignments need an existing vdisk, a vdisk with live sessions is not removed without
//! `force`.

mod boot;
mod holding;
mod import;
mod ledger;
mod model;
mod placement;
mod profiles;
mod retired;
mod sql;

use osstream_core::Result;

pub use holding::{Holding, ImageRef, ImageUse, ServerRef, SessionTimers, ended, reasons};
pub use import::{ClientEntry, ClientImportOutcome, ClientImportPlan, ImportAction, LineProblem};
pub use model::{
    Assignment, BootMethod, Client, Mac, Server, Session, UnknownClientPolicy, Vdisk, VdiskMode,
    WriteCache, validate_name,
};
pub use placement::{
    BYTES_PER_SECOND_PER_SESSION, Registration, ServerOffer, Subnet, choose as choose_server,
    load as server_load,
};
pub use retired::RetiredImage;
pub use sql::SqlCatalog;

use osstream_core::async_trait;

/// Changes to a client; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct ClientChanges {
    /// New name.
    pub name: Option<Option<String>>,
    /// New hostname.
    pub hostname: Option<Option<String>>,
    /// New group.
    pub group: Option<Option<String>>,
    /// New reserved address (`Some(None)` clears).
    pub ip: Option<Option<std::net::Ipv4Addr>>,
    /// New notes.
    pub notes: Option<String>,
}

/// Changes to a vdisk; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct VdiskChanges {
    /// New mode.
    pub mode: Option<VdiskMode>,
    /// New write cache kind.
    pub write_cache: Option<WriteCache>,
    /// New boot method.
    pub boot: Option<BootMethod>,
    /// New kernel key (`Some(None)` clears).
    pub kernel: Option<Option<String>>,
    /// New initrd key (`Some(None)` clears).
    pub initrd: Option<Option<String>>,
    /// New kernel command line (`Some(None)` clears).
    pub cmdline: Option<Option<String>>,
    /// New description.
    pub description: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New size in bytes (after the image was replaced, `vdisk import --replace`).
    pub size: Option<u64>,
}

/// The catalog's operations.
///
/// # Contract
/// - Lookups of missing records fail with `ErrorKind::NotFound`, naming what is missing.
/// - Duplicates (MAC, client name, hostname, vdisk name) and removals that would break a
///   live session fail with `ErrorKind::Conflict`.
/// - Malformed input (MAC, names, enum values) fails with `ErrorKind::InvalidInput`
///   before anything is written.
/// - Every method is safe to call concurrently, from several servers on PostgreSQL.
#[async_trait]
pub trait Catalog: Send + Sync + std::fmt::Debug {
    /// Adds a vdisk.
    async fn add_vdisk(&self, vdisk: &Vdisk) -> Result<()>;
    /// Every vdisk, by name.
    async fn vdisks(&self) -> Result<Vec<Vdisk>>;
    /// One vdisk.
    async fn vdisk(&self, name: &str) -> Result<Vdisk>;
    /// Changes a vdisk; returns it as it is now.
    async fn update_vdisk(&self, name: &str, changes: &VdiskChanges) -> Result<Vdisk>;
    /// Removes a vdisk and its assignments; with live sessions only if `force` (which
    /// closes them).
    async fn remove_vdisk(&self, name: &str, force: bool) -> Result<()>;
    /// Clears a private vdisk's write lock left by a session that is gone.
    async fn unlock_vdisk(&self, name: &str) -> Result<()>;

    /// Adds a client.
    async fn add_client(&self, client: &Client) -> Result<()>;
    /// Every client, by MAC.
    async fn clients(&self) -> Result<Vec<Client>>;
    /// One client.
    async fn client(&self, mac: &Mac) -> Result<Client>;
    /// Changes a client; returns it as it is now.
    async fn update_client(&self, mac: &Mac, changes: &ClientChanges) -> Result<Client>;
    /// Removes a client, its assignments, and closes its sessions.
    async fn remove_client(&self, mac: &Mac) -> Result<()>;
    /// Records that the client booted now (first and last seen).
    async fn touch_client(&self, mac: &Mac) -> Result<()>;

    /// Lets a client boot a vdisk (appended to its menu; `default` makes it the default).
    async fn assign(&self, mac: &Mac, vdisk: &str, default: bool) -> Result<Assignment>;
    /// Takes a vdisk away from a client.
    async fn unassign(&self, mac: &Mac, vdisk: &str) -> Result<()>;
    /// A client's vdisks, in menu order.
    async fn assignments(&self, mac: &Mac) -> Result<Vec<Assignment>>;

    /// Opens a session of `mac` on `vdisk`, which must be assigned to it. The client's
    /// earlier live sessions are closed (one client, one session).
    async fn open_session(&self, mac: &Mac, vdisk: &str, peer: Option<&str>) -> Result<Session>;
    /// The session with this token, live or not.
    async fn session_by_token(&self, token: &str) -> Result<Session>;
    /// Sessions, newest first; only live ones unless `all`.
    async fn sessions(&self, all: bool) -> Result<Vec<Session>>;
    /// Closes a session by id (and releases any private-vdisk lock it held); `reason`
    /// is what `session list --all` and the client's refusal say about it.
    async fn close_session(&self, id: &str, reason: &str) -> Result<()>;
    /// Adds I/O counters to a session and marks it active.
    async fn record_io(&self, id: &str, read: u64, written: u64) -> Result<()>;
    /// Records the peer address a session's client connected from, and marks it active.
    async fn set_session_peer(&self, id: &str, peer: &str) -> Result<()>;

    /// The policy for MACs the catalog does not know.
    async fn unknown_client_policy(&self) -> Result<UnknownClientPolicy>;
    /// Sets that policy.
    async fn set_unknown_client_policy(&self, policy: &UnknownClientPolicy) -> Result<()>;
}
