//! Test support for osstream: one conformance suite that every backend, layer, tier and
//! plugin adapter runs, and small sources to build stacks from.
//!
//! - [`MemSource`]: an in-memory image (read-only or writable).
//! - [`InstrumentedSource`]: counts the reads that reach it (to prove single-flight and
//!   caching), delays them (a slow backend or link) and fails chosen ones (faults).
//! - [`MemBackend`]: a backend of in-memory images that counts its calls.
//! - [`MemLedger`]: the catalog's fenced commits, in memory.
//! - [`MemProfiles`]: boot profiles, in memory.
//! - [`conformance`]: the suites.

mod backend;
pub mod conformance;
mod ledger;
mod profiles;
mod sources;

pub use backend::MemBackend;
pub use ledger::MemLedger;
pub use profiles::MemProfiles;
pub use sources::{InstrumentedBuilder, InstrumentedSource, MemSource, pattern};
