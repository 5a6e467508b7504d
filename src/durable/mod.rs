//! Persistent sessions that survive a broker failure: the record of their subscriptions, restoring them on a broker that lacks them, migrating them when their broker fails, and standby copies.
//!
//! A broker's sessions die with it. meshgate sees every SUBSCRIBE and UNSUBSCRIBE of a
//! persistent session and the broker's answer, so it keeps what was acknowledged (`store`) and
//! can rebuild the session elsewhere (`remote`):
//! - restore: a persistent client that lands on a broker without its session gets its
//!   subscriptions back before its CONNACK, which then says "session present";
//! - migrate: when a session's broker becomes unavailable, the session is created at once on
//!   the broker that now takes new clients, so it queues the client's messages from then on;
//! - standby (`sessions.standby`): an offline copy on the next broker in priority order, made
//!   ahead of any failure, so with replication on it already holds what was published before
//!   the failure; meshgate empties its queue every `standby_trim` while the client is
//!   connected elsewhere, which bounds what it costs the broker.
//!
//! Per client id, every one of these and the client's own session setup take turns (`lock`),
//! so meshgate never connects as a client to a broker where the client is connecting.

pub mod remote;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SessionsConfig;
use crate::mqtt::frame::Header;
use crate::mqtt::subscribe::{disconnect_expiry, granted, parse_ack, parse_subscribe, parse_unsubscribe};
use crate::mqtt::{kind, Capture, FrameError, FrameScanner};
use crate::pool::{Broker, Pool};
use store::{Record, Store, Sub};

/// Largest SUBSCRIBE or UNSUBSCRIBE body meshgate reads to record it.
const CAPTURE_LIMIT: usize = 64 * 1024;
/// Time for one restore, migration or standby operation on a broker.
const OP_LIMIT: Duration = Duration::from_secs(2);
/// Migrations and standby copies run at most this many at once.
const PARALLEL: usize = 32;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where a persistent session lives, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub home: Option<String>,
    pub standby: Option<String>,
    pub subscriptions: usize,
    pub incomplete: bool,
}

/// A client id's turn; the last one out removes the id's lock, so the map holds only ids
/// someone is working on.
pub struct Turn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    mutex: Arc<tokio::sync::Mutex<()>>,
    client_id: String,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Held by the map and by this turn only: nobody is waiting.
        if Arc::strong_count(&self.mutex) == 2 {
            locks.remove(&self.client_id);
        }
    }
}

/// One recorded persistent session, for `GET /sessions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionView {
    pub client_id: String,
    pub protocol: &'static str,
    pub connected: bool,
    pub home: Option<String>,
    pub standby: Option<String>,
    pub subscriptions: Vec<SubscriptionView>,
    pub incomplete: bool,
    /// Seconds until the session expires; `null` while its client is connected.
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionView {
    pub filter: String,
    pub qos: u8,
}

pub struct Durable {
    cfg: SessionsConfig,
    store: Mutex<Store>,
    /// Each client's own last CONNECT, so meshgate's connections on its behalf carry its
    /// credentials. Memory only: it may hold a password.
    connects: Mutex<HashMap<String, Vec<u8>>>,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    dirty: AtomicBool,
    /// Wakes the maintenance loop: a broker's availability or a session changed.
    pub wake: tokio::sync::Notify,
    last_trim: Mutex<Option<Instant>>,
    /// New client sessions wait at this while sessions are migrated off a broker that just
    /// failed, so nothing a publisher is told was accepted after the failure can reach the
    /// new broker before the sessions that should queue it.
    barrier: Arc<tokio::sync::RwLock<()>>,
    held: Mutex<Option<(tokio::sync::OwnedRwLockWriteGuard<()>, Instant)>>,
}

