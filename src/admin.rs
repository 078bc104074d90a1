//! The admin commands: `vdisk`, `client`, `session`, `policy`, `profile`. They use the same
//! configuration as the server, so they reach the same catalog and backends.

use osstream_catalog::{
    Catalog, Client, ClientChanges, Mac, SqlCatalog, UnknownClientPolicy, Vdisk, VdiskChanges,
    VdiskMode,
};
use osstream_core::{ByteSize, Error, ErrorKind, Result};
use serde::Serialize;

use crate::address::{registered_address, session_address};
pub use crate::args::{
    CacheCommand, ClientCommand, PolicyCommand, ProfileCommand, ServerCommand, SessionCommand,
    VdiskCommand,
};
use crate::config::Config;
use crate::output::{done, json_text, opt, output, print_json, table, when};
use crate::wiring::{backend_named, fill_image_ids, open_existing_catalog, register_vdisk};

fn empty_is_none(value: Option<String>) -> Option<Option<String>> {
    value.map(|v| if v.is_empty() { None } else { Some(v) })
}

/// Says on stderr when a linux-nbd vdisk's kernel or initrd is not where clients will
/// fetch it: the vdisk is registered, but cannot boot until it is there.
async fn warn_missing_boot_files(
    config: &Config,
    backend: &osstream_core::DynBackend,
    vdisk: &Vdisk,
) {
    if vdisk.boot == osstream_catalog::BootMethod::Sanboot {
        return;
    }
    for (what, key) in [("kernel", &vdisk.kernel), ("initrd", &vdisk.initrd)] {
        match key {
            None => eprintln!(
                "osstream: warning: vdisk {:?} boots {} but has no {what} (osstream vdisk set {} --{what} KEY)",
                vdisk.name, vdisk.boot, vdisk.name
            ),
            Some(key) => {
                let opened = match key.split_once('/') {
                    Some((other, name)) => match backend_named(config, other, None) {
                        Ok(other) => other.open_boot_file(name).await.map(|_| ()),
                        Err(err) => Err(err),
                    },
                    None => backend.open_boot_file(key).await.map(|_| ()),
                };
                if let Err(err) = opened {
                    eprintln!(
                        "osstream: warning: vdisk {:?}: its {what} {key:?} cannot be served yet: {err}",
                        vdisk.name
                    );
                }
            }
        }
    }
}

/// A reservation from the command line: an IPv4 address, or empty to clear.
fn reserved_ip(value: Option<String>) -> Result<Option<Option<std::net::Ipv4Addr>>> {
    match empty_is_none(value) {
        None => Ok(None),
        Some(None) => Ok(Some(None)),
        Some(Some(text)) => text.parse().map(|ip| Some(Some(ip))).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("--ip {text:?} is not an IPv4 address such as 10.0.0.21"),
            )
        }),
    }
}

