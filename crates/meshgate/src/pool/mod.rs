//! The broker pool: identity, health and live counters of each broker, tier selection, and the session registry.
//!
//! A broker's identity (name, address) never changes; its configuration and probe health are
//! swapped whole (ArcSwap) so readers never see half an update and a config reload keeps the
//! health it had. "Available" = enabled, not draining, probes not down, passive accounting not
//! barring it, and below `max_conns`.

pub mod passive;
pub mod session;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, Config, Failback, OnDown, ProxyConfig};
use crate::events::{unix_ms, EventLog, Severity};
use crate::metrics::Metrics;
use passive::{Passive, PassiveState, Transition};
pub use session::{Lease, Session, SessionInfo};

/// One active probe's outcome, kept for the API and the dashboard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProbeRecord {
    pub kind: &'static str,
    pub ok: bool,
    pub latency_ms: f64,
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Probe health as the checker last left it.
#[derive(Debug, Clone)]
pub struct Health {
    /// `None` until the first probe has answered.
    pub up: Option<bool>,
    pub since: SystemTime,
    pub last: Option<ProbeRecord>,
    /// Recent probe latencies in ms (failed probes as `None`), oldest first, for charts.
    pub history: VecDeque<Option<f64>>,
}

pub const HISTORY_LEN: usize = 60;

/// Why the pool closes sessions (the `reason` of `meshgate_sessions_closed_total`): probes said
/// down (with `on_down = "close"`), disabled, a newer session of the client id elsewhere, and
/// the rebalancer's moves.
pub const CLOSE_REASONS: [&str; 7] =
    [BROKER_DOWN, "broker_disabled", "duplicate_client_id", INSTANCE_TAKEOVER, "drain", "failback", "broker_removed"];

/// The client id connected through another meshgate instance (`[coordination]`), later: this
/// instance closes its older connection, as a broker does on a client-id takeover.
pub const INSTANCE_TAKEOVER: &str = "instance_takeover";

/// Why sessions leave a broker that failed (probes said down, or it closed their connections
/// and cannot be reached): the one move made without the old broker's part.
pub const BROKER_DOWN: &str = "broker_down";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Enabled,
    Disabled,
    Draining,
}

pub struct Broker {
    pub name: String,
    pub address: String,
    config: ArcSwap<BrokerConfig>,
    health: ArcSwap<Health>,
    passive: Mutex<Passive>,
    admin: AtomicU8,
    /// Replication's link to this broker is up: what other brokers take is copied here.
    replicated: AtomicBool,
    /// Sessions open or being set up here (counted from selection, so bursts spread out).
    active: AtomicU64,
    total: AtomicU64,
    removed: AtomicBool,
    /// Sessions asked to leave this broker because it failed whose new broker is not ready
    /// yet: each waits (briefly) for the others, so a publisher's resent messages do not reach
    /// the new broker before a subscriber's subscriptions do.
    evacuating: std::sync::atomic::AtomicUsize,
    /// Woken when `evacuating` reaches zero, and only then: every session leaving a failed
    /// broker waits here, and waking them all at each one's arrival cost the square of their
    /// number (9,000 sessions: tens of millions of wake-ups, a CPU-bound second).
    evacuation_done: tokio::sync::Notify,
}

impl Broker {
    fn new(cfg: &BrokerConfig) -> Broker {
        Broker {
            name: cfg.name.clone(),
            address: cfg.address.clone(),
            config: ArcSwap::from_pointee(cfg.clone()),
            health: ArcSwap::from_pointee(Health {
                up: None,
                since: SystemTime::now(),
                last: None,
                history: VecDeque::new(),
            }),
            passive: Mutex::new(Passive::new(cfg.max_fails, cfg.fail_timeout)),
            admin: AtomicU8::new(if cfg.enabled { 0 } else { 1 }),
            replicated: AtomicBool::new(false),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            evacuating: std::sync::atomic::AtomicUsize::new(0),
            evacuation_done: tokio::sync::Notify::new(),
        }
    }

