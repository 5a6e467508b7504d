//! A real single-member etcd (Debian's etcd-server) on a test's own loopback address, with its data in a temporary directory; stopped and started again on demand, killed when dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ETCD: &str = "/usr/bin/etcd";
const READY_DEADLINE: Duration = Duration::from_secs(20);

pub struct Etcd {
    pub client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd with its client URL on `client` (and its peer URL on the next port) and waits
    /// until it answers `/health`.
    pub fn start(client: SocketAddr) -> Etcd {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: run `scripts/deps test` (Debian package etcd-server)"
        );
        let peer = SocketAddr::new(client.ip(), client.port() + 1);
        let mut etcd = Etcd { client, peer, child: None, dir: tempfile::tempdir().unwrap() };
        etcd.spawn();
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn spawn(&mut self) {
        let (c, p) = (format!("http://{}", self.client), format!("http://{}", self.peer));
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new(ETCD)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("t={p}"), "--log-outputs", "stderr"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + READY_DEADLINE;
        while !self.healthy() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited ({status}):\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "etcd not healthy within 20 s:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /health` answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.client, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {}\r\n\r\n", self.client);
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Kills etcd (its data stays, as after a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Keys under `prefix`, through etcdctl.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url(), "get", "--prefix", "--keys-only", prefix])
            .output()
            .expect("etcdctl runs");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    /// The value at `key` ("" when absent).
    pub fn get(&self, key: &str) -> String {
        let out = Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url(), "get", "--print-value-only", key])
            .output()
            .expect("etcdctl runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
