//! The one file that owns sockets: listeners, the handshake loop, the request loop.

use std::collections::HashMap;
use std::future::Future;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use osstream_core::metrics::RequestKind;
use osstream_core::{
    Attachment, BootProtocol, Error, ErrorKind, Exports, Result, ServeContext, async_trait,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::NbdConfig;
use crate::negotiation::{
    Attached, CLIENT_ABORTED, EXPORT_REFUSED, Negotiation, Offer, Step, TlsPhase,
};
use crate::proto::{self, OptionHeader, Request, cmd, errno};
use crate::refusals::Refusals;
use crate::tls::{ServerTls, TlsMode};
use crate::transmission::{Failure, Reply, Transmission, command_name};

/// Budget of in-flight work per connection, in units of one request plus one per 64 KiB
/// of payload: bounds the memory a single client can pin (about 128 MiB).
const IN_FLIGHT_UNITS: u32 = 2048;
/// The same budget shared by all connections together (about 1 GiB).
const SERVER_IN_FLIGHT_UNITS: u32 = 16 * 1024;

/// Units a request of `length` bytes takes from the in-flight budgets.
fn request_units(length: u32) -> u32 {
    1 + length / (64 * 1024)
}

/// The NBD server: fixed newstyle negotiation, simple and structured replies,
/// `base:allocation`, many requests in flight per connection, replies out of order.
#[derive(Debug)]
pub struct NbdServer {
    config: NbdConfig,
    listeners: Vec<Listener>,
    /// Plain image names are served (decided at `bind`, from where it listens).
    base_exports: bool,
    /// The listeners' addresses, once bound.
    bound: Vec<String>,
    /// TLS credentials (loaded at `bind`), unless `tls = "off"`.
    tls: Option<ServerTls>,
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl NbdServer {
    /// A server for `config`; nothing is bound until [`BootProtocol::bind`].
    pub fn new(config: NbdConfig) -> Self {
        NbdServer {
            config,
            listeners: Vec::new(),
            base_exports: false,
            bound: Vec::new(),
            tls: None,
        }
    }
}

#[async_trait]
impl BootProtocol for NbdServer {
    fn name(&self) -> &'static str {
        crate::KIND
    }

    async fn bind(&mut self) -> Result<Vec<String>> {
        self.tls = self.config.tls_acceptor()?;
        let mut bound = Vec::new();
        for address in &self.config.listen {
            if let Some(path) = address.strip_prefix("unix:") {
                let path = PathBuf::from(path);
                remove_stale_socket(&path)?;
                let listener = UnixListener::bind(&path).map_err(|e| {
                    Error::from_io(
                        e,
                        format!("cannot listen on unix socket {}", path.display()),
                    )
                    .with_op("bind")
                })?;
                bound.push(format!("unix:{}", path.display()));
                self.listeners.push(Listener::Unix(listener, path));
            } else {
                let listener = TcpListener::bind(address.as_str()).await.map_err(|e| {
                    Error::from_io(
                        e,
                        format!(
                            "cannot listen on {address} (in use, or not an address of this host?)"
                        ),
                    )
                    .with_op("bind")
                })?;
                let local = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| address.clone());
                bound.push(local);
                self.listeners.push(Listener::Tcp(listener));
            }
        }
        self.base_exports = self.config.base_exports_for(&bound);
        let network: Vec<&String> = bound
            .iter()
            .filter(|a| !crate::config::is_local_listener(a))
            .collect();
        match (self.base_exports, network.is_empty()) {
            (true, false) => tracing::warn!(
                listen = ?network,
                "plain image names are served read-only to anyone who can reach these \
                 addresses, past the catalog's assignments ([nbd] base_exports = true); \
                 clients of a boot lab should use session exports"
            ),
            (false, false) if self.config.base_exports.is_none() => tracing::info!(
                "plain image names are off because a listener is on the network; clients \
                 reach their vdisks through session exports ([nbd] base_exports = true forces them on)"
            ),
            _ => {}
        }
        if self.config.public_address_for(&bound).is_none()
            && bound.iter().any(|a| !a.starts_with("unix:"))
        {
            tracing::warn!(
                listen = %bound.join(", "),
                "no address for clients: the server listens on a wildcard address; set \
                 [nbd] public_address to the address clients use, so `osstream session open` \
                 can print it"
            );
        }
        if self.tls.is_some() {
            tracing::info!(tls = %self.config.tls, client_certificates = self.config.tls_client_ca.is_some(), "NBD over TLS on TCP listeners");
            warn_about_the_certificate(&self.config, &bound);
        }
        self.bound = bound.clone();
        Ok(bound)
    }

    fn session_address(&self) -> Option<String> {
        self.config.registered_address_for(&self.bound)
    }

    async fn serve(self: Box<Self>, ctx: ServeContext, shutdown: CancellationToken) -> Result<()> {
        let max_request = u32::try_from(self.config.max_request.bytes()).unwrap_or(u32::MAX);
        let shared = Arc::new(Shared {
            exports: ctx.exports,
            cpus: ctx.cpus,
            connections: AtomicUsize::new(0),
            // One request of the largest size must always fit in either budget.
            budget: Arc::new(Semaphore::new(
                SERVER_IN_FLIGHT_UNITS.max(request_units(max_request)) as usize,
            )),
            max_request,
            base_exports: self.base_exports,
            config: self.config,
            connections_by_export: std::sync::Mutex::default(),
            tls: self.tls,
            refusals: Refusals::default(),
        });
        let tracker = TaskTracker::new();
        let mut sockets = Vec::new();
        for listener in self.listeners {
            let (shared, shutdown, tracker2) = (shared.clone(), shutdown.clone(), tracker.clone());
            if let Listener::Unix(_, path) = &listener {
                sockets.push(path.clone());
            }
            tracker.spawn(accept_loop(listener, shared, shutdown, tracker2));
        }
        shutdown.cancelled().await;
        tracker.close();
        let drain = shared.config.drain_timeout.0;
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                ?drain,
                "NBD connections did not drain in time; closing them"
            );
        }
        for path in sockets {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

/// Removes a socket file left by an earlier run; refuses to remove anything else, and a
/// socket some process still accepts connections on (another server or agent: taking
/// its path over would cut its clients off, and removing it at exit would too).
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "another process is listening on unix socket {}; stop it first or choose another path",
                        path.display()
                    ),
                )
                .with_op("bind"));
            }
            std::fs::remove_file(path).map_err(|e| {
                Error::from_io(e, format!("cannot remove stale socket {}", path.display()))
            })
        }
        Ok(_) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(_) => Ok(()),
    }
}

