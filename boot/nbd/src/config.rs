use osstream_core::{
    BackendContext, BootProtocol, ByteSize, Error, ErrorKind, ProtocolKind, Result, Seconds,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::tls::TlsMode;

/// `[nbd]`: the NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Serve NBD at all. Default: true.
    pub enabled: bool,
    /// Where to listen: `HOST:PORT` (IPv4 or `[IPv6]`) or `unix:PATH`.
    /// Default: `["127.0.0.1:10809"]`.
    pub listen: Vec<String>,
    /// Serve images read-only under their plain name (what `nbdinfo --list` shows), to
    /// anyone who can connect, past the catalog's assignments. Default: unset, meaning on
    /// when every listener is on loopback (or a unix socket: the quickstart) and off as
    /// soon as one listens on the network, where clients reach their vdisks through
    /// sessions. Set it to force either way (on with a network listener logs a warning).
    pub base_exports: Option<bool>,
    /// The address clients use to reach this server, `HOST` or `HOST:PORT` (the port of
    /// the first TCP listener if left out). `osstream session open` prints it in session
    /// URIs, and the server records it in the catalog. Default: unset, meaning the first
    /// TCP listener when it has a specific address; a wildcard listener (`0.0.0.0`, `[::]`)
    /// needs it.
    pub public_address: Option<String>,
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
    /// Serve each TCP connection on the CPU its requests arrive on (the NIC queue's CPU;
    /// over loopback, the client's), so a request's wake-ups stay on one CPU: the
    /// latency of one-at-a-time reads. `false` serves every connection on the shared
    /// thread pool. Default: true.
    pub cpu_local: bool,
    /// TLS on TCP listeners (`NBD_OPT_STARTTLS`): `"off"`, `"on"` (clients may upgrade)
    /// or `"require"` (nothing but `STARTTLS` before the upgrade, so no export name,
    /// session token or byte of a disk crosses the network in clear). Unix sockets stay
    /// plain: only processes on this machine reach them. Default: `"off"`.
    pub tls: TlsMode,
    /// PEM file with the server's certificate (chain: leaf first); needed unless `tls`
    /// is off. Clients check it against their CA and the host name or address they
    /// connect to.
    pub tls_certificate: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// PEM file with the CA that clients' certificates must be signed by: then a client
    /// without such a certificate cannot upgrade. Default: unset (any client may upgrade;
    /// the session token still decides what it reaches).
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: true,
            listen: vec!["127.0.0.1:10809".to_owned()],
            base_exports: None,
            public_address: None,
            default_export: None,
            handshake_timeout: Seconds(std::time::Duration::from_secs(10)),
            max_request: ByteSize::mib(32),
            max_connections: 1024,
            drain_timeout: Seconds(std::time::Duration::from_secs(30)),
            cpu_local: true,
            tls: TlsMode::Off,
            tls_certificate: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

impl ProtocolKind for NbdConfig {
    const KIND: &'static str = crate::KIND;

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        let config = |why: String| Error::new(ErrorKind::Config, why);
        self.check_public_address().map_err(config)?;
        if self.enabled && self.listen.is_empty() {
            return Err(config(
                "nbd.listen is empty; give at least one HOST:PORT or unix:PATH, or set nbd.enabled = false"
                    .to_owned(),
            ));
        }
        for (i, address) in self.listen.iter().enumerate() {
            let tcp_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            let unix_ok = address.strip_prefix("unix:").is_some_and(|p| !p.is_empty());
            if !tcp_ok && !unix_ok {
                return Err(config(format!(
                    "nbd.listen: {address:?} is neither HOST:PORT (IPv6 as [ADDR]:PORT) nor unix:PATH"
                )));
            }
            if self.listen[..i].contains(address) {
                return Err(config(format!("nbd.listen lists {address:?} twice")));
            }
        }
        if self.max_connections == 0 {
            return Err(config(
                "nbd.max_connections = 0 would refuse every client; give at least 1".to_owned(),
            ));
        }
        if self.handshake_timeout.0.is_zero() {
            return Err(config(
                "nbd.handshake_timeout = 0s would disconnect every client; give a time such as \"10s\""
                    .to_owned(),
            ));
        }
        self.check_tls().map_err(config)?;
        let max = self.max_request.bytes();
        if !(4096..=(1 << 30)).contains(&max) {
            return Err(config(format!(
                "nbd.max_request = {} must be between 4KiB and 1GiB",
                self.max_request
            )));
        }
        Ok(())
    }

    fn build(self, _ctx: &BackendContext) -> Result<Box<dyn BootProtocol>> {
        Ok(Box::new(crate::NbdServer::new(self)))
    }
}

