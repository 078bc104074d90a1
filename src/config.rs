//! The effective configuration: built-in defaults < TOML file < `OSSTREAM_*` environment
//! < command-line flags, merged by figment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use osstream_core::{ByteSize, Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// The configuration file read from the working folder when neither `--config` nor
/// `OSSTREAM_CONFIG` names one, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "osstream.toml";

/// The system-wide configuration file, read when no other is named or found.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/osstream/osstream.toml";

/// The environment variable that names a configuration file.
pub const CONFIG_ENV: &str = "OSSTREAM_CONFIG";

/// Which configuration file was read, and how it was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConfigFile {
    /// None: built-in defaults, the environment and flags only.
    #[default]
    None,
    /// `--config FILE`.
    Flag(PathBuf),
    /// `OSSTREAM_CONFIG=FILE`.
    Env(PathBuf),
    /// `./osstream.toml`.
    WorkingDir(PathBuf),
    /// `/etc/osstream/osstream.toml`.
    System(PathBuf),
}

impl ConfigFile {
    /// The file, if one was read.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigFile::None => None,
            ConfigFile::Flag(p)
            | ConfigFile::Env(p)
            | ConfigFile::WorkingDir(p)
            | ConfigFile::System(p) => Some(p),
        }
    }

    /// One line for logs and `config show`: the file and why it was read.
    pub fn describe(&self) -> String {
        match self {
            ConfigFile::None => format!(
                "no configuration file (none named by --config or {CONFIG_ENV}, no ./{DEFAULT_CONFIG_FILE}, no {SYSTEM_CONFIG_FILE}): built-in defaults"
            ),
            ConfigFile::Flag(p) => format!("{} (--config)", p.display()),
            ConfigFile::Env(p) => format!("{} ({CONFIG_ENV})", p.display()),
            ConfigFile::WorkingDir(p) => format!("{} (found in the working folder)", p.display()),
            ConfigFile::System(p) => format!("{} (the system configuration)", p.display()),
        }
    }
}

/// Finds the configuration file: `--config FILE`, else `OSSTREAM_CONFIG`, else
/// `./osstream.toml`, else `/etc/osstream/osstream.toml`, else none. A file named by the
/// flag or the variable must exist.
pub fn locate(flag: Option<&Path>) -> Result<ConfigFile> {
    let must_exist = |path: &Path, how: &str| {
        if path.is_file() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "configuration file {} ({how}) does not exist",
                    path.display()
                ),
            ))
        }
    };
    if let Some(path) = flag {
        must_exist(path, "--config")?;
        return Ok(ConfigFile::Flag(path.to_owned()));
    }
    if let Some(value) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        must_exist(&path, CONFIG_ENV)?;
        return Ok(ConfigFile::Env(path));
    }
    if Path::new(DEFAULT_CONFIG_FILE).is_file() {
        return Ok(ConfigFile::WorkingDir(PathBuf::from(DEFAULT_CONFIG_FILE)));
    }
    if Path::new(SYSTEM_CONFIG_FILE).is_file() {
        return Ok(ConfigFile::System(PathBuf::from(SYSTEM_CONFIG_FILE)));
    }
    Ok(ConfigFile::None)
}

