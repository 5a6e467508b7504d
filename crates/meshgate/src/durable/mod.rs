//! Persistent sessions that survive a broker failure: the record of their subscriptions, restoring them on a broker that lacks them, migrating them when their broker fails, and standby copies.
//!
//! A broker's sessions die with it. meshgate sees every SUBSCRIBE and UNSUBSCRIBE of a
//! persistent session and the broker's answer, so it keeps what was acknowledged (`store`) and
//! can rebuild the session elsewhere (`remote`, driven by `upkeep`):
//! - restore: a persistent client that lands on a broker without its session gets its
//!   subscriptions back before its CONNACK, which then says "session present";
//! - migrate: when a session's broker fails (probes down, disabled, removed), the session is
//!   created at once on the broker that now takes new clients, so it queues the client's
//!   messages from then on;
//! - standby (`sessions.standby`): an offline copy on the next broker in priority order, made
//!   ahead of any failure, so with replication on it already holds what was published before
//!   the failure; meshgate empties its queue every `standby_trim` while the client is
//!   connected elsewhere, which bounds what it costs the broker;
//! - wipe: copies that became outdated (a former home or standby) or belong to a session
//!   that ended are removed when their broker is available, before it takes new sessions.
//!
//! Per client id, every one of these and the client's own session setup take turns (`lock`),
//! and meshgate never connects as a client id to a broker where that client is connected.

pub mod remote;
pub mod store;
mod upkeep;

pub use upkeep::maintain;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::config::SessionsConfig;
pub use store::Sub;
use store::{Orphan, Record, Store};

/// Every (op, result) of `meshgate_session_operations_total`.
pub const OPERATIONS: [[&str; 2]; 9] = [
    ["restore", "ok"],
    ["restore", "error"],
    ["migrate", "ok"],
    ["migrate", "standby"],
    ["migrate", "error"],
    ["standby", "ok"],
    ["standby", "error"],
    ["wipe", "ok"],
    ["wipe", "error"],
];

/// Time for one restore, migration, standby or wipe operation on a broker, and the longest a
/// new client session waits while a failure holds new sessions.
const OP_LIMIT: Duration = Duration::from_secs(2);

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

type Locks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Where the record is shared with other instances (`coordination`, through etcd): every
/// change of a session goes out, and the background work on a session runs on one instance
/// only. Without it (one instance) the record is this process's alone.
pub trait Share: Send + Sync {
    /// This instance's name, kept in the records of the sessions connected through it.
    fn instance(&self) -> &str;
    /// A session's record changed (or ended): what this instance holds then is written.
    /// Queued, never waited on.
    fn changed(&self, client_id: &str);
    /// This instance leads replication, and with it the work on sessions nobody is connected to.
    fn leads(&self) -> bool;
    /// The instance is registered (alive) as far as this instance knows.
    fn alive(&self, instance: &str) -> bool;
}

/// A client id's turn; the last one out removes the id's lock, so the map holds only ids
/// someone is working on.
pub struct Turn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    mutex: Arc<tokio::sync::Mutex<()>>,
    client_id: String,
    locks: Locks,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.locks.lock();
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
    locks: Locks,
    dirty: AtomicBool,
    /// Wakes the maintenance loop: a broker's availability or a session changed.
    pub wake: tokio::sync::Notify,
    /// New client sessions wait at this while sessions are moved off a broker that just failed
    /// (or outdated copies are wiped from one that came back), so nothing a publisher is told
    /// was accepted after the change can reach a broker before the sessions that should queue
    /// it are there.
    held: tokio::sync::watch::Sender<bool>,
    /// Counts holds, so a pass that began before a hold does not release it.
    hold_gen: AtomicU64,
    share: std::sync::OnceLock<Arc<dyn Share>>,
}

