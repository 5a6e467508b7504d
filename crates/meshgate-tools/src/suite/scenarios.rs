//! The scenarios: connectivity, replication, retained, failover and clients, each measured in numbers.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::model::{Chart, ChartKind, ScenarioResult, Series, Table};
use super::{Options, Target};
use meshgate::health::probe::PROBE_TOPIC_PREFIX;
use meshgate::upstream::client::RawClient;

const SHORT: Duration = Duration::from_secs(2);

/// A tag that keeps topics and client ids of one run apart from every other run.
pub(super) fn tag() -> String {
    let ms = meshgate::events::unix_ms(std::time::SystemTime::now());
    format!("{}-{}", std::process::id(), ms % 100_000_000)
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1} ms")
    }
}

pub async fn connectivity(t: &Target, _opts: &Options) -> ScenarioResult {
    let mut r = ScenarioResult::new("connectivity");
    let tag = tag();
    let mut endpoints = vec![(format!("front ({})", t.front_end), t.front.clone())];
    endpoints.extend(t.brokers.iter().map(|(n, a)| (n.clone(), a.clone())));
    let mut rows = Vec::new();
    let mut p50s = Vec::new();
    let mut failures = 0;
    const N: usize = 10;
    for (name, addr) in &endpoints {
        let mut times = Vec::new();
        let mut errors = Vec::new();
        for i in 0..N {
            match RawClient::connect(addr, &format!("suite-conn-{tag}-{i}"), true, SHORT).await {
                Ok((c, 0, took)) => {
                    times.push(ms(took));
                    c.disconnect().await;
                }
                Ok((_, code, _)) => errors.push(format!("CONNACK code {code}")),
                Err(e) => errors.push(e),
            }
        }
        failures += errors.len();
        times.sort_by(f64::total_cmp);
        let p50 = percentile(&times, 0.5);
        p50s.push(if p50.is_nan() { 0.0 } else { p50 });
        rows.push(vec![
            name.clone(),
            addr.clone(),
            format!("{}/{N}", times.len()),
            fmt_ms(p50),
            fmt_ms(times.last().copied().unwrap_or(f64::NAN)),
            errors.first().cloned().unwrap_or_default(),
        ]);
        if name.starts_with("front") {
            r.metric("front_connack_p50_ms", p50, "ms");
        }
    }
    r.metric("failed_connects", failures as f64, "");
    r.passed = failures == 0;
    r.summary = if r.passed {
        format!("front end and {} brokers accept MQTT ({} connects each)", t.brokers.len(), N)
    } else {
        format!("{failures} of {} connects failed", N * endpoints.len())
    };
    r.tables.push(Table {
        title: "CONNECT to CONNACK".into(),
        columns: ["endpoint", "address", "ok", "p50", "max", "first error"].map(String::from).to_vec(),
        rows,
    });
    r.charts.push(Chart {
        title: "CONNECT to CONNACK, median".into(),
        kind: ChartKind::Bars,
        x_label: "endpoint".into(),
        y_label: "ms".into(),
        categories: endpoints.iter().map(|e| e.0.clone()).collect(),
        series: vec![Series {
            name: "p50".into(),
            points: p50s.iter().enumerate().map(|(i, v)| (i as f64, *v)).collect(),
        }],
        markers: vec![],
    });
    r
}

