//! The load generator's own lean MQTT 3.1.1 client pieces: open a session, build PUBLISH
//! batches in place, and walk whole packets in a read buffer without copying them.
//!
//! A general client (rumqttc) allocates per message and runs its own event loop; on a 2-core
//! machine that shared the cores with the broker and the proxy under test, its cost would
//! show up as the proxy's. This client does one write per batch and one read per chunk.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use meshgate::mqtt::{connack, decode_length, encode, encode_length, Length};

/// Payload bytes the generator needs: send time (ns), sequence number, publisher index.
pub const STAMP: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("TCP connect: {0}")]
    Connect(std::io::Error),
    #[error("no CONNACK within {0:?}")]
    ConnackTimeout(Duration),
    #[error("CONNACK refused with code {0}")]
    Refused(u8),
    #[error("closed before CONNACK")]
    Closed,
    #[error("{0}")]
    Protocol(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// A short label for error counts.
    pub fn label(&self) -> &'static str {
        match self {
            WireError::Connect(_) => "connect",
            WireError::ConnackTimeout(_) => "connack_timeout",
            WireError::Refused(_) => "refused",
            WireError::Closed => "closed_before_connack",
            WireError::Protocol(_) => "protocol",
            WireError::Io(_) => "io",
        }
    }
}

/// Connects, sends CONNECT (3.1.1, clean session) and waits for an accepting CONNACK within
/// `limit` (the TCP connect included). Returns the stream and the CONNECT-to-CONNACK time.
pub async fn open(addr: SocketAddr, client_id: &str, keepalive: u16, limit: Duration) -> Result<TcpStream, WireError> {
    let deadline = Instant::now() + limit;
    let mut stream = dial(addr, limit).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let connect = encode::connect(4, client_id, true, keepalive, None, None);
    match timeout(left, handshake(&mut stream, &connect)).await {
        Err(_) => Err(WireError::ConnackTimeout(limit)),
        Ok(r) => r.map(|()| stream),
    }
}

/// A TCP connection to `addr` within `limit` (counted as a CONNACK timeout: the handshake's
/// budget), with nodelay.
pub async fn dial(addr: SocketAddr, limit: Duration) -> Result<TcpStream, WireError> {
    let stream = match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => return Err(WireError::ConnackTimeout(limit)),
        Ok(r) => r.map_err(WireError::Connect)?,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends `connect` on `stream` and reads until an accepting CONNACK (a refusal, a close or
/// anything else is the error): the session handshake over any byte stream (TCP, TLS).
pub async fn handshake<S>(stream: &mut S, connect: &[u8]) -> Result<(), WireError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(connect).await?;
    let mut buf = [0u8; 64];
    let mut have = 0;
    loop {
        match connack::parse(&buf[..have]) {
            Ok(Some((ack, _))) if ack.code == 0 => return Ok(()),
            Ok(Some((ack, _))) => return Err(WireError::Refused(ack.code)),
            Ok(None) => {}
            Err(e) => return Err(WireError::Protocol(e.to_string())),
        }
        if have == buf.len() {
            return Err(WireError::Protocol("CONNACK larger than 64 bytes".into()));
        }
        match stream.read(&mut buf[have..]).await? {
            0 => return Err(WireError::Closed),
            n => have += n,
        }
    }
}

/// SUBSCRIBE to one filter and wait for its SUBACK.
pub async fn subscribe(stream: &mut TcpStream, filter: &str, qos: u8, limit: Duration) -> Result<(), WireError> {
    stream.write_all(&encode::subscribe(4, 1, filter, qos)).await?;
    let mut rb = ReadBuf::new(256);
    let wait = async {
        loop {
            while let Some(p) = rb.next_packet()? {
                if p.first >> 4 == 9 {
                    if p.body.get(2).is_some_and(|&c| c >= 0x80) {
                        return Err(WireError::Protocol(format!("SUBACK refused {filter}")));
                    }
                    return Ok(());
                }
            }
            if rb.fill(stream).await? == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    };
    timeout(limit, wait).await.map_err(|_| WireError::Protocol(format!("no SUBACK within {limit:?}")))?
}

/// Appends one PUBLISH whose payload starts with the generator's stamp and is padded to
/// `payload` bytes.
pub fn push_publish(out: &mut Vec<u8>, topic: &[u8], qos: u8, id: u16, payload: usize, stamp: Stamp) {
    let payload = payload.max(STAMP);
    let body = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload;
    out.push(0x30 | (qos << 1));
    encode_length(body, out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(&stamp.sent_ns.to_be_bytes());
    out.extend_from_slice(&stamp.seq.to_be_bytes());
    out.extend_from_slice(&stamp.publisher.to_be_bytes());
    out.resize(out.len() + payload - STAMP, b'x');
}

/// What the generator writes at the start of every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the run's base instant: when the message was due to be sent.
    pub sent_ns: u64,
    pub seq: u64,
    pub publisher: u32,
}

/// A received PUBLISH, borrowed from the read buffer.
pub struct Publish<'a> {
    pub qos: u8,
    pub id: u16,
    pub payload: &'a [u8],
}

impl Publish<'_> {
    pub fn stamp(&self) -> Option<Stamp> {
        let p = self.payload.get(..STAMP)?;
        Some(Stamp {
            sent_ns: u64::from_be_bytes(p[0..8].try_into().ok()?),
            seq: u64::from_be_bytes(p[8..16].try_into().ok()?),
            publisher: u32::from_be_bytes(p[16..20].try_into().ok()?),
        })
    }
}

