//! systemd's readiness protocol (`sd_notify(3)`) without libsystemd: one datagram to the
//! Unix socket `$NOTIFY_SOCKET` names, when the service manager set it (`Type=notify`).
//! Without the variable (a server run by hand) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`, lines joined by `\n`) to the
/// service manager; a failure is logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let path = path.to_string_lossy();
        // A leading '@' names a socket in the abstract namespace.
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &address)
        } else {
            socket.send_to(state.as_bytes(), &*path)
        }
    });
    if let Err(err) = sent {
        tracing::warn!(%err, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
