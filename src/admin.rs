//! The admin commands: `vdisk`, `client`, `session`, `policy`. They use the same
//! configuration as the server, so they reach the same catalog and backends.

use clap::{Args, Subcommand};
use osstream_catalog::{
    BootMethod, Catalog, Client, ClientChanges, Mac, SqlCatalog, UnknownClientPolicy, Vdisk,
    VdiskChanges, VdiskMode, WriteCache,
};
use osstream_core::{BackendContext, Error, ErrorKind, Result};
use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Clone, Subcommand)]
pub enum VdiskCommand {
    /// Register an image of a backend as a vdisk.
    Add(VdiskAdd),
    /// List vdisks.
    List,
    /// Show one vdisk.
    Show { name: String },
    /// Change a vdisk.
    Set(VdiskSet),
    /// Remove a vdisk (refused while it has live sessions, unless --force).
    Rm {
        name: String,
        /// Close its live sessions and remove it anyway.
        #[arg(long)]
        force: bool,
    },
    /// Clear a private vdisk's write lock left by a session that is gone.
    ///
    /// Refused while the holding session is attached on a server whose heartbeat is
    /// fresh (its client is writing), unless --force.
    Unlock {
        name: String,
        /// Unlock even while the holder is attached on a live server: its later flushes
        /// fail (they are fenced by the lock's epoch), but a write already on its way to
        /// file, block or NFS storage may still land after the next holder's.
        #[arg(long)]
        force: bool,
    },
    /// Upload a local disk image to a backend and register it as a vdisk.
    ///
    /// Works on `file` and `s3` backends. On S3 the backend's `layout` decides how the
    /// image is stored: one object (read-only), or chunks (needed for a private vdisk,
    /// with `writable = true`). Raw images are stored as they are; qcow2, VMDK, VHD(X)
    /// and VDI images are first converted to raw with `qemu-img convert` (qemu-utils),
    /// which needs free space in data_dir for the whole raw image. The stored image is
    /// read back and its SHA-256 compared with the file's before the vdisk is registered.
    Import(VdiskImport),
    /// Download a vdisk's base image (without any client's overlay) to a raw, sparse file.
    ///
    /// Safe while the server runs; for a private vdisk in use, it shows what its client
    /// has flushed so far.
    Export(VdiskExport),
}

