//! The background work on persistent sessions: saving and expiring the record, migrating sessions off failed brokers, wiping outdated copies, making standby copies and trimming them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{remote, Durable, OP_LIMIT};
use crate::pool::{AdminState, Broker, Pool};
use crate::upstream::Upstream;

/// What the background work reaches: the brokers and their sessions, the record, and the way
/// to the brokers.
struct Work {
    pool: Arc<Pool>,
    durable: Arc<Durable>,
    upstream: Arc<Upstream>,
}

/// Migrations, copies and wipes run at most this many at once.
const PARALLEL: usize = 32;
/// However often sessions change, a pass at most this often, except when a hold is on.
const PACE: Duration = Duration::from_millis(200);

/// Runs until `stop`: the record kept on disk and current, sessions moved off failed brokers
/// and outdated copies wiped (one loop, which holds new sessions while it works), and standby
/// copies (another, so a long trim pass never delays a migration).
pub async fn maintain(pool: Arc<Pool>, durable: Arc<Durable>, upstream: Arc<Upstream>, stop: CancellationToken) {
    let w = Arc::new(Work { pool, durable, upstream });
    if !w.durable.enabled() {
        return;
    }
    tokio::join!(reconcile_loop(w.clone(), stop.clone()), standby_loop(w.clone(), stop.clone()));
}