/// Subscribers on every broker directly; one QoS 1 message published on each broker in turn.
/// Every subscriber must get every message exactly once.
pub async fn replication(t: &Target, _opts: &Options) -> ScenarioResult {
    let mut r = ScenarioResult::new("replication");
    let tag = tag();
    let prefix = format!("suite/{tag}/repl");
    let counts: Arc<Mutex<BTreeMap<(String, String), u32>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut subs = JoinSet::new();
    for (name, addr) in &t.brokers {
        let mut c = match RawClient::connect(addr, &format!("suite-repl-sub-{tag}-{name}"), true, SHORT).await {
            Ok((c, 0, _)) => c,
            other => {
                r.summary = format!("cannot subscribe on {name}: {:?}", other.err());
                return r;
            }
        };
        if let Err(e) = c.subscribe(&format!("{prefix}/#"), 1, SHORT).await {
            r.summary = format!("cannot subscribe on {name}: {e}");
            return r;
        }
        let (counts, stop, name) = (counts.clone(), stop.clone(), name.clone());
        subs.spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(Some(m)) = c.next_message(Duration::from_millis(100)).await {
                    let from = m.topic.rsplit('/').next().unwrap_or("").to_string();
                    *counts.lock().unwrap().entry((from, name.clone())).or_default() += 1;
                }
            }
        });
    }
    for (name, addr) in &t.brokers {
        if let Ok((mut c, 0, _)) = RawClient::connect(addr, &format!("suite-repl-pub-{tag}-{name}"), true, SHORT).await
        {
            let _ = c.publish(&format!("{prefix}/{name}"), b"x", 1, false, SHORT).await;
            c.disconnect().await;
        }
    }
    // Long enough for a copy to arrive, and for a storm to show itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    while subs.join_next().await.is_some() {}
    let counts = counts.lock().unwrap().clone();
    let names: Vec<&String> = t.brokers.iter().map(|b| &b.0).collect();
    let mut rows = Vec::new();
    let (mut exact, mut missing, mut extra) = (0, 0, 0u32);
    for from in &names {
        let mut row = vec![format!("published on {from}")];
        for to in &names {
            let n = counts.get(&((*from).clone(), (*to).clone())).copied().unwrap_or(0);
            match n {
                1 => exact += 1,
                0 => missing += 1,
                n => extra += n - 1,
            }
            row.push(n.to_string());
        }
        rows.push(row);
    }
    let cells = names.len() * names.len();
    r.metric("deliveries_exactly_once", exact as f64, "");
    r.metric("deliveries_missing", missing as f64, "");
    r.metric("deliveries_duplicated", extra as f64, "");
    r.passed = exact == cells;
    r.summary =
        format!("{exact} of {cells} broker pairs got the message exactly once ({missing} missing, {extra} duplicates)");
    if missing as usize >= cells - names.len() && extra == 0 {
        r.notes.push(
            "Messages are not replicated between the brokers: each message reached only the broker it was published on. \
             Replication is not running: set [replication] enabled = true in meshgate's config (it is on in \
             configs/meshgate.toml), or run `meshgate replicate` beside nginx."
                .into(),
        );
    }
    let mut columns = vec!["".to_string()];
    columns.extend(names.iter().map(|n| format!("received on {n}")));
    r.tables.push(Table { title: "deliveries per pair (expected: all 1)".into(), columns, rows });
    r
}

/// A retained message set through the front end must be readable from every broker.
pub async fn retained(t: &Target, _opts: &Options) -> ScenarioResult {
    let mut r = ScenarioResult::new("retained");
    let tag = tag();
    let topic = format!("suite/{tag}/retained");
    let payload = format!("retained-{tag}");
    match RawClient::connect(&t.front, &format!("suite-ret-pub-{tag}"), true, SHORT).await {
        Ok((mut c, 0, _)) => {
            if let Err(e) = c.publish(&topic, payload.as_bytes(), 1, true, SHORT).await {
                r.summary = format!("publishing through the front end failed: {e}");
                return r;
            }
            c.disconnect().await;
        }
        other => {
            r.summary = format!("connecting through the front end failed: {:?}", other.err());
            return r;
        }
    }
    // Replication, when it exists, needs a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rows = Vec::new();
    let mut holding = 0;
    for (name, addr) in &t.brokers {
        let got = match RawClient::connect(addr, &format!("suite-ret-sub-{tag}-{name}"), true, SHORT).await {
            Ok((mut c, 0, _)) => {
                let _ = c.subscribe(&topic, 1, SHORT).await;
                let mut found = None;
                while let Ok(Some(m)) = c.next_message(Duration::from_millis(500)).await {
                    if m.retain {
                        found = Some(m);
                        break;
                    }
                }
                c.disconnect().await;
                found.map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            }
            _ => None,
        };
        let ok = got.as_deref() == Some(payload.as_str());
        holding += usize::from(ok);
        rows.push(vec![
            name.clone(),
            if ok { "current value".into() } else { got.unwrap_or_else(|| "nothing".into()) },
        ]);
    }
    // Clean up: an empty retained message deletes the value.
    if let Ok((mut c, 0, _)) = RawClient::connect(&t.front, &format!("suite-ret-del-{tag}"), true, SHORT).await {
        let _ = c.publish(&topic, b"", 1, true, SHORT).await;
        c.disconnect().await;
    }
    r.metric("brokers_holding_value", holding as f64, "");
    r.passed = holding == t.brokers.len();
    r.summary = format!("{holding} of {} brokers hold the retained value set through the front end", t.brokers.len());
    if !r.passed {
        r.notes.push(
            "Only some brokers hold the value: retained state is not replicated (replication is off or a link is down), \
             so a client that fails over to another broker does not find it."
                .into(),
        );
    }
    r.tables.push(Table {
        title: "retained value read directly from each broker".into(),
        columns: vec!["broker".into(), "read".into()],
        rows,
    });
    r
}