    pub fn config(&self) -> Arc<BrokerConfig> {
        self.config.load_full()
    }
    pub fn priority(&self) -> u32 {
        self.config.load().priority
    }
    pub fn health(&self) -> Arc<Health> {
        self.health.load_full()
    }
    pub fn set_health(&self, h: Health) {
        self.health.store(Arc::new(h));
    }
    pub fn admin(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            0 => AdminState::Enabled,
            1 => AdminState::Disabled,
            _ => AdminState::Draining,
        }
    }
    fn set_admin(&self, s: AdminState) {
        self.admin.store(s as u8, Ordering::Relaxed);
    }
    /// Set by replication as its link to this broker comes and goes.
    pub fn set_replicated(&self, up: bool) {
        self.replicated.store(up, Ordering::Relaxed);
    }
    pub fn replicated(&self) -> bool {
        self.replicated.load(Ordering::Relaxed)
    }
    pub fn active_sessions(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    pub fn total_sessions(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    /// Waits until every session leaving this failed broker has its new broker ready, or
    /// `limit` passed.
    pub async fn evacuated(&self, limit: Duration) {
        let done = self.evacuation_done.notified();
        tokio::pin!(done);
        // Registered before the count is read, so reaching zero right after still wakes it.
        done.as_mut().enable();
        if self.evacuating.load(Ordering::Acquire) == 0 {
            return;
        }
        let _ = tokio::time::timeout(limit, done).await;
    }

    fn evacuation_joined(&self) {
        self.evacuating.fetch_add(1, Ordering::AcqRel);
    }

    fn evacuation_left(&self) {
        let before = self.evacuating.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
        debug_assert!(before != Ok(0), "an evacuation left that never joined");
        if before == Ok(1) {
            self.evacuation_done.notify_waiters();
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }
    pub fn probe_up(&self) -> Option<bool> {
        self.health.load().up
    }
    pub fn passive_fails(&self, now: Instant) -> u32 {
        self.passive.lock().fails(now)
    }
    pub fn passive_state(&self, now: Instant) -> PassiveState {
        self.passive.lock().state(now)
    }

    fn full(&self) -> bool {
        let max = self.config.load().max_conns;
        max > 0 && self.active_sessions() >= u64::from(max)
    }

    /// Takes new sessions now.
    pub fn available(&self, now: Instant) -> bool {
        self.admin() == AdminState::Enabled
            && !self.is_removed()
            && self.probe_up() != Some(false)
            && self.passive.lock().allows(now)
            && !self.full()
    }

    /// `up`, `down`, `draining` or `disabled`, with why, for the API.
    pub fn state(&self, now: Instant) -> (&'static str, String) {
        match self.admin() {
            AdminState::Disabled => return ("disabled", "disabled by configuration or admin".into()),
            AdminState::Draining => return ("draining", "draining: takes no new sessions".into()),
            AdminState::Enabled => {}
        }
        let h = self.health.load();
        if h.up == Some(false) {
            let err = h.last.as_ref().and_then(|p| p.error.clone()).unwrap_or_default();
            return ("down", format!("probes failing: {err}"));
        }
        if let PassiveState::Barred { until } = self.passive_state(now) {
            let left = until.saturating_duration_since(now);
            return ("down", format!("passive: max_fails reached, barred for {:.1}s more", left.as_secs_f64()));
        }
        if self.full() {
            return ("up", "full: max_conns reached".into());
        }
        match h.up {
            None => ("up", "not probed yet".into()),
            _ => ("up", String::new()),
        }
    }
}

/// What the pool tells the work that depends on brokers and sessions (persistent sessions, in
/// `durable`), without knowing it: implemented there and wired in `lib.rs`, so the pool
/// imports neither the proxy nor the session engine.
pub trait Hooks: Send + Sync {
    /// `broker` stopped taking sessions (`lost`: probes down, disabled, removed) or takes them
    /// again.
    fn broker_changed(&self, _broker: &str, _lost: bool) {}
    /// Tiers or broker states changed: background work may have something to do.
    fn wake(&self) {}
    /// A connection of a persistent client id was registered.
    fn client_registered(&self, _client_id: &str) {}
    /// The last registered connection of a persistent client id ended.
    fn client_gone(&self, _client_id: &str) {}
    /// Any session was registered (a CONNECT accepted, or a session moved to another broker).
    /// Called on the CONNECT path: it must not wait.
    fn session_opened(&self, _session: &Session) {}
    /// A registration ended (the connection closed, or the session moved on).
    fn session_ended(&self, _session: &Session) {}
}

/// Hooks for a pool nobody else watches (the sidecar, tests).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// The open sessions, by session id and by client id, so registering a CONNECT looks at the
/// sessions of its own client id only (a reconnect storm after a failover is then linear).
#[derive(Default)]
struct Registry {
    by_id: HashMap<u64, Arc<Session>>,
    /// A client id has one session but for the moment a new one takes over: that one is kept
    /// inline (a list of its own cost every session 48 bytes more).
    by_client: HashMap<String, smallvec::SmallVec<[Arc<Session>; 1]>>,
}

impl Registry {
    fn of(&self, client_id: &str) -> &[Arc<Session>] {
        self.by_client.get(client_id).map_or(&[], |l| l.as_slice())
    }

    fn insert(&mut self, s: Arc<Session>) {
        self.by_client.entry(s.info.client_id.clone()).or_default().push(s.clone());
        self.by_id.insert(s.id, s);
    }

    /// Removes `s`; `true` when it was its client id's last session.
    fn remove(&mut self, s: &Session) -> bool {
        self.by_id.remove(&s.id);
        let Some(list) = self.by_client.get_mut(&s.info.client_id) else { return true };
        list.retain(|o| o.id != s.id);
        let last = list.is_empty();
        if last {
            self.by_client.remove(&s.info.client_id);
        }
        last
    }
}

/// The brokers, their sessions and what happens to them; shared by the proxy, the checkers,
/// the rebalancer and the HTTP API.
pub struct Pool {
    brokers: ArcSwap<Vec<Arc<Broker>>>,
    proxy: ArcSwap<ProxyConfig>,
    sessions: Mutex<Registry>,
    next_session: AtomicU64,
    /// The broker new clients go to, as last logged; `None` before the first choice.
    current: Mutex<Option<Option<String>>>,
    pub events: EventLog,
    pub metrics: Metrics,
    /// Wakes the rebalancer when tiers or admin states change.
    pub changed: Notify,
    /// Cancelled when the shutdown grace period is over: every client task still setting up
    /// ends then, and a registered session at its next wake-up (the shutdown closes each one,
    /// which wakes it).
    pub closing: CancellationToken,
    pub started: SystemTime,
    hooks: Arc<dyn Hooks>,
    /// Per kind of meshgate's own shortage, when it was last logged and how many went unlogged
    /// since.
    shortage_log: Mutex<std::collections::HashMap<&'static str, (Option<Instant>, u64)>>,
}

/// A registered session; unregisters on drop.
pub struct Registered {
    pool: Arc<Pool>,
    pub session: Arc<Session>,
}

impl std::ops::Deref for Registered {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.pool.unregister(&self.session);
    }
}

impl Pool {
    /// A pool nobody else watches.
    pub fn new(config: &Config) -> Pool {
        Pool::with_hooks(config, Arc::new(NoHooks))
    }

    pub fn with_hooks(config: &Config, hooks: Arc<dyn Hooks>) -> Pool {
        let brokers = config.brokers.iter().map(|c| Arc::new(Broker::new(c))).collect();
        let pool = Pool {
            brokers: ArcSwap::from_pointee(brokers),
            proxy: ArcSwap::from_pointee(config.proxy.clone()),
            sessions: Mutex::new(Registry::default()),
            next_session: AtomicU64::new(1),
            current: Mutex::new(None),
            events: EventLog::new(1000),
            metrics: Metrics::new(),
            changed: Notify::new(),
            closing: CancellationToken::new(),
            started: SystemTime::now(),
            hooks,
            shortage_log: Default::default(),
        };
        pool.refresh();
        pool
    }

    /// Runs `f` holding the registry's, the failover view's and every broker's passive lock
    /// (see `Meshgate::panic_holding_shared_locks`).
    #[doc(hidden)]
    pub fn with_locks_held<T>(&self, f: impl FnOnce() -> T) -> T {
        let brokers = self.brokers.load_full();
        let _passive: Vec<_> = brokers.iter().map(|b| b.passive.lock()).collect();
        let (_sessions, _current) = (self.sessions.lock(), self.current.lock());
        f()
    }

    pub fn brokers(&self) -> Arc<Vec<Arc<Broker>>> {
        self.brokers.load_full()
    }
    pub fn broker(&self, name: &str) -> Option<Arc<Broker>> {
        self.brokers.load().iter().find(|b| b.name == name).cloned()
    }
    pub fn proxy_config(&self) -> Arc<ProxyConfig> {
        self.proxy.load_full()
    }

    /// Best (lowest) priority among available brokers.
    pub fn best_tier(&self, now: Instant) -> Option<u32> {
        self.brokers.load().iter().filter(|b| b.available(now)).map(|b| b.priority()).min()
    }

    /// The broker a new client would get now, without reserving anything.
    pub fn current_broker(&self) -> Option<Arc<Broker>> {
        let now = Instant::now();
        let brokers = self.brokers.load();
        least_loaded(brokers.iter().filter(|b| b.available(now)))
    }

    /// Chooses the next broker for a CONNECT and reserves a slot there. Brokers in `tried`
    /// are skipped. When nothing is available it falls back, like nginx, to enabled brokers
    /// in priority order (those whose probes are not down first), so an outage of the whole
    /// view (for example right after start) still gets a real attempt.
    pub fn pick(&self, tried: &[Arc<Broker>]) -> Option<Lease> {
        let now = Instant::now();
        let brokers = self.brokers.load();
        let untried = || brokers.iter().filter(|b| !tried.iter().any(|t| Arc::ptr_eq(t, b)));
        let mut candidates: Vec<&Arc<Broker>> = untried().filter(|b| b.available(now)).collect();
        while let Some(b) = least_loaded(candidates.iter().copied()) {
            let taken = b.passive.lock().take(now);
            if let Some(trial) = taken {
                return Some(Lease::trial(&b, trial));
            }
            // Lost the probation trial to another session: try the rest of the tier.
            candidates.retain(|c| !Arc::ptr_eq(c, &b));
        }
        let mut fallback: Vec<&Arc<Broker>> =
            untried().filter(|b| b.admin() == AdminState::Enabled && !b.is_removed() && !b.full()).collect();
        fallback.sort_by_key(|b| (b.probe_up() == Some(false), b.priority()));
        fallback.first().map(|b| Lease::new(b))
    }

    pub fn record_success(&self, broker: &Broker) {
        // The lock is released before the reaction: `after_change` reads this broker's
        // passive state again, and a lock held through an `if let` would deadlock there.
        let transition = broker.passive.lock().success(Instant::now());
        if let Some(Transition::Reopened) = transition {
            self.events.push(
                "passive_reopen",
                Some(&broker.name),
                format!("{} passed its probation trial", broker.name),
            );
            self.after_change();
        }
    }

    /// An attempt on `broker` failed for lack of meshgate's own resources (file descriptors
    /// above all) or in its own queue: counted for the broker under `reason`, never held
    /// against it (a probation trial the attempt took goes back with its lease). A broker
    /// barred, or probed down, for meshgate's own limit would turn a shortage into an outage:
    /// 9,000 sessions leaving a hung broker at once, each holding its old connection while its
    /// new one is made, once barred the backup that was taking them.
    pub fn record_local_error(&self, broker: &Broker, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.metrics.upstream_failures.with_label_values(&[&broker.name, reason]).inc();
        self.note_shortage(reason, detail);
    }

    /// Logs meshgate's own shortage once a second at most per kind (with how many more there
    /// were), so a burst neither floods the log nor hides another kind's line: at error level
    /// for what the operator must raise (descriptors), at warn for meshgate's own queue.
    pub fn note_shortage(&self, kind: &'static str, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut log = self.shortage_log.lock();
        let (last, unlogged) = log.entry(kind).or_insert((None, 0));
        *unlogged += 1;
        if last.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
            match kind {
                "handshake_queue" => tracing::warn!(count = *unlogged, "{detail}"),
                _ => tracing::error!(count = *unlogged, "{detail}"),
            }
            (*last, *unlogged) = (Some(now), 0);
        }
    }

    pub fn record_failure(&self, broker: &Broker, reason: &'static str) {
        self.metrics.upstream_failures.with_label_values(&[&broker.name, reason]).inc();
        let t = broker.passive.lock().failure(Instant::now());
        if let Some(Transition::Barred { until }) = t {
            let cfg = broker.config();
            let secs = until.saturating_duration_since(Instant::now()).as_secs_f64();
            self.events.push_at(
                Severity::Warn,
                "passive_bar",
                Some(&broker.name),
                format!(
                    "{} failed {} time(s) within fail_timeout (last: {reason}); barred for {secs:.1}s",
                    broker.name, cfg.max_fails
                ),
            );
            self.after_change();
        }
    }

    /// Called by the checker when a broker's probe state flips.
    pub fn probe_flipped(&self, broker: &Broker, up: bool, why: &str) {
        if up {
            // Probes proved the broker healthy again: stale passive failures must not keep it out.
            broker.passive.lock().reset();
            self.events.push_at(
                Severity::Warn,
                "state_change",
                Some(&broker.name),
                format!("{} is up ({why})", broker.name),
            );
            // Outdated session copies there are wiped before it takes new sessions.
            self.hooks.broker_changed(&broker.name, false);
        } else {
            self.events.push_at(
                Severity::Warn,
                "state_change",
                Some(&broker.name),
                format!("{} is down: {why}", broker.name),
            );
            self.hooks.broker_changed(&broker.name, true);
            if self.proxy.load().on_down == OnDown::Close {
                self.move_sessions(&broker.name, BROKER_DOWN);
            }
        }
        self.after_change();
    }

    /// Re-derives gauges and the current broker; logs a failover when it changed.
    pub fn refresh(&self) {
        let now = Instant::now();
        for b in self.brokers.load().iter() {
            let m = &self.metrics;
            m.broker_up.with_label_values(&[&b.name]).set(i64::from(b.probe_up() != Some(false)));
            m.broker_available.with_label_values(&[&b.name]).set(i64::from(b.available(now)));
        }
        let now_name = self.current_broker().map(|b| b.name.clone());
        self.export_tiers(now_name.as_deref());
        let mut current = self.current.lock();
        // `None` until the first choice at start, which is not a failover; after that every
        // change is one, to and from "none" (a total outage) included.
        let Some(was) = current.clone() else {
            *current = Some(now_name);
            return;
        };
        if was == now_name {
            return;
        }
        *current = Some(now_name.clone());
        drop(current);
        self.metrics.failovers.inc();
        let name = |n: &Option<String>| n.clone().unwrap_or_else(|| "none".into());
        let (from, to) = (name(&was), name(&now_name));
        match &now_name {
            None => self.events.push_at(
                Severity::Error,
                "failover",
                None,
                format!("no broker is available: new clients are refused (was {from})"),
            ),
            Some(_) => self.events.push_at(
                Severity::Warn,
                "failover",
                now_name.as_deref(),
                format!("new clients now go to {to} (was {from})"),
            ),
        };
    }

    /// Each broker's priority and which one is current, for dashboards and alerts that must
    /// tell the primary tier from the backups without knowing broker names. Series of brokers
    /// removed by a reload go, so a stale "current" cannot outlive its broker.
    fn export_tiers(&self, current: Option<&str>) {
        use prometheus::core::Collector;
        let m = &self.metrics;
        let brokers = self.brokers.load();
        for b in brokers.iter() {
            m.broker_priority.with_label_values(&[&b.name]).set(i64::from(b.priority()));
            m.broker_current.with_label_values(&[&b.name]).set(i64::from(current == Some(b.name.as_str())));
        }
        for family in [&m.broker_priority, &m.broker_current] {
            let exported: Vec<String> = family
                .collect()
                .iter()
                .flat_map(|f| f.get_metric().iter())
                .flat_map(|x| x.get_label().iter().map(|l| l.value().to_string()))
                .collect();
            for name in exported {
                if !brokers.iter().any(|b| b.name == name) {
                    let _ = family.remove_label_values(&[&name]);
                }
            }
        }
    }

    fn after_change(&self) {
        self.refresh();
        self.changed.notify_one();
        self.hooks.wake();
    }

    // ---- admin ----------------------------------------------------------

    pub fn set_admin(&self, name: &str, state: AdminState) -> Option<()> {
        let b = self.broker(name)?;
        b.set_admin(state);
        let what = match state {
            AdminState::Enabled => "enabled",
            AdminState::Disabled => "disabled",
            AdminState::Draining => "draining",
        };
        self.events.push(
            if state == AdminState::Draining { "drain" } else { "admin" },
            Some(name),
            format!("{name} {what} by admin"),
        );
        if state == AdminState::Enabled {
            self.hooks.broker_changed(name, false);
        }
        if state == AdminState::Disabled {
            self.hooks.broker_changed(name, true);
            self.move_sessions(name, "broker_disabled");
        }
        self.after_change();
        Some(())
    }

    // ---- sessions -------------------------------------------------------

    /// The same session going on at the same broker under a fresh registration, for a move
    /// that could not be made: the old registration was asked to move, which cannot be taken
    /// back. The fresh one queues behind every other session for the next move.
    pub fn renew(self: &Arc<Self>, old: &Registered) -> Registered {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let broker = Lease::new(&old.broker).into_broker();
        self.metrics.sessions_active.with_label_values(&[&broker.name]).inc();
        let s = Arc::new(Session::new(id, broker, old.info.clone(), &self.closing));
        for (to, from) in [
            (&s.bytes_in, &old.bytes_in),
            (&s.bytes_out, &old.bytes_out),
            (&s.packets_in, &old.packets_in),
            (&s.packets_out, &old.packets_out),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.sessions.lock().insert(s.clone());
        Registered { pool: self.clone(), session: s }
    }

    /// Turns a lease into a registered session; dropping the returned guard unregisters it,
    /// so a session task that ends any way at all (even cancelled mid-await) is accounted for.
    pub fn register(self: &Arc<Self>, lease: Lease, info: SessionInfo) -> Registered {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let broker = lease.into_broker();
        broker.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.sessions_total.with_label_values(&[&broker.name]).inc();
        self.metrics.sessions_active.with_label_values(&[&broker.name]).inc();
        let s = Arc::new(Session::new(id, broker, info, &self.closing));
        let mut sessions = self.sessions.lock();
        // One client id across the pool, as within one broker: a newer connection takes over
        // from an older one on another broker (the broker itself handles its own).
        for other in sessions.of(&s.info.client_id) {
            if !Arc::ptr_eq(&other.broker, &s.broker) && !other.is_closing() {
                tracing::info!(client_id = %s.info.client_id, old = %other.broker.name, new = %s.broker.name, "client id connected on another broker: closing its older session");
                other.close("duplicate_client_id");
                self.metrics.sessions_closed.with_label_values(&["duplicate_client_id"]).inc();
            }
        }
        sessions.insert(s.clone());
        drop(sessions);
        if s.info.persistent {
            self.hooks.client_registered(&s.info.client_id);
        }
        self.hooks.session_opened(&s);
        Registered { pool: self.clone(), session: s }
    }

    fn unregister(&self, s: &Session) {
        s.evacuated();
        let last = self.sessions.lock().remove(s);
        if last && s.info.persistent {
            self.hooks.client_gone(&s.info.client_id);
        }
        self.hooks.session_ended(s);
        s.broker.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.sessions_active.with_label_values(&[&s.broker.name]).dec();
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.sessions.lock().by_id.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().by_id.len()
    }

    /// The open sessions of `client_id` (more than one only for a moment: a takeover or a move).
    pub fn sessions_of(&self, client_id: &str) -> Vec<Arc<Session>> {
        self.sessions.lock().of(client_id).to_vec()
    }

    /// The brokers (by name) where `client_id` has an open session that is not closing.
    pub fn live_brokers(&self, client_id: &str) -> Vec<String> {
        self.sessions.lock().of(client_id).iter().filter(|s| !s.is_closing()).map(|s| s.broker.name.clone()).collect()
    }

    /// The broker (by name) that holds the open session of `client_id`, if any.
    pub fn broker_of(&self, client_id: &str) -> Option<String> {
        self.sessions.lock().of(client_id).first().map(|s| s.broker.name.clone())
    }

    /// Moves every session off `broker` at once (it failed, or was disabled): switched under
    /// their clients' connections with `[proxy] move = "switch"`, closed otherwise.
    pub fn move_sessions(&self, broker: &str, reason: &'static str) -> usize {
        if self.proxy.load().moves == crate::config::Move::Close {
            let n = self.close_sessions(broker, reason);
            if n > 0 {
                let message = format!("closed {n} session(s) on {broker} ({reason}); their clients reconnect");
                self.events.push("session_closed", Some(broker), message);
            }
            return n;
        }
        let movers: Vec<_> = self
            .sessions
            .lock()
            .by_id
            .values()
            .filter(|s| s.broker.name == broker && !s.is_closing())
            .cloned()
            .collect();
        let failed = reason == BROKER_DOWN;
        let mut asked = 0;
        for s in &movers {
            let newly = if failed { s.request_evacuation(reason) } else { s.request_move(reason) };
            asked += usize::from(newly);
        }
        if asked > 0 {
            tracing::info!(broker, reason, count = movers.len(), "moving sessions to another broker");
            let message = format!(
                "switching {} session(s) off {broker} ({reason}) under their clients' connections",
                movers.len()
            );
            self.events.push("switch", Some(broker), message);
        }
        movers.len()
    }

    pub fn close_sessions(&self, broker: &str, reason: &'static str) -> usize {
        let victims: Vec<_> =
            self.sessions.lock().by_id.values().filter(|s| s.broker.name == broker).cloned().collect();
        for s in &victims {
            s.close(reason);
            self.metrics.sessions_closed.with_label_values(&[reason]).inc();
        }
        if !victims.is_empty() {
            tracing::info!(broker, reason, count = victims.len(), "closed sessions");
        }
        victims.len()
    }

    /// The next session the rebalancer should move, and why: sessions on draining or removed
    /// brokers, and (with failback = drain) sessions below the best available tier.
    pub fn next_to_move(&self) -> Option<(Arc<Session>, &'static str)> {
        let now = Instant::now();
        let best = self.best_tier(now)?;
        let failback = self.proxy.load().failback == Failback::Drain;
        let sessions = self.sessions.lock();
        let next = sessions
            .by_id
            .values()
            .filter_map(|s| Some((s, move_reason(s, best, failback)?)))
            .min_by_key(|(s, _)| s.id)
            .map(|(s, why)| (s.clone(), why));
        next
    }

    /// How many sessions the rebalancer will still move: 0 when the system is settled.
    pub fn moves_pending(&self) -> usize {
        let Some(best) = self.best_tier(Instant::now()) else { return 0 };
        let failback = self.proxy.load().failback == Failback::Drain;
        self.sessions.lock().by_id.values().filter(|s| move_reason(s, best, failback).is_some()).count()
    }

    // ---- reload ---------------------------------------------------------

    /// Applies a new config: brokers with the same name and address keep their health,
    /// counters and sessions; new ones start unprobed; removed ones are drained.
    pub fn apply(&self, config: &Config) {
        let old = self.brokers.load_full();
        let mut next = Vec::with_capacity(config.brokers.len());
        let mut disabled = Vec::new();
        for c in &config.brokers {
            match old.iter().find(|b| b.name == c.name && b.address == c.address) {
                Some(b) => {
                    let prev = b.config();
                    if prev.enabled != c.enabled {
                        b.set_admin(if c.enabled { AdminState::Enabled } else { AdminState::Disabled });
                        // As with the admin API: sessions move off a disabled broker before new
                        // clients arrive, outdated copies go before a re-enabled one takes any.
                        self.hooks.broker_changed(&c.name, !c.enabled);
                        if !c.enabled {
                            disabled.push(c.name.clone());
                        }
                    }
                    b.passive.lock().set_limits(c.max_fails, c.fail_timeout);
                    b.config.store(Arc::new(c.clone()));
                    next.push(b.clone());
                }
                None => next.push(Arc::new(Broker::new(c))),
            }
        }
        for b in old.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.removed.store(true, Ordering::Relaxed);
                self.hooks.broker_changed(&b.name, true);
            }
        }
        self.brokers.store(Arc::new(next));
        self.proxy.store(Arc::new(config.proxy.clone()));
        // A broker disabled in the new config loses its sessions at once, as with the admin
        // API, so its clients reconnect to the broker that now takes new sessions.
        for name in &disabled {
            self.events.push("admin", Some(name), format!("{name} disabled by configuration"));
            self.move_sessions(name, "broker_disabled");
        }
        self.after_change();
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0)
    }

    pub fn now_ms() -> u64 {
        unix_ms(SystemTime::now())
    }
}

