//! One client connection: read its CONNECT, find a broker that answers it, then forward both ways.
//!
//! A broker attempt fails (and counts against the broker's passive accounting) when the TCP
//! connect fails or times out, the broker closes or sends garbage before its CONNACK, no
//! CONNACK arrives within `connack_timeout`, or the CONNACK says "server unavailable" or
//! "server busy". The same CONNECT bytes are then replayed to the next candidate, up to
//! `connect_tries` brokers. The client sees exactly one CONNACK: the first real answer, or
//! "server unavailable" from meshgate when every try failed. Other refusals (bad credentials,
//! not authorized) are the broker's answer to the client and pass through unchanged.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn, Instrument};

use super::forward::{self, Tally};
use crate::mqtt::{self, connack, Connack, Connect, ConnectError, FrameScanner};
use crate::pool::{Broker, Lease, Pool, SessionInfo};

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

pub async fn handle(pool: Arc<Pool>, client: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("session", %peer, client_id = tracing::field::Empty, broker = tracing::field::Empty);
    pool.metrics.client_sessions.inc();
    tokio::select! {
        _ = run(&pool, client, peer).instrument(span) => {}
        _ = pool.closing.cancelled() => {}
    }
    pool.metrics.client_sessions.dec();
}

async fn run(pool: &Arc<Pool>, client: TcpStream, peer: SocketAddr) {
    let cfg = pool.proxy_config();
    let _ = client.set_nodelay(true);
    let accepted = Instant::now();
    let (packet, extra) = match read_connect(&client, cfg.client_connect_timeout, cfg.max_packet_size).await {
        Ok(v) => v,
        Err(e) => {
            debug!(reason = e.reason(), "rejected before CONNECT: {e}");
            pool.metrics.rejected.with_label_values(&[e.reason()]).inc();
            return;
        }
    };
    let connect = match mqtt::connect::parse(&packet) {
        Ok(c) => c,
        Err(e) => {
            debug!("rejected: malformed CONNECT: {e}");
            pool.metrics.rejected.with_label_values(&["malformed_connect"]).inc();
            return;
        }
    };
    tracing::Span::current().record("client_id", connect.client_id.as_str());

    let Some((upstream, lease, ack, after_connack)) = establish(pool, &packet, &connect).await else {
        pool.metrics.rejected.with_label_values(&["no_broker"]).inc();
        let _ =
            timeout(Duration::from_secs(1), forward::write_all(&client, connack::unavailable(connect.version))).await;
        return;
    };
    tracing::Span::current().record("broker", lease.broker().name.as_str());
    pool.metrics.connack_duration.observe(accepted.elapsed().as_secs_f64());

    // The CONNACK and whatever the broker sent right behind it (queued messages of a
    // persistent session) go to the client first; then what the client pipelined.
    if forward::write_all(&client, &after_connack).await.is_err() {
        return;
    }
    if ack.code != 0 {
        // A refusal the client must see; the broker closes its side.
        debug!(code = ack.code, "broker refused the client; passed through");
        return;
    }

    let info = SessionInfo {
        client_id: connect.client_id.clone(),
        username: connect.username.clone(),
        version: connect.version,
        clean: connect.clean,
        keepalive: connect.keepalive,
        persistent: connect.persistent(),
        peer,
        connected_at: SystemTime::now(),
    };
    let session = pool.register(lease, info);
    debug!("session established");
    // Both scanners start where the setup left off, so packet boundaries stay in step with
    // the bytes already sent each way.
    let mut scanner = FrameScanner::new(cfg.max_packet_size);
    let mut down_scanner = FrameScanner::new(u32::MAX);
    let (mut n_in, mut n_out) = (0, 0);
    let primed = scanner.feed(&extra, |_| n_in += 1).and_then(|_| down_scanner.feed(&after_connack, |_| n_out += 1));
    session.packets_in.fetch_add(n_in, Ordering::Relaxed);
    session.packets_out.fetch_add(n_out, Ordering::Relaxed);
    session.bytes_in.fetch_add(extra.len() as u64, Ordering::Relaxed);
    session.bytes_out.fetch_add(after_connack.len() as u64, Ordering::Relaxed);
    if let Err(e) = primed {
        warn!("closing session: {e}");
        return;
    }
    if !extra.is_empty() && forward::write_all(&upstream, &extra).await.is_err() {
        return;
    }
    let m = &pool.metrics;
    let up_total = m.bytes.with_label_values(&["client_to_broker"]);
    let down_total = m.bytes.with_label_values(&["broker_to_client"]);
    up_total.inc_by(extra.len() as u64);
    down_total.inc_by(after_connack.len() as u64);
    let up = forward::pump(
        &client,
        &upstream,
        Some(&mut scanner),
        Tally { bytes: &session.bytes_in, packets: &session.packets_in, total_bytes: &up_total },
    );
    let down = forward::pump(
        &upstream,
        &client,
        Some(&mut down_scanner),
        Tally { bytes: &session.bytes_out, packets: &session.packets_out, total_bytes: &down_total },
    );
    let ended = tokio::select! {
        r = up => match r {
            Ok(()) => "client closed".to_string(),
            Err(forward::ForwardError::Malformed(e)) => {
                pool.metrics.sessions_closed.with_label_values(&["malformed"]).inc();
                format!("client sent a malformed packet: {e}")
            }
            Err(e) => format!("client side: {e}"),
        },
        r = down => match r {
            Ok(()) => "broker closed".to_string(),
            Err(e) => format!("broker side: {e}"),
        },
        _ = session.cancelled() => format!("closed by meshgate: {}", session.close_reason().unwrap_or("?")),
    };
    debug!("session ended: {ended}");
}

