//! The MQTT listener: bounded accept loop, one task per client connection, and the rebalancer that moves sessions.

pub mod forward;
pub mod limits;
pub mod loops;
pub mod session;
pub mod switch;
pub mod track;

use arc_swap::ArcSwapOption;
use tokio_rustls::TlsAcceptor;

use crate::durable::Durable;
use crate::upstream::Upstream;

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::config::ProxyProtocol;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use crate::pool::Pool;

/// What every client connection works with: the pool to choose from, the way to the brokers,
/// the persistent-session engine, and the admission limits shared by every listener.
pub struct Proxy {
    pub pool: Arc<Pool>,
    pub upstream: Arc<Upstream>,
    pub durable: Arc<Durable>,
    /// One set of limits for all listeners: `[proxy] max_connections` bounds them together.
    pub limits: Arc<limits::Limits>,
    /// The descriptors moves may hold beside every session's two.
    pub fds: limits::FdBudget,
    /// The TLS listeners' acceptor (mqtts, wss); swapped whole when certificates are reloaded.
    pub acceptor: ArcSwapOption<TlsAcceptor>,
    /// The listeners as started (WebSocket path, trusted proxies): read at start only.
    pub listen: crate::config::Listen,
    /// One line per ended session.
    pub access: crate::accesslog::AccessLog,
    /// Replication copies every message to every broker: a moving session may stop taking
    /// deliveries from its old broker at the cut (`switch`).
    pub replicated: bool,
    refusals: limits::RefusalLog,
    /// Per broker, the last verdict on whether it is gone (`session::broker_gone`): one check at
    /// a time, shared by every session the broker closed at once.
    gone_checks: parking_lot::Mutex<std::collections::HashMap<String, GoneCheck>>,
    /// The daemon's tasks, which its shutdown waits for: a move's own tasks (the new session
    /// being made, and leaving it when the move was abandoned) join them, so no connection
    /// meshgate opened outlives it, and a will handed to the next broker is published before
    /// the failed broker is told DISCONNECT, not left half done.
    pub tasks: TaskTracker,
}

/// One broker's gone-or-not check: taken by one session at a time, the verdict kept briefly.
type GoneCheck = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>>;

/// Why sessions move (the `reason` of `meshgate_session_switches_total`).
pub const MOVE_REASONS: [&str; 5] =
    ["failback", "drain", "broker_disabled", "broker_removed", crate::pool::BROKER_DOWN];

pub use crate::config::Listener;

/// Every `reason` of `meshgate_rejected_connections_total`: the setup's (`session`), the
/// admission limits' (`limits`), the TLS handshake's and the WebSocket upgrade's.
pub const REJECT_REASONS: [&str; 15] = [
    "connect_timeout",
    "closed_early",
    "malformed_connect",
    "packet_too_large",
    "io_error",
    "no_broker",
    "tls_handshake",
    "ws_handshake",
    "ws_path",
    "ws_subprotocol",
    "proxy_untrusted",
    "proxy_header",
    "max_connections",
    "per_source_connections",
    "connect_rate",
];

impl Proxy {
    fn gone_check(&self, broker: &str) -> GoneCheck {
        self.gone_checks.lock().entry(broker.to_string()).or_default().clone()
    }

    /// Every counter series whose labels are known now, at zero: brokers by upstream failure
    /// reason, refusals, session closes, reload results and persistent-session operations.
    /// Called at start and after each reload (new brokers).
    pub fn init_metrics(&self) {
        let m = &self.pool.metrics;
        let brokers = self.pool.brokers();
        for b in brokers.iter() {
            m.init(&m.sessions_total, [[b.name.as_str()].as_slice()]);
            for reason in crate::upstream::AttemptError::REASONS {
                m.init(&m.upstream_failures, [[b.name.as_str(), reason].as_slice()]);
            }
        }
        m.init(&m.rejected, REJECT_REASONS.iter().map(std::slice::from_ref));
        let listeners: Vec<[&str; 1]> =
            Listener::ALL.iter().filter(|l| self.listen.has(**l)).map(|l| [l.as_str()]).collect();
        m.init(&m.accepted, listeners.iter().map(|l| l.as_slice()));
        for l in &listeners {
            m.listener_connections.with_label_values(l).set(0);
        }
        let closes = crate::pool::CLOSE_REASONS.iter().chain(&["malformed"]);
        m.init(&m.sessions_closed, closes.map(std::slice::from_ref));
        m.init(&m.reloads, [["ok"].as_slice(), ["error"].as_slice()]);
        m.init(&m.durable_ops, crate::durable::OPERATIONS.iter().map(|l| l.as_slice()));
        for why in MOVE_REASONS {
            m.init(&m.switches, [[why, "ok"].as_slice()]);
            for result in switch::SwitchError::RESULTS {
                m.init(&m.switches, [[why, result].as_slice()]);
            }
        }
    }

