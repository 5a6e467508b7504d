//! One `meshgate run` process with `[coordination]` on a test's own loopback address, in front of the test's brokers; SIGKILLed when dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Net, Slot};

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");
const SECOND: Duration = Duration::from_secs(1);
/// Every instance's `[coordination] lease_ttl`: the takeover bound is this + 1 s.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// One `meshgate run` process; SIGKILLed when dropped.
pub struct Instance {
    pub name: String,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Instance {
    /// `brokers_extra` goes into every `[[broker]]` table, by broker name.
    pub fn start(
        name: &str,
        slot: &Slot,
        last: u8,
        net: &Net,
        etcd: &str,
        extra: &str,
        brokers_extra: &[(&str, &str)],
    ) -> Instance {
        let (mqtt, http) = (slot.addr(last, 1883), slot.addr(last, 8080));
        let mut text = format!(
            "[listen]\nmqtt = \"{mqtt}\"\nhttp = \"{http}\"\n[access_log]\nenabled = false\n\
             [health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\n\
             [replication]\nenabled = true\nlag_interval = \"200ms\"\n\
             [coordination]\netcd = [\"{etcd}\"]\ninstance = \"{name}\"\nlease_ttl = \"{}s\"\n{extra}\n",
            LEASE_TTL.as_secs()
        );
        for b in &net.brokers {
            let more = brokers_extra.iter().find(|(n, _)| *n == b.name).map_or("", |(_, e)| e);
            text.push_str(&format!("[[broker]]\nname = \"{}\"\naddress = \"{}\"\n{more}\n", b.name, b.addr));
        }
        let (child, dir) = run(&text);
        let i = Instance { name: name.into(), mqtt, http, child: Some(child), dir };
        let deadline = Instant::now() + 10 * SECOND;
        while get(i.http, "/health").is_none() {
            assert!(Instant::now() < deadline, "instance {name} did not serve /health:\n{}", i.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        i
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as an operator stops it; waits for the process to exit.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + 10 * SECOND;
        while c.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "{} did not exit within 10 s of SIGTERM:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let body = get(self.http, path).unwrap_or_else(|| panic!("{} {path} answers:\n{}", self.name, self.log()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    pub fn leading(&self) -> bool {
        get(self.http, "/instances")
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["coordination"]["leading"] == true)
    }

    /// The value of one metric sample, `name{labels}` as the exposition writes it (0 if absent).
    pub fn metric(&self, sample: &str) -> f64 {
        metric(self.http, sample)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `meshgate run` with the config `text`, in a temp dir that also holds its stderr (`log`).
pub fn run(text: &str) -> (Child, tempfile::TempDir) {
    run_limited(text, None)
}

/// [`run`], with the process's open-file limit (soft and hard, so meshgate cannot raise it)
/// set to `nofile`.
pub fn run_limited(text: &str, nofile: Option<u64>) -> (Child, tempfile::TempDir) {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshgate.toml");
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config", config.to_str().unwrap()]).stdout(Stdio::null()).stderr(log);
    if let Some(n) = nofile {
        // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                    .map_err(std::io::Error::from)
            });
        }
    }
    (cmd.spawn().expect("meshgate runs"), dir)
}

/// `meshgate run` in front of a net's brokers (config from [`Net::config_text`]), serving
/// `/health`; SIGKILLed when dropped.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    pub http: SocketAddr,
}

impl Daemon {
    pub fn start(net: &Net, extra: &str) -> Daemon {
        Daemon::start_limited(net, extra, None)
    }

    /// With its open-file limit set to `nofile` (see [`run_limited`]).
    pub fn start_limited(net: &Net, extra: &str, nofile: Option<u64>) -> Daemon {
        let (child, dir) = run_limited(&net.config_text(extra), nofile);
        let d = Daemon { child, dir, http: net.http_addr() };
        let deadline = Instant::now() + 10 * SECOND;
        while !get(d.http, "/health").is_some_and(|b| b.contains("ok")) {
            assert!(Instant::now() < deadline, "meshgate did not report healthy within 10 s:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes the config for `net` with `extra` and sends SIGHUP, as `systemctl reload` does.
    pub fn reload(&self, net: &Net, extra: &str) {
        std::fs::write(self.dir.path().join("meshgate.toml"), net.config_text(extra)).unwrap();
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// See [`Instance::metric`].
    pub fn metric(&self, sample: &str) -> f64 {
        metric(self.http, sample)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one metric sample at `http`, `name{labels}` as the exposition writes it (0 if
/// absent).
pub fn metric(http: SocketAddr, sample: &str) -> f64 {
    let body = get(http, "/metrics").unwrap_or_default();
    body.lines().filter(|l| l.starts_with(sample)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A plain HTTP/1.0 GET; the body, or `None` when nothing answered.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(2 * SECOND)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Waits (blocking) for `cond`, with a deadline; panics with `what`.
pub fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}
