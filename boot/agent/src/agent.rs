//! The agent itself: the session's disk assembled from the server's export, a cache on
//! the client's disk and a local write overlay, served to the local kernel over NBD on a
//! Unix socket.
//!
//! ```text
//! nbd-client -unix SOCKET /dev/nbd0
//!   -> NbdServer (unix:SOCKET, export "disk")
//!   -> DemandWatch (tells the background fill when the kernel is reading)
//!   -> CowLayer (the client's writes: RAM, overflowing to the cache disk, or the disk)
//!   -> CacheLayer over DiskTier (blocks of the base image, keyed by image + generation,
//!      the boot set pinned)
//!   -> RemoteSource (the session export s/TOKEN on the server, reconnecting)
//! ```
//!
//! The cache and the local overlay are used only when the server says the session's
//! writes may stay on the client (`AgentWrites::Local`: a standard vdisk whose overlay is
//! discarded at the session's end). For a private vdisk, or one whose overlay the server
//! keeps, every read and write goes to the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use osstream_cache_disk::DiskTier;
use osstream_core::{
    AgentInfo, AgentWrites, BlockKey, BlockSource, BootProtocol, CacheLayer, CacheTier, Capability,
    Chunks, CowLayer, DiskOverlay, DynSource, Error, ErrorKind, Exports, Extent, Geometry, Layer,
    OverlayStore, RamOverlay, ReadOpts, Result, ServeContext, ServerList, SourceInfo, SpillOverlay,
    WriteOpts, ZeroOpts, async_trait, stable_hash,
};
use osstream_nbd::{NbdConfig, NbdServer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::remote::{RemoteConfig, RemoteCounters, RemoteSource, Renewal, ServerBook};
use crate::stats::{AgentStats, BootSetStats, CacheStats, FillStats, OverlayStats, ServerStats};

/// Largest read the boot-set prefetch and the fill make at once.
const READ_SIZE: u64 = 1 << 20;
/// The fill pauses while the kernel read something this recently.
const FILL_QUIET: Duration = Duration::from_millis(250);
/// The fill starts once the kernel has read nothing for this long (the boot is over).
const FILL_AFTER_QUIET: Duration = Duration::from_secs(30);
/// How often the stats file is rewritten.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// How often the client cache is made durable (when it took in blocks).
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// The client-disk cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// The folder on the client's disk (created if missing): `blocks/` holds the cached
    /// blocks, `overlay/` the overlay when it lives on disk.
    pub dir: PathBuf,
    /// Bytes of blocks at most.
    pub capacity: u64,
    /// Cache block size.
    pub block_size: u64,
    /// Reclaim starts above the first and stops at the second percentage.
    pub watermarks: (u8, u8),
}

/// Where the client's writes stay (for a session whose writes stay on the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverlayPlace {
    /// RAM, the least recently written blocks overflowing to the cache folder when
    /// there is one (else writes beyond the RAM limit fail with ENOSPC).
    Ram,
    /// A file in the cache folder.
    Disk,
}

/// Everything the agent is told.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server's export.
    pub remote: RemoteConfig,
    /// `http://HOST:PORT/agent/TOKEN`: the session's description (boot set, where writes
    /// go). Without it nothing is cached and writes go to the server.
    pub info_url: Option<String>,
    /// The Unix socket to serve the disk on.
    pub socket: PathBuf,
    /// The export name on that socket (also the default export).
    pub export_name: String,
    /// The client-disk cache, if any.
    pub cache: Option<CacheSettings>,
    /// Where the client's writes stay.
    pub overlay: OverlayPlace,
    /// RAM for the overlay.
    pub overlay_ram: u64,
    /// After the boot set, read the rest of the image into the cache below demand.
    pub fill: bool,
    /// Boot-set reads in flight at once.
    pub prefetch_depth: usize,
    /// Where to write stats (`None`: the cache folder's `agent-stats.json`, or nowhere).
    pub stats_file: Option<PathBuf>,
}

