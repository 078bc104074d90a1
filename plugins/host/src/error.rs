use osstream_core::{Error, ErrorKind};
use osstream_plugin_abi as abi;

/// Maps an error a plugin reported into osstream's error, once for this crate.
pub(crate) fn from_plugin(raw: &abi::PluginError, plugin: &str, op: &'static str) -> Error {
    let kind = match raw.kind {
        abi::ERROR_NOT_FOUND => ErrorKind::NotFound,
        abi::ERROR_OUT_OF_RANGE => ErrorKind::OutOfRange,
        abi::ERROR_UNSUPPORTED => ErrorKind::Unsupported,
        abi::ERROR_READ_ONLY => ErrorKind::ReadOnly,
        abi::ERROR_INVALID_INPUT => ErrorKind::InvalidInput,
        abi::ERROR_PERMISSION_DENIED => ErrorKind::PermissionDenied,
        abi::ERROR_NO_SPACE => ErrorKind::NoSpace,
        abi::ERROR_IO => ErrorKind::Io,
        _ => ErrorKind::Unexpected,
    };
    let len = (raw.message_len as usize).min(abi::ERROR_MESSAGE_MAX);
    let mut message = String::from_utf8_lossy(&raw.message[..len]).into_owned();
    if message.is_empty() {
        message = "the plugin reported a failure without a message".to_owned();
    }
    let error = Error::new(kind, message)
        .with_op(op)
        .with_context("plugin", plugin);
    if raw.temporary != 0 {
        error.set_temporary()
    } else {
        error
    }
}
