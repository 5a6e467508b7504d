//! Active health checking: one loop per broker runs its probe every interval and flips the
//! broker's probe state after `rise` successes or `fall` failures in a row.
//!
//! The first answer sets the state directly (there is nothing to be hysteretic about yet), so
//! a broker that is dead at start is out after one probe. A flip is logged and becomes an event
//! once; steady results only update the snapshot the API reads.

pub mod observer;
pub mod probe;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HealthConfig;
use crate::events::unix_ms;
use crate::pool::{Broker, Health, Pool, ProbeRecord, HISTORY_LEN};
use crate::upstream::Upstream;
use observer::Observer;
pub use probe::{Probe, ProbeError};

/// Starts one checker per broker of the pool's current set; they stop when `stop` is cancelled.
pub fn spawn_checkers(
    pool: &Arc<Pool>,
    upstream: &Arc<Upstream>,
    health: &HealthConfig,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    let probe: Arc<dyn Probe> = Arc::from(probe::for_config(health));
    for broker in pool.brokers().iter() {
        let (pool, upstream, broker, probe, cfg, stop) =
            (pool.clone(), upstream.clone(), broker.clone(), probe.clone(), health.clone(), stop.clone());
        tracker.spawn(async move { check_loop(pool, upstream, broker, probe, cfg, stop).await });
    }
}

async fn check_loop(
    pool: Arc<Pool>,
    upstream: Arc<Upstream>,
    broker: Arc<Broker>,
    probe: Arc<dyn Probe>,
    cfg: HealthConfig,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(cfg.interval);
    // A probe that takes the whole timeout must not cause a burst of catch-up probes.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Rise/fall is decided by a pure observer; this loop does the probing, logging and events.
    let mut observer = Observer::new(cfg.rise, cfg.fall, broker.health().up);
    let kind = probe.kind().as_str();
    let histogram = pool.metrics.probe_duration.with_label_values(&[&broker.name, kind]);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = match timeout(cfg.timeout, probe.check(&upstream, &broker.config())).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(cfg.timeout)),
        };
        let latency = started.elapsed();
        if stop.is_cancelled() {
            return;
        }
        // meshgate's own shortage (out of file descriptors) says nothing about the broker: the
        // probe is not counted either way.
        if let Err(ProbeError::Connect(e)) = &result {
            if e.is_local() {
                pool.record_local_error(&broker, e.reason(), e);
                // As after any probe: passive bars expire with time, not with an event.
                pool.refresh();
                continue;
            }
        }
        histogram.observe(latency.as_secs_f64());
        let ok = result.is_ok();
        let record = ProbeRecord {
            kind,
            ok,
            latency_ms: latency.as_secs_f64() * 1000.0,
            at_ms: unix_ms(SystemTime::now()),
            error: result.as_ref().err().map(|e| e.to_string()),
        };
        let old = broker.health();
        let flip_to = observer.observe(ok);
        let mut history = old.history.clone();
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(ok.then_some(record.latency_ms));
        let up = observer.up;
        let since = if flip_to.is_some() && flip_to != old.up { SystemTime::now() } else { old.since };
        broker.set_health(Health { up, since, last: Some(record.clone()), history });
        match flip_to {
            Some(new) if old.up != Some(new) => {
                let why = if new {
                    format!("{} {kind} probe(s) in a row succeeded, {:.1} ms", observer.ok, record.latency_ms)
                } else {
                    format!(
                        "{} {kind} probe(s) in a row failed, last: {}",
                        observer.fail,
                        record.error.as_deref().unwrap_or("?")
                    )
                };
                // The initial state is logged at info but is not a change anyone must act on.
                if old.up.is_none() && new {
                    tracing::info!(broker = %broker.name, "first probe: up ({:.1} ms)", record.latency_ms);
                    pool.refresh();
                } else {
                    pool.probe_flipped(&broker, new, &why);
                }
            }
            // Passive bars expire with time, not with an event: refresh keeps the gauges and
            // the current-broker view honest at probe cadence.
            _ => pool.refresh(),
        }
    }
}

/// A one-off TCP connect check of every broker, concurrently, for `GET /tcp-check`.
pub async fn tcp_check(
    pool: &Pool,
    upstream: &Arc<Upstream>,
    limit: std::time::Duration,
) -> Vec<(String, String, Result<f64, String>)> {
    let mut set = tokio::task::JoinSet::new();
    for (i, b) in pool.brokers().iter().enumerate() {
        let (name, address, upstream) = (b.name.clone(), b.address.clone(), upstream.clone());
        set.spawn(async move {
            let started = Instant::now();
            let r = match timeout(limit, upstream.tcp(&address)).await {
                Ok(Ok(_)) => Ok(started.elapsed().as_secs_f64() * 1000.0),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {limit:?}")),
            };
            (i, name, address, r)
        });
    }
    let mut out: Vec<_> = set.join_all().await;
    out.sort_by_key(|r| r.0);
    out.into_iter().map(|(_, n, a, r)| (n, a, r)).collect()
}
