//! `meshgate suite`: the reference design's test categories as real scenarios against a running broker network.
//!
//! A scenario talks MQTT to the front end (meshgate or nginx) and directly to each broker, and
//! fails brokers through a [`BrokerControl`] (pid files of the local system, or a test harness).
//! Results are data ([`model`]); [`report`] turns them into JSON lines, HTML and a summary.

pub mod chaos;
pub mod model;
pub mod report;
mod scenarios;

use std::time::Duration;

use crate::cluster::{self, RunDir};
pub use chaos::{ChaosOptions, FaultMode};
use meshgate::config::Config;
pub use model::{Run, ScenarioResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Connectivity,
    Replication,
    Retained,
    Failover,
    Clients,
}

impl Scenario {
    pub const ALL: [Scenario; 5] =
        [Scenario::Connectivity, Scenario::Replication, Scenario::Retained, Scenario::Failover, Scenario::Clients];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connectivity => "connectivity",
            Scenario::Replication => "replication",
            Scenario::Retained => "retained",
            Scenario::Failover => "failover",
            Scenario::Clients => "clients",
        }
    }
}

/// How a scenario fails and recovers brokers.
pub trait BrokerControl: Send + Sync {
    fn kill(&self, name: &str) -> Result<(), String>;
    /// SIGSTOP: the kernel still accepts TCP, nothing answers MQTT.
    fn hang(&self, name: &str) -> Result<(), String>;
    fn resume(&self, name: &str) -> Result<(), String>;
    /// Starts a killed broker again and returns once it answers MQTT.
    fn restart(&self, name: &str) -> Result<(), String>;
}

/// What the scenarios run against.
pub struct Target {
    /// `meshgate` or `nginx`: labels the report and sets what is expected.
    pub front_end: String,
    /// MQTT address of the front end.
    pub front: String,
    /// meshgate's HTTP API, when there is one to ask (clients per broker).
    pub http: Option<String>,
    /// (name, address) of every broker, primary first.
    pub brokers: Vec<(String, String)>,
    pub control: Box<dyn BrokerControl>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Length of the clients scenario and of each failover fault window.
    pub duration: Duration,
    /// Simulated clients in the clients scenario (half sensors, half control).
    pub clients: usize,
    /// Print progress lines to stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { duration: Duration::from_secs(6), clients: 10, progress: true }
    }
}

fn new_run(target: &Target) -> Run {
    Run {
        front_end: target.front_end.clone(),
        front_address: target.front.clone(),
        started_ms: meshgate::events::unix_ms(std::time::SystemTime::now()),
        results: Vec::new(),
    }
}

/// The chaos run (its own command: long, with its own options).
pub async fn run_chaos(target: &Target, opts: &ChaosOptions) -> Run {
    let mut run = new_run(target);
    if opts.progress {
        eprintln!(
            "[{}] chaos: {} publishers, {} subscribers, a fault every {:?} for {:?} ...",
            target.front_end, opts.publishers, opts.subscribers, opts.cycle, opts.duration
        );
    }
    let started = std::time::Instant::now();
    let mut r = chaos::chaos(target, opts).await;
    r.duration_ms = started.elapsed().as_millis() as u64;
    if opts.progress {
        eprintln!("[{}] chaos {}: {}", target.front_end, if r.passed { "PASS" } else { "FAIL" }, r.summary);
    }
    run.results.push(r);
    run
}

/// The longest a scenario waits for the system to settle before it starts.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// One GET to meshgate's HTTP API, the body as JSON.
pub(crate) async fn get_json(http: &str, path: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_millis(500);
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(http)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut body)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&body);
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

/// One GET to an HTTP server on `http` (host:port), the body as text; HTTP/1.0, so a large
/// body (etcd's /metrics) comes whole rather than in chunks.
pub(crate) async fn get_text(http: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_millis(500);
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(http)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut body)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&body);
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