/// Remembers, next to the socket, which session an agent served with the client's writes
/// kept on the client (`SOCKET.session`: a hash of the export name, not the token).
/// Those writes live in the agent's overlay and end with it; a later agent for the same
/// session would serve the kernel its disk without them, under a mounted file system
/// that has them: it refuses instead (the machine must boot again, with a new session).
#[derive(Debug)]
struct ServedMarker {
    path: PathBuf,
    session: String,
}

impl ServedMarker {
    fn new(socket: &Path, export: &str) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        export.hash(&mut hasher);
        ServedMarker {
            path: PathBuf::from(format!("{}.session", socket.display())),
            session: format!("{:016x}\n", hasher.finish()),
        }
    }

    fn refuse_if_served_before(&self) -> Result<()> {
        if std::fs::read_to_string(&self.path).is_ok_and(|seen| seen == self.session) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "an earlier osstream-agent already served this session with the client's writes kept in its overlay, \
                     and they ended with it ({} says so): serving the disk again would show the kernel its disk without \
                     them. The machine must boot again (a new session)",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    fn record(&self) {
        if let Err(err) = std::fs::write(&self.path, &self.session) {
            tracing::warn!(path = %self.path.display(), %err, "agent: cannot note the session served (a restarted agent could not tell)");
        }
    }
}

/// A started agent: its socket is bound, its server connected.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    info: Option<AgentInfo>,
    nbd: NbdServer,
    top: DynSource,
    /// The cached base (below the overlay), for the prefetch and the fill.
    cached: Option<(DynSource, Arc<CacheLayer>, DiskTier)>,
    overlay: Option<Arc<CowLayer>>,
    remote: Arc<RemoteCounters>,
    /// The server connection itself, kept open in the background.
    connection: Arc<RemoteSource>,
    demand: Arc<DemandClock>,
    boot_set: Arc<BootSetProgress>,
    fill: Arc<FillProgress>,
    bound: Vec<String>,
}

#[derive(Debug, Default)]
struct BootSetProgress {
    blocks: AtomicU64,
    local_at_start: AtomicU64,
    fetched: AtomicU64,
    done: AtomicBool,
}

#[derive(Debug, Default)]
struct FillProgress {
    walked: AtomicU64,
    done: AtomicBool,
    skipped: AtomicBool,
}

