//! [`RemoteSource`]: the session's export on the server, read over NBD, as a
//! [`BlockSource`] the agent's layers stack on.
//!
//! One connection carries many requests at once (a cookie per request, replies matched
//! as they come). When the connection breaks (a server restart, a network blip, a reply
//! that does not come within `request_timeout`), every request in flight is sent again
//! on a new connection, once the server answers again: reads and writes of NBD are
//! idempotent, so the kernel above sees a slow request, never a failed one. Writes
//! acknowledged since the last successful flush are kept (up to a bound) and replayed on
//! the new connection first, so a server that lost them in a crash gets them again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use osstream_core::{
    BlockSource, Capability, Chunks, Error, ErrorKind, Extent, Geometry, ReadOpts, Result,
    ServerEntry, SourceInfo, WriteOpts, ZeroOpts, all_data, async_trait, check_range,
    read_only_error,
};
use osstream_nbd::client::{
    GREETING_LEN, OPTION_REPLY_HEADER_LEN, OptionReply, SIMPLE_REPLY_LEN, SimpleReply,
    answer_greeting, info_export, opt_abort, opt_go, opt_starttls,
};
use osstream_nbd::proto::{Request, cflag, cmd, errno, rep, tflag};
use osstream_nbd::tls::{ClientTls, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, oneshot};
use tokio_util::sync::CancellationToken;

/// Bytes of unflushed writes kept for replay after a reconnect.
const JOURNAL_LIMIT: u64 = 64 << 20;
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause between rounds while servers answer that another one holds the session:
/// asking is cheap, and the session is free the moment the holder's heartbeat lapses.
const HELD_ELSEWHERE_BACKOFF: Duration = Duration::from_secs(1);

/// The servers that may serve the session: the one the agent booted from, then the
/// others sharing its catalog (learnt from `GET /servers`, or given with
/// `--also-server`). When a connection fails, the next one is tried, so a client whose
/// server died carries on with another one.
#[derive(Debug)]
pub struct ServerBook {
    inner: SyncMutex<Book>,
}

#[derive(Debug)]
struct Book {
    servers: Vec<ServerEntry>,
    current: usize,
}

impl ServerBook {
    /// A book of one server (`nbd`, and its HTTP base URL if known).
    pub fn new(nbd: String, http: Option<String>) -> Arc<Self> {
        Arc::new(ServerBook {
            inner: SyncMutex::new(Book {
                servers: vec![ServerEntry {
                    name: nbd.clone(),
                    nbd,
                    http,
                }],
                current: 0,
            }),
        })
    }

    /// The server in use.
    pub fn current(&self) -> ServerEntry {
        let book = lock(&self.inner);
        book.servers[book.current].clone()
    }

    /// Moves to the next server (round the list) and returns it.
    pub fn advance(&self) -> ServerEntry {
        let mut book = lock(&self.inner);
        book.current = (book.current + 1) % book.servers.len();
        book.servers[book.current].clone()
    }

    /// How many servers it knows (at least one: it starts with one).
    pub fn count(&self) -> usize {
        lock(&self.inner).servers.len()
    }

    /// Adds the servers of `list` it does not know yet (by NBD address), and learns the
    /// names and HTTP addresses of those it does; the one in use stays in use.
    pub fn learn(&self, list: &[ServerEntry]) -> usize {
        let mut book = lock(&self.inner);
        let mut added = 0;
        for entry in list.iter().filter(|e| !e.nbd.is_empty()) {
            match book.servers.iter_mut().find(|known| known.nbd == entry.nbd) {
                Some(known) => {
                    known.name = entry.name.clone();
                    if entry.http.is_some() {
                        known.http = entry.http.clone();
                    }
                }
                None => {
                    book.servers.push(entry.clone());
                    added += 1;
                }
            }
        }
        added
    }

    /// Every known HTTP base URL, the server in use first.
    pub fn http_bases(&self) -> Vec<String> {
        let book = lock(&self.inner);
        let n = book.servers.len();
        (0..n)
            .filter_map(|i| book.servers[(book.current + i) % n].http.clone())
            .collect()
    }
}

/// Where the disk is and how patient to be with it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The servers' NBD addresses, the first one to try first.
    pub servers: Arc<ServerBook>,
    /// The export to open (`s/TOKEN` for a session).
    pub export: String,
    /// A request with no reply after this long is taken as a lost connection.
    pub request_timeout: Duration,
    /// Give up (fail requests) when the server cannot be reached for this long; `None`
    /// waits for ever, as a machine whose root is on the server must.
    pub give_up_after: Option<Duration>,
    /// Never write to the export (the agent keeps the client's writes itself), so the
    /// layers above may cache it.
    pub read_only: bool,
    /// Speak TLS to the server (`NBD_OPT_STARTTLS`), with these credentials.
    pub tls: Option<RemoteTls>,
}

