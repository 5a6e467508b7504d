//! One client connection: read its CONNECT, find a broker that answers it, then forward both ways.
//!
//! A broker attempt fails (and counts against the broker's passive accounting) when the TCP
//! connect fails or times out, the broker closes or sends garbage before its CONNACK, no
//! CONNACK arrives within `connack_timeout`, or the CONNACK says "server unavailable" or
//! "server busy". The same CONNECT bytes are then replayed to the next candidate, up to
//! `connect_tries` brokers. The client sees exactly one CONNACK: the first real answer, or
//! "server unavailable" from meshgate when every try failed. Other refusals (bad credentials,
//! not authorized) are the broker's answer to the client and pass through unchanged.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn, Instrument};

use super::forward::{self, Ended, ForwardError, Held, Tally};
use super::limits::Admission;
use super::track::{SharedTrack, Track};
use super::Proxy;
use crate::config::{Listener, Move};
use crate::mqtt::{self, connack, Connack, Connect, ConnectError, FrameScanner};
use crate::pool::{Broker, Lease, Registered, SessionInfo, BROKER_DOWN};
use crate::transport::write_all;
use crate::transport::Conn;
use crate::upstream::AttemptError;

/// Why a client connection ended before a session existed; the `reason` label of
/// `meshgate_rejected_connections_total`.
#[derive(Debug, thiserror::Error)]
enum Rejected {
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("closed before sending a whole CONNECT")]
    Closed,
    #[error("{0}")]
    BadConnect(#[from] ConnectError),
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

impl Rejected {
    fn reason(&self) -> &'static str {
        match self {
            Rejected::ConnectTimeout(_) => "connect_timeout",
            Rejected::Closed => "closed_early",
            Rejected::BadConnect(ConnectError::TooLarge { .. }) => "packet_too_large",
            Rejected::BadConnect(_) => "malformed_connect",
            Rejected::Io(_) => "io_error",
        }
    }
}

/// The task of one client connection. The setup is boxed, together with the arguments it
/// consumes, and freed once it is done: its futures (timeouts, broker connects, the CONNECT kept
/// for replay) are several times larger than forwarding needs, and an idle session's task
/// would otherwise carry them, and a second copy of its arguments, for as long as it lives.
///
/// The forwarding state is boxed too: tokio pads a task's own allocation to a multiple of
/// 128 bytes (cache-line alignment), so a small task plus one ordinary allocation costs an
/// idle session less than one large task. The client's place under the limits (`admission`)
/// is held in the box until the session ends.
pub fn handle(
    proxy: Arc<Proxy>,
    client: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let _ = client.set_nodelay(true);
    let setup = Box::pin(setup_in_span(proxy.clone(), Conn::Tcp(client), peer));
    Box::pin(session_task(proxy, setup, Listener::Mqtt, admission))
}

/// A client of the TLS listener: the handshake (client certificate checked when [tls]
/// client_ca is set) must finish within the CONNECT time; then the session is as any other.
pub async fn handle_tls(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, admission: Admission) {
    let _ = client.set_nodelay(true);
    let Some(acceptor) = proxy.acceptor.load_full() else { return };
    let limit = proxy.pool.proxy_config().client_connect_timeout;
    // A handshake in progress ends with the shutdown grace period like a session does.
    let handshake = tokio::select! {
        r = timeout(limit, acceptor.accept(client)) => r,
        _ = proxy.pool.closing.cancelled() => return,
    };
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            proxy.reject("tls_handshake", format_args!("from {peer}: {e}"));
            return;
        }
        Err(_) => {
            proxy.reject("tls_handshake", format_args!("from {peer}: no handshake within {limit:?}"));
            return;
        }
    };
    let setup = Box::pin(setup_in_span(proxy.clone(), Conn::ClientTls(Box::new(tls)), peer));
    session_task(proxy, setup, Listener::Mqtts, admission).await
}

