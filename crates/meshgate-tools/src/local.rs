//! `meshgate up`: the whole local system in the foreground (brokers, then meshgate or nginx in front; with `--instances N`, etcd first and N meshgate instances), stopped as one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::etcd::{self, EtcdProcess};
use crate::cluster::{self, BrokerProcess, RunDir};
use meshgate::config::{self, Config, CoordinationConfig};
use meshgate::Meshgate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    Meshgate,
    Nginx,
}

impl FrontEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontEnd::Meshgate => "meshgate",
            FrontEnd::Nginx => "nginx",
        }
    }
}

/// `--instances N` with N >= 2: N meshgate instances in front of the same brokers, sharing
/// state through one local etcd (docs/ha.md).
#[derive(Debug, Clone, Copy)]
pub struct Instances {
    pub count: usize,
    /// etcd's client address; its peer address takes the next port. Default: the config's
    /// MQTT address with port [`etcd::DEFAULT_CLIENT_PORT`].
    pub etcd: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Meshgate(#[from] meshgate::Error),
    /// A combination of the command line and the config that cannot run.
    #[error("{0}")]
    Usage(String),
}

impl UpError {
    /// The command line or the config is at fault (exit 2), not the machine.
    pub fn is_usage(&self) -> bool {
        match self {
            UpError::Usage(_) => true,
            UpError::Meshgate(e) => e.is_config(),
            UpError::Cluster(_) => false,
        }
    }
}

enum Front {
    /// One instance, or with `--instances N` each of them in order (meshgate-1 first).
    Meshgate(Vec<Meshgate>),
    Nginx(std::process::Child),
}

/// How long `up` waits for the instances to agree on a leader before it prints the summary
/// anyway (saying none leads yet): etcd is local, so this is seconds only when the machine is
/// very busy.
const ELECTED_WITHIN: Duration = Duration::from_secs(10);

/// The config of instance `i` (0-based): `meshgate-<i+1>`, every listen address on the
/// loopback address `i` after the configured one (MQTT on the same port, HTTP on the
/// configured port + `i`), replication on (only the leader replicates), `[coordination]` on
/// the local etcd (prefix and lease_ttl from the config's own section, if it has one), and its
/// own state files and access log beside the configured ones.
pub fn instance_config(base: &Config, i: usize, etcd_url: &str) -> Result<Config, UpError> {
    let name = format!("meshgate-{}", i + 1);
    let mut c = base.clone();
    c.listen.mqtt = shifted("listen.mqtt", &base.listen.mqtt, i, 0)?;
    c.listen.mqtts = base.listen.mqtts.as_deref().map(|a| shifted("listen.mqtts", a, i, 0)).transpose()?;
    c.listen.http = base.listen.http.as_deref().map(|a| shifted("listen.http", a, i, i)).transpose()?;
    if c.replication.max_qos == 2 {
        return Err(UpError::Usage(
            "--instances needs replication.max_qos = 1: a new leader cannot finish the QoS 2 flows of the links' sessions (docs/ha.md)".into(),
        ));
    }
    c.replication.enabled = true;
    // Two instances writing one state file would each overwrite the other's record.
    for path in
        [&mut c.sessions.state_file, &mut c.replication.state_file, &mut c.access_log.path].into_iter().flatten()
    {
        *path = suffixed(path, &name);
    }
    let (prefix, lease_ttl) = match &base.coordination {
        Some(co) => (co.prefix.clone(), co.lease_ttl),
        None => (config::DEFAULT_COORDINATION_PREFIX.to_string(), config::DEFAULT_LEASE_TTL),
    };
    c.coordination = Some(CoordinationConfig { etcd: vec![etcd_url.to_string()], instance: name, prefix, lease_ttl });
    Ok(c)
}

/// `address` with its IPv4 address moved up by `ip_step` and its port by `port_step`. Only
/// loopback addresses: 127.0.0.0/8 is all this machine's, any other next address may not be.
fn shifted(key: &str, address: &str, ip_step: usize, port_step: usize) -> Result<String, UpError> {
    let bad = |why: &str| {
        UpError::Usage(format!(
            "--instances gives each instance the next loopback address after {key} = {address:?}: {why}"
        ))
    };
    let addr: SocketAddr = address.parse().map_err(|_| bad("it must be ip:port, e.g. 127.0.0.1:1883"))?;
    let IpAddr::V4(ip) = addr.ip() else { return Err(bad("it must be an IPv4 loopback address (127.x.y.z)")) };
    if !ip.is_loopback() {
        return Err(bad("it must be a loopback address (127.x.y.z)"));
    }
    let next = u32::from(ip).checked_add(ip_step as u32).map(Ipv4Addr::from).filter(Ipv4Addr::is_loopback);
    let port = u16::try_from(port_step).ok().and_then(|p| addr.port().checked_add(p));
    match (next, port) {
        (Some(ip), Some(port)) => Ok(SocketAddr::new(IpAddr::V4(ip), port).to_string()),
        _ => Err(bad("the addresses or ports run out")),
    }
}

/// `dir/file.ext` becomes `dir/file-<name>.ext`.
fn suffixed(path: &Path, name: &str) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let file = match path.extension() {
        Some(ext) => format!("{stem}-{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{name}"),
    };
    path.with_file_name(file)
}

