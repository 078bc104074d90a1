//! `osstream serve`: build the engine from the configuration and run the protocols.

use std::sync::Arc;

use osstream_catalog::SessionTimers;
use osstream_core::{
    BackendContext, DynBackend, Error, ErrorKind, Exports, OverlaySettings, Result, ServeContext,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::{Config, DEFAULT_BACKEND, LogFormat};

/// Changes the log filter of the running server (on SIGHUP).
type LogFilterHandle = tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>;

fn parse_filter(filter: &str) -> Result<Targets> {
    filter.parse().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("log.filter = {filter:?} is not a valid filter: {e}"),
        )
    })
}

fn init_logging(filter: &str, format: LogFormat) -> Result<LogFilterHandle> {
    let (targets, handle) = tracing_subscriber::reload::Layer::new(parse_filter(filter)?);
    let registry = tracing_subscriber::registry().with(targets);
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(|| osstream_core::LossyStderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(|| osstream_core::LossyStderr)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(true)
    });
    registry
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| Error::new(ErrorKind::Unexpected, format!("cannot set up logging: {e}")))?;
    Ok(handle)
}

/// Keeps request-sized buffers (up to 64 MiB) on the heap instead of a fresh `mmap`
/// each: otherwise every large cold read pays page faults and zeroing of new pages
/// (measured at ~15 % of the server's CPU for 256 KiB reads).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is called once at
    // start-up, before the runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Reads the configuration again, as at start (the same file, environment and flags).
pub type Reload = Box<dyn Fn() -> Result<Config> + Send + Sync>;

/// Runs the server until SIGINT or SIGTERM; SIGHUP reads the configuration again.
pub fn run(config: Config, reload: Reload) -> Result<()> {
    let log_filter = init_logging(&config.log.filter, config.log.format)?;
    tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("osstream")
        .build()
        .map_err(|e| Error::from_io(e, "cannot start the async runtime"))?;
    let applied_filter = std::sync::Mutex::new(config.log.filter.clone());
    runtime.block_on(serve(
        config,
        Reloader {
            reload,
            log_filter,
            applied_filter,
        },
    ))
}

/// What SIGHUP needs: how to read the configuration again, and the one setting a running
/// server changes in place.
struct Reloader {
    reload: Reload,
    log_filter: LogFilterHandle,
    /// The log filter in force: the one the server started with, or the last applied.
    applied_filter: std::sync::Mutex<String>,
}

impl Reloader {
    /// Reads the configuration again; applies the log filter; names every other key that
    /// changed, since those take effect only at a restart.
    fn reload(&self, running: &Config) {
        crate::notify::notify("RELOADING=1");
        let fresh = match (self.reload)() {
            Ok(fresh) => fresh,
            Err(err) => {
                tracing::error!(%err, "SIGHUP: the configuration does not load; the server carries on with the one it started with");
                crate::notify::notify("READY=1");
                return;
            }
        };
        let mut applied = self
            .applied_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if fresh.log.filter != *applied {
            match parse_filter(&fresh.log.filter).map(|t| self.log_filter.reload(t)) {
                Ok(Ok(())) => {
                    tracing::info!(filter = %fresh.log.filter, "SIGHUP: log filter applied");
                    *applied = fresh.log.filter.clone();
                }
                Ok(Err(err)) => tracing::error!(%err, "SIGHUP: cannot apply the log filter"),
                Err(err) => tracing::error!(%err, "SIGHUP: log filter not applied"),
            }
        }
        let changed = changed_keys(running, &fresh);
        if changed.is_empty() {
            tracing::info!("SIGHUP: configuration read again; nothing else changed");
        } else {
            tracing::warn!(keys = %changed.join(", "),
                "SIGHUP: configuration read again; these changes take effect only when the server restarts");
        }
        crate::notify::notify("READY=1");
    }
}

