//! What meshgate does on a broker on a client's behalf: put a session's subscriptions back, create a session ahead of its client, and empty a standby copy's queue.
//!
//! None of these connections acknowledges a message it is not meant to take: a QoS 1 or 2
//! message that reaches a restore or migration connection stays unacknowledged in the
//! session, so the broker delivers it again when the client itself connects.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::{timeout_at, Instant};

use super::store::Sub;
use crate::mqtt::subscribe::{encode_subscribe, granted, parse_ack};
use crate::mqtt::{decode_length, encode_length, kind, Length, Reader};
use crate::pool::{Broker, Pool};
use crate::proxy::forward::write_all;
use crate::transport::conn::Conn;

/// Packet ids of meshgate's own SUBSCRIBEs count down from here; the client's own packets
/// are held back until these are acknowledged, so the ids cannot collide.
const FIRST_ID: u16 = 0xffff;

/// Reads whole packets from a broker connection, after the bytes already read with its CONNACK.
pub struct Packets<'a> {
    conn: &'a mut Conn,
    buf: Vec<u8>,
}

impl<'a> Packets<'a> {
    pub fn new(conn: &'a mut Conn, already: Vec<u8>) -> Packets<'a> {
        Packets { conn, buf: already }
    }

    /// The next packet's raw bytes and where its body starts; `Err` when the broker closes.
    pub async fn next(&mut self, deadline: Instant) -> Result<(Vec<u8>, usize), String> {
        loop {
            if !self.buf.is_empty() {
                match decode_length(&self.buf[1..]) {
                    Length::Done(len, n) if self.buf.len() >= 1 + n + len as usize => {
                        let rest = self.buf.split_off(1 + n + len as usize);
                        let raw = std::mem::replace(&mut self.buf, rest);
                        return Ok((raw, 1 + n));
                    }
                    Length::Malformed => return Err("broker sent a malformed packet".into()),
                    _ => {}
                }
            }
            self.buf.reserve(4096);
            match timeout_at(deadline, self.conn.read_buf(&mut self.buf)).await {
                Err(_) => return Err("no answer in time".into()),
                Ok(Ok(0)) => return Err("broker closed the connection".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    /// Bytes read but not yet returned as packets.
    pub fn leftover(self) -> Vec<u8> {
        self.buf
    }
}

/// The options a restore subscribes with: the client's own, but in MQTT 5 without retained
/// messages on subscribe (Retain Handling 2), because for the client the subscription never
/// went away. In 3.x only the QoS bits exist (a record made while the client spoke 5 may
/// carry more).
fn restore_options(version: u8, options: u8) -> u8 {
    match version {
        5 => (options & !0x30) | 0x20,
        _ => options & 3,
    }
}

/// Subscribes `subs` on an established connection and waits for every SUBACK. Packets the
/// broker sends meanwhile (retained messages, in 3.x) are returned in order for the client.
/// Returns how many subscriptions the broker granted.
pub async fn subscribe_all(
    packets: &mut Packets<'_>,
    version: u8,
    subs: &[(String, Sub)],
    deadline: Instant,
) -> Result<(usize, Vec<u8>), String> {
    let mut out = Vec::new();
    let mut waiting = Vec::with_capacity(subs.len());
    for (i, (filter, sub)) in subs.iter().enumerate() {
        let id = FIRST_ID - i as u16;
        out.extend(encode_subscribe(
            version,
            id,
            &sub.properties,
            &[(filter.as_str(), restore_options(version, sub.options))],
        ));
        waiting.push(id);
    }
    timeout_at(deadline, write_all(packets.conn, &out))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut granted_n = 0;
    let mut passed = Vec::new();
    while !waiting.is_empty() {
        let (raw, body) = packets.next(deadline).await?;
        if raw[0] >> 4 == kind::SUBACK {
            let ack = parse_ack(version, &raw[body..]).ok_or("malformed SUBACK")?;
            if let Some(pos) = waiting.iter().position(|&id| id == ack.packet_id) {
                waiting.swap_remove(pos);
                granted_n += ack.codes.iter().filter(|&&c| granted(c)).count();
                continue;
            }
        }
        passed.extend_from_slice(&raw);
    }
    Ok((granted_n, passed))
}

/// The CONNECT meshgate sends for a client: the client's own (so its credentials work),
/// with clean session / clean start cleared; or, when meshgate has not seen it since it
/// started, one built from the record (no password).
pub fn session_connect(
    own: Option<&[u8]>,
    version: u8,
    client_id: &str,
    username: Option<&str>,
    expiry_secs: u64,
) -> Vec<u8> {
    if let Some(p) = own.and_then(without_will).and_then(|p| set_clean(&p, false)) {
        return p;
    }
    let mut b = Vec::with_capacity(32 + client_id.len());
    let name: &[u8] = if version == 3 { b"MQIsdp" } else { b"MQTT" };
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b.push(version);
    b.push(if username.is_some() { 0x80 } else { 0 });
    b.extend_from_slice(&30u16.to_be_bytes());
    if version == 5 {
        // Session Expiry Interval (0x11), four bytes.
        let secs = expiry_secs.min(u64::from(u32::MAX)) as u32;
        b.extend_from_slice(&[5, 0x11]);
        b.extend_from_slice(&secs.to_be_bytes());
    }
    for s in std::iter::once(client_id).chain(username) {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![0x10];
    encode_length(b.len(), &mut out);
    out.extend_from_slice(&b);
    out
}

/// The CONNECT of a connection that ends the session: clean, and in MQTT 5 with a session
/// expiry of 0 (the client's own CONNECT carries its expiry, so 5 uses a built one, which has
/// no password).
pub fn wipe_connect(own: Option<&[u8]>, version: u8, client_id: &str, username: Option<&str>) -> Vec<u8> {
    let keep = match version {
        5 => session_connect(None, version, client_id, username, 0),
        _ => session_connect(own, version, client_id, username, 0),
    };
    set_clean(&keep, true).unwrap_or(keep)
}

/// The client's CONNECT without its will (flags and fields): meshgate's own connections must
/// never make a broker publish the will of a client that is alive. `None` when it does not
/// parse.
fn without_will(packet: &[u8]) -> Option<Vec<u8>> {
    let Length::Done(_, n) = decode_length(packet.get(1..)?) else { return None };
    let body = packet.get(1 + n..)?;
    let mut r = Reader::new(body);
    r.binary()?; // protocol name
    let level = r.u8()?;
    let flags = r.u8()?;
    r.u16()?; // keepalive
    let flags_at = r.position() - 3;
    if level == 5 {
        let len = r.varint()? as usize;
        r.take(len)?;
    }
    r.binary()?; // client id
    if flags & 0x04 == 0 {
        return Some(packet.to_vec());
    }
    let id_end = r.position();
    if level == 5 {
        let len = r.varint()? as usize;
        r.take(len)?;
    }
    r.binary()?; // will topic
    r.binary()?; // will payload
    let will_end = r.position();
    let mut b = Vec::with_capacity(body.len());
    b.extend_from_slice(&body[..id_end]);
    b[flags_at] &= !(0x04 | 0x18 | 0x20);
    b.extend_from_slice(&body[will_end..]);
    let mut out = vec![0x10];
    encode_length(b.len(), &mut out);
    out.extend_from_slice(&b);
    Some(out)
}

/// A CONNECT with the clean session / clean start flag set or cleared; `None` when it does not
/// parse as far as the flags.
fn set_clean(packet: &[u8], clean: bool) -> Option<Vec<u8>> {
    let Length::Done(_, n) = decode_length(packet.get(1..)?) else { return None };
    let name_len = u16::from_be_bytes([*packet.get(1 + n)?, *packet.get(2 + n)?]) as usize;
    let flags_at = 1 + n + 2 + name_len + 1;
    let mut p = packet.to_vec();
    let flags = p.get_mut(flags_at)?;
    *flags = if clean { *flags | 0x02 } else { *flags & !0x02 };
    Some(p)
}

async fn open(pool: &Pool, broker: &Broker, connect: &[u8], version: u8) -> Result<(Conn, bool, Vec<u8>), String> {
    let (conn, ack, bytes) =
        crate::proxy::session::connect_broker(pool, broker, connect, version).await.map_err(|e| e.to_string())?;
    if ack.code != 0 {
        return Err(format!("broker refused the session's CONNECT (code {:#04x})", ack.code));
    }
    // What followed the CONNACK (queued messages) stays for the caller.
    let (_, n) = crate::mqtt::connack::parse(&bytes).ok().flatten().ok_or("CONNACK vanished")?;
    Ok((conn, ack.session_present, bytes[n..].to_vec()))
}

/// Creates the session on `broker` afresh: whatever an older session of this client id held
/// there (subscriptions since dropped, a queue from before a failback) is discarded, then
/// everything recorded is subscribed, and meshgate disconnects. The broker then queues the
/// client's QoS 1 and 2 messages until it connects. `connect` is the session's CONNECT
/// without clean session (`session_connect`).
pub async fn create_session(
    pool: &Pool,
    broker: &Broker,
    connect: &[u8],
    version: u8,
    subs: &[(String, Sub)],
    limit: Duration,
) -> Result<usize, String> {
    let deadline = Instant::now() + limit;
    let fresh = set_clean(connect, true).ok_or("the session's CONNECT does not parse")?;
    let first = match version {
        // Clean start with a session expiry: a new, empty persistent session in one step.
        5 => fresh,
        // 3.x: a clean connection discards the old session, then the persistent one begins.
        _ => {
            let (mut conn, _, _) = timeout_at(deadline, open(pool, broker, &fresh, version))
                .await
                .map_err(|_| "no CONNACK in time".to_string())??;
            let _ = timeout_at(deadline, write_all(&mut conn, &[0xe0, 0x00])).await;
            connect.to_vec()
        }
    };
    let (mut conn, _present, rest) = timeout_at(deadline, open(pool, broker, &first, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    let mut packets = Packets::new(&mut conn, rest);
    let (granted_n, _) = subscribe_all(&mut packets, version, subs, deadline).await?;
    // A normal DISCONNECT: the session stays (3.x: clean session 0; 5: its expiry), the will
    // (if the client's CONNECT had one) is discarded.
    let _ = timeout_at(deadline, write_all(&mut conn, &[0xe0, 0x00])).await;
    Ok(granted_n)
}

/// Connects to a standby copy and acknowledges what it queued, until it has been quiet for
/// `quiet`; returns how many messages were taken. Only while the client is connected
/// elsewhere (and receiving these messages there).
pub async fn trim(
    pool: &Pool,
    broker: &Broker,
    connect: &[u8],
    version: u8,
    quiet: Duration,
    limit: Duration,
) -> Result<(u64, bool), String> {
    let deadline = Instant::now() + limit;
    let (mut conn, present, rest) = timeout_at(deadline, open(pool, broker, connect, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    let mut taken = 0u64;
    let mut packets = Packets::new(&mut conn, rest);
    let mut replies = Vec::new();
    loop {
        let until = (Instant::now() + quiet).min(deadline);
        let (raw, body) = match packets.next(until).await {
            Ok(p) => p,
            Err(_) => break,
        };
        let first = raw[0];
        let id_at = |off: usize| raw.get(off..off + 2).map(|b| [b[0], b[1]]);
        match first >> 4 {
            kind::PUBLISH => {
                taken += 1;
                let qos = (first >> 1) & 3;
                if qos > 0 {
                    let topic_len = raw.get(body..body + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
                    if let Some(id) = id_at(body + 2 + topic_len) {
                        // PUBACK (1) or PUBREC (2), no reason code: success in every version.
                        replies.extend_from_slice(&[if qos == 1 { 0x40 } else { 0x50 }, 2, id[0], id[1]]);
                    }
                }
            }
            // PUBREL of a QoS 2 message: complete it.
            6 => {
                if let Some(id) = id_at(body) {
                    replies.extend_from_slice(&[0x70, 2, id[0], id[1]]);
                }
            }
            _ => {}
        }
        if !replies.is_empty() {
            let data = std::mem::take(&mut replies);
            timeout_at(deadline, write_all(packets.conn, &data))
                .await
                .map_err(|_| "write timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    let _ = timeout_at(deadline, write_all(&mut conn, &[0xe0, 0x00])).await;
    Ok((taken, present))
}

/// Ends whatever session of this client id `broker` holds: one clean connection (`connect`
/// from `wipe_connect`), then DISCONNECT.
pub async fn wipe(pool: &Pool, broker: &Broker, connect: &[u8], version: u8, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let (mut conn, _, _) = timeout_at(deadline, open(pool, broker, connect, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    timeout_at(deadline, write_all(&mut conn, &[0xe0, 0x00]))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_connect_loses_only_its_clean_flag() {
        let own = crate::mqtt::encode::connect(4, "c", true, 30, Some("u"), Some("p"));
        let p = session_connect(Some(&own), 4, "c", None, 0);
        let parsed = crate::mqtt::connect::parse(&p).unwrap();
        assert!(!parsed.clean);
        assert_eq!(parsed.username.as_deref(), Some("u"));
        assert_eq!(p.len(), own.len());
    }

    #[test]
    fn the_will_is_removed_from_the_clients_connect() {
        for version in [4u8, 5] {
            // CONNECT with a will "w/t" = "bye" (QoS 1, retained), user "u", password "p".
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, 0x80 | 0x40 | 0x20 | 0x08 | 0x04, 0, 30];
            if version == 5 {
                body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]); // session expiry 3600
            }
            body.extend_from_slice(&[0, 1, b'c']);
            if version == 5 {
                body.push(0); // will properties
            }
            body.extend_from_slice(&[0, 3, b'w', b'/', b't', 0, 3, b'b', b'y', b'e', 0, 1, b'u', 0, 1, b'p']);
            let mut pkt = vec![0x10];
            encode_length(body.len(), &mut pkt);
            pkt.extend_from_slice(&body);
            let before = crate::mqtt::connect::parse(&pkt).unwrap();
            assert!(before.will);
            let after = crate::mqtt::connect::parse(&session_connect(Some(&pkt), version, "c", None, 0)).unwrap();
            assert!(!after.will && !after.clean, "{after:?}");
            assert_eq!((after.client_id.as_str(), after.username.as_deref()), ("c", Some("u")));
            assert_eq!(after.session_expiry, before.session_expiry);
        }
    }

    #[test]
    fn wiping_connects_clean_and_in_mqtt5_with_no_expiry() {
        let own = crate::mqtt::encode::connect(4, "c", false, 30, Some("u"), Some("p"));
        let w = crate::mqtt::connect::parse(&wipe_connect(Some(&own), 4, "c", Some("u"))).unwrap();
        assert!(w.clean && !w.persistent());
        let w5 = crate::mqtt::connect::parse(&wipe_connect(None, 5, "c", None)).unwrap();
        assert!(w5.clean && !w5.persistent(), "{w5:?}");
    }

    #[test]
    fn clean_flag_is_set_and_cleared_in_place() {
        let own = crate::mqtt::encode::connect(5, "c", false, 30, None, None);
        let fresh = set_clean(&own, true).unwrap();
        assert!(crate::mqtt::connect::parse(&fresh).unwrap().clean);
        assert!(!crate::mqtt::connect::parse(&set_clean(&fresh, false).unwrap()).unwrap().clean);
        assert_eq!(set_clean(&[0x10], true), None, "truncated");
    }

    #[test]
    fn built_connect_carries_the_expiry_in_mqtt5() {
        let p = session_connect(None, 5, "dev-1", Some("u"), 3600);
        let c = crate::mqtt::connect::parse(&p).unwrap();
        assert_eq!((c.version, c.clean, c.session_expiry, c.client_id.as_str()), (5, false, Some(3600), "dev-1"));
        assert!(c.persistent());
        let p4 = session_connect(None, 4, "dev-1", None, 3600);
        let c4 = crate::mqtt::connect::parse(&p4).unwrap();
        assert!(!c4.clean && c4.persistent());
    }

    #[test]
    fn restore_never_asks_for_retained_messages_in_mqtt5() {
        assert_eq!(restore_options(5, 0x01), 0x21);
        assert_eq!(restore_options(5, 0x1d), 0x2d);
        assert_eq!(restore_options(4, 0x01), 0x01);
        assert_eq!(restore_options(4, 0x25), 0x01, "5-only bits never reach a 3.1.1 broker");
    }
}
