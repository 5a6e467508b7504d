//! The MQTT listener: bounded accept loop, one task per client connection, and the rebalancer that moves sessions.

pub mod forward;
pub mod limits;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::pool::Pool;

/// Accepts clients until `stop` is cancelled. Each connection is admitted under the limits
/// (total, per source, CONNECT rate per source) or closed at once and counted; accept errors
/// (EMFILE above all) back off instead of spinning.
/// With `tls`, each connection first completes a TLS handshake (within the CONNECT time).
pub async fn accept_loop(
    listener: TcpListener,
    pool: Arc<Pool>,
    tracker: TaskTracker,
    stop: CancellationToken,
    tls: bool,
) {
    let limits = Arc::new(limits::Limits::default());
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let admitted = limits.admit(peer.ip(), &pool.proxy_config(), std::time::Instant::now());
                match admitted {
                    Ok(admission) if tls => {
                        let pool = pool.clone();
                        tracker.spawn(async move {
                            session::handle_tls(pool, stream, peer).await;
                            drop(admission);
                        });
                    }
                    Ok(admission) => {
                        let pool = pool.clone();
                        tracker.spawn(async move {
                            session::handle(pool, stream, peer).await;
                            drop(admission);
                        });
                    }
                    Err(refusal) => {
                        pool.reject(refusal.reason(), format_args!("from {peer}"));
                        drop(stream);
                    }
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

/// Moves sessions off drained, removed and (with failback = drain) lower-tier brokers at
/// `failback_rate` sessions per second, oldest first, so clients come back gradually instead
/// of all at once.
pub async fn rebalance_loop(pool: Arc<Pool>, stop: CancellationToken) {
    loop {
        let next = pool.next_to_move();
        let idle = next.is_none();
        let wait = match next {
            Some((session, why)) => {
                info!(session = session.id, client_id = %session.info.client_id, broker = %session.broker.name, why, "moving session");
                session.close(why);
                pool.metrics.sessions_closed.with_label_values(&[why]).inc();
                Duration::from_secs_f64(1.0 / pool.proxy_config().failback_rate)
            }
            // Nothing to do: sleep until something changes, re-checking now and then because
            // passive bars expire without an event.
            None => Duration::from_millis(500),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = pool.changed.notified(), if idle => {}
        }
    }
}
