//! The TFTP listener and its transfers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use osstream_backend_file::FileTree;
use osstream_core::{
    BootProtocol, DynSource, Error, ErrorKind, Exports, LogBudget, ReadOpts, Result, ServeContext,
    async_trait,
};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::TftpConfig;
use crate::codec::{self, Packet, Request, code};
use crate::transfer::{AckOutcome, Transfer};

/// The longest retransmission timeout a client may ask for: longer ones are not granted
/// (RFC 2349 lets a server leave the option out), so a stalled transfer ends within
/// a minute or so instead of holding a slot for (retries + 1) x 255 s.
const MOST_CLIENT_TIMEOUT: u8 = 10;
/// On shutdown, how long transfers in flight may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Malformed-packet log lines per second at most (a flood must not flood the log).
const BAD_PACKET_LINES_PER_SECOND: u32 = 10;

/// Where names are looked up.
#[derive(Debug, Clone)]
enum Files {
    /// A local folder.
    Tree(Arc<FileTree>),
    /// A backend's boot files (flat names).
    Backend(String),
}

/// The TFTP server (see the crate documentation).
#[derive(Debug)]
pub struct TftpServer {
    config: TftpConfig,
    socket: Option<Arc<UdpSocket>>,
    files: Option<Files>,
}

impl TftpServer {
    /// A server for `config`; nothing is bound until [`BootProtocol::bind`].
    pub fn new(config: TftpConfig) -> Self {
        TftpServer {
            config,
            socket: None,
            files: None,
        }
    }
}

/// What every transfer shares.
#[derive(Debug)]
struct Shared {
    files: Files,
    exports: Arc<Exports>,
    max_blksize: u16,
    max_windowsize: u16,
    timeout: Duration,
    retries: u32,
}

#[async_trait]
impl BootProtocol for TftpServer {
    fn name(&self) -> &'static str {
        crate::KIND
    }

    async fn bind(&mut self) -> Result<Vec<String>> {
        let files = match &self.config.backend {
            Some(backend) => Files::Backend(backend.clone()),
            None => Files::Tree(Arc::new(FileTree::open_root(&self.config.root).map_err(
                |e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "tftp.root {} cannot be served ({e}); install Debian's ipxe package for the default, or set tftp.root to a folder of boot files",
                            self.config.root.display()
                        ),
                    )
                },
            )?)),
        };
        let address = osstream_core::check_listen("tftp.listen", &self.config.listen)?;
        let socket = UdpSocket::bind(address).await.map_err(|e| {
            Error::from_io(e, format!("cannot listen on udp {address} (tftp.listen)"))
        })?;
        let bound = socket
            .local_addr()
            .map_err(|e| Error::from_io(e, "cannot read the TFTP socket's address"))?;
        self.socket = Some(Arc::new(socket));
        self.files = Some(files);
        Ok(vec![format!("udp {bound}")])
    }

    async fn serve(self: Box<Self>, ctx: ServeContext, shutdown: CancellationToken) -> Result<()> {
        let (Some(socket), Some(files)) = (self.socket, self.files) else {
            return Err(Error::new(
                ErrorKind::Unexpected,
                "the TFTP server serves before it is bound",
            ));
        };
        if let Files::Backend(name) = &files
            && !ctx.exports.backend_names().contains(&name.as_str())
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "tftp.backend = {name:?} names no configured backend (configured: {})",
                    ctx.exports.backend_names().join(", ")
                ),
            ));
        }
        let local_ip = socket
            .local_addr()
            .map_err(|e| Error::from_io(e, "cannot read the TFTP socket's address"))?
            .ip();
        let shared = Arc::new(Shared {
            files,
            exports: ctx.exports,
            max_blksize: self.config.max_blksize,
            max_windowsize: self.config.max_windowsize,
            timeout: self.config.timeout.0,
            retries: self.config.retries,
        });
        let slots = Arc::new(Semaphore::new(self.config.max_transfers));
        let tracker = TaskTracker::new();
        let mut bad_packets = LogBudget::new("malformed TFTP packets", BAD_PACKET_LINES_PER_SECOND);
        let mut buf = vec![0u8; 65536];
        loop {
            let (len, peer) = tokio::select! {
                received = socket.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(err) => {
                        tracing::debug!(%err, "tftp: receive failed");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            match codec::parse(&buf[..len]) {
                Err(why) => {
                    if bad_packets.allow() {
                        tracing::info!(%peer, bytes = len, %why, "tftp: malformed packet dropped");
                    }
                }
                Ok(Packet::Read(request)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        if bad_packets.allow() {
                            tracing::warn!(%peer, file = ?osstream_core::shorten(&request.filename, 128), "tftp: too many transfers; refused");
                        }
                        let _ = socket
                            .send_to(
                                &codec::error_packet(code::UNDEFINED, "server busy, try again"),
                                peer,
                            )
                            .await;
                        continue;
                    };
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        let _permit = permit;
                        send_file(&shared, request, peer, local_ip, &shutdown).await;
                    });
                }
                Ok(Packet::Write(request)) => {
                    if bad_packets.allow() {
                        tracing::info!(%peer, file = ?osstream_core::shorten(&request.filename, 128), "tftp: write refused (read-only server)");
                    }
                    let _ = socket
                        .send_to(
                            &codec::error_packet(code::ACCESS, "this server is read-only"),
                            peer,
                        )
                        .await;
                }
                Ok(other) => {
                    tracing::debug!(%peer, packet = ?other, "tftp: packet outside a transfer ignored");
                }
            }
        }
        drop(socket);
        tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                transfers = tracker.len(),
                "tftp: transfers still running after the drain timeout"
            );
        }
        Ok(())
    }
}

