//! What meshgate does on a broker on a client's behalf: put a session's subscriptions back, create a session ahead of its client, and empty a standby copy's queue.
//!
//! None of these connections acknowledges a message it is not meant to take: a QoS 1 or 2
//! message that reaches a restore or migration connection stays unacknowledged in the
//! session, so the broker delivers it again when the client itself connects.

use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::store::Sub;
use crate::config::BrokerConfig;
use crate::mqtt::connect::Rewrite;
use crate::mqtt::encode::{self, ConnectFields};
use crate::mqtt::io::PacketReader;
use crate::mqtt::kind;
use crate::mqtt::subscribe::{encode_subscribe, granted, parse_ack};
use crate::transport::{write_all, Conn};
use crate::upstream::Upstream;

/// Packet ids of meshgate's own SUBSCRIBEs count down from here; the client's own packets
/// are held back until these are acknowledged, so the ids cannot collide.
const FIRST_ID: u16 = 0xffff;

/// Largest packet meshgate reads on a session's behalf (a queued message included).
const READ_LIMIT: usize = crate::mqtt::MAX_REMAINING_LENGTH as usize + 5;

/// A broker connection read packet by packet, after the bytes already read with its CONNACK.
pub type Packets<'a> = PacketReader<&'a mut Conn>;

pub fn packets(conn: &mut Conn, already: Vec<u8>) -> Packets<'_> {
    PacketReader::with_buffered(conn, already, READ_LIMIT)
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
    timeout_at(deadline, write_all(*packets.stream(), &out))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut granted_n = 0;
    let mut passed = Vec::new();
    while !waiting.is_empty() {
        let p = timeout_at(deadline, packets.next()).await.map_err(|_| "no answer in time".to_string())?;
        let p = p.map_err(|e| e.to_string())?;
        if p.kind() == kind::SUBACK {
            let ack = parse_ack(version, p.body()).ok_or("malformed SUBACK")?;
            if let Some(pos) = waiting.iter().position(|&id| id == ack.packet_id) {
                waiting.swap_remove(pos);
                granted_n += ack.codes.iter().filter(|&&c| granted(c)).count();
                continue;
            }
        }
        passed.extend_from_slice(&p.bytes);
    }
    Ok((granted_n, passed))
}

/// The CONNECT meshgate sends for a client: the client's own (so its credentials work),
/// without its will and with clean session / clean start cleared; or, when meshgate has not
/// seen it since it started, one built from the record (no password).
pub fn session_connect(
    own: Option<&[u8]>,
    version: u8,
    client_id: &str,
    username: Option<&str>,
    expiry_secs: u64,
) -> Vec<u8> {
    let edit = Rewrite { clean: Some(false), drop_will: true, expiry: None };
    if let Some(p) = own.and_then(|p| Some(crate::mqtt::connect::parse(p).ok()?.rewrite(p, edit))) {
        return p;
    }
    encode::connect_with(&ConnectFields {
        version,
        client_id,
        clean: false,
        keepalive: 30,
        username,
        password: None,
        expiry: (version == 5).then(|| expiry_secs.min(u64::from(u32::MAX)) as u32),
    })
}

/// The CONNECT of a connection that ends the session: clean, without the will, and in MQTT 5
/// with a session expiry of 0.
pub fn wipe_connect(own: Option<&[u8]>, version: u8, client_id: &str, username: Option<&str>) -> Vec<u8> {
    let edit = Rewrite { clean: Some(true), drop_will: true, expiry: (version == 5).then_some(0) };
    if let Some(p) = own.and_then(|p| Some(crate::mqtt::connect::parse(p).ok()?.rewrite(p, edit))) {
        return p;
    }
    let fields =
        ConnectFields { version, client_id, clean: true, keepalive: 30, username, password: None, expiry: None };
    encode::connect_with(&fields)
}

async fn open(
    up: &Upstream,
    broker: &BrokerConfig,
    connect: &[u8],
    version: u8,
) -> Result<(Conn, bool, Vec<u8>), String> {
    let (conn, ack, bytes) = up.handshake(broker, connect, version, None).await.map_err(|e| e.to_string())?;
    if ack.code != 0 {
        return Err(format!("broker refused the session's CONNECT (code {:#04x})", ack.code));
    }
    // What followed the CONNACK (queued messages) stays for the caller.
    let (_, n) = crate::mqtt::connack::parse(&bytes).ok().flatten().ok_or("CONNACK vanished")?;
    Ok((conn, ack.session_present, bytes[n..].to_vec()))
}

/// Sets or clears clean session / clean start in a CONNECT meshgate made for a session.
fn with_clean(connect: &[u8], clean: bool) -> Option<Vec<u8>> {
    let c = crate::mqtt::connect::parse(connect).ok()?;
    Some(c.rewrite(connect, Rewrite { clean: Some(clean), ..Rewrite::default() }))
}