/// The broker the front end sends new clients to: a subscriber through the front end on a
/// topic that replication never copies, and one publish on each broker directly.
pub(super) async fn active_broker(t: &Target) -> Option<String> {
    let tag = tag();
    let topic = format!("{PROBE_TOPIC_PREFIX}suite/{tag}");
    let (mut sub, code, _) = RawClient::connect(&t.front, &format!("suite-active-{tag}"), true, SHORT).await.ok()?;
    if code != 0 {
        return None;
    }
    sub.subscribe(&topic, 0, SHORT).await.ok()?;
    for (name, addr) in &t.brokers {
        if let Ok((mut c, 0, _)) =
            RawClient::connect(addr, &format!("suite-active-pub-{tag}"), true, Duration::from_millis(500)).await
        {
            let _ = c.publish(&topic, name.as_bytes(), 0, false, SHORT).await;
            c.disconnect().await;
        }
    }
    let m = sub.next_message(Duration::from_millis(500)).await.ok().flatten()?;
    sub.disconnect().await;
    Some(String::from_utf8_lossy(&m.payload).into_owned())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Hang,
}

struct Attempt {
    start: f64,
    latency_ms: f64,
    ok: bool,
}

/// Hang the active broker and recover it, then kill it and restart it. For each
/// fault: when new clients connect again, how many connects failed, how long existing clients
/// take to be served again, and how many of them had to reconnect (meshgate switches them
/// under their open connections; a front end that closes them makes them reconnect).
pub async fn failover(t: &Target, opts: &Options) -> ScenarioResult {
    let mut r = ScenarioResult::new("failover");
    let mut passed = true;
    let mut summaries = Vec::new();
    let mut table = Vec::new();
    // The hang comes first: a kill makes nginx bar the primary for fail_timeout, and the hang
    // must hit the primary on both front ends to compare like with like.
    for fault in [Fault::Hang, Fault::Kill] {
        let label = if fault == Fault::Kill { "kill" } else { "hang" };
        // After the previous fault the front end may still be moving clients back.
        let primary = t.brokers.first().map(|b| b.0.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut active = active_broker(t).await;
        while active != primary && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            active = active_broker(t).await;
        }
        let Some(active) = active else {
            r.summary = "the front end does not route to any broker".into();
            return r;
        };
        if opts.progress {
            eprintln!("[{}] failover: {label} {active} ...", t.front_end);
        }
        let phase = fault_phase(t, opts, fault, &active).await;
        let back = phase.back_after_s;
        let ok = back.is_some() && phase.failed == 0 && phase.back_s.len() == phase.existing;
        passed &= ok;
        let back_txt = back
            .map(|b| format!("{:.2} s", b))
            .unwrap_or_else(|| format!("never within {:.0} s", opts.duration.as_secs_f64()));
        summaries.push(format!(
            "{label}: new clients back after {back_txt}, {} failed connects, {} of {} existing clients kept their connection",
            phase.failed, phase.kept, phase.existing
        ));
        r.metric(&format!("{label}_new_clients_back_s"), back.unwrap_or(f64::NAN), "s");
        r.metric(&format!("{label}_failed_connects"), phase.failed as f64, "");
        r.metric(&format!("{label}_connect_attempts"), phase.attempts.len() as f64, "");
        r.metric(&format!("{label}_existing_affected"), phase.affected as f64, "");
        r.metric(&format!("{label}_existing_reconnected"), phase.reconnected as f64, "");
        r.metric(&format!("{label}_existing_kept"), phase.kept as f64, "");
        r.metric(&format!("{label}_existing_back"), phase.back_s.len() as f64, "");
        r.metric(&format!("{label}_existing_back_p50_s"), percentile(&phase.back_s, 0.5), "s");
        r.metric(&format!("{label}_existing_back_max_s"), phase.back_s.last().copied().unwrap_or(f64::NAN), "s");
        table.push(vec![
            label.to_string(),
            active.clone(),
            back_txt,
            format!("{}/{}", phase.failed, phase.attempts.len()),
            format!("{} of {}", phase.kept, phase.existing),
            format!("{}/{}", phase.reconnected, phase.affected),
            phase.back_s.last().map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into()),
        ]);
        let ok_pts: Vec<(f64, f64)> = phase.attempts.iter().filter(|a| a.ok).map(|a| (a.start, a.latency_ms)).collect();
        let bad_pts: Vec<(f64, f64)> =
            phase.attempts.iter().filter(|a| !a.ok).map(|a| (a.start, a.latency_ms)).collect();
        r.charts.push(Chart {
            title: format!("{label} {active}: new client connects (CONNECT to CONNACK)"),
            kind: ChartKind::Timeline,
            x_label: "seconds since the fault".into(),
            y_label: "ms".into(),
            categories: vec![],
            series: vec![
                Series { name: "succeeded".into(), points: ok_pts },
                Series { name: "failed".into(), points: bad_pts },
            ],
            markers: vec![(0.0, format!("{active} {label}ed")), (phase.restored_at_s, format!("{active} recovered"))],
        });
        r.charts.push(Chart {
            title: format!("{label} {active}: existing clients served again after"),
            kind: ChartKind::Histogram,
            x_label: "seconds".into(),
            y_label: "clients".into(),
            categories: vec![],
            series: vec![Series { name: "clients".into(), points: histogram(&phase.back_s) }],
            markers: vec![],
        });
    }
    if t.front_end == "nginx" {
        r.notes.push(
            "nginx learns that a broker failed only when a TCP connect to it fails: a hung broker (process stopped, kernel \
             still accepting) is never noticed, so new clients hang until their own timeout."
                .into(),
        );
    }
    r.tables.push(Table {
        title: "faults".into(),
        columns: [
            "fault",
            "broker",
            "new clients back after",
            "failed connects",
            "existing clients kept their connection",
            "cut existing clients reconnected",
            "slowest existing client served again",
        ]
        .map(String::from)
        .to_vec(),
        rows: table,
    });
    r.passed = passed;
    r.summary = summaries.join("; ");
    r
}

