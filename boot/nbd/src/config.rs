use osstream_core::{ByteSize, Seconds};
use serde::{Deserialize, Serialize};

/// `[nbd]`: the NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Serve NBD at all. Default: true.
    pub enabled: bool,
    /// Where to listen: `HOST:PORT` (IPv4 or `[IPv6]`) or `unix:PATH`.
    /// Default: `["127.0.0.1:10809"]`.
    pub listen: Vec<String>,
    /// Serve images read-only under their plain name (what `nbdinfo --list` shows).
    /// On in the embedded default; turn it off in production, where clients reach their
    /// vdisks through sessions. Default: true.
    pub base_exports: bool,
    /// The export a client gets when it asks for the empty name (`nbd://host:port`).
    /// Default: none (the empty name is refused with a message that lists exports).
    pub default_export: Option<String>,
    /// A client must finish option negotiation within this time. Default: `10s`.
    pub handshake_timeout: Seconds,
    /// Largest read or write payload a client may send or ask for; advertised as the
    /// maximum block size. Default: `32MiB`.
    pub max_request: ByteSize,
    /// Connections beyond this number are refused at accept. Default: 1024.
    pub max_connections: usize,
    /// On shutdown, how long in-flight requests may take to finish. Default: `30s`.
    pub drain_timeout: Seconds,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: true,
            listen: vec!["127.0.0.1:10809".to_owned()],
            base_exports: true,
            default_export: None,
            handshake_timeout: Seconds(std::time::Duration::from_secs(10)),
            max_request: ByteSize::mib(32),
            max_connections: 1024,
            drain_timeout: Seconds(std::time::Duration::from_secs(30)),
        }
    }
}
