//! Replication between five real Mosquitto brokers: exactly-once delivery, no storm, retained convergence, a broker lost mid-stream.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::wait_until;
use common::{blocking, Net};
use meshgate::{Meshgate, Parts};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const SECOND: Duration = Duration::from_secs(1);
/// Brokers keep every queued QoS 1 message for a slow subscriber (Mosquitto drops past 1000 by
/// default), and a restarted broker keeps what it held.
const BROKER_EXTRA: &str = "max_queued_messages 0\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nautosave_on_changes true";

async fn replicator(net: &Net, extra: &str) -> Meshgate {
    let config = net.config(&format!("[replication]\nenabled = true\nlag_interval = \"200ms\"\n{extra}"));
    let mg = Meshgate::start_parts(config, Parts { proxy: false, replication: true }).await.unwrap();
    let repl = mg.replication().unwrap().clone();
    let pairs = net.brokers.len() * (net.brokers.len() - 1);
    // Every pair has carried a lag probe: links are up and subscribed end to end.
    wait_until(10 * SECOND, || repl.view().lag.len() == pairs).await.expect("every broker pair replicates");
    mg
}

/// Deliveries counted by (topic, payload).
type Seen = Arc<Mutex<HashMap<(String, Vec<u8>), u32>>>;

/// A client on one broker directly, whose received PUBLISHes are counted by (topic, payload).
struct Subscriber {
    seen: Seen,
    total: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

async fn subscribe(addr: std::net::SocketAddr, id: &str, filter: &str) -> Subscriber {
    let seen: Seen = Arc::default();
    let total = Arc::new(AtomicU64::new(0));
    let (s, t) = (seen.clone(), total.clone());
    let task = common::subscribed(addr, id, filter, move |p| {
        *s.lock()
            .unwrap()
            .entry((String::from_utf8_lossy(p.topic.as_bytes()).into_owned(), p.payload.to_vec()))
            .or_default() += 1;
        t.fetch_add(1, Ordering::Relaxed);
    })
    .await;
    Subscriber { seen, total, _task: task }
}

/// Publishes `messages` (topic, payload) at QoS 1 on one broker and waits for every PUBACK.
async fn publish_all(addr: std::net::SocketAddr, id: String, messages: Vec<(String, Vec<u8>)>, retain: bool) {
    let mut opts = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let n = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client.publish(topic, QoS::AtLeastOnce, retain, payload).await.unwrap();
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(60 * SECOND, async {
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: only {acked} of {n} PUBACKs"));
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(SECOND, eventloop.poll()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_reach_every_broker_exactly_once() {
    let net = Net::start_with(5, BROKER_EXTRA);
    let mg = replicator(&net, "").await;
    let mut subs = Vec::new();
    for b in &net.brokers {
        subs.push(subscribe(b.addr, &format!("sub-{}", b.name), "load/#").await);
    }
    let started = Instant::now();
    let mut pubs = Vec::new();
    for (k, b) in net.brokers.iter().enumerate() {
        // 2,000 per broker: 1,000 on its own topic, 1,000 on the shared one.
        let msgs: Vec<(String, Vec<u8>)> = (0..2000)
            .map(|n| {
                let topic = if n % 2 == 0 { format!("load/{}", b.name) } else { "load/shared".to_string() };
                (topic, format!("{k}:{n}").into_bytes())
            })
            .collect();
        pubs.push(tokio::spawn(publish_all(b.addr, format!("pub-{}", b.name), msgs, false)));
    }
    for p in pubs {
        p.await.unwrap();
    }
    let all = wait_until(60 * SECOND, || subs.iter().all(|s| s.total.load(Ordering::Relaxed) >= 10_000)).await;
    let counts: Vec<u64> = subs.iter().map(|s| s.total.load(Ordering::Relaxed)).collect();
    assert!(all.is_some(), "deliveries per broker: {counts:?}");
    eprintln!("50,000 deliveries after {:?}", started.elapsed());
    // Nothing more arrives: no duplicates trickling in.
    tokio::time::sleep(SECOND).await;
    let total: u64 = subs.iter().map(|s| s.total.load(Ordering::Relaxed)).sum();
    assert_eq!(total, 5 * 10_000, "total deliveries");
    for (s, b) in subs.iter().zip(&net.brokers) {
        let seen = s.seen.lock().unwrap();
        assert_eq!(seen.len(), 10_000, "{}: distinct messages", b.name);
        assert!(seen.values().all(|&n| n == 1), "{}: every message exactly once", b.name);
    }
    let metrics = mg.pool().metrics.render();
    assert!(metrics.contains("meshgate_replication_forwarded_total"), "forwarded counter exposed");
    // The counter starts at zero for every target and reason; nothing may have counted.
    let dropped: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("meshgate_replication_dropped_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(dropped.is_empty(), "nothing dropped: {dropped:?}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_then_silence_no_storm() {
    let net = Net::start_with(5, BROKER_EXTRA);
    let mg = replicator(&net, "").await;
    let mut subs = Vec::new();
    for b in &net.brokers {
        subs.push(subscribe(b.addr, &format!("storm-{}", b.name), "local/#").await);
    }
    publish_all(net.brokers[2].addr, "storm-pub".to_string(), vec![("local/x".into(), b"once".to_vec())], false).await;
    wait_until(5 * SECOND, || subs.iter().all(|s| s.total.load(Ordering::Relaxed) >= 1))
        .await
        .expect("delivered everywhere");
    tokio::time::sleep(3 * SECOND).await;
    let counts: Vec<u64> = subs.iter().map(|s| s.total.load(Ordering::Relaxed)).collect();
    assert_eq!(counts, vec![1; 5], "each subscriber counted exactly one delivery after 3 s of silence");
    mg.shutdown().await;
}

/// Reads every retained message under `prefix/` from one broker directly.
async fn retained_set(addr: std::net::SocketAddr, prefix: &str) -> HashMap<String, Vec<u8>> {
    let s = subscribe(addr, &format!("reader-{}-{}", addr.ip(), std::process::id()), &format!("{prefix}/#")).await;
    // Retained messages follow the SUBACK at once; a short quiet period ends the set.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = s.total.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let seen = s.seen.lock().unwrap();
    seen.keys().map(|(t, p)| (t.clone(), p.clone())).collect()
}

async fn all_equal_to(net: &Net, prefix: &str, expected: &HashMap<String, Vec<u8>>) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < 5 * SECOND {
        let mut ok = true;
        for b in &net.brokers {
            if &retained_set(b.addr, prefix).await != expected {
                ok = false;
                break;
            }
        }
        if ok {
            return Some(started.elapsed());
        }
    }
    for b in &net.brokers {
        eprintln!("{} holds {:?}", b.name, retained_set(b.addr, prefix).await);
    }
    None
}

/// Polls one broker until its retained set under `prefix/` equals `expected`; the time it took.
async fn current_within(
    addr: std::net::SocketAddr,
    prefix: &str,
    expected: &HashMap<String, Vec<u8>>,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if &retained_set(addr, prefix).await == expected {
            return Some(started.elapsed());
        }
    }
    None
}

fn set(pairs: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
    pairs.iter().map(|(t, p)| (t.to_string(), p.as_bytes().to_vec())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_converges_after_a_broker_and_after_meshgate_return() {
    let mut net = Net::start_with(5, BROKER_EXTRA);
    let dir = tempfile::tempdir().unwrap();
    let state = format!("state_file = \"{}\"\n", dir.path().join("state.json").display());
    let mg = replicator(&net, &state).await;
    let addrs: Vec<_> = net.brokers.iter().map(|b| b.addr).collect();
    let a = |i: usize| addrs[i];

    let pubs =
        |pairs: &[(&str, &str)]| pairs.iter().map(|(t, p)| (t.to_string(), p.as_bytes().to_vec())).collect::<Vec<_>>();
    publish_all(a(0), "r-1".to_string(), pubs(&[("ret/a", "1"), ("ret/b", "1"), ("ret/c", "1")]), true).await;
    let v1 = set(&[("ret/a", "1"), ("ret/b", "1"), ("ret/c", "1")]);
    all_equal_to(&net, "ret", &v1).await.expect("first values everywhere");

    // broker5 goes down (it keeps a=1, b=1, c=1 on disk); values change on other brokers.
    blocking(|| net.brokers[4].kill());
    publish_all(a(1), "r-2".to_string(), pubs(&[("ret/a", "2"), ("ret/b", ""), ("ret/d", "1")]), true).await;
    let v2 = set(&[("ret/a", "2"), ("ret/c", "1"), ("ret/d", "1")]);
    blocking(|| net.brokers[4].restart());
    let took = current_within(a(4), "ret", &v2, 2 * SECOND).await;
    eprintln!("broker5 current {took:?} after it answered again");
    assert!(took.is_some(), "broker5 current within 2 s of its return");
    all_equal_to(&net, "ret", &v2).await.expect("all five identical and current");

    // meshgate restarts while broker3 is down and values change again.
    mg.shutdown().await;
    blocking(|| net.brokers[2].kill());
    let mg = Meshgate::start_parts(
        net.config(&format!("[replication]\nenabled = true\nlag_interval = \"200ms\"\n{state}")),
        Parts { proxy: false, replication: true },
    )
    .await
    .unwrap();
    let repl = mg.replication().unwrap().clone();
    wait_until(10 * SECOND, || repl.view().links.iter().filter(|l| l.connected).count() == 4)
        .await
        .expect("four links up");
    // Let the four reconcile before writing, so the writes are live ones.
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish_all(a(0), "r-3".to_string(), pubs(&[("ret/c", ""), ("ret/a", "3")]), true).await;
    let v3 = set(&[("ret/a", "3"), ("ret/d", "1")]);
    blocking(|| net.brokers[2].restart());
    let took = current_within(a(2), "ret", &v3, 2 * SECOND).await;
    eprintln!("broker3 current {took:?} after it answered again (meshgate restarted meanwhile)");
    assert!(took.is_some(), "broker3 current within 2 s of its return");
    all_equal_to(&net, "ret", &v3).await.expect("all five identical and current after meshgate restarted");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_stream_the_others_keep_receiving() {
    let mut net = Net::start_with(5, BROKER_EXTRA);
    let mg = replicator(&net, "").await;
    let mut subs = Vec::new();
    for b in &net.brokers[..4] {
        subs.push(subscribe(b.addr, &format!("mid-{}", b.name), "mid/#").await);
    }
    // Four publishers on the brokers that live, 600 messages each; broker5 dies after the first third.
    let mut pubs = Vec::new();
    for (k, b) in net.brokers[..4].iter().enumerate() {
        let msgs: Vec<(String, Vec<u8>)> =
            (0..200).map(|n| (format!("mid/{}", b.name), format!("{k}:{n}").into_bytes())).collect();
        pubs.push(tokio::spawn(publish_all(b.addr, format!("mid-pub-a-{k}"), msgs, false)));
    }
    for p in pubs.drain(..) {
        p.await.unwrap();
    }
    blocking(|| net.brokers[4].kill());
    for (k, b) in net.brokers[..4].iter().enumerate() {
        let msgs: Vec<(String, Vec<u8>)> =
            (200..600).map(|n| (format!("mid/{}", b.name), format!("{k}:{n}").into_bytes())).collect();
        pubs.push(tokio::spawn(publish_all(b.addr, format!("mid-pub-b-{k}"), msgs, false)));
    }
    for p in pubs {
        p.await.unwrap();
    }
    wait_until(20 * SECOND, || subs.iter().all(|s| s.total.load(Ordering::Relaxed) >= 2400)).await.unwrap_or_else(
        || panic!("deliveries: {:?}", subs.iter().map(|s| s.total.load(Ordering::Relaxed)).collect::<Vec<_>>()),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &subs {
        assert_eq!(s.total.load(Ordering::Relaxed), 2400);
        assert!(s.seen.lock().unwrap().values().all(|&n| n == 1));
    }
    mg.shutdown().await;
}