impl Durable {
    pub fn new(cfg: &SessionsConfig) -> Durable {
        let mut store = match &cfg.state_file {
            Some(path) if cfg.enabled => Store::load(path).unwrap_or_else(|e| {
                warn!("persistent-session record unreadable, starting empty: {e}");
                Store::default()
            }),
            _ => Store::default(),
        };
        // Nobody is connected through a meshgate that has just started; a session whose
        // client was connected until now starts its expiry now, not at its last connect.
        let now = now_ms();
        for r in store.sessions.values_mut() {
            if r.connected {
                r.connected = false;
                r.last_seen_ms = now;
            }
        }
        Durable {
            cfg: cfg.clone(),
            store: Mutex::new(store),
            connects: Mutex::new(HashMap::new()),
            locks: Arc::default(),
            dirty: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            held: tokio::sync::watch::Sender::new(false),
            hold_gen: AtomicU64::new(0),
            share: std::sync::OnceLock::new(),
        }
    }

    /// Shares the record with other instances from now on (set once, at start).
    pub fn share_with(&self, share: Arc<dyn Share>) {
        let _ = self.share.set(share);
    }

    /// Whether this instance does the background work (restore aside, which is the client's
    /// own) on a session: with one instance, always; with several, the instance the client is
    /// connected through, or the leader when the client is connected nowhere (or through an
    /// instance that is gone).
    fn works_on(&self, rec: &Record) -> bool {
        let Some(share) = self.share.get() else { return true };
        match (&rec.instance, rec.connected) {
            (Some(i), true) if share.alive(i) => i == share.instance(),
            _ => share.leads(),
        }
    }

    /// A session's record as another instance wrote it (`None`: ended there). Returns whether
    /// it was taken. A session connected through this instance keeps this instance's record
    /// (it sees the client's packets, and its next write wins), unless the other record is of
    /// a later connection through another instance: the client moved, as a client-id takeover
    /// across instances says too. A record that says the client is connected through this
    /// instance, which this process never saw connect, is a previous life's: taken as
    /// disconnected from now, and shared so.
    pub fn apply_shared(&self, client_id: &str, rec: Option<Record>) -> bool {
        let mine = self.share.get().map(|s| s.instance().to_string());
        let mut store = self.store.lock();
        let here =
            store.sessions.get(client_id).filter(|cur| cur.connected && cur.instance.is_some() && cur.instance == mine);
        if let Some(cur) = here {
            let moved =
                rec.as_ref().is_some_and(|r| r.connected && r.instance != mine && r.last_seen_ms > cur.last_seen_ms);
            if !moved {
                return false;
            }
        }
        let mut reshare = false;
        match rec {
            Some(mut r) => {
                if r.connected && r.instance.is_some() && r.instance == mine {
                    r.connected = false;
                    r.last_seen_ms = now_ms();
                    reshare = true;
                }
                // Full: the record seen longest ago goes, here only (its copies are the
                // business of the instance that works on it).
                if let Some(gone) = store.put_quietly(client_id, r, self.cfg.max_sessions) {
                    self.connects.lock().remove(&gone);
                }
            }
            None => {
                // The instance that ended it took care of its copies.
                if store.sessions.remove(client_id).is_some() {
                    self.connects.lock().remove(client_id);
                }
            }
        }
        drop(store);
        self.dirty.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        if reshare {
            self.share_again(client_id);
        }
        true
    }

    /// Whether this instance's write of the session wins over `theirs` (what etcd holds): the
    /// client is connected through this instance, and `theirs` is not of a later connection
    /// through another one.
    pub fn wins_over(&self, client_id: &str, theirs: Option<&Record>) -> bool {
        let Some(share) = self.share.get() else { return true };
        let store = self.store.lock();
        let Some(cur) = store.sessions.get(client_id) else { return false };
        let here = cur.connected && cur.instance.as_deref() == Some(share.instance());
        let later_elsewhere = theirs.is_some_and(|t| {
            t.connected && t.instance.as_deref() != Some(share.instance()) && t.last_seen_ms > cur.last_seen_ms
        });
        here && !later_elsewhere
    }

