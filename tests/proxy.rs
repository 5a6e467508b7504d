//! The core proxy against real Mosquitto: routing, failover, hung brokers, tiers, failback, refusals.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};
use meshgate::pool::Pool;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncWriteExt;

const SECOND: Duration = Duration::from_secs(1);

/// Connects a raw client through meshgate and returns the broker that holds its session.
async fn connect_and_locate(net: &Net, pool: &Arc<Pool>, id: &str) -> (tokio::net::TcpStream, raw::Connack, String) {
    let (s, ack) = raw::connect(net.mqtt_addr(), 4, id, 5 * SECOND).await.unwrap_or_else(|e| panic!("{id}: {e}"));
    let mut broker = None;
    wait_until(SECOND, || {
        broker = pool.broker_of(id);
        broker.is_some()
    })
    .await
    .unwrap_or_else(|| panic!("{id} registered"));
    (s, ack, broker.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_through_meshgate() {
    let net = Net::start(2);
    let mg = net.meshgate("").await;
    let addr = mg.mqtt_addr();

    let mut opts = MqttOptions::new("sub-1", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (sub, mut sub_loop) = AsyncClient::new(opts, 100);
    sub.subscribe("sensors/#", QoS::AtLeastOnce).await.unwrap();
    // Wait for the SUBACK before publishing.
    tokio::time::timeout(5 * SECOND, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("SUBACK through meshgate");

    let mut opts = MqttOptions::new("pub-1", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (publ, mut pub_loop) = AsyncClient::new(opts, 100);
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acks = acked.clone();
    tokio::spawn(async move {
        while let Ok(ev) = pub_loop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                acks.fetch_add(1, Relaxed);
            }
        }
    });
    for i in 0..100u32 {
        publ.publish(format!("sensors/t{}", i % 3), QoS::AtLeastOnce, false, i.to_be_bytes().to_vec()).await.unwrap();
    }
    let mut got = Vec::new();
    tokio::time::timeout(10 * SECOND, async {
        while got.len() < 100 {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await.unwrap() {
                got.push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of 100 messages arrived", got.len()));
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());

    wait_until(5 * SECOND, || acked.load(Relaxed) == 100).await.expect("100 PUBACKs reach the publisher");
    let pool = mg.pool();
    assert_eq!(pool.broker_of("sub-1").as_deref(), Some("broker1"));
    assert_eq!(pool.broker_of("pub-1").as_deref(), Some("broker1"));
    let s = pool.sessions().into_iter().find(|s| s.info.client_id == "pub-1").unwrap();
    let (p_in, p_out) = (s.packets_in.load(Relaxed), s.packets_out.load(Relaxed));
    assert!(p_in >= 100, "100 PUBLISH counted client to broker (CONNECT not included), got {p_in}");
    assert!(p_out >= 101, "CONNACK and 100 PUBACK counted broker to client, got {p_out}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_everything_moves_to_broker2() {
    let mut net = Net::start(3);
    // The close path (tests/switch.rs has the switch).
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();

    let mut before = Vec::new();
    for i in 0..5 {
        let (s, ack, broker) = connect_and_locate(&net, &pool, &format!("old-{i}")).await;
        assert_eq!((ack.code, broker.as_str()), (0, "broker1"));
        before.push(s);
    }

    blocking(|| net.broker("broker1").kill());
    // Sessions that were on broker1 are closed (the broker's death closes them at once).
    for s in &mut before {
        assert!(raw::closed_within(s, 3 * SECOND).await, "session on the dead broker closed");
    }
    // 100 connects in a row, starting right away: every one succeeds, on broker2.
    for i in 0..100 {
        let (_s, ack, broker) = connect_and_locate(&net, &pool, &format!("new-{i}")).await;
        assert_eq!(ack.code, 0);
        assert_eq!(broker, "broker2", "connect {i}");
    }
    // The old clients' reconnects land on broker2 too.
    for i in 0..5 {
        let (_s, _, broker) = connect_and_locate(&net, &pool, &format!("old-{i}")).await;
        assert_eq!(broker, "broker2");
    }
    assert_eq!(pool.metrics.rejected.with_label_values(&["no_broker"]).get(), 0);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_is_detected_and_connects_during_detection_succeed() {
    let mut net = Net::start(3);
    let mg = net.meshgate("").await;
    let pool = mg.pool().clone();
    let (mut old, _, broker) = connect_and_locate(&net, &pool, "old").await;
    assert_eq!(broker, "broker1");

    let b1 = pool.broker("broker1").unwrap();
    let hung_at = Instant::now();
    blocking(|| net.broker("broker1").hang());
    // A client connecting right now, while detection is under way.
    let addr = net.mqtt_addr();
    let during = tokio::spawn(async move {
        let started = Instant::now();
        let r = raw::connect(addr, 4, "during", 5 * SECOND).await;
        (r, started.elapsed())
    });
    wait_until(3 * SECOND, || b1.probe_up() == Some(false)).await.expect("marked down");
    let down_after = hung_at.elapsed();
    eprintln!("hung broker1 marked down after {down_after:?}");
    assert!(down_after <= Duration::from_millis(1500), "marked down {down_after:?} after the hang");

    let (r, connack_after) = during.await.unwrap();
    let (_s, ack) = r.expect("the client connecting during detection sees no failure and no hang");
    eprintln!("client connecting during detection got its CONNACK after {connack_after:?}");
    assert_eq!(ack.code, 0);
    assert_eq!(pool.broker_of("during").as_deref(), Some("broker2"));
    // One CONNACK timeout (1 s) on the hung broker at most, then broker2 answers.
    assert!(connack_after < Duration::from_millis(1500), "CONNACK after {connack_after:?}");
    // The session on the hung broker is switched to broker2 under its client's connection:
    // its next PINGREQ is answered from there.
    let p = pool.clone();
    wait_until(2 * SECOND, || p.broker_of("old").as_deref() == Some("broker2")).await.expect("switched to broker2");
    old.write_all(&raw::pingreq_packet()).await.unwrap();
    assert_eq!(raw::read_packet(&mut old, 2 * SECOND).await.unwrap().0, 0xd0, "PINGRESP through broker2");
    assert_eq!(pool.metrics.switches.with_label_values(&["broker_down", "ok"]).get(), 1);
    assert_eq!(pool.metrics.rejected.with_label_values(&["no_broker"]).get(), 0);
    blocking(|| net.broker("broker1").resume());
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tiers_down_clients_go_to_broker3_only() {
    let mut net = Net::start(5);
    let mg = net.meshgate("").await;
    let pool = mg.pool().clone();
    blocking(|| {
        net.broker("broker1").kill();
        net.broker("broker2").hang();
    });
    for name in ["broker1", "broker2"] {
        let b = pool.broker(name).unwrap();
        wait_until(3 * SECOND, || b.probe_up() == Some(false)).await.unwrap_or_else(|| panic!("{name} marked down"));
    }
    for i in 0..30 {
        let (_s, ack, broker) = connect_and_locate(&net, &pool, &format!("c-{i}")).await;
        assert_eq!(ack.code, 0);
        assert_eq!(broker, "broker3", "client {i}");
    }
    for name in ["broker4", "broker5"] {
        assert_eq!(pool.broker(name).unwrap().total_sessions(), 0, "{name} never used");
    }
    blocking(|| net.broker("broker2").resume());
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_goes_to_the_primary_and_drains_at_the_configured_rate() {
    let mut net = Net::start(2);
    // The close path of a failback (tests/switch.rs has the switch, the default).
    let mg = net.meshgate("[proxy]\nfailback_rate = 5\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();
    blocking(|| net.broker("broker1").kill());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(3 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 down");

    let mut lower = Vec::new();
    for i in 0..10 {
        let (s, _, broker) = connect_and_locate(&net, &pool, &format!("low-{i}")).await;
        assert_eq!(broker, "broker2");
        lower.push(s);
    }

    blocking(|| net.broker("broker1").restart());
    let back = Instant::now();
    // Watched from now on: a close that came while this test was still connecting "fresh"
    // below would otherwise be timed when the watching began, late, and shorten the spread.
    let closing = tokio::spawn(common::close_times(lower, 10, back, 7 * SECOND));
    // rise x interval = 2 x 250 ms, counted from when broker1 answers MQTT again.
    let took = wait_until(3 * SECOND, || pool.current_broker().map(|b| b.name.clone()).as_deref() == Some("broker1"))
        .await
        .expect("new clients go to broker1 again");
    eprintln!("new clients went to broker1 {took:?} after it answered again");
    // rise x interval, plus one probe round trip and the 10 ms polling of this test.
    assert!(took <= Duration::from_millis(500 + 50), "failback took {took:?}");
    let (_s, _, broker) = connect_and_locate(&net, &pool, "fresh").await;
    assert_eq!(broker, "broker1");

    // The ten lower-tier sessions are closed gradually: 5 per second, never all at once.
    let closed_at = closing.await.expect("the close watcher ran");
    assert_eq!(closed_at.len(), 10, "all lower-tier sessions moved within 7 s of broker1's return");
    let spread = closed_at[9] - closed_at[0];
    eprintln!("10 lower-tier sessions drained over {spread:?}");
    // 10 sessions at 5/s: 9 gaps of 200 ms.
    assert!(spread >= Duration::from_millis(1600), "drained over {spread:?}, expected about 1.8 s");
    assert!(spread <= Duration::from_millis(2600), "drained over {spread:?}, expected about 1.8 s");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_pass_through_and_are_not_broker_failures() {
    let slot = common::Slot::acquire();
    let b1 = blocking(|| common::Mosquitto::start_with_password("broker1", slot.addr(10, 1883), "alice", "right"));
    let b2 = blocking(|| common::Mosquitto::start("broker2", slot.addr(11, 1883), ""));
    let net = Net { slot, brokers: vec![b1, b2] };
    let mg = net.meshgate("[health]\nusername = \"alice\"\npassword = \"right\"\n").await;
    let pool = mg.pool().clone();

    for _ in 0..5 {
        let (mut s, ack) =
            raw::connect_with(net.mqtt_addr(), 4, "intruder", true, Some("alice"), Some("wrong"), 3 * SECOND)
                .await
                .unwrap();
        assert_eq!(ack.code, 5, "3.1.1 'not authorized' from broker1 reaches the client unchanged");
        assert!(raw::closed_within(&mut s, SECOND).await);
    }
    let (_s, ack) =
        raw::connect_with(net.mqtt_addr(), 5, "v5-intruder", true, Some("alice"), Some("wrong"), 3 * SECOND)
            .await
            .unwrap();
    assert_eq!(ack.code, 0x87, "MQTT 5 'not authorized' passes through");

    let b1 = pool.broker("broker1").unwrap();
    assert_eq!(b1.passive_fails(tokio::time::Instant::now()), 0);
    assert!(b1.available(tokio::time::Instant::now()));
    assert_eq!(pool.metrics.connect_retries.get(), 0, "a refusal is not retried elsewhere");
    assert_eq!(pool.broker("broker2").unwrap().total_sessions(), 0);
    let (_s, ack) = raw::connect_with(net.mqtt_addr(), 4, "alice-dev", true, Some("alice"), Some("right"), 3 * SECOND)
        .await
        .unwrap();
    assert_eq!(ack.code, 0);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_first_packet_closes_without_an_upstream_connection() {
    use tokio::io::AsyncWriteExt;
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let pool = mg.pool().clone();
    let cases: [(&str, &[u8]); 4] = [
        ("not_connect", &[0x30, 0x03, 0x00, 0x01, b'a']),
        ("bad_protocol", &[0x10, 0x0c, 0x00, 0x04, b'H', b'T', b'T', b'P', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00]),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("huge", &[0x10, 0xff, 0xff, 0xff, 0x7f]),
    ];
    for (name, bytes) in cases {
        let mut s = tokio::net::TcpStream::connect(net.mqtt_addr()).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(raw::closed_within(&mut s, SECOND).await, "{name}: closed");
    }
    let rejected = pool.metrics.rejected.with_label_values(&["malformed_connect"]).get()
        + pool.metrics.rejected.with_label_values(&["packet_too_large"]).get();
    assert_eq!(rejected, 4);
    assert_eq!(pool.broker("broker1").unwrap().total_sessions(), 0);
    assert_eq!(pool.broker("broker1").unwrap().active_sessions(), 0, "no upstream connection was opened");
    // The broker's log shows no client but the probes.
    let log = net.brokers[0].log();
    assert!(log.lines().filter(|l| l.contains("New client connected")).all(|l| l.contains("meshgate-probe")), "{log}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_try_failing_gives_one_server_unavailable_connack() {
    let mut net = Net::start(2);
    let mg = net.meshgate("[proxy]\nconnect_tries = 2\n").await;
    blocking(|| {
        for b in net.brokers.iter_mut() {
            b.kill();
        }
    });
    let (mut s, ack) = raw::connect(net.mqtt_addr(), 4, "nobody-home", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 3, "server unavailable");
    assert!(raw::closed_within(&mut s, SECOND).await);
    let (_s, ack) = raw::connect(net.mqtt_addr(), 5, "nobody-home-5", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0x88);
    assert_eq!(mg.pool().metrics.rejected.with_label_values(&["no_broker"]).get(), 2);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_disables_a_broker_closes_its_sessions_like_the_admin_api() {
    let net = Net::start(2);
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let pool = mg.pool().clone();
    let (mut before, _, on) = connect_and_locate(&net, &pool, "reload-before").await;
    assert_eq!(on, "broker1");
    let mut config = net.config("[proxy]\nmove = \"close\"\n");
    config.brokers[0].enabled = false;
    let reloaded = Instant::now();
    mg.reload(config).expect("reload accepted");
    assert!(raw::closed_within(&mut before, 2 * SECOND).await, "the disabled broker's session is closed");
    eprintln!("session closed {:?} after the reload", reloaded.elapsed());
    let closed = pool.metrics.sessions_closed.with_label_values(&["broker_disabled"]).get();
    assert_eq!(closed, 1, "counted as broker_disabled");
    let (_after, ack, on) = connect_and_locate(&net, &pool, "reload-after").await;
    assert_eq!((ack.code, on.as_str()), (0, "broker2"), "new sessions go to broker2");
    mg.shutdown().await;
}

/// A panic in one session's task, while it holds every lock sessions share, must not fail
/// another session or a later CONNECT (persistent sessions take the record's lock on every
/// CONNECT; with poisoning locks, each would panic from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_session_leaves_connects_working() {
    use tokio::io::AsyncWriteExt;
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let (mut before, ack) =
        raw::connect_with(net.mqtt_addr(), 4, "before-panic", false, None, None, 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    mg.panic_holding_shared_locks().await;
    let mut open = Vec::new();
    for (id, clean) in [("after-panic-persistent", false), ("after-panic-clean", true), ("before-panic", false)] {
        let (mut s, ack) = raw::connect_with(net.mqtt_addr(), 4, id, clean, None, None, 5 * SECOND)
            .await
            .unwrap_or_else(|e| panic!("{id}: CONNECT after the panic: {e}"));
        assert_eq!(ack.code, 0, "{id}");
        s.write_all(&raw::pingreq_packet()).await.unwrap();
        let (first, _) = raw::read_packet(&mut s, 5 * SECOND).await.expect("PINGRESP");
        assert_eq!(first, 0xd0, "{id}: the session forwards");
        open.push(s);
    }
    // The first session was taken over by its own reconnect (same client id), as a broker does.
    assert!(raw::closed_within(&mut before, 5 * SECOND).await);
    let pool = mg.pool().clone();
    wait_until(5 * SECOND, || pool.session_count() == 3).await.expect("the registry still works: 3 sessions");
    assert!(mg.durable().placement("after-panic-persistent").is_some(), "the session record still works");
    mg.shutdown().await;
}

/// The access log: one line per ended session, its fields checked against a session the test
/// drove byte by byte, and a session meshgate closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_ended_session_with_its_numbers() {
    use tokio::io::AsyncWriteExt;
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mg = net.meshgate(&format!("[access_log]\npath = \"{}\"\nformat = \"json\"\n", log.display())).await;
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };

    let (mut s, ack) =
        raw::connect_with(net.mqtt_addr(), 4, "acc-1", true, Some("alice"), None, 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    let client = s.local_addr().unwrap();
    let connect = raw::connect_packet(4, "acc-1", true, raw::DEFAULT_KEEPALIVE, Some("alice"), None);
    let publish = raw::publish_packet("acc/t", b"hello", 0, 0, false);
    s.write_all(&publish).await.unwrap();
    s.write_all(&raw::pingreq_packet()).await.unwrap();
    let (first, _) = raw::read_packet(&mut s, 5 * SECOND).await.unwrap();
    assert_eq!(first, 0xd0);
    s.write_all(&raw::disconnect_packet()).await.unwrap();
    assert!(raw::closed_within(&mut s, 5 * SECOND).await, "the broker closes after DISCONNECT");
    wait_until(5 * SECOND, || !lines().is_empty()).await.expect("a line for the ended session");
    let l = &lines()[0];
    assert_eq!(l["client"].as_str(), Some(client.to_string().as_str()));
    assert_eq!((l["client_id"].as_str(), l["username"].as_str()), (Some("acc-1"), Some("alice")));
    assert_eq!((l["protocol"].as_str(), l["broker"].as_str()), (Some("3.1.1"), Some("broker1")));
    assert_eq!(l["upstream"].as_str(), Some(net.brokers[0].addr.to_string().as_str()));
    // CONNECT, PUBLISH, PINGREQ, DISCONNECT in; CONNACK (4 bytes), PINGRESP (2) out.
    let sent = connect.len() + publish.len() + 2 + 2;
    assert_eq!((l["bytes_in"].as_u64(), l["packets_in"].as_u64()), (Some(sent as u64), Some(4)));
    assert_eq!((l["bytes_out"].as_u64(), l["packets_out"].as_u64()), (Some(6), Some(2)));
    assert!(l["duration_s"].as_f64().is_some_and(|d| (0.0..5.0).contains(&d)), "{l}");
    assert_eq!(l["end"].as_str(), Some("broker_closed"), "Mosquitto closes first after a DISCONNECT: {l}");
    assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");

    // A session meshgate closes says why.
    let (_s2, _) = raw::connect(net.mqtt_addr(), 4, "acc-2", 5 * SECOND).await.unwrap();
    let pool = mg.pool().clone();
    wait_until(SECOND, || pool.session_count() == 1).await.unwrap();
    mg.pool().set_admin("broker1", meshgate::pool::AdminState::Disabled).unwrap();
    wait_until(5 * SECOND, || lines().len() == 2).await.expect("a line for the closed session");
    let l = &lines()[1];
    assert_eq!((l["client_id"].as_str(), l["end"].as_str()), (Some("acc-2"), Some("broker_disabled")), "{l}");
    mg.shutdown().await;
}

/// Sessions still open when the shutdown's grace period ends are closed by meshgate: an MQTT 5
/// client hears "server shutting down" (0x8B), a 3.1.1 client's connection closes, and the
/// shutdown returns once they have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_after_the_grace_period_are_closed_with_server_shutting_down() {
    let net = Net::start(1);
    let mg = net.meshgate("[proxy]\nshutdown_grace = \"300ms\"\n").await;
    let (mut v5, ack) = raw::connect(net.mqtt_addr(), 5, "stays-5", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    let (mut v4, ack) = raw::connect(net.mqtt_addr(), 4, "stays-4", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    let pool = mg.pool().clone();
    wait_until(5 * SECOND, || pool.session_count() == 2).await.expect("both registered");
    let stopping = tokio::spawn(mg.shutdown());
    let (kind, body) = raw::read_packet(&mut v5, 5 * SECOND).await.expect("a DISCONNECT after the grace period");
    assert_eq!((kind, body.first().copied()), (0xe0, Some(0x8b)), "DISCONNECT: server shutting down");
    assert!(raw::closed_within(&mut v4, 5 * SECOND).await, "the 3.1.1 client's connection closes");
    tokio::time::timeout(5 * SECOND, stopping).await.expect("the shutdown ends with its sessions").unwrap();
}