fn vdisk_rows(vdisks: &[Vdisk]) -> Vec<Vec<String>> {
    vdisks
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format!("{}:{}", v.backend, v.key),
                ByteSize(v.size).human(),
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
    let catalog = open_existing_catalog(config).await?;
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
            let vdisk = register_vdisk(&catalog, &backend, &add, key, &stat, image_id).await?;
            warn_missing_boot_files(config, &backend, &vdisk).await;
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
            refuse_overwriting_an_image(config, &catalog, &export.file).await?;
            let report = crate::transfer::export(backend, &vdisk, &export).await?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "exported vdisk {} ({}, {} bytes) to {} ({})\nsha256 {}{}",
                    vdisk.name,
                    ByteSize(report.size).human(),
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
            if changes.mode == Some(VdiskMode::Private) {
                let vdisk = catalog.vdisk(&set.name).await?;
                let backend = backend_named(config, &vdisk.backend, Some(&catalog))?;
                let stat = backend.stat(&vdisk.key).await?;
                crate::wiring::check_private(&backend, &vdisk.name, &stat).await?;
            }
            let vdisk = catalog.update_vdisk(&set.name, &changes).await?;
            if let Ok(backend) = backend_named(config, &vdisk.backend, Some(&catalog)) {
                warn_missing_boot_files(config, &backend, &vdisk).await;
            }
            output(
                json,
                &vdisk,
                VDISK_HEADERS,
                vdisk_rows(std::slice::from_ref(&vdisk)),
            )
        }
        VdiskCommand::Rm { name, force } => {
            catalog.remove_vdisk(&name, force).await?;
            done(
                json,
                &serde_json::json!({ "removed": "vdisk", "name": name }),
                format_args!("removed vdisk {name}"),
            )
        }
        VdiskCommand::Unlock { name, force } => {
            check_unlock(config, &catalog, &name, force).await?;
            // Read before unlocking: the holder's session is closed with the lock.
            let holder = catalog.vdisk(&name).await?.locked_by;
            catalog.unlock_vdisk(&name).await?;
            let sentence = match &holder {
                Some(session) => {
                    format!("vdisk {name} is unlocked; its session {session} is closed")
                }
                None => format!("vdisk {name} was not locked; nothing to do"),
            };
            done(
                json,
                &serde_json::json!({ "unlocked": "vdisk", "name": name, "closed_session": holder }),
                sentence,
            )
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
    let Ok(session) = catalog.session(&holder).await else {
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
                c.ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
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
    "IP",
    "FIRST SEEN",
    "LAST SEEN",
    "NOTES",
];

pub async fn client(config: &Config, command: &ClientCommand, json: bool) -> Result<()> {
    let catalog = open_existing_catalog(config).await?;
    match command.clone() {
        ClientCommand::Add(fields) => {
            let client = Client {
                mac: fields.mac.parse()?,
                name: fields.name.filter(|v| !v.is_empty()),
                hostname: fields.hostname.filter(|v| !v.is_empty()),
                group: fields.group.filter(|v| !v.is_empty()),
                ip: reserved_ip(fields.ip)?.flatten(),
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
        ClientCommand::List { group } => {
            let mut clients = catalog.clients().await?;
            if let Some(group) = &group {
                let groups: std::collections::BTreeSet<String> =
                    clients.iter().filter_map(|c| c.group.clone()).collect();
                clients.retain(|c| c.group.as_ref() == Some(group));
                // An empty list is a valid answer, but a mistyped group should not look
                // like an empty one.
                if clients.is_empty() {
                    let known = if groups.is_empty() {
                        "no client has a group".to_owned()
                    } else {
                        format!("groups: {}", Vec::from_iter(groups).join(", "))
                    };
                    eprintln!("osstream: no client is in group {group:?} ({known})");
                }
            }
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
                ip: reserved_ip(fields.ip)?,
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
            done(
                json,
                &serde_json::json!({ "removed": "client", "mac": mac }),
                format_args!("removed client {mac}"),
            )
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
        ClientCommand::Import(import) => crate::client_import::run(&catalog, &import, json).await,
        ClientCommand::Unassign { mac, vdisk } => {
            let mac: Mac = mac.parse()?;
            catalog.unassign(&mac, &vdisk).await?;
            done(
                json,
                &serde_json::json!({ "removed": "assignment", "mac": mac, "vdisk": vdisk }),
                format_args!("vdisk {vdisk} is no longer assigned to {mac}"),
            )
        }
    }
}

const SESSION_HEADERS: &[&str] = &[
    "ID", "MAC", "VDISK", "PEER", "SERVER", "STARTED", "READ", "WRITTEN", "STATE",
];

/// The sessions `session list` shows (live ones, or all), and their table rows.
async fn session_list(
    catalog: &SqlCatalog,
    all: bool,
) -> Result<(Vec<osstream_catalog::Session>, Vec<Vec<String>>)> {
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
                // Before a server holds it, the server its client was sent to.
                match (&s.owner, &s.placed_on, s.closed_at) {
                    (None, Some(_), None) => format!("{}, placed", server_name(&s.placed_on)),
                    _ => server_name(&s.owner),
                },
                when(Some(s.started_at)),
                ByteSize(s.bytes_read).human(),
                ByteSize(s.bytes_written).human(),
                state,
            ]
        })
        .collect();
    Ok((sessions, rows))
}

/// `session list --watch`: the list, again every interval.
struct WatchedSessions {
    catalog: SqlCatalog,
    all: bool,
    json: bool,
    /// How to leave the view, when it is live (not `--once`).
    quit: Option<String>,
}

impl crate::watch::Screen for WatchedSessions {
    async fn compose(&mut self) -> Result<String> {
        let (sessions, rows) = session_list(&self.catalog, self.all).await?;
        if self.json {
            // One document per line while watching: a stream a line reader can follow.
            return Ok(json_text(&sessions, self.quit.is_none())? + "\n");
        }
        let now = crate::stats::now_ms();
        let quit = self
            .quit
            .as_ref()
            .map(|q| format!("; {q}"))
            .unwrap_or_default();
        Ok(format!(
            "osstream session list: {} session(s) at {}{quit}\n\n{}",
            sessions.len(),
            when(Some(now)),
            table(SESSION_HEADERS, &rows)
        ))
    }
}

pub async fn session(config: &Config, command: &SessionCommand, json: bool) -> Result<()> {
    let catalog = open_existing_catalog(config).await?;
    match command.clone() {
        SessionCommand::List {
            all,
            watch,
            refresh,
        } => {
            if watch {
                let mut screen = WatchedSessions {
                    catalog,
                    all,
                    json,
                    quit: crate::watch::live_note(&refresh),
                };
                return crate::watch::run(&mut screen, &refresh, json).await;
            }
            if refresh.once || refresh.interval.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "--once and --interval go with --watch: osstream session list --watch --interval 5",
                ));
            }
            let (sessions, rows) = session_list(&catalog, all).await?;
            output(json, &sessions, SESSION_HEADERS, rows)
        }
        SessionCommand::Open { mac, vdisk } => {
            let mac: Mac = mac.parse()?;
            refuse_shared_disk_without_a_server(config, &catalog, &vdisk).await?;
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
            done(
                json,
                &serde_json::json!({ "closed": "session", "id": id }),
                format_args!("closed session {id}"),
            )
        }
    }
}

