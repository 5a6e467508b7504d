//! Command-line interface: parsing, logging setup, signals, and dispatch to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

use meshgate::config::{Config, ConfigError};
use meshgate_tools::cluster::{self as cl, RunDir};
use meshgate_tools::local::{FrontEnd, Instances, Local, UpError};

use crate::notify::Notifier;

#[derive(Parser, Debug)]
#[command(name = "meshgate", version, about = "MQTT-aware failover proxy for a prioritized pool of Mosquitto brokers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format (stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, help_heading = "Global options")]
    pub log_format: LogFormat,
    /// Log level (trace, debug, info, warn, error) or filter, e.g. "meshgate=debug,info";
    /// RUST_LOG, when set, wins.
    #[arg(long, global = true, default_value = "info", help_heading = "Global options")]
    pub log_level: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy, health checks and HTTP API in the foreground.
    Run(RunArgs),
    /// Validate a configuration and print what it means, then exit (2 when it is invalid).
    Validate(ValidateArgs),
    /// A failover-aware MQTT client (basic, sensor, control) that logs every state change as JSON.
    Client(meshgate_tools::client::ClientArgs),
    /// Load-test a front end: throughput, latency percentiles, connection rate, idle sessions, memory.
    Bench(meshgate_tools::bench::BenchArgs),
    /// nginx sidecar: probe the brokers and keep nginx's upstream file in step (no proxy).
    Check(CheckArgs),
    /// Replication between the brokers alone (no proxy), with the HTTP API for /replication and /metrics.
    Replicate(RunArgs),
    /// Start the whole local system: the brokers of the config, then meshgate (or nginx) in front. Ctrl-C stops all.
    Up(UpArgs),
    /// Run test scenarios against the running local system (or, with --compare, against both front ends in turn).
    Suite(SuiteArgs),
    /// The local brokers alone: up (detached, with pid files), down, status, render.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The nginx file with the upstream block that meshgate rewrites (include it in nginx's stream block).
    #[arg(long)]
    pub nginx_upstream: PathBuf,
    /// Command that makes nginx load the new file, e.g. "nginx -s reload".
    #[arg(long)]
    pub reload_cmd: String,
    /// Command that validates nginx's config with the new file in place ("" to skip).
    #[arg(long, default_value = "nginx -t -q")]
    pub nginx_test_cmd: String,
    /// Name of the upstream block (what proxy_pass names).
    #[arg(long, default_value = "mqtt_brokers")]
    pub upstream_name: String,
    /// Leave only the best available tier up, so nginx follows broker1, then broker2, ...
    #[arg(long)]
    pub tiers: bool,
    /// Minimum time between two nginx reloads (absorbs a flapping broker).
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    pub min_reload_interval: std::time::Duration,
    /// Delay before retrying after a failed validation or reload.
    #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
    pub retry: std::time::Duration,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FrontEndArg {
    Meshgate,
    Nginx,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// meshgate TOML config naming the brokers and the listen addresses [default:
    /// configs/meshgate.toml, or the built-in five-broker network where that file is not there].
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Where broker data, logs and pid files go.
    #[arg(long, default_value = "run")]
    pub run_dir: PathBuf,
    /// Which proxy fronts the brokers.
    #[arg(long, value_enum, default_value_t = FrontEndArg::Meshgate)]
    pub front_end: FrontEndArg,
    /// meshgate instances sharing state through one local etcd (started first, data in
    /// <run-dir>/etcd); instance i listens on the i-th loopback address from listen.mqtt
    /// (127.0.0.1, 127.0.0.2, ...) with HTTP on listen.http's port + i - 1. 1: no etcd, as without it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub instances: u16,
    /// With --instances 2 or more: etcd's client address (the peer address takes the next port)
    /// [default: listen.mqtt's address, port 2389].
    #[arg(long, value_name = "HOST:PORT")]
    pub etcd_listen: Option<std::net::SocketAddr>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioArg {
    Connectivity,
    Replication,
    Retained,
    Failover,
    Clients,
    Full,
    /// Long failure/recovery run with message accounting (its own options below).
    Chaos,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultArg {
    Kill,
    Hang,
    Mixed,
}

#[derive(clap::Args, Debug)]
pub struct SuiteArgs {
    /// Which scenario; `full` runs all of them.
    #[arg(value_enum)]
    pub scenario: ScenarioArg,
    /// The front end the running system uses (labels the report, sets expectations).
    #[arg(long, value_enum, default_value_t = FrontEndArg::Meshgate)]
    pub front_end: FrontEndArg,
    /// Start the local system with each front end in turn and put the results side by side.
    /// The config's addresses must be free (stop `meshgate up` first).
    #[arg(long)]
    pub compare: bool,
    /// Start the local system with meshgate twice, moving sessions with `[proxy] move =
    /// "switch"` and then "close", and put the results side by side (same rules as --compare).
    #[arg(long, conflicts_with = "compare")]
    pub compare_moves: bool,
    /// meshgate TOML config of the system under test.
    #[arg(long, short, default_value = "configs/meshgate.toml")]
    pub config: PathBuf,
    /// Where the results and the HTML report go (and, with --compare, the brokers' files).
    #[arg(long, default_value = "run")]
    pub run_dir: PathBuf,
    /// Length of the clients scenario and of each failover fault (default 6s), or of the
    /// whole chaos run (default 300s).
    #[arg(long, value_parser = parse_duration_arg)]
    pub duration: Option<std::time::Duration>,
    /// chaos: time between faults; each failed broker is recovered one cycle later.
    #[arg(long, default_value = "60s", value_parser = parse_duration_arg)]
    pub cycle: std::time::Duration,
    /// chaos: how brokers fail (mixed alternates hang and kill).
    #[arg(long, value_enum, default_value_t = FaultArg::Mixed)]
    pub fault: FaultArg,
    /// chaos: publishers (QoS 1, sequence numbers) and subscribers.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// chaos: subscribers, each counting every publisher's messages.
    #[arg(long, default_value_t = 2)]
    pub subscribers: usize,
    /// chaos: messages per second per publisher.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// chaos threshold: every fault taken over within this time.
    #[arg(long, default_value = "1.5s", value_parser = parse_duration_arg)]
    pub max_takeover: std::time::Duration,
    /// chaos threshold: client connect attempts allowed to fail.
    #[arg(long, default_value_t = 0)]
    pub max_failed_connects: usize,
    /// chaos threshold: acknowledged messages allowed to be lost outside fault windows.
    #[arg(long, default_value_t = 0)]
    pub max_lost_outside: usize,
    /// Simulated clients in the clients scenario.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Where the JSON lines go.
    #[arg(long, default_value = "logs")]
    pub logs_dir: PathBuf,
    /// Where the HTML report goes.
    #[arg(long, default_value = "reports")]
    pub reports_dir: PathBuf,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    meshgate::config::parse_duration(s).ok_or_else(|| format!("bad duration {s:?} (e.g. \"6s\", \"500ms\")"))
}

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// meshgate TOML config naming the brokers.
    #[arg(long, short, default_value = "configs/meshgate.toml")]
    pub config: PathBuf,
    /// Where broker data, logs and pid files go.
    #[arg(long, default_value = "run")]
    pub run_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum ClusterAction {
    /// Start the brokers in the background; pid files go to the run directory.
    Up(ClusterArgs),
    /// Stop the brokers named by the pid files.
    Down(ClusterArgs),
    /// Each broker's pid, address and whether it answers MQTT.
    Status(ClusterArgs),
    /// Write the Mosquitto configs (and the equivalent nginx stream config) for the config's brokers;
    /// with --target multipass|systemd, the deployment files for real hosts (docs/deploy.md); with
    /// --target keepalived, one keepalived config per meshgate instance for a floating address (docs/ha.md).
    Render {
        /// meshgate TOML config naming the brokers.
        #[arg(long, short, default_value = "configs/meshgate.toml")]
        config: PathBuf,
        /// local: the loopback network `meshgate up` runs; multipass: one cloud-init file per broker
        /// VM; systemd: Mosquitto configs for existing Linux hosts. The last two also write meshgate's
        /// config for those addresses, its systemd unit and the equivalent nginx config. keepalived:
        /// keepalived-<instance>.conf per meshgate instance (from --network), for a floating address.
        #[arg(long, value_enum, default_value_t = RenderTarget::Local)]
        target: RenderTarget,
        /// Output directory (default: configs/mosquitto for local, deploy/<target> otherwise).
        #[arg(long)]
        out: Option<PathBuf>,
        /// local: where the nginx stream config goes.
        #[arg(long, default_value = "nginx/meshgate-stream.conf")]
        nginx_out: PathBuf,
        /// multipass|systemd: broker hosts in backup order, broker1 first (host or host:port).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// multipass|systemd: this front-end host's own address on the brokers' network (the HTTP API binds there).
        #[arg(long)]
        front_end: Option<String>,
        /// multipass|systemd: the hosts file to start from (default: <out>/network.toml when it exists);
        /// keepalived: the floating address, router id and instances (default: <out>/network.toml).
        #[arg(long)]
        network: Option<PathBuf>,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum RenderTarget {
    Local,
    Multipass,
    Systemd,
    Keepalived,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// meshgate TOML config.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Take `listen` and the brokers from an nginx stream config (other settings from --config).
    #[arg(long)]
    pub nginx_conf: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the whole effective configuration as TOML instead of a summary: every key with its
    /// value in force, defaults filled in, secrets masked (like `nginx -T`); the output is itself
    /// a valid configuration.
    #[arg(long)]
    pub print: bool,
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad usage or configuration (as sysexits' EX_USAGE family).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
        eprintln!("meshgate: error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Validate(args) => load(&args.run).map(|c| match args.print {
            true => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                print!("{}", c.to_toml());
            }
            false => print_summary(&c),
        }),
        Command::Run(args) => match load(&args) {
            Ok(config) => run(config, args),
            Err(e) => Err(e),
        },
        Command::Up(args) => up(args),
        Command::Bench(args) => meshgate_tools::bench::main(args),
        Command::Check(args) => match load(&args.run) {
            Ok(config) => check(config, args),
            Err(e) => Err(e),
        },
        Command::Client(args) => runtime().and_then(|rt| {
            rt.block_on(meshgate_tools::client::run(args, async {
                let _ = ctrl_c_or_term().await;
            }))
        }),
        Command::Replicate(args) => match load(&args) {
            Ok(mut config) => {
                config.replication.enabled = true;
                replicate(config)
            }
            Err(e) => Err(e),
        },
        Command::Suite(args) => suite(args),
        Command::Cluster { action } => cluster(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts joined, no backtrace.
            eprintln!("meshgate: error: {e:#}");
            let usage = e.downcast_ref::<ConfigError>().is_some()
                || e.downcast_ref::<Usage>().is_some()
                || e.downcast_ref::<meshgate::Error>().is_some_and(meshgate::Error::is_config)
                || e.downcast_ref::<UpError>().is_some_and(UpError::is_usage)
                || e.downcast_ref::<cl::deploy::DeployError>().is_some_and(|d| d.is_usage())
                || e.downcast_ref::<cl::keepalived::KeepalivedError>().is_some();
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// A mistake in how meshgate was called (exit 2, like a bad configuration).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// `RUST_LOG`, when set, wins over `--log-level`; either must be a valid filter.
fn init_logging(format: LogFormat, level: &str) -> Result<(), Usage> {
    use tracing_subscriber::EnvFilter;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Usage(format!(
            "{what}: {e} (write a level like \"info\" or \"warn\", or a filter like \"meshgate=debug,info\")"
        ))
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(&env).map_err(|e| bad(&format!("RUST_LOG={env:?}"), &e))?,
        _ => {
            // A bare word that is not a level would be read as a target name and silence
            // everything else; on the command line that is a typo, not a wish.
            const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
            let typo = level
                .split(',')
                .map(str::trim)
                .find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()));
            if let Some(d) = typo {
                return Err(bad(&format!("--log-level {level:?}"), &format!("{d:?} is not a level")));
            }
            EnvFilter::try_new(level).map_err(|e| bad(&format!("--log-level {level:?}"), &e))?
        }
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn load(args: &RunArgs) -> anyhow::Result<Config> {
    match (&args.nginx_conf, &args.config) {
        (Some(nginx), base) => {
            let (config, stream) = Config::load_nginx(nginx, base.as_deref())?;
            let backups = stream.servers.iter().filter(|s| s.backup).count();
            tracing::info!(
                upstream = %stream.upstream,
                "nginx upstream imported: {} server(s); {backups} backup server(s) become sequential tiers 2..{} in file order",
                stream.servers.len(),
                backups + 1
            );
            Ok(config)
        }
        (None, Some(path)) => Ok(Config::load(path)?),
        (None, None) => {
            let default = Path::new("configs/meshgate.toml");
            if default.exists() {
                Ok(Config::load(default)?)
            } else {
                Err(Usage("no configuration given: pass --config FILE (configs/meshgate.toml is the five-broker example) or --nginx-conf FILE".into()).into())
            }
        }
    }
}

fn print_summary(c: &Config) {
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
    println!("listen mqtt {} http {}", c.listen.mqtt, c.listen.http.as_deref().unwrap_or("off"));
    match c.proxy.workers {
        0 => println!("proxy workers: one per core (or TOKIO_WORKER_THREADS)"),
        n => println!("proxy workers: {n}"),
    }
    println!(
        "health probe {} every {:?}, timeout {:?}, rise {}, fall {}",
        c.health.probe.as_str(),
        c.health.interval,
        c.health.timeout,
        c.health.rise,
        c.health.fall
    );
    let s = &c.sessions;
    match s.enabled {
        true => println!(
            "sessions persistent ones recorded{}, migrated and restored; standby {}",
            s.state_file.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_else(|| " in memory".into()),
            if s.standby { format!("on (trim every {:?})", s.standby_trim) } else { "off".into() }
        ),
        false => println!("sessions not recorded ([sessions] enabled = false)"),
    }
    for b in &c.brokers {
        println!(
            "broker {:<10} {:<22} priority {} weight {} max_fails {} fail_timeout {:?} max_conns {}{}{}",
            b.name,
            b.address,
            b.priority,
            b.weight,
            b.max_fails,
            b.fail_timeout,
            b.max_conns,
            if b.enabled { "" } else { " (down)" },
            b.source.as_ref().map(|s| format!("  ({s})")).unwrap_or_default()
        );
    }
}

/// The proxy in the foreground. Under systemd (`Type=notify`, NOTIFY_SOCKET set) it reports
/// readiness only once `Meshgate::start` has returned, that is with every listener bound, so
/// nothing ordered after the unit starts before clients can connect.
fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    proxy_runtime()?.block_on(async move {
        let notify = std::sync::Arc::new(Notifier::from_env());
        let (tx, reloads) = tokio::sync::mpsc::channel(4);
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let hup_notify = notify.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                // At once, before the file is read: `systemctl reload` returns when `kill -HUP`
                // does, and waits for the READY=1 below only if it has heard RELOADING=1.
                hup_notify.reloading();
                // A refused reload is logged once, as an error, where it is recorded.
                let r = load(&args).map_err(|e| format!("{e:#}"));
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        meshgate::run(config, shutdown, reloads, &*notify).await?;
        Ok(())
    })
}

/// Raises the open-file soft limit to the hard one before anything opens: every client takes
/// two descriptors and a moving one three, and a shell's default soft limit (1,024) would
/// stop meshgate at a few hundred clients while the hard limit allows far more (systemd units
/// set both with `LimitNOFILE=`). Where it cannot, meshgate runs under the limit it has.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!("open-file limit raised from {soft} to {hard} (the hard limit)"),
        Err(e) => tracing::warn!("open-file limit stays at {soft}: raising it to {hard} failed: {e}"),
    }
}

/// systemd hears of readiness, reloads and the shutdown.
impl meshgate::Lifecycle for Notifier {
    fn ready(&self, mg: &meshgate::Meshgate) {
        Notifier::ready(self, &serving(mg));
    }
    fn reloaded(&self, mg: &meshgate::Meshgate, result: &Result<(), String>) {
        match result {
            Ok(()) => Notifier::ready(self, &serving(mg)),
            Err(why) => Notifier::ready(self, &format!("reload refused, old configuration kept: {why}")),
        }
    }
    fn stopping(&self) {
        Notifier::stopping(self);
    }
}

/// The STATUS= line `systemctl status` shows while meshgate serves.
fn serving(mg: &meshgate::Meshgate) -> String {
    let http = mg.http_addr().map_or_else(|| "off".to_string(), |a| a.to_string());
    format!("serving: mqtt {}, http {http}, {} broker(s)", mg.mqtt_addr(), mg.pool().brokers().len())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// The runtime `meshgate run` and `meshgate up` run on.
fn proxy_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One event loop, as one nginx worker: sessions run in the order their sockets became
    // readable, so a packet never overtakes one another client sent a moment earlier
    // (tests/order.rs). `[proxy] workers` above one adds loops of their own for the sessions
    // (`Meshgate::start_daemon`); this one keeps the probes, the HTTP API and replication.
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

/// SIGTERM or SIGINT, with the handlers installed now (in a runtime), so a signal that comes
/// before the future is awaited is kept for it.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn ctrl_c_or_term() -> anyhow::Result<()> {
    stop_signal()?.await;
    Ok(())
}

/// The local five-broker network, as shipped in configs/meshgate.toml: what `meshgate up` runs
/// where that file is not there (outside a checkout).
const BUILT_IN_LOCAL: &str = include_str!("../configs/meshgate.toml");

fn up(args: UpArgs) -> anyhow::Result<()> {
    let default = Path::new("configs/meshgate.toml");
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None if default.exists() => Config::load(default)?,
        None => {
            eprintln!(
                "{} not found: running the built-in local network (five brokers on 127.0.0.10..14:1883, meshgate on \
                 127.0.0.1:1883, state under run/); pass --config FILE for another",
                default.display()
            );
            let mut c = Config::from_toml(BUILT_IN_LOCAL, "built-in local network")?;
            // Its paths ("../run/...", relative to configs/) mean run/ here, where no configs/
            // directory may exist to step out of.
            for path in [&mut c.sessions.state_file, &mut c.replication.state_file, &mut c.access_log.path]
                .into_iter()
                .flatten()
            {
                *path = path.strip_prefix("..").map(Path::to_path_buf).unwrap_or_else(|_| path.clone());
            }
            c
        }
    };
    let front_end = front_end(args.front_end);
    let instances = Instances { count: usize::from(args.instances), etcd: args.etcd_listen };
    proxy_runtime()?.block_on(async move {
        // Installed before anything starts: a Ctrl-C while etcd or a broker is starting waits
        // for the start and then stops what started, instead of leaving the children running.
        let stopped = stop_signal()?;
        let mut local = Local::start_with(config, &args.run_dir, front_end, Some(instances)).await?;
        println!("{}", local.summary());
        stopped.await;
        println!("stopping ...");
        local.stop().await;
        match args.instances {
            1 => println!("stopped: no meshgate, nginx or broker process of this run is left"),
            _ => println!("stopped: no meshgate instance, broker or etcd process of this run is left"),
        }
        Ok(())
    })
}

