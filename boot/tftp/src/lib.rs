//! The osstream TFTP server: what a plain PXE ROM fetches its bootloader with.
//!
//! Read-only. RFC 1350 with option negotiation (RFC 2347): `blksize` (2348), `tsize` and
//! `timeout` (2349), `windowsize` (7440); block numbers roll over past 65535, so files of
//! any size transfer; lost packets are retransmitted; every transfer runs on its own
//! socket, many at once. Names are relative to the TFTP root (a leading `/` is allowed
//! and means the root) and never reach outside it: `..`, and symbolic links that lead
//! out, are refused by the kernel ([`osstream_backend_file::FileTree`]). Files are read
//! as [`osstream_core::BlockSource`]s, from the root folder or from a backend's boot files.
//! Malformed packets are dropped with one log line.
//!
//! The packet codec ([`codec`]) and the transfer state machine ([`transfer`]) are sans IO.

pub mod codec;
mod config;
mod server;
pub mod transfer;

pub use config::TftpConfig;
pub use server::TftpServer;

/// The registry kind and configuration section: `[tftp]`.
pub const KIND: &str = "tftp";

/// Adds the `[tftp]` protocol to `registry`.
pub fn register(registry: &mut osstream_core::Registry) {
    registry.register_protocol::<TftpConfig>();
}
