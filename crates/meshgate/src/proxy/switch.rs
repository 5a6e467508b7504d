//! Moving a session to another broker under the client's open connection: the client sees no CONNACK and no disconnect, only its packets going on.
//!
//! As pgbouncer hands a client to another server connection at a transaction boundary, a
//! session moves at a packet boundary once its session state is rebuilt on the new broker:
//! 1. while forwarding goes on, the new broker gets the client's own CONNECT (its will and
//!    clean flag as sent) and the subscriptions this connection holds (MQTT 5: Retain
//!    Handling 2; 3.x: the retained messages that answer them are dropped, up to a
//!    PINGREQ/PINGRESP barrier);
//! 2. both brokers deliver a while longer (`OVERLAP`: a message published on the new broker
//!    just before the subscription existed reaches the old one through replication), then
//!    both streams are brought to a packet boundary;
//! 3. the cut: the old broker's new deliveries are no longer forwarded (the new broker, already
//!    subscribed, has the same messages through replication), the client's acknowledgements
//!    still go to the old broker, everything else the client sends waits for the new one,
//!    until no QoS 1/2 flow is open on the old broker either way;
//! 4. the switch: DISCONNECT to the old broker (its copy of the will is discarded), what the
//!    client sent meanwhile to the new one, and forwarding goes on there.
//!
//! What cannot move this way closes as before, and says why: MQTT 5 enhanced
//! authentication, subscriptions not all known, no broker to move to, the new broker refusing,
//! QoS flows still open on the old broker after the deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, timeout_at, Instant};

use super::forward::{Ended, ForwardError};
use super::session::Live;
use super::Proxy;
use crate::durable::remote;
use crate::mqtt::io::{PacketReader, ReadError};
use crate::mqtt::{connack, encode, kind};
use crate::transport::{write_all, Conn};
use crate::upstream::AttemptError;

/// How long both brokers deliver to a moving session before the old one stops: longer than
/// replication takes to copy a message from one broker to another on a healthy network.
const OVERLAP: Duration = Duration::from_millis(100);

/// Why a session could not move; the label is the `result` of `meshgate_session_switches_total`.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("no other broker takes sessions now")]
    NoTarget,
    #[error("MQTT 5 enhanced authentication cannot be replayed to another broker")]
    EnhancedAuth,
    #[error(
        "its subscriptions are not all known (more than sessions.max_subscriptions, or a request too large to read)"
    )]
    Incomplete,
    #[error("another operation on this client id's session did not finish in time")]
    Busy,
    #[error("the streams did not reach a packet boundary within {0:?}")]
    Boundary(Duration),
    #[error("the new broker: {0}")]
    Connect(AttemptError),
    #[error("the new broker refused the client's CONNECT (code {0:#04x})")]
    Refused(u8),
    #[error("putting the subscriptions back: {0}")]
    Restore(String),
    #[error("QoS 1/2 flows still open on the old broker after {0:?} ({1} of the client's, {2} to it)")]
    Inflight(Duration, u32, u32),
    /// The session ended on its own meanwhile (a side closed or failed).
    #[error("the session ended while moving")]
    Ended(Ended),
}

impl SwitchError {
    pub fn reason(&self) -> &'static str {
        match self {
            SwitchError::NoTarget => "no_target",
            SwitchError::EnhancedAuth => "enhanced_auth",
            SwitchError::Incomplete => "subscriptions_unknown",
            SwitchError::Busy => "busy",
            SwitchError::Boundary(_) => "no_boundary",
            SwitchError::Connect(_) => "connect_failed",
            SwitchError::Refused(_) => "refused",
            SwitchError::Restore(_) => "restore_failed",
            SwitchError::Inflight(..) => "inflight",
            SwitchError::Ended(_) => "ended",
        }
    }

    /// Every `result` label besides "ok", so the metrics start at zero.
    pub const RESULTS: [&'static str; 10] = [
        "no_target",
        "enhanced_auth",
        "subscriptions_unknown",
        "busy",
        "no_boundary",
        "connect_failed",
        "refused",
        "restore_failed",
        "inflight",
        "ended",
    ];

    /// How the session ended, for its last log and access log line: on its own (a side closed
    /// or failed while it moved), or closed by meshgate (`None`).
    pub fn ended(self) -> Option<Ended> {
        match self {
            SwitchError::Ended(e) => Some(e),
            _ => None,
        }
    }
}

