//! Moving a session to another broker under the client's open connection: the client sees no CONNACK and no disconnect, only its packets going on.
//!
//! As pgbouncer hands a client to another server connection at a transaction boundary, a
//! session moves at a packet boundary once its session state is rebuilt on the new broker:
//! 1. while forwarding goes on, the new broker gets the client's own CONNECT (its will and
//!    clean flag as sent) and the subscriptions this connection holds (MQTT 5: Retain
//!    Handling 2; 3.x: the retained messages that answer them are dropped, up to a
//!    PINGREQ/PINGRESP barrier);
//! 2. both brokers deliver a while longer (`OVERLAP`: a message published on the new broker
//!    just before the subscription existed reaches the old one through replication), the new
//!    broker answers a PINGREQ (one that hung meanwhile is not cut over to), then both streams
//!    are brought to a packet boundary;
//! 3. the cut: the old broker's new deliveries are no longer forwarded (the new broker, already
//!    subscribed, has the same messages through replication), the client's acknowledgements
//!    still go to the old broker, everything else the client sends waits for the new one,
//!    until no QoS 1/2 flow is open on the old broker either way;
//! 4. the switch: DISCONNECT to the old broker (its copy of the will is discarded), what the
//!    client sent meanwhile to the new one, and forwarding goes on there.
//!
//! A session whose broker failed (its probes say down, or it closed the connection and no
//! longer accepts one) moves the same way, without the old broker:
//! 1. the new session is made as above, while meshgate holds the client: it answers the
//!    client's PINGREQs itself (those the failed broker never answered, and new ones), so no
//!    keep-alive runs out and no client reconnects into the move; it keeps what else the client
//!    sends for the new broker; and a client that leaves ends the move. Every session leaving
//!    the failed broker then waits briefly for the others' (`Broker::evacuated`), so what a
//!    publisher sends again is not published before a subscriber is subscribed there;
//! 2. what the old broker had sent whole goes to the client; what the client sent it and it
//!    never acknowledged (its QoS 1/2 PUBLISHes, copied in `track`) goes to the new broker
//!    again, marked DUP; QoS 2 flows whose message already arrived are finished by meshgate
//!    in the old broker's place (PUBREL, PUBCOMP);
//! 3. the cut: until the client has acknowledged everything the old broker delivered, its
//!    acknowledgements end there and everything else waits for the new broker, so the two
//!    brokers' packet identifiers never meet at the client.
//!
//! What cannot move this way closes as before, and says why: MQTT 5 enhanced
//! authentication, subscriptions not all known, no broker to move to, the new broker refusing,
//! QoS flows still open on the old broker after the deadline, a failed broker's packet cut
//! off halfway to the client, or a PUBLISH it never acknowledged that was not copied.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, timeout_at, Instant};

use super::forward::{Ended, ForwardError};
use super::session::Live;
use super::Proxy;
use crate::durable::remote;
use crate::mqtt::io::{PacketReader, ReadError};
use crate::mqtt::{connack, encode, kind};
use crate::pool::Lease;
use crate::transport::{write_all, Conn};
use crate::upstream::AttemptError;

/// How long both brokers deliver to a moving session before the old one stops: longer than
/// replication takes to copy a message from one broker to another on a healthy network.
const OVERLAP: Duration = Duration::from_millis(100);

/// How long a session leaving a failed broker waits for the others' new sessions (step 1 of
/// a failed broker's move): a publisher's messages sent again must not reach the new broker
/// before a subscriber's subscriptions do, and the clients' delivery gap grows by what this
/// waits.
const EVACUATION_WAIT: Duration = Duration::from_millis(300);

/// How long a move waits for one of meshgate's own handshake slots to the new broker
/// (`upstream::HANDSHAKES_PER_BROKER`). A client that connects waits only the connect timeout,
/// as its own CONNACK timeout runs meanwhile; a client whose session moves is held instead (a
/// failed broker's: its PINGREQs answered by meshgate), so the burst of moving every session of
/// a failed broker queues rather than closes sessions, which would come back as a burst of
/// reconnects to the same queue.
const MOVE_QUEUE: Duration = Duration::from_secs(5);

/// Why a session could not move; the label is the `result` of `meshgate_session_switches_total`.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("no other broker takes sessions now")]
    NoTarget,
    /// Closed meanwhile (shutdown, or a close that wins over the move).
    #[error("closed while it moved")]
    Cancelled,
    #[error("MQTT 5 enhanced authentication cannot be replayed to another broker")]
    EnhancedAuth,
    #[error(
        "its subscriptions are not all known (more than sessions.max_subscriptions, or a request too large to read)"
    )]
    Incomplete,
    #[error("another operation on this client id's session did not finish in time")]
    Busy,
    #[error("no file descriptor to spare for a second broker connection (open-file limit {0}): raise LimitNOFILE= or ulimit -n")]
    NoRoom(u64),
    #[error("the streams did not reach a packet boundary within {0:?}")]
    Boundary(Duration),
    #[error("the new broker: {0}")]
    Connect(AttemptError),
    #[error("the new broker refused the client's CONNECT (code {0:#04x})")]
    Refused(u8),
    #[error("putting the subscriptions back: {0}")]
    Restore(String),
    /// Took the session, then stopped answering before the cut (hung since, and its probes
    /// have not noticed yet).
    #[error("the new broker did not answer a PINGREQ within {0:?} before the cut")]
    Silent(Duration),
    #[error("QoS 1/2 flows still open on the old broker after {0:?} ({1} of the client's, {2} to it)")]
    Inflight(Duration, u32, u32),
    #[error("the failed broker's last packet to the client was cut off")]
    Torn,
    #[error("a PUBLISH the failed broker never acknowledged was not copied (over {} KiB in flight)", super::track::COPY_LIMIT / 1024)]
    Uncopied,
    /// The session ended on its own meanwhile (a side closed or failed).
    #[error("the session ended while moving")]
    Ended(Ended),
}