pub(super) fn histogram(values: &[f64]) -> Vec<(f64, f64)> {
    let bounds = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];
    let mut counts = vec![0.0; bounds.len()];
    for v in values {
        let i = bounds.iter().position(|b| v <= b).unwrap_or(bounds.len() - 1);
        counts[i] += 1.0;
    }
    bounds.iter().copied().zip(counts).collect()
}

struct Phase {
    attempts: Vec<Attempt>,
    failed: usize,
    back_after_s: Option<f64>,
    existing: usize,
    /// Existing clients that lost their connection during the fault.
    affected: usize,
    reconnected: usize,
    /// Existing clients served again without losing their connection (moved under it).
    kept: usize,
    /// When each existing client was served again after the fault (a ping sent after it
    /// answered, or its new session), sorted.
    back_s: Vec<f64>,
    restored_at_s: f64,
}

async fn fault_phase(t: &Target, opts: &Options, fault: Fault, active: &str) -> Phase {
    const EXISTING: usize = 10;
    let tag = tag();
    let stop = CancellationToken::new();
    let t0: Arc<Mutex<Option<Instant>>> = Arc::default();
    // Per existing client: when it lost its connection, and when it was connected again (first time).
    let lost: Arc<Mutex<BTreeMap<usize, f64>>> = Arc::default();
    let reconnects: Arc<Mutex<BTreeMap<usize, f64>>> = Arc::default();
    let served: Arc<Mutex<BTreeMap<usize, f64>>> = Arc::default();
    let mut existing = JoinSet::new();
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    for i in 0..EXISTING {
        let (front, stop, t0, ready) = (t.front.clone(), stop.clone(), t0.clone(), ready.clone());
        let (lost, reconnects, served) = (lost.clone(), reconnects.clone(), served.clone());
        let id = format!("suite-ex-{tag}-{i}");
        existing.spawn(async move {
            let mut c = loop {
                if let Ok((c, 0, _)) = RawClient::connect(&front, &id, true, SHORT).await {
                    break c;
                }
                if stop.is_cancelled() {
                    return;
                }
            };
            ready.add_permits(1);
            // A client that pings every 200 ms notices a dead or hung path within a second,
            // as a client with a short keepalive would.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                let sent_at = *t0.lock().unwrap();
                if c.ping(Duration::from_secs(1)).await.is_ok() {
                    // Served again: a ping sent after the fault was answered.
                    if let Some(t0) = sent_at {
                        served.lock().unwrap().entry(i).or_insert(t0.elapsed().as_secs_f64());
                    }
                    continue;
                }
                if let Some(t0) = *t0.lock().unwrap() {
                    lost.lock().unwrap().entry(i).or_insert(t0.elapsed().as_secs_f64());
                }
                loop {
                    if stop.is_cancelled() {
                        return;
                    }
                    match RawClient::connect(&front, &id, true, SHORT).await {
                        Ok((nc, 0, _)) => {
                            c = nc;
                            if let Some(t0) = *t0.lock().unwrap() {
                                let at = t0.elapsed().as_secs_f64();
                                reconnects.lock().unwrap().entry(i).or_insert(at);
                                served.lock().unwrap().entry(i).or_insert(at);
                            }
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), ready.acquire_many(EXISTING as u32)).await;

    // New clients: one connect attempt every 100 ms, each with its own 3 s limit.
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let start = Instant::now();
    let name = active.to_string();
    let control_fault = match fault {
        Fault::Kill => tokio::task::block_in_place(|| t.control.kill(&name)),
        Fault::Hang => tokio::task::block_in_place(|| t.control.hang(&name)),
    };
    *t0.lock().unwrap() = Some(start);
    if let Err(e) = control_fault {
        eprintln!("failover: cannot {} {name}: {e}", if fault == Fault::Kill { "kill" } else { "hang" });
    }
    let mut probers = JoinSet::new();
    let mut n = 0;
    while start.elapsed() < opts.duration {
        let (front, attempts) = (t.front.clone(), attempts.clone());
        let id = format!("suite-new-{tag}-{n}");
        n += 1;
        probers.spawn(async move {
            let s = start.elapsed().as_secs_f64();
            let began = Instant::now();
            let r = RawClient::connect(&front, &id, true, Duration::from_secs(3)).await;
            let ok = matches!(r, Ok((_, 0, _)));
            if let Ok((c, _, _)) = r {
                c.disconnect().await;
            }
            attempts.lock().unwrap().push(Attempt { start: s, latency_ms: ms(began.elapsed()), ok });
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restored_at_s = start.elapsed().as_secs_f64();
    let restore = match fault {
        Fault::Kill => tokio::task::block_in_place(|| t.control.restart(&name)),
        Fault::Hang => tokio::task::block_in_place(|| t.control.resume(&name)),
    };
    if let Err(e) = restore {
        eprintln!("failover: cannot recover {name}: {e}");
    }
    while probers.join_next().await.is_some() {}
    stop.cancel();
    while existing.join_next().await.is_some() {}

    let mut attempts = std::mem::take(&mut *attempts.lock().unwrap());
    attempts.sort_by(|a, b| a.start.total_cmp(&b.start));
    // Only attempts made while the fault was in place count, and one that was still waiting
    // when the fault was lifted failed: it was served by the recovery, not by the front end.
    for a in attempts.iter_mut().filter(|a| a.start < restored_at_s) {
        a.ok &= a.start + a.latency_ms / 1000.0 <= restored_at_s;
    }
    let during: Vec<&Attempt> = attempts.iter().filter(|a| a.start < restored_at_s).collect();
    let failed = during.iter().filter(|a| !a.ok).count();
    let back_after_s = during
        .iter()
        .filter(|a| a.ok)
        .map(|a| a.start + a.latency_ms / 1000.0)
        .min_by(f64::total_cmp)
        .filter(|b| *b <= restored_at_s);
    let lost = lost.lock().unwrap().clone();
    let reconnect_s: Vec<f64> = reconnects
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, v)| lost.contains_key(i) && **v <= restored_at_s)
        .map(|(_, v)| *v)
        .collect();
    let served = served.lock().unwrap().clone();
    let mut back_s: Vec<f64> = served.values().copied().filter(|v| *v <= restored_at_s).collect();
    back_s.sort_by(f64::total_cmp);
    let kept = served.iter().filter(|(i, v)| !lost.contains_key(i) && **v <= restored_at_s).count();
    Phase {
        failed,
        back_after_s,
        existing: EXISTING,
        affected: lost.len(),
        reconnected: reconnect_s.len(),
        kept,
        back_s,
        restored_at_s,
        attempts,
    }
}

/// What the monitor of the clients scenario saw: distinct messages, duplicates, arrival times.
#[derive(Default, Clone)]
struct Received {
    got: HashSet<String>,
    dups: u64,
    times: Vec<f64>,
}

/// Sensors publishing QoS 1 readings with sequence numbers and control clients acknowledging
/// commands, all through the front end, watched by a monitor subscribed through the front end.
pub async fn clients(t: &Target, opts: &Options) -> ScenarioResult {
    let mut r = ScenarioResult::new("clients");
    let tag = tag();
    let base = format!("suite/{tag}");
    let stop = CancellationToken::new();
    let received: Arc<Mutex<Received>> = Arc::default();
    let start = Instant::now();

    let (mut monitor, code, _) = match RawClient::connect(&t.front, &format!("suite-mon-{tag}"), true, SHORT).await {
        Ok(v) => v,
        Err(e) => {
            r.summary = format!("monitor cannot connect through the front end: {e}");
            return r;
        }
    };
    if code != 0 || monitor.subscribe(&format!("{base}/#"), 1, SHORT).await.is_err() {
        r.summary = "monitor cannot subscribe through the front end".into();
        return r;
    }
    let mut tasks = JoinSet::new();
    {
        let (received, stop) = (received.clone(), stop.clone());
        tasks.spawn(async move {
            // Drain for a moment after the stop so in-flight messages are counted.
            let mut grace: Option<Instant> = None;
            loop {
                if stop.is_cancelled() && grace.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(700)
                {
                    return;
                }
                if let Ok(Some(m)) = monitor.next_message(Duration::from_millis(100)).await {
                    if m.topic.contains("/sensor/") || m.topic.contains("/ack/") {
                        let key = format!("{}#{}", m.topic, String::from_utf8_lossy(&m.payload));
                        let mut g = received.lock().unwrap();
                        if !g.got.insert(key) {
                            g.dups += 1;
                        }
                        g.times.push(start.elapsed().as_secs_f64());
                    }
                }
            }
        });
    }
    let sensors = opts.clients.div_ceil(2);
    let controls = opts.clients - sensors;
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    for i in 0..sensors {
        let (front, stop, sent, errors, base) =
            (t.front.clone(), stop.clone(), sent.clone(), errors.clone(), base.clone());
        let id = format!("suite-sensor-{tag}-{i}");
        tasks.spawn(async move {
            let Ok((mut c, 0, _)) = RawClient::connect(&front, &id, true, SHORT).await else {
                errors.lock().unwrap().push(format!("{id}: connect failed"));
                return;
            };
            let topic = format!("{base}/sensor/{i}");
            let mut seq = 0u64;
            while !stop.is_cancelled() {
                let payload = seq.to_string();
                match c.publish(&topic, payload.as_bytes(), 1, false, SHORT).await {
                    Ok(()) => {
                        sent.lock().unwrap().insert(format!("{topic}#{payload}"));
                    }
                    Err(e) => errors.lock().unwrap().push(format!("{id}: {e}")),
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            c.disconnect().await;
        });
    }
    for i in 0..controls {
        let (front, stop, sent, errors, base) =
            (t.front.clone(), stop.clone(), sent.clone(), errors.clone(), base.clone());
        let id = format!("suite-control-{tag}-{i}");
        tasks.spawn(async move {
            let Ok((mut c, 0, _)) = RawClient::connect(&front, &id, true, SHORT).await else {
                errors.lock().unwrap().push(format!("{id}: connect failed"));
                return;
            };
            if c.subscribe(&format!("{base}/cmd/{i}"), 1, SHORT).await.is_err() {
                errors.lock().unwrap().push(format!("{id}: subscribe failed"));
                return;
            }
            let ack_topic = format!("{base}/ack/{i}");
            while !stop.is_cancelled() {
                if let Ok(Some(cmd)) = c.next_message(Duration::from_millis(100)).await {
                    let payload = String::from_utf8_lossy(&cmd.payload).into_owned();
                    match c.publish(&ack_topic, payload.as_bytes(), 1, false, SHORT).await {
                        Ok(()) => {
                            sent.lock().unwrap().insert(format!("{ack_topic}#{payload}"));
                        }
                        Err(e) => errors.lock().unwrap().push(format!("{id}: {e}")),
                    }
                }
            }
        });
    }
    // The controller: one command per control client per second.
    let mut commands = 0u64;
    if let Ok((mut ctl, 0, _)) = RawClient::connect(&t.front, &format!("suite-ctl-{tag}"), true, SHORT).await {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while start.elapsed() < opts.duration {
            for i in 0..controls {
                if ctl
                    .publish(&format!("{base}/cmd/{i}"), format!("c{commands}").as_bytes(), 1, false, SHORT)
                    .await
                    .is_ok()
                {
                    commands += 1;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ctl.disconnect().await;
    } else {
        tokio::time::sleep(opts.duration).await;
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    let sent = sent.lock().unwrap().clone();
    let Received { got, dups, times } = received.lock().unwrap().clone();
    let lost = sent.difference(&got).count();
    let errors = errors.lock().unwrap().clone();
    r.metric("clients", opts.clients as f64, "");
    r.metric("messages_acknowledged", sent.len() as f64, "");
    r.metric("messages_received", got.len() as f64, "");
    r.metric("messages_lost", lost as f64, "");
    r.metric("messages_duplicated", dups as f64, "");
    r.metric("commands_sent", commands as f64, "");
    r.metric("client_errors", errors.len() as f64, "");
    r.passed = lost == 0 && errors.is_empty() && !sent.is_empty();
    r.summary = format!(
        "{} clients for {:.0} s: {} messages acknowledged, {} received by the monitor, {lost} lost, {dups} duplicated",
        opts.clients,
        opts.duration.as_secs_f64(),
        sent.len(),
        got.len()
    );
    r.notes.extend(errors.into_iter().take(5));
    let mut per_second: BTreeMap<u64, f64> = BTreeMap::new();
    for t in times {
        *per_second.entry(t as u64).or_default() += 1.0;
    }
    r.charts.push(Chart {
        title: "messages received by the monitor".into(),
        kind: ChartKind::Timeline,
        x_label: "seconds".into(),
        y_label: "messages per second".into(),
        categories: vec![],
        series: vec![Series {
            name: "received".into(),
            points: per_second.into_iter().map(|(k, v)| (k as f64, v)).collect(),
        }],
        markers: vec![],
    });
    r
}