    pub fn new(
        pool: Arc<Pool>,
        upstream: Arc<Upstream>,
        durable: Arc<Durable>,
        access: crate::accesslog::AccessLog,
        replicated: bool,
        listen: crate::config::Listen,
        tasks: TaskTracker,
    ) -> Proxy {
        Proxy {
            tasks,
            listen,
            pool,
            upstream,
            durable,
            access,
            replicated,
            limits: Default::default(),
            fds: limits::FdBudget::from_rlimit(),
            acceptor: Default::default(),
            refusals: Default::default(),
            gone_checks: Default::default(),
        }
    }

    /// A client connection closed before it became a session: counted by reason, and logged
    /// once a minute per reason at most.
    pub fn reject(&self, reason: &'static str, detail: impl std::fmt::Display) {
        self.pool.metrics.rejected.with_label_values(&[reason]).inc();
        self.refusals.note(reason, detail);
    }
}

/// Accepts on `listener` until `stop` is cancelled: on each of `loops` (a duplicate of its
/// socket registered with that loop's own epoll, so each loop's sessions are its own), or on
/// this runtime.
pub fn spawn_accept(
    listener: TcpListener,
    kind: Listener,
    loops: Option<&loops::Loops>,
    proxy: &Arc<Proxy>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let Some(loops) = loops else {
        tracker.spawn(accept_loop(listener, proxy.clone(), tracker.clone(), stop.clone(), kind));
        return Ok(());
    };
    let socket = listener.into_std()?;
    for handle in loops.handles() {
        // Registered with that loop's reactor: made inside its runtime's context.
        let l = {
            let _on_loop = handle.enter();
            TcpListener::from_std(socket.try_clone()?)?
        };
        tracker.spawn_on(accept_loop(l, proxy.clone(), tracker.clone(), stop.clone(), kind), handle);
    }
    Ok(())
}