impl Agent {
    /// Asks the server about the session, connects to its export, assembles the disk and
    /// binds the socket.
    pub async fn start(config: AgentConfig) -> Result<Agent> {
        let info = match &config.info_url {
            Some(url) => Some(fetch_info(url).await?),
            None => None,
        };
        let local = info
            .as_ref()
            .is_some_and(|i| i.writes == AgentWrites::Local);
        if let Some(url) = &config.info_url {
            learn_servers(&config.remote.servers, &info_base(url)?).await;
        }
        let (identity, generation) = match &info {
            Some(i) => (i.image.clone(), i.generation.clone()),
            None => (
                format!(
                    "nbd:{}/{}",
                    config.remote.servers.current().nbd,
                    config.remote.export
                ),
                "unknown".to_owned(),
            ),
        };
        let served_marker = local.then(|| ServedMarker::new(&config.socket, &config.remote.export));
        if let Some(marker) = &served_marker {
            marker.refuse_if_served_before()?;
        }
        let remote_config = RemoteConfig {
            read_only: local,
            ..config.remote.clone()
        };
        let renewal = match &info {
            Some(info) if local => Some(Arc::new(SessionRenewal {
                servers: config.remote.servers.clone(),
                old: info.clone(),
            }) as Arc<dyn Renewal>),
            _ => None,
        };
        let remote = RemoteSource::connect(remote_config, &identity, &generation, renewal).await?;
        if let Some(info) = &info
            && info.size != remote.info().size
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the server describes vdisk {} as {} bytes but its export has {}",
                    info.vdisk,
                    info.size,
                    remote.info().size
                ),
            ));
        }
        let counters = remote.counters();
        let connection = Arc::new(remote);
        let remote: DynSource = connection.clone();
        let size = remote.info().size;
        let mut cached = None;
        let mut overlay = None;
        let mut top = remote.clone();
        if local {
            let mut base = remote.clone();
            if let Some(cache) = &config.cache {
                let tier = DiskTier::open(
                    &cache.dir.join("blocks"),
                    cache.capacity,
                    cache.block_size,
                    cache.watermarks,
                )
                .map_err(|err| {
                    if err.kind() != ErrorKind::Conflict {
                        return err;
                    }
                    Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "another osstream-agent uses the client cache in {}: give each agent its own --cache-dir",
                            cache.dir.display()
                        ),
                    )
                })?;
                let layer = Arc::new(
                    CacheLayer::new(Arc::new(tier.clone()), cache.block_size)
                        .with_prefetch_concurrency(config.prefetch_depth.max(1)),
                );
                base = layer.layer(remote.clone());
                cached = Some((base.clone(), layer, tier));
            }
            let store = overlay_store(&config, size)?;
            let cow = Arc::new(CowLayer::new(store, OVERLAY_BLOCK));
            top = cow.layer(base);
            overlay = Some(cow);
        } else if info.is_some() {
            tracing::info!(
                "agent: the server keeps this session's writes (a private vdisk, or an overlay kept across sessions): reads and writes go to the server, nothing is cached on this client"
            );
        } else {
            tracing::warn!(
                "agent: no --info URL: reads and writes go to the server, nothing is cached on this client"
            );
        }
        let demand = Arc::new(DemandClock::new());
        let top: DynSource = Arc::new(DemandWatch {
            inner: top,
            clock: demand.clone(),
        });
        if let Some(parent) = config.socket.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut nbd = NbdServer::new(NbdConfig {
            listen: vec![format!("unix:{}", config.socket.display())],
            base_exports: Some(true),
            default_export: Some(config.export_name.clone()),
            cpu_local: false,
            ..NbdConfig::default()
        });
        let bound = nbd.bind().await?;
        if let Some(marker) = &served_marker {
            marker.record();
        }
        Ok(Agent {
            config,
            info,
            nbd,
            top,
            cached,
            overlay,
            remote: counters,
            connection,
            demand,
            boot_set: Arc::default(),
            fill: Arc::default(),
            bound,
        })
    }

    /// What the socket is bound to, for logs.
    pub fn bound(&self) -> &[String] {
        &self.bound
    }

    /// The agent's counters now.
    pub fn stats(&self) -> AgentStats {
        snapshot(self.parts())
    }

    fn parts(&self) -> StatsParts {
        StatsParts {
            info: self.info.clone(),
            size: self.top.info().size,
            cached: self
                .cached
                .as_ref()
                .map(|(_, layer, tier)| (layer.clone(), tier.clone())),
            overlay: self.overlay.clone(),
            overlay_capacity: if self.overlay.is_some() {
                self.config.overlay_ram
            } else {
                0
            },
            remote: self.remote.clone(),
            boot_set: self.boot_set.clone(),
            fill: self.fill.clone(),
            fill_enabled: self.config.fill && self.cached.is_some(),
        }
    }

    /// Serves the disk until `shutdown`, prefetching the boot set and (if asked) filling
    /// the cache meanwhile; writes the stats file every few seconds and at the end.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let stats_file = self.config.stats_file.clone().or_else(|| {
            self.config
                .cache
                .as_ref()
                .map(|c| c.dir.join("agent-stats.json"))
        });
        let parts = self.parts();
        let cached_tier = self.cached.clone();
        let mut background = JoinSet::new();
        {
            let (connection, stop) = (self.connection.clone(), shutdown.clone());
            background.spawn(async move { connection.keep_connected(stop).await });
        }
        {
            // Servers added to the catalog after the boot become fail-over targets too.
            let (servers, stop) = (self.config.remote.servers.clone(), shutdown.clone());
            background.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(SERVER_LIST_REFRESH) => {}
                    }
                    if let Some(base) = servers.http_bases().into_iter().next() {
                        learn_servers(&servers, &base).await;
                    }
                }
            });
        }
        if let (Some((source, _, tier)), Some(info)) = (&self.cached, &self.info) {
            let (source, tier, info) = (source.clone(), tier.clone(), info.clone());
            let progress = self.boot_set.clone();
            let depth = self.config.prefetch_depth.max(1);
            let fill = self
                .config
                .fill
                .then(|| (self.fill.clone(), self.demand.clone()));
            let (block_size, capacity) = self
                .config
                .cache
                .as_ref()
                .map_or((65536, 0), |c| (c.block_size, c.capacity));
            let stop = shutdown.clone();
            background.spawn(async move {
                prefetch_boot_set(
                    &source, &tier, &info, block_size, depth, capacity, &progress,
                )
                .await;
                if let Some((fill, demand)) = fill {
                    fill_image(&source, &tier, block_size, &fill, &demand, &stop).await;
                }
            });
        } else {
            self.boot_set.done.store(true, Ordering::Relaxed);
        }
        let stats_file = stats_file.map(|path| Arc::new(StatsFile::open(&path)));
        if let Some((_, layer, tier)) = &self.cached {
            // Machines are switched off without warning: what the cache took in is made
            // durable every few seconds rather than whenever the kernel writes it back.
            let (layer, tier, stop) = (layer.clone(), tier.clone(), shutdown.clone());
            background.spawn(async move {
                let mut synced = 0;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(SYNC_EVERY) => {}
                    }
                    let filled = layer.stats().misses;
                    if filled != synced {
                        if let Err(err) = tier.sync().await {
                            tracing::warn!(%err, "agent: cannot sync the client cache");
                        }
                        synced = filled;
                    }
                }
            });
        }
        if let Some(file) = stats_file.clone() {
            let (parts, stop) = (parts.clone(), shutdown.clone());
            background.spawn(async move {
                loop {
                    file.write(&snapshot(parts.clone()));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(STATS_EVERY) => {}
                    }
                }
            });
        }
        let ctx = ServeContext::exports_only(Arc::new(Exports::single(
            &self.config.export_name,
            &describe(self.info.as_ref()),
            self.top.clone(),
        )));
        let served = Box::new(self.nbd).serve(ctx, shutdown.clone()).await;
        shutdown.cancel();
        background.shutdown().await;
        if let Some((_, _, tier)) = &cached_tier
            && let Err(err) = tier.sync().await
        {
            tracing::warn!(%err, "agent: cannot sync the client cache");
        }
        let last = snapshot(parts);
        if let Some(file) = &stats_file {
            file.write(&last);
        }
        tracing::info!(
            boot_set_blocks = last.boot_set.blocks,
            boot_set_local_at_start = last.boot_set.local_at_start,
            cache_hits = last.cache.hits,
            cache_misses = last.cache.misses,
            server_read_bytes = last.server.read_bytes,
            reconnects = last.server.reconnects,
            "agent: stopped"
        );
        served
    }
}