impl SwitchError {
    pub fn reason(&self) -> &'static str {
        match self {
            SwitchError::NoTarget => "no_target",
            SwitchError::Cancelled => "cancelled",
            SwitchError::EnhancedAuth => "enhanced_auth",
            SwitchError::Incomplete => "subscriptions_unknown",
            SwitchError::Busy => "busy",
            SwitchError::NoRoom(_) => "no_fds",
            SwitchError::Boundary(_) => "no_boundary",
            SwitchError::Connect(_) => "connect_failed",
            SwitchError::Refused(_) => "refused",
            SwitchError::Restore(_) => "restore_failed",
            SwitchError::Silent(_) => "target_silent",
            SwitchError::Inflight(..) => "inflight",
            SwitchError::Torn => "torn_packet",
            SwitchError::Uncopied => "uncopied",
            SwitchError::Ended(_) => "ended",
        }
    }

    /// Every `result` label besides "ok", so the metrics start at zero.
    pub const RESULTS: [&'static str; 15] = [
        "no_target",
        "cancelled",
        "enhanced_auth",
        "subscriptions_unknown",
        "busy",
        "no_fds",
        "no_boundary",
        "connect_failed",
        "refused",
        "restore_failed",
        "target_silent",
        "inflight",
        "torn_packet",
        "uncopied",
        "ended",
    ];

    /// Whether a session that could not move for `why` may stay where it is: a failback (its
    /// broker works) that failed before the cut, while the old broker still delivered
    /// everything, for a reason that passes (the target unreachable: each attempt counts
    /// against it, which passive accounting then bars; no target; busy; no boundary; a target
    /// that went silent). A target that refuses the client closes the session as before.
    /// Only a clean session stays: a persistent one may have left a session on the target
    /// broker that would queue its messages from then on. A failback refused for want of a
    /// descriptor stays whatever the session: no broker was asked.
    pub fn stays(&self, why: &str, persistent: bool) -> bool {
        // Refused before any broker was asked: nothing was left anywhere.
        if why == "failback" && matches!(self, SwitchError::NoRoom(_)) {
            return true;
        }
        why == "failback"
            && !persistent
            && matches!(
                self,
                SwitchError::NoTarget
                    | SwitchError::Busy
                    | SwitchError::Connect(_)
                    | SwitchError::Boundary(_)
                    | SwitchError::Silent(_)
            )
    }

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
    let failed = why == crate::pool::BROKER_DOWN;
    // Shutdown does not wait for a move: the session closes as every other does then.
    let result = tokio::select! {
        r = switch_inner(proxy, live, failed) => r,
        _ = proxy.pool.closing.cancelled() => Err(SwitchError::Cancelled),
    };
    // Whatever happened, the others leaving a failed broker need not wait for this one.
    live.session.evacuated();
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
        Err(e) if e.stays(why, live.session.info.persistent) => {
            tracing::info!(client_id = %live.session.info.client_id, broker = %live.session.broker.name, why, "session could not switch, it stays where it is: {e}")
        }
        Err(e) => {
            tracing::info!(client_id = %live.session.info.client_id, broker = %live.session.broker.name, why, "session could not switch, closing it: {e}")
        }
    }
    result
}