/// Accepts clients until `stop` is cancelled. Each connection is admitted under the limits
/// (total, per source, CONNECT rate per source) or closed at once and counted; accept errors
/// (EMFILE above all) back off instead of spinning.
/// Each listener's connections first complete what its kind needs (a TLS handshake, a
/// WebSocket upgrade) within the CONNECT time.
pub async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tracker: TaskTracker,
    stop: CancellationToken,
    kind: Listener,
) {
    let pp = proxy.listen.proxy_protocol.of(kind);
    let accepted_total = proxy.pool.metrics.accepted.with_label_values(&[kind.as_str()]);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        if accepted.is_ok() {
            accepted_total.inc();
        }
        match accepted {
            Ok((stream, peer)) if pp != ProxyProtocol::Off || matches!(kind, Listener::Ws | Listener::Wss) => {
                backoff = Duration::from_millis(5);
                // The client's address is known only after the PROXY header or the WebSocket
                // upgrade: admitted then, in the connection's own task.
                tracker.spawn(serve_late(proxy.clone(), stream, peer, kind, pp));
            }
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // Admitted before a task exists, so a refused client costs an accept and a close.
                match proxy.limits.admit(peer.ip(), &proxy.pool.proxy_config(), std::time::Instant::now()) {
                    Ok(admission) => {
                        tracker.spawn(serve(proxy.clone(), stream, peer, kind, admission));
                    }
                    Err(refusal) => proxy.reject(refusal.reason(), format_args!("from {peer}")),
                }
            }
            Err(e) => {
                error!("accept failed: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// An admitted MQTT or MQTT-over-TLS client; its place under the limits ends with it.
///
/// The task is spawned with nothing but the boxed session in it: tokio pads a task's own
/// allocation to a multiple of 128 bytes, and the arguments an async fn here would keep beside
/// the session for its whole life made every idle session's task 384 bytes instead of 128.
fn serve(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    client: SocketAddr,
    kind: Listener,
    admission: limits::Admission,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    match kind {
        Listener::Mqtts => Box::pin(session::handle_tls(proxy, stream, client, admission)),
        _ => session::handle(proxy, stream, client, admission),
    }
}

/// A connection whose client address comes later: from a PROXY protocol header, which only a
/// trusted balancer may send (anyone else is refused and counted), and for WebSocket clients
/// from the upgrade.
async fn serve_late(proxy: Arc<Proxy>, mut stream: TcpStream, peer: SocketAddr, kind: Listener, pp: ProxyProtocol) {
    let mut client = peer;
    if pp != ProxyProtocol::Off {
        if !proxy.listen.trusted_proxies.iter().any(|n| n.contains(&peer.ip())) {
            proxy.reject("proxy_untrusted", format_args!("from {peer}: not in listen.trusted_proxies"));
            return;
        }
        let limit = proxy.pool.proxy_config().client_connect_timeout;
        match tokio::time::timeout(limit, crate::transport::proxy_protocol::read(&mut stream, pp)).await {
            Ok(Ok(Some(c))) => client = c,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                proxy.reject("proxy_header", format_args!("from {peer}: {e}"));
                return;
            }
            Err(_) => {
                proxy.reject("proxy_header", format_args!("from {peer}: no PROXY header within {limit:?}"));
                return;
            }
        }
    }
    match kind {
        Listener::Ws | Listener::Wss => session::handle_ws(proxy, stream, client, kind == Listener::Wss).await,
        _ => match proxy.limits.admit(client.ip(), &proxy.pool.proxy_config(), std::time::Instant::now()) {
            Ok(admission) => serve(proxy, stream, client, kind, admission).await,
            Err(refusal) => proxy.reject(refusal.reason(), format_args!("from {client} (through {peer})")),
        },
    }
}

/// Moves sessions off drained, removed and (with failback = drain) lower-tier brokers at
/// `failback_rate` sessions per second, oldest first, so clients come back gradually instead
/// of all at once.
pub async fn rebalance_loop(pool: Arc<Pool>, stop: CancellationToken) {
    // Moves since the last summary, by (broker, why): a failback of thousands of sessions is
    // a few lines in the log, not one per session.
    let mut moved: std::collections::BTreeMap<(String, &'static str), u64> = Default::default();
    loop {
        let next = pool.next_to_move();
        let idle = next.is_none();
        let wait = match next {
            Some((session, why)) => {
                debug!(session = session.id, client_id = %session.info.client_id, broker = %session.broker.name, why, "moving session");
                // A switch that fails closes the session and counts it there.
                match pool.proxy_config().moves {
                    crate::config::Move::Switch => {
                        session.request_move(why);
                    }
                    crate::config::Move::Close => {
                        session.close(why);
                        pool.metrics.sessions_closed.with_label_values(&[why]).inc();
                    }
                }
                *moved.entry((session.broker.name.clone(), why)).or_default() += 1;
                Duration::from_secs_f64(1.0 / pool.proxy_config().failback_rate)
            }
            // Nothing to do: sleep until something changes, re-checking now and then because
            // passive bars expire without an event.
            None => Duration::from_millis(500),
        };
        if idle {
            for ((broker, why), n) in std::mem::take(&mut moved) {
                info!(broker = %broker, why, sessions = n, "moved {n} session(s) off {broker} ({why})");
                let (kind, how) = match pool.proxy_config().moves {
                    crate::config::Move::Switch => ("switch", "switching under their clients' connections"),
                    crate::config::Move::Close => ("session_closed", "closed; their clients reconnect"),
                };
                pool.events.push(kind, Some(&broker), format!("moved {n} session(s) off {broker} ({why}): {how}"));
                // (Requests: a switch that fails is counted and logged by the session.)
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = pool.changed.notified(), if idle => {}
        }
    }
}

#[cfg(test)]
mod tests;