/// The keys (`nbd.listen`, `cache.ram.capacity`) whose values differ, `log.filter` aside.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    flatten(&name, value, out);
                }
            }
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let pairs = |config: &Config| {
        let mut out = Vec::new();
        if let Ok(value) = serde_json::to_value(config) {
            flatten("", &value, &mut out);
        }
        out.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (before, after) = (pairs(old), pairs(new));
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|key| {
            // A key one side lacks reads as unset there: a new table's unset keys
            // (`null`) changed nothing.
            let unset = "null".to_owned();
            key.as_str() != "log.filter"
                && before.get(*key).unwrap_or(&unset) != after.get(*key).unwrap_or(&unset)
        })
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

async fn serve(config: Config, reloader: Reloader) -> Result<()> {
    tracing::info!(config = %config.file.describe(), data_dir = %config.data_dir.display(), "configuration read");
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        Error::from_io(
            e,
            format!("cannot create data_dir {}", config.data_dir.display()),
        )
    })?;
    // The server lock first: a second server on this data_dir stops here, before it
    // touches the catalog or the backends.
    let (me, _server_lock) = crate::sessions::server_identity(&config.data_dir)?;
    let catalog = crate::wiring::open_catalog(&config).await?;
    tracing::info!(catalog = catalog.flavour(), "catalog ready");
    let ctx = BackendContext {
        data_dir: config.data_dir.clone(),
        ledger: Some(Arc::new(catalog.clone())),
    };

    if config.demo.create && config.backends.contains_key(DEFAULT_BACKEND) {
        let images = ctx.resolve(std::path::Path::new("images"));
        if crate::demo::ensure(&config.data_dir, &images, config.demo.size.bytes())? {
            tracing::info!(path = %images.join("demo.img").display(), size = %config.demo.size, "created the demo vdisk");
        }
    }

    let registry = crate::wiring::registry();
    // Before anything is registered or served: a protocol's own files (TLS certificates
    // and keys) that do not load stop the server here.
    let mut protocols = registry.build_protocols(&ctx, &config.protocol_tables()?)?;
    if protocols.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "no protocol is enabled; nothing to serve (this build serves: {})",
                registry.protocol_kinds().join(", ")
            ),
        ));
    }
    let mut backends: Vec<DynBackend> = Vec::new();
    for (name, table) in &config.backends {
        let backend = registry.build_backend(&ctx, name, table.clone())?;
        backend.prepare().await?;
        let images = backend.list().await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("backend '{name}' cannot list its images: {e}"),
            )
        })?;
        tracing::info!(backend = %name, kind = backend.kind(), images = images.len(), "backend ready");
        backends.push(backend);
    }

    for unlisted in config
        .cache
        .tables
        .keys()
        .filter(|kind| !config.cache.tiers.contains(kind))
    {
        tracing::warn!(tier = %unlisted, tiers = ?config.cache.tiers,
            "[cache.{unlisted}] is configured but [cache] tiers does not list it: it is not used");
    }
    let mut layers = registry.build_tiers(&ctx, &config.cache.tiers, &config.tier_tables()?)?;
    let cached = !layers.is_empty();
    if !cached {
        tracing::info!("no cache tier: every read goes to its backend");
    }
    if config.hedge.enabled {
        // Next to the backends, below the caches: it times backend reads only.
        tracing::info!(min_delay = %config.hedge.min_delay, factor = config.hedge.factor,
            budget = config.hedge.budget, "hedged backend reads on");
        layers.insert(
            0,
            Arc::new(osstream_core::HedgeLayer::new(config.hedge.clone())),
        );
    }
    if config.profile.enabled() {
        if config.profile.prefetch && !cached {
            tracing::warn!(
                "[profile] prefetch needs a cache tier to fill: boot profiles are recorded, not prefetched"
            );
        }
        tracing::info!(record = config.profile.record, prefetch = config.profile.prefetch && cached,
            quiet = %config.profile.quiet, window = %config.profile.window, "boot profiles on");
        let mut profile = config.profile.clone();
        profile.trace_dir = profile.trace_dir.map(|dir| ctx.resolve(&dir));
        layers.push(Arc::new(osstream_profile::ProfileLayer::new(
            profile,
            Arc::new(catalog.clone()),
            cached,
        )));
    }
    let server_name = config
        .cluster
        .name
        .clone()
        .unwrap_or_else(crate::sessions::host_name);
    refuse_live_twin(
        &catalog,
        &me,
        config.sessions.reconcile_interval.0,
        config.sessions.server_timeout.0,
    )
    .await?;
    catalog.register_server(&me, &server_name).await?;
    tracing::info!(server = %me.id, instance = %me.instance, "server registered in the catalog");
    for (session, what) in catalog.adopt_sessions(&me).await? {
        tracing::info!(session = %session.id, client = %session.mac, vdisk = %session.vdisk, "after the restart: {what}");
    }
    refresh_image_ids(&catalog, &backends).await;
    let overlays = OverlaySettings {
        dir: ctx.resolve(&config.sessions.overlay_dir),
        shared_dir: config
            .sessions
            .shared_overlay_dir
            .as_ref()
            .map(|dir| ctx.resolve(dir)),
        ram_capacity: config.sessions.ram_capacity.bytes(),
        block_size: config.sessions.block_size.bytes(),
    };
    let timers = SessionTimers {
        grace_ms: config.sessions.grace.0.as_millis() as i64,
        lease_ms: config.sessions.lease.0.as_millis() as i64,
        server_timeout_ms: config.sessions.server_timeout.0.as_millis() as i64,
    };
    let directory = Arc::new(crate::sessions::CatalogSessions::new(
        catalog.clone(),
        me.clone(),
        timers,
    ));
    let exports = Arc::new(
        Exports::new(backends, layers.clone())
            .with_sessions(directory.clone(), overlays.clone())
            .with_limits(
                config
                    .limits
                    .any()
                    .then(|| Arc::new(osstream_core::Limits::new(config.limits.clone()))),
            ),
    );
    crate::sessions::sweep_overlays(&catalog, &exports, &overlays).await;
    crate::metrics::register(layers.clone(), exports.clone(), overlays.ram_capacity);
    let names: Vec<String> = exports.list().await?.into_iter().map(|e| e.name).collect();

    let mut session_address = None;
    let mut boot_url = None;
    for protocol in &mut protocols {
        let bound = protocol.bind().await?;
        tracing::info!(protocol = protocol.name(), listen = %bound.join(", "), "listening");
        session_address = session_address.or_else(|| protocol.session_address());
        boot_url = boot_url.or_else(|| protocol.boot_url());
    }
    let metrics_listener = match &config.metrics.listen {
        Some(address) => {
            let listener = crate::metrics::bind(address).await?;
            let bound = listener
                .local_addr()
                .map_or_else(|_| address.clone(), |a| a.to_string());
            tracing::info!(listen = %bound, "metrics at http://{bound}/metrics");
            Some(listener)
        }
        None => None,
    };
    catalog
        .set_server_address(&me, session_address.as_deref())
        .await?;
    let http_url =
        crate::placement::public_http_url(boot_url.as_deref(), session_address.as_deref());
    let registration = osstream_catalog::Registration {
        name: server_name.clone(),
        nbd_address: session_address.clone(),
        offer: osstream_catalog::ServerOffer {
            http_url,
            capacity: config.cluster.capacity,
            subnets: config.cluster.parsed_subnets()?,
            shared_overlays: config.sessions.shared_overlay_dir.is_some(),
            server_timeout_ms: timers.server_timeout_ms,
        },
    };
    catalog.offer_server(&me, &registration.offer).await?;
    // Each server judges the others gone by its own server_timeout: they must agree.
    for other in catalog.servers().await? {
        if other.id != me.id
            && other.alive(timers.server_timeout_ms)
            && other.server_timeout_ms != 0
            && other.server_timeout_ms != timers.server_timeout_ms
        {
            tracing::warn!(server = %other.name, theirs_ms = other.server_timeout_ms, ours_ms = timers.server_timeout_ms,
                "[sessions] server_timeout differs from a server sharing this catalog: use the same value on every server, \
                 or servers disagree on when one is gone");
        }
    }
    let placement = crate::placement::CatalogPlacement::new(
        catalog.clone(),
        me.clone(),
        server_name.clone(),
        timers.server_timeout_ms,
        config.cluster.placement,
    );
    let mut signals = Signals::watch()?;
    tracing::info!(images = %names.join(", "), "osstream ready");
    crate::notify::notify(&format!("READY=1\nSTATUS=serving {} image(s)", names.len()));

    let shutdown = CancellationToken::new();
    // The heartbeat goes on while connections drain (up to drain_timeout, longer than
    // server_timeout): until they are done, this server still holds their sessions.
    let heartbeat_stop = CancellationToken::new();
    tokio::spawn(crate::sessions::reconcile(
        directory,
        registration,
        placement.clone(),
        exports.clone(),
        config.sessions.reconcile_interval.0,
        overlays.clone(),
        heartbeat_stop.clone(),
    ));
    // Written once now, so `osstream cache stats` knows this server from its start.
    if let Err(err) = crate::stats::write(&config.data_dir, &me.id, &layers, true) {
        tracing::warn!(%err, "cannot write the cache statistics file");
    }
    let stats_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(listener, stats_stop.clone()));
    }
    let stats_writer = tokio::spawn(crate::stats::keep_writing(
        config.data_dir.clone(),
        me.id.clone(),
        layers.clone(),
        stats_stop.clone(),
    ));
    let cpus = match osstream_core::CpuRuntimes::start() {
        Ok(cpus) => cpus,
        Err(err) => {
            tracing::warn!(%err, "cannot start per-CPU runtimes; every connection is served on the shared pool");
            osstream_core::CpuRuntimes::none()
        }
    };
    tracing::debug!(runtimes = cpus.len(), "per-CPU runtimes started");
    let cpus = Arc::new(cpus);
    let serve_ctx = ServeContext {
        exports,
        cpus,
        boot: Some(Arc::new(catalog.clone())),
        session_address,
        boot_url,
        seen: Arc::default(),
        leases: Some(Arc::new(catalog.clone())),
        profiles: Some(Arc::new(catalog.clone())),
        placement: Some(placement as Arc<dyn osstream_core::Placement>),
    };
    let mut running = tokio::task::JoinSet::new();
    for protocol in protocols {
        let (ctx, shutdown) = (serve_ctx.clone(), shutdown.clone());
        running.spawn(async move {
            let name = protocol.name();
            (name, protocol.serve(ctx, shutdown).await)
        });
    }
    signals.until_stop(|| reloader.reload(&config)).await;
    crate::notify::notify("STOPPING=1");
    tracing::info!("shutting down: finishing requests in flight");
    shutdown.cancel();
    while let Some(done) = running.join_next().await {
        match done {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(err))) => {
                tracing::error!(protocol = name, %err, "protocol stopped with an error")
            }
            Err(err) => tracing::error!(%err, "protocol task failed"),
        }
    }
    heartbeat_stop.cancel();
    match catalog.stop_server(&me).await {
        Ok(ended) => {
            for session in ended {
                tracing::info!(session = %session.id, client = %session.mac, vdisk = %session.vdisk,
                    "session ended: {}", osstream_catalog::reasons::RAM_OVERLAY_STOPPED);
            }
        }
        Err(err) => tracing::warn!(%err, "cannot record the stop in the catalog"),
    }
    stats_stop.cancel();
    // Its last write must not land after the final one below.
    let _ = stats_writer.await;
    for layer in &layers {
        layer.log_summary();
    }
    if let Err(err) = crate::stats::write(&config.data_dir, &me.id, &layers, false) {
        tracing::warn!(%err, "cannot write the final cache statistics");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Records where every vdisk's bytes live, as this server's backends name them, so the
/// catalog can refuse one image under two modes; says so when an identity changed (a
/// backend reconfigured to point elsewhere).
async fn refresh_image_ids(catalog: &osstream_catalog::SqlCatalog, backends: &[DynBackend]) {
    use osstream_catalog::Catalog;
    let vdisks = match catalog.vdisks().await {
        Ok(vdisks) => vdisks,
        Err(err) => {
            tracing::warn!(%err, "cannot list vdisks to record their images");
            return;
        }
    };
    let mut ids = Vec::new();
    for vdisk in vdisks {
        let Some(backend) = backends.iter().find(|b| b.name() == vdisk.backend) else {
            continue;
        };
        match backend.identity(&vdisk.key) {
            Ok(identity) => ids.push((vdisk.name, identity)),
            Err(err) => tracing::warn!(vdisk = %vdisk.name, %err, "cannot name the vdisk's image"),
        }
    }
    match catalog.set_image_ids(&ids).await {
        Ok(differ) => {
            for (vdisk, recorded, seen) in differ {
                tracing::warn!(%vdisk, %recorded, %seen, "this server names the vdisk's image differently than \
                    the catalog recorded (its backend moved, or another host names it so); checks use both names \
                    and its backend and key");
            }
        }
        Err(err) => tracing::warn!(%err, "cannot record the vdisks' images"),
    }
}

/// The signals the server acts on, watched from before it says it is ready: a SIGHUP
/// sent right after READY must not meet the default action (which ends the process).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn watch() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Error::from_io(e, format!("cannot watch {name}")))
        };
        Ok(Signals {
            term: watch(SignalKind::terminate(), "SIGTERM")?,
            int: watch(SignalKind::interrupt(), "SIGINT")?,
            hup: watch(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; runs `on_hangup` at each SIGHUP meanwhile.
    async fn until_stop(&mut self, on_hangup: impl Fn()) {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM received"); return }
                _ = self.int.recv() => { tracing::info!("SIGINT received"); return }
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP received: reading the configuration again");
                    on_hangup();
                }
            }
        }
    }
}

