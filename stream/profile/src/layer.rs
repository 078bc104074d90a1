//! [`ProfileLayer`]: the recorder and the prefetcher, per session.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use osstream_core::{
    AttachContext, BlockSource, Bytes, CancellationToken, Capability, Chunks, DynSource, Extent,
    Geometry, Layer, ProfileStore, ReadOpts, RecordedBoot, Result, SourceInfo, WriteOpts, ZeroOpts,
    async_trait,
};

use crate::config::ProfileConfig;
use crate::prefetch::{coalesce, stream};
use crate::recording::{Finish, Recording};

/// How many finished sessions are remembered (so a reconnecting client is neither
/// recorded nor prefetched for twice) before the oldest are forgotten.
const REMEMBERED_SESSIONS: usize = 4096;

/// Records boot profiles and prefetches them: see the crate documentation.
///
/// One recording and one prefetch per session: every connection of a session feeds the
/// same recording, which ends when the boot is done or the session's last connection
/// here closes; a session that comes back later is neither recorded nor prefetched
/// again.
pub struct ProfileLayer {
    shared: Arc<Shared>,
}

struct Shared {
    config: ProfileConfig,
    store: Arc<dyn ProfileStore>,
    /// Whether a cache sits below to prefetch into.
    cache_below: bool,
    /// Wrappers built and not yet attached, by address (see [`ProfileLayer::attached`]).
    taps: Mutex<HashMap<usize, Weak<Tap>>>,
    sessions: Mutex<HashMap<String, SessionProfile>>,
    counters: Arc<Counters>,
}

/// What the layer keeps for one session.
struct SessionProfile {
    attachments: usize,
    recording: Option<Arc<Recording>>,
    /// Stops the prefetch and the recording's timer.
    stop: CancellationToken,
    /// Numbers sessions in arrival order, to forget the oldest first.
    serial: u64,
}

/// The per-attachment hook into a wrapper: where its demand reads are noted.
#[derive(Debug, Default)]
struct Tap {
    recording: OnceLock<Arc<Recording>>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) boots_recorded: AtomicU64,
    pub(crate) not_boots: AtomicU64,
    pub(crate) record_errors: AtomicU64,
    pub(crate) prefetches: AtomicU64,
    pub(crate) stale_profiles: AtomicU64,
    pub(crate) prefetch_reads: AtomicU64,
    pub(crate) prefetch_bytes: AtomicU64,
    pub(crate) prefetch_errors: AtomicU64,
    serial: AtomicU64,
}

/// Counters of one [`ProfileLayer`] since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProfileStats {
    /// Boots merged into a profile.
    pub boots_recorded: u64,
    /// Recordings too small to be a boot, dropped.
    pub not_boots: u64,
    /// Recordings the store could not keep.
    pub record_errors: u64,
    /// Attachments that got their vdisk's boot set prefetched.
    pub prefetches: u64,
    /// Attachments whose vdisk had a profile of another image generation (not used).
    pub stale_profiles: u64,
    /// Prefetch reads done, and their bytes.
    pub prefetch_reads: u64,
    /// Bytes those reads returned.
    pub prefetch_bytes: u64,
    /// Prefetch reads that failed (skipped).
    pub prefetch_errors: u64,
}

impl ProfileLayer {
    /// A layer recording into and prefetching from `store`. `cache_below` says whether a
    /// cache tier sits under this layer: without one, prefetched bytes would be thrown
    /// away, so nothing is prefetched.
    pub fn new(config: ProfileConfig, store: Arc<dyn ProfileStore>, cache_below: bool) -> Self {
        ProfileLayer {
            shared: Arc::new(Shared {
                config,
                store,
                cache_below,
                taps: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                counters: Arc::default(),
            }),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> ProfileStats {
        let c = &self.shared.counters;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ProfileStats {
            boots_recorded: get(&c.boots_recorded),
            not_boots: get(&c.not_boots),
            record_errors: get(&c.record_errors),
            prefetches: get(&c.prefetches),
            stale_profiles: get(&c.stale_profiles),
            prefetch_reads: get(&c.prefetch_reads),
            prefetch_bytes: get(&c.prefetch_bytes),
            prefetch_errors: get(&c.prefetch_errors),
        }
    }
}

impl fmt::Debug for ProfileLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileLayer")
            .field("config", &self.shared.config)
            .field("cache_below", &self.shared.cache_below)
            .field("stats", &self.stats())
            .finish()
    }
}

