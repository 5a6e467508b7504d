//! Fast tests of broker selection (`Pool::pick`) and of which sessions the rebalancer moves
//! (`Pool::next_to_move`): tiers, weights, `max_conns`, admin states, passive bars, probe
//! state and the nginx-like fallback, on pools built from config text, with no network.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{AdminState, Broker, Health, Lease, Pool, Registered, SessionInfo};
use crate::Config;

/// One `[[broker]]` table; `extra` holds further `key = value` lines.
fn broker(name: &str, port: u16, extra: &str) -> String {
    format!("[[broker]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n{extra}\n")
}

fn pool(text: &str) -> Arc<Pool> {
    Arc::new(Pool::new(&Config::from_toml(text, "pool-test").unwrap()))
}

/// Sets a broker's probe state as the checker would.
fn probe(pool: &Pool, name: &str, up: Option<bool>) {
    pool.broker(name).unwrap().set_health(Health {
        up,
        since: SystemTime::now(),
        last: None,
        history: Default::default(),
    });
}

fn picked(pool: &Pool) -> Option<String> {
    pool.pick(&[]).map(|l| l.broker().name.clone())
}

/// Reserves `n` places one after the other, keeping every lease; the brokers they went to.
fn reserve(pool: &Pool, n: usize, leases: &mut Vec<Lease>) -> Vec<String> {
    (0..n)
        .map(|_| {
            let l = pool.pick(&[]).expect("a broker");
            let name = l.broker().name.clone();
            leases.push(l);
            name
        })
        .collect()
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

fn info(client_id: &str) -> SessionInfo {
    SessionInfo::for_test(client_id)
}

/// Registers `n` sessions wherever `pick` puts them, with client ids `{prefix}{i}`.
fn register(pool: &Arc<Pool>, prefix: &str, n: usize) -> Vec<Registered> {
    (0..n).map(|i| pool.register(pool.pick(&[]).expect("a broker"), info(&format!("{prefix}{i}")))).collect()
}

fn moved(pool: &Pool) -> Option<(u64, String, &'static str)> {
    pool.next_to_move().map(|(s, why)| (s.id, s.broker.name.clone(), why))
}

// ---- pick: tiers ---------------------------------------------------------

#[test]
fn the_primary_tier_takes_every_session_while_it_is_available() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 2")));
    let mut leases = Vec::new();
    let names = reserve(&p, 20, &mut leases);
    assert_eq!(count(&names, "a"), 20, "{names:?}");
    assert_eq!(p.broker("a").unwrap().active_sessions(), 20);
    assert_eq!(p.broker("b").unwrap().active_sessions(), 0);
}

#[test]
fn a_lower_tier_is_used_only_when_the_whole_tier_above_is_out() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1") + &broker("c", 3, "priority = 2")));
    probe(&p, "a", Some(false));
    assert_eq!(picked(&p).as_deref(), Some("b"), "b is left in tier 1");
    probe(&p, "b", Some(false));
    assert_eq!(picked(&p).as_deref(), Some("c"));
    probe(&p, "a", Some(true));
    assert_eq!(picked(&p).as_deref(), Some("a"), "back to tier 1 as soon as one of it is up");
}

#[test]
fn unprobed_brokers_are_available_and_probe_down_ones_are_not() {
    let p = pool(&(broker("a", 1, "") + &broker("b", 2, "")));
    assert_eq!(p.broker("a").unwrap().probe_up(), None);
    assert_eq!(picked(&p).as_deref(), Some("a"), "not probed yet counts as up");
    probe(&p, "a", Some(false));
    assert_eq!(picked(&p).as_deref(), Some("b"));
    probe(&p, "a", Some(true));
    assert_eq!(picked(&p).as_deref(), Some("a"));
}

#[test]
fn tried_brokers_are_skipped() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1") + &broker("c", 3, "priority = 2")));
    let a = p.broker("a").unwrap();
    let b = p.broker("b").unwrap();
    assert_eq!(p.pick(std::slice::from_ref(&a)).unwrap().broker().name, "b");
    assert_eq!(p.pick(&[a.clone(), b.clone()]).unwrap().broker().name, "c");
    assert!(p.pick(&p.brokers()).is_none(), "every broker tried");
}

