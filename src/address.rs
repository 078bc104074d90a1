//! Where clients reach a session: the address `osstream session open` prints.

use osstream_catalog::SqlCatalog;
use osstream_core::Result;

use crate::config::Config;

/// Where clients reach a session: its `nbd://` URI when the address clients use is known,
/// else a hint saying how to make it known.
pub struct SessionAddress {
    /// The URI, when the address clients use is known.
    pub uri: Option<String>,
    /// What to set when it is not.
    pub hint: Option<String>,
}

/// What running servers registered of their NBD address.
pub enum Registered {
    /// No server is running (or none registered yet).
    Nobody,
    /// A running server's `HOST:PORT` (its real listener, also one of `serve --listen`)
    /// or `unix:PATH`.
    Address(String),
    /// Servers run, but listen on wildcard addresses only and have no `public_address`.
    Unknown(Vec<String>),
}

/// The URI of `export` at `address` (`HOST:PORT` or `unix:PATH`); `nbds://` when the
/// server speaks TLS on TCP (unix sockets stay plain).
fn uri_at(address: &str, export: &str, tls: bool) -> String {
    match address.strip_prefix("unix:") {
        Some(socket) => format!("nbd+unix:///{export}?socket={socket}"),
        None if tls => format!("nbds://{address}/{export}"),
        None => format!("nbd://{address}/{export}"),
    }
}

/// The URI of `export` as a client must use it: the address a running server registered
/// in the catalog (what it really listens on, also with `serve --listen`, and its
/// `public_address`); with no server running, the configuration's `public_address`, a
/// specific TCP listen address, or its unix socket. Otherwise no URI: the export name
/// alone, with a hint.
pub fn session_address(config: &Config, export: &str, registered: Registered) -> SessionAddress {
    let hint = |what: String| SessionAddress {
        uri: None,
        hint: Some(format!(
            "{what} and no address for clients is known: set [nbd] public_address to the address \
             clients use (the export name alone is printed)"
        )),
    };
    let tls = configured_tls(config);
    let known = |address: &str| SessionAddress {
        uri: Some(uri_at(address, export, tls)),
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
    configured_address(config)
        .map(|address| known(&address))
        .unwrap_or_else(hint)
}

/// The configuration's `[nbd]` table.
#[cfg(feature = "boot-nbd")]
fn nbd_config(config: &Config) -> osstream_nbd::NbdConfig {
    // `config::load` already parsed and checked this table; a build without it has none.
    config
        .protocol_tables()
        .ok()
        .and_then(|mut tables| tables.remove(osstream_nbd::KIND))
        .and_then(|table| osstream_core::parse_table(osstream_nbd::KIND, table).ok())
        .unwrap_or_default()
}

/// Whether the configuration's NBD server speaks TLS (then session URIs are `nbds://`).
#[cfg(feature = "boot-nbd")]
fn configured_tls(config: &Config) -> bool {
    nbd_config(config).tls != osstream_nbd::TlsMode::Off
}

#[cfg(not(feature = "boot-nbd"))]
fn configured_tls(_: &Config) -> bool {
    false
}

/// The address the configuration's `[nbd]` listeners give clients, or why there is none.
#[cfg(feature = "boot-nbd")]
fn configured_address(config: &Config) -> std::result::Result<String, String> {
    let nbd = nbd_config(config);
    if let Some(address) = nbd.public_address_for(&nbd.listen) {
        return Ok(address);
    }
    match nbd.listen.first() {
        Some(socket) if nbd.listen.iter().all(|a| a.starts_with("unix:")) => Ok(socket.clone()),
        _ => Err(format!("the server listens on {}", nbd.listen.join(", "))),
    }
}

#[cfg(not(feature = "boot-nbd"))]
fn configured_address(_: &Config) -> std::result::Result<String, String> {
    Err("this build serves no NBD".to_owned())
}

/// What the running servers registered: this configuration's own server first (the
/// one whose id is in its data_dir), else the most recently started one.
pub async fn registered_address(config: &Config, catalog: &SqlCatalog) -> Result<Registered> {
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