const SERVER_HEADERS: &[&str] = &[
    "NAME",
    "STATE",
    "NBD",
    "HTTP",
    "CAPACITY",
    "SUBNETS",
    "SESSIONS",
    "TRAFFIC",
    "LOAD",
    "HEARTBEAT",
    "ID",
];

/// `vdisk export` (with `--force` too) never writes over a vdisk's image, by whatever name
/// the target reaches it: its path or a symlink (the same identity), or a hard link (any
/// file with more than one name is refused: its other names would change with it).
/// Writing there would truncate the disk being read, or replace another vdisk's.
async fn refuse_overwriting_an_image(
    config: &Config,
    catalog: &SqlCatalog,
    file: &std::path::Path,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(file) else {
        return Ok(()); // nothing there yet
    };
    if meta.nlink() > 1 {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} has {} hard links: writing it would change the file under its other names \
                 too (a vdisk's image, perhaps); export to a new file",
                file.display(),
                meta.nlink()
            ),
        ));
    }
    fill_image_ids(config, catalog).await?;
    let identity = osstream_core::file_identity(file);
    let vdisks = catalog.vdisks().await?;
    match vdisks
        .iter()
        .find(|v| v.image_id.as_deref() == Some(identity.as_str()))
    {
        Some(owner) => Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} is the image of vdisk {:?}: exporting over it would destroy that disk; \
                 export to another file",
                file.display(),
                owner.name
            ),
        )),
        None => Ok(()),
    }
}

/// A `shared-disk` vdisk's session that no running server could serve (none has the
/// shared overlay folder) is refused when opened, not at its client's connection; with
/// no server running, nothing can be told yet.
async fn refuse_shared_disk_without_a_server(
    config: &Config,
    catalog: &SqlCatalog,
    vdisk: &str,
) -> Result<()> {
    if catalog.vdisk(vdisk).await?.overlay() != Some(osstream_core::OverlayKind::SharedDisk) {
        return Ok(());
    }
    let timeout = config.sessions.server_timeout.0.as_millis() as i64;
    let live: Vec<_> = catalog
        .servers()
        .await?
        .into_iter()
        .filter(|s| s.alive(timeout))
        .collect();
    if live.is_empty() || live.iter().any(|s| s.shared_overlays) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "vdisk {vdisk:?} keeps its writes in a shared-disk overlay, and no running server has \
             [sessions] shared_overlay_dir (a folder every server mounts): set it, or give the \
             vdisk another --write-cache"
        ),
    ))
}

