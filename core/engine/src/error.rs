//! The one error type of osstream.
//!
//! Callers branch on [`Error::kind`] and [`Error::is_temporary`], never on the message text.
//! Each crate maps its native errors (io, protocol, SDK) into this type once, in its own
//! `error.rs`.

use std::fmt;
use std::sync::Arc;

/// What went wrong, as a caller needs to know it to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image, export, client or file does not exist.
    NotFound,
    /// The request reaches past the end of the source.
    OutOfRange,
    /// The source or protocol does not implement this operation.
    Unsupported,
    /// A write-class operation on a read-only source.
    ReadOnly,
    /// The caller passed something malformed (bad name, bad length, bad frame).
    InvalidInput,
    /// The caller is not allowed to do this.
    PermissionDenied,
    /// Storage for writes (an overlay, a disk) is full.
    NoSpace,
    /// Configuration is wrong: unknown key or kind, bad value.
    Config,
    /// The thing exists already, or is in use or locked by someone else.
    Conflict,
    /// The operation was stopped because the server is shutting down.
    Shutdown,
    /// An I/O error from the storage underneath.
    Io,
    /// Anything else; a bug or a case nobody mapped yet.
    Unexpected,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Config => "configuration error",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Shutdown => "shutting down",
            ErrorKind::Io => "I/O error",
            ErrorKind::Unexpected => "unexpected error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// An error with a kind, a temporary flag, the operation that failed, key/value context
/// and an optional underlying cause.
///
/// `Error` is cheap to clone (the cause is shared), so one failed backend read can be handed
/// to every reader that waited on it.
///
/// ```
/// use osstream_core::{Error, ErrorKind};
/// let err = Error::new(ErrorKind::OutOfRange, "read past the end")
///     .with_op("read_at")
///     .with_context("offset", 4096);
/// assert_eq!(err.kind(), ErrorKind::OutOfRange);
/// assert!(!err.is_temporary());
/// assert_eq!(err.to_string(), "out of range: read past the end (op: read_at, offset: 4096)");
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    temporary: bool,
    message: String,
    op: &'static str,
    context: Vec<(&'static str, String)>,
    source: Option<Source>,
}

/// `Result` with osstream's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new permanent error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            temporary: false,
            message: message.into(),
            op: "",
            context: Vec::new(),
            source: None,
        }
    }

    /// Marks the error as temporary: the same call may succeed if retried.
    pub fn set_temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// Records the operation that failed (`read_at`, `open`, `handshake`, ...).
    pub fn with_op(mut self, op: &'static str) -> Self {
        self.op = op;
        self
    }

    /// Adds one key/value pair of context (image name, offset, path, peer...).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same call may succeed.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// The operation that failed, or `""` if none was recorded.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The message without kind, op or context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The key/value context, in the order it was added.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// Maps an `std::io::Error` to a kind; `EAGAIN`, `EINTR`, timeouts and resets are
    /// temporary.
    pub fn from_io(err: std::io::Error, message: impl Into<String>) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match err.kind() {
            Io::NotFound => ErrorKind::NotFound,
            Io::PermissionDenied => ErrorKind::PermissionDenied,
            Io::InvalidInput | Io::InvalidData => ErrorKind::InvalidInput,
            Io::Unsupported => ErrorKind::Unsupported,
            Io::StorageFull | Io::QuotaExceeded => ErrorKind::NoSpace,
            Io::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            Io::UnexpectedEof => ErrorKind::OutOfRange,
            _ => ErrorKind::Io,
        };
        let temporary = matches!(
            err.kind(),
            Io::WouldBlock
                | Io::Interrupted
                | Io::TimedOut
                | Io::ConnectionReset
                | Io::ConnectionAborted
        );
        let mut error = Error::new(kind, message).with_source(err);
        error.temporary = temporary;
        error
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        let mut extras: Vec<String> = Vec::new();
        if !self.op.is_empty() {
            extras.push(format!("op: {}", self.op));
        }
        for (key, value) in &self.context {
            extras.push(format!("{key}: {value}"));
        }
        if self.temporary {
            extras.push("temporary".to_owned());
        }
        if !extras.is_empty() {
            write!(f, " ({})", extras.join(", "))?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds_and_temporariness() {
        let e = Error::from_io(std::io::Error::from(std::io::ErrorKind::NotFound), "open x");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_temporary());
        let e = Error::from_io(std::io::Error::from(std::io::ErrorKind::TimedOut), "read");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.is_temporary());
    }

    #[test]
    fn display_includes_source() {
        let e = Error::from_io(std::io::Error::other("disk on fire"), "read block")
            .with_context("image", "demo");
        assert_eq!(
            e.to_string(),
            "I/O error: read block (image: demo): disk on fire"
        );
    }
}
