//! The osstream engine.
//!
//! Every byte a client reads takes one path: an [`ImageBackend`] opens an image as a
//! [`BlockSource`]; [`Layer`]s wrap it (the [`CacheLayer`] over a [`RamTier`] by default);
//! a [`BootProtocol`] (NBD, HTTP, TFTP) turns client requests into
//! [`BlockSource::read_at`] calls on the result. Backends are chosen by a configuration
//! `kind` through the explicit [`Registry`]. There is one error type, [`Error`].
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use osstream_core::{BlockSource, CacheLayer, Layer, RamTier, ReadOpts};
//! # use osstream_core::*;
//! # #[derive(Debug)] struct Zeros(SourceInfo);
//! # #[async_trait::async_trait] impl BlockSource for Zeros {
//! #   fn info(&self) -> &SourceInfo { &self.0 }
//! #   fn capability(&self) -> Capability { Capability::read_only() }
//! #   fn geometry(&self) -> Geometry { Geometry::default() }
//! #   async fn read_at(&self, o: u64, l: usize, _: ReadOpts) -> Result<Chunks> {
//! #     check_range(&self.0, "read_at", o, l as u64)?; Ok(Chunks::from(vec![0; l])) }
//! #   async fn write_at(&self, _: u64, _: Bytes, _: WriteOpts) -> Result<()> { Err(read_only_error(&self.0, "write_at")) }
//! #   async fn flush(&self) -> Result<()> { Ok(()) }
//! #   async fn trim(&self, _: u64, _: u64) -> Result<()> { Err(read_only_error(&self.0, "trim")) }
//! #   async fn write_zeroes(&self, _: u64, _: u64, _: ZeroOpts) -> Result<()> { Err(read_only_error(&self.0, "write_zeroes")) }
//! #   async fn extents(&self, _: u64, l: u64) -> Result<Vec<Extent>> { Ok(vec![Extent { length: l, kind: ExtentKind::Data }]) }
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let image = Arc::new(Zeros(SourceInfo {
//!     name: "demo".into(),
//!     identity: "mem:demo".into(),
//!     size: 1 << 20,
//!     generation: "1".into(),
//! }));
//! let cache = CacheLayer::new(Arc::new(RamTier::new(64 << 20)), 64 * 1024);
//! let source = cache.layer(image);
//! let block = source.read_at(4096, 512, ReadOpts::default()).await.unwrap();
//! assert_eq!(block.len(), 512);
//! source.read_at(4096, 512, ReadOpts::default()).await.unwrap();
//! assert_eq!(cache.stats().hits, 1);
//! # });
//! ```

mod agent_info;
mod attach;
mod backend;
mod blocking;
mod boot;
mod budget;
pub mod cache;
mod chunks;
pub mod cow;
mod cpus;
mod error;
mod exports;
mod fence;
mod hedge;
mod layer;
mod ledger;
mod limits;
pub mod live;
mod lossy_stderr;
pub mod metrics;
mod profile;
mod protocol;
mod registry;
mod sessions;
mod source;
pub mod sparse;
pub mod units;

pub use agent_info::{AGENT_INFO_FORMAT, AgentInfo, AgentWrites, ServerEntry, ServerList};
pub use attach::{
    AttachContext, AttachRequest, Attachment, ExportName, Intent, IoCounters, IoCounts,
};
pub use backend::{
    DynBackend, ImageBackend, ImageStat, ImportOptions, OpenMode, ProgressFn, file_identity,
    refuse_read_only, validate_image_name,
};
pub use blocking::run_blocking;
pub use boot::{
    BootChoice, BootClient, BootDirectory, BootKind, BootSession, Lease, LeaseStore, PlacedServer,
    Placement, SeenAddresses, UnknownPolicy, normalize_mac,
};
pub use budget::{LogBudget, shorten};
pub use cache::{
    BlockKey, CacheLayer, CacheStats, CacheTier, DynTier, EvictionPolicy, RamTier, RamTierConfig,
    TierStats, stable_hash,
};
pub use chunks::Chunks;
pub use cow::{CowLayer, DiskOverlay, OverlayStore, RamOverlay, Slot, SlotKind, SpillOverlay};
pub use cpus::CpuRuntimes;
pub use error::{Error, ErrorKind, Result};
pub use exports::{ExportEntry, Exports, SessionView, loggable_export_name, redact_tokens};
pub use hedge::{HedgeConfig, HedgeLayer, HedgeStats};
pub use layer::{Layer, LayerReport};
pub use ledger::ImageLedger;
pub use limits::{ClientLimit, GroupLimits, Limits, LimitsConfig, Rates};
pub use lossy_stderr::LossyStderr;
pub use profile::{
    BootProfile, PROFILE_FORMAT, ProfileBlock, ProfileStore, RecordedBoot, merged as merged_profile,
};
pub use protocol::{BootProtocol, ServeContext};
pub use registry::{
    BackendContext, BackendFactory, BackendKind, ProtocolKind, Registry, TierKind, check_listen,
    config_error, parse_table, value_origin,
};
pub use sessions::{
    Grant, ImageState, LockToken, OverlayKind, OverlaySettings, OverlayUsage, SessionDirectory,
    SessionTarget,
};
pub use source::{
    BlockSource, BlockSourceExt, Capability, DynSource, Extent, ExtentKind, Geometry, ReadOpts,
    SourceInfo, WriteOpts, ZeroOpts, all_data, check_range, read_only_error,
};
pub use units::{ByteSize, Seconds};

/// Re-exported so that implementations need no direct dependency to name them.
pub use async_trait::async_trait;
pub use bytes::{Bytes, BytesMut};
pub use tokio_util::sync::CancellationToken;