/// TLS towards the server: the credentials, and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct RemoteTls {
    /// The CA (and this client's certificate, if the server asks for one).
    pub credentials: ClientTls,
    /// The name every server's certificate must carry; `None`: the host of the address
    /// connected to (each server of a catalog has its own).
    pub server_name: Option<ServerName<'static>>,
}

/// Counters of the remote source.
#[derive(Debug, Default)]
pub struct RemoteCounters {
    /// Requests sent (a resend counts again).
    pub requests: AtomicU64,
    /// Bytes read from the server.
    pub read_bytes: AtomicU64,
    /// Bytes written to the server.
    pub written_bytes: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Requests sent again on a new connection.
    pub resent: AtomicU64,
}

/// Opens a new session of the same client and vdisk when the server ended the one in
/// use (it restarted and ended the sessions whose writes it held in RAM: the agent's
/// writes are on the client, so it may carry on where a plain client must reboot).
///
/// # Contract
/// `renew` returns the new session's export name, only if the new session reads the
/// same base image, generation and size as the old one (else an error: the disk changed
/// and the client must boot again).
#[async_trait]
pub trait Renewal: Send + Sync + std::fmt::Debug {
    /// A new session's export name.
    async fn renew(&self) -> Result<String>;

    /// Checks that `export` still reads the image and generation the agent started on
    /// (after a reconnect: the image may have been replaced in place while the server
    /// was away); `Conflict` if not.
    async fn verify(&self, export: &str) -> Result<()>;
}

/// The session's disk on the server.
#[derive(Debug)]
pub struct RemoteSource {
    config: RemoteConfig,
    /// The export in use (a renewal replaces it).
    export: SyncMutex<String>,
    renewal: Option<Arc<dyn Renewal>>,
    /// Why a renewal was refused (the disk changed): the client must boot again.
    refused: SyncMutex<Option<Error>>,
    /// Since when the server has been out of reach (`give_up_after` counts from it, once
    /// for all the requests waiting, not once per request).
    down_since: SyncMutex<Option<tokio::time::Instant>>,
    info: SourceInfo,
    flags: u16,
    conn: Mutex<Option<Arc<Conn>>>,
    journal: SyncMutex<Journal>,
    counters: Arc<RemoteCounters>,
}

impl Journal {
    /// Drops the journaled writes overlapping `offset..offset + len` (it was trimmed,
    /// zeroed or written durably since: replaying them would undo that).
    fn forget(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        self.writes
            .retain(|(_, at, data)| *at + data.len() as u64 <= offset || *at >= end);
        self.bytes = self.writes.iter().map(|(_, _, d)| d.len() as u64).sum();
    }
}

#[derive(Debug, Default)]
struct Journal {
    /// Writes acknowledged since the last flush that covered them, in order.
    writes: Vec<(u64, u64, Bytes)>,
    bytes: u64,
    /// Numbers writes, so a flush drops only those acknowledged before it started.
    next: u64,
    /// Some acknowledged writes were not kept: a reconnect cannot replay everything.
    overflowed: bool,
}

/// Why one attempt of a request did not get an answer.
enum Attempt {
    /// The server answered (data for a read, or an errno).
    Answered(std::result::Result<Option<Bytes>, u32>),
    /// The connection is gone: send it again on a new one.
    Lost,
}

struct Waiter {
    read_len: usize,
    reply: oneshot::Sender<std::result::Result<Option<Bytes>, u32>>,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    closed: bool,
}

