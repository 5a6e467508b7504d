//! `meshgate client` through meshgate while the primary dies: JSON state log, backoff, re-subscribe, continuing sequence numbers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::{blocking, Net};

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

struct ClientProc {
    child: Child,
    lines: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl ClientProc {
    fn start(net: &Net, mode: &str, id: &str, extra: &[&str]) -> ClientProc {
        let addr = net.mqtt_addr();
        let mut args = vec!["client", mode, "--host", &addr.ip().to_string(), "--id", id]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(["--port".into(), addr.port().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(BIN).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        ClientProc { child, lines: rx, seen: Vec::new() }
    }

    /// Waits for the `n`th (1-based) event named `event`; returns it.
    fn wait_event(&mut self, event: &str, n: usize, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let found: Vec<&serde_json::Value> = self.seen.iter().filter(|v| v["event"] == event).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no event {event:?} #{n} within {limit:?}; log: {:?}", self.seen));
            if let Ok(v) = self.lines.recv_timeout(left) {
                self.seen.push(v);
            }
        }
    }

    fn interrupt(&mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        let _ = self.child.wait();
        while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(v);
        }
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Subscribes on one broker directly and returns a stream of (topic, payload).
async fn direct_subscriber(
    addr: std::net::SocketAddr,
    id: &str,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)> {
    let (mut c, ack) = raw::connect(addr, 4, id, Duration::from_secs(2)).await.unwrap();
    assert_eq!(ack.code, 0);
    use tokio::io::AsyncWriteExt;
    c.write_all(&raw::subscribe_packet(1, filter, 1)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut pinged = Instant::now();
        loop {
            if pinged.elapsed() > Duration::from_secs(5) {
                pinged = Instant::now();
                let _ = c.write_all(&raw::pingreq_packet()).await;
            }
            match raw::read_packet(&mut c, Duration::from_millis(500)).await {
                Ok((first, body)) if first >> 4 == 3 => {
                    let p = raw::parse_publish(first, &body).unwrap();
                    if p.qos > 0 {
                        let _ = c.write_all(&raw::puback_packet(p.packet_id.unwrap())).await;
                    }
                    if tx.send((p.topic, p.payload)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) if e.contains("timed out") => {}
                Err(_) => return,
            }
        }
    });
    rx
}

fn seq_of(payload: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(payload).unwrap()["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_keeps_publishing_across_a_failover() {
    let mut net = Net::start(2);
    // The client's own reconnect is under test: meshgate closes the session (by default it
    // would switch it under the client, which then notices nothing).
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let mut on1 = direct_subscriber(net.brokers[0].addr, "watch-1", "sensors/#").await;
    let mut on2 = direct_subscriber(net.brokers[1].addr, "watch-2", "sensors/#").await;
    let mut c = ClientProc::start(&net, "sensor", "s-1", &["--rate", "20", "--max-backoff", "1s"]);
    let first = tokio::task::block_in_place(|| c.wait_event("connected", 1, Duration::from_secs(5)));
    assert_eq!(first["session_present"], false);
    assert_eq!(first["client"], "s-1");
    // Readings arrive on broker1 with increasing sequence numbers.
    let mut last = None;
    for _ in 0..5 {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(3), on1.recv()).await.unwrap().unwrap();
        assert_eq!(topic, "sensors/s-1/reading");
        let s = seq_of(&payload);
        assert!(last.is_none_or(|l| s > l));
        last = Some(s);
    }
    blocking(|| net.broker("broker1").kill());
    tokio::task::block_in_place(|| {
        c.wait_event("disconnected", 1, Duration::from_secs(5));
        c.wait_event("reconnecting", 1, Duration::from_secs(5));
        c.wait_event("connected", 2, Duration::from_secs(10));
    });
    // ... and continue on broker2, numbering on from where they were.
    let (_, payload) = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (t, p) = on2.recv().await.unwrap();
            if t == "sensors/s-1/reading" {
                return (t, p);
            }
        }
    })
    .await
    .expect("readings resume on broker2");
    assert!(seq_of(&payload) > last.unwrap(), "sequence continues");
    assert_eq!(mg.pool().broker_of("s-1").as_deref(), Some("broker2"));
    // The reconnect waited a backoff with jitter, bounded by --max-backoff.
    let r = c.seen.iter().find(|v| v["event"] == "reconnecting").unwrap().clone();
    assert!(r["in_ms"].as_u64().unwrap() <= 1000, "{r}");
    // The retained status on broker2 says online.
    let mut st = direct_subscriber(net.brokers[1].addr, "status-reader", "clients/s-1/status").await;
    let (_, p) = tokio::time::timeout(Duration::from_secs(2), st.recv()).await.unwrap().unwrap();
    assert_eq!(p, b"online");
    c.interrupt();
    let stopped = c.seen.iter().find(|v| v["event"] == "stopped").expect("stopped logged").clone();
    assert!(stopped["readings"].as_u64().unwrap() >= 5);
    let (_, p) = tokio::time::timeout(Duration::from_secs(2), st.recv()).await.unwrap().unwrap();
    assert_eq!(p, b"offline", "a clean stop sets the status offline");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_client_acknowledges_and_resubscribes_after_failover() {
    use tokio::io::AsyncWriteExt;
    let mut net = Net::start(2);
    // The client's own reconnect and resubscribe are under test (see the sensor test).
    let mg = net.meshgate("[proxy]\nmove = \"close\"\n").await;
    let mut c = ClientProc::start(&net, "control", "ctl-1", &["--max-backoff", "1s"]);
    tokio::task::block_in_place(|| c.wait_event("subscribed", 1, Duration::from_secs(5)));
    let mut acks1 = direct_subscriber(net.brokers[0].addr, "acks-1", "control/ctl-1/ack").await;
    let (mut cmd, _) = raw::connect(net.brokers[0].addr, 4, "commander-1", Duration::from_secs(2)).await.unwrap();
    cmd.write_all(&raw::publish_packet("control/ctl-1/cmd", b"open-valve", 0, 0, false)).await.unwrap();
    let (_, p) = tokio::time::timeout(Duration::from_secs(3), acks1.recv()).await.unwrap().unwrap();
    assert_eq!(p, b"open-valve");

    blocking(|| net.broker("broker1").kill());
    tokio::task::block_in_place(|| {
        let again = c.wait_event("connected", 2, Duration::from_secs(10));
        assert_eq!(again["session_present"], false);
        // No session on broker2: the client restores its subscription itself.
        c.wait_event("subscribed", 2, Duration::from_secs(5));
    });
    let mut acks2 = direct_subscriber(net.brokers[1].addr, "acks-2", "control/ctl-1/ack").await;
    let (mut cmd, _) = raw::connect(net.brokers[1].addr, 4, "commander-2", Duration::from_secs(2)).await.unwrap();
    cmd.write_all(&raw::publish_packet("control/ctl-1/cmd", b"close-valve", 0, 0, false)).await.unwrap();
    let (_, p) = tokio::time::timeout(Duration::from_secs(3), acks2.recv()).await.unwrap().unwrap();
    assert_eq!(p, b"close-valve");
    assert!(wait_until(Duration::from_secs(1), || c.seen.iter().filter(|v| v["event"] == "command").count() >= 1)
        .await
        .is_some());
    c.interrupt();
    assert_eq!(c.seen.iter().find(|v| v["event"] == "stopped").unwrap()["commands"], 2);
    mg.shutdown().await;
}
