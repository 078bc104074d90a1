//! What to answer, sans IO: who a client is (PXE ROM or iPXE, which firmware), which
//! address a pool gives it, and the replies themselves.

use std::net::Ipv4Addr;
use std::time::Duration;

use osstream_core::Lease;

use crate::message::{BOOTREPLY, Message, kind, opt};

/// What a request says about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The MAC, normalised.
    pub mac: String,
    /// A network-boot client (vendor class `PXEClient` or `HTTPClient`).
    pub pxe: bool,
    /// iPXE (user class `iPXE`, or its option 175).
    pub ipxe: bool,
    /// The client system architecture (option 93, else the vendor class's `Arch:`).
    pub arch: Option<u16>,
}

/// Reads who the client of `request` is; `None` without an Ethernet MAC.
pub fn classify(request: &Message) -> Option<Client> {
    let mac = request.mac()?;
    let vendor = request.option(opt::VENDOR_CLASS).unwrap_or_default();
    let pxe = vendor.starts_with(b"PXEClient") || vendor.starts_with(b"HTTPClient");
    let ipxe = request
        .option(opt::USER_CLASS)
        .is_some_and(|v| v.windows(4).any(|w| w == b"iPXE"))
        || request.option(opt::IPXE).is_some();
    let arch = request
        .option(opt::ARCH)
        .filter(|v| v.len() >= 2)
        .map(|v| u16::from_be_bytes([v[0], v[1]]))
        .or_else(|| arch_from_vendor_class(vendor));
    Some(Client {
        mac,
        pxe,
        ipxe,
        arch,
    })
}

/// `PXEClient:Arch:00007:UNDI:003016` -> 7.
fn arch_from_vendor_class(vendor: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(vendor).ok()?;
    let rest = text.split("Arch:").nth(1)?;
    rest.get(..5)?.parse().ok()
}

/// The boot files handed out, by firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// TFTP name for BIOS PXE ROMs (arch 0).
    pub bios: String,
    /// TFTP name for x86-64 UEFI (arch 7 and 9).
    pub efi: String,
    /// TFTP name for ARM64 UEFI (arch 11).
    pub arm64: String,
    /// The iPXE script URL, for clients that are iPXE already.
    pub script_url: String,
}

/// The boot file for `client`, or why it gets none.
pub fn boot_file(client: &Client, files: &BootFiles) -> Result<String, String> {
    if client.ipxe {
        return Ok(files.script_url.clone());
    }
    match client.arch.unwrap_or(0) {
        0 => Ok(files.bios.clone()),
        7 | 9 => Ok(files.efi.clone()),
        11 => Ok(files.arm64.clone()),
        6 => Err("32-bit UEFI (arch 6) has no iPXE build configured".to_owned()),
        16 => Err("UEFI HTTP boot (arch 16) is not served yet; use PXE (TFTP)".to_owned()),
        other => Err(format!("client architecture {other} has no boot file")),
    }
}

/// A pool of addresses for one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
    /// The subnet's mask.
    pub netmask: Ipv4Addr,
    /// The default gateway, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time.
    pub lease: Duration,
}