fn cluster(action: ClusterAction) -> anyhow::Result<()> {
    match action {
        ClusterAction::Render { config, target, out, nginx_out, hosts, front_end, network } => {
            let config = Config::load(&config)?;
            let target = match target {
                RenderTarget::Local => {
                    let out = out.unwrap_or_else(|| PathBuf::from("configs/mosquitto"));
                    let mut files = cl::broker_files(&config, &out)?;
                    files.push((nginx_out.clone(), cl::nginx::render(&config)));
                    for p in cl::write_together(&files)? {
                        println!("wrote {}", p.display());
                    }
                    return Ok(());
                }
                RenderTarget::Keepalived => {
                    if !hosts.is_empty() || front_end.is_some() {
                        return Err(Usage(
                            "--hosts and --front-end are for --target multipass|systemd; keepalived reads its instances from --network".into(),
                        )
                        .into());
                    }
                    let out = out.unwrap_or_else(|| PathBuf::from("deploy/keepalived"));
                    let net = cl::keepalived::Network::load(&network.unwrap_or_else(|| out.join("network.toml")))?;
                    let files = cl::keepalived::render(&config, &net)?;
                    for p in cl::deploy::write(&out, &files)? {
                        println!("wrote {}", p.display());
                    }
                    return Ok(());
                }
                RenderTarget::Multipass => cl::deploy::Target::Multipass,
                RenderTarget::Systemd => cl::deploy::Target::Systemd,
            };
            let out = out.unwrap_or_else(|| Path::new("deploy").join(target.as_str()));
            let network_path = network.unwrap_or_else(|| out.join("network.toml"));
            let mut net = if network_path.exists() {
                cl::deploy::Network::load(&network_path)?
            } else if hosts.is_empty() {
                return Err(cl::deploy::DeployError::NoHosts(network_path.display().to_string()).into());
            } else {
                cl::deploy::Network::new(Vec::new())
            };
            if !hosts.is_empty() {
                net.brokers = hosts;
            }
            if let Some(f) = front_end {
                net.front_end = f;
            }
            let files = cl::deploy::render(target, &config, &net)?;
            for p in cl::deploy::write(&out, &files)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        ClusterAction::Up(a) => {
            let config = Config::load(&a.config)?;
            runtime()?.block_on(async move {
                let run = RunDir::new(&a.run_dir)?;
                let procs = cl::start_brokers(&config, &run, true).await?;
                for p in &procs {
                    println!("{:<8} {:<17} pid {:<7} log {}", p.name, p.address, p.pid(), run.log(&p.name).display());
                }
                println!("brokers run in the background; stop them with `meshgate cluster down`");
                Ok(())
            })
        }
        ClusterAction::Down(a) => {
            let config = Config::load(&a.config)?;
            let run = RunDir::new(&a.run_dir)?;
            for (name, pid, stopped) in cl::stop_from_pid_files(&config, &run) {
                match (pid, stopped) {
                    (Some(pid), true) => println!("{name:<8} stopped (pid {pid})"),
                    (Some(pid), false) => println!("{name:<8} was not running (stale pid {pid})"),
                    (None, _) => println!("{name:<8} no pid file: not started by `meshgate cluster up`"),
                }
            }
            Ok(())
        }
        ClusterAction::Status(a) => {
            let config = Config::load(&a.config)?;
            let run = RunDir::new(&a.run_dir)?;
            let rows = runtime()?.block_on(cl::status(&config, &run));
            println!("{:<8} {:<17} {:<8} MQTT", "broker", "address", "pid");
            for (name, address, pid, answers) in rows {
                let pid = pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                println!("{name:<8} {address:<17} {pid:<8} {}", if answers { "answers" } else { "no answer" });
            }
            Ok(())
        }
    }
}

fn front_end(f: FrontEndArg) -> FrontEnd {
    match f {
        FrontEndArg::Meshgate => FrontEnd::Meshgate,
        FrontEndArg::Nginx => FrontEnd::Nginx,
    }
}

fn suite(args: SuiteArgs) -> anyhow::Result<()> {
    use meshgate_tools::suite::{self, Scenario};
    let config = Config::load(&args.config)?;
    let scenarios: Vec<Scenario> = match args.scenario {
        ScenarioArg::Connectivity => vec![Scenario::Connectivity],
        ScenarioArg::Replication => vec![Scenario::Replication],
        ScenarioArg::Retained => vec![Scenario::Retained],
        ScenarioArg::Failover => vec![Scenario::Failover],
        ScenarioArg::Clients => vec![Scenario::Clients],
        ScenarioArg::Full => Scenario::ALL.to_vec(),
        ScenarioArg::Chaos => vec![],
    };
    let chaos = (args.scenario == ScenarioArg::Chaos).then(|| suite::ChaosOptions {
        duration: args.duration.unwrap_or(std::time::Duration::from_secs(300)),
        cycle: args.cycle,
        fault: match args.fault {
            FaultArg::Kill => suite::FaultMode::Kill,
            FaultArg::Hang => suite::FaultMode::Hang,
            FaultArg::Mixed => suite::FaultMode::Mixed,
        },
        publishers: args.publishers,
        subscribers: args.subscribers,
        rate: args.rate,
        max_takeover: args.max_takeover,
        max_failed_connects: args.max_failed_connects,
        max_lost_outside: args.max_lost_outside,
        progress: true,
    });
    if let Some(c) = &chaos {
        if c.cycle >= c.duration || c.cycle.is_zero() || c.rate <= 0.0 || c.publishers == 0 || c.subscribers == 0 {
            anyhow::bail!("chaos needs --cycle shorter than --duration, a positive --rate, and at least one publisher and subscriber");
        }
    }
    let opts = suite::Options {
        duration: args.duration.unwrap_or(std::time::Duration::from_secs(6)),
        clients: args.clients,
        progress: true,
    };
    let run_one = |target: suite::Target| {
        let (scenarios, opts, chaos) = (scenarios.clone(), opts.clone(), chaos.clone());
        async move {
            match &chaos {
                Some(c) => suite::run_chaos(&target, c).await,
                None => suite::run(&target, &scenarios, &opts).await,
            }
        }
    };
    let runs = runtime()?.block_on(async {
        let mut runs = Vec::new();
        if args.compare_moves {
            for moves in [meshgate::config::Move::Switch, meshgate::config::Move::Close] {
                let label = match moves {
                    meshgate::config::Move::Switch => "switch",
                    meshgate::config::Move::Close => "close",
                };
                let mut config = config.clone();
                config.proxy.moves = moves;
                let dir = args.run_dir.join(format!("compare-move-{label}"));
                eprintln!("starting the local system with meshgate, move = \"{label}\" ...");
                let mut local = Local::start(config.clone(), &dir, FrontEnd::Meshgate).await?;
                let target = suite::Target::local(&config, &dir, &format!("meshgate move={label}"))?;
                runs.push(run_one(target).await);
                local.stop().await;
            }
        } else if args.compare {
            for fe in [FrontEnd::Meshgate, FrontEnd::Nginx] {
                let dir = args.run_dir.join(format!("compare-{}", fe.as_str()));
                eprintln!("starting the local system with {} in front ...", fe.as_str());
                let mut local = Local::start(config.clone(), &dir, fe).await?;
                let target = suite::Target::local(&config, &dir, fe.as_str())?;
                runs.push(run_one(target).await);
                local.stop().await;
            }
        } else {
            let fe = front_end(args.front_end);
            if !cl::answers_mqtt(&config.listen.mqtt, std::time::Duration::from_secs(2)).await {
                anyhow::bail!(
                    "nothing answers MQTT on {}: start the local system first (`meshgate up --front-end {}`), or use --compare",
                    config.listen.mqtt,
                    fe.as_str()
                );
            }
            let target = suite::Target::local(&config, &args.run_dir, fe.as_str())?;
            runs.push(run_one(target).await);
        }
        anyhow::Ok(runs)
    })?;
    let stamp = meshgate::events::unix_ms(std::time::SystemTime::now()) / 1000;
    let kind = match (args.compare, args.compare_moves) {
        (true, _) => "compare",
        (_, true) => "compare-moves",
        _ => front_end(args.front_end).as_str(),
    };
    let name = format!("suite-{kind}-{stamp}");
    std::fs::create_dir_all(&args.logs_dir).with_context(|| format!("cannot create {}", args.logs_dir.display()))?;
    std::fs::create_dir_all(&args.reports_dir)
        .with_context(|| format!("cannot create {}", args.reports_dir.display()))?;
    let jsonl = args.logs_dir.join(format!("{name}.jsonl"));
    let html = args.reports_dir.join(format!("{name}.html"));
    std::fs::write(&jsonl, suite::report::json_lines(&runs))
        .with_context(|| format!("cannot write {}", jsonl.display()))?;
    std::fs::write(&html, suite::report::html(&format!("meshgate suite: {name}"), &runs))
        .with_context(|| format!("cannot write {}", html.display()))?;
    print!("{}", suite::report::terminal_summary(&runs));
    println!("results: {}\nreport:  {}", jsonl.display(), html.display());
    let failed = runs.iter().flat_map(|r| &r.results).filter(|r| !r.passed).count();
    if failed > 0 {
        anyhow::bail!("{failed} scenario(s) failed; see the report for why");
    }
    Ok(())
}

fn replicate(config: Config) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mg = meshgate::Meshgate::start_parts(config, meshgate::Parts { proxy: false, replication: true }).await?;
        let waited = ctrl_c_or_term().await;
        mg.shutdown().await;
        waited
    })
}

