//! `meshgate suite chaos`: brokers fail and recover every cycle while clients publish and subscribe; every message is accounted for.
//!
//! P publishers send QoS 1 messages with sequence numbers and S subscribers receive them, all
//! through the front end. Every cycle the broker that takes new clients is failed (killed or
//! hung) and recovered one cycle later. A message acknowledged to its publisher but never
//! received by a subscriber is lost; losses are split into those inside a fault window (from
//! just before the fault, when messages were in flight, until every client it cut off was
//! connected again and every subscriber received again; and likewise around the recovery, when
//! sessions move back to the recovered broker) and those outside, which should never happen.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::model::{Chart, ChartKind, ScenarioResult, Series, Table};
use super::scenarios::{active_broker, histogram, percentile, tag};
use super::Target;
use meshgate::upstream::client::RawClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    Kill,
    Hang,
    /// Alternates, starting with a hang.
    Mixed,
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub duration: Duration,
    pub cycle: Duration,
    pub fault: FaultMode,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages per second per publisher.
    pub rate: f64,
    /// Pass thresholds.
    pub max_takeover: Duration,
    pub max_failed_connects: usize,
    pub max_lost_outside: usize,
    pub progress: bool,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            duration: Duration::from_secs(300),
            cycle: Duration::from_secs(60),
            fault: FaultMode::Mixed,
            publishers: 4,
            subscribers: 2,
            rate: 10.0,
            max_takeover: Duration::from_millis(1500),
            max_failed_connects: 0,
            max_lost_outside: 0,
            progress: true,
        }
    }
}

/// Messages in flight when a fault strikes may be lost with the broker; a window opens this
/// long before the fault.
const IN_FLIGHT: f64 = 0.25;

#[derive(Default)]
struct Log {
    /// (publisher, seq) -> (sent at, acked at)
    published: BTreeMap<(usize, u64), (f64, Option<f64>)>,
    /// per subscriber: (publisher, seq) -> deliveries
    received: Vec<HashMap<(usize, u64), u32>>,
    /// per subscriber: when it received each message (first or not) and which, in order
    received_at: Vec<Vec<(f64, (usize, u64))>>,
    out_of_order: u64,
    /// receive times, for the delivery chart
    receive_times: Vec<f64>,
    /// (client name, at, ok)
    connects: Vec<(String, f64, bool)>,
    /// (client name, lost at)
    losses: Vec<(String, f64)>,
    /// (client name, reconnected at)
    reconnects: Vec<(String, f64)>,
    /// (at, connected clients)
    connected: Vec<(f64, usize)>,
    /// (at, broker, clients) from meshgate's /clients, when there is one
    per_broker: Vec<(f64, String, usize)>,
}

struct FaultRecord {
    kind: &'static str,
    broker: String,
    at: f64,
    recovered_at: Option<f64>,
}

type Shared = Arc<Mutex<Log>>;

