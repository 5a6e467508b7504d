//! The active probes: tcp (connect), mqtt (CONNECT/CONNACK) and pubsub (a message routed through the broker).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{BrokerConfig, HealthConfig, ProbeKind};
use crate::mqtt::io::{PacketReader, ReadError};
use crate::mqtt::{connack, encode, kind};
use crate::transport::write_all;
use crate::upstream::{AttemptError, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Connect(#[from] AttemptError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("waiting for the {0}: {1}")]
    Read(&'static str, ReadError),
    #[error("CONNACK refused with code {0:#04x}")]
    Refused(u8),
    #[error("bad reply: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send + 'a>>;

/// One way of asking a broker whether it serves. The checker owns timing, thresholds and
/// state; a probe only answers once. It reaches the broker as clients do (`Upstream`: TCP or
/// TLS as the broker is configured).
pub trait Probe: Send + Sync {
    fn kind(&self) -> ProbeKind;
    fn check<'a>(&'a self, upstream: &'a Upstream, broker: &'a BrokerConfig) -> ProbeFuture<'a>;
}

pub fn for_config(h: &HealthConfig) -> Box<dyn Probe> {
    match h.probe {
        ProbeKind::Tcp => Box::new(TcpProbe),
        ProbeKind::Mqtt | ProbeKind::Pubsub => Box::new(MqttProbe {
            pubsub: h.probe == ProbeKind::Pubsub,
            version: h.mqtt_version,
            username: h.username.clone(),
            password: h.password.clone(),
        }),
    }
}

/// Connects (and, for a TLS broker, completes the handshake).
pub struct TcpProbe;

impl Probe for TcpProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Tcp
    }
    fn check<'a>(&'a self, upstream: &'a Upstream, broker: &'a BrokerConfig) -> ProbeFuture<'a> {
        Box::pin(async move {
            upstream.connect(broker).await?;
            Ok(())
        })
    }
}

pub struct MqttProbe {
    pub pubsub: bool,
    pub version: u8,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Probe client ids are unique per process and probe, so a probe can never take over a real
/// client's session (brokers disconnect the older of two connections with one id).
fn probe_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("meshgate-probe-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The topic prefix of pubsub probes; replication never forwards it.
pub const PROBE_TOPIC_PREFIX: &str = "meshgate/probe/";

/// Largest packet a probe reads (a retained message on its topic, at worst).
const PROBE_READ_LIMIT: usize = 1 << 20;

impl Probe for MqttProbe {
    fn kind(&self) -> ProbeKind {
        if self.pubsub {
            ProbeKind::Pubsub
        } else {
            ProbeKind::Mqtt
        }
    }
    fn check<'a>(&'a self, upstream: &'a Upstream, broker: &'a BrokerConfig) -> ProbeFuture<'a> {
        Box::pin(async move {
            let mut conn = upstream.connect(broker).await?;
            let id = probe_client_id();
            let pkt = encode::connect(self.version, &id, true, 10, self.username.as_deref(), self.password.as_deref());
            write_all(&mut conn, &pkt).await?;
            let mut r = PacketReader::new(&mut conn, PROBE_READ_LIMIT);
            let first = r.next().await.map_err(|e| ProbeError::Read("CONNACK", e))?;
            let (ack, _) = connack::parse(&first.bytes)
                .map_err(|e| ProbeError::Protocol(e.to_string()))?
                .ok_or_else(|| ProbeError::Protocol("malformed CONNACK".into()))?;
            if ack.code != 0 {
                return Err(ProbeError::Refused(ack.code));
            }
            if self.pubsub {
                let topic = format!("{PROBE_TOPIC_PREFIX}{id}");
                write_all(*r.stream(), &encode::subscribe(self.version, 1, &topic, 0)).await?;
                wait_for(&mut r, "SUBACK", |p| p.kind() == kind::SUBACK).await?;
                let payload = id.as_bytes();
                write_all(*r.stream(), &encode::publish(self.version, &topic, payload)).await?;
                wait_for(&mut r, "PUBLISH", |p| {
                    p.kind() == kind::PUBLISH && p.body().windows(payload.len()).any(|w| w == payload)
                })
                .await?;
            }
            // A polite goodbye keeps broker logs free of "socket error" lines.
            let _ = write_all(*r.stream(), &encode::disconnect()).await;
            Ok(())
        })
    }
}

/// Reads packets until one matches; others (retained messages, for example) are skipped.
async fn wait_for<S: tokio::io::AsyncRead + Unpin>(
    r: &mut PacketReader<S>,
    what: &'static str,
    matches: impl Fn(&crate::mqtt::io::Packet) -> bool,
) -> Result<(), ProbeError> {
    loop {
        let p = r.next().await.map_err(|e| ProbeError::Read(what, e))?;
        if matches(&p) {
            return Ok(());
        }
    }
}

/// One CONNECT/CONNACK exchange with the plain-TCP broker at `address` within `limit`: for
/// whoever starts brokers and waits until they serve (the local cluster, the test suite).
pub async fn answers_mqtt(address: &str, limit: std::time::Duration) -> bool {
    let upstream = Upstream::plain(limit);
    let broker = BrokerConfig::at(address);
    let probe = MqttProbe { pubsub: false, version: 4, username: None, password: None };
    matches!(tokio::time::timeout(limit, probe.check(&upstream, &broker)).await, Ok(Ok(())))
}