fn check(config: Config, args: CheckArgs) -> anyhow::Result<()> {
    if let Some(dir) = args.nginx_upstream.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "the directory of --nginx-upstream {} does not exist",
            args.nginx_upstream.display()
        );
    }
    let opts = meshgate::sidecar::SidecarOptions {
        upstream_file: args.nginx_upstream,
        upstream_name: args.upstream_name,
        tiers: args.tiers,
        test_cmd: Some(args.nginx_test_cmd).filter(|c| !c.trim().is_empty()),
        reload_cmd: args.reload_cmd,
        min_interval: args.min_reload_interval,
        retry: args.retry,
    };
    runtime()?.block_on(async move {
        let mg = meshgate::Meshgate::start_parts(config, meshgate::Parts { proxy: false, replication: false }).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(meshgate::sidecar::run(mg.pool().clone(), opts, stop.clone()));
        let waited = ctrl_c_or_term().await;
        stop.cancel();
        let _ = task.await;
        mg.shutdown().await;
        waited
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option of every subcommand says what it is in `--help` (its unit and default where
    /// it has them: clap prints the default itself).
    #[test]
    fn every_option_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "meshgate", &mut missing);
        assert!(missing.is_empty(), "options without a description:\n{}", missing.join("\n"));
    }

    /// The options every subcommand takes are listed apart from its own.
    #[test]
    fn global_options_have_their_own_heading() {
        let cmd = Cli::command();
        for arg in cmd.get_arguments().filter(|a| a.is_global_set()) {
            assert_eq!(arg.get_help_heading(), Some("Global options"), "--{}", arg.get_id());
        }
    }
}
