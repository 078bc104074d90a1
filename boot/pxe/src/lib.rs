//! DHCP for network boot: ProxyDHCP beside a LAN's own DHCP server, or the full DHCP
//! server of an isolated boot LAN.
//!
//! A PXE ROM gets a TFTP bootloader for its firmware (option 93, else the vendor class:
//! `undionly.kpxe` for BIOS, `snponly.efi` for x86-64 UEFI); iPXE (user class `iPXE`) gets
//! the HTTP script URL, with option 175.176 = 1 so it does not wait for ProxyDHCP;
//! option 97 is echoed. In `proxy` mode only network-boot clients are answered, never
//! with an address, and the PXE boot server answers on UDP 4011. In `dhcp` mode every
//! client gets an address from the pool of its subnet (the server's own, or a relay's by
//! `giaddr`), leases kept in the catalog ([`osstream_core::LeaseStore`]) and
//! reservations from client records. Unknown machines get the boot file too: the iPXE
//! script applies the catalog's unknown-client policy, so the machine can say why.
//!
//! The message codec ([`message`]) and the decisions ([`decide`]) are sans IO.

mod config;
pub mod decide;
pub mod message;
mod server;

pub use config::{PoolConfig, PxeConfig, PxeMode};
pub use server::PxeServer;

/// The registry kind and configuration section: `[pxe]`.
pub const KIND: &str = "pxe";

/// Adds the `[pxe]` protocol to `registry`.
pub fn register(registry: &mut osstream_core::Registry) {
    registry.register_protocol::<PxeConfig>();
}
