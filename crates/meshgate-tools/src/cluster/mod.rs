//! The local broker network: Mosquitto configs rendered from meshgate's config, broker processes, pid files, status.
//!
//! Everything a broker writes (persistence, log, pid file) lives in one run directory; the
//! rendered configs use paths relative to it and Mosquitto runs with it as working directory,
//! so the shipped example configs are byte-for-byte what `render` writes.

pub mod deploy;
pub mod etcd;
pub mod keepalived;
pub mod nginx;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshgate::config::{BrokerConfig, Config};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("mosquitto is not installed: install it with `sudo apt-get install -y mosquitto mosquitto-clients`")]
    MosquittoMissing,
    #[error("broker {name}: address {address:?} must be ip:port on this machine to run it locally")]
    NotLocal { name: String, address: String },
    #[error("{name} at {address} is already answering (pid {pid}): stop it first with `meshgate cluster down`")]
    AlreadyRunning { name: String, address: String, pid: String },
    #[error("nginx with the stream module is not installed: install it with `sudo apt-get install -y nginx libnginx-mod-stream`")]
    NginxMissing,
    #[error("nginx refused {conf}: {message}")]
    NginxConfig { conf: String, message: String },
    #[error("etcd not found: install Debian's etcd-server (scripts/deps)")]
    EtcdMissing,
    #[error("etcd's {what} address {address} is taken (another etcd or `meshgate up`?): stop it or pass --etcd-listen HOST:PORT")]
    EtcdPortTaken { what: &'static str, address: String },
    #[error("etcd did not answer /health on {address} within {secs} s; its log {log} ends with: {tail}")]
    EtcdNotReady { address: String, secs: u64, log: String, tail: String },
    #[error("{what} {path}: {err}")]
    Io { what: &'static str, path: String, err: std::io::Error },
    #[error("{name} did not answer MQTT on {address} within {secs} s; its log {log} ends with: {tail}")]
    NotReady { name: String, address: String, secs: u64, log: String, tail: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ClusterError + 'a {
    move |err| ClusterError::Io { what, path: path.display().to_string(), err }
}

/// The Mosquitto config of one broker of the local network.
pub fn render_broker(b: &BrokerConfig) -> Result<String, ClusterError> {
    let addr: SocketAddr =
        b.address.parse().map_err(|_| ClusterError::NotLocal { name: b.name.clone(), address: b.address.clone() })?;
    let name = &b.name;
    Ok(format!(
        "# {name} of the local meshgate network, rendered by `meshgate cluster render`.\n\
         # Paths are relative to the run directory, which is Mosquitto's working directory.\n\
         listener {port} {ip}\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {name}/\n\
         autosave_interval 30\n\
         log_dest file logs/{name}.log\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         log_timestamp_format %Y-%m-%dT%H:%M:%S\n\
         # meshgate probes connect several times a second; logging each would fill the disk.\n\
         connection_messages false\n\
         # meshgate's replication link is a subscriber to everything; Mosquitto's default of 1000\n\
         # queued QoS 1 messages per client would drop copies during a burst.\n\
         max_queued_messages 100000\n",
        port = addr.port(),
        ip = addr.ip(),
    ))
}

/// Writes `<name>.conf` for every broker into `dir`; returns the paths.
pub fn render_all(config: &Config, dir: &Path) -> Result<Vec<PathBuf>, ClusterError> {
    write_together(&broker_files(config, dir)?)
}

/// Each broker's rendered Mosquitto config and where it goes in `dir`.
pub fn broker_files(config: &Config, dir: &Path) -> Result<Vec<(PathBuf, String)>, ClusterError> {
    config.brokers.iter().map(|b| Ok((dir.join(format!("{}.conf", b.name)), render_broker(b)?))).collect()
}

/// Writes every file or none: each goes to a temporary file beside its place first, and only
/// when all of them are written are they renamed into place, so a directory that cannot be
/// written (a checkout that is not there, a read-only path) leaves no half-rendered set.
pub fn write_together(files: &[(PathBuf, String)]) -> Result<Vec<PathBuf>, ClusterError> {
    let tmp = |p: &Path| {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(".meshgate-tmp");
        p.with_file_name(name)
    };
    // A directory where a file must go would fail its rename after others were in place.
    if let Some((path, _)) = files.iter().find(|(p, _)| p.is_dir()) {
        return Err(ClusterError::Io {
            what: "cannot write",
            path: path.display().to_string(),
            err: std::io::Error::new(std::io::ErrorKind::IsADirectory, "a directory is in the way"),
        });
    }
    let mut written: Vec<PathBuf> = Vec::new();
    let staged = files.iter().try_for_each(|(path, text)| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
        }
        let t = tmp(path);
        std::fs::write(&t, text).map_err(io("cannot write", path))?;
        written.push(t);
        Ok(())
    });
    if let Err(e) = staged {
        for t in &written {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    files
        .iter()
        .map(|(path, _)| std::fs::rename(tmp(path), path).map_err(io("cannot write", path)).map(|_| path.clone()))
        .collect()
}

/// Finds the mosquitto binary: PATH first, then /usr/sbin, where Debian installs it and which
/// is not on an ordinary user's PATH.
pub fn mosquitto_binary() -> Result<PathBuf, ClusterError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .ok_or(ClusterError::MosquittoMissing)
}

/// One local broker process.
pub struct BrokerProcess {
    pub name: String,
    pub address: String,
    pub child: Child,
}

impl BrokerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; always reaped.
    pub fn stop(&mut self, grace: Duration) {
        stop_pid(self.child.id(), grace);
        let _ = self.child.wait();
    }
}