impl NbdConfig {
    fn check_tls(&self) -> std::result::Result<(), String> {
        let tls = self.tls;
        if tls == TlsMode::Off {
            if self.tls_client_ca.is_some() {
                return Err("nbd.tls_client_ca is set but nbd.tls = \"off\"; set tls = \"on\" or \"require\"".to_owned());
            }
            return Ok(());
        }
        if self.tls_certificate.is_none() || self.tls_key.is_none() {
            return Err(format!(
                "nbd.tls = \"{tls}\" needs nbd.tls_certificate and nbd.tls_key (PEM files: the server's certificate and its key)"
            ));
        }
        if !self.listen.iter().any(|a| !a.starts_with("unix:")) {
            return Err(format!(
                "nbd.tls = \"{tls}\" but every nbd.listen address is a unix socket, which stays plain; listen on HOST:PORT too, or set tls = \"off\""
            ));
        }
        Ok(())
    }

    /// The server's TLS credentials, loaded from their files; `None` with `tls = "off"`.
    pub fn tls_acceptor(&self) -> Result<Option<crate::tls::ServerTls>> {
        match (self.tls, &self.tls_certificate, &self.tls_key) {
            (TlsMode::Off, _, _) => Ok(None),
            (_, Some(certificate), Some(key)) => {
                crate::tls::server_acceptor(certificate, key, self.tls_client_ca.as_deref())
                    .map(Some)
            }
            _ => Err(Error::new(
                ErrorKind::Config,
                self.check_tls().err().unwrap_or_default(),
            )),
        }
    }

    /// Whether plain image names are served once `bound` (the listeners' addresses, as
    /// [`osstream_core::BootProtocol::bind`] returns them) are known: as configured, or on
    /// only when every listener is on loopback or a unix socket.
    pub fn base_exports_for(&self, bound: &[String]) -> bool {
        self.base_exports
            .unwrap_or_else(|| bound.iter().all(|address| is_local_listener(address)))
    }

    /// The `HOST:PORT` clients use: `public_address` (with the first TCP listener's port
    /// if it names none), else the first TCP listener of `bound` when its address is a
    /// specific one. `None` when only a wildcard or unix listeners are bound.
    pub fn public_address_for(&self, bound: &[String]) -> Option<String> {
        let first_tcp = bound.iter().find(|a| !a.starts_with("unix:"));
        if let Some(public) = &self.public_address {
            if has_port(public) {
                return Some(public.clone());
            }
            let port = first_tcp
                .and_then(|a| a.rsplit_once(':'))
                .map_or("10809", |(_, port)| port);
            let host = if public.contains(':') && !public.starts_with('[') {
                format!("[{public}]")
            } else {
                public.clone()
            };
            return Some(format!("{host}:{port}"));
        }
        let address: std::net::SocketAddr = first_tcp?.parse().ok()?;
        (!address.ip().is_unspecified()).then(|| address.to_string())
    }
}

