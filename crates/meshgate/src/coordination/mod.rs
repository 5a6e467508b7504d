//! Several meshgate instances as one, through etcd: this instance's lease, the registry of instances, which instance leads replication, and one owner per client id across instances.
//!
//! Everything an instance writes lives under `[coordination] prefix` and under its own lease,
//! so a dead instance's keys vanish `lease_ttl` after its last renewal:
//! - `instances/<name>`: the instance's addresses, version and start time;
//! - `leader/replication`: the instance that runs replication, created only when absent (an
//!   election under a lease, with etcd's own transactions);
//! - `sessions/<client id>` (no lease): the persistent-session record (subscriptions, home
//!   broker, generation, which instance the client is connected through), written by
//!   transactions that compare the key's revision with the one this instance last saw. On a
//!   conflict the instance the client is connected through wins; any other takes what etcd
//!   holds. Each instance keeps a copy from the watch, so a client that comes back through
//!   another instance finds its session; the work on a session (migration off a failed broker,
//!   standby copies, wipes) runs on the instance the client is connected through, or on the
//!   replication leader while it is connected nowhere;
//! - `replication/retained` (no lease): the retained record a leader hands to the next one when
//!   its term ends cleanly, written only while the leader key is still its own, and taken
//!   (deleted) by the next leader as its term starts;
//! - `clients/<client id>`: the instance that holds the client's connection, as
//!   `<connect time, unix ms, 20 digits> <instance>`. A later CONNECT through another instance
//!   overwrites it, and the instance whose connection is older closes it as soon as its watch
//!   shows the overwrite (what a broker does on a client-id takeover, across instances).
//!
//! Nothing on the per-message path waits for etcd, nor does a CONNECT: claims are queued and
//! written in batches by this module's task ([`etcd`]). When etcd cannot be reached, the
//! instance goes on serving clients with what it knows, its writes wait in the queue, `/health`
//! says "degraded" and why, and a leader whose lease it cannot renew stops replicating
//! `margin` before the lease could expire, so two instances never replicate at once. etcd
//! unreachable at start is the same: the instance starts degraded and serves clients;
//! replication waits until it can be elected.

mod etcd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::CoordinationConfig;
use crate::durable::Durable;
use crate::events::Severity;
use crate::pool::{AdminState, Pool, Session, INSTANCE_TAKEOVER};

/// Why an instance is degraded before its first etcd session.
const NOT_CONTACTED: &str = "etcd not reached yet";

/// What an instance says of itself under `instances/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    /// Where it takes MQTT clients ("off" in replicate-only mode).
    pub mqtt: String,
    /// Its HTTP API ("off" without one).
    pub http: String,
    pub version: String,
    pub started_ms: u64,
}

/// One instance as `/instances` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub instance: Instance,
    /// It leads replication.
    pub leader: bool,
    /// It is the instance that answered.
    #[serde(rename = "self")]
    pub this: bool,
}

/// The coordination state, for `/health`, `/instances` and the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// "ok": the etcd session is live; "degraded": etcd cannot be reached (see `reason`).
    pub state: &'static str,
    pub reason: Option<String>,
    pub instance: String,
    pub etcd: Vec<String>,
    pub prefix: String,
    pub lease_ttl_s: u64,
    /// The instance that leads replication, as last seen (`null`: none, or not known).
    pub leader: Option<String>,
    /// This instance runs replication now.
    pub leading: bool,
    /// Writes waiting for etcd: client-id claims, session records, admin actions.
    pub claims_queued: u64,
}

/// `GET /instances`.
#[derive(Debug, Clone, Serialize)]
pub struct InstancesView {
    pub coordination: StatusView,
    pub instances: Vec<InstanceView>,
}

/// A write queued for etcd: a client id's owner record (`at_ms` is the connection's connect
/// time), or an admin action on a broker.
#[derive(Debug, Clone, PartialEq)]
enum Claim {
    Own {
        client_id: String,
        at_ms: u64,
    },
    Release {
        client_id: String,
        at_ms: u64,
    },
    Admin {
        broker: String,
        state: AdminState,
    },
    /// A persistent session's record, as this instance holds it when written (absent: the
    /// session ended). One in the queue per id at a time (`pending_sessions`).
    Session {
        client_id: String,
    },
}

fn admin_word(state: AdminState) -> &'static str {
    match state {
        AdminState::Enabled => "enabled",
        AdminState::Disabled => "disabled",
        AdminState::Draining => "draining",
    }
}

