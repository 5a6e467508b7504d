//! Connection loads: CONNECT-to-CONNACK rate, idle sessions held (with the front end's memory
//! per session), and failover under load (clients connected, the primary hung, time until
//! every client has a working session again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::load::CpuWindow;
use super::stats::{Errors, Percentiles};
use super::transport::Conn;
use super::wire;
use crate::procfs::rss_of;
use meshgate::mqtt::encode;

const PINGREQ: [u8; 2] = [0xc0, 0x00];

// ---------------------------------------------------------------- connection setup rate

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub target: SocketAddr,
    pub concurrency: usize,
    pub duration: Duration,
    pub connect_timeout: Duration,
    /// Front-end, broker and etcd processes whose CPU time per CONNECT to report.
    pub pids: Vec<u32>,
    pub broker_pids: Vec<u32>,
    pub etcd_pids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub target: String,
    pub concurrency: usize,
    pub duration_s: f64,
    /// Sessions set up (TCP connect, CONNECT, accepting CONNACK), then left with DISCONNECT.
    pub connects: u64,
    pub connects_per_sec: f64,
    pub latency: Percentiles,
    pub errors: Errors,
    /// CPU time the front end (`--pid`, with its children) used over the run, per session set
    /// up, µs: the accept, CONNECT, broker connection and CONNACK, and the teardown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_connect: Option<f64>,
    /// The same for the brokers (`--broker-pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_cpu_us_per_connect: Option<f64>,
    /// The same for etcd (`--etcd-pid`): the claim of each client id and its release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cpu_us_per_connect: Option<f64>,
}

/// `concurrency` loops, each: connect, CONNECT, CONNACK, DISCONNECT, close, again.
pub async fn connect_rate(o: ConnectOptions, progress: bool) -> ConnectReport {
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let started = Instant::now();
    let end = started + o.duration;
    let done = Arc::new(AtomicU64::new(0));
    let cpu_groups = [o.pids.clone(), o.broker_pids.clone(), o.etcd_pids.clone()];
    let cpu = CpuWindow::start(&cpu_groups);
    let mut set = JoinSet::new();
    for w in 0..o.concurrency {
        let done = done.clone();
        let id_base = format!("mgb-c-{run_id}-{w}");
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = Errors::default();
            let mut n = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match wire::open(o.target, &format!("{id_base}-{n}"), 0, o.connect_timeout).await {
                    Ok(mut s) => {
                        lat.push(t.elapsed().as_nanos() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = s.write_all(&encode::disconnect()).await;
                    }
                    Err(e) => {
                        errors.add(e.label(), e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                n += 1;
            }
            (lat, errors)
        });
    }
    let ticker = progress.then(|| spawn_ticker(done.clone(), "connects/s"));
    let mut lat = Vec::new();
    let mut errors = Errors::default();
    while let Some(r) = set.join_next().await {
        if let Ok((l, e)) = r {
            lat.extend(l);
            errors.merge(e);
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    // The loops finish their last handshake after `end`; count the time that took too.
    let elapsed = started.elapsed().as_secs_f64();
    let [front_cpu, broker_cpu, etcd_cpu] = cpu.end(&cpu_groups);
    let connects = lat.len() as u64;
    let per_connect = |ns: Option<u64>| ns.filter(|_| connects > 0).map(|ns| ns as f64 / 1000.0 / connects as f64);
    ConnectReport {
        target: o.target.to_string(),
        concurrency: o.concurrency,
        duration_s: elapsed,
        connects,
        connects_per_sec: lat.len() as f64 / elapsed,
        latency: Percentiles::from_ns(&mut lat),
        errors,
        cpu_us_per_connect: per_connect(front_cpu),
        broker_cpu_us_per_connect: per_connect(broker_cpu),
        etcd_cpu_us_per_connect: per_connect(etcd_cpu),
    }
}

fn spawn_ticker(count: Arc<AtomicU64>, unit: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = count.load(Ordering::Relaxed);
            eprintln!("  {:5.1} s  {:>9} {unit}", started.elapsed().as_secs_f64(), now - last);
            last = now;
        }
    })
}

// ---------------------------------------------------------------- idle sessions

#[derive(Debug, Clone)]
pub struct IdleOptions {
    pub target: SocketAddr,
    pub sessions: usize,
    pub concurrency: usize,
    pub hold: Duration,
    pub connect_timeout: Duration,
    pub pids: Vec<u32>,
    /// Print `open N` on stdout once every session is open: `bench compare --beside` waits
    /// for it before its load starts.
    pub announce: bool,
    /// Plain TCP, or the front end's TLS or WebSocket listener.
    pub transport: super::transport::Transport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    pub target: String,
    /// How the sessions reached the front end (reports from before there was a choice: tcp).
    #[serde(default = "tcp")]
    pub transport: super::transport::Kind,
    pub sessions_requested: usize,
    pub sessions_open: usize,
    /// Sessions that still answered a PINGREQ after the hold.
    pub alive_at_end: usize,
    pub connects_per_sec: f64,
    pub connect_latency: Percentiles,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (RSS after - RSS before) / open sessions.
    pub bytes_per_session: Option<f64>,
    pub errors: Errors,
}

