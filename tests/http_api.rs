//! The HTTP API against a running meshgate and real Mosquitto: brokers, clients, metrics, health, admin, events, OpenAPI.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);
/// Default probes: 250 ms interval, fall = rise = 2, so a flip takes about 500 ms; the issue
/// allows 1.5 s.
const DETECTION: Duration = Duration::from_millis(1500);
const TOKEN: &str = "s3cret-token";

// ---- a tiny HTTP/1.1 client -------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): status {} body {:?}", self.status, self.body))
    }

    /// Asserts the API's error shape: JSON with exactly one key, `error`, holding one line.
    fn error(&self) -> String {
        let v = self.json();
        let obj = v.as_object().unwrap_or_else(|| panic!("error is not an object: {v}"));
        assert_eq!(obj.len(), 1, "error has only the `error` key: {v}");
        let msg = obj["error"].as_str().unwrap_or_else(|| panic!("error is a string: {v}")).to_string();
        assert!(!msg.is_empty() && !msg.contains('\n'), "one line: {msg:?}");
        msg
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let len = if method == "POST" { "Content-Length: 0\r\n" } else { "" };
    send(addr, &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{len}\r\n")).await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, None).await
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let r = get(addr, path).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

async fn send(addr: SocketAddr, request: &str) -> Reply {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(5 * SECOND, exchange)
        .await
        .unwrap_or_else(|_| panic!("no HTTP answer within 5 s to {request:?}"))
        .unwrap_or_else(|e| panic!("HTTP exchange failed ({e}) for {request:?}"));
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Reply { status, headers, body }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// Runs `f` every 10 ms until it gives a value or `deadline` has passed.
async fn poll<T>(deadline: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .find(|o| o[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value:?} in {list}"))
}

async fn broker_json(addr: SocketAddr, name: &str) -> Value {
    get_json(addr, &format!("/brokers/{name}")).await
}

/// Connects a raw MQTT 3.1.1 client through meshgate and returns its stream and the broker it landed on.
async fn connect_located(net: &Net, mg: &meshgate::Meshgate, id: &str) -> (TcpStream, String) {
    let (s, ack) = raw::connect(net.mqtt_addr(), 4, id, 5 * SECOND).await.unwrap_or_else(|e| panic!("{id}: {e}"));
    assert_eq!(ack.code, 0, "{id} accepted");
    let pool = mg.pool().clone();
    let mut broker = None;
    wait_until(SECOND, || {
        broker = pool.broker_of(id);
        broker.is_some()
    })
    .await
    .unwrap_or_else(|| panic!("{id} registered"));
    (s, broker.unwrap())
}

// ---- /brokers -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_flip_down_when_killed_and_up_after_restart() {
    let mut net = Net::start(2);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();

    let list = get_json(api, "/brokers").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let b1 = find(&list, "name", "broker1");
    assert_eq!(
        (b1["state"].as_str(), b1["available"].as_bool(), b1["current"].as_bool()),
        (Some("up"), Some(true), Some(true))
    );
    assert_eq!(b1["address"], net.brokers[0].addr.to_string());
    assert_eq!(
        (b1["priority"].as_u64(), b1["weight"].as_u64(), b1["enabled"].as_bool()),
        (Some(1), Some(1), Some(true))
    );
    assert_eq!(b1["last_probe"]["ok"], true);
    assert_eq!(b1["last_probe"]["kind"], "mqtt");
    assert!(b1["last_probe"]["latency_ms"].as_f64().is_some() && b1["last_probe"]["at"].is_string(), "{b1}");
    assert!(!b1["probe_history"].as_array().unwrap().is_empty(), "{b1}");
    assert_eq!(find(&list, "name", "broker2")["current"], false);
    let since_up = b1["since_ms"].as_u64().unwrap();

    let one = get(api, "/brokers/nope").await;
    assert_eq!(one.status, 404);
    assert!(one.error().contains("nope"));

    blocking(|| net.broker("broker1").kill());
    let killed = Instant::now();
    let down = poll(3 * SECOND, async || Some(broker_json(api, "broker1").await).filter(|b| b["state"] == "down"))
        .await
        .expect("broker1 shows down");
    let took = killed.elapsed();
    eprintln!("/brokers showed broker1 down {took:?} after the kill");
    assert!(took <= DETECTION, "down after {took:?}");
    assert_eq!(
        (down["available"].as_bool(), down["current"].as_bool(), down["probe_up"].as_bool()),
        (Some(false), Some(false), Some(false))
    );
    assert!(down["reason"].as_str().unwrap().contains("probes failing"), "{down}");
    assert_eq!(down["last_probe"]["ok"], false);
    assert!(down["last_probe"]["error"].is_string(), "{down}");
    assert!(down["since_ms"].as_u64().unwrap() > since_up, "since moved with the state change");
    assert!(down["probe_history"].as_array().unwrap().iter().any(Value::is_null), "failed probes in the history");
    assert_eq!(find(&get_json(api, "/brokers").await, "name", "broker2")["current"], true);

    blocking(|| net.broker("broker1").restart());
    let answering = Instant::now();
    poll(3 * SECOND, async || {
        let b = broker_json(api, "broker1").await;
        (b["state"] == "up" && b["available"] == true).then_some(())
    })
    .await
    .expect("broker1 shows up again");
    let took = answering.elapsed();
    eprintln!("/brokers showed broker1 up {took:?} after it answered again");
    assert!(took <= DETECTION, "up after {took:?}");
    mg.shutdown().await;
}

// ---- /clients -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_lists_sessions_filters_by_broker_and_caps() {
    let net = Net::start(2);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();
    assert_eq!(get_json(api, "/clients").await, serde_json::json!([]));

    let addr = mg.mqtt_addr();
    let mut opts = MqttOptions::new("dash-1", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(7));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client.subscribe("dash/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(5 * SECOND, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("SUBACK through meshgate");
    // Keep the client's event loop running (pings) for the rest of the test.
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });

    // A second, different client: MQTT 5, persistent, with a user name.
    let (_v5, ack) =
        raw::connect_with(net.mqtt_addr(), 5, "dash-2", false, Some("operator"), None, 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 0);

    let list = poll(2 * SECOND, async || {
        let l = get_json(api, "/clients").await;
        (l.as_array().unwrap().len() == 2 && find(&l, "client_id", "dash-1")["packets_in"].as_u64() >= Some(1))
            .then_some(l)
    })
    .await
    .expect("both clients listed, the SUBSCRIBE counted");
    let c = find(&list, "client_id", "dash-1");
    assert_eq!(c["broker"], "broker1");
    assert_eq!(c["protocol"], "3.1.1");
    assert_eq!(
        (c["clean"].as_bool(), c["persistent"].as_bool(), c["keepalive"].as_u64()),
        (Some(true), Some(false), Some(7))
    );
    assert_eq!(c["username"], Value::Null);
    let peer: SocketAddr = c["peer"].as_str().unwrap().parse().expect("peer is ip:port");
    assert!(peer.ip().is_loopback() && peer.port() > 0, "{c}");
    assert!(c["bytes_in"].as_u64().unwrap() > 0 && c["bytes_out"].as_u64().unwrap() > 0, "{c}");
    assert!(c["packets_out"].as_u64().unwrap() >= 2, "CONNACK and SUBACK: {c}");
    assert!(c["connected_at_ms"].as_u64().unwrap() > 0 && c["connected_at"].is_string());
    let c = find(&list, "client_id", "dash-2");
    assert_eq!(
        (c["protocol"].as_str(), c["clean"].as_bool(), c["username"].as_str()),
        (Some("5"), Some(false), Some("operator"))
    );

    assert_eq!(get_json(api, "/clients?broker=broker2").await, serde_json::json!([]));
    assert_eq!(get_json(api, "/clients?broker=broker1").await.as_array().unwrap().len(), 2);
    let capped = get_json(api, "/clients?limit=1").await;
    assert_eq!(capped.as_array().unwrap().len(), 1);
    assert_eq!(capped[0]["client_id"], "dash-1", "oldest first");
    assert_eq!(get_json(api, "/clients?broker=broker1&limit=0").await, serde_json::json!([]));
    for bad in ["/clients?limit=abc", "/clients?limit=-1", "/clients?limit=1.5", "/clients?brokr=broker1"] {
        let r = get(api, bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        let msg = r.error();
        eprintln!("{bad}: {msg}");
    }
    driver.abort();
    mg.shutdown().await;
}

// ---- /metrics -----------------------------------------------------------------

async fn scrape(api: SocketAddr) -> prometheus_parse::Scrape {
    let r = get(api, "/metrics").await;
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "content type {ct:?}");
    prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of a counter, gauge or untyped sample whose labels include `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value::*;
    s.samples.iter().filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).find_map(
        |x| match x.value {
            Counter(v) | Gauge(v) | Untyped(v) => Some(v),
            _ => None,
        },
    )
}

/// The sum of a counter's samples whose labels include `labels` (every reason of a broker).
fn sum(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value::*;
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Counter(v) | Gauge(v) | Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn sessions(s: &prometheus_parse::Scrape) -> (Option<f64>, Option<f64>) {
    let b1 = [("broker", "broker1")];
    (value(s, "meshgate_sessions_active", &b1), value(s, "meshgate_sessions_total", &b1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_sessions() {
    let mut net = Net::start(2);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();

    assert_eq!(sessions(&scrape(api).await), (Some(0.0), Some(0.0)), "present at 0 from the first scrape");
    let (mut a, _) = connect_located(&net, &mg, "m-1").await;
    // Traffic both ways after the handshake, for meshgate_bytes_total.
    a.write_all(&raw::pingreq_packet()).await.unwrap();
    let (first, _) = raw::read_packet(&mut a, 2 * SECOND).await.unwrap();
    assert_eq!(first, 0xD0, "PINGRESP");
    let (b, _) = connect_located(&net, &mg, "m-2").await;
    let mut seen = (None, None);
    poll(2 * SECOND, async || {
        seen = sessions(&scrape(api).await);
        (seen == (Some(2.0), Some(2.0))).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("two sessions counted, got (active, total) = {seen:?}"));
    drop((a, b));
    poll(2 * SECOND, async || {
        seen = sessions(&scrape(api).await);
        (seen == (Some(0.0), Some(2.0))).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("sessions gone, total kept, got (active, total) = {seen:?}"));

    // One rejection: something that is not MQTT.
    let mut s = TcpStream::connect(net.mqtt_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(raw::closed_within(&mut s, SECOND).await);

    // One upstream failure: every broker dead, so the CONNECT is tried on them anyway and fails.
    blocking(|| {
        net.broker("broker1").kill();
        net.broker("broker2").kill();
    });
    let pool = mg.pool().clone();
    wait_until(3 * SECOND, || pool.brokers().iter().all(|b| b.probe_up() == Some(false))).await.expect("both down");
    let (_s, ack) = raw::connect(net.mqtt_addr(), 4, "m-3", 5 * SECOND).await.unwrap();
    assert_eq!(ack.code, 3, "server unavailable");

    let m = scrape(api).await;
    for name in [
        "meshgate_broker_up",
        "meshgate_broker_available",
        "meshgate_sessions_active",
        "meshgate_sessions_total",
        "meshgate_upstream_failures_total",
        "meshgate_connect_retries_total",
        "meshgate_failovers_total",
        "meshgate_probe_duration_seconds",
        "meshgate_connack_duration_seconds",
        "meshgate_bytes_total",
        "meshgate_rejected_connections_total",
        "meshgate_build_info",
    ] {
        assert!(m.samples.iter().any(|x| x.metric == name), "{name} missing from /metrics");
    }
    assert_eq!(value(&m, "meshgate_broker_up", &[("broker", "broker1")]), Some(0.0));
    assert_eq!(value(&m, "meshgate_broker_available", &[("broker", "broker2")]), Some(0.0));
    assert!(sum(&m, "meshgate_upstream_failures_total", &[("broker", "broker1")]) >= 1.0);
    assert!(value(&m, "meshgate_rejected_connections_total", &[("reason", "malformed_connect")]) >= Some(1.0));
    assert!(value(&m, "meshgate_rejected_connections_total", &[("reason", "no_broker")]) >= Some(1.0));
    // broker1 -> broker2 -> none, or straight to none when broker2's probes notice first.
    assert!(value(&m, "meshgate_failovers_total", &[]) >= Some(1.0), "a failover counted");
    for direction in ["client_to_broker", "broker_to_client"] {
        assert!(value(&m, "meshgate_bytes_total", &[("direction", direction)]) > Some(0.0), "{direction}");
    }
    assert_eq!(value(&m, "meshgate_build_info", &[("version", meshgate::VERSION)]), Some(1.0));
    let probes = m.samples.iter().find(|x| x.metric == "meshgate_probe_duration_seconds").unwrap();
    assert!(matches!(&probes.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()), "a histogram");
    mg.shutdown().await;
}

// ---- /health ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_then_degraded_then_503_down() {
    let mut net = Net::start(2);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();

    let h = get_json(api, "/health").await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["current_broker"], "broker1");
    assert_eq!(
        (h["brokers_total"].as_u64(), h["brokers_available"].as_u64(), h["sessions"].as_u64()),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(h["version"], meshgate::VERSION);
    assert!(h["uptime_secs"].is_u64());

    blocking(|| net.broker("broker1").kill());
    let h = poll(3 * SECOND, async || {
        let r = get(api, "/health").await;
        (r.status == 200 && r.json()["status"] == "degraded").then(|| r.json())
    })
    .await
    .expect("degraded with the primary down");
    assert_eq!((h["current_broker"].as_str(), h["brokers_available"].as_u64()), (Some("broker2"), Some(1)));

    blocking(|| net.broker("broker2").kill());
    let h = poll(3 * SECOND, async || {
        let r = get(api, "/health").await;
        (r.status == 503).then(|| r.json())
    })
    .await
    .expect("503 with every broker down");
    assert_eq!(
        (h["status"].as_str(), h["current_broker"].as_null(), h["brokers_available"].as_u64()),
        (Some("down"), Some(()), Some(0))
    );
    mg.shutdown().await;
}

// ---- admin --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_403_without_a_configured_token() {
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();
    for token in [None, Some("anything")] {
        let r = http(api, "POST", "/brokers/broker1/disable", token).await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(r.error().contains("[admin] token"), "says how to turn admin on: {}", r.body);
    }
    let b = broker_json(api, "broker1").await;
    assert_eq!((b["admin"].as_str(), b["state"].as_str()), (Some("enabled"), Some("up")));
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_the_token_and_disable_enable_steer_new_sessions() {
    let net = Net::start(2);
    // The close path of a disable (tests/switch.rs has the switch, the default).
    let mg = net.meshgate(&format!("[admin]\ntoken = \"{TOKEN}\"\n[proxy]\nmove = \"close\"\n")).await;
    let api = mg.http_addr().unwrap();
    let seq_before = get_json(api, "/events").await["last_seq"].as_u64().unwrap();

    let wrong = format!("{TOKEN}x");
    let short = &TOKEN[..TOKEN.len() - 1];
    for (token, what) in
        [(None, "no token"), (Some("nope"), "wrong token"), (Some(wrong.as_str()), "longer"), (Some(short), "prefix")]
    {
        for action in ["disable", "enable", "drain"] {
            let r = http(api, "POST", &format!("/brokers/broker1/{action}"), token).await;
            assert_eq!(r.status, 401, "{what} {action}: {}", r.body);
            assert!(r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{what}");
            r.error();
        }
    }
    let r = send(api, &format!("POST /brokers/broker1/disable HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {TOKEN}\r\nContent-Length: 0\r\n\r\n")).await;
    assert_eq!(r.status, 401, "only the Bearer scheme counts");
    assert_eq!(http(api, "POST", "/brokers/ghost/disable", None).await.status, 401, "authorization before lookup");
    let b = broker_json(api, "broker1").await;
    assert_eq!(
        (b["admin"].as_str(), b["state"].as_str(), b["available"].as_bool()),
        (Some("enabled"), Some("up"), Some(true))
    );
    let events = get_json(api, &format!("/events?since={seq_before}")).await;
    assert_eq!(events["events"], serde_json::json!([]), "refused admin requests changed nothing");

    let r = http(api, "POST", "/brokers/ghost/disable", Some(TOKEN)).await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("ghost"));

    let (mut before, on) = connect_located(&net, &mg, "adm-before").await;
    assert_eq!(on, "broker1");
    let r = http(api, "POST", "/brokers/broker1/disable", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.json();
    assert_eq!(
        (b["name"].as_str(), b["state"].as_str(), b["enabled"].as_bool()),
        (Some("broker1"), Some("disabled"), Some(false))
    );
    assert_eq!((b["available"].as_bool(), b["current"].as_bool()), (Some(false), Some(false)));
    assert!(raw::closed_within(&mut before, 2 * SECOND).await, "sessions on a disabled broker are closed");
    for i in 0..3 {
        let (_s, on) = connect_located(&net, &mg, &format!("adm-off-{i}")).await;
        assert_eq!(on, "broker2", "a disabled broker takes no new sessions");
    }
    assert_eq!(get_json(api, "/health").await["current_broker"], "broker2");

    let r = http(api, "POST", "/brokers/broker1/enable", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.json();
    assert_eq!(
        (b["state"].as_str(), b["enabled"].as_bool(), b["available"].as_bool()),
        (Some("up"), Some(true), Some(true))
    );
    let (_s, on) = connect_located(&net, &mg, "adm-back").await;
    assert_eq!(on, "broker1", "enable brings it back");
    let kinds: Vec<String> = get_json(api, &format!("/events?since={seq_before}")).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().filter(|k| *k == "admin").count() >= 2, "disable and enable logged: {kinds:?}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_sessions_off_at_the_failback_rate() {
    let net = Net::start(2);
    // The close path of a drain (tests/switch.rs has the switch, the default).
    let mg =
        net.meshgate(&format!("[admin]\ntoken = \"{TOKEN}\"\n[proxy]\nfailback_rate = 5\nmove = \"close\"\n")).await;
    let api = mg.http_addr().unwrap();
    let mut open = Vec::new();
    for i in 0..5 {
        let (s, on) = connect_located(&net, &mg, &format!("dr-{i}")).await;
        assert_eq!(on, "broker1");
        open.push(s);
    }

    let r = http(api, "POST", "/brokers/broker1/drain", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let drained = Instant::now();
    let b = r.json();
    assert_eq!(
        (b["state"].as_str(), b["admin"].as_str(), b["available"].as_bool()),
        (Some("draining"), Some("draining"), Some(false))
    );
    let (_s, on) = connect_located(&net, &mg, "dr-new").await;
    assert_eq!(on, "broker2", "a draining broker takes no new sessions");

    let closed_at = common::close_times(open, 5, drained, 5 * SECOND).await;
    assert_eq!(closed_at.len(), 5, "every session moved off within 5 s");
    let spread = closed_at[4] - closed_at[0];
    eprintln!("5 sessions drained over {spread:?}");
    // 5 sessions at 5/s: 4 gaps of 200 ms, so not all at once and not stalled.
    assert!(spread >= Duration::from_millis(600), "drained over {spread:?}, expected about 800 ms");
    assert!(spread <= Duration::from_millis(1800), "drained over {spread:?}, expected about 800 ms");
    let on_b1 = poll(SECOND, async || {
        let l = get_json(api, "/clients?broker=broker1").await;
        l.as_array().unwrap().is_empty().then_some(l)
    })
    .await;
    assert!(on_b1.is_some(), "/clients shows nothing left on broker1");
    assert_eq!(broker_json(api, "broker1").await["state"], "draining");
    let events = get_json(api, "/events").await;
    assert!(
        events["events"].as_array().unwrap().iter().any(|e| e["kind"] == "drain" && e["broker"] == "broker1"),
        "{events}"
    );
    mg.shutdown().await;
}

// ---- /events ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_show_the_failover_and_state_changes_in_order() {
    let mut net = Net::start(2);
    let mg = net.meshgate("").await;
    let api = mg.http_addr().unwrap();
    let start = get_json(api, "/events").await;
    let since = start["last_seq"].as_u64().unwrap();

    blocking(|| net.broker("broker1").kill());
    let got = poll(3 * SECOND, async || {
        let e = get_json(api, &format!("/events?since={since}")).await;
        let list = e["events"].as_array().unwrap();
        let has = |kind: &str| list.iter().any(|x| x["kind"] == kind && x["broker"].is_string());
        (has("failover") && has("state_change")).then_some(e)
    })
    .await
    .expect("failover and state_change events after the kill");
    let list = got["events"].as_array().unwrap();
    let seqs: Vec<u64> = list.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.iter().all(|s| *s > since), "only events after ?since: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "increasing seq: {seqs:?}");
    assert_eq!(got["last_seq"].as_u64(), seqs.last().copied());
    let change = list.iter().find(|e| e["kind"] == "state_change").unwrap();
    assert_eq!(change["broker"], "broker1");
    assert!(change["message"].as_str().unwrap().contains("down"), "{change}");
    let failover = list.iter().find(|e| e["kind"] == "failover").unwrap();
    assert_eq!(failover["broker"], "broker2", "the failover names the broker that takes clients now");
    assert!(failover["at_ms"].as_u64().unwrap() > 0);

    // Continuing from last_seq gives nothing until something new happens.
    let last = got["last_seq"].as_u64().unwrap();
    let next = get_json(api, &format!("/events?since={last}")).await;
    assert!(next["events"].as_array().unwrap().iter().all(|e| e["seq"].as_u64().unwrap() > last));
    assert!(next["last_seq"].as_u64().unwrap() >= last);
    let all = get_json(api, "/events?since=0").await;
    assert!(all["events"].as_array().unwrap().len() >= list.len());
    // A poller from an earlier process asks for more than exists: it is told where to resume.
    let future = get_json(api, "/events?since=999999").await;
    assert_eq!(future["events"], serde_json::json!([]));
    assert!(future["last_seq"].as_u64().unwrap() < 999_999);
    for bad in ["/events?since=x", "/events?since=-3", "/events?after=1"] {
        let r = get(api, bad).await;
        assert_eq!(r.status, 400, "{bad}");
        r.error();
    }
    mg.shutdown().await;
}

// ---- every route, and the OpenAPI document ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_and_errors_are_json() {
    let net = Net::start(1);
    let mg = net.meshgate(&format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    let api = mg.http_addr().unwrap();
    for &(method, path) in meshgate::http::ROUTES {
        let concrete = path.replace("{name}", "broker1");
        let r = http(api, method, &concrete, Some(TOKEN)).await;
        assert!(r.status != 404 && r.status != 405, "{method} {path} answered {}: {}", r.status, r.body);
        assert!(r.status < 300, "{method} {path} answered {}: {}", r.status, r.body);
        if path != "/metrics" {
            r.json();
        }
        assert_eq!(r.header("cache-control"), Some("no-store"), "{method} {path}");
        // Oversized headers are refused before any handler runs.
        let big = format!("X-Filler: {}\r\n", "a".repeat(20 * 1024));
        let r =
            send(api, &format!("{method} {concrete} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n{big}\r\n")).await;
        assert_eq!(r.status, 431, "{method} {path} with 20 KB of headers");
        assert!(r.error().contains("headers larger than"));
    }
    let tcp = get_json(api, "/tcp-check").await;
    let b1 = find(&tcp, "name", "broker1");
    assert_eq!(b1["ok"], true);
    assert!(b1["latency_ms"].as_f64().is_some() && b1.get("error").is_none(), "{b1}");

    let r = get(api, "/nowhere").await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/nowhere"));
    let r = http(api, "DELETE", "/health", None).await;
    assert_eq!(r.status, 405);
    r.error();
    let r = http(api, "GET", "/brokers/broker1/drain", Some(TOKEN)).await;
    assert_eq!(r.status, 405, "admin actions are POST only");
    r.error();
    // Headers announcing a body over the cap: refused before anything reads it.
    let admin_before = broker_json(api, "broker1").await["admin"].clone();
    let r = send(api, &format!("POST /brokers/broker1/disable HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n")).await;
    assert_eq!(r.status, 413);
    r.error();
    assert_eq!(broker_json(api, "broker1").await["admin"], admin_before, "the refused request changed nothing");
    assert_eq!(admin_before, "draining", "the last admin route run above was drain");
    mg.shutdown().await;
}

#[test]
fn openapi_document_lists_exactly_the_routes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "OpenAPI 3");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let mut documented = BTreeSet::new();
    for (p, item) in doc["paths"].as_mapping().expect("paths") {
        let p = p.as_str().expect("path is a string");
        for (m, op) in item.as_mapping().expect("path item") {
            let m = m.as_str().unwrap();
            if !METHODS.contains(&m) {
                continue;
            }
            assert!(op["responses"].as_mapping().is_some_and(|r| !r.is_empty()), "{m} {p} has responses");
            // Every path parameter is declared.
            if p.contains("{name}") {
                assert!(op["parameters"].as_sequence().is_some_and(|s| !s.is_empty()), "{m} {p} declares {{name}}");
            }
            documented.insert((m.to_ascii_uppercase(), p.to_string()));
        }
    }
    let served: BTreeSet<(String, String)> =
        meshgate::http::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "openapi.yaml vs http::ROUTES: undocumented {missing:?}, not served {extra:?}"
    );
    // Every $ref points at something that exists.
    for r in text.lines().filter_map(|l| l.split("$ref: \"#/").nth(1)) {
        let target = r.split('"').next().unwrap();
        let mut node = &doc;
        for part in target.split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "dangling $ref #/{target}");
    }
}

/// A reload that changes `[admin] token` takes effect at once: the old token is refused, the
/// new one works, and removing it turns admin off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_admin_token_replaces_the_old_one() {
    let net = Net::start(1);
    let mg = net.meshgate(&format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    let api = mg.http_addr().unwrap();
    assert_eq!(http(api, "POST", "/brokers/broker1/enable", Some(TOKEN)).await.status, 200);
    mg.reload(net.config("[admin]\ntoken = \"renewed-token\"\n")).unwrap();
    let old = http(api, "POST", "/brokers/broker1/enable", Some(TOKEN)).await;
    assert_eq!(old.status, 401, "the old token after the reload: {}", old.body);
    assert_eq!(http(api, "POST", "/brokers/broker1/enable", Some("renewed-token")).await.status, 200);
    mg.reload(net.config("")).unwrap();
    let off = http(api, "POST", "/brokers/broker1/enable", Some("renewed-token")).await;
    assert_eq!(off.status, 403, "no token configured: admin is off: {}", off.body);
    mg.shutdown().await;
}

/// A freshly started meshgate exports every counter family, with a zero series for every label
/// value known at start (brokers, reasons, results), so the first event is an `increase()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_has_its_series_from_the_first_scrape() {
    let net = Net::start(2);
    let mg = net.meshgate("").await;
    let s = scrape(mg.http_addr().unwrap()).await;
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(value(&s, name, labels), Some(0.0), "{name}{labels:?} at 0 from the first scrape");
    };
    for broker in ["broker1", "broker2"] {
        for reason in meshgate::upstream::AttemptError::REASONS {
            zero("meshgate_upstream_failures_total", &[("broker", broker), ("reason", reason)]);
        }
    }
    for reason in meshgate::proxy::REJECT_REASONS {
        zero("meshgate_rejected_connections_total", &[("reason", reason)]);
    }
    for reason in meshgate::pool::CLOSE_REASONS.iter().chain(&["malformed"]) {
        zero("meshgate_sessions_closed_total", &[("reason", reason)]);
    }
    for result in ["ok", "error"] {
        zero("meshgate_config_reloads_total", &[("result", result)]);
    }
    for [op, result] in meshgate::durable::OPERATIONS {
        zero("meshgate_session_operations_total", &[("op", op), ("result", result)]);
    }
    // The process itself, and which build runs.
    for name in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(value(&s, name, &[]).is_some_and(|v| v > 0.0), "{name}");
    }
    // Whole seconds in this collector: a young process may have used less than one.
    assert!(value(&s, "process_cpu_seconds_total", &[]).is_some(), "process_cpu_seconds_total present");
    let started = value(&s, "process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - started).abs() < 120.0, "start time {started} vs now {now}");
    let info = s.samples.iter().find(|x| x.metric == "meshgate_build_info").expect("build info");
    assert_eq!(info.labels.get("version"), Some(meshgate::VERSION));
    assert_eq!(info.labels.get("commit"), Some(meshgate::COMMIT));
    mg.shutdown().await;
}
