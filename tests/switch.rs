//! Sessions move without the client noticing: failback, admin drain and disable switch the upstream under open client connections (real Mosquitto, rumqttc, paho-mqtt 3.1.1 and 5), and what cannot switch closes with an MQTT 5 DISCONNECT that says why.

mod common;

use std::collections::BTreeMap;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);

/// What a client saw: CONNACKs (more than one is a reconnect), connection errors, and the
/// sequence numbers it received with how often.
#[derive(Default)]
struct Seen {
    connacks: u32,
    errors: u32,
    got: BTreeMap<u64, u32>,
    /// When each sequence number first arrived.
    arrived: Vec<Instant>,
    acked: u64,
}

impl Seen {
    fn received(&mut self, n: u64) {
        let count = self.got.entry(n).or_default();
        if *count == 0 {
            self.arrived.push(Instant::now());
        }
        *count += 1;
    }

    /// The longest time without a new message after `from`.
    fn gap_after(&self, from: Instant) -> Duration {
        let mut times: Vec<Instant> = self.arrived.iter().copied().filter(|t| *t >= from).collect();
        times.sort();
        let mut last = from;
        let mut gap = Duration::ZERO;
        for t in times {
            gap = gap.max(t - last);
            last = t;
        }
        gap
    }
}

type Shared = Arc<Mutex<Seen>>;

