//! The retained-state record and the convergence rule, as pure data so it is tested without brokers.
//!
//! Conflict rule: **last writer wins by arrival at meshgate.** Every retained publish meshgate
//! sees live, on any broker, becomes the topic's current value in this record; an empty payload
//! is a deletion, remembered as a tombstone for `tombstone_ttl` so a stale copy cannot bring the
//! topic back. When a broker (re)connects, its retained set is read and compared topic by topic:
//! - a topic the record knows: the broker gets the record's value (or the deletion) if it holds
//!   anything else, or nothing; a broker that was down, restarted, or lost its store is brought
//!   up to date and never pushes its stale value anywhere;
//! - a topic the record has never seen (set before meshgate first ran, or directly on a broker
//!   while meshgate's link to it was down): the broker's value is adopted and spread to every
//!   other broker.
//!
//! A write that arrives live while a broker's set is being read is newer than that read, so
//! the comparison skips it. The record is saved to `state_file`, so the same holds after
//! meshgate restarts.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// FNV-1a: stable across processes and versions, unlike std's hasher, because hashes are persisted.
pub fn fingerprint(payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in payload {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    /// Hex, so any payload round-trips through the JSON state file.
    pub payload_hex: String,
    pub qos: u8,
}

impl Value {
    pub fn new(payload: &[u8], qos: u8) -> Value {
        let mut hex = String::with_capacity(payload.len() * 2);
        for b in payload {
            hex.push_str(&format!("{b:02x}"));
        }
        Value { payload_hex: hex, qos }
    }
    pub fn payload(&self) -> Vec<u8> {
        (0..self.payload_hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&self.payload_hex[2 * i..2 * i + 2], 16).ok())
            .collect()
    }
    pub fn fingerprint(&self) -> u64 {
        fingerprint(&self.payload())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `None` is a tombstone.
    pub value: Option<Value>,
    /// Unix ms of the write's arrival at meshgate.
    pub at_ms: u64,
    /// Order of the write within this record ([`Store::seq`]).
    #[serde(default)]
    pub seq: u64,
}

/// What to do to one broker to bring it in line, or what was learnt from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish this retained value to the broker.
    Set { topic: String, value: Value },
    /// Publish an empty retained message to delete the topic there.
    Delete { topic: String },
    /// The broker had a newer value: it is now current and goes to every other broker.
    Adopt { topic: String, value: Value },
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Store {
    /// Bumped by every write; a reconcile ignores topics written after its snapshot began.
    #[serde(default)]
    pub seq: u64,
    pub entries: HashMap<String, Entry>,
}

impl Store {
    /// A live retained publish arrived; returns the new entry.
    pub fn write(&mut self, topic: &str, payload: &[u8], qos: u8, now_ms: u64) -> Entry {
        let value = (!payload.is_empty()).then(|| Value::new(payload, qos));
        self.seq += 1;
        let entry = Entry { value, at_ms: now_ms, seq: self.seq };
        self.entries.insert(topic.to_string(), entry.clone());
        entry
    }

    /// Compares what a broker holds (its retained set, read from a snapshot that began when
    /// the record was at `since`) with the record and returns the actions that make it
    /// current. Adopted values are already in the record when this returns.
    pub fn reconcile(&mut self, holds: &HashMap<String, Value>, since: u64, now_ms: u64) -> Vec<Action> {
        let mut topics: Vec<String> = holds.keys().chain(self.entries.keys()).cloned().collect();
        topics.sort();
        topics.dedup();
        let mut actions = Vec::new();
        for topic in topics {
            let has = holds.get(&topic);
            match self.entries.get(&topic) {
                // Written live after the read began: newer than what the read shows.
                Some(e) if e.seq > since => {}
                Some(Entry { value: Some(v), .. }) => {
                    if has.map(Value::fingerprint) != Some(v.fingerprint()) {
                        actions.push(Action::Set { topic, value: v.clone() });
                    }
                }
                Some(Entry { value: None, .. }) => {
                    if has.is_some() {
                        actions.push(Action::Delete { topic });
                    }
                }
                None => {
                    if let Some(v) = has {
                        self.seq += 1;
                        self.entries
                            .insert(topic.clone(), Entry { value: Some(v.clone()), at_ms: now_ms, seq: self.seq });
                        actions.push(Action::Adopt { topic, value: v.clone() });
                    }
                }
            }
        }
        actions
    }

    /// Forgets tombstones older than `ttl_ms`.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.value.is_some() || now_ms.saturating_sub(e.at_ms) < ttl_ms);
        before - self.entries.len()
    }

    pub fn load(path: &std::path::Path) -> Result<Store, String> {
        crate::statefile::load(path)
    }

    /// Written atomically (`statefile::write`).
    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        crate::statefile::save(self, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs.iter().map(|(t, p)| (t.to_string(), Value::new(p.as_bytes(), 1))).collect()
    }

    fn sorted(mut a: Vec<Action>) -> Vec<Action> {
        a.sort_by_key(|a| format!("{a:?}"));
        a
    }

    /// b3 went down holding t1=old, t2=doomed; meanwhile t1 changed, t2 was deleted, t3 is new.
    #[test]
    fn a_returning_broker_gets_changes_deletions_and_new_values() {
        let mut s = Store::default();
        s.write("t1", b"old", 1, 1);
        s.write("t2", b"doomed", 1, 2);
        s.write("t1", b"new", 1, 3);
        s.write("t2", b"", 1, 4);
        s.write("t3", b"fresh", 1, 5);
        let actions = s.reconcile(&holds(&[("t1", "old"), ("t2", "doomed")]), s.seq, 6);
        assert_eq!(
            sorted(actions),
            vec![
                Action::Delete { topic: "t2".into() },
                Action::Set { topic: "t1".into(), value: Value::new(b"new", 1) },
                Action::Set { topic: "t3".into(), value: Value::new(b"fresh", 1) },
            ]
        );
        // Once current, nothing more to do.
        assert!(s.reconcile(&holds(&[("t1", "new"), ("t3", "fresh")]), s.seq, 7).is_empty());
    }

    #[test]
    fn a_stale_value_never_wins_over_the_record() {
        let mut s = Store::default();
        s.write("t", b"v2", 1, 1);
        assert_eq!(
            s.reconcile(&holds(&[("t", "v1")]), s.seq, 2),
            vec![Action::Set { topic: "t".into(), value: Value::new(b"v2", 1) }]
        );
        assert_eq!(s.entries["t"].value, Some(Value::new(b"v2", 1)));
    }

    #[test]
    fn a_broker_that_lost_its_store_is_refilled() {
        let mut s = Store::default();
        s.write("t", b"v", 1, 1);
        assert_eq!(
            s.reconcile(&HashMap::new(), s.seq, 2),
            vec![Action::Set { topic: "t".into(), value: Value::new(b"v", 1) }]
        );
    }

    #[test]
    fn unknown_topics_are_adopted_and_then_spread() {
        let mut s = Store::default();
        let a = s.reconcile(&holds(&[("t", "v")]), s.seq, 1);
        assert_eq!(a, vec![Action::Adopt { topic: "t".into(), value: Value::new(b"v", 1) }]);
        // The next broker has nothing yet, or another value: it gets the adopted one.
        assert_eq!(
            s.reconcile(&holds(&[("t", "w")]), s.seq, 2),
            vec![Action::Set { topic: "t".into(), value: Value::new(b"v", 1) }]
        );
    }

    #[test]
    fn a_write_newer_than_the_snapshot_is_left_alone() {
        let mut s = Store::default();
        s.write("t", b"v1", 1, 1);
        let since = s.seq;
        // While the broker's set is being read, a live write sets v2 (sent to it live).
        s.write("t", b"v2", 1, 2);
        assert!(s.reconcile(&holds(&[("t", "v1")]), since, 3).is_empty());
        assert_eq!(s.entries["t"].value, Some(Value::new(b"v2", 1)));
    }

    #[test]
    fn tombstones_expire_and_the_store_round_trips() {
        let mut s = Store::default();
        s.write("gone", b"", 1, 1_000);
        s.write("kept", b"\x00\xffbinary", 2, 1_000);
        assert_eq!(s.expire(1_500, 1_000), 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        s.save(&path).unwrap();
        let back = Store::load(&path).unwrap();
        assert_eq!(back.entries, s.entries);
        assert_eq!(back.seq, s.seq);
        assert_eq!(back.entries["kept"].value.as_ref().unwrap().payload(), b"\x00\xffbinary");
        let mut s = back;
        assert_eq!(s.expire(2_000, 1_000), 1);
        assert!(s.entries.contains_key("kept"));
    }
}
