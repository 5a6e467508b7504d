//! The etcd that `bench compare --coordination` runs for meshgate's `[coordination]`: Debian's
//! etcd-server binary as one member on a loopback client URL, its data under the run's
//! directory; whether it answers, and how many writes it applied (from its own /metrics), so a
//! report can show that every CONNECT's claim really reached etcd. The process is started and
//! stopped by the comparison like every other it owns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd not found: install Debian's etcd-server (scripts/deps)")]
    NotFound,
    #[error("etcd's client address {0} is not on loopback (the benchmark's traffic stays on this machine)")]
    NotLoopback(SocketAddr),
}

/// Debian's etcd-server installs `/usr/bin/etcd`; a PATH entry wins so another build can be tried.
pub fn binary() -> Result<PathBuf, EtcdError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or(EtcdError::NotFound)
}

/// One member named `bench` with its client URL on `client` and its peer URL on the next port,
/// its data in `data`. Nothing else differs from etcd's defaults (fsync on every commit, as in
/// production), so its CPU time is what a real deployment's member would spend.
pub fn command(bin: &Path, client: SocketAddr, data: &Path) -> Result<Command, EtcdError> {
    if !client.ip().is_loopback() {
        return Err(EtcdError::NotLoopback(client));
    }
    let peer = SocketAddr::new(client.ip(), client.port().wrapping_add(1));
    let (c, p) = (format!("http://{client}"), format!("http://{peer}"));
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "bench", "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("bench={p}"), "--log-outputs", "stderr"]);
    Ok(cmd)
}

/// `GET /health` answers `"health":"true"`.
pub async fn healthy(client: SocketAddr) -> bool {
    crate::suite::get_text(&client.to_string(), "/health").await.is_some_and(|b| b.contains("\"health\":\"true\""))
}

/// etcd's applied writes so far: keys put and deleted (inside transactions too) and
/// transactions, from its Prometheus counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Writes {
    pub puts: u64,
    pub deletes: u64,
    pub txns: u64,
}

impl Writes {
    pub fn since(self, before: Writes) -> Writes {
        Writes {
            puts: self.puts.saturating_sub(before.puts),
            deletes: self.deletes.saturating_sub(before.deletes),
            txns: self.txns.saturating_sub(before.txns),
        }
    }
}

pub async fn writes(client: SocketAddr) -> Option<Writes> {
    let text = crate::suite::get_text(&client.to_string(), "/metrics").await?;
    let n = |name| metric(&text, name).map(|v| v as u64);
    Some(Writes {
        puts: n("etcd_mvcc_put_total")?,
        deletes: n("etcd_mvcc_delete_total")?,
        txns: n("etcd_mvcc_txn_total")?,
    })
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// How long etcd may take to answer after it is started (a cold start on a loaded machine
/// replays nothing, but fsyncs its first WAL segment).
pub const READY: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_exact_name() {
        let text = "# HELP etcd_mvcc_put_total x\netcd_mvcc_put_total 12\netcd_mvcc_put_total_other 3\nm{a=\"b\"} 4\n";
        assert_eq!(metric(text, "etcd_mvcc_put_total"), Some(12.0));
        assert_eq!(metric(text, "m"), None);
        assert_eq!(metric(text, "etcd_mvcc_delete_total"), None);
    }

    #[test]
    fn etcd_stays_on_loopback() {
        let bin = Path::new("/usr/bin/etcd");
        assert!(command(bin, "10.0.0.1:23790".parse().unwrap(), Path::new("/tmp/x")).is_err());
        let cmd = command(bin, "127.200.2.20:23790".parse().unwrap(), Path::new("/tmp/x")).unwrap();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"http://127.200.2.20:23791".to_string()), "{args:?}");
    }
}
