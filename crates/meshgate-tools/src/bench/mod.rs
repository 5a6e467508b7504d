//! `meshgate bench`: an MQTT load generator that measures a front end (or a broker directly),
//! and `meshgate bench compare`, which runs the same loads against Mosquitto directly, nginx,
//! HAProxy and meshgate and writes docs/benchmarks.md.
//!
//! - `wire`: the generator's own lean MQTT client (no per-message allocation, batched writes).
//! - `load`: publish/subscribe throughput and publish-to-delivery latency.
//! - `conns`: connection setup rate, idle sessions with memory per session, failover under load;
//!   `transport`: the idle sessions over TLS and WebSockets too.
//! - `stats`: percentiles, errors, medians (memory and CPU time: [`crate::procfs`]).
//! - `compare`: the orchestrated comparison (also `--coordination`: meshgate without and with
//!   `[coordination]`); `report`: its markdown tables and SVG charts; `etcd`: the etcd a
//!   coordination run starts.

pub mod compare;
pub mod conns;
pub mod etcd;
pub mod load;
pub mod report;
pub mod stats;
pub mod transport;
pub mod wire;

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

/// Options of `meshgate bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub load: Load,
}

#[derive(Subcommand, Debug)]
pub enum Load {
    /// Publishers and subscribers: messages per second end to end and publish-to-delivery latency.
    Pubsub(PubSubArgs),
    /// Connection setup: CONNECT-to-CONNACK handshakes per second (each session then disconnects).
    Connect(ConnectArgs),
    /// Open N sessions and hold them: setup rate, and the front end's memory per session (--pid).
    Idle(IdleArgs),
    /// Connect N clients, hang the primary broker (SIGSTOP --hang-pid), time until all are back.
    Failover(FailoverArgs),
    /// Run every load against Mosquitto directly, nginx, HAProxy and meshgate; write docs/benchmarks.md.
    Compare(compare::CompareArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The front end (or broker) to load: host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub target: String,
    /// Print the result as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads of the load generator (1 keeps it off the second core as far as possible).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Front-end process whose resident memory and CPU time (with its children's) to report;
    /// repeatable.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Time for TCP connect plus CONNACK.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PubSubArgs {
    #[command(flatten)]
    pub common: Common,
    /// Publishing connections.
    #[arg(long, short = 'p', default_value_t = 1)]
    pub publishers: usize,
    /// Subscribing connections (each receives every message).
    #[arg(long, short = 's', default_value_t = 1)]
    pub subscribers: usize,
    /// 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Payload bytes (at least 20: the send time, sequence and publisher travel in it).
    #[arg(long, default_value_t = 80)]
    pub payload: usize,
    /// Messages per second over all publishers; 0 = as fast as the flow window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Measurement time (after the warm-up).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub duration: Duration,
    /// Load before the measurement starts, not counted.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub warmup: Duration,
    /// Messages per publisher written but not yet delivered, at most.
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// QoS 1 messages per publisher awaiting PUBACK, at most (mosquitto_pub's default is 20).
    #[arg(long, default_value_t = 100)]
    pub inflight: u64,
    /// Topics are <prefix>/<publisher>.
    #[arg(long, default_value = "meshgate-bench")]
    pub topic_prefix: String,
    /// Broker process whose CPU time per message to report (e.g. `pidof mosquitto`); repeatable.
    #[arg(long = "broker-pid")]
    pub broker_pids: Vec<u32>,
    /// etcd process (of meshgate's `[coordination]`) whose CPU time per message to report
    /// apart from the front end's; repeatable.
    #[arg(long = "etcd-pid")]
    pub etcd_pids: Vec<u32>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Measurement time.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub duration: Duration,
    /// Broker process whose CPU time per CONNECT to report (the front end's is `--pid`'s); repeatable.
    #[arg(long = "broker-pid")]
    pub broker_pids: Vec<u32>,
    /// etcd process (of meshgate's `[coordination]`) whose CPU time per CONNECT to report; repeatable.
    #[arg(long = "etcd-pid")]
    pub etcd_pids: Vec<u32>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sessions to open and hold (each costs this process one file descriptor, a proxy two).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Handshakes in flight at once while opening them.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to hold them once all are open (memory is read at the end).
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub hold: Duration,
    /// Print `open N` on stdout as soon as every session is open (then hold them).
    #[arg(long)]
    pub announce: bool,
    /// How the sessions reach the target: plain TCP, TLS (an mqtts listener), MQTT over
    /// WebSockets (ws) or over secure WebSockets (wss).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: transport::Kind,
    /// For tls and wss: the CA (PEM) that signed the target's certificate.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// For tls and wss: the name the target's certificate carries.
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// For ws and wss: the WebSocket path.
    #[arg(long, default_value = "/mqtt")]
    pub ws_path: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients connected before the primary hangs.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// The primary broker's pid: stopped with SIGSTOP (kernel still accepts TCP, nothing answers),
    /// resumed with SIGCONT at the end.
    #[arg(long)]
    pub hang_pid: u32,
    /// Each client pings this often ...
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub ping_interval: Duration,
    /// ... and reconnects when no PINGRESP comes within this.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub ping_timeout: Duration,
    /// A reconnect attempt is abandoned (and retried) without a CONNACK within this.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub connack_timeout: Duration,
    /// Give up on clients not served again within this after the hang.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub deadline: Duration,
    /// Handshakes in flight at once (connecting and reconnecting).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

fn duration(s: &str) -> Result<Duration, String> {
    meshgate::config::parse_duration(s).ok_or_else(|| format!("bad duration {s:?} (e.g. \"5s\", \"500ms\")"))
}

/// Any one load's result, tagged, as `--json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "load", rename_all = "snake_case")]
pub enum Report {
    Pubsub(load::PubSubReport),
    Connect(conns::ConnectReport),
    Idle(conns::IdleReport),
    Failover(conns::FailoverReport),
}

pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    let common = match &args.load {
        Load::Compare(c) => return compare::main(c.clone()),
        Load::Pubsub(a) => &a.common,
        Load::Connect(a) => &a.common,
        Load::Idle(a) => &a.common,
        Load::Failover(a) => &a.common,
    };
    let rt = match common.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .context("starting the async runtime")?;
    let json = common.json;
    let report = rt.block_on(run(args.load))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// Runs one load (not `compare`) in the current runtime.
pub async fn run(load: Load) -> anyhow::Result<Report> {
    Ok(match load {
        Load::Pubsub(a) => {
            anyhow::ensure!(a.payload >= wire::STAMP, "--payload must be at least {} bytes", wire::STAMP);
            let o = load::PubSubOptions {
                target: wire::resolve(&a.common.target)?,
                publishers: a.publishers,
                subscribers: a.subscribers,
                qos: a.qos,
                payload: a.payload,
                rate: (a.rate > 0.0).then_some(a.rate),
                duration: a.duration,
                warmup: a.warmup,
                window: a.window.max(1),
                inflight: a.inflight.max(1),
                connect_timeout: a.common.connect_timeout,
                pids: a.common.pids.clone(),
                broker_pids: a.broker_pids.clone(),
                etcd_pids: a.etcd_pids.clone(),
                topic_prefix: a.topic_prefix.clone(),
            };
            Report::Pubsub(load::run(o, !a.common.quiet).await?)
        }
        Load::Connect(a) => Report::Connect(
            conns::connect_rate(
                conns::ConnectOptions {
                    target: wire::resolve(&a.common.target)?,
                    concurrency: a.concurrency.max(1),
                    duration: a.duration,
                    connect_timeout: a.common.connect_timeout,
                    pids: a.common.pids.clone(),
                    broker_pids: a.broker_pids.clone(),
                    etcd_pids: a.etcd_pids.clone(),
                },
                !a.common.quiet,
            )
            .await,
        ),
        Load::Idle(a) => Report::Idle(
            conns::idle(
                conns::IdleOptions {
                    target: wire::resolve(&a.common.target)?,
                    sessions: a.sessions,
                    concurrency: a.concurrency.max(1),
                    hold: a.hold,
                    connect_timeout: a.common.connect_timeout,
                    pids: a.common.pids.clone(),
                    announce: a.announce,
                    transport: transport::Transport::new(a.transport, a.ca.clone(), &a.tls_name, &a.ws_path)?,
                },
                !a.common.quiet,
            )
            .await,
        ),
        Load::Failover(a) => Report::Failover(
            conns::failover(
                conns::FailoverOptions {
                    target: wire::resolve(&a.common.target)?,
                    clients: a.clients,
                    hang_pid: a.hang_pid,
                    ping_interval: a.ping_interval,
                    ping_timeout: a.ping_timeout,
                    connack_timeout: a.connack_timeout,
                    deadline: a.deadline,
                    concurrency: a.concurrency.max(1),
                },
                !a.common.quiet,
            )
            .await?,
        ),
        Load::Compare(_) => anyhow::bail!("compare runs from bench::main, not inside a runtime"),
    })
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

/// A human-readable table of one report.
pub fn table(r: &Report) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    let errors = match r {
        Report::Pubsub(p) => {
            row("target", p.target.clone());
            row(
                "load",
                format!("{} pub / {} sub, QoS {}, {} B payload", p.publishers, p.subscribers, p.qos, p.payload),
            );
            if let Some(rate) = p.rate_target {
                row("target rate", format!("{rate:.0} msg/s"));
            }
            row("messages/s", format!("{:.0} ({} in {:.1} s)", p.msgs_per_sec, p.messages, p.duration_s));
            row(
                "latency p50/p99/p99.9",
                format!("{} / {} / {}", us(p.latency.p50_us), us(p.latency.p99_us), us(p.latency.p999_us)),
            );
            row("latency max", us(p.latency.max_us));
            row("published / lost", format!("{} / {}", p.published, p.lost));
            row("CONNECT->CONNACK p50", us(p.connect.latency.p50_us));
            if let Some(k) = p.rss_kib {
                row("front end RSS", format!("{k} KiB"));
            }
            if let Some(c) = p.cpu_us_per_msg {
                row("front end CPU per message", format!("{c:.2} µs"));
            }
            if let Some(c) = p.broker_cpu_us_per_msg {
                row("broker CPU per message", format!("{c:.2} µs"));
            }
            if let Some(c) = p.etcd_cpu_us_per_msg {
                row("etcd CPU per message", format!("{c:.2} µs"));
            }
            &p.errors
        }
        Report::Connect(c) => {
            row("target", c.target.clone());
            row(
                "connects/s",
                format!(
                    "{:.0} ({} in {:.1} s, {} in flight)",
                    c.connects_per_sec, c.connects, c.duration_s, c.concurrency
                ),
            );
            row(
                "CONNECT->CONNACK p50/p99/p99.9",
                format!("{} / {} / {}", us(c.latency.p50_us), us(c.latency.p99_us), us(c.latency.p999_us)),
            );
            for (what, v) in [
                ("front end CPU per CONNECT", c.cpu_us_per_connect),
                ("broker CPU per CONNECT", c.broker_cpu_us_per_connect),
                ("etcd CPU per CONNECT", c.etcd_cpu_us_per_connect),
            ] {
                if let Some(v) = v {
                    row(what, format!("{v:.2} µs"));
                }
            }
            &c.errors
        }
        Report::Idle(i) => {
            row("target", format!("{} ({:?})", i.target, i.transport).to_lowercase());
            row(
                "sessions open / alive at end",
                format!("{} of {} / {}", i.sessions_open, i.sessions_requested, i.alive_at_end),
            );
            row("setup rate", format!("{:.0} sessions/s", i.connects_per_sec));
            if let (Some(b), Some(a)) = (i.rss_before_kib, i.rss_after_kib) {
                row("front end RSS before / after", format!("{b} KiB / {a} KiB"));
            }
            if let Some(b) = i.bytes_per_session {
                row("memory per session", format!("{b:.0} B"));
            }
            &i.errors
        }
        Report::Failover(f) => {
            row("target", f.target.clone());
            row("clients connected before", format!("{} of {}", f.connected_before, f.clients));
            row(
                "all served again after",
                match f.all_reconnected_s {
                    Some(s) => format!("{s:.2} s"),
                    None => {
                        format!("not within {:.0} s ({} of {} back)", f.deadline_s, f.reconnected, f.connected_before)
                    }
                },
            );
            row("kept their connection", format!("{} of {}", f.kept_session, f.reconnected));
            row("noticed p50 / max", format!("{} / {}", us(f.noticed.p50_us), us(f.noticed.max_us)));
            row(
                "served again p50 / p99 / max",
                format!("{} / {} / {}", us(f.reconnect.p50_us), us(f.reconnect.p99_us), us(f.reconnect.max_us)),
            );
            row("connect attempts", f.connect_attempts.to_string());
            &f.errors
        }
    };
    rows.push(("errors".into(), errors.total.to_string()));
    for s in &errors.samples {
        rows.push(("  ".into(), s.clone()));
    }
    let w = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}
