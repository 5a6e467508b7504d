//! Publish/subscribe load: publishers send stamped messages, subscribers count them and take
//! each message's publish-to-delivery latency.
//!
//! The loop is closed: a publisher keeps at most `window` messages between its write and the
//! subscribers' reads. Without that, a QoS 0 publisher outruns the broker, queues pile up in
//! socket buffers and the broker's memory, and what is measured is how fast a queue fills,
//! not how fast messages flow. With `--rate`, publishers are paced instead; a write that falls
//! behind the schedule (a front end that stops reading) shows up
//! in the schedule lag it reports next to the latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::stats::{Errors, Percentiles};
use super::wire::{self, ReadBuf, Stamp};
use crate::procfs::{cpu_of, rss_of};

/// Messages a publisher writes in one go at most.
const BATCH: u64 = 64;

#[derive(Debug, Clone)]
pub struct PubSubOptions {
    pub target: SocketAddr,
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: u8,
    pub payload: usize,
    /// Messages per second over all publishers; `None` = as fast as the window allows.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    /// Messages per publisher sent but not yet delivered, at most.
    pub window: u64,
    /// QoS 1 PUBLISHes per publisher awaiting their PUBACK, at most.
    pub inflight: u64,
    pub connect_timeout: Duration,
    /// Front-end processes whose memory and CPU time to report.
    pub pids: Vec<u32>,
    /// Broker processes whose CPU time to report.
    pub broker_pids: Vec<u32>,
    /// etcd processes (meshgate's `[coordination]`) whose CPU time to report apart.
    pub etcd_pids: Vec<u32>,
    pub topic_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub count: u64,
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PubSubReport {
    pub target: String,
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: u8,
    pub payload: usize,
    pub rate_target: Option<f64>,
    pub duration_s: f64,
    /// Messages written by publishers over the whole run (warm-up and drain included).
    pub published: u64,
    /// Deliveries received inside the measurement window.
    pub messages: u64,
    pub msgs_per_sec: f64,
    /// Deliveries expected over the whole run minus deliveries received (QoS 0 may drop).
    pub lost: u64,
    /// Write time to delivery. Messages are stamped when written, not when due, so the
    /// generator's 1 ms timer does not count as latency; how late writes were against the
    /// schedule is `send_lag` (paced runs only), where a stalled front end would show.
    pub latency: Percentiles,
    pub send_lag: Percentiles,
    pub connect: ConnectSummary,
    pub errors: Errors,
    pub rss_kib: Option<u64>,
    /// CPU time the front end (`--pid`, with its children) used inside the measurement window,
    /// per message delivered in it, µs.
    #[serde(default)]
    pub cpu_us_per_msg: Option<f64>,
    /// The same for the brokers (`--broker-pid`).
    #[serde(default)]
    pub broker_cpu_us_per_msg: Option<f64>,
    /// The same for etcd (`--etcd-pid`), kept apart from the front end's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cpu_us_per_msg: Option<f64>,
}

/// Per publisher: deliveries counted by subscribers, PUBACKs, and a wake-up for the writer.
struct Lane {
    received: AtomicU64,
    acked: AtomicU64,
    waiting: AtomicBool,
    wake: Notify,
}

impl Lane {
    fn nudge(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

struct Clock {
    base: Instant,
    measure_from: Instant,
    measure_to: Instant,
}

impl Clock {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }
}

/// Which publishers' topics subscriber `j` takes: every message is delivered once when there
/// are at least as many publishers as subscribers, and fanned out otherwise.
fn topics_of(j: usize, publishers: usize, subscribers: usize) -> Vec<usize> {
    if publishers >= subscribers {
        (0..publishers).filter(|i| i % subscribers == j).collect()
    } else {
        vec![j % publishers]
    }
}

pub async fn run(o: PubSubOptions, progress: bool) -> anyhow::Result<PubSubReport> {
    anyhow::ensure!(o.publishers > 0 && o.subscribers > 0, "need at least one publisher and one subscriber");
    anyhow::ensure!(o.qos <= 1, "QoS {} is not supported (0 or 1)", o.qos);
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let prefix = format!("{}/{run_id}", o.topic_prefix);
    let fanout: Vec<u64> = (0..o.publishers)
        .map(|i| (0..o.subscribers).filter(|&j| topics_of(j, o.publishers, o.subscribers).contains(&i)).count() as u64)
        .collect();
    let lanes: Arc<Vec<Lane>> = Arc::new(
        (0..o.publishers)
            .map(|_| Lane {
                received: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                waiting: AtomicBool::new(false),
                wake: Notify::new(),
            })
            .collect(),
    );
    let mut errors = Errors::default();
    let mut connect_ns = Vec::new();

    // Subscribers first, each with its SUBACK, so no message is published before it can arrive.
    let mut subs = Vec::new();
    for j in 0..o.subscribers {
        let t = Instant::now();
        let mut s = wire::open(o.target, &format!("mgb-sub-{run_id}-{j}"), 0, o.connect_timeout)
            .await
            .map_err(|e| anyhow::anyhow!("subscriber {j} cannot connect to {}: {e}", o.target))?;
        connect_ns.push(t.elapsed().as_nanos() as u64);
        for i in topics_of(j, o.publishers, o.subscribers) {
            wire::subscribe(&mut s, &format!("{prefix}/{i}"), o.qos, o.connect_timeout)
                .await
                .map_err(|e| anyhow::anyhow!("subscriber {j}: {e}"))?;
        }
        subs.push(s);
    }
    let mut pubs = Vec::new();
    for i in 0..o.publishers {
        let t = Instant::now();
        let s = wire::open(o.target, &format!("mgb-pub-{run_id}-{i}"), 0, o.connect_timeout)
            .await
            .map_err(|e| anyhow::anyhow!("publisher {i} cannot connect to {}: {e}", o.target))?;
        connect_ns.push(t.elapsed().as_nanos() as u64);
        pubs.push(s);
    }

    let base = Instant::now();
    let clock = Arc::new(Clock { base, measure_from: base + o.warmup, measure_to: base + o.warmup + o.duration });
    // CPU time is read at the window's edges, the same window the deliveries are counted in.
    let cpu_window = {
        let groups = [o.pids.clone(), o.broker_pids.clone(), o.etcd_pids.clone()];
        let clock = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(clock.measure_from.into()).await;
            let start = CpuWindow::start(&groups);
            tokio::time::sleep_until(clock.measure_to.into()).await;
            start.end(&groups)
        })
    };
    let stop_subs = CancellationToken::new();
    let mut sub_tasks = Vec::new();
    for s in subs {
        sub_tasks.push(tokio::spawn(subscriber(s, lanes.clone(), clock.clone(), stop_subs.clone())));
    }
    let mut pub_tasks = Vec::new();
    for (i, s) in pubs.into_iter().enumerate() {
        let lane = LaneRef { lanes: lanes.clone(), i };
        let cfg = PubConfig {
            index: i as u32,
            topic: format!("{prefix}/{i}").into_bytes(),
            qos: o.qos,
            payload: o.payload,
            rate: o.rate.map(|r| r / o.publishers as f64),
            window: o.window,
            inflight: o.inflight,
            fanout: fanout[i],
        };
        pub_tasks.push(tokio::spawn(publisher(s, cfg, lane, clock.clone())));
    }
    let ticker = progress.then(|| {
        let lanes = lanes.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now: u64 = lanes.iter().map(|l| l.received.load(Ordering::Relaxed)).sum();
                let t = clock.base.elapsed().as_secs_f64();
                eprintln!("  {t:5.1} s  {:>9} msg/s", now - last);
                last = now;
            }
        })
    });

    let mut published = 0u64;
    let mut lags = Vec::new();
    let mut expected = 0u64;
    for (i, t) in pub_tasks.into_iter().enumerate() {
        let (sent, lag, e) = t.await?;
        lags.extend(lag);
        published += sent;
        expected += sent * fanout[i];
        errors.merge(e);
    }
    if let Some(t) = ticker {
        t.abort();
    }
    // Let what is in flight arrive: until everything did, or nothing moved for 300 ms.
    let drain_until = Instant::now() + Duration::from_secs(3);
    let mut last = u64::MAX;
    let mut still_since = Instant::now();
    loop {
        let got: u64 = lanes.iter().map(|l| l.received.load(Ordering::Relaxed)).sum();
        if got >= expected || Instant::now() > drain_until {
            break;
        }
        if got != last {
            last = got;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rss_kib = rss_of(&o.pids);
    stop_subs.cancel();
    let mut messages = 0;
    let mut samples = Vec::new();
    for t in sub_tasks {
        let r = t.await?;
        messages += r.in_window;
        samples.extend(r.latencies);
        errors.merge(r.errors);
    }
    let received: u64 = lanes.iter().map(|l| l.received.load(Ordering::Relaxed)).sum();
    let [front_cpu, broker_cpu, etcd_cpu] = cpu_window.await?;
    let per_msg = |ns: Option<u64>| ns.filter(|_| messages > 0).map(|ns| ns as f64 / 1000.0 / messages as f64);
    Ok(PubSubReport {
        target: o.target.to_string(),
        publishers: o.publishers,
        subscribers: o.subscribers,
        qos: o.qos,
        payload: o.payload.max(wire::STAMP),
        rate_target: o.rate,
        duration_s: o.duration.as_secs_f64(),
        published,
        messages,
        msgs_per_sec: messages as f64 / o.duration.as_secs_f64(),
        lost: expected.saturating_sub(received),
        latency: Percentiles::from_ns(&mut samples),
        send_lag: Percentiles::from_ns(&mut lags),
        connect: ConnectSummary { count: connect_ns.len() as u64, latency: Percentiles::from_ns(&mut connect_ns) },
        errors,
        rss_kib,
        cpu_us_per_msg: per_msg(front_cpu),
        broker_cpu_us_per_msg: per_msg(broker_cpu),
        etcd_cpu_us_per_msg: per_msg(etcd_cpu),
    })
}

/// CPU time of groups of processes (front end, brokers, etcd) over one window: read at its
/// start, subtracted at its end. A group that is empty or lost a process reads `None`.
pub(crate) struct CpuWindow<const N: usize>([Option<u64>; N]);

impl<const N: usize> CpuWindow<N> {
    pub(crate) fn start(groups: &[Vec<u32>; N]) -> CpuWindow<N> {
        CpuWindow(std::array::from_fn(|i| cpu_of(&groups[i])))
    }

    /// Nanoseconds each group used since [`CpuWindow::start`].
    pub(crate) fn end(self, groups: &[Vec<u32>; N]) -> [Option<u64>; N] {
        std::array::from_fn(|i| Some(cpu_of(&groups[i])?.saturating_sub(self.0[i]?)))
    }
}

/// One publisher's lane, owned by its task.
struct LaneRef {
    lanes: Arc<Vec<Lane>>,
    i: usize,
}

impl std::ops::Deref for LaneRef {
    type Target = Lane;
    fn deref(&self) -> &Lane {
        &self.lanes[self.i]
    }
}

struct PubConfig {
    index: u32,
    topic: Vec<u8>,
    qos: u8,
    payload: usize,
    /// This publisher's share of the rate.
    rate: Option<f64>,
    window: u64,
    inflight: u64,
    fanout: u64,
}

/// Writes batches until the measurement window ends; returns how many messages it sent.
async fn publisher(stream: TcpStream, c: PubConfig, lane: LaneRef, clock: Arc<Clock>) -> (u64, Vec<u64>, Errors) {
    let mut errors = Errors::default();
    let (rd, mut wr) = stream.into_split();
    // PUBACKs (and a close) come back on the read half.
    let acks = {
        let lanes = lane.lanes.clone();
        let i = lane.i;
        tokio::spawn(async move {
            let mut rd = rd;
            let mut rb = ReadBuf::new(4096);
            loop {
                match rb.fill(&mut rd).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let mut n = 0;
                while let Ok(Some(p)) = rb.next_packet() {
                    if p.first >> 4 == 4 {
                        n += 1;
                    }
                }
                if n > 0 {
                    lanes[i].acked.fetch_add(n, Ordering::SeqCst);
                    lanes[i].nudge();
                }
            }
        })
    };
    let mut buf = Vec::with_capacity(BATCH as usize * (c.payload + c.topic.len() + 8));
    let mut sent = 0u64;
    let mut lags = Vec::new();
    let fanout = c.fanout.max(1);
    loop {
        let now = Instant::now();
        if now >= clock.measure_to {
            break;
        }
        let room = |sent: u64| {
            let delivered = lane.received.load(Ordering::SeqCst) / fanout;
            let mut room = c.window.saturating_sub(sent.saturating_sub(delivered));
            if c.qos > 0 {
                room = room.min(c.inflight.saturating_sub(sent.saturating_sub(lane.acked.load(Ordering::SeqCst))));
            }
            room
        };
        let due = match c.rate {
            Some(r) => {
                let elapsed = now.saturating_duration_since(clock.base).as_secs_f64();
                ((elapsed * r) as u64 + 1).saturating_sub(sent)
            }
            None => BATCH,
        };
        if due == 0 {
            // Paced and ahead of schedule: sleep until the next message is due.
            let r = c.rate.unwrap_or(1.0);
            let next = clock.base + Duration::from_secs_f64(sent as f64 / r);
            tokio::time::sleep_until(next.into()).await;
            continue;
        }
        let mut k = room(sent).min(due).min(BATCH);
        if k == 0 {
            lane.waiting.store(true, Ordering::SeqCst);
            // Re-check after announcing we wait, so a delivery in between is not missed.
            k = room(sent);
            if k == 0 {
                let _ = tokio::time::timeout(Duration::from_millis(5), lane.wake.notified()).await;
            }
            lane.waiting.store(false, Ordering::SeqCst);
            continue;
        }
        buf.clear();
        let now_ns = clock.ns(now);
        if let Some(r) = c.rate {
            // How late this batch is against the schedule (timer granularity, a blocked write).
            lags.push(now_ns.saturating_sub((sent as f64 / r * 1e9) as u64));
        }
        for j in 0..k {
            let seq = sent + j;
            let id = (seq % 65_535) as u16 + 1;
            wire::push_publish(
                &mut buf,
                &c.topic,
                c.qos,
                id,
                c.payload,
                Stamp { sent_ns: now_ns, seq, publisher: c.index },
            );
        }
        if let Err(e) = wr.write_all(&buf).await {
            errors.add("publish_write", e);
            break;
        }
        sent += k;
    }
    // Wait briefly for the last PUBACKs so the broker does not see an abrupt close mid-flow.
    if c.qos > 0 {
        let until = Instant::now() + Duration::from_secs(2);
        while lane.acked.load(Ordering::SeqCst) < sent && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let missing = sent.saturating_sub(lane.acked.load(Ordering::SeqCst));
        if missing > 0 {
            errors.add("puback_missing", format!("{missing} PUBACKs did not arrive"));
        }
    }
    let _ = wr.write_all(&meshgate::mqtt::encode::disconnect()).await;
    acks.abort();
    (sent, lags, errors)
}

struct SubResult {
    in_window: u64,
    latencies: Vec<u64>,
    errors: Errors,
}

async fn subscriber(
    mut stream: TcpStream,
    lanes: Arc<Vec<Lane>>,
    clock: Arc<Clock>,
    stop: CancellationToken,
) -> SubResult {
    let mut r = SubResult { in_window: 0, latencies: Vec::with_capacity(1 << 16), errors: Errors::default() };
    let mut rb = ReadBuf::new(64 * 1024);
    let mut acks: Vec<u8> = Vec::with_capacity(4096);
    let mut touched: Vec<(usize, u64)> = Vec::new();
    loop {
        let n = tokio::select! {
            n = rb.fill(&mut stream) => n,
            _ = stop.cancelled() => break,
        };
        match n {
            Ok(0) => {
                if !stop.is_cancelled() {
                    r.errors.add("subscriber_closed", "the front end closed a subscriber");
                }
                break;
            }
            Err(e) => {
                r.errors.add("subscriber_read", e);
                break;
            }
            Ok(_) => {}
        }
        let now = Instant::now();
        let now_ns = clock.ns(now);
        let in_window = now >= clock.measure_from && now < clock.measure_to;
        acks.clear();
        touched.clear();
        loop {
            let p = match rb.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    r.errors.add("subscriber_protocol", e);
                    return r;
                }
            };
            let Some(publish) = p.publish() else { continue };
            if publish.qos > 0 {
                acks.extend_from_slice(&[0x40, 0x02]);
                acks.extend_from_slice(&publish.id.to_be_bytes());
            }
            let Some(stamp) = publish.stamp() else { continue };
            let lane = stamp.publisher as usize;
            match touched.iter_mut().find(|(i, _)| *i == lane) {
                Some((_, n)) => *n += 1,
                None => touched.push((lane, 1)),
            }
            if in_window {
                r.in_window += 1;
                r.latencies.push(now_ns.saturating_sub(stamp.sent_ns));
            }
        }
        if !acks.is_empty() {
            if let Err(e) = stream.write_all(&acks).await {
                r.errors.add("puback_write", e);
                break;
            }
        }
        for &(i, n) in &touched {
            if let Some(l) = lanes.get(i) {
                l.received.fetch_add(n, Ordering::SeqCst);
                l.nudge();
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_publisher_has_a_subscriber() {
        for (p, s) in [(1, 1), (16, 16), (4, 2), (2, 4), (3, 5)] {
            for i in 0..p {
                assert!((0..s).any(|j| topics_of(j, p, s).contains(&i)), "{p} {s} {i}");
            }
        }
        assert_eq!(topics_of(1, 4, 2), vec![1, 3]);
        assert_eq!(topics_of(3, 2, 4), vec![1]);
    }
}
