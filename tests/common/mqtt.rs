//! A raw MQTT client for tests that must see exact bytes: CONNECT/CONNACK codes, timings, malformed input.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The CONNACK as the server sent it. `code` is the v3/v4 return code (0 accepted, 1 bad protocol
/// version, 2 identifier rejected, 3 server unavailable, 4 bad user name or password, 5 not
/// authorized) or the v5 reason code (0x00 success, 0x86 bad user name or password, 0x87 not
/// authorized, 0x88 server unavailable, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connack {
    pub session_present: bool,
    pub code: u8,
}

/// Keepalive used by `connect`/`connect_with`: long enough that no test is disturbed by it.
pub const DEFAULT_KEEPALIVE: u16 = 60;

/// Error message prefixes returned by `connect`/`connect_with`, so tests can match on the cause
/// (e.g. `err.starts_with(mqtt::ERR_REFUSED)`); the rest of the message carries details.
pub const ERR_REFUSED: &str = "connect refused";
pub const ERR_CONNECT_TIMEOUT: &str = "timed out connecting";
pub const ERR_CONNECT: &str = "connect failed";
pub const ERR_CONNACK_TIMEOUT: &str = "timed out waiting for CONNACK";
pub const ERR_CLOSED: &str = "closed before CONNACK";
pub const ERR_NOT_CONNACK: &str = "not a CONNACK";

/// Appends the MQTT variable-length "remaining length" (1 to 4 bytes, 7 bits each, low first).
pub fn encode_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    assert!(len <= 268_435_455, "remaining length {len} exceeds the MQTT maximum");
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Decodes a remaining length from the start of `bytes`: Some((value, bytes used)), or None if
/// the encoding is incomplete or longer than the 4 bytes MQTT allows.
pub fn decode_remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A whole packet from its first byte and body, with the remaining length filled in.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Encodes a CONNECT. version: 3 (MQTT 3.1, "MQIsdp"), 4 (3.1.1) or 5 (with empty properties).
/// No will; username/password flags are set only for the parts given.
pub fn connect_packet(
    version: u8,
    client_id: &str,
    clean: bool,
    keepalive: u16,
    user: Option<&str>,
    pass: Option<&str>,
) -> Vec<u8> {
    let name: &[u8] = match version {
        3 => b"MQIsdp",
        4 | 5 => b"MQTT",
        v => panic!("unsupported MQTT protocol level {v}"),
    };
    let mut flags = 0u8;
    if clean {
        flags |= 0x02;
    }
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    let mut body = Vec::new();
    put_str(&mut body, name);
    body.push(version);
    body.push(flags);
    body.extend_from_slice(&keepalive.to_be_bytes());
    if version == 5 {
        body.push(0); // property length
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some(u) = user {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = pass {
        put_str(&mut body, p.as_bytes());
    }
    packet(0x10, &body)
}

/// `connect_with` with a clean session and no credentials.
pub async fn connect(
    addr: SocketAddr,
    version: u8,
    client_id: &str,
    timeout: Duration,
) -> Result<(TcpStream, Connack), String> {
    connect_with(addr, version, client_id, true, None, None, timeout).await
}

/// Connects TCP to addr, sends a CONNECT and reads the CONNACK, all within `timeout`; returns the
/// still-open stream and the CONNACK (whatever its code). Errors start with one of the `ERR_*`
/// prefixes: refused, timed out connecting, connect failed, timed out waiting for CONNACK, closed
/// before CONNACK, not a CONNACK.
pub async fn connect_with(
    addr: SocketAddr,
    version: u8,
    client_id: &str,
    clean: bool,
    user: Option<&str>,
    pass: Option<&str>,
    timeout: Duration,
) -> Result<(TcpStream, Connack), String> {
    let start = Instant::now();
    let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(format!("{ERR_CONNECT_TIMEOUT} to {addr} after {timeout:?}")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(format!("{ERR_REFUSED} by {addr}: {e}"))
        }
        Ok(Err(e)) => return Err(format!("{ERR_CONNECT} to {addr}: {e}")),
        Ok(Ok(s)) => s,
    };
    stream.set_nodelay(true).ok();
    let pkt = connect_packet(version, client_id, clean, DEFAULT_KEEPALIVE, user, pass);
    if let Err(e) = stream.write_all(&pkt).await {
        return Err(format!("{ERR_CLOSED} (writing CONNECT to {addr}: {e})"));
    }
    let left = timeout.saturating_sub(start.elapsed());
    let (first, body) = match read_packet_inner(&mut stream, left).await {
        Ok(p) => p,
        Err(ReadError::Timeout) => return Err(format!("{ERR_CONNACK_TIMEOUT} from {addr} after {timeout:?}")),
        Err(ReadError::Closed) => return Err(format!("{ERR_CLOSED} by {addr}")),
        Err(ReadError::Io(e)) => return Err(format!("{ERR_CLOSED} by {addr}: {e}")),
        Err(ReadError::Malformed(m)) => return Err(format!("{ERR_NOT_CONNACK} from {addr}: {m}")),
    };
    // v3/v4 bodies are exactly flags + code; v5 adds properties, which tests don't need.
    if first != 0x20 || body.len() < 2 {
        return Err(format!("{ERR_NOT_CONNACK} from {addr}: first byte {first:#04x}, body {body:02x?}"));
    }
    let connack = Connack { session_present: body[0] & 0x01 != 0, code: body[1] };
    Ok((stream, connack))
}

/// PUBLISH in v3.1.1 encoding; the packet id is only written for QoS > 0.
pub fn publish_packet(topic: &str, payload: &[u8], qos: u8, packet_id: u16, retain: bool) -> Vec<u8> {
    assert!(qos <= 2, "bad QoS {qos}");
    let first = 0x30 | (qos << 1) | u8::from(retain);
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(first, &body)
}

/// SUBSCRIBE with a single filter (v3.1.1 encoding).
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(filter.len() + 5);
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

pub fn pingreq_packet() -> Vec<u8> {
    vec![0xC0, 0x00]
}

pub fn disconnect_packet() -> Vec<u8> {
    vec![0xE0, 0x00]
}

/// PUBACK for a received QoS 1 PUBLISH.
pub fn puback_packet(packet_id: u16) -> Vec<u8> {
    packet(0x40, &packet_id.to_be_bytes())
}

/// A received PUBLISH (v3.1.1 encoding), as split by `parse_publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
}