#[derive(Debug, Clone, Args)]
pub struct VdiskImport {
    /// The local image file (raw, or any format qemu-img reads).
    pub file: std::path::PathBuf,
    #[command(flatten)]
    pub add: VdiskAdd,
    /// Overwrite an existing image of that name on the backend (and update the vdisk if
    /// it is registered already).
    #[arg(long)]
    pub replace: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskExport {
    /// The vdisk to export.
    pub name: String,
    /// The file to write (zero runs become holes).
    pub file: std::path::PathBuf,
    /// raw, or qcow2 (written raw next to FILE, then converted with qemu-img). Default:
    /// qcow2 when FILE ends in .qcow2, else raw.
    #[arg(long)]
    pub format: Option<String>,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskAdd {
    /// The vdisk's name (letters, digits, '.', '_', '-').
    pub name: String,
    /// The backend holding the image (`[backends.NAME]` in the configuration).
    #[arg(long)]
    pub backend: String,
    /// The image's name on the backend (default: the vdisk's name).
    #[arg(long)]
    pub key: Option<String>,
    /// standard: shared base, per-session overlays; private: one writer, writes to the vdisk.
    #[arg(long, default_value = "standard")]
    pub mode: String,
    /// Where standard-mode writes go: ram, ram-overflow-disk, server-disk, server-disk-persistent.
    #[arg(long, default_value = "ram-overflow-disk")]
    pub write_cache: String,
    /// How clients boot it: linux-nbd or sanboot.
    #[arg(long, default_value = "sanboot")]
    pub boot: String,
    /// Kernel image key on the same backend (linux-nbd).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initrd image key on the same backend (linux-nbd).
    #[arg(long)]
    pub initrd: Option<String>,
    /// Kernel command line (linux-nbd).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Free text for listings and boot menus.
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Clone, Args)]
pub struct VdiskSet {
    name: String,
    #[arg(long)]
    mode: Option<String>,
    #[arg(long)]
    write_cache: Option<String>,
    #[arg(long)]
    boot: Option<String>,
    /// Kernel key; an empty string clears it.
    #[arg(long)]
    kernel: Option<String>,
    /// Initrd key; an empty string clears it.
    #[arg(long)]
    initrd: Option<String>,
    /// Kernel command line; an empty string clears it.
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// Offer it to clients again.
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Stop offering it to clients (live sessions continue).
    #[arg(long)]
    disable: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Register a client by MAC (aa:bb:cc:dd:ee:ff, aa-bb-.. or aabbcc..).
    Add(ClientFields),
    /// List clients.
    List,
    /// Show one client with its vdisks.
    Show { mac: String },
    /// Change a client (an empty value clears a field).
    Set(ClientFields),
    /// Remove a client (its sessions are closed).
    Rm { mac: String },
    /// Let a client boot a vdisk.
    Assign {
        mac: String,
        vdisk: String,
        /// Make it the client's default vdisk.
        #[arg(long)]
        default: bool,
    },
    /// Take a vdisk away from a client.
    Unassign { mac: String, vdisk: String },
}

#[derive(Debug, Clone, Args)]
pub struct ClientFields {
    mac: String,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    hostname: Option<String>,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    notes: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SessionCommand {
    /// List live sessions (--all: closed ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Open a session of a client on one of its vdisks; prints the client's nbd:// URI.
    Open { mac: String, vdisk: String },
    /// Close a session by id.
    Close { id: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Show what happens when an unknown MAC boots.
    Show,
    /// Set it: ignore, register, or register-and-assign:TEMPLATE_MAC.
    Set { policy: String },
}

/// Builds the backend `[backends.NAME]` of the configuration; with `catalog`, backends
/// that commit fenced writes there (chunked S3 images) read what was committed.
pub fn backend_named(
    config: &Config,
    name: &str,
    catalog: Option<&SqlCatalog>,
) -> Result<osstream_core::DynBackend> {
    let table = config.backends.get(name).cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "no backend named {name:?}; configured backends: {}",
                config
                    .backends
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let ctx = BackendContext {
        data_dir: config.data_dir.clone(),
        ledger: catalog.map(|c| {
            std::sync::Arc::new(c.clone()) as std::sync::Arc<dyn osstream_core::ImageLedger>
        }),
    };
    crate::serve::registry().build_backend(&ctx, name, table)
}

/// Records where the bytes of the vdisks that have no image identity yet live (vdisks
/// registered before identities were kept), for every vdisk whose backend this
/// configuration has (plugins excepted: naming their images means loading them). The
/// server does it for all vdisks at start-up; this covers admin commands run before.
pub async fn fill_image_ids(config: &Config, catalog: &SqlCatalog) -> Result<()> {
    let mut built: std::collections::BTreeMap<String, Option<osstream_core::DynBackend>> =
        std::collections::BTreeMap::new();
    let mut ids = Vec::new();
    for vdisk in catalog.vdisks().await? {
        if vdisk.image_id.is_some() {
            continue;
        }
        let backend = built.entry(vdisk.backend.clone()).or_insert_with(|| {
            let table = config.backends.get(&vdisk.backend)?;
            let is_plugin = matches!(table.get("kind"), Some(figment::value::Value::String(_, k)) if k == "plugin");
            if is_plugin {
                return None;
            }
            backend_named(config, &vdisk.backend, Some(catalog)).ok()
        });
        if let Some(backend) = backend
            && let Ok(identity) = backend.identity(&vdisk.key)
        {
            ids.push((vdisk.name, identity));
        }
    }
    catalog.set_image_ids(&ids).await.map(drop)
}

/// Registers the image `key` (described by `stat`) as the vdisk `add.name`; `image_id`
/// is where its bytes live (the backend's identity of it).
pub async fn register_vdisk(
    catalog: &SqlCatalog,
    add: &VdiskAdd,
    key: String,
    stat: &osstream_core::ImageStat,
    image_id: String,
) -> Result<Vdisk> {
    let mode = add.mode.parse::<VdiskMode>()?;
    if mode == VdiskMode::Private && !stat.writable {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            format!(
                "backend {:?} serves {key:?} read-only; a private vdisk is written by its client: \
                 set writable = true in [backends.{}]",
                add.backend, add.backend
            ),
        ));
    }
    let vdisk = Vdisk {
        name: add.name.clone(),
        backend: add.backend.clone(),
        key,
        size: stat.size,
        mode,
        write_cache: add.write_cache.parse::<WriteCache>()?,
        boot: add.boot.parse::<BootMethod>()?,
        kernel: add.kernel.clone(),
        initrd: add.initrd.clone(),
        cmdline: add.cmdline.clone(),
        description: add.description.clone(),
        enabled: true,
        locked_by: None,
        created_at: 0,
        image_id: Some(image_id),
    };
    catalog.add_vdisk(&vdisk).await?;
    catalog.vdisk(&vdisk.name).await
}

/// The catalog the configuration names.
pub async fn open_catalog(config: &Config) -> Result<SqlCatalog> {
    let url = config.catalog_url();
    if url.starts_with("sqlite:") {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::from_io(
                e,
                format!("cannot create data_dir {}", config.data_dir.display()),
            )
        })?;
    }
    SqlCatalog::open(&url).await
}

