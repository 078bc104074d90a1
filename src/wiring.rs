//! What every command builds from the configuration: the registry of kinds, backends,
//! the catalog; and the registration of an image as a vdisk, shared by `vdisk add` and
//! `vdisk import`.

use osstream_catalog::{BootMethod, Catalog, SqlCatalog, Vdisk, VdiskMode, WriteCache};
use osstream_core::{BackendContext, Error, ErrorKind, Registry, Result};

use crate::args::VdiskAdd;
use crate::config::Config;

/// Every backend, cache tier and protocol kind this build knows: adding one is a crate
/// and a line here.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register_tier::<osstream_core::RamTierConfig>();
    registry.register_tier::<osstream_cache_disk::DiskTierConfig>();
    #[cfg(feature = "boot-nbd")]
    osstream_nbd::register(&mut registry);
    #[cfg(feature = "boot-http")]
    osstream_http::register(&mut registry);
    #[cfg(feature = "boot-tftp")]
    osstream_tftp::register(&mut registry);
    #[cfg(feature = "boot-pxe")]
    osstream_pxe::register(&mut registry);
    #[cfg(feature = "backend-file")]
    osstream_backend_file::register(&mut registry);
    #[cfg(feature = "backend-nfs")]
    osstream_backend_nfs::register(&mut registry);
    #[cfg(feature = "backend-block")]
    osstream_backend_block::register(&mut registry);
    #[cfg(feature = "backend-s3")]
    osstream_backend_s3::register(&mut registry);
    #[cfg(feature = "backend-plugin")]
    osstream_plugin_host::register(&mut registry);
    registry
}

/// Builds the backend `[backends.NAME]` of the configuration; with `catalog`, backends
/// that commit fenced writes there (chunked S3 images) read what was committed.
pub fn backend_named(
    config: &Config,
    name: &str,
    catalog: Option<&SqlCatalog>,
) -> Result<osstream_core::DynBackend> {
    let table = config.backends.get(name).cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "no backend named {name:?}; configured backends: {}",
                config
                    .backends
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let ctx = BackendContext {
        data_dir: config.data_dir.clone(),
        ledger: catalog.map(|c| {
            std::sync::Arc::new(c.clone()) as std::sync::Arc<dyn osstream_core::ImageLedger>
        }),
    };
    registry().build_backend(&ctx, name, table)
}

/// Records where the bytes of the vdisks that have no image identity yet live (vdisks
/// registered before identities were kept), for every vdisk whose backend this
/// configuration has (plugins excepted: naming their images means loading them). The
/// server does it for all vdisks at start-up; this covers admin commands run before.
pub async fn fill_image_ids(config: &Config, catalog: &SqlCatalog) -> Result<()> {
    let mut built: std::collections::BTreeMap<String, Option<osstream_core::DynBackend>> =
        std::collections::BTreeMap::new();
    let mut ids = Vec::new();
    for vdisk in catalog.vdisks().await? {
        if vdisk.image_id.is_some() {
            continue;
        }
        let backend = built.entry(vdisk.backend.clone()).or_insert_with(|| {
            let table = config.backends.get(&vdisk.backend)?;
            let is_plugin = matches!(table.get("kind"), Some(figment::value::Value::String(_, k)) if k == "plugin");
            if is_plugin {
                return None;
            }
            backend_named(config, &vdisk.backend, Some(catalog)).ok()
        });
        if let Some(backend) = backend
            && let Ok(identity) = backend.identity(&vdisk.key)
        {
            ids.push((vdisk.name, identity));
        }
    }
    catalog.set_image_ids(&ids).await.map(drop)
}

/// Registers the image `key` (described by `stat`) as the vdisk `add.name`; `image_id`
/// is where its bytes live (the backend's identity of it).
pub async fn register_vdisk(
    catalog: &SqlCatalog,
    backend: &osstream_core::DynBackend,
    add: &VdiskAdd,
    key: String,
    stat: &osstream_core::ImageStat,
    image_id: String,
) -> Result<Vdisk> {
    let mode = add.mode.parse::<VdiskMode>()?;
    if mode == VdiskMode::Private {
        check_private(backend, &add.name, stat).await?;
    }
    let vdisk = Vdisk {
        name: add.name.clone(),
        backend: add.backend.clone(),
        key,
        size: stat.size,
        mode,
        write_cache: add.write_cache.parse::<WriteCache>()?,
        boot: add.boot.parse::<BootMethod>()?,
        kernel: add.kernel.clone(),
        initrd: add.initrd.clone(),
        cmdline: add.cmdline.clone(),
        description: add.description.clone(),
        enabled: true,
        locked_by: None,
        created_at: 0,
        image_id: Some(image_id),
    };
    catalog.add_vdisk(&vdisk).await?;
    catalog.vdisk(&vdisk.name).await
}

/// Refuses to make `vdisk` private unless its client could write the image `stat`
/// describes on `backend` (a read-only backend, a file with hard links): refused here,
/// not at the client's first connection.
pub async fn check_private(
    backend: &osstream_core::DynBackend,
    vdisk: &str,
    stat: &osstream_core::ImageStat,
) -> Result<()> {
    backend.check_private(stat).await.map_err(|err| {
        Error::new(
            err.kind(),
            format!("vdisk {vdisk:?} cannot be private: {}", err.message()),
        )
    })
}

/// The catalog the configuration names, if it exists: admin commands run with the wrong
/// configuration (another folder, a missing `--config`) say so instead of creating an
/// empty catalog where none should be.
pub async fn open_existing_catalog(config: &Config) -> Result<SqlCatalog> {
    SqlCatalog::open_existing(&config.catalog_url())
        .await
        .map_err(|err| {
            if err.kind() != ErrorKind::NotFound {
                return err;
            }
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "{}; configuration: {}. `osstream serve` creates the catalog when it first starts, \
                     `osstream init` creates it now; or point --config or OSSTREAM_CONFIG at the \
                     server's configuration",
                    err.message(),
                    config.file.describe()
                ),
            )
        })
}

/// The catalog the configuration names, created (with `data_dir`) if missing.
pub async fn open_catalog(config: &Config) -> Result<SqlCatalog> {
    let url = config.catalog_url();
    if url.starts_with("sqlite:") {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::from_io(
                e,
                format!("cannot create data_dir {}", config.data_dir.display()),
            )
        })?;
    }
    SqlCatalog::open(&url).await
}