/// Everything `osstream` can be configured with. `examples/osstream.toml` documents each key.
///
/// Cache tiers (`[cache.KIND]`) and boot protocols (`[KIND]`) are tables of kinds the
/// registry knows ([`crate::wiring::registry`]); [`load`] checks them by their kind and
/// fills in their defaults, so they are as strictly checked as the typed keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The file this configuration was read from (set by [`load`]).
    #[serde(skip)]
    pub file: ConfigFile,
    /// Where osstream keeps its state: images of the default backend, caches, the catalog.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// The demo vdisk created on first run.
    pub demo: DemoConfig,
    /// Image backends by name; each table has a `kind` and that kind's keys.
    pub backends: BTreeMap<String, Dict>,
    /// Cache tiers.
    pub cache: CacheConfig,
    /// The catalog of vdisks, clients and sessions.
    pub catalog: CatalogConfig,
    /// Client sessions and their write overlays.
    pub sessions: SessionsConfig,
    /// Boot profiles: recorded per vdisk, streamed ahead of the next boot.
    pub profile: osstream_profile::ProfileConfig,
    /// Hedged backend reads: a read far slower than usual is sent again.
    pub hedge: osstream_core::HedgeConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Bandwidth and IOPS limits per client and group.
    pub limits: osstream_core::LimitsConfig,
    /// Several servers on one catalog: this server's share of new sessions.
    pub cluster: ClusterConfig,
    /// Boot protocols by section name (`[nbd]`), each a table of its kind.
    #[serde(flatten)]
    pub protocols: BTreeMap<String, Value>,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or per-target levels such as
    /// `"info,osstream_nbd=debug"`. Default: `info`.
    pub filter: String,
    /// `"text"` (for people) or `"json"` (one object per line, for log shippers: the
    /// client's MAC, session and vdisk under `span` on every line about a client).
    /// Default: `"text"`.
    pub format: LogFormat,
}

/// How log lines are written (`[log] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `http://LISTEN/metrics` on a listener of their own
    /// (`HOST:PORT`; keep it off the boot network: metrics name vdisks and clients).
    /// Default: unset (no listener; `[http] metrics = true` serves them on the HTTP
    /// listener instead).
    pub listen: Option<String>,
}

/// `[cluster]`: what this server offers when several share one catalog (PostgreSQL)
/// and one store. A lone server needs none of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Its name in `osstream server list` and in logs. Default: the host name.
    pub name: Option<String>,
    /// Its share of new sessions relative to the other servers: a server of capacity 2
    /// takes twice the load of one of capacity 1. Default: `1.0`.
    pub capacity: f64,
    /// Client subnets that prefer this server (`["10.1.0.0/16"]`): their new sessions
    /// go to the least loaded of the servers listing their subnet, while one is alive
    /// and not drained. Default: none.
    pub subnets: Vec<String>,
    /// Place the new sessions of the clients this server's HTTP listener boots on the
    /// least loaded server (it may be another one: the boot script points the client
    /// there). `false`: every session opened here is served here (agents still learn
    /// every server, to fail over to). Default: `true`.
    pub placement: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: None,
            capacity: 1.0,
            subnets: Vec::new(),
            placement: true,
        }
    }
}

impl ClusterConfig {
    /// The subnets, parsed (checked at start-up by [`load`]).
    pub fn parsed_subnets(&self) -> Result<Vec<osstream_catalog::Subnet>> {
        self.subnets
            .iter()
            .map(|text| {
                text.parse().map_err(|e: Error| {
                    Error::new(
                        ErrorKind::Config,
                        format!("cluster.subnets: {}", e.message()),
                    )
                })
            })
            .collect()
    }
}

/// `[demo]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// On first run, create `<data_dir>/images/demo.img` so the quickstart works.
    /// Default: true.
    pub create: bool,
    /// Its size. Default: `64MiB`.
    pub size: ByteSize,
}

/// `[catalog]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`. Default: unset, meaning
    /// `sqlite://<data_dir>/catalog.db`.
    pub url: Option<String>,
}