/// The overlay's block size: the kernel's page, so a write never reads the base first.
const OVERLAY_BLOCK: u64 = 4096;

fn overlay_store(config: &AgentConfig, size: u64) -> Result<Box<dyn OverlayStore>> {
    let dir = config.cache.as_ref().map(|c| c.dir.join("overlay"));
    Ok(match (config.overlay, dir) {
        (OverlayPlace::Ram, None) => Box::new(RamOverlay::new(config.overlay_ram)),
        (OverlayPlace::Ram, Some(dir)) => Box::new(SpillOverlay::new(
            config.overlay_ram,
            DiskOverlay::open(&dir, OVERLAY_BLOCK, size, false)?,
        )),
        (OverlayPlace::Disk, Some(dir)) => {
            Box::new(DiskOverlay::open(&dir, OVERLAY_BLOCK, size, false)?)
        }
        (OverlayPlace::Disk, None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "--overlay disk keeps writes in the cache folder: give --cache-dir",
            ));
        }
    })
}

fn describe(info: Option<&AgentInfo>) -> String {
    match info {
        Some(info) => format!("vdisk {} through osstream-agent", info.vdisk),
        None => "a session's disk through osstream-agent".to_owned(),
    }
}

/// Fetches the session's description, retrying a few times (the network of a machine
/// that just booted may need a moment).
async fn fetch_info(url: &str) -> Result<AgentInfo> {
    let mut wait = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match crate::fetch::get(url, Duration::from_secs(10)).await {
            Ok(body) => return AgentInfo::from_json(&body),
            Err(err)
                if attempt < 8
                    && !matches!(
                        err.kind(),
                        ErrorKind::NotFound | ErrorKind::PermissionDenied
                    ) =>
            {
                tracing::warn!(%err, attempt, "agent: cannot fetch the session's description yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(3));
                attempt += 1;
            }
            Err(err) => {
                return Err(Error::new(
                    err.kind(),
                    format!("cannot fetch the session's description: {err}"),
                ));
            }
        }
    }
}

