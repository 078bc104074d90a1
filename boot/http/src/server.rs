//! The HTTP listener: connections, routes, bodies read through the engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use osstream_core::{
    AGENT_INFO_FORMAT, AgentInfo, AgentWrites, AttachRequest, Attachment, BootDirectory,
    BootProtocol, ClientLimit, DynSource, Error, ErrorKind, ExportName, Exports, Intent,
    IoCounters, OverlayKind, Placement, ProfileStore, ReadOpts, Result, SeenAddresses,
    ServeContext, ServerEntry, ServerList, UnknownPolicy, async_trait, normalize_mac,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::HttpConfig;
use crate::request::{
    Method, RangeAnswer, Refusal, Request, ResponseHead, parse_range, parse_request,
};
use crate::script::{self, Identity, SessionBoot};

/// A request head must arrive within this time once it has started.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long responses in flight may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection reading a disk over HTTP SAN may wait this long between reads: a
/// sanbooted machine sits at its boot loader's prompt as long as its user likes, and its
/// session lives while the connection does.
const SAN_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Bodies are read from their source in pieces of at most this size.
const BODY_PIECE: u64 = 1 << 20;

/// The HTTP boot server (see the crate documentation for its routes).
#[derive(Debug)]
pub struct HttpServer {
    config: HttpConfig,
    listener: Option<TcpListener>,
    base_url: Option<String>,
}

impl HttpServer {
    /// A server for `config`; nothing is bound until [`BootProtocol::bind`].
    pub fn new(config: HttpConfig) -> Self {
        HttpServer {
            config,
            listener: None,
            base_url: None,
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    exports: Arc<Exports>,
    boot: Option<Arc<dyn BootDirectory>>,
    profiles: Option<Arc<dyn ProfileStore>>,
    /// Which server new sessions go to (several servers on one catalog).
    placement: Option<Arc<dyn Placement>>,
    /// Held from choosing a server to recording the session placed on it, so a burst
    /// of boots through this server sees each placement before making the next.
    placing: tokio::sync::Mutex<()>,
    nbd_address: Option<String>,
    seen: Arc<SeenAddresses>,
    base_url: Option<String>,
    /// Lines about bad requests, a few per second.
    bad: std::sync::Mutex<osstream_core::LogBudget>,
    menu_timeout: Duration,
    idle_timeout: Duration,
    /// `/metrics` is served.
    metrics: bool,
}

#[async_trait]
impl BootProtocol for HttpServer {
    fn name(&self) -> &'static str {
        crate::KIND
    }

    async fn bind(&mut self) -> Result<Vec<String>> {
        let address = osstream_core::check_listen("http.listen", &self.config.listen)?;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| Error::from_io(e, format!("cannot listen on {address} (http.listen)")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::from_io(e, "cannot read the HTTP listener's address"))?;
        self.base_url = self.config.base_url_for(bound);
        self.listener = Some(listener);
        Ok(vec![bound.to_string()])
    }

    fn boot_url(&self) -> Option<String> {
        let bound = self.listener.as_ref()?.local_addr().ok()?;
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        Some(format!("{base}/boot.ipxe"))
    }

    async fn serve(self: Box<Self>, ctx: ServeContext, shutdown: CancellationToken) -> Result<()> {
        let listener = self.listener.ok_or_else(|| {
            Error::new(
                ErrorKind::Unexpected,
                "the HTTP server serves before it is bound",
            )
        })?;
        if ctx.boot.is_none() {
            tracing::warn!("no catalog: /ipxe scripts answer with a message only");
        }
        let shared = Arc::new(Shared {
            exports: ctx.exports,
            boot: ctx.boot,
            profiles: ctx.profiles,
            placement: ctx.placement,
            placing: tokio::sync::Mutex::new(()),
            nbd_address: ctx.session_address,
            seen: ctx.seen,
            bad: std::sync::Mutex::new(osstream_core::LogBudget::new("bad HTTP requests", 10)),
            base_url: self.base_url,
            menu_timeout: self.config.menu_timeout.0,
            idle_timeout: self.config.idle_timeout.0,
            metrics: self.config.metrics,
        });
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let tracker = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, typically: wait instead of spinning.
                        tracing::warn!(%err, "http: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                shared: shared.clone(),
                stream,
                peer,
                buf: BytesMut::with_capacity(4096),
                san: None,
                shutdown: shutdown.clone(),
            };
            tracker.spawn(async move {
                let _permit = permit;
                connection.run().await;
            });
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "http: responses still in flight after the drain timeout; they end with the server"
            );
        }
        Ok(())
    }
}

