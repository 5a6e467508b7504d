//! `meshgate client`: a failover-aware MQTT client (basic, sensor, control) built on rumqttc, logging every state change as JSON.
//!
//! What it does on every connection: publishes its status retained to `clients/<id>/status`
//! ("online"), with a will that sets it "offline" if the connection dies; re-subscribes when the
//! broker says it holds no session for it; and reconnects with exponential backoff and jitter,
//! bounded by `--max-backoff`, when the connection is lost.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Connect, announce status, stay connected.
    Basic,
    /// Publish readings with sequence numbers to `sensors/<id>/reading` at `--rate`.
    Sensor,
    /// Subscribe to `control/<id>/cmd` and acknowledge each command on `control/<id>/ack`.
    Control,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// What the client does once connected.
    #[arg(value_enum, default_value_t = Mode::Basic)]
    pub mode: Mode,
    /// Front end host (meshgate or nginx).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Front end MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Client id; also names its topics.
    #[arg(long, default_value = "meshgate-client")]
    pub id: String,
    /// QoS of readings, commands and acknowledgements (0, 1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Readings per second (sensor).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// MQTT username (none by default).
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password (with --username).
    #[arg(long)]
    pub password: Option<String>,
    /// Keep the session on the broker across reconnects (clean session = 0).
    #[arg(long)]
    pub persistent: bool,
    /// MQTT keepalive, seconds.
    #[arg(long, default_value_t = 10)]
    pub keepalive: u64,
    /// Stop after this long (e.g. "30s"); runs until Ctrl-C by default.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Upper bound of the reconnect backoff.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub max_backoff: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshgate::config::parse_duration(s).ok_or_else(|| format!("bad duration {s:?} (e.g. \"30s\", \"500ms\")"))
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// One JSON object per line on stdout: what happened, when, to whom.
fn log(id: &str, event: &str, extra: serde_json::Value) {
    let mut v = json!({ "ts_ms": meshgate::events::unix_ms(SystemTime::now()), "client": id, "event": event });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Exponential backoff from 100 ms, doubled per failed attempt up to `max`, with "equal
/// jitter" (half fixed, half random) so a fleet cut off at once does not return at once.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(max);
    let half = base / 2;
    half + Duration::from_secs_f64(rand::rng().random_range(0.0..=half.as_secs_f64()))
}

pub async fn run(args: ClientArgs, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let id = args.id.clone();
    let status_topic = format!("clients/{id}/status");
    let mut opts = MqttOptions::new(&id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(args.keepalive.max(1)));
    opts.set_clean_session(!args.persistent);
    opts.set_last_will(LastWill::new(&status_topic, "offline", QoS::AtLeastOnce, true));
    if let Some(user) = &args.username {
        opts.set_credentials(user, args.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let cmd_topic = format!("control/{id}/cmd");
    let ack_topic = format!("control/{id}/ack");
    let reading_topic = format!("sensors/{id}/reading");
    let q = qos(args.qos);
    log(
        &id,
        "starting",
        json!({ "mode": format!("{:?}", args.mode).to_lowercase(), "host": args.host, "port": args.port }),
    );

    let started = Instant::now();
    let mut connected = false;
    let mut failures = 0u32;
    let mut seq = 0u64;
    let mut commands = 0u64;
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut next_reading = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let tick = tokio::time::sleep_until(next_reading);
        let event = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick, if connected && args.mode == Mode::Sensor => {
                next_reading += period;
                let payload = json!({ "seq": seq, "ts_ms": meshgate::events::unix_ms(SystemTime::now()) }).to_string();
                if client.try_publish(&reading_topic, q, false, payload).is_ok() {
                    seq += 1;
                }
                continue;
            }
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                failures = 0;
                next_reading = tokio::time::Instant::now();
                log(&id, "connected", json!({ "session_present": ack.session_present }));
                let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, "online");
                // Without a session on the broker, subscriptions are gone: restore them.
                if args.mode == Mode::Control && !ack.session_present {
                    let _ = client.try_subscribe(&cmd_topic, q);
                    log(&id, "subscribing", json!({ "topic": cmd_topic }));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => log(&id, "subscribed", json!({ "topic": cmd_topic })),
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == cmd_topic => {
                commands += 1;
                let _ = client.try_publish(&ack_topic, q, false, p.payload.clone());
                log(&id, "command", json!({ "payload": String::from_utf8_lossy(&p.payload), "acked": true }));
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    connected = false;
                    log(&id, "disconnected", json!({ "error": describe(&e) }));
                }
                let wait = backoff(failures, args.max_backoff);
                failures += 1;
                log(
                    &id,
                    "reconnecting",
                    json!({ "attempt": failures, "in_ms": wait.as_millis() as u64, "error": describe(&e) }),
                );
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    if connected {
        // A clean goodbye: status offline (the will fires only on an unclean loss).
        let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, "offline");
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                    break;
                }
            }
        })
        .await;
    }
    log(&id, "stopped", json!({ "readings": seq, "commands": commands }));
    Ok(())
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("CONNACK refused: {code:?}"),
        ConnectionError::Io(io) => format!("io: {io}"),
        ConnectionError::NetworkTimeout => "network timeout".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_bounded_and_jittered() {
        let max = Duration::from_secs(5);
        for attempt in 0..30 {
            let b = backoff(attempt, max);
            let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(max);
            assert!(b >= base / 2 && b <= base, "attempt {attempt}: {b:?} outside [{:?}, {base:?}]", base / 2);
        }
        assert!(backoff(40, max) <= max);
        let samples: std::collections::HashSet<u128> = (0..20).map(|_| backoff(5, max).as_micros()).collect();
        assert!(samples.len() > 1, "jittered");
    }
}