fn admin_state(word: &str) -> Option<AdminState> {
    match word {
        "enabled" => Some(AdminState::Enabled),
        "disabled" => Some(AdminState::Disabled),
        "draining" => Some(AdminState::Draining),
        _ => None,
    }
}

struct Metrics {
    up: IntGauge,
    leader: IntGauge,
    instances: IntGauge,
    queued: IntGauge,
    takeovers: IntCounter,
}

impl Metrics {
    fn new(registry: &prometheus::Registry) -> Metrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let takeovers = IntCounter::new(
            "meshgate_coordination_takeovers_total",
            "Connections this instance closed because their client id connected later through another instance",
        )
        .expect("valid metric");
        registry.register(Box::new(takeovers.clone())).expect("unique metric");
        Metrics {
            up: gauge("meshgate_coordination_up", "1 while this instance's etcd session (its lease) is live"),
            leader: gauge("meshgate_coordination_leader", "1 while this instance leads replication"),
            instances: gauge("meshgate_coordination_instances", "Instances registered in etcd, as last seen"),
            queued: gauge(
                "meshgate_coordination_claims_queued",
                "Writes waiting for etcd: client-id claims, session records, admin actions",
            ),
            takeovers,
        }
    }
}

/// The lease as this instance last renewed it.
struct LeaseState {
    id: Option<i64>,
    /// The lease cannot expire before this (measured from when the renewal was sent).
    valid_until: Instant,
}

pub struct Coordination {
    cfg: CoordinationConfig,
    me: Instance,
    pool: Arc<Pool>,
    durable: Arc<Durable>,
    /// The revision of each `sessions/<id>` key as this instance last wrote or saw it: the
    /// condition of its next write, and how its own writes are told apart on the watch.
    session_revs: Mutex<std::collections::HashMap<String, i64>>,
    /// Ids whose record waits in the queue to be written: not queued twice, and not replaced
    /// by what etcd holds before the write has settled it.
    pending_sessions: Mutex<std::collections::HashSet<String>>,
    client: etcd_client::Client,
    lease: Mutex<LeaseState>,
    /// Wakes the fence when the lease was renewed or leadership changed.
    renewed: Notify,
    /// `Some(why)` while etcd cannot be reached.
    degraded: Mutex<Option<String>>,
    instances: Mutex<BTreeMap<String, Instance>>,
    leader: Mutex<Option<String>>,
    leading: watch::Sender<bool>,
    /// A replication term runs here: shutting down waits (briefly) for its record to be
    /// handed over before the lease, and the leader key with it, is given back.
    term_open: watch::Sender<bool>,
    claims: mpsc::UnboundedSender<Claim>,
    queue: Mutex<Option<mpsc::UnboundedReceiver<Claim>>>,
    queued: AtomicU64,
    /// The lease changed since the claims were last written in full: write every open
    /// connection's claim again (the old lease took the old claims with it).
    reclaim: AtomicBool,
    /// No etcd session has been set up yet in this process.
    first_session: AtomicBool,
    metrics: Metrics,
}

/// The value of a `clients/<id>` key: fixed-width time first, so etcd's byte-wise comparison
/// orders claims by connect time (and then by instance name).
fn claim_value(at_ms: u64, instance: &str) -> String {
    format!("{at_ms:020} {instance}")
}

fn parse_claim(v: &str) -> Option<(u64, &str)> {
    let (at, instance) = v.split_once(' ')?;
    Some((at.parse().ok()?, instance))
}

fn connect_ms(s: &Session) -> u64 {
    crate::events::unix_ms(s.info.connected_at)
}