async fn reconcile_loop(w: Arc<Work>, stop: CancellationToken) {
    let durable = w.durable.clone();
    loop {
        let pass = Instant::now();
        let gen = durable.hold_gen.load(std::sync::atomic::Ordering::SeqCst);
        durable.save_if_dirty().await;
        let expired = durable.expire();
        if expired > 0 {
            debug!(expired, "persistent sessions expired");
        }
        w.pool.metrics.durable_sessions.set(durable.count() as i64);
        migrate_all(&w).await;
        wipe_all(&w).await;
        durable.release_new_sessions(gen);
        tokio::select! {
            _ = stop.cancelled() => {
                durable.save_if_dirty().await;
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

/// A broker whose sessions are gone for its clients: probes say down, an admin disabled it,
/// or it left the configuration. (Draining, full or passively barred brokers still serve the
/// sessions they have; their clients' sessions are restored wherever they land.)
fn lost(w: &Work, name: &str) -> bool {
    match w.pool.broker(name) {
        None => true,
        Some(b) => b.probe_up() == Some(false) || b.admin() == AdminState::Disabled || b.is_removed(),
    }
}

fn available(w: &Work, name: &str) -> bool {
    w.pool.broker(name).is_some_and(|b| b.available(tokio::time::Instant::now()))
}

async fn migrate_all(w: &Arc<Work>) {
    let durable = &w.durable;
    let Some(target) = w.pool.current_broker() else { return };
    // A session without subscriptions queues nothing: there is nothing to move.
    let work = durable
        .select(|_, r| !r.subscriptions.is_empty() && r.home.as_ref().is_some_and(|h| *h != target.name && lost(w, h)));
    if work.is_empty() {
        return;
    }
    let started = Instant::now();
    let n = work.len();
    let results = for_each_limited(work, |(id, _)| {
        let w = w.clone();
        let target = target.clone();
        async move { migrate_one(&w, &id, &target).await }
    })
    .await;
    let ok = results.iter().filter(|r| **r).count();
    info!(
        sessions = n,
        migrated = ok,
        to = %target.name,
        took_ms = started.elapsed().as_millis() as u64,
        "persistent sessions migrated off a failed broker"
    );
    w.pool.events.push(
        "session_migration",
        Some(&target.name),
        format!("{ok} of {n} persistent session(s) recreated on {}", target.name),
    );
}

async fn migrate_one(w: &Work, client_id: &str, target: &Broker) -> bool {
    let durable = &w.durable;
    let Some(_turn) = durable.try_lock(client_id).await else { return false };
    // Checked again in our turn: the client may have reconnected meanwhile (and its setup
    // restored the session where it landed).
    let Some(rec) = durable.record(client_id) else { return false };
    if rec.home.as_deref().is_none_or(|h| h == target.name || !lost(w, h)) {
        return false;
    }
    // A client still connected to a broker that has not failed keeps its session there.
    if w.pool.live_brokers(client_id).iter().any(|b| !lost(w, b)) {
        return false;
    }
    if rec.standby.as_deref() == Some(target.name.as_str()) && !rec.standby_stale() {
        // The standby copy is current and has queued everything since it was made: it
        // becomes the home as it is (connecting to it would only take its queue).
        durable.set_home(client_id, &target.name);
        w.pool.metrics.durable_ops.with_label_values(&["migrate", "standby"]).inc();
        return true;
    }
    let connect = session_connect(durable, client_id, &rec);
    let subs: Vec<_> = rec.subscriptions.into_iter().collect();
    match remote::create_session(&w.upstream, &target.config(), &connect, rec.version, &subs, OP_LIMIT).await {
        Ok(_) => {
            durable.set_home(client_id, &target.name);
            w.pool.metrics.durable_ops.with_label_values(&["migrate", "ok"]).inc();
            true
        }
        Err(e) => {
            warn!(client_id, broker = %target.name, "session migration failed: {e}");
            w.pool.metrics.durable_ops.with_label_values(&["migrate", "error"]).inc();
            false
        }
    }
}

/// Removes outdated copies (a former home or standby) and orphans (copies of sessions that
/// ended) from brokers that are available, so none of them queues for nobody or answers a
/// returning client "session present" with what it held before.
/// One copy to wipe: client id, broker, protocol level, username, and the orphan entry when
/// the session itself is gone.
type Wipe = (String, String, u8, Option<String>, Option<super::Orphan>);

async fn wipe_all(w: &Arc<Work>) {
    let durable = &w.durable;
    let mut work: Vec<Wipe> = Vec::new();
    for (id, r) in durable.select(|_, r| r.stale_copies.iter().any(|b| available(w, b))) {
        for b in r.stale_copies.iter().filter(|b| available(w, b)) {
            work.push((id.clone(), b.clone(), r.version, r.username.clone(), None));
        }
    }
    for o in durable.orphans(|o| available(w, &o.broker)) {
        work.push((o.client_id.clone(), o.broker.clone(), o.version, o.username.clone(), Some(o)));
    }
    if work.is_empty() {
        return;
    }
    let n = work.len();
    let results = for_each_limited(work, |(id, broker, version, username, orphan)| {
        let w = w.clone();
        async move {
            let durable = &w.durable;
            let Some(_turn) = durable.try_lock(&id).await else { return false };
            let Some(b) = w.pool.broker(&broker) else { return false };
            // Checked again in our turn: the session may have changed meanwhile.
            let still = match &orphan {
                Some(o) => durable.orphan_listed(o),
                None => durable.record(&id).is_some_and(|r| {
                    r.stale_copies.contains(&broker)
                        && r.home.as_deref() != Some(broker.as_str())
                        && r.standby.as_deref() != Some(broker.as_str())
                }),
            };
            if !still {
                return false;
            }
            let live_there = w.pool.live_brokers(&id).contains(&broker);
            let done = if live_there && orphan.is_some() {
                // The client connected there clean: that ended the old session.
                true
            } else if live_there {
                // A connection that is about to be closed (a duplicate): try again later.
                return false;
            } else {
                let own = durable.own_connect(&id);
                let connect = remote::wipe_connect(own.as_deref(), version, &id, username.as_deref());
                match remote::wipe(&w.upstream, &b.config(), &connect, version, OP_LIMIT).await {
                    Ok(()) => true,
                    Err(e) => {
                        debug!(client_id = %id, broker = %broker, "wiping an outdated session copy failed: {e}");
                        false
                    }
                }
            };
            if done {
                match &orphan {
                    Some(o) => durable.orphan_done(o),
                    None => durable.copy_wiped(&id, &broker),
                }
                w.pool.metrics.durable_ops.with_label_values(&["wipe", "ok"]).inc();
            } else {
                w.pool.metrics.durable_ops.with_label_values(&["wipe", "error"]).inc();
            }
            done
        }
    })
    .await;
    let ok = results.iter().filter(|r| **r).count();
    debug!(copies = n, wiped = ok, "outdated session copies wiped");
}

async fn standby_loop(w: Arc<Work>, stop: CancellationToken) {
    if !w.durable.cfg.standby {
        return;
    }
    let trim_every = w.durable.cfg.standby_trim;
    let mut last_trim: Option<Instant> = None;
    loop {
        let trim_due = last_trim.is_none_or(|t| t.elapsed() >= trim_every);
        if trim_due {
            last_trim = Some(Instant::now());
        }
        standby_all(&w, trim_due).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The broker that would take a session's client if its home failed now: the best
/// available broker other than `home`, in priority order.
fn standby_for(w: &Work, home: &str) -> Option<Arc<Broker>> {
    let now = tokio::time::Instant::now();
    let brokers = w.pool.brokers();
    brokers.iter().filter(|b| b.name != home && b.available(now)).min_by_key(|b| b.priority()).cloned()
}

/// Makes the standby copies that are missing or stale, and with `trim_due` empties the
/// current ones of sessions whose clients are connected.
async fn standby_all(w: &Arc<Work>, trim_due: bool) {
    let durable = &w.durable;
    // Where each home's standby belongs now, worked out once per pass.
    let want_for: HashMap<String, Arc<Broker>> =
        w.pool.brokers().iter().filter_map(|b| Some((b.name.clone(), standby_for(w, &b.name)?))).collect();
    let needs = |r: &super::Record| -> Option<(Arc<Broker>, bool)> {
        let home = r.home.as_deref()?;
        let want = want_for.get(home)?;
        if r.subscriptions.is_empty() || lost(w, home) {
            return None;
        }
        let make = r.standby.as_deref() != Some(want.name.as_str()) || r.standby_stale();
        let trim = !make && trim_due && r.connected;
        (make || trim).then(|| (want.clone(), make))
    };
    let work: Vec<_> = durable
        .select(|_, r| needs(r).is_some())
        .into_iter()
        .filter_map(|(id, r)| {
            let (want, make) = needs(&r)?;
            Some((id, want, make))
        })
        .collect();
    if work.is_empty() {
        return;
    }
    for_each_limited(work, |(id, want, make)| {
        let w = w.clone();
        async move { standby_one(&w, &id, &want, make).await }
    })
    .await;
}

async fn standby_one(w: &Work, id: &str, want: &Broker, make: bool) -> bool {
    let durable = &w.durable;
    let Some(_turn) = durable.try_lock(id).await else { return false };
    // Read again in our turn: the subscriptions copied are the ones the generation names.
    let Some(r) = durable.record(id) else { return false };
    if r.home.as_deref() == Some(want.name.as_str()) || w.pool.live_brokers(id).contains(&want.name) {
        // Never connect as the client where the client is.
        return false;
    }
    let connect = session_connect(durable, id, &r);
    if make {
        let generation = r.generation;
        let subs: Vec<_> = r.subscriptions.into_iter().collect();
        match remote::create_session(&w.upstream, &want.config(), &connect, r.version, &subs, OP_LIMIT).await {
            Ok(_) => {
                durable.set_standby(id, &want.name, generation);
                w.pool.metrics.durable_ops.with_label_values(&["standby", "ok"]).inc();
                true
            }
            Err(e) => {
                warn!(client_id = %id, broker = %want.name, "standby copy failed: {e}");
                w.pool.metrics.durable_ops.with_label_values(&["standby", "error"]).inc();
                false
            }
        }
    } else {
        match remote::trim(&w.upstream, &want.config(), &connect, r.version, Duration::from_millis(50), OP_LIMIT).await
        {
            Ok((taken, present)) => {
                w.pool.metrics.standby_trimmed.inc_by(taken);
                if !present {
                    // The broker lost the copy (restarted): the trim left an empty session.
                    durable.standby_lost(id);
                }
                true
            }
            Err(e) => {
                debug!(client_id = %id, broker = %want.name, "standby trim failed: {e}");
                false
            }
        }
    }
}

/// The CONNECT meshgate sends as this session's client (`remote::session_connect`).
fn session_connect(durable: &Durable, client_id: &str, r: &super::Record) -> Vec<u8> {
    let own = durable.own_connect(client_id);
    remote::session_connect(own.as_deref(), r.version, client_id, r.username.as_deref(), r.expiry_secs)
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