/// A running local system.
pub struct Local {
    pub run: RunDir,
    /// With `--instances N`: the etcd they share.
    etcd: Option<EtcdProcess>,
    brokers: Vec<BrokerProcess>,
    front: Option<Front>,
    /// With nginx in front, replication (and the HTTP API) still runs in this process.
    replicator: Option<Box<Meshgate>>,
    pub front_end: FrontEnd,
    pub config: Config,
}

impl Local {
    /// Starts the brokers, then the front end. Anything started is stopped again on error.
    pub async fn start(config: Config, run_dir: &Path, front_end: FrontEnd) -> Result<Local, UpError> {
        Local::start_with(config, run_dir, front_end, None).await
    }

    /// As [`Local::start`]; with `instances` (N >= 2), etcd first, then the brokers, then N
    /// meshgate instances, each with its own config ([`instance_config`]). They run in this
    /// process, so stopping it stops them, however it ends.
    pub async fn start_with(
        config: Config,
        run_dir: &Path,
        front_end: FrontEnd,
        instances: Option<Instances>,
    ) -> Result<Local, UpError> {
        let instances = instances.filter(|i| i.count > 1);
        // Every instance's config is checked before anything starts.
        let etcd_addr = match instances {
            Some(n) => Some(etcd_address(&config, n)?),
            None => None,
        };
        let configs = match (instances, etcd_addr) {
            (Some(n), Some(addr)) => {
                if front_end == FrontEnd::Nginx {
                    return Err(UpError::Usage(
                        "--instances runs meshgate instances: leave out --front-end nginx".into(),
                    ));
                }
                (0..n.count)
                    .map(|i| instance_config(&config, i, &format!("http://{addr}")))
                    .collect::<Result<_, _>>()?
            }
            _ => vec![config.clone()],
        };
        let run = RunDir::new(run_dir)?;
        let etcd = match etcd_addr {
            Some(addr) => Some(EtcdProcess::start(&run, addr).await?),
            None => None,
        };
        let mut local = Local { run, etcd, brokers: Vec::new(), front: None, replicator: None, front_end, config };
        match cluster::start_brokers(&local.config, &local.run, false).await {
            Ok(b) => local.brokers = b,
            Err(e) => {
                local.stop().await;
                return Err(e.into());
            }
        }
        let front = match front_end {
            FrontEnd::Meshgate => {
                let mut started = Vec::new();
                let mut failed = None;
                for c in configs {
                    match Meshgate::start(c).await {
                        Ok(m) => started.push(m),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                // What did start is stopped with the rest below.
                local.front = Some(Front::Meshgate(started));
                match failed {
                    Some(e) => Err(e.into()),
                    None => {
                        local.wait_for_leader().await;
                        Ok(local.front.take().expect("just set"))
                    }
                }
            }
            FrontEnd::Nginx => local.start_nginx().await.map(Front::Nginx),
        };
        match front {
            Ok(f) => local.front = Some(f),
            Err(e) => {
                local.stop().await;
                return Err(e);
            }
        }
        if front_end == FrontEnd::Nginx && local.config.replication.enabled {
            let parts = meshgate::Parts { proxy: false, replication: true };
            match Meshgate::start_parts(local.config.clone(), parts).await {
                Ok(m) => local.replicator = Some(Box::new(m)),
                Err(e) => {
                    local.stop().await;
                    return Err(e.into());
                }
            }
        }
        Ok(local)
    }

    async fn start_nginx(&self) -> Result<std::process::Child, UpError> {
        let prefix = self.run.root.join("nginx");
        std::fs::create_dir_all(&prefix).map_err(|err| cluster::ClusterError::Io {
            what: "cannot create",
            path: prefix.display().to_string(),
            err,
        })?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, cluster::nginx::render(&self.config)).map_err(|err| cluster::ClusterError::Io {
            what: "cannot write",
            path: conf.display().to_string(),
            err,
        })?;
        Ok(cluster::nginx::start(&conf, &prefix, &self.config.listen.mqtt).await?)
    }

    /// The in-process meshgate: the proxy (with `--instances`, meshgate-1), or with nginx in
    /// front the replicator.
    pub fn meshgate(&self) -> Option<&Meshgate> {
        match &self.front {
            Some(Front::Meshgate(m)) => m.first(),
            _ => self.replicator.as_deref(),
        }
    }

    /// Every in-process meshgate instance, meshgate-1 first.
    pub fn instances(&self) -> &[Meshgate] {
        match &self.front {
            Some(Front::Meshgate(m)) => m,
            _ => &[],
        }
    }

    /// Waits until every instance names the same leader (the summary says which), up to
    /// [`ELECTED_WITHIN`]; without coordination there is nothing to wait for.
    async fn wait_for_leader(&self) {
        if self.etcd.is_none() {
            return;
        }
        let deadline = Instant::now() + ELECTED_WITHIN;
        while self.leader().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The instance that leads replication, when every instance agrees on it.
    pub fn leader(&self) -> Option<String> {
        let mut seen = self.instances().iter().map(|m| m.coordination().and_then(|c| c.status().leader));
        let first = seen.next()??;
        seen.all(|l| l.as_deref() == Some(first.as_str())).then_some(first)
    }

    pub fn broker_pids(&self) -> Vec<(String, u32)> {
        self.brokers.iter().map(|b| (b.name.clone(), b.pid())).collect()
    }

    /// What runs where, and how to try it.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let mut s = String::from("meshgate local system is up\n\n");
        if let Some(e) = &self.etcd {
            s.push_str(&format!(
                "  etcd     etcd       {:<17} pid {:<7} log {} (data {})\n",
                e.client.to_string(),
                e.pid(),
                self.run.log("etcd").display(),
                self.run.root.join("etcd").display()
            ));
        }
        for b in &self.brokers {
            s.push_str(&format!(
                "  {:<8} mosquitto  {:<17} pid {:<7} log {}\n",
                b.name,
                b.address,
                b.pid(),
                self.run.log(&b.name).display()
            ));
        }
        let mqtt = &c.listen.mqtt;
        let (host, port) = mqtt.rsplit_once(':').unwrap_or((mqtt, "1883"));
        match &self.front {
            Some(Front::Meshgate(all)) if self.etcd.is_some() => {
                let leader = self.leader();
                for m in all {
                    let name = m.coordination().map(|c| c.status().instance).unwrap_or_default();
                    let http = m.http_addr().map_or_else(|| "off".to_string(), |a| a.to_string());
                    let leads = match &leader {
                        Some(l) if *l == name => "  leads replication",
                        _ => "",
                    };
                    s.push_str(&format!(
                        "  {name:<10} meshgate {:<17} http {http:<17} pid {}{leads}\n",
                        m.mqtt_addr().to_string(),
                        std::process::id()
                    ));
                }
                if leader.is_none() {
                    s.push_str("  (no instance leads replication yet: see /instances)\n");
                }
            }
            Some(Front::Meshgate(all)) => {
                let m = &all[0];
                s.push_str(&format!("  front    meshgate   {mqtt:<17} (MQTT clients connect here)\n"));
                if let Some(http) = m.http_addr() {
                    s.push_str(&format!(
                        "  http     meshgate   {http:<17} /health /brokers /clients /events /metrics\n"
                    ));
                }
            }
            Some(Front::Nginx(child)) => {
                s.push_str(&format!(
                    "  front    nginx      {mqtt:<17} pid {} (config {})\n",
                    child.id(),
                    self.run.root.join("nginx/nginx.conf").display()
                ));
            }
            None => {}
        }
        if self.etcd.is_some() {
            s.push_str("  repl     meshgate   the leader only: every broker to every other (loop-free); another instance takes over within lease_ttl + 1 s of its death\n");
        } else if self.config.replication.enabled {
            s.push_str("  repl     meshgate   every broker to every other (loop-free), retained state converged\n");
        }
        if let Some(http) = self.replicator.as_ref().and_then(|m| m.http_addr()) {
            s.push_str(&format!("  http     meshgate   {http:<17} /replication /metrics (replication only)\n"));
        }
        // With several instances: subscribe through the first, publish through the last.
        let last = self.instances().last().map(|m| m.mqtt_addr());
        let (pub_host, pub_port) = match last.filter(|_| self.etcd.is_some()) {
            Some(a) => (a.ip().to_string(), a.port().to_string()),
            None => (host.to_string(), port.to_string()),
        };
        s.push_str(&format!(
            "\nTry it:\n  mosquitto_sub -h {host} -p {port} -t 'demo/#' -v &\n  mosquitto_pub -h {pub_host} -p {pub_port} -t demo/hello -m 'hi'\n"
        ));
        if let Some(http) = self.meshgate().and_then(|m| m.http_addr()) {
            match self.etcd.is_some() {
                true => s.push_str(&format!("  curl -s http://{http}/instances\n")),
                false => s.push_str(&format!("  curl -s http://{http}/brokers\n")),
            }
        }
        s.push_str("\nCtrl-C stops everything.\n");
        s
    }

    /// Stops the front end, then the brokers, then etcd (last: a stopping instance gives its
    /// lease back to it); leaves no process behind.
    pub async fn stop(&mut self) {
        if let Some(r) = self.replicator.take() {
            (*r).shutdown().await;
        }
        match self.front.take() {
            Some(Front::Meshgate(all)) => {
                // Together: each may wait out its sessions' grace period.
                let mut stopping = tokio::task::JoinSet::new();
                for m in all {
                    stopping.spawn(m.shutdown());
                }
                while stopping.join_next().await.is_some() {}
            }
            Some(Front::Nginx(mut child)) => {
                cluster::stop_pid(child.id(), Duration::from_secs(3));
                let _ = child.wait();
            }
            None => {}
        }
        let brokers = std::mem::take(&mut self.brokers);
        let run_root: PathBuf = self.run.root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for mut b in brokers {
                b.stop(Duration::from_secs(3));
                // A broker restarted by the suite after a kill is no child of ours; its pid
                // file names it.
                let pid_file = run_root.join(format!("{}.pid", b.name));
                if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                    if pid != b.pid() && cluster::alive(pid) {
                        cluster::stop_pid(pid, Duration::from_secs(3));
                    }
                }
                let _ = std::fs::remove_file(pid_file);
            }
        })
        .await;
        if let Some(mut e) = self.etcd.take() {
            let _ = tokio::task::spawn_blocking(move || e.stop(Duration::from_secs(3))).await;
        }
    }
}