/// Why the rebalancer moves `s`, if it does: its broker was removed or is draining, or (with
/// failback) it sits below the best available tier `best`.
fn move_reason(s: &Session, best: u32, failback: bool) -> Option<&'static str> {
    if s.is_closing() {
        return None;
    }
    let b = &s.broker;
    if b.is_removed() {
        Some("broker_removed")
    } else if b.admin() == AdminState::Disabled {
        // Normally moved at once (`move_sessions`); one that arrived mid-move moves here.
        Some("broker_disabled")
    } else if b.admin() == AdminState::Draining {
        Some("drain")
    } else if failback && b.priority() > best {
        Some("failback")
    } else {
        None
    }
}

/// nginx least_conn: fewest sessions per unit of weight within the best tier; ties go to the
/// broker listed first, which keeps the choice predictable for operators.
fn least_loaded<'a>(brokers: impl Iterator<Item = &'a Arc<Broker>>) -> Option<Arc<Broker>> {
    let mut best: Option<&Arc<Broker>> = None;
    for b in brokers {
        best = match best {
            None => Some(b),
            Some(cur) => {
                let (bp, cp) = (b.priority(), cur.priority());
                let lighter = u128::from(b.active_sessions()) * u128::from(cur.config.load().weight)
                    < u128::from(cur.active_sessions()) * u128::from(b.config.load().weight);
                if bp < cp || (bp == cp && lighter) {
                    Some(b)
                } else {
                    Some(cur)
                }
            }
        };
    }
    best.cloned()
}

#[cfg(test)]
mod tests;