fn empty_is_none(value: Option<String>) -> Option<Option<String>> {
    value.map(|v| if v.is_empty() { None } else { Some(v) })
}

/// Prints `value` as JSON, or `rows` as an aligned table under `headers`.
fn output<T: Serialize>(
    json: bool,
    value: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<()> {
    if json {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| Error::new(ErrorKind::Unexpected, e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    Ok(())
}

/// A byte count for people: `512B`, `4.0KiB`, `97.7MiB`, `1.5GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".to_owned())
}

fn when(ms: Option<i64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) => {
            let secs = ms / 1000;
            let (days, rest) = (secs / 86_400, secs % 86_400);
            // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            format!(
                "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            )
        }
    }
}

fn vdisk_rows(vdisks: &[Vdisk]) -> Vec<Vec<String>> {
    vdisks
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format!("{}:{}", v.backend, v.key),
                osstream_core::ByteSize(v.size).to_string(),
                v.mode.to_string(),
                // A private vdisk is written in place: no write cache applies.
                if v.mode == VdiskMode::Private {
                    "-".into()
                } else {
                    v.write_cache.to_string()
                },
                v.boot.to_string(),
                if v.enabled { "yes".into() } else { "no".into() },
                opt(&v.locked_by),
                v.description.clone(),
            ]
        })
        .collect()
}

const VDISK_HEADERS: &[&str] = &[
    "NAME",
    "IMAGE",
    "SIZE",
    "MODE",
    "WRITE CACHE",
    "BOOT",
    "ENABLED",
    "LOCKED BY",
    "DESCRIPTION",
];