struct Conn {
    writer: Mutex<BoxWrite>,
    pending: Arc<SyncMutex<Pending>>,
    next_cookie: AtomicU64,
    lost: CancellationToken,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(mutex: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    /// Connects and negotiates `config.export`; returns the connection, the export's
    /// size and its transmission flags.
    async fn open(
        config: &RemoteConfig,
        address: &str,
        export: &str,
    ) -> Result<(Arc<Conn>, u64, u16)> {
        let what = || format!("NBD server {address} export {}", loggable(export));
        let io = |e: std::io::Error| Error::from_io(e, format!("cannot reach the {}", what()));
        let handshake = async {
            let mut stream = TcpStream::connect(address).await.map_err(io)?;
            let _ = stream.set_nodelay(true);
            let mut greeting = [0u8; GREETING_LEN];
            stream.read_exact(&mut greeting).await.map_err(io)?;
            let flags = answer_greeting(&greeting).map_err(|e| protocol(&what(), e))?;
            stream.write_all(&flags).await.map_err(io)?;
            let Some(tls) = &config.tls else {
                let (size, flags) = go(&mut stream, export, &what()).await?;
                let (read, write) = stream.into_split();
                return Ok::<_, Error>((
                    Box::new(read) as BoxRead,
                    Box::new(write) as BoxWrite,
                    size,
                    flags,
                ));
            };
            stream.write_all(&opt_starttls()).await.map_err(io)?;
            let (reply, message) = option_reply(&mut stream, &what()).await?;
            if reply.is_error() {
                let _ = stream.write_all(&opt_abort()).await;
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!("the {} refused TLS: {message}", what()),
                ));
            }
            let name = match &tls.server_name {
                Some(name) => name.clone(),
                None => osstream_nbd::tls::server_name(osstream_nbd::tls::host_of(address))?,
            };
            let mut stream = tls.credentials.0.connect(name, stream).await.map_err(|e| {
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!("TLS with the {} failed: {e}", what()),
                )
            })?;
            let (size, flags) = go(&mut stream, export, &what()).await?;
            let (read, write) = tokio::io::split(stream);
            Ok((
                Box::new(read) as BoxRead,
                Box::new(write) as BoxWrite,
                size,
                flags,
            ))
        };
        let (mut read, write, size, flags) =
            tokio::time::timeout(config.request_timeout, handshake)
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Io,
                        format!(
                            "the {} did not finish the handshake in {:?}",
                            what(),
                            config.request_timeout
                        ),
                    )
                    .set_temporary()
                })??;
        let pending: Arc<SyncMutex<Pending>> = Arc::default();
        let lost = CancellationToken::new();
        let reader = {
            let (pending, lost) = (pending.clone(), lost.clone());
            tokio::spawn(async move {
                let outcome = read_replies(&mut read, &pending).await;
                if let Err(why) = outcome {
                    tracing::debug!(%why, "agent: NBD connection lost");
                }
                let mut pending = lock(&pending);
                pending.closed = true;
                // Dropping the senders tells every waiter the connection is gone.
                pending.waiters.clear();
                lost.cancel();
            })
        };
        let conn = Arc::new(Conn {
            writer: Mutex::new(write),
            pending,
            next_cookie: AtomicU64::new(1),
            lost,
            reader,
        });
        Ok((conn, size, flags))
    }

    /// Sends one request and waits for its answer.
    async fn request(
        &self,
        request: Request,
        payload: Option<&Bytes>,
        timeout: Duration,
    ) -> Attempt {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.closed {
                return Attempt::Lost;
            }
            let read_len = if request.command == cmd::READ {
                request.length as usize
            } else {
                0
            };
            pending.waiters.insert(
                cookie,
                Waiter {
                    read_len,
                    reply: tx,
                },
            );
        }
        let header = Request { cookie, ..request }.encode();
        let sent = async {
            let mut writer = self.writer.lock().await;
            // A request timed out (or the reader failed) while this one waited: the
            // connection may end in half a frame; nothing more goes on it.
            if self.lost.is_cancelled() {
                return Err(std::io::Error::other("connection lost"));
            }
            writer.write_all(&header).await?;
            if let Some(payload) = payload {
                writer.write_all(payload).await?;
            }
            // A no-op on a socket; TLS sends what it holds.
            writer.flush().await?;
            Ok::<_, std::io::Error>(())
        };
        let answered = async {
            sent.await.map_err(|_| ())?;
            tokio::select! {
                answer = rx => answer.map_err(|_| ()),
                () = self.lost.cancelled() => Err(()),
            }
        };
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => Attempt::Answered(answer),
            Ok(Err(())) => {
                self.fail();
                Attempt::Lost
            }
            Err(_) => {
                tracing::warn!(
                    ?timeout,
                    "agent: the server did not answer a request in time; reconnecting"
                );
                self.fail();
                Attempt::Lost
            }
        }
    }

    /// Gives the connection up at once: no request is written on it any more (one may
    /// have stopped half-way through a frame) and every waiter is told to send again.
    fn fail(&self) {
        self.lost.cancel();
        self.reader.abort();
        let mut pending = lock(&self.pending);
        pending.closed = true;
        pending.waiters.clear();
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One option reply: its header and its data as text (what an error reply says).
async fn option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    what: &str,
) -> Result<(OptionReply, String)> {
    let io = |e: std::io::Error| Error::from_io(e, format!("cannot reach the {what}"));
    let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
    stream.read_exact(&mut header).await.map_err(io)?;
    let reply = OptionReply::parse(&header).map_err(|e| protocol(what, e))?;
    let mut data = vec![0u8; reply.length as usize];
    stream.read_exact(&mut data).await.map_err(io)?;
    let text = if reply.is_error() {
        String::from_utf8_lossy(&data).into_owned()
    } else {
        String::new()
    };
    Ok((reply, text))
}