/// `[sessions]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Folder of disk write overlays (`<dir>/<client>/<vdisk>/`); relative to `data_dir`.
    /// Default: `overlays`.
    pub overlay_dir: PathBuf,
    /// Folder of `shared-disk` write overlays, laid out like `overlay_dir`: the same
    /// shared storage on every server sharing the catalog (an NFS mount), so a session
    /// moves to another server with its writes when its own dies. Relative to
    /// `data_dir`. Default: unset (this server opens no `shared-disk` session).
    pub shared_overlay_dir: Option<PathBuf>,
    /// RAM one session's `ram` / `ram-overflow-disk` overlay may use. Default: `512MiB`.
    pub ram_capacity: ByteSize,
    /// Copy-on-write granularity. Default: `4KiB`.
    pub block_size: ByteSize,
    /// How often the server sends its heartbeat to the catalog, checks for sessions
    /// closed or taken elsewhere (to end their connections here) and ends idle sessions.
    /// Default: `2s`.
    pub reconcile_interval: osstream_core::Seconds,
    /// A session with no connection ends this long after its last one closed (a booting
    /// client connects several times: firmware, initramfs, the OS). Default: `60s`.
    pub grace: osstream_core::Seconds,
    /// A session nobody ever connected to ends this long after it was opened, and a
    /// private vdisk's lock with it. Default: `10m`.
    pub lease: osstream_core::Seconds,
    /// A server whose heartbeat is older than this is gone for the others sharing the
    /// catalog: its private and `shared-disk` sessions may move to another server (fenced
    /// by a new epoch) and its other sessions count as disconnected. It stops writing for
    /// those sessions after half of this without reaching the catalog. Use the same
    /// value on every server. Default: `10s`.
    pub server_timeout: osstream_core::Seconds,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            overlay_dir: PathBuf::from("overlays"),
            shared_overlay_dir: None,
            ram_capacity: ByteSize::mib(512),
            block_size: ByteSize::kib(4),
            reconcile_interval: osstream_core::Seconds(std::time::Duration::from_secs(2)),
            grace: osstream_core::Seconds(std::time::Duration::from_secs(60)),
            lease: osstream_core::Seconds(std::time::Duration::from_secs(600)),
            server_timeout: osstream_core::Seconds(std::time::Duration::from_secs(10)),
        }
    }
}

/// `[cache]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// The tiers a read looks in, nearest the client first (a miss in one is filled from
    /// the next, the last from the backend). Default: `["ram"]`; `[]` caches nothing.
    pub tiers: Vec<String>,
    /// Each tier's table, `[cache.KIND]`.
    #[serde(flatten)]
    pub tables: BTreeMap<String, Value>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tiers: vec!["ram".to_owned()],
            tables: BTreeMap::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: ConfigFile::None,
            data_dir: PathBuf::from("./osstream-data"),
            log: LogConfig::default(),
            demo: DemoConfig::default(),
            backends: BTreeMap::new(),
            cache: CacheConfig::default(),
            catalog: CatalogConfig::default(),
            sessions: SessionsConfig::default(),
            profile: osstream_profile::ProfileConfig::default(),
            hedge: osstream_core::HedgeConfig::default(),
            metrics: MetricsConfig::default(),
            limits: osstream_core::LimitsConfig::default(),
            cluster: ClusterConfig::default(),
            protocols: BTreeMap::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            create: true,
            size: ByteSize::mib(64),
        }
    }
}

impl Config {
    /// The catalog URL: configured, or a SQLite file in the data directory.
    pub fn catalog_url(&self) -> String {
        self.catalog
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("catalog.db").display()))
    }
}

/// The backend used when the configuration names none: raw images in
/// `<data_dir>/images`, read-only.
pub const DEFAULT_BACKEND: &str = "images";

fn default_backends() -> BTreeMap<String, Dict> {
    let mut table = Dict::new();
    table.insert("kind".into(), Value::from("file"));
    table.insert("root".into(), Value::from("images"));
    BTreeMap::from([(DEFAULT_BACKEND.to_owned(), table)])
}

/// Where the configuration comes from, besides the built-in defaults and the environment.
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// `--config FILE`: must exist.
    pub file: Option<&'a Path>,
    /// Flag overrides, as a figment dictionary of the same shape as [`Config`].
    pub overrides: Dict,
}

