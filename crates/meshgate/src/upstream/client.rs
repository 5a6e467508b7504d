//! A small raw MQTT 3.1.1 client over the upstream connector: exact timings and CONNACK codes, no hidden retries; used by the replication lag probes and the test suite.

use std::time::{Duration, Instant};

use tokio::time::timeout;

use super::Upstream;
use crate::config::BrokerConfig;
use crate::mqtt::io::{self, Packet, PacketReader};
use crate::mqtt::{connack, encode, kind};
use crate::transport::{write_all, Conn};

/// Largest packet the client reads.
const READ_LIMIT: usize = 16 << 20;

pub struct RawClient {
    reader: PacketReader<Conn>,
    next_id: u16,
    /// PUBLISHes that arrived while waiting for something else (a PUBACK, a PINGRESP); they
    /// were acknowledged on arrival and are handed out by `next_message`.
    inbox: std::collections::VecDeque<Message>,
}

/// A PUBLISH the client received.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: u8,
}

impl RawClient {
    /// Connects over plain TCP and waits for the CONNACK; returns the client, the CONNACK code
    /// and how long it took.
    pub async fn connect(
        addr: &str,
        client_id: &str,
        clean: bool,
        limit: Duration,
    ) -> Result<(RawClient, u8, Duration), String> {
        RawClient::connect_via(&Upstream::plain(limit), &BrokerConfig::at(addr), client_id, clean, limit).await
    }

    /// Connects to `broker` the way every connection to it is made (TCP or TLS) and waits for
    /// the CONNACK.
    pub async fn connect_via(
        upstream: &Upstream,
        broker: &BrokerConfig,
        client_id: &str,
        clean: bool,
        limit: Duration,
    ) -> Result<(RawClient, u8, Duration), String> {
        let started = Instant::now();
        let run = async {
            let conn = upstream.connect(broker).await.map_err(|e| e.to_string())?;
            let mut c =
                RawClient { reader: PacketReader::new(conn, READ_LIMIT), next_id: 1, inbox: Default::default() };
            c.send(&encode::connect(4, client_id, clean, 30, None, None)).await?;
            let p = c.packet().await?;
            let (ack, _) = connack::parse(&p.bytes).map_err(|e| e.to_string())?.ok_or("malformed CONNACK")?;
            Ok((c, ack.code))
        };
        match timeout(limit, run).await {
            Ok(Ok((c, code))) => Ok((c, code, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no CONNACK within {limit:?}")),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        write_all(self.reader.stream(), bytes).await.map_err(|e| format!("write: {e}"))
    }

    /// The next whole packet.
    async fn packet(&mut self) -> Result<Packet, String> {
        self.reader.next().await.map_err(|e| match e {
            io::ReadError::Closed => "connection closed".to_string(),
            e => e.to_string(),
        })
    }

    fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Subscribes and waits for the SUBACK; PUBLISHes that arrive first wait for `next_message`.
    pub async fn subscribe(&mut self, filter: &str, qos: u8, limit: Duration) -> Result<(), String> {
        let id = self.id();
        self.send(&encode::subscribe(4, id, filter, qos)).await?;
        self.wait_for(kind::SUBACK, None, limit, "SUBACK").await
    }

    /// Reads until a packet of type `want` (with `id` as its first two body bytes, if given)
    /// arrives; PUBLISHes read meanwhile are acknowledged and kept in the inbox.
    async fn wait_for(&mut self, want: u8, id: Option<u16>, limit: Duration, what: &str) -> Result<(), String> {
        let wait = async {
            loop {
                let p = self.packet().await?;
                if p.kind() == kind::PUBLISH {
                    let m = self.on_publish(p.first(), p.body()).await?;
                    self.inbox.push_back(m);
                } else if p.kind() == want && id.is_none_or(|id| p.body().get(..2) == Some(&id.to_be_bytes()[..])) {
                    return Ok::<(), String>(());
                }
            }
        };
        timeout(limit, wait).await.map_err(|_| format!("no {what} within {limit:?}"))?
    }

    /// Publishes; at QoS 1 waits for the PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        limit: Duration,
    ) -> Result<(), String> {
        let id = if qos > 0 { self.id() } else { 0 };
        let pkt = encode::publish_with(4, topic, payload, qos, retain, id);
        self.send(&pkt).await?;
        if qos == 0 {
            return Ok(());
        }
        self.wait_for(kind::PUBACK, Some(id), limit, "PUBACK").await
    }

    /// The next PUBLISH within `limit`, `Ok(None)` when none came.
    pub async fn next_message(&mut self, limit: Duration) -> Result<Option<Message>, String> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        let wait = async {
            loop {
                let p = self.packet().await?;
                if p.kind() == kind::PUBLISH {
                    return self.on_publish(p.first(), p.body()).await;
                }
            }
        };
        match timeout(limit, wait).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn on_publish(&mut self, first: u8, body: &[u8]) -> Result<Message, String> {
        let qos = (first >> 1) & 3;
        let tlen =
            u16::from_be_bytes([*body.first().ok_or("short PUBLISH")?, *body.get(1).ok_or("short PUBLISH")?]) as usize;
        let topic = String::from_utf8_lossy(body.get(2..2 + tlen).ok_or("short PUBLISH")?).into_owned();
        let mut rest = &body[2 + tlen..];
        if qos > 0 {
            let id = rest.get(..2).ok_or("short PUBLISH")?.to_vec();
            rest = &rest[2..];
            self.send(&encode::ack(kind::PUBACK, u16::from_be_bytes([id[0], id[1]]))).await?;
        }
        Ok(Message { topic, payload: rest.to_vec(), retain: first & 1 == 1, qos })
    }

    /// PINGREQ and wait for PINGRESP.
    pub async fn ping(&mut self, limit: Duration) -> Result<(), String> {
        self.send(&encode::pingreq()).await?;
        self.wait_for(kind::PINGRESP, None, limit, "PINGRESP").await
    }

    pub async fn disconnect(mut self) {
        let _ = self.send(&encode::disconnect()).await;
    }
}