/// Refuses to start as a server id another live process runs as: a `data_dir` copied
/// from another server (a cloned machine, a restored backup) carries its `server-id`, and
/// registering under it would end that server's sessions. A fresh heartbeat under the id
/// may also be this server's own predecessor, killed moments ago: it is watched for two
/// heartbeat intervals, and only one that goes on beating is another server.
async fn refuse_live_twin(
    catalog: &osstream_catalog::SqlCatalog,
    me: &osstream_catalog::ServerRef,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<()> {
    let row = |servers: Vec<osstream_catalog::Server>| servers.into_iter().find(|s| s.id == me.id);
    let Some(before) = row(catalog.servers().await?) else {
        return Ok(());
    };
    if !before.alive(timeout.as_millis() as i64) {
        return Ok(());
    }
    tracing::info!(server = %me.id, heartbeat_age_ms = before.heartbeat_age,
        "this server's id has a recent heartbeat: waiting two heartbeat intervals to tell a crashed predecessor from a live twin");
    tokio::time::sleep(interval * 2 + std::time::Duration::from_millis(500)).await;
    match row(catalog.servers().await?) {
        Some(now)
            if now.stopped_at.is_none()
                && (now.heartbeat_at != before.heartbeat_at || now.instance != before.instance) =>
        {
            Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "server id {} is in use by a live server ({}, heartbeat {} ms ago): this data_dir's \
                     server-id was copied from it (a cloned machine or a restored backup); delete the \
                     server-id file in data_dir to give this server an id of its own",
                    me.id, now.name, now.heartbeat_age
                ),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::changed_keys;
    use crate::config::tests::load_from;

    #[test]
    fn reload_names_the_keys_that_changed_and_no_unset_ones() {
        let old = load_from("[log]\nfilter = \"info\"\n").unwrap();
        let new = load_from(
            "[log]\nfilter = \"debug\"\n[limits.groups.kiosks]\nbandwidth = \"50MiB\"\n\
             [cache.ram]\ncapacity = \"32MiB\"\n",
        )
        .unwrap();
        assert_eq!(
            changed_keys(&old, &new),
            ["cache.ram.capacity", "limits.groups.kiosks.bandwidth"]
        );
    }
}