/// Builds the effective configuration and checks it (unknown keys, bad values).
pub fn load(sources: Sources<'_>) -> Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    let file = locate(sources.file)?;
    if let Some(path) = file.path() {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment
        // OSSTREAM_CONFIG names the file; it is no key of it.
        .merge(Env::prefixed("OSSTREAM_").ignore(&["config"]).split("__"))
        .merge(Serialized::defaults(sources.overrides));
    let mut config: Config = figment.extract().map_err(|err| {
        let lines: Vec<String> = err.into_iter().map(|e| describe(&e)).collect();
        Error::new(
            ErrorKind::Config,
            format!("invalid configuration:\n  {}", lines.join("\n  ")),
        )
    })?;
    if config.backends.is_empty() {
        config.backends = default_backends();
    }
    check(&config)?;
    fill_components(&mut config, &figment)?;
    config.file = file;
    Ok(config)
}

/// One figment error as a line that names the key and where the value came from.
fn describe(err: &figment::Error) -> String {
    let key = err.path.join(".");
    let origin = err
        .metadata
        .as_ref()
        .map(osstream_core::value_origin)
        .unwrap_or_default();
    if key.is_empty() {
        format!("{}{origin}", err.kind)
    } else {
        format!("{key}: {}{origin}", err.kind)
    }
}

/// The levels a log filter may name.
const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter: comma-separated directives, each a level or `TARGET=LEVEL`.
///
/// `tracing`'s own parser takes any word as a target name, so a typo such as `infoo` or
/// `verbose` would silently log nothing at all; refusing it is kinder.
pub fn check_log_filter(filter: &str) -> Result<()> {
    let bad = |directive: &str, why: &str| {
        Error::new(
            ErrorKind::Config,
            format!(
                "log.filter = {filter:?} is not a valid filter: {directive:?} {why}; use a level \
                 ({}) or per-crate levels such as \"info,osstream_nbd=debug\"",
                LOG_LEVELS.join(", ")
            ),
        )
    };
    let is_level = |word: &str| LOG_LEVELS.contains(&word.trim().to_ascii_lowercase().as_str());
    if filter.trim().is_empty() {
        return Err(bad(filter, "is empty"));
    }
    for directive in filter.split(',').map(str::trim) {
        match directive.split_once('=') {
            None if is_level(directive) => {}
            None => return Err(bad(directive, "is not a level")),
            Some((target, level)) => {
                let target_ok = !target.is_empty()
                    && target
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':'));
                if !target_ok {
                    return Err(bad(directive, "does not start with a crate or module name"));
                }
                if !is_level(level) {
                    return Err(bad(directive, "does not end in a level"));
                }
            }
        }
    }
    Ok(())
}

fn check(config: &Config) -> Result<()> {
    check_log_filter(&config.log.filter)?;
    config.profile.check()?;
    config.hedge.check()?;
    config.limits.check()?;
    config.cluster.parsed_subnets()?;
    if !(config.cluster.capacity.is_finite() && config.cluster.capacity > 0.0) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "cluster.capacity = {} must be a number above 0 (1.0 is an ordinary server)",
                config.cluster.capacity
            ),
        ));
    }
    let overlay = &config.sessions.block_size;
    if overlay.bytes() < 512 || !overlay.bytes().is_power_of_two() || overlay.bytes() > 1 << 20 {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "sessions.block_size = {overlay} must be a power of two from 512 bytes to 1MiB"
            ),
        ));
    }
    let sessions = &config.sessions;
    if sessions.server_timeout.0 < sessions.reconcile_interval.0 * 3 {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "sessions.server_timeout = {} must be at least three reconcile intervals ({}): \
                 a server misses no more than a heartbeat or two before others take its sessions",
                sessions.server_timeout, sessions.reconcile_interval
            ),
        ));
    }
    for (name, table) in &config.backends {
        if name.is_empty() || name.contains('/') {
            return Err(Error::new(
                ErrorKind::Config,
                format!("backend name {name:?} must be non-empty and contain no '/'"),
            ));
        }
        if !table.contains_key("kind") {
            return Err(Error::new(
                ErrorKind::Config,
                format!("[backends.{name}] needs a `kind`"),
            ));
        }
    }
    Ok(())
}

/// The keys `Config` itself has, for the message about an unknown one.
const TOP_LEVEL_KEYS: &[&str] = &[
    "data_dir", "log", "demo", "backends", "cache", "catalog", "sessions", "profile", "hedge",
    "metrics", "limits",
];