/// Asks a process to stop and waits for it, escalating to SIGKILL after `grace`.
pub fn stop_pid(pid: u32, grace: Duration) -> bool {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(pid as i32);
    if kill(pid, Signal::SIGTERM).is_err() {
        return false;
    }
    // A stopped (hung) broker cannot act on SIGTERM until it runs again.
    let _ = kill(pid, Signal::SIGCONT);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid.as_raw() as u32) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    true
}

pub use crate::procfs::alive;

/// The run directory layout: `<run>/<name>.conf`, `<run>/<name>/` (persistence),
/// `<run>/logs/<name>.log`, `<run>/<name>.pid`.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Result<RunDir, ClusterError> {
        std::fs::create_dir_all(root.join("logs")).map_err(io("cannot create run directory", root))?;
        let root = root.canonicalize().map_err(io("cannot resolve", root))?;
        Ok(RunDir { root })
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }
    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.pid"))
    }
    pub fn read_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_file(name)).ok()?.trim().parse().ok()
    }
}

/// Starts every broker of `config` from configs rendered into the run directory, and waits
/// until each answers MQTT. `detach` puts them in their own session so they outlive this
/// process (`cluster up`); otherwise they are this process's children (`up`).
pub async fn start_brokers(config: &Config, run: &RunDir, detach: bool) -> Result<Vec<BrokerProcess>, ClusterError> {
    let bin = mosquitto_binary()?;
    for b in &config.brokers {
        if answers_mqtt(&b.address, Duration::from_millis(300)).await {
            let pid = run.read_pid(&b.name).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
            return Err(ClusterError::AlreadyRunning { name: b.name.clone(), address: b.address.clone(), pid });
        }
    }
    render_all(config, &run.root)?;
    let mut procs = Vec::new();
    for b in &config.brokers {
        let data = run.root.join(&b.name);
        std::fs::create_dir_all(&data).map_err(io("cannot create", &data))?;
        give_to_mosquitto_user(&[&data, &run.root.join("logs")]);
        let conf = run.root.join(format!("{}.conf", b.name));
        let stderr_path = run.root.join("logs").join(format!("{}.stderr", b.name));
        let stderr = std::fs::File::create(&stderr_path).map_err(io("cannot create", &stderr_path))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&conf).current_dir(&run.root).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        if detach {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().map_err(io("cannot start", &bin))?;
        let pid_file = run.pid_file(&b.name);
        std::fs::write(&pid_file, format!("{}\n", child.id())).map_err(io("cannot write", &pid_file))?;
        procs.push(BrokerProcess { name: b.name.clone(), address: b.address.clone(), child });
    }
    for p in &mut procs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if answers_mqtt(&p.address, Duration::from_millis(300)).await {
                break;
            }
            let exited = matches!(p.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                let tail = last_line(&run.log(&p.name))
                    .or_else(|| last_line(&run.root.join("logs").join(format!("{}.stderr", p.name))))
                    .unwrap_or_else(|| "(empty)".into());
                let err = ClusterError::NotReady {
                    name: p.name.clone(),
                    address: p.address.clone(),
                    secs: 10,
                    log: run.log(&p.name).display().to_string(),
                    tail,
                };
                for q in &mut procs {
                    q.stop(Duration::from_secs(1));
                }
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(procs)
}

/// Mosquitto started as root drops to the `mosquitto` user, which must be able to write its
/// persistence and log; for anyone else this does nothing.
fn give_to_mosquitto_user(paths: &[&Path]) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Ok(Some(user)) = nix::unistd::User::from_name("mosquitto") else { return };
    for p in paths {
        let _ = nix::unistd::chown(*p, Some(user.uid), Some(user.gid));
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                let _ = nix::unistd::chown(&e.path(), Some(user.uid), Some(user.gid));
            }
        }
    }
}

fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_owned)
}

/// One CONNECT/CONNACK exchange within `limit`.
pub async fn answers_mqtt(address: &str, limit: Duration) -> bool {
    meshgate::health::probe::answers_mqtt(address, limit).await
}

/// Starts one broker again (after a kill) from its rendered config in the run directory,
/// detached, and records its new pid; waits until it answers MQTT.
pub async fn restart_broker(config: &Config, run: &RunDir, name: &str) -> Result<u32, ClusterError> {
    let b = config.brokers.iter().find(|b| b.name == name).ok_or_else(|| ClusterError::Io {
        what: "no such broker in the config:",
        path: name.to_string(),
        err: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let single = Config { brokers: vec![b.clone()], ..config.clone() };
    let mut procs = start_brokers(&single, run, true).await?;
    let p = procs.pop().expect("one broker started");
    let pid = p.pid();
    // Dropping the handle neither kills nor waits: the pid file owns the process now.
    drop(p);
    Ok(pid)
}

/// Stops the brokers recorded in the run directory's pid files (`cluster down`).
pub fn stop_from_pid_files(config: &Config, run: &RunDir) -> Vec<(String, Option<u32>, bool)> {
    config
        .brokers
        .iter()
        .map(|b| {
            let pid = run.read_pid(&b.name);
            let stopped = pid.is_some_and(|p| alive(p) && stop_pid(p, Duration::from_secs(5)));
            let _ = std::fs::remove_file(run.pid_file(&b.name));
            (b.name.clone(), pid, stopped)
        })
        .collect()
}

/// One line per broker: name, address, pid (from the pid file, if alive), answers MQTT.
pub async fn status(config: &Config, run: &RunDir) -> Vec<(String, String, Option<u32>, bool)> {
    let mut rows = Vec::new();
    for b in &config.brokers {
        let pid = run.read_pid(&b.name).filter(|p| alive(*p));
        rows.push((b.name.clone(), b.address.clone(), pid, answers_mqtt(&b.address, Duration::from_millis(500)).await));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_files_are_written_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = |names: &[&str]| -> Vec<(PathBuf, String)> {
            names.iter().map(|n| (d.join(n), format!("{n}\n"))).collect()
        };
        // A directory in the way of the last file: nothing is written, nothing is left over.
        std::fs::create_dir_all(d.join("sub/c.conf")).unwrap();
        assert!(write_together(&files(&["a.conf", "sub/b.conf", "sub/c.conf"])).is_err());
        assert!(!d.join("a.conf").exists() && !d.join("sub/b.conf").exists());
        // A parent that is a file: nothing either.
        std::fs::write(d.join("file"), "").unwrap();
        assert!(write_together(&files(&["x.conf", "file/y.conf"])).is_err());
        assert!(!d.join("x.conf").exists());
        let left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".meshgate-tmp")), "{left:?}");
        // Every file otherwise, replacing what was there.
        std::fs::write(d.join("a.conf"), "old").unwrap();
        let written = write_together(&files(&["a.conf", "new/b.conf"])).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(std::fs::read_to_string(d.join("a.conf")).unwrap(), "a.conf\n");
    }

    #[test]
    fn shipped_mosquitto_configs_equal_the_rendered_output() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let config = Config::load(&root.join("configs/meshgate.toml")).unwrap();
        for b in &config.brokers {
            let shipped = std::fs::read_to_string(root.join(format!("configs/mosquitto/{}.conf", b.name)))
                .unwrap_or_else(|e| panic!("configs/mosquitto/{}.conf: {e} (run `meshgate cluster render`)", b.name));
            assert_eq!(
                shipped,
                render_broker(b).unwrap(),
                "configs/mosquitto/{}.conf is stale: run `meshgate cluster render`",
                b.name
            );
        }
    }

    #[test]
    fn a_hostname_cannot_be_run_locally() {
        let config = Config::from_toml("[[broker]]\nname = \"b\"\naddress = \"broker.lan:1883\"\n", "t").unwrap();
        let e = render_broker(&config.brokers[0]).unwrap_err().to_string();
        assert!(e.contains("must be ip:port"), "{e}");
    }
}