impl Pool {
    /// Whether `ip` is in this pool's subnet.
    pub fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask);
        u32::from(ip) & mask == u32::from(self.start) & mask
    }

    /// Why `ip` cannot be a client's address in this pool (`server` is this server's
    /// address), or `None` when it can.
    pub fn unusable(&self, ip: Ipv4Addr, server: Ipv4Addr) -> Option<&'static str> {
        let mask = u32::from(self.netmask);
        let n = u32::from(ip);
        if !self.in_subnet(ip) {
            Some("it is outside the pool's subnet")
        } else if n & !mask == 0 {
            Some("it is the subnet's network address")
        } else if n & !mask == !mask {
            Some("it is the subnet's broadcast address")
        } else if ip == server {
            Some("it is this server's own address")
        } else if Some(ip) == self.router {
            Some("it is the router's address")
        } else {
            None
        }
    }

    /// Whether `ip` is in the range handed out.
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    /// The address for `mac`: its reservation (when in this subnet), else its own lease,
    /// else the address it asks for if free, else the lowest free one. `None`: the pool
    /// is full, or the client's reservation is in another subnet. `leases` holds the
    /// pool's leases and reservations (as leases that never expire).
    pub fn choose(
        &self,
        mac: &str,
        reserved: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        leases: &[Lease],
        now_ms: i64,
    ) -> Option<Ipv4Addr> {
        if let Some(reserved) = reserved {
            return self.in_subnet(reserved).then_some(reserved);
        }
        let taken: std::collections::HashMap<Ipv4Addr, &Lease> =
            leases.iter().map(|l| (l.ip, l)).collect();
        let free = |ip: Ipv4Addr| {
            self.in_range(ip)
                && taken
                    .get(&ip)
                    .is_none_or(|l| l.mac == mac || l.expires_at < now_ms)
        };
        if let Some(own) = leases.iter().find(|l| l.mac == mac && free(l.ip)) {
            return Some(own.ip);
        }
        if let Some(requested) = requested.filter(|ip| free(*ip)) {
            return Some(requested);
        }
        (u32::from(self.start)..=u32::from(self.end))
            .map(Ipv4Addr::from)
            .find(|ip| free(*ip))
    }
}

/// iPXE's encapsulated option 175.176 = 1 ("no ProxyDHCP wait"): with it in the DHCP
/// offer, iPXE does not wait 2-3 s for ProxyDHCP offers that will not come.
const IPXE_NO_PXEDHCP: [u8; 4] = [176, 1, 1, 255];
/// PXE vendor option 43: discovery control 8, "boot the file in this reply".
const PXE_BOOT_FILE_IN_REPLY: [u8; 4] = [6, 1, 8, 255];

/// A reply of `kind` to `request` from `server`, headers copied as RFC 2131 says.
pub fn reply(request: &Message, kind: u8, server: Ipv4Addr) -> Message {
    let mut reply = Message {
        op: BOOTREPLY,
        htype: request.htype,
        hlen: request.hlen,
        hops: 0,
        xid: request.xid,
        secs: 0,
        flags: request.flags,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: request.giaddr,
        chaddr: request.chaddr,
        sname: Vec::new(),
        file: Vec::new(),
        options: Vec::new(),
    };
    reply.set_option(opt::MESSAGE_TYPE, vec![kind]);
    reply.set_option(opt::SERVER_ID, server.octets().to_vec());
    reply
}

/// Adds what a network-boot client needs: next server, boot file, `PXEClient`, its
/// machine id echoed (RFC 4578), and for iPXE the option that skips the ProxyDHCP wait.
pub fn add_boot(
    reply: &mut Message,
    request: &Message,
    client: &Client,
    server: Ipv4Addr,
    file: &str,
    proxy: bool,
) {
    reply.siaddr = server;
    reply.file = file.as_bytes().to_vec();
    // Option 67 as well: the `file` field holds 127 bytes, a script URL may be longer.
    reply.set_option(opt::BOOTFILE, file.as_bytes().to_vec());
    if client.pxe {
        reply.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
    }
    if let Some(machine) = request.option(opt::MACHINE_ID) {
        reply.set_option(opt::MACHINE_ID, machine.to_vec());
    }
    if proxy {
        reply.set_option(opt::VENDOR, PXE_BOOT_FILE_IN_REPLY.to_vec());
    } else if client.ipxe {
        reply.set_option(opt::IPXE, IPXE_NO_PXEDHCP.to_vec());
    }
}

/// Adds an address from `pool`: `yiaddr`, lease time, mask, router, DNS, host name.
pub fn add_address(reply: &mut Message, ip: Ipv4Addr, pool: &Pool, hostname: Option<&str>) {
    reply.yiaddr = ip;
    let lease = u32::try_from(pool.lease.as_secs()).unwrap_or(u32::MAX);
    reply.set_option(opt::LEASE_TIME, lease.to_be_bytes().to_vec());
    reply.set_option(opt::SUBNET_MASK, pool.netmask.octets().to_vec());
    if let Some(router) = pool.router {
        reply.set_option(opt::ROUTER, router.octets().to_vec());
    }
    if !pool.dns.is_empty() {
        let dns: Vec<u8> = pool.dns.iter().flat_map(|ip| ip.octets()).collect();
        reply.set_option(opt::DNS, dns);
    }
    if let Some(hostname) = hostname {
        reply.set_option(opt::HOSTNAME, hostname.as_bytes().to_vec());
    }
}

