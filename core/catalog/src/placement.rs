//! Several servers on one catalog: what each offers new sessions (its addresses, its
//! capacity, the client subnets that prefer it, whether it is drained), the load it
//! reports with its heartbeat, and [`choose`], the choice of server for a new session.
//!
//! Placement only steers new sessions: a session stays on the server its client
//! connected to until that server lets go of it (or dies), so a booting client is never
//! moved.

use std::net::IpAddr;

use osstream_core::{Error, ErrorKind, Result};

use crate::holding::{SESSIONS_OF_SERVER, ServerRef, sql};
use crate::model::Server;
use crate::sql::{SqlCatalog, db_error};

/// Bytes per second that weigh as much as one session in a server's load: a server
/// streaming 100 MiB/s to one client is as loaded as one with two idle clients.
pub const BYTES_PER_SECOND_PER_SESSION: f64 = 100.0 * 1024.0 * 1024.0;

/// What this server offers new sessions, as its configuration says.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOffer {
    /// The base URL of its HTTP listener, if clients reach it (`http://HOST:PORT`).
    pub http_url: Option<String>,
    /// Its share of new sessions relative to the others (> 0).
    pub capacity: f64,
    /// Client subnets that prefer it.
    pub subnets: Vec<Subnet>,
    /// It has the shared overlay folder (`shared-disk` vdisks).
    pub shared_overlays: bool,
    /// Its `[sessions] server_timeout`, in milliseconds.
    pub server_timeout_ms: i64,
}

/// An IPv4 or IPv6 network (`10.1.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: IpAddr,
    prefix: u8,
}

impl Subnet {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (net >> shift) == (ip >> shift)
    }
}

impl std::str::FromStr for Subnet {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Config,
                format!("{text:?} is not a subnet such as 10.1.0.0/16: {why}"),
            )
        };
        let (address, prefix) = text.split_once('/').ok_or_else(|| bad("no /PREFIX"))?;
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| bad("not an IP address"))?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .map_err(|_| bad("the prefix is not a number"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(bad(&format!("the prefix is longer than {bits} bits")));
        }
        Ok(Subnet { network, prefix })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The load a server carries, relative to its capacity: its sessions, plus its traffic
/// counted in sessions' worth ([`BYTES_PER_SECOND_PER_SESSION`]).
pub fn load(server: &Server) -> f64 {
    load_with(server, 0)
}

/// [`load`] once `more` sessions are added.
fn load_with(server: &Server, more: u64) -> f64 {
    let sessions = (server.sessions + more) as f64
        + server.bytes_per_sec as f64 / BYTES_PER_SECOND_PER_SESSION;
    sessions / server.capacity.max(0.001)
}

/// The server a new session of a client booting from `peer` goes to: among the servers
/// alive (heartbeat younger than `timeout_ms`), not drained and with an NBD address,
/// and, for a session of a `shared-disk` vdisk (`shared_overlay`), with the shared overlay
/// folder, those whose subnets hold `peer` if any do, the one with the least [`load`] once
/// this session is added (ties: fewer sessions, then name). `None` when no server qualifies.
pub fn choose(
    servers: &[Server],
    peer: Option<IpAddr>,
    timeout_ms: i64,
    shared_overlay: bool,
) -> Option<&Server> {
    let open: Vec<&Server> = servers
        .iter()
        .filter(|s| s.alive(timeout_ms) && !s.draining && s.nbd_address.is_some())
        .filter(|s| !shared_overlay || s.shared_overlays)
        .collect();
    let preferred: Vec<&Server> = match peer {
        Some(peer) => open
            .iter()
            .copied()
            .filter(|s| {
                s.subnets.iter().any(|text| {
                    text.parse::<Subnet>()
                        .is_ok_and(|subnet| subnet.contains(peer))
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let candidates = if preferred.is_empty() {
        open
    } else {
        preferred
    };
    candidates.into_iter().min_by(|a, b| {
        load_with(a, 1)
            .total_cmp(&load_with(b, 1))
            .then(a.sessions.cmp(&b.sessions))
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.id.cmp(&b.id))
    })
}

/// Everything a server records of itself in the catalog at start, kept to record it again
/// when an admin removed it while it was not heard from (`server rm` of a server that
/// was only cut off).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Its name (`[cluster] name`).
    pub name: String,
    /// The `HOST:PORT` clients reach its NBD listener at.
    pub nbd_address: Option<String>,
    /// What it offers new sessions.
    pub offer: ServerOffer,
}

/// What names `server` among `servers` on the command line: its name, or its id when
/// another server has the same name.
fn handle<'a>(servers: &[Server], server: &'a Server) -> &'a str {
    let shared = servers
        .iter()
        .any(|other| other.name == server.name && other.id != server.id);
    if shared { &server.id } else { &server.name }
}

/// The server among `servers` with this id, or the only one with this name.
fn named<'a>(servers: &'a [Server], server: &str) -> Result<&'a Server> {
    if let Some(found) = servers.iter().find(|s| s.id == server) {
        return Ok(found);
    }
    let named: Vec<&Server> = servers.iter().filter(|s| s.name == server).collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no server is named {server:?} or has that id (osstream server list shows both)"
            ),
        )),
        _ => Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} servers are named {server:?}: name one by its id (osstream server list)",
                named.len()
            ),
        )),
    }
}