/// An answer before it is written.
enum Reply {
    /// A small body held in memory.
    Text { head: ResponseHead, body: String },
    /// A body read from a source, with `Range` support; `counters` count it for a session,
    /// whose `[limits]` pace it.
    Source {
        source: DynSource,
        counters: Option<Arc<IoCounters>>,
        limit: Option<Arc<ClientLimit>>,
    },
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        body.push('\n');
        Reply::Text {
            head: ResponseHead::new(status).header("Content-Type", "text/plain; charset=utf-8"),
            body,
        }
    }

    fn script(body: String) -> Self {
        Reply::Text {
            head: ResponseHead::new(200).header("Content-Type", "text/plain; charset=utf-8"),
            body,
        }
    }

    fn error(err: &Error) -> Self {
        let status = match err.kind() {
            ErrorKind::NotFound => 404,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::Conflict => 409,
            ErrorKind::InvalidInput | ErrorKind::OutOfRange => 400,
            ErrorKind::Shutdown => 503,
            _ => 500,
        };
        Reply::text(status, err.to_string())
    }
}

/// A path with its session token (after `/san/` or `/boot/`) hidden, for logs.
pub(crate) fn loggable_path(path: &str) -> String {
    osstream_core::shorten(&token_hidden(path), 160).into_owned()
}

fn token_hidden(path: &str) -> String {
    // The same normalisation as routing: any number of leading slashes.
    let trimmed = path.trim_start_matches('/');
    for prefix in ["san/", "boot/", "agent/"] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            let tail = rest.find('/').map_or("", |i| &rest[i..]);
            return format!("/{prefix}<token>{tail}");
        }
    }
    path.to_owned()
}