pub async fn idle(o: IdleOptions, progress: bool) -> IdleReport {
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let rss_before = rss_of(&o.pids);
    let started = Instant::now();
    let mut errors = Errors::default();
    let mut lat = Vec::with_capacity(o.sessions);
    let mut streams: Vec<Conn> = Vec::with_capacity(o.sessions);
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut last_report = Instant::now();
    // A bounded number of handshakes in flight, like a fleet reconnecting, not a SYN flood.
    while next < o.sessions || !set.is_empty() {
        while next < o.sessions && set.len() < o.concurrency {
            let id = format!("mgb-idle-{run_id}-{next}");
            let (target, limit, transport) = (o.target, o.connect_timeout, o.transport.clone());
            set.spawn(async move {
                let t = Instant::now();
                Conn::open(&transport, target, &id, 0, limit).await.map(|s| (s, t.elapsed().as_nanos() as u64))
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok((s, ns)))) => {
                streams.push(s);
                lat.push(ns);
            }
            Some(Ok(Err(e))) => errors.add(e.label(), e),
            Some(Err(e)) => errors.add("task", e),
            None => {}
        }
        if progress && last_report.elapsed() > Duration::from_secs(1) {
            eprintln!("  {:>6} sessions open", streams.len());
            last_report = Instant::now();
        }
    }
    let setup = started.elapsed().as_secs_f64();
    if o.announce {
        println!("open {}", streams.len());
    }
    // Give the front end a moment to finish its own bookkeeping for the last sessions.
    tokio::time::sleep(o.hold.min(Duration::from_secs(1))).await;
    tokio::time::sleep(o.hold.saturating_sub(Duration::from_secs(1))).await;
    let rss_after = rss_of(&o.pids);
    let open = streams.len();
    let alive = ping_all(streams, o.concurrency.max(1), o.connect_timeout, &mut errors).await;
    let bytes_per_session = match (rss_before, rss_after) {
        (Some(b), Some(a)) if open > 0 => Some((a as f64 - b as f64) * 1024.0 / open as f64),
        _ => None,
    };
    IdleReport {
        target: o.target.to_string(),
        transport: o.transport.kind,
        sessions_requested: o.sessions,
        sessions_open: open,
        alive_at_end: alive,
        connects_per_sec: open as f64 / setup,
        connect_latency: Percentiles::from_ns(&mut lat),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        bytes_per_session,
        errors,
    }
}

/// PINGREQ on every session, counts PINGRESPs; closes them all.
async fn ping_all(streams: Vec<Conn>, concurrency: usize, limit: Duration, errors: &mut Errors) -> usize {
    let mut set = JoinSet::new();
    let mut alive = 0;
    let mut it = streams.into_iter();
    loop {
        while set.len() < concurrency * 4 {
            let Some(mut s) = it.next() else { break };
            set.spawn(async move {
                match tokio::time::timeout(limit, s.ping_and_leave()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no PINGRESP within {limit:?}")),
                }
            });
        }
        match set.join_next().await {
            Some(Ok(Ok(()))) => alive += 1,
            Some(Ok(Err(e))) => errors.add("idle_session_dead", e),
            Some(Err(e)) => errors.add("task", e),
            None => break,
        }
    }
    alive
}

fn tcp() -> super::transport::Kind {
    super::transport::Kind::Tcp
}

// ---------------------------------------------------------------- failover under load

#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub target: SocketAddr,
    pub clients: usize,
    /// The primary broker's pid: SIGSTOP at the start of the fault, SIGCONT at the end.
    pub hang_pid: u32,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub connack_timeout: Duration,
    /// How long to wait for every client to be back.
    pub deadline: Duration,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    pub target: String,
    pub clients: usize,
    pub connected_before: usize,
    /// Clients served again after the hang, within the deadline: a QoS 1 PUBLISH sent after it
    /// was acknowledged, on the client's connection (the front end moved the session under it)
    /// or on a new session.
    pub reconnected: usize,
    /// Of those, the clients whose connection never closed (no new session needed).
    #[serde(default)]
    pub kept_session: usize,
    /// Seconds from the hang until the last client was served again; `None` when some
    /// client was not back within the deadline.
    pub all_reconnected_s: Option<f64>,
    pub deadline_s: f64,
    /// Hang to the client noticing (closed by the front end, or no PINGRESP in time).
    pub noticed: Percentiles,
    /// Hang to the client being served again.
    pub reconnect: Percentiles,
    /// Clients connected again by the end of each 100 ms after the hang.
    pub timeline: Vec<u64>,
    pub bucket_ms: u64,
    pub connect_attempts: u64,
    /// Reconnect attempts that failed, by cause (retried at once; not errors of the run).
    pub failed_attempts: Errors,
    pub errors: Errors,
}