async fn switch_inner(proxy: &Arc<Proxy>, live: &mut Live, failed: bool) -> Result<(), SwitchError> {
    let cfg = proxy.pool.proxy_config();
    let connect = crate::mqtt::connect::parse(&live.connect).map_err(|e| SwitchError::Restore(e.to_string()))?;
    if connect.enhanced_auth {
        return Err(SwitchError::EnhancedAuth);
    }
    let subs = live.track.lock().subscriptions().ok_or(SwitchError::Incomplete)?;
    // The new broker's connection is a third descriptor while the old one is open (see
    // `FdBudget`). Asked before a target is picked, so a move that cannot be made does not take
    // a broker's probation trial.
    let room = proxy.fds.take(proxy.limits.open());
    if room.is_none() && !failed {
        let e = SwitchError::NoRoom(proxy.fds.limit());
        proxy.pool.note_shortage("no_fds", &e);
        return Err(e);
    }
    let old = live.session.broker.clone();
    let lease = proxy.pool.pick(std::slice::from_ref(&old)).ok_or(SwitchError::NoTarget)?;
    let target = lease.broker().clone();
    // `pick` falls back to enabled brokers whose probes say down when none is available; a
    // move goes only where sessions are taken. (A broker in its passive probation trial is
    // fine: the lease is that trial, and `Preparing` keeps it until its result is recorded.)
    if target.probe_up() == Some(false) || target.admin() != crate::pool::AdminState::Enabled || target.is_removed() {
        return Err(SwitchError::NoTarget);
    }
    let version = connect.version;
    // meshgate's own work on this client id's sessions (migration, standby, wipes) and a move
    // take turns, as a connecting client does.
    let durable = &proxy.durable;
    let known = durable.enabled() && (live.session.info.persistent || durable.knows(&connect.client_id));
    if known {
        durable.pass_barrier().await;
    }
    let turn = match known {
        true => Some(
            timeout_at(Instant::now() + cfg.connack_timeout, durable.lock(&connect.client_id))
                .await
                .map_err(|_| SwitchError::Busy)?,
        ),
        false => None,
    };
    // A failed broker's connection is kept only for the DISCONNECT at the cut (nothing more is
    // read from it). Without a descriptor to spare it gets that DISCONNECT now, once nothing
    // but the new broker can end the move, and is closed: leaving a failed broker never waits
    // for descriptors. Should the new broker then fail it, the session closes as it would
    // have, but the failed broker has dropped the client's will.
    if room.is_none() {
        let _ = timeout_at(Instant::now(), write_all(&mut live.upstream, &encode::disconnect())).await;
        live.upstream = Conn::Released;
    }
    let _room = room;

    // 1. The session on the new broker, made while forwarding goes on: the old broker keeps
    // delivering until the new one is subscribed. Made in a task of its own, which leaves the
    // new broker (`Preparing`) if this move is abandoned at any point, even by dropping this
    // future.
    let mut preparing = Preparing::start(
        proxy,
        lease,
        Client { connect: live.connect.clone(), version, address: live.session.session.info.peer },
        subs.clone(),
    );
    let (mut conn, to_client, to_new) = if failed {
        leave_failed(proxy, live, &mut preparing, &old).await?
    } else {
        // A client that vanishes meanwhile leaves its will to the old broker, whose connection
        // closes with the session: the new one is left politely.
        let prepared = tokio::select! {
            r = preparing.result() => r?,
            e = live.forward() => return Err(SwitchError::Ended(e)),
        };
        let (mut conn, mut to_client) = prepared;
        match planned_cut(proxy, live, &target, &mut conn, &mut to_client).await {
            Ok(b) => (conn, to_client, b),
            Err(e) => {
                give_up(&mut conn).await;
                return Err(e);
            }
        }
    };

    // The subscriptions may have changed while forwarding went on: the new broker must hold
    // exactly what the client thinks it holds.
    let now_subs = live.track.lock().subscriptions();
    if now_subs.as_deref() != Some(subs.as_slice()) {
        let added: Vec<_> = match &now_subs {
            Some(now) if subs.iter().all(|s| now.contains(s)) => {
                now.iter().filter(|s| !subs.contains(s)).cloned().collect()
            }
            _ => {
                give_up(&mut conn).await;
                if !failed {
                    best_effort(&mut live.upstream, &to_new).await;
                }
                return Err(SwitchError::Incomplete);
            }
        };
        let more = prepare(&mut conn, None, version, &added, Instant::now() + cfg.connack_timeout).await;
        match more {
            Ok(extra) if extra.is_empty() => {}
            Ok(_) | Err(_) => {
                // Anything the new broker sent besides would have to be ordered with what it
                // sent before; rare enough to close instead.
                give_up(&mut conn).await;
                if !failed {
                    best_effort(&mut live.upstream, &to_new).await;
                }
                return Err(SwitchError::Incomplete);
            }
        }
    }

    // 4. The switch. A failed broker gets one try at the DISCONNECT, which a hung one reads
    // when it wakes (so it drops the client's will); the new broker has the client now.
    let write_limit = Instant::now() + cfg.connack_timeout;
    let bye = if failed { Instant::now() } else { write_limit };
    let _ = timeout_at(bye, write_all(&mut live.upstream, &encode::disconnect())).await;
    live.upstream = conn;
    // Past this point the session is on the new broker: a failure ends it there.
    if !to_new.is_empty() {
        let broken = |e: std::io::Error| SwitchError::Ended(Ended::ClientSide(ForwardError::Write(e)));
        timeout_at(write_limit, write_all(&mut live.upstream, &to_new))
            .await
            .map_err(|_| broken(std::io::ErrorKind::TimedOut.into()))?
            .map_err(broken)?;
        live.up_total.inc_by(to_new.len() as u64);
    }
    if !to_client.is_empty() {
        let mut n = 0;
        live.track
            .lock()
            .feed(false, &mut live.down_scanner, &to_client, &mut n)
            .map_err(|e| SwitchError::Ended(Ended::BrokerSide(e.into())))?;
        live.session.packets_out.fetch_add(n, Ordering::Relaxed);
        live.session.bytes_out.fetch_add(to_client.len() as u64, Ordering::Relaxed);
        live.down_total.inc_by(to_client.len() as u64);
        timeout_at(write_limit, write_all(&mut live.client, &to_client))
            .await
            .map_err(|_| {
                SwitchError::Ended(Ended::BrokerSide(ForwardError::Write(std::io::ErrorKind::TimedOut.into())))
            })?
            .map_err(|e| SwitchError::Ended(Ended::BrokerSide(ForwardError::Write(e))))?;
    }
    let info = live.session.info.clone();
    // The old registration is closing (the move asked it to), so the new one does not count
    // as a second connection of the client id; dropping the old one afterwards is not the
    // client id's last.
    let fresh = proxy.pool.register(preparing.lease.take().expect("kept until registered"), info);
    for (to, from) in [
        (&fresh.bytes_in, &live.session.bytes_in),
        (&fresh.bytes_out, &live.session.bytes_out),
        (&fresh.packets_in, &live.session.packets_in),
        (&fresh.packets_out, &live.session.packets_out),
    ] {
        to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    drop(std::mem::replace(&mut live.session, fresh));
    if live.session.info.persistent && turn.is_some() {
        durable.on_established(&connect, &live.connect, &target.name);
        live.track.lock().moved_to(&target.name);
    }
    drop(turn);
    Ok(())
}

/// Steps 2 and 3 of a planned move: both brokers deliver a while, then the cut. Returns what
/// the client sent for the new broker meanwhile.
async fn planned_cut(
    proxy: &Arc<Proxy>,
    live: &mut Live,
    target: &crate::pool::Broker,
    conn: &mut Conn,
    to_client: &mut Vec<u8>,
) -> Result<Vec<u8>, SwitchError> {
    let cfg = proxy.pool.proxy_config();
    // 2. Both brokers deliver a while longer: a message published on the new broker just
    // before its subscription existed reaches the old one through replication, and must still
    // be forwarded from there (the client may get it twice; it does not miss it). A broker that
    // just came back may not have replication's link yet: until it has, only the old broker
    // has what other brokers take, so forwarding from there goes on (up to a limit; past it,
    // the cut forwards the old broker's deliveries too).
    let link_deadline = Instant::now() + 2 * cfg.connack_timeout;
    let mut linked = !proxy.replicated || target.replicated();
    while !linked && Instant::now() < link_deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => linked = target.replicated(),
            e = live.forward() => return Err(SwitchError::Ended(e)),
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(OVERLAP) => {}
        e = live.forward() => return Err(SwitchError::Ended(e)),
    }
    // The new broker still answers, now that the cut is near: one that hung after it took the
    // session (its probes have not noticed yet) would get the session at the cut, and the
    // client would miss what is published until the hang is noticed and the session moves
    // again. The old broker goes on delivering meanwhile; what the new one sent for the client
    // before its PINGRESP reaches the client after the switch, in order, as it would have.
    let limit = cfg.connack_timeout;
    let early = tokio::select! {
        r = answers(conn, Instant::now() + limit, limit) => r?,
        e = live.forward() => return Err(SwitchError::Ended(e)),
    };
    to_client.extend_from_slice(&early);
    // Between packets both ways.
    let limit = cfg.connack_timeout;
    let deadline = Instant::now() + limit;
    while !live.at_boundaries() {
        tokio::select! {
            e = live.forward() => return Err(SwitchError::Ended(e)),
            _ = sleep_until(deadline) => return Err(SwitchError::Boundary(limit)),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    // Closed (a broker going down, shutdown) while it got here: the close stands.
    if live.session.move_requested().is_none() {
        return Err(SwitchError::Cancelled);
    }

    // 3. The cut.
    let deadline = Instant::now() + 2 * cfg.connack_timeout;
    match cut(proxy, live, deadline, !linked).await {
        Ok(Cut::Done(b)) => Ok(b),
        // The client said DISCONNECT (passed to the old broker): the session ends there.
        Ok(Cut::ClientLeft) => Err(SwitchError::Ended(Ended::ClientClosed)),
        Err((e, to_new)) => {
            // What the client sent meanwhile goes where it was going before: nothing of its
            // is lost to the failed move (the session closes after this).
            if !to_new.is_empty() {
                best_effort(&mut live.upstream, &to_new).await;
            }
            Err(e)
        }
    }
}

/// A PINGREQ to the new broker and everything it sends until the PINGRESP (its deliveries for
/// the client, in order, the PINGRESP itself left out: the PINGREQ was meshgate's). The client's
/// own packets go to the old broker until the cut, so the PINGRESP cannot be one it waits for.
async fn answers(conn: &mut Conn, deadline: Instant, limit: Duration) -> Result<Vec<u8>, SwitchError> {
    let mut packets = remote::packets(conn, Vec::new());
    timeout_at(deadline, write_all(*packets.stream(), &encode::pingreq()))
        .await
        .map_err(|_| SwitchError::Silent(limit))?
        .map_err(|e| SwitchError::Restore(e.to_string()))?;
    let mut out = Vec::new();
    loop {
        let p = timeout_at(deadline, packets.next())
            .await
            .map_err(|_| SwitchError::Silent(limit))?
            .map_err(|e: ReadError| SwitchError::Restore(e.to_string()))?;
        if p.kind() == kind::PINGRESP {
            break;
        }
        out.extend_from_slice(&p.bytes);
    }
    let (_, leftover) = packets.into_parts();
    out.extend_from_slice(&leftover);
    Ok(out)
}

/// Step 1's result: the new broker's connection and what it sent for the client meanwhile.
type Prepared = Result<(Conn, Vec<u8>), SwitchError>;

/// The client a session is opened for: its own CONNECT, and its address for a broker that
/// takes a PROXY protocol header.
struct Client {
    connect: Box<[u8]>,
    version: u8,
    address: std::net::SocketAddr,
}

/// Step 1 running in a task of its own (`prepare_task`), settled against the target when its
/// result is read. Dropped before that (the move ended early), it abandons the task and leaves
/// the new broker: politely (a DISCONNECT, so the broker drops the client's will), or, after
/// `hand_over_will`, as a client that vanished would (the broker publishes the will). A
/// result that came anyway is settled and left the same way.
struct Preparing {
    task: Option<tokio::task::JoinHandle<Prepared>>,
    /// The place on the target, and its probation trial if it is that: given up only once the
    /// task's result is settled (or registered as the moved session), never while it runs.
    lease: Option<Lease>,
    abandon: Abandon,
    /// The failed broker's connection, handed over with the will: told DISCONNECT (so a hung
    /// broker that wakes drops the will) only once the new broker has published it.
    failed: Option<Conn>,
    proxy: Arc<Proxy>,
    version: u8,
}

impl Preparing {
    fn start(proxy: &Arc<Proxy>, lease: Lease, client: Client, subs: Vec<(String, crate::durable::Sub)>) -> Preparing {
        let target = lease.broker().clone();
        let abandon = Abandon::default();
        let version = client.version;
        let task = proxy.tasks.spawn(prepare_task(
            proxy.upstream.clone(),
            target.config(),
            client,
            subs,
            proxy.pool.proxy_config().connack_timeout,
            abandon.clone(),
        ));
        Preparing { task: Some(task), lease: Some(lease), abandon, failed: None, proxy: proxy.clone(), version }
    }

    /// The new session, settled against the target. Cancel-safe: dropped before the task ends,
    /// the task goes on.
    async fn result(&mut self) -> Prepared {
        let r = self.task.as_mut().expect("a result is read once").await;
        self.task = None;
        let target = self.lease.as_ref().expect("kept until registered").broker();
        settle(&self.proxy, target, r.unwrap_or_else(|e| Err(SwitchError::Restore(e.to_string()))))
    }

    /// The client vanished without a DISCONNECT before the new session was made: the move goes
    /// on until the new broker has the client's will (its CONNECT sent, even if it still waited
    /// for a slot), which it is then left to publish, as the client left; only then is the
    /// failed broker (`failed`) told DISCONNECT, so the will is published once, and not lost
    /// when the new broker never got it.
    fn hand_over_will(&mut self, failed: Conn) {
        self.abandon.with_will.store(true, Ordering::Release);
        self.failed = Some(failed);
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        self.abandon.token.cancel();
        // Kept while the task runs: only a result read takes it (`result`, then `register`).
        let Some(lease) = self.lease.take() else { return };
        let (proxy, version, abandon, failed) =
            (self.proxy.clone(), self.version, self.abandon.clone(), self.failed.take());
        let tasks = self.proxy.tasks.clone();
        // The task may have finished just before it was abandoned: its connection is left here.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(tasks.track_future(async move {
                let r = task.await.unwrap_or_else(|e| Err(SwitchError::Restore(e.to_string())));
                if let Ok((mut conn, _)) = settle(&proxy, lease.broker(), r) {
                    abandon.leave(&mut conn, version).await;
                }
                // Settled: a trial that said nothing goes back now, not while it ran.
                drop(lease);
                if let Some(mut failed) = failed {
                    if abandon.will_left.load(Ordering::Acquire) {
                        best_effort(&mut failed, &encode::disconnect()).await;
                    }
                }
            }));
        }
    }
}