/// One whole packet in the read buffer.
pub struct Packet<'a> {
    pub first: u8,
    pub body: &'a [u8],
}

impl<'a> Packet<'a> {
    pub fn publish(&self) -> Option<Publish<'a>> {
        if self.first >> 4 != 3 {
            return None;
        }
        let qos = (self.first >> 1) & 3;
        let tlen = u16::from_be_bytes([*self.body.first()?, *self.body.get(1)?]) as usize;
        let mut rest = self.body.get(2 + tlen..)?;
        let mut id = 0;
        if qos > 0 {
            id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
            rest = &rest[2..];
        }
        Some(Publish { qos, id, payload: rest })
    }
}

/// A read buffer that hands out whole packets and compacts only when it must.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub fn new(capacity: usize) -> ReadBuf {
        ReadBuf { buf: vec![0; capacity], start: 0, end: 0 }
    }

    /// Reads once; returns the bytes read (0 at EOF).
    pub async fn fill<R: AsyncReadExt + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                // One packet larger than the buffer: grow.
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next whole packet, or `None` when more bytes are needed.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'_>>, WireError> {
        let data = &self.buf[self.start..self.end];
        if data.len() < 2 {
            return Ok(None);
        }
        match decode_length(&data[1..]) {
            Length::Partial => Ok(None),
            Length::Malformed => Err(WireError::Protocol("malformed remaining length".into())),
            Length::Done(len, n) => {
                let total = 1 + n + len as usize;
                if data.len() < total {
                    return Ok(None);
                }
                let first = data[0];
                let at = self.start;
                self.start += total;
                Ok(Some(Packet { first, body: &self.buf[at + 1 + n..at + total] }))
            }
        }
    }
}

/// The target's socket address (resolved once, so connects do not resolve again).
pub fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    target
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve target {target:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("target {target:?} has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_the_read_buffer() {
        let mut out = Vec::new();
        let stamp = Stamp { sent_ns: 123_456_789, seq: 42, publisher: 7 };
        push_publish(&mut out, b"bench/0", 1, 9, 80, stamp);
        push_publish(&mut out, b"bench/0", 0, 0, 200, stamp);
        let mut rb = ReadBuf::new(16);
        rb.buf = out.clone();
        rb.end = out.len();
        let p = rb.next_packet().unwrap().unwrap();
        let publish = p.publish().unwrap();
        assert_eq!((publish.qos, publish.id, publish.payload.len()), (1, 9, 80));
        assert_eq!(publish.stamp(), Some(stamp));
        let p = rb.next_packet().unwrap().unwrap();
        // 200-byte payload: a two-byte remaining length.
        assert_eq!(p.publish().unwrap().payload.len(), 200);
        assert!(rb.next_packet().unwrap().is_none());
    }
}