impl SqlCatalog {
    /// Registers this server again as it registered at start (a drain set before it was
    /// removed is not restored).
    pub async fn rejoin(&self, me: &ServerRef, registration: &Registration) -> Result<()> {
        self.register_server(me, &registration.name).await?;
        self.set_server_address(me, registration.nbd_address.as_deref())
            .await?;
        self.offer_server(me, &registration.offer).await
    }

    /// Records what this server offers new sessions (at start-up, after it registered).
    pub async fn offer_server(&self, me: &ServerRef, offer: &ServerOffer) -> Result<()> {
        let subnets: Vec<String> = offer.subnets.iter().map(Subnet::to_string).collect();
        sqlx::query(
            "UPDATE servers SET http_url = $3, capacity_milli = $4, subnets = $5, shared_overlays = $6, \
             server_timeout_ms = $7 WHERE id = $1 AND instance = $2",
        )
        .bind(&me.id)
        .bind(&me.instance)
        .bind(offer.http_url.as_deref())
        .bind((offer.capacity * 1000.0).round().max(1.0) as i64)
        .bind(subnets.join(","))
        .bind(i64::from(offer.shared_overlays))
        .bind(offer.server_timeout_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "record what the server offers"))?;
        Ok(())
    }

    /// Drains a server (no new sessions go to it; it keeps those it has) or ends a
    /// drain. `server` is its name or id; a name two servers share is refused.
    pub async fn set_draining(&self, server: &str, draining: bool) -> Result<Server> {
        let found = self.server_named(server).await?;
        sqlx::query("UPDATE servers SET draining = $2 WHERE id = $1")
            .bind(&found.id)
            .bind(i64::from(draining))
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "drain the server"))?;
        Ok(Server { draining, ..found })
    }

    /// Forgets a retired server: it leaves `server list` and `/servers` (agents stop
    /// trying it). Refused while the server is alive (its heartbeat is younger than
    /// `timeout_ms` and it did not stop) or while it holds or was sent open sessions, so
    /// no session is left pointing at a server nobody knows. A removed server that starts
    /// again registers anew.
    pub async fn remove_server(&self, server: &str, timeout_ms: i64) -> Result<Server> {
        let servers = self.servers().await?;
        let found = named(&servers, server)?.clone();
        let who = format!("server {} ({})", found.name, found.id);
        if found.alive(timeout_ms) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{who} is alive (its heartbeat is {:.1}s old): stop it first; `osstream server drain {}` sends it no new sessions until its clients have moved",
                    found.heartbeat_age.max(0) as f64 / 1000.0,
                    handle(&servers, &found)
                ),
            ));
        }
        if found.sessions > 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{who} still has {} open session(s): they move or end on their own (a \
                     disconnected one after the grace period, one never connected after the \
                     lease), or close them (osstream session list; osstream session close ID)",
                    found.sessions
                ),
            ));
        }
        // Checked again in the statement itself: the server may have started, or been
        // sent a session, since it was read.
        let removed = sqlx::query(sql(format!(
            "DELETE FROM servers WHERE id = $1 AND (stopped_at IS NOT NULL OR heartbeat_at < {}) \
             AND {SESSIONS_OF_SERVER} = 0",
            self.ago_sql(timeout_ms)
        )))
        .bind(&found.id)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error(e, "remove the server"))?;
        if removed.rows_affected() == 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("{who} started or took a session while it was being removed; it was kept"),
            ));
        }
        Ok(found)
    }

    /// The server with this id, or the only one with this name.
    pub async fn server_named(&self, server: &str) -> Result<Server> {
        named(&self.servers().await?, server).cloned()
    }

    /// Records the server a new session was placed on; it counts in that server's load
    /// until a server holds the session.
    pub async fn record_placement(&self, session_id: &str, server_id: &str) -> Result<()> {
        sqlx::query("UPDATE sessions SET placed_on = $2 WHERE id = $1")
            .bind(session_id)
            .bind(server_id)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "record the session's server"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, sessions: u64, capacity: f64) -> Server {
        Server {
            id: format!("id-{name}"),
            instance: "i".into(),
            name: name.into(),
            nbd_address: Some(format!("{name}:10809")),
            started_at: 0,
            heartbeat_at: 0,
            stopped_at: None,
            heartbeat_age: 100,
            http_url: None,
            capacity,
            subnets: Vec::new(),
            draining: false,
            shared_overlays: false,
            server_timeout_ms: 10_000,
            bytes_per_sec: 0,
            sessions,
        }
    }

    #[test]
    fn subnets_parse_and_hold_their_addresses() {
        let net: Subnet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6: Subnet = "fd00:1::/32".parse().unwrap();
        assert!(v6.contains("fd00:1:2::3".parse().unwrap()));
        for bad in ["10.1.0.0", "10.1.0.0/33", "ten/8", "10.0.0.0/x"] {
            let err = bad.parse::<Subnet>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert_eq!(net.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn the_least_loaded_server_by_capacity_is_chosen() {
        let servers = [
            server("a", 4, 1.0),
            server("b", 5, 2.0),
            server("c", 1, 1.0),
        ];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "c");
        // b and c tie at 3 once the session is added: the one with fewer sessions wins.
        let servers = [
            server("a", 4, 1.0),
            server("b", 5, 2.0),
            server("c", 2, 1.0),
        ];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "c");
        let servers = [
            server("a", 4, 1.0),
            server("b", 3, 2.0),
            server("c", 2, 1.0),
        ];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "b");
    }

    #[test]
    fn busy_links_weigh_like_sessions() {
        let mut busy = server("a", 1, 1.0);
        busy.bytes_per_sec = (3.0 * BYTES_PER_SECOND_PER_SESSION) as u64;
        let servers = [busy, server("b", 2, 1.0)];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "b");
    }

    #[test]
    fn gone_drained_and_unaddressed_servers_get_nothing() {
        let mut gone = server("a", 0, 1.0);
        gone.heartbeat_age = 5000;
        let mut stopped = server("b", 0, 1.0);
        stopped.stopped_at = Some(1);
        let mut drained = server("c", 0, 1.0);
        drained.draining = true;
        let mut nowhere = server("d", 0, 1.0);
        nowhere.nbd_address = None;
        let busy = server("e", 50, 1.0);
        let servers = [gone, stopped, drained, nowhere, busy];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "e");
        assert!(choose(&servers[..4], None, 1000, false).is_none());
    }

    #[test]
    fn a_subnet_prefers_its_servers_while_one_is_open() {
        let mut near = server("near", 10, 1.0);
        near.subnets = vec!["10.1.0.0/16".into()];
        let servers = [near.clone(), server("far", 0, 1.0)];
        let inside = Some("10.1.4.5".parse().unwrap());
        let outside = Some("10.2.4.5".parse().unwrap());
        assert_eq!(choose(&servers, inside, 1000, false).unwrap().name, "near");
        assert_eq!(choose(&servers, outside, 1000, false).unwrap().name, "far");
        near.draining = true;
        let servers = [near, server("far", 0, 1.0)];
        assert_eq!(choose(&servers, inside, 1000, false).unwrap().name, "far");
    }

    #[test]
    fn a_shared_disk_session_goes_only_where_the_shared_overlays_are() {
        let mut shared = server("shared", 10, 1.0);
        shared.shared_overlays = true;
        let servers = [shared, server("idle", 0, 1.0)];
        assert_eq!(choose(&servers, None, 1000, false).unwrap().name, "idle");
        assert_eq!(choose(&servers, None, 1000, true).unwrap().name, "shared");
        assert!(choose(&servers[1..], None, 1000, true).is_none());
    }
}