/// How `prepare_task` learns that its move was abandoned, and how to leave the new broker then;
/// shared by `Preparing` and its task.
#[derive(Clone, Default)]
struct Abandon {
    token: tokio_util::sync::CancellationToken,
    /// Set before `token` fires: the client vanished, its will is to reach the new broker.
    with_will: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the new broker was left with the client's will (it publishes it).
    will_left: Arc<std::sync::atomic::AtomicBool>,
}

impl Abandon {
    /// Fires when the move is abandoned, unless the will is to be handed over: then the
    /// handshake goes on (its own timeouts bound it).
    async fn before_connect(&self) {
        self.token.cancelled().await;
        if self.with_will.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }

    /// Leaves the new broker as `Preparing` was told to.
    async fn leave(&self, conn: &mut Conn, version: u8) {
        let w = self.with_will.load(Ordering::Acquire);
        leave(conn, version, w).await;
        self.will_left.fetch_or(w, Ordering::AcqRel);
    }
}

/// Step 1 in its own task: the new connection, its subscriptions, and what the new broker sent
/// for the client. When `abandon` fires, it leaves the new broker (`leave`).
async fn prepare_task(
    upstream: Arc<crate::upstream::Upstream>,
    target: Arc<crate::config::BrokerConfig>,
    client: Client,
    subs: Vec<(String, crate::durable::Sub)>,
    restore: Duration,
    abandon: Abandon,
) -> Prepared {
    let Client { connect, version, address } = client;
    // Until the CONNECT is out nothing is left on the broker: a slot and a connection are
    // given up at once (unless the will is to be handed over).
    let opened = tokio::select! {
        biased;
        _ = abandon.before_connect() => return Err(SwitchError::Cancelled),
        r = upstream.open(&target, Some(address), MOVE_QUEUE) => r.map_err(SwitchError::Connect)?,
    };
    // From here on it is not abandoned halfway: the new broker holds the client's will, and a
    // connection closed before its CONNACK would publish it. The CONNACK timeout bounds it.
    let (mut conn, ack, bytes) = upstream.exchange(opened, &connect, version).await.map_err(SwitchError::Connect)?;
    if ack.code != 0 {
        return Err(SwitchError::Refused(ack.code));
    }
    // The subscriptions take a CONNACK timeout of their own, however long the slot took.
    let deadline = Instant::now() + restore;
    let result = tokio::select! {
        r = prepare(&mut conn, Some(&bytes), version, &subs, deadline), if !abandon.token.is_cancelled() => r,
        _ = abandon.token.cancelled() => Err(SwitchError::Cancelled),
    };
    match result {
        Ok(to_client) if !abandon.token.is_cancelled() => Ok((conn, to_client)),
        result => {
            abandon.leave(&mut conn, version).await;
            result.and(Err(SwitchError::Cancelled))
        }
    }
}

