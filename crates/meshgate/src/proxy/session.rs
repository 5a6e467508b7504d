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

use super::forward::{self, Ended, ForwardError, Tally};
use crate::mqtt::{self, connack, Connack, Connect, ConnectError, FrameScanner};
use crate::pool::{Broker, Lease, Pool, Registered, SessionInfo};
use crate::transport::Conn;

/// Why one broker attempt failed; the label is the `reason` of `meshgate_upstream_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("no CONNACK within {0:?}")]
    ConnackTimeout(Duration),
    #[error("broker closed the connection before its CONNACK")]
    Closed,
    #[error("{0}")]
    Protocol(String),
    #[error("CONNACK {code:#04x}: {reason}")]
    Refused { code: u8, reason: &'static str },
}

impl AttemptError {
    pub fn reason(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect_error",
            AttemptError::ConnectTimeout(_) => "connect_timeout",
            AttemptError::ConnackTimeout(_) => "connack_timeout",
            AttemptError::Closed => "closed_before_connack",
            AttemptError::Protocol(_) => "protocol_error",
            AttemptError::Refused { reason, .. } => reason,
        }
    }
}

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
/// idle session less than one large task.
pub fn handle(pool: Arc<Pool>, client: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
    let _ = client.set_nodelay(true);
    let setup = Box::pin(setup_in_span(pool.clone(), Conn::Tcp(client), peer));
    Box::pin(session_task(pool, setup))
}

/// A client of the TLS listener: the handshake (client certificate checked when [tls]
/// client_ca is set) must finish within the CONNECT time; then the session is as any other.
pub async fn handle_tls(pool: Arc<Pool>, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let Some(acceptor) = pool.tls_acceptor.load_full() else { return };
    let limit = pool.proxy_config().client_connect_timeout;
    let tls = match timeout(limit, acceptor.accept(client)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            pool.reject("tls_handshake", format_args!("from {peer}: {e}"));
            return;
        }
        Err(_) => {
            pool.reject("tls_handshake", format_args!("from {peer}: no handshake within {limit:?}"));
            return;
        }
    };
    let setup = Box::pin(setup_in_span(pool.clone(), Conn::ClientTls(Box::new(tls)), peer));
    session_task(pool, setup).await
}

async fn session_task<F: Future<Output = Option<Live>>>(pool: Arc<Pool>, setup: Pin<Box<F>>) {
    pool.metrics.client_sessions.inc();
    let mut live = tokio::select! {
        live = setup => live,
        _ = pool.closing.cancelled() => None,
    };
    // Used in place, never moved, so the task holds one copy of it.
    if let Some(live) = &mut live {
        forward_session(&pool, live).await;
    }
    pool.metrics.client_sessions.dec();
}

/// What forwarding needs from the setup.
struct Live {
    client: Conn,
    upstream: Conn,
    session: Registered,
    scanner: FrameScanner,
    down_scanner: FrameScanner,
    /// `meshgate_bytes_total` by direction, looked up once per session.
    up_total: prometheus::IntCounter,
    down_total: prometheus::IntCounter,
    /// Persistent sessions only: their subscriptions are recorded as they pass.
    tap: Option<Box<crate::durable::SharedTap>>,
}

async fn setup_in_span(pool: Arc<Pool>, client: Conn, peer: SocketAddr) -> Option<Live> {
    let span = tracing::info_span!("session", %peer, client_id = tracing::field::Empty, broker = tracing::field::Empty);
    // An idle session holds no tracing span (one costs about 500 bytes in the subscriber):
    // this one ends with the setup, and the closing line gets a new one with the same fields.
    setup(&pool, client, peer).instrument(span).await
}

