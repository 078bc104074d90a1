//! `[pxe]`: DHCP for network boot.

use std::net::Ipv4Addr;

use osstream_core::{BackendContext, BootProtocol, Error, ErrorKind, ProtocolKind, Result};
use serde::{Deserialize, Serialize};

use crate::decide::Pool;

/// How DHCP is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PxeMode {
    /// Beside the LAN's own DHCP server: answer network-boot clients only, with boot
    /// information and never an address (ProxyDHCP, plus the PXE boot server on 4011).
    #[default]
    Proxy,
    /// The only DHCP server of an isolated boot LAN: addresses from the pools, leases in
    /// the catalog, reservations from client records.
    Dhcp,
}

/// One subnet's addresses: `[pxe.dhcp]` for the server's own subnet, `[[pxe.relay]]`
/// for subnets whose relay agents forward requests here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// First address handed out.
    pub range_start: Option<Ipv4Addr>,
    /// Last address handed out.
    pub range_end: Option<Ipv4Addr>,
    /// The subnet mask. Default: `255.255.255.0`.
    pub netmask: Ipv4Addr,
    /// The default gateway given to clients, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers given to clients.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds. Default: 3600.
    pub lease_secs: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            range_start: None,
            range_end: None,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: Vec::new(),
            lease_secs: 3600,
        }
    }
}

impl PoolConfig {
    /// The pool, checked; `section` names it in errors.
    pub fn pool(&self, section: &str) -> Result<Pool> {
        let config = |why: String| Error::new(ErrorKind::Config, why);
        let (Some(start), Some(end)) = (self.range_start, self.range_end) else {
            return Err(config(format!(
                "{section} needs range_start and range_end (the addresses handed out)"
            )));
        };
        if u32::from(start) > u32::from(end) {
            return Err(config(format!(
                "{section}: range_start {start} is after range_end {end}"
            )));
        }
        let mask = u32::from(self.netmask);
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            return Err(config(format!(
                "{section}: netmask {} is not a subnet mask",
                self.netmask
            )));
        }
        if u32::from(start) & mask != u32::from(end) & mask {
            return Err(config(format!(
                "{section}: {start}..{end} spans more than one subnet of mask {}",
                self.netmask
            )));
        }
        if !(60..=31_536_000).contains(&self.lease_secs) {
            return Err(config(format!(
                "{section}.lease_secs = {} must be between 60 and 31536000 (a year)",
                self.lease_secs
            )));
        }
        if u32::from(end) - u32::from(start) >= 65_536 {
            return Err(config(format!(
                "{section}: {start}..{end} holds more than 65536 addresses; split it"
            )));
        }
        Ok(Pool {
            start,
            end,
            netmask: self.netmask,
            router: self.router,
            dns: self.dns.clone(),
            lease: std::time::Duration::from_secs(self.lease_secs),
        })
    }
}

/// `[pxe]`: DHCP and ProxyDHCP for network boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PxeConfig {
    /// Serve DHCP at all. Default: false.
    pub enabled: bool,
    /// `proxy` (beside an existing DHCP server) or `dhcp` (the boot LAN's only DHCP
    /// server). Default: `proxy`.
    pub mode: PxeMode,
    /// The network interface to serve on (`eth1`); DHCP is answered there only.
    pub interface: Option<String>,
    /// This server's address on that interface: the DHCP server identifier and the TFTP
    /// server clients are sent to. Needed when enabled.
    pub server_ip: Option<Ipv4Addr>,
    /// The iPXE script URL handed to iPXE clients. Default: the HTTP server's
    /// `/boot.ipxe` (`http.public_url`, else its listener, with `server_ip` for a
    /// wildcard address).
    pub script_url: Option<String>,
    /// TFTP boot file for BIOS PXE ROMs. Default: `undionly.kpxe`.
    pub bootfile_bios: String,
    /// TFTP boot file for x86-64 UEFI. Default: `snponly.efi` (iPXE on the firmware's own
    /// network driver; Debian's `ipxe.efi` in `/usr/lib/ipxe` is a link to `/boot`, which
    /// TFTP never follows out of its root).
    pub bootfile_efi: String,
    /// TFTP boot file for ARM64 UEFI. Default: `ipxe-arm64.efi`.
    pub bootfile_arm64: String,
    /// Full DHCP mode: the pool of the server's own subnet.
    pub dhcp: PoolConfig,
    /// Full DHCP mode: one pool per relayed subnet (chosen by the relay's `giaddr`).
    pub relay: Vec<PoolConfig>,
}

impl Default for PxeConfig {
    fn default() -> Self {
        PxeConfig {
            enabled: false,
            mode: PxeMode::Proxy,
            interface: None,
            server_ip: None,
            script_url: None,
            bootfile_bios: "undionly.kpxe".to_owned(),
            bootfile_efi: "snponly.efi".to_owned(),
            bootfile_arm64: "ipxe-arm64.efi".to_owned(),
            dhcp: PoolConfig::default(),
            relay: Vec::new(),
        }
    }
}

impl ProtocolKind for PxeConfig {
    const KIND: &'static str = crate::KIND;

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn check(&self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let config = |why: String| Error::new(ErrorKind::Config, why);
        let Some(server_ip) = self.server_ip else {
            return Err(config(
                "pxe.server_ip is needed: this server's address on the boot LAN (DHCP server id, TFTP server)"
                    .to_owned(),
            ));
        };
        if let Some(url) = &self.script_url
            && !url.starts_with("http://")
        {
            return Err(config(format!(
                "pxe.script_url {url:?} must be an http:// URL (the iPXE clients boot with has no HTTPS)"
            )));
        }
        if self.mode == PxeMode::Dhcp {
            let pool = self.dhcp.pool("pxe.dhcp")?;
            if !pool.in_subnet(server_ip) {
                return Err(config(format!(
                    "pxe.dhcp: the range {}..{} is not in the subnet of pxe.server_ip {server_ip} (mask {})",
                    pool.start, pool.end, pool.netmask
                )));
            }
            if pool.in_range(server_ip) {
                return Err(config(format!(
                    "pxe.dhcp: the range {}..{} holds pxe.server_ip {server_ip}; leave the server's address out",
                    pool.start, pool.end
                )));
            }
            for (i, relay) in self.relay.iter().enumerate() {
                relay.pool(&format!("pxe.relay[{i}]"))?;
            }
        }
        Ok(())
    }

    fn build(self, _ctx: &BackendContext) -> Result<Box<dyn BootProtocol>> {
        Ok(Box::new(crate::PxeServer::new(self)))
    }
}
