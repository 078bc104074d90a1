//! [`BootProtocol`]: a network protocol that serves exports to clients (NBD, HTTP, TFTP).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::exports::Exports;

/// What a protocol needs from the engine while serving.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// Names clients may open, resolved to layered sources.
    pub exports: Arc<Exports>,
    /// One runtime per CPU, for serving a connection on the CPU its packets arrive on
    /// (empty: everything is served on the shared runtime).
    pub cpus: Arc<crate::CpuRuntimes>,
    /// The catalog as boot protocols read it (DHCP, iPXE scripts); `None` where no
    /// catalog is at hand.
    pub boot: Option<Arc<dyn crate::BootDirectory>>,
    /// Where clients reach session exports over NBD (`HOST:PORT`), as the protocol that
    /// serves them reported it after binding: what a boot script tells a kernel.
    pub session_address: Option<String>,
    /// The URL of the iPXE script every client starts with (`http://HOST:PORT/boot.ipxe`),
    /// as the HTTP protocol reported it after binding; the host may be a wildcard
    /// (`0.0.0.0`) when HTTP listens on every address.
    pub boot_url: Option<String>,
    /// Where DHCP saw each booting MAC, shared between DHCP and HTTP.
    pub seen: Arc<crate::SeenAddresses>,
    /// Where full-mode DHCP keeps its leases; `None` where no catalog is at hand.
    pub leases: Option<Arc<dyn crate::LeaseStore>>,
    /// Boot profiles (what the agent is told to fetch first); `None` where no catalog is
    /// at hand.
    pub profiles: Option<Arc<dyn crate::ProfileStore>>,
    /// Which server a new boot session goes to, when several share the catalog; `None`:
    /// always this one.
    pub placement: Option<Arc<dyn crate::Placement>>,
}

impl ServeContext {
    /// A context that serves `exports` and nothing else: no catalog, boot directory,
    /// leases or profiles, everything on the shared runtime (the client agent, tests).
    pub fn exports_only(exports: Arc<Exports>) -> Self {
        ServeContext {
            exports,
            cpus: Arc::new(crate::CpuRuntimes::none()),
            boot: None,
            session_address: None,
            boot_url: None,
            seen: Arc::default(),
            leases: None,
            profiles: None,
            placement: None,
        }
    }
}

/// A protocol server.
///
/// # Contract
/// - `bind` claims every socket the protocol listens on and returns their addresses; it
///   fails at start-up (a port clash stops the server before any client is served).
/// - `serve` runs until `shutdown` is cancelled, then stops accepting, lets requests in
///   flight finish, and returns. Errors of one client never end `serve`.
#[async_trait]
pub trait BootProtocol: Send + Sync + Debug {
    /// A short name for logs (`nbd`, `http`, `tftp`).
    fn name(&self) -> &'static str;

    /// Binds the configured listeners; returns what was bound, for logs.
    async fn bind(&mut self) -> Result<Vec<String>>;

    /// After `bind`: the address clients reach session exports at (`HOST:PORT` or
    /// `unix:PATH`), which the server records in the catalog for `session open`; `None`
    /// for protocols that serve no session exports, or when no such address is known.
    fn session_address(&self) -> Option<String> {
        None
    }

    /// After `bind`: the URL of the iPXE script clients start with, for protocols that
    /// serve it (HTTP); DHCP hands it to iPXE clients.
    fn boot_url(&self) -> Option<String> {
        None
    }

    /// Serves clients until `shutdown` is cancelled and in-flight work has drained.
    async fn serve(self: Box<Self>, ctx: ServeContext, shutdown: CancellationToken) -> Result<()>;
}