/// Creates the session on `broker` afresh: whatever an older session of this client id held
/// there (subscriptions since dropped, a queue from before a failback) is discarded, then
/// everything recorded is subscribed, and meshgate disconnects. The broker then queues the
/// client's QoS 1 and 2 messages until it connects. `connect` is the session's CONNECT
/// without clean session (`session_connect`).
pub async fn create_session(
    up: &Upstream,
    broker: &BrokerConfig,
    connect: &[u8],
    version: u8,
    subs: &[(String, Sub)],
    limit: Duration,
) -> Result<usize, String> {
    let deadline = Instant::now() + limit;
    let fresh = with_clean(connect, true).ok_or("the session's CONNECT does not parse")?;
    let first = match version {
        // Clean start with a session expiry: a new, empty persistent session in one step.
        5 => fresh,
        // 3.x: a clean connection discards the old session, then the persistent one begins.
        _ => {
            let (mut conn, _, _) = timeout_at(deadline, open(up, broker, &fresh, version))
                .await
                .map_err(|_| "no CONNACK in time".to_string())??;
            let _ = timeout_at(deadline, write_all(&mut conn, &encode::disconnect())).await;
            connect.to_vec()
        }
    };
    let (mut conn, _present, rest) = timeout_at(deadline, open(up, broker, &first, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    let mut packets = packets(&mut conn, rest);
    let (granted_n, _) = subscribe_all(&mut packets, version, subs, deadline).await?;
    // A normal DISCONNECT: the session stays (3.x: clean session 0; 5: its expiry), the will
    // (if the client's CONNECT had one) is discarded.
    let _ = timeout_at(deadline, write_all(&mut conn, &encode::disconnect())).await;
    Ok(granted_n)
}

/// Connects to a standby copy and acknowledges what it queued, until it has been quiet for
/// `quiet`; returns how many messages were taken. Only while the client is connected
/// elsewhere (and receiving these messages there).
pub async fn trim(
    up: &Upstream,
    broker: &BrokerConfig,
    connect: &[u8],
    version: u8,
    quiet: Duration,
    limit: Duration,
) -> Result<(u64, bool), String> {
    let deadline = Instant::now() + limit;
    let (mut conn, present, rest) = timeout_at(deadline, open(up, broker, connect, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    let mut taken = 0u64;
    let mut packets = packets(&mut conn, rest);
    let mut replies = Vec::new();
    loop {
        let until = (Instant::now() + quiet).min(deadline);
        let p = match timeout_at(until, packets.next()).await {
            Ok(Ok(p)) => p,
            _ => break,
        };
        let body = p.body();
        let id_at = |off: usize| body.get(off..off + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        match p.kind() {
            kind::PUBLISH => {
                taken += 1;
                let qos = (p.first() >> 1) & 3;
                if qos > 0 {
                    let topic_len = id_at(0).unwrap_or(0) as usize;
                    if let Some(id) = id_at(2 + topic_len) {
                        replies.extend_from_slice(&encode::ack(if qos == 1 { kind::PUBACK } else { kind::PUBREC }, id));
                    }
                }
            }
            // PUBREL of a QoS 2 message: complete it.
            kind::PUBREL => {
                if let Some(id) = id_at(0) {
                    replies.extend_from_slice(&encode::ack(kind::PUBCOMP, id));
                }
            }
            _ => {}
        }
        if !replies.is_empty() {
            let data = std::mem::take(&mut replies);
            timeout_at(deadline, write_all(*packets.stream(), &data))
                .await
                .map_err(|_| "write timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    let _ = timeout_at(deadline, write_all(&mut conn, &encode::disconnect())).await;
    Ok((taken, present))
}

/// Ends whatever session of this client id `broker` holds: one clean connection (`connect`
/// from `wipe_connect`), then DISCONNECT.
pub async fn wipe(
    up: &Upstream,
    broker: &BrokerConfig,
    connect: &[u8],
    version: u8,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let (mut conn, _, _) = timeout_at(deadline, open(up, broker, connect, version))
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
    timeout_at(deadline, write_all(&mut conn, &encode::disconnect()))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_connect_loses_only_its_clean_flag() {
        let own = encode::connect(4, "c", true, 30, Some("u"), Some("p"));
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
            crate::mqtt::encode_length(body.len(), &mut pkt);
            pkt.extend_from_slice(&body);
            let before = crate::mqtt::connect::parse(&pkt).unwrap();
            assert!(before.will);
            let after = crate::mqtt::connect::parse(&session_connect(Some(&pkt), version, "c", None, 0)).unwrap();
            assert!(!after.will && !after.clean, "{after:?}");
            assert_eq!((after.client_id.as_str(), after.username.as_deref()), ("c", Some("u")));
            assert_eq!(after.session_expiry, before.session_expiry);
            // The wipe keeps the client's credentials in 5 too, with an expiry of 0.
            let wipe = crate::mqtt::connect::parse(&wipe_connect(Some(&pkt), version, "c", None)).unwrap();
            assert!(wipe.clean && !wipe.will && !wipe.persistent(), "{wipe:?}");
            assert_eq!(wipe.username.as_deref(), Some("u"));
        }
    }

    #[test]
    fn wiping_connects_clean_and_in_mqtt5_with_no_expiry() {
        let own = encode::connect(4, "c", false, 30, Some("u"), Some("p"));
        let w = crate::mqtt::connect::parse(&wipe_connect(Some(&own), 4, "c", Some("u"))).unwrap();
        assert!(w.clean && !w.persistent());
        let w5 = crate::mqtt::connect::parse(&wipe_connect(None, 5, "c", None)).unwrap();
        assert!(w5.clean && !w5.persistent(), "{w5:?}");
        let own5 =
            encode::connect_with(&ConnectFields { version: 5, client_id: "c", expiry: Some(60), ..Default::default() });
        let w5 = crate::mqtt::connect::parse(&wipe_connect(Some(&own5), 5, "c", None)).unwrap();
        assert_eq!((w5.clean, w5.session_expiry), (true, Some(0)));
    }

    #[test]
    fn clean_flag_is_set_and_cleared_in_place() {
        let own = encode::connect(5, "c", false, 30, None, None);
        let fresh = with_clean(&own, true).unwrap();
        assert!(crate::mqtt::connect::parse(&fresh).unwrap().clean);
        assert!(!crate::mqtt::connect::parse(&with_clean(&fresh, false).unwrap()).unwrap().clean);
        assert_eq!(with_clean(&[0x10], true), None, "truncated");
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
