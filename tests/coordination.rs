//! Several meshgate instances sharing state through a real etcd, each a real `meshgate run` process, in front of real Mosquitto brokers: replication leadership across a SIGKILL, one owner per client id, an etcd outage, etcd missing at start, a persistent paho client moving between instances.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::instance::{eventually, get, Instance, LEASE_TTL};
use common::mqtt::{self, wait_until};
use common::Net;
use tokio::io::AsyncWriteExt;

const SECOND: Duration = Duration::from_secs(1);
/// Every queued QoS 1 message is kept for an offline replication link (Mosquitto drops past
/// 1000 by default): docs/ha.md asks the same of production brokers.
const BROKER_EXTRA: &str = "max_queued_messages 0";

/// Deliveries on one broker, directly: first arrival of each sequence number, and repeats.
#[derive(Default)]
struct Received {
    first: HashMap<u64, Instant>,
    repeats: u64,
}

async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> (Arc<Mutex<Received>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Received::default()));
    let g = got.clone();
    let task = common::subscribed(addr, id, filter, move |p| {
        let Ok(seq) = String::from_utf8_lossy(&p.payload).parse::<u64>() else { return };
        let mut g = g.lock().unwrap();
        let now = Instant::now();
        let mut repeat = true;
        g.first.entry(seq).or_insert_with(|| {
            repeat = false;
            now
        });
        g.repeats += u64::from(repeat);
    })
    .await;
    (got, task)
}

/// What a QoS 1 publisher sent and had acknowledged, by sequence number.
#[derive(Default)]
struct Sent {
    at: HashMap<u64, Instant>,
    acked: Vec<u64>,
    errors: Vec<String>,
}

/// Publishes QoS 1 at `rate`/s through `addr` until `stop`, one message in flight: a sequence
/// number counts as acknowledged when its PUBACK arrived.
fn publisher(
    addr: SocketAddr,
    id: &str,
    topic: &str,
    rate: u32,
    stop: tokio_util::sync::CancellationToken,
) -> (Arc<Mutex<Sent>>, tokio::task::JoinHandle<()>) {
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (s, id, topic) = (sent.clone(), id.to_string(), topic.to_string());
    let task = tokio::spawn(async move {
        let (mut stream, connack) = mqtt::connect(addr, 4, &id, 5 * SECOND).await.expect("publisher connects");
        assert_eq!(connack.code, 0);
        let mut tick = tokio::time::interval(SECOND / rate);
        let mut seq = 0u64;
        while !stop.is_cancelled() {
            tick.tick().await;
            seq += 1;
            let pkid = (seq % 60_000 + 1) as u16;
            s.lock().unwrap().at.insert(seq, Instant::now());
            if let Err(e) =
                stream.write_all(&mqtt::publish_packet(&topic, seq.to_string().as_bytes(), 1, pkid, false)).await
            {
                s.lock().unwrap().errors.push(format!("write: {e}"));
                return;
            }
            match mqtt::read_packet(&mut stream, 10 * SECOND).await {
                Ok((0x40, body)) if body == pkid.to_be_bytes() => s.lock().unwrap().acked.push(seq),
                other => {
                    s.lock().unwrap().errors.push(format!("seq {seq}: {other:?}"));
                    return;
                }
            }
        }
    });
    (sent, task)
}

/// Waits until `got` holds every acknowledged message; returns the longest time any of them
/// took from its send to its first arrival.
async fn all_arrive(sent: &Mutex<Sent>, got: &Mutex<Received>, limit: Duration) -> Duration {
    let acked = sent.lock().unwrap().acked.clone();
    let done = wait_until(limit, || {
        let g = got.lock().unwrap();
        acked.iter().all(|s| g.first.contains_key(s))
    })
    .await;
    let g = got.lock().unwrap();
    let missing: Vec<_> = acked.iter().filter(|s| !g.first.contains_key(s)).collect();
    assert!(done.is_some(), "{} of {} acknowledged messages never arrived: {missing:?}", missing.len(), acked.len());
    let s = sent.lock().unwrap();
    acked.iter().map(|q| g.first[q].saturating_duration_since(s.at[q])).max().unwrap_or_default()
}

