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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use osstream_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
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

/// The host clients connect to, and where the server got it from (for the admin).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress<'a> {
    /// A host name or address, as a certificate would name it.
    pub host: &'a str,
    /// Where it comes from, in words: `[nbd] public_address`, or the listener's address.
    pub from: &'a str,
}

/// A certificate this close to its end is warned about at start.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// What an admin should hear about the server's certificate (the first in the file at
/// `certificate`) at start, when clients would fail the handshake for it: it expired or
/// expires within [`EXPIRY_WARNING`] of `now`, or its subjectAltName does not name the
/// host clients connect to. Empty when all is well.
pub fn certificate_warnings(
    certificate: &Path,
    client_address: Option<ClientAddress<'_>>,
    now: SystemTime,
) -> Result<Vec<String>> {
    let chain = load_certificates("nbd.tls_certificate", certificate)?;
    let Some(leaf) = chain.first() else {
        return Ok(Vec::new());
    };
    let mut warnings = Vec::new();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match not_after(leaf) {
        Some(end) if end <= now => warnings.push(format!(
            "the TLS certificate {} expired {} day(s) ago: clients refuse the handshake; renew it",
            certificate.display(),
            (now - end) / 86_400
        )),
        Some(end) if end - now <= EXPIRY_WARNING.as_secs() as i64 => warnings.push(format!(
            "the TLS certificate {} expires in {} day(s): renew it before clients refuse the handshake",
            certificate.display(),
            (end - now + 86_399) / 86_400
        )),
        Some(_) => {}
        None => warnings.push(format!(
            "cannot read the end of validity of the TLS certificate {}",
            certificate.display()
        )),
    }
    if let Some(ClientAddress { host, from }) = client_address {
        let name = server_name(host)?;
        let named = ParsedCertificate::try_from(leaf)
            .and_then(|parsed| rustls::client::verify_server_name(&parsed, &name));
        if named.is_err() {
            warnings.push(format!(
                "the TLS certificate {} does not name {host} in its subjectAltName, and {host} is \
                 what clients connect to ({from}): clients that check the name refuse the \
                 handshake unless told another one; add it to the certificate's subjectAltName",
                certificate.display()
            ));
        }
    }
    Ok(warnings)
}

/// The certificate's notAfter in Unix seconds, read from its DER (`Certificate ::=
/// SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
/// issuer, validity SEQUENCE { notBefore, notAfter }, ... } ... }`, RFC 5280 4.1).
fn not_after(der: &[u8]) -> Option<i64> {
    let (_, certificate, _) = der_element(der)?;
    let (_, mut tbs, _) = der_element(certificate)?;
    let (tag, _, rest) = der_element(tbs)?;
    if tag == 0xA0 {
        tbs = rest; // the explicit version
    }
    for _ in 0..3 {
        tbs = der_element(tbs)?.2; // serialNumber, signature, issuer
    }
    let (_, validity, _) = der_element(tbs)?;
    let (_, _, after_start) = der_element(validity)?;
    let (tag, time, _) = der_element(after_start)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, text.len()) {
        // UTCTime YYMMDDHHMMSS: years 50-99 are 19xx.
        (0x17, 12) => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        // GeneralizedTime YYYYMMDDHHMMSS.
        (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let seconds = field(4)? * 3600 + field(6)? * 60 + field(8)?;
    Some(days_from_civil(year, month, day) * 86_400 + seconds)
}

/// One DER element at the start of `der`: its tag, its content and what follows it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    fn public(host: &str) -> ClientAddress<'_> {
        ClientAddress {
            host,
            from: "the [nbd] public_address",
        }
    }

    fn at(days_since_epoch: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs((days_since_epoch * 86_400) as u64)
    }

    #[test]
    fn dates_from_the_certificate() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let der = |name| load_certificates("test", &fixture(name)).unwrap().remove(0);
        // UTCTime 200201000000Z and GeneralizedTime 20991231235959Z.
        assert_eq!(
            not_after(&der("expired-2020-boot.lab.pem")),
            Some(1_580_515_200)
        );
        assert_eq!(
            not_after(&der("until-2099-boot.lab.pem")),
            Some(4_102_444_799)
        );
        assert_eq!(not_after(b"\x30\x05\x30"), None);
    }

    #[test]
    fn a_certificate_that_clients_would_refuse_is_named() {
        let expired = fixture("expired-2020-boot.lab.pem");
        let warnings =
            certificate_warnings(&expired, Some(public("boot.lab")), at(20_000)).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("expired 1707 day(s) ago"),
            "{warnings:?}"
        );

        let good = fixture("until-2099-boot.lab.pem");
        let now = SystemTime::now();
        assert_eq!(
            certificate_warnings(&good, Some(public("boot.lab")), now).unwrap(),
            Vec::<String>::new()
        );
        assert!(
            certificate_warnings(&good, Some(public("10.0.0.1")), now)
                .unwrap()
                .is_empty()
        );
        let wrong = certificate_warnings(&good, Some(public("10.0.0.2")), now).unwrap();
        assert!(
            wrong.len() == 1
                && wrong[0].contains("does not name 10.0.0.2 in its subjectAltName")
                && wrong[0].contains("(the [nbd] public_address)"),
            "{wrong:?}"
        );
        // Three days and a minute before its end (a `-days 3` certificate): 3 days left.
        let end = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        let soon =
            certificate_warnings(&good, None, end - Duration::from_secs(3 * 86_400 - 60)).unwrap();
        assert!(
            soon.len() == 1 && soon[0].contains("expires in 3 day(s)"),
            "{soon:?}"
        );
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