fn rumqttc_client(
    addr: std::net::SocketAddr,
    id: &str,
    clean: bool,
    subscribe: Option<&'static str>,
) -> (AsyncClient, Shared, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let seen: Shared = Arc::default();
    let (s, c) = (seen.clone(), client.clone());
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    s.lock().unwrap().connacks += 1;
                    if let Some(f) = subscribe {
                        c.subscribe(f, QoS::AtLeastOnce).await.unwrap();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(n) = std::str::from_utf8(&p.payload).ok().and_then(|t| t.parse().ok()) {
                        s.lock().unwrap().received(n);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => s.lock().unwrap().acked += 1,
                Ok(_) => {}
                Err(_) => {
                    s.lock().unwrap().errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (client, seen, task)
}

/// tests/sessions/paho_sub.py (a persistent paho-mqtt subscriber, 3.1.1 or 5), its CONNACKs
/// and messages counted.
async fn paho_sub(addr: std::net::SocketAddr, id: &str, version: &str) -> (tokio::process::Child, Shared) {
    let seen: Shared = Arc::default();
    let s = seen.clone();
    let child = common::paho::spawn_sub(addr, id, "switch/#", version, move |v| {
        let mut s = s.lock().unwrap();
        if v["session_present"].is_boolean() {
            s.connacks += 1;
        } else if v["suback"].is_array() {
            s.acked += 1;
        } else if let Some(n) = v["msg"].as_str().and_then(|t| t.parse().ok()) {
            s.received(n);
        }
    });
    let s = seen.clone();
    wait_until(10 * SECOND, || s.lock().unwrap().acked == 1).await.expect("paho subscriber subscribed");
    (child, seen)
}

/// The load every move is tested under: a clean-session rumqttc subscriber, persistent
/// paho-mqtt subscribers (3.1.1 and 5) and a rumqttc QoS 1 publisher at 200 msg/s, all through
/// meshgate.
struct Load {
    ids: Vec<String>,
    subs: [(&'static str, Shared); 3],
    pub_seen: Shared,
    sent: Arc<std::sync::atomic::AtomicU64>,
    publishing: tokio::task::JoinHandle<()>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    paho: [tokio::process::Child; 2],
}

impl Load {
    /// Connects the four clients (client ids start with `tag`), waits until all are on
    /// `broker`, and starts publishing.
    async fn start(pool: &Arc<meshgate::pool::Pool>, addr: std::net::SocketAddr, tag: &str, broker: &str) -> Load {
        let id = |who: &str| format!("{tag}-{who}");
        let (_sub, sub_seen, sub_task) = rumqttc_client(addr, &id("sub"), true, Some("switch/#"));
        let (paho4, paho4_seen) = paho_sub(addr, &id("paho4"), "4").await;
        let (paho5, paho5_seen) = paho_sub(addr, &id("paho5"), "5").await;
        let (publ, pub_seen, pub_task) = rumqttc_client(addr, &id("pub"), true, None);
        let load = Load {
            ids: vec![id("sub"), id("paho4"), id("paho5"), id("pub")],
            subs: [("rumqttc", sub_seen.clone()), ("paho 3.1.1", paho4_seen), ("paho 5", paho5_seen)],
            pub_seen,
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            publishing: tokio::spawn(async {}),
            tasks: [sub_task, pub_task],
            paho: [paho4, paho5],
        };
        assert!(load.all_on(pool, broker, 5 * SECOND).await, "every client on {broker}");
        let s = sub_seen.clone();
        wait_until(5 * SECOND, || s.lock().unwrap().connacks == 1).await.expect("subscriber connected");
        let n = load.sent.clone();
        let publishing = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                let seq = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if publ.publish("switch/x", QoS::AtLeastOnce, false, seq.to_string()).await.is_err() {
                    return;
                }
            }
        });
        Load { publishing, ..load }
    }

    /// Whether every client's session is on `broker` within `limit`.
    async fn all_on(&self, pool: &Arc<meshgate::pool::Pool>, broker: &str, limit: Duration) -> bool {
        let ids = self.ids.clone();
        let p = pool.clone();
        wait_until(limit, || ids.iter().all(|id| p.broker_of(id).as_deref() == Some(broker))).await.is_some()
    }

    /// Stops publishing and checks what every client saw: each subscriber got every
    /// acknowledged message (duplicates counted), and no client saw a second CONNACK or an
    /// error. Returns each subscriber's longest time without a new message after `from`.
    async fn finish(mut self, label: &str, from: Instant) -> Vec<(&'static str, Duration)> {
        self.publishing.abort();
        // rumqttc acknowledges in order, so the first `acked` sequence numbers are the
        // acknowledged ones.
        let acked = {
            let (ps, sent) = (self.pub_seen.clone(), self.sent.clone());
            wait_until(5 * SECOND, || ps.lock().unwrap().acked + 50 >= sent.load(std::sync::atomic::Ordering::Relaxed))
                .await;
            self.pub_seen.lock().unwrap().acked
        };
        assert!(acked >= 300, "the publisher kept going: {acked} acknowledged");
        let mut gaps = Vec::new();
        for (who, seen) in &self.subs {
            let s = seen.clone();
            wait_until(5 * SECOND, || (0..acked).all(|n| s.lock().unwrap().got.contains_key(&n))).await;
            let s = seen.lock().unwrap();
            let lost: Vec<u64> = (0..acked).filter(|n| !s.got.contains_key(n)).collect();
            let dups: u32 = s.got.values().map(|c| c - 1).sum();
            let gap = s.gap_after(from);
            eprintln!(
                "{label} {who}: {acked} acknowledged, {} lost, {dups} duplicates, {} CONNACK(s), longest gap {gap:?}",
                lost.len(),
                s.connacks
            );
            assert!(lost.is_empty(), "{who} lost {} acknowledged messages: {lost:?}", lost.len());
            assert_eq!((s.connacks, s.errors), (1, 0), "{who} never noticed the move");
            gaps.push((*who, gap));
        }
        let (connacks, errors) = {
            let ps = self.pub_seen.lock().unwrap();
            (ps.connacks, ps.errors)
        };
        assert_eq!((connacks, errors), (1, 0), "the publisher never noticed the move");
        for t in &self.tasks {
            t.abort();
        }
        for c in &mut self.paho {
            let _ = c.kill().await;
        }
        gaps
    }
}

/// Failback with load: a clean-session rumqttc subscriber, persistent paho-mqtt subscribers
/// (3.1.1 and 5) and a rumqttc QoS 1 publisher at 200 msg/s, all on broker2 while broker1 is
/// down; broker1 returns and every one of them is switched to it: no client sees a disconnect
/// or a second CONNACK, and every acknowledged message is delivered (duplicates counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_switches_clients_without_a_disconnect_or_a_lost_message() {
    let mut net = Net::start(2);
    let extra = "[health]\ninterval = \"100ms\"\n[replication]\nenabled = true\n[proxy]\nfailback_rate = 50\n";
    let mg = net.meshgate(extra).await;
    let pool = mg.pool().clone();
    blocking(|| net.broker("broker1").kill());
    wait_until(5 * SECOND, || pool.current_broker().is_some_and(|b| b.name == "broker2")).await.expect("failover");
    let load = Load::start(&pool, net.mqtt_addr(), "switch", "broker2").await;
    tokio::time::sleep(SECOND).await;
    let back_at = Instant::now();
    blocking(|| net.broker("broker1").restart());
    assert!(load.all_on(&pool, "broker1", 10 * SECOND).await, "every client switched to broker1");
    tokio::time::sleep(SECOND).await;
    load.finish("failback", back_at).await;
    let switched = mg.pool().metrics.switches.with_label_values(&["failback", "ok"]).get();
    assert_eq!(switched, 4, "four sessions switched");
    mg.shutdown().await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGSTOP: connections stay open and silent; the probes notice.
    Hang,
    /// SIGKILL: the connections close and the port refuses; the sessions notice.
    Kill,
}

/// The primary fails under load: a clean-session rumqttc subscriber, persistent paho-mqtt
/// subscribers (3.1.1 and 5) and a rumqttc QoS 1 publisher at 200 msg/s, all on broker1, are
/// switched to broker2: no client sees a disconnect, every message acknowledged before or
/// after the fault arrives (the publisher's unacknowledged ones are sent again by meshgate),
/// and no subscriber waits longer than meshgate takes to notice, plus 0.5 s.
async fn failed_primary_switches_its_clients(fault: Fault) {
    let mut net = Net::start(2);
    let extra = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\n[replication]\nenabled = true\n";
    let mg = net.meshgate(extra).await;
    let pool = mg.pool().clone();
    let tag = format!("{fault:?}").to_lowercase();
    let load = Load::start(&pool, net.mqtt_addr(), &tag, "broker1").await;
    tokio::time::sleep(SECOND).await;
    let fault_at = Instant::now();
    match fault {
        Fault::Hang => blocking(|| net.broker("broker1").hang()),
        Fault::Kill => blocking(|| net.broker("broker1").kill()),
    }
    // How long meshgate takes to notice: the probes' verdict for a hung broker; a killed one's
    // closed connections tell at once.
    let detection = match fault {
        Fault::Hang => {
            let b = pool.broker("broker1").unwrap();
            wait_until(5 * SECOND, || b.probe_up() == Some(false)).await.expect("probes notice the hang");
            fault_at.elapsed()
        }
        Fault::Kill => Duration::ZERO,
    };
    assert!(load.all_on(&pool, "broker2", 10 * SECOND).await, "every client switched to broker2");
    tokio::time::sleep(SECOND).await;
    for (who, gap) in load.finish(&format!("{fault:?} (detection {detection:?})"), fault_at).await {
        assert!(gap <= detection + SECOND / 2, "{who}: delivery gap {gap:?}, detection {detection:?}");
    }
    let switched = mg.pool().metrics.switches.with_label_values(&["broker_down", "ok"]).get();
    assert_eq!(switched, 4, "four sessions switched");
    // The dashboard's event log says switched, not closed.
    let events = mg.pool().events.since(0);
    assert!(
        events.iter().any(|e| e.kind == "switch" && e.message.contains("off broker1 (broker_down)")),
        "{:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    assert!(!events.iter().any(|e| e.kind == "session_closed"));
    if fault == Fault::Hang {
        blocking(|| net.broker("broker1").resume());
    }
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_switches_its_clients_without_a_disconnect_or_a_lost_message() {
    failed_primary_switches_its_clients(Fault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_switches_its_clients_without_a_disconnect_or_a_lost_message() {
    failed_primary_switches_its_clients(Fault::Kill).await;
}

/// An admin drain moves 1,000 idle sessions at the configured rate, every one switched, none
/// closed: each client still gets its PINGRESP, now from broker2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_switches_a_thousand_idle_sessions_and_closes_none() {
    const N: usize = 1000;
    let net = Net::start(2);
    let mg = net.meshgate("[proxy]\nfailback_rate = 1000\n").await;
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let (s, ack) = raw::connect(net.mqtt_addr(), 4, &format!("idle-{i}"), 5 * SECOND).await.unwrap();
        assert_eq!(ack.code, 0);
        clients.push(s);
    }
    let pool = mg.pool().clone();
    assert!(pool.sessions().iter().all(|s| s.broker.name == "broker1"));
    let started = Instant::now();
    pool.set_admin("broker1", meshgate::pool::AdminState::Draining).unwrap();
    let p = pool.clone();
    wait_until(20 * SECOND, || p.sessions().iter().filter(|s| s.broker.name == "broker2").count() == N)
        .await
        .expect("every session on broker2");
    let took = started.elapsed();
    let m = &mg.pool().metrics;
    assert_eq!(m.switches.with_label_values(&["drain", "ok"]).get(), N as u64);
    assert_eq!(m.sessions_closed.with_label_values(&["drain"]).get(), 0, "none closed");
    // At 1,000 per second: about a second, never all at once.
    assert!(took >= Duration::from_millis(900), "the drain rate holds: {took:?}");
    eprintln!("{N} idle sessions switched in {took:?}");
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(&raw::pingreq_packet()).await.unwrap();
        let (first, _) = raw::read_packet(s, 5 * SECOND).await.unwrap_or_else(|e| panic!("idle-{i}: {e}"));
        assert_eq!(first, 0xd0, "idle-{i}: PINGRESP through the new broker");
    }
    mg.shutdown().await;
}

/// The first whole packet in `buf`, taken out, with the length of its remaining-length field.
fn next_packet(buf: &mut Vec<u8>) -> Option<(Vec<u8>, usize)> {
    let (len, used) = raw::decode_remaining_length(buf.get(1..)?)?;
    let total = 1 + used + len;
    (buf.len() >= total).then(|| (buf.drain(..total).collect(), used))
}

/// A broker that answers whatever CONNECT it gets with a successful CONNACK (also one with
/// MQTT 5 enhanced authentication, which Mosquitto without an auth plugin refuses), acknowledges
/// QoS 2 PUBLISHes with PUBREC and waits for the PUBREL, and answers PINGREQ.
async fn fake_broker(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 1024];
                let Ok(n) = s.read(&mut chunk).await else { return };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some((p, used)) = next_packet(&mut buf) {
                    let reply: Vec<u8> = match p[0] >> 4 {
                        1 => vec![0x20, 0x03, 0x00, 0x00, 0x00], // MQTT 5 CONNACK, success, no properties
                        3 if p[0] & 0x06 == 0x04 => {
                            let tl = u16::from_be_bytes([p[1 + used], p[2 + used]]) as usize;
                            let id = &p[1 + used + 2 + tl..1 + used + 4 + tl];
                            vec![0x50, 0x02, id[0], id[1]] // PUBREC
                        }
                        12 => vec![0xd0, 0x00],
                        _ => vec![],
                    };
                    if !reply.is_empty() && s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// Reads until the connection closes; returns an MQTT 5 DISCONNECT reason code if one came.
async fn disconnect_reason(s: &mut tokio::net::TcpStream) -> Option<u8> {
    loop {
        match raw::read_packet(s, 5 * SECOND).await {
            Ok((0xe0, body)) => return Some(body.first().copied().unwrap_or(0)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// What cannot switch closes, with an MQTT 5 DISCONNECT saying "use another server" (0x9C): a
/// session with MQTT 5 enhanced authentication, and one whose QoS 2 flow stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_cannot_switch_close_with_use_another_server() {
    let slot = common::Slot::acquire();
    for i in 0..2u8 {
        let l = tokio::net::TcpListener::bind(slot.addr(10 + i, 1883)).await.unwrap();
        tokio::spawn(fake_broker(l));
    }
    let text =
        common::slot_config_text(&slot, 2, "[health]\nprobe = \"tcp\"\n[proxy]\nconnack_timeout = \"300ms\"\n", "");
    let mg = meshgate::Meshgate::start(meshgate::Config::from_toml(&text, "t").unwrap()).await.unwrap();
    let pool = mg.pool().clone();
    wait_until(5 * SECOND, || pool.brokers().iter().all(|b| b.probe_up() == Some(true))).await.unwrap();
    let front = slot.addr(1, 1883);

    // MQTT 5 CONNECT with an Authentication Method property (0x15 "SCRAM-SHA-1").
    let mut auth = tokio::net::TcpStream::connect(front).await.unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
    let method = b"SCRAM-SHA-1";
    body.push(3 + method.len() as u8);
    body.push(0x15);
    body.extend_from_slice(&(method.len() as u16).to_be_bytes());
    body.extend_from_slice(method);
    body.extend_from_slice(&[0, 4, b'a', b'u', b't', b'h']);
    auth.write_all(&raw::packet(0x10, &body)).await.unwrap();
    assert_eq!(raw::read_packet(&mut auth, 5 * SECOND).await.unwrap().0, 0x20);

    // MQTT 5 client in a QoS 2 flow: PUBLISH QoS 2 id 9, PUBREC back, no PUBREL.
    let (mut q2, ack) = raw::connect(front, 5, "qos2", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    let mut publish = vec![0, 1, b't', 0, 9, 0];
    publish.extend_from_slice(b"x");
    q2.write_all(&raw::packet(0x34, &publish)).await.unwrap();
    assert_eq!(raw::read_packet(&mut q2, 5 * SECOND).await.unwrap().0, 0x50);

    pool.set_admin("broker1", meshgate::pool::AdminState::Draining).unwrap();
    assert_eq!(disconnect_reason(&mut auth).await, Some(0x9c), "enhanced auth: DISCONNECT use another server");
    assert_eq!(disconnect_reason(&mut q2).await, Some(0x9c), "open QoS 2 flow: DISCONNECT use another server");
    let m = &pool.metrics;
    assert_eq!(m.switches.with_label_values(&["drain", "enhanced_auth"]).get(), 1);
    assert_eq!(m.switches.with_label_values(&["drain", "inflight"]).get(), 1);
    mg.shutdown().await;
}

/// A fake broker for what Mosquitto cannot do on demand: it records every packet it gets,
/// answers CONNECT, PINGREQ and QoS 2 PUBLISHes (PUBREC) always, and PUBREL (PUBCOMP) and QoS 1
/// PUBLISHes (PUBACK) only when `completes`; `die` closes its listener and every connection at
/// once, as a killed process's would be.
struct Recorder {
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Connections that ended (closed by meshgate or failed).
    closes: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Recorder {
    async fn start(addr: std::net::SocketAddr, completes: bool) -> Recorder {
        Recorder::start_with(addr, completes, Some(0), usize::MAX).await
    }

    /// `connack`: the CONNACK return code it answers every CONNECT with (`None`: it never
    /// answers one); `pings`: how many PINGREQs it answers on each connection before it falls
    /// silent there.
    async fn start_with(addr: std::net::SocketAddr, completes: bool, connack: Option<u8>, pings: usize) -> Recorder {
        Recorder::spawn(addr, completes, connack, pings, Duration::ZERO).await
    }

    /// Answers every CONNECT only `delay` after it came, as a broker busy taking over many
    /// sessions would, and everything else at once.
    async fn slow(addr: std::net::SocketAddr, delay: Duration) -> Recorder {
        Recorder::spawn(addr, true, Some(0), usize::MAX, delay).await
    }

    async fn spawn(
        addr: std::net::SocketAddr,
        completes: bool,
        connack: Option<u8>,
        pings: usize,
        delay: Duration,
    ) -> Recorder {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let closes: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (g, t, c) = (got.clone(), tasks.clone(), closes.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                let (g, c) = (g.clone(), c.clone());
                t.lock().unwrap().push(tokio::spawn(async move {
                    // Counted only for connections that sent something (not the TCP probes).
                    if Self::serve(s, g, completes, connack, pings, delay).await {
                        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }));
            }
        });
        tasks.lock().unwrap().push(accept);
        Recorder { got, closes, tasks }
    }

    async fn serve(
        mut s: tokio::net::TcpStream,
        got: Arc<Mutex<Vec<Vec<u8>>>>,
        completes: bool,
        connack: Option<u8>,
        mut pings: usize,
        delay: Duration,
    ) -> bool {
        let mut buf = Vec::new();
        let mut any = false;
        loop {
            let mut chunk = [0u8; 4096];
            let n = match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return any,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some((p, used)) = next_packet(&mut buf) {
                let body = &p[1 + used..];
                let id = |at: usize| [body[at], body[at + 1]];
                let reply: Vec<u8> = match p[0] >> 4 {
                    // MQTT 5 (protocol level 5) with an empty property list.
                    1 if body.get(6) == Some(&5) => connack.map_or(vec![], |code| vec![0x20, 0x03, 0x00, code, 0x00]),
                    1 => connack.map_or(vec![], |code| vec![0x20, 0x02, 0x00, code]),
                    3 => {
                        let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                        match (p[0] >> 1) & 3 {
                            2 => [vec![0x50, 0x02], id(2 + tl).to_vec()].concat(),
                            1 if completes => [vec![0x40, 0x02], id(2 + tl).to_vec()].concat(),
                            _ => vec![],
                        }
                    }
                    6 if completes => [vec![0x70, 0x02], id(0).to_vec()].concat(),
                    12 if pings > 0 => {
                        pings -= 1;
                        vec![0xd0, 0x00]
                    }
                    _ => vec![],
                };
                got.lock().unwrap().push(p.clone());
                any = true;
                if p[0] >> 4 == 1 {
                    tokio::time::sleep(delay).await;
                }
                if !reply.is_empty() && s.write_all(&reply).await.is_err() {
                    return any;
                }
            }
        }
    }

    /// The first byte of each packet it got from meshgate (probes are TCP only), in order.
    fn first_bytes(&self) -> Vec<u8> {
        self.got.lock().unwrap().iter().map(|p| p[0]).collect()
    }

    fn die(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// A broker dies with the client's QoS flows open on it: a QoS 2 PUBLISH it received (PUBREC)
/// and the client released (PUBREL) without its PUBCOMP, and a QoS 1 PUBLISH it never
/// acknowledged. The session switches to the next broker, where meshgate finishes the QoS 2
/// flow (PUBLISH again, PUBREL) and sends the QoS 1 one again: the client gets its PUBCOMP and
/// its PUBACK from there and never sees its connection close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_brokers_open_qos_flows_are_finished_on_the_next_broker() {
    let slot = common::Slot::acquire();
    let dying = Recorder::start(slot.addr(10, 1883), false).await;
    let next = Recorder::start(slot.addr(11, 1883), true).await;
    let text = common::slot_config_text(&slot, 2, "[health]\nprobe = \"tcp\"\n", "");
    let mg = meshgate::Meshgate::start(meshgate::Config::from_toml(&text, "t").unwrap()).await.unwrap();
    let pool = mg.pool().clone();
    wait_until(5 * SECOND, || pool.brokers().iter().all(|b| b.probe_up() == Some(true))).await.unwrap();
    let (mut c, ack) = raw::connect(slot.addr(1, 1883), 4, "flows", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    // QoS 2 id 7: PUBREC, then the client's PUBREL, never completed.
    c.write_all(&raw::packet(0x34, &[0, 1, b't', 0, 7, b'a'])).await.unwrap();
    assert_eq!(raw::read_packet(&mut c, 5 * SECOND).await.unwrap(), (0x50, vec![0, 7]));
    c.write_all(&[0x62, 2, 0, 7]).await.unwrap();
    // QoS 1 id 8, never acknowledged.
    c.write_all(&raw::packet(0x32, &[0, 1, b't', 0, 8, b'b'])).await.unwrap();
    let d = dying.got.clone();
    wait_until(5 * SECOND, || d.lock().unwrap().len() == 4).await.expect("the dying broker got all four packets");
    dying.die();

    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(raw::read_packet(&mut c, 5 * SECOND).await.expect("answers through the next broker"));
    }
    answers.sort();
    assert_eq!(answers, vec![(0x40, vec![0, 8]), (0x70, vec![0, 7])], "PUBACK 8 and PUBCOMP 7");
    // The next broker got the CONNECT (no PINGREQ ending a 3.1.1 restore: there were no
    // subscriptions to restore), the QoS 2 PUBLISH again (DUP) and its PUBREL, then the QoS 1
    // PUBLISH again (DUP).
    assert_eq!(next.first_bytes(), vec![0x10, 0x3c, 0x62, 0x3a]);
    c.write_all(&raw::pingreq_packet()).await.unwrap();
    assert_eq!(raw::read_packet(&mut c, 5 * SECOND).await.unwrap().0, 0xd0, "still connected, now to the next broker");
    assert_eq!(pool.metrics.switches.with_label_values(&["broker_down", "ok"]).get(), 1);
    next.die();
    mg.shutdown().await;
}

/// How long the next broker takes to answer a CONNECT in the tests of a slow move below: longer
/// than their clients wait for an answer from meshgate.
const SLOW_CONNACK: Duration = Duration::from_secs(3);

/// meshgate with the two recorders of a slow move: `dying` on broker1 (it never answers a
/// PINGREQ), `next` on broker2 answering CONNECTs after `SLOW_CONNACK`; and a 3.1.1 client
/// `id` on broker1.
async fn a_slow_move(id: &str) -> (common::Slot, Recorder, Recorder, meshgate::Meshgate, tokio::net::TcpStream) {
    a_slow_move_of(id, 4).await
}

/// `a_slow_move` with an MQTT `version` client.
async fn a_slow_move_of(
    id: &str,
    version: u8,
) -> (common::Slot, Recorder, Recorder, meshgate::Meshgate, tokio::net::TcpStream) {
    let (slot, dying, next, mg, mut clients) = slow_moves(&[id.to_string()], version, "").await;
    (slot, dying, next, mg, clients.pop().expect("one client"))
}

/// `a_slow_move` with one MQTT `version` client for each of `ids`, and `broker_extra` in both
/// brokers' configuration.
async fn slow_moves(
    ids: &[String],
    version: u8,
    broker_extra: &str,
) -> (common::Slot, Recorder, Recorder, meshgate::Meshgate, Vec<tokio::net::TcpStream>) {
    let slot = common::Slot::acquire();
    let dying = Recorder::start_with(slot.addr(10, 1883), true, Some(0), 0).await;
    let next = Recorder::slow(slot.addr(11, 1883), SLOW_CONNACK).await;
    let extra = "[health]\nprobe = \"tcp\"\n[proxy]\nconnack_timeout = \"5s\"\n";
    let text = common::slot_config_text(&slot, 2, extra, broker_extra);
    let mg = meshgate::Meshgate::start(meshgate::Config::from_toml(&text, "t").unwrap()).await.unwrap();
    let pool = mg.pool().clone();
    wait_until(5 * SECOND, || pool.brokers().iter().all(|b| b.probe_up() == Some(true))).await.unwrap();
    let mut clients = Vec::new();
    for id in ids {
        let (c, ack) = raw::connect(slot.addr(1, 1883), version, id, 5 * SECOND).await.unwrap();
        assert_eq!(ack.code, 0);
        assert_eq!(pool.broker_of(id).as_deref(), Some("broker1"));
        clients.push(c);
    }
    (slot, dying, next, mg, clients)
}

/// A session leaving a failed broker keeps its client's keep-alive going while the next broker
/// takes its time: the PINGREQ the dead broker never answered, and one sent while the session
/// moves, are answered by meshgate at once, not after the move (a client that waits too long
/// reconnects, and its new session races the moving one at the next broker). After the move
/// the client's QoS 1 PUBLISH is acknowledged by the next broker, which never saw the client's
/// PINGREQs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_its_keep_alive_while_its_session_leaves_a_failed_broker() {
    let (_slot, dying, next, mg, mut c) = a_slow_move("pinger").await;
    let pool = mg.pool().clone();
    c.write_all(&raw::pingreq_packet()).await.unwrap();
    let d = dying.got.clone();
    wait_until(5 * SECOND, || d.lock().unwrap().len() == 2).await.expect("the dying broker got CONNECT and PINGREQ");
    dying.die();
    let limit = SLOW_CONNACK - SECOND;
    let first = raw::read_packet(&mut c, limit).await.expect("the dead broker's PINGREQ answered during the move");
    assert_eq!(first.0, 0xd0);
    // The move is still waiting for the next broker's CONNACK.
    let n = next.got.clone();
    wait_until(5 * SECOND, || n.lock().unwrap().len() == 1).await.expect("the next broker got the CONNECT");
    c.write_all(&raw::pingreq_packet()).await.unwrap();
    let second = raw::read_packet(&mut c, limit / 2).await.expect("a PINGREQ during the move answered at once");
    assert_eq!(second.0, 0xd0);
    assert_eq!(next.first_bytes(), vec![0x10], "the move had not got its CONNACK yet");
    let p = pool.clone();
    wait_until(3 * SLOW_CONNACK, || p.broker_of("pinger").as_deref() == Some("broker2")).await.expect("moved");
    c.write_all(&raw::packet(0x32, &[0, 1, b't', 0, 5, b'x'])).await.unwrap();
    assert_eq!(raw::read_packet(&mut c, 5 * SECOND).await.unwrap(), (0x40, vec![0, 5]), "PUBACK from the next broker");
    assert_eq!(next.first_bytes(), vec![0x10, 0x32], "the CONNECT, then the PUBLISH");
    assert_eq!(pool.metrics.switches.with_label_values(&["broker_down", "ok"]).get(), 1);
    next.die();
    mg.shutdown().await;
}

/// How a client leaves while its session moves.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Leaves {
    /// DISCONNECT (MQTT 5: reason 0, normal).
    Disconnect,
    /// The connection closes without a DISCONNECT.
    Vanishes,
    /// MQTT 5 DISCONNECT with reason 0x04, "disconnect with will message".
    AsksForItsWill,
}

/// A client that leaves while its session moves off a failed broker ends its session at once,
/// well before the move could have finished; the next broker, still to answer the CONNECT,
/// is then left as the client left: after a DISCONNECT with one (it drops the client's will);
/// after a vanished connection (3.1.1) by closing without one, or (MQTT 5) with a DISCONNECT
/// 0x04, so it publishes the will, which the failed broker cannot.
async fn a_client_that_leaves_while_its_session_moves(id: &str, version: u8, how: Leaves) {
    let (_slot, dying, next, mg, mut c) = a_slow_move_of(id, version).await;
    let pool = mg.pool().clone();
    dying.die();
    let n = next.got.clone();
    wait_until(5 * SECOND, || n.lock().unwrap().len() == 1).await.expect("the next broker got the CONNECT");
    match (how, version) {
        (Leaves::Disconnect, 5) => c.write_all(&[0xe0, 0x01, 0x00]).await.unwrap(),
        (Leaves::Disconnect, _) => c.write_all(&[0xe0, 0x00]).await.unwrap(),
        (Leaves::AsksForItsWill, _) => c.write_all(&[0xe0, 0x01, 0x04]).await.unwrap(),
        (Leaves::Vanishes, _) => {}
    }
    drop(c);
    let p = pool.clone();
    wait_until(SLOW_CONNACK / 2, || p.metrics.switches.with_label_values(&["broker_down", "ended"]).get() == 1)
        .await
        .expect("the move ends with its client");
    let p = pool.clone();
    wait_until(SLOW_CONNACK / 2, || p.session_count() == 0).await.expect("the session is gone");
    let closes = next.closes.clone();
    wait_until(2 * SLOW_CONNACK, || closes.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await
        .expect("the next broker's connection ends");
    let got = next.got.lock().unwrap().clone();
    let expected: Vec<Vec<u8>> = match (how, version) {
        (Leaves::Disconnect, _) => vec![vec![0xe0, 0x00]],
        (Leaves::Vanishes, 4) => vec![],
        (Leaves::Vanishes | Leaves::AsksForItsWill, _) => vec![vec![0xe0, 0x01, 0x04]],
    };
    assert_eq!(got.len(), 1 + expected.len(), "{how:?}: {got:?}");
    assert_eq!(got[0][0], 0x10, "the CONNECT first");
    assert_eq!(got[1..].to_vec(), expected, "{how:?}: how the next broker was left");
    assert_eq!(pool.metrics.switches.with_label_values(&["broker_down", "ok"]).get(), 0);
    next.die();
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_its_session_moves_ends_the_move_without_its_will() {
    a_client_that_leaves_while_its_session_moves("leaver", 4, Leaves::Disconnect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_while_its_session_moves_leaves_its_will_to_the_next_broker() {
    a_client_that_leaves_while_its_session_moves("vanisher", 4, Leaves::Vanishes).await;
    a_client_that_leaves_while_its_session_moves("vanisher-5", 5, Leaves::Vanishes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_client_that_asks_for_its_will_while_its_session_moves_leaves_it_to_the_next_broker() {
    a_client_that_leaves_while_its_session_moves("asker", 5, Leaves::AsksForItsWill).await;
}

/// A client that vanishes while its session's move still waits for one of meshgate's 64
/// handshake slots to the next broker (before its CONNECT is out) still has its will published
/// by that broker: the move goes on until the CONNECT is out and the broker has answered, then
/// closes as the client left. 65 clients leave a failed broker for one that takes 3 s to answer
/// each CONNECT, so one move waits for a slot; then every client vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_while_its_move_waits_for_a_slot_still_leaves_its_will() {
    const CLIENTS: usize = 65;
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("queued-{i}")).collect();
    let (_slot, dying, next, mg, clients) = slow_moves(&ids, 4, "").await;
    let pool = mg.pool().clone();
    dying.die();
    let n = next.got.clone();
    wait_until(SLOW_CONNACK / 2, || n.lock().unwrap().len() == CLIENTS - 1).await.expect("64 CONNECTs, one per slot");
    // Every slot is held until the first CONNACKs, 3 s after their CONNECTs: the last move
    // waits for one while its client goes.
    drop(clients);
    let p = pool.clone();
    wait_until(SLOW_CONNACK / 2, || {
        p.metrics.switches.with_label_values(&["broker_down", "ended"]).get() == CLIENTS as u64
    })
    .await
    .expect("every move ends with its client");
    let closes = next.closes.clone();
    wait_until(4 * SLOW_CONNACK, || closes.load(std::sync::atomic::Ordering::SeqCst) == CLIENTS)
        .await
        .expect("every connection to the next broker is left");
    let got = next.got.lock().unwrap().clone();
    assert_eq!(got.len(), CLIENTS, "one CONNECT per client, the queued one's too, and nothing else: {got:?}");
    assert!(got.iter().all(|p| p[0] == 0x10), "no DISCONNECT: the next broker publishes every will");
    next.die();
    mg.shutdown().await;
}

/// A move to a broker on passive probation is that broker's one trial until its result is
/// recorded, even after the move was abandoned: a client that vanishes while the next broker
/// has yet to answer its session's CONNECT leaves the trial held (no other session is sent
/// there meanwhile), and it is handed back only once the answer came and the connection was
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_move_keeps_its_probation_trial_until_its_answer() {
    let ids = ["trialist".to_string()];
    let (_slot, dying, next, mg, mut clients) = slow_moves(&ids, 4, "max_fails = 1\nfail_timeout = \"1s\"\n").await;
    let pool = mg.pool().clone();
    let b2 = pool.broker("broker2").unwrap();
    pool.record_failure(&b2, "connect_error");
    assert!(!b2.available(tokio::time::Instant::now()), "barred");
    let b = b2.clone();
    wait_until(3 * SECOND, || b.available(tokio::time::Instant::now())).await.expect("on probation after 1 s");
    dying.die();
    let n = next.got.clone();
    wait_until(5 * SECOND, || n.lock().unwrap().len() == 1).await.expect("the next broker got the CONNECT");
    assert!(!b2.available(tokio::time::Instant::now()), "the move holds the trial");
    drop(clients.pop());
    let p = pool.clone();
    wait_until(SLOW_CONNACK / 2, || p.metrics.switches.with_label_values(&["broker_down", "ended"]).get() == 1)
        .await
        .expect("the move ends with its client");
    assert!(
        !b2.available(tokio::time::Instant::now()),
        "the abandoned move still waits for its answer: the trial is its own"
    );
    let closes = next.closes.clone();
    wait_until(2 * SLOW_CONNACK, || closes.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await
        .expect("the next broker's connection is left once it answered");
    let b = b2.clone();
    wait_until(SECOND, || b.available(tokio::time::Instant::now()))
        .await
        .expect("the trial handed back after the answer");
    next.die();
    mg.shutdown().await;
}

/// meshgate's shutdown waits for what a move left behind: a client that vanished while its
/// session moved leaves its will to the next broker, which has yet to answer the CONNECT when
/// meshgate is told to stop. Shutdown returns only once that connection was left as the client
/// left (closed without a DISCONNECT, so the broker publishes the will), never with it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_what_a_move_left_behind() {
    let (_slot, dying, next, mg, c) = a_slow_move("late-vanisher").await;
    let pool = mg.pool().clone();
    dying.die();
    let n = next.got.clone();
    wait_until(5 * SECOND, || n.lock().unwrap().len() == 1).await.expect("the next broker got the CONNECT");
    drop(c);
    let p = pool.clone();
    wait_until(SLOW_CONNACK / 2, || p.session_count() == 0).await.expect("the session is gone");
    let closes = next.closes.clone();
    assert_eq!(closes.load(std::sync::atomic::Ordering::SeqCst), 0, "the next broker has yet to answer");
    let started = std::time::Instant::now();
    mg.shutdown().await;
    let took = started.elapsed();
    // The recorder notices the close on its own task: a moment, far less than the CONNACK's wait.
    wait_until(SECOND / 2, || closes.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await
        .unwrap_or_else(|| panic!("shutdown returned after {took:?} with the next broker's connection open"));
    assert_eq!(next.got.lock().unwrap().len(), 1, "left without a DISCONNECT: the next broker publishes the will");
    next.die();
}

/// A failback that cannot be made leaves the session where it was, working, accounted once,
/// never closed and never cut over: failback happens when nothing is wrong, and must not cost
/// the client its connection or its messages. The returning broker answers TCP probes, the
/// CONNECT with `connack` (`None`: never) and `pings` PINGREQs per connection; the failback
/// must end with `result`.
async fn a_failback_that_fails(id: &str, connack: Option<u8>, pings: usize, result: &str) {
    let slot = common::Slot::acquire();
    let backup = Recorder::start(slot.addr(11, 1883), true).await;
    let extra =
        "[health]\nprobe = \"tcp\"\ninterval = \"100ms\"\n[proxy]\nfailback_rate = 100\nconnack_timeout = \"300ms\"\n";
    let text = common::slot_config_text(&slot, 2, extra, "");
    let mg = meshgate::Meshgate::start(meshgate::Config::from_toml(&text, "t").unwrap()).await.unwrap();
    let pool = mg.pool().clone();
    let p = pool.clone();
    wait_until(5 * SECOND, || p.broker("broker1").unwrap().probe_up() == Some(false)).await.unwrap();
    let (mut c, ack) = raw::connect(slot.addr(1, 1883), 4, id, 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    assert_eq!(pool.broker_of(id).as_deref(), Some("broker2"));
    let primary = Recorder::start_with(slot.addr(10, 1883), true, connack, pings).await;
    let m = pool.clone();
    wait_until(5 * SECOND, || m.metrics.switches.with_label_values(&["failback", result]).get() >= 1)
        .await
        .unwrap_or_else(|| panic!("failback tried and ended {result}"));
    assert_eq!(pool.metrics.switches.with_label_values(&["failback", "ok"]).get(), 0, "never cut over");
    assert_eq!(pool.metrics.sessions_closed.with_label_values(&["failback"]).get(), 0, "never closed");
    assert_eq!(pool.broker_of(id).as_deref(), Some("broker2"));
    // One session, counted once, on broker2.
    assert_eq!(pool.session_count(), 1);
    let b2 = pool.broker("broker2").unwrap();
    assert_eq!(b2.active_sessions(), 1);
    assert_eq!(pool.metrics.sessions_active.with_label_values(&["broker2"]).get(), 1);
    c.write_all(&raw::pingreq_packet()).await.unwrap();
    assert_eq!(raw::read_packet(&mut c, 5 * SECOND).await.unwrap().0, 0xd0, "still served by broker2");
    primary.die();
    backup.die();
    mg.shutdown().await;
}

/// The returning broker takes TCP connections, so its probes pass, but never answers a CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_that_cannot_switch_leaves_the_session_where_it_is() {
    a_failback_that_fails("stayer", None, usize::MAX, "connect_failed").await;
}

/// The returning broker takes the session (its CONNACK) and then falls silent before the cut,
/// as one that hangs meanwhile would while its probes have not noticed yet. Cut over to it, the client would get nothing until the hang is
/// noticed and the session moved again (in the chaos run: 13 messages lost when broker1 hung
/// during a failback's overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_to_a_broker_that_falls_silent_before_the_cut_leaves_the_session_where_it_is() {
    a_failback_that_fails("not-onto-silence", Some(0), 0, "target_silent").await;
}

/// A healthy broker that closes one session on purpose (its client id connected to it
/// directly, a takeover) is not taken for a failed one: that session closes as the broker
/// meant, and nothing else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_closes_a_session_on_purpose_is_not_left() {
    let net = Net::start(2);
    let mg = net.meshgate("").await;
    let pool = mg.pool().clone();
    let (mut taken, _) = raw::connect(net.mqtt_addr(), 4, "taken-over", 5 * SECOND).await.unwrap();
    let (mut other, _) = raw::connect(net.mqtt_addr(), 4, "bystander", 5 * SECOND).await.unwrap();
    assert_eq!(pool.broker_of("bystander").as_deref(), Some("broker1"));
    // The same client id straight at broker1: Mosquitto closes meshgate's connection for it.
    let (_direct, ack) = raw::connect(net.brokers[0].addr, 4, "taken-over", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);
    assert!(raw::closed_within(&mut taken, 3 * SECOND).await, "the taken-over session closed");
    // Give a wrong verdict time to move the bystander; then it must still be on broker1.
    let p = pool.clone();
    let moved = wait_until(SECOND, || p.broker_of("bystander").as_deref() != Some("broker1")).await;
    assert!(moved.is_none(), "the bystander was moved: {:?}", pool.broker_of("bystander"));
    assert_eq!(pool.metrics.switches.with_label_values(&["broker_down", "ok"]).get(), 0);
    other.write_all(&raw::pingreq_packet()).await.unwrap();
    assert_eq!(raw::read_packet(&mut other, 5 * SECOND).await.unwrap().0, 0xd0);
    assert!(pool.broker("broker1").unwrap().available(tokio::time::Instant::now()), "broker1 not barred");
    mg.shutdown().await;
}

/// MQTT 5 clients are told not to use topic aliases toward the broker (an alias belongs to one
/// broker connection and could not move with the session): Mosquitto offers 10, meshgate's
/// CONNACK offers none, and says nothing else differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_clients_are_not_offered_topic_aliases() {
    use tokio::io::AsyncWriteExt;
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let connack = |addr: std::net::SocketAddr, id: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw::connect_packet(5, id, true, 30, None, None)).await.unwrap();
        let (first, body) = raw::read_packet(&mut s, 5 * SECOND).await.unwrap();
        assert_eq!(first, 0x20);
        body
    };
    let direct = connack(net.brokers[0].addr, "alias-direct").await;
    let through = connack(net.mqtt_addr(), "alias-through").await;
    let alias_max = [0x22u8, 0x00, 0x0a];
    assert!(direct.windows(3).any(|w| w == alias_max), "Mosquitto offers topic aliases: {direct:02x?}");
    assert!(!through.windows(3).any(|w| w == alias_max), "{through:02x?}");
    assert_eq!(through.len(), direct.len() - 3, "only the Topic Alias Maximum property is gone");
    mg.shutdown().await;
}