struct Shared {
    exports: Arc<Exports>,
    cpus: Arc<osstream_core::CpuRuntimes>,
    config: NbdConfig,
    connections: AtomicUsize,
    budget: Arc<Semaphore>,
    max_request: u32,
    base_exports: bool,
    /// The requests of each attached connection, by export: a connection that replaces
    /// one that broke waits until the broken one's requests end (see
    /// [`wait_for_broken_connections`]).
    connections_by_export: std::sync::Mutex<HashMap<String, Vec<TaskTracker>>>,
    tls: Option<ServerTls>,
    refusals: Refusals,
}

impl Shared {
    fn by_export(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<TaskTracker>>> {
        self.connections_by_export
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection's requests under `export`; forgets connections whose
    /// requests have all ended.
    fn track(&self, export: &str, requests: &TaskTracker) {
        let mut map = self.by_export();
        map.retain(|_, list| {
            list.retain(|t| !(t.is_closed() && t.is_empty()));
            !list.is_empty()
        });
        map.entry(export.to_owned())
            .or_default()
            .push(requests.clone());
    }

    /// The trackers of `export`'s connections that have ended with requests still running.
    fn broken_with_requests(&self, export: &str) -> Vec<TaskTracker> {
        self.by_export().get(export).map_or_else(Vec::new, |list| {
            list.iter()
                .filter(|t| t.is_closed() && !t.is_empty())
                .cloned()
                .collect()
        })
    }
}

/// Keeps a writer's requests in order across a reconnect: a client whose connection broke
/// (or that gave up on a stuck request) connects again and sends its writes anew, while
/// the old connection's requests may still be running here. A write of the old
/// connection that landed after the new one's newer write to the same blocks would undo
/// it, so a writable connection starts only when the requests of the export's earlier,
/// ended connections have ended too. Live connections (multi-conn) are not waited for.
async fn wait_for_broken_connections(
    shared: &Shared,
    export: &str,
    peer: &str,
    shutdown: &CancellationToken,
) -> bool {
    let earlier = shared.broken_with_requests(export);
    if earlier.is_empty() {
        return true;
    }
    let running: usize = earlier.iter().map(TaskTracker::len).sum();
    tracing::info!(%peer, %export, requests = running, "waiting for the requests of an earlier connection to this export to end, so writes stay in order");
    let all = async {
        for requests in &earlier {
            requests.wait().await;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        () = all => true,
    }
}

/// Counts a connection for `max_connections` until dropped, however the task ends.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polls a future inside `catch_unwind`, so a panic in one request (a bug in a layer or
/// a backend) becomes an error reply instead of a silent hang for that client.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).poll(cx)
        })) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        let (connection, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.connections.load(Ordering::Relaxed) >= shared.config.max_connections {
            tracing::warn!(%peer, max = shared.config.max_connections, "too many NBD connections; refusing");
            continue;
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(shared.clone());
        let (shared, shutdown, tracker2) = (shared.clone(), shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            match connection {
                Accepted::Tcp(stream) => {
                    serve_tcp(stream, peer, shared, shutdown, tracker2, slot).await;
                }
                Accepted::Unix(read, write) => {
                    let _slot = slot;
                    serve_connection(read, write, &peer, &shared, shutdown).await;
                }
            }
        });
    }
}