/// `tables` as tables: every value under `what` must be one.
fn as_tables(what: &str, tables: &BTreeMap<String, Value>) -> Result<BTreeMap<String, Dict>> {
    tables
        .iter()
        .map(|(key, value)| match value {
            Value::Dict(_, dict) => Ok((key.clone(), dict.clone())),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!("{what}{key} must be a table ([{what}{key}])"),
            )),
        })
        .collect()
}

/// Checks the cache tier and protocol tables by their kinds and replaces them with
/// their effective values (every default filled in, as `config show` prints them).
fn fill_components(config: &mut Config, source: &Figment) -> Result<()> {
    let registry = crate::wiring::registry();
    let protocols = registry.protocol_kinds();
    if let Some(key) = config
        .protocols
        .keys()
        .find(|k| !protocols.contains(&k.as_str()))
    {
        return Err(unknown_key(
            source,
            key,
            &format!(
                "known keys: {}, and the protocol sections {}",
                TOP_LEVEL_KEYS.join(", "),
                protocols.join(", ")
            ),
        ));
    }
    let tiers = registry.tier_kinds();
    if let Some(key) = config
        .cache
        .tables
        .keys()
        .find(|k| !tiers.contains(&k.as_str()))
    {
        return Err(unknown_key(
            source,
            &format!("cache.{key}"),
            &format!(
                "[cache] has `tiers` and a table per tier; tiers this build knows: {}",
                tiers.join(", ")
            ),
        ));
    }
    as_tables("", &config.protocols)?;
    let present: Vec<String> = config.protocols.keys().cloned().collect();
    config.protocols = registry
        .effective_protocols(source, &present)?
        .into_iter()
        .map(|(kind, dict)| (kind, Value::from(dict)))
        .collect();
    as_tables("cache.", &config.cache.tables)?;
    let present: Vec<String> = config.cache.tables.keys().cloned().collect();
    config.cache.tables = registry
        .effective_tiers(source, &config.cache.tiers, &present)?
        .into_iter()
        .map(|(kind, dict)| (kind, Value::from(dict)))
        .collect();
    Ok(())
}

/// An unknown key, with where it was set (file or environment variable).
fn unknown_key(source: &Figment, key: &str, known: &str) -> Error {
    let origin = source
        .find_metadata(key)
        .map(osstream_core::value_origin)
        .unwrap_or_default();
    Error::new(
        ErrorKind::Config,
        format!("invalid configuration: unknown key `{key}`{origin}; {known}"),
    )
}

impl Config {
    /// The protocols' tables (after [`load`]: every registered one, defaults filled in).
    pub fn protocol_tables(&self) -> Result<BTreeMap<String, Dict>> {
        as_tables("", &self.protocols)
    }

    /// The cache tiers' tables (after [`load`]: every listed one, defaults filled in).
    pub fn tier_tables(&self) -> Result<BTreeMap<String, Dict>> {
        as_tables("cache.", &self.cache.tables)
    }
}

/// Replaces secrets (backend keys naming a secret, password or token, and the password of
/// the catalog URL) with `<redacted>`, so `config show` output can be pasted into a ticket.
pub fn redact_secrets(config: &mut Config) {
    // postgres://user:PASSWORD@host/db
    if let Some(url) = &mut config.catalog.url
        && let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        *url = format!("{scheme}://{user}:<redacted>@{host}");
    }
    for table in config.backends.values_mut() {
        redact_table(table);
    }
    for value in config
        .protocols
        .values_mut()
        .chain(config.cache.tables.values_mut())
    {
        if let Value::Dict(_, table) = value {
            redact_table(table);
        }
    }
}

/// Redacts the values of keys naming a secret, password or token, in nested tables too.
fn redact_table(table: &mut Dict) {
    for (key, value) in table.iter_mut() {
        let key = key.to_ascii_lowercase();
        if ["secret", "password", "token"]
            .iter()
            .any(|w| key.contains(w))
        {
            *value = Value::from("<redacted>");
        } else if let Value::Dict(_, nested) = value {
            redact_table(nested);
        }
    }
}

