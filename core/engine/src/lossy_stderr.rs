//! [`LossyStderr`]: standard error for log lines, where a failed write is dropped.

use std::io::Write;

/// Standard error that never fails: a log line that cannot be written (stderr is a pipe
/// whose reader went away, a full disk behind a redirect) is dropped. A server, and the
/// agent serving a machine's root disk, must not stop or panic over a lost log line;
/// `tracing-subscriber` reports a failed write with `eprintln!`, which panics when
/// stderr is gone. Use it as `fmt().with_writer(|| LossyStderr)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