/// Asks for `export` with `NBD_OPT_GO`; its size and transmission flags.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    export: &str,
    what: &str,
) -> Result<(u64, u16)> {
    let io = |e: std::io::Error| Error::from_io(e, format!("cannot reach the {what}"));
    let go = opt_go(export).map_err(|e| protocol(what, e))?;
    stream.write_all(&go).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut found = None;
    loop {
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        stream.read_exact(&mut header).await.map_err(io)?;
        let reply = OptionReply::parse(&header).map_err(|e| protocol(what, e))?;
        let mut data = vec![0u8; reply.length as usize];
        stream.read_exact(&mut data).await.map_err(io)?;
        if reply.is_error() {
            let _ = stream.write_all(&opt_abort()).await;
            let _ = stream.flush().await;
            let message = String::from_utf8_lossy(&data).into_owned();
            return Err(refusal(what, reply.reply, &message));
        }
        match reply.reply {
            rep::INFO => {
                if let Some(export) = info_export(&data).map_err(|e| protocol(what, e))? {
                    found = Some(export);
                }
            }
            rep::ACK => break,
            _ => {}
        }
    }
    found.ok_or_else(|| Error::new(ErrorKind::Io, format!("the {what} sent no size")))
}

/// Reads replies until the connection fails, handing each to its waiter.
async fn read_replies(
    read: &mut BoxRead,
    pending: &SyncMutex<Pending>,
) -> std::result::Result<(), String> {
    loop {
        let mut header = [0u8; SIMPLE_REPLY_LEN];
        read.read_exact(&mut header)
            .await
            .map_err(|e| e.to_string())?;
        let reply = SimpleReply::parse(&header).map_err(|e| e.to_string())?;
        let waiter = lock(pending).waiters.remove(&reply.cookie);
        let Some(waiter) = waiter else {
            return Err(format!("a reply for unknown cookie {}", reply.cookie));
        };
        let answer = if reply.error != 0 {
            Err(reply.error)
        } else if waiter.read_len > 0 {
            let mut data = BytesMut::zeroed(waiter.read_len);
            read.read_exact(&mut data)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(data.freeze()))
        } else {
            Ok(None)
        };
        let _ = waiter.reply.send(answer);
    }
}

fn protocol(what: &str, err: osstream_nbd::proto::ProtoError) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("the {what} broke the protocol: {err}"),
    )
}

/// An option error from the server, as an error of the right kind.
fn refusal(what: &str, reply: u32, message: &str) -> Error {
    if reply == rep::ERR_TLS_REQD {
        return Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "the {what} requires TLS: give the agent --tls-ca (the CA of the server's certificate)"
            ),
        );
    }
    let kind = match reply {
        rep::ERR_UNKNOWN => ErrorKind::NotFound,
        rep::ERR_POLICY => ErrorKind::PermissionDenied,
        rep::ERR_SHUTDOWN => ErrorKind::Shutdown,
        _ => ErrorKind::Io,
    };
    let err = Error::new(kind, format!("the {what} refused the export: {message}"));
    if matches!(kind, ErrorKind::Shutdown) {
        err.set_temporary()
    } else {
        err
    }
}

/// An errno from a reply, as an error of the right kind.
fn answer_error(op: &'static str, code: u32) -> Error {
    let (kind, what) = match code {
        errno::EPERM => (ErrorKind::PermissionDenied, "not permitted"),
        errno::ENOSPC => (ErrorKind::NoSpace, "no space left"),
        errno::EINVAL | errno::EOVERFLOW => (ErrorKind::InvalidInput, "invalid request"),
        errno::ENOTSUP => (ErrorKind::Unsupported, "not supported"),
        errno::ESHUTDOWN => (ErrorKind::Shutdown, "server shutting down"),
        _ => (ErrorKind::Io, "I/O error"),
    };
    Error::new(kind, format!("the server answered {what} (errno {code})")).with_op(op)
}

/// Whether the server said the session ended (as opposed to failing to open it).
fn ended(err: &Error) -> bool {
    err.message().contains("has ended")
}

