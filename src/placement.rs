//! [`CatalogPlacement`]: several servers on one catalog. Each server records what it
//! offers (addresses, capacity, subnets) at start-up and its traffic with every
//! heartbeat; the HTTP listener of any of them places a booting client's new session on
//! the least loaded one ([`osstream_catalog::choose_server`]) and hands the client that
//! server's addresses. `/metrics` shows the placements this server made and the load of
//! every server as of its last heartbeat.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use osstream_catalog::{Server, ServerRef, SqlCatalog, choose_server};
use osstream_core::metrics::global;
use osstream_core::{PlacedServer, Placement, Result, async_trait};

/// The catalog's servers as placement sees them.
#[derive(Debug)]
pub struct CatalogPlacement {
    catalog: SqlCatalog,
    me: ServerRef,
    /// This server's name (for logs when it places on itself without reading the catalog).
    name: String,
    /// `[sessions] server_timeout`: a server silent for longer is gone.
    timeout_ms: i64,
    /// `[cluster] placement`: whether new sessions may go to other servers (`false`:
    /// every one stays here; the servers are still listed for agents to fail over to).
    steer: bool,
    /// Sessions this server placed, by the name of the server they went to.
    placed: Mutex<BTreeMap<String, u64>>,
    /// The servers as of this server's last heartbeat, for `/metrics`.
    known: Mutex<Vec<Server>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl CatalogPlacement {
    /// Placement over `catalog`'s servers, answered by `me` (named `name`), sending new
    /// sessions elsewhere only if `steer`; registers its `/metrics` families.
    pub fn new(
        catalog: SqlCatalog,
        me: ServerRef,
        name: String,
        timeout_ms: i64,
        steer: bool,
    ) -> Arc<Self> {
        let placement = Arc::new(CatalogPlacement {
            catalog,
            me,
            name,
            timeout_ms,
            steer,
            placed: Mutex::default(),
            known: Mutex::default(),
        });
        let weak = Arc::downgrade(&placement);
        global().add_collector(move |out| {
            if let Some(placement) = weak.upgrade() {
                placement.render(out);
            }
        });
        placement
    }

    fn here(&self) -> PlacedServer {
        PlacedServer {
            id: self.me.id.clone(),
            name: self.name.clone(),
            here: true,
            nbd_address: None,
            http_url: None,
        }
    }

    fn placed_server(&self, server: &Server) -> PlacedServer {
        PlacedServer {
            id: server.id.clone(),
            name: server.name.clone(),
            here: server.id == self.me.id,
            nbd_address: server.nbd_address.clone(),
            http_url: server.http_url.clone(),
        }
    }

    /// Reads every server's state for `/metrics` (called with each heartbeat).
    pub async fn refresh(&self) {
        match self.catalog.servers().await {
            Ok(servers) => *lock(&self.known) = servers,
            Err(err) => tracing::debug!(%err, "cannot read the servers for metrics"),
        }
    }

    fn render(&self, out: &mut osstream_core::metrics::Exposition) {
        /// One gauge's value for a server, given the heartbeat timeout in ms.
        type ServerGauge = fn(&Server, i64) -> f64;
        out.family(
            "osstream_placements_total",
            "counter",
            "New sessions this server placed, by the server they went to.",
        );
        for (server, count) in lock(&self.placed).iter() {
            out.sample(
                "osstream_placements_total",
                &[("server", server.as_str())],
                count,
            );
        }
        let known = lock(&self.known).clone();
        let families: [(&str, &str, ServerGauge); 4] = [
            (
                "osstream_cluster_server_up",
                "1 for a server alive by its heartbeat (as of this server's last heartbeat), 0 for one stopped or gone.",
                |s, timeout| f64::from(u8::from(s.alive(timeout))),
            ),
            (
                "osstream_cluster_server_sessions",
                "Live sessions a server holds or was placed on.",
                |s, _| s.sessions as f64,
            ),
            (
                "osstream_cluster_server_bytes_per_second",
                "Bytes per second a server's clients moved, as of its last heartbeat.",
                |s, _| s.bytes_per_sec as f64,
            ),
            (
                "osstream_cluster_server_load",
                "A server's load relative to its capacity: what placement compares.",
                |s, _| osstream_catalog::server_load(s),
            ),
        ];
        for (name, help, value) in families {
            out.family(name, "gauge", help);
            for server in &known {
                out.sample(
                    name,
                    &[("server", server.name.as_str()), ("id", server.id.as_str())],
                    value(server, self.timeout_ms),
                );
            }
        }
    }
}

#[async_trait]
impl Placement for CatalogPlacement {
    async fn choose(&self, peer: Option<IpAddr>, shared_overlay: bool) -> PlacedServer {
        if !self.steer {
            return self.here();
        }
        match self.catalog.servers().await {
            Ok(servers) => match choose_server(&servers, peer, self.timeout_ms, shared_overlay) {
                Some(server) => self.placed_server(server),
                None => self.here(),
            },
            Err(err) => {
                tracing::warn!(%err, "cannot read the servers to place a session; this server takes it");
                self.here()
            }
        }
    }

