//! [`Exports`]: the names protocols serve, resolved to layered sources.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::{DynBackend, ImageStat, OpenMode, validate_image_name};
use crate::error::{Error, ErrorKind, Result};
use crate::layer::Layer;
use crate::source::DynSource;

/// One name a client may open, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// The name to ask for: the image name, or `BACKEND/IMAGE` when two backends hold an
    /// image of the same name.
    pub name: String,
    /// A human-readable line for listings.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Opened read-write.
    pub writable: bool,
}

/// Resolves export names to images on the configured backends and wraps each opened
/// image in the configured layers, in order (the first layer sits next to the backend).
///
/// Listing and opening ask the backends every time, so images added to or removed from a
/// backend show up without a restart. Layers hold the shared state (one RAM cache for all
/// clients), so opening per connection is cheap.
#[derive(Debug)]
pub struct Exports {
    backends: Vec<DynBackend>,
    layers: Vec<Arc<dyn Layer>>,
}

impl Exports {
    /// Exports over `backends`, wrapped in `layers`.
    pub fn new(backends: Vec<DynBackend>, layers: Vec<Arc<dyn Layer>>) -> Self {
        Exports { backends, layers }
    }

    /// The configured backends.
    pub fn backends(&self) -> &[DynBackend] {
        &self.backends
    }

    /// The configured layers, backend side first.
    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    async fn all_images(&self) -> Result<Vec<(DynBackend, ImageStat)>> {
        let mut all = Vec::new();
        for backend in &self.backends {
            for stat in backend.list().await? {
                all.push((backend.clone(), stat));
            }
        }
        Ok(all)
    }

    /// Every export, sorted by name.
    pub async fn list(&self) -> Result<Vec<ExportEntry>> {
        let images = self.all_images().await?;
        let mut owners: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, stat) in &images {
            *owners.entry(stat.name.as_str()).or_default() += 1;
        }
        let mut entries: Vec<ExportEntry> = images
            .iter()
            .map(|(backend, stat)| {
                let name = if owners[stat.name.as_str()] == 1 {
                    stat.name.clone()
                } else {
                    format!("{}/{}", backend.name(), stat.name)
                };
                ExportEntry {
                    name,
                    description: describe(backend, stat),
                    size: stat.size,
                    writable: stat.writable,
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Opens the export `name` (`IMAGE` or `BACKEND/IMAGE`) with every layer applied.
    pub async fn open(&self, name: &str) -> Result<(DynSource, ExportEntry)> {
        let (backend, stat) = self.resolve(name).await?;
        let mode = if stat.writable {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        let mut source = backend.open(&stat.name, mode).await?;
        for layer in &self.layers {
            source = layer.layer(source);
        }
        let entry = ExportEntry {
            name: name.to_owned(),
            description: describe(&backend, &stat),
            size: source.info().size,
            writable: stat.writable,
        };
        Ok((source, entry))
    }

    async fn resolve(&self, name: &str) -> Result<(DynBackend, ImageStat)> {
        if let Some((backend_name, image)) = name.split_once('/') {
            validate_image_name(image)?;
            let backend = self
                .backends
                .iter()
                .find(|b| b.name() == backend_name)
                .ok_or_else(|| not_found(name))?;
            let stat = backend.stat(image).await.map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    not_found(name)
                } else {
                    e
                }
            })?;
            return Ok((backend.clone(), stat));
        }
        validate_image_name(name)?;
        let mut matches = Vec::new();
        for backend in &self.backends {
            match backend.stat(name).await {
                Ok(stat) => matches.push((backend.clone(), stat)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match matches.len() {
            0 => Err(not_found(name)),
            1 => Ok(matches.remove(0)),
            _ => {
                let names: Vec<String> = matches
                    .iter()
                    .map(|(b, _)| format!("{}/{name}", b.name()))
                    .collect();
                Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "export {name:?} is ambiguous; ask for one of: {}",
                        names.join(", ")
                    ),
                )
                .with_op("open_export"))
            }
        }
    }
}

fn describe(backend: &DynBackend, stat: &ImageStat) -> String {
    format!(
        "{} on {} backend '{}'{}",
        stat.name,
        backend.kind(),
        backend.name(),
        if stat.writable { " (read-write)" } else { "" }
    )
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no export named {name:?}")).with_op("open_export")
}