/// Whether the server refused the session because another server holds it (or its
/// previous holder's connections are still closing): another server, or a little
/// patience, will serve it.
fn held_elsewhere(err: &Error) -> bool {
    let message = err.message();
    err.kind() == ErrorKind::PermissionDenied
        && (message.contains("connect there") || message.contains("waiting for them to close"))
}

/// Whether the server refused the session because its write overlay stayed on a
/// server that is gone: a client whose writes were there must boot again.
fn overlay_lost(err: &Error) -> bool {
    err.kind() == ErrorKind::PermissionDenied && err.message().contains("which is gone")
}

/// Whether a session that ended may be replaced by a new one: it ended because the
/// server lost it (a restart, or no connection for the server's grace period), not
/// because an admin closed it or the client booted again elsewhere.
fn renewable(err: &Error) -> bool {
    let message = err.message();
    ended(err)
        && !message.contains("closed by an administrator")
        && !message.contains("replaced by")
}

/// A session export name fit for logs (the token shortened).
pub fn loggable(export: &str) -> String {
    osstream_core::loggable_export_name(export).into_owned()
}

impl RemoteSource {
    /// Connects to the export (retrying as `config` allows) and returns it as a source
    /// named by `identity` and `generation` (what caches key its blocks by).
    /// With `renewal`, a session the server ended is replaced by a new one of the same
    /// disk.
    pub async fn connect(
        config: RemoteConfig,
        identity: &str,
        generation: &str,
        renewal: Option<Arc<dyn Renewal>>,
    ) -> Result<Self> {
        let source = RemoteSource {
            export: SyncMutex::new(config.export.clone()),
            renewal,
            refused: SyncMutex::new(None),
            down_since: SyncMutex::new(None),
            info: SourceInfo {
                name: loggable(&config.export),
                identity: identity.to_owned(),
                size: 0,
                generation: generation.to_owned(),
            },
            flags: 0,
            conn: Mutex::new(None),
            journal: SyncMutex::default(),
            counters: Arc::default(),
            config,
        };
        let (conn, size, flags) = source.connect_with_retries(None).await?;
        Ok(RemoteSource {
            info: SourceInfo {
                size,
                ..source.info
            },
            flags,
            conn: Mutex::new(Some(conn)),
            ..source
        })
    }

    /// The counters, shared.
    pub fn counters(&self) -> Arc<RemoteCounters> {
        self.counters.clone()
    }

    /// Keeps a connection to the server open until `stop`, connecting again as soon as
    /// one is lost rather than at the kernel's next request. A session lives on the
    /// server only while a connection holds it (plus the server's grace period): a
    /// client serving from its own cache, or idle, across a server restart would
    /// otherwise lose its session, and with a private vdisk its lock, without a request
    /// failing until much later. Ends when the server refuses the session for good.
    pub async fn keep_connected(&self, stop: CancellationToken) {
        loop {
            let conn = tokio::select! {
                () = stop.cancelled() => return,
                conn = self.connection() => conn,
            };
            match conn {
                Ok(conn) => tokio::select! {
                    () = stop.cancelled() => return,
                    () = conn.lost.cancelled() => {
                        tracing::info!(server = %self.config.servers.current().name, "agent: the connection to the server closed; connecting again");
                    }
                },
                Err(err) => {
                    tracing::warn!(%err, "agent: no connection to the server any more");
                    return;
                }
            }
        }
    }

