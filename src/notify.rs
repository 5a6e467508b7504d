//! systemd's readiness protocol (sd_notify(3)) for `meshgate run` under `Type=notify`: READY=1
//! once every listener is bound, RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 on
//! shutdown, each with a STATUS= line for `systemctl status`. Nothing at all when NOTIFY_SOCKET
//! is unset.
//!
//! Written on std rather than with the sd-notify crate: sd-notify 0.5 hands $NOTIFY_SOCKET to
//! `connect` as a path, so the abstract-namespace form ("@name") that sd_notify(3) also allows
//! would fail; std reaches both (`SocketAddrExt::from_abstract_name`) in a few lines.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where notifications go, read from NOTIFY_SOCKET once at start; `None`: not under a service
/// manager that wants them.
#[derive(Debug)]
pub struct Notifier {
    to: Option<SocketAddr>,
}

impl Notifier {
    /// A NOTIFY_SOCKET that cannot be an address is logged and ignored: meshgate still serves,
    /// and systemd reports the start as timed out, which names the unit.
    pub fn from_env() -> Notifier {
        let to = match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => match address(&v) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(
                        "NOTIFY_SOCKET={v:?} is not a Unix socket address ({e}): systemd is not told of readiness"
                    );
                    None
                }
            },
            _ => None,
        };
        Notifier { to }
    }

    /// Every listener is bound (or the reload is applied or refused): clients can connect.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// A reload has begun. systemd 253 and later want the monotonic time with it, to tell this
    /// reload's READY=1 from an earlier one.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1_000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the configuration\n"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: draining sessions\n");
    }

    /// One datagram per message, from a fresh socket: systemd may have re-executed and bound the
    /// notify socket anew since the last one. A failure is logged and otherwise ignored, as
    /// sd_notify(3) callers do: the proxy serving matters more than systemd's view of it.
    fn send(&self, message: &str) {
        let Some(to) = &self.to else { return };
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(message.as_bytes(), to));
        match sent {
            Ok(n) if n == message.len() => {}
            Ok(n) => tracing::warn!("notifying systemd: {n} of {} bytes sent", message.len()),
            Err(e) => tracing::warn!("notifying systemd ({}): {e}", message.lines().next().unwrap_or_default()),
        }
    }
}

/// "@name" is Linux's abstract namespace (a leading NUL on the wire); anything else a path.
fn address(raw: &OsStr) -> io::Result<SocketAddr> {
    match raw.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(raw),
    }
}

/// A STATUS= value ends at the line's end: a newline inside would start another assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