/// Whether `request` is a REQUEST this server may answer: addressed to it, or to no
/// server (INIT-REBOOT, RENEW).
pub fn addressed_to(request: &Message, server: Ipv4Addr) -> bool {
    request
        .ip_option(opt::SERVER_ID)
        .is_none_or(|id| id == server)
}

/// The address a REQUEST asks for: option 50, else `ciaddr` (RENEW, REBIND).
pub fn requested_address(request: &Message) -> Option<Ipv4Addr> {
    request
        .ip_option(opt::REQUESTED_IP)
        .or_else(|| (!request.ciaddr.is_unspecified()).then_some(request.ciaddr))
}

/// The message types this crate names in logs.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::DISCOVER => "DISCOVER",
        kind::OFFER => "OFFER",
        kind::REQUEST => "REQUEST",
        kind::DECLINE => "DECLINE",
        kind::ACK => "ACK",
        kind::NAK => "NAK",
        kind::RELEASE => "RELEASE",
        kind::INFORM => "INFORM",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::tests::discover;

    fn files() -> BootFiles {
        BootFiles {
            bios: "undionly.kpxe".into(),
            efi: "ipxe.efi".into(),
            arm64: "ipxe-arm64.efi".into(),
            script_url: "http://10.0.0.1:8080/boot.ipxe".into(),
        }
    }

    #[test]
    fn firmware_picks_the_boot_file() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let pxe = |arch: &[u8], vendor: &[u8], user: Option<&[u8]>| {
            let mut options: Vec<(u8, &[u8])> = vec![(opt::VENDOR_CLASS, vendor)];
            if !arch.is_empty() {
                options.push((opt::ARCH, arch));
            }
            if let Some(user) = user {
                options.push((opt::USER_CLASS, user));
            }
            classify(&discover(mac, &options)).unwrap()
        };
        let bios = pxe(&[0, 0], b"PXEClient:Arch:00000:UNDI:002001", None);
        assert!(bios.pxe && !bios.ipxe);
        assert_eq!(boot_file(&bios, &files()).unwrap(), "undionly.kpxe");
        let efi = pxe(&[0, 7], b"PXEClient:Arch:00007:UNDI:003016", None);
        assert_eq!(boot_file(&efi, &files()).unwrap(), "ipxe.efi");
        // No option 93: the vendor class says it.
        let efi = pxe(&[], b"PXEClient:Arch:00009:UNDI:003016", None);
        assert_eq!(efi.arch, Some(9));
        assert_eq!(boot_file(&efi, &files()).unwrap(), "ipxe.efi");
        let arm = pxe(&[0, 11], b"PXEClient:Arch:00011", None);
        assert_eq!(boot_file(&arm, &files()).unwrap(), "ipxe-arm64.efi");
        assert!(boot_file(&pxe(&[0, 16], b"HTTPClient:Arch:00016", None), &files()).is_err());
        let ipxe = pxe(&[0, 0], b"PXEClient:Arch:00000", Some(b"iPXE"));
        assert!(ipxe.ipxe);
        assert_eq!(boot_file(&ipxe, &files()).unwrap(), files().script_url);
        let plain = classify(&discover(mac, &[])).unwrap();
        assert!(!plain.pxe);
    }

    fn pool() -> Pool {
        Pool {
            start: Ipv4Addr::new(10, 0, 0, 100),
            end: Ipv4Addr::new(10, 0, 0, 102),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
            lease: Duration::from_secs(3600),
        }
    }

    fn lease(ip: u8, mac: &str, expires_at: i64) -> Lease {
        Lease {
            ip: Ipv4Addr::new(10, 0, 0, ip),
            mac: mac.into(),
            expires_at,
        }
    }

    #[test]
    fn pools_give_each_address_once() {
        let p = pool();
        let ip = |n| Some(Ipv4Addr::new(10, 0, 0, n));
        assert_eq!(p.choose("a", None, None, &[], 10), ip(100));
        let leases = [lease(100, "a", 100), lease(101, "b", 5)];
        // Its own lease; an expired one of another MAC is free again.
        assert_eq!(p.choose("a", None, None, &leases, 10), ip(100));
        assert_eq!(p.choose("c", None, None, &leases, 10), ip(101));
        // What it asks for, when free; never someone else's.
        assert_eq!(p.choose("c", None, ip(102), &leases, 10), ip(102));
        assert_eq!(p.choose("c", None, ip(100), &leases, 10), ip(101));
        // Full.
        let full = [
            lease(100, "a", 100),
            lease(101, "b", 100),
            lease(102, "x", 100),
        ];
        assert_eq!(p.choose("c", None, None, &full, 10), None);
        // A reservation wins, inside the subnet even outside the range; not elsewhere.
        assert_eq!(p.choose("c", ip(7), None, &full, 10), ip(7));
        assert_eq!(
            p.choose("c", Some(Ipv4Addr::new(10, 1, 0, 7)), None, &[], 10),
            None
        );
    }

    #[test]
    fn reservations_that_cannot_be_an_address_are_named() {
        let p = pool();
        let server = Ipv4Addr::new(10, 0, 0, 2);
        let ip = |n| Ipv4Addr::new(10, 0, 0, n);
        assert_eq!(p.unusable(ip(42), server), None);
        assert!(p.unusable(ip(0), server).unwrap().contains("network"));
        assert!(p.unusable(ip(255), server).unwrap().contains("broadcast"));
        assert!(p.unusable(ip(2), server).unwrap().contains("server"));
        assert!(p.unusable(ip(1), server).unwrap().contains("router"));
        assert!(
            p.unusable(Ipv4Addr::new(10, 9, 0, 1), server)
                .unwrap()
                .contains("subnet")
        );
    }

    #[test]
    fn replies_carry_what_pxe_and_ipxe_need() {
        let request = discover(
            [0x52, 0x54, 0, 0, 0, 1],
            &[
                (opt::VENDOR_CLASS, b"PXEClient:Arch:00000"),
                (opt::USER_CLASS, b"iPXE"),
                (
                    opt::MACHINE_ID,
                    &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                ),
            ],
        );
        let client = classify(&request).unwrap();
        let server = Ipv4Addr::new(10, 0, 0, 1);
        let mut offer = reply(&request, kind::OFFER, server);
        add_address(
            &mut offer,
            Ipv4Addr::new(10, 0, 0, 100),
            &pool(),
            Some("pc1"),
        );
        add_boot(
            &mut offer,
            &request,
            &client,
            server,
            "http://x/boot.ipxe",
            false,
        );
        let wire = Message::parse(&offer.encode()).unwrap();
        assert_eq!(wire.op, BOOTREPLY);
        assert_eq!(wire.xid, request.xid);
        assert_eq!(wire.yiaddr, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(wire.siaddr, server);
        assert_eq!(wire.file, b"http://x/boot.ipxe");
        assert_eq!(wire.option(opt::IPXE), Some(&[176, 1, 1, 255][..]));
        assert_eq!(
            wire.option(opt::MACHINE_ID),
            request.option(opt::MACHINE_ID)
        );
        assert_eq!(wire.option(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
        assert_eq!(wire.option(opt::HOSTNAME), Some(&b"pc1"[..]));
        assert_eq!(wire.ip_option(opt::SERVER_ID), Some(server));
        let mut proxy = reply(&request, kind::OFFER, server);
        add_boot(&mut proxy, &request, &client, server, "undionly.kpxe", true);
        assert_eq!(proxy.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(proxy.option(opt::VENDOR), Some(&[6, 1, 8, 255][..]));
        assert_eq!(proxy.option(opt::IPXE), None);
    }
}