// ---- pick: weights and max_conns -----------------------------------------

#[test]
fn ties_go_to_the_broker_listed_first_then_alternate() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1")));
    let mut leases = Vec::new();
    assert_eq!(reserve(&p, 6, &mut leases), ["a", "b", "a", "b", "a", "b"]);
}

#[test]
fn weights_share_a_tier_by_sessions_per_unit_of_weight() {
    let p = pool(&(broker("a", 1, "weight = 3\npriority = 1") + &broker("b", 2, "weight = 1\npriority = 1")));
    let mut leases = Vec::new();
    let first = reserve(&p, 4, &mut leases);
    assert_eq!((count(&first, "a"), count(&first, "b")), (3, 1), "{first:?}");
    let rest = reserve(&p, 396, &mut leases);
    assert_eq!((count(&rest, "a"), count(&rest, "b")), (297, 99));
    assert_eq!(p.broker("a").unwrap().active_sessions(), 300);
    assert_eq!(p.broker("b").unwrap().active_sessions(), 100);
}

#[test]
fn weights_balance_against_sessions_already_there() {
    // b is emptier: it takes sessions until the per-weight load is even again.
    let p = pool(&(broker("a", 1, "weight = 1\npriority = 1") + &broker("b", 2, "weight = 2\npriority = 1")));
    let mut leases = Vec::new();
    let a = p.broker("a").unwrap();
    let b = p.broker("b").unwrap();
    for _ in 0..4 {
        leases.push(p.pick(std::slice::from_ref(&b)).unwrap());
    }
    assert_eq!(a.active_sessions(), 4);
    let names = reserve(&p, 8, &mut leases);
    assert_eq!(count(&names, "b"), 8, "b needs 8 to reach 4 per unit of weight: {names:?}");
    let names = reserve(&p, 3, &mut leases);
    assert_eq!(names, ["a", "b", "b"], "then 1:2 again, ties to the first listed");
}

#[test]
fn dropping_a_lease_gives_its_place_back() {
    let p = pool(&broker("a", 1, ""));
    let a = p.broker("a").unwrap();
    let l1 = p.pick(&[]).unwrap();
    let l2 = p.pick(&[]).unwrap();
    assert_eq!(a.active_sessions(), 2);
    drop(l1);
    assert_eq!(a.active_sessions(), 1);
    let s = p.register(l2, info("c1"));
    assert_eq!((a.active_sessions(), a.total_sessions(), p.session_count()), (1, 1, 1), "the lease became the session");
    drop(s);
    assert_eq!((a.active_sessions(), p.session_count()), (0, 0));
}

#[test]
fn a_full_broker_is_skipped_until_a_place_frees() {
    let p = pool(&(broker("a", 1, "max_conns = 2\npriority = 1") + &broker("b", 2, "priority = 2")));
    let mut leases = Vec::new();
    assert_eq!(reserve(&p, 4, &mut leases), ["a", "a", "b", "b"]);
    assert!(!p.broker("a").unwrap().available(tokio::time::Instant::now()));
    assert_eq!(p.broker("a").unwrap().state(tokio::time::Instant::now()).1, "full: max_conns reached");
    leases.remove(0);
    assert_eq!(picked(&p).as_deref(), Some("a"), "one place free again");
}

#[test]
fn a_full_broker_leaves_its_tier_to_its_peers() {
    // Within a tier a full broker leaves the rest of the tier to its peers.
    let p = pool(&(broker("a", 1, "max_conns = 1\npriority = 1") + &broker("b", 2, "priority = 1")));
    let mut leases = Vec::new();
    assert_eq!(reserve(&p, 5, &mut leases), ["a", "b", "b", "b", "b"]);
}