pub async fn server(config: &Config, command: &ServerCommand, json: bool) -> Result<()> {
    let catalog = open_existing_catalog(config).await?;
    let timeout = config.sessions.server_timeout.0.as_millis() as i64;
    match command {
        ServerCommand::List => {
            #[derive(Serialize)]
            struct Listed<'a> {
                #[serde(flatten)]
                server: &'a osstream_catalog::Server,
                state: &'static str,
                load: f64,
            }
            let servers = catalog.servers().await?;
            let listed: Vec<Listed> = servers
                .iter()
                .map(|server| Listed {
                    server,
                    state: server.state(timeout),
                    load: osstream_catalog::server_load(server),
                })
                .collect();
            let rows = listed
                .iter()
                .map(|l| {
                    let s = l.server;
                    // A gone or stopped server's last report is no traffic now.
                    let alive = s.alive(timeout);
                    vec![
                        s.name.clone(),
                        l.state.to_owned(),
                        opt(&s.nbd_address),
                        opt(&s.http_url),
                        format!("{}", s.capacity),
                        if s.subnets.is_empty() {
                            "-".to_owned()
                        } else {
                            s.subnets.join(",")
                        },
                        s.sessions.to_string(),
                        if alive {
                            format!("{}/s", ByteSize(s.bytes_per_sec).human())
                        } else {
                            "-".to_owned()
                        },
                        if alive {
                            format!("{:.2}", l.load)
                        } else {
                            "-".to_owned()
                        },
                        format!("{:.1}s ago", s.heartbeat_age.max(0) as f64 / 1000.0),
                        s.id.clone(),
                    ]
                })
                .collect();
            output(json, &listed, SERVER_HEADERS, rows)
        }
        ServerCommand::Drain { server } | ServerCommand::Undrain { server } => {
            let draining = matches!(command, ServerCommand::Drain { .. });
            let changed = catalog.set_draining(server, draining).await?;
            let sentence = if draining {
                format!(
                    "server {} ({}) takes no new sessions; it keeps its {} live session(s)",
                    changed.name, changed.id, changed.sessions
                )
            } else {
                format!(
                    "server {} ({}) takes new sessions again",
                    changed.name, changed.id
                )
            };
            done(
                json,
                &serde_json::json!({ "server": changed.name, "id": changed.id, "draining": draining }),
                sentence,
            )
        }
        ServerCommand::Rm { server } => {
            let removed = catalog.remove_server(server, timeout).await?;
            done(
                json,
                &serde_json::json!({ "removed": "server", "name": removed.name, "id": removed.id }),
                format!(
                    "server {} ({}) removed from the catalog",
                    removed.name, removed.id
                ),
            )
        }
    }
}

pub async fn policy(config: &Config, command: &PolicyCommand, json: bool) -> Result<()> {
    let catalog = open_existing_catalog(config).await?;
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

/// Whether `profile` describes the image `vdisk` has now: `Some(true)` current,
/// `Some(false)` stale, `None` when the backend cannot say (not configured, unreachable).
async fn profile_is_current(
    config: &Config,
    vdisk: &Vdisk,
    profile: &osstream_core::BootProfile,
) -> Option<bool> {
    let backend = backend_named(config, &vdisk.backend, None).ok()?;
    let identity = backend.identity(&vdisk.key).ok()?;
    let stat = backend.stat(&vdisk.key).await.ok()?;
    // A standard vdisk's sessions see `GENERATION+wEPOCH` once a private session wrote it.
    let recorded = profile
        .generation
        .rsplit_once("+w")
        .map_or(profile.generation.as_str(), |(generation, _)| generation);
    Some(identity == profile.image && recorded == stat.generation)
}

fn describe_currency(current: Option<bool>) -> &'static str {
    match current {
        Some(true) => "current",
        Some(false) => {
            "not usable: recorded from another image or an older version of this one; the next boot records a new one"
        }
        None => "unknown: the vdisk's backend cannot be asked from here",
    }
}