/// Forwards until either side closes or fails, or meshgate closes the session (or shuts down).
async fn forward_session(pool: &Pool, live: &mut Live) {
    let session = &live.session;
    let ended = tokio::select! {
        e = forward::forward(
            &mut live.client,
            &mut live.upstream,
            forward::Side {
                scanner: Some(&mut live.scanner),
                tally: Tally { bytes: &session.bytes_in, packets: &session.packets_in, total_bytes: &live.up_total },
                tap: live.tap.as_deref().map(|t| (t, true)),
            },
            forward::Side {
                scanner: Some(&mut live.down_scanner),
                tally: Tally { bytes: &session.bytes_out, packets: &session.packets_out, total_bytes: &live.down_total },
                tap: live.tap.as_deref().map(|t| (t, false)),
            },
        ) => Some(e),
        // Also fires when meshgate shuts down: the session's token is a child of the pool's.
        _ = session.cancelled() => None,
    };
    if ended.is_none() && pool.closing.is_cancelled() {
        return;
    }
    if let Some(Ended::ClientSide(ForwardError::Malformed(_))) = &ended {
        pool.metrics.sessions_closed.with_label_values(&["malformed"]).inc();
    }
    // Formatted only for someone who reads it: connection churn should not pay for a span
    // and a message per session that the log level drops anyway.
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let why = match ended {
        Some(Ended::ClientClosed) => "client closed".to_string(),
        Some(Ended::BrokerClosed) => "broker closed".to_string(),
        Some(Ended::ClientSide(ForwardError::Malformed(e))) => format!("client sent a malformed packet: {e}"),
        Some(Ended::ClientSide(e)) => format!("client side: {e}"),
        Some(Ended::BrokerSide(e)) => format!("broker side: {e}"),
        None => format!("closed by meshgate: {}", session.close_reason().unwrap_or("?")),
    };
    let span = tracing::info_span!(
        "session",
        peer = %session.info.peer,
        client_id = session.info.client_id.as_str(),
        broker = session.broker.name.as_str()
    );
    span.in_scope(|| debug!("session ended: {why}"));
}