/// Serves a TCP connection: the handshake here, then (with `cpu_local`) its requests on
/// the runtime of the CPU its first request arrived on (see
/// [`osstream_core::CpuRuntimes`]; not the CPU it connected from: a client's thread doing
/// I/O may not be the one that connected).
async fn serve_tcp(
    mut stream: tokio::net::TcpStream,
    peer: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    slot: ConnectionSlot,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout.0;
    let phase = match (&shared.tls, shared.config.tls) {
        (None, _) => TlsPhase::Unavailable,
        (Some(_), TlsMode::Require) => TlsPhase::Required,
        (Some(_), _) => TlsPhase::Offered,
    };
    let (outcome, early) = {
        let (read, mut write) = stream.split();
        // Small: only options pass through it; requests get their own buffer below.
        let mut reader = BufReader::with_capacity(8 * 1024, read);
        let greeting = Greeting::Send(phase);
        let Some(outcome) = handshake(
            &mut reader,
            &mut write,
            &peer,
            &shared,
            &shutdown,
            greeting,
            deadline,
        )
        .await
        else {
            return;
        };
        (outcome, reader.buffer().to_vec())
    };
    let attached = match outcome {
        Negotiated::Attached(attached) => *attached,
        Negotiated::StartTls { client_flags } => {
            if !early.is_empty() {
                // Bytes sent in clear after STARTTLS must not be taken as if they came
                // through TLS (the plaintext-injection attack on STARTTLS).
                tracing::warn!(%peer, "NBD client sent data after STARTTLS before the TLS handshake; closing");
                return;
            }
            let _slot = slot;
            return serve_tls(stream, peer, &shared, shutdown, client_flags, deadline).await;
        }
    };
    let moves = shared.config.cpu_local && !shared.cpus.is_empty();
    if moves && early.is_empty() {
        // The request loop sees why it should end (shutdown, the session ended) at once.
        let ended = attached.attachment.ended().clone();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = ended.cancelled() => {}
            _ = stream.readable() => {}
        }
    }
    let local = moves
        .then(|| shared.cpus.for_socket(&stream).cloned())
        .flatten();
    let serve = async move |stream: tokio::net::TcpStream| {
        let _slot = slot;
        let (read, write) = stream.into_split();
        let read: BoxRead = Box::new(std::io::Cursor::new(early).chain(read));
        let reader = BufReader::with_capacity(256 * 1024, read);
        attached_connection(reader, Box::new(write), attached, &peer, &shared, shutdown).await;
    };
    let Some(handle) = local else {
        return serve(stream).await;
    };
    match stream.into_std() {
        Ok(stream) => {
            tracker.spawn_on(
                async move {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => serve(stream).await,
                        Err(err) => {
                            tracing::warn!(%err, "cannot serve an NBD connection on its CPU")
                        }
                    }
                },
                &handle,
            );
        }
        Err(err) => tracing::warn!(%err, "cannot hand an NBD connection to its CPU; closing it"),
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An accepted connection: TCP streams stay whole until it is known where they are
/// served.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(BoxRead, BoxWrite),
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            // Replies are written whole; Nagle would only add latency to small ones.
            stream.set_nodelay(true)?;
            Ok((Accepted::Tcp(stream), peer.to_string()))
        }
        Listener::Unix(listener, path) => {
            let (stream, _) = listener.accept().await?;
            let (read, write) = stream.into_split();
            Ok((
                Accepted::Unix(Box::new(read), Box::new(write)),
                format!("unix:{}", path.display()),
            ))
        }
    }
}

