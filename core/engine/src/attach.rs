//! [`Attachment`]: one client's use of one export, the same for every protocol.
//!
//! A protocol turns what its client asked for (an NBD export name, an HTTP SAN path, a
//! TFTP file) into an [`AttachRequest`] and calls [`crate::Exports::attach`]. What comes
//! back holds everything the engine keeps for that use: the layered source, the export
//! entry, the session's or the plain-name reader's hold, byte counters, and the token
//! that fires when the engine ends it (the session replaced, closed or taken by another
//! server; a private session taking the image of a plain name). One [`Attachment::close`]
//! ends it. A protocol crate needs nothing of sessions' inner workings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use crate::exports::ExportEntry;
use crate::layer::Layer;
use crate::limits::ClientLimit;
use crate::metrics::{IoMetrics, RequestKind};
use crate::sessions::{ReaderGuard, SessionGuard};
use crate::source::DynSource;

/// The prefix of session export names: `s/<token>`.
const SESSION_PREFIX: &str = "s/";

/// What an export name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportName<'a> {
    /// A client's session, by its token (a bearer secret: never log it whole).
    Session(&'a str),
    /// An image by its plain name (`IMAGE` or `BACKEND/IMAGE`), always read-only.
    Image(&'a str),
}

impl<'a> ExportName<'a> {
    /// Reads an export name as a client sent it.
    pub fn parse(name: &'a str) -> Self {
        match name.strip_prefix(SESSION_PREFIX) {
            Some(token) => ExportName::Session(token),
            None => ExportName::Image(name),
        }
    }

    /// The export name of the session with `token`.
    pub fn of_session(token: &str) -> String {
        format!("{SESSION_PREFIX}{token}")
    }
}

/// How far an attach goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// The client only asks about the export (NBD `OPT_INFO`, HTTP `HEAD`): the catalog
    /// is asked, nothing of a live session is taken, no layer hook runs. A probe of a
    /// session reads the base through a throwaway overlay that keeps nothing.
    Probe,
    /// The client will read and write: the session is joined (a private vdisk's lock
    /// taken), layers see the attach.
    Use,
}

/// One request to attach.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest<'a> {
    /// The export name as the client sent it (see [`ExportName`]).
    pub name: &'a str,
    /// Where the client connects from, for the catalog and logs.
    pub peer: &'a str,
    /// The protocol asking (`nbd`, `http`, `tftp`, `agent`).
    pub protocol: &'static str,
    /// Probe or use.
    pub intent: Intent,
}

/// Who uses an image through an attachment: what a layer keeping per-attachment state
/// (a recorder of first-touch order, a prefetcher) is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachContext {
    /// The protocol serving it.
    pub protocol: &'static str,
    /// The client's address.
    pub peer: String,
    /// The export name, fit for logs (session tokens shortened).
    pub export: String,
    /// The client's identity (its MAC) for a session; `None` for a plain name.
    pub client: Option<String>,
    /// The session id; `None` for a plain name.
    pub session: Option<String>,
    /// The vdisk; `None` for a plain name.
    pub vdisk: Option<String>,
    /// Where the image's bytes live ([`crate::SourceInfo::identity`]).
    pub image: String,
    /// The image's generation as the layers see it ([`crate::SourceInfo::generation`]).
    pub generation: String,
}

/// Bytes and requests one attachment moved, kept by its protocol; also added to the
/// vdisk's [`IoMetrics`] (`/metrics`), whose live-attachment gauge counts these counters
/// while they exist.
#[derive(Debug, Default)]
pub struct IoCounters {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    metrics: Option<Arc<IoMetrics>>,
}

impl IoCounters {
    /// Counters that also feed `metrics` (one more live attachment until dropped).
    pub fn with_metrics(metrics: Arc<IoMetrics>) -> Self {
        metrics.attaches.fetch_add(1, Ordering::Relaxed);
        metrics.live.fetch_add(1, Ordering::Relaxed);
        IoCounters {
            requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            metrics: Some(metrics),
        }
    }