fn address(source: &DynSource) -> usize {
    Arc::as_ptr(source) as *const () as usize
}

impl Layer for ProfileLayer {
    fn name(&self) -> &str {
        "profile"
    }

    fn layer(&self, inner: DynSource) -> DynSource {
        // A writable base changes with its client's writes: no profile describes it.
        if inner.capability().write || !self.shared.config.record {
            return inner;
        }
        let tap = Arc::new(Tap::default());
        let source: DynSource = Arc::new(Profiled {
            inner,
            tap: tap.clone(),
        });
        let mut taps = self.shared.taps.lock().unwrap_or_else(|p| p.into_inner());
        // Probes build wrappers that are never attached: forget those as they go.
        if taps.len() >= 64 {
            taps.retain(|_, tap| tap.strong_count() > 0);
        }
        taps.insert(address(&source), Arc::downgrade(&tap));
        source
    }

    fn attached(&self, context: &AttachContext, source: &DynSource) {
        let (Some(vdisk), Some(session)) = (&context.vdisk, &context.session) else {
            return;
        };
        if source.capability().write {
            return;
        }
        let tap = {
            let mut taps = self.shared.taps.lock().unwrap_or_else(|p| p.into_inner());
            taps.remove(&address(source)).and_then(|tap| tap.upgrade())
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = &self.shared;
        let mut sessions = shared.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = sessions.get_mut(session) {
            // Another connection of a session already being recorded joins its recording;
            // a session that came back after its recording ended adds nothing.
            known.attachments += 1;
            if let (Some(tap), Some(recording)) = (&tap, &known.recording) {
                let _ = tap.recording.set(recording.clone());
            }
            return;
        }
        if sessions.len() >= REMEMBERED_SESSIONS {
            forget_oldest_finished(&mut sessions);
        }
        let stop = CancellationToken::new();
        let label = format!("{vdisk} (session {session})");
        let recording = tap.map(|tap| {
            let block_size = shared.config.block_size.bytes();
            let max_blocks = (shared.config.max_bytes.bytes() / block_size).max(1) as usize;
            let tracing = shared.config.trace_dir.is_some();
            let recording = Arc::new(Recording::new(block_size, max_blocks, tracing));
            let _ = tap.recording.set(recording.clone());
            runtime.spawn(watch_recording(
                shared.clone(),
                recording.clone(),
                boot_of(context, vdisk, block_size),
                (session.clone(), source.info().size),
                stop.clone(),
                label.clone(),
            ));
            recording
        });
        if shared.config.prefetch && shared.cache_below {
            runtime.spawn(prefetch(
                shared.clone(),
                source.clone(),
                context.clone(),
                stop.clone(),
                label,
            ));
        }
        let serial = shared.counters.serial.fetch_add(1, Ordering::Relaxed);
        sessions.insert(
            session.clone(),
            SessionProfile {
                attachments: 1,
                recording,
                stop,
                serial,
            },
        );
    }

    fn detached(&self, context: &AttachContext) {
        let Some(session) = &context.session else {
            return;
        };
        let mut sessions = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(known) = sessions.get_mut(session) {
            known.attachments = known.attachments.saturating_sub(1);
            if known.attachments == 0 && !known.stop.is_cancelled() {
                // A booting client reconnects (a bootloader hands over to the OS, an NBD
                // client retries): wait `quiet` before ending the prefetch and the
                // recording (with `Detached`, see watch_recording); a connection of the
                // session coming back meanwhile joins them again.
                let (shared, session, serial) =
                    (self.shared.clone(), session.clone(), known.serial);
                let grace = self.shared.config.quiet.0;
                let end = async move {
                    tokio::time::sleep(grace).await;
                    let mut sessions = shared.sessions.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(known) = sessions.get_mut(&session)
                        && known.serial == serial
                        && known.attachments == 0
                    {
                        known.stop.cancel();
                        known.recording = None;
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(end);
                    }
                    Err(_) => {
                        known.stop.cancel();
                        known.recording = None;
                    }
                }
            }
        }
    }

    fn boot_complete(&self, session: &str) -> bool {
        let sessions = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match sessions.get(session).and_then(|s| s.recording.as_ref()) {
            Some(recording) => recording.mark_booted(),
            None => false,
        }
    }

    fn report(&self) -> Option<osstream_core::LayerReport> {
        let s = self.stats();
        Some(osstream_core::LayerReport::new(
            "profile",
            &[
                ("boots_recorded", s.boots_recorded),
                ("not_boots", s.not_boots),
                ("record_errors", s.record_errors),
                ("prefetches", s.prefetches),
                ("stale_profiles", s.stale_profiles),
                ("prefetch_reads", s.prefetch_reads),
                ("prefetch_bytes", s.prefetch_bytes),
                ("prefetch_errors", s.prefetch_errors),
            ],
        ))
    }

    fn log_summary(&self) {
        let s = self.stats();
        tracing::info!(
            boots_recorded = s.boots_recorded,
            not_boots = s.not_boots,
            prefetches = s.prefetches,
            stale_profiles = s.stale_profiles,
            prefetch_reads = s.prefetch_reads,
            prefetch_bytes = s.prefetch_bytes,
            prefetch_errors = s.prefetch_errors,
            "boot profile statistics"
        );
    }
}

fn forget_oldest_finished(sessions: &mut HashMap<String, SessionProfile>) {
    let mut finished: Vec<(u64, String)> = sessions
        .iter()
        .filter(|(_, s)| s.attachments == 0)
        .map(|(id, s)| (s.serial, id.clone()))
        .collect();
    finished.sort_unstable();
    for (_, id) in finished.iter().take(REMEMBERED_SESSIONS / 4) {
        sessions.remove(id);
    }
}

fn boot_of(context: &AttachContext, vdisk: &str, block_size: u64) -> RecordedBoot {
    RecordedBoot {
        vdisk: vdisk.to_owned(),
        image: context.image.clone(),
        generation: context.generation.clone(),
        block_size,
        touched: Vec::new(),
    }
}

/// Ends `recording` when its boot is done, and stores it.
async fn watch_recording(
    shared: Arc<Shared>,
    recording: Arc<Recording>,
    mut boot: RecordedBoot,
    (session, size): (String, u64),
    stop: CancellationToken,
    label: String,
) {
    let (quiet, window) = (shared.config.quiet.0, shared.config.window.0);
    let tick = (quiet / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let why = loop {
        tokio::select! {
            _ = stop.cancelled() => break Finish::Detached,
            _ = tokio::time::sleep(tick) => {}
        }
        if let Some(why) = recording.due(quiet, window) {
            break why;
        }
    };
    let Some(finished) = recording.finish() else {
        return;
    };
    let touched = finished.touched;
    let bytes = touched.len() as u64 * boot.block_size;
    if why == Finish::Full {
        // A client that read max_bytes distinct bytes is scanning its disk, not booting:
        // a profile of that would prefetch the scan into everyone's cache.
        shared.counters.not_boots.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%label, bytes, "read max_bytes distinct bytes: a scan, not a boot; not recorded");
        return;
    }
    if bytes < shared.config.min_bytes.bytes() {
        shared.counters.not_boots.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%label, bytes, "too little read to be a boot: not recorded");
        return;
    }
    let seconds = recording.elapsed().as_secs_f64();
    // Attach to boot complete: exact when the client said so; after a quiet period, the
    // boot ended when the quiet began.
    let boot_time = match why {
        Finish::Booted => Some(recording.elapsed()),
        Finish::Quiet => recording.elapsed().checked_sub(quiet),
        _ => None,
    };
    if let Some(boot_time) = boot_time {
        osstream_core::metrics::global().boot_complete(&boot.vdisk, &session, boot_time);
    }
    if let Some(dir) = &shared.config.trace_dir {
        let path = dir.join(format!("{}-{session}.trace", boot.vdisk));
        match write_trace(&path, &boot, size, &finished.trace) {
            Ok(()) => {
                tracing::info!(%label, path = %path.display(), reads = finished.trace.len(), "boot trace written")
            }
            Err(err) => {
                tracing::warn!(%label, path = %path.display(), %err, "cannot write the boot trace")
            }
        }
    }
    boot.touched = touched;
    match shared.store.record_boot(&boot).await {
        Ok(profile) => {
            shared
                .counters
                .boots_recorded
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                %label,
                read = bytes,
                seconds = format!("{seconds:.1}"),
                boots = profile.boots,
                boot_set = profile.boot_set_bytes(),
                "boot profile recorded ({})",
                why.describe()
            );
        }
        Err(err) if err.kind() == osstream_core::ErrorKind::Conflict => {
            shared.counters.not_boots.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%label, %err, "boot profile not merged");
        }
        Err(err) => {
            shared
                .counters
                .record_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%label, %err, "cannot store the boot profile");
        }
    }
}