/// Opens a new session of this client on the same vdisk the way its boot did
/// (`GET /ipxe/MAC/VDISK`, on the first server that answers), and accepts it only if it
/// reads the same image.
#[derive(Debug)]
struct SessionRenewal {
    servers: Arc<ServerBook>,
    old: AgentInfo,
}

/// The HTTP base of an info URL (`http://HOST:PORT` of `http://HOST:PORT/agent/TOKEN`).
pub fn info_base(info_url: &str) -> Result<String> {
    info_url
        .rsplit_once("/agent/")
        .map(|(base, _)| base.to_owned())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{:?} is not an http://HOST:PORT/agent/TOKEN address",
                    osstream_core::shorten(info_url, 30)
                ),
            )
        })
}

/// How often the agent asks for the servers sharing the catalog.
const SERVER_LIST_REFRESH: Duration = Duration::from_secs(60);

/// Learns the servers sharing the catalog from `GET {base}/servers`, so the agent can
/// fail over to them; a server that cannot say (an older one, a network hiccup) leaves
/// the book as it is.
pub async fn learn_servers(book: &ServerBook, base: &str) {
    match crate::fetch::get(&format!("{base}/servers"), Duration::from_secs(5))
        .await
        .and_then(|body| ServerList::from_json(&body))
    {
        Ok(list) => {
            let added = book.learn(&list.servers);
            if added > 0 {
                let names: Vec<&str> = list.servers.iter().map(|s| s.name.as_str()).collect();
                tracing::info!(servers = %names.join(", "), "agent: servers to fail over to");
            }
        }
        Err(err) => tracing::debug!(%err, "agent: no list of servers"),
    }
}

/// GETs `path` from the first server that answers over HTTP (the one in use first).
async fn get_from_any(servers: &ServerBook, path: &str) -> Result<String> {
    let bases = servers.http_bases();
    let mut last = Error::new(
        ErrorKind::Config,
        "no server's HTTP address is known (give --info)",
    );
    for base in bases {
        match crate::fetch::get(&format!("{base}{path}"), Duration::from_secs(10)).await {
            Ok(body) => return Ok(body),
            Err(err) if matches!(err.kind(), ErrorKind::Io | ErrorKind::Shutdown) => last = err,
            Err(err) => return Err(err),
        }
    }
    Err(last)
}

impl SessionRenewal {
    /// `Conflict` unless `info` describes the image and generation the agent started on.
    fn same_disk(&self, info: &AgentInfo) -> Result<()> {
        if (&info.image, &info.generation, info.size)
            != (&self.old.image, &self.old.generation, self.old.size)
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vdisk {} now reads image {} generation {} ({} bytes), not the one this client booted: the client must boot again",
                    info.vdisk, info.image, info.generation, info.size
                ),
            ));
        }
        Ok(())
    }
}

/// `nbdroot=` and `osstream.agent=` in a boot script (or a kernel command line).
pub fn root_and_info(text: &str) -> (Option<(String, String)>, Option<String>) {
    let mut root = None;
    let mut info = None;
    for word in text.split_whitespace() {
        if let Some(value) = word.strip_prefix("nbdroot=") {
            if let Some((address, export)) = value.split_once('/') {
                root = Some((address.to_owned(), export.to_owned()));
            }
        } else if let Some(value) = word.strip_prefix("osstream.agent=") {
            info = Some(value.to_owned());
        }
    }
    (root, info)
}