    /// Connects, trying each known server in turn and waiting between rounds (doubling
    /// up to 5 s, or 1 s while servers say another holds the session), until one serves
    /// the session or `give_up_after` has passed. A server
    /// that says another one holds the session is passed over (the holder may be dead:
    /// once its heartbeat lapses, the session is free for the others). Refusals that
    /// waiting cannot cure (unknown export, access denied) fail at once.
    async fn connect_with_retries(
        &self,
        expect_size: Option<u64>,
    ) -> Result<(Arc<Conn>, u64, u16)> {
        let started = *lock(&self.down_since).get_or_insert_with(tokio::time::Instant::now);
        let servers = &self.config.servers;
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0u32;
        let mut renewed = false;
        // After a failed attempt: the next server now, a pause once every server failed.
        let next = |attempts: &mut u32, backoff: &mut Duration| {
            servers.advance();
            *attempts += 1;
            let pause = (*attempts as usize).is_multiple_of(servers.count());
            let wait = *backoff;
            if pause {
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            }
            async move {
                if pause {
                    tokio::time::sleep(wait).await;
                }
            }
        };
        loop {
            let export = lock(&self.export).clone();
            let server = servers.current();
            match Conn::open(&self.config, &server.nbd, &export).await {
                Ok((conn, size, flags)) => {
                    if let Some(expected) = expect_size
                        && size != expected
                    {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "export {} came back with {size} bytes instead of {expected}: the disk changed under this client",
                                loggable(&export)
                            ),
                        ));
                    }
                    *lock(&self.down_since) = None;
                    if attempts > 0 || renewed {
                        tracing::info!(server = %server.name, address = %server.nbd, attempts, waited = ?started.elapsed(), "agent: connected again");
                    }
                    return Ok((conn, size, flags));
                }
                // With this client's writes on this client, the session itself holds
                // nothing to wait for: a new one (below) beats waiting out a dead
                // holder's heartbeat.
                Err(err)
                    if held_elsewhere(&err)
                        && expect_size.is_some()
                        && (renewed || self.renewal.is_none()) =>
                {
                    if attempts == 0 || attempts.is_power_of_two() {
                        tracing::warn!(server = %server.name, %err, "agent: another server holds the session; trying the next one (requests wait)");
                    }
                    backoff = backoff.min(HELD_ELSEWHERE_BACKOFF);
                    next(&mut attempts, &mut backoff).await;
                }
                Err(err)
                    if err.kind() == ErrorKind::NotFound && ended(&err) && !renewable(&err) =>
                {
                    let refused = Error::new(
                        err.kind(),
                        format!("{}; this client stops using it", err.message()),
                    );
                    tracing::error!(err = %refused, "agent: the server ended this session for good; failing every request");
                    *lock(&self.refused) = Some(refused.clone());
                    return Err(refused);
                }
                Err(err)
                    if (ended(&err) || overlay_lost(&err) || held_elsewhere(&err))
                        && expect_size.is_some()
                        && !renewed
                        && self.renewal.is_some() =>
                {
                    if let Some(refused) = lock(&self.refused).clone() {
                        return Err(refused);
                    }
                    tracing::warn!(%err, "agent: the session cannot go on here; opening a new one of the same disk (this client's writes are on this client)");
                    let renewal = self.renewal.as_ref().expect("checked above");
                    match renewal.renew().await {
                        Ok(fresh) => {
                            tracing::info!(export = %loggable(&fresh), "agent: new session");
                            *lock(&self.export) = fresh;
                            renewed = true;
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::Io | ErrorKind::Shutdown) => {
                            // No server answers over HTTP yet: wait and try again.
                            tracing::warn!(err = %e, "agent: cannot open a new session yet; trying again");
                            attempts += 1;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                        Err(e) => {
                            let refused = Error::new(
                                e.kind(),
                                format!(
                                    "the server ended this session and a new one cannot take its place: {e}"
                                ),
                            );
                            // Remembered: every later request fails at once instead of
                            // opening (and dropping) another session.
                            *lock(&self.refused) = Some(refused.clone());
                            return Err(refused);
                        }
                    }
                }
                Err(err) if overlay_lost(&err) && expect_size.is_some() => {
                    let refused = Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "{}; this client's writes since it booted were on that server, so it stops using the disk",
                            err.message()
                        ),
                    );
                    tracing::error!(err = %refused, "agent: the session's write overlay died with its server; failing every request (the client must boot again)");
                    *lock(&self.refused) = Some(refused.clone());
                    return Err(refused);
                }
                Err(err)
                    if err.kind() == ErrorKind::NotFound
                        && expect_size.is_some()
                        && !ended(&err) =>
                {
                    // The server answers any failure to open the export (a backend or
                    // catalog hiccup) as unknown: a session that served us is waited for.
                    if attempts == 0 || attempts.is_power_of_two() {
                        tracing::warn!(server = %server.name, %err, "agent: the server cannot open the export now; trying again (requests wait)");
                    }
                    next(&mut attempts, &mut backoff).await;
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::Conflict
                    ) =>
                {
                    return Err(err);
                }
                Err(err) => {
                    if let Some(limit) = self.config.give_up_after
                        && started.elapsed() >= limit
                    {
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!("gave up after {limit:?} without a server: {err}"),
                        ));
                    }
                    if attempts == 0 || attempts.is_power_of_two() {
                        tracing::warn!(server = %server.name, address = %server.nbd, attempts = attempts + 1, servers = servers.count(), %err,
                            "agent: cannot reach the server; trying the next one (requests wait)");
                    }
                    next(&mut attempts, &mut backoff).await;
                }
            }
        }
    }

    /// The live connection, or a new one (with unflushed writes replayed) if it is gone.
    async fn connection(&self) -> Result<Arc<Conn>> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot
            && !conn.lost.is_cancelled()
        {
            return Ok(conn.clone());
        }
        *slot = None;
        if let Some(refused) = lock(&self.refused).clone() {
            return Err(refused);
        }
        loop {
            let (conn, _, _) = self.connect_with_retries(Some(self.info.size)).await?;
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Some(renewal) = &self.renewal {
                let export = lock(&self.export).clone();
                match renewal.verify(&export).await {
                    Ok(()) => {}
                    Err(err) if err.kind() == ErrorKind::Conflict => {
                        tracing::error!(%err, "agent: the disk changed while the server was away; failing every request (the client must boot again)");
                        *lock(&self.refused) = Some(err.clone());
                        return Err(err);
                    }
                    Err(err) => {
                        tracing::warn!(%err, "agent: cannot check the disk's generation after the reconnect; carrying on");
                    }
                }
            }
            if self.replay(&conn).await? {
                *slot = Some(conn.clone());
                return Ok(conn);
            }
        }
    }

    /// Sends the journal's writes again on `conn`; `false` if the connection broke meanwhile.
    async fn replay(&self, conn: &Conn) -> Result<bool> {
        let (writes, overflowed) = {
            let journal = lock(&self.journal);
            (journal.writes.clone(), journal.overflowed)
        };
        if overflowed {
            tracing::warn!(
                "agent: more unflushed writes than the replay journal holds were acknowledged before the connection broke; a server that crashed may have lost some"
            );
        }
        if !writes.is_empty() {
            tracing::info!(
                writes = writes.len(),
                "agent: replaying unflushed writes on the new connection"
            );
        }
        for (_, offset, data) in writes {
            let request = Request {
                flags: 0,
                command: cmd::WRITE,
                cookie: 0,
                offset,
                length: data.len() as u32,
            };
            match conn
                .request(request, Some(&data), self.config.request_timeout)
                .await
            {
                Attempt::Answered(Ok(_)) => {}
                Attempt::Answered(Err(code)) => return Err(answer_error("replay write", code)),
                Attempt::Lost => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Runs one request to an answer, on a new connection as often as needed.
    async fn call(
        &self,
        op: &'static str,
        request: Request,
        payload: Option<&Bytes>,
    ) -> Result<Option<Bytes>> {
        let mut first = true;
        let mut shutdown_wait = Duration::from_millis(100);
        loop {
            let conn = self.connection().await?;
            if !first {
                self.counters.resent.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match conn
                .request(request, payload, self.config.request_timeout)
                .await
            {
                Attempt::Answered(Ok(data)) => return Ok(data),
                Attempt::Answered(Err(errno::ESHUTDOWN)) => {
                    // The server is stopping (a restart): ask its successor, after a
                    // pause that doubles each time the server answers so, so that a
                    // draining server that still accepts connections is not hammered.
                    conn.fail();
                    tokio::time::sleep(shutdown_wait).await;
                    shutdown_wait = (shutdown_wait * 2).min(MAX_BACKOFF);
                    continue;
                }
                Attempt::Answered(Err(code)) => return Err(answer_error(op, code)),
                Attempt::Lost => continue,
            }
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn request(command: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        command,
        cookie: 0,
        offset,
        length,
    }
}

#[async_trait]
impl BlockSource for RemoteSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn capability(&self) -> Capability {
        let write = !self.config.read_only && !self.has(tflag::READ_ONLY);
        Capability {
            write,
            flush: write && self.has(tflag::SEND_FLUSH),
            fua: write && self.has(tflag::SEND_FUA),
            trim: write && self.has(tflag::SEND_TRIM),
            write_zeroes: write && self.has(tflag::SEND_WRITE_ZEROES),
            extents: false,
            multi_conn: false,
            rotational: false,
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry::default()
    }

    async fn read_at(&self, offset: u64, len: usize, _opts: ReadOpts) -> Result<Chunks> {
        check_range(&self.info, "read_at", offset, len as u64)?;
        if len == 0 {
            return Ok(Chunks::new());
        }
        // The server's largest request is 32 MiB; the layers above ask for far less.
        let mut parts = Vec::new();
        let mut at = offset;
        let end = offset + len as u64;
        while at < end {
            let n = (end - at).min(16 << 20) as u32;
            let data = self
                .call("read_at", request(cmd::READ, 0, at, n), None)
                .await?
                .unwrap_or_default();
            self.counters
                .read_bytes
                .fetch_add(u64::from(n), Ordering::Relaxed);
            parts.push(data);
            at += u64::from(n);
        }
        Ok(Chunks::from_parts(parts))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if !self.capability().write {
            return Err(read_only_error(&self.info, "write_at"));
        }
        check_range(&self.info, "write_at", offset, data.len() as u64)?;
        let flags = if opts.fua && self.capability().fua {
            cflag::FUA
        } else {
            0
        };
        let length = data.len() as u32;
        self.call(
            "write_at",
            request(cmd::WRITE, flags, offset, length),
            Some(&data),
        )
        .await?;
        self.counters
            .written_bytes
            .fetch_add(u64::from(length), Ordering::Relaxed);
        let mut journal = lock(&self.journal);
        if flags & cflag::FUA != 0 {
            // Durable already; an older journaled write of the range must not come back.
            journal.forget(offset, u64::from(length));
        } else if journal.bytes + u64::from(length) <= JOURNAL_LIMIT {
            let number = journal.next;
            journal.next += 1;
            journal.bytes += u64::from(length);
            journal.writes.push((number, offset, data));
        } else {
            // Replaying part of the writes could put old bytes over newer ones: keep none.
            journal.writes.clear();
            journal.bytes = 0;
            journal.overflowed = true;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.capability().flush {
            return Ok(());
        }
        let covered = lock(&self.journal).next;
        self.call("flush", request(cmd::FLUSH, 0, 0, 0), None)
            .await?;
        let mut journal = lock(&self.journal);
        journal.writes.retain(|(number, _, _)| *number >= covered);
        journal.bytes = journal.writes.iter().map(|(_, _, d)| d.len() as u64).sum();
        journal.overflowed = false;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if !self.capability().trim {
            return Err(
                Error::new(ErrorKind::Unsupported, "the server does not trim").with_op("trim"),
            );
        }
        check_range(&self.info, "trim", offset, len)?;
        let len = u32::try_from(len).map_err(|_| {
            Error::new(ErrorKind::InvalidInput, "trim of 4 GiB or more at once").with_op("trim")
        })?;
        self.call("trim", request(cmd::TRIM, 0, offset, len), None)
            .await?;
        lock(&self.journal).forget(offset, u64::from(len));
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if !self.capability().write_zeroes {
            return Err(
                Error::new(ErrorKind::Unsupported, "the server does not write zeroes")
                    .with_op("write_zeroes"),
            );
        }
        check_range(&self.info, "write_zeroes", offset, len)?;
        let len = u32::try_from(len).map_err(|_| {
            Error::new(ErrorKind::InvalidInput, "zeroes of 4 GiB or more at once")
                .with_op("write_zeroes")
        })?;
        let mut flags = if opts.may_trim { 0 } else { cflag::NO_HOLE };
        if opts.fua && self.capability().fua {
            flags |= cflag::FUA;
        }
        self.call(
            "write_zeroes",
            request(cmd::WRITE_ZEROES, flags, offset, len),
            None,
        )
        .await?;
        lock(&self.journal).forget(offset, u64::from(len));
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        all_data(&self.info, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_trim_or_zeroing_drops_the_journaled_writes_it_overlaps() {
        let mut journal = Journal::default();
        for (n, at) in [(0, 0), (1, 4096), (2, 16384)] {
            journal.writes.push((n, at, Bytes::from(vec![1u8; 4096])));
        }
        journal.bytes = 3 * 4096;
        journal.forget(4000, 200);
        let left: Vec<u64> = journal.writes.iter().map(|(_, at, _)| *at).collect();
        assert_eq!(left, vec![16384]);
        assert_eq!(journal.bytes, 4096);
        journal.forget(20480, 4096);
        assert_eq!(
            journal.writes.len(),
            1,
            "a range just past a write leaves it"
        );
    }

    #[test]
    fn only_a_session_the_server_says_ended_is_renewed() {
        let ended_err = Error::new(
            ErrorKind::NotFound,
            "session 1 has ended: the server stopped",
        );
        let hiccup = Error::new(ErrorKind::NotFound, "cannot open the image: timed out");
        assert!(ended(&ended_err) && !ended(&hiccup));
        assert!(renewable(&ended_err) && !renewable(&hiccup));
        for final_end in [
            "session 1 has ended: closed by an administrator (osstream session close)",
            "session 1 has ended: replaced by the client's new session 2 (one client, one session)",
        ] {
            assert!(!renewable(&Error::new(ErrorKind::NotFound, final_end)));
        }
    }
}