    /// The session's record as this instance holds it, as JSON for etcd (`None`: none).
    pub fn record_json(&self, client_id: &str) -> Option<String> {
        let store = self.store.lock();
        store.sessions.get(client_id).map(|r| serde_json::to_string(r).expect("session record serializes"))
    }

    /// Whether the record was ever shared (an instance name is in it since its client
    /// connected under coordination); a record that was not comes from a single instance's
    /// state file.
    pub fn was_shared(&self, client_id: &str) -> bool {
        self.store.lock().sessions.get(client_id).is_some_and(|r| r.instance.is_some())
    }

    /// Whether this instance's record of the session is the one that counts (the client is
    /// connected through this instance).
    pub fn owned_here(&self, client_id: &str) -> bool {
        let Some(share) = self.share.get() else { return true };
        self.store
            .lock()
            .sessions
            .get(client_id)
            .is_some_and(|r| r.connected && r.instance.as_deref() == Some(share.instance()))
    }

    /// Every session with its record, to write them all again (a record read from the state
    /// file that etcd lacks).
    pub fn ids(&self) -> Vec<String> {
        self.store.lock().sessions.keys().cloned().collect()
    }

    /// Shares a session's record again as it is here (etcd lacks it).
    pub fn share_again(&self, client_id: &str) {
        if let Some(share) = self.share.get() {
            share.changed(client_id);
        }
    }

