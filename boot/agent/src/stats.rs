//! What the agent reports about itself: written as JSON to its stats file every few
//! seconds and at exit, read back by `osstream-agent stats`.

use serde::{Deserialize, Serialize};

/// The agent's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// The vdisk served (empty without the server's agent info).
    pub vdisk: String,
    /// Where writes go: `local` (kept on this client) or `server`.
    pub writes: String,
    /// Size of the disk in bytes.
    pub size: u64,
    /// Unix milliseconds when these counters were taken.
    pub at_ms: u64,
    /// The boot set the server named, and how much of it this client already held.
    pub boot_set: BootSetStats,
    /// The client-disk cache (all zero without one).
    pub cache: CacheStats,
    /// Traffic with the server.
    pub server: ServerStats,
    /// The write overlay on this client.
    pub overlay: OverlayStats,
    /// The background fill of the whole image.
    pub fill: FillStats,
}

/// The boot set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootSetStats {
    /// Blocks of the client cache the boot set covers.
    pub blocks: u64,
    /// Of those, held in the client cache when the agent started.
    pub local_at_start: u64,
    /// Of those, fetched from the server by the agent's prefetch.
    pub fetched: u64,
    /// The prefetch of the boot set has finished.
    pub done: bool,
}

/// The client-disk cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Blocks served from the client's disk.
    pub hits: u64,
    /// Blocks read from the server.
    pub misses: u64,
    /// Bytes held on the client's disk.
    pub bytes: u64,
    /// Its capacity in bytes.
    pub capacity: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Pinned (boot set) blocks held.
    pub pinned: u64,
    /// Blocks that failed their checksum (read again from the server).
    pub checksum_failures: u64,
}

/// Traffic with the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Requests sent.
    pub requests: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Connections made again after a break.
    pub reconnects: u64,
    /// Requests sent again on a new connection.
    pub resent: u64,
}

/// The write overlay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverlayStats {
    /// Bytes of written blocks held.
    pub used: u64,
    /// Its limit in bytes (0: writes go to the server).
    pub capacity: u64,
}

/// The background fill.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FillStats {
    /// The fill is on.
    pub enabled: bool,
    /// Bytes of the image it has walked through.
    pub walked: u64,
    /// It reached the end of the image.
    pub done: bool,
    /// It did not run: the image is larger than 80 % of the cache.
    #[serde(default)]
    pub skipped: bool,
}

fn human(bytes: u64) -> String {
    osstream_core::ByteSize(bytes).human()
}

impl AgentStats {
    /// The lines `osstream-agent stats` prints.
    pub fn render(&self) -> String {
        let ratio = |hits: u64, misses: u64| {
            if hits + misses == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
            }
        };
        let b = &self.boot_set;
        let c = &self.cache;
        let s = &self.server;
        format!(
            "vdisk {} ({}), writes kept {}\n\
             boot set: {} blocks, {} held locally at start, {} fetched{}\n\
             client cache: {} hits, {} misses ({} hit ratio), {} of {} held, {} pinned blocks, {} evictions, {} checksum failures\n\
             server: {} requests, {} read, {} written, {} reconnects, {} requests sent again\n\
             overlay: {} of {} used\n\
             fill: {}\n",
            if self.vdisk.is_empty() {
                "-"
            } else {
                &self.vdisk
            },
            human(self.size),
            if self.writes == "local" {
                "on this client"
            } else {
                "on the server"
            },
            b.blocks,
            b.local_at_start,
            b.fetched,
            if b.done { "" } else { " (prefetch under way)" },
            c.hits,
            c.misses,
            ratio(c.hits, c.misses),
            human(c.bytes),
            human(c.capacity),
            c.pinned,
            c.evictions,
            c.checksum_failures,
            s.requests,
            human(s.read_bytes),
            human(s.written_bytes),
            s.reconnects,
            s.resent,
            human(self.overlay.used),
            human(self.overlay.capacity),
            match (self.fill.enabled, self.fill.done) {
                (false, _) => "off".to_owned(),
                (true, _) if self.fill.skipped =>
                    "skipped (the image is larger than 80% of the cache)".to_owned(),
                (true, true) => format!("done ({} walked)", human(self.fill.walked)),
                (true, false) =>
                    format!("{} of {} walked", human(self.fill.walked), human(self.size)),
            },
        )
    }
}