/// Leaves the new broker of a move that will not happen: politely (`give_up`), or `with_will`
/// as the client left (MQTT 5: DISCONNECT "with will message"; 3.x: the connection closes
/// without a DISCONNECT when `conn` is dropped), so the broker publishes the client's will.
async fn leave(conn: &mut Conn, version: u8, with_will: bool) {
    match (with_will, version) {
        (false, _) => give_up(conn).await,
        (true, 5) => best_effort(conn, &[0xe0, 0x01, 0x04]).await,
        (true, _) => {}
    }
}

/// Leaves the new broker again before the switch: a normal DISCONNECT, so it discards the
/// client's will it was given.
async fn give_up(conn: &mut Conn) {
    best_effort(conn, &encode::disconnect()).await;
}

/// Writes `bytes` if the peer takes them within 200 ms; a session that closes next does not
/// wait longer for a peer that may be gone.
async fn best_effort(conn: &mut Conn, bytes: &[u8]) {
    let _ = timeout_at(Instant::now() + Duration::from_millis(200), write_all(conn, bytes)).await;
}

/// Puts `subs` back on the new connection and collects what the new broker sent for the
/// client meanwhile (a persistent session's queue, live messages), without the retained
/// messages that only answer the restore. `bytes` is what came with the CONNACK, if this is
/// the first restore on the connection.
async fn prepare(
    conn: &mut Conn,
    bytes: Option<&[u8]>,
    version: u8,
    subs: &[(String, crate::durable::Sub)],
    deadline: Instant,
) -> Result<Vec<u8>, SwitchError> {
    let rest = match bytes {
        Some(bytes) => {
            let (_, n) =
                connack::parse(bytes).ok().flatten().ok_or_else(|| SwitchError::Restore("CONNACK vanished".into()))?;
            bytes[n..].to_vec()
        }
        None => Vec::new(),
    };
    let mut packets = remote::packets(conn, rest);
    let mut to_client = Vec::new();
    let mut acks = Vec::new();
    if !subs.is_empty() {
        let (granted, passed) =
            remote::subscribe_all(&mut packets, version, subs, deadline).await.map_err(SwitchError::Restore)?;
        if granted < subs.len() {
            return Err(SwitchError::Restore(format!(
                "the new broker granted {granted} of {} subscriptions",
                subs.len()
            )));
        }
        keep_for_client(version, &passed, &mut to_client, &mut acks);
    }
    if version != 5 && !subs.is_empty() {
        // A barrier: the broker answers in order, so whatever it sent in answer to the
        // SUBSCRIBEs (retained messages, marked retain) comes before this PINGRESP. Without
        // SUBSCRIBEs nothing answers them, and everything the broker sends is the client's.
        let mut out = std::mem::take(&mut acks);
        out.extend_from_slice(&encode::pingreq());
        timeout_at(deadline, write_all(*packets.stream(), &out))
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
            keep_for_client(version, &p.bytes, &mut to_client, &mut acks);
            if !acks.is_empty() {
                let out = std::mem::take(&mut acks);
                timeout_at(deadline, write_all(*packets.stream(), &out))
                    .await
                    .map_err(|_| SwitchError::Restore("no room to write".into()))?
                    .map_err(|e| SwitchError::Restore(e.to_string()))?;
            }
        }
    }
    let (_, leftover) = packets.into_parts();
    to_client.extend_from_slice(&leftover);
    Ok(to_client)
}

/// Appends the packets of `bytes` the client is to get: in 3.x every one but the retained
/// PUBLISHes (live messages are never marked retain there; those are the restore's answer).
/// A dropped QoS 1 or 2 message is acknowledged (`acks`), so the broker does not hold it in
/// flight for the client forever; a QoS 2 one's PUBREL then reaches the client, which
/// completes it as MQTT asks for an unknown packet id.
fn keep_for_client(version: u8, bytes: &[u8], out: &mut Vec<u8>, acks: &mut Vec<u8>) {
    if version == 5 {
        out.extend_from_slice(bytes);
        return;
    }
    let mut rest = bytes;
    while rest.len() >= 2 {
        let crate::mqtt::Length::Done(len, n) = crate::mqtt::decode_length(&rest[1..]) else { break };
        let total = 1 + n + len as usize;
        let Some(p) = rest.get(..total) else { break };
        if p[0] >> 4 == kind::PUBLISH && p[0] & 1 == 1 {
            let qos = (p[0] >> 1) & 3;
            let body = &p[1 + n..];
            let topic_len = body.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
            if let (true, Some(id)) = (qos > 0, body.get(2 + topic_len..4 + topic_len)) {
                let id = u16::from_be_bytes([id[0], id[1]]);
                acks.extend_from_slice(&encode::ack(if qos == 1 { kind::PUBACK } else { kind::PUBREC }, id));
            }
        } else {
            out.extend_from_slice(p);
        }
        rest = &rest[total..];
    }
}

/// How the cut ended.
enum Cut {
    /// Nothing is owed on the old broker any more; what the client sent for the new one.
    Done(Vec<u8>),
    /// The client said DISCONNECT (now on the old broker, where the session ends).
    ClientLeft,
}

/// The most the client may send for the new broker during the cut; beyond it, its packets
/// wait in the socket (backpressure, as forwarding gives).
const CUT_BUFFER: usize = 1 << 20;

