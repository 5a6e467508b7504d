//! One local etcd (Debian's etcd-server) as a child process of `meshgate up --instances N`: its data under the run directory, its client and peer URLs on loopback ports that never meet a system etcd's 2379/2380.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{io, last_line, stop_pid, ClusterError, RunDir};

/// Where `meshgate up --instances N` puts etcd's client URL, on the config's MQTT address; the
/// peer URL takes the next port. Not 2379/2380, so a system etcd is never in the way (nor used).
pub const DEFAULT_CLIENT_PORT: u16 = 2389;
/// How long etcd has to answer `/health` after it was started.
const READY: Duration = Duration::from_secs(20);

/// Finds the etcd binary: PATH first, then /usr/bin, where Debian's etcd-server puts it.
pub fn binary() -> Result<PathBuf, ClusterError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or(ClusterError::EtcdMissing)
}

/// A running single-member etcd, this process's child.
pub struct EtcdProcess {
    pub client: SocketAddr,
    pub peer: SocketAddr,
    child: Child,
}

impl EtcdProcess {
    /// Starts etcd with a fresh data directory `<run>/etcd` (its keys describe the instances of
    /// this run only; a leftover lease of an earlier run would otherwise hold the leader key for
    /// another `lease_ttl`), and waits until it answers `/health`.
    pub async fn start(run: &RunDir, client: SocketAddr) -> Result<EtcdProcess, ClusterError> {
        let bin = binary()?;
        let peer = SocketAddr::new(client.ip(), client.port().wrapping_add(1));
        // etcd would log a bind error and exit; one line naming the address says more.
        for (what, addr) in [("client", client), ("peer", peer)] {
            if std::net::TcpListener::bind(addr).is_err() {
                return Err(ClusterError::EtcdPortTaken { what, address: addr.to_string() });
            }
        }
        let data = run.root.join("etcd");
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(io("cannot clear", &data))?;
        }
        let log = run.log("etcd");
        let out = std::fs::File::create(&log).map_err(io("cannot create", &log))?;
        let (c, p) = (format!("http://{client}"), format!("http://{peer}"));
        let child = Command::new(&bin)
            .args(["--name", "meshgate-up", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("meshgate-up={p}"), "--log-outputs", "stderr"])
            .current_dir(&run.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(io("cannot start", &bin))?;
        let mut etcd = EtcdProcess { client, peer, child };
        let deadline = Instant::now() + READY;
        while !healthy(client).await {
            let exited = matches!(etcd.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                etcd.stop(Duration::from_secs(1));
                return Err(ClusterError::EtcdNotReady {
                    address: client.to_string(),
                    secs: READY.as_secs(),
                    log: log.display().to_string(),
                    tail: last_line(&log).unwrap_or_else(|| "(empty)".into()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(etcd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaped.
    pub fn stop(&mut self, grace: Duration) {
        stop_pid(self.child.id(), grace);
        let _ = self.child.wait();
    }
}

/// `GET /health` answers `"health":"true"` (a plain HTTP/1.0 request: no client library for
/// one line of JSON).
async fn healthy(client: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(client).await.ok()?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {client}\r\n\r\n").as_bytes()).await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body.contains("\"health\":\"true\""))
    };
    matches!(tokio::time::timeout(Duration::from_millis(500), ask).await, Ok(Some(true)))
}
