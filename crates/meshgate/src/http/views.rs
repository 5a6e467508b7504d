//! The JSON shapes the API answers with, built from pool snapshots.
//!
//! Times go out twice: unix milliseconds for programs and RFC 3339 for people reading the JSON.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::events::unix_ms;
use crate::pool::passive::PassiveState;
use crate::pool::{AdminState, Broker, ProbeRecord, Session};

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Serialize)]
pub struct BrokerView {
    pub name: String,
    pub address: String,
    pub priority: u32,
    pub weight: u32,
    pub max_conns: u32,
    /// False only when disabled; a draining broker is still enabled (see `admin`).
    pub enabled: bool,
    pub admin: AdminState,
    /// `up`, `down`, `draining` or `disabled`.
    pub state: &'static str,
    /// Why it is in that state: the last probe error, the passive bar, `max_conns`; may be empty.
    pub reason: String,
    /// Takes new sessions now.
    pub available: bool,
    /// The broker a new client would get now.
    pub current: bool,
    /// What the active probes say; `null` until the first probe answered.
    pub probe_up: Option<bool>,
    pub sessions_active: u64,
    pub sessions_total: u64,
    /// Passive failures counted in the current `fail_timeout` window.
    pub passive_fails: u32,
    pub max_fails: u32,
    pub barred_until_ms: Option<u64>,
    pub barred_until: Option<String>,
    pub last_probe: Option<ProbeView>,
    /// When the probe state last changed (or when meshgate started watching the broker).
    pub since_ms: u64,
    pub since: String,
    /// Recent probe latencies in ms, oldest first; `null` for a failed probe.
    pub probe_history: Vec<Option<f64>>,
}

#[derive(Debug, Serialize)]
pub struct ProbeView {
    #[serde(flatten)]
    pub record: ProbeRecord,
    pub at: String,
}

impl BrokerView {
    pub fn new(b: &Broker, current: Option<&Arc<Broker>>) -> BrokerView {
        let now = Instant::now();
        let cfg = b.config();
        let health = b.health();
        let (state, reason) = b.state(now);
        // The bar is kept on tokio's monotonic clock; the API speaks wall-clock time.
        let barred_until = match b.passive_state(now) {
            PassiveState::Barred { until } => Some(SystemTime::now() + until.saturating_duration_since(now)),
            _ => None,
        };
        BrokerView {
            name: b.name.clone(),
            address: b.address.clone(),
            priority: cfg.priority,
            weight: cfg.weight,
            max_conns: cfg.max_conns,
            enabled: b.admin() != AdminState::Disabled,
            admin: b.admin(),
            state,
            reason,
            available: b.available(now),
            current: current.is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), b)),
            probe_up: health.up,
            sessions_active: b.active_sessions(),
            sessions_total: b.total_sessions(),
            passive_fails: b.passive_fails(now),
            max_fails: cfg.max_fails,
            barred_until_ms: barred_until.map(unix_ms),
            barred_until: barred_until.map(rfc3339),
            last_probe: health.last.clone().map(|record| {
                let at = rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(record.at_ms));
                ProbeView { record, at }
            }),
            since_ms: unix_ms(health.since),
            since: rfc3339(health.since),
            probe_history: health.history.iter().copied().collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ClientView {
    /// meshgate's own number for the session, unique for the life of the process.
    pub session: u64,
    pub client_id: String,
    pub username: Option<String>,
    /// `3.1`, `3.1.1` or `5`.
    pub protocol: &'static str,
    /// Clean session (3.1, 3.1.1) or clean start (5).
    pub clean: bool,
    pub keepalive: u16,
    pub persistent: bool,
    pub broker: String,
    pub peer: String,
    pub connected_at_ms: u64,
    pub connected_at: String,
    /// Client to broker.
    pub bytes_in: u64,
    /// Broker to client.
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// meshgate has asked this session to close (drain, failback, broker down).
    pub closing: bool,
    /// Persistent sessions: the broker that holds the session (after a migration, where it
    /// was recreated), its standby copy and how many subscriptions meshgate has recorded.
    pub session_home: Option<String>,
    pub standby: Option<String>,
    pub subscriptions: Option<usize>,
}

impl ClientView {
    pub fn new(s: &Session, durable: &crate::durable::Durable) -> ClientView {
        let i = &s.info;
        let placement = if i.persistent { durable.placement(&i.client_id) } else { None };
        ClientView {
            session: s.id,
            client_id: i.client_id.clone(),
            username: i.username.clone(),
            protocol: crate::mqtt::protocol_name(i.version),
            clean: i.clean,
            keepalive: i.keepalive,
            persistent: i.persistent,
            broker: s.broker.name.clone(),
            peer: i.peer.to_string(),
            connected_at_ms: unix_ms(i.connected_at),
            connected_at: rfc3339(i.connected_at),
            bytes_in: s.bytes_in.load(Relaxed),
            bytes_out: s.bytes_out.load(Relaxed),
            packets_in: s.packets_in.load(Relaxed),
            packets_out: s.packets_out.load(Relaxed),
            closing: s.is_closing(),
            session_home: placement.as_ref().and_then(|p| p.home.clone()),
            standby: placement.as_ref().and_then(|p| p.standby.clone()),
            subscriptions: placement.map(|p| p.subscriptions),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HealthView {
    /// `ok`, `degraded` (no broker of the primary tier available, or with `[coordination]` etcd
    /// unreachable: see `coordination.reason`) or `down` (no broker at all).
    pub status: &'static str,
    pub current_broker: Option<String>,
    pub brokers_total: usize,
    pub brokers_available: usize,
    pub sessions: usize,
    /// Sessions the rebalancer will still move (failback, drain, removed brokers).
    pub moves_pending: usize,
    pub version: &'static str,
    pub uptime_secs: u64,
    /// With `[coordination]` only: the etcd session, this instance and the replication leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordination: Option<crate::coordination::StatusView>,
}

#[derive(Debug, Serialize)]
pub struct TcpCheckView {
    pub name: String,
    pub address: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EventsView {
    /// Pass this back as `?since=` to get only what happened after this answer.
    pub last_seq: u64,
    pub events: Vec<crate::events::Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_levels_have_their_spec_names() {
        assert_eq!([3, 4, 5, 9].map(crate::mqtt::protocol_name), ["3.1", "3.1.1", "5", "unknown"]);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }
}
