//! [`Layer`]: how one source is wrapped in another (cache, copy-on-write, retry, metrics).

use std::fmt::Debug;

use crate::attach::AttachContext;
use crate::source::DynSource;

/// Wraps a source in another that adds one behaviour.
///
/// # Contract
/// The layer owns any state shared by its wrappers (a cache tier, counters, an in-flight
/// map); `layer` only builds a cheap projection over `inner` and that state. It never does
/// I/O and never fails.
///
/// A layer that keeps state per client (a recorder of first-touch order, a prefetcher)
/// hears of each attachment through `attached`, with the source it built for it, and of
/// its end through `detached`, with the same context. Both are called once per
/// attachment that uses the export (never for probes), must not block (spawn any I/O)
/// and default to nothing.
pub trait Layer: Send + Sync + Debug {
    /// A short name for logs (`cache:ram`, `cow`, ...).
    fn name(&self) -> &str;

    /// Returns `inner` wrapped by this layer.
    fn layer(&self, inner: DynSource) -> DynSource;

    /// A client attached: `source` is what this layer built for it.
    fn attached(&self, context: &AttachContext, source: &DynSource) {
        let _ = (context, source);
    }

    /// The attachment `context` ended.
    fn detached(&self, context: &AttachContext) {
        let _ = context;
    }

    /// Logs what the layer did since start (the server calls it when it stops).
    fn log_summary(&self) {}

    /// The image at `identity` and `generation` is gone for good (a replaced image
    /// deleted after its last session): drop anything kept of it. Must not block.
    fn forget(&self, identity: &str, generation: &str) {
        let _ = (identity, generation);
    }

    /// The client of `session` says its boot is complete (the agent's `booted`): a
    /// layer recording the boot ends the recording now. Returns whether it did. Must
    /// not block.
    fn boot_complete(&self, session: &str) -> bool {
        let _ = session;
        false
    }

    /// The layer's counters since start, for `osstream cache stats`; `None` for a layer
    /// that keeps none.
    fn report(&self) -> Option<LayerReport> {
        None
    }
}

/// What one layer counted: its name (`cache:ram`, `profile`) and named counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    /// The layer, with its tier for a cache: `cache:ram`, `cache:disk`, `profile`.
    pub layer: String,
    /// Counter name to value, in the order the layer lists them.
    pub counters: Vec<(String, u64)>,
}

impl LayerReport {
    /// A report of `layer` with `counters`.
    pub fn new(layer: impl Into<String>, counters: &[(&str, u64)]) -> Self {
        LayerReport {
            layer: layer.into(),
            counters: counters
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
        }
    }

    /// The value of counter `name`, if the layer keeps it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}
