//! MQTT over WebSockets: MQTT.js (node) and paho-mqtt (transport="websockets") through meshgate's ws and wss listeners to real Mosquitto, a hung primary, and the upgrades meshgate refuses.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::wait_until;
use common::paho;
use common::{blocking, Net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);
const JS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/mqttjs_client.js");
const PAHO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/paho_ws.py");

/// What a client script printed, line by line.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<serde_json::Value>>>);

impl Lines {
    fn sink(&self) -> impl FnMut(serde_json::Value) + Send + 'static {
        let l = self.0.clone();
        move |v| l.lock().unwrap().push(v)
    }
    fn count(&self, key: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|v| v.get(key).is_some()).count()
    }
    fn connacks(&self) -> Vec<serde_json::Value> {
        self.0.lock().unwrap().iter().filter(|v| v.get("connack").is_some()).cloned().collect()
    }
    fn messages(&self) -> HashSet<String> {
        self.0.lock().unwrap().iter().filter_map(|v| v["msg"].as_str().map(str::to_string)).collect()
    }
    /// Acknowledged sequence numbers, each with when the test saw the acknowledgement.
    fn acked(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().filter_map(|v| v["acked"].as_u64()).collect()
    }
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/mqtt")
}

/// Publishers and subscribers of both libraries over ws://; broker1 hangs under load. Every
/// WebSocket client is served by broker2 within the bound the TCP tests hold a hung primary
/// to (marked down within 1.5 s, sessions moved within 2 s more), nothing acknowledged after
/// the failure was detected is lost, and the persistent subscribers never subscribe again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_and_paho_over_websockets_fail_over_like_tcp_clients() {
    let mut net = Net::start(2);
    let ws = net.slot.addr(1, 8083);
    let mg = net.meshgate(&format!("ws = \"{ws}\"")).await;
    let pool = mg.pool().clone();
    let (js_sub, paho_sub, js_pub, paho_pub) = (Lines::default(), Lines::default(), Lines::default(), Lines::default());
    let url = ws_url(ws);
    let (host, port) = (ws.ip().to_string(), ws.port().to_string());
    let _children = [
        paho::spawn_node(JS, &[&url, "js-sub", "ws/#", "sub", "false"], &[], js_sub.sink()),
        paho::spawn(PAHO, &[&host, &port, "paho-ws-sub", "ws/#", "sub", "false"], paho_sub.sink()),
    ];
    wait_until(10 * SECOND, || js_sub.count("suback") == 1 && paho_sub.count("suback") == 1)
        .await
        .expect("both subscribers subscribed over WebSockets");
    let _publishers = [
        paho::spawn_node(JS, &[&url, "js-pub", "ws/js", "pub", "true", "10"], &[], js_pub.sink()),
        paho::spawn(PAHO, &[&host, &port, "paho-ws-pub", "ws/paho", "pub", "true", "10"], paho_pub.sink()),
    ];
    // Both directions work before anything fails: each subscriber has both publishers' messages.
    wait_until(10 * SECOND, || {
        [&js_sub, &paho_sub].iter().all(|s| {
            let got = s.messages();
            js_pub.acked().first().is_some_and(|n| got.contains(&n.to_string()))
                && paho_pub.acked().first().is_some_and(|n| got.contains(&n.to_string()))
        })
    })
    .await
    .expect("messages flow between MQTT.js and paho over WebSockets");
    for id in ["js-sub", "paho-ws-sub", "js-pub", "paho-ws-pub"] {
        assert_eq!(pool.broker_of(id).as_deref(), Some("broker1"), "{id} starts on broker1");
    }

    let hung_at = Instant::now();
    blocking(|| net.broker("broker1").hang());
    let b1 = pool.broker("broker1").unwrap();
    wait_until(3 * SECOND, || b1.probe_up() == Some(false)).await.expect("broker1 marked down");
    let detected = Instant::now();
    let acked_before = (js_pub.acked().len(), paho_pub.acked().len());
    let p = pool.clone();
    let moved = wait_until(5 * SECOND, || {
        ["js-sub", "paho-ws-sub", "js-pub", "paho-ws-pub"]
            .iter()
            .all(|id| p.broker_of(id).as_deref() == Some("broker2"))
    })
    .await;
    let served_after = hung_at.elapsed();
    // Publishing goes on from broker2 for a while.
    let went_on = wait_until(10 * SECOND, || {
        js_pub.acked().len() > acked_before.0 + 50 && paho_pub.acked().len() > acked_before.1 + 50
    })
    .await;
    if went_on.is_none() {
        // What each side saw, for whoever reads the failure.
        let m = &pool.metrics;
        let switches: Vec<_> = meshgate::proxy::switch::SwitchError::RESULTS
            .iter()
            .chain(&["ok"])
            .map(|r| (*r, m.switches.with_label_values(&["broker_down", r]).get()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let tail = |l: &Lines| {
            let v = l.0.lock().unwrap();
            v.iter().rev().take(6).map(|x| x.to_string()).collect::<Vec<_>>()
        };
        panic!(
            "both publishers are acknowledged through broker2: not within 10 s; acked before/now MQTT.js {} {}, \
             paho {} {}; sessions {:?}; switches {switches:?}; MQTT.js publisher's last lines {:?}; paho's {:?}",
            acked_before.0,
            js_pub.acked().len(),
            acked_before.1,
            paho_pub.acked().len(),
            pool.sessions()
                .iter()
                .map(|s| {
                    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                    format!(
                        "{} on {}: in {} B / {} packets, out {} B / {} packets",
                        s.info.client_id,
                        s.broker.name,
                        n(&s.bytes_in),
                        n(&s.packets_in),
                        n(&s.bytes_out),
                        n(&s.packets_out)
                    )
                })
                .collect::<Vec<_>>(),
            tail(&js_pub),
            tail(&paho_pub)
        );
    }
    let detection = detected - hung_at;
    let (js_after, paho_after) =
        (js_pub.acked()[acked_before.0..].to_vec(), paho_pub.acked()[acked_before.1..].to_vec());
    let everything_arrived = wait_until(10 * SECOND, || {
        [&js_sub, &paho_sub].iter().all(|s| {
            let got = s.messages();
            js_after.iter().chain(&paho_after).all(|n| got.contains(&n.to_string()))
        })
    })
    .await;
    let (js_c, paho_c) = (js_sub.connacks(), paho_sub.connacks());
    println!(
        "ws clients: broker1 marked down {:.2} s after the hang; all four on broker2 {:.2} s after it; \
         {} + {} messages acknowledged after detection; subscriber CONNACKs: MQTT.js {js_c:?}, paho {paho_c:?}",
        detection.as_secs_f64(),
        served_after.as_secs_f64(),
        js_after.len(),
        paho_after.len()
    );
    assert!(detection <= Duration::from_millis(1500), "marked down {detection:?} after the hang");
    assert!(moved.is_some(), "every WebSocket client was moved to broker2");
    assert!(served_after <= detection + 2 * SECOND, "served by broker2 {served_after:?} after the hang");
    for (name, s) in [("MQTT.js", &js_sub), ("paho", &paho_sub)] {
        assert_eq!(s.count("suback"), 1, "{name} subscribed once and never again");
        assert!(s.connacks()[1..].iter().all(|c| c["session_present"] == true), "{name}: {:?}", s.connacks());
    }
    assert!(everything_arrived.is_some(), "a message acknowledged after the failure was detected never arrived");
    blocking(|| net.broker("broker1").resume());
    mg.shutdown().await;
}

/// Sends `request` to the listener and returns the HTTP status line meshgate answers with.
async fn status_of(addr: SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(5 * SECOND, s.read(&mut buf)).await.expect("an answer").unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

fn upgrade(path: &str, protocol: Option<&str>) -> String {
    upgrade_with(path, protocol, "")
}

fn upgrade_with(path: &str, protocol: Option<&str>, extra_headers: &str) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: meshgate\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    r + extra_headers + "\r\n"
}

/// A malformed upgrade, a wrong path and a subprotocol that is not MQTT each get an HTTP
/// refusal, are counted under their own reason, and never reach a broker; a good upgrade (MQTT
/// packets then split across WebSocket messages and packed into one) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_are_refused_clearly_and_open_no_broker_connection() {
    let net = Net::start(1);
    let ws = net.slot.addr(1, 8083);
    let trusted = net.slot.ip(60);
    let mg = net.meshgate(&format!("ws = \"{ws}\"\nws_path = \"/mqtt\"\ntrusted_proxies = [\"{trusted}\"]")).await;
    let pool = mg.pool().clone();
    let cases = [
        ("GET /mqtt HTTP/1.1\r\nHost: meshgate\r\n\r\n".to_string(), "400", "ws_handshake"),
        (upgrade("/other", Some("mqtt")), "404", "ws_path"),
        (upgrade("/mqtt", Some("chat, superchat")), "400", "ws_subprotocol"),
    ];
    for (request, status, reason) in &cases {
        let line = status_of(ws, request).await;
        assert!(line.contains(status), "{reason}: answered {line:?}");
        let r = pool.metrics.rejected.with_label_values(&[reason]);
        wait_until(2 * SECOND, || r.get() == 1).await.unwrap_or_else(|| panic!("{reason} counted once"));
    }
    let sessions = pool.metrics.sessions_total.with_label_values(&["broker1"]).get();
    let failures: u64 = meshgate::upstream::AttemptError::REASONS
        .iter()
        .map(|r| pool.metrics.upstream_failures.with_label_values(&["broker1", r]).get())
        .sum();
    assert_eq!((sessions, failures), (0, 0), "no refused upgrade reached a broker");

    // A good upgrade with the mqtt subprotocol; the CONNECT arrives in two WebSocket messages
    // and a PINGREQ packed behind a SUBSCRIBE in one.
    let (mut stream, answer) = raw_ws(ws, Some("mqtt")).await;
    assert!(answer.contains("101") && answer.to_lowercase().contains("sec-websocket-protocol: mqtt"), "{answer}");
    let connect = common::mqtt::connect_packet(4, "split", true, 30, None, None);
    let (a, b) = connect.split_at(5);
    ws_send(&mut stream, a).await;
    ws_send(&mut stream, b).await;
    let connack = ws_recv(&mut stream).await;
    assert_eq!(connack, vec![0x20, 2, 0, 0], "CONNACK over the WebSocket");
    let mut packed = common::mqtt::subscribe_packet(1, "t/#", 0);
    packed.extend(common::mqtt::pingreq_packet());
    ws_send(&mut stream, &packed).await;
    let mut got = Vec::new();
    while got.len() < 5 + 2 {
        got.extend(ws_recv(&mut stream).await);
    }
    assert_eq!(got[0], 0x90, "SUBACK first: {got:?}");
    assert_eq!(&got[got.len() - 2..], &[0xd0, 0], "then PINGRESP: {got:?}");
    assert_eq!(pool.broker_of("split").as_deref(), Some("broker1"));

    // X-Forwarded-For names the client only when a trusted proxy sends it.
    // Header values only: nothing connects to these addresses.
    let (forged, client) = (net.slot.ip(203), net.slot.ip(209));
    let xff = format!("X-Forwarded-For: {forged}, {client}\r\n");
    let mut open = Vec::new();
    for (from, id, expected) in
        [(trusted, "behind-proxy", client.to_string()), (net.slot.ip(61), "forged-xff", net.slot.ip(61).to_string())]
    {
        let (mut s, answer) = raw_ws_from(Some(from), ws, Some("mqtt"), &xff).await;
        assert!(answer.contains("101"), "{answer}");
        ws_send(&mut s, &common::mqtt::connect_packet(4, id, true, 30, None, None)).await;
        assert_eq!(ws_recv(&mut s).await, vec![0x20, 2, 0, 0]);
        let peer = pool.sessions_of(id).first().map(|x| x.info.peer.ip().to_string());
        assert_eq!(peer.as_deref(), Some(expected.as_str()), "{id}: the client's address");
        open.push(s);
    }
    let accepted = pool.metrics.accepted.with_label_values(&["ws"]).get();
    assert_eq!(accepted, 6, "every connection to the ws listener counted under listener=\"ws\"");
    let open_now = pool.metrics.listener_connections.with_label_values(&["ws"]).get();
    assert_eq!(open_now, 3, "three WebSocket sessions open (the refused upgrades never counted)");
    assert_eq!(pool.metrics.listener_connections.with_label_values(&["mqtt"]).get(), 0);
    drop(open);
    drop(stream);
    let ws_open = pool.metrics.listener_connections.with_label_values(&["ws"]);
    wait_until(5 * SECOND, || ws_open.get() == 0).await.expect("closed sessions leave the gauge");
    mg.shutdown().await;
}