/// The cut (step 3): until nothing the client waits for is owed by the old broker. Returns
/// what the client sent for the new broker, or, on failure, the error and that buffer.
async fn cut(
    proxy: &Arc<Proxy>,
    live: &mut Live,
    deadline: Instant,
    forward_old_publishes: bool,
) -> Result<Cut, (SwitchError, Vec<u8>)> {
    let max = proxy.pool.proxy_config().max_packet_size as usize;
    // `forward_old_publishes`: without replication (or its link to the new broker) the new
    // broker does not have what the old one delivers now: it still goes to the client (and is
    // waited for like every open flow).
    let Live { client, upstream, track, scanner, down_scanner, session, .. } = live;
    let mut from_client = PacketReader::new(&mut *client, max);
    let mut from_old = PacketReader::new(&mut *upstream, crate::mqtt::MAX_REMAINING_LENGTH as usize + 5);
    // Flows the client opened on the old broker (not the ones it opens meanwhile for the new
    // broker): ended by the old broker's answers, which `track` reads.
    let old_ids = track.lock().up_ids();
    let old_open = |t: &super::track::Track| old_ids.iter().filter(|id| t.up_is_open(**id)).count() as u32;
    let mut to_new = Vec::new();
    let started = Instant::now();
    macro_rules! fail {
        ($e:expr) => {
            return Err(($e, to_new))
        };
    }
    loop {
        {
            let t = track.lock();
            if old_open(&t) == 0 && t.down_open() == 0 && t.pings_open == 0 && t.settled_requests() {
                break;
            }
        }
        tokio::select! {
            p = from_client.next(), if to_new.len() < CUT_BUFFER => {
                let p = match seen_from_client(p, track, scanner, session) {
                    Ok(p) => p,
                    Err(e) => fail!(e),
                };
                let to_old = match p.kind() {
                    // Acknowledgements of what the old broker delivered, and the client's own
                    // QoS 2 releases there, finish on the old broker; a DISCONNECT ends the
                    // session there, so its will is discarded where it was given.
                    kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP | kind::DISCONNECT => true,
                    kind::PINGREQ => {
                        // Answered by the new broker after the switch: not owed by the old one.
                        track.lock().pings_open -= 1;
                        false
                    }
                    _ => false,
                };
                if !to_old {
                    to_new.extend_from_slice(&p.bytes);
                    continue;
                }
                match timeout_at(deadline, write_all(*from_old.stream(), &p.bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!(SwitchError::Ended(Ended::ClientSide(ForwardError::Io(e)))),
                    Err(_) => {
                        let t = track.lock();
                        fail!(SwitchError::Inflight(started.elapsed(), old_open(&t), t.down_open()))
                    },
                }
                if p.kind() == kind::DISCONNECT {
                    return Ok(Cut::ClientLeft);
                }
            }
            p = from_old.next() => {
                let p = match p {
                    Ok(p) => p,
                    Err(ReadError::Closed) => fail!(SwitchError::Ended(Ended::BrokerClosed)),
                    Err(e) => fail!(SwitchError::Ended(Ended::BrokerSide(read_error(e)))),
                };
                if p.kind() == kind::PUBLISH && !forward_old_publishes {
                    // The new broker has it too (it is subscribed already, and replication
                    // copies it there); unacknowledged here, it stays the old broker's business.
                    continue;
                }
                let mut n = 0;
                if let Err(e) = track.lock().feed(false, down_scanner, &p.bytes, &mut n) {
                    fail!(SwitchError::Ended(Ended::BrokerSide(e.into())));
                }
                session.packets_out.fetch_add(n, Ordering::Relaxed);
                session.bytes_out.fetch_add(p.bytes.len() as u64, Ordering::Relaxed);
                match timeout_at(deadline, write_all(*from_client.stream(), &p.bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!(SwitchError::Ended(Ended::BrokerSide(ForwardError::Io(e)))),
                    Err(_) => {
                        let t = track.lock();
                        fail!(SwitchError::Inflight(started.elapsed(), old_open(&t), t.down_open()))
                    },
                }
            }
            _ = sleep_until(deadline) => {
                let t = track.lock();
                fail!(SwitchError::Inflight(started.elapsed(), old_open(&t), t.down_open()));
            }
        }
    }
    // Bytes of the client's next packet read already: they go to the new broker with the rest.
    let (_, partial) = from_client.into_parts();
    if !partial.is_empty() {
        let mut n = 0;
        if let Err(e) = track.lock().feed(true, scanner, &partial, &mut n) {
            fail!(SwitchError::Ended(Ended::ClientSide(e.into())));
        }
        to_new.extend_from_slice(&partial);
    }
    Ok(Cut::Done(to_new))
}

/// A failed broker's move, steps 1 to 3: the client is read all along while the new session
/// is made and the others' are waited for. Returns the new connection, what goes to the client
/// and what goes to the new broker.
async fn leave_failed(
    proxy: &Arc<Proxy>,
    live: &mut Live,
    preparing: &mut Preparing,
    old: &crate::pool::Broker,
) -> Result<(Conn, Vec<u8>, Vec<u8>), SwitchError> {
    let mut prepared = None;
    let cut = cut_failed(proxy, live, preparing, old, &mut prepared).await;
    let (e, vanished) = match cut {
        Ok(Cut::Done(b)) => {
            let Some((mut conn, mut to_client)) = prepared else {
                // Not reached: the cut ends only once the new session is made.
                return Err(SwitchError::Cancelled);
            };
            // The client's released QoS 2 PUBLISHes, finished on the new broker.
            let Some(released) = live.track.lock().released() else {
                give_up(&mut conn).await;
                return Err(SwitchError::Uncopied);
            };
            let deadline = Instant::now() + 2 * proxy.pool.proxy_config().connack_timeout;
            match finish_released(&mut conn, &released, deadline).await {
                Ok(more) => to_client.extend_from_slice(&more),
                Err(e) => {
                    give_up(&mut conn).await;
                    return Err(e);
                }
            }
            return Ok((conn, to_client, b));
        }
        // The client said DISCONNECT: no broker is to publish its will.
        Ok(Cut::ClientLeft) => (SwitchError::Ended(Ended::ClientClosed), false),
        // The client's connection broke without a DISCONNECT (or, MQTT 5, it asked for its will
        // with one): its will is published, once, by the new broker, which has it (or is
        // getting it).
        Err((e @ SwitchError::Ended(Ended::ClientClosed | Ended::ClientSide(_)), _)) => (e, true),
        Err((e, _)) => {
            if let Some((mut conn, _)) = prepared {
                give_up(&mut conn).await;
            }
            return Err(e);
        }
    };
    match prepared {
        Some((mut conn, _)) => leave(&mut conn, preparing.version, vanished).await,
        None if vanished => {
            preparing.hand_over_will(std::mem::replace(&mut live.upstream, Conn::Released));
            return Err(e);
        }
        None => {}
    }
    // A hung broker that wakes reads the DISCONNECT, so it drops the will too.
    let _ = timeout_at(Instant::now(), write_all(&mut live.upstream, &encode::disconnect())).await;
    Err(e)
}

/// The result of step 1, recorded against the target: its success, or a failure that is the
/// broker's (meshgate's own shortages are counted apart). An abandoned attempt says nothing;
/// a probation trial it took goes back with its lease, dropped after this.
fn settle(proxy: &Proxy, target: &crate::pool::Broker, prepared: Prepared) -> Prepared {
    match &prepared {
        Ok(_) => proxy.pool.record_success(target),
        Err(SwitchError::Connect(a)) if a.is_local() => proxy.pool.record_local_error(target, a.reason(), a),
        Err(SwitchError::Connect(a)) => proxy.pool.record_failure(target, a.reason()),
        // A refusal of the client (not of the broker's making) is an answer.
        Err(SwitchError::Refused(_)) => proxy.pool.record_success(target),
        // Abandoned, or the subscriptions not restored: nothing said about the broker's health.
        Err(_) => {}
    }
    prepared
}

/// Holding the client while its session leaves a failed broker, and the cut (steps 1 to 3 of
/// that move, the new session being made by `task`): returns what goes to the new broker, the
/// client's unacknowledged PUBLISHes first, and leaves the new session in `prepared`.
///
/// Nothing is read from the failed broker. The client is read from the start: the old
/// broker's PINGREQs it never answered and those the client sends meanwhile are answered by
/// meshgate (a client whose keep-alive runs out reconnects, and its new session races the one
/// being moved at the new broker), a client that leaves ends the move at once, and everything
/// else it sends waits for the new broker.
async fn cut_failed(
    proxy: &Arc<Proxy>,
    live: &mut Live,
    preparing: &mut Preparing,
    old: &crate::pool::Broker,
    prepared: &mut Option<(Conn, Vec<u8>)>,
) -> Result<Cut, (SwitchError, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let cfg = proxy.pool.proxy_config();
    let max = cfg.max_packet_size as usize;
    let started = Instant::now();
    // Until the new session is made and the others' waited for, the task's own deadlines
    // bound the move (a slot, the connect and a TLS handshake, the CONNACK, the restore); this
    // one, past all of them, bounds writing to the client meanwhile. The cut gets its own.
    let mut deadline =
        started + MOVE_QUEUE + 2 * cfg.upstream_connect_timeout + 3 * cfg.connack_timeout + EVACUATION_WAIT;
    let Live { client, track, scanner, down_scanner, session, up_held, down_held, .. } = live;
    let mut to_new = Vec::new();
    macro_rules! fail {
        ($e:expr) => {
            return Err(($e, to_new))
        };
    }
    // The flows still open when the deadline passes, for the error.
    let inflight = |track: &super::track::SharedTrack| {
        let t = track.lock();
        SwitchError::Inflight(started.elapsed(), t.up_open(), t.down_open())
    };
    macro_rules! client_io {
        ($f:expr) => {
            match timeout_at(deadline, $f).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => fail!(SwitchError::Ended(Ended::ClientSide(ForwardError::Io(e)))),
                Err(_) => fail!(inflight(track)),
            }
        };
    }
    // What the old broker sent and the client has not got yet: whole packets are the client's.
    let (pending, unflushed) = down_held.take();
    if !pending.is_empty() || unflushed {
        client_io!(write_all(&mut *client, &pending));
    }
    if !down_scanner.at_boundary() {
        fail!(SwitchError::Torn);
    }
    // What the client sent that the old broker never got is lost with it, as with a broken
    // connection, but for its QoS 1/2 PUBLISHes: `track` has copies of those.
    drop(up_held.take());
    // The client's packet under way: its start went to the old broker, so the rest is dropped
    // too (after `track` has seen it).
    let mut buf = Vec::new();
    while !scanner.at_boundary() {
        if buf.is_empty() && client_io!(client.read_buf(&mut buf)) == 0 {
            fail!(SwitchError::Ended(Ended::ClientClosed));
        }
        let n = scanner.left_in_packet().map_or(1, |n| (n as usize).min(buf.len()));
        let mut packets = 0;
        if let Err(e) = track.lock().feed(true, scanner, &buf[..n], &mut packets) {
            fail!(SwitchError::Ended(Ended::ClientSide(e.into())));
        }
        buf.drain(..n);
    }
    if !track.lock().settled_requests() {
        // A SUBSCRIBE or UNSUBSCRIBE the old broker never answered.
        fail!(SwitchError::Incomplete);
    }
    // Every open flow of the client's is finished from its copy: unacknowledged ones are
    // sent again, released ones (including those released during the cut) finished.
    if !track.lock().all_copied() {
        fail!(SwitchError::Uncopied);
    }
    let mut resend = track.lock().unacknowledged().unwrap_or_default();
    let mut from_client = PacketReader::with_buffered(&mut *client, buf, max);
    // The old broker's part in QoS 2 flows whose message has arrived, and the PINGRESPs it
    // owes; then the cut.
    let mut reply = track.lock().owed_by_failed_broker();
    for _ in 0..track.lock().pings_open {
        reply.extend_from_slice(&encode::pingresp());
    }
    // Set once the new session is made: then the wait for the others', then the cut.
    let mut evacuation = None;
    let mut evacuated = false;
    loop {
        if !reply.is_empty() {
            let mut n = 0;
            if let Err(e) = track.lock().feed(false, down_scanner, &reply, &mut n) {
                fail!(SwitchError::Ended(Ended::BrokerSide(e.into())));
            }
            session.packets_out.fetch_add(n, Ordering::Relaxed);
            session.bytes_out.fetch_add(reply.len() as u64, Ordering::Relaxed);
            client_io!(write_all(*from_client.stream(), &reply));
            reply.clear();
        }
        if evacuated && track.lock().ready_to_leave_failed_broker() {
            break;
        }
        tokio::select! {
            r = preparing.result(), if prepared.is_none() => {
                match r {
                    Ok(p) => *prepared = Some(p),
                    Err(e) => fail!(e),
                }
                session.evacuated();
                evacuation = Some(Box::pin(old.evacuated(EVACUATION_WAIT)));
            }
            _ = async { evacuation.as_mut().expect("enabled once set").await }, if evacuation.is_some() && !evacuated => {
                evacuated = true;
                // Closed (a close that wins over the move, shutdown) meanwhile: the close stands.
                if session.move_requested().is_none() {
                    fail!(SwitchError::Cancelled);
                }
                deadline = Instant::now() + 2 * cfg.connack_timeout;
            }
            p = from_client.next(), if to_new.len() < CUT_BUFFER => {
                let p = match seen_from_client(p, track, scanner, session) {
                    Ok(p) => p,
                    Err(e) => fail!(e),
                };
                let id = p.body().get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                match p.kind() {
                    // Acknowledgements of the old broker's deliveries end with it; a QoS 2 one
                    // gets the PUBREL it would have sent (not a refusal: that ended the flow).
                    kind::PUBACK | kind::PUBCOMP => {}
                    kind::PUBREC if p.body().get(2).is_some_and(|&r| r >= 0x80) => {}
                    kind::PUBREC => reply.extend_from_slice(&super::track::pubrel(id)),
                    // The client releases its QoS 2 PUBLISH: `track` marks it, and the flow is
                    // finished on the new broker from its copy.
                    kind::PUBREL => {}
                    // Its keep-alive: meshgate is there, and its session is on its way.
                    kind::PINGREQ => reply.extend_from_slice(&encode::pingresp()),
                    // MQTT 5 "disconnect with will message": as a connection that broke.
                    kind::DISCONNECT if session.info.version == 5 && p.body().first() == Some(&0x04) => {
                        fail!(SwitchError::Ended(Ended::ClientClosed))
                    }
                    kind::DISCONNECT => return Ok(Cut::ClientLeft),
                    _ => to_new.extend_from_slice(&p.bytes),
                }
            }
            _ = sleep_until(deadline) => fail!(inflight(track)),
        }
    }
    let (_, partial) = from_client.into_parts();
    if !partial.is_empty() {
        let mut n = 0;
        if let Err(e) = track.lock().feed(true, scanner, &partial, &mut n) {
            fail!(SwitchError::Ended(Ended::ClientSide(e.into())));
        }
        to_new.extend_from_slice(&partial);
    }
    resend.extend_from_slice(&to_new);
    Ok(Cut::Done(resend))
}

/// Finishes the client's released QoS 2 flows of a failed broker on the new one: the PUBLISH
/// again (DUP), its PUBREC taken here (the client had one), the PUBREL, and the new broker's
/// PUBCOMP passed on to the client, which ends the flow there. Returns what goes to the client:
/// those PUBCOMPs and whatever the new broker sent meanwhile, in order.
async fn finish_released(
    conn: &mut Conn,
    released: &[(u16, Vec<u8>)],
    deadline: Instant,
) -> Result<Vec<u8>, SwitchError> {
    let mut to_client = Vec::new();
    if released.is_empty() {
        return Ok(to_client);
    }
    let mut packets = remote::packets(conn, Vec::new());
    for (id, publish) in released {
        send(&mut packets, publish, deadline).await?;
        let rec = answer(&mut packets, kind::PUBREC, *id, deadline, &mut to_client).await?;
        if let Some(&code) = rec.body().get(2).filter(|&&r| r >= 0x80) {
            // Refused there (MQTT 5): the flow ends, and the client hears so from meshgate.
            tracing::warn!(
                packet_id = id,
                code,
                "the new broker refused a QoS 2 PUBLISH sent again after its broker failed"
            );
            to_client.extend_from_slice(&encode::ack(kind::PUBCOMP, *id));
            continue;
        }
        send(&mut packets, &super::track::pubrel(*id), deadline).await?;
        let comp = answer(&mut packets, kind::PUBCOMP, *id, deadline, &mut to_client).await?;
        to_client.extend_from_slice(&comp.bytes);
    }
    let (_, leftover) = packets.into_parts();
    to_client.extend_from_slice(&leftover);
    Ok(to_client)
}

fn unfinished(what: impl std::fmt::Display) -> SwitchError {
    SwitchError::Restore(format!("finishing a QoS 2 flow on the new broker: {what}"))
}

async fn send(packets: &mut remote::Packets<'_>, bytes: &[u8], deadline: Instant) -> Result<(), SwitchError> {
    timeout_at(deadline, write_all(*packets.stream(), bytes))
        .await
        .map_err(|_| unfinished("no room to write"))?
        .map_err(unfinished)
}

/// The new broker's `kind` for packet `id`; what it sends before that is the client's.
async fn answer(
    packets: &mut remote::Packets<'_>,
    kind: u8,
    id: u16,
    deadline: Instant,
    to_client: &mut Vec<u8>,
) -> Result<crate::mqtt::io::Packet, SwitchError> {
    loop {
        let p = timeout_at(deadline, packets.next())
            .await
            .map_err(|_| unfinished("no answer in time"))?
            .map_err(unfinished)?;
        if p.kind() == kind && p.body().get(..2) == Some(&id.to_be_bytes()[..]) {
            return Ok(p);
        }
        to_client.extend_from_slice(&p.bytes);
    }
}

/// A packet read from the client during a cut: seen by `track` and counted as forwarded.
fn seen_from_client(
    read: Result<crate::mqtt::io::Packet, ReadError>,
    track: &super::track::SharedTrack,
    scanner: &mut crate::mqtt::FrameScanner,
    session: &crate::pool::Session,
) -> Result<crate::mqtt::io::Packet, SwitchError> {
    let p = match read {
        Ok(p) => p,
        Err(ReadError::Closed) => return Err(SwitchError::Ended(Ended::ClientClosed)),
        Err(e) => return Err(SwitchError::Ended(Ended::ClientSide(read_error(e)))),
    };
    let mut n = 0;
    track.lock().feed(true, scanner, &p.bytes, &mut n).map_err(|e| SwitchError::Ended(Ended::ClientSide(e.into())))?;
    session.packets_in.fetch_add(n, Ordering::Relaxed);
    session.bytes_in.fetch_add(p.bytes.len() as u64, Ordering::Relaxed);
    Ok(p)
}

fn read_error(e: ReadError) -> ForwardError {
    match e {
        ReadError::Io(e) => ForwardError::Io(e),
        other => ForwardError::Io(std::io::Error::other(other.to_string())),
    }
}
