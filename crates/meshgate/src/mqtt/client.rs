//! A small raw MQTT 3.1.1 client: exact timings and CONNACK codes, no hidden retries; used by the suite and the replication lag probes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{connack, decode_length, encode, encode_length, Length};

pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
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
    /// Connects and waits for the CONNACK; returns the client, the CONNACK code and how long it took.
    pub async fn connect(
        addr: &str,
        client_id: &str,
        clean: bool,
        limit: Duration,
    ) -> Result<(RawClient, u8, Duration), String> {
        let started = Instant::now();
        let run = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let mut c = RawClient { stream, buf: Vec::with_capacity(256), next_id: 1, inbox: Default::default() };
            c.send(&encode::connect(4, client_id, clean, 30, None, None)).await?;
            loop {
                if let Some((ack, n)) = connack::parse(&c.buf).map_err(|e| e.to_string())? {
                    c.buf.drain(..n);
                    return Ok((c, ack.code));
                }
                c.fill().await?;
            }
        };
        match timeout(limit, run).await {
            Ok(Ok((c, code))) => Ok((c, code, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no CONNACK within {limit:?}")),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).await.map_err(|e| format!("write: {e}"))
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("connection closed".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The next whole packet: (first byte, body).
    async fn packet(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            if self.buf.len() >= 2 {
                match decode_length(&self.buf[1..]) {
                    Length::Done(len, n) if self.buf.len() >= 1 + n + len as usize => {
                        let first = self.buf[0];
                        let body = self.buf[1 + n..1 + n + len as usize].to_vec();
                        self.buf.drain(..1 + n + len as usize);
                        return Ok((first, body));
                    }
                    Length::Malformed => return Err("malformed packet".into()),
                    _ => {}
                }
            }
            self.fill().await?;
        }
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
        self.wait_for(9, None, limit, "SUBACK").await
    }

    /// Reads until a packet of `kind` (with `id` as its first two body bytes, if given)
    /// arrives; PUBLISHes read meanwhile are acknowledged and kept in the inbox.
    async fn wait_for(&mut self, kind: u8, id: Option<u16>, limit: Duration, what: &str) -> Result<(), String> {
        let wait = async {
            loop {
                let (first, body) = self.packet().await?;
                if first >> 4 == 3 {
                    let m = self.on_publish(first, &body).await?;
                    self.inbox.push_back(m);
                } else if first >> 4 == kind && id.is_none_or(|id| body.get(..2) == Some(&id.to_be_bytes()[..])) {
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
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut pkt = vec![0x30 | (qos << 1) | u8::from(retain)];
        encode_length(body.len(), &mut pkt);
        pkt.extend_from_slice(&body);
        self.send(&pkt).await?;
        if qos == 0 {
            return Ok(());
        }
        self.wait_for(4, Some(id), limit, "PUBACK").await
    }

    /// The next PUBLISH within `limit`, `Ok(None)` when none came.
    pub async fn next_message(&mut self, limit: Duration) -> Result<Option<Message>, String> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        let wait = async {
            loop {
                let (first, body) = self.packet().await?;
                if first >> 4 == 3 {
                    return self.on_publish(first, &body).await;
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
            self.send(&[0x40, 0x02, id[0], id[1]]).await?;
        }
        Ok(Message { topic, payload: rest.to_vec(), retain: first & 1 == 1, qos })
    }

    /// PINGREQ and wait for PINGRESP.
    pub async fn ping(&mut self, limit: Duration) -> Result<(), String> {
        self.send(&[0xc0, 0x00]).await?;
        self.wait_for(13, None, limit, "PINGRESP").await
    }

    pub async fn disconnect(mut self) {
        let _ = self.send(&encode::disconnect()).await;
    }
}