    /// The leader takes over the sessions whose instance is gone: they count as disconnected
    /// from now, so they expire, and migrate when their broker fails.
    pub fn adopt_from_gone_instances(&self) {
        let Some(share) = self.share.get() else { return };
        let now = now_ms();
        let mut ids = Vec::new();
        let mut store = self.store.lock();
        for (id, r) in store.sessions.iter_mut() {
            if r.connected && r.instance.as_deref().is_some_and(|i| i != share.instance() && !share.alive(i)) {
                r.connected = false;
                r.last_seen_ms = now;
                ids.push(id.clone());
            }
        }
        drop(store);
        for id in ids {
            self.changed(&id);
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// The settings it runs with (read at start only).
    pub fn config(&self) -> &SessionsConfig {
        &self.cfg
    }

    /// Runs `f` holding the record's locks (see `Meshgate::panic_holding_shared_locks`).
    #[doc(hidden)]
    pub fn with_locks_held<T>(&self, f: impl FnOnce() -> T) -> T {
        let (_store, _connects, _locks) = (self.store.lock(), self.connects.lock(), self.locks.lock());
        f()
    }

    /// Called the moment `broker` stops taking sessions (`lost`) or takes them again: when
    /// persistent sessions live there (lost) or outdated copies wait to be wiped there (back),
    /// new client sessions wait, at most `OP_LIMIT`, until that work is done.
    pub fn hold_new_sessions(&self, broker: &str, lost: bool) {
        if !self.cfg.enabled {
            return;
        }
        let store = self.store.lock();
        let relevant = if lost {
            store.sessions.values().any(|r| r.home.as_deref() == Some(broker) && !r.subscriptions.is_empty())
        } else {
            store.sessions.values().any(|r| r.stale_copies.iter().any(|b| b == broker))
                || store.orphans.iter().any(|o| o.broker == broker)
        };
        drop(store);
        if !relevant {
            return;
        }
        self.hold_gen.fetch_add(1, Ordering::SeqCst);
        self.held.send_replace(true);
        self.wake.notify_one();
    }

    /// Ends the hold, unless another began after `gen` was read.
    fn release_new_sessions(&self, gen: u64) {
        // The check and the release under one borrow of the channel, so a hold that begins
        // in between is not lost.
        self.held.send_if_modified(|held| {
            let release = *held && self.hold_gen.load(Ordering::SeqCst) == gen;
            if release {
                *held = false;
            }
            release
        });
    }

    fn holding(&self) -> bool {
        *self.held.borrow()
    }

    /// Where a new client session waits while a hold is on.
    pub async fn pass_barrier(&self) {
        if !*self.held.borrow() {
            return;
        }
        let mut rx = self.held.subscribe();
        let _ = tokio::time::timeout(OP_LIMIT, rx.wait_for(|held| !*held)).await;
    }

    /// Takes this client id's turn (see the module comment).
    pub async fn lock(&self, client_id: &str) -> Turn {
        let m = self.locks.lock().entry(client_id.to_string()).or_default().clone();
        let guard = m.clone().lock_owned().await;
        Turn { guard: Some(guard), mutex: m, client_id: client_id.to_string(), locks: self.locks.clone() }
    }

    /// The turn, for background work: gives up after `OP_LIMIT`, so one stuck client cannot
    /// stall the work on every other session.
    async fn try_lock(&self, client_id: &str) -> Option<Turn> {
        tokio::time::timeout(OP_LIMIT, self.lock(client_id)).await.ok()
    }

    /// What only this instance keeps changed (the copies left to wipe).
    fn local_changed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// A session's record changed: saved by the next pass, shared at once.
    fn changed(&self, client_id: &str) {
        self.dirty.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        if let Some(share) = self.share.get() {
            share.changed(client_id);
        }
    }

    /// meshgate keeps a session of this client id, or a copy of one to wipe.
    pub fn knows(&self, client_id: &str) -> bool {
        let store = self.store.lock();
        store.sessions.contains_key(client_id) || store.orphans.iter().any(|o| o.client_id == client_id)
    }

    pub fn placement(&self, client_id: &str) -> Option<Placement> {
        let store = self.store.lock();
        store.sessions.get(client_id).map(|r| Placement {
            home: r.home.clone(),
            standby: r.standby.clone(),
            subscriptions: r.subscriptions.len(),
            incomplete: r.incomplete,
        })
    }

    pub fn list(&self) -> Vec<SessionView> {
        let now = now_ms();
        let store = self.store.lock();
        let mut v: Vec<SessionView> = store
            .sessions
            .iter()
            .map(|(id, r)| SessionView {
                client_id: id.clone(),
                protocol: crate::mqtt::protocol_name(r.version),
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
        self.store.lock().sessions.len()
    }

    /// `broker` accepted a CONNECT of a client id meshgate has a record of (or a persistent
    /// one). A session that is not persistent any more ends the record: its copies elsewhere
    /// become orphans to wipe. A clean start of a persistent session empties it.
    pub fn on_connect(&self, client_id: &str, clean: bool, persistent: bool, broker: &str) {
        if !self.cfg.enabled {
            return;
        }
        let mut store = self.store.lock();
        if !persistent {
            if store.remove(client_id, Some(broker), self.cfg.max_sessions).is_some() {
                drop(store);
                self.connects.lock().remove(client_id);
                self.changed(client_id);
            }
        } else if clean {
            if let Some(r) = store.sessions.get_mut(client_id) {
                r.subscriptions.clear();
                r.incomplete = false;
                r.generation += 1;
                drop(store);
                self.changed(client_id);
            }
        }
    }

    /// Subscriptions to put back when a persistent client landed on a broker without its session.
    pub fn to_restore(&self, client_id: &str) -> Vec<(String, Sub)> {
        let store = self.store.lock();
        store
            .sessions
            .get(client_id)
            .map_or_else(Vec::new, |r| r.subscriptions.iter().map(|(f, s)| (f.clone(), s.clone())).collect())
    }

    /// A persistent client's session is established on `broker`.
    pub fn on_established(&self, connect: &crate::mqtt::Connect, packet: &[u8], broker: &str) {
        if !self.cfg.enabled {
            return;
        }
        let expiry = match connect.version {
            5 => u64::from(connect.session_expiry.unwrap_or(0)).min(self.cfg.expiry.as_secs()),
            _ => self.cfg.expiry.as_secs(),
        };
        let now = now_ms();
        let mut store = self.store.lock();
        let mut rec = store
            .sessions
            .remove(&connect.client_id)
            .unwrap_or_else(|| Record::new(connect.version, connect.username.clone(), expiry, now));
        rec.version = connect.version;
        rec.username = connect.username.clone();
        rec.expiry_secs = expiry;
        rec.connected = true;
        rec.last_seen_ms = now;
        rec.instance = self.share.get().map(|s| s.instance().to_string());
        // Copies of an earlier, ended session of this id are this session's outdated copies now.
        let orphans: Vec<String> =
            store.orphans.iter().filter(|o| o.client_id == connect.client_id).map(|o| o.broker.clone()).collect();
        store.orphans.retain(|o| o.client_id != connect.client_id);
        for b in orphans {
            rec.mark_stale(&b);
        }
        // Where the client is now is its session, whatever copy was there before.
        rec.stale_copies.retain(|b| b != broker);
        if rec.standby.as_deref() == Some(broker) {
            rec.standby = None;
        }
        if let Some(old) = rec.home.replace(broker.to_string()) {
            rec.mark_stale(&old);
        }
        let gone = store.put(&connect.client_id, rec, self.cfg.max_sessions);
        drop(store);
        let mut connects = self.connects.lock();
        if let Some(gone) = gone {
            warn!(client_id = %gone, "persistent-session record full (sessions.max_sessions): forgot the session seen longest ago");
            connects.remove(&gone);
        }
        connects.insert(connect.client_id.clone(), packet.to_vec());
        drop(connects);
        self.changed(&connect.client_id);
    }

    /// A connection of this persistent client id is registered (and so counts as connected).
    pub fn on_registered(&self, client_id: &str) {
        let mine = self.share.get().map(|s| s.instance().to_string());
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            if r.instance == mine {
                r.connected = true;
            }
        }
    }

    /// The last connection of a persistent client id through meshgate ended. With several
    /// instances, only a record of a connection through this one: a client that moved to
    /// another instance is connected there.
    pub fn on_disconnected(&self, client_id: &str) {
        let mine = self.share.get().map(|s| s.instance().to_string());
        let mut store = self.store.lock();
        if let Some(r) = store.sessions.get_mut(client_id).filter(|r| r.instance == mine) {
            r.connected = false;
            r.last_seen_ms = now_ms();
            drop(store);
            self.changed(client_id);
        }
    }

    pub(crate) fn add(&self, client_id: &str, subs: Vec<(String, Sub)>) {
        let mut store = self.store.lock();
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
        r.generation += 1;
        drop(store);
        self.changed(client_id);
    }

    pub(crate) fn remove(&self, client_id: &str, filters: &[String]) {
        let mut store = self.store.lock();
        let Some(r) = store.sessions.get_mut(client_id) else { return };
        for f in filters {
            r.subscriptions.remove(f);
        }
        r.generation += 1;
        drop(store);
        self.changed(client_id);
    }

    /// The client ended its session (MQTT 5 DISCONNECT with session expiry 0) on `broker`,
    /// which ends it there; copies elsewhere become orphans.
    pub(crate) fn forget(&self, client_id: &str, broker: &str) {
        let removed = self.store.lock().remove(client_id, Some(broker), self.cfg.max_sessions).is_some();
        if removed {
            self.connects.lock().remove(client_id);
            self.changed(client_id);
        }
    }

    pub(crate) fn mark_incomplete(&self, client_id: &str) {
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            r.incomplete = true;
        }
        self.changed(client_id);
    }

    /// Serialised under the lock, written outside it on a blocking thread, so a large record
    /// holds neither the sessions nor a runtime worker while it goes to disk.
    async fn save_if_dirty(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let Some(path) = self.cfg.state_file.clone() else { return };
        let text = serde_json::to_string(&*self.store.lock());
        let result = match text {
            Ok(text) => tokio::task::spawn_blocking(move || crate::statefile::write(&path, text))
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            warn!("cannot save the persistent-session record: {e}");
        }
    }

    /// Forgets expired sessions (and what meshgate held for them); returns how many.
    fn expire(&self) -> usize {
        let mut store = self.store.lock();
        let now = now_ms();
        // Every instance expires its copy on the same clock; the one that works on a session
        // removes it from the shared record.
        let shared: Vec<String> = match self.share.get() {
            Some(_) => store
                .sessions
                .iter()
                .filter(|(_, r)| r.expired(now) && self.works_on(r))
                .map(|(id, _)| id.clone())
                .collect(),
            None => Vec::new(),
        };
        let n = store.expire(now);
        if n > 0 {
            self.connects.lock().retain(|id, _| store.sessions.contains_key(id));
            self.dirty.store(true, Ordering::Relaxed);
        }
        drop(store);
        if let Some(share) = self.share.get() {
            for id in shared {
                share.changed(&id);
            }
        }
        // Turns whose waiter gave up (a cancelled `lock`) leave an entry nobody holds.
        self.locks.lock().retain(|_, m| Arc::strong_count(m) > 1);
        n
    }

    /// Only the records `pick` accepts are copied: with many sessions, a pass that finds
    /// nothing to do costs a walk over the map and no allocation.
    /// Only sessions this instance works on (`works_on`) are offered.
    fn select(&self, pick: impl Fn(&str, &Record) -> bool) -> Vec<(String, Record)> {
        let store = self.store.lock();
        store
            .sessions
            .iter()
            .filter(|(id, r)| pick(id, r) && self.works_on(r))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    fn orphans(&self, pick: impl Fn(&Orphan) -> bool) -> Vec<Orphan> {
        self.store.lock().orphans.iter().filter(|o| pick(o)).cloned().collect()
    }

    fn record(&self, client_id: &str) -> Option<Record> {
        self.store.lock().sessions.get(client_id).cloned()
    }

    /// The client's own last CONNECT, if meshgate has seen one since it started.
    fn own_connect(&self, client_id: &str) -> Option<Vec<u8>> {
        self.connects.lock().get(client_id).cloned()
    }

    /// The session was recreated on `home` (migration, or a standby copy taking over).
    fn set_home(&self, client_id: &str, home: &str) {
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            r.stale_copies.retain(|b| b != home);
            if r.standby.as_deref() == Some(home) {
                r.standby = None;
            }
            if let Some(old) = r.home.replace(home.to_string()) {
                r.mark_stale(&old);
            }
        }
        self.changed(client_id);
    }

    /// A standby copy made on `standby` from the subscriptions of `generation`.
    fn set_standby(&self, client_id: &str, standby: &str, generation: u64) {
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            r.stale_copies.retain(|b| b != standby);
            if let Some(old) = r.standby.replace(standby.to_string()) {
                r.mark_stale(&old);
            }
            r.standby_generation = generation;
        }
        self.changed(client_id);
    }

    /// The standby copy is not what it should be (its broker lost it): make it again.
    fn standby_lost(&self, client_id: &str) {
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            r.standby_generation = u64::MAX;
        }
        self.changed(client_id);
    }