/// Writes a boot trace: a header, then one `MICROSECONDS OFFSET LENGTH` line per read.
fn write_trace(
    path: &std::path::Path,
    boot: &RecordedBoot,
    size: u64,
    reads: &[crate::recording::TraceRead],
) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "# osstream boot trace 1")?;
    writeln!(
        out,
        "# vdisk={} size={size} reads={}",
        boot.vdisk,
        reads.len()
    )?;
    for (at, offset, len) in reads {
        writeln!(out, "{at} {offset} {len}")?;
    }
    out.flush()
}

/// Streams the vdisk's boot set through `source` when its profile is of this image.
async fn prefetch(
    shared: Arc<Shared>,
    source: DynSource,
    context: AttachContext,
    stop: CancellationToken,
    label: String,
) {
    let Some(vdisk) = &context.vdisk else { return };
    let profile = tokio::select! {
        _ = stop.cancelled() => return,
        profile = shared.store.profile(vdisk) => profile,
    };
    let profile = match profile {
        Ok(Some(profile)) => profile,
        Ok(None) => {
            tracing::debug!(%label, "no boot profile yet: this boot records one");
            return;
        }
        Err(err) => {
            tracing::warn!(%label, %err, "cannot read the boot profile; not prefetching");
            return;
        }
    };
    if !profile.matches(&context.image, &context.generation) {
        shared
            .counters
            .stale_profiles
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%label, recorded = %profile.generation, now = %context.generation,
            "the boot profile is of another image generation: not used (this boot records a new one)");
        return;
    }
    let config = &shared.config;
    let reads = coalesce(
        profile.boot_set(),
        profile.block_size,
        config.read_size.bytes(),
        config.read_size.bytes() * config.depth as u64,
        source.info().size,
    );
    shared.counters.prefetches.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%label, boots = profile.boots, bytes = profile.boot_set_bytes(), reads = reads.len(),
        "prefetching the boot set");
    stream(
        source,
        reads,
        config.depth,
        stop,
        shared.counters.clone(),
        label,
    )
    .await;
}

/// The wrapper a client reads through: notes demand reads, passes everything on.
struct Profiled {
    inner: DynSource,
    tap: Arc<Tap>,
}

impl fmt::Debug for Profiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profiled")
            .field("recording", &self.tap.recording.get().is_some())
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlockSource for Profiled {
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
        if !opts.prefetch
            && let Some(recording) = self.tap.recording.get()
        {
            recording.touch(offset, len);
        }
        self.inner.read_at(offset, len, opts).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}
