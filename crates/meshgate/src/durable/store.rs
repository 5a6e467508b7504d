//! The record of persistent sessions: acknowledged subscriptions, where each session lives and where its standby is; bounded, expiring, kept in a file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One subscription as the broker acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sub {
    /// The SUBSCRIBE options byte (QoS; in MQTT 5 also No Local, Retain As Published,
    /// Retain Handling).
    pub options: u8,
    /// MQTT 5 SUBSCRIBE properties, raw (a subscription identifier, user properties).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<u8>,
}

/// What meshgate knows of one client id's persistent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Protocol level of the client's last CONNECT (3, 4 or 5).
    pub version: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub subscriptions: BTreeMap<String, Sub>,
    /// The broker that holds the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// The broker that holds an offline copy (`sessions.standby`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// Counts changes of `subscriptions`; a standby copy made from an older count is stale.
    #[serde(default)]
    pub generation: u64,
    /// The `generation` the standby copy was made from.
    #[serde(default)]
    pub standby_generation: u64,
    /// Brokers that may still hold an outdated copy of this session (a former home or
    /// standby); wiped when they are available, before they take new sessions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_copies: Vec<String>,
    /// Seconds the session outlives its client's disconnect.
    pub expiry_secs: u64,
    /// A client connection with this id is open through meshgate.
    #[serde(default)]
    pub connected: bool,
    /// With several instances (`[coordination]`): the instance the client last connected
    /// through, which does the work on the session while the client is connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Unix milliseconds of the last connect or disconnect.
    pub last_seen_ms: u64,
    /// Some subscription could not be recorded (too many, or a SUBSCRIBE too large to read):
    /// restoring would be partial, so the session is restored as far as it is known and this
    /// is shown in the API.
    #[serde(default)]
    pub incomplete: bool,
}

impl Record {
    pub fn new(version: u8, username: Option<String>, expiry_secs: u64, now_ms: u64) -> Record {
        Record {
            version,
            username,
            subscriptions: BTreeMap::new(),
            home: None,
            standby: None,
            generation: 0,
            standby_generation: 0,
            stale_copies: Vec::new(),
            expiry_secs,
            connected: false,
            instance: None,
            last_seen_ms: now_ms,
            incomplete: false,
        }
    }

    /// A disconnected session whose expiry has passed is gone on its broker too.
    pub fn expired(&self, now_ms: u64) -> bool {
        !self.connected && now_ms.saturating_sub(self.last_seen_ms) >= self.expiry_secs.saturating_mul(1000)
    }

    /// The standby copy lacks a change of the subscriptions.
    pub fn standby_stale(&self) -> bool {
        self.standby_generation != self.generation
    }

    /// `broker` may hold an outdated copy (unless it is where the session lives or is mirrored).
    pub fn mark_stale(&mut self, broker: &str) {
        if self.home.as_deref() != Some(broker)
            && self.standby.as_deref() != Some(broker)
            && !self.stale_copies.iter().any(|b| b == broker)
        {
            self.stale_copies.push(broker.to_string());
        }
    }

    /// Every broker that holds some copy of this session: where it lives, its standby and
    /// outdated copies.
    pub fn copies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.home.iter().chain(self.standby.iter()).cloned().collect();
        for b in &self.stale_copies {
            if !v.contains(b) {
                v.push(b.clone());
            }
        }
        v
    }
}

/// A copy of a session that no longer exists for meshgate (ended or evicted), left on a
/// broker: removed when the broker is available, so it neither queues nor answers
/// "session present" later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Orphan {
    pub client_id: String,
    pub broker: String,
    pub version: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Store {
    pub sessions: HashMap<String, Record>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<Orphan>,
}

impl Store {
    /// Inserts or replaces, making room by dropping the record seen longest ago (connected
    /// sessions last) when `max` is reached; the dropped session's copies become orphans.
    /// Returns the id dropped, if any.
    pub fn put(&mut self, client_id: &str, rec: Record, max: usize) -> Option<String> {
        let dropped = self.victim(client_id, max);
        if let Some(v) = &dropped {
            self.remove(v, None, max);
        }
        self.sessions.insert(client_id.to_string(), rec);
        dropped
    }