pub async fn profile(config: &Config, command: &ProfileCommand, json: bool) -> Result<()> {
    use osstream_core::{BootProfile, ProfileStore};
    let catalog = open_existing_catalog(config).await?;
    let stored = |vdisk: &str| {
        let (catalog, vdisk) = (catalog.clone(), vdisk.to_owned());
        async move {
            catalog.vdisk(&vdisk).await?;
            catalog.profile(&vdisk).await?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("vdisk {vdisk:?} has no boot profile yet: one is recorded when a client boots it"),
                )
            })
        }
    };
    match command.clone() {
        ProfileCommand::Show { vdisk, blocks } => {
            let profile = stored(&vdisk).await?;
            let record = catalog.vdisk(&vdisk).await?;
            let current = profile_is_current(config, &record, &profile).await;
            let boot_set: Vec<u64> = profile.boot_set().collect();
            if json {
                #[derive(Serialize)]
                struct Shown<'a> {
                    vdisk: &'a str,
                    image: &'a str,
                    generation: &'a str,
                    current: Option<bool>,
                    boots: u32,
                    block_size: u64,
                    blocks: usize,
                    boot_set_blocks: usize,
                    boot_set_bytes: u64,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    boot_set: Option<&'a [u64]>,
                }
                return output(
                    true,
                    &Shown {
                        vdisk: &vdisk,
                        image: &profile.image,
                        generation: &profile.generation,
                        current,
                        boots: profile.boots,
                        block_size: profile.block_size,
                        blocks: profile.blocks.len(),
                        boot_set_blocks: boot_set.len(),
                        boot_set_bytes: profile.boot_set_bytes(),
                        boot_set: blocks.then_some(&boot_set[..]),
                    },
                    &[],
                    Vec::new(),
                );
            }
            println!("vdisk:       {vdisk}");
            println!("image:       {}", profile.image);
            println!(
                "generation:  {} ({})",
                profile.generation,
                describe_currency(current)
            );
            println!("boots:       {}", profile.boots);
            println!(
                "boot set:    {} in {} blocks of {} (streamed ahead of each boot)",
                ByteSize(profile.boot_set_bytes()).human(),
                boot_set.len(),
                ByteSize(profile.block_size).human()
            );
            println!(
                "also seen:   {} blocks read by fewer than half of the recent boots",
                profile.blocks.len() - boot_set.len()
            );
            if blocks {
                let list: Vec<String> = boot_set.iter().map(u64::to_string).collect();
                println!("blocks:      {}", list.join(" "));
            }
            Ok(())
        }
        ProfileCommand::Clear { vdisk } => {
            catalog.vdisk(&vdisk).await?;
            let had = catalog.clear_profile(&vdisk).await?;
            if json {
                return output(
                    true,
                    &serde_json::json!({ "vdisk": vdisk, "cleared": had }),
                    &[],
                    Vec::new(),
                );
            }
            if had {
                println!("cleared the boot profile of vdisk {vdisk}");
            } else {
                println!("vdisk {vdisk} had no boot profile");
            }
            Ok(())
        }
        ProfileCommand::Export {
            vdisk,
            output: file,
        } => {
            let text = stored(&vdisk).await?.to_json();
            match file {
                Some(path) => {
                    std::fs::write(&path, text + "\n").map_err(|e| {
                        Error::from_io(e, format!("cannot write {}", path.display()))
                    })?;
                    let file = path.display().to_string();
                    done(
                        json,
                        &serde_json::json!({ "exported": "profile", "vdisk": vdisk, "file": file }),
                        format_args!("wrote the boot profile of vdisk {vdisk} to {file}"),
                    )
                }
                // The profile is JSON already: the same text with or without --json.
                None => {
                    println!("{text}");
                    Ok(())
                }
            }
        }
        ProfileCommand::Import { vdisk, file } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|e| Error::from_io(e, "cannot read the profile from stdin"))?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| Error::from_io(e, format!("cannot read {}", file.display())))?
            };
            let mut profile = BootProfile::from_json(&text)?;
            let record = catalog.vdisk(&vdisk).await?;
            profile.vdisk = vdisk.clone();
            let current = profile_is_current(config, &record, &profile).await;
            catalog.put_profile(&profile).await?;
            if json {
                return output(
                    true,
                    &serde_json::json!({ "vdisk": vdisk, "boots": profile.boots,
                        "boot_set_bytes": profile.boot_set_bytes(), "current": current }),
                    &[],
                    Vec::new(),
                );
            }
            println!(
                "imported a boot profile of {} boot(s), boot set {}, into vdisk {vdisk}",
                profile.boots,
                ByteSize(profile.boot_set_bytes()).human()
            );
            if current == Some(false) {
                eprintln!(
                    "osstream: warning: the profile was recorded from another image or generation than vdisk {vdisk} has now; it will not be used"
                );
            }
            Ok(())
        }
    }
}