    /// Counts one request.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes read by the client.
    pub fn read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts bytes written by the client.
    pub fn written(&self, bytes: u64) {
        self.written_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.written_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts one failed or refused request; `no_space` when it was ENOSPC (a full
    /// write cache).
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an ENOSPC answer (also counted by [`error`](Self::error)).
    pub fn no_space(&self) {
        if let Some(m) = &self.metrics {
            m.no_space.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how long a request took, by kind (for the latency histograms).
    pub fn finished(&self, kind: RequestKind, elapsed: std::time::Duration) {
        if let Some(m) = &self.metrics {
            m.finished(kind, elapsed);
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> IoCounts {
        IoCounts {
            requests: self.requests.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for IoCounters {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A snapshot of [`IoCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounts {
    /// Requests received.
    pub requests: u64,
    /// Bytes the client read.
    pub read_bytes: u64,
    /// Bytes the client wrote.
    pub written_bytes: u64,
    /// Requests that failed or were refused.
    pub errors: u64,
}

/// What an attachment holds on the engine's side.
#[derive(Debug)]
pub(crate) enum Hold {
    /// A connection of a session.
    Session(SessionGuard),
    /// A reader of a plain name.
    Reader(ReaderGuard),
    /// A probe: nothing.
    Nothing,
}

/// The layers told of an attachment (`Layer::attached`); dropped, it tells them it ended
/// (`Layer::detached`), once, however the attachment ends: closed, dropped, or failed
/// after the layers heard of it.
#[derive(Debug)]
pub(crate) struct Hooks {
    layers: Vec<Arc<dyn Layer>>,
    context: AttachContext,
}

impl Hooks {
    /// Tells `layer` of the attachment now, and of its end when these hooks drop.
    pub(crate) fn attach(&mut self, layer: &Arc<dyn Layer>, source: &DynSource) {
        layer.attached(&self.context, source);
        self.layers.push(layer.clone());
    }

    pub(crate) fn new(context: AttachContext) -> Self {
        Hooks {
            layers: Vec::new(),
            context,
        }
    }

    /// Who the layers were told of.
    pub(crate) fn context(&self) -> &AttachContext {
        &self.context
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        for layer in self.layers.drain(..) {
            layer.detached(&self.context);
        }
    }
}

/// One client's use of one export: see the module documentation.
///
/// Dropping an attachment without [`close`](Attachment::close) still ends it (the
/// session's catalog record is updated in the background, with no byte counts).
#[derive(Debug)]
pub struct Attachment {
    /// The source to serve: the image under every layer (and the session's overlay).
    pub source: DynSource,
    /// The export as listings show it.
    pub entry: ExportEntry,
    context: AttachContext,
    hold: Hold,
    counters: Arc<IoCounters>,
    /// `[limits]` of the client, if any.
    limit: Option<Arc<ClientLimit>>,
    ended: CancellationToken,
    /// Layers told of this attachment, told again when it ends.
    hooks: Option<Hooks>,
    /// Written in place (a private vdisk): flushed when it closes, before the session
    /// lets go, so no write is left for a later holder to fence out.
    flush_on_close: bool,
}

impl Attachment {
    pub(crate) fn new(
        source: DynSource,
        entry: ExportEntry,
        context: AttachContext,
        hold: Hold,
        hooks: Option<Hooks>,
    ) -> Self {
        let ended = match &hold {
            Hold::Session(guard) => guard.ended.clone(),
            Hold::Reader(guard) => guard.ended.clone(),
            Hold::Nothing => CancellationToken::new(),
        };
        let flush_on_close = matches!(&hold, Hold::Session(guard) if guard.target.is_private());
        let vdisk = context.vdisk.as_deref().unwrap_or(&entry.name);
        let metrics = crate::metrics::global().io(vdisk, context.protocol);
        let counters = Arc::new(IoCounters::with_metrics(metrics));
        crate::live::register(&context, &counters);
        Attachment {
            source,
            entry,
            context,
            hold,
            counters,
            limit: None,
            ended,
            hooks,
            flush_on_close,
        }
    }

    /// The same attachment, limited by `limit`.
    pub(crate) fn with_limit(mut self, limit: Option<Arc<ClientLimit>>) -> Self {
        self.limit = limit;
        self
    }

    /// The client's `[limits]`: a protocol awaits [`ClientLimit::acquire`] before it
    /// serves each request. `None` when nothing limits this attachment.
    pub fn limit(&self) -> Option<&Arc<ClientLimit>> {
        self.limit.as_ref()
    }

    /// Fires when the engine ends this attachment: its session was replaced (the client
    /// rebooted), closed or taken by another server, or a private session took the image
    /// of a plain name. The protocol then closes the client's connection.
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// The counters the protocol keeps for this attachment; the session's record gets
    /// them at [`close`](Attachment::close).
    pub fn counters(&self) -> &Arc<IoCounters> {
        &self.counters
    }

    /// Who uses what.
    pub fn context(&self) -> &AttachContext {
        &self.context
    }

    /// A span naming who this attachment serves: `client{mac session vdisk}` for a
    /// session, `reader{image}` for a plain name. Lines logged inside it carry those
    /// fields (in JSON logs, under `span`), so a log shipper can follow one client.
    pub fn span(&self) -> tracing::Span {
        let c = &self.context;
        match (&c.client, &c.session, &c.vdisk) {
            (Some(mac), Some(session), Some(vdisk)) => tracing::info_span!(
                "client",
                mac = %mac,
                session = %session,
                vdisk = %vdisk,
                protocol = c.protocol
            ),
            _ => tracing::info_span!("reader", image = %c.export, protocol = c.protocol),
        }
    }

    /// The session id, for a session export.
    pub fn session(&self) -> Option<&str> {
        self.context.session.as_deref()
    }

    /// Ends the attachment: layers are told; a private vdisk's writes are flushed (so
    /// none is left behind when the session lets go: a later holder's epoch would fence
    /// it out); the session's record gets the bytes moved (when a private session's
    /// lock goes is the session's rule, not this call's).
    pub async fn close(mut self) {
        self.hooks.take();
        if self.flush_on_close
            && let Err(err) = self.source.flush().await
        {
            tracing::warn!(session = ?self.context.session, vdisk = ?self.context.vdisk, %err,
                "flushing the writes of a closing connection failed; writes it did not flush may be lost");
        }
        let counts = self.counters.snapshot();
        if let Hold::Session(guard) = std::mem::replace(&mut self.hold, Hold::Nothing) {
            guard.close(counts.read_bytes, counts.written_bytes).await;
        }
    }
}