/// A client of a WebSocket listener (`wss`: TLS first): the upgrade, within the CONNECT time,
/// with the client admitted under the limits on its own address; then the session is as any
/// other, over the WebSocket's bytes.
pub async fn handle_ws(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, tls: bool) {
    let _ = client.set_nodelay(true);
    let cfg = proxy.pool.proxy_config();
    let limit = cfg.client_connect_timeout;
    let upgrade = crate::transport::ws::Upgrade {
        path: &proxy.listen.ws_path,
        trusted: &proxy.listen.trusted_proxies,
        // A message may pack several packets (MQTT over WebSockets allows it).
        max_message: (cfg.max_packet_size as usize + 5).saturating_mul(4),
    };
    let limits = proxy.limits.clone();
    let admit = |ip| limits.admit(ip, &cfg, std::time::Instant::now()).map_err(|r| r.reason());
    let upgraded = async {
        let conn = match tls {
            true => {
                let acceptor = proxy.acceptor.load_full()?;
                match acceptor.accept(client).await {
                    Ok(s) => Conn::ClientTls(Box::new(s)),
                    Err(e) => {
                        proxy.reject("tls_handshake", format_args!("from {peer}: {e}"));
                        return None;
                    }
                }
            }
            false => Conn::Tcp(client),
        };
        match crate::transport::ws::accept(conn, peer, &upgrade, admit).await {
            Ok(done) => Some(done),
            Err(why) => {
                proxy.reject(why.reason(), format_args!("WebSocket from {peer}: {why}"));
                None
            }
        }
    };
    let upgraded = tokio::select! {
        r = timeout(limit, upgraded) => r,
        _ = proxy.pool.closing.cancelled() => return,
    };
    let (ws, client_addr, admission) = match upgraded {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(_) => {
            proxy.reject("ws_handshake", format_args!("from {peer}: no upgrade within {limit:?}"));
            return;
        }
    };
    let setup = Box::pin(setup_in_span(proxy.clone(), Conn::ClientWs(Box::new(ws)), client_addr));
    session_task(proxy, setup, if tls { Listener::Wss } else { Listener::Ws }, admission).await;
}

/// One session from its setup to its end, when its place under the limits is given back.
async fn session_task<F: Future<Output = Option<Live>>>(
    proxy: Arc<Proxy>,
    setup: Pin<Box<F>>,
    listener: Listener,
    admission: Admission,
) {
    proxy.pool.metrics.client_sessions.inc();
    // Looked up at open and close only: the task carries the label, not the gauge.
    proxy.pool.metrics.listener_connections.with_label_values(&[listener.as_str()]).inc();
    let mut live = tokio::select! {
        live = setup => live,
        _ = proxy.pool.closing.cancelled() => None,
    };
    // Used in place, never moved, so the task holds one copy of it.
    if let Some(live) = &mut live {
        forward_session(&proxy, live).await;
    }
    proxy.pool.metrics.client_sessions.dec();
    proxy.pool.metrics.listener_connections.with_label_values(&[listener.as_str()]).dec();
    drop(admission);
}

/// What forwarding needs from the setup: one session's connections and the state of each
/// direction, which a move (`switch`) works on too.
pub(super) struct Live {
    pub(super) client: Conn,
    pub(super) upstream: Conn,
    pub(super) session: Registered,
    pub(super) scanner: FrameScanner,
    pub(super) down_scanner: FrameScanner,
    /// `meshgate_bytes_total` by direction, looked up once per session.
    pub(super) up_total: prometheus::IntCounter,
    pub(super) down_total: prometheus::IntCounter,
    /// Subscriptions and open QoS flows, recorded as they pass (and, for persistent sessions,
    /// kept in their record).
    pub(super) track: Box<SharedTrack>,
    /// The client's CONNECT as it sent it: what a move replays to the new broker, and its size
    /// counts in the access log (the session's counters start after it).
    pub(super) connect: Box<[u8]>,
    /// What each direction holds between polls, kept across a move.
    pub(super) up_held: Held,
    pub(super) down_held: Held,
}