pub fn cache(config: &Config, command: &CacheCommand, json: bool) -> Result<()> {
    let CacheCommand::Stats = command;
    let stats = crate::stats::read(&config.data_dir)?;
    if json {
        return output(true, &stats, &[], Vec::new());
    }
    let age = (crate::stats::now_ms() - stats.updated_at).max(0) / 1000;
    let alive = crate::stats::process_alive(stats.pid);
    let state = if stats.running && alive {
        format!("running (pid {}), counted {age}s ago", stats.pid)
    } else if stats.running {
        format!(
            "not running: pid {} is gone without a clean stop (killed or crashed); these are its counts from {age}s before",
            stats.pid
        )
    } else {
        format!("stopped, counted when it stopped {age}s ago")
    };
    println!("server {}: {state}; counts since it started", stats.server);
    let number = |report: &osstream_core::LayerReport, name: &str| report.get(name).unwrap_or(0);
    let caches: Vec<&osstream_core::LayerReport> = stats
        .layers
        .iter()
        .rev()
        .filter(|r| r.layer.starts_with("cache:"))
        .collect();
    if caches.is_empty() {
        println!("no cache tier is configured");
    } else {
        let rows = caches
            .iter()
            .map(|r| {
                let (hits, misses) = (number(r, "hits"), number(r, "misses"));
                let ratio = if hits + misses == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
                };
                vec![
                    r.layer.trim_start_matches("cache:").to_owned(),
                    hits.to_string(),
                    misses.to_string(),
                    ratio,
                    number(r, "coalesced").to_string(),
                    number(r, "evictions").to_string(),
                    format!(
                        "{} / {}",
                        ByteSize(number(r, "bytes")).human(),
                        ByteSize(number(r, "capacity")).human()
                    ),
                    number(r, "backend_reads").to_string(),
                    ByteSize(number(r, "backend_bytes")).human(),
                ]
            })
            .collect();
        output(
            false,
            &(),
            &[
                "TIER",
                "HITS",
                "MISSES",
                "HIT RATIO",
                "COALESCED",
                "EVICTIONS",
                "HELD",
                "READS BELOW",
                "BYTES BELOW",
            ],
            rows,
        )?;
        println!(
            "(blocks; READS/BYTES BELOW: what each tier asked of the tier or backend under it)"
        );
    }
    if let Some(hedge) = stats.layers.iter().find(|r| r.layer == "hedge") {
        println!(
            "hedged reads: {} of {} backend reads sent twice ({} answered first by the second request, {} over budget)",
            number(hedge, "hedged"),
            number(hedge, "reads"),
            number(hedge, "hedge_won"),
            number(hedge, "over_budget"),
        );
    }
    if let Some(profile) = stats.layers.iter().find(|r| r.layer == "profile") {
        println!(
            "boot profiles: {} boot(s) recorded, {} prefetch(es) ({} in {} reads, {} failed), {} stale profile(s) skipped",
            number(profile, "boots_recorded"),
            number(profile, "prefetches"),
            ByteSize(number(profile, "prefetch_bytes")).human(),
            number(profile, "prefetch_reads"),
            number(profile, "prefetch_errors"),
            number(profile, "stale_profiles"),
        );
    }
    Ok(())
}

/// `osstream init`: the data folder and the catalog, created if missing.
pub async fn init(config: &Config, json: bool) -> Result<()> {
    #[derive(Serialize)]
    struct Initialised {
        catalog: &'static str,
        created: bool,
        data_dir: String,
        config_file: Option<String>,
    }
    let (catalog, created) = match open_existing_catalog(config).await {
        Ok(catalog) => (catalog, false),
        Err(err) if err.kind() == ErrorKind::NotFound => {
            (crate::wiring::open_catalog(config).await?, true)
        }
        Err(err) => return Err(err),
    };
    let done = Initialised {
        catalog: catalog.flavour(),
        created,
        data_dir: config.data_dir.display().to_string(),
        config_file: config.file.path().map(|p| p.display().to_string()),
    };
    if json {
        return output(true, &done, &[], Vec::new());
    }
    let where_ = if catalog.flavour() == "sqlite" {
        config
            .catalog_url()
            .trim_start_matches("sqlite://")
            .to_owned()
    } else {
        "the PostgreSQL database of [catalog] url".to_owned()
    };
    let flavour = catalog.flavour();
    if created {
        println!("created the {flavour} catalog at {where_}");
    } else {
        println!("the {flavour} catalog at {where_} is already there; left as it is");
    }
    println!(
        "data_dir {}; configuration: {}",
        done.data_dir,
        config.file.describe()
    );
    Ok(())
}