struct Fault {
    at: OnceLock<Instant>,
}

impl Fault {
    fn since(&self) -> Option<Duration> {
        self.at.get().map(|t| t.elapsed())
    }
}

/// SIGCONT on drop, so a failing run never leaves the broker stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

#[derive(Default)]
struct ClientOutcome {
    noticed: Option<Duration>,
    reconnected: Option<Duration>,
    /// Served again on its first connection.
    kept: bool,
    attempts: u64,
    failed: Errors,
    errors: Errors,
}

pub async fn failover(o: FailoverOptions, progress: bool) -> anyhow::Result<FailoverReport> {
    use nix::sys::signal::{kill, Signal};
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let mut errors = Errors::default();
    // Connect everyone first, bounded, as in the idle load.
    let mut streams = Vec::with_capacity(o.clients);
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < o.clients || !set.is_empty() {
        while next < o.clients && set.len() < o.concurrency {
            let id = format!("mgb-fo-{run_id}-{next}");
            let (target, limit) = (o.target, o.connack_timeout * 5);
            set.spawn(async move { wire::open(target, &id, 30, limit).await.map(|s| (id, s)) });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => streams.push(s),
            Some(Ok(Err(e))) => errors.add(e.label(), e),
            Some(Err(e)) => errors.add("task", e),
            None => {}
        }
    }
    let connected_before = streams.len();
    anyhow::ensure!(connected_before > 0, "no client could connect to {}: {:?}", o.target, errors.samples);
    let fault = Arc::new(Fault { at: OnceLock::new() });
    let back = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for (id, s) in streams {
        tasks.push(tokio::spawn(client(id, s, o.clone(), fault.clone(), back.clone(), stop.clone())));
    }
    // A steady state first: every client has pinged at least once.
    tokio::time::sleep(o.ping_interval * 2).await;

    let pid = nix::unistd::Pid::from_raw(o.hang_pid as i32);
    let _resume = Resume(o.hang_pid);
    let _ = fault.at.set(Instant::now());
    kill(pid, Signal::SIGSTOP).map_err(|e| anyhow::anyhow!("cannot stop pid {}: {e}", o.hang_pid))?;
    if progress {
        eprintln!("  primary (pid {}) hung; waiting for {connected_before} clients to reconnect", o.hang_pid);
    }
    let hung_at = *fault.at.get().expect("set above");
    let mut last_print = Instant::now();
    while hung_at.elapsed() < o.deadline && (back.load(Ordering::Relaxed) as usize) < connected_before {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if progress && last_print.elapsed() >= Duration::from_millis(500) {
            eprintln!(
                "  {:4.1} s after the hang: {:>5} of {connected_before} connected again",
                hung_at.elapsed().as_secs_f64(),
                back.load(Ordering::Relaxed)
            );
            last_print = Instant::now();
        }
    }
    stop.cancel();
    drop(_resume);
    let mut noticed = Vec::new();
    let mut reconnect = Vec::new();
    let mut kept_session = 0;
    let mut attempts = 0;
    let mut failed_attempts = Errors::default();
    for t in tasks {
        let r = t.await?;
        attempts += r.attempts;
        failed_attempts.merge(r.failed);
        errors.merge(r.errors);
        if let Some(d) = r.noticed {
            noticed.push(d.as_nanos() as u64);
        }
        if let Some(d) = r.reconnected {
            reconnect.push(d.as_nanos() as u64);
            kept_session += usize::from(r.kept);
        }
    }
    let bucket = Duration::from_millis(100);
    let buckets = (o.deadline.as_millis() / bucket.as_millis()) as usize;
    let timeline = (1..=buckets)
        .map(|b| reconnect.iter().filter(|&&ns| ns <= (bucket * b as u32).as_nanos() as u64).count() as u64)
        .collect();
    let all = (reconnect.len() == connected_before).then(|| reconnect.iter().max().copied().unwrap_or(0) as f64 / 1e9);
    Ok(FailoverReport {
        target: o.target.to_string(),
        clients: o.clients,
        connected_before,
        reconnected: reconnect.len(),
        kept_session,
        all_reconnected_s: all,
        deadline_s: o.deadline.as_secs_f64(),
        noticed: Percentiles::from_ns(&mut noticed),
        reconnect: Percentiles::from_ns(&mut reconnect),
        timeline,
        bucket_ms: bucket.as_millis() as u64,
        connect_attempts: attempts,
        failed_attempts,
        errors,
    })
}

