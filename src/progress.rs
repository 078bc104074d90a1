//! A progress bar on stderr for long admin commands (import, export).
//!
//! On a terminal the bar is redrawn in place at most ten times a second; otherwise (logs,
//! CI) one line is printed at every quarter, so a log shows the command moving without
//! thousands of lines.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Progress of one phase ("upload", "verify"...) of known total size.
#[derive(Debug)]
pub struct Progress {
    label: &'static str,
    total: u64,
    started: Instant,
    terminal: bool,
    quiet: bool,
    /// When the bar was last drawn, and the last quarter printed (non-terminal).
    last: Mutex<(Instant, u64)>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Progress {
    /// A bar for `total` bytes; `quiet` draws nothing.
    pub fn new(label: &'static str, total: u64, quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            started: now,
            terminal: std::io::stderr().is_terminal(),
            quiet,
            last: Mutex::new((now - Duration::from_secs(1), 0)),
        }
    }

    fn rate(&self, done: u64) -> f64 {
        done as f64 / MIB / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// Reports `done` bytes of the total.
    pub fn set(&self, done: u64) {
        if self.quiet {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let percent = (done * 100).checked_div(self.total).unwrap_or(100).min(100);
        if self.terminal {
            if last.0.elapsed() < Duration::from_millis(100) {
                return;
            }
            last.0 = Instant::now();
            let filled = (percent as usize * 30) / 100;
            eprint!(
                "\r{:<8} [{}{}] {percent:>3}% {:>9.1} / {:.1} MiB  {:>7.1} MiB/s ",
                self.label,
                "#".repeat(filled),
                ".".repeat(30 - filled),
                done as f64 / MIB,
                self.total as f64 / MIB,
                self.rate(done),
            );
            let _ = std::io::stderr().flush();
        } else {
            let quarter = percent / 25;
            if quarter > last.1 && quarter < 4 {
                last.1 = quarter;
                eprintln!(
                    "{}: {}% ({:.1} MiB/s)",
                    self.label,
                    quarter * 25,
                    self.rate(done)
                );
            }
        }
    }

    /// Ends the bar with a summary line.
    pub fn finish(&self) {
        if self.quiet {
            return;
        }
        if self.terminal {
            eprint!("\r{}\r", " ".repeat(90));
        }
        eprintln!(
            "{}: {:.1} MiB in {:.1} s ({:.1} MiB/s)",
            self.label,
            self.total as f64 / MIB,
            self.started.elapsed().as_secs_f64(),
            self.rate(self.total)
        );
    }
}