impl Coordination {
    /// Builds the client (etcd is not contacted yet: an unreachable etcd is not an error at
    /// start) and this instance's record.
    pub fn new(
        cfg: &CoordinationConfig,
        pool: &Arc<Pool>,
        durable: &Arc<Durable>,
        mqtt: Option<std::net::SocketAddr>,
        http: Option<std::net::SocketAddr>,
    ) -> Result<Arc<Coordination>, String> {
        let client = etcd::client(cfg)?;
        let shown = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        let me = Instance {
            name: cfg.instance.clone(),
            mqtt: shown(mqtt),
            http: shown(http),
            version: crate::VERSION.to_string(),
            started_ms: Pool::now_ms(),
        };
        let (claims, queue) = mpsc::unbounded_channel();
        let metrics = Metrics::new(&pool.metrics.registry);
        Ok(Arc::new(Coordination {
            cfg: cfg.clone(),
            me,
            pool: pool.clone(),
            durable: durable.clone(),
            session_revs: Mutex::default(),
            pending_sessions: Mutex::default(),
            client,
            lease: Mutex::new(LeaseState { id: None, valid_until: Instant::now() }),
            renewed: Notify::new(),
            degraded: Mutex::new(Some(NOT_CONTACTED.to_string())),
            instances: Mutex::new(BTreeMap::new()),
            leader: Mutex::new(None),
            leading: watch::channel(false).0,
            term_open: watch::channel(false).0,
            claims,
            queue: Mutex::new(Some(queue)),
            queued: AtomicU64::new(0),
            reclaim: AtomicBool::new(true),
            first_session: AtomicBool::new(true),
            metrics,
        }))
    }

    /// Runs the etcd session (reconnecting for as long as it takes) and the fence that stops
    /// replication before an unrenewed lease can expire; both end with `stop`.
    pub fn spawn(self: &Arc<Self>, tracker: &tokio_util::task::TaskTracker, stop: &CancellationToken) {
        tracker.spawn(self.clone().run(stop.clone()));
        tracker.spawn(self.clone().fence(stop.clone()));
    }

    /// `true` while this instance leads replication; replication follows it.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// How long before its lease could expire a leader stops replicating: one renewal
    /// interval, so a leader that misses two renewals in a row has stopped before anyone else
    /// can be elected.
    fn margin(&self) -> Duration {
        self.cfg.lease_ttl / 3
    }

    fn set_leading(&self, on: bool, why: &str) {
        let was = self.leading.send_replace(on);
        self.metrics.leader.set(i64::from(on));
        if was != on {
            self.renewed.notify_one();
            if on {
                self.durable.adopt_from_gone_instances();
            }
            let (severity, what) = match on {
                true => (Severity::Info, format!("instance {} leads replication", self.me.name)),
                false => (Severity::Warn, format!("instance {} stopped leading replication: {why}", self.me.name)),
            };
            self.pool.events.push_at(severity, "instance", None, what);
        }
    }