/// A client-side WebSocket handshake on a raw socket; returns the socket and the HTTP answer.
async fn raw_ws(addr: SocketAddr, protocol: Option<&str>) -> (tokio::net::TcpStream, String) {
    raw_ws_from(None, addr, protocol, "").await
}

/// The same from the loopback address `from`, with extra request headers.
async fn raw_ws_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    protocol: Option<&str>,
    headers: &str,
) -> (tokio::net::TcpStream, String) {
    let mut s = match from {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(ip, 0)).unwrap();
            sock.connect(addr).await.unwrap()
        }
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
    };
    s.write_all(upgrade_with("/mqtt", protocol, headers).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(5 * SECOND, s.read_exact(&mut b)).await.expect("answer").unwrap();
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).to_string())
}

/// One masked binary WebSocket message (RFC 6455 §5.2), as a client must send it.
async fn ws_send(s: &mut tokio::net::TcpStream, payload: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82];
    assert!(payload.len() < 126);
    frame.push(0x80 | payload.len() as u8);
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
}

/// One unmasked binary message from the server; its payload.
async fn ws_recv(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    tokio::time::timeout(5 * SECOND, s.read_exact(&mut head)).await.expect("a WebSocket message").unwrap();
    assert_eq!(head[0], 0x82, "a final binary frame");
    let len = (head[1] & 0x7f) as usize;
    assert!(len < 126);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    payload
}