async fn serve_connection(
    read: BoxRead,
    mut write: BoxWrite,
    peer: &str,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut reader = BufReader::with_capacity(256 * 1024, read);
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout.0;
    let greeting = Greeting::Send(TlsPhase::Unavailable);
    let handshake = handshake(
        &mut reader,
        &mut write,
        peer,
        shared,
        &shutdown,
        greeting,
        deadline,
    );
    if let Some(Negotiated::Attached(attached)) = handshake.await {
        attached_connection(reader, write, *attached, peer, shared, shutdown).await;
    }
}

/// Says so at start when clients would refuse the certificate (expired, expiring, or
/// not naming the address `session open` gives them), rather than leaving the admin
/// to find out from a client's handshake error.
fn warn_about_the_certificate(config: &NbdConfig, bound: &[String]) {
    let Some(certificate) = &config.tls_certificate else {
        return;
    };
    let address = config.public_address_for(bound);
    let client_address = address.as_deref().map(|address| crate::tls::ClientAddress {
        host: crate::tls::host_of(address),
        from: if config.public_address.is_some() {
            "the [nbd] public_address"
        } else {
            "the listener's address; set [nbd] public_address if clients use another"
        },
    });
    let now = std::time::SystemTime::now();
    match crate::tls::certificate_warnings(certificate, client_address, now) {
        Ok(warnings) => {
            for warning in warnings {
                tracing::warn!("{warning}");
            }
        }
        Err(err) => tracing::warn!(%err, "cannot check the TLS certificate"),
    }
}

/// Serves a TCP connection whose client sent `STARTTLS`: the TLS handshake, then option
/// negotiation again, inside TLS and from a fresh state, then its requests.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    peer: String,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
    client_flags: u32,
    deadline: tokio::time::Instant,
) {
    let Some(ServerTls(acceptor)) = shared.tls.clone() else {
        return;
    };
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return,
        accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::warn!(%peer, %err, "NBD TLS handshake failed; closing");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "NBD TLS handshake timed out; closing");
            return;
        }
    };
    let (read, write) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(256 * 1024, Box::new(read) as BoxRead);
    let mut write: BoxWrite = Box::new(write);
    let greeting = Greeting::Sent { client_flags };
    let handshake = handshake(
        &mut reader,
        &mut write,
        &peer,
        shared,
        &shutdown,
        greeting,
        deadline,
    );
    if let Some(Negotiated::Attached(attached)) = handshake.await {
        attached_connection(reader, write, *attached, &peer, shared, shutdown).await;
    }
}