/// Why the system is not settled now, or `None` when it is: every broker answers MQTT and,
/// where meshgate's API is there, every broker is available and no session is still to be
/// moved (a failback or drain left over from the scenario before).
async fn unsettled(t: &Target) -> Option<String> {
    for (name, addr) in &t.brokers {
        if !meshgate::health::probe::answers_mqtt(addr, Duration::from_millis(500)).await {
            return Some(format!("{name} does not answer MQTT"));
        }
    }
    let http = t.http.as_deref()?;
    let Some(h) = get_json(http, "/health").await else { return Some(format!("no answer from {http}/health")) };
    let (total, available) = (h["brokers_total"].as_u64(), h["brokers_available"].as_u64());
    if total != available {
        return Some(format!("{} of {} brokers available", available.unwrap_or(0), total.unwrap_or(0)));
    }
    match h["moves_pending"].as_u64() {
        Some(0) => None,
        Some(n) => Some(format!("{n} session(s) still to be moved (failback or drain in progress)")),
        None => Some("no moves_pending in /health".into()),
    }
}

/// Waits, with a deadline, until the system is settled; says what was still wrong if not.
pub async fn settle(t: &Target, limit: Duration) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    loop {
        match unsettled(t).await {
            None => return Ok(started.elapsed()),
            Some(why) if started.elapsed() >= limit => return Err(format!("not settled after {limit:?}: {why}")),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn run(target: &Target, scenarios: &[Scenario], opts: &Options) -> Run {
    let mut run = new_run(target);
    for &s in scenarios {
        if opts.progress {
            eprintln!("[{}] {} ...", target.front_end, s.name());
        }
        // Each scenario starts from a settled system, not from the tail of the one before.
        if let Err(why) = settle(target, SETTLE_LIMIT).await {
            if opts.progress {
                eprintln!("[{}] {} FAIL: {why}", target.front_end, s.name());
            }
            let mut r = ScenarioResult::new(s.name());
            r.passed = false;
            r.summary = why;
            run.results.push(r);
            continue;
        }
        let started = std::time::Instant::now();
        let mut r = match s {
            Scenario::Connectivity => scenarios::connectivity(target, opts).await,
            Scenario::Replication => scenarios::replication(target, opts).await,
            Scenario::Retained => scenarios::retained(target, opts).await,
            Scenario::Failover => scenarios::failover(target, opts).await,
            Scenario::Clients => scenarios::clients(target, opts).await,
        };
        r.duration_ms = started.elapsed().as_millis() as u64;
        if opts.progress {
            eprintln!("[{}] {} {}: {}", target.front_end, s.name(), if r.passed { "PASS" } else { "FAIL" }, r.summary);
        }
        run.results.push(r);
    }
    run
}

/// Fails brokers of the local system through the run directory's pid files, so it works
/// against `meshgate up` and `meshgate cluster up` from another process.
pub struct PidFileControl {
    pub config: Config,
    pub run: RunDir,
}

impl PidFileControl {
    fn signal(&self, name: &str, sig: nix::sys::signal::Signal) -> Result<(), String> {
        let pid = self
            .run
            .read_pid(name)
            .ok_or_else(|| format!("no pid file for {name} in {}: is the local system up?", self.run.root.display()))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| format!("signal {sig} to {name} (pid {pid}): {e}"))
    }
}

impl BrokerControl for PidFileControl {
    fn kill(&self, name: &str) -> Result<(), String> {
        self.signal(name, nix::sys::signal::Signal::SIGKILL)?;
        let pid = self.run.read_pid(name).unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cluster::alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
    fn hang(&self, name: &str) -> Result<(), String> {
        self.signal(name, nix::sys::signal::Signal::SIGSTOP)
    }
    fn resume(&self, name: &str) -> Result<(), String> {
        self.signal(name, nix::sys::signal::Signal::SIGCONT)
    }
    fn restart(&self, name: &str) -> Result<(), String> {
        let (config, run) = (self.config.clone(), RunDir { root: self.run.root.clone() });
        let name = name.to_string();
        // Called from async scenario code through block_in_place; a fresh runtime keeps this
        // independent of the caller's.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(cluster::restart_broker(&config, &run, &name)).map(|_| ()).map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "restart thread panicked".to_string())?
    }
}

impl Target {
    /// The local system of `config`, failed through the pid files in `run_dir`.
    pub fn local(config: &Config, run_dir: &std::path::Path, front_end: &str) -> Result<Target, cluster::ClusterError> {
        Ok(Target {
            front_end: front_end.to_string(),
            front: config.listen.mqtt.clone(),
            http: config.listen.http.clone(),
            brokers: config.brokers.iter().map(|b| (b.name.clone(), b.address.clone())).collect(),
            control: Box::new(PidFileControl { config: config.clone(), run: RunDir::new(run_dir)? }),
        })
    }
}