async fn open(shared: &Shared, name: &str) -> Result<DynSource> {
    match &shared.files {
        Files::Tree(tree) => tree.open(name).await,
        Files::Backend(backend) => {
            osstream_core::validate_image_name(name)?;
            shared.exports.open_boot_file("tftp", backend, name).await
        }
    }
}

fn client_message(err: &Error) -> &'static str {
    match err.kind() {
        ErrorKind::NotFound => "file not found",
        ErrorKind::PermissionDenied | ErrorKind::InvalidInput => {
            "access denied: not a file inside the TFTP root"
        }
        _ => "cannot read that file",
    }
}

fn error_code(err: &Error) -> u16 {
    match err.kind() {
        ErrorKind::NotFound => code::NOT_FOUND,
        ErrorKind::PermissionDenied | ErrorKind::InvalidInput => code::ACCESS,
        _ => code::UNDEFINED,
    }
}

/// Runs one read transfer on its own socket; logs how it ended.
async fn send_file(
    shared: &Shared,
    request: Request,
    peer: SocketAddr,
    local_ip: std::net::IpAddr,
    shutdown: &CancellationToken,
) {
    let started = Instant::now();
    let file = osstream_core::shorten(&request.filename, 128).into_owned();
    let socket = match UdpSocket::bind((local_ip, 0)).await {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(%peer, ?file, %err, "tftp: cannot open a transfer socket");
            return;
        }
    };
    if let Err(err) = socket.connect(peer).await {
        tracing::debug!(%peer, %err, "tftp: cannot reach the client");
        return;
    }
    if request.mode != "octet" {
        tracing::info!(%peer, ?file, mode = %request.mode, "tftp: refused a transfer mode other than octet");
        let _ = socket
            .send(&codec::error_packet(
                code::ILLEGAL,
                "only octet (binary) mode is served: switch your client to binary",
            ))
            .await;
        return;
    }
    let source = match open(shared, &request.filename).await {
        Ok(source) => source,
        Err(err) => {
            tracing::info!(%peer, ?file, %err, "tftp: file refused");
            // The client hears what it can act on; paths on this server stay in the log.
            let _ = socket
                .send(&codec::error_packet(error_code(&err), client_message(&err)))
                .await;
            return;
        }
    };
    let mut retransmits = 0u64;
    match transfer(
        shared,
        &socket,
        &request,
        &source,
        &mut retransmits,
        shutdown,
    )
    .await
    {
        Ok(size) => tracing::info!(%peer, ?file, bytes = size, retransmits,
            ms = started.elapsed().as_millis() as u64, "tftp: sent"),
        Err(why) => {
            tracing::info!(%peer, ?file, %why, retransmits, "tftp: transfer ended early")
        }
    }
}

