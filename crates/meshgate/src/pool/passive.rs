//! Passive failure accounting with nginx's max_fails/fail_timeout semantics, as a pure state machine.
//!
//! What counts as a failure is decided by the proxy (see `proxy::session`): a TCP connect that
//! fails or times out, no CONNACK within `connack_timeout`, the broker closing before its
//! CONNACK, or a CONNACK saying "server unavailable"/"server busy". After `max_fails` such
//! failures within `fail_timeout` of the first one, the broker is barred for `fail_timeout`.
//! When the bar ends the broker is on probation: one session may try it; success reopens it,
//! failure bars it again at once, and a trial that ends with no word on the broker is handed
//! back by the attempt that holds it. `max_fails = 0` turns accounting off, as in nginx.
//! The clock is a parameter so the machine is tested with paused time.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveState {
    /// Taking sessions; `fails` failures counted since `window_start`.
    Open { fails: u32, window_start: Option<Instant> },
    /// Not taking sessions until `until`.
    Barred { until: Instant },
    /// The bar expired; `trial` is when the single trial session was handed out, if it was.
    Probation { trial: Option<Instant> },
}

#[derive(Debug, Clone)]
pub struct Passive {
    pub max_fails: u32,
    pub fail_timeout: Duration,
    state: PassiveState,
    /// Trials handed out so far: each trial's name, so an attempt gives back only its own.
    trials: u64,
}

/// A change worth an event and a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Barred { until: Instant },
    Reopened,
}

impl Passive {
    pub fn new(max_fails: u32, fail_timeout: Duration) -> Self {
        Passive { max_fails, fail_timeout, state: PassiveState::Open { fails: 0, window_start: None }, trials: 0 }
    }

    pub fn state(&self, now: Instant) -> PassiveState {
        match self.state {
            PassiveState::Barred { until } if now >= until => PassiveState::Probation { trial: None },
            s => s,
        }
    }

    /// Failures counted in the current window (for the API).
    pub fn fails(&self, now: Instant) -> u32 {
        match self.state(now) {
            PassiveState::Open { fails, window_start: Some(start) }
                if now.duration_since(start) < self.fail_timeout =>
            {
                fails
            }
            PassiveState::Barred { .. } => self.max_fails,
            _ => 0,
        }
    }