pub async fn vdisk(config: &Config, command: &VdiskCommand, json: bool) -> Result<()> {
    let catalog = open_catalog(config).await?;
    match command.clone() {
        VdiskCommand::Add(add) => {
            let key = add.key.clone().unwrap_or_else(|| add.name.clone());
            let backend = backend_named(config, &add.backend, Some(&catalog))?;
            let stat = match backend.stat(&key).await {
                Ok(stat) => stat,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    // `--key win.img` for the file win.img: keys are image names, which
                    // leave the backend's file extension out.
                    let hint = match key.rsplit_once('.') {
                        Some((stem, _)) if !stem.is_empty() && backend.stat(stem).await.is_ok() => {
                            format!("; keys leave out the file extension: --key {stem}")
                        }
                        _ => String::new(),
                    };
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("backend {:?} has no image {key:?}{hint}", add.backend),
                    ));
                }
                Err(e) => return Err(e),
            };
            let image_id = backend.identity(&key)?;
            fill_image_ids(config, &catalog).await?;
            let vdisk = register_vdisk(&catalog, &add, key, &stat, image_id).await?;
            output(
                json,
                &vdisk,
                VDISK_HEADERS,
                vdisk_rows(std::slice::from_ref(&vdisk)),
            )
        }
        VdiskCommand::Import(import) => {
            let vdisk = crate::transfer::import(config, &catalog, &import).await?;
            output(
                json,
                &vdisk,
                VDISK_HEADERS,
                vdisk_rows(std::slice::from_ref(&vdisk)),
            )
        }
        VdiskCommand::Export(export) => {
            let vdisk = catalog.vdisk(&export.name).await?;
            let backend = backend_named(config, &vdisk.backend, Some(&catalog))?;
            let report = crate::transfer::export(backend, &vdisk, &export).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Error::new(ErrorKind::Unexpected, e.to_string()))?
                );
            } else {
                println!(
                    "exported vdisk {} ({} bytes) to {} ({})\nsha256 {}{}",
                    vdisk.name,
                    report.size,
                    export.file.display(),
                    report.format,
                    report.sha256,
                    if report.format == "raw" {
                        ""
                    } else {
                        " (of the raw image)"
                    }
                );
            }
            Ok(())
        }
        VdiskCommand::List => {
            let vdisks = catalog.vdisks().await?;
            output(json, &vdisks, VDISK_HEADERS, vdisk_rows(&vdisks))
        }
        VdiskCommand::Show { name } => {
            let vdisk = catalog.vdisk(&name).await?;
            output(
                json,
                &vdisk,
                VDISK_HEADERS,
                vdisk_rows(std::slice::from_ref(&vdisk)),
            )
        }
        VdiskCommand::Set(set) => {
            let changes = VdiskChanges {
                mode: set.mode.map(|m| m.parse()).transpose()?,
                write_cache: set.write_cache.map(|m| m.parse()).transpose()?,
                boot: set.boot.map(|m| m.parse()).transpose()?,
                kernel: empty_is_none(set.kernel),
                initrd: empty_is_none(set.initrd),
                cmdline: empty_is_none(set.cmdline),
                description: set.description,
                enabled: if set.enable {
                    Some(true)
                } else if set.disable {
                    Some(false)
                } else {
                    None
                },
                size: None,
            };
            if changes.mode.is_some() {
                fill_image_ids(config, &catalog).await?;
            }
            let vdisk = catalog.update_vdisk(&set.name, &changes).await?;
            output(
                json,
                &vdisk,
                VDISK_HEADERS,
                vdisk_rows(std::slice::from_ref(&vdisk)),
            )
        }
        VdiskCommand::Rm { name, force } => {
            catalog.remove_vdisk(&name, force).await?;
            if !json {
                println!("removed vdisk {name}");
            }
            Ok(())
        }
        VdiskCommand::Unlock { name, force } => {
            check_unlock(config, &catalog, &name, force).await?;
            catalog.unlock_vdisk(&name).await?;
            if !json {
                println!("vdisk {name} is unlocked");
            }
            Ok(())
        }
    }
}