#[test]
fn full_brokers_are_no_fallback() {
    let p = pool(&(broker("a", 1, "max_conns = 1") + &broker("b", 2, "max_conns = 1")));
    let mut leases = Vec::new();
    assert_eq!(reserve(&p, 2, &mut leases), ["a", "b"]);
    assert!(p.pick(&[]).is_none(), "a full pool refuses rather than overfill");
    probe(&p, "a", Some(false));
    assert!(p.pick(&[]).is_none(), "not even in the fallback");
}

// ---- pick: admin states --------------------------------------------------

#[test]
fn a_broker_disabled_in_the_config_is_skipped_even_as_fallback() {
    let p = pool(&(broker("a", 1, "enabled = false") + &broker("b", 2, "")));
    assert_eq!(p.broker("a").unwrap().admin(), AdminState::Disabled);
    assert_eq!(picked(&p).as_deref(), Some("b"), "b is a lower tier but a is disabled");
    probe(&p, "b", Some(false));
    assert_eq!(picked(&p).as_deref(), Some("b"), "fallback: probe-down but enabled beats disabled");
    p.set_admin("b", AdminState::Disabled).unwrap();
    assert_eq!(picked(&p), None);
    p.set_admin("a", AdminState::Enabled).unwrap();
    assert_eq!(picked(&p).as_deref(), Some("a"));
}

#[test]
fn a_draining_broker_takes_no_new_sessions_even_as_fallback() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 2")));
    p.set_admin("a", AdminState::Draining).unwrap();
    assert_eq!(picked(&p).as_deref(), Some("b"));
    probe(&p, "b", Some(false));
    assert_eq!(picked(&p).as_deref(), Some("b"), "fallback to the probe-down broker, not the draining one");
    p.set_admin("b", AdminState::Draining).unwrap();
    assert_eq!(picked(&p), None);
}

// ---- pick: passive accounting --------------------------------------------

fn barrable_primary() -> Arc<Pool> {
    pool(&(broker("a", 1, "priority = 1\nmax_fails = 2\nfail_timeout = \"10s\"") + &broker("b", 2, "priority = 2")))
}

/// `barrable_primary` with broker "a" barred and its bar over: on probation, its trial not yet
/// handed out.
async fn on_probation() -> (Arc<Pool>, Arc<Broker>) {
    let p = barrable_primary();
    let a = p.broker("a").unwrap();
    p.record_failure(&a, "connect");
    p.record_failure(&a, "connect");
    tokio::time::advance(Duration::from_secs(10)).await;
    (p, a)
}

#[tokio::test(start_paused = true)]
async fn a_passive_bar_sends_sessions_to_the_next_tier_until_probation() {
    let p = barrable_primary();
    let a = p.broker("a").unwrap();
    p.record_failure(&a, "connect");
    assert_eq!(picked(&p).as_deref(), Some("a"), "one failure of two allowed");
    p.record_failure(&a, "connect");
    assert_eq!(picked(&p).as_deref(), Some("b"), "barred after max_fails");
    assert_eq!(p.events.since(0).iter().filter(|e| e.kind == "passive_bar").count(), 1);
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert_eq!(picked(&p).as_deref(), Some("b"), "still barred just before fail_timeout");
    tokio::time::advance(Duration::from_millis(1)).await;
    let trial = p.pick(&[]).unwrap();
    assert_eq!(trial.broker().name, "a", "probation: one trial");
    assert_eq!(picked(&p).as_deref(), Some("b"), "only one trial at a time");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(picked(&p).as_deref(), Some("a"), "a trial that never reported back expires");
}

/// A move that ends after `pick` without trying the broker (no target after all, the client
/// id busy) or a connect whose future is dropped says nothing about the broker: its trial is
/// the next attempt's at once, not one `fail_timeout` later. A trial that expired and was
/// handed out again is the newer lease's, whatever the older one does.
#[tokio::test(start_paused = true)]
async fn a_trial_dropped_unsettled_is_handed_back_and_only_its_own() {
    let (p, a) = on_probation().await;
    drop(p.pick(&[]).unwrap());
    let first = p.pick(&[]).unwrap();
    assert_eq!(first.broker().name, "a", "the trial again, at once");
    tokio::time::advance(Duration::from_secs(10)).await;
    let second = p.pick(&[]).unwrap();
    assert_eq!(second.broker().name, "a", "the first trial expired: a new one");
    drop(first);
    assert_eq!(picked(&p).as_deref(), Some("b"), "the expired lease gives back nothing of the new trial");
    p.record_success(&a);
    drop(second);
    assert_eq!(picked(&p).as_deref(), Some("a"), "a settled trial stays settled");
    assert_eq!(p.events.since(0).iter().filter(|e| e.kind == "passive_reopen").count(), 1);
}