/// Whether negotiation starts with the greeting, or goes on after `STARTTLS` (the
/// greeting and the client's flags were exchanged in clear).
#[derive(Debug, Clone, Copy)]
enum Greeting {
    Send(TlsPhase),
    Sent { client_flags: u32 },
}

/// How option negotiation ended, short of the connection closing.
enum Negotiated {
    Attached(Box<Attached>),
    /// The client asked for TLS and was told yes.
    StartTls {
        client_flags: u32,
    },
}

/// Runs the handshake until `deadline`; `None` when the connection ended in it.
async fn handshake<R, W>(
    reader: &mut R,
    write: &mut W,
    peer: &str,
    shared: &Shared,
    shutdown: &CancellationToken,
    greeting: Greeting,
    deadline: tokio::time::Instant,
) -> Option<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let handshake =
        tokio::time::timeout_at(deadline, negotiate(reader, write, shared, peer, greeting));
    tokio::select! {
        _ = shutdown.cancelled() => None,
        outcome = handshake => match outcome {
            Err(_) => {
                tracing::warn!(%peer, timeout = %shared.config.handshake_timeout, "NBD handshake timed out; closing");
                None
            }
            // A clean abort or a refusal (logged where it was decided) is routine: a
            // client retrying a refused export every second must not fill the log.
            Ok(Err(reason)) if reason == CLIENT_ABORTED || reason == EXPORT_REFUSED => {
                tracing::debug!(%peer, %reason, "NBD connection closed during handshake");
                None
            }
            Ok(Err(reason)) => {
                tracing::info!(%peer, %reason, "NBD connection closed during handshake");
                None
            }
            Ok(Ok(negotiated)) => Some(negotiated),
        },
    }
}

/// Serves the requests of an attached connection until it ends, then ends the attachment;
/// everything it logs is inside the attachment's span (the client, session and vdisk).
async fn attached_connection(
    reader: BufReader<BoxRead>,
    write: BoxWrite,
    attached: Attached,
    peer: &str,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
) {
    let span = attached.attachment.span();
    serve_attached(reader, write, attached, peer, shared, shutdown)
        .instrument(span)
        .await;
}

async fn serve_attached(
    reader: BufReader<BoxRead>,
    write: BoxWrite,
    attached: Attached,
    peer: &str,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
) {
    let Attached {
        attachment,
        flags,
        structured,
        base_allocation,
    } = attached;
    let export = attachment.entry.name.clone();
    tracing::info!(%peer, %export, structured, flags = format_args!("{flags:#x}"), "NBD client attached");
    let started = Instant::now();
    let session = attachment.session().map(str::to_owned);
    let conn = Transmission {
        source: attachment.source.clone(),
        structured,
        base_allocation,
        max_request: shared.max_request,
    };
    let requests = TaskTracker::new();
    // Only writers are kept in order, so only their requests are tracked: a read-only
    // connection (most of a lab's) neither registers nor waits.
    let writable = flags & proto::tflag::READ_ONLY == 0;
    if writable {
        shared.track(&export, &requests);
    }
    let (outcome, still_running) =
        if writable && !wait_for_broken_connections(shared, &export, peer, &shutdown).await {
            requests.close();
            ("server shutting down".to_owned(), None)
        } else {
            transmit(reader, write, conn, requests, shared, shutdown, &attachment).await
        };
    let counts = attachment.counters().snapshot();
    match still_running {
        None => attachment.close().await,
        Some(requests) => {
            // Writes may still be running: the attachment (a private session's lock with
            // it, so no other writer starts) stays until they end.
            tracing::warn!(%peer, session = ?session, "requests outlived the drain timeout; the attachment stays until they end");
            let peer = peer.to_owned();
            tokio::spawn(
                async move {
                    requests.wait().await;
                    tracing::info!(%peer, session = ?session, "the last requests of a closed connection ended");
                    attachment.close().await;
                }
                .in_current_span(),
            );
        }
    }
    tracing::info!(
        %peer,
        %export,
        requests = counts.requests,
        read_bytes = counts.read_bytes,
        written_bytes = counts.written_bytes,
        errors = counts.errors,
        seconds = started.elapsed().as_secs_f64(),
        reason = %outcome,
        "NBD client detached"
    );
}