impl NbdConfig {
    /// Checks `public_address`: a host name or address, optionally with a port.
    pub fn check_public_address(&self) -> std::result::Result<(), String> {
        let Some(public) = &self.public_address else {
            return Ok(());
        };
        let bad = |why: &str| {
            Err(format!(
                "nbd.public_address = {public:?} {why}; give HOST or HOST:PORT, such as \
                 \"boot.lab.example\", \"10.0.0.5:10809\" or \"[fd00::5]:10809\""
            ))
        };
        if public.contains("://") {
            return bad("is a URL");
        }
        let (host, port) = if let Some(rest) = public.strip_prefix('[') {
            match rest.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => match port.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return bad("has something after the closing bracket"),
                },
                None => return bad("lacks the closing bracket of an IPv6 address"),
            }
        } else if has_port(public) {
            let (host, port) = public.rsplit_once(':').expect("has a colon");
            (host, Some(port))
        } else {
            (public.as_str(), None)
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
        if !host_ok {
            return bad("is not a host name or address");
        }
        if let Some(port) = port
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return bad("has no valid port");
        }
        Ok(())
    }

    /// What the server records in the catalog as its clients' address: the public
    /// address, else `unix:PATH` when it listens on unix sockets only.
    pub fn registered_address_for(&self, bound: &[String]) -> Option<String> {
        self.public_address_for(bound).or_else(|| {
            bound
                .iter()
                .all(|a| a.starts_with("unix:"))
                .then(|| bound.first().cloned())
                .flatten()
        })
    }
}

/// `HOST:PORT` or `[V6]:PORT`, as opposed to a bare host or IPv6 address.
fn has_port(address: &str) -> bool {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.contains("]:");
    }
    matches!(address.matches(':').count(), 1)
}

/// A listener only this host can reach: a unix socket or a loopback address.
pub fn is_local_listener(address: &str) -> bool {
    if address.starts_with("unix:") {
        return true;
    }
    match address.parse::<std::net::SocketAddr>() {
        Ok(address) => address.ip().is_loopback(),
        // A host name ("localhost:10809" before binding): only "localhost" is local.
        Err(_) => address
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(addresses: &[&str]) -> Vec<String> {
        addresses.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn plain_names_default_to_on_only_on_loopback() {
        let config = NbdConfig::default();
        assert!(config.base_exports_for(&bound(&["127.0.0.1:10809", "unix:/run/o.sock"])));
        assert!(config.base_exports_for(&bound(&["[::1]:10809"])));
        assert!(!config.base_exports_for(&bound(&["127.0.0.1:10809", "0.0.0.0:10810"])));
        assert!(!config.base_exports_for(&bound(&["192.168.1.5:10809"])));
        let forced = NbdConfig {
            base_exports: Some(true),
            ..NbdConfig::default()
        };
        assert!(forced.base_exports_for(&bound(&["0.0.0.0:10809"])));
    }

    #[test]
    fn public_addresses_are_checked() {
        let public = |text: &str| NbdConfig {
            public_address: Some(text.to_owned()),
            ..NbdConfig::default()
        };
        for good in [
            "boot.lab",
            "10.0.0.5:10809",
            "[fd00::5]:7",
            "fd00::5",
            "[fd00::5]",
            "boot_1",
        ] {
            public(good).check_public_address().unwrap();
        }
        for bad in [
            "nbd://boot:10809",
            "boot lab",
            "boot:notaport",
            "boot:10809/x",
            "[fd00::5",
            "boot:0",
            "",
        ] {
            assert!(public(bad).check_public_address().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_public_address_comes_from_config_or_a_specific_listener() {
        let config = NbdConfig::default();
        assert_eq!(
            config
                .public_address_for(&bound(&["10.0.0.5:10810"]))
                .as_deref(),
            Some("10.0.0.5:10810")
        );
        assert_eq!(config.public_address_for(&bound(&["0.0.0.0:10810"])), None);
        assert_eq!(config.public_address_for(&bound(&["unix:/s"])), None);
        let public = |text: &str| NbdConfig {
            public_address: Some(text.to_owned()),
            ..NbdConfig::default()
        };
        assert_eq!(
            public("boot.lab")
                .public_address_for(&bound(&["0.0.0.0:10810"]))
                .as_deref(),
            Some("boot.lab:10810")
        );
        assert_eq!(
            public("boot.lab:99")
                .public_address_for(&bound(&["0.0.0.0:10810"]))
                .as_deref(),
            Some("boot.lab:99")
        );
        assert_eq!(
            public("fd00::5")
                .public_address_for(&bound(&["[::]:10809"]))
                .as_deref(),
            Some("[fd00::5]:10809")
        );
        assert_eq!(
            public("[fd00::5]:7")
                .public_address_for(&bound(&[]))
                .as_deref(),
            Some("[fd00::5]:7")
        );
    }
}
