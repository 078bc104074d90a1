use std::path::Path;

use osstream_core::Error;

/// Maps an I/O error on a device during `op`, once for this crate.
pub(crate) fn io_error(err: std::io::Error, op: &'static str, path: &Path) -> Error {
    Error::from_io(err, format!("{op} failed on {}", path.display())).with_op(op)
}