/// meshgate's own shortage on an attempt (no descriptor, no handshake slot) is never the
/// broker's fault, and only the attempt's lease hands a trial back: a probe or another
/// session that ran short takes nothing from the session holding the trial.
#[tokio::test(start_paused = true)]
async fn a_local_error_elsewhere_leaves_the_trial_with_its_holder() {
    let (p, a) = on_probation().await;
    let trial = p.pick(&[]).unwrap();
    assert_eq!(trial.broker().name, "a", "the trial");
    p.record_local_error(&a, "local_error", &"no descriptor left");
    assert_eq!(picked(&p).as_deref(), Some("b"), "still the holder's trial");
    drop(trial);
    assert_eq!(picked(&p).as_deref(), Some("a"), "handed back by its lease");
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_bars_again_at_once() {
    let (p, a) = on_probation().await;
    assert_eq!(p.pick(&[]).unwrap().broker().name, "a", "the trial");
    p.record_failure(&a, "connack_timeout");
    assert_eq!(picked(&p).as_deref(), Some("b"), "one failure in probation is enough");
    assert_eq!(p.events.since(0).iter().filter(|e| e.kind == "passive_bar").count(), 2);
}

/// `Pool::record_success` once held the broker's passive lock (a temporary of its `if let`
/// scrutinee) while `after_change` -> `refresh` -> `Broker::available` locked it again, so the
/// first successful probation trial deadlocked its thread and, with it, every later pick on
/// that broker. Runs on its own thread so it fails instead of hanging.
#[test]
fn a_successful_trial_reopens_the_broker() {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let picks = rt.block_on(async {
            let (p, a) = on_probation().await;
            let _trial = p.pick(&[]).unwrap();
            p.record_success(&a);
            let reopened = p.events.since(0).iter().filter(|e| e.kind == "passive_reopen").count();
            (picked(&p), reopened)
        });
        let _ = done.send(picks);
    });
    // A deadline, not a sleep: this returns as soon as the thread is done.
    let (next, reopened) = result.recv_timeout(Duration::from_secs(10)).expect("record_success never returned");
    assert_eq!(next.as_deref(), Some("a"), "reopened by the trial's success");
    assert_eq!(reopened, 1);
}

