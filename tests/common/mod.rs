//! Test harness: real Mosquitto brokers on each test's own loopback addresses, and meshgate in-process.
#![allow(dead_code)]

pub mod broker;
pub mod etcd;
pub mod instance;
pub mod mqtt;
pub mod netns;
pub mod paho;
pub mod slot;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

pub use broker::{start_pool, start_pool_with, Mosquitto};
use meshgate::{Config, Meshgate};
pub use slot::Slot;

/// A test's network: its slot and its brokers (broker1..brokerN at slot .10, .11, ...).
pub struct Net {
    pub slot: Slot,
    pub brokers: Vec<Mosquitto>,
}

impl Net {
    pub fn start(n: usize) -> Net {
        let slot = Slot::acquire();
        let brokers = start_pool(&slot, n);
        Net { slot, brokers }
    }

    /// Brokers with extra config lines (`{dir}` = each broker's temp dir).
    pub fn start_with(n: usize, extra: &str) -> Net {
        let slot = Slot::acquire();
        let brokers = start_pool_with(&slot, n, extra);
        Net { slot, brokers }
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.slot.addr(1, 1883)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.slot.addr(1, 8080)
    }

    /// meshgate TOML for this net: listeners on the slot's .1, the brokers in order, and
    /// `extra` appended (more tables, e.g. `[proxy]`).
    pub fn config_text(&self, extra: &str) -> String {
        let mut t = format!("[listen]\nmqtt = \"{}\"\nhttp = \"{}\"\n{extra}\n", self.mqtt_addr(), self.http_addr());
        t.push_str(quiet_access_log(extra));
        for b in &self.brokers {
            t.push_str(&format!("[[broker]]\nname = \"{}\"\naddress = \"{}\"\n", b.name, b.addr));
        }
        t
    }

    pub fn config(&self, extra: &str) -> Config {
        Config::from_toml(&self.config_text(extra), "test").expect("test config is valid")
    }

    /// Starts meshgate and waits until every broker has been probed once.
    pub async fn meshgate(&self, extra: &str) -> Meshgate {
        let mg = Meshgate::start(self.config(extra)).await.expect("meshgate starts");
        let pool = mg.pool().clone();
        mqtt::wait_until(Duration::from_secs(5), || pool.brokers().iter().all(|b| b.probe_up().is_some()))
            .await
            .expect("every broker probed within 5 s");
        mg
    }

    pub fn broker(&mut self, name: &str) -> &mut Mosquitto {
        self.brokers.iter_mut().find(|b| b.name == name).expect("broker exists")
    }
}

/// Tests that do not look at the access log turn it off: on stdout, thousands of session lines
/// would bury the test output.
fn quiet_access_log(extra: &str) -> &'static str {
    if extra.contains("[access_log]") {
        ""
    } else {
        "[access_log]\nenabled = false\n"
    }
}

/// meshgate TOML for `brokers` brokers (not started here) at the slot's .10, .11, ..., its
/// listeners on .1: `extra` tables first, `broker_extra` lines in every `[[broker]]`.
pub fn slot_config_text(slot: &Slot, brokers: usize, extra: &str, broker_extra: &str) -> String {
    let mut text = format!("[listen]\nmqtt = \"{}\"\nhttp = \"{}\"\n{extra}\n", slot.addr(1, 1883), slot.addr(1, 8080));
    text.push_str(quiet_access_log(extra));
    for i in 0..brokers {
        text.push_str(&format!(
            "[[broker]]\nname = \"broker{}\"\naddress = \"{}\"\n{broker_extra}\n",
            i + 1,
            slot.addr(10 + i as u8, 1883)
        ));
    }
    text
}

/// Watches open client streams until `n` of them are closed by the peer or `limit` passes;
/// returns when each closed, measured from `since`, in closing order.
pub async fn close_times(
    streams: Vec<tokio::net::TcpStream>,
    n: usize,
    since: impl Into<tokio::time::Instant>,
    limit: Duration,
) -> Vec<Duration> {
    let since: tokio::time::Instant = since.into();
    let mut open: Vec<_> = streams.into_iter().map(Some).collect();
    let mut closed_at = Vec::new();
    while closed_at.len() < n && since.elapsed() < limit {
        for slot in open.iter_mut() {
            if let Some(s) = slot {
                if mqtt::closed_within(s, Duration::from_millis(5)).await {
                    closed_at.push(since.elapsed());
                    *slot = None;
                }
            }
        }
    }
    closed_at
}

/// Runs a blocking harness call (start, restart, hang) without stalling the test's runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A rumqttc client on `addr` (a broker directly, or meshgate), subscribed to `filter` at QoS 1
/// once this returns; every PUBLISH it receives goes to `on_publish` until the task is dropped.
pub async fn subscribed(
    addr: SocketAddr,
    id: &str,
    filter: &str,
    mut on_publish: impl FnMut(rumqttc::Publish) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                on_publish(p);
            }
        }
    })
}

/// The child's stderr, line by line, read on a thread of its own (so a test can wait on lines
/// with a deadline while the child runs).
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