#[async_trait]
impl Renewal for SessionRenewal {
    async fn renew(&self) -> Result<String> {
        let path = format!(
            "/ipxe/{}/{}",
            self.old.client.replace(':', "-"),
            self.old.vdisk
        );
        let script = get_from_any(&self.servers, &path).await?;
        let (Some((_, export)), Some(info_url)) = root_and_info(&script) else {
            let said: Vec<&str> = script
                .lines()
                .filter_map(|l| l.strip_prefix("echo "))
                .collect();
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("the server opened no new session: {}", said.join(" / ")),
            ));
        };
        self.same_disk(&fetch_info(&info_url).await?)?;
        Ok(export)
    }

    async fn verify(&self, export: &str) -> Result<()> {
        let Some(token) = export.strip_prefix("s/") else {
            return Ok(());
        };
        let info = get_from_any(&self.servers, &format!("/agent/{token}"))
            .await
            .and_then(|body| AgentInfo::from_json(&body))?;
        self.same_disk(&info)
    }
}

/// The cache blocks the boot set covers, in boot order, each once.
fn boot_set_blocks(info: &AgentInfo, block_size: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut blocks = Vec::new();
    let last = info.size.div_ceil(block_size);
    for &profile_block in &info.boot_set {
        let start = profile_block * info.block_size;
        let end = (start + info.block_size).min(info.size);
        for block in start / block_size..end.div_ceil(block_size).min(last) {
            if seen.insert(block) {
                blocks.push(block);
            }
        }
    }
    blocks
}

/// Pins the boot set in the client cache and reads what of it is missing, neighbours
/// joined into reads of up to 1 MiB, `depth` at a time, in boot order, marked as
/// prefetch (the cache layer lets the kernel's reads take a block over).
async fn prefetch_boot_set(
    source: &DynSource,
    tier: &DiskTier,
    info: &AgentInfo,
    block_size: u64,
    depth: usize,
    capacity: u64,
    progress: &BootSetProgress,
) {
    let mut blocks = boot_set_blocks(info, block_size);
    // Pinned blocks are never evicted: a boot set beyond half the cache would leave the
    // rest of the disk too little room. Its first blocks (in boot order) are kept.
    let fits = (capacity / 2 / block_size) as usize;
    if blocks.len() > fits {
        tracing::warn!(boot_set = %osstream_core::ByteSize(blocks.len() as u64 * block_size), cache = %osstream_core::ByteSize(capacity),
            kept = %osstream_core::ByteSize(fits as u64 * block_size),
            "agent: the boot set is larger than half the client cache; only its first part is kept on this client (give a larger --cache-size)");
        blocks.truncate(fits);
    }
    let key = |block| BlockKey {
        image: stable_hash(&[&info.image]),
        generation: stable_hash(&[&info.generation]),
        block,
    };
    tier.pin(blocks.iter().map(|&b| key(b)));
    let missing: Vec<u64> = blocks
        .iter()
        .copied()
        .filter(|&b| !tier.holds(&key(b)))
        .collect();
    progress
        .blocks
        .store(blocks.len() as u64, Ordering::Relaxed);
    progress
        .local_at_start
        .store((blocks.len() - missing.len()) as u64, Ordering::Relaxed);
    tracing::info!(vdisk = %info.vdisk, blocks = blocks.len(), held = blocks.len() - missing.len(),
        "agent: boot set pinned; fetching what this client does not hold");
    let started = Instant::now();
    let mut sorted = missing.clone();
    sorted.sort_unstable();
    let per_read = (READ_SIZE / block_size).max(1);
    let mut reads: Vec<(u64, u64)> = Vec::new();
    for block in sorted {
        match reads.last_mut() {
            Some((first, count)) if *first + *count == block && *count < per_read => *count += 1,
            _ => reads.push((block, 1)),
        }
    }
    // Boot order: each read goes where its first block falls in the boot set.
    let rank: std::collections::HashMap<u64, usize> =
        missing.iter().enumerate().map(|(i, &b)| (b, i)).collect();
    reads.sort_by_key(|(first, _)| rank.get(first).copied().unwrap_or(usize::MAX));
    let mut in_flight = JoinSet::new();
    let size = info.size;
    for (first, count) in reads {
        while in_flight.len() >= depth {
            if let Some(done) = in_flight.join_next().await {
                progress
                    .fetched
                    .fetch_add(done.unwrap_or(0), Ordering::Relaxed);
            }
        }
        let source = source.clone();
        in_flight.spawn(async move {
            let offset = first * block_size;
            let len = (count * block_size).min(size - offset) as usize;
            match source.read_at(offset, len, ReadOpts { prefetch: true }).await {
                Ok(_) => count,
                Err(err) => {
                    tracing::debug!(%err, offset, "agent: a boot-set prefetch read failed (the kernel's read will try again)");
                    0
                }
            }
        });
    }
    while let Some(done) = in_flight.join_next().await {
        progress
            .fetched
            .fetch_add(done.unwrap_or(0), Ordering::Relaxed);
    }
    progress.done.store(true, Ordering::Relaxed);
    tracing::info!(fetched = progress.fetched.load(Ordering::Relaxed), held = tier.pinned_held(),
        took = ?started.elapsed(), "agent: boot set fetched; held on this client");
}