impl Live {
    /// Forwards both ways until either side closes or fails; can be stopped (dropped) at any
    /// await and started again without losing bytes.
    pub(super) fn forward(&mut self) -> impl Future<Output = Ended> + '_ {
        let session = &self.session;
        forward::forward(
            &mut self.client,
            &mut self.upstream,
            forward::Side {
                scanner: Some(&mut self.scanner),
                tally: Tally { bytes: &session.bytes_in, packets: &session.packets_in, total_bytes: &self.up_total },
                tap: Some((&self.track, true)),
                held: &mut self.up_held,
            },
            forward::Side {
                scanner: Some(&mut self.down_scanner),
                tally: Tally {
                    bytes: &session.bytes_out,
                    packets: &session.packets_out,
                    total_bytes: &self.down_total,
                },
                tap: Some((&self.track, false)),
                held: &mut self.down_held,
            },
        )
    }

    /// Both streams are between packets: nothing half-forwarded either way.
    pub(super) fn at_boundaries(&self) -> bool {
        self.scanner.at_boundary()
            && self.down_scanner.at_boundary()
            && self.up_held.is_empty()
            && self.down_held.is_empty()
    }
}

async fn setup_in_span(proxy: Arc<Proxy>, client: Conn, peer: SocketAddr) -> Option<Live> {
    let span = tracing::info_span!("session", %peer, client_id = tracing::field::Empty, broker = tracing::field::Empty);
    // An idle session holds no tracing span (one costs about 500 bytes in the subscriber):
    // this one ends with the setup, and the closing line gets a new one with the same fields.
    setup(&proxy, client, peer).instrument(span).await
}

/// Forwards until either side closes or fails, or meshgate closes the session (or shuts down).
/// A session asked to move is switched to its new broker under the client's connection and
/// forwarding goes on; where it cannot be, it closes as any other.
async fn forward_session(proxy: &Arc<Proxy>, live: &mut Live) {
    let ended = loop {
        let session = live.session.session.clone();
        let ended = tokio::select! {
            e = live.forward() => Some(e),
            // Also fires when meshgate shuts down (the shutdown closes every session).
            _ = session.cancelled() => None,
        };
        if proxy.pool.closing.is_cancelled() {
            break ended;
        }
        if let Some(e) = &ended {
            // Boxed, as the switch below: rare paths whose futures would otherwise sit in every
            // idle session's task (1,792 bytes of forwarding state instead of a few hundred).
            if !Box::pin(left_by_failed_broker(proxy, live, e)).await {
                break ended;
            }
        }
        let Some(why) = live.session.move_requested() else { break ended };
        if proxy.pool.proxy_config().moves == Move::Close {
            proxy.pool.metrics.sessions_closed.with_label_values(&[why]).inc();
            break ended;
        }
        match Box::pin(super::switch::switch(proxy, live, why)).await {
            Ok(()) => continue,
            // A failback that could not be made: the session goes on where it is, unless a
            // close came meanwhile or the client connected again elsewhere.
            Err(e)
                if e.stays(why, live.session.info.persistent)
                    && live.session.move_requested() == Some(why)
                    && proxy.pool.live_brokers(&live.session.info.client_id).is_empty() =>
            {
                let fresh = proxy.pool.renew(&live.session);
                drop(std::mem::replace(&mut live.session, fresh));
                continue;
            }
            Err(e) => {
                proxy.pool.metrics.sessions_closed.with_label_values(&[why]).inc();
                break e.ended();
            }
        }
    };
    let session = &live.session;
    // meshgate closes an MQTT 5 session with a reason the client can act on.
    if ended.is_none() && live.session.info.version == 5 && live.down_held.is_empty() && live.down_scanner.at_boundary()
    {
        let code = disconnect_reason(proxy.pool.closing.is_cancelled(), session.close_reason());
        let _ = timeout(Duration::from_millis(200), write_all(&mut live.client, &[0xe0, 0x01, code])).await;
    }
    if let Some(Ended::ClientSide(ForwardError::Malformed(_))) = &ended {
        proxy.pool.metrics.sessions_closed.with_label_values(&["malformed"]).inc();
    }
    let (end, detail) = match ended {
        Some(Ended::ClientClosed) => ("client_closed", None),
        Some(Ended::BrokerClosed) => ("broker_closed", None),
        Some(Ended::ClientSide(ForwardError::Malformed(e))) => ("malformed", Some(e.to_string())),
        Some(Ended::ClientSide(e)) => ("client_error", Some(e.to_string())),
        Some(Ended::BrokerSide(e)) => ("broker_error", Some(e.to_string())),
        None if proxy.pool.closing.is_cancelled() => ("shutdown", None),
        None => (session.close_reason().unwrap_or("closed"), None),
    };
    let info = &session.info;
    // Formatted only for someone who reads it: connection churn should not pay for a span
    // and a message per session that the log level drops anyway.
    if tracing::enabled!(tracing::Level::DEBUG) {
        let span = tracing::info_span!(
            "session",
            peer = %info.peer,
            client_id = info.client_id.as_str(),
            broker = session.broker.name.as_str()
        );
        let why = detail.as_deref().map_or_else(|| end.to_string(), |d| format!("{end}: {d}"));
        span.in_scope(|| debug!("session ended: {why}"));
    }
    if !proxy.access.enabled() {
        return;
    }
    proxy.access.log(crate::accesslog::Record {
        time: crate::accesslog::Record::now(),
        client: info.peer,
        client_id: info.client_id.clone(),
        username: info.username.clone(),
        protocol: mqtt::protocol_name(info.version),
        broker: session.broker.name.clone(),
        upstream: session.broker.address.clone(),
        bytes_in: live.connect.len() as u64 + session.bytes_in.load(Ordering::Relaxed),
        bytes_out: session.bytes_out.load(Ordering::Relaxed),
        packets_in: 1 + session.packets_in.load(Ordering::Relaxed),
        packets_out: session.packets_out.load(Ordering::Relaxed),
        duration_s: crate::accesslog::seconds(info.connected_at.elapsed().unwrap_or_default()),
        end: end.to_string(),
        detail,
    });
}

