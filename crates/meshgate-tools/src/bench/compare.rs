//! `meshgate bench compare`: one Mosquitto (and a backup for the failover load), nginx with
//! the shipped stream config, HAProxy from Debian's package with an MQTT CONNECT/CONNACK
//! check, and meshgate, all on 127.200.x.x; the same loads against each front end (and the
//! broker directly) in an order that rotates every round; medians and meshgate's ratios to
//! the others, written as JSON, a markdown table and SVG charts.
//!
//! Every load runs as its own `meshgate bench ... --json` process, so the generator has a
//! fresh runtime and the orchestrator never shares a core's time slice with it. Idle-session
//! and failover runs start the brokers and the front end under test afresh, so memory and
//! failure state do not carry over from an earlier run.
//!
//! `--coordination` compares meshgate with itself instead: the same config in front of the
//! same Mosquitto, once without `[coordination]` and once with it against a real etcd started
//! here ([`super::etcd`]); CONNECT rate and latency, CPU per message and per CONNECT, etcd's
//! own CPU apart, into its own section of docs/benchmarks.md.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::load::CpuWindow;
use super::stats::median;
use super::Report;
use super::{etcd, report};
use crate::{cluster, procfs};

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// CI mode: every load once for about a second, small counts; checks that every front end
    /// answered and numbers came out, nothing about speed. Writes to a temp dir unless --out.
    #[arg(long)]
    pub smoke: bool,
    /// Rounds; the front-end order rotates each round and medians are reported.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Measurement time of each throughput, latency and connection-rate run.
    #[arg(long, value_parser = super::duration)]
    pub duration: Option<Duration>,
    /// Idle sessions held per run (each costs a proxy two file descriptors of its 20,000).
    #[arg(long)]
    pub idle_sessions: Option<usize>,
    /// Clients connected when the primary hangs.
    #[arg(long)]
    pub failover_clients: Option<usize>,
    /// How long a failover run waits for every client to be back.
    #[arg(long, value_parser = super::duration)]
    pub failover_deadline: Option<Duration>,
    /// Where benchmarks.md, benchmarks.json and the charts go (default docs/, smoke: a temp dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// First three octets of the addresses used (must be under 127.200).
    #[arg(long)]
    pub net: Option<String>,
    /// The meshgate binary to run as the front end and as the load generator (default: this one).
    #[arg(long)]
    pub meshgate_bin: Option<PathBuf>,
    /// Front ends to include (comma-separated): direct, nginx, haproxy, meshgate [default: all
    /// four; with --coordination meshgate without and with it, always].
    #[arg(long, value_delimiter = ',')]
    pub front_ends: Option<Vec<String>>,
    /// Loads to run (comma-separated): qos0, qos0x16, qos1, qos1x16, latency, connect, idle,
    /// idle_tls and idle_ws (idle sessions through meshgate's TLS and WebSocket listeners,
    /// meshgate only), failover [default: all; with --coordination qos0,qos1,connect, and the
    /// idle loads and failover are not offered].
    #[arg(long, value_delimiter = ',')]
    pub loads: Option<Vec<String>>,
    /// Coordination off vs on instead of the four front ends: meshgate with the same config in
    /// front of the same Mosquitto, without `[coordination]` and with it against a real etcd
    /// started here (Debian's etcd-server); writes its own section of docs/benchmarks.md.
    #[arg(long)]
    pub coordination: bool,
    /// etcd's client address with --coordination (loopback; its peer URL takes the next port)
    /// [default: <net>.20:23790].
    #[arg(long)]
    pub etcd: Option<SocketAddr>,
    /// meshgate's `[proxy] workers`: 1 by default, the thread budget of the shipped nginx
    /// (`worker_processes 1`); 0 = one per core, meshgate's own default.
    #[arg(long, default_value_t = 1)]
    pub meshgate_workers: u32,
    /// Idle sessions held through the front end beside every throughput, latency and
    /// connection run (opened before the run by a second generator, closed after it): how the
    /// per-message and per-CONNECT costs grow with connected sessions.
    #[arg(long, default_value_t = 0)]
    pub beside: usize,
    /// The latency load's offered rate, msg/s [default: half the slowest front end's QoS 0
    /// maximum in this run]; fixed, runs with different --beside compare at the same rate.
    #[arg(long)]
    pub latency_rate: Option<f64>,
    /// Pin processes to cores: each front end (and its workers) on the last CPU, Mosquitto, the
    /// load generator and etcd on the others, the same for every front end, so the front end's
    /// cost is measured apart from contention. `off`: wherever the scheduler puts them.
    /// `auto` (the default) pins where there are two CPUs or more and says when it cannot.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub pin: String,
    /// Extra arguments for every load generator run (e.g. "--threads 2").
    #[arg(long, allow_hyphen_values = true)]
    pub bench_args: Option<String>,
    /// Write the report (markdown, charts) again from an earlier run's benchmarks.json; runs nothing.
    #[arg(long, value_name = "JSON")]
    pub rerender: Option<PathBuf>,
    /// Keep the brokers' and front ends' configs and logs (the path is printed at the end).
    #[arg(long)]
    pub keep_logs: bool,
    /// Set by `cargo bench` for harness-less bench targets; `meshgate bench compare` ignores it.
    #[arg(long, hide = true)]
    pub bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum FrontEnd {
    Direct,
    Nginx,
    Haproxy,
    Meshgate,
    /// meshgate with `[coordination]` against the etcd the comparison runs (`--coordination`).
    #[serde(rename = "meshgate_etcd")]
    MeshgateEtcd,
}

impl FrontEnd {
    pub const ALL: [FrontEnd; 4] = [FrontEnd::Direct, FrontEnd::Nginx, FrontEnd::Haproxy, FrontEnd::Meshgate];

    pub fn label(self) -> &'static str {
        match self {
            FrontEnd::Direct => "direct",
            FrontEnd::Nginx => "nginx",
            FrontEnd::Haproxy => "HAProxy",
            FrontEnd::Meshgate => "meshgate",
            FrontEnd::MeshgateEtcd => "meshgate + etcd",
        }
    }

    fn parse(s: &str) -> anyhow::Result<FrontEnd> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "direct" | "mosquitto" => FrontEnd::Direct,
            "nginx" => FrontEnd::Nginx,
            "haproxy" => FrontEnd::Haproxy,
            "meshgate" => FrontEnd::Meshgate,
            other => bail!("unknown front end {other:?} (direct, nginx, haproxy, meshgate)"),
        })
    }

    /// Last octet of its listen address.
    fn octet(self) -> u8 {
        match self {
            FrontEnd::Direct => 10,
            FrontEnd::Meshgate => 1,
            FrontEnd::Nginx => 2,
            FrontEnd::Haproxy => 3,
            FrontEnd::MeshgateEtcd => 4,
        }
    }
}