/// One client: pings every `ping_interval`; when the session dies (closed, or no PINGRESP
/// within `ping_timeout`) reconnects with the same client id until a CONNACK accepts it. It is
/// served again at the first PUBACK to a QoS 1 PUBLISH sent after the fault: a broker has its
/// messages again. (A PINGRESP would not say so: meshgate answers PINGREQs itself while it
/// moves a session.) Until then every ping carries such a PUBLISH.
async fn client(
    id: String,
    mut stream: TcpStream,
    o: FailoverOptions,
    fault: Arc<Fault>,
    back: Arc<AtomicU64>,
    stop: CancellationToken,
) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    // Spread the pings so 1,000 clients do not all ping in the same millisecond.
    let offset = Duration::from_micros(rand::random::<u64>() % o.ping_interval.as_micros().max(1) as u64);
    tokio::select! {
        _ = tokio::time::sleep(offset) => {}
        _ = stop.cancelled() => return out,
    }
    let mut closed = false;
    let mut packet_id: u16 = 0;
    loop {
        let publish = (fault.since().is_some() && out.reconnected.is_none()).then(|| {
            packet_id = packet_id.wrapping_add(1).max(1);
            packet_id
        });
        let (alive, acked) = tokio::select! {
            r = ping(&mut stream, o.ping_timeout, publish, &fault) => r,
            _ = stop.cancelled() => return out,
        };
        if acked.is_some() && out.reconnected.is_none() {
            out.reconnected = acked;
            out.kept = !closed;
            back.fetch_add(1, Ordering::Relaxed);
        }
        // Not served yet after the fault: the next PUBLISH at once (a PUBACK read late would be
        // timed late).
        if alive && publish.is_some() && out.reconnected.is_none() {
            continue;
        }
        if alive {
            tokio::select! {
                _ = tokio::time::sleep(o.ping_interval) => continue,
                _ = stop.cancelled() => return out,
            }
        }
        let after_fault = fault.since();
        if after_fault.is_none() {
            out.errors.add("lost_before_fault", format!("{id} lost its session before the fault"));
        }
        if out.noticed.is_none() {
            out.noticed = after_fault;
        }
        // Its connection closed: a client served from now on did not keep it.
        closed = true;
        loop {
            out.attempts += 1;
            let r = tokio::select! {
                r = wire::open(o.target, &id, 30, o.connack_timeout) => r,
                _ = stop.cancelled() => return out,
            };
            match r {
                Ok(s) => {
                    // Pinged (with its PUBLISH) at once on the new session.
                    stream = s;
                    break;
                }
                Err(e) => {
                    out.failed.add(e.label(), &e);
                    // A refused TCP connect comes back at once; do not spin on it.
                    if matches!(e, wire::WireError::Connect(_)) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }
}

/// A QoS 1 PUBLISH with packet id `publish` (if given) and a PINGREQ: the connection lives if
/// the PINGRESP comes within `limit`; the PUBACK (any: the client publishes only after the
/// fault) is waited for up to `limit` longer and timed when it is read. Other packets are
/// skipped. Returns whether the PINGRESP came, and when after the fault a PUBACK did.
async fn ping(
    stream: &mut TcpStream,
    limit: Duration,
    publish: Option<u16>,
    fault: &Fault,
) -> (bool, Option<Duration>) {
    let (mut pong, mut acked) = (false, None);
    let started = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(16);
    if let Some(id) = publish {
        // Topic "mgb-fo", nobody subscribed: the broker's acknowledgement is all it costs.
        let stamp = wire::Stamp { sent_ns: 0, seq: u64::from(id), publisher: 0 };
        wire::push_publish(&mut out, b"mgb-fo", 1, id, 0, stamp);
    }
    out.extend_from_slice(&PINGREQ);
    if tokio::time::timeout(limit, stream.write_all(&out)).await.map_or(true, |r| r.is_err()) {
        return (false, None);
    }
    let mut rb = wire::ReadBuf::new(64);
    loop {
        loop {
            match rb.next_packet() {
                Ok(Some(p)) if p.first == 0xd0 => pong = true,
                Ok(Some(p)) if p.first == 0x40 && acked.is_none() => acked = fault.since(),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return (false, acked),
            }
        }
        if pong && (acked.is_some() || publish.is_none()) {
            return (pong, acked);
        }
        let until = started + if pong { 2 * limit } else { limit };
        match tokio::time::timeout_at(until, rb.fill(stream)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return (pong, acked),
        }
    }
}