/// Whether the session whose forwarding ended with `e` is to leave its broker as a failed one:
/// the broker's socket ended (it closed, reading from it failed, or writing to it did; not
/// writing to the client: that client is gone) and the broker is gone. Then every session there
/// moves, without waiting for its probes to say so.
async fn left_by_failed_broker(proxy: &Proxy, live: &Live, e: &Ended) -> bool {
    let broke = matches!(
        e,
        Ended::BrokerClosed | Ended::BrokerSide(ForwardError::Io(_)) | Ended::ClientSide(ForwardError::Write(_))
    );
    if !broke || !proxy.pool.proxy_config().switches_off_failed_brokers() {
        return false;
    }
    let broker = &live.session.broker;
    if live.session.move_requested().is_none() {
        // Another session's check may settle it first (its move request cancels this).
        let gone = tokio::select! {
            gone = broker_gone(proxy, broker) => gone,
            _ = live.session.cancelled() => false,
        };
        if gone {
            proxy.pool.move_sessions(&broker.name, BROKER_DOWN);
        }
    }
    live.session.move_requested() == Some(BROKER_DOWN)
}

/// Whether `broker`, which closed a session's connection, is gone: its probes say so, or it
/// cannot be reached (connection refused or timed out). A broker that takes the connection
/// but closes it or does not answer is asked again 100 ms later (a killed broker's listening
/// socket may take a connection for a moment after its connections closed; one at its
/// connection limit does so every time, and is not gone). A broker that answers, refusals
/// included, is there and closed the session on purpose. One check runs per broker at a time;
/// sessions it closed together share the verdict, and a gone broker counts as a passive
/// failure (`max_fails`).
async fn broker_gone(proxy: &Proxy, broker: &Broker) -> bool {
    const FRESH: Duration = Duration::from_secs(1);
    if broker.probe_up() == Some(false) {
        return true;
    }
    let check = proxy.gone_check(&broker.name);
    let mut verdict = check.lock().await;
    if let Some((at, gone)) = *verdict {
        if at.elapsed() < FRESH {
            return gone;
        }
    }
    let mut gone = false;
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let id = format!("meshgate-check-{}-{}", std::process::id(), CHECKS.fetch_add(1, Ordering::Relaxed));
        let connect = mqtt::encode::connect(4, &id, true, 5, None, None);
        match proxy.upstream.reachable(&broker.config(), &connect).await {
            Some(answered) => {
                gone = !answered;
                break;
            }
            // Taken and closed (or silent) twice: there, but not answering this; the probes
            // decide.
            None => gone = false,
        }
    }
    if gone {
        proxy.pool.record_failure(broker, "connect_error");
    }
    *verdict = Some((tokio::time::Instant::now(), gone));
    gone
}

static CHECKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The MQTT 5 DISCONNECT reason for a session meshgate closes: the server is shutting down
/// (0x8B), another session took this client id over (0x8E), or the client should use another
/// server (0x9C: its broker went down, was disabled or drained, or a move could not switch).
fn disconnect_reason(shutting_down: bool, reason: Option<&str>) -> u8 {
    match (shutting_down, reason) {
        (true, _) | (_, Some("shutdown")) => 0x8b,
        (_, Some("duplicate_client_id" | crate::pool::INSTANCE_TAKEOVER)) => 0x8e,
        _ => 0x9c,
    }
}

/// Reads the CONNECT, finds a broker that answers it, registers the session and passes on
/// what each side sent beyond the handshake. `None` when the connection ends here.
async fn setup(proxy: &Arc<Proxy>, mut client: Conn, peer: SocketAddr) -> Option<Live> {
    let cfg = proxy.pool.proxy_config();
    let accepted = Instant::now();
    let (packet, extra) = match read_connect(&mut client, cfg.client_connect_timeout, cfg.max_packet_size).await {
        Ok(v) => v,
        Err(e) => {
            proxy.reject(e.reason(), format_args!("from {peer}: {e}"));
            return None;
        }
    };
    let connect = match mqtt::connect::parse(&packet) {
        Ok(c) => c,
        Err(e) => {
            proxy.reject("malformed_connect", format_args!("from {peer}: {e}"));
            return None;
        }
    };
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    let persistent = connect.persistent();
    let durable = proxy.durable.clone();
    durable.pass_barrier().await;
    // The setup of a client id meshgate keeps a session for takes that id's turn with
    // meshgate's own work on the session (migration, standby, wipes), so the two never meet
    // on one broker.
    let turn = match durable.enabled() && (persistent || durable.knows(&connect.client_id)) {
        true => Some(durable.lock(&connect.client_id).await),
        false => None,
    };

    let Some((mut upstream, lease, ack, mut after_connack)) = establish(proxy, &packet, &connect, peer).await else {
        proxy.reject("no_broker", format_args!("client {:?}: every broker tried failed", connect.client_id));
        let _ = timeout(Duration::from_secs(1), write_all(&mut client, connack::unavailable(connect.version))).await;
        return None;
    };
    tracing::Span::current().record("broker", lease.broker().name.as_str());
    if connect.version == 5 && ack.code == 0 {
        // Aliases belong to one broker connection; a session that moves could not keep them.
        connack::forbid_topic_aliases(&mut after_connack);
    }
    proxy.pool.metrics.connack_duration.observe(accepted.elapsed().as_secs_f64());

    let max_subs = proxy.durable.config().max_subscriptions;
    let mut track = Track::new(connect.version, max_subs);
    if !cfg.switches_off_failed_brokers() {
        // Never switched off a failed broker: nothing to send again, so nothing is copied.
        track = track.without_copies();
    }
    if turn.is_some() && ack.code == 0 {
        let broker = &lease.broker().name;
        // Accepted: a clean CONNECT has now ended the old session on this broker.
        durable.on_connect(&connect.client_id, connect.clean, persistent, broker);
        if persistent {
            if !ack.session_present
                && !connect.clean
                && !restore(proxy, &connect, lease.broker(), &mut upstream, &mut after_connack).await
            {
                // The broker's side is in an unknown state (SUBACKs may still come): the
                // client reconnects and gets a clean try.
                return None;
            }
            durable.on_established(&connect, &packet, broker);
            // What the session holds on its broker now: the record (restored, or present).
            track.seed(durable.to_restore(&connect.client_id));
            track = track.with_record(durable.clone(), connect.client_id.clone(), broker.clone());
        }
    }
    if ack.code != 0 {
        // A refusal the client must see; the broker closes its side.
        drop(turn);
        debug!(code = ack.code, "broker refused the client; passed through");
        let _ = write_all(&mut client, &after_connack).await;
        return None;
    }
    let info = SessionInfo {
        client_id: connect.client_id,
        username: connect.username,
        version: connect.version,
        clean: connect.clean,
        keepalive: connect.keepalive,
        persistent,
        peer,
        connected_at: SystemTime::now(),
    };
    // Registered within the turn, so meshgate's own work on this client id sees where it is
    // connected before the turn passes on; the client may then take its time reading.
    let session = proxy.pool.register(lease, info);
    drop(turn);

    // The CONNACK and whatever the broker sent right behind it (queued messages of a
    // persistent session) go to the client first; then what the client pipelined. If that
    // fails, dropping `session` unregisters it.
    if write_all(&mut client, &after_connack).await.is_err() {
        return None;
    }
    debug!("session established");
    // Both scanners start where the setup left off, so packet boundaries stay in step with
    // the bytes already sent each way; a SUBSCRIBE pipelined behind the CONNECT is recorded.
    let mut scanner = FrameScanner::new(cfg.max_packet_size);
    let mut down_scanner = FrameScanner::new(u32::MAX);
    let (mut n_in, mut n_out) = (0, 0);
    let primed = track
        .feed(true, &mut scanner, &extra, &mut n_in)
        .and_then(|_| track.feed(false, &mut down_scanner, &after_connack, &mut n_out));
    session.packets_in.fetch_add(n_in, Ordering::Relaxed);
    session.packets_out.fetch_add(n_out, Ordering::Relaxed);
    session.bytes_in.fetch_add(extra.len() as u64, Ordering::Relaxed);
    session.bytes_out.fetch_add(after_connack.len() as u64, Ordering::Relaxed);
    if let Err(e) = primed {
        warn!("closing session: {e}");
        return None;
    }
    if !extra.is_empty() && write_all(&mut upstream, &extra).await.is_err() {
        return None;
    }
    let up_total = proxy.pool.metrics.bytes.with_label_values(&["client_to_broker"]);
    let down_total = proxy.pool.metrics.bytes.with_label_values(&["broker_to_client"]);
    up_total.inc_by(extra.len() as u64);
    down_total.inc_by(after_connack.len() as u64);
    Some(Live {
        client,
        upstream,
        session,
        scanner,
        down_scanner,
        up_total,
        down_total,
        track: Box::new(parking_lot::Mutex::new(track)),
        connect: packet.into_boxed_slice(),
        up_held: Held::default(),
        down_held: Held::default(),
    })
}

