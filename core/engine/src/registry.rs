//! The explicit registry from a configuration `kind` to its implementation.
//!
//! No globals and no life-before-main: the binary builds a [`Registry`], each crate adds
//! its kinds with one typed `register` call, and configuration tables are turned into
//! components by looking their `kind` up here. A kind is its configuration type: it
//! names itself ([`BackendKind::KIND`]), deserializes from its table (unknown keys are
//! refused with the section named) and builds the component. An unknown kind is an
//! error that lists the known ones.
//!
//! Three families are registered:
//! - image backends, `[backends.NAME]` with `kind = "..."` ([`BackendKind`]);
//! - cache tiers, `[cache.KIND]`, stacked in the order `[cache] tiers` lists
//!   ([`TierKind`]);
//! - boot protocols, `[KIND]` at the top level, each on or off by its own `enabled`
//!   ([`ProtocolKind`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use figment::Figment;
use figment::value::{Dict, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::DynBackend;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::Layer;
use crate::protocol::BootProtocol;

/// What every factory may need besides its own table.
#[derive(Debug, Clone)]
pub struct BackendContext {
    /// The server's data directory; relative paths in tables are resolved against it.
    pub data_dir: PathBuf,
    /// Where fenced images are committed (the catalog), for backends whose storage
    /// cannot fence late writes itself; `None` where no catalog is at hand (tests, tools).
    pub ledger: Option<std::sync::Arc<dyn crate::ImageLedger>>,
}

impl BackendContext {
    /// A context with `data_dir` and no ledger.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BackendContext {
            data_dir: data_dir.into(),
            ledger: None,
        }
    }

    /// Resolves a possibly relative path from a table against the data directory.
    pub fn resolve(&self, path: &std::path::Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.data_dir.join(path)
        }
    }
}

/// An image backend kind: the type of its `[backends.NAME]` table.
pub trait BackendKind: DeserializeOwned + 'static {
    /// The `kind` value that selects it.
    const KIND: &'static str;
    /// Builds the backend configured as `[backends.NAME]`.
    fn build(self, ctx: &BackendContext, name: &str) -> Result<DynBackend>;
}

/// A cache tier kind: the type of its `[cache.KIND]` table.
pub trait TierKind: DeserializeOwned + Serialize + Default + 'static {
    /// The name `[cache] tiers` lists it by.
    const KIND: &'static str;
    /// Whether the tier is on (a listed tier may still be switched off in its table).
    fn enabled(&self) -> bool {
        true
    }
    /// Checks values the type alone cannot (ranges, powers of two), naming the key.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Builds the caching layer over this tier (the registry has run `check` first).
    fn build(self, ctx: &BackendContext) -> Result<Arc<dyn Layer>>;
}

/// A boot protocol kind: the type of its top-level `[KIND]` table.
pub trait ProtocolKind: DeserializeOwned + Serialize + Default + 'static {
    /// The section name, `[nbd]`.
    const KIND: &'static str;
    /// Whether the protocol is served.
    fn enabled(&self) -> bool;
    /// Checks values the type alone cannot, naming the key.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Builds the protocol server (the registry has run `check` first; binding comes
    /// later, in [`BootProtocol::bind`]).
    fn build(self, ctx: &BackendContext) -> Result<Box<dyn BootProtocol>>;
}

/// Checks that `value` of the key `key` (`http.listen`) is a numeric `HOST:PORT` (IPv6 as
/// `[ADDR]:PORT`), as protocols that bind one socket need it.
pub fn check_listen(key: &str, value: &str) -> Result<std::net::SocketAddr> {
    value.parse().map_err(|_| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{key}: {value:?} is not HOST:PORT with a numeric address (IPv6 as [ADDR]:PORT)"
            ),
        )
    })
}

/// Builds a backend named `name` from its configuration table (without the `kind` key).
pub type BackendFactory = fn(ctx: &BackendContext, name: &str, table: Dict) -> Result<DynBackend>;

/// One registered tier or protocol kind, its type erased.
struct Component<T> {
    /// Parses and checks the table at `section` of a configuration (errors say where a
    /// bad value came from); returns it with every default filled in, and whether the
    /// component is on.
    effective: fn(config: &Figment, section: &str) -> Result<(Dict, bool)>,
    /// Builds the component from its table (checked here too); `None` when it is off.
    build: fn(ctx: &BackendContext, section: &str, table: Dict) -> Result<Option<T>>,
}

fn backend_factory<K: BackendKind>(
    ctx: &BackendContext,
    name: &str,
    table: Dict,
) -> Result<DynBackend> {
    parse_table::<K>(&format!("backends.{name}"), table)?.build(ctx, name)
}