/// Splits a PUBLISH returned by `read_packet`; None if it is not a well-formed v3.1.1 PUBLISH.
pub fn parse_publish(first: u8, body: &[u8]) -> Option<Publish> {
    if first & 0xF0 != 0x30 {
        return None;
    }
    let qos = (first >> 1) & 0x03;
    let tlen = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let topic = String::from_utf8(body.get(2..2 + tlen)?.to_vec()).ok()?;
    let mut rest = &body[2 + tlen..];
    let packet_id = if qos > 0 {
        let id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        rest = &rest[2..];
        Some(id)
    } else {
        None
    };
    Some(Publish { topic, payload: rest.to_vec(), qos, retain: first & 0x01 != 0, dup: first & 0x08 != 0, packet_id })
}

enum ReadError {
    Timeout,
    Closed,
    Io(std::io::Error),
    Malformed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Timeout => write!(f, "timed out waiting for a packet"),
            ReadError::Closed => write!(f, "closed by peer"),
            ReadError::Io(e) => write!(f, "read error: {e}"),
            ReadError::Malformed(m) => write!(f, "malformed packet: {m}"),
        }
    }
}

async fn read_packet_inner(stream: &mut TcpStream, timeout: Duration) -> Result<(u8, Vec<u8>), ReadError> {
    let read = async {
        let mut header = [0u8; 5];
        read_full(stream, &mut header[..1]).await?;
        // The remaining length arrives one byte at a time until a byte without the high bit.
        let mut n = 1;
        loop {
            read_full(stream, &mut header[n..n + 1]).await?;
            n += 1;
            if header[n - 1] & 0x80 == 0 {
                break;
            }
            if n == 5 {
                return Err(ReadError::Malformed(format!("remaining length {:02x?} too long", &header[1..])));
            }
        }
        let (len, _) = decode_remaining_length(&header[1..n]).expect("terminated above");
        let mut body = vec![0u8; len];
        read_full(stream, &mut body).await?;
        Ok((header[0], body))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::Timeout),
    }
}

async fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ReadError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Closed),
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Reads one whole MQTT packet (fixed header + body) within `timeout`; returns (first byte, body).
/// Errors: "timed out waiting for a packet", "closed by peer", "read error: ...", "malformed
/// packet: ...". A timeout may leave a partly read packet behind, so don't keep reading after one.
pub async fn read_packet(stream: &mut TcpStream, timeout: Duration) -> Result<(u8, Vec<u8>), String> {
    read_packet_inner(stream, timeout).await.map_err(|e| e.to_string())
}

/// True when the peer closes the stream (read returns 0 or an error such as a reset) within
/// `timeout`. Anything the peer sends meanwhile is read and discarded.
pub async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(timeout, drain).await.is_ok()
}

/// Polls `cond` every 10 ms (checking at once first) until it returns true or `deadline` has
/// passed; returns how long it took, or None on timeout. Uses tokio's clock so it also works
/// with paused time.
pub async fn wait_until<F: FnMut() -> bool>(deadline: Duration, mut cond: F) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The same over a blocking `std` socket, for tests that drive `meshgate run` from plain threads.
pub mod blocking {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    /// One whole packet: (first byte, body).
    pub fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
        let mut first = [0u8; 1];
        s.read_exact(&mut first)?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body)?;
        Ok((first[0], body))
    }

    /// A clean-session 3.1.1 client with `id`, accepted (CONNACK 0), reads timing out after
    /// `read_timeout`.
    pub fn connected(addr: SocketAddr, id: &str, read_timeout: Duration) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(read_timeout)).unwrap();
        s.write_all(&super::connect_packet(4, id, true, 60, None, None)).unwrap();
        let (first, body) = read_packet(&mut s).unwrap_or_else(|e| panic!("CONNACK for {id} via {addr}: {e}"));
        assert_eq!((first, body.get(1).copied()), (0x20, Some(0)), "{id} accepted via {addr}");
        s
    }
}