/// A persistent client landed on a broker without its session: subscribes what the record
/// holds before the client sees its CONNACK, then marks the CONNACK "session present" (MQTT
/// 3.1 has no such flag). Whatever the broker sent meanwhile follows the CONNACK. `false`
/// when the restore failed and the connection must close.
async fn restore(
    proxy: &Proxy,
    connect: &Connect,
    broker: &Broker,
    upstream: &mut Conn,
    after_connack: &mut Vec<u8>,
) -> bool {
    let subs = proxy.durable.to_restore(&connect.client_id);
    if subs.is_empty() {
        return true;
    }
    let Ok(Some((_, n))) = connack::parse(after_connack) else { return false };
    let rest = after_connack.split_off(n);
    let deadline = Instant::now() + proxy.pool.proxy_config().connack_timeout;
    let mut packets = crate::durable::remote::packets(upstream, rest);
    let restored = crate::durable::remote::subscribe_all(&mut packets, connect.version, &subs, deadline).await;
    let (_, leftover) = packets.into_parts();
    match restored {
        Ok((granted, passed)) => {
            info!(broker = %broker.name, subscriptions = subs.len(), granted, "restored a persistent session's subscriptions");
            proxy.pool.metrics.durable_ops.with_label_values(&["restore", "ok"]).inc();
            if connect.version != 3 {
                connack::set_session_present(after_connack);
            }
            after_connack.extend_from_slice(&passed);
            after_connack.extend_from_slice(&leftover);
            true
        }
        Err(e) => {
            warn!(broker = %broker.name, "restoring the session's subscriptions failed, closing: {e}");
            proxy.pool.metrics.durable_ops.with_label_values(&["restore", "error"]).inc();
            false
        }
    }
}

