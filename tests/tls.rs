//! TLS: mosquitto_pub/mosquitto_sub through meshgate's TLS listener, client certificates, renewal on reload, TLS to a broker.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::Ca;
use common::{blocking, Mosquitto, Net, Slot};
use meshgate::Meshgate;

/// mosquitto_sub waits for one message while mosquitto_pub sends it, both over TLS.
fn pub_sub(addr: SocketAddr, cafile: &Path, client: Option<(&Path, &Path)>) -> Result<String, String> {
    let mut tls: Vec<String> = vec!["--cafile".into(), cafile.display().to_string()];
    if let Some((c, k)) = client {
        tls.extend(["--cert".into(), c.display().to_string(), "--key".into(), k.display().to_string()]);
    }
    let common = |id: &str| -> Vec<String> {
        let mut v = vec![
            "-h".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-i".into(),
            id.into(),
            "-t".into(),
            "tls/test".into(),
        ];
        v.extend(tls.clone());
        v
    };
    let sub = Command::new("mosquitto_sub")
        .args(common("tls-sub"))
        .args(["-C", "1", "-W", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("mosquitto_sub: {e} (apt-get install mosquitto-clients)"))?;
    // Publish until the subscriber has its message (it may still be connecting).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last_err = String::new();
    let mut child = sub;
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            return if out.status.success() && !text.is_empty() {
                Ok(text)
            } else {
                Err(format!("mosquitto_sub: {} {}", String::from_utf8_lossy(&out.stderr).trim(), last_err))
            };
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("no message within 5 s; last publish: {last_err}"));
        }
        let out = Command::new("mosquitto_pub").args(common("tls-pub")).args(["-m", "over-tls"]).output().unwrap();
        if !out.status.success() {
            last_err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tls_config(net: &Net, dir: &Path, extra_tls: &str) -> meshgate::Config {
    let text = net.config_text(&format!(
        "[tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n{extra_tls}",
        d = dir.display()
    ));
    let text = text.replacen("[listen]\n", &format!("[listen]\nmqtts = \"{}\"\n", net.slot.addr(1, 8883)), 1);
    meshgate::Config::from_toml(&text, "tls-test").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_through_the_tls_listener_and_renewal_on_reload() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue(dir.path(), "server", Some(net.slot.ip(1)), false);
    let mg = Meshgate::start(tls_config(&net, dir.path(), "")).await.unwrap();
    let tls_addr = net.slot.addr(1, 8883);
    let got = blocking(|| pub_sub(tls_addr, &dir.path().join("ca.pem"), None));
    assert_eq!(got.as_deref(), Ok("over-tls"));

    // Renewal: a certificate from another CA replaces the files; reload picks it up.
    let other = Ca::new(dir.path(), "ca2");
    other.issue(dir.path(), "server", Some(net.slot.ip(1)), false);
    assert!(blocking(|| pub_sub(tls_addr, &dir.path().join("ca2.pem"), None)).is_err(), "old certificate until reload");
    mg.reload(tls_config(&net, dir.path(), "")).expect("reload with the renewed certificate");
    let got = blocking(|| pub_sub(tls_addr, &dir.path().join("ca2.pem"), None));
    assert_eq!(got.as_deref(), Ok("over-tls"), "renewed certificate served after reload");

    // A broken certificate file refuses the reload and keeps the running one.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    let err = mg.reload(tls_config(&net, dir.path(), "")).unwrap_err();
    assert!(err.contains("server.pem"), "{err}");
    assert_eq!(blocking(|| pub_sub(tls_addr, &dir.path().join("ca2.pem"), None)).as_deref(), Ok("over-tls"));
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_from_the_wrong_ca_are_refused() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue(dir.path(), "server", Some(net.slot.ip(1)), false);
    let (good_c, good_k) = ca.issue(dir.path(), "device", None, true);
    let rogue = Ca::new(dir.path(), "rogue");
    let (bad_c, bad_k) = rogue.issue(dir.path(), "intruder", None, true);
    let extra = format!("client_ca = \"{}/ca.pem\"\n", dir.path().display());
    let mg = Meshgate::start(tls_config(&net, dir.path(), &extra)).await.unwrap();
    let addr = net.slot.addr(1, 8883);
    let cafile = dir.path().join("ca.pem");
    assert_eq!(blocking(|| pub_sub(addr, &cafile, Some((&good_c, &good_k)))).as_deref(), Ok("over-tls"));
    assert!(blocking(|| pub_sub(addr, &cafile, Some((&bad_c, &bad_k)))).is_err(), "wrong CA refused");
    assert!(blocking(|| pub_sub(addr, &cafile, None)).is_err(), "no client certificate refused");
    let m = mg.pool().metrics.rejected.with_label_values(&["tls_handshake"]).get();
    assert!(m >= 2, "refused handshakes counted: {m}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_tls_true_is_reached_over_tls() {
    let slot = Slot::acquire();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let broker_addr = slot.addr(10, 8883);
    let (bc, bk) = ca.issue(dir.path(), "broker", Some(broker_addr.ip()), false);
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        dir.path().join("ca.pem").display(),
        bc.display(),
        bk.display()
    );
    let broker = blocking(|| Mosquitto::start_tls("broker1", broker_addr, &extra));
    let text = format!(
        "[listen]\nmqtt = \"{}\"\nhttp = \"off\"\n[tls]\nbroker_ca = \"{}/ca.pem\"\n[[broker]]\nname = \"broker1\"\naddress = \"{}\"\ntls = true\n",
        slot.addr(1, 1883),
        dir.path().display(),
        broker_addr
    );
    let mg = Meshgate::start(meshgate::Config::from_toml(&text, "t").unwrap()).await.unwrap();
    let (_s, ack) = common::mqtt::connect(slot.addr(1, 1883), 4, "plain-client", Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.code, 0);
    assert_eq!(mg.pool().broker_of("plain-client").as_deref(), Some("broker1"));
    assert!(broker.log().contains("plain-client"), "the broker saw the client over TLS");
    mg.shutdown().await;
}

/// Two brokers that speak TLS only (Mosquitto with a TLS listener and nothing else), behind a
/// meshgate whose config says `tls = true` for both: every probe kind, replication both ways
/// and persistent-session migration reach them over TLS, as client sessions do.
struct TlsPool {
    slot: Slot,
    dir: tempfile::TempDir,
    brokers: Vec<Mosquitto>,
}

impl TlsPool {
    fn start() -> TlsPool {
        let slot = Slot::acquire();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let brokers = (0..2)
            .map(|i| {
                let addr = slot.addr(10 + i, 8883);
                let name = format!("broker{}", i + 1);
                let (c, k) = ca.issue(dir.path(), &name, Some(addr.ip()), false);
                let extra = format!(
                    "cafile {}\ncertfile {}\nkeyfile {}\n",
                    dir.path().join("ca.pem").display(),
                    c.display(),
                    k.display()
                );
                Mosquitto::start_tls(&name, addr, &extra)
            })
            .collect();
        TlsPool { slot, dir, brokers }
    }

    fn config(&self, probe: &str, replication: bool) -> meshgate::Config {
        let mut text = format!(
            "[listen]\nmqtt = \"{}\"\nhttp = \"off\"\n[health]\nprobe = \"{probe}\"\ninterval = \"100ms\"\n\
             [replication]\nenabled = {replication}\n[tls]\nbroker_ca = \"{}/ca.pem\"\n",
            self.slot.addr(1, 1883),
            self.dir.path().display(),
        );
        for b in &self.brokers {
            text.push_str(&format!("[[broker]]\nname = \"{}\"\naddress = \"{}\"\ntls = true\n", b.name, b.addr));
        }
        meshgate::Config::from_toml(&text, "tls-pool").unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_brokers_are_probed_replicated_and_keep_persistent_sessions_over_tls() {
    use meshgate::upstream::client::RawClient;
    let mut pool = blocking(TlsPool::start);
    let wait = Duration::from_secs(5);

    // Every probe kind talks TLS: each broker is up after several probes, none failed.
    for probe in ["tcp", "mqtt", "pubsub"] {
        let mg = Meshgate::start(pool.config(probe, false)).await.unwrap();
        let p = mg.pool().clone();
        let probed = common::mqtt::wait_until(wait, || p.brokers().iter().all(|b| b.health().history.len() >= 3)).await;
        assert!(probed.is_some(), "{probe}: three probes of each broker within {wait:?}");
        for b in p.brokers().iter() {
            let h = b.health();
            assert_eq!(b.probe_up(), Some(true), "{probe} probe of {}: {:?}", b.name, h.last);
            assert!(h.history.iter().all(Option::is_some), "{probe} probe of {} failed once: {:?}", b.name, h.last);
        }
        mg.shutdown().await;
    }

    let mg = Meshgate::start(pool.config("mqtt", true)).await.unwrap();
    let repl = mg.replication().unwrap().clone();
    common::mqtt::wait_until(wait, || repl.view().links.iter().all(|l| l.connected))
        .await
        .expect("both replication links connect over TLS");
    let upstream = mg.proxy().upstream.clone();
    let config = pool.config("mqtt", true);
    let direct = |i: usize, id: &'static str| {
        let (upstream, broker) = (upstream.clone(), config.brokers[i].clone());
        async move {
            let (c, code, _) = RawClient::connect_via(&upstream, &broker, id, true, wait).await.unwrap();
            assert_eq!(code, 0, "{id}");
            c
        }
    };

    // Replication to and from each TLS broker.
    for (from, to) in [(0, 1), (1, 0)] {
        let mut sub = direct(to, if to == 0 { "tls-sub-1" } else { "tls-sub-2" }).await;
        sub.subscribe("repl/#", 1, wait).await.unwrap();
        let mut publ = direct(from, if from == 0 { "tls-pub-1" } else { "tls-pub-2" }).await;
        let topic = format!("repl/from-{}", from + 1);
        publ.publish(&topic, b"copied", 1, false, wait).await.unwrap();
        let got = sub.next_message(wait).await.unwrap().expect("the copy arrives on the other broker");
        assert_eq!((got.topic.as_str(), got.payload.as_slice()), (topic.as_str(), &b"copied"[..]));
    }

    // A persistent session homed on broker1 moves to broker2 when broker1 dies, and keeps
    // what is published meanwhile.
    let mut client =
        RawClient::connect(&pool.slot.addr(1, 1883).to_string(), "tls-persistent", false, wait).await.unwrap().0;
    client.subscribe("sess/#", 1, wait).await.unwrap();
    client.disconnect().await;
    let durable = mg.durable().clone();
    common::mqtt::wait_until(wait, || durable.placement("tls-persistent").is_some_and(|p| p.subscriptions == 1))
        .await
        .expect("subscription recorded");
    blocking(|| pool.brokers[0].kill());
    let metrics = mg.pool().clone();
    common::mqtt::wait_until(wait, || metrics.metrics.durable_ops.with_label_values(&["migrate", "ok"]).get() == 1)
        .await
        .expect("the session is recreated on broker2 over TLS");
    assert_eq!(durable.placement("tls-persistent").unwrap().home.as_deref(), Some("broker2"));
    let mut publ = direct(1, "tls-pub-late").await;
    publ.publish("sess/late", b"kept", 1, false, wait).await.unwrap();
    let (mut back, code, _) =
        RawClient::connect(&pool.slot.addr(1, 1883).to_string(), "tls-persistent", false, wait).await.unwrap();
    assert_eq!(code, 0);
    let got = back.next_message(wait).await.unwrap().expect("the message queued on broker2 is delivered");
    assert_eq!((got.topic.as_str(), got.payload.as_slice()), ("sess/late", &b"kept"[..]));
    mg.shutdown().await;
}

/// `[proxy] max_connections` bounds every listener together: with two plain MQTT sessions
/// open and a limit of 2, a connection to the TLS listener is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_is_shared_by_every_listener() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    ca.issue(dir.path(), "server", Some(net.slot.ip(1)), false);
    let mut config = tls_config(&net, dir.path(), "");
    config.proxy.max_connections = 2;
    let mg = Meshgate::start(config).await.unwrap();
    let wait = Duration::from_secs(3);
    let mut open = Vec::new();
    for id in ["plain-1", "plain-2"] {
        let (s, ack) = common::mqtt::connect(net.mqtt_addr(), 4, id, wait).await.unwrap();
        assert_eq!(ack.code, 0);
        open.push(s);
    }
    let refused = || mg.pool().metrics.rejected.with_label_values(&["max_connections"]).get();
    let mut tls = tokio::net::TcpStream::connect(net.slot.addr(1, 8883)).await.unwrap();
    assert!(common::mqtt::closed_within(&mut tls, wait).await, "the TLS listener is over the shared limit");
    assert_eq!(refused(), 1);
    // One session ends: the TLS listener admits again (the connection waits for a handshake).
    drop(open.pop());
    let pool = mg.pool().clone();
    common::mqtt::wait_until(wait, || pool.session_count() == 1).await.expect("the session ended");
    let mut tls = tokio::net::TcpStream::connect(net.slot.addr(1, 8883)).await.unwrap();
    assert!(!common::mqtt::closed_within(&mut tls, Duration::from_millis(500)).await, "admitted under the limit");
    assert_eq!(refused(), 1);
    // A handshake never finished ends with the shutdown grace period, not with the CONNECT time.
    let stopping = std::time::Instant::now();
    mg.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(7), "shutdown took {:?}", stopping.elapsed());
}
