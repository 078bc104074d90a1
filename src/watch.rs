//! The refresh loop of the live views (`osstream top`, `osstream session list --watch`):
//! one screen per interval until Ctrl-C, or `q` and Enter.
//!
//! No terminal library: on a terminal each screen replaces the last with two ANSI
//! sequences (clear, cursor home) and the terminal is never put in raw mode, so however
//! the command ends (Ctrl-C, a kill) the terminal is left as it was. Anywhere else (a
//! pipe, a file) screens follow each other, and JSON is one document per line.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use osstream_core::{Error, Result};

use crate::args::Refresh;

/// The interval when `--interval` is not given: how often the server rewrites the
/// statistics file the views read.
pub const DEFAULT_INTERVAL: Duration = crate::stats::INTERVAL;

/// The time between refreshes `refresh` asks for.
pub(crate) fn interval(refresh: &Refresh) -> Duration {
    refresh.interval.map_or(DEFAULT_INTERVAL, |s| s.0)
}

/// For a view's header: how often it refreshes and how to leave it; `None` with `--once`.
pub(crate) fn live_note(refresh: &Refresh) -> Option<String> {
    (!refresh.once).then(|| {
        format!(
            "refreshed every {}; Ctrl-C (or q, Enter) quits",
            osstream_core::Seconds(interval(refresh))
        )
    })
}

/// Clears the screen and moves the cursor to its top left corner.
const CLEAR_AND_HOME: &str = "\x1b[H\x1b[2J";

/// A live view: one screen of text per refresh.
pub(crate) trait Screen {
    /// The text of one refresh, ending in a newline.
    async fn compose(&mut self) -> Result<String>;
}

/// How screens reach stdout.
struct Terminal {
    /// Each screen replaces the last (stdout is a terminal, a table is shown, and there is
    /// more than one screen).
    in_place: bool,
    /// Screens are JSON documents (one per line), not tables.
    json: bool,
    /// Screens shown so far.
    shown: u64,
}

impl Terminal {
    fn show(&mut self, text: &str) -> Result<()> {
        let mut stdout = std::io::stdout().lock();
        let written = if self.in_place {
            write!(stdout, "{CLEAR_AND_HOME}{text}")
        } else if self.shown > 0 && !self.json {
            // Tables printed one after another: a blank line between them.
            write!(stdout, "\n{text}")
        } else {
            write!(stdout, "{text}")
        };
        self.shown += 1;
        written
            .and_then(|()| stdout.flush())
            .map_err(|e| Error::from_io(e, "cannot write to stdout"))
    }

    /// A refresh failed after the first (a server restarting): said where the screen
    /// would be, and the view carries on.
    fn problem(&mut self, err: &Error, interval: Duration) -> Result<()> {
        let line = format!(
            "osstream: {err}\n(trying again every {}; Ctrl-C quits)\n",
            osstream_core::Seconds(interval)
        );
        if self.in_place {
            self.show(&line)
        } else {
            eprint!("{line}");
            Ok(())
        }
    }
}

/// `q` and Enter typed on the terminal (or its end of input, Ctrl-D); never, when stdin
/// is not a terminal. Read line by line: the terminal stays in its usual mode.
fn quit_requests() -> Option<tokio::sync::mpsc::Receiver<()>> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    // A plain thread, not the runtime's blocking pool: a read of stdin cannot be
    // cancelled, and the runtime would wait for it at exit.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            match line {
                Ok(line) if line.trim().eq_ignore_ascii_case("q") => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let _ = sender.blocking_send(());
    });
    Some(receiver)
}

/// Shows `screen` once (`--once`), or every interval until the admin quits. The first
/// screen's error ends the command; a later one is shown in its place and the view goes
/// on. `json`: screens are JSON documents, never drawn in place.
pub(crate) async fn run(screen: &mut impl Screen, refresh: &Refresh, json: bool) -> Result<()> {
    let interval = interval(refresh);
    let mut terminal = Terminal {
        in_place: !json && !refresh.once && std::io::stdout().is_terminal(),
        json,
        shown: 0,
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    terminal.show(&screen.compose().await?)?;
    if refresh.once {
        return Ok(());
    }
    let mut quit = quit_requests();
    loop {
        let typed_quit = async {
            match &mut quit {
                Some(receiver) => {
                    receiver.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut ctrl_c => break,
            () = typed_quit => break,
            () = tokio::time::sleep(interval) => {}
        }
        match screen.compose().await {
            Ok(text) => terminal.show(&text)?,
            Err(err) => terminal.problem(&err, interval)?,
        }
    }
    if terminal.in_place {
        // The prompt goes below the last screen, not after the `^C` the terminal echoed.
        println!();
    }
    Ok(())
}