/// The effective configuration as TOML, for `osstream config show`.
pub fn to_toml(config: &Config) -> Result<String> {
    toml::to_string_pretty(config).map_err(|e| {
        Error::new(
            ErrorKind::Unexpected,
            format!("cannot print the configuration: {e}"),
        )
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn load_from(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        load(Sources {
            file: Some(&path),
            overrides: Dict::new(),
        })
    }

    #[test]
    fn defaults_are_the_embedded_server() {
        let config = load_from("").unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./osstream-data"));
        assert!(config.backends.contains_key("images"));
        assert_eq!(config.cache.tiers, vec!["ram".to_owned()]);
        let ram = &config.tier_tables().unwrap()["ram"];
        assert_eq!(ram["enabled"], Value::from(true));
        #[cfg(feature = "boot-nbd")]
        assert_eq!(
            config.protocol_tables().unwrap()["nbd"]["listen"],
            Value::from(vec!["127.0.0.1:10809".to_owned()])
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_from("[cache.ram]\ncapacty = \"1GiB\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("capacty"), "{text}");
        assert!(text.contains("capacity"), "{text}");
        let err = load_from("colour = \"blue\"\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = load_from("[nbx]\nlisten = []\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown key `nbx` (from "),
            "{err}"
        );
        assert!(err.to_string().contains("c.toml"), "{err}");
        let err = load_from("[cache]\nteirs = [\"ram\"]\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown key `cache.teirs`"),
            "{err}"
        );
        let err = load_from("[cache]\ntiers = [\"ram\", \"tape\"]\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown cache tier \"tape\"; known tiers: disk, ram"),
            "{err}"
        );
        let err = load_from("[cache.rma]\ncapacity = \"1GiB\"\n").unwrap_err();
        assert!(err.to_string().contains("`cache.rma`"), "{err}");
        let err = load_from("[nbd]\nlistne = []\n").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
        for bad in [
            "listen = [\"garbage\"]",
            "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
            "max_connections = 0",
            "handshake_timeout = \"0s\"",
        ] {
            let err = load_from(&format!("[nbd]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains("nbd."), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_and_backends_parse() {
        let config = load_from(
            "data_dir = \"/srv/osstream\"\n[cache.ram]\ncapacity = \"8GiB\"\nblock_size = \"128KiB\"\n\
             [backends.nas]\nkind = \"file\"\nroot = \"/mnt/nas/images\"\n",
        )
        .unwrap();
        let ram = &config.tier_tables().unwrap()["ram"];
        assert_eq!(
            ram["capacity"].deserialize::<ByteSize>().unwrap(),
            ByteSize::gib(8)
        );
        assert_eq!(
            config.backends.len(),
            1,
            "configured backends replace the default"
        );
        assert!(load_from("[cache.ram]\nblock_size = \"1000\"\n").is_err());
        assert!(
            load_from("[cache.ram]\ncapacity = \"lots\"\n")
                .unwrap_err()
                .to_string()
                .contains("lots")
        );
    }

    #[test]
    fn log_filters_are_checked() {
        for good in [
            "info",
            "DEBUG",
            "warn,osstream_nbd=debug",
            "off",
            "osstream_core::cache=trace",
        ] {
            check_log_filter(good).unwrap();
        }
        for bad in [
            "infoo",
            "verbose",
            "",
            "info,",
            "osstream=loud",
            "=info",
            "a b=info",
        ] {
            let err = check_log_filter(bad).unwrap_err().to_string();
            assert!(
                err.contains("off, error, warn, info, debug, trace"),
                "{bad}: {err}"
            );
        }
        assert!(load_from("[log]\nfilter = \"infoo\"\n").is_err());
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load(Sources {
            file: Some(Path::new("/nonexistent/osstream.toml")),
            overrides: Dict::new(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
