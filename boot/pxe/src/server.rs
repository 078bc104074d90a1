//! The DHCP sockets (67, and 4011 for the PXE boot server) and what each request gets.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use osstream_core::{
    BootDirectory, BootProtocol, Error, ErrorKind, LeaseStore, LogBudget, Result, SeenAddresses,
    ServeContext, async_trait,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::{PxeConfig, PxeMode};
use crate::decide::{self, BootFiles, Client, Pool};
use crate::message::{BOOTREQUEST, Message, kind, opt};

/// How long an offered address is held for the client's REQUEST.
const OFFER_HOLD_MS: i64 = 60_000;

/// The DHCP server (see the crate documentation).
#[derive(Debug)]
pub struct PxeServer {
    config: PxeConfig,
    dhcp: Option<UdpSocket>,
    boot_server: Option<UdpSocket>,
}

impl PxeServer {
    /// A server for `config`; nothing is bound until [`BootProtocol::bind`].
    pub fn new(config: PxeConfig) -> Self {
        PxeServer {
            config,
            dhcp: None,
            boot_server: None,
        }
    }
}

/// A UDP socket on `port` of every address, on `interface` only when given, that may
/// broadcast.
fn udp_socket(port: u16, interface: Option<&str>) -> Result<UdpSocket> {
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let socket = std::net::UdpSocket::bind(address)
        .map_err(|e| Error::from_io(e, format!("cannot listen on udp port {port} (pxe)")))?;
    socket
        .set_broadcast(true)
        .map_err(|e| Error::from_io(e, "cannot allow broadcasts"))?;
    if let Some(interface) = interface {
        let name = std::ffi::CString::new(interface)
            .map_err(|_| Error::new(ErrorKind::Config, "pxe.interface holds a NUL"))?;
        // SAFETY: setsockopt reads `len` bytes of the NUL-terminated name, alive for the
        // call, on a descriptor this function owns.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                name.as_bytes_with_nul().len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::from_io(
                std::io::Error::last_os_error(),
                format!("cannot bind DHCP to interface {interface:?} (pxe.interface)"),
            ));
        }
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| Error::from_io(e, "cannot set up the DHCP socket"))?;
    UdpSocket::from_std(socket).map_err(|e| Error::from_io(e, "cannot set up the DHCP socket"))
}

#[async_trait]
impl BootProtocol for PxeServer {
    fn name(&self) -> &'static str {
        crate::KIND
    }

    async fn bind(&mut self) -> Result<Vec<String>> {
        let interface = self.config.interface.as_deref();
        self.dhcp = Some(udp_socket(67, interface)?);
        self.boot_server = Some(udp_socket(4011, interface)?);
        let on = interface.map_or_else(
            || "every interface".to_owned(),
            |i| format!("interface {i}"),
        );
        Ok(vec![format!(
            "udp 67 and 4011 on {on} ({} mode)",
            match self.config.mode {
                PxeMode::Proxy => "proxy",
                PxeMode::Dhcp => "dhcp",
            }
        )])
    }

    async fn serve(self: Box<Self>, ctx: ServeContext, shutdown: CancellationToken) -> Result<()> {
        let (Some(dhcp), Some(boot_server)) = (self.dhcp, self.boot_server) else {
            return Err(Error::new(
                ErrorKind::Unexpected,
                "pxe serves before it is bound",
            ));
        };
        let config = self.config;
        let server_ip = config
            .server_ip
            .ok_or_else(|| Error::new(ErrorKind::Config, "pxe.server_ip is needed"))?;
        let script_url = match (&config.script_url, &ctx.boot_url) {
            (Some(url), _) => url.clone(),
            (None, Some(url)) => url
                .replace("//0.0.0.0:", &format!("//{server_ip}:"))
                .replace("//[::]:", &format!("//{server_ip}:")),
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "pxe needs the iPXE script URL: enable [http] or set pxe.script_url",
                ));
            }
        };
        if let Err(err) = std::net::UdpSocket::bind((server_ip, 0)) {
            tracing::warn!(%server_ip, %err, "pxe.server_ip is not an address of this machine: clients will be sent to a TFTP and DHCP server that is not here");
        }
        if config.interface.is_none() {
            tracing::warn!(
                "pxe.interface is not set: DHCP answers on every interface of this machine"
            );
        }
        let mut pools = Vec::new();
        if config.mode == PxeMode::Dhcp {
            pools.push(config.dhcp.pool("pxe.dhcp")?);
            for (i, relay) in config.relay.iter().enumerate() {
                pools.push(relay.pool(&format!("pxe.relay[{i}]"))?);
            }
        }
        let leases = match (config.mode, ctx.leases) {
            (PxeMode::Dhcp, None) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "pxe.mode = \"dhcp\" keeps leases in the catalog, and none is configured",
                ));
            }
            (_, leases) => leases,
        };
        if config.mode == PxeMode::Dhcp {
            ctx.seen.set_authoritative();
        }
        let mut state = State {
            mode: config.mode,
            server_ip,
            files: BootFiles {
                bios: config.bootfile_bios.clone(),
                efi: config.bootfile_efi.clone(),
                arm64: config.bootfile_arm64.clone(),
                script_url,
            },
            pools,
            leases,
            directory: ctx.boot,
            seen: ctx.seen,
            bad: LogBudget::new("malformed DHCP packets", 10),
        };
        tracing::info!(mode = ?state.mode, server = %server_ip, script = %state.files.script_url, "pxe: answering network-boot clients");
        let mut buf = vec![0u8; 4096];
        let mut buf2 = vec![0u8; 4096];
        loop {
            let (packet, from, port) = tokio::select! {
                received = dhcp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => (&buf[..len], from, Port::Dhcp),
                    Err(err) => { tracing::debug!(%err, "pxe: receive failed"); continue; }
                },
                received = boot_server.recv_from(&mut buf2) => match received {
                    Ok((len, from)) => (&buf2[..len], from, Port::BootServer),
                    Err(err) => { tracing::debug!(%err, "pxe: receive failed"); continue; }
                },
                _ = shutdown.cancelled() => break,
            };
            let Some((reply, to)) = state.handle(packet, from, port).await else {
                continue;
            };
            let socket = match port {
                Port::Dhcp => &dhcp,
                Port::BootServer => &boot_server,
            };
            if let Err(err) = socket.send_to(&reply.encode(), to).await {
                tracing::warn!(%to, %err, "pxe: cannot send a reply");
            }
        }
        Ok(())
    }
}