/// The loads of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum LoadKind {
    Qos0,
    Qos0x16,
    Qos1,
    Qos1x16,
    Latency,
    Connect,
    Idle,
    /// Idle sessions through meshgate's TLS listener (meshgate only).
    IdleTls,
    /// Idle sessions through meshgate's WebSocket listener (meshgate only).
    IdleWs,
    Failover,
}

impl LoadKind {
    pub const ALL: [LoadKind; 10] = [
        LoadKind::Qos0,
        LoadKind::Qos0x16,
        LoadKind::Qos1,
        LoadKind::Qos1x16,
        LoadKind::Latency,
        LoadKind::Connect,
        LoadKind::Idle,
        LoadKind::IdleTls,
        LoadKind::IdleWs,
        LoadKind::Failover,
    ];

    /// Loads only meshgate takes: its TLS and WebSocket listeners (the other front ends are
    /// compared over TCP).
    pub fn meshgate_only(self) -> bool {
        matches!(self, LoadKind::IdleTls | LoadKind::IdleWs)
    }

    fn idle(self) -> bool {
        matches!(self, LoadKind::Idle | LoadKind::IdleTls | LoadKind::IdleWs)
    }

    pub fn label(self) -> &'static str {
        match self {
            LoadKind::Qos0 => "QoS 0, 1 pub / 1 sub",
            LoadKind::Qos0x16 => "QoS 0, 16 pub / 16 sub",
            LoadKind::Qos1 => "QoS 1, 1 pub / 1 sub",
            LoadKind::Qos1x16 => "QoS 1, 16 pub / 16 sub",
            LoadKind::Latency => "latency at half load",
            LoadKind::Connect => "connection setup",
            LoadKind::Idle => "idle sessions",
            LoadKind::IdleTls => "idle sessions, TLS",
            LoadKind::IdleWs => "idle sessions, WebSocket",
            LoadKind::Failover => "failover under load",
        }
    }

    fn parse(s: &str) -> anyhow::Result<LoadKind> {
        let s = s.trim().to_ascii_lowercase();
        LoadKind::ALL
            .into_iter()
            .find(|l| serde_json::to_value(l).ok().and_then(|v| v.as_str().map(|v| v == s)).unwrap_or(false))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown load {s:?} (qos0, qos0x16, qos1, qos1x16, latency, connect, idle, idle_tls, idle_ws, failover)"
                )
            })
    }
}

/// Ports of meshgate's TLS and WebSocket listeners, on its MQTT listener's address.
const TLS_PORT: u16 = 8883;
const WS_PORT: u16 = 8083;

/// A throwaway CA (`listener-ca.pem`, what the TLS idle load trusts) and the certificate of
/// meshgate's TLS listener (`listener.pem`, `listener.key`) for "localhost" and every address
/// of `net`, in `dir`.
fn listener_certificate(dir: &std::path::Path, net: &str) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "meshgate bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    for last in 0..=255u8 {
        if let Ok(ip) = format!("{net}.{last}").parse() {
            server.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
    std::fs::write(dir.join("listener-ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("listener.pem"), cert.pem())?;
    std::fs::write(dir.join("listener.key"), key.serialize_pem())?;
    Ok(())
}

/// The resolved plan of one comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub smoke: bool,
    pub rounds: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload: usize,
    pub idle_sessions: usize,
    pub failover_clients: usize,
    pub failover_deadline_s: f64,
    pub connect_concurrency: usize,
    pub front_ends: Vec<FrontEnd>,
    pub loads: Vec<LoadKind>,
    /// The rate of the latency load (half the slowest front end's QoS 0 1/1 median).
    pub latency_rate: Option<f64>,
    /// meshgate's `[proxy] workers` (0 = one per core); absent in runs made before it existed,
    /// which used one per core.
    #[serde(default)]
    pub meshgate_workers: u32,
    pub net: String,
    /// Idle sessions held beside each steady run (`--beside`).
    #[serde(default)]
    pub beside: usize,
    /// Where processes ran (`--pin on`), as the report states it; `None`: not pinned.
    #[serde(default)]
    pub placement: Option<Placement>,
    pub command: String,
    /// `--coordination`: meshgate without and with `[coordination]`, not the four front ends.
    #[serde(default)]
    pub coordination: bool,
    /// etcd's client address in a coordination run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
}

/// One load against one front end in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub load: LoadKind,
    pub front_end: FrontEnd,
    pub round: usize,
    pub report: Option<Report>,
    pub error: Option<String>,
    /// meshgate with `[coordination]`: what reached etcd during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordination: Option<CoordinationRun>,
}

/// One run of a `--coordination` comparison as the comparison itself measured it: from just
/// before the load generator started until meshgate's claim queue was empty again (without
/// `[coordination]`, until the generator exited), so the claims written after the last
/// client count too.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinationRun {
    /// etcd's applied writes (with `[coordination]`).
    pub etcd_writes: Option<etcd::Writes>,
    /// From the load generator's exit until meshgate had no claim left to write: how far the
    /// claims writer was behind the clients (with `[coordination]`).
    pub claims_drained_s: Option<f64>,
    /// The whole window, seconds.
    pub settled_s: f64,
    /// CPU time over the window: meshgate's, Mosquitto's and etcd's (with `[coordination]`).
    pub meshgate_cpu_ns: Option<u64>,
    pub mosquitto_cpu_ns: Option<u64>,
    pub etcd_cpu_ns: Option<u64>,
}

impl CoordinationRun {
    /// CPU time per CONNECT of one of the three, µs, for a connection-setup run.
    pub fn per_connect(&self, ns: Option<u64>, report: &Report) -> Option<f64> {
        match report {
            Report::Connect(c) if c.connects > 0 => Some(ns? as f64 / 1000.0 / c.connects as f64),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub settings: Settings,
    pub runs: Vec<Run>,
    pub started: String,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub os: String,
    pub kernel: String,
    pub open_files: String,
    pub mosquitto: String,
    pub nginx: String,
    pub haproxy: String,
    pub meshgate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
}

/// The CPUs of a pinned run: the front end under test on its own, everything else beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placement {
    pub front_end: Vec<usize>,
    pub rest: Vec<usize>,
}

impl Placement {
    /// The last allowed CPU for the front end, the others for the rest.
    fn of(cpus: &[usize]) -> anyhow::Result<Placement> {
        match cpus.split_last() {
            Some((&last, rest)) if !rest.is_empty() => Ok(Placement { front_end: vec![last], rest: rest.to_vec() }),
            _ => bail!(
                "pinning needs two CPUs (one for the front end, one for Mosquitto and the load generator); this process may use {}: run with --pin off",
                cpus.len()
            ),
        }
    }