#[tokio::test(start_paused = true)]
async fn failures_spread_wider_than_fail_timeout_do_not_bar() {
    let p = pool(
        &(broker("a", 1, "priority = 1\nmax_fails = 2\nfail_timeout = \"10s\"") + &broker("b", 2, "priority = 2")),
    );
    let a = p.broker("a").unwrap();
    p.record_failure(&a, "connect");
    tokio::time::advance(Duration::from_secs(10)).await;
    p.record_failure(&a, "connect");
    assert_eq!(picked(&p).as_deref(), Some("a"), "the first failure's window had ended");
    p.record_failure(&a, "connect");
    assert_eq!(picked(&p).as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn max_fails_zero_never_bars() {
    let p = pool(&(broker("a", 1, "priority = 1\nmax_fails = 0") + &broker("b", 2, "priority = 2")));
    let a = p.broker("a").unwrap();
    for _ in 0..50 {
        p.record_failure(&a, "connect");
    }
    assert_eq!(picked(&p).as_deref(), Some("a"));
}

#[tokio::test(start_paused = true)]
async fn probes_coming_up_lift_a_passive_bar() {
    let p = pool(&(broker("a", 1, "priority = 1\nfail_timeout = \"60s\"") + &broker("b", 2, "priority = 2")));
    let a = p.broker("a").unwrap();
    p.record_failure(&a, "connect");
    assert_eq!(picked(&p).as_deref(), Some("b"));
    p.probe_flipped(&a, true, "test");
    assert_eq!(picked(&p).as_deref(), Some("a"), "probes proved it healthy: stale failures forgotten");
}

// ---- pick: fallback when nothing is available ----------------------------

#[tokio::test(start_paused = true)]
async fn the_fallback_prefers_brokers_whose_probes_are_not_down_then_priority() {
    let p = pool(
        &(broker("a", 1, "priority = 1")
            + &broker("b", 2, "priority = 2\nfail_timeout = \"60s\"")
            + &broker("c", 3, "priority = 3")),
    );
    probe(&p, "a", Some(false));
    probe(&p, "c", Some(false));
    p.record_failure(&p.broker("b").unwrap(), "connect");
    assert!(p.brokers().iter().all(|b| !b.available(tokio::time::Instant::now())));
    assert_eq!(p.current_broker().map(|b| b.name.clone()), None);
    let (a, b) = (p.broker("a").unwrap(), p.broker("b").unwrap());
    assert_eq!(picked(&p).as_deref(), Some("b"), "barred but not probe-down goes first");
    assert_eq!(p.pick(std::slice::from_ref(&b)).unwrap().broker().name, "a", "then probe-down ones by priority");
    assert_eq!(p.pick(&[b.clone(), a.clone()]).unwrap().broker().name, "c");
    assert!(p.pick(&[a, b, p.broker("c").unwrap()]).is_none());
}

#[test]
fn with_every_probe_down_the_fallback_is_priority_order() {
    let p = pool(&(broker("a", 1, "priority = 2") + &broker("b", 2, "priority = 1") + &broker("c", 3, "priority = 3")));
    for n in ["a", "b", "c"] {
        probe(&p, n, Some(false));
    }
    let mut leases = Vec::new();
    assert_eq!(reserve(&p, 3, &mut leases), ["b", "b", "b"], "always the best tier, not spread");
    assert_eq!(p.broker("b").unwrap().active_sessions(), 3, "fallback leases are counted too");
}

// ---- next_to_move --------------------------------------------------------

#[test]
fn nothing_moves_while_every_session_is_on_the_best_tier() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1") + &broker("c", 3, "priority = 2")));
    let _s = register(&p, "c", 6);
    assert_eq!(p.brokers().iter().map(|b| b.active_sessions()).collect::<Vec<_>>(), [3, 3, 0]);
    assert_eq!(moved(&p), None);
}

#[test]
fn failback_moves_lower_tier_sessions_oldest_first() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 2")));
    probe(&p, "a", Some(false));
    let on_b = register(&p, "old", 3);
    assert!(on_b.iter().all(|s| s.broker.name == "b"));
    assert_eq!(moved(&p), None, "b is the best tier while a is down");
    probe(&p, "a", Some(true));
    let on_a = register(&p, "new", 2);
    assert!(on_a.iter().all(|s| s.broker.name == "a"));
    for s in &on_b {
        assert_eq!(moved(&p), Some((s.id, "b".into(), "failback")));
        s.close("failback");
    }
    assert_eq!(moved(&p), None, "closing sessions are not chosen again; a's sessions stay");
    assert!(on_a.iter().all(|s| !s.is_closing()));
}

#[test]
fn failback_none_leaves_lower_tier_sessions_where_they_are() {
    let text = String::from("[proxy]\nfailback = \"none\"\n")
        + &broker("a", 1, "priority = 1")
        + &broker("b", 2, "priority = 2");
    let p = pool(&text);
    probe(&p, "a", Some(false));
    let _s = register(&p, "c", 2);
    probe(&p, "a", Some(true));
    assert_eq!(moved(&p), None);
    p.set_admin("b", AdminState::Draining).unwrap();
    assert_eq!(moved(&p).map(|m| m.2), Some("drain"), "draining still moves them");
}