    /// May a new session be sent here? Read-only: use [`Passive::take`] when actually sending.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state(now) {
            PassiveState::Open { .. } => true,
            PassiveState::Barred { .. } => false,
            // A trial that never reported back (its task died) must not bar the broker forever.
            PassiveState::Probation { trial } => trial.is_none_or(|t| now.duration_since(t) >= self.fail_timeout),
        }
    }

    /// Claims a session attempt: in probation this hands out the single trial, with its name
    /// (`Some(None)`: an ordinary attempt, `Some(Some(trial))`: the trial).
    pub fn take(&mut self, now: Instant) -> Option<Option<u64>> {
        if !self.allows(now) {
            return None;
        }
        if let PassiveState::Probation { .. } = self.state(now) {
            self.state = PassiveState::Probation { trial: Some(now) };
            self.trials += 1;
            return Some(Some(self.trials));
        }
        Some(None)
    }

    pub fn failure(&mut self, now: Instant) -> Option<Transition> {
        if self.max_fails == 0 {
            return None;
        }
        let fails = match self.state(now) {
            PassiveState::Barred { .. } => return None,
            PassiveState::Probation { .. } => self.max_fails,
            PassiveState::Open { fails, window_start: Some(start) }
                if now.duration_since(start) < self.fail_timeout =>
            {
                fails + 1
            }
            PassiveState::Open { .. } => {
                self.state = PassiveState::Open { fails: 1, window_start: Some(now) };
                1
            }
        };
        if fails >= self.max_fails {
            let until = now + self.fail_timeout;
            self.state = PassiveState::Barred { until };
            return Some(Transition::Barred { until });
        }
        if let PassiveState::Open { window_start, .. } = self.state {
            self.state = PassiveState::Open { fails, window_start };
        }
        None
    }

    pub fn success(&mut self, now: Instant) -> Option<Transition> {
        let was_probation = matches!(self.state(now), PassiveState::Probation { .. });
        match self.state(now) {
            // nginx forgets failures only when the window ends, not on a success.
            PassiveState::Open { .. } => None,
            // A session that started before the bar may report success after it; the bar stays.
            PassiveState::Barred { .. } => None,
            PassiveState::Probation { .. } => {
                self.reset();
                was_probation.then_some(Transition::Reopened)
            }
        }
    }

    /// The trial `trial` ended without a word on the broker (abandoned, or meshgate's own
    /// shortage ended it before an answer): handed back, so the next attempt can be it, if it
    /// is still the broker's trial. One that expired and was handed out again, or was settled
    /// (success reopened the broker, failure barred it), is not this one's to give back.
    pub fn release_trial(&mut self, trial: u64, now: Instant) {
        if let PassiveState::Probation { trial: Some(_) } = self.state(now) {
            if self.trials == trial {
                self.state = PassiveState::Probation { trial: None };
            }
        }
    }

    /// Forget everything: active probes proved the broker healthy again after marking it down.
    pub fn reset(&mut self) {
        self.state = PassiveState::Open { fails: 0, window_start: None };
    }

    /// Config reload keeps the state but takes the new limits.
    pub fn set_limits(&mut self, max_fails: u32, fail_timeout: Duration) {
        self.max_fails = max_fails;
        self.fail_timeout = fail_timeout;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{advance, pause};

    const T: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn bars_after_max_fails_within_the_window() {
        pause();
        let mut p = Passive::new(3, T);
        assert_eq!(p.failure(Instant::now()), None);
        advance(Duration::from_secs(10)).await;
        assert_eq!(p.failure(Instant::now()), None);
        assert_eq!(p.fails(Instant::now()), 2);
        advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert_eq!(p.failure(now), Some(Transition::Barred { until: now + T }));
        assert!(!p.allows(now));
    }

    #[tokio::test]
    async fn failures_outside_the_window_start_a_new_count() {
        pause();
        let mut p = Passive::new(2, T);
        p.failure(Instant::now());
        advance(T).await;
        assert_eq!(p.fails(Instant::now()), 0);
        assert_eq!(p.failure(Instant::now()), None, "old failure expired");
        assert_eq!(p.fails(Instant::now()), 1);
        assert!(p.failure(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn successes_do_not_forget_failures_inside_the_window() {
        pause();
        let mut p = Passive::new(2, T);
        p.failure(Instant::now());
        assert_eq!(p.success(Instant::now()), None);
        assert!(p.failure(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn probation_gives_a_single_trial() {
        pause();
        let mut p = Passive::new(1, T);
        p.failure(Instant::now());
        advance(T - Duration::from_millis(1)).await;
        assert!(p.take(Instant::now()).is_none(), "still barred");
        advance(Duration::from_millis(1)).await;
        assert!(p.take(Instant::now()).is_some(), "the trial");
        assert!(p.take(Instant::now()).is_none(), "only one trial at a time");
        assert_eq!(p.success(Instant::now()), Some(Transition::Reopened));
        assert!(p.take(Instant::now()).is_some() && p.take(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn a_trial_that_said_nothing_is_handed_back() {
        pause();
        let mut p = Passive::new(1, T);
        p.failure(Instant::now());
        advance(T).await;
        let first = p.take(Instant::now()).flatten().expect("the trial");
        p.release_trial(first, Instant::now());
        let second = p.take(Instant::now()).flatten().expect("the trial again, at once");
        assert!(p.take(Instant::now()).is_none(), "still one at a time");
        p.release_trial(first, Instant::now());
        assert!(p.take(Instant::now()).is_none(), "the first trial gives back nothing of the second");
        p.release_trial(second, Instant::now());
        assert!(p.take(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn failed_trial_bars_again_at_once() {
        pause();
        let mut p = Passive::new(3, T);
        for _ in 0..3 {
            p.failure(Instant::now());
        }
        advance(T).await;
        assert!(p.take(Instant::now()).is_some());
        let now = Instant::now();
        assert_eq!(p.failure(now), Some(Transition::Barred { until: now + T }), "one failure in probation is enough");
    }

    #[tokio::test]
    async fn lost_trial_expires() {
        pause();
        let mut p = Passive::new(1, T);
        p.failure(Instant::now());
        advance(T).await;
        assert!(p.take(Instant::now()).is_some());
        advance(T).await;
        assert!(p.allows(Instant::now()));
    }

    #[tokio::test]
    async fn max_fails_zero_disables_accounting() {
        pause();
        let mut p = Passive::new(0, T);
        for _ in 0..100 {
            assert_eq!(p.failure(Instant::now()), None);
        }
        assert!(p.allows(Instant::now()));
    }

    #[tokio::test]
    async fn reset_reopens_a_barred_broker() {
        pause();
        let mut p = Passive::new(1, T);
        p.failure(Instant::now());
        p.reset();
        assert!(p.allows(Instant::now()));
        assert_eq!(p.fails(Instant::now()), 0);
    }
}