fn setup() -> (Net, Etcd) {
    let net = Net::start_with(3, BROKER_EXTRA);
    let etcd = Etcd::start(net.slot.addr(50, 2379));
    (net, etcd)
}

/// A and B on different brokers (B does not use broker1), both registered: a client id's two
/// connections meet through the instances only, never through a broker's own takeover.
fn two_instances_apart(net: &Net, etcd: &Etcd) -> (Instance, Instance) {
    let a = Instance::start("a", &net.slot, 1, net, &etcd.url(), "", &[]);
    let b = Instance::start("b", &net.slot, 2, net, &etcd.url(), "", &[("broker1", "enabled = false")]);
    eventually(10 * SECOND, "both registered", || a.json("/instances")["instances"].as_array().unwrap().len() == 2);
    (a, b)
}

/// A and B, A started first and leading with every replication link up.
fn two_instances(net: &Net, etcd: &Etcd) -> (Instance, Instance) {
    let a = Instance::start("a", &net.slot, 1, net, &etcd.url(), "", &[]);
    eventually(10 * SECOND, "a leads replication", || a.leading());
    eventually(10 * SECOND, "a's links are up", || {
        a.json("/replication")["links"]
            .as_array()
            .is_some_and(|l| l.len() == 3 && l.iter().all(|x| x["connected"] == true))
    });
    let b = Instance::start("b", &net.slot, 2, net, &etcd.url(), "", &[]);
    eventually(10 * SECOND, "b sees a as leader", || b.json("/instances")["coordination"]["leader"] == "a");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_replication_goes_on_from_the_other_instance_nothing_lost() {
    let (net, etcd) = setup();
    let (mut a, b) = common::blocking(|| two_instances(&net, &etcd));
    let (got, _sub) = subscriber(net.brokers[2].addr, "sub-on-broker3", "load/#").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (sent, publishing) = publisher(b.mqtt, "pub-through-b", "load/a", 100, stop.clone());
    // Replication works before the kill: the first messages reach broker3.
    wait_until(5 * SECOND, || got.lock().unwrap().first.len() >= 50).await.expect("replicated before the kill");

    common::blocking(|| a.kill());
    let took_over = common::blocking(|| eventually(LEASE_TTL + 2 * SECOND, "b leads", || b.leading()));
    tokio::time::sleep(5 * SECOND).await;
    stop.cancel();
    publishing.await.unwrap();
    let worst = all_arrive(&sent, &got, 10 * SECOND).await;

    let s = sent.lock().unwrap();
    assert!(s.errors.is_empty(), "the publisher through b was never cut: {:?}", s.errors);
    let repeats = got.lock().unwrap().repeats;
    let redelivered = b.metric("meshgate_replication_redelivered_total");
    println!(
        "leader killed: b leads {:.2} s after the kill; {} acknowledged messages all on broker3, longest delay {:.2} s; {repeats} duplicate(s) on broker3, {redelivered} redelivered (counted by b)",
        took_over.as_secs_f64(),
        s.acked.len(),
        worst.as_secs_f64()
    );
    assert!(took_over <= LEASE_TTL + SECOND, "takeover {took_over:?} exceeds lease_ttl + 1 s");
    assert!(worst <= LEASE_TTL + SECOND, "replication gap {worst:?} exceeds lease_ttl + 1 s");
    assert!(
        repeats as f64 <= redelivered,
        "every duplicate is one b counted as redelivered: {repeats} > {redelivered}"
    );
    assert_eq!(
        b.json("/instances")["instances"].as_array().unwrap().len(),
        1,
        "a's registration expired with its lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connecting_through_another_instance_closes_the_older_copy() {
    let (net, etcd) = setup();
    // The two connections land on different brokers: only the instances can tell each other.
    let (a, b) = common::blocking(|| two_instances_apart(&net, &etcd));
    let (mut first, c) = mqtt::connect(a.mqtt, 4, "device-7", 5 * SECOND).await.unwrap();
    assert_eq!(c.code, 0);
    common::blocking(|| {
        eventually(5 * SECOND, "a's claim written", || {
            etcd.keys("/meshgate/clients/").contains(&"/meshgate/clients/device-7".to_string())
        })
    });
    let (mut second, c) = mqtt::connect(b.mqtt, 4, "device-7", 5 * SECOND).await.unwrap();
    assert_eq!(c.code, 0);
    let since = Instant::now();
    assert!(mqtt::closed_within(&mut first, 3 * SECOND).await, "a closed its older connection of device-7");
    println!("older copy closed {:.0} ms after the second CONNECT", since.elapsed().as_secs_f64() * 1000.0);
    assert_eq!(a.metric("meshgate_coordination_takeovers_total"), 1.0);
    assert_eq!(a.metric("meshgate_sessions_closed_total{reason=\"instance_takeover\"}"), 1.0);
    // The newer connection is untouched.
    second.write_all(&mqtt::pingreq_packet()).await.unwrap();
    let (first_byte, _) = mqtt::read_packet(&mut second, 2 * SECOND).await.expect("b's connection answers");
    assert_eq!(first_byte, 0xD0);
    assert_eq!(b.metric("meshgate_coordination_takeovers_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_for_ten_seconds_cuts_no_client_and_never_makes_two_leaders() {
    let (net, mut etcd) = setup();
    let (a, b) = common::blocking(|| two_instances(&net, &etcd));
    let (got, _sub) = subscriber(net.brokers[2].addr, "sub-on-broker3", "load/#").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (sent, publishing) = publisher(b.mqtt, "pub-through-b", "load/b", 100, stop.clone());
    let (mut pinger, _) = mqtt::connect(a.mqtt, 4, "pinger-through-a", 5 * SECOND).await.unwrap();
    wait_until(5 * SECOND, || got.lock().unwrap().first.len() >= 50).await.expect("replicated before the outage");

    // Both instances' view, every 50 ms, for the whole test: never two leaders.
    let watching = tokio_util::sync::CancellationToken::new();
    let (ah, bh) = (a.http, b.http);
    let w = watching.clone();
    // A failed assertion below still ends the watcher (the runtime waits for it).
    let _end_watcher = watching.clone().drop_guard();
    let watcher = tokio::task::spawn_blocking(move || {
        let leads = |h| get(h, "/instances").is_some_and(|t| t.contains("\"leading\":true"));
        let mut both = 0;
        while !w.is_cancelled() {
            if leads(ah) && leads(bh) {
                both += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        both
    });

    common::blocking(|| etcd.stop());
    let stopped = Instant::now();
    let fenced = common::blocking(|| eventually(LEASE_TTL, "a stops leading without etcd", || !a.leading()));
    let health = a.json("/health");
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["coordination"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{health}");
    // Clients are served all along: the pinger gets every PINGRESP.
    while stopped.elapsed() < 10 * SECOND {
        pinger.write_all(&mqtt::pingreq_packet()).await.unwrap();
        let (first_byte, _) = mqtt::read_packet(&mut pinger, 2 * SECOND).await.expect("a answers during the outage");
        assert_eq!(first_byte, 0xD0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    common::blocking(|| etcd.restart());
    let back = common::blocking(|| {
        eventually(10 * SECOND, "one leader again, both healthy", || {
            let (x, y) = (a.json("/instances"), b.json("/instances"));
            x["coordination"]["state"] == "ok"
                && y["coordination"]["state"] == "ok"
                && (x["coordination"]["leading"] == true) != (y["coordination"]["leading"] == true)
                && x["instances"].as_array().unwrap().len() == 2
        })
    });
    // Reconciled: each instance's open connections are claimed in etcd again.
    common::blocking(|| {
        eventually(5 * SECOND, "claims written again", || {
            let keys = etcd.keys("/meshgate/clients/");
            keys.contains(&"/meshgate/clients/pinger-through-a".to_string())
                && keys.contains(&"/meshgate/clients/pub-through-b".to_string())
        })
    });
    tokio::time::sleep(SECOND).await;
    stop.cancel();
    publishing.await.unwrap();
    watching.cancel();
    let both = watcher.await.unwrap();
    let worst = all_arrive(&sent, &got, 20 * SECOND).await;
    let s = sent.lock().unwrap();
    assert!(s.errors.is_empty(), "the publisher through b was never cut: {:?}", s.errors);
    let repeats = got.lock().unwrap().repeats;
    let redelivered =
        a.metric("meshgate_replication_redelivered_total") + b.metric("meshgate_replication_redelivered_total");
    println!(
        "etcd away 10 s: a stopped leading {:.2} s in; leader again {:.2} s after etcd returned; {} acknowledged messages all on broker3 (longest delay {:.1} s); {repeats} duplicate(s), {redelivered} redelivered",
        fenced.as_secs_f64(),
        back.as_secs_f64(),
        s.acked.len(),
        worst.as_secs_f64()
    );
    assert_eq!(both, 0, "two instances led replication at once");
    assert!(repeats as f64 <= redelivered, "every duplicate is counted: {repeats} > {redelivered}");
    assert_eq!(a.json("/health")["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_missing_at_start_the_instance_serves_degraded_then_joins() {
    let net = Net::start_with(3, BROKER_EXTRA);
    let etcd_addr = net.slot.addr(50, 2379);
    let a = common::blocking(|| Instance::start("a", &net.slot, 1, &net, &format!("http://{etcd_addr}"), "", &[]));
    let health = a.json("/health");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["coordination"]["leading"], false, "{health}");
    // It serves clients.
    let (mut s, c) = mqtt::connect(a.mqtt, 4, "early", 5 * SECOND).await.expect("a takes clients without etcd");
    assert_eq!(c.code, 0);
    s.write_all(&mqtt::pingreq_packet()).await.unwrap();
    assert_eq!(mqtt::read_packet(&mut s, 2 * SECOND).await.unwrap().0, 0xD0);
    let warned: Vec<_> =
        a.log().lines().filter(|l| l.contains("cannot reach etcd at start")).map(str::to_string).collect();
    assert_eq!(warned.len(), 1, "one clear line: {warned:?}");
    assert!(warned[0].contains("WARN") && warned[0].contains(&etcd_addr.to_string()), "{}", warned[0]);

    let etcd = common::blocking(|| Etcd::start(etcd_addr));
    let joined = common::blocking(|| eventually(10 * SECOND, "a joins and leads", || a.leading()));
    assert_eq!(a.json("/health")["status"], "ok");
    common::blocking(|| {
        eventually(5 * SECOND, "its early client is claimed", || {
            etcd.keys("/meshgate/clients/").contains(&"/meshgate/clients/early".to_string())
        })
    });
    println!("etcd started late: a joined and leads {:.2} s later", joined.as_secs_f64());
}

/// The lines a paho script printed with `key` (its CONNACKs, SUBACKs or messages).
fn printed(lines: &Mutex<Vec<serde_json::Value>>, key: &str) -> Vec<serde_json::Value> {
    lines.lock().unwrap().iter().filter(|v| v.get(key).is_some()).cloned().collect()
}

/// Waits until a paho subscriber has printed every acknowledged sequence number.
async fn all_printed(lines: &Mutex<Vec<serde_json::Value>>, acked: &[u64]) -> Option<Duration> {
    wait_until(10 * SECOND, || {
        let got: std::collections::HashSet<String> =
            printed(lines, "msg").iter().filter_map(|v| v["msg"].as_str().map(str::to_string)).collect();
        acked.iter().all(|s| got.contains(&s.to_string()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_paho_subscriber_moves_from_a_killed_instance_to_the_other_and_loses_nothing() {
    let (net, etcd) = setup();
    let (mut a, b) = common::blocking(|| two_instances(&net, &etcd));
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let l = lines.clone();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/coordination/paho_list.py");
    let addrs = format!("{},{}", a.mqtt, b.mqtt);
    let _child =
        common::paho::spawn(script, &[&addrs, "paho-persistent", "orders/#"], move |v| l.lock().unwrap().push(v));
    wait_until(10 * SECOND, || !printed(&lines, "suback").is_empty()).await.expect("subscribed through a");
    // Published on broker1 directly, where both instances send the client.
    let stop = tokio_util::sync::CancellationToken::new();
    let (sent, publishing) = publisher(net.brokers[0].addr, "orders-pub", "orders/1", 50, stop.clone());
    tokio::time::sleep(SECOND).await;
    common::blocking(|| a.kill());
    wait_until(10 * SECOND, || printed(&lines, "connack").len() >= 2).await.expect("reconnected through b");
    tokio::time::sleep(SECOND).await;
    stop.cancel();
    publishing.await.unwrap();
    let acked = sent.lock().unwrap().acked.clone();
    let all = all_printed(&lines, &acked).await;
    let connacks = printed(&lines, "connack");
    println!("paho persistent subscriber: {connacks:?}; {} acknowledged messages", acked.len());
    assert_eq!(connacks[1]["address"], b.mqtt.to_string(), "the second connection went through b");
    assert_eq!(connacks[1]["session_present"], true, "session present through b");
    assert!(all.is_some(), "every acknowledged message reached the subscriber");
}

/// The persistent-session record is shared through etcd: a client whose instance and whose
/// broker die together comes back through the other instance to a broker without its session,
/// and that instance restores it from the record the first one wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_survives_its_instance_and_its_broker_through_the_shared_record() {
    let (mut net, etcd) = setup();
    let (mut a, b) = common::blocking(|| two_instances(&net, &etcd));
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let l = lines.clone();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/coordination/paho_list.py");
    let addrs = format!("{},{}", a.mqtt, b.mqtt);
    let _child = common::paho::spawn(script, &[&addrs, "paho-shared", "shared/#"], move |v| l.lock().unwrap().push(v));
    wait_until(10 * SECOND, || !printed(&lines, "suback").is_empty()).await.expect("subscribed through a");
    // b learns the session from etcd: its subscription, its broker, the instance it is on.
    let shared = common::blocking(|| {
        eventually(5 * SECOND, "b shows the session a recorded", || {
            b.json("/sessions").as_array().is_some_and(|v| {
                v.iter().any(|s| {
                    s["client_id"] == "paho-shared"
                        && s["home"] == "broker1"
                        && s["connected"] == true
                        && s["subscriptions"][0]["filter"] == "shared/#"
                })
            })
        })
    });
    let keys = etcd.keys("/meshgate/sessions/");
    assert_eq!(keys, vec!["/meshgate/sessions/paho-shared".to_string()], "one record in etcd");

    // a and broker1 die at once: the client's next broker (broker2) has never seen it.
    common::blocking(|| {
        a.kill();
        net.broker("broker1").kill();
    });
    wait_until(10 * SECOND, || printed(&lines, "connack").len() >= 2).await.expect("reconnected through b");
    let stop = tokio_util::sync::CancellationToken::new();
    let (sent, publishing) = publisher(net.brokers[1].addr, "shared-pub", "shared/1", 50, stop.clone());
    tokio::time::sleep(SECOND).await;
    stop.cancel();
    publishing.await.unwrap();
    let acked = sent.lock().unwrap().acked.clone();
    let all = all_printed(&lines, &acked).await;
    let connacks = printed(&lines, "connack");
    println!(
        "shared session record: on b {} ms after a's SUBACK; after a and broker1 died: {connacks:?}; {} acknowledged messages",
        shared.as_millis(),
        acked.len()
    );
    assert_eq!(connacks[1]["address"], b.mqtt.to_string(), "the second connection went through b");
    assert_eq!(connacks[1]["session_present"], true, "b restored the session on broker2 from the shared record");
    assert!(!acked.is_empty() && all.is_some(), "every acknowledged message reached the subscriber");
    let sessions = b.json("/sessions");
    let s = sessions.as_array().unwrap().iter().find(|s| s["client_id"] == "paho-shared").unwrap();
    assert_eq!(s["home"], "broker2", "{s}");
}

/// SUBSCRIBE at QoS 1 and its SUBACK.
async fn subscribe(stream: &mut tokio::net::TcpStream, filter: &str) {
    stream.write_all(&mqtt::subscribe_packet(1, filter, 1)).await.unwrap();
    let (first, _) = mqtt::read_packet(stream, 5 * SECOND).await.expect("SUBACK");
    assert_eq!(first, 0x90);
}

/// A persistent client that moves from A to B (a client-id takeover across instances) keeps
/// one record: B's, connected through B with what it subscribed through both. A's copy, closed
/// by the takeover, must not write its "disconnected" record over B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_client_taken_over_by_another_instance_keeps_the_newer_record() {
    let (net, etcd) = setup();
    // a's copy stays open until the instances tell each other, so b's record reaches a while
    // a's connection is still there.
    let (a, b) = common::blocking(|| two_instances_apart(&net, &etcd));
    let (mut first, c) = mqtt::connect_with(a.mqtt, 4, "mover", false, None, None, 5 * SECOND).await.unwrap();
    assert_eq!(c.code, 0);
    subscribe(&mut first, "via/a").await;
    let has = |i: &Instance, filters: &[&str]| {
        i.json("/sessions").as_array().is_some_and(|v| {
            v.iter().any(|s| {
                let got: Vec<&str> = s["subscriptions"]
                    .as_array()
                    .map_or_else(Vec::new, |f| f.iter().filter_map(|x| x["filter"].as_str()).collect());
                s["client_id"] == "mover" && s["connected"] == true && filters.iter().all(|f| got.contains(f))
            })
        })
    };
    common::blocking(|| eventually(5 * SECOND, "b has a's record", || has(&b, &["via/a"])));
    let (mut second, c) = mqtt::connect_with(b.mqtt, 4, "mover", false, None, None, 5 * SECOND).await.unwrap();
    assert_eq!(c.code, 0);
    subscribe(&mut second, "via/b").await;
    // Nothing through b after this: what a writes when its copy closes must not win.
    assert!(mqtt::closed_within(&mut first, 3 * SECOND).await, "a closed its older copy");
    // a's disconnect has been written, if it were going to be (its queue is empty).
    common::blocking(|| {
        eventually(5 * SECOND, "a's writes done", || a.json("/instances")["coordination"]["claims_queued"] == 0);
        for i in [&a, &b] {
            eventually(5 * SECOND, "the record is b's, with both subscriptions", || has(i, &["via/a", "via/b"]));
        }
    });
    let record = etcd.get("/meshgate/sessions/mover");
    println!("the record in etcd after the takeover: {record}");
    let v: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!((v["connected"].as_bool(), v["instance"].as_str()), (Some(true), Some("b")), "{v}");
}

/// Publishes one retained QoS 1 message on a broker directly (an empty payload deletes).
async fn retain(addr: SocketAddr, topic: &str, payload: &str) {
    let (mut s, connack) = mqtt::connect(addr, 4, "retainer", 5 * SECOND).await.expect("connects");
    assert_eq!(connack.code, 0);
    s.write_all(&mqtt::publish_packet(topic, payload.as_bytes(), 1, 1, true)).await.unwrap();
    let (first, _) = mqtt::read_packet(&mut s, 5 * SECOND).await.expect("PUBACK");
    assert_eq!(first, 0x40);
}

/// The retained message a broker holds for `topic`, read directly: Mosquitto sends it right
/// behind the SUBACK, in the same write.
async fn retained_on(addr: SocketAddr, topic: &str) -> Option<Vec<u8>> {
    let (mut s, _) = mqtt::connect(addr, 4, "retained-reader", 5 * SECOND).await.expect("connects");
    s.write_all(&mqtt::subscribe_packet(1, topic, 0)).await.unwrap();
    let (first, _) = mqtt::read_packet(&mut s, 5 * SECOND).await.expect("SUBACK");
    assert_eq!(first, 0x90);
    match mqtt::read_packet(&mut s, Duration::from_millis(300)).await {
        Ok((first, body)) if first & 0xF0 == 0x30 => mqtt::parse_publish(first, &body).map(|p| p.payload),
        _ => None,
    }
}

/// A leader stopped by its operator hands its retained record (tombstones included) to the
/// next: a broker that was away while a retained message was deleted gets the deletion when it
/// returns, instead of spreading the deleted value to every broker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_hands_its_retained_record_to_the_next_and_a_deletion_survives() {
    let (mut net, etcd) = setup();
    let (mut a, b) = common::blocking(|| two_instances(&net, &etcd));
    let topic = "keep/t";
    retain(net.brokers[0].addr, topic, "v1").await;
    let b3 = net.brokers[2].addr;
    let mut copied = false;
    for _ in 0..50 {
        if retained_on(b3, topic).await.as_deref() == Some(&b"v1"[..]) {
            copied = true;
            break;
        }
    }
    assert!(copied, "v1 reached broker3");
    // broker3 hangs (keeping v1); the deletion reaches the others only.
    common::blocking(|| net.broker("broker3").hang());
    common::blocking(|| {
        eventually(5 * SECOND, "a sees broker3 down", || {
            a.json("/brokers")
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x["name"] == "broker3" && x["probe_up"] == false))
        })
    });
    retain(net.brokers[0].addr, topic, "").await;
    let mut deleted = false;
    for _ in 0..50 {
        if retained_on(net.brokers[1].addr, topic).await.is_none() {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the deletion reached broker2");
    // a is stopped as an operator would; b leads from a's record.
    common::blocking(|| a.terminate());
    common::blocking(|| {
        eventually(5 * SECOND, "b leads", || b.leading());
        net.broker("broker3").resume();
        eventually(15 * SECOND, "b repaired broker3", || {
            get(b.http, "/metrics").unwrap_or_default().lines().any(|l| {
                l.starts_with("meshgate_replication_retained_repairs_total")
                    && l.contains("broker=\"broker3\"")
                    && l.contains("delete")
                    && !l.ends_with(" 0")
            })
        });
    });
    let held: Vec<Option<Vec<u8>>> = retained_everywhere(&net, topic).await;
    println!("after a handed over and broker3 returned, retained {topic} per broker: {held:?}");
    assert!(held.iter().all(Option::is_none), "the deleted value came back: {held:?}\n{}", b.log());
    assert!(etcd.keys("/meshgate/replication/").is_empty(), "b took the record a handed over");
}

/// Each broker's retained message for `topic`, in broker order.
async fn retained_everywhere(net: &Net, topic: &str) -> Vec<Option<Vec<u8>>> {
    let mut v = Vec::new();
    for br in &net.brokers {
        v.push(retained_on(br.addr, topic).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_action_through_one_instance_applies_on_every_instance_and_outlives_it() {
    let (net, etcd) = setup();
    let admin = "[admin]\ntoken = \"t0ken\"";
    let mut a = common::blocking(|| Instance::start("a", &net.slot, 1, &net, &etcd.url(), admin, &[]));
    let b = common::blocking(|| Instance::start("b", &net.slot, 2, &net, &etcd.url(), admin, &[]));
    common::blocking(|| {
        eventually(10 * SECOND, "both registered", || b.json("/instances")["instances"].as_array().unwrap().len() == 2)
    });
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer t0ken",
            &format!("http://{}/brokers/broker1/disable", a.http),
        ])
        .output()
        .expect("curl runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"disabled\""), "{}", String::from_utf8_lossy(&out.stdout));
    let took = common::blocking(|| {
        eventually(3 * SECOND, "b applies it", || b.json("/brokers/broker1")["state"] == "disabled")
    });
    assert_eq!(b.json("/health")["current_broker"], "broker2");
    // An instance that starts later, with the one that took the action gone, finds it.
    common::blocking(|| a.kill());
    let c = common::blocking(|| Instance::start("c", &net.slot, 3, &net, &etcd.url(), admin, &[]));
    common::blocking(|| {
        eventually(5 * SECOND, "c applies it at start", || c.json("/brokers/broker1")["state"] == "disabled")
    });
    println!("admin disable through a applied on b after {:.0} ms", took.as_secs_f64() * 1000.0);
}