/// wss:// with a test CA: MQTT.js verifies meshgate's certificate and publishes to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_over_wss_with_a_test_ca() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new(dir.path(), "ca");
    let wss = net.slot.addr(1, 8084);
    let (cert, key) = ca.issue(dir.path(), "server", Some(wss.ip()), false);
    let mg = net
        .meshgate(&format!("wss = \"{wss}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"", cert.display(), key.display()))
        .await;
    let cafile = dir.path().join("ca.pem");
    let env = [("MQTT_CA", cafile.to_str().unwrap())];
    let url = format!("wss://{wss}/mqtt");
    let (sub, publ) = (Lines::default(), Lines::default());
    let _s = paho::spawn_node(JS, &[&url, "wss-sub", "secure/#", "sub"], &env, sub.sink());
    wait_until(10 * SECOND, || sub.count("suback") == 1).await.expect("subscribed over wss");
    let _p = paho::spawn_node(JS, &[&url, "wss-pub", "secure/1", "pub", "true", "20"], &env, publ.sink());
    let arrived = wait_until(10 * SECOND, || {
        let got = sub.messages();
        let acked = publ.acked();
        acked.len() >= 10 && acked.iter().all(|n| got.contains(&n.to_string()))
    })
    .await;
    println!("wss: {} messages acknowledged, {} received", publ.acked().len(), sub.messages().len());
    assert!(arrived.is_some(), "MQTT.js over wss: {:?} / {:?}", sub.connacks(), publ.connacks());
    assert_eq!(mg.pool().broker_of("wss-pub").as_deref(), Some("broker1"));
    mg.shutdown().await;
}