/// Reads exactly one CONNECT (plus whatever the client pipelined behind it).
async fn read_connect(client: &TcpStream, limit: Duration, max: u32) -> Result<(Vec<u8>, Vec<u8>), Rejected> {
    let deadline = Instant::now() + limit;
    let mut buf: Vec<u8> = Vec::with_capacity(128);
    loop {
        if let Some(total) = mqtt::connect::check(&buf, max)? {
            let extra = buf.split_off(total);
            return Ok((buf, extra));
        }
        match timeout_at(deadline, client.readable()).await {
            Err(_) => return Err(Rejected::ConnectTimeout(limit)),
            Ok(r) => r?,
        }
        let mut chunk = [0u8; 4096];
        match client.try_read(&mut chunk) {
            Ok(0) => return Err(Rejected::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tries brokers in selection order until one answers the CONNECT with a CONNACK that is not
/// a broker failure. Returns the connected upstream, its lease, the CONNACK and the bytes to
/// send the client (the CONNACK and anything after it).
async fn establish(pool: &Arc<Pool>, packet: &[u8], connect: &Connect) -> Option<(TcpStream, Lease, Connack, Vec<u8>)> {
    let cfg = pool.proxy_config();
    let mut tried: Vec<Arc<Broker>> = Vec::new();
    for attempt in 0..cfg.connect_tries {
        let lease = pool.pick(&tried)?;
        let broker = lease.broker().clone();
        if attempt > 0 {
            pool.metrics.connect_retries.inc();
        }
        match try_broker(&broker.address, packet, connect.version, cfg.upstream_connect_timeout, cfg.connack_timeout)
            .await
        {
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

async fn try_broker(
    address: &str,
    packet: &[u8],
    version: u8,
    connect_timeout: Duration,
    connack_timeout: Duration,
) -> Result<(TcpStream, Connack, Vec<u8>), AttemptError> {
    let stream = match timeout(connect_timeout, TcpStream::connect(address)).await {
        Err(_) => return Err(AttemptError::ConnectTimeout(connect_timeout)),
        Ok(Err(e)) => return Err(AttemptError::Connect(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + connack_timeout;
    let exchange = async {
        forward::write_all(&stream, packet).await.map_err(AttemptError::Connect)?;
        let mut buf: Vec<u8> = Vec::with_capacity(64);
        loop {
            match connack::parse(&buf) {
                Ok(Some((ack, _))) => return Ok((ack, buf)),
                Ok(None) => {}
                Err(e) => return Err(AttemptError::Protocol(e.to_string())),
            }
            stream.readable().await.map_err(AttemptError::Connect)?;
            let mut chunk = [0u8; 4096];
            match stream.try_read(&mut chunk) {
                Ok(0) => return Err(AttemptError::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(AttemptError::Connect(e)),
            }
        }
    };
    let (ack, bytes) = match timeout_at(deadline, exchange).await {
        Err(_) => return Err(AttemptError::ConnackTimeout(connack_timeout)),
        Ok(r) => r?,
    };
    if let Some(reason) = ack.broker_failure(version) {
        return Err(AttemptError::Refused { code: ack.code, reason });
    }
    Ok((stream, ack, bytes))
}