    /// Stops replicating once the lease could expire within `margin`: whatever the etcd
    /// session is doing (a renewal that hangs included), a leader never outlives its lease.
    async fn fence(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let deadline = self.lease.lock().valid_until.checked_sub(self.margin()).unwrap_or_else(Instant::now);
            let leading = *self.leading.borrow();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.renewed.notified() => continue,
                _ = tokio::time::sleep_until(deadline.into()), if leading => {
                    let still = self.lease.lock().valid_until.checked_sub(self.margin()).unwrap_or_else(Instant::now);
                    if Instant::now() >= still {
                        self.set_leading(false, "its etcd lease was not renewed in time");
                    }
                }
            }
        }
    }

    fn set_degraded(&self, why: Option<String>) {
        let mut d = self.degraded.lock();
        let changed = *d != why;
        match (&*d, &why) {
            (None, Some(w)) => {
                self.pool.events.push_at(
                    Severity::Warn,
                    "instance",
                    None,
                    format!("etcd unreachable ({w}): serving clients with what this instance knows, writes queued"),
                );
            }
            (Some(before), None) => {
                let what = match before.as_str() {
                    NOT_CONTACTED => format!("instance {} joined through etcd", self.me.name),
                    _ => "etcd reachable again".to_string(),
                };
                self.pool.events.push("instance", None, what);
            }
            _ => {}
        }
        if changed {
            *d = why;
        }
        self.metrics.up.set(i64::from(d.is_none()));
    }

    /// For `/health`: `Some(why)` while the instance runs degraded.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().clone()
    }

    pub fn status(&self) -> StatusView {
        StatusView {
            state: if self.degraded.lock().is_some() { "degraded" } else { "ok" },
            reason: self.degraded.lock().clone(),
            instance: self.me.name.clone(),
            etcd: self.cfg.etcd.clone(),
            prefix: self.cfg.prefix.clone(),
            lease_ttl_s: self.cfg.lease_ttl.as_secs(),
            leader: self.leader.lock().clone(),
            leading: *self.leading.borrow(),
            claims_queued: self.queued.load(Ordering::Relaxed),
        }
    }

    /// Every instance as last seen in etcd (this one always, even before etcd answered).
    pub fn view(&self) -> InstancesView {
        let leader = self.leader.lock().clone();
        let mut all = self.instances.lock().clone();
        all.entry(self.me.name.clone()).or_insert_with(|| self.me.clone());
        let instances = all
            .into_values()
            .map(|i| InstanceView {
                leader: leader.as_deref() == Some(i.name.as_str()),
                this: i.name == self.me.name,
                instance: i,
            })
            .collect();
        InstancesView { coordination: self.status(), instances }
    }

    fn queue(&self, claim: Claim) {
        // Counted before it can be written (and subtracted), so the count never wraps.
        let n = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.queued.set(n as i64);
        if self.claims.send(claim).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A connection of `client_id` through this instance: claim the id.
    pub fn session_opened(&self, s: &Session) {
        if !s.info.client_id.is_empty() {
            self.queue(Claim::Own { client_id: s.info.client_id.clone(), at_ms: connect_ms(s) });
        }
    }

    /// A registration ended; the claim goes when the connection is gone (a session that
    /// moved to another broker keeps its connection, and its claim).
    pub fn session_ended(&self, s: &Session) {
        if !s.info.client_id.is_empty() {
            self.queue(Claim::Release { client_id: s.info.client_id.clone(), at_ms: connect_ms(s) });
        }
    }

    /// An admin action taken through this instance's API: every instance applies it (and an
    /// instance that starts later finds it), kept in etcd under `admin/<broker>` without a
    /// lease, so it outlives the instance that took it.
    pub fn admin_changed(&self, broker: &str, state: AdminState) {
        self.queue(Claim::Admin { broker: broker.to_string(), state });
    }

    /// An admin action another instance took (or, at this instance's start, one it took itself
    /// in an earlier life). Its own later actions are already applied, and may be newer than
    /// what etcd holds while they wait in the queue.
    fn admin_seen(&self, broker: &str, value: &str, at_start: bool) {
        let Some((word, by)) = value.split_once(' ') else { return };
        let Some(state) = admin_state(word) else { return };
        if by == self.me.name && !at_start {
            return;
        }
        if self.pool.broker(broker).is_some_and(|b| b.admin() != state) {
            tracing::info!(broker, by, state = word, "admin action through another instance");
            self.pool.set_admin(broker, state);
        }
    }

    /// Another instance claimed `client_id` for a connection made at `at_ms`: close this
    /// instance's connections of the id that are older (ties go to the greater instance name).
    fn claimed_elsewhere(&self, client_id: &str, at_ms: u64, instance: &str) {
        if instance == self.me.name {
            return;
        }
        for s in self.pool.sessions_of(client_id) {
            let ours = connect_ms(&s);
            if !s.is_closing() && (ours, self.me.name.as_str()) < (at_ms, instance) {
                tracing::info!(
                    client_id,
                    other = instance,
                    "client id connected later through another instance: closing this instance's connection"
                );
                s.close(INSTANCE_TAKEOVER);
                self.pool.metrics.sessions_closed.with_label_values(&[INSTANCE_TAKEOVER]).inc();
                self.metrics.takeovers.inc();
            }
        }
    }

    /// Whether this instance still has a connection of `client_id` made at `at_ms` (a session
    /// that moved between brokers is the same connection under a new registration).
    fn still_connected(&self, client_id: &str, at_ms: u64) -> bool {
        self.pool.sessions_of(client_id).iter().any(|s| connect_ms(s) == at_ms && !s.is_closing())
    }
}

/// The persistent-session record, shared through etcd.
impl crate::durable::Share for Coordination {
    fn instance(&self) -> &str {
        &self.me.name
    }

    fn changed(&self, client_id: &str) {
        if self.pending_sessions.lock().insert(client_id.to_string()) {
            self.queue(Claim::Session { client_id: client_id.to_string() });
        }
    }

    fn leads(&self) -> bool {
        *self.leading.borrow()
    }

    fn alive(&self, instance: &str) -> bool {
        instance == self.me.name || self.instances.lock().contains_key(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_order_by_time_then_instance_as_etcd_compares_bytes() {
        let a = claim_value(999, "b");
        let b = claim_value(1_000, "a");
        let c = claim_value(1_000, "b");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(parse_claim(&c), Some((1_000, "b")));
        assert_eq!(parse_claim("garbage"), None);
    }
}