    fn copy_wiped(&self, client_id: &str, broker: &str) {
        if let Some(r) = self.store.lock().sessions.get_mut(client_id) {
            r.stale_copies.retain(|b| b != broker);
        }
        self.changed(client_id);
    }

    fn orphan_listed(&self, orphan: &Orphan) -> bool {
        let store = self.store.lock();
        store.orphans.contains(orphan) && !store.sessions.contains_key(&orphan.client_id)
    }

    fn orphan_done(&self, orphan: &Orphan) {
        self.store.lock().orphans.retain(|o| o != orphan);
        self.local_changed();
    }
}

/// How the pool's changes reach the session engine (wired in `lib.rs`).
impl crate::pool::Hooks for Durable {
    fn broker_changed(&self, broker: &str, lost: bool) {
        self.hold_new_sessions(broker, lost);
    }
    fn wake(&self) {
        self.wake.notify_one();
    }
    fn client_registered(&self, client_id: &str) {
        self.on_registered(client_id);
    }
    fn client_gone(&self, client_id: &str) {
        self.on_disconnected(client_id);
    }
}

/// Fixtures for unit tests here and in the modules that feed the record.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A session engine with the default settings and one broker, b1.
    pub(crate) fn durable() -> Arc<Durable> {
        let cfg = crate::Config::from_toml("[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n", "t").unwrap();
        Arc::new(Durable::new(&cfg.sessions))
    }

    /// A persistent session's CONNECT, parsed.
    pub(crate) fn connect(version: u8, id: &str) -> crate::mqtt::Connect {
        let p = remote::session_connect(None, version, id, None, 600);
        crate::mqtt::connect::parse(&p).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{connect, durable};
    use super::*;

    #[test]
    fn a_returning_client_takes_over_the_copies_of_its_ended_session() {
        let d = durable();
        d.on_established(&connect(4, "c"), &[], "b1");
        // A clean CONNECT through b2 ends the session; its copy on b1 is an orphan ...
        d.on_connect("c", true, false, "b2");
        assert_eq!(d.store.lock().orphans.len(), 1);
        assert!(d.knows("c"), "the orphan makes the id's setup take its turn");
        // ... until the client is persistent again, on b2: then b1 holds an outdated copy of
        // this session, which a wipe checks against the record.
        d.on_established(&connect(4, "c"), &[], "b2");
        let store = d.store.lock();
        assert!(store.orphans.is_empty());
        assert_eq!(store.sessions["c"].stale_copies, vec!["b1".to_string()]);
        assert_eq!(store.sessions["c"].home.as_deref(), Some("b2"));
    }

    /// Another instance's view, as `coordination` gives it.
    struct Peer {
        leads: AtomicBool,
        shared: Mutex<Vec<String>>,
    }

    impl Share for Peer {
        fn instance(&self) -> &str {
            "a"
        }
        fn changed(&self, client_id: &str) {
            self.shared.lock().push(client_id.to_string());
        }
        fn leads(&self) -> bool {
            self.leads.load(Ordering::SeqCst)
        }
        fn alive(&self, instance: &str) -> bool {
            instance != "gone"
        }
    }

    #[test]
    fn shared_records_are_worked_on_by_one_instance_and_a_connected_clients_record_stays_its_own() {
        let d = durable();
        let peer = Arc::new(Peer { leads: AtomicBool::new(false), shared: Mutex::default() });
        d.share_with(peer.clone());
        d.on_established(&connect(4, "here"), &[], "b1");
        assert_eq!(d.record("here").unwrap().instance.as_deref(), Some("a"));
        assert_eq!(peer.shared.lock().last().map(String::as_str), Some("here"), "every change goes out");
        // Another instance's write does not replace the record of a client connected here.
        let mut theirs = Record::new(4, None, 60, 0);
        theirs.instance = Some("b".into());
        theirs.connected = true;
        d.apply_shared("here", Some(theirs.clone()));
        assert_eq!(d.record("here").unwrap().instance.as_deref(), Some("a"));
        assert!(d.owned_here("here"));
        // A client connected through b: b works on it, not this instance, leader or not.
        d.apply_shared("there", Some(theirs.clone()));
        assert!(!d.owned_here("there"));
        peer.leads.store(true, Ordering::SeqCst);
        assert!(d.select(|id, _| id == "there").is_empty());
        // Connected nowhere (or through an instance that is gone): the leader's.
        let mut gone = theirs.clone();
        gone.instance = Some("gone".into());
        d.apply_shared("orphaned", Some(gone));
        assert_eq!(d.select(|id, _| id == "orphaned").len(), 1);
        peer.leads.store(false, Ordering::SeqCst);
        assert!(d.select(|id, _| id == "orphaned").is_empty());
        // The leader counts it as disconnected from now, so it expires.
        peer.leads.store(true, Ordering::SeqCst);
        d.adopt_from_gone_instances();
        assert!(!d.record("orphaned").unwrap().connected);
        // Ended elsewhere: gone here too, with no copies left to wipe (the other instance's job).
        d.apply_shared("there", None);
        assert!(d.record("there").is_none() && d.store.lock().orphans.is_empty());

        // A later connection through b takes the record over (the client moved); this
        // instance's end of the old connection then writes nothing over it.
        let mut moved = d.record("here").unwrap();
        moved.instance = Some("b".into());
        moved.last_seen_ms += 1;
        assert!(!d.wins_over("here", Some(&moved)));
        assert!(d.apply_shared("here", Some(moved)));
        let before = peer.shared.lock().len();
        d.on_disconnected("here");
        assert!(d.record("here").unwrap().connected, "still connected, through b");
        assert_eq!(peer.shared.lock().len(), before, "nothing written for b's client");

        // A record connected through this instance that this process never saw connect is a
        // previous life's: disconnected from now, and written so.
        let mut zombie = Record::new(4, None, 60, 0);
        zombie.instance = Some("a".into());
        zombie.connected = true;
        assert!(d.apply_shared("zombie", Some(zombie)));
        let z = d.record("zombie").unwrap();
        assert!(!z.connected && z.last_seen_ms > 0);
        assert_eq!(peer.shared.lock().last().map(String::as_str), Some("zombie"));
    }

    #[test]
    fn another_instances_record_evicts_without_leaving_copies_to_wipe() {
        let cfg = crate::Config::from_toml(
            "[sessions]\nmax_sessions = 1\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        let d = Durable::new(&cfg.sessions);
        let mut one = Record::new(4, None, 60, 0);
        one.home = Some("b1".into());
        d.apply_shared("one", Some(one.clone()));
        d.apply_shared("two", Some(one));
        assert!(d.record("one").is_none() && d.record("two").is_some());
        assert!(d.store.lock().orphans.is_empty());
    }

    #[test]
    fn holds_end_only_with_the_pass_that_saw_them() {
        let d = durable();
        d.on_established(&connect(4, "c"), &[], "b1");
        d.add("c", vec![("a".into(), Sub { options: 1, properties: vec![] })]);
        let gen = d.hold_gen.load(Ordering::SeqCst);
        d.hold_new_sessions("b1", true);
        assert!(d.holding());
        // A pass that began before the hold does not end it.
        d.release_new_sessions(gen);
        assert!(d.holding());
        d.release_new_sessions(d.hold_gen.load(Ordering::SeqCst));
        assert!(!d.holding());
        // Nothing lives on b2: no hold.
        d.hold_new_sessions("b2", true);
        assert!(!d.holding());
    }

    #[test]
    fn mqtt5_disconnect_with_expiry_zero_forgets_the_session_and_clean_connect_too() {
        let d = durable();
        d.on_established(&connect(5, "v5"), &[], "b1");
        // What an MQTT 5 DISCONNECT with session expiry 0 does (proxy::track reads it).
        d.forget("v5", "b1");
        assert!(d.placement("v5").is_none());

        d.on_established(&connect(4, "c4"), &[], "b1");
        d.on_connect("c4", true, false, "b1");
        assert!(d.placement("c4").is_none(), "a clean 3.1.1 CONNECT ends the old session");
        assert!(d.store.lock().orphans.is_empty(), "its only copy was on b1, where it connected clean");
    }
}
