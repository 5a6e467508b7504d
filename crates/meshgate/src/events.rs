//! The event log: failovers, state changes, drains and reloads, numbered, in a bounded ring, and logged.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// `state_change`, `failover`, `passive_bar`, `passive_reopen`, `drain`, `admin`, `reload`, `session_closed`, `switch`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub message: String,
}

/// How loud an event is in the log (the `/events` list shows every one alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
    Error,
}

pub struct EventLog {
    ring: Mutex<Ring>,
    capacity: usize,
    live: broadcast::Sender<Event>,
}

struct Ring {
    next_seq: u64,
    events: VecDeque<Event>,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(256);
        EventLog { ring: Mutex::new(Ring { next_seq: 1, events: VecDeque::with_capacity(capacity) }), capacity, live }
    }

    /// Records an event and logs it at INFO; returns its sequence number.
    pub fn push(&self, kind: &'static str, broker: Option<&str>, message: String) -> u64 {
        self.push_at(Severity::Info, kind, broker, message)
    }

    /// Records an event and logs it once, at `severity`: what an operator must act on (a
    /// broker down, a failover, an outage, a refused reload) is a warning or an error.
    pub fn push_at(&self, severity: Severity, kind: &'static str, broker: Option<&str>, message: String) -> u64 {
        let b = broker.unwrap_or("");
        match severity {
            Severity::Info => tracing::info!(event = kind, broker = b, "{message}"),
            Severity::Warn => tracing::warn!(event = kind, broker = b, "{message}"),
            Severity::Error => tracing::error!(event = kind, broker = b, "{message}"),
        }
        let mut ring = self.ring.lock();
        let event = Event {
            seq: ring.next_seq,
            at_ms: unix_ms(SystemTime::now()),
            kind,
            broker: broker.map(str::to_owned),
            message,
        };
        ring.next_seq += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        let seq = event.seq;
        // Nobody listening is normal.
        let _ = self.live.send(event);
        seq
    }

    /// Events with a sequence number greater than `since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Event> {
        let ring = self.ring.lock();
        ring.events.iter().filter(|e| e.seq > since).cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    pub fn last_seq(&self) -> u64 {
        self.ring.lock().next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_numbered() {
        let log = EventLog::new(3);
        for i in 0..5 {
            log.push("state_change", Some("b"), format!("e{i}"));
        }
        let all = log.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.since(4).len(), 1);
        assert_eq!(log.last_seq(), 5);
    }
}