/// Reads the CONNECT, finds a broker that answers it, registers the session and passes on
/// what each side sent beyond the handshake. `None` when the connection ends here.
async fn setup(pool: &Arc<Pool>, mut client: Conn, peer: SocketAddr) -> Option<Live> {
    let cfg = pool.proxy_config();
    let accepted = Instant::now();
    let (packet, extra) = match read_connect(&mut client, cfg.client_connect_timeout, cfg.max_packet_size).await {
        Ok(v) => v,
        Err(e) => {
            pool.reject(e.reason(), format_args!("from {peer}: {e}"));
            return None;
        }
    };
    let connect = match mqtt::connect::parse(&packet) {
        Ok(c) => c,
        Err(e) => {
            pool.reject("malformed_connect", format_args!("from {peer}: {e}"));
            return None;
        }
    };
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    let persistent = connect.persistent();
    let durable = pool.durable.clone();
    durable.pass_barrier().await;
    // The setup of a client id meshgate keeps a session for takes that id's turn with
    // meshgate's own work on the session (migration, standby, wipes), so the two never meet
    // on one broker.
    let turn = match durable.enabled() && (persistent || durable.knows(&connect.client_id)) {
        true => Some(durable.lock(&connect.client_id).await),
        false => None,
    };

    let Some((mut upstream, lease, ack, mut after_connack)) = establish(pool, &packet, &connect).await else {
        pool.reject("no_broker", format_args!("client {:?}: every broker tried failed", connect.client_id));
        let _ = timeout(Duration::from_secs(1), forward::write_all(&mut client, connack::unavailable(connect.version)))
            .await;
        return None;
    };
    tracing::Span::current().record("broker", lease.broker().name.as_str());
    pool.metrics.connack_duration.observe(accepted.elapsed().as_secs_f64());

    let mut tap = None;
    if turn.is_some() && ack.code == 0 {
        let broker = &lease.broker().name;
        // Accepted: a clean CONNECT has now ended the old session on this broker.
        durable.on_connect(&connect.client_id, connect.clean, persistent, broker);
        if persistent {
            if !ack.session_present
                && !connect.clean
                && !restore(pool, &connect, lease.broker(), &mut upstream, &mut after_connack).await
            {
                // The broker's side is in an unknown state (SUBACKs may still come): the
                // client reconnects and gets a clean try.
                return None;
            }
            durable.on_established(&connect, &packet, broker);
            tap = Some(Box::new(std::sync::Mutex::new(crate::durable::Tap::new(
                durable.clone(),
                connect.client_id.clone(),
                connect.version,
                broker.clone(),
            ))));
        }
    }
    if ack.code != 0 {
        // A refusal the client must see; the broker closes its side.
        drop(turn);
        debug!(code = ack.code, "broker refused the client; passed through");
        let _ = forward::write_all(&mut client, &after_connack).await;
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
    let session = pool.register(lease, info);
    drop(turn);

    // The CONNACK and whatever the broker sent right behind it (queued messages of a
    // persistent session) go to the client first; then what the client pipelined. If that
    // fails, dropping `session` unregisters it.
    if forward::write_all(&mut client, &after_connack).await.is_err() {
        return None;
    }
    debug!("session established");
    // Both scanners start where the setup left off, so packet boundaries stay in step with
    // the bytes already sent each way; a SUBSCRIBE pipelined behind the CONNECT is recorded.
    let mut scanner = FrameScanner::new(cfg.max_packet_size);
    let mut down_scanner = FrameScanner::new(u32::MAX);
    let (mut n_in, mut n_out) = (0, 0);
    let primed_up = match &tap {
        Some(t) => t.lock().unwrap_or_else(|p| p.into_inner()).feed(true, &mut scanner, &extra, &mut n_in),
        None => scanner.feed(&extra, |_| n_in += 1),
    };
    let primed = primed_up.and_then(|_| down_scanner.feed(&after_connack, |_| n_out += 1));
    session.packets_in.fetch_add(n_in, Ordering::Relaxed);
    session.packets_out.fetch_add(n_out, Ordering::Relaxed);
    session.bytes_in.fetch_add(extra.len() as u64, Ordering::Relaxed);
    session.bytes_out.fetch_add(after_connack.len() as u64, Ordering::Relaxed);
    if let Err(e) = primed {
        warn!("closing session: {e}");
        return None;
    }
    if !extra.is_empty() && forward::write_all(&mut upstream, &extra).await.is_err() {
        return None;
    }
    let up_total = pool.metrics.bytes.with_label_values(&["client_to_broker"]);
    let down_total = pool.metrics.bytes.with_label_values(&["broker_to_client"]);
    up_total.inc_by(extra.len() as u64);
    down_total.inc_by(after_connack.len() as u64);
    Some(Live { client, upstream, session, scanner, down_scanner, up_total, down_total, tap })
}

/// A persistent client landed on a broker without its session: subscribes what the record
/// holds before the client sees its CONNACK, then marks the CONNACK "session present" (MQTT
/// 3.1 has no such flag). Whatever the broker sent meanwhile follows the CONNACK. `false`
/// when the restore failed and the connection must close.
async fn restore(
    pool: &Pool,
    connect: &Connect,
    broker: &Broker,
    upstream: &mut Conn,
    after_connack: &mut Vec<u8>,
) -> bool {
    let subs = pool.durable.to_restore(&connect.client_id);
    if subs.is_empty() {
        return true;
    }
    let Ok(Some((_, n))) = connack::parse(after_connack) else { return false };
    let rest = after_connack.split_off(n);
    let deadline = Instant::now() + pool.proxy_config().connack_timeout;
    let mut packets = crate::durable::remote::Packets::new(upstream, rest);
    let restored = crate::durable::remote::subscribe_all(&mut packets, connect.version, &subs, deadline).await;
    let leftover = packets.leftover();
    match restored {
        Ok((granted, passed)) => {
            info!(broker = %broker.name, subscriptions = subs.len(), granted, "restored a persistent session's subscriptions");
            pool.metrics.durable_ops.with_label_values(&["restore", "ok"]).inc();
            if connect.version != 3 {
                connack::set_session_present(after_connack);
            }
            after_connack.extend_from_slice(&passed);
            after_connack.extend_from_slice(&leftover);
            true
        }
        Err(e) => {
            warn!(broker = %broker.name, "restoring the session's subscriptions failed, closing: {e}");
            pool.metrics.durable_ops.with_label_values(&["restore", "error"]).inc();
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
async fn establish(pool: &Arc<Pool>, packet: &[u8], connect: &Connect) -> Option<(Conn, Lease, Connack, Vec<u8>)> {
    let cfg = pool.proxy_config();
    let mut tried: Vec<Arc<Broker>> = Vec::new();
    for attempt in 0..cfg.connect_tries {
        let lease = pool.pick(&tried)?;
        let broker = lease.broker().clone();
        if attempt > 0 {
            pool.metrics.connect_retries.inc();
        }
        match connect_broker(pool, &broker, packet, connect.version).await {
            Ok((stream, ack, bytes)) => {
                pool.record_success(&broker);
                if attempt > 0 {
                    info!(broker = %broker.name, attempt = attempt + 1, "CONNECT served after retry");
                }
                return Some((stream, lease, ack, bytes));
            }
            Err(e) => {
                warn!(broker = %broker.name, reason = e.reason(), "broker attempt failed: {e}");
                pool.record_failure(&broker, e.reason());
                tried.push(broker);
            }
        }
    }
    None
}

/// One CONNECT to `broker` over TCP or, for `tls = true` brokers, TLS, with the proxy's
/// connect and CONNACK timeouts: the client's own attempts and meshgate's on a client's behalf
/// (session migration, standby copies).
pub(crate) async fn connect_broker(
    pool: &Pool,
    broker: &Broker,
    packet: &[u8],
    version: u8,
) -> Result<(Conn, Connack, Vec<u8>), AttemptError> {
    let cfg = pool.proxy_config();
    let tls = broker.config().tls.then(|| pool.tls_connector.load_full()).flatten();
    let tls_name = broker.config().tls_name.clone();
    let attempt_tls = tls.as_deref().map(|c| (c, tls_name.as_deref()));
    try_broker(&broker.address, attempt_tls, packet, version, cfg.upstream_connect_timeout, cfg.connack_timeout).await
}

/// Handshakes (TCP connect to CONNACK) in flight to one broker address, at most. Mosquitto
/// listens with a backlog of 100: when every client of a failed broker reconnects at once, a
/// thousand simultaneous connects overflow it, and every dropped SYN or handshake ACK costs its
/// client a one-second retransmission (measured: 1,000 clients back after 2.7 s instead of
/// 0.8 s). Queued here instead, the same burst is served in tens of milliseconds.
const HANDSHAKES_PER_BROKER: usize = 64;

fn handshake_gate(address: &str) -> Arc<tokio::sync::Semaphore> {
    // Keyed by address, so the slots outlive reloads and a broker's slots are shared by every
    // session; entries are never removed (there is one per broker address ever configured).
    static GATES: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut gates = GATES.lock().unwrap_or_else(|p| p.into_inner());
    gates
        .entry(address.to_string())
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PER_BROKER)))
        .clone()
}

async fn try_broker(
    address: &str,
    tls: Option<(&tokio_rustls::TlsConnector, Option<&str>)>,
    packet: &[u8],
    version: u8,
    connect_timeout: Duration,
    connack_timeout: Duration,
) -> Result<(Conn, Connack, Vec<u8>), AttemptError> {
    use tokio::io::AsyncReadExt;
    // Queueing for a handshake slot counts as connecting.
    let gate = handshake_gate(address);
    let slot = timeout(connect_timeout, gate.acquire_owned());
    let Ok(Ok(_slot)) = slot.await else { return Err(AttemptError::ConnectTimeout(connect_timeout)) };
    let stream = match timeout(connect_timeout, TcpStream::connect(address)).await {
        Err(_) => return Err(AttemptError::ConnectTimeout(connect_timeout)),
        Ok(Err(e)) => return Err(AttemptError::Connect(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + connack_timeout;
    let exchange = async {
        let mut conn = match tls {
            None => Conn::Tcp(stream),
            Some((connector, name)) => {
                let name = crate::transport::tls::server_name(address, name).map_err(AttemptError::Protocol)?;
                // Boxed: the TLS handshake future is over a kilobyte, and every plain session's
                // setup would otherwise carry room for it.
                let s = Box::pin(connector.connect(name, stream))
                    .await
                    .map_err(|e| AttemptError::Protocol(format!("TLS handshake with the broker: {e}")))?;
                Conn::BrokerTls(Box::new(s))
            }
        };
        forward::write_all(&mut conn, packet).await.map_err(AttemptError::Connect)?;
        let mut buf: Vec<u8> = Vec::with_capacity(256);
        loop {
            match connack::parse(&buf) {
                Ok(Some((ack, _))) => return Ok((conn, ack, buf)),
                Ok(None) => {}
                Err(e) => return Err(AttemptError::Protocol(e.to_string())),
            }
            if buf.capacity() - buf.len() < 16 {
                buf.reserve(256);
            }
            match conn.read_buf(&mut buf).await {
                Ok(0) => return Err(AttemptError::Closed),
                Ok(_) => {}
                Err(e) => return Err(AttemptError::Connect(e)),
            }
        }
    };
    let (conn, ack, bytes) = match timeout_at(deadline, exchange).await {
        Err(_) => return Err(AttemptError::ConnackTimeout(connack_timeout)),
        Ok(r) => r?,
    };
    if let Some(reason) = ack.broker_failure(version) {
        return Err(AttemptError::Refused { code: ack.code, reason });
    }
    Ok((conn, ack, bytes))
}