/// Reads the whole image into the cache, 1 MiB at a time, one read at once, waiting
/// while the kernel reads (demand always goes first) and stopping when the cache is
/// too small to hold the image (filling it would only evict what the client uses).
async fn fill_image(
    source: &DynSource,
    tier: &DiskTier,
    block_size: u64,
    progress: &FillProgress,
    demand: &DemandClock,
    stop: &CancellationToken,
) {
    let size = source.info().size;
    let capacity = tier.stats().capacity;
    if size > capacity / 100 * 80 {
        tracing::warn!(
            size,
            capacity,
            "agent: the image is larger than 80% of the client cache: no background fill"
        );
        progress.skipped.store(true, Ordering::Relaxed);
        progress.done.store(true, Ordering::Relaxed);
        return;
    }
    // After the boot: a fill during it would compete with the boot's reads, and the
    // server would take the whole image for the boot's profile (a scan, not recorded).
    loop {
        if demand
            .since_last()
            .is_some_and(|quiet| quiet >= FILL_AFTER_QUIET)
        {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    tracing::info!("agent: the boot is over; filling the client cache with the rest of the image");
    let step = READ_SIZE.max(block_size);
    let mut offset = 0;
    while offset < size && !stop.is_cancelled() {
        if let Some(since) = demand.since_last()
            && since < FILL_QUIET
        {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FILL_QUIET - since) => continue,
            }
        }
        let len = step.min(size - offset) as usize;
        if let Err(err) = source
            .read_at(offset, len, ReadOpts { prefetch: true })
            .await
        {
            tracing::debug!(%err, offset, "agent: a fill read failed; moving on");
        }
        offset += len as u64;
        progress.walked.store(offset, Ordering::Relaxed);
    }
    if offset >= size {
        progress.done.store(true, Ordering::Relaxed);
        tracing::info!(size, "agent: the whole image is held on this client");
    }
}

#[derive(Debug, Clone)]
struct StatsParts {
    info: Option<AgentInfo>,
    size: u64,
    cached: Option<(Arc<CacheLayer>, DiskTier)>,
    overlay: Option<Arc<CowLayer>>,
    overlay_capacity: u64,
    remote: Arc<RemoteCounters>,
    boot_set: Arc<BootSetProgress>,
    fill: Arc<FillProgress>,
    fill_enabled: bool,
}

