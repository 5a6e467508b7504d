//! Persistent sessions across broker failures, with real Mosquitto, rumqttc and paho-mqtt: subscriptions restored, sessions migrated and mirrored, one client id across the pool.

mod common;

use std::collections::BTreeSet;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};
use meshgate::Meshgate;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncWriteExt;

const SECOND: Duration = Duration::from_secs(1);
const TOPIC: &str = "data/x";

/// What one subscriber has seen: message sequence numbers, and the session-present flag of
/// each CONNACK.
#[derive(Default)]
struct Seen {
    seqs: BTreeSet<u64>,
    connacks: Vec<bool>,
    subscribes: u32,
}

type Shared = Arc<Mutex<Seen>>;

/// A rumqttc client with a persistent session: subscribes once, on its first connection, and
/// never again; reconnects 100 ms after any error.
struct RumqttSub {
    seen: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl RumqttSub {
    async fn start(addr: std::net::SocketAddr, id: &str) -> RumqttSub {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let seen: Shared = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        let first = s.lock().unwrap().connacks.is_empty();
                        s.lock().unwrap().connacks.push(ack.session_present);
                        if first {
                            client.subscribe("data/#", QoS::AtLeastOnce).await.unwrap();
                            s.lock().unwrap().subscribes += 1;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(n) = std::str::from_utf8(&p.payload).ok().and_then(|t| t.parse().ok()) {
                            s.lock().unwrap().seqs.insert(n);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let s = seen.clone();
        wait_until(5 * SECOND, || s.lock().unwrap().subscribes == 1).await.expect("rumqttc subscriber connected");
        RumqttSub { seen, task }
    }
}

impl Drop for RumqttSub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// tests/sessions/paho_sub.py under python3, its JSON lines collected.
struct PahoSub {
    seen: Shared,
    child: tokio::process::Child,
}

impl PahoSub {
    async fn start(addr: std::net::SocketAddr, id: &str, version: &str) -> PahoSub {
        let seen: Shared = Arc::default();
        let s = seen.clone();
        let child = common::paho::spawn_sub(addr, id, "data/#", version, move |v| {
            let mut s = s.lock().unwrap();
            if let Some(sp) = v["session_present"].as_bool() {
                s.connacks.push(sp);
            } else if v["suback"].is_array() {
                s.subscribes += 1;
            } else if let Some(n) = v["msg"].as_str().and_then(|t| t.parse().ok()) {
                s.seqs.insert(n);
            }
        });
        let s = seen.clone();
        wait_until(10 * SECOND, || s.lock().unwrap().subscribes == 1).await.expect("paho subscriber subscribed");
        PahoSub { seen, child }
    }
}

/// Publishes QoS 1 messages `0, 1, 2, ...` to `TOPIC` through `addr`, one at a time, and
/// records when each was acknowledged. A message without a PUBACK within 500 ms is given up
/// (never counted as acknowledged) and the publisher reconnects, as a device would.
struct Publisher {
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(addr: std::net::SocketAddr, every: Duration) -> Publisher {
        let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let (a, st) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut seq = 0u64;
            let mut conn: Option<tokio::net::TcpStream> = None;
            while !st.is_cancelled() {
                if conn.is_none() {
                    conn = raw::connect(addr, 4, "publisher", 2 * SECOND).await.ok().map(|(s, _)| s);
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let s = conn.as_mut().unwrap();
                let pid = (seq % 60_000) as u16 + 1;
                let ok = s
                    .write_all(&raw::publish_packet(TOPIC, seq.to_string().as_bytes(), 1, pid, false))
                    .await
                    .is_ok()
                    && matches!(raw::read_packet(s, Duration::from_millis(500)).await, Ok((0x40, b)) if b[..2] == pid.to_be_bytes());
                if ok {
                    a.lock().unwrap().push((seq, Instant::now()));
                } else {
                    conn = None;
                }
                seq += 1;
                tokio::time::sleep(every).await;
            }
        });
        Publisher { acked, stop, task }
    }

    async fn finish(self) -> Vec<(u64, Instant)> {
        self.stop.cancel();
        let _ = self.task.await;
        self.acked.lock().unwrap().clone()
    }
}

type Stream = tokio::net::TcpStream;

/// SUBSCRIBE and its SUBACK.
async fn subscribe(s: &mut Stream, id: u16, filter: &str, qos: u8) {
    s.write_all(&raw::subscribe_packet(id, filter, qos)).await.unwrap();
    assert_eq!(raw::read_packet(s, 2 * SECOND).await.unwrap().0, 0x90, "SUBACK for {filter}");
}

/// UNSUBSCRIBE (3.1.1) and its UNSUBACK.
async fn unsubscribe(s: &mut Stream, id: u16, filter: &str) {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    s.write_all(&raw::packet(0xa2, &body)).await.unwrap();
    assert_eq!(raw::read_packet(s, 2 * SECOND).await.unwrap().0, 0xb0, "UNSUBACK for {filter}");
}

/// A QoS 1 PUBLISH and its PUBACK.
async fn publish_acked(p: &mut Stream, topic: &str, payload: &[u8], id: u16) {
    p.write_all(&raw::publish_packet(topic, payload, 1, id, false)).await.unwrap();
    assert_eq!(raw::read_packet(p, 2 * SECOND).await.unwrap().0, 0x40, "PUBACK");
}

/// The topics of the messages that arrive until none has for 700 ms, acknowledged.
async fn topics_until_quiet(s: &mut Stream) -> Vec<String> {
    let mut topics = Vec::new();
    while let Ok((first, body)) = raw::read_packet(s, Duration::from_millis(700)).await {
        if let Some(m) = raw::parse_publish(first, &body) {
            if let Some(id) = m.packet_id {
                s.write_all(&raw::puback_packet(id)).await.unwrap();
            }
            topics.push(m.topic);
        }
    }
    topics
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let url = format!("http://{addr}{path}");
    let body = blocking(|| {
        let out = std::process::Command::new("curl").args(["-sf", &url]).output().expect("curl runs");
        String::from_utf8(out.stdout).unwrap()
    });
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn missing(acked: &[(u64, Instant)], from: Instant, to: Option<Instant>, got: &BTreeSet<u64>) -> Vec<u64> {
    acked
        .iter()
        .filter(|(_, t)| *t >= from && to.is_none_or(|to| *t < to))
        .map(|(s, _)| *s)
        .filter(|s| !got.contains(s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn persistent_subscribers_keep_receiving_through_a_hang_and_a_kill_without_resubscribing() {
    let mut net = Net::start(3);
    // The clients reconnect and find their sessions migrated (the close path; with the default
    // `move = "switch"` they never reconnect: tests/switch.rs).
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();
    let addr = mg.mqtt_addr();
    let rumq = RumqttSub::start(addr, "rumqttc-sub").await;
    let paho = PahoSub::start(addr, "paho-sub", "4").await;
    let paho5 = PahoSub::start(addr, "paho5-sub", "5").await;
    let subs = [("rumqttc", &rumq.seen), ("paho", &paho.seen), ("paho MQTT 5", &paho5.seen)];
    // Both sessions and their subscription are recorded.
    let pl = mg.durable().clone();
    wait_until(5 * SECOND, || {
        ["rumqttc-sub", "paho-sub", "paho5-sub"].iter().all(|id| pl.placement(id).is_some_and(|p| p.subscriptions == 1))
    })
    .await
    .expect("every subscription recorded");

    let publisher = Publisher::start(addr, Duration::from_millis(5));
    tokio::time::sleep(SECOND).await;
    let hung_at = Instant::now();
    blocking(|| net.broker("broker1").hang());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    let detected = Instant::now();
    tokio::time::sleep(2 * SECOND).await;
    let killed_at = Instant::now();
    blocking(|| net.broker("broker1").kill());
    tokio::time::sleep(2 * SECOND).await;
    let acked = publisher.finish().await;
    let after_detection: Vec<u64> = acked.iter().filter(|(_, t)| *t >= detected).map(|(s, _)| *s).collect();
    let after_kill = acked.iter().filter(|(_, t)| *t >= killed_at).count();
    assert!(
        after_detection.len() > 100 && after_kill > 50,
        "the publisher kept going: {} acked after detection",
        after_detection.len()
    );

    for (name, seen) in subs {
        let s = seen.clone();
        let all = after_detection.clone();
        let done = wait_until(10 * SECOND, || {
            let got = &s.lock().unwrap().seqs;
            all.iter().all(|n| got.contains(n))
        })
        .await;
        let s = seen.lock().unwrap();
        let lost_after = missing(&acked, detected, None, &s.seqs);
        let lost_window = missing(&acked, hung_at, Some(detected), &s.seqs);
        eprintln!(
            "{name}: {} messages received; acked after detection {} (lost {}); acked inside the detection window ({:.2} s) {} (lost {}); CONNACKs {:?}",
            s.seqs.len(),
            after_detection.len(),
            lost_after.len(),
            (detected - hung_at).as_secs_f64(),
            acked.iter().filter(|(_, t)| *t >= hung_at && *t < detected).count(),
            lost_window.len(),
            s.connacks
        );
        assert!(
            done.is_some(),
            "{name}: acknowledged after the failure was detected but never delivered: {lost_after:?}"
        );
        assert_eq!(s.subscribes, 1, "{name} subscribed once and never again");
        assert!(s.connacks.len() >= 2, "{name} reconnected");
        assert!(s.connacks[1..].iter().all(|&p| p), "{name}: every reconnect found its session: {:?}", s.connacks);
    }
    // The sessions now live on broker2, which the API shows per client and per session.
    let clients = get_json(net.http_addr(), "/clients").await;
    for id in ["rumqttc-sub", "paho-sub", "paho5-sub"] {
        let c = clients.as_array().unwrap().iter().find(|c| c["client_id"] == id).expect("client listed");
        assert_eq!(
            (c["persistent"].as_bool(), c["session_home"].as_str(), c["broker"].as_str()),
            (Some(true), Some("broker2"), Some("broker2")),
            "{c}"
        );
        assert_eq!(c["subscriptions"], 1);
    }
    let sessions = get_json(net.http_addr(), "/sessions").await;
    for (id, protocol) in [("paho-sub", "3.1.1"), ("paho5-sub", "5")] {
        let rec = sessions.as_array().unwrap().iter().find(|s| s["client_id"] == id).unwrap();
        assert_eq!(rec["subscriptions"], serde_json::json!([{"filter": "data/#", "qos": 1}]), "{rec}");
        assert_eq!((rec["home"].as_str(), rec["protocol"].as_str()), (Some("broker2"), Some(protocol)), "{rec}");
    }
    let migrated = pool.metrics.durable_ops.with_label_values(&["migrate", "ok"]).get()
        + pool.metrics.durable_ops.with_label_values(&["restore", "ok"]).get();
    assert!(migrated >= 3, "every session was migrated or restored: {migrated}");
    drop(paho.child);
    drop(paho5.child);
    mg.shutdown().await;
}

/// A persistent subscriber that is offline when its broker dies: what was queued for it there
/// is gone, unless a standby copy on the next broker queued it too.
async fn offline_subscriber_loses(standby: bool) -> (usize, Vec<bool>) {
    let mut net = Net::start(3);
    let extra = format!(
        "[replication]\nenabled = true\nlag_interval = \"200ms\"\n[sessions]\nstandby = {standby}\nstandby_trim = \"1h\"\n"
    );
    let mg = net.meshgate(&extra).await;
    let pool = mg.pool().clone();
    let repl = mg.replication().unwrap().clone();
    wait_until(10 * SECOND, || repl.view().lag.len() == 6).await.expect("replication links up");
    let addr = mg.mqtt_addr();
    // Subscribe, then go offline with the session kept.
    let (mut s, ack) = raw::connect_with(addr, 4, "offline-sub", false, None, None, 2 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    s.write_all(&raw::subscribe_packet(1, "data/#", 1)).await.unwrap();
    let (first, _) = raw::read_packet(&mut s, 2 * SECOND).await.unwrap();
    assert_eq!(first, 0x90, "SUBACK");
    s.write_all(&raw::disconnect_packet()).await.unwrap();
    drop(s);
    let pl = mg.durable().clone();
    wait_until(5 * SECOND, || {
        pl.placement("offline-sub").is_some_and(|p| !standby || p.standby.as_deref() == Some("broker2"))
    })
    .await
    .expect("session recorded (and its standby made)");
    // A watcher directly on broker2 shows when replication has carried the messages there.
    let (mut watch, _) = raw::connect(net.brokers[1].addr, 4, "watch-b2", 2 * SECOND).await.unwrap();
    subscribe(&mut watch, 1, "data/#", 0).await;
    // 200 messages acknowledged by broker1 while the subscriber is away.
    let (mut p, _) = raw::connect(addr, 4, "pub-offline", 2 * SECOND).await.unwrap();
    for i in 0..200u16 {
        p.write_all(&raw::publish_packet(TOPIC, i.to_string().as_bytes(), 1, i + 1, false)).await.unwrap();
        let (first, _) = raw::read_packet(&mut p, 2 * SECOND).await.unwrap();
        assert_eq!(first, 0x40);
    }
    let mut replicated = 0;
    while replicated < 200 {
        let (first, _) = raw::read_packet(&mut watch, 5 * SECOND).await.expect("all 200 replicated to broker2");
        if first >> 4 == 3 {
            replicated += 1;
        }
    }
    blocking(|| net.broker("broker1").kill());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    // The subscriber comes back; it does not subscribe again.
    let (mut s, ack) = raw::connect_with(addr, 4, "offline-sub", false, None, None, 3 * SECOND).await.unwrap();
    let mut got = BTreeSet::new();
    while let Ok((first, body)) = raw::read_packet(&mut s, Duration::from_millis(700)).await {
        if let Some(m) = raw::parse_publish(first, &body) {
            got.insert(String::from_utf8(m.payload).unwrap());
            if let Some(id) = m.packet_id {
                s.write_all(&raw::puback_packet(id)).await.unwrap();
            }
        }
    }
    let lost = (0..200u16).filter(|i| !got.contains(&i.to_string())).count();
    // Published now, after the failure: reaches the subscriber in any case.
    p = raw::connect(addr, 4, "pub-offline", 2 * SECOND).await.unwrap().0;
    p.write_all(&raw::publish_packet(TOPIC, b"after", 1, 1, false)).await.unwrap();
    let mut after = false;
    while let Ok((first, body)) = raw::read_packet(&mut s, 2 * SECOND).await {
        if raw::parse_publish(first, &body).is_some_and(|m| m.payload == b"after") {
            after = true;
            break;
        }
    }
    assert!(after, "standby={standby}: a message published after the failure reached the migrated session");
    mg.shutdown().await;
    (lost, vec![ack.session_present])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_sessions_keep_what_was_queued_before_the_broker_died() {
    let (lost_without, present_without) = offline_subscriber_loses(false).await;
    let (lost_with, present_with) = offline_subscriber_loses(true).await;
    eprintln!(
        "offline subscriber, primary killed: lost {lost_without} of 200 queued messages without standby, {lost_with} with standby"
    );
    assert_eq!(present_without, vec![true], "migration recreated the session");
    assert_eq!(present_with, vec![true]);
    assert_eq!(lost_without, 200, "without a standby the queue died with broker1");
    assert_eq!(lost_with, 0, "the standby copy had queued every message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_the_session_gets_its_subscriptions_back_before_the_connack() {
    let mut net = Net::start(1);
    let mg = net.meshgate("").await;
    let addr = mg.mqtt_addr();
    let (mut s, ack) = raw::connect_with(addr, 4, "restore-me", false, None, None, 2 * SECOND).await.unwrap();
    assert!(!ack.session_present);
    subscribe(&mut s, 7, "data/#", 1).await;
    s.write_all(&raw::disconnect_packet()).await.unwrap();
    drop(s);
    // Mosquitto without persistence forgets every session when it restarts.
    blocking(|| net.broker("broker1").restart());
    let pool = mg.pool().clone();
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(true)).await.expect("broker1 back");
    let (mut s, ack) = raw::connect_with(addr, 4, "restore-me", false, None, None, 2 * SECOND).await.unwrap();
    assert_eq!((ack.code, ack.session_present), (0, true), "meshgate restored the session and said so");
    assert_eq!(pool.metrics.durable_ops.with_label_values(&["restore", "ok"]).get(), 1);
    let (mut p, _) = raw::connect(addr, 4, "pub-restore", 2 * SECOND).await.unwrap();
    p.write_all(&raw::publish_packet(TOPIC, b"hello", 1, 1, false)).await.unwrap();
    let mut got = None;
    while let Ok((first, body)) = raw::read_packet(&mut s, 2 * SECOND).await {
        if let Some(m) = raw::parse_publish(first, &body) {
            got = Some(m);
            break;
        }
    }
    let m = got.expect("the restored subscription delivers without a SUBSCRIBE from the client");
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.qos), (TOPIC, &b"hello"[..], 1));
    // An UNSUBSCRIBE acknowledged by the broker leaves the record too.
    unsubscribe(&mut s, 9, "data/#").await;
    let pl = mg.durable().clone();
    wait_until(2 * SECOND, || pl.placement("restore-me").is_some_and(|p| p.subscriptions == 0))
        .await
        .expect("unsubscribe recorded");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_id_across_the_pool_closes_the_older_session() {
    let net = Net::start(2);
    // A slow drain (it closes the oldest session at once, the next one 100 s later), and an
    // older session ahead of the twin, so it is the duplicate id, not the drain, that closes
    // the twin's first session.
    let mg = net.meshgate("[proxy]\nfailback_rate = 0.01\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();
    let addr = mg.mqtt_addr();
    let (_filler, _) = raw::connect(addr, 4, "filler", 2 * SECOND).await.unwrap();
    let (mut first, _) = raw::connect_with(addr, 4, "twin", false, None, None, 2 * SECOND).await.unwrap();
    let pl = pool.clone();
    wait_until(2 * SECOND, || pl.broker_of("twin").as_deref() == Some("broker1")).await.expect("first on broker1");
    pool.set_admin("broker1", meshgate::pool::AdminState::Draining).unwrap();
    let started = Instant::now();
    let (mut second, ack) = raw::connect_with(addr, 4, "twin", false, None, None, 2 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    assert!(raw::closed_within(&mut first, 2 * SECOND).await, "the older session on broker1 was closed");
    let took = started.elapsed();
    eprintln!(
        "duplicate client id: older session closed {:.0} ms after the second CONNECT",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(pool.metrics.sessions_closed.with_label_values(&["duplicate_client_id"]).get(), 1);
    // The drain's first close comes from the rebalancer's own task, which a loaded machine may
    // run after the duplicate's close: waited for, then counted exactly.
    let m = pool.clone();
    let _ = wait_until(2 * SECOND, || m.metrics.sessions_closed.with_label_values(&["drain"]).get() >= 1).await;
    assert_eq!(pool.metrics.sessions_closed.with_label_values(&["drain"]).get(), 1, "the drain closed only the filler");
    // The closed sessions' tasks unregister as they end.
    let pl = pool.clone();
    wait_until(2 * SECOND, || pl.session_count() == 1).await.expect("only the newer session is left");
    assert_eq!(pool.sessions()[0].broker.name, "broker2");
    // The newer one still works.
    second.write_all(&raw::pingreq_packet()).await.unwrap();
    assert_eq!(raw::read_packet(&mut second, 2 * SECOND).await.unwrap().0, 0xd0);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_still_happens_after_a_meshgate_restart() {
    let mut net = Net::start(2);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sessions.json");
    let extra = format!("[sessions]\nstate_file = {:?}\n", state.display().to_string());
    let mg = net.meshgate(&extra).await;
    let addr = mg.mqtt_addr();
    let (mut s, _) = raw::connect_with(addr, 4, "survivor", false, None, None, 2 * SECOND).await.unwrap();
    subscribe(&mut s, 1, "data/#", 1).await;
    s.write_all(&raw::disconnect_packet()).await.unwrap();
    drop(s);
    let durable = mg.durable().clone();
    wait_until(2 * SECOND, || durable.placement("survivor").is_some()).await.unwrap();
    mg.shutdown().await;
    let text = std::fs::read_to_string(&state).expect("the record was saved");
    assert!(text.contains("data/#") && text.contains("broker1"), "{text}");

    // A new meshgate process knows nothing but the file.
    let mg: Meshgate = net.meshgate(&extra).await;
    let pool = mg.pool().clone();
    blocking(|| net.broker("broker1").kill());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    let pl = pool.clone();
    wait_until(3 * SECOND, || pl.metrics.durable_ops.with_label_values(&["migrate", "ok"]).get() == 1)
        .await
        .expect("the session was migrated from the saved record");
    // Published while the client is away: queued for it on broker2.
    let (mut p, _) = raw::connect(addr, 4, "pub-restart", 2 * SECOND).await.unwrap();
    publish_acked(&mut p, TOPIC, b"while-away", 1).await;
    let (mut s, ack) = raw::connect_with(addr, 4, "survivor", false, None, None, 2 * SECOND).await.unwrap();
    assert!(ack.session_present, "the migrated session was there");
    let (first, body) = raw::read_packet(&mut s, 2 * SECOND).await.expect("the queued message arrives");
    assert_eq!(raw::parse_publish(first, &body).map(|m| m.payload), Some(b"while-away".to_vec()));
    mg.shutdown().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// What standby copies cost, printed for docs/sessions.md, and the bound asserted: the trim
/// empties every standby queue while its client is connected elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_copies_are_trimmed_while_their_clients_are_connected() {
    const CLIENTS: usize = 300;
    const MESSAGES: usize = 100;
    let net = Net::start(3);
    let extra =
        "[replication]\nenabled = true\nlag_interval = \"200ms\"\n[sessions]\nstandby = true\nstandby_trim = \"1s\"\n";
    let mg = net.meshgate(extra).await;
    let pool = mg.pool().clone();
    let addr = mg.mqtt_addr();
    let b2_pid = net.brokers[1].pid().unwrap();
    let rss_before = rss_kib(b2_pid);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let (mut s, _) =
            raw::connect_with(addr, 4, &format!("standby-{i}"), false, None, None, 2 * SECOND).await.unwrap();
        subscribe(&mut s, 1, "data/#", 1).await;
        clients.push(s);
    }
    let pl = pool.clone();
    wait_until(20 * SECOND, || pl.metrics.durable_ops.with_label_values(&["standby", "ok"]).get() == CLIENTS as u64)
        .await
        .expect("a standby copy for every session");
    let made_in = started.elapsed();
    let rss_after = rss_kib(b2_pid);
    // Every client reads its messages on broker1; broker2's copies queue them until trimmed.
    let (mut p, _) = raw::connect(addr, 4, "pub-standby", 2 * SECOND).await.unwrap();
    for i in 0..MESSAGES as u16 {
        publish_acked(&mut p, TOPIC, i.to_string().as_bytes(), i + 1).await;
    }
    let drains: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut n = 0usize;
                while let Ok((first, body)) = raw::read_packet(&mut s, Duration::from_millis(500)).await {
                    if let Some(id) = raw::parse_publish(first, &body).and_then(|m| m.packet_id) {
                        s.write_all(&raw::puback_packet(id)).await.unwrap();
                        n += 1;
                    }
                }
                (n, s)
            })
        })
        .collect();
    let rss_queued = rss_kib(b2_pid);
    let trim_started = Instant::now();
    let pl = pool.clone();
    let expected = (CLIENTS * MESSAGES) as u64;
    let trimmed = wait_until(30 * SECOND, || pl.metrics.standby_trimmed.get() >= expected).await;
    let trim_took = trim_started.elapsed();
    let got = pool.metrics.standby_trimmed.get();
    let mut delivered = 0;
    let mut _open = Vec::new();
    for d in drains {
        let (n, s) = d.await.unwrap();
        delivered += n;
        _open.push(s);
    }
    eprintln!(
        "standby: {CLIENTS} copies made in {:.2} s; broker2 RSS {rss_before} KiB → {rss_after} KiB with the copies ({:.0} B each) → {rss_queued} KiB with {MESSAGES} messages queued in each; trim took every queued message ({got}) within {:.1} s; clients got {delivered} on broker1",
        made_in.as_secs_f64(),
        (rss_after.saturating_sub(rss_before) * 1024) as f64 / CLIENTS as f64,
        trim_took.as_secs_f64(),
    );
    assert!(trimmed.is_some(), "every queued copy trimmed: {got} of {expected}");
    assert_eq!(got, expected, "trimmed exactly what was queued");
    assert_eq!(delivered, CLIENTS * MESSAGES, "the clients got everything on their own broker");
    mg.shutdown().await;
}

/// A standby copy follows the subscriptions: one dropped after the copy was made must not
/// deliver after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_copy_is_remade_when_subscriptions_change() {
    let mut net = Net::start(2);
    let extra =
        "[replication]\nenabled = true\nlag_interval = \"200ms\"\n[sessions]\nstandby = true\nstandby_trim = \"1h\"\n";
    let mg = net.meshgate(extra).await;
    let pool = mg.pool().clone();
    let repl = mg.replication().unwrap().clone();
    wait_until(10 * SECOND, || repl.view().lag.len() == 2).await.expect("replication links up");
    let addr = mg.mqtt_addr();
    let (mut s, _) = raw::connect_with(addr, 4, "changer", false, None, None, 2 * SECOND).await.unwrap();
    for (id, filter) in [(1u16, "keep/#"), (2, "drop/#")] {
        subscribe(&mut s, id, filter, 1).await;
    }
    let ops = |p: &meshgate::pool::Pool| p.metrics.durable_ops.with_label_values(&["standby", "ok"]).get();
    let pl = mg.durable().clone();
    wait_until(5 * SECOND, || pl.placement("changer").is_some_and(|p| p.standby.is_some() && p.subscriptions == 2))
        .await
        .expect("standby made");
    let made = ops(&pool);
    unsubscribe(&mut s, 3, "drop/#").await;
    let pl = pool.clone();
    wait_until(5 * SECOND, || ops(&pl) > made).await.expect("the standby copy was made again");
    s.write_all(&raw::disconnect_packet()).await.unwrap();
    drop(s);
    // While the client is away: one message on each filter, then broker1 dies.
    let (mut w, _) = raw::connect(net.brokers[1].addr, 4, "watch-changer", 2 * SECOND).await.unwrap();
    subscribe(&mut w, 1, "#", 0).await;
    let (mut p, _) = raw::connect(addr, 4, "pub-changer", 2 * SECOND).await.unwrap();
    for (i, topic) in [(1u16, "drop/x"), (2, "keep/x")] {
        publish_acked(&mut p, topic, topic.as_bytes(), i).await;
    }
    let mut replicated = 0;
    while replicated < 2 {
        if raw::read_packet(&mut w, 5 * SECOND).await.expect("replicated to broker2").0 >> 4 == 3 {
            replicated += 1;
        }
    }
    blocking(|| net.broker("broker1").kill());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    let (mut s, ack) = raw::connect_with(addr, 4, "changer", false, None, None, 3 * SECOND).await.unwrap();
    assert!(ack.session_present);
    let topics = topics_until_quiet(&mut s).await;
    assert_eq!(topics, vec!["keep/x".to_string()], "only what the session still subscribes to");
    mg.shutdown().await;
}

/// A broker that comes back from a hang still holds the session as it was before the
/// failover; it is wiped before the broker takes sessions again, so a client failed back there
/// gets its current subscriptions, not the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_broker_loses_its_outdated_copy_before_clients_fail_back() {
    let mut net = Net::start(2);
    // Clients fail back by reconnecting here (the close path of a move).
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();
    let addr = mg.mqtt_addr();
    let (mut s, _) = raw::connect_with(addr, 4, "returner", false, None, None, 2 * SECOND).await.unwrap();
    for (id, filter) in [(1u16, "keep/#"), (2, "drop/#")] {
        subscribe(&mut s, id, filter, 1).await;
    }
    blocking(|| net.broker("broker1").hang());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    assert!(raw::closed_within(&mut s, 2 * SECOND).await, "its session on broker1 was closed");
    let (mut s, ack) = raw::connect_with(addr, 4, "returner", false, None, None, 2 * SECOND).await.unwrap();
    assert!(ack.session_present, "migrated to broker2");
    assert_eq!(pool.broker_of("returner").as_deref(), Some("broker2"));
    // On broker2 the client drops one subscription.
    unsubscribe(&mut s, 3, "drop/#").await;
    // broker1 resumes with its old session of "returner" (both filters) in memory; failback
    // (drain) closes the session on broker2 and the client comes back to broker1.
    let wiped_before = pool.metrics.durable_ops.with_label_values(&["wipe", "ok"]).get();
    blocking(|| net.broker("broker1").resume());
    assert!(raw::closed_within(&mut s, 5 * SECOND).await, "failback closed the session on broker2");
    // New sessions wait while the returning broker's outdated copies are wiped.
    let (mut s, ack) = raw::connect_with(addr, 4, "returner", false, None, None, 3 * SECOND).await.unwrap();
    assert_eq!(
        pool.metrics.durable_ops.with_label_values(&["wipe", "ok"]).get(),
        wiped_before + 1,
        "the old copy was wiped first"
    );
    assert!(ack.session_present, "restored on broker1");
    assert_eq!(pool.broker_of("returner").as_deref(), Some("broker1"));
    let (mut p, _) = raw::connect(addr, 4, "pub-returner", 2 * SECOND).await.unwrap();
    for (i, topic) in [(1u16, "drop/x"), (2, "keep/x")] {
        publish_acked(&mut p, topic, topic.as_bytes(), i).await;
    }
    let topics = topics_until_quiet(&mut s).await;
    assert_eq!(topics, vec!["keep/x".to_string()], "the subscription dropped on broker2 stays dropped");
    mg.shutdown().await;
}