/// Negotiates options, then sends `source` window by window.
async fn transfer(
    shared: &Shared,
    socket: &UdpSocket,
    request: &Request,
    source: &DynSource,
    retransmits: &mut u64,
    shutdown: &CancellationToken,
) -> std::result::Result<u64, String> {
    let size = source.info().size;
    let asked = request.options;
    let blksize = asked.blksize.map_or(512, |b| b.min(shared.max_blksize));
    let windowsize = asked.windowsize.map_or(1, |w| w.min(shared.max_windowsize));
    let granted_timeout = asked.timeout.filter(|t| *t <= MOST_CLIENT_TIMEOUT);
    let timeout = granted_timeout.map_or(shared.timeout, |t| Duration::from_secs(u64::from(t)));
    if asked.any() {
        let mut granted: Vec<(&str, String)> = Vec::new();
        if asked.blksize.is_some() {
            granted.push(("blksize", blksize.to_string()));
        }
        if asked.tsize {
            granted.push(("tsize", size.to_string()));
        }
        if let Some(t) = granted_timeout {
            granted.push(("timeout", t.to_string()));
        }
        if asked.windowsize.is_some() {
            granted.push(("windowsize", windowsize.to_string()));
        }
        let oack = codec::oack_packet(&granted);
        let mut tries = 0;
        'oack: loop {
            send(socket, &oack).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match wait_ack(socket, left, shutdown).await? {
                    Some(0) => break 'oack,
                    // Not an answer to the OACK: keep waiting, never resend on it.
                    Some(_) => {}
                    None => break,
                }
            }
            tries += 1;
            *retransmits += 1;
            if tries > shared.retries {
                return Err(format!(
                    "no ACK of the option acknowledgement after {tries} tries"
                ));
            }
        }
    }
    let mut state = Transfer::new(size, blksize, windowsize);
    let mut tries = 0;
    let mut packet = Vec::with_capacity(usize::from(blksize) + 4);
    'windows: loop {
        let window = state.window();
        let (offset, length) = state.window_extent(&window);
        let bytes = if length == 0 {
            osstream_core::Bytes::new()
        } else {
            source
                .read_at(offset, length as usize, ReadOpts::default())
                .await
                .map_err(|e| format!("read failed: {e}"))?
                .into_bytes()
        };
        for block in window.clone() {
            let (start, len) = state.extent(block);
            let start = (start - offset) as usize;
            packet.clear();
            packet.extend_from_slice(&codec::OP_DATA.to_be_bytes());
            packet.extend_from_slice(&Transfer::wire(block).to_be_bytes());
            packet.extend_from_slice(&bytes[start..start + len as usize]);
            send(socket, &packet).await?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match wait_ack(socket, left, shutdown).await? {
                Some(n) => match state.ack(n) {
                    AckOutcome::Done => return Ok(size),
                    AckOutcome::WindowDone | AckOutcome::Partial => {
                        tries = 0;
                        continue 'windows;
                    }
                    AckOutcome::Ignored => {}
                },
                None => {
                    tries += 1;
                    *retransmits += 1;
                    if tries > shared.retries {
                        return Err(format!(
                            "no ACK after {tries} tries at block {}",
                            window.start()
                        ));
                    }
                    continue 'windows;
                }
            }
        }
    }
}

async fn send(socket: &UdpSocket, packet: &[u8]) -> std::result::Result<(), String> {
    socket
        .send(packet)
        .await
        .map(|_| ())
        .map_err(|e| format!("send failed: {e}"))
}

/// The next ACK's block number; `None` on timeout. Other packets are skipped; an ERROR
/// from the client or shutdown ends the transfer.
async fn wait_ack(
    socket: &UdpSocket,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> std::result::Result<Option<u16>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 516];
    loop {
        let received = tokio::select! {
            received = tokio::time::timeout_at(deadline, socket.recv(&mut buf)) => received,
            _ = shutdown.cancelled() => return Err("the server is shutting down".to_owned()),
        };
        let len = match received {
            Err(_) => return Ok(None),
            Ok(Err(err)) => return Err(format!("receive failed: {err}")),
            Ok(Ok(len)) => len,
        };
        match codec::parse(&buf[..len]) {
            Ok(Packet::Ack(n)) => return Ok(Some(n)),
            Ok(Packet::Error { code, message }) => {
                return Err(format!("the client ended it (error {code}: {message})"));
            }
            _ => {}
        }
    }
}