/// Runs option negotiation until the client attaches to an export, asks for TLS, or goes
/// away.
async fn negotiate<R, W>(
    reader: &mut R,
    write: &mut W,
    shared: &Shared,
    peer: &str,
    greeting: Greeting,
) -> std::result::Result<Negotiated, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| format!("I/O error: {e}");
    let (client_flags, tls) = match greeting {
        Greeting::Sent { client_flags } => (client_flags, TlsPhase::Active),
        Greeting::Send(tls) => {
            write
                .write_all(&proto::server_greeting())
                .await
                .map_err(io)?;
            write.flush().await.map_err(io)?;
            (reader.read_u32().await.map_err(io)?, tls)
        }
    };
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(format!(
            "client flags {client_flags:#x} lack FIXED_NEWSTYLE; only fixed newstyle is served"
        ));
    }
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(format!("unknown client flags {client_flags:#x}"));
    }
    let offer = Offer {
        exports: &shared.exports,
        refusals: &shared.refusals,
        base_exports: shared.base_exports,
        default_export: shared.config.default_export.as_deref(),
        max_request: shared.max_request,
    };
    let mut negotiation = Negotiation::new(offer, peer, client_flags, tls);
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        reader.read_exact(&mut header).await.map_err(io)?;
        let header = OptionHeader::parse(&header).map_err(|e| format!("bad option header: {e}"))?;
        data.resize(header.length as usize, 0);
        reader.read_exact(&mut data).await.map_err(io)?;
        let mut out = BytesMut::new();
        let step = negotiation.on_option(header.option, &data, &mut out).await;
        write.write_all(&out).await.map_err(io)?;
        // A TLS stream holds what it could not send yet until flushed.
        write.flush().await.map_err(io)?;
        match step {
            Step::Continue => {}
            Step::Close(reason) => return Err(reason.to_owned()),
            Step::Transmit(attached) => return Ok(Negotiated::Attached(attached)),
            Step::StartTls => return Ok(Negotiated::StartTls { client_flags }),
        }
    }
}

/// Writes a reply whole, header and body in as few syscalls as the socket allows.
async fn write_reply<W: AsyncWrite + Unpin>(
    writer: &Mutex<W>,
    reply: &Reply,
) -> std::io::Result<()> {
    let parts = reply.body.parts();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + parts.len());
    slices.push(IoSlice::new(reply.head()));
    slices.extend(parts.iter().map(|part| IoSlice::new(part)));
    let mut slices: &mut [IoSlice<'_>] = &mut slices;
    let mut writer = writer.lock().await;
    while !slices.is_empty() {
        // writev takes at most IOV_MAX (1024) slices per call.
        let batch = slices.len().min(1024);
        let n = writer.write_vectored(&slices[..batch]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    // A no-op on sockets; a TLS stream sends what it still holds.
    writer.flush().await
}

/// Polls a future once without a real waker: requests served from memory finish here
/// and skip a task spawn; the rest are spawned and polled again with a real waker.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(future).poll(&mut cx) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// While the server shuts down, waits (up to `drain`) for the requests in flight and
/// answers every request that still arrives meanwhile with `NBD_ESHUTDOWN`, as the
/// protocol asks, instead of leaving it unanswered. Returns whether the requests in
/// flight finished.
async fn refuse_while_draining<R>(
    reader: &mut BufReader<R>,
    writer: &Arc<Mutex<BoxWrite>>,
    conn: &Transmission,
    in_flight: &TaskTracker,
    drain: std::time::Duration,
) -> bool
where
    R: AsyncRead + Unpin,
{
    let finished = in_flight.wait();
    let deadline = tokio::time::sleep(drain);
    tokio::pin!(finished, deadline);
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            _ = &mut finished => {
                // A pipelining client may have sent more before it saw the first refusal:
                // answer what is already on its way instead of closing on it.
                let mut answered = 0;
                while reading && answered < QUEUED_REFUSALS {
                    match tokio::time::timeout(QUEUED_GRACE, refuse_one(reader, writer, conn)).await {
                        Ok(more) => reading = more,
                        Err(_) => break,
                    }
                    answered += 1;
                }
                return true;
            }
            _ = &mut deadline => return false,
            more = refuse_one(reader, writer, conn), if reading => reading = more,
        }
    }
}