impl Durable {
    pub fn new(cfg: &SessionsConfig) -> Durable {
        let store = match &cfg.state_file {
            Some(path) if cfg.enabled => Store::load(path).unwrap_or_else(|e| {
                warn!("persistent-session record unreadable, starting empty: {e}");
                Store::default()
            }),
            _ => Store::default(),
        };
        let mut store = store;
        // Nobody is connected through a meshgate that has just started.
        for r in store.sessions.values_mut() {
            r.connected = false;
        }
        Durable {
            cfg: cfg.clone(),
            store: Mutex::new(store),
            connects: Mutex::new(HashMap::new()),
            locks: Arc::default(),
            dirty: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            last_trim: Mutex::new(None),
            barrier: Arc::new(tokio::sync::RwLock::new(())),
            held: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Called the moment `broker` stops taking sessions: when persistent sessions live there,
    /// new client sessions wait (at most `OP_LIMIT`) until they have been migrated.
    pub fn hold_new_sessions(&self, broker: &str) {
        if !self.cfg.enabled {
            return;
        }
        let homed = self
            .store
            .lock()
            .unwrap()
            .sessions
            .values()
            .any(|r| r.home.as_deref() == Some(broker) && !r.subscriptions.is_empty());
        if !homed {
            return;
        }
        let mut held = self.held.lock().unwrap();
        if held.is_none() {
            if let Ok(g) = self.barrier.clone().try_write_owned() {
                *held = Some((g, Instant::now()));
            }
        }
        drop(held);
        self.wake.notify_one();
    }

    fn release_new_sessions(&self) {
        self.held.lock().unwrap().take();
    }

    /// Where a new client session waits while a migration holds new sessions.
    pub async fn pass_barrier(&self) {
        let _ = tokio::time::timeout(OP_LIMIT, self.barrier.read()).await;
    }

    /// Takes this client id's turn (see the module comment).
    pub async fn lock(&self, client_id: &str) -> Turn {
        let m = self.locks.lock().unwrap().entry(client_id.to_string()).or_default().clone();
        let guard = m.clone().lock_owned().await;
        Turn { guard: Some(guard), mutex: m, client_id: client_id.to_string(), locks: self.locks.clone() }
    }

    fn changed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub fn placement(&self, client_id: &str) -> Option<Placement> {
        let store = self.store.lock().unwrap();
        store.sessions.get(client_id).map(|r| Placement {
            home: r.home.clone(),
            standby: r.standby.clone(),
            subscriptions: r.subscriptions.len(),
            incomplete: r.incomplete,
        })
    }

    pub fn list(&self) -> Vec<SessionView> {
        let now = now_ms();
        let store = self.store.lock().unwrap();
        let mut v: Vec<SessionView> = store
            .sessions
            .iter()
            .map(|(id, r)| SessionView {
                client_id: id.clone(),
                protocol: crate::http::protocol_name(r.version),
                connected: r.connected,
                home: r.home.clone(),
                standby: r.standby.clone(),
                subscriptions: r
                    .subscriptions
                    .iter()
                    .map(|(f, s)| SubscriptionView { filter: f.clone(), qos: s.options & 3 })
                    .collect(),
                incomplete: r.incomplete,
                expires_in_s: (!r.connected)
                    .then(|| (r.last_seen_ms + r.expiry_secs.saturating_mul(1000)).saturating_sub(now) / 1000),
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }

    pub fn count(&self) -> usize {
        self.store.lock().unwrap().sessions.len()
    }

    /// A client's CONNECT arrived. A clean CONNECT ends the old session on the broker, so its
    /// record goes too (5: a clean start that stays persistent begins a new, empty record).
    pub fn on_connect(&self, client_id: &str, clean: bool, persistent: bool) {
        if !self.cfg.enabled || !clean {
            return;
        }
        let mut store = self.store.lock().unwrap();
        if !persistent {
            if store.sessions.remove(client_id).is_some() {
                drop(store);
                self.connects.lock().unwrap().remove(client_id);
                self.changed();
            }
        } else if let Some(r) = store.sessions.get_mut(client_id) {
            r.subscriptions.clear();
            r.incomplete = false;
            r.standby_stale = true;
            drop(store);
            self.changed();
        }
    }

    /// Subscriptions to put back when a persistent client landed on a broker without its session.
    pub fn to_restore(&self, client_id: &str) -> Vec<(String, Sub)> {
        let store = self.store.lock().unwrap();
        store
            .sessions
            .get(client_id)
            .map_or_else(Vec::new, |r| r.subscriptions.iter().map(|(f, s)| (f.clone(), s.clone())).collect())
    }

    /// A persistent client's session is established on `broker`.
    pub fn on_established(
        &self,
        connect: &crate::mqtt::Connect,
        packet: &[u8],
        broker: &str,
        metrics: &crate::metrics::Metrics,
    ) {
        if !self.cfg.enabled {
            return;
        }
        let expiry = match connect.version {
            5 => u64::from(connect.session_expiry.unwrap_or(0)).min(self.cfg.expiry.as_secs()),
            _ => self.cfg.expiry.as_secs(),
        };
        let now = now_ms();
        let mut store = self.store.lock().unwrap();
        let mut rec = store
            .sessions
            .remove(&connect.client_id)
            .unwrap_or_else(|| Record::new(connect.version, connect.username.clone(), expiry, now));
        rec.version = connect.version;
        rec.username = connect.username.clone();
        rec.expiry_secs = expiry;
        rec.home = Some(broker.to_string());
        rec.connected = true;
        rec.last_seen_ms = now;
        if rec.standby.as_deref() == Some(broker) {
            // Its standby copy is now its home: a new standby is made elsewhere.
            rec.standby = None;
        }
        let gone = store.put(&connect.client_id, rec, self.cfg.max_sessions);
        metrics.durable_sessions.set(store.sessions.len() as i64);
        drop(store);
        let mut connects = self.connects.lock().unwrap();
        if let Some(gone) = gone {
            warn!(client_id = %gone, "persistent-session record full (sessions.max_sessions): forgot the session seen longest ago");
            connects.remove(&gone);
        }
        connects.insert(connect.client_id.clone(), packet.to_vec());
        drop(connects);
        self.changed();
    }

    /// The last connection of a persistent client id through meshgate ended.
    pub fn on_disconnected(&self, client_id: &str) {
        let mut store = self.store.lock().unwrap();
        if let Some(r) = store.sessions.get_mut(client_id) {
            r.connected = false;
            r.last_seen_ms = now_ms();
            drop(store);
            self.changed();
        }
    }

    fn add(&self, client_id: &str, subs: Vec<(String, Sub)>) {
        let mut store = self.store.lock().unwrap();
        let Some(r) = store.sessions.get_mut(client_id) else { return };
        for (f, s) in subs {
            if r.subscriptions.len() >= self.cfg.max_subscriptions && !r.subscriptions.contains_key(&f) {
                if !r.incomplete {
                    warn!(client_id, "more subscriptions than sessions.max_subscriptions: the rest are not recorded");
                }
                r.incomplete = true;
                continue;
            }
            r.subscriptions.insert(f, s);
        }
        r.standby_stale = true;
        drop(store);
        self.changed();
    }

    fn remove(&self, client_id: &str, filters: &[String]) {
        let mut store = self.store.lock().unwrap();
        let Some(r) = store.sessions.get_mut(client_id) else { return };
        for f in filters {
            r.subscriptions.remove(f);
        }
        r.standby_stale = true;
        drop(store);
        self.changed();
    }

    /// The client ended its session (MQTT 5 DISCONNECT with session expiry 0).
    fn forget(&self, client_id: &str) {
        if self.store.lock().unwrap().sessions.remove(client_id).is_some() {
            self.connects.lock().unwrap().remove(client_id);
            self.changed();
        }
    }

    fn mark_incomplete(&self, client_id: &str) {
        if let Some(r) = self.store.lock().unwrap().sessions.get_mut(client_id) {
            r.incomplete = true;
        }
        self.changed();
    }

    fn save_if_dirty(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let Some(path) = &self.cfg.state_file else { return };
        let result = self.store.lock().unwrap().save(path);
        if let Err(e) = result {
            warn!("cannot save the persistent-session record: {e}");
        }
    }

    /// The session's home and standby as the record has them, and what meshgate needs to
    /// connect on the client's behalf.
    /// Only the records `pick` accepts are copied: with many sessions, a pass that finds
    /// nothing to do costs a walk over the map and no allocation.
    fn select(&self, pick: impl Fn(&str, &Record) -> bool) -> Vec<(String, Record, Option<Vec<u8>>)> {
        let store = self.store.lock().unwrap();
        let connects = self.connects.lock().unwrap();
        store
            .sessions
            .iter()
            .filter(|(id, r)| pick(id, r))
            .map(|(id, r)| (id.clone(), r.clone(), connects.get(id).cloned()))
            .collect()
    }

    fn holding(&self) -> bool {
        self.held.lock().unwrap().is_some()
    }

    fn set_home(&self, client_id: &str, home: &str) {
        if let Some(r) = self.store.lock().unwrap().sessions.get_mut(client_id) {
            r.home = Some(home.to_string());
            if r.standby.as_deref() == Some(home) {
                r.standby = None;
            }
        }
        self.changed();
    }

    fn set_standby(&self, client_id: &str, standby: Option<&str>) {
        if let Some(r) = self.store.lock().unwrap().sessions.get_mut(client_id) {
            r.standby = standby.map(str::to_string);
            r.standby_stale = false;
        }
        self.changed();
    }

    fn record(&self, client_id: &str) -> Option<Record> {
        self.store.lock().unwrap().sessions.get(client_id).cloned()
    }
}

/// One persistent session's view of its own traffic: its SUBSCRIBE and UNSUBSCRIBE packets
/// wait here for the broker's acknowledgement, which commits them to the record.
pub struct Tap {
    durable: Arc<Durable>,
    client_id: String,
    version: u8,
    up: Capture,
    down: Capture,
    pending: HashMap<u16, Pending>,
}

enum Pending {
    Subscribe(Vec<(String, Sub)>),
    Unsubscribe(Vec<String>),
}

/// Client-side requests awaiting an answer, at most; a client that never reads its SUBACKs
/// cannot grow this.
const MAX_PENDING: usize = 1024;

impl Tap {
    pub fn new(durable: Arc<Durable>, client_id: String, version: u8) -> Tap {
        Tap {
            durable,
            client_id,
            version,
            up: Capture::new(CAPTURE_LIMIT),
            down: Capture::new(CAPTURE_LIMIT),
            pending: HashMap::new(),
        }
    }

    /// Scans forwarded bytes like `FrameScanner::feed`, reading the packets that change the
    /// session's subscriptions. `from_client` says which direction `data` travels.
    pub fn feed(
        &mut self,
        from_client: bool,
        scanner: &mut FrameScanner,
        data: &[u8],
        packets: &mut u64,
    ) -> Result<(), FrameError> {
        let Tap { durable, client_id, version, up, down, pending } = self;
        let version = *version;
        if from_client {
            scanner.feed_capture(
                data,
                // MQTT 5 DISCONNECT can end the session (Session Expiry Interval 0).
                |k| k == kind::SUBSCRIBE || k == kind::UNSUBSCRIBE || (version == 5 && k == kind::DISCONNECT),
                up,
                |_| *packets += 1,
                |h: Header, body| {
                    let Some(body) = body else {
                        durable.mark_incomplete(client_id);
                        return;
                    };
                    if h.kind() == kind::DISCONNECT {
                        if disconnect_expiry(body) == Some(0) {
                            durable.forget(client_id);
                        }
                        return;
                    }
                    if pending.len() >= MAX_PENDING {
                        return;
                    }
                    if h.kind() == kind::SUBSCRIBE {
                        if let Some(s) = parse_subscribe(version, body) {
                            let subs = s
                                .filters
                                .into_iter()
                                .map(|(f, options)| (f, Sub { options, properties: s.properties.clone() }))
                                .collect();
                            pending.insert(s.packet_id, Pending::Subscribe(subs));
                        }
                    } else if let Some(u) = parse_unsubscribe(version, body) {
                        pending.insert(u.packet_id, Pending::Unsubscribe(u.filters));
                    }
                },
            )
        } else {
            scanner.feed_capture(
                data,
                |k| k == kind::SUBACK || k == kind::UNSUBACK,
                down,
                |_| *packets += 1,
                |_h: Header, body| {
                    let Some(ack) = body.and_then(|b| parse_ack(version, b)) else { return };
                    match pending.remove(&ack.packet_id) {
                        Some(Pending::Subscribe(subs)) => {
                            let ok = subs
                                .into_iter()
                                .enumerate()
                                .filter(|(i, _)| ack.codes.get(*i).is_some_and(|&c| granted(c)))
                                .map(|(_, s)| s)
                                .collect();
                            durable.add(client_id, ok);
                        }
                        Some(Pending::Unsubscribe(filters)) => {
                            // 3.x acknowledges without codes; 5 says per filter (0x00 removed,
                            // 0x11 there was none: gone either way).
                            let gone: Vec<String> = filters
                                .into_iter()
                                .enumerate()
                                .filter(|(i, _)| ack.codes.get(*i).is_none_or(|&c| c == 0x00 || c == 0x11))
                                .map(|(_, f)| f)
                                .collect();
                            durable.remove(client_id, &gone);
                        }
                        None => {}
                    }
                },
            )
        }
    }
}

/// A `Tap` as a forwarding direction holds it: both directions share one, within one task,
/// so the lock is never contended (a `RefCell` would make the session future not `Send`).
pub type SharedTap = Mutex<Tap>;

/// Keeps the record on disk, migrates sessions off brokers that became unavailable, and
/// keeps standby copies current. Runs until `stop`.
pub async fn maintain(pool: Arc<Pool>, stop: CancellationToken) {
    if !pool.durable.enabled() {
        return;
    }
    // Standby work (copies, trims) runs beside migration, so a long trim pass never delays
    // moving sessions off a failed broker.
    tokio::join!(migrate_loop(pool.clone(), stop.clone()), standby_loop(pool.clone(), stop.clone()));
}

async fn standby_loop(pool: Arc<Pool>, stop: CancellationToken) {
    if !pool.durable.cfg.standby {
        return;
    }
    loop {
        standby_all(&pool).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn migrate_loop(pool: Arc<Pool>, stop: CancellationToken) {
    let durable = pool.durable.clone();
    // A pass at most every 200 ms however often sessions change, except when a failure holds
    // new sessions: then at once.
    const PACE: Duration = Duration::from_millis(200);
    loop {
        let pass = Instant::now();
        durable.save_if_dirty();
        let expired = durable.store.lock().unwrap().expire(now_ms());
        if expired > 0 {
            debug!(expired, "persistent sessions expired");
            durable.dirty.store(true, Ordering::Relaxed);
            let store = durable.store.lock().unwrap();
            durable.connects.lock().unwrap().retain(|id, _| store.sessions.contains_key(id));
        }
        pool.metrics.durable_sessions.set(durable.count() as i64);
        migrate_all(&pool).await;
        durable.release_new_sessions();
        tokio::select! {
            _ = stop.cancelled() => {
                durable.save_if_dirty();
                return;
            }
            _ = durable.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let rest = PACE.saturating_sub(pass.elapsed());
        if !durable.holding() && !rest.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(rest) => {}
                _ = wait_for_hold(&durable) => {}
            }
        }
    }
}

/// Resolves when a failure starts holding new sessions.
async fn wait_for_hold(durable: &Durable) {
    loop {
        durable.wake.notified().await;
        if durable.holding() {
            return;
        }
    }
}

/// The broker a new client would get now.
fn taker(pool: &Pool) -> Option<Arc<Broker>> {
    pool.current_broker()
}

fn available(pool: &Pool, name: &str) -> bool {
    pool.broker(name).is_some_and(|b| b.available(tokio::time::Instant::now()))
}

async fn migrate_all(pool: &Arc<Pool>) {
    let durable = &pool.durable;
    let Some(target) = taker(pool) else { return };
    let now = tokio::time::Instant::now();
    let lost: Vec<String> = pool.brokers().iter().filter(|b| !b.available(now)).map(|b| b.name.clone()).collect();
    if lost.is_empty() {
        return;
    }
    // A session without subscriptions queues nothing: there is nothing to move.
    let candidates = durable.select(|_, r| {
        !r.subscriptions.is_empty() && r.home.as_ref().is_some_and(|h| *h != target.name && lost.contains(h))
    });
    if candidates.is_empty() {
        return;
    }
    // A client still connected to an unavailable broker is being closed; one connected to an
    // available broker has its session there.
    let live: HashMap<String, String> = pool
        .sessions()
        .iter()
        .filter(|s| !s.is_closing())
        .map(|s| (s.info.client_id.clone(), s.broker.name.clone()))
        .collect();
    let work: Vec<_> =
        candidates.into_iter().filter(|(id, _, _)| live.get(id).is_none_or(|b| lost.contains(b))).collect();
    if work.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let n = work.len();
    let results = for_each_limited(work, |(id, _, _)| {
        let pool = pool.clone();
        let target = target.clone();
        async move { migrate_one(&pool, &id, &target).await }
    })
    .await;
    let ok = results.iter().filter(|r| **r).count();
    info!(
        sessions = n,
        migrated = ok,
        to = %target.name,
        took_ms = started.elapsed().as_millis() as u64,
        "persistent sessions migrated off an unavailable broker"
    );
    pool.events.push(
        "session_migration",
        Some(&target.name),
        format!("{ok} of {n} persistent session(s) recreated on {}", target.name),
    );
}

async fn migrate_one(pool: &Pool, client_id: &str, target: &Broker) -> bool {
    let durable = &pool.durable;
    let _turn = durable.lock(client_id).await;
    // Checked again in our turn: the client may have reconnected meanwhile (and its setup
    // restored the session where it landed).
    let Some(rec) = durable.record(client_id) else { return false };
    if rec.home.as_deref().is_none_or(|h| h == target.name || available(pool, h)) {
        return false;
    }
    if rec.standby.as_deref() == Some(target.name.as_str()) && !rec.standby_stale {
        // The standby copy is current and has queued everything since it was made: it
        // becomes the home as it is (connecting to it would only take its queue).
        durable.set_home(client_id, &target.name);
        pool.metrics.durable_ops.with_label_values(&["migrate", "standby"]).inc();
        return true;
    }
    let own = durable.connects.lock().unwrap().get(client_id).cloned();
    let connect =
        remote::session_connect(own.as_deref(), rec.version, client_id, rec.username.as_deref(), rec.expiry_secs);
    let subs: Vec<_> = rec.subscriptions.into_iter().collect();
    match remote::create_session(pool, target, &connect, rec.version, &subs, OP_LIMIT).await {
        Ok(_) => {
            durable.set_home(client_id, &target.name);
            pool.metrics.durable_ops.with_label_values(&["migrate", "ok"]).inc();
            true
        }
        Err(e) => {
            warn!(client_id, broker = %target.name, "session migration failed: {e}");
            pool.metrics.durable_ops.with_label_values(&["migrate", "error"]).inc();
            false
        }
    }
}

/// The broker that would take a session's client if its home failed now: the best
/// available broker other than `home`, in priority order.
fn standby_for(pool: &Pool, home: &str) -> Option<Arc<Broker>> {
    let now = tokio::time::Instant::now();
    let brokers = pool.brokers();
    brokers.iter().filter(|b| b.name != home && b.available(now)).min_by_key(|b| b.priority()).cloned()
}

async fn standby_all(pool: &Arc<Pool>) {
    let durable = &pool.durable;
    let trim_due = {
        let mut last = durable.last_trim.lock().unwrap();
        let due = last.is_none_or(|t| t.elapsed() >= durable.cfg.standby_trim);
        if due {
            *last = Some(Instant::now());
        }
        due
    };
    // Where each home's standby belongs now, worked out once per pass.
    let want_for: HashMap<String, Arc<Broker>> =
        pool.brokers().iter().filter_map(|b| Some((b.name.clone(), standby_for(pool, &b.name)?))).collect();
    let needs = |r: &Record| -> Option<(Arc<Broker>, bool)> {
        let want = want_for.get(r.home.as_deref()?)?;
        if r.subscriptions.is_empty() {
            return None;
        }
        let make = r.standby.as_deref() != Some(want.name.as_str()) || r.standby_stale;
        let trim = !make && trim_due && r.connected;
        (make || trim).then(|| (want.clone(), make))
    };
    let work: Vec<_> = durable
        .select(|_, r| needs(r).is_some())
        .into_iter()
        .filter_map(|(id, r, own)| {
            let (want, make) = needs(&r)?;
            Some((id, r, own, want, make))
        })
        .collect();
    if work.is_empty() {
        return;
    }
    for_each_limited(work, |(id, r, own, want, make)| {
        let pool = pool.clone();
        async move {
            let durable = &pool.durable;
            let _turn = durable.lock(&id).await;
            // The client's own connection must never be on the broker meshgate connects to.
            let current = durable.record(&id);
            if current.as_ref().and_then(|c| c.home.as_deref()) == Some(want.name.as_str()) {
                return false;
            }
            let connect = remote::session_connect(own.as_deref(), r.version, &id, r.username.as_deref(), r.expiry_secs);
            if make {
                let subs: Vec<_> = r.subscriptions.into_iter().collect();
                match remote::create_session(&pool, &want, &connect, r.version, &subs, OP_LIMIT).await {
                    Ok(_) => {
                        durable.set_standby(&id, Some(&want.name));
                        pool.metrics.durable_ops.with_label_values(&["standby", "ok"]).inc();
                        true
                    }
                    Err(e) => {
                        warn!(client_id = %id, broker = %want.name, "standby copy failed: {e}");
                        pool.metrics.durable_ops.with_label_values(&["standby", "error"]).inc();
                        false
                    }
                }
            } else {
                match remote::trim(&pool, &want, &connect, r.version, Duration::from_millis(50), OP_LIMIT).await {
                    Ok(n) => {
                        pool.metrics.standby_trimmed.inc_by(n);
                        true
                    }
                    Err(e) => {
                        debug!(client_id = %id, broker = %want.name, "standby trim failed: {e}");
                        false
                    }
                }
            }
        }
    })
    .await;
}

/// Runs `f` over `items`, at most `PARALLEL` at once.
async fn for_each_limited<T, F, Fut>(items: Vec<T>, f: F) -> Vec<bool>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use futures_util::stream::{self, StreamExt};
    stream::iter(items.into_iter().map(f)).buffer_unordered(PARALLEL).collect().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::subscribe::encode_subscribe;

    fn durable() -> Arc<Durable> {
        let cfg = crate::Config::from_toml("[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n", "t").unwrap();
        Arc::new(Durable::new(&cfg.sessions))
    }

    fn connect(version: u8, id: &str) -> crate::mqtt::Connect {
        let p = remote::session_connect(None, version, id, None, 600);
        crate::mqtt::connect::parse(&p).unwrap()
    }

    #[test]
    fn only_what_the_broker_granted_is_recorded_and_unsubscribe_removes_it() {
        let d = durable();
        let m = crate::metrics::Metrics::new();
        d.on_established(&connect(4, "c"), &[], "b1", &m);
        let mut tap = Tap::new(d.clone(), "c".into(), 4);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        // Split mid-packet: the capture spans reads.
        let sub = encode_subscribe(4, 5, &[], &[("a/#", 1), ("secret", 1)]);
        tap.feed(true, &mut up, &sub[..4], &mut n).unwrap();
        tap.feed(true, &mut up, &sub[4..], &mut n).unwrap();
        assert_eq!(d.placement("c").unwrap().subscriptions, 0, "nothing before the SUBACK");
        // SUBACK id 5: granted QoS 1, refused 0x80.
        tap.feed(false, &mut down, &[0x90, 0x04, 0, 5, 1, 0x80], &mut n).unwrap();
        assert_eq!(d.to_restore("c"), vec![("a/#".to_string(), Sub { options: 1, properties: vec![] })]);
        // UNSUBSCRIBE id 6 "a/#", UNSUBACK id 6.
        tap.feed(true, &mut up, &[0xa2, 0x07, 0, 6, 0, 3, b'a', b'/', b'#'], &mut n).unwrap();
        tap.feed(false, &mut down, &[0xb0, 0x02, 0, 6], &mut n).unwrap();
        assert!(d.to_restore("c").is_empty());
        assert_eq!(n, 4, "every packet counted");
    }

    #[test]
    fn mqtt5_disconnect_with_expiry_zero_forgets_the_session_and_clean_connect_too() {
        let d = durable();
        let m = crate::metrics::Metrics::new();
        d.on_established(&connect(5, "v5"), &[], "b1", &m);
        let mut tap = Tap::new(d.clone(), "v5".into(), 5);
        let mut up = FrameScanner::new(1 << 20);
        let mut n = 0;
        // DISCONNECT reason 0, session expiry 0.
        tap.feed(true, &mut up, &[0xe0, 0x07, 0, 5, 0x11, 0, 0, 0, 0], &mut n).unwrap();
        assert!(d.placement("v5").is_none());

        d.on_established(&connect(4, "c4"), &[], "b1", &m);
        d.on_connect("c4", true, false);
        assert!(d.placement("c4").is_none(), "a clean 3.1.1 CONNECT ends the old session");
    }
}
