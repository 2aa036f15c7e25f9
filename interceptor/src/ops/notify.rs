//! systemd readiness (`Type=notify`): one datagram to `$NOTIFY_SOCKET`. Hand-written because
//! the protocol is a single `sendto` of `READY=1` / `RELOADING=1` / `STOPPING=1` lines.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to the service manager; does nothing when not run by one.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket address (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot notify the service manager ({state})");
    }
}

/// `READY=1`, with a status line for `systemctl status`.
pub(crate) fn ready(status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}\n",
        std::process::id()
    ));
}

/// Around a reload: `RELOADING=1` with the monotonic time systemd asks for (Type=notify-reload
/// compatible), then `READY=1`.
pub(crate) fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
}

pub(crate) fn stopping() {
    notify("STOPPING=1\n");
}
