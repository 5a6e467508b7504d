//! One proxied session's identity, live counters and stop switch, and the lease that holds its place on a broker while it connects, as the pool and the API see them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Broker;

/// A reserved place on a broker while a CONNECT is tried there. Counting the attempt as a
/// session from the moment of selection makes a burst of connects spread over a tier instead
/// of all landing on the broker that looked idlest. Dropping the lease gives the place back,
/// and the broker's probation trial if the lease took it and nothing settled it (the attempt
/// ended before any answer): the next attempt is the trial then, not one `fail_timeout` later.
/// An attempt keeps its lease until its result is recorded, so the trial is never handed to
/// another while it runs.
pub struct Lease {
    broker: Option<Arc<Broker>>,
    /// The broker's probation trial, if this lease was handed it.
    trial: Option<u64>,
}

impl Lease {
    pub(super) fn new(broker: &Arc<Broker>) -> Lease {
        broker.active.fetch_add(1, Ordering::Relaxed);
        Lease { broker: Some(broker.clone()), trial: None }
    }

    pub(super) fn trial(broker: &Arc<Broker>, trial: Option<u64>) -> Lease {
        let mut lease = Lease::new(broker);
        lease.trial = trial;
        lease
    }

    pub fn broker(&self) -> &Arc<Broker> {
        self.broker.as_ref().expect("lease holds a broker until consumed")
    }

    /// Hands the reserved place over to a registered session, which gives it back.
    pub(super) fn into_broker(mut self) -> Arc<Broker> {
        self.broker.take().expect("lease holds a broker until consumed")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.active.fetch_sub(1, Ordering::Relaxed);
            if let Some(trial) = self.trial {
                b.passive.lock().release_trial(trial, Instant::now());
            }
        }
    }
}

/// What the client said in its CONNECT, and where it came from.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub version: u8,
    pub clean: bool,
    pub keepalive: u16,
    pub persistent: bool,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
}

#[cfg(test)]
impl SessionInfo {
    /// A clean MQTT 3.1.1 client's session, for unit tests.
    pub(crate) fn for_test(client_id: &str) -> SessionInfo {
        SessionInfo {
            client_id: client_id.into(),
            username: None,
            version: 4,
            clean: true,
            keepalive: 60,
            persistent: false,
            peer: "127.0.0.1:50000".parse().unwrap(),
            connected_at: SystemTime::now(),
        }
    }
}

pub struct Session {
    pub id: u64,
    pub broker: Arc<Broker>,
    pub info: SessionInfo,
    /// Set by a close or a move request; with the pool's shutdown switch, what ends the
    /// session task's wait (`cancelled`).
    stop: std::sync::atomic::AtomicBool,
    /// The session task's waker, woken by a close or a move request. One task waits, so one
    /// slot: a cancellation token of its own cost every session 110 bytes, and its waiter
    /// 72 more in the session's task.
    waker: futures_util::task::AtomicWaker,
    /// The pool's shutdown switch (shared, not a child of it).
    shutdown: CancellationToken,
    close_reason: Mutex<Option<&'static str>>,
    /// Asked to move to another broker under its open client connection (`close_reason`
    /// says why) rather than to close.
    moving: std::sync::atomic::AtomicBool,
    /// Counted among the sessions leaving its failed broker (`Broker::evacuated`).
    evacuating: std::sync::atomic::AtomicBool,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
}

impl Session {
    /// `closing` is the pool's shutdown switch: a session whose task waits sees it on its next
    /// wake-up, and the shutdown closes every session (`Meshgate::shutdown`) to wake them.
    pub(super) fn new(id: u64, broker: Arc<Broker>, info: SessionInfo, closing: &CancellationToken) -> Session {
        Session {
            id,
            broker,
            info,
            stop: std::sync::atomic::AtomicBool::new(false),
            waker: futures_util::task::AtomicWaker::new(),
            shutdown: closing.clone(),
            close_reason: Mutex::new(None),
            moving: std::sync::atomic::AtomicBool::new(false),
            evacuating: std::sync::atomic::AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            packets_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
        }
    }

    /// Asks the session's task to close both sockets; the first reason given is kept. A close
    /// wins over a move asked for before (a broker going down mid-drain closes the session).
    pub fn close(&self, reason: &'static str) {
        self.moving.store(false, Ordering::Relaxed);
        self.close_reason.lock().get_or_insert(reason);
        self.signal();
    }

    /// Ends the task's wait (`cancelled`), now or at its next one.
    fn signal(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Asks the session's task to move the session to the broker that takes new clients,
    /// keeping the client's connection; the task closes it (for `reason`) where it cannot.
    /// `false` when it was closing or moving already (for that reason, which stands).
    pub fn request_move(&self, reason: &'static str) -> bool {
        self.ask_to_move(reason, false)
    }

    /// Like `request_move`, for a session leaving a failed broker: counted among those the
    /// others wait for (`Broker::evacuated`) before its task can see the request.
    pub(super) fn request_evacuation(&self, reason: &'static str) -> bool {
        self.ask_to_move(reason, true)
    }

    fn ask_to_move(&self, reason: &'static str, evacuating: bool) -> bool {
        let mut why = self.close_reason.lock();
        if why.is_some() {
            return false;
        }
        *why = Some(reason);
        self.moving.store(true, Ordering::Relaxed);
        if evacuating {
            self.evacuating.store(true, Ordering::Relaxed);
            self.broker.evacuation_joined();
        }
        drop(why);
        self.signal();
        true
    }

    /// This session's new broker is ready (or it will not move): the others leaving its failed
    /// broker need not wait for it.
    pub fn evacuated(&self) {
        if self.evacuating.swap(false, Ordering::Relaxed) {
            self.broker.evacuation_left();
        }
    }

    /// The reason a move was requested for, if one was.
    pub fn move_requested(&self) -> Option<&'static str> {
        self.moving.load(Ordering::Relaxed).then(|| self.close_reason()).flatten()
    }

    pub fn is_closing(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.shutdown.is_cancelled()
    }

    pub fn close_reason(&self) -> Option<&'static str> {
        *self.close_reason.lock()
    }

    /// Ready once the session is closing, asked to move, or meshgate shuts down. Only the
    /// session's own task waits on it (one waker slot).
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before the check, so a signal in between is not lost.
            self.waker.register(cx.waker());
            match self.is_closing() {
                true => std::task::Poll::Ready(()),
                false => std::task::Poll::Pending,
            }
        })
    }
}