    async fn record(&self, session: &str, server: &PlacedServer) -> Result<()> {
        *lock(&self.placed).entry(server.name.clone()).or_default() += 1;
        self.catalog.record_placement(session, &server.id).await
    }

    async fn servers(&self) -> Result<Vec<PlacedServer>> {
        let mut servers: Vec<PlacedServer> = self
            .catalog
            .servers()
            .await?
            .iter()
            .filter(|s| s.alive(self.timeout_ms) && s.nbd_address.is_some())
            .map(|s| self.placed_server(s))
            .collect();
        // This server first: a client asking it is reaching it now.
        servers.sort_by_key(|s| !s.here);
        Ok(servers)
    }
}

/// Measures the bytes per second this server's clients move between two heartbeats
/// (0 at its first reading).
#[derive(Debug, Default)]
pub struct LoadMeter {
    last: Option<(Instant, u64)>,
}

impl LoadMeter {
    /// Bytes per second since the last call.
    pub fn bytes_per_sec(&mut self) -> u64 {
        let now = Instant::now();
        let bytes = global().client_bytes();
        let rate = match self.last {
            Some((then, before)) => {
                let seconds = now.duration_since(then).as_secs_f64().max(0.001);
                (bytes.saturating_sub(before) as f64 / seconds) as u64
            }
            None => 0,
        };
        self.last = Some((now, bytes));
        rate
    }
}

/// The base URL other servers hand to clients placed here: `boot_url` without its
/// `/boot.ipxe`, a wildcard host (`0.0.0.0`, `[::]`) replaced by the host clients reach
/// NBD at; `None` when no such host is known.
pub fn public_http_url(boot_url: Option<&str>, nbd_address: Option<&str>) -> Option<String> {
    let base = boot_url?.strip_suffix("/boot.ipxe")?;
    let rest = base.strip_prefix("http://")?;
    let (host, port) = rest.rsplit_once(':')?;
    if matches!(host, "0.0.0.0" | "[::]") {
        let (nbd_host, _) = nbd_address?.rsplit_once(':')?;
        Some(format!("http://{nbd_host}:{port}"))
    } else {
        Some(base.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::public_http_url;

    #[test]
    fn a_wildcard_http_host_takes_the_nbd_host() {
        assert_eq!(
            public_http_url(Some("http://10.0.0.5:8080/boot.ipxe"), None).as_deref(),
            Some("http://10.0.0.5:8080")
        );
        assert_eq!(
            public_http_url(
                Some("http://0.0.0.0:8080/boot.ipxe"),
                Some("10.0.0.7:10809")
            )
            .as_deref(),
            Some("http://10.0.0.7:8080")
        );
        assert_eq!(
            public_http_url(Some("http://[::]:80/boot.ipxe"), Some("[fd00::1]:10809")).as_deref(),
            Some("http://[fd00::1]:80")
        );
        assert_eq!(
            public_http_url(Some("http://0.0.0.0:8080/boot.ipxe"), None),
            None
        );
        assert_eq!(public_http_url(None, Some("10.0.0.7:10809")), None);
    }
}