/// Refuses to clear the lock of a private vdisk whose holder is attached on a live server,
/// unless `force` (then says what that risks).
async fn check_unlock(
    config: &Config,
    catalog: &SqlCatalog,
    name: &str,
    force: bool,
) -> Result<()> {
    let vdisk = catalog.vdisk(name).await?;
    let Some(holder) = vdisk.locked_by else {
        return Ok(());
    };
    let Some(session) = catalog
        .sessions(true)
        .await?
        .into_iter()
        .find(|s| s.id == holder)
    else {
        return Ok(());
    };
    let timeout = config.sessions.server_timeout.0.as_millis() as i64;
    let servers = catalog.servers().await?;
    let server = servers
        .iter()
        .find(|s| Some(&s.id) == session.owner.as_ref())
        .filter(|s| s.stopped_at.is_none() && s.heartbeat_age <= timeout);
    let (true, Some(server)) = (session.attached, server) else {
        return Ok(());
    };
    let risk = "its later flushes fail (they are fenced by the lock's epoch), but writes already on \
                their way to file, block or NFS storage may still land after the next holder's";
    if force {
        eprintln!(
            "osstream: warning: unlocking while session {holder} is attached on server {}: {risk}",
            server.name
        );
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "vdisk {name:?} is locked by session {holder} of client {}, attached on server {} ({}, heartbeat {}s ago): \
             its client is writing now. Unlocking lets another client write meanwhile: {risk}. \
             Close the session once the client is off (osstream session close {holder}), or pass --force",
            session.mac,
            server.name,
            server.nbd_address.as_deref().unwrap_or("no NBD address"),
            server.heartbeat_age / 1000
        ),
    ))
}

fn client_rows(clients: &[Client]) -> Vec<Vec<String>> {
    clients
        .iter()
        .map(|c| {
            vec![
                c.mac.to_string(),
                opt(&c.name),
                opt(&c.hostname),
                opt(&c.group),
                when(c.first_seen),
                when(c.last_seen),
                c.notes.clone(),
            ]
        })
        .collect()
}

const CLIENT_HEADERS: &[&str] = &[
    "MAC",
    "NAME",
    "HOSTNAME",
    "GROUP",
    "FIRST SEEN",
    "LAST SEEN",
    "NOTES",
];