#[test]
fn only_sessions_below_the_best_available_tier_fail_back() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 2") + &broker("c", 3, "priority = 3")));
    probe(&p, "a", Some(false));
    probe(&p, "b", Some(false));
    let on_c = register(&p, "c", 2);
    probe(&p, "b", Some(true));
    let on_b = register(&p, "b", 2);
    assert!(on_b.iter().all(|s| s.broker.name == "b"));
    assert_eq!(moved(&p), Some((on_c[0].id, "c".into(), "failback")));
    on_c.iter().for_each(|s| s.close("failback"));
    assert_eq!(moved(&p), None, "b is the best tier while a is down");
}

#[test]
fn a_lower_tier_does_not_fail_back_to_an_unavailable_primary() {
    // Barred, full or draining primaries are not "available": nothing to go back to.
    let p = pool(&(broker("a", 1, "priority = 1\nmax_conns = 1") + &broker("b", 2, "priority = 2")));
    let on_a = register(&p, "a", 1);
    let _on_b = register(&p, "b", 2);
    assert_eq!(moved(&p), None, "a is full");
    drop(on_a);
    assert_eq!(moved(&p).map(|m| m.2), Some("failback"), "a has a place again");
}

#[test]
fn draining_moves_sessions_even_within_the_best_tier() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1")));
    let s = register(&p, "c", 4);
    let on_a: Vec<u64> = s.iter().filter(|s| s.broker.name == "a").map(|s| s.id).collect();
    assert_eq!(on_a.len(), 2);
    p.set_admin("a", AdminState::Draining).unwrap();
    assert_eq!(moved(&p), Some((on_a[0], "a".into(), "drain")));
    assert!(s.iter().all(|s| !s.is_closing()), "draining closes nothing by itself");
}

#[test]
fn draining_the_last_available_broker_moves_nothing() {
    // With nowhere to go, next_to_move has no best tier and keeps the sessions.
    let p = pool(&broker("a", 1, ""));
    let _s = register(&p, "c", 2);
    p.set_admin("a", AdminState::Draining).unwrap();
    assert_eq!(moved(&p), None);
}

#[test]
fn sessions_on_a_removed_broker_move() {
    let a = broker("a", 1, "priority = 1");
    let b = broker("b", 2, "priority = 1");
    let p = pool(&(a.clone() + &b));
    let s = register(&p, "c", 2);
    assert_eq!(s[0].broker.name, "a");
    p.apply(&Config::from_toml(&b, "reload").unwrap());
    assert!(s[0].broker.is_removed());
    assert_eq!(moved(&p), Some((s[0].id, "a".into(), "broker_removed")));
    assert_eq!(picked(&p).as_deref(), Some("b"), "a removed broker takes nothing new");
}

#[test]
fn disabling_closes_sessions_at_once_instead_of_moving_them() {
    let p = pool(&(broker("a", 1, "priority = 1") + &broker("b", 2, "priority = 1")));
    let s = register(&p, "c", 2);
    p.set_admin("a", AdminState::Disabled).unwrap();
    assert!(s[0].is_closing());
    assert_eq!(s[0].close_reason(), Some("broker_disabled"));
    assert!(!s[1].is_closing());
    assert_eq!(moved(&p), None);
}

/// The wait of the sessions leaving a failed broker: none when nobody leaves, until the limit
/// while some are not ready, and over as soon as the last one is (woken, not timed out).
#[tokio::test]
async fn the_evacuation_wait_ends_when_the_last_leaving_session_is_ready() {
    use std::time::Instant;
    let pool = pool(&broker("b1", 1, ""));
    let b = pool.broker("b1").unwrap();
    let started = Instant::now();
    b.evacuated(Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "nobody leaving: no wait");

    b.evacuation_joined();
    b.evacuation_joined();
    let started = Instant::now();
    b.evacuated(Duration::from_millis(200)).await;
    assert!(started.elapsed() >= Duration::from_millis(200), "two not ready: the whole limit");

    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.evacuated(Duration::from_secs(30)).await })
    };
    // One thread: the waiter runs until it waits.
    tokio::task::yield_now().await;
    b.evacuation_left();
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "one still not ready: still waiting");
    b.evacuation_left();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken when the last one is ready, not at the 30 s limit")
        .unwrap();
}
