//! The osstream client agent (`osstream-agent`): runs on the diskless client, in its
//! initramfs, and gives the local kernel the session's disk.
//!
//! - Connects to the session's export on the server over NBD ([`remote`]) and keeps it:
//!   a broken connection (server restart, network blip) is made again and the requests
//!   in flight are sent again, so the kernel sees a slow request, never a failed one.
//! - Serves the disk to the local kernel over NBD on a Unix socket
//!   (`nbd-client -unix SOCKET /dev/nbd0`), with the same NBD server the osstream server
//!   uses.
//! - Caches the base image's blocks on a local disk ([`osstream_cache_disk::DiskTier`],
//!   validated by image and generation, checksummed), pins the boot set the server's
//!   boot profile names and fetches it first, evicts least recently used blocks down to
//!   a low watermark, and can fill the rest of the image in the background.
//! - Keeps the client's writes on the client (RAM overflowing to the local disk, or the
//!   disk) when the vdisk discards them at the session's end anyway.
//!
//! See [`agent`] for the stack and `osstream-agent --help` for the command line.

pub mod agent;
pub mod fetch;
pub mod remote;
pub mod stats;

pub use agent::{Agent, AgentConfig, CacheSettings, OverlayPlace};
pub use remote::{RemoteConfig, RemoteSource, RemoteTls, ServerBook};
pub use stats::AgentStats;
