//! The active probes: tcp (connect), mqtt (CONNECT/CONNACK) and pubsub (a message routed through the broker).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{HealthConfig, ProbeKind};
use crate::mqtt::{connack, encode, Length};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("broker closed the connection during the {0}")]
    Closed(&'static str),
    #[error("CONNACK refused with code {0:#04x}")]
    Refused(u8),
    #[error("bad reply: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send + 'a>>;

/// One way of asking a broker whether it serves. The checker owns timing, thresholds and
/// state; a probe only answers once.
pub trait Probe: Send + Sync {
    fn kind(&self) -> ProbeKind;
    fn check<'a>(&'a self, address: &'a str) -> ProbeFuture<'a>;
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

pub struct TcpProbe;

impl Probe for TcpProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Tcp
    }
    fn check<'a>(&'a self, address: &'a str) -> ProbeFuture<'a> {
        Box::pin(async move {
            TcpStream::connect(address).await.map_err(ProbeError::Connect)?;
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

impl Probe for MqttProbe {
    fn kind(&self) -> ProbeKind {
        if self.pubsub {
            ProbeKind::Pubsub
        } else {
            ProbeKind::Mqtt
        }
    }
    fn check<'a>(&'a self, address: &'a str) -> ProbeFuture<'a> {
        Box::pin(async move {
            let mut s = TcpStream::connect(address).await.map_err(ProbeError::Connect)?;
            s.set_nodelay(true)?;
            let id = probe_client_id();
            let pkt = encode::connect(self.version, &id, true, 10, self.username.as_deref(), self.password.as_deref());
            s.write_all(&pkt).await?;
            let mut buf = Vec::with_capacity(64);
            let (ack, used) = loop {
                if let Some(r) = connack::parse(&buf).map_err(|e| ProbeError::Protocol(e.to_string()))? {
                    break r;
                }
                read_more(&mut s, &mut buf, "CONNACK").await?;
            };
            buf.drain(..used);
            if ack.code != 0 {
                return Err(ProbeError::Refused(ack.code));
            }
            if self.pubsub {
                let topic = format!("{PROBE_TOPIC_PREFIX}{id}");
                s.write_all(&encode::subscribe(self.version, 1, &topic, 0)).await?;
                wait_for(&mut s, &mut buf, "SUBACK", |first, _| first == 0x90).await?;
                let payload = id.as_bytes();
                s.write_all(&encode::publish(self.version, &topic, payload)).await?;
                wait_for(&mut s, &mut buf, "PUBLISH", |first, body| {
                    first >> 4 == 3 && body.windows(payload.len()).any(|w| w == payload)
                })
                .await?;
            }
            // A polite goodbye keeps broker logs free of "socket error" lines.
            let _ = s.write_all(&encode::disconnect()).await;
            Ok(())
        })
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, waiting_for: &'static str) -> Result<(), ProbeError> {
    if buf.len() > 64 * 1024 {
        return Err(ProbeError::Protocol(format!("more than 64 KiB without a {waiting_for}")));
    }
    let mut chunk = [0u8; 1024];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        return Err(ProbeError::Closed(waiting_for));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads packets until one matches; others (retained messages, for example) are skipped.
async fn wait_for(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    what: &'static str,
    matches: impl Fn(u8, &[u8]) -> bool,
) -> Result<(), ProbeError> {
    loop {
        while buf.len() >= 2 {
            let Length::Done(len, n) = crate::mqtt::decode_length(&buf[1..]) else { break };
            let total = 1 + n + len as usize;
            if buf.len() < total {
                break;
            }
            if matches(buf[0], &buf[1 + n..total]) {
                buf.drain(..total);
                return Ok(());
            }
            buf.drain(..total);
        }
        read_more(s, buf, what).await?;
    }
}
