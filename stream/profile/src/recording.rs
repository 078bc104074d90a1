//! One attachment's first touches.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why a recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// No new block for the quiet period.
    Quiet,
    /// The window since attach is over.
    Window,
    /// The size cap was reached.
    Full,
    /// The attachment ended.
    Detached,
    /// The client said its boot is complete (`osstream-agent booted`).
    Booted,
}

impl Finish {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Finish::Quiet => "no new block for the quiet period",
            Finish::Window => "the recording window is over",
            Finish::Full => "the size cap was reached",
            Finish::Detached => "the client disconnected",
            Finish::Booted => "the client said its boot is complete",
        }
    }
}

/// Reads kept in a trace at most (a boot makes a few thousand).
const MAX_TRACE: usize = 1 << 20;

/// One demand read, for a boot trace: microseconds since attach, offset, length.
pub(crate) type TraceRead = (u64, u64, u32);

/// What a finished recording hands on.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Finished {
    /// Blocks in first-touch order.
    pub(crate) touched: Vec<u64>,
    /// Every demand read, when tracing.
    pub(crate) trace: Vec<TraceRead>,
}

/// The blocks one client read first, in order, until the recording is finished, and
/// optionally every read (a boot trace for `osstream bench cache`).
#[derive(Debug)]
pub(crate) struct Recording {
    block_size: u64,
    max_blocks: usize,
    tracing: bool,
    started: Instant,
    /// Set once finished: reads after it cost one atomic load.
    finished: AtomicBool,
    /// The client said its boot is complete.
    booted: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    seen: HashSet<u64>,
    order: Vec<u64>,
    last_new: Instant,
    trace: Vec<TraceRead>,
}

impl Recording {
    pub(crate) fn new(block_size: u64, max_blocks: usize, tracing: bool) -> Self {
        let now = Instant::now();
        Recording {
            block_size,
            max_blocks,
            tracing,
            started: now,
            finished: AtomicBool::new(false),
            booted: AtomicBool::new(false),
            state: Mutex::new(State {
                seen: HashSet::new(),
                order: Vec::new(),
                last_new: now,
                trace: Vec::new(),
            }),
        }
    }

    /// Notes a demand read of `len` bytes at `offset`.
    pub(crate) fn touch(&self, offset: u64, len: usize) {
        if len == 0 || self.finished.load(Ordering::Relaxed) {
            return;
        }
        let first = offset / self.block_size;
        let last = (offset + len as u64 - 1) / self.block_size;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.tracing && state.trace.len() < MAX_TRACE {
            let at = self.started.elapsed().as_micros() as u64;
            state.trace.push((at, offset, len as u32));
        }
        let mut added = false;
        for block in first..=last {
            if state.order.len() >= self.max_blocks {
                break;
            }
            if state.seen.insert(block) {
                state.order.push(block);
                added = true;
            }
        }
        if added {
            state.last_new = Instant::now();
        }
    }

    /// Whether the recording should stop now, and why.
    pub(crate) fn due(&self, quiet: Duration, window: Duration) -> Option<Finish> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.order.len() >= self.max_blocks {
            Some(Finish::Full)
        } else if self.booted.load(Ordering::Acquire) {
            Some(Finish::Booted)
        } else if self.started.elapsed() >= window {
            Some(Finish::Window)
        } else if !state.order.is_empty() && state.last_new.elapsed() >= quiet {
            Some(Finish::Quiet)
        } else {
            None
        }
    }

    /// The client said its boot is complete: the recording ends at the next check.
    /// Returns false if it had already ended.
    pub(crate) fn mark_booted(&self) -> bool {
        !self.finished.load(Ordering::Acquire) && !self.booted.swap(true, Ordering::AcqRel)
    }

    /// Stops recording; returns what it recorded, or `None` if it had already stopped
    /// (so a recording is handed on once).
    pub(crate) fn finish(&self) -> Option<Finished> {
        if self.finished.swap(true, Ordering::AcqRel) {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seen = HashSet::new();
        Some(Finished {
            touched: std::mem::take(&mut state.order),
            trace: std::mem::take(&mut state.trace),
        })
    }

    /// How long it has been recording.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_touches_in_order_once_each() {
        let recording = Recording::new(4096, 100, true);
        recording.touch(8192, 10);
        recording.touch(0, 4097);
        recording.touch(8192, 4096);
        recording.touch(4096 * 7 - 1, 2);
        let finished = recording.finish().unwrap();
        assert_eq!(finished.touched, vec![2, 0, 1, 6, 7]);
        let reads: Vec<(u64, u32)> = finished.trace.iter().map(|r| (r.1, r.2)).collect();
        assert_eq!(
            reads,
            vec![(8192, 10), (0, 4097), (8192, 4096), (4096 * 7 - 1, 2)]
        );
        assert!(finished.trace.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(recording.finish(), None);
        recording.touch(40960, 1);
    }

    #[test]
    fn stops_at_the_cap_quietly_or_at_the_window() {
        let recording = Recording::new(512, 3, false);
        assert_eq!(recording.due(Duration::ZERO, Duration::from_secs(60)), None);
        recording.touch(0, 512 * 10);
        assert_eq!(
            recording.due(Duration::from_secs(60), Duration::from_secs(60)),
            Some(Finish::Full)
        );
        assert_eq!(recording.finish().unwrap().touched, vec![0, 1, 2]);

        let recording = Recording::new(512, 30, false);
        recording.touch(0, 1);
        assert_eq!(
            recording.due(Duration::ZERO, Duration::from_secs(60)),
            Some(Finish::Quiet)
        );
        assert_eq!(
            recording.due(Duration::from_secs(60), Duration::ZERO),
            Some(Finish::Window)
        );
    }
}
