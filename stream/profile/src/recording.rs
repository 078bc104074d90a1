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
}

impl Finish {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Finish::Quiet => "no new block for the quiet period",
            Finish::Window => "the recording window is over",
            Finish::Full => "the size cap was reached",
            Finish::Detached => "the client disconnected",
        }
    }
}

/// The blocks one client read first, in order, until the recording is finished.
#[derive(Debug)]
pub(crate) struct Recording {
    block_size: u64,
    max_blocks: usize,
    started: Instant,
    /// Set once finished: reads after it cost one atomic load.
    finished: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    seen: HashSet<u64>,
    order: Vec<u64>,
    last_new: Instant,
}

impl Recording {
    pub(crate) fn new(block_size: u64, max_blocks: usize) -> Self {
        let now = Instant::now();
        Recording {
            block_size,
            max_blocks,
            started: now,
            finished: AtomicBool::new(false),
            state: Mutex::new(State {
                seen: HashSet::new(),
                order: Vec::new(),
                last_new: now,
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
        } else if self.started.elapsed() >= window {
            Some(Finish::Window)
        } else if !state.order.is_empty() && state.last_new.elapsed() >= quiet {
            Some(Finish::Quiet)
        } else {
            None
        }
    }

    /// Stops recording; returns the blocks in first-touch order, or `None` if it had
    /// already stopped (so a recording is handed on once).
    pub(crate) fn finish(&self) -> Option<Vec<u64>> {
        if self.finished.swap(true, Ordering::AcqRel) {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seen = HashSet::new();
        Some(std::mem::take(&mut state.order))
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
        let recording = Recording::new(4096, 100);
        recording.touch(8192, 10);
        recording.touch(0, 4097);
        recording.touch(8192, 4096);
        recording.touch(4096 * 7 - 1, 2);
        assert_eq!(recording.finish().unwrap(), vec![2, 0, 1, 6, 7]);
        assert_eq!(recording.finish(), None);
        recording.touch(40960, 1);
    }

    #[test]
    fn stops_at_the_cap_quietly_or_at_the_window() {
        let recording = Recording::new(512, 3);
        assert_eq!(recording.due(Duration::ZERO, Duration::from_secs(60)), None);
        recording.touch(0, 512 * 10);
        assert_eq!(
            recording.due(Duration::from_secs(60), Duration::from_secs(60)),
            Some(Finish::Full)
        );
        assert_eq!(recording.finish().unwrap(), vec![0, 1, 2]);

        let recording = Recording::new(512, 30);
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
