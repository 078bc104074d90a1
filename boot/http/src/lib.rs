//! The osstream HTTP boot server: what iPXE fetches.
//!
//! - `GET /boot.ipxe`: every iPXE client starts here and is chained to its own script.
//! - `GET /ipxe/{mac}`: the client's script from the catalog: the unknown-client policy's
//!   answer, its only vdisk's boot, or a menu of its vdisks (default preselected, with a
//!   timeout, then the local disk and an iPXE shell).
//! - `GET /ipxe/{mac}/{vdisk}`: opens a new session of that client on that vdisk (it
//!   replaces the client's earlier one) and returns its boot: kernel and initrd from the
//!   session's own path with an NBD root (`linux-nbd`), or HTTP SAN (`sanboot`).
//! - `GET|HEAD /boot/{token}/kernel|initrd`: the session's boot files, with `Range`.
//! - `GET|HEAD /san/{token}`: the session's disk over HTTP SAN (`HEAD` gives its size,
//!   `Range` GETs read it; no writes).
//! - `GET /agent/{token}`: the session's disk as the client agent needs to know it
//!   (`AgentInfo` JSON: size, base image and generation, where writes go, the boot set).
//! - `GET /agent/{token}/booted`: the client says its boot is complete; the boot
//!   profile's recording of the session ends now (`osstream-agent booted`).
//!
//! Requests are parsed sans IO ([`request`]); scripts are built by pure functions
//! ([`script`]); [`HttpServer`] does the IO. Tokens in paths never reach logs.

mod config;
pub mod request;
pub mod script;
mod server;

pub use config::HttpConfig;
pub use server::HttpServer;

/// The registry kind and configuration section: `[http]`.
pub const KIND: &str = "http";

/// Adds the `[http]` protocol to `registry`.
pub fn register(registry: &mut osstream_core::Registry) {
    registry.register_protocol::<HttpConfig>();
}