pub async fn client(config: &Config, command: &ClientCommand, json: bool) -> Result<()> {
    let catalog = open_catalog(config).await?;
    match command.clone() {
        ClientCommand::Add(fields) => {
            let client = Client {
                mac: fields.mac.parse()?,
                name: fields.name.filter(|v| !v.is_empty()),
                hostname: fields.hostname.filter(|v| !v.is_empty()),
                group: fields.group.filter(|v| !v.is_empty()),
                notes: fields.notes.unwrap_or_default(),
                first_seen: None,
                last_seen: None,
                created_at: 0,
            };
            catalog.add_client(&client).await?;
            let client = catalog.client(&client.mac).await?;
            output(
                json,
                &client,
                CLIENT_HEADERS,
                client_rows(std::slice::from_ref(&client)),
            )
        }
        ClientCommand::List => {
            let clients = catalog.clients().await?;
            output(json, &clients, CLIENT_HEADERS, client_rows(&clients))
        }
        ClientCommand::Show { mac } => {
            let mac: Mac = mac.parse()?;
            let client = catalog.client(&mac).await?;
            let assignments = catalog.assignments(&mac).await?;
            if json {
                #[derive(Serialize)]
                struct Shown<'a> {
                    #[serde(flatten)]
                    client: &'a Client,
                    vdisks: &'a [osstream_catalog::Assignment],
                }
                return output(
                    true,
                    &Shown {
                        client: &client,
                        vdisks: &assignments,
                    },
                    &[],
                    Vec::new(),
                );
            }
            output(
                false,
                &client,
                CLIENT_HEADERS,
                client_rows(std::slice::from_ref(&client)),
            )?;
            println!();
            let rows = assignments
                .iter()
                .map(|a| {
                    vec![
                        a.position.to_string(),
                        a.vdisk.clone(),
                        if a.is_default {
                            "default".into()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            output(false, &assignments, &["#", "VDISK", ""], rows)
        }
        ClientCommand::Set(fields) => {
            let mac: Mac = fields.mac.parse()?;
            let changes = ClientChanges {
                name: empty_is_none(fields.name),
                hostname: empty_is_none(fields.hostname),
                group: empty_is_none(fields.group),
                notes: fields.notes,
            };
            let client = catalog.update_client(&mac, &changes).await?;
            output(
                json,
                &client,
                CLIENT_HEADERS,
                client_rows(std::slice::from_ref(&client)),
            )
        }
        ClientCommand::Rm { mac } => {
            let mac: Mac = mac.parse()?;
            catalog.remove_client(&mac).await?;
            if !json {
                println!("removed client {mac}");
            }
            Ok(())
        }
        ClientCommand::Assign {
            mac,
            vdisk,
            default,
        } => {
            let mac: Mac = mac.parse()?;
            let assignment = catalog.assign(&mac, &vdisk, default).await?;
            let row = vec![vec![
                mac.to_string(),
                vdisk,
                assignment.position.to_string(),
                assignment.is_default.to_string(),
            ]];
            output(
                json,
                &assignment,
                &["MAC", "VDISK", "POSITION", "DEFAULT"],
                row,
            )
        }
        ClientCommand::Unassign { mac, vdisk } => {
            let mac: Mac = mac.parse()?;
            catalog.unassign(&mac, &vdisk).await?;
            if !json {
                println!("vdisk {vdisk} is no longer assigned to {mac}");
            }
            Ok(())
        }
    }
}

/// Where clients reach a session: its `nbd://` URI when the address clients use is known,
/// else a hint saying how to make it known.
struct SessionAddress {
    uri: Option<String>,
    hint: Option<String>,
}

/// What running servers registered of their NBD address.
enum Registered {
    /// No server is running (or none registered yet).
    Nobody,
    /// A running server's `HOST:PORT` (its real listener, also one of `serve --listen`)
    /// or `unix:PATH`.
    Address(String),
    /// Servers run, but listen on wildcard addresses only and have no `public_address`.
    Unknown(Vec<String>),
}

/// The URI of `export` at `address` (`HOST:PORT` or `unix:PATH`).
fn uri_at(address: &str, export: &str) -> String {
    match address.strip_prefix("unix:") {
        Some(socket) => format!("nbd+unix:///{export}?socket={socket}"),
        None => format!("nbd://{address}/{export}"),
    }
}

/// The URI of `export` as a client must use it: the address a running server registered
/// in the catalog (what it really listens on, also with `serve --listen`, and its
/// `public_address`); with no server running, the configuration's `public_address`, a
/// specific TCP listen address, or its unix socket. Otherwise no URI: the export name
/// alone, with a hint.
fn session_address(config: &Config, export: &str, registered: Registered) -> SessionAddress {
    let hint = |what: String| SessionAddress {
        uri: None,
        hint: Some(format!(
            "{what} and no address for clients is known: set [nbd] public_address to the address \
             clients use (the export name alone is printed)"
        )),
    };
    let known = |address: &str| SessionAddress {
        uri: Some(uri_at(address, export)),
        hint: None,
    };
    match registered {
        Registered::Address(address) => return known(&address),
        Registered::Unknown(servers) => {
            return hint(format!(
                "the running server(s) {} listen on a wildcard address",
                servers.join(", ")
            ));
        }
        Registered::Nobody => {}
    }
    let nbd = &config.nbd;
    if let Some(address) = nbd.public_address_for(&nbd.listen) {
        return known(&address);
    }
    if nbd.listen.iter().all(|a| a.starts_with("unix:"))
        && let Some(socket) = nbd.listen.first()
    {
        return known(socket);
    }
    hint(format!("the server listens on {}", nbd.listen.join(", ")))
}

/// What the running servers registered: this configuration's own server first (the
/// one whose id is in its data_dir), else the most recently started one.
async fn registered_address(config: &Config, catalog: &SqlCatalog) -> Result<Registered> {
    let timeout = config.sessions.server_timeout.0.as_millis() as i64;
    let mut live = catalog.live_servers(timeout).await?;
    let own = std::fs::read_to_string(config.data_dir.join("server-id"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_default();
    live.sort_by_key(|s| (s.id != own, std::cmp::Reverse(s.started_at)));
    Ok(match live.iter().find_map(|s| s.nbd_address.clone()) {
        Some(address) => Registered::Address(address),
        None if live.is_empty() => Registered::Nobody,
        None => Registered::Unknown(live.iter().map(|s| s.name.clone()).collect()),
    })
}

pub async fn session(config: &Config, command: &SessionCommand, json: bool) -> Result<()> {
    let catalog = open_catalog(config).await?;
    match command.clone() {
        SessionCommand::List { all } => {
            let sessions = catalog.sessions(all).await?;
            let servers = catalog.servers().await?;
            let server_name = |id: &Option<String>| {
                servers
                    .iter()
                    .find(|s| Some(&s.id) == id.as_ref())
                    .map_or_else(
                        || opt(id),
                        |s| format!("{} ({})", s.name, s.nbd_address.as_deref().unwrap_or("-")),
                    )
            };
            let rows = sessions
                .iter()
                .map(|s| {
                    let state = match (&s.closed_at, s.attached, s.detached_at) {
                        (Some(_), _, _) => {
                            format!("ended: {}", s.end_reason.as_deref().unwrap_or("closed"))
                        }
                        (None, true, _) => "attached".to_owned(),
                        (None, false, Some(at)) => {
                            format!("no connection since {}", when(Some(at)))
                        }
                        (None, false, None) => "waiting for its client".to_owned(),
                    };
                    vec![
                        s.id.clone(),
                        s.mac.to_string(),
                        s.vdisk.clone(),
                        opt(&s.peer),
                        server_name(&s.owner),
                        when(Some(s.started_at)),
                        human_bytes(s.bytes_read),
                        human_bytes(s.bytes_written),
                        state,
                    ]
                })
                .collect();
            output(
                json,
                &sessions,
                &[
                    "ID", "MAC", "VDISK", "PEER", "SERVER", "STARTED", "READ", "WRITTEN", "STATE",
                ],
                rows,
            )
        }
        SessionCommand::Open { mac, vdisk } => {
            let mac: Mac = mac.parse()?;
            let session = catalog.open_session(&mac, &vdisk, None).await?;
            let export = session.export_name();
            let registered = registered_address(config, &catalog).await?;
            let address = session_address(config, &export, registered);
            if json {
                #[derive(Serialize)]
                struct Opened<'a> {
                    #[serde(flatten)]
                    session: &'a osstream_catalog::Session,
                    export: &'a str,
                    uri: Option<&'a str>,
                    hint: Option<&'a str>,
                }
                return output(
                    true,
                    &Opened {
                        session: &session,
                        export: &export,
                        uri: address.uri.as_deref(),
                        hint: address.hint.as_deref(),
                    },
                    &[],
                    Vec::new(),
                );
            }
            if let Some(hint) = &address.hint {
                eprintln!("osstream: {hint}");
            }
            println!("{}", address.uri.unwrap_or(export));
            Ok(())
        }
        SessionCommand::Close { id } => {
            catalog
                .close_session(&id, "closed by an administrator (osstream session close)")
                .await?;
            if !json {
                println!("closed session {id}");
            }
            Ok(())
        }
    }
}

pub async fn policy(config: &Config, command: &PolicyCommand, json: bool) -> Result<()> {
    let catalog = open_catalog(config).await?;
    let policy = match command.clone() {
        PolicyCommand::Show => catalog.unknown_client_policy().await?,
        PolicyCommand::Set { policy } => {
            let policy: UnknownClientPolicy = policy.parse()?;
            catalog.set_unknown_client_policy(&policy).await?;
            policy
        }
    };
    if json {
        return output(true, &policy, &[], Vec::new());
    }
    println!("unknown clients: {policy}");
    Ok(())
}