    /// [`Store::put`] for another instance's record: a session dropped to make room leaves no
    /// orphans here (its copies are the business of the instance that works on it).
    pub fn put_quietly(&mut self, client_id: &str, rec: Record, max: usize) -> Option<String> {
        let dropped = self.victim(client_id, max);
        if let Some(v) = &dropped {
            self.sessions.remove(v);
        }
        self.sessions.insert(client_id.to_string(), rec);
        dropped
    }

    /// The session to drop so that a new id fits under `max`: the one seen longest ago,
    /// connected sessions last.
    fn victim(&self, client_id: &str, max: usize) -> Option<String> {
        if self.sessions.contains_key(client_id) || self.sessions.len() < max {
            return None;
        }
        self.sessions.iter().min_by_key(|(_, r)| (r.connected, r.last_seen_ms)).map(|(k, _)| k.clone())
    }

    /// Forgets a session; its copies on brokers other than `except` (where the client has just
    /// connected clean) become orphans to remove. At most `max` orphans are kept, the oldest
    /// giving way.
    pub fn remove(&mut self, client_id: &str, except: Option<&str>, max: usize) -> Option<Record> {
        let rec = self.sessions.remove(client_id)?;
        for b in rec.copies() {
            if except != Some(b.as_str()) && !self.orphans.iter().any(|o| o.client_id == client_id && o.broker == b) {
                self.orphans.push(Orphan {
                    client_id: client_id.to_string(),
                    broker: b,
                    version: rec.version,
                    username: rec.username.clone(),
                });
            }
        }
        if self.orphans.len() > max {
            let extra = self.orphans.len() - max;
            self.orphans.drain(..extra);
        }
        Some(rec)
    }

    /// Forgets expired sessions; returns how many. A session that expired on meshgate's clock
    /// has expired on its brokers too (they count from the same disconnect), so its copies are
    /// not orphans.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, r| !r.expired(now_ms));
        before - self.sessions.len()
    }

    pub fn load(path: &Path) -> Result<Store, String> {
        crate::statefile::load(path)
    }

    /// Written atomically (`statefile::write`).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        crate::statefile::save(self, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_store_drops_the_session_seen_longest_ago_and_keeps_connected_ones() {
        let mut s = Store::default();
        let mut a = Record::new(4, None, 60, 100);
        a.connected = true;
        s.put("a", a, 2);
        s.put("b", Record::new(4, None, 60, 200), 2);
        assert_eq!(s.put("c", Record::new(4, None, 60, 300), 2), Some("b".into()));
        assert!(s.sessions.contains_key("a") && s.sessions.contains_key("c"));
        // Replacing an existing id never evicts.
        assert_eq!(s.put("c", Record::new(4, None, 60, 400), 2), None);
    }

    #[test]
    fn a_forgotten_session_leaves_its_other_copies_as_orphans() {
        let mut s = Store::default();
        let mut r = Record::new(4, None, 60, 0);
        r.home = Some("b1".into());
        r.standby = Some("b2".into());
        r.mark_stale("b3");
        r.mark_stale("b1"); // the home is never stale
        assert_eq!(r.copies(), vec!["b1", "b2", "b3"]);
        s.put("c", r, 10);
        s.remove("c", Some("b1"), 10);
        let orphans: Vec<&str> = s.orphans.iter().map(|o| o.broker.as_str()).collect();
        assert_eq!(orphans, vec!["b2", "b3"], "b1 is where the client connected clean");
    }

    #[test]
    fn expiry_counts_from_the_disconnect_and_never_while_connected() {
        let mut s = Store::default();
        s.put("gone", Record::new(4, None, 10, 1_000), 10);
        let mut on = Record::new(4, None, 10, 1_000);
        on.connected = true;
        s.put("on", on, 10);
        assert_eq!(s.expire(10_999), 0);
        assert_eq!(s.expire(11_000), 1);
        assert!(s.sessions.contains_key("on"));
    }

    #[test]
    fn survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        let mut s = Store::default();
        let mut r = Record::new(5, Some("u".into()), 3600, 5);
        r.subscriptions.insert("a/#".into(), Sub { options: 1, properties: vec![0x0b, 3] });
        r.home = Some("broker2".into());
        s.put("c1", r.clone(), 10);
        s.save(&path).unwrap();
        assert_eq!(Store::load(&path).unwrap().sessions.get("c1"), Some(&r));
        assert!(Store::load(&dir.path().join("none.json")).unwrap().sessions.is_empty());
        std::fs::write(&path, "{not json").unwrap();
        assert!(Store::load(&path).unwrap_err().contains("sessions.json"));
    }
}