/// Parses and checks one section; returns it with defaults filled in, and whether it is on.
fn effective<K: DeserializeOwned + Serialize>(
    config: &Figment,
    section: &str,
    check: fn(&K) -> Result<()>,
    enabled: fn(&K) -> bool,
) -> Result<(Dict, bool)> {
    let config = parse_section::<K>(config, section)?;
    check(&config)?;
    Ok((to_dict(section, &config)?, enabled(&config)))
}

fn tier_effective<K: TierKind>(config: &Figment, section: &str) -> Result<(Dict, bool)> {
    effective::<K>(config, section, K::check, K::enabled)
}

/// Parses a tier's table once, checks it, and builds it when it is on.
fn tier_build<K: TierKind>(
    ctx: &BackendContext,
    section: &str,
    table: Dict,
) -> Result<Option<Arc<dyn Layer>>> {
    let config = parse_table::<K>(section, table)?;
    config.check()?;
    config.enabled().then(|| config.build(ctx)).transpose()
}

fn protocol_effective<K: ProtocolKind>(config: &Figment, section: &str) -> Result<(Dict, bool)> {
    effective::<K>(config, section, K::check, K::enabled)
}

/// Parses a protocol's table once, checks it, and builds it when it is on.
fn protocol_build<K: ProtocolKind>(
    ctx: &BackendContext,
    section: &str,
    table: Dict,
) -> Result<Option<Box<dyn BootProtocol>>> {
    let config = parse_table::<K>(section, table)?;
    config.check()?;
    config.enabled().then(|| config.build(ctx)).transpose()
}

fn to_dict<T: Serialize>(section: &str, config: &T) -> Result<Dict> {
    match Value::serialize(config) {
        Ok(Value::Dict(_, dict)) => Ok(dict),
        Ok(_) => Err(config_error(section, "does not serialize to a table")),
        Err(e) => Err(config_error(section, &e.to_string())),
    }
}

/// Maps configuration kinds to factories.
#[derive(Default)]
pub struct Registry {
    backends: BTreeMap<&'static str, BackendFactory>,
    tiers: BTreeMap<&'static str, Component<Arc<dyn Layer>>>,
    protocols: BTreeMap<&'static str, Component<Box<dyn BootProtocol>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.backend_kinds())
            .field("tiers", &self.tier_kinds())
            .field("protocols", &self.protocol_kinds())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds the backend kind `K`. A kind registered twice keeps the later one.
    pub fn register_backend<K: BackendKind>(&mut self) {
        self.backends.insert(K::KIND, backend_factory::<K>);
    }

    /// Adds the cache tier kind `K`.
    pub fn register_tier<K: TierKind>(&mut self) {
        self.tiers.insert(
            K::KIND,
            Component {
                effective: tier_effective::<K>,
                build: tier_build::<K>,
            },
        );
    }

    /// Adds the boot protocol kind `K`.
    pub fn register_protocol<K: ProtocolKind>(&mut self) {
        self.protocols.insert(
            K::KIND,
            Component {
                effective: protocol_effective::<K>,
                build: protocol_build::<K>,
            },
        );
    }

    /// Adds a backend kind built by a hand-written factory (tests).
    pub fn register_backend_factory(&mut self, kind: &'static str, factory: BackendFactory) {
        self.backends.insert(kind, factory);
    }

