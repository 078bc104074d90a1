//! The explicit registry from a configuration `kind` to its implementation.
//!
//! No globals and no life-before-main: the binary builds a [`Registry`], each backend crate
//! adds itself with its `register` function, and configuration tables are turned into
//! backends by looking their `kind` up here. An unknown kind is an error that lists the
//! known ones.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;

use crate::backend::DynBackend;
use crate::error::{Error, ErrorKind, Result};

/// What every backend factory may need besides its own table.
#[derive(Debug, Clone)]
pub struct BackendContext {
    /// The server's data directory; relative paths in backend tables are resolved
    /// against it.
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

    /// Resolves a possibly relative path from a backend table against the data directory.
    pub fn resolve(&self, path: &std::path::Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.data_dir.join(path)
        }
    }
}

/// Builds a backend named `name` from its configuration table (without the `kind` key).
pub type BackendFactory = fn(ctx: &BackendContext, name: &str, table: Dict) -> Result<DynBackend>;

/// Maps configuration kinds to factories.
#[derive(Default)]
pub struct Registry {
    backends: BTreeMap<&'static str, BackendFactory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.backend_kinds())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a backend kind. A kind registered twice keeps the later factory.
    pub fn register_backend(&mut self, kind: &'static str, factory: BackendFactory) {
        self.backends.insert(kind, factory);
    }

    /// The registered backend kinds, sorted.
    pub fn backend_kinds(&self) -> Vec<&'static str> {
        self.backends.keys().copied().collect()
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
}

/// Deserializes one component's table into its typed configuration.
///
/// Component configs use `#[serde(deny_unknown_fields)]`, so a misspelt key fails here
/// with an error that names the section, the key and the valid keys.
pub fn parse_table<T: DeserializeOwned>(section: &str, table: Dict) -> Result<T> {
    figment::Figment::from(figment::providers::Serialized::defaults(table))
        .extract::<T>()
        .map_err(|err| {
            let details: Vec<String> = err
                .into_iter()
                .map(|e| {
                    let path = e.path.join(".");
                    if path.is_empty() {
                        e.kind.to_string()
                    } else {
                        format!("{path}: {}", e.kind)
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
        registry.register_backend("file", |_, _, _| unreachable!());
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
