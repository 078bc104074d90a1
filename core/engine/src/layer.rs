//! [`Layer`]: how one source is wrapped in another (cache, copy-on-write, retry, metrics).

use std::fmt::Debug;

use crate::source::DynSource;

/// Wraps a source in another that adds one behaviour.
///
/// # Contract
/// The layer owns any state shared by its wrappers (a cache tier, counters, an in-flight
/// map); `layer` only builds a cheap projection over `inner` and that state. It never does
/// I/O and never fails.
pub trait Layer: Send + Sync + Debug {
    /// A short name for logs (`cache:ram`, `cow`, ...).
    fn name(&self) -> &str;

    /// Returns `inner` wrapped by this layer.
    fn layer(&self, inner: DynSource) -> DynSource;
}