/// etcd's client address: the one given, or the config's MQTT address with port
/// [`etcd::DEFAULT_CLIENT_PORT`] (so a test's own loopback address carries its own etcd).
fn etcd_address(config: &Config, n: Instances) -> Result<SocketAddr, UpError> {
    if let Some(a) = n.etcd {
        return Ok(a);
    }
    let mqtt: SocketAddr = shifted("listen.mqtt", &config.listen.mqtt, 0, 0)?.parse().expect("shifted gives ip:port");
    Ok(SocketAddr::new(mqtt.ip(), etcd::DEFAULT_CLIENT_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: &str) -> Config {
        let text = format!(
            "[listen]\nmqtt = \"127.0.0.1:1883\"\nhttp = \"127.0.0.1:8080\"\n{extra}\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.10:1883\"\n"
        );
        Config::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn each_instance_gets_the_next_loopback_address_and_its_own_files() {
        let mut c = base("");
        c.sessions.state_file = Some(PathBuf::from("/r/sessions-state.json"));
        c.access_log.path = Some(PathBuf::from("/r/access.log"));
        let i = instance_config(&c, 1, "http://127.0.0.1:2389").unwrap();
        assert_eq!(i.listen.mqtt, "127.0.0.2:1883");
        assert_eq!(i.listen.http.as_deref(), Some("127.0.0.2:8081"));
        assert!(i.replication.enabled);
        let co = i.coordination.unwrap();
        assert_eq!((co.instance.as_str(), co.etcd[0].as_str()), ("meshgate-2", "http://127.0.0.1:2389"));
        assert_eq!(i.sessions.state_file.unwrap(), Path::new("/r/sessions-state-meshgate-2.json"));
        assert_eq!(i.access_log.path.unwrap(), Path::new("/r/access-meshgate-2.log"));
        let first = instance_config(&c, 0, "http://x:1").unwrap();
        assert_eq!(
            (first.listen.mqtt.as_str(), first.listen.http.as_deref()),
            ("127.0.0.1:1883", Some("127.0.0.1:8080"))
        );
        let etcd = etcd_address(&c, Instances { count: 2, etcd: None }).unwrap();
        assert_eq!(etcd.to_string(), "127.0.0.1:2389");
    }

    #[test]
    fn addresses_other_than_loopback_are_refused_in_one_line() {
        let mut c = base("");
        c.listen.mqtt = "0.0.0.0:1883".into();
        let e = instance_config(&c, 1, "http://x:1").unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("listen.mqtt"), "{e}");
        let mut c = base("");
        c.listen.mqtt = "127.255.255.255:1883".into();
        assert!(instance_config(&c, 1, "http://x:1").is_err(), "past 127/8");
        let c = base("[replication]\nenabled = true\nmax_qos = 2\n");
        assert!(instance_config(&c, 0, "http://x:1").unwrap_err().to_string().contains("max_qos"));
    }
}