    pub fn describe(&self) -> String {
        let list = |c: &[usize]| c.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        format!(
            "the front end under test (all its processes and threads) on CPU {}; Mosquitto, the load generator, etcd and this orchestrator on CPU {}",
            list(&self.front_end),
            list(&self.rest)
        )
    }
}

pub fn main(a: CompareArgs) -> anyhow::Result<()> {
    if let Some(json) = &a.rerender {
        let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let results: Results = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let out = a.out.clone().unwrap_or_else(|| PathBuf::from("docs"));
        let summary = report::Summary::of(&results);
        report::write(&results, &summary, &out)?;
        println!("{}", summary.text_table());
        return Ok(());
    }
    let smoke = a.smoke;
    let coordination = a.coordination;
    let front_ends: Vec<FrontEnd> = match (&a.front_ends, coordination) {
        (Some(_), true) => bail!("--coordination compares meshgate without and with [coordination]: no --front-ends"),
        (None, true) => vec![FrontEnd::Meshgate, FrontEnd::MeshgateEtcd],
        (Some(f), false) => f.iter().map(|s| FrontEnd::parse(s)).collect::<Result<_, _>>()?,
        (None, false) => FrontEnd::ALL.to_vec(),
    };
    let loads: Vec<LoadKind> = match &a.loads {
        Some(l) => l.iter().map(|s| LoadKind::parse(s)).collect::<Result<_, _>>()?,
        None if coordination => vec![LoadKind::Qos0, LoadKind::Qos1, LoadKind::Connect],
        None => LoadKind::ALL.to_vec(),
    };
    if coordination && a.beside > 0 {
        // A coordination run waits until meshgate holds no session, which held ones prevent.
        bail!("--beside holds sessions through the front end; --coordination runs wait for none to be left: use one or the other");
    }
    if a.latency_rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--latency-rate must be a rate above 0 msg/s");
    }
    if coordination {
        // Both need fresh processes per run, and a claim's cost is in the steady loads already.
        if let Some(l) = loads.iter().find(|l| l.idle() || **l == LoadKind::Failover) {
            bail!("--coordination runs qos0, qos0x16, qos1, qos1x16, latency and connect, not {}", l.label());
        }
    }
    // Blocks of their own, so a coordination smoke test can run beside the comparison's.
    let default_net = match (coordination, smoke) {
        (false, false) => "127.200.0",
        (false, true) => "127.200.1",
        (true, false) => "127.200.2",
        (true, true) => "127.200.3",
    };
    let net = a.net.clone().unwrap_or_else(|| default_net.to_string());
    anyhow::ensure!(
        net.starts_with("127.200.") && net.split('.').count() == 3,
        "--net must be three octets under 127.200 (e.g. 127.200.0), got {net:?}"
    );
    let etcd_addr = coordination.then(|| a.etcd.unwrap_or_else(|| format!("{net}.20:23790").parse().expect("valid")));
    let settings = Settings {
        smoke,
        rounds: a.rounds.unwrap_or(if smoke { 1 } else { 3 }).max(1),
        duration_s: a.duration.unwrap_or(Duration::from_secs(if smoke { 1 } else { 3 })).as_secs_f64(),
        warmup_s: if smoke { 0.2 } else { 0.5 },
        payload: 80,
        idle_sessions: a.idle_sessions.unwrap_or(if smoke { 200 } else { 9000 }),
        failover_clients: a.failover_clients.unwrap_or(if smoke { 100 } else { 1000 }),
        failover_deadline_s: a
            .failover_deadline
            .unwrap_or(Duration::from_secs(if smoke { 4 } else { 8 }))
            .as_secs_f64(),
        connect_concurrency: 16,
        front_ends,
        loads,
        latency_rate: a.latency_rate,
        beside: a.beside,
        meshgate_workers: a.meshgate_workers,
        net,
        placement: match (a.pin.as_str(), Placement::of(&procfs::allowed_cpus())) {
            ("off", _) => None,
            ("on", p) => Some(p?),
            (_, Ok(p)) => Some(p),
            (_, Err(e)) => {
                eprintln!("not pinned: {e}");
                None
            }
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
        coordination,
        etcd: etcd_addr.map(|a| a.to_string()),
    };
    let bin = match &a.meshgate_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this executable")?,
    };
    preflight(&settings)?;
    let out = match (&a.out, smoke) {
        (Some(o), _) => o.clone(),
        (None, false) => PathBuf::from("docs"),
        (None, true) => std::env::temp_dir().join(format!("meshgate-bench-smoke-{}", std::process::id())),
    };
    let extra: Vec<String> = a.bench_args.as_deref().unwrap_or("").split_whitespace().map(str::to_owned).collect();
    // Read before pinning: the machine's cores, not the ones this process is left with.
    let mut machine = machine();
    if let Some(p) = &settings.placement {
        // Everything this process starts inherits the rest's CPUs; front ends are started on
        // theirs (`Comparison::start`).
        procfs::pin_self(&p.rest).context("pinning the benchmark to its CPUs")?;
        eprintln!("placement: {}", p.describe());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let work = std::env::temp_dir().join(format!("meshgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    listener_certificate(&work, &settings.net).context("writing the TLS listener's certificate")?;
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // On SIGINT or SIGTERM the comparison is dropped, and with it every process it started
    // (brokers, front ends, load generators), so a stopped run leaves nothing behind.
    let result = rt.block_on(async {
        let run = Comparison { s: settings, bin, work: work.clone(), extra, runs: Vec::new(), etcd: etcd_addr }.run();
        tokio::select! {
            r = run => r,
            sig = stop_signal() => Err(anyhow::anyhow!("stopped by {}; every process it started was stopped", sig?)),
        }
    });
    if a.keep_logs {
        eprintln!("configs and logs kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    let (settings, runs) = result?;
    if settings.coordination {
        machine.etcd = Some(first_line("etcd", &["--version"]));
    }
    let results = Results { machine, settings, runs, started: started_at, elapsed_s: started.elapsed().as_secs_f64() };
    let summary = report::Summary::of(&results);
    report::write(&results, &summary, &out)?;
    println!("{}", summary.text_table());
    let files = report::Files::of(&results.settings);
    eprintln!(
        "wrote {} (JSON {}, charts {}*.svg) in {:.0} s",
        out.join("benchmarks.md").display(),
        out.join(files.json).display(),
        files.chart_prefix,
        results.elapsed_s
    );
    let failed: Vec<String> = results
        .runs
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} / {} / round {}: {e}", r.load.label(), r.front_end.label(), r.round + 1))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{} run(s) failed; first: {}", failed.len(), failed[0]);
    }
    if smoke {
        report::check_smoke(&results)?;
        eprintln!("smoke: every front end answered every load and produced numbers");
    }
    Ok(())
}

async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn preflight(s: &Settings) -> anyhow::Result<()> {
    cluster::mosquitto_binary()?;
    if s.front_ends.contains(&FrontEnd::Nginx) {
        cluster::nginx::nginx_binary()?;
    }
    if s.front_ends.contains(&FrontEnd::Haproxy) {
        haproxy_binary()?;
    }
    if s.front_ends.contains(&FrontEnd::MeshgateEtcd) {
        etcd::binary()?;
    }
    Ok(())
}

fn haproxy_binary() -> anyhow::Result<PathBuf> {
    find_binary("haproxy").ok_or_else(|| {
        anyhow::anyhow!(
            "haproxy is not installed: install it with `sudo apt-get install -y haproxy` (or `scripts/deps test`)"
        )
    })
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Comparison {
    s: Settings,
    bin: PathBuf,
    work: PathBuf,
    extra: Vec<String>,
    runs: Vec<Run>,
    /// etcd's client address, with `--coordination`.
    etcd: Option<SocketAddr>,
}

/// A started process we own: stopped (SIGTERM, then SIGKILL) and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        cluster::stop_pid(self.child.id(), Duration::from_secs(3));
        let _ = self.child.wait();
    }
}

/// The idle sessions of `--beside`, held by a generator that is killed with this (the child is
/// `kill_on_drop`). [`Beside::finish`] closes them and waits until they are gone.
struct Beside {
    child: tokio::process::Child,
    /// The front end's processes and its descriptors before the sessions were opened.
    pids: Vec<u32>,
    before: u64,
    /// The same for the broker, which tears the sessions down too.
    broker: Vec<u32>,
    broker_before: u64,
}

impl Beside {
    /// Closes the held sessions and waits (up to 30 s) until the front end and the broker hold
    /// no more descriptors than before they were opened, so the next run does not pay for
    /// their teardown.
    async fn finish(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        // A few descriptors of slack: a front end's own probes come and go meanwhile.
        let busy = |pids: &[u32], before: u64| procfs::fds_of(pids).is_some_and(|n| n > before + 8);
        while busy(&self.pids, self.before) || busy(&self.broker, self.broker_before) {
            if Instant::now() > deadline {
                bail!("the front end or the broker still held the idle sessions' sockets 30 s after they closed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// The processes of one setup: the brokers, the front ends started and, for meshgate with
/// `[coordination]`, etcd (dropped last, after the meshgate that uses it has stopped).
struct Setup {
    primary: Proc,
    _backup: Proc,
    front: Vec<(FrontEnd, Option<Proc>)>,
    etcd: Option<Proc>,
}

impl Setup {
    /// Pids whose memory counts as the front end's.
    fn pids(&self, fe: FrontEnd) -> Vec<u32> {
        match fe {
            FrontEnd::Direct => vec![self.primary.pid()],
            _ => self.front.iter().filter(|(f, _)| *f == fe).filter_map(|(_, p)| p.as_ref().map(Proc::pid)).collect(),
        }
    }

    /// etcd's pid where the front end is meshgate with `[coordination]`.
    fn etcd_pid(&self, fe: FrontEnd) -> Option<u32> {
        self.etcd.as_ref().filter(|_| fe == FrontEnd::MeshgateEtcd).map(Proc::pid)
    }
}

impl Comparison {
    fn addr(&self, last: u8, port: u16) -> SocketAddr {
        format!("{}.{last}:{port}", self.s.net).parse().expect("valid loopback address")
    }

    fn target(&self, fe: FrontEnd) -> SocketAddr {
        self.addr(fe.octet(), 1883)
    }

    /// meshgate's TLS or WebSocket listener: its MQTT address with another port.
    fn listener(&self, fe: FrontEnd, port: u16) -> SocketAddr {
        self.addr(fe.octet(), port)
    }

    /// The most sessions any load holds through a front end at once, which its connection
    /// limits must allow.
    fn most_sessions(&self) -> usize {
        self.s.idle_sessions.max(self.s.beside + 100).max(self.s.failover_clients)
    }

    fn total_runs(&self) -> usize {
        let fes = self.s.front_ends.len();
        let proxies = self.s.front_ends.iter().filter(|f| **f != FrontEnd::Direct).count();
        let meshgate = usize::from(self.s.front_ends.contains(&FrontEnd::Meshgate));
        let per_round = |l: &LoadKind| match l {
            LoadKind::Failover => proxies,
            l if l.meshgate_only() => meshgate,
            _ => fes,
        };
        self.s.loads.iter().map(per_round).sum::<usize>() * self.s.rounds
    }

    /// Front ends in this round's order: the list rotated by the round number.
    fn order(&self, round: usize) -> Vec<FrontEnd> {
        let mut v = self.s.front_ends.clone();
        if !v.is_empty() {
            let n = round % v.len();
            v.rotate_left(n);
        }
        v
    }

    async fn run(mut self) -> anyhow::Result<(Settings, Vec<Run>)> {
        let total = self.total_runs();
        eprintln!(
            "meshgate bench compare: {} round(s), {} front end(s), {} load(s), {total} runs{}",
            self.s.rounds,
            self.s.front_ends.len(),
            self.s.loads.len(),
            if self.s.smoke { " (smoke)" } else { "" }
        );
        let steady: Vec<LoadKind> = self
            .s
            .loads
            .iter()
            .copied()
            .filter(|l| {
                matches!(l, LoadKind::Qos0 | LoadKind::Qos0x16 | LoadKind::Qos1 | LoadKind::Qos1x16 | LoadKind::Connect)
            })
            .collect();
        let loads = self.s.loads.clone();
        let wants = |l: LoadKind| loads.contains(&l);
        if !steady.is_empty() || wants(LoadKind::Latency) {
            let setup = self.start(&self.s.front_ends.clone()).await?;
            for round in 0..self.s.rounds {
                for &load in &steady {
                    for fe in self.order(round) {
                        self.one(load, fe, round, &setup).await;
                    }
                }
            }
            if wants(LoadKind::Latency) && self.s.latency_rate.is_none() {
                // Half the slowest front end's maximum, so every front end is measured at the
                // same offered load and none is past its limit.
                let max = self
                    .s
                    .front_ends
                    .iter()
                    .filter_map(|&fe| {
                        median(&self.values(LoadKind::Qos0, fe, |r| match r {
                            Report::Pubsub(p) => Some(p.msgs_per_sec),
                            _ => None,
                        }))
                    })
                    .fold(f64::INFINITY, f64::min);
                let rate = if max.is_finite() && max > 0.0 { (max / 2.0).round() } else { 10_000.0 };
                self.s.latency_rate = Some(rate);
                eprintln!("latency load: {rate:.0} msg/s (half the slowest front end's QoS 0 maximum)");
            }
            if wants(LoadKind::Latency) {
                for round in 0..self.s.rounds {
                    for fe in self.order(round) {
                        self.one(LoadKind::Latency, fe, round, &setup).await;
                    }
                }
            }
            drop(setup);
        }
        for load in [LoadKind::Idle, LoadKind::IdleTls, LoadKind::IdleWs, LoadKind::Failover] {
            if !wants(load) {
                continue;
            }
            for round in 0..self.s.rounds {
                for fe in self.order(round) {
                    if load == LoadKind::Failover && fe == FrontEnd::Direct {
                        continue;
                    }
                    if load.meshgate_only() && fe != FrontEnd::Meshgate {
                        continue;
                    }
                    // Fresh brokers and a fresh front end: no memory or failure state carried over.
                    match self.start(&[fe]).await {
                        Ok(setup) => self.one(load, fe, round, &setup).await,
                        Err(e) => self.record(load, fe, round, Err(format!("{e:#}")), None),
                    }
                }
            }
        }
        Ok((self.s, self.runs))
    }

    fn values(&self, load: LoadKind, fe: FrontEnd, f: impl Fn(&Report) -> Option<f64>) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.load == load && r.front_end == fe)
            .filter_map(|r| r.report.as_ref().and_then(&f))
            .collect()
    }

    fn record(
        &mut self,
        load: LoadKind,
        fe: FrontEnd,
        round: usize,
        r: Result<Report, String>,
        coordination: Option<CoordinationRun>,
    ) {
        let n = self.runs.len() + 1;
        let total = self.total_runs();
        let mut line = match &r {
            Ok(rep) => report::one_line(rep),
            Err(e) => format!("FAILED: {e}"),
        };
        if let (Some(w), Some(d)) =
            (coordination.as_ref().and_then(|c| c.etcd_writes), coordination.as_ref().and_then(|c| c.claims_drained_s))
        {
            let _ = write!(
                line,
                "; etcd {} puts, {} deletes, all claims written {:.0} ms after the last client",
                w.puts,
                w.deletes,
                d * 1000.0
            );
        }
        eprintln!("[{n:>3}/{total}] round {} {:<24} {:<9} {line}", round + 1, load.label(), fe.label());
        let (report, error) = match r {
            Ok(rep) => (Some(rep), None),
            Err(e) => (None, Some(e)),
        };
        self.runs.push(Run { load, front_end: fe, round, report, error, coordination });
    }

    async fn one(&mut self, load: LoadKind, fe: FrontEnd, round: usize, setup: &Setup) {
        let target = match load {
            LoadKind::IdleTls => self.listener(fe, TLS_PORT),
            LoadKind::IdleWs => self.listener(fe, WS_PORT),
            _ => self.target(fe),
        }
        .to_string();
        let d = format!("{}s", self.s.duration_s);
        let w = format!("{}s", self.s.warmup_s);
        let mut args: Vec<String> = Vec::new();
        let pubsub = |p: usize, qos: u8| -> Vec<String> {
            let mut v: Vec<String> = vec!["pubsub".into(), "-p".into(), p.to_string(), "-s".into(), p.to_string()];
            v.extend(["--qos".into(), qos.to_string(), "--duration".into(), d.clone(), "--warmup".into(), w.clone()]);
            v.extend(["--payload".into(), self.s.payload.to_string()]);
            v
        };
        match load {
            LoadKind::Qos0 => args.extend(pubsub(1, 0)),
            LoadKind::Qos0x16 => args.extend(pubsub(16, 0)),
            LoadKind::Qos1 => args.extend(pubsub(1, 1)),
            LoadKind::Qos1x16 => args.extend(pubsub(16, 1)),
            LoadKind::Latency => {
                args.extend(pubsub(1, 0));
                args.extend(["--rate".into(), self.s.latency_rate.unwrap_or(10_000.0).to_string()]);
            }
            LoadKind::Connect => {
                args.extend(["connect".into(), "--duration".into(), d.clone()]);
                args.extend(["--concurrency".into(), self.s.connect_concurrency.to_string()]);
                // CPU time per CONNECT, of the front end and of the broker behind it.
                if fe != FrontEnd::Direct {
                    for p in setup.pids(fe) {
                        args.extend(["--pid".into(), p.to_string()]);
                    }
                }
                args.extend(["--broker-pid".into(), setup.primary.pid().to_string()]);
            }
            LoadKind::Idle | LoadKind::IdleTls | LoadKind::IdleWs => {
                args.extend(["idle".into(), "--sessions".into(), self.s.idle_sessions.to_string()]);
                let ca = self.work.join("listener-ca.pem").display().to_string();
                match load {
                    LoadKind::IdleTls => args.extend(["--transport".into(), "tls".into(), "--ca".into(), ca]),
                    LoadKind::IdleWs => args.extend(["--transport".into(), "ws".into()]),
                    _ => {}
                }
                args.extend(["--hold".into(), if self.s.smoke { "1s" } else { "3s" }.into()]);
                for p in setup.pids(fe) {
                    args.extend(["--pid".into(), p.to_string()]);
                }
            }
            LoadKind::Failover => {
                args.extend(["failover".into(), "--clients".into(), self.s.failover_clients.to_string()]);
                args.extend(["--hang-pid".into(), setup.primary.pid().to_string()]);
                args.extend(["--deadline".into(), format!("{}s", self.s.failover_deadline_s)]);
            }
        }
        args.extend(["--target".into(), target, "--json".into(), "--quiet".into()]);
        if matches!(load, LoadKind::Qos0 | LoadKind::Qos0x16 | LoadKind::Qos1 | LoadKind::Qos1x16 | LoadKind::Latency) {
            // The front end's and the broker's CPU time per message; Mosquitto alone has no
            // front end, only a broker.
            if fe != FrontEnd::Direct {
                for p in setup.pids(fe) {
                    args.extend(["--pid".into(), p.to_string()]);
                }
            }
            args.extend(["--broker-pid".into(), setup.primary.pid().to_string()]);
        }
        // etcd's CPU time is reported apart from meshgate's, for the loads that read CPU time.
        if let Some(pid) = setup.etcd_pid(fe).filter(|_| !load.idle() && load != LoadKind::Failover) {
            args.extend(["--etcd-pid".into(), pid.to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        let beside = match self.beside(load, fe, setup).await {
            Ok(b) => b,
            Err(e) => return self.record(load, fe, round, Err(format!("{e:#}")), None),
        };
        let (mut r, coordination) = match self.s.coordination {
            false => (self.bench(&args).await, None),
            true => self.settled(&args, fe, setup).await,
        };
        if let Some(b) = beside {
            // The next run starts only once the held sessions are gone from the front end and
            // the broker; one that could not wait that long is this run's error.
            if let Err(e) = b.finish().await {
                r = Err(format!("{e:#}"));
            }
        }
        self.record(load, fe, round, r, coordination);
    }

    /// A coordination run's load, measured until the claims it caused are in etcd: the
    /// claims are written behind the clients' backs, so the generator's own window would miss
    /// what meshgate and etcd do after its last client. CPU time is read here from just before
    /// the generator starts until meshgate's claim queue is empty again (without
    /// `[coordination]`: until the generator exits), etcd's write counters likewise.
    async fn settled(
        &self,
        args: &[String],
        fe: FrontEnd,
        setup: &Setup,
    ) -> (Result<Report, String>, Option<CoordinationRun>) {
        let etcd = self.etcd.filter(|_| fe == FrontEnd::MeshgateEtcd);
        let groups = [setup.pids(fe), vec![setup.primary.pid()], setup.etcd_pid(fe).into_iter().collect()];
        let before = match etcd {
            Some(e) => etcd::writes(e).await,
            None => None,
        };
        let cpu = CpuWindow::start(&groups);
        let started = Instant::now();
        let r = self.bench(args).await;
        let ended = Instant::now();
        if etcd.is_some() {
            if let Err(e) = self.claims_drained(fe).await {
                return (Err(format!("{e:#}")), None);
            }
        }
        let [meshgate_ns, mosquitto_ns, etcd_ns] = cpu.end(&groups);
        let drained = Instant::now();
        let etcd_writes = match (etcd, before) {
            (None, _) => None,
            (Some(e), Some(b)) => match etcd::writes(e).await {
                Some(a) => Some(a.since(b)),
                None => return (Err(format!("etcd's /metrics on {e} did not answer")), None),
            },
            (Some(e), None) => return (Err(format!("etcd's /metrics on {e} did not answer")), None),
        };
        let run = CoordinationRun {
            etcd_writes,
            claims_drained_s: etcd.map(|_| drained.duration_since(ended).as_secs_f64()),
            settled_s: drained.duration_since(started).as_secs_f64(),
            meshgate_cpu_ns: meshgate_ns,
            mosquitto_cpu_ns: mosquitto_ns,
            etcd_cpu_ns: etcd_ns,
        };
        (r, Some(run))
    }

    /// Waits until meshgate's `[coordination]` claim queue is empty (its /metrics), within a
    /// deadline: a writer that cannot keep up is an error of the run, not a slow number.
    async fn claims_drained(&self, fe: FrontEnd) -> anyhow::Result<()> {
        let http = self.http(fe).to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = crate::suite::get_text(&http, "/metrics").await.unwrap_or_default();
            let queued = etcd::metric(&text, "meshgate_coordination_claims_queued");
            // A session's release is queued when meshgate has seen its connection close, which
            // can be just after the generator exits: no session left, and nothing queued.
            let sessions: f64 = text
                .lines()
                .filter(|l| l.starts_with("meshgate_sessions_active{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if queued == Some(0.0) && sessions == 0.0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("meshgate still had {queued:?} claims queued for etcd and {sessions} sessions open 30 s after the load");
            }
            // Every scrape costs meshgate CPU inside the measured window: a few per second.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `--beside N`: a second generator holding N idle sessions through the front end for
    /// the length of one steady run, once all are open; [`Beside::finish`] closes them.
    async fn beside(&self, load: LoadKind, fe: FrontEnd, setup: &Setup) -> anyhow::Result<Option<Beside>> {
        let steady = matches!(
            load,
            LoadKind::Qos0
                | LoadKind::Qos0x16
                | LoadKind::Qos1
                | LoadKind::Qos1x16
                | LoadKind::Latency
                | LoadKind::Connect
        );
        if self.s.beside == 0 || !steady {
            return Ok(None);
        }
        let pids = setup.pids(fe);
        let before = procfs::fds_of(&pids).unwrap_or(0);
        let broker_before = procfs::fds_of(&[setup.primary.pid()]).unwrap_or(0);
        let mut child = tokio::process::Command::new(&self.bin)
            .args(["bench", "idle", "--announce", "--quiet", "--hold", "24h"])
            .args(["--sessions", &self.s.beside.to_string(), "--target", &self.target(fe).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the generator of the sessions held beside the load")?;
        let stdout = child.stdout.take().context("the idle generator's stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let open = match line {
            Ok(Ok(Some(l))) => l.strip_prefix("open ").and_then(|n| n.parse::<usize>().ok()),
            _ => None,
        };
        if open != Some(self.s.beside) {
            bail!("{} idle sessions beside the load: {open:?} opened within 60 s", self.s.beside);
        }
        let broker = vec![setup.primary.pid()];
        Ok(Some(Beside { child, pids, before, broker, broker_before }))
    }

    /// Runs `meshgate bench ARGS` and parses its JSON.
    async fn bench(&self, args: &[String]) -> Result<Report, String> {
        let out = tokio::process::Command::new(&self.bin)
            .arg("bench")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
            return Err(format!("load generator exited with {}: {line}", out.status));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("load generator printed no report: {e}"))
    }

    // ------------------------------------------------------------ processes

    async fn start(&self, front: &[FrontEnd]) -> anyhow::Result<Setup> {
        let primary = self.start_broker("broker1", 10).await?;
        let backup = self.start_broker("broker2", 11).await?;
        let mut setup = Setup { primary, _backup: backup, front: Vec::new(), etcd: None };
        if front.contains(&FrontEnd::MeshgateEtcd) {
            setup.etcd = Some(self.start_etcd().await?);
        }
        for &fe in front {
            // Started on its own CPU, so it sizes its thread pools for one CPU as well (HAProxy's
            // and tokio's defaults count the CPUs they may use) and every process and thread it
            // makes inherits it; the orchestrator goes back to the rest's CPUs either way.
            if let Some(place) = &self.s.placement {
                procfs::pin_self(&place.front_end).context("pinning the front end's start to its CPU")?;
            }
            let started = match fe {
                FrontEnd::Direct => Ok(None),
                FrontEnd::Nginx => self.start_nginx().await.map(Some),
                FrontEnd::Haproxy => self.start_haproxy().await.map(Some),
                FrontEnd::Meshgate | FrontEnd::MeshgateEtcd => self.start_meshgate(fe).await.map(Some),
            };
            if let Some(place) = &self.s.placement {
                procfs::pin_self(&place.rest).context("pinning the benchmark back to its CPUs")?;
            }
            let p = started?;
            // And checked: whatever it runs must be on the front end's CPU alone.
            if let (Some(proc), Some(place)) = (&p, &self.s.placement) {
                procfs::pin_tree(proc.pid(), &place.front_end)
                    .with_context(|| format!("pinning {} to CPU {:?}", proc.name, place.front_end))?;
            }
            setup.front.push((fe, p));
        }
        Ok(setup)
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let path = self.work.join(format!("{name}.log"));
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    fn spawn(&self, name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let log = self.log(name)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_string(), child })
    }

    /// Waits until `addr` answers an MQTT CONNECT (through the front end, so its upstream
    /// works too), or the process exits.
    async fn ready(&self, p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if cluster::answers_mqtt(&addr.to_string(), Duration::from_millis(500)).await {
                return Ok(());
            }
            let exited = matches!(p.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.work.join(format!("{}.log", p.name))).unwrap_or_default();
                let tail = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(empty log)");
                bail!("{} did not answer MQTT on {addr}: {tail}", p.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_broker(&self, name: &str, last: u8) -> anyhow::Result<Proc> {
        let addr = self.addr(last, 1883);
        let conf = self.work.join(format!("{name}.conf"));
        // Anonymous, nothing persisted, errors only: the broker is the same for every front end.
        // TCP_NODELAY: with Nagle on (Mosquitto's default) and receivers that only read (QoS 0
        // subscribers, a proxy's upstream side), loopback's 64 KB MSS lets ~28 KB wait for a
        // delayed ACK, and latency becomes ~300 messages / rate whatever the front end.
        // `user root` keeps a root-started Mosquitto from switching users (ignored otherwise).
        std::fs::write(
            &conf,
            format!(
                "listener {} {}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\nconnection_messages false\nuser root\n",
                addr.port(),
                addr.ip()
            ),
        )?;
        let mut p = self.spawn(name, Command::new(cluster::mosquitto_binary()?).arg("-c").arg(&conf))?;
        self.ready(&mut p, addr).await?;
        Ok(p)
    }

    /// meshgate's HTTP API in a coordination run, where the comparison reads its claim queue.
    fn http(&self, fe: FrontEnd) -> SocketAddr {
        self.addr(fe.octet(), 8080)
    }

    /// The etcd of `--coordination`, its data under the run's directory; waits until it answers.
    async fn start_etcd(&self) -> anyhow::Result<Proc> {
        let client = self.etcd.context("no etcd address")?;
        let mut cmd = etcd::command(&etcd::binary()?, client, &self.work.join("etcd-data"))?;
        let mut p = self.spawn("etcd", &mut cmd)?;
        let deadline = Instant::now() + etcd::READY;
        while !etcd::healthy(client).await {
            let exited = matches!(p.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                bail!("etcd did not answer on {client}: {}", self.log_tail("etcd"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(p)
    }

    fn log_tail(&self, name: &str) -> String {
        let log = std::fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default();
        log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(empty log)").to_string()
    }

    /// meshgate's config: listening on `listen`, the shipped broker settings; in a coordination
    /// run its HTTP API too (on and off alike, so the configs differ only in `[coordination]`),
    /// and `[coordination]` itself when `etcd` is given.
    fn meshgate_toml(&self, listen: SocketAddr, http: Option<SocketAddr>, etcd: Option<SocketAddr>) -> String {
        use toml::{Table, Value};
        let table = |pairs: Vec<(&str, Value)>| Value::Table(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect());
        // The shipped configs/meshgate.toml's broker settings, on the benchmark's two brokers,
        // and the workers asked for.
        let broker = |name: &str, last: u8, weight: Option<i64>| {
            let mut b = vec![("name", name.into()), ("address", self.addr(last, 1883).to_string().into())];
            b.extend(weight.map(|w| ("weight", w.into())));
            b.extend([("max_fails", 3.into()), ("fail_timeout", "30s".into())]);
            table(b)
        };
        let http = http.map_or_else(|| "off".to_string(), |a| a.to_string());
        let mut listeners = vec![("mqtt", listen.to_string().into()), ("http", http.into())];
        if !self.s.coordination {
            // For the TLS and WebSocket idle loads; idle otherwise.
            listeners.push(("mqtts", SocketAddr::new(listen.ip(), TLS_PORT).to_string().into()));
            listeners.push(("ws", SocketAddr::new(listen.ip(), WS_PORT).to_string().into()));
        }
        let mut doc: Table = [
            ("listen", table(listeners)),
            ("proxy", table(vec![("workers", i64::from(self.s.meshgate_workers).into())])),
            ("broker", Value::Array(vec![broker("broker1", 10, Some(5)), broker("broker2", 11, None)])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if !self.s.coordination {
            let file = |name: &str| self.work.join(name).display().to_string();
            let tls = table(vec![("cert", file("listener.pem").into()), ("key", file("listener.key").into())]);
            doc.insert("tls".into(), tls);
        }
        if let Some(etcd) = etcd {
            // The default lease (3 s); a prefix of its own so nothing else's keys mix in.
            let urls = Value::Array(vec![format!("http://{etcd}").into()]);
            let co = table(vec![("etcd", urls), ("instance", "bench".into()), ("prefix", "/meshgate-bench/".into())]);
            doc.insert("coordination".into(), co);
        }
        doc.to_string()
    }

    async fn start_meshgate(&self, fe: FrontEnd) -> anyhow::Result<Proc> {
        let listen = self.target(fe);
        let coordination = fe == FrontEnd::MeshgateEtcd;
        let name = if coordination { "meshgate-etcd" } else { "meshgate" };
        let conf = self.work.join(format!("{name}.toml"));
        let http = self.s.coordination.then(|| self.http(fe));
        std::fs::write(&conf, self.meshgate_toml(listen, http, self.etcd.filter(|_| coordination)))?;
        let mut p = self.spawn(name, Command::new(&self.bin).arg("run").arg("--config").arg(&conf))?;
        self.ready(&mut p, listen).await?;
        if coordination {
            // Measured with its etcd session live (lease granted, claims being written), not
            // while it is still degraded and only queueing.
            let http = self.http(fe).to_string();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = crate::suite::get_text(&http, "/metrics").await;
                if text.as_deref().and_then(|t| etcd::metric(t, "meshgate_coordination_up")) == Some(1.0) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("meshgate's etcd session on {} was not up within 20 s: {}", http, self.log_tail(name));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(p)
    }

    async fn start_nginx(&self) -> anyhow::Result<Proc> {
        let listen = self.target(FrontEnd::Nginx);
        let config = meshgate::Config::from_toml(&self.meshgate_toml(listen, None, None), "benchmark")?;
        let conf = nginx_conf(&cluster::nginx::render(&config), self.most_sessions());
        let prefix = self.work.join("nginx");
        std::fs::create_dir_all(prefix.join("logs"))?;
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = cluster::nginx::start(&path, &prefix, &listen.to_string()).await?;
        let mut p = Proc { name: "nginx".into(), child };
        // nginx logs to its prefix, not to work/nginx.log; `ready` only uses the log for errors.
        self.ready(&mut p, listen).await?;
        Ok(p)
    }

    async fn start_haproxy(&self) -> anyhow::Result<Proc> {
        let listen = self.target(FrontEnd::Haproxy);
        let cfg = haproxy_cfg(listen, self.addr(10, 1883), self.addr(11, 1883), self.most_sessions());
        let path = self.work.join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let bin = haproxy_binary()?;
        let check = Command::new(&bin).arg("-c").arg("-q").arg("-f").arg(&path).output()?;
        if !check.status.success() {
            bail!("haproxy refused {}: {}", path.display(), String::from_utf8_lossy(&check.stderr).trim());
        }
        let mut p = self.spawn("haproxy", Command::new(&bin).arg("-db").arg("-f").arg(&path))?;
        self.ready(&mut p, listen).await?;
        Ok(p)
    }
}

/// The shipped stream config with room for the idle-session load: nginx counts both sides of
/// a proxied session against `worker_connections` (4096 in the shipped file), so it is raised
/// to what the 20,000 file descriptors allow. Nothing else changes.
pub fn nginx_conf(rendered: &str, idle_sessions: usize) -> String {
    let conns = (idle_sessions * 2 + 200).max(4096);
    rendered
        .replace("worker_connections 4096;", &format!("worker_connections {conns};"))
        .replace("worker_processes 1;", &format!("worker_processes 1;\nworker_rlimit_nofile {};", conns + 100))
}

/// HAProxy in front of the two brokers: TCP mode, an MQTT CONNECT/CONNACK health check every
/// second (fall 2, rise 2), broker2 as backup, sessions of a server marked down shut so
/// clients reconnect, and timeouts as nginx's `proxy_timeout 90s`.
pub fn haproxy_cfg(listen: SocketAddr, primary: SocketAddr, backup: SocketAddr, idle_sessions: usize) -> String {
    let connect: String = meshgate::mqtt::encode::connect(4, "haproxy-check", true, 60, None, None)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let maxconn = idle_sessions + 300;
    format!(
        "global\n\
         \x20   maxconn {maxconn}\n\
         \x20   nbthread 1\n\
         \x20   log stderr format short local0 warning\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   timeout connect 1s\n\
         \x20   timeout client 90s\n\
         \x20   timeout server 90s\n\
         \x20   timeout check 1s\n\
         \n\
         frontend mqtt\n\
         \x20   bind {listen}\n\
         \x20   maxconn {maxconn}\n\
         \x20   default_backend brokers\n\
         \n\
         backend brokers\n\
         \x20   balance leastconn\n\
         \x20   option tcp-check\n\
         \x20   tcp-check connect\n\
         \x20   tcp-check send-binary {connect}\n\
         \x20   tcp-check expect binary 20020000\n\
         \x20   tcp-check send-binary e000\n\
         \x20   server broker1 {primary} check inter 1s fall 2 rise 2 on-marked-down shutdown-sessions\n\
         \x20   server broker2 {backup} check inter 1s fall 2 rise 2 backup on-marked-down shutdown-sessions\n"
    )
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    let bin = find_binary(cmd).unwrap_or_else(|| PathBuf::from(cmd));
    match Command::new(bin).args(args).output() {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().find(|l| !l.trim().is_empty()).unwrap_or("unknown").trim().to_string()
        }
        Err(_) => "not installed".into(),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What this machine is, for the report.
pub fn machine() -> Machine {
    let facts = procfs::machine();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let mem_kib = facts.memory_kib.unwrap_or(0) as f64;
    Machine {
        cpu: facts.cpu.unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        os,
        kernel: facts.kernel.unwrap_or_default(),
        open_files: facts
            .open_files
            .map(|(soft, hard)| format!("{soft} soft / {hard} hard"))
            .unwrap_or_else(|| "unknown".into()),
        mosquitto: cluster::mosquitto_binary()
            .ok()
            .map(|b| first_line(&b.display().to_string(), &["-h"]))
            .unwrap_or_else(|| "not installed".into()),
        nginx: first_line("nginx", &["-v"]),
        haproxy: first_line("haproxy", &["-v"]),
        meshgate: match commit {
            Some(c) => format!("{} ({c})", meshgate::VERSION),
            None => meshgate::VERSION.to_string(),
        },
        etcd: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_check_sends_a_real_connect() {
        let cfg = haproxy_cfg(
            "127.200.0.3:1883".parse().unwrap(),
            "127.200.0.10:1883".parse().unwrap(),
            "127.200.0.11:1883".parse().unwrap(),
            100,
        );
        let hex = cfg.lines().find_map(|l| l.trim().strip_prefix("tcp-check send-binary 10")).unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let mut packet = vec![0x10];
        packet.extend(bytes);
        let c = meshgate::mqtt::connect::parse(&packet).unwrap();
        assert_eq!((c.version, c.client_id.as_str()), (4, "haproxy-check"));
        assert!(cfg.contains("expect binary 20020000"));
    }

    #[test]
    fn nginx_conf_changes_only_the_connection_limits() {
        let shipped = std::fs::read_to_string(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("nginx/meshgate-stream.conf"),
        )
        .unwrap();
        let conf = nginx_conf(&shipped, 9000);
        assert!(conf.contains("worker_connections 18200;") && conf.contains("worker_rlimit_nofile 18300;"));
        let changed = conf.lines().filter(|l| !shipped.contains(l)).count();
        assert_eq!(changed, 2, "{conf}");
    }

    #[test]
    fn placement_puts_the_front_end_on_the_last_cpu_alone() {
        let p = Placement::of(&[0, 1, 2, 3]).unwrap();
        assert_eq!((p.front_end, p.rest), (vec![3], vec![0, 1, 2]));
        let p = Placement::of(&[2, 5]).unwrap();
        assert_eq!((p.front_end, p.rest), (vec![5], vec![2]));
        let e = Placement::of(&[0]).unwrap_err().to_string();
        assert!(e.contains("needs two CPUs") && e.contains("--pin off"), "{e}");
        assert!(Placement::of(&[]).is_err());
    }

    #[test]
    fn loads_and_front_ends_parse() {
        assert_eq!(LoadKind::parse("qos1x16").unwrap(), LoadKind::Qos1x16);
        assert_eq!(FrontEnd::parse("HAProxy").unwrap(), FrontEnd::Haproxy);
        assert!(LoadKind::parse("nope").is_err());
    }
}