fn now(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// Connects, retrying every 50 ms (up to 1 s apart) until it works or `stop`; every attempt is logged.
async fn connect(front: &str, id: &str, log: &Shared, t0: Instant, stop: &CancellationToken) -> Option<RawClient> {
    let mut backoff = Duration::from_millis(50);
    loop {
        if stop.is_cancelled() {
            return None;
        }
        let at = now(t0);
        match RawClient::connect(front, id, true, Duration::from_secs(3)).await {
            Ok((c, 0, _)) => {
                log.lock().unwrap().connects.push((id.to_string(), at, true));
                return Some(c);
            }
            _ => {
                log.lock().unwrap().connects.push((id.to_string(), at, false));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    i: usize,
    front: String,
    id: String,
    topic: String,
    rate: f64,
    log: Shared,
    t0: Instant,
    stop: CancellationToken,
) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut seq = 0u64;
    let mut client = connect(&front, &id, &log, t0, &stop).await;
    let mut next = Instant::now();
    while let Some(c) = client.as_mut() {
        if stop.is_cancelled() {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        next += period;
        let sent = now(t0);
        log.lock().unwrap().published.entry((i, seq)).or_insert((sent, None));
        match c.publish(&topic, format!("{i}:{seq}").as_bytes(), 1, false, Duration::from_secs(1)).await {
            Ok(()) => {
                log.lock().unwrap().published.get_mut(&(i, seq)).expect("recorded").1 = Some(now(t0));
                seq += 1;
            }
            Err(_) => {
                // Not acknowledged: it may or may not have arrived. A new session sends the
                // next number; a late arrival of this one is not a loss either way.
                log.lock().unwrap().losses.push((id.clone(), now(t0)));
                seq += 1;
                client = connect(&front, &id, &log, t0, &stop).await;
                if client.is_some() {
                    log.lock().unwrap().reconnects.push((id.clone(), now(t0)));
                }
                next = Instant::now();
            }
        }
    }
}

async fn subscriber(
    s: usize,
    front: String,
    id: String,
    filter: String,
    log: Shared,
    t0: Instant,
    stop: CancellationToken,
) {
    let mut last_seq: HashMap<usize, u64> = HashMap::new();
    let mut first = true;
    'session: while !stop.is_cancelled() {
        let Some(mut c) = connect(&front, &id, &log, t0, &stop).await else { return };
        if c.subscribe(&filter, 1, Duration::from_secs(2)).await.is_err() {
            continue;
        }
        if !first {
            log.lock().unwrap().reconnects.push((id.clone(), now(t0)));
        }
        first = false;
        let mut last_ping = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            // A ping now and then: a hung path shows itself even when no message flows.
            if last_ping.elapsed() > Duration::from_millis(300) {
                last_ping = Instant::now();
                if c.ping(Duration::from_millis(700)).await.is_err() {
                    log.lock().unwrap().losses.push((id.clone(), now(t0)));
                    continue 'session;
                }
            }
            match c.next_message(Duration::from_millis(100)).await {
                Ok(Some(m)) => {
                    let text = String::from_utf8_lossy(&m.payload).into_owned();
                    let Some((p, q)) = text.split_once(':') else { continue };
                    let (Ok(p), Ok(q)) = (p.parse::<usize>(), q.parse::<u64>()) else { continue };
                    let mut l = log.lock().unwrap();
                    *l.received[s].entry((p, q)).or_default() += 1;
                    let at = now(t0);
                    l.receive_times.push(at);
                    l.received_at[s].push((at, (p, q)));
                    let prev = last_seq.insert(p, q);
                    if prev.is_some_and(|prev| q < prev) {
                        l.out_of_order += 1;
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    log.lock().unwrap().losses.push((id.clone(), now(t0)));
                    continue 'session;
                }
            }
        }
    }
}

/// Counts this run's sessions per broker from meshgate's `/clients`.
async fn sample_per_broker(http: &str, tag: &str) -> Option<HashMap<String, usize>> {
    let v = super::get_json(http, "/clients").await?;
    let mut counts = HashMap::new();
    for c in v.as_array()? {
        if c["client_id"].as_str().is_some_and(|id| id.contains(tag)) {
            *counts.entry(c["broker"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
    }
    Some(counts)
}

pub async fn chaos(t: &Target, opts: &ChaosOptions) -> ScenarioResult {
    let mut r = ScenarioResult::new("chaos");
    let tag = tag();
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    // Publishers stop first, so the last messages have time to arrive before subscribers stop.
    let stop_publishing = CancellationToken::new();
    let log: Shared = Arc::new(Mutex::new(Log {
        received: vec![HashMap::new(); opts.subscribers],
        received_at: vec![Vec::new(); opts.subscribers],
        ..Default::default()
    }));
    let mut tasks = JoinSet::new();
    for s in 0..opts.subscribers {
        let id = format!("chaos-{tag}-sub{s}");
        tasks.spawn(subscriber(s, t.front.clone(), id, format!("chaos/{tag}/#"), log.clone(), t0, stop.clone()));
    }
    // Subscribers first, so the first messages have somewhere to go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in 0..opts.publishers {
        let id = format!("chaos-{tag}-pub{p}");
        let stop = stop_publishing.clone();
        tasks.spawn(publisher(p, t.front.clone(), id, format!("chaos/{tag}/pub{p}"), opts.rate, log.clone(), t0, stop));
    }
    // Sampler: connected clients, and per broker where meshgate's API says.
    {
        let (log, stop, http, tag) = (log.clone(), stop.clone(), t.http.clone(), tag.clone());
        let clients = opts.publishers + opts.subscribers;
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let at = now(t0);
                {
                    let mut l = log.lock().unwrap();
                    let lost: HashMap<&String, f64> = l.losses.iter().map(|(c, a)| (c, *a)).collect();
                    let back: HashMap<&String, f64> = l.reconnects.iter().map(|(c, a)| (c, *a)).collect();
                    let down = lost.iter().filter(|(c, a)| back.get(*c).is_none_or(|b| b < a)).count();
                    l.connected.push((at, clients - down));
                }
                if let Some(http) = &http {
                    if let Some(counts) = sample_per_broker(http, &tag).await {
                        let mut l = log.lock().unwrap();
                        for (b, n) in counts {
                            l.per_broker.push((at, b, n));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut cycle_no = 0;
    let mut pending: Option<(usize, &'static str, String)> = None;
    // A fault is started while it can be recovered one cycle later, near enough the end.
    let fits = |t0: Instant| t0.elapsed() + opts.cycle <= opts.duration + opts.cycle / 2;
    while fits(t0) {
        tokio::time::sleep_until((t0 + opts.cycle * (cycle_no + 1)).into()).await;
        cycle_no += 1;
        // Recover last cycle's victim, then fail whoever takes new clients now.
        if let Some((idx, kind, broker)) = pending.take() {
            let r = match kind {
                "kill" => tokio::task::block_in_place(|| t.control.restart(&broker)),
                _ => tokio::task::block_in_place(|| t.control.resume(&broker)),
            };
            if let Err(e) = r {
                eprintln!("chaos: cannot recover {broker}: {e}");
            }
            faults[idx].recovered_at = Some(now(t0));
            if opts.progress {
                eprintln!("[{}] chaos {:>5.1}s: {broker} recovered", t.front_end, now(t0));
            }
        }
        if !fits(t0) {
            break;
        }
        // Let a failback settle so the fault hits the broker that really takes clients.
        let primary = t.brokers.first().map(|b| b.0.clone());
        let settle = Instant::now() + Duration::from_secs(2);
        let mut victim = active_broker(t).await;
        while victim != primary && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            victim = active_broker(t).await;
        }
        let Some(victim) = victim else { continue };
        let kind = match (opts.fault, faults.len() % 2) {
            (FaultMode::Kill, _) | (FaultMode::Mixed, 1) => "kill",
            _ => "hang",
        };
        let at = now(t0);
        let res = match kind {
            "kill" => tokio::task::block_in_place(|| t.control.kill(&victim)),
            _ => tokio::task::block_in_place(|| t.control.hang(&victim)),
        };
        if let Err(e) = res {
            eprintln!("chaos: cannot {kind} {victim}: {e}");
            continue;
        }
        if opts.progress {
            eprintln!("[{}] chaos {:>5.1}s: {kind} {victim}", t.front_end, at);
        }
        faults.push(FaultRecord { kind, broker: victim.clone(), at, recovered_at: None });
        pending = Some((faults.len() - 1, kind, victim));
    }
    tokio::time::sleep_until((t0 + opts.duration).into()).await;
    if let Some((idx, kind, broker)) = pending.take() {
        let _ = match kind {
            "kill" => tokio::task::block_in_place(|| t.control.restart(&broker)),
            _ => tokio::task::block_in_place(|| t.control.resume(&broker)),
        };
        faults[idx].recovered_at = Some(now(t0));
    }
    // Let the last deliveries arrive.
    stop_publishing.cancel();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let log = std::mem::take(&mut *log.lock().unwrap());
    evaluate(&mut r, t, opts, &faults, &log);
    r
}

fn evaluate(r: &mut ScenarioResult, t: &Target, opts: &ChaosOptions, faults: &[FaultRecord], log: &Log) {
    let end = opts.duration.as_secs_f64();
    // Fault windows: from just before the fault until every client it cut off is back.
    let mut windows = Vec::new();
    let mut reconnect_times = Vec::new();
    // Clients whose connection closed, per fault: while it lasted, and when the broker came back.
    let mut cut_by_fault = Vec::new();
    let mut cut_by_recovery = vec![0usize; faults.len()];
    for (k, f) in faults.iter().enumerate() {
        // Clients cut off while the fault lasts; sessions moved back after the recovery
        // belong to the recovery's window below.
        let next = faults.get(k + 1).map(|n| n.at).unwrap_or(end + 10.0).min(f.recovered_at.unwrap_or(end + 10.0));
        let mut back_at = f.at;
        let mut cut: HashMap<&String, f64> = HashMap::new();
        for (c, at) in &log.losses {
            if *at >= f.at && *at < next {
                cut.entry(c).or_insert(*at);
            }
        }
        for (c, _) in cut.iter() {
            if let Some((_, b)) = log.reconnects.iter().find(|(rc, b)| rc == *c && *b >= f.at) {
                back_at = back_at.max(*b);
                reconnect_times.push(b - f.at);
            } else {
                back_at = back_at.max(f.recovered_at.unwrap_or(end));
            }
        }
        // A subscriber the fault did not cut off (its session was moved under it) is served
        // again at the first message it receives that was published after the fault: until
        // then it missed what it missed. (A message published before the fault can still
        // arrive after it, from the failed broker's socket buffers, and says nothing about
        // the new path.)
        for times in &log.received_at {
            let served = times.iter().find(|(at, key)| {
                *at >= f.at && *at < next && log.published.get(key).is_some_and(|(sent, _)| *sent >= f.at)
            });
            if let Some((first, _)) = served {
                back_at = back_at.max(*first);
            }
        }
        windows.push((f.at - IN_FLIGHT, back_at));
        cut_by_fault.push(cut.len());
    }
    // The recovery a cycle later opens a window too: meshgate moves sessions back to the
    // recovered broker (failback), and a clean-session subscriber misses what is published
    // while it reconnects.
    for (k, f) in faults.iter().enumerate() {
        let Some(rec) = f.recovered_at else { continue };
        let until = faults.get(k + 1).map(|n| n.at).unwrap_or(end + 10.0).min(rec + 5.0);
        let mut close = rec;
        cut_by_recovery[k] = log.losses.iter().filter(|(_, at)| *at >= rec && *at < until).count();
        for (c, at) in log.losses.iter().filter(|(_, at)| *at >= rec && *at < until) {
            if let Some((_, b)) = log.reconnects.iter().find(|(rc, b)| rc == c && *b >= *at) {
                close = close.max(*b);
            }
        }
        if close > rec {
            windows.push((rec - IN_FLIGHT, close));
        }
    }
    let inside = |at: f64| windows.iter().any(|(a, b)| at >= *a && at <= *b);

    let sent = log.published.len();
    let acked: Vec<(&(usize, u64), f64)> = log.published.iter().filter_map(|(k, (s, a))| a.map(|_| (k, *s))).collect();
    let (mut lost_inside, mut lost_outside, mut duplicated) = (0usize, 0usize, 0u64);
    let mut lost_at: Vec<f64> = Vec::new();
    for rec in &log.received {
        for (key, sent_at) in &acked {
            match rec.get(key) {
                None if inside(*sent_at) => lost_inside += 1,
                None => {
                    lost_outside += 1;
                    lost_at.push(*sent_at);
                }
                Some(n) if *n > 1 => duplicated += u64::from(*n - 1),
                _ => {}
            }
        }
    }
    let received: usize = log.received.iter().map(|m| m.len()).sum();
    let failed_connects = log.connects.iter().filter(|c| !c.2).count();

    // Takeover per fault: the longest gap between acknowledged publishes of one publisher
    // across the fault.
    let mut rows = Vec::new();
    let mut worst_takeover: f64 = 0.0;
    let mut all_taken_over = true;
    for (k, f) in faults.iter().enumerate() {
        let limit = f.recovered_at.unwrap_or(end);
        let mut gap: Option<f64> = Some(0.0);
        for p in 0..opts.publishers {
            let acks: Vec<f64> =
                log.published.iter().filter(|((pp, _), _)| *pp == p).filter_map(|(_, (_, a))| *a).collect();
            let before = acks.iter().copied().filter(|a| *a < f.at).fold(f64::NAN, f64::max);
            let after = acks.iter().copied().filter(|a| *a >= f.at && *a < limit).fold(f64::NAN, f64::min);
            let g = if after.is_nan() { None } else { Some(after - if before.is_nan() { f.at } else { before }) };
            gap = match (gap, g) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        let fails = log.connects.iter().filter(|c| !c.2 && c.1 >= f.at && c.1 < limit).count();
        let (wa, wb) = windows[k];
        let in_window = acked.iter().filter(|(_, s)| *s >= wa && *s <= wb).count();
        if let Some(g) = gap {
            worst_takeover = worst_takeover.max(g);
        } else {
            all_taken_over = false;
        }
        rows.push(vec![
            format!("{}", k + 1),
            format!("{:.1} s", f.at),
            format!("{} {}", f.kind, f.broker),
            gap.map(|g| format!("{g:.2} s")).unwrap_or_else(|| "never (until recovery)".into()),
            fails.to_string(),
            cut_by_fault[k].to_string(),
            cut_by_recovery[k].to_string(),
            format!("{:.2} s", wb - wa - IN_FLIGHT),
            in_window.to_string(),
        ]);
    }
    r.metric("faults", faults.len() as f64, "");
    r.metric("messages_sent", sent as f64, "");
    r.metric("messages_acknowledged", acked.len() as f64, "");
    r.metric("deliveries", received as f64, "");
    r.metric("lost_inside_fault_windows", lost_inside as f64, "");
    r.metric("lost_outside_fault_windows", lost_outside as f64, "");
    r.metric("duplicated", duplicated as f64, "");
    r.metric("out_of_order", log.out_of_order as f64, "");
    r.metric("connect_attempts", log.connects.len() as f64, "");
    r.metric("failed_connects", failed_connects as f64, "");
    r.metric("client_disconnects", log.losses.len() as f64, "");
    r.metric("worst_takeover_s", if all_taken_over { worst_takeover } else { f64::NAN }, "s");
    reconnect_times.sort_by(f64::total_cmp);
    r.metric("reconnect_p50_s", percentile(&reconnect_times, 0.5), "s");
    r.metric("reconnect_max_s", reconnect_times.last().copied().unwrap_or(f64::NAN), "s");

    let takeover_ok = all_taken_over && worst_takeover <= opts.max_takeover.as_secs_f64();
    r.passed = takeover_ok
        && failed_connects <= opts.max_failed_connects
        && lost_outside <= opts.max_lost_outside
        && !acked.is_empty();
    r.summary = format!(
        "{} faults in {:.0} s: {} acknowledged, {lost_outside} lost outside fault windows ({lost_inside} inside), {failed_connects} failed connects, {} client disconnects, worst takeover {}",
        faults.len(),
        end,
        acked.len(),
        log.losses.len(),
        if all_taken_over { format!("{worst_takeover:.2} s") } else { "never".into() }
    );
    if !takeover_ok {
        r.notes.push(format!("threshold: every fault taken over within {:.2} s", opts.max_takeover.as_secs_f64()));
    }
    if failed_connects > opts.max_failed_connects {
        r.notes.push(format!("threshold: at most {} failed connects", opts.max_failed_connects));
    }
    if lost_outside > opts.max_lost_outside {
        let first = lost_at.iter().copied().fold(f64::NAN, f64::min);
        r.notes.push(format!(
            "threshold: at most {} messages lost outside fault windows; first lost message sent at {first:.2} s",
            opts.max_lost_outside,
        ));
        // What to look at next: the windows, and where the front end had its sessions around
        // the first loss (meshgate's /clients, sampled).
        let spans: Vec<String> = windows.iter().map(|(a, b)| format!("{a:.2}–{b:.2}")).collect();
        r.notes.push(format!("fault windows (s): {}", spans.join(", ")));
        let near: Vec<String> = log
            .per_broker
            .iter()
            .filter(|(at, _, n)| (*at - first).abs() <= 1.5 && *n > 0)
            .map(|(at, b, n)| format!("{at:.2} {b} {n}"))
            .collect();
        if !near.is_empty() {
            r.notes.push(format!("sessions per broker near it: {}", near.join("; ")));
        }
    }
    if t.front_end == "nginx" && faults.iter().any(|f| f.kind == "hang") {
        r.notes.push(
            "nginx never notices a hung broker: its clients stay cut off until the broker is resumed a cycle later."
                .into(),
        );
    }
    r.tables.push(Table {
        title: "faults".into(),
        columns: [
            "#",
            "at",
            "fault",
            "takeover",
            "failed connects",
            "clients cut off",
            "cut off at recovery",
            "window",
            "acked in window",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    });
    let markers: Vec<(f64, String)> = faults
        .iter()
        .flat_map(|f| {
            let mut m = vec![(f.at, format!("{} {}", f.kind, f.broker))];
            if let Some(rt) = f.recovered_at {
                m.push((rt, format!("{} back", f.broker)));
            }
            m
        })
        .collect();
    let mut series = vec![Series {
        name: "connected clients".into(),
        points: log.connected.iter().map(|(a, n)| (*a, *n as f64)).collect(),
    }];
    let mut brokers: Vec<&String> = log.per_broker.iter().map(|(_, b, _)| b).collect();
    brokers.sort();
    brokers.dedup();
    for b in brokers {
        // A broker missing from a sample had no clients then.
        let points = log
            .connected
            .iter()
            .map(|(at, _)| {
                let n =
                    log.per_broker.iter().filter(|(a, bb, _)| a == at && bb == b).map(|(_, _, n)| *n).sum::<usize>();
                (*at, n as f64)
            })
            .collect();
        series.push(Series { name: format!("on {b}"), points });
    }
    r.charts.push(Chart {
        title: "clients over time".into(),
        kind: ChartKind::Timeline,
        x_label: "seconds".into(),
        y_label: "clients".into(),
        categories: vec![],
        series,
        markers: markers.clone(),
    });
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut b = 0.0;
    while b < end {
        buckets.insert((b * 4.0) as u64, 0.0);
        b += 0.25;
    }
    for at in &log.receive_times {
        *buckets.entry((at * 4.0) as u64).or_default() += 4.0;
    }
    r.charts.push(Chart {
        title: "deliveries per second (gaps are lost time)".into(),
        kind: ChartKind::Timeline,
        x_label: "seconds".into(),
        y_label: "messages/s".into(),
        categories: vec![],
        series: vec![Series {
            name: "received".into(),
            points: buckets.into_iter().map(|(k, v)| (k as f64 / 4.0, v)).collect(),
        }],
        markers,
    });
    r.charts.push(Chart {
        title: "clients connected again after a fault".into(),
        kind: ChartKind::Histogram,
        x_label: "seconds after the fault".into(),
        y_label: "clients".into(),
        categories: vec![],
        series: vec![Series { name: "clients".into(), points: histogram(&reconnect_times) }],
        markers: vec![],
    });
}