/// After the last request in flight finished, how long to wait for one more request the
/// client already sent, and how many to answer at most.
const QUEUED_GRACE: std::time::Duration = std::time::Duration::from_millis(20);
const QUEUED_REFUSALS: usize = 4096;

/// Reads one request and answers it `NBD_ESHUTDOWN` (skipping a write's payload); false
/// when nothing more can be read (the client left, sent `DISC` or garbage).
async fn refuse_one<R>(
    reader: &mut BufReader<R>,
    writer: &Arc<Mutex<BoxWrite>>,
    conn: &Transmission,
) -> bool
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; proto::REQUEST_HEADER_LEN];
    let read = reader.read_exact(&mut header).await;
    let Ok(req) = read
        .map_err(drop)
        .and_then(|_| Request::parse(&header).map_err(drop))
    else {
        return false;
    };
    if req.command == cmd::DISC {
        return false;
    }
    if req.command == cmd::WRITE {
        let skipped = tokio::io::copy(
            &mut (&mut *reader).take(u64::from(req.length)),
            &mut tokio::io::sink(),
        )
        .await;
        if skipped.map_or(true, |n| n != u64::from(req.length)) {
            return false;
        }
    }
    let failure = Failure::new(errno::ESHUTDOWN, "the server is shutting down");
    write_reply(writer, &conn.error_reply(&req, &failure))
        .await
        .is_ok()
}

