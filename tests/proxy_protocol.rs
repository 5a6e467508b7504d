//! PROXY protocol: real HAProxy with `send-proxy-v2` in front of meshgate (the client's own address in `/clients` and under the per-source limit, headers from untrusted peers refused), and a broker-side listener that requires PROXY v2 receiving the client's address from meshgate.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Mosquitto, Slot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SECOND: Duration = Duration::from_secs(1);

/// HAProxy in TCP mode at `listen`, sending a PROXY v2 header to meshgate at `to` from the
/// same address (what meshgate trusts).
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(listen: SocketAddr, to: SocketAddr) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    maxconn 100\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\n\
                 frontend mqtt\n    bind {listen}\n    default_backend meshgate\n\n\
                 backend meshgate\n    server mg {to} send-proxy-v2 source {}\n",
                listen.ip()
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("haproxy is not installed: run `scripts/deps test`");
        let child = Command::new(bin)
            .args(["-db", "-f", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy runs");
        let h = Haproxy { child, _dir: dir };
        let deadline = std::time::Instant::now() + 5 * SECOND;
        while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            assert!(std::time::Instant::now() < deadline, "haproxy listens on {listen}");
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// A CONNECT for `id` over `stream`; the CONNACK's return code, or `None` when meshgate closed.
async fn mqtt_connect(stream: &mut TcpStream, id: &str) -> Option<u8> {
    stream.write_all(&raw::connect_packet(4, id, true, 30, None, None)).await.ok()?;
    match raw::read_packet(stream, 3 * SECOND).await {
        Ok((0x20, body)) => Some(body[1]),
        _ => None,
    }
}

/// A broker-side listener that requires a PROXY v2 header (as Mosquitto 2.1 with
/// `enable_proxy_protocol 2` does), records each header's source and relays the rest to a
/// real Mosquitto. A connection without a valid header is closed.
async fn proxy_v2_broker(listen: SocketAddr, broker: SocketAddr) -> Arc<Mutex<Vec<SocketAddr>>> {
    let sources = Arc::new(Mutex::new(Vec::new()));
    let seen = sources.clone();
    let listener = TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if inbound.read_exact(&mut head).await.is_err() {
                    return;
                }
                let mut header = head.to_vec();
                header.resize(16 + u16::from_be_bytes([head[14], head[15]]) as usize, 0);
                if inbound.read_exact(&mut header[16..]).await.is_err() {
                    return;
                }
                let source = match ppp::v2::Header::try_from(header.as_slice()).map(|h| h.addresses) {
                    Ok(ppp::v2::Addresses::IPv4(a)) => SocketAddr::from((a.source_address, a.source_port)),
                    _ => return,
                };
                seen.lock().unwrap().push(source);
                let Ok(mut outbound) = TcpStream::connect(broker).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    sources
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_gives_meshgate_and_the_broker_the_real_client_address() {
    let slot = Slot::acquire();
    let mosquitto = Mosquitto::start("broker1", slot.addr(10, 1883), "");
    let mosquitto2 = Mosquitto::start("broker2", slot.addr(11, 1883), "");
    // The brokers as meshgate sees them: listeners that require PROXY v2, in front of Mosquitto.
    let (relay, relay2) = (slot.addr(20, 1883), slot.addr(21, 1883));
    let sources = proxy_v2_broker(relay, mosquitto.addr).await;
    let sources2 = proxy_v2_broker(relay2, mosquitto2.addr).await;
    let (mg_addr, balancer) = (slot.addr(1, 1883), slot.addr(60, 1883));
    let text = format!(
        "[listen]\nmqtt = \"{mg_addr}\"\nhttp = \"{}\"\ntrusted_proxies = [\"{}\"]\nproxy_protocol = {{ mqtt = \"v2\" }}\n\
         [access_log]\nenabled = false\n[proxy]\nmax_connections_per_source = 1\n\
         [replication]\nenabled = true\n\
         [[broker]]\nname = \"broker1\"\naddress = \"{relay}\"\nproxy_protocol = \"v2\"\n\
         [[broker]]\nname = \"broker2\"\naddress = \"{relay2}\"\nproxy_protocol = \"v2\"\n",
        slot.addr(1, 8080),
        balancer.ip()
    );
    let mg = meshgate::Meshgate::start(meshgate::Config::from_toml(&text, "test").unwrap()).await.unwrap();
    let pool = mg.pool().clone();
    let b1 = pool.broker("broker1").unwrap();
    wait_until(5 * SECOND, || b1.probe_up() == Some(true)).await.expect("probes pass through the PROXY listener");
    let _haproxy = blocking(|| Haproxy::start(balancer, mg_addr));

    // A client at .77 through HAProxy: meshgate and the broker see .77, not HAProxy's .60.
    let (client_a, client_b) = (slot.ip(77), slot.ip(78));
    let mut a = connect_from(client_a, balancer).await;
    let a_port = a.local_addr().unwrap().port();
    assert_eq!(mqtt_connect(&mut a, "pp-a").await, Some(0), "served through HAProxy");
    let clients = raw_get_json(slot.addr(1, 8080), "/clients").await;
    let listed = clients.as_array().unwrap().iter().find(|c| c["client_id"] == "pp-a").cloned().unwrap();
    println!("/clients through HAProxy: {listed}");
    assert_eq!(listed["peer"], SocketAddr::new(client_a, a_port).to_string(), "the client's own address and port");
    let relayed = sources.lock().unwrap().clone();
    assert!(
        relayed.contains(&SocketAddr::new(client_a, a_port)),
        "the broker-side listener got the client's address in meshgate's PROXY header: {relayed:?}"
    );
    assert!(
        relayed.iter().any(|s| s.ip() == mg_addr.ip() || s.ip().is_loopback() && s.ip() != client_a),
        "probes send meshgate's own address: {relayed:?}"
    );

    // The per-source limit (1) counts .77, not HAProxy: a second .77 client is refused, a
    // client at .78 is served.
    let mut again = connect_from(client_a, balancer).await;
    assert_eq!(mqtt_connect(&mut again, "pp-a2").await, None, "a second connection from .77 is refused");
    let per_source = pool.metrics.rejected.with_label_values(&["per_source_connections"]);
    wait_until(2 * SECOND, || per_source.get() == 1).await.expect("counted as per_source_connections");
    let mut b = connect_from(client_b, balancer).await;
    assert_eq!(mqtt_connect(&mut b, "pp-b").await, Some(0), ".78 is another source");

    // A header from an address not in trusted_proxies is refused, whatever it claims.
    let mut forged = connect_from(slot.ip(79), mg_addr).await;
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (SocketAddr::new(slot.ip(99), 1), mg_addr),
    )
    .build()
    .unwrap();
    forged.write_all(&header).await.unwrap();
    assert_eq!(mqtt_connect(&mut forged, "forged").await, None);
    let untrusted = pool.metrics.rejected.with_label_values(&["proxy_untrusted"]);
    wait_until(2 * SECOND, || untrusted.get() == 1).await.expect("counted as proxy_untrusted");
    // The trusted balancer's address without a header: refused too.
    let mut bare = connect_from(balancer.ip(), mg_addr).await;
    assert_eq!(mqtt_connect(&mut bare, "bare").await, None);
    let bad = pool.metrics.rejected.with_label_values(&["proxy_header"]);
    wait_until(2 * SECOND, || bad.get() == 1).await.expect("counted as proxy_header");
    assert!(pool.broker_of("forged").is_none() && pool.broker_of("bare").is_none());

    // Replication links reach both PROXY listeners too: a message published on broker1's
    // Mosquitto arrives on broker2's.
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let _sub =
        common::subscribed(mosquitto2.addr, "pp-reader", "pp/#", move |p| g.lock().unwrap().push(p.payload.to_vec()))
            .await;
    let http = slot.addr(1, 8080);
    let mut links_up = false;
    for _ in 0..250 {
        let r = raw_get_json(http, "/replication").await;
        if r["links"].as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|x| x["connected"] == true)) {
            links_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(links_up, "both replication links connected through the PROXY listeners");
    let mut publisher = TcpStream::connect(mosquitto.addr).await.unwrap();
    assert_eq!(mqtt_connect(&mut publisher, "pp-writer").await, Some(0));
    publisher.write_all(&raw::publish_packet("pp/1", b"through the relay", 1, 1, false)).await.unwrap();
    let copied = wait_until(10 * SECOND, || !got.lock().unwrap().is_empty()).await;
    assert!(copied.is_some(), "replicated through the PROXY listeners");
    assert!(!sources2.lock().unwrap().is_empty(), "broker2's listener got headers");
    mg.shutdown().await;
}

async fn raw_get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}