struct Connection {
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    buf: BytesMut,
    /// The session this connection reads over HTTP SAN, kept between its requests.
    san: Option<(String, Attachment)>,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(mut self) {
        loop {
            let request = match self.next_request().await {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(refusal) => {
                    if self
                        .shared
                        .bad
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .allow()
                    {
                        tracing::info!(peer = %self.peer, status = refusal.status, reason = %refusal.reason, "http: bad request");
                    }
                    let mut head = ResponseHead::new(refusal.status);
                    if refusal.status == 405 {
                        head = head.header("Allow", "GET, HEAD");
                    }
                    let body = format!("{}\n", refusal.reason);
                    let _ = self.write_text(head, &body, true, false).await;
                    break;
                }
            };
            let keep_alive = request.keep_alive && !self.shutdown.is_cancelled();
            match self.answer(&request, keep_alive).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => {
                    tracing::debug!(peer = %self.peer, %err, "http: connection ended");
                    break;
                }
            }
        }
        if let Some((_, attachment)) = self.san.take() {
            attachment.close().await;
        }
    }

    /// The next request head; `Ok(None)` when the connection ends (closed, idle,
    /// shutdown, or a head that does not arrive in time).
    async fn next_request(&mut self) -> std::result::Result<Option<Request>, Refusal> {
        // One deadline for the whole head, however slowly its bytes trickle in.
        let mut head_deadline = None;
        loop {
            if !self.buf.is_empty()
                && let Some((request, used)) = parse_request(&self.buf)?
            {
                self.buf.advance(used);
                return Ok(Some(request));
            }
            let idle = self.buf.is_empty();
            let deadline = if idle {
                let idle = if self.san.is_some() {
                    SAN_IDLE_TIMEOUT
                } else {
                    self.shared.idle_timeout
                };
                tokio::time::Instant::now() + idle
            } else {
                *head_deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT)
            };
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)) => read,
                _ = self.shutdown.cancelled(), if idle => return Ok(None),
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                    if !idle {
                        tracing::debug!(peer = %self.peer, "http: connection closed in the middle of a request head");
                    }
                    return Ok(None);
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Writes `bytes`; a client that takes none of them for an idle timeout is gone.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(self.shared.idle_timeout, self.stream.write_all(bytes)).await {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
        }
    }

    /// Answers one request; `Ok(false)` when the connection must close after it.
    async fn answer(&mut self, request: &Request, keep_alive: bool) -> std::io::Result<bool> {
        let reply = self.route(request).await;
        let head_only = request.method == Method::Head;
        match reply {
            Reply::Text { head, body } => {
                tracing::debug!(peer = %self.peer, path = %loggable_path(&request.path), status = head.status(), "http");
                self.write_text(head, &body, !keep_alive, head_only).await?;
                Ok(keep_alive)
            }
            Reply::Source {
                source,
                counters,
                limit,
            } => {
                let paced = (counters.as_deref(), limit.as_deref());
                self.send_source(request, &source, paced, keep_alive, head_only)
                    .await
            }
        }
    }

    async fn write_text(
        &mut self,
        head: ResponseHead,
        body: &str,
        close: bool,
        head_only: bool,
    ) -> std::io::Result<()> {
        let mut out = head.encode(body.len() as u64, !close);
        if !head_only {
            out.extend_from_slice(body.as_bytes());
        }
        self.write(&out).await
    }

    /// Sends `source` (the part a `Range` asks for); closes the connection when a read
    /// fails half-way, since the status has gone out already.
    async fn send_source(
        &mut self,
        request: &Request,
        source: &DynSource,
        (counters, limit): (Option<&IoCounters>, Option<&ClientLimit>),
        keep_alive: bool,
        head_only: bool,
    ) -> std::io::Result<bool> {
        let arrived = std::time::Instant::now();
        let size = source.info().size;
        let answer = request
            .range
            .as_deref()
            .map_or(RangeAnswer::Whole, |range| parse_range(range, size));
        let (head, start, length) = match answer {
            RangeAnswer::Whole => (ResponseHead::new(200), 0, size),
            RangeAnswer::Part { start, end } => (
                ResponseHead::new(206)
                    .header("Content-Range", format!("bytes {start}-{end}/{size}")),
                start,
                end - start + 1,
            ),
            RangeAnswer::Unsatisfiable => {
                let head =
                    ResponseHead::new(416).header("Content-Range", format!("bytes */{size}"));
                self.write_text(head, "", !keep_alive, head_only).await?;
                return Ok(keep_alive);
            }
        };
        let head = head
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream");
        self.write(&head.encode(length, keep_alive)).await?;
        if head_only {
            return Ok(keep_alive);
        }
        let end = start + length;
        let mut offset = start;
        while offset < end {
            let piece = (end - offset).min(BODY_PIECE);
            if let Some(limit) = limit {
                if offset == start {
                    limit.acquire(piece).await;
                } else {
                    limit.acquire_bytes(piece).await;
                }
            }
            let chunks = match source
                .read_at(offset, piece as usize, ReadOpts::default())
                .await
            {
                Ok(chunks) => chunks,
                Err(err) => {
                    if let Some(counters) = counters {
                        counters.error();
                    }
                    tracing::warn!(peer = %self.peer, path = %loggable_path(&request.path), offset, %err, "http: read failed in the middle of a body; closing the connection");
                    return Ok(false);
                }
            };
            for part in chunks.parts() {
                self.write(part).await?;
            }
            offset += piece;
        }
        if let Some(counters) = counters {
            counters.request();
            counters.read(length);
            counters.finished(osstream_core::metrics::RequestKind::Read, arrived.elapsed());
        }
        Ok(keep_alive)
    }

    async fn route(&mut self, request: &Request) -> Reply {
        let path = request.path.trim_start_matches('/');
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["boot.ipxe"] => Reply::script(script::chain_script(&self.base_url(request))),
            ["metrics"] if self.shared.metrics => Reply::Text {
                head: ResponseHead::new(200)
                    .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                body: osstream_core::metrics::global().render(),
            },
            ["servers"] => self.server_list(request).await,
            ["ipxe", mac] => self.client_script(request, mac, None).await,
            ["ipxe", mac, vdisk] => self.client_script(request, mac, Some(vdisk)).await,
            ["boot", token, file @ ("kernel" | "initrd")] => {
                match self.boot_file(token, file).await {
                    Ok(reply) => reply,
                    Err(err) => {
                        tracing::info!(peer = %self.peer, path = %loggable_path(&request.path), %err, "http: boot file refused");
                        Reply::error(&err)
                    }
                }
            }
            ["san", token] => match self.san(token, request.method).await {
                Ok(reply) => reply,
                Err(err) => {
                    tracing::info!(peer = %self.peer, path = %loggable_path(&request.path), %err, "http: SAN refused");
                    Reply::error(&err)
                }
            },
            ["agent", token, "booted"] => {
                let peer = self.peer.to_string();
                match self.shared.exports.boot_complete(token, &peer).await {
                    Ok((session, ended)) => {
                        tracing::info!(peer = %self.peer, %session, recording_ended = ended,
                            "http: the client says its boot is complete");
                        Reply::text(
                            200,
                            if ended {
                                "boot recorded"
                            } else {
                                "nothing was being recorded"
                            },
                        )
                    }
                    Err(err) => {
                        tracing::info!(peer = %self.peer, path = %loggable_path(&request.path), %err, "http: boot-complete refused");
                        Reply::error(&err)
                    }
                }
            }
            ["agent", token] => match self.agent_info(token).await {
                Ok(reply) => reply,
                Err(err) => {
                    tracing::info!(peer = %self.peer, path = %loggable_path(&request.path), %err, "http: agent info refused");
                    Reply::error(&err)
                }
            },
            _ => Reply::text(
                404,
                format!(
                    "nothing at {}: this server answers /boot.ipxe, /ipxe/MAC, /boot/TOKEN/kernel|initrd, /san/TOKEN, /agent/TOKEN and /servers",
                    loggable_path(&request.path)
                ),
            ),
        }
    }

    /// `GET /servers`: the servers a client agent may fail over to, this one first.
    async fn server_list(&self, request: &Request) -> Reply {
        // Named by its address, as an agent names a server it was only given the address of.
        let nbd = self.shared.nbd_address.clone().unwrap_or_default();
        let here = ServerEntry {
            name: nbd.clone(),
            nbd,
            http: Some(self.base_url(request)),
        };
        let servers = match &self.shared.placement {
            None => vec![here],
            Some(placement) => match placement.servers().await {
                Ok(servers) => servers
                    .into_iter()
                    .map(|s| ServerEntry {
                        name: s.name,
                        nbd: s.nbd_address.unwrap_or_default(),
                        http: if s.here {
                            Some(self.base_url(request))
                        } else {
                            s.http_url
                        },
                    })
                    .collect(),
                Err(err) => {
                    tracing::warn!(%err, "http: cannot list the servers; answering with this one");
                    vec![here]
                }
            },
        };
        let list = ServerList {
            format: AGENT_INFO_FORMAT,
            servers: servers.into_iter().filter(|s| !s.nbd.is_empty()).collect(),
        };
        Reply::Text {
            head: ResponseHead::new(200).header("Content-Type", "application/json"),
            body: list.to_json(),
        }
    }

    fn base_url(&self, request: &Request) -> String {
        if let Some(base) = &self.shared.base_url {
            return base.clone();
        }
        match &request.host {
            Some(host) => format!("http://{host}"),
            None => match self.stream.local_addr() {
                Ok(local) => format!("http://{local}"),
                Err(_) => "http://127.0.0.1".to_owned(),
            },
        }
    }

    async fn client_script(&mut self, request: &Request, mac: &str, vdisk: Option<&str>) -> Reply {
        let Some(mac) = normalize_mac(mac) else {
            return Reply::text(
                400,
                format!("{:?} is not a MAC address", script::inert(mac)),
            );
        };
        if request.method == Method::Head {
            // A script opens a session: a probe gets the headers of nothing.
            return Reply::script(String::new());
        }
        let peer_ip = self.peer.ip().to_canonical();
        if let Some(refusal) = self.shared.seen.refuse(&mac, peer_ip) {
            tracing::warn!(client = %mac, peer = %self.peer, %refusal, "http: boot script refused");
            // A script, so the machine's console says why (iPXE shows no error bodies).
            return Reply::script(script::message_script(&[refusal]));
        }
        let Some(boot) = self.shared.boot.clone() else {
            return Reply::script(script::message_script(&[
                "this server has no catalog to boot clients from".to_owned(),
            ]));
        };
        let base = self.base_url(request);
        match self.build_client_script(&*boot, &base, &mac, vdisk).await {
            Ok(text) => Reply::script(text),
            Err(err) => {
                tracing::warn!(client = %mac, peer = %self.peer, vdisk = vdisk.unwrap_or(""), %err, "http: cannot boot the client");
                Reply::script(script::message_script(&[format!(
                    "cannot boot this machine ({mac}): {err}"
                )]))
            }
        }
    }

    async fn build_client_script(
        &self,
        boot: &dyn BootDirectory,
        base: &str,
        mac: &str,
        vdisk: Option<&str>,
    ) -> Result<String> {
        let peer = self.peer.ip().to_string();
        let client = match boot.known_client(mac).await? {
            Some(client) => client,
            None => match boot.unknown_policy().await? {
                UnknownPolicy::Ignore => {
                    tracing::info!(client = %mac, %peer, "unknown client: the policy ignores it");
                    return Ok(script::message_script(&[
                        format!("this machine ({mac}) is not registered on this server."),
                        format!("An administrator can add it: osstream client add {mac}"),
                    ]));
                }
                policy => {
                    let notes = format!("first seen over HTTP from {peer}");
                    match boot.register_client(mac, &notes).await {
                        Ok(client) => {
                            tracing::info!(client = %mac, %peer, ?policy, "unknown client registered");
                            client
                        }
                        // Registered a moment ago by another request or server.
                        Err(err) if err.kind() == ErrorKind::Conflict => {
                            boot.known_client(mac).await?.ok_or(err)?
                        }
                        Err(err) => return Err(err),
                    }
                }
            },
        };
        let identity = Identity::of(mac, Some(&client));
        let menu = boot.boot_menu(mac).await?;
        let chosen = match vdisk {
            Some(name) => menu
                .iter()
                .find(|c| c.vdisk == name)
                .cloned()
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::PermissionDenied,
                        format!("vdisk {:?} is not assigned to {mac}", script::inert(name)),
                    )
                })?,
            None if menu.is_empty() => {
                return Ok(script::message_script(&[
                    format!(
                        "this machine ({mac}, {}) has no vdisk assigned.",
                        identity.hostname
                    ),
                    format!("An administrator can assign one: osstream client assign {mac} VDISK"),
                ]));
            }
            None if menu.len() > 1 && !self.shared.menu_timeout.is_zero() => {
                return Ok(script::menu_script(
                    base,
                    &identity,
                    &menu,
                    self.shared.menu_timeout,
                ));
            }
            None => menu
                .iter()
                .find(|c| c.is_default && c.enabled)
                .or_else(|| menu.iter().find(|c| c.enabled))
                .unwrap_or(&menu[0])
                .clone(),
        };
        if !chosen.enabled {
            return Ok(script::message_script(&[format!(
                "vdisk {} is disabled; ask an administrator (osstream vdisk set {} --enable)",
                chosen.vdisk, chosen.vdisk
            )]));
        }
        let (session, placed) = match &self.shared.placement {
            None => (
                boot.open_boot_session(mac, &chosen.vdisk, Some(&peer))
                    .await?,
                None,
            ),
            Some(placement) => {
                let _turn = self.shared.placing.lock().await;
                let session = boot
                    .open_boot_session(mac, &chosen.vdisk, Some(&peer))
                    .await?;
                let shared = session.overlay.is_some_and(OverlayKind::is_shared);
                let placed = placement.choose(Some(self.peer.ip()), shared).await;
                if let Err(err) = placement.record(&session.id, &placed).await {
                    tracing::warn!(session = %session.id, server = %placed.name, %err, "cannot record where the session was placed");
                }
                (session, Some(placed))
            }
        };
        // A session placed on another server boots from that server's addresses.
        let (base, nbd_address) = match &placed {
            Some(placed) if !placed.here => (
                placed.http_url.as_deref().unwrap_or(base),
                placed.nbd_address.as_deref(),
            ),
            _ => (base, self.shared.nbd_address.as_deref()),
        };
        let server = placed.as_ref().map_or("", |p| p.name.as_str());
        tracing::info!(client = %mac, vdisk = %chosen.vdisk, session = %session.id, %peer, hostname = %identity.hostname, server, "boot session opened");
        let target = SessionBoot {
            token: &session.token,
            export: &session.export,
            nbd_address,
        };
        Ok(script::boot_script(base, &identity, &chosen, &target)
            .unwrap_or_else(|lines| script::message_script(&lines)))
    }

    async fn boot_file(&self, token: &str, file: &str) -> Result<Reply> {
        let boot = self
            .shared
            .boot
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "this server has no catalog"))?;
        let (session, choice) = boot.session_boot(token).await?;
        let key = match file {
            "kernel" => choice.kernel.as_deref(),
            _ => choice.initrd.as_deref(),
        }
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("vdisk {:?} names no {file}", choice.vdisk),
            )
        })?;
        let source = self
            .shared
            .exports
            .open_boot_file(&choice.vdisk, &choice.backend, key)
            .await?;
        tracing::debug!(session = %session.id, vdisk = %choice.vdisk, file, key, "http: boot file");
        Ok(Reply::Source {
            source,
            counters: None,
            limit: None,
        })
    }

    /// `GET /agent/TOKEN`: the session's disk as the client agent needs to know it (see
    /// [`AgentInfo`]), including the vdisk's boot set when a profile matches the image.
    async fn agent_info(&self, token: &str) -> Result<Reply> {
        let peer = self.peer.to_string();
        let view = self.shared.exports.session_view(token, &peer).await?;
        let writes = match view.target.overlay {
            Some(OverlayKind::Ram | OverlayKind::RamOverflowDisk | OverlayKind::ServerDisk) => {
                AgentWrites::Local
            }
            // Kept on the server: across the client's sessions, or on shared storage so
            // the session survives its server.
            Some(OverlayKind::ServerDiskPersistent | OverlayKind::SharedDisk) | None => {
                AgentWrites::Server
            }
        };
        let profile = match &self.shared.profiles {
            Some(store) => match store.profile(&view.target.vdisk).await {
                Ok(profile) => profile.filter(|p| p.matches(&view.identity, &view.generation)),
                Err(err) => {
                    tracing::warn!(vdisk = %view.target.vdisk, %err, "http: cannot read the boot profile for an agent; it streams on demand");
                    None
                }
            },
            None => None,
        };
        let info = AgentInfo {
            format: AGENT_INFO_FORMAT,
            vdisk: view.target.vdisk.clone(),
            client: view.target.client.clone(),
            size: view.size,
            image: view.identity,
            generation: view.generation,
            writes,
            block_size: profile.as_ref().map_or(0, |p| p.block_size),
            boot_set: profile
                .as_ref()
                .map_or_else(Vec::new, |p| p.boot_set().collect()),
        };
        tracing::info!(peer = %self.peer, session = %view.target.session, vdisk = %info.vdisk,
            boot_set = info.boot_set.len(), writes = ?info.writes, "http: agent info");
        Ok(Reply::Text {
            head: ResponseHead::new(200).header("Content-Type", "application/json"),
            body: info.to_json(),
        })
    }

    async fn san(&mut self, token: &str, method: Method) -> Result<Reply> {
        if let Some((held, attachment)) = &self.san
            && held == token
            && !attachment.ended().is_cancelled()
        {
            return Ok(Reply::Source {
                source: attachment.source.clone(),
                counters: Some(attachment.counters().clone()),
                limit: attachment.limit().cloned(),
            });
        }
        if let Some((_, old)) = self.san.take() {
            old.close().await;
        }
        let name = ExportName::of_session(token);
        let peer = self.peer.to_string();
        let intent = match method {
            Method::Head => Intent::Probe,
            Method::Get => Intent::Use,
        };
        let attachment = self
            .shared
            .exports
            .attach(AttachRequest {
                name: &name,
                peer: &peer,
                protocol: crate::KIND,
                intent,
            })
            .await?;
        let reply = Reply::Source {
            source: attachment.source.clone(),
            counters: Some(attachment.counters().clone()),
            limit: attachment.limit().cloned(),
        };
        if intent == Intent::Use {
            tracing::info!(peer = %self.peer, session = attachment.session().unwrap_or(""), "http: SAN attached");
            self.san = Some((token.to_owned(), attachment));
        } else {
            attachment.close().await;
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn tokens_never_reach_logs() {
        assert_eq!(loggable_path("/san/secret"), "/san/<token>");
        assert_eq!(loggable_path("/boot/secret/kernel"), "/boot/<token>/kernel");
        assert_eq!(loggable_path("/ipxe/aa-bb"), "/ipxe/aa-bb");
        assert_eq!(loggable_path("/agent/secret"), "/agent/<token>");
        assert_eq!(
            loggable_path("//boot/secret/kernel"),
            "/boot/<token>/kernel"
        );
        assert_eq!(loggable_path("///san/secret"), "/san/<token>");
    }
}
