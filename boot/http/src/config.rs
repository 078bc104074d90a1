//! `[http]`: the HTTP boot server's configuration.

use std::net::SocketAddr;

use osstream_core::{
    BackendContext, BootProtocol, Error, ErrorKind, ProtocolKind, Result, Seconds,
};
use serde::{Deserialize, Serialize};

/// `[http]`: iPXE scripts and menus, boot files, HTTP SAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP at all. Default: false (network boot is switched on by the admin).
    pub enabled: bool,
    /// Where to listen, `HOST:PORT` (IPv6 as `[ADDR]:PORT`). Default: `127.0.0.1:8080`.
    pub listen: String,
    /// The base URL clients reach this listener at, put into every script
    /// (`http://10.0.0.1:8080`). Default: unset, meaning the listener's address when it is
    /// a specific one, else the `Host` the client asked for.
    pub public_url: Option<String>,
    /// How long a client's boot menu waits before it boots the default vdisk. `0s` skips
    /// the menu and boots the default at once. Default: `5s`.
    pub menu_timeout: Seconds,
    /// Connections beyond this number wait at accept. Default: 1024.
    pub max_connections: usize,
    /// A connection with no request for this long is closed. Default: `60s`.
    pub idle_timeout: Seconds,
    /// Also serve Prometheus metrics at `/metrics` here. They name vdisks and clients, and
    /// this listener faces the boot network: prefer `[metrics] listen` on an admin
    /// network. Default: false.
    pub metrics: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: false,
            listen: "127.0.0.1:8080".to_owned(),
            public_url: None,
            menu_timeout: Seconds(std::time::Duration::from_secs(5)),
            max_connections: 1024,
            idle_timeout: Seconds(std::time::Duration::from_secs(60)),
            metrics: false,
        }
    }
}

impl ProtocolKind for HttpConfig {
    const KIND: &'static str = crate::KIND;

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        let config = |why: String| Error::new(ErrorKind::Config, why);
        osstream_core::check_listen("http.listen", &self.listen)?;
        if let Some(url) = &self.public_url {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                config(format!(
                    "http.public_url: {url:?} must start with http:// (the iPXE clients boot with has no HTTPS)"
                ))
            })?;
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(config(format!("http.public_url: {url:?} names no host")));
            }
        }
        if self.max_connections == 0 {
            return Err(config(
                "http.max_connections = 0 would refuse every client; give at least 1".to_owned(),
            ));
        }
        if self.idle_timeout.0.is_zero() {
            return Err(config(
                "http.idle_timeout = 0s would close every connection at once; give a time such as \"60s\""
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn build(self, _ctx: &BackendContext) -> Result<Box<dyn BootProtocol>> {
        Ok(Box::new(crate::HttpServer::new(self)))
    }
}

impl HttpConfig {
    /// The base URL of scripts once the listener is bound at `bound`: `public_url`
    /// (without a trailing `/`), else `bound` when it is a specific address. `None`: take
    /// the `Host` of each request.
    pub fn base_url_for(&self, bound: SocketAddr) -> Option<String> {
        if let Some(url) = &self.public_url {
            return Some(url.trim_end_matches('/').to_owned());
        }
        (!bound.ip().is_unspecified()).then(|| format!("http://{bound}"))
    }
}