/// The request loop of one attached connection. Returns why it ended, and the requests
/// still running after the drain timeout, if any.
async fn transmit<R>(
    mut reader: BufReader<R>,
    write: BoxWrite,
    conn: Transmission,
    in_flight: TaskTracker,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
    attachment: &Attachment,
) -> (String, Option<TaskTracker>)
where
    R: AsyncRead + Unpin,
{
    let (session_ended, stats) = (attachment.ended(), attachment.counters());
    let writer = Arc::new(Mutex::new(write));
    let conn = Arc::new(conn);
    let per_request_max = request_units(shared.max_request);
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_UNITS.max(per_request_max) as usize));
    let broken = CancellationToken::new();
    let reason = loop {
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = broken.cancelled() => break "a reply could not be written".to_owned(),
            _ = shutdown.cancelled() => break "server shutting down".to_owned(),
            _ = session_ended.cancelled() => break "the session was replaced, closed or taken elsewhere, or a private session took the image".to_owned(),
            read = reader.read_exact(&mut header) => read,
        };
        if let Err(err) = read {
            break if err.kind() == std::io::ErrorKind::UnexpectedEof {
                "client closed the connection without NBD_CMD_DISC".to_owned()
            } else {
                format!("read error: {err}")
            };
        }
        let req = match Request::parse(&header) {
            Ok(req) => req,
            Err(err) => {
                tracing::warn!(%err, "bad NBD request; closing the connection");
                break format!("bad request: {err}");
            }
        };
        stats.request();
        if req.command == cmd::DISC {
            break "client sent NBD_CMD_DISC".to_owned();
        }
        // Lengths beyond max_request are refused below; they only cost one request's worth.
        let units = request_units(req.length).min(per_request_max);
        let permits = match (
            budget.clone().acquire_many_owned(units).await,
            shared.budget.clone().acquire_many_owned(units).await,
        ) {
            (Ok(mine), Ok(everyone)) => (mine, everyone),
            _ => break "internal: budget closed".to_owned(),
        };
        let checked = conn.validate(&req);
        let mut payload = Bytes::new();
        if req.command == cmd::WRITE {
            if req.length > shared.max_request {
                // Too big to hold: skip the payload without buffering it, then refuse.
                let skipped = tokio::io::copy(
                    &mut (&mut reader).take(u64::from(req.length)),
                    &mut tokio::io::sink(),
                )
                .await;
                if skipped.map_or(true, |n| n != u64::from(req.length)) {
                    break "client closed the connection inside a write payload".to_owned();
                }
            } else {
                let mut buf = BytesMut::zeroed(req.length as usize);
                if reader.read_exact(&mut buf).await.is_err() {
                    break "client closed the connection inside a write payload".to_owned();
                }
                payload = buf.freeze();
            }
        }
        if let Err(failure) = checked {
            stats.error();
            tracing::debug!(command = command_name(req.command), offset = req.offset, length = req.length, errno = failure.errno, reason = %failure.message, "request refused");
            let reply = conn.error_reply(&req, &failure);
            if write_reply(&writer, &reply).await.is_err() {
                break "a reply could not be written".to_owned();
            }
            continue;
        }
        if let Some(limit) = attachment.limit() {
            // [limits]: the wait holds this loop, so the client's next requests wait
            // unread (backpressure, not errors).
            let bytes = match req.command {
                cmd::READ | cmd::WRITE => u64::from(req.length),
                _ => 0,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break "server shutting down".to_owned(),
                _ = session_ended.cancelled() => break "the session was replaced, closed or taken elsewhere".to_owned(),
                () = limit.acquire(bytes) => {}
            }
        }
        match req.command {
            cmd::READ => stats.read(u64::from(req.length)),
            cmd::WRITE => stats.written(u64::from(req.length)),
            _ => {}
        }
        let kind = match req.command {
            cmd::READ => RequestKind::Read,
            cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => RequestKind::Write,
            _ => RequestKind::Other,
        };
        let arrived = Instant::now();
        let (conn2, writer2, stats2, broken2) =
            (conn.clone(), writer.clone(), stats.clone(), broken.clone());
        let mut work = Box::pin(async move {
            let outcome = CatchUnwind(Box::pin(conn2.execute(req, payload)))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::new(
                        errno::EIO,
                        "internal error (a panic) while serving this request",
                    ))
                });
            let reply = match outcome {
                Ok(reply) => reply,
                Err(failure) => {
                    stats2.error();
                    if failure.errno == errno::ENOSPC {
                        stats2.no_space();
                    }
                    tracing::warn!(command = command_name(req.command), offset = req.offset, length = req.length, errno = failure.errno, reason = %failure.message, "request failed");
                    conn2.error_reply(&req, &failure)
                }
            };
            if let Err(err) = write_reply(&writer2, &reply).await {
                tracing::debug!(%err, "reply write failed");
                broken2.cancel();
            }
            stats2.finished(kind, arrived.elapsed());
            drop(permits);
        });
        if poll_once(&mut work).is_none() {
            in_flight.spawn(work.in_current_span());
        }
    };
    in_flight.close();
    let drain = shared.config.drain_timeout.0;
    let drained = if shutdown.is_cancelled() && !broken.is_cancelled() {
        refuse_while_draining(&mut reader, &writer, &conn, &in_flight, drain).await
    } else {
        tokio::time::timeout(drain, in_flight.wait()).await.is_ok()
    };
    if !drained {
        tracing::warn!(
            ?drain,
            "requests still in flight after the drain timeout; closing anyway"
        );
    }
    let mut writer = writer.lock().await;
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    (reason, (!drained).then_some(in_flight))
}