/// Moves `live` to the broker that takes new clients. On success forwarding goes on there;
/// on failure the session is to be closed (the client reconnects, as without switching).
pub(super) async fn switch(proxy: &Arc<Proxy>, live: &mut Live, why: &'static str) -> Result<(), SwitchError> {
    let started = Instant::now();
    let result = switch_inner(proxy, live, why).await;
    let m = &proxy.pool.metrics;
    let label = match &result {
        Ok(()) => "ok",
        Err(e) => e.reason(),
    };
    m.switches.with_label_values(&[why, label]).inc();
    match &result {
        Ok(()) => {
            m.switch_duration.observe(started.elapsed().as_secs_f64());
            tracing::debug!(client_id = %live.session.info.client_id, broker = %live.session.broker.name, why, took_ms = started.elapsed().as_millis() as u64, "session switched");
        }
        Err(SwitchError::Ended(_)) => {}
        Err(e) => {
            tracing::info!(client_id = %live.session.info.client_id, broker = %live.session.broker.name, why, "session could not switch, closing it: {e}")
        }
    }
    result
}

async fn switch_inner(proxy: &Arc<Proxy>, live: &mut Live, why: &'static str) -> Result<(), SwitchError> {
    let cfg = proxy.pool.proxy_config();
    let connect = crate::mqtt::connect::parse(&live.connect).map_err(|e| SwitchError::Restore(e.to_string()))?;
    if connect.enhanced_auth {
        return Err(SwitchError::EnhancedAuth);
    }
    let subs = live.track.lock().subscriptions().ok_or(SwitchError::Incomplete)?;
    let old = live.session.broker.clone();
    let lease = proxy.pool.pick(std::slice::from_ref(&old)).ok_or(SwitchError::NoTarget)?;
    if !lease.broker().available(Instant::now()) {
        // `pick` falls back to any enabled broker when none is available; a move does not.
        return Err(SwitchError::NoTarget);
    }
    let target = lease.broker().clone();
    let version = connect.version;
    // A persistent session's record changes home: that takes the client id's turn, as every
    // other operation on the session does.
    let durable = &proxy.durable;
    if live.session.info.persistent {
        // Wait, as a connecting client does, while sessions are moved off a failed broker or
        // outdated copies are wiped from one that came back.
        durable.pass_barrier().await;
    }
    let turn = match live.session.info.persistent && durable.enabled() {
        true => Some(
            timeout_at(Instant::now() + cfg.connack_timeout, durable.lock(&connect.client_id))
                .await
                .map_err(|_| SwitchError::Busy)?,
        ),
        false => None,
    };

    // 1. The session on the new broker, made while forwarding goes on: the old broker keeps
    // delivering until the new one is subscribed.
    let own_connect = live.connect.clone();
    let prepare_new = async {
        let (mut conn, ack, bytes) =
            proxy.upstream.handshake(&target.config(), &own_connect, version).await.map_err(SwitchError::Connect)?;
        if ack.code != 0 {
            return Err(SwitchError::Refused(ack.code));
        }
        match prepare(&mut conn, &bytes, version, &subs, Instant::now() + cfg.connack_timeout).await {
            Ok(to_client) => Ok((conn, to_client)),
            Err(e) => {
                give_up(&mut conn).await;
                Err(e)
            }
        }
    };
    tokio::pin!(prepare_new);
    let prepared = tokio::select! {
        r = &mut prepare_new => r,
        e = live.forward() => return Err(SwitchError::Ended(e)),
    };
    let (mut conn, to_client) = prepared?;

    // 2. Both brokers deliver a while longer: a message published on the new broker just
    // before its subscription existed reaches the old one through replication, and must still
    // be forwarded from there (the client may get it twice; it does not miss it).
    tokio::select! {
        _ = tokio::time::sleep(OVERLAP) => {}
        e = live.forward() => {
            give_up(&mut conn).await;
            return Err(SwitchError::Ended(e));
        }
    }
    if live.track.lock().subscriptions().as_deref() != Some(subs.as_slice()) {
        give_up(&mut conn).await;
        return Err(SwitchError::Incomplete);
    }

    // Between packets both ways.
    let limit = cfg.connack_timeout;
    let deadline = Instant::now() + limit;
    while !live.at_boundaries() {
        tokio::select! {
            e = live.forward() => {
                give_up(&mut conn).await;
                return Err(SwitchError::Ended(e));
            }
            _ = sleep_until(deadline) => {
                give_up(&mut conn).await;
                return Err(SwitchError::Boundary(limit));
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }

    // 3. The cut.
    let to_new = match cut(proxy, live, Instant::now() + 2 * cfg.connack_timeout).await {
        Ok(b) => b,
        Err(e) => {
            let _ =
                timeout_at(Instant::now() + Duration::from_millis(200), write_all(&mut conn, &encode::disconnect()))
                    .await;
            return Err(e);
        }
    };

    // 4. The switch.
    let _ =
        timeout_at(Instant::now() + Duration::from_millis(200), write_all(&mut live.upstream, &encode::disconnect()))
            .await;
    live.upstream = conn;
    if !to_new.is_empty() {
        write_all(&mut live.upstream, &to_new).await.map_err(|e| SwitchError::Connect(AttemptError::Connect(e)))?;
    }
    if !to_client.is_empty() {
        let mut n = 0;
        live.track
            .lock()
            .feed(false, &mut live.down_scanner, &to_client, &mut n)
            .map_err(|e| SwitchError::Restore(e.to_string()))?;
        live.session.packets_out.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        write_all(&mut live.client, &to_client)
            .await
            .map_err(|e| SwitchError::Ended(Ended::BrokerSide(ForwardError::Io(e))))?;
    }
    let info = live.session.info.clone();
    // The old registration is closing (the move asked it to), so the new one does not count
    // as a second connection of the client id; dropping the old one afterwards is not the
    // client id's last.
    let fresh = proxy.pool.register(lease, info);
    for (to, from) in [
        (&fresh.bytes_in, &live.session.bytes_in),
        (&fresh.bytes_out, &live.session.bytes_out),
        (&fresh.packets_in, &live.session.packets_in),
        (&fresh.packets_out, &live.session.packets_out),
    ] {
        to.fetch_add(from.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed);
    }
    drop(std::mem::replace(&mut live.session, fresh));
    if turn.is_some() {
        durable.on_established(&connect, &live.connect, &target.name);
        live.track.lock().moved_to(&target.name);
    }
    drop(turn);
    let _ = why;
    Ok(())
}

/// Leaves the new broker again before the switch: a normal DISCONNECT, so it discards the
/// client's will it was given.
async fn give_up(conn: &mut Conn) {
    let _ = timeout_at(Instant::now() + Duration::from_millis(200), write_all(conn, &encode::disconnect())).await;
}

/// Puts the subscriptions back on the new connection and collects what the new broker sent
/// for the client meanwhile (a persistent session's queue, live messages), without the
/// retained messages that only answer the restore.
async fn prepare(
    conn: &mut Conn,
    bytes: &[u8],
    version: u8,
    subs: &[(String, crate::durable::Sub)],
    deadline: Instant,
) -> Result<Vec<u8>, SwitchError> {
    let (_, n) = connack::parse(bytes).ok().flatten().ok_or_else(|| SwitchError::Restore("CONNACK vanished".into()))?;
    let rest = bytes[n..].to_vec();
    let mut packets = remote::packets(conn, rest);
    let mut to_client = Vec::new();
    if !subs.is_empty() {
        let (granted, passed) =
            remote::subscribe_all(&mut packets, version, subs, deadline).await.map_err(SwitchError::Restore)?;
        if granted < subs.len() {
            return Err(SwitchError::Restore(format!(
                "the new broker granted {granted} of {} subscriptions",
                subs.len()
            )));
        }
        keep_for_client(version, &passed, &mut to_client);
    }
    if version != 5 {
        // A barrier: the broker answers in order, so whatever it sent in answer to the
        // SUBSCRIBEs (retained messages, marked retain) comes before this PINGRESP.
        timeout_at(deadline, write_all(*packets.stream(), &encode::pingreq()))
            .await
            .map_err(|_| SwitchError::Restore("no room to write".into()))?
            .map_err(|e| SwitchError::Restore(e.to_string()))?;
        loop {
            let p = timeout_at(deadline, packets.next())
                .await
                .map_err(|_| SwitchError::Restore("no PINGRESP in time".into()))?
                .map_err(|e: ReadError| SwitchError::Restore(e.to_string()))?;
            if p.kind() == kind::PINGRESP {
                break;
            }
            keep_for_client(version, &p.bytes, &mut to_client);
        }
    }
    let (_, leftover) = packets.into_parts();
    to_client.extend_from_slice(&leftover);
    Ok(to_client)
}

/// Appends the packets of `bytes` the client is to get: in 3.x every one but the retained
/// PUBLISHes (live messages are never marked retain there; those are the restore's answer).
fn keep_for_client(version: u8, bytes: &[u8], out: &mut Vec<u8>) {
    if version == 5 {
        out.extend_from_slice(bytes);
        return;
    }
    let mut rest = bytes;
    while rest.len() >= 2 {
        let crate::mqtt::Length::Done(len, n) = crate::mqtt::decode_length(&rest[1..]) else { break };
        let total = 1 + n + len as usize;
        let Some(p) = rest.get(..total) else { break };
        if !(p[0] >> 4 == kind::PUBLISH && p[0] & 1 == 1) {
            out.extend_from_slice(p);
        }
        rest = &rest[total..];
    }
}

/// The cut (step 3): returns what the client sent for the new broker.
async fn cut(proxy: &Arc<Proxy>, live: &mut Live, deadline: Instant) -> Result<Vec<u8>, SwitchError> {
    let max = proxy.pool.proxy_config().max_packet_size as usize;
    let Live { client, upstream, track, scanner, down_scanner, session, .. } = live;
    let mut from_client = PacketReader::new(&mut *client, max);
    let mut from_old = PacketReader::new(&mut *upstream, crate::mqtt::MAX_REMAINING_LENGTH as usize + 5);
    let mut old_open = track.lock().up_open;
    let mut to_new = Vec::new();
    let started = Instant::now();
    loop {
        let down_open = track.lock().down_open;
        if old_open == 0 && down_open == 0 {
            break;
        }
        tokio::select! {
            p = from_client.next() => {
                let p = p.map_err(|e| SwitchError::Ended(match e {
                    ReadError::Closed => Ended::ClientClosed,
                    e => Ended::ClientSide(read_error(e)),
                }))?;
                let mut n = 0;
                track.lock().feed(true, scanner, &p.bytes, &mut n).map_err(|e| SwitchError::Ended(Ended::ClientSide(e.into())))?;
                session.packets_in.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                session.bytes_in.fetch_add(p.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                match p.kind() {
                    // Acknowledgements of what the old broker delivered, and the client's own
                    // QoS 2 releases there, finish on the old broker.
                    kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP => {
                        write_all(*from_old.stream(), &p.bytes)
                            .await
                            .map_err(|e| SwitchError::Ended(Ended::ClientSide(ForwardError::Io(e))))?;
                    }
                    _ => to_new.extend_from_slice(&p.bytes),
                }
            }
            p = from_old.next() => {
                let p = p.map_err(|e| SwitchError::Ended(match e {
                    ReadError::Closed => Ended::BrokerClosed,
                    e => Ended::BrokerSide(read_error(e)),
                }))?;
                if p.kind() == kind::PUBLISH {
                    // The new broker has it too (it is subscribed already); unacknowledged
                    // here, it stays the old broker's business.
                    continue;
                }
                if matches!(p.kind(), kind::PUBACK | kind::PUBCOMP) {
                    old_open = old_open.saturating_sub(1);
                }
                let mut n = 0;
                track.lock().feed(false, down_scanner, &p.bytes, &mut n).map_err(|e| SwitchError::Ended(Ended::BrokerSide(e.into())))?;
                session.packets_out.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                session.bytes_out.fetch_add(p.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                write_all(*from_client.stream(), &p.bytes)
                    .await
                    .map_err(|e| SwitchError::Ended(Ended::BrokerSide(ForwardError::Io(e))))?;
            }
            _ = sleep_until(deadline) => {
                let down_open = track.lock().down_open;
                return Err(SwitchError::Inflight(started.elapsed(), old_open, down_open));
            }
        }
    }
    // Bytes of the client's next packet read already: they go to the new broker with the rest.
    let (_, partial) = from_client.into_parts();
    if !partial.is_empty() {
        let mut n = 0;
        track
            .lock()
            .feed(true, scanner, &partial, &mut n)
            .map_err(|e| SwitchError::Ended(Ended::ClientSide(e.into())))?;
        to_new.extend_from_slice(&partial);
    }
    Ok(to_new)
}

fn read_error(e: ReadError) -> ForwardError {
    match e {
        ReadError::Io(e) => ForwardError::Io(e),
        other => ForwardError::Io(std::io::Error::other(other.to_string())),
    }
}