/// Reads exactly one CONNECT (plus whatever the client pipelined behind it).
async fn read_connect(client: &mut Conn, limit: Duration, max: u32) -> Result<(Vec<u8>, Vec<u8>), Rejected> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + limit;
    // Room for a typical CONNECT and what a client pipelines behind it, so most connections
    // read once into one allocation.
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    loop {
        if let Some(total) = mqtt::connect::check(&buf, max)? {
            let extra = buf.split_off(total);
            return Ok((buf, extra));
        }
        // Straight into the buffer: a stack chunk held across the read would make every
        // session's setup future (boxed, but allocated for each connection) 4 KB larger.
        if buf.capacity() - buf.len() < 64 {
            buf.reserve(1024);
        }
        match timeout_at(deadline, client.read_buf(&mut buf)).await {
            Err(_) => return Err(Rejected::ConnectTimeout(limit)),
            Ok(Ok(0)) => return Err(Rejected::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// Tries brokers in selection order until one answers the CONNECT with a CONNACK that is not
/// a broker failure. Returns the connected upstream, its lease, the CONNACK and the bytes to
/// send the client (the CONNACK and anything after it).
async fn establish(
    proxy: &Arc<Proxy>,
    packet: &[u8],
    connect: &Connect,
    peer: SocketAddr,
) -> Option<(Conn, Lease, Connack, Vec<u8>)> {
    let cfg = proxy.pool.proxy_config();
    let mut tried: Vec<Arc<Broker>> = Vec::new();
    // Each failed attempt is the broker's story (passive accounting, the broker's own
    // warnings when its probes fail); for the client it matters only if no attempt served it.
    let mut failed: Vec<String> = Vec::new();
    for attempt in 0..cfg.connect_tries {
        let lease = proxy.pool.pick(&tried)?;
        let broker = lease.broker().clone();
        if attempt > 0 {
            proxy.pool.metrics.connect_retries.inc();
        }
        match proxy.upstream.handshake(&broker.config(), packet, connect.version, Some(peer)).await {
            Ok((stream, ack, bytes)) => {
                proxy.pool.record_success(&broker);
                if attempt > 0 {
                    info!(broker = %broker.name, attempt = attempt + 1, "CONNECT served after retry ({})", failed.join("; "));
                }
                return Some((stream, lease, ack, bytes));
            }
            Err(e) => {
                debug!(broker = %broker.name, reason = e.reason(), "broker attempt failed: {e}");
                failed.push(format!("{}: {e}", broker.name));
                match &e {
                    // Out of descriptors (or memory): every other broker would fail the same way.
                    AttemptError::Local(_) => {
                        proxy.pool.record_local_error(&broker, e.reason(), &e);
                        break;
                    }
                    // This broker's handshake slots are full; the next broker's may not be.
                    AttemptError::Queued(_) => proxy.pool.record_local_error(&broker, e.reason(), &e),
                    _ => proxy.pool.record_failure(&broker, e.reason()),
                }
                tried.push(broker);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::limits::Refusal;
    use crate::proxy::REJECT_REASONS;

    /// The metrics start with a zero series for every refusal reason: the list must name each.
    #[test]
    fn every_refusal_reason_is_listed_for_the_metrics() {
        let setup = [
            Rejected::ConnectTimeout(Duration::ZERO),
            Rejected::Closed,
            Rejected::BadConnect(ConnectError::TooLarge { len: 2, max: 1 }),
            Rejected::BadConnect(ConnectError::ReservedFlag),
            Rejected::Io(std::io::ErrorKind::Other.into()),
        ];
        let limits = [Refusal::MaxConnections, Refusal::PerSource, Refusal::RateLimited];
        let reasons = setup.iter().map(Rejected::reason).chain(limits.iter().map(|r| r.reason()));
        let ws = [
            crate::transport::ws::Refused::Handshake(String::new()),
            crate::transport::ws::Refused::Path(String::new()),
            crate::transport::ws::Refused::Subprotocol(String::new()),
        ];
        let ws: Vec<&str> = ws.iter().map(|r| r.reason()).collect();
        for r in reasons.chain(["no_broker", "tls_handshake", "malformed_connect"]).chain(ws) {
            assert!(REJECT_REASONS.contains(&r), "{r} is not in REJECT_REASONS");
        }
    }
}