/// Which socket a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// 67: DHCP (broadcast, or from a relay).
    Dhcp,
    /// 4011: the PXE boot server (unicast, the client has an address).
    BootServer,
}

struct State {
    mode: PxeMode,
    server_ip: Ipv4Addr,
    files: BootFiles,
    pools: Vec<Pool>,
    leases: Option<Arc<dyn LeaseStore>>,
    directory: Option<Arc<dyn BootDirectory>>,
    seen: Arc<SeenAddresses>,
    bad: LogBudget,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl State {
    /// The answer to one datagram, and where it goes; `None` for no answer.
    async fn handle(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        port: Port,
    ) -> Option<(Message, SocketAddr)> {
        let request = match Message::parse(packet) {
            Ok(request) => request,
            Err(why) => {
                if self.bad.allow() {
                    tracing::info!(%from, bytes = packet.len(), %why, "pxe: malformed packet dropped");
                }
                return None;
            }
        };
        if request.op != BOOTREQUEST {
            return None;
        }
        let (Some(client), Some(kind)) = (decide::classify(&request), request.kind()) else {
            if self.bad.allow() {
                tracing::info!(%from, "pxe: a request without an Ethernet MAC or a message type dropped");
            }
            return None;
        };
        tracing::debug!(client = %client.mac, %from, kind = decide::kind_name(kind), pxe = client.pxe, ipxe = client.ipxe, arch = ?client.arch, "pxe: request");
        let reply = match (port, self.mode) {
            (Port::BootServer, _) => self.boot_server(&request, &client, kind, from),
            (Port::Dhcp, PxeMode::Proxy) => self.proxy(&request, &client, kind),
            (Port::Dhcp, PxeMode::Dhcp) => self.dhcp(&request, &client, kind).await,
        }?;
        let to = match port {
            Port::BootServer => from,
            Port::Dhcp if !request.giaddr.is_unspecified() => {
                SocketAddr::V4(SocketAddrV4::new(request.giaddr, 67))
            }
            Port::Dhcp if !request.ciaddr.is_unspecified() && reply.kind() != Some(kind::NAK) => {
                SocketAddr::V4(SocketAddrV4::new(request.ciaddr, 68))
            }
            Port::Dhcp => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)),
        };
        Some((reply, to))
    }

    /// The boot file of a network-boot client, or `None` (logged) when it has none.
    fn boot_file(&self, client: &Client) -> Option<String> {
        match decide::boot_file(client, &self.files) {
            Ok(file) => Some(file),
            Err(why) => {
                tracing::info!(client = %client.mac, %why, "pxe: no boot file for this client");
                None
            }
        }
    }

    /// ProxyDHCP: an offer of boot information (no address) to network-boot clients.
    fn proxy(&self, request: &Message, client: &Client, kind: u8) -> Option<Message> {
        if kind != kind::DISCOVER || !client.pxe {
            return None;
        }
        let file = self.boot_file(client)?;
        let mut offer = decide::reply(request, kind::OFFER, self.server_ip);
        decide::add_boot(&mut offer, request, client, self.server_ip, &file, true);
        tracing::info!(client = %client.mac, file = %file, "pxe: proxy offer");
        Some(offer)
    }

    /// The PXE boot server on 4011: the boot file, to a client that has an address.
    fn boot_server(
        &self,
        request: &Message,
        client: &Client,
        kind: u8,
        from: SocketAddr,
    ) -> Option<Message> {
        if kind != kind::REQUEST && kind != kind::INFORM {
            return None;
        }
        let file = self.boot_file(client)?;
        // Not a sighting: anyone can send a 4011 request with any MAC, and a PXE client
        // told to boot the file in the offer sends none (only leases count, in full mode).
        let mut ack = decide::reply(request, kind::ACK, self.server_ip);
        decide::add_boot(&mut ack, request, client, self.server_ip, &file, true);
        tracing::info!(client = %client.mac, peer = %from.ip(), file = %file, "pxe: boot server answered");
        Some(ack)
    }

    fn pool_for(&self, request: &Message) -> Option<&Pool> {
        if request.giaddr.is_unspecified() {
            self.pools.first()
        } else {
            self.pools
                .iter()
                .skip(1)
                .find(|p| p.in_subnet(request.giaddr))
        }
    }

    /// What the catalog knows of the client: its reservation and hostname.
    async fn known(&self, mac: &str) -> (Option<Ipv4Addr>, Option<String>) {
        let Some(directory) = &self.directory else {
            return (None, None);
        };
        match directory.known_client(mac).await {
            Ok(Some(client)) => (client.ip, client.hostname.or(client.name)),
            Ok(None) => (None, None),
            Err(err) => {
                tracing::warn!(client = %mac, %err, "pxe: cannot read the client's record");
                (None, None)
            }
        }
    }

    /// The client's reservation when it can have it now: usable in this pool and not
    /// leased to another MAC (then it gets a dynamic address, and the admin hears why).
    async fn reservation(
        &self,
        leases: &dyn LeaseStore,
        pool: &Pool,
        mac: &str,
        reserved: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let ip = reserved?;
        if let Some(why) = pool.unusable(ip, self.server_ip) {
            tracing::warn!(client = %mac, %ip, why, "pxe: the client's reserved address cannot be given; it gets a dynamic one (osstream client set MAC --ip)");
            return None;
        }
        let now = now_ms();
        match leases.leases(ip, ip).await {
            Ok(current) => {
                if let Some(other) = current
                    .iter()
                    .find(|l| l.mac != mac && l.expires_at != i64::MAX && l.expires_at > now)
                {
                    tracing::warn!(client = %mac, %ip, holder = %other.mac, "pxe: the client's reserved address is leased to another client; it gets a dynamic one until that lease ends");
                    return None;
                }
                Some(ip)
            }
            Err(err) => {
                tracing::warn!(client = %mac, %err, "pxe: cannot read leases");
                None
            }
        }
    }

    /// Full DHCP: addresses from the pools, leases in the catalog.
    async fn dhcp(&mut self, request: &Message, client: &Client, kind: u8) -> Option<Message> {
        let leases = self.leases.clone()?;
        let Some(pool) = self.pool_for(request).cloned() else {
            tracing::info!(client = %client.mac, relay = %request.giaddr, "pxe: no pool for this relay's subnet");
            return None;
        };
        let mac = client.mac.as_str();
        match kind {
            kind::DISCOVER => {
                let (reserved, hostname) = self.known(mac).await;
                let reserved = self.reservation(&*leases, &pool, mac, reserved).await;
                let requested = request.ip_option(opt::REQUESTED_IP);
                let ip = self
                    .allocate(&*leases, &pool, mac, reserved, requested)
                    .await?;
                let mut offer = decide::reply(request, kind::OFFER, self.server_ip);
                decide::add_address(&mut offer, ip, &pool, hostname.as_deref());
                self.add_boot_if_pxe(&mut offer, request, client);
                tracing::info!(client = %mac, ip = %ip, "pxe: offer");
                Some(offer)
            }
            kind::REQUEST => {
                if !decide::addressed_to(request, self.server_ip) {
                    // It took another server's offer. Ours expires in a minute; releasing
                    // it here could end the lease the other server (on the same catalog)
                    // just gave.
                    return None;
                }
                let (reserved, hostname) = self.known(mac).await;
                let reserved = self.reservation(&*leases, &pool, mac, reserved).await;
                let asked = decide::requested_address(request)?;
                let now = now_ms();
                let current = match leases.leases(asked, asked).await {
                    Ok(current) => current,
                    Err(err) => {
                        // The client retries; a NAK would take a running machine's address.
                        tracing::warn!(client = %mac, %err, "pxe: cannot read leases; no answer");
                        return None;
                    }
                };
                let ours = pool.choose(mac, reserved, Some(asked), &current, now) == Some(asked);
                let bound = if ours {
                    match leases
                        .bind_lease(asked, mac, now + pool.lease.as_millis() as i64)
                        .await
                    {
                        Ok(()) => true,
                        Err(err) if err.kind() == ErrorKind::Conflict => false,
                        Err(err) => {
                            tracing::warn!(client = %mac, %err, "pxe: cannot record the lease; no answer");
                            return None;
                        }
                    }
                } else {
                    false
                };
                if !bound {
                    if !pool.in_subnet(asked) && request.ip_option(opt::SERVER_ID).is_none() {
                        // Not our subnet and not asked of us: another server's business.
                        return None;
                    }
                    tracing::info!(client = %mac, ip = %asked, "pxe: NAK (that address is not this client's)");
                    let mut nak = decide::reply(request, kind::NAK, self.server_ip);
                    if !request.giaddr.is_unspecified() {
                        // Through a relay, a NAK is broadcast (RFC 2131 4.3.2).
                        nak.flags |= 0x8000;
                    }
                    return Some(nak);
                }
                let mut ack = decide::reply(request, kind::ACK, self.server_ip);
                ack.ciaddr = request.ciaddr;
                decide::add_address(&mut ack, asked, &pool, hostname.as_deref());
                self.add_boot_if_pxe(&mut ack, request, client);
                self.seen.record(mac, asked.into());
                if let Some(directory) = &self.directory
                    && let Err(err) = directory.client_seen(mac).await
                {
                    tracing::debug!(client = %mac, %err, "pxe: cannot record the client as seen");
                }
                tracing::info!(client = %mac, ip = %asked, pxe = client.pxe, "pxe: ack");
                Some(ack)
            }
            kind::RELEASE => {
                if !request.ciaddr.is_unspecified() {
                    let _ = leases.release_lease(request.ciaddr, mac).await;
                    tracing::info!(client = %mac, ip = %request.ciaddr, "pxe: released");
                }
                None
            }
            kind::DECLINE => {
                // Anyone can send a DECLINE with any MAC, so it blocks nothing; the
                // admin hears of it (an address in use outside DHCP's knowledge).
                if let Some(ip) = request.ip_option(opt::REQUESTED_IP) {
                    tracing::warn!(client = %mac, ip = %ip, "pxe: a client declined an address: is it used on the LAN outside DHCP?");
                }
                None
            }
            kind::INFORM => {
                let mut ack = decide::reply(request, kind::ACK, self.server_ip);
                ack.ciaddr = request.ciaddr;
                self.add_boot_if_pxe(&mut ack, request, client);
                Some(ack)
            }
            _ => None,
        }
    }

    fn add_boot_if_pxe(&self, reply: &mut Message, request: &Message, client: &Client) {
        if (client.pxe || client.ipxe)
            && let Some(file) = self.boot_file(client)
        {
            decide::add_boot(reply, request, client, self.server_ip, &file, false);
        }
    }

    /// Picks and holds an address for an offer; retries when another server took the
    /// one picked a moment earlier.
    async fn allocate(
        &self,
        leases: &dyn LeaseStore,
        pool: &Pool,
        mac: &str,
        reserved: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        for _ in 0..3 {
            let now = now_ms();
            let (first, last) = match reserved {
                Some(ip) => (ip, ip),
                None => (pool.start, pool.end),
            };
            let current = match leases.leases(first, last).await {
                Ok(current) => current,
                Err(err) => {
                    tracing::warn!(client = %mac, %err, "pxe: cannot read leases");
                    return None;
                }
            };
            let Some(ip) = pool.choose(mac, reserved, requested, &current, now) else {
                tracing::warn!(client = %mac, "pxe: the pool has no free address");
                return None;
            };
            // Its own lease runs longer than an offer's hold: keep it as it is.
            if current
                .iter()
                .any(|l| l.ip == ip && l.mac == mac && l.expires_at > now + OFFER_HOLD_MS)
            {
                return Some(ip);
            }
            match leases.bind_lease(ip, mac, now + OFFER_HOLD_MS).await {
                Ok(()) => return Some(ip),
                Err(err) if err.kind() == ErrorKind::Conflict && reserved.is_none() => continue,
                Err(err) => {
                    tracing::warn!(client = %mac, ip = %ip, %err, "pxe: cannot hold the address");
                    return None;
                }
            }
        }
        None
    }
}