    /// The registered backend kinds, sorted.
    pub fn backend_kinds(&self) -> Vec<&'static str> {
        self.backends.keys().copied().collect()
    }

    /// The registered cache tier kinds, sorted.
    pub fn tier_kinds(&self) -> Vec<&'static str> {
        self.tiers.keys().copied().collect()
    }

    /// The registered protocol kinds (their section names), sorted.
    pub fn protocol_kinds(&self) -> Vec<&'static str> {
        self.protocols.keys().copied().collect()
    }

    /// Builds the backend configured as `[backends.NAME]`.
    pub fn build_backend(
        &self,
        ctx: &BackendContext,
        name: &str,
        mut table: Dict,
    ) -> Result<DynBackend> {
        let section = format!("backends.{name}");
        let kind = match table.remove("kind") {
            Some(Value::String(_, kind)) => kind,
            Some(_) => {
                return Err(config_error(&section, "`kind` must be a string"));
            }
            None => {
                return Err(config_error(
                    &section,
                    &format!(
                        "missing `kind`; known kinds: {}",
                        self.backend_kinds().join(", ")
                    ),
                ));
            }
        };
        let factory = self.backends.get(kind.as_str()).ok_or_else(|| {
            config_error(
                &section,
                &format!(
                    "unknown backend kind {kind:?}; known kinds: {}",
                    self.backend_kinds().join(", ")
                ),
            )
        })?;
        factory(ctx, name, table)
    }

    fn tier(&self, kind: &str) -> Result<&Component<Arc<dyn Layer>>> {
        self.tiers.get(kind).ok_or_else(|| {
            config_error(
                "cache",
                &format!(
                    "unknown cache tier {kind:?}; known tiers: {}",
                    self.tier_kinds().join(", ")
                ),
            )
        })
    }

    fn protocol(&self, kind: &str) -> Result<&Component<Box<dyn BootProtocol>>> {
        self.protocols.get(kind).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "unknown section [{kind}]; protocol sections this build knows: {}",
                    self.protocol_kinds()
                        .iter()
                        .map(|k| format!("[{k}]"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }

    /// Checks the cache tiers of `config` (a whole configuration): every tier `listed`
    /// and every `[cache.KIND]` table in `present` names a registered kind, no tier is
    /// listed twice, and each table parses and checks. Returns the tables with every
    /// default filled in (what `build_tiers` then takes, and `config show` prints).
    pub fn effective_tiers(
        &self,
        config: &Figment,
        listed: &[String],
        present: &[String],
    ) -> Result<BTreeMap<String, Dict>> {
        let mut seen = std::collections::BTreeSet::new();
        for kind in listed {
            self.tier(kind)?;
            if !seen.insert(kind) {
                return Err(config_error(
                    "cache",
                    &format!("tiers lists {kind:?} twice"),
                ));
            }
        }
        let mut effective = BTreeMap::new();
        for kind in present.iter().chain(listed) {
            let (dict, _) = (self.tier(kind)?.effective)(config, &format!("cache.{kind}"))?;
            effective.insert(kind.clone(), dict);
        }
        Ok(effective)
    }

    /// Builds the caching layers of the tiers `listed`, in that order (the first nearest
    /// the client, so it is applied last), skipping tiers switched off in their tables.
    pub fn build_tiers(
        &self,
        ctx: &BackendContext,
        listed: &[String],
        tables: &BTreeMap<String, Dict>,
    ) -> Result<Vec<Arc<dyn Layer>>> {
        let mut layers = Vec::new();
        for kind in listed.iter().rev() {
            let tier = self.tier(kind)?;
            let section = format!("cache.{kind}");
            let table = tables.get(kind).cloned().unwrap_or_default();
            layers.extend((tier.build)(ctx, &section, table)?);
        }
        Ok(layers)
    }

    /// Checks the protocol sections of `config` (a whole configuration): every name in
    /// `present` is a registered kind, and each table parses and checks. Returns every
    /// registered protocol's table with its defaults filled in.
    pub fn effective_protocols(
        &self,
        config: &Figment,
        present: &[String],
    ) -> Result<BTreeMap<String, Dict>> {
        for kind in present {
            self.protocol(kind)?;
        }
        let mut effective = BTreeMap::new();
        for (kind, protocol) in &self.protocols {
            let (dict, _) = (protocol.effective)(config, kind)?;
            effective.insert((*kind).to_owned(), dict);
        }
        Ok(effective)
    }

    /// Builds every registered protocol its table switches on, in kind order.
    pub fn build_protocols(
        &self,
        ctx: &BackendContext,
        tables: &BTreeMap<String, Dict>,
    ) -> Result<Vec<Box<dyn BootProtocol>>> {
        for kind in tables.keys() {
            self.protocol(kind)?;
        }
        let mut built = Vec::new();
        for (kind, protocol) in &self.protocols {
            let table = tables.get(*kind).cloned().unwrap_or_default();
            built.extend((protocol.build)(ctx, kind, table)?);
        }
        Ok(built)
    }
}

/// A configuration holding only `table` at `section` (a dotted path), for tests.
#[cfg(test)]
fn table_figment(section: &str, table: &Dict) -> Figment {
    let mut value = Value::from(table.clone());
    for key in section.rsplit('.') {
        let mut outer = Dict::new();
        outer.insert(key.to_owned(), value);
        value = Value::from(outer);
    }
    Figment::from(figment::providers::Serialized::defaults(value))
}

/// Deserializes one component's table into its typed configuration.
///
/// Component configs use `#[serde(deny_unknown_fields)]`, so a misspelt key fails here
/// with an error that names the section, the key and the valid keys.
pub fn parse_table<T: DeserializeOwned>(section: &str, table: Dict) -> Result<T> {
    let table = Figment::from(figment::providers::Serialized::defaults(table));
    parse_figment(section, table, false)
}

/// Deserializes the table at `section` (a dotted path; missing means all defaults) of a
/// whole configuration, naming where a bad value came from (file, environment).
pub fn parse_section<T: DeserializeOwned>(config: &Figment, section: &str) -> Result<T> {
    let focused = if config.find_value(section).is_ok() {
        config.focus(section)
    } else {
        Figment::new()
    };
    parse_figment(section, focused, true)
}

/// ` (from FILE)` or ` (from ENVIRONMENT VARIABLE)`: where a configuration value came
/// from, a file by its whole path (figment's own display shortens it relative to the
/// working folder, which reads as a wrong path from anywhere else).
pub fn value_origin(m: &figment::Metadata) -> String {
    match &m.source {
        Some(figment::Source::File(path)) => format!(" (from {})", path.display()),
        Some(source) => format!(" (from {source})"),
        None => format!(" (from {})", m.name),
    }
}

/// Extracts `T`; with `name_origin`, each error says where its value was set (a file, the
/// environment), as the configuration's own provider metadata records it.
fn parse_figment<T: DeserializeOwned>(
    section: &str,
    figment: Figment,
    name_origin: bool,
) -> Result<T> {
    figment.extract::<T>().map_err(|err| {
        let details: Vec<String> = err
            .into_iter()
            .map(|e| {
                let path = e.path.join(".");
                let origin = match e.metadata.as_ref().filter(|_| name_origin) {
                    // Built-in defaults: where in the code says nothing to an admin.
                    Some(m) if matches!(m.source, Some(figment::Source::Code(_))) => String::new(),
                    Some(m) => value_origin(m),
                    None => String::new(),
                };
                if path.is_empty() {
                    format!("{}{origin}", e.kind)
                } else {
                    format!("{path}: {}{origin}", e.kind)
                }
            })
            .collect();
        config_error(section, &details.join("; "))
    })
}

/// A configuration error that names the section it is about.
pub fn config_error(section: &str, message: &str) -> Error {
    Error::new(ErrorKind::Config, format!("[{section}] {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        root: String,
        #[serde(default)]
        writable: bool,
    }

    fn dict(pairs: &[(&str, &str)]) -> Dict {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.to_string())))
            .collect()
    }

    #[test]
    fn unknown_kind_lists_known_kinds() {
        let mut registry = Registry::new();
        registry.register_backend_factory("file", |_, _, _| unreachable!());
        let ctx = BackendContext {
            ledger: None,
            data_dir: "/tmp".into(),
        };
        let err = registry
            .build_backend(&ctx, "x", dict(&[("kind", "tape")]))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string()
                .contains("unknown backend kind \"tape\"; known kinds: file"),
            "{err}"
        );
        let err = registry.build_backend(&ctx, "x", dict(&[])).unwrap_err();
        assert!(err.to_string().contains("missing `kind`"), "{err}");
    }

    /// A tier kind whose layer only names itself.
    #[derive(Debug, Default, serde::Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Named {
        label: String,
    }

    #[derive(Debug)]
    struct NamedLayer(String);

    impl Layer for NamedLayer {
        fn name(&self) -> &str {
            &self.0
        }
        fn layer(&self, inner: crate::DynSource) -> crate::DynSource {
            inner
        }
    }

    impl TierKind for Named {
        const KIND: &'static str = "named";
        fn build(self, _: &BackendContext) -> Result<Arc<dyn Layer>> {
            Ok(Arc::new(NamedLayer(self.label)))
        }
    }

    #[test]
    fn tiers_are_built_in_the_listed_order_nearest_the_client_last() {
        let mut registry = Registry::new();
        registry.register_tier::<Named>();
        registry.register_tier::<crate::RamTierConfig>();
        let ctx = BackendContext::new("/tmp");
        let tables = BTreeMap::from([("named".to_owned(), dict(&[("label", "disk-like")]))]);
        let listed = vec!["ram".to_owned(), "named".to_owned()];
        let layers = registry.build_tiers(&ctx, &listed, &tables).unwrap();
        let names: Vec<&str> = layers.iter().map(|l| l.name()).collect();
        // Applied in this order: the first wraps the backend, the last faces the client.
        assert_eq!(names, vec!["disk-like", "cache"]);
        let config = table_figment("cache.named", &tables["named"]);
        let present = vec!["named".to_owned()];
        let effective = registry
            .effective_tiers(&config, &listed, &present)
            .unwrap();
        assert_eq!(effective["ram"]["capacity"], Value::from("1GiB"));
        assert_eq!(effective["named"]["label"], Value::from("disk-like"));
        let twice = ["named".to_owned(), "named".to_owned()];
        let err = registry
            .effective_tiers(&config, &twice, &present)
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let bad = table_figment("cache.named", &dict(&[("lable", "x")]));
        let err = registry
            .effective_tiers(&bad, &listed, &present)
            .unwrap_err();
        assert!(err.to_string().contains("[cache.named]"), "{err}");
        assert!(err.to_string().contains("lable"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse_table::<Sample>("backends.images", dict(&[("root", "x"), ("rot", "y")]))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("[backends.images]"), "{text}");
        assert!(text.contains("rot"), "{text}");
        assert!(text.contains("root"), "{text}");
    }
}
