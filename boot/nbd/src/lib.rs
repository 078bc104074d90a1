//! The osstream NBD server.
//!
//! Fixed newstyle negotiation with `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY` and `LIST`/`SET_META_CONTEXT` (`base:allocation`); commands `READ`,
//! `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `CACHE`, `BLOCK_STATUS` and `DISC`, with `FUA`
//! where the export's capability allows it. Many requests run at once on one connection
//! and replies go out as they complete.
//!
//! The wire format lives in [`proto`] (pure, fuzzed), negotiation and request handling in
//! socket-free modules, and `server.rs` alone owns sockets.
//!
//! Bad input never takes the server down: a malformed option gets an error reply, a bad
//! request gets the right NBD error while the connection keeps working, and frames that
//! cannot be resynchronised (bad magic, options over 64 KiB, a stalled handshake) close
//! that one connection with a log line.

pub mod client;
mod config;
mod negotiation;
pub mod proto;
mod refusals;
mod server;
pub mod tls;
mod transmission;

pub use config::{NbdConfig, is_local_listener};
pub use server::NbdServer;
pub use tls::TlsMode;

/// The protocol name used in configuration (`[nbd]`) and logs.
pub const KIND: &str = "nbd";

/// Adds the NBD protocol (`[nbd]`) to `registry`.
pub fn register(registry: &mut osstream_core::Registry) {
    registry.register_protocol::<NbdConfig>();
}
