//! TLS for NBD (`NBD_OPT_STARTTLS`): X.509 certificates in PEM files, through rustls.
//!
//! The server upgrades a TCP connection when its client asks (`tls = "on"`), or refuses
//! every option but `STARTTLS` until it has (`tls = "require"`); the client agent upgrades
//! its connection to the server the same way. Both sides load their credentials once, at
//! start, so a missing or wrong file stops the program with a message naming it.
//!
//! Pre-shared keys (nbdkit's and qemu's `tls-psk`) are not offered: rustls has no external
//! PSK, and a hand-rolled one is not something to trust with a lab's disks.

use std::path::Path;
use std::sync::Arc;

use osstream_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

pub use tokio_rustls::rustls::pki_types::ServerName;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Loaded server credentials, ready to accept TLS connections.
#[derive(Clone)]
pub struct ServerTls(pub TlsAcceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// Loaded client credentials, ready to connect with TLS.
#[derive(Clone)]
pub struct ClientTls(pub TlsConnector);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

/// Whether the NBD server speaks TLS (`[nbd] tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: `STARTTLS` is refused (the default).
    #[default]
    Off,
    /// Clients may upgrade with `STARTTLS`; plain clients are served too.
    On,
    /// Every TCP client must upgrade before it may list, inspect or attach an export.
    Require,
}

impl TlsMode {
    /// The mode's name as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// ring rather than aws-lc: the same algorithms for TLS 1.2/1.3, and about 4 MiB less in
/// the static agent an initramfs carries.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(what: &str, path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("{what} {}: {why}", path.display()),
    )
}

/// The certificates of a PEM file (a chain: the leaf first); at least one.
pub fn load_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_error(what, path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| config_error(what, path, e))?;
    if certificates.is_empty() {
        return Err(config_error(
            what,
            path,
            "holds no certificate (expected a PEM \"BEGIN CERTIFICATE\" block)",
        ));
    }
    Ok(certificates)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| config_error(what, path, e))
}

fn root_store(what: &str, path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(what, path)? {
        roots
            .add(certificate)
            .map_err(|e| config_error(what, path, e))?;
    }
    Ok(roots)
}

/// Server credentials: its certificate chain and key, and optionally the CA that client
/// certificates must be signed by (then a client without one is refused).
pub fn server_acceptor(
    certificate: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTls> {
    let chain = load_certificates("nbd.tls_certificate", certificate)?;
    let key = load_private_key("nbd.tls_key", key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("TLS setup: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = root_store("nbd.tls_client_ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| config_error("nbd.tls_client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        config_error(
            "nbd.tls_key",
            certificate,
            format!("does not fit the key: {e}"),
        )
    })?;
    Ok(ServerTls(TlsAcceptor::from(Arc::new(config))))
}

/// Client credentials: the CA the server's certificate must be signed by, and optionally
/// this client's own certificate and key (for a server that verifies clients).
pub fn client_connector(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTls> {
    let roots = root_store("TLS CA", ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((certificate, key)) => {
            let chain = load_certificates("TLS certificate", certificate)?;
            let key = load_private_key("TLS key", key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                config_error("TLS key", certificate, format!("does not fit the key: {e}"))
            })?
        }
    };
    Ok(ClientTls(TlsConnector::from(Arc::new(config))))
}

/// The name a server's certificate must carry: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{host:?} is not a host name or address a certificate can name: {e}"),
        )
    })
}

/// The host part of `HOST:PORT` (`[V6]:PORT` too).
pub fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_addresses() {
        assert_eq!(host_of("10.0.0.1:10809"), "10.0.0.1");
        assert_eq!(host_of("[::1]:10809"), "[::1]");
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("boot.lab").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name").is_err());
    }

    #[test]
    fn missing_files_name_the_option() {
        let err =
            server_acceptor(Path::new("/nonexistent/c.pem"), Path::new("/k"), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string()
                .contains("nbd.tls_certificate /nonexistent/c.pem"),
            "{err}"
        );
    }
}