fn snapshot(parts: StatsParts) -> AgentStats {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let cache = match &parts.cached {
        Some((layer, tier)) => {
            let (layer_stats, tier_stats) = (layer.stats(), tier.stats());
            CacheStats {
                hits: layer_stats.hits,
                misses: layer_stats.misses,
                bytes: tier_stats.bytes,
                capacity: tier_stats.capacity,
                evictions: tier_stats.evictions,
                pinned: tier.pinned_held(),
                checksum_failures: tier.checksum_failures(),
            }
        }
        None => CacheStats::default(),
    };
    let r = &parts.remote;
    AgentStats {
        vdisk: parts
            .info
            .as_ref()
            .map(|i| i.vdisk.clone())
            .unwrap_or_default(),
        writes: if parts.overlay.is_some() {
            "local"
        } else {
            "server"
        }
        .to_owned(),
        size: parts.size,
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        boot_set: BootSetStats {
            blocks: load(&parts.boot_set.blocks),
            local_at_start: load(&parts.boot_set.local_at_start),
            fetched: load(&parts.boot_set.fetched),
            done: parts.boot_set.done.load(Ordering::Relaxed),
        },
        cache,
        server: ServerStats {
            requests: load(&r.requests),
            read_bytes: load(&r.read_bytes),
            written_bytes: load(&r.written_bytes),
            reconnects: load(&r.reconnects),
            resent: load(&r.resent),
        },
        overlay: OverlayStats {
            used: parts.overlay.as_ref().map_or(0, |o| {
                let (ram, disk) = o.usage();
                ram + disk
            }),
            capacity: parts.overlay_capacity,
        },
        fill: FillStats {
            enabled: parts.fill_enabled,
            walked: load(&parts.fill.walked),
            done: parts.fill.done.load(Ordering::Relaxed),
            skipped: parts.fill.skipped.load(Ordering::Relaxed),
        },
    }
}

/// The stats file, opened once and rewritten in place: in an initramfs, the agent's
/// view of the file system changes under it (the root switches, `/run` moves), and an
/// open file stays reachable where a path may not.
#[derive(Debug)]
struct StatsFile {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl StatsFile {
    fn open(path: &std::path::Path) -> Self {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path);
        if let Err(err) = &file {
            tracing::warn!(path = %path.display(), %err, "agent: cannot write the stats file");
        }
        StatsFile {
            path: path.to_owned(),
            file: file.ok(),
        }
    }

    /// Writes `stats` over the file's content (a reader may catch it half written and
    /// read again: `osstream-agent stats` does).
    fn write(&self, stats: &AgentStats) {
        use std::os::unix::fs::FileExt;
        let Some(file) = &self.file else { return };
        let text = serde_json::to_string_pretty(stats).expect("stats serialise") + "\n";
        let written = file
            .write_all_at(text.as_bytes(), 0)
            .and_then(|()| file.set_len(text.len() as u64));
        if let Err(err) = written {
            tracing::debug!(path = %self.path.display(), %err, "agent: cannot write the stats file");
        }
    }
}

/// When the kernel last asked for something.
#[derive(Debug)]
struct DemandClock {
    started: Instant,
    /// Milliseconds after `started` of the last request plus one (0: none yet).
    last: AtomicU64,
}

impl DemandClock {
    fn new() -> Self {
        DemandClock {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn tick(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.last.store(now, Ordering::Relaxed);
    }

    fn since_last(&self) -> Option<Duration> {
        let last = self.last.load(Ordering::Relaxed);
        (last > 0).then(|| {
            self.started
                .elapsed()
                .saturating_sub(Duration::from_millis(last - 1))
        })
    }
}

/// The top of the agent's stack: notes each request of the kernel for the fill.
#[derive(Debug)]
struct DemandWatch {
    inner: DynSource,
    clock: Arc<DemandClock>,
}

#[async_trait]
impl BlockSource for DemandWatch {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read_at(&self, offset: u64, len: usize, opts: ReadOpts) -> Result<Chunks> {
        self.clock.tick();
        self.inner.read_at(offset, len, opts).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.clock.tick();
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.clock.tick();
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_set_maps_onto_cache_blocks_once_each_in_boot_order() {
        let info = AgentInfo {
            format: osstream_core::AGENT_INFO_FORMAT,
            vdisk: "d".into(),
            client: "52:54:00:00:00:01".into(),
            size: 10 * 65536 + 100,
            image: "i".into(),
            generation: "g".into(),
            writes: AgentWrites::Local,
            block_size: 65536,
            boot_set: vec![3, 0, 10, 3],
        };
        assert_eq!(boot_set_blocks(&info, 65536), vec![3, 0, 10]);
        assert_eq!(boot_set_blocks(&info, 32768), vec![6, 7, 0, 1, 20]);
        assert_eq!(boot_set_blocks(&info, 131072), vec![1, 0, 5]);
    }
}
