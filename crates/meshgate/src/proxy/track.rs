//! What one session's traffic says about its state: the subscriptions its broker acknowledged, and the QoS 1/2 flows still open each way; for persistent sessions the subscriptions also go to their record in `durable`.
//!
//! A session that moves to another broker under its client (`switch`) takes its subscriptions
//! from here and waits here until no flow is open on the old broker. The forwarding path only
//! reads packet headers for the counts; the few packets that change subscriptions (SUBSCRIBE,
//! UNSUBSCRIBE and their acknowledgements, and an MQTT 5 DISCONNECT that ends a persistent
//! session) are read whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::durable::{Durable, Sub};
use crate::mqtt::frame::Header;
use crate::mqtt::subscribe::{disconnect_expiry, granted, parse_ack, parse_subscribe, parse_unsubscribe};
use crate::mqtt::{kind, Capture, FrameError, FrameScanner};

/// Largest SUBSCRIBE or UNSUBSCRIBE body meshgate reads to record it.
const CAPTURE_LIMIT: usize = 64 * 1024;

/// Client-side requests awaiting an answer, at most, and their size: a client that never
/// reads its SUBACKs cannot grow this; what does not fit makes the record incomplete.
const MAX_PENDING: usize = 256;
const MAX_PENDING_BYTES: usize = 1 << 20;

enum Pending {
    Subscribe(Vec<(String, Sub)>),
    Unsubscribe(Vec<String>),
}

/// A persistent session's link to its record.
struct Record {
    durable: Arc<Durable>,
    /// The broker the session is connected to (where an MQTT 5 DISCONNECT ends it).
    broker: String,
}

pub struct Track {
    subs: Subs,
    up: Capture,
    down: Capture,
    /// QoS 1 and 2 PUBLISHes of the client its broker has not finished (PUBACK, PUBCOMP), and
    /// the broker's the client has not.
    pub up_open: u32,
    pub down_open: u32,
    /// The client's PINGREQs its broker has not answered yet.
    pub pings_open: u32,
}

/// The subscription side of a `Track`.
struct Subs {
    client_id: String,
    version: u8,
    record: Option<Record>,
    pending: HashMap<u16, Pending>,
    pending_bytes: usize,
    /// This connection's subscriptions as its broker granted them, at most `max`.
    granted: BTreeMap<String, Sub>,
    max: usize,
    /// More subscriptions than `max`, or a request too large to read: `granted` is not all.
    incomplete: bool,
}

/// Both directions of one session use the same `Track`, within one task, so the lock is never
/// contended (a `RefCell` would make the session future not `Send`).
pub type SharedTrack = parking_lot::Mutex<Track>;

impl Track {
    pub fn new(client_id: String, version: u8, max_subs: usize) -> Track {
        Track {
            subs: Subs {
                client_id,
                version,
                record: None,
                pending: HashMap::new(),
                pending_bytes: 0,
                granted: BTreeMap::new(),
                max: max_subs,
                incomplete: false,
            },
            up: Capture::new(CAPTURE_LIMIT),
            down: Capture::new(CAPTURE_LIMIT),
            up_open: 0,
            down_open: 0,
            pings_open: 0,
        }
    }

    /// Subscription changes also go to this persistent session's record, which lives on `broker`.
    pub fn with_record(mut self, durable: Arc<Durable>, broker: String) -> Track {
        self.subs.record = Some(Record { durable, broker });
        self
    }

    /// The session moved to `broker`.
    pub fn moved_to(&mut self, broker: &str) {
        if let Some(r) = &mut self.subs.record {
            r.broker = broker.to_string();
        }
    }

    /// Seeds the subscriptions (those a restore put back before the CONNACK).
    pub fn seed(&mut self, subs: impl IntoIterator<Item = (String, Sub)>) {
        for (f, s) in subs {
            if self.subs.granted.len() < self.subs.max || self.subs.granted.contains_key(&f) {
                self.subs.granted.insert(f, s);
            } else {
                self.subs.incomplete = true;
            }
        }
    }

    /// The subscriptions to put back on another broker; `None` when they are not all known.
    pub fn subscriptions(&self) -> Option<Vec<(String, Sub)>> {
        let s = &self.subs;
        (!s.incomplete).then(|| s.granted.iter().map(|(f, s)| (f.clone(), s.clone())).collect())
    }

    /// Every SUBSCRIBE and UNSUBSCRIBE of the client has its broker's answer.
    pub fn settled_requests(&self) -> bool {
        self.subs.pending.is_empty()
    }

    /// No QoS 1 or 2 flow is open either way, and every request of the client (SUBSCRIBE,
    /// UNSUBSCRIBE, PINGREQ) has its broker's answer: nothing the client waits for is owed by
    /// its current broker.
    pub fn settled(&self) -> bool {
        self.up_open == 0 && self.down_open == 0 && self.pings_open == 0 && self.subs.pending.is_empty()
    }

    /// Scans forwarded bytes like `FrameScanner::feed`, counting flows and reading the packets
    /// that change the session's subscriptions. `from_client` says which way `data` travels.
    pub fn feed(
        &mut self,
        from_client: bool,
        scanner: &mut FrameScanner,
        data: &[u8],
        packets: &mut u64,
    ) -> Result<(), FrameError> {
        let Track { subs, up, down, up_open, down_open, pings_open } = self;
        let version = subs.version;
        let (cap, opens, closes) = if from_client { (up, up_open, down_open) } else { (down, down_open, up_open) };
        let want = |k: u8| -> bool {
            if from_client {
                // MQTT 5 DISCONNECT can end the session (Session Expiry Interval 0).
                k == kind::SUBSCRIBE || k == kind::UNSUBSCRIBE || (version == 5 && k == kind::DISCONNECT)
            } else {
                k == kind::SUBACK || k == kind::UNSUBACK
            }
        };
        scanner.feed_capture(
            data,
            want,
            cap,
            |h: Header| {
                *packets += 1;
                match h.kind() {
                    kind::PUBLISH if h.first_byte & 0x06 != 0 => *opens += 1,
                    // PUBACK ends a QoS 1 flow, PUBCOMP a QoS 2 one: the other side's.
                    kind::PUBACK | kind::PUBCOMP => *closes = closes.saturating_sub(1),
                    kind::PINGREQ if from_client => *pings_open += 1,
                    kind::PINGRESP if !from_client => *pings_open = pings_open.saturating_sub(1),
                    _ => {}
                }
            },
            |h, body| subs.captured(from_client, h, body),
        )
    }
}

impl Subs {
    fn mark_incomplete(&mut self) {
        self.incomplete = true;
        if let Some(r) = &self.record {
            r.durable.mark_incomplete(&self.client_id);
        }
    }

    fn captured(&mut self, from_client: bool, h: Header, body: Option<&[u8]>) {
        let version = self.version;
        if from_client {
            let Some(body) = body else {
                self.mark_incomplete();
                return;
            };
            if h.kind() == kind::DISCONNECT {
                if disconnect_expiry(body) == Some(0) {
                    if let Some(r) = &self.record {
                        r.durable.forget(&self.client_id, &r.broker);
                    }
                }
                return;
            }
            if self.pending.len() >= MAX_PENDING || self.pending_bytes + body.len() > MAX_PENDING_BYTES {
                self.mark_incomplete();
                return;
            }
            self.pending_bytes += body.len();
            if h.kind() == kind::SUBSCRIBE {
                if let Some(s) = parse_subscribe(version, body) {
                    let subs = s
                        .filters
                        .into_iter()
                        .map(|(f, options)| (f, Sub { options, properties: s.properties.clone() }))
                        .collect();
                    self.pending.insert(s.packet_id, Pending::Subscribe(subs));
                }
            } else if let Some(u) = parse_unsubscribe(version, body) {
                self.pending.insert(u.packet_id, Pending::Unsubscribe(u.filters));
            }
            return;
        }
        let Some(ack) = body.and_then(|b| parse_ack(version, b)) else { return };
        let answered = self.pending.remove(&ack.packet_id);
        if answered.is_some() && self.pending.is_empty() {
            self.pending_bytes = 0;
        }
        match answered {
            Some(Pending::Subscribe(subs)) => {
                let ok: Vec<(String, Sub)> = subs
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| ack.codes.get(*i).is_some_and(|&c| granted(c)))
                    .map(|(_, s)| s)
                    .collect();
                for (f, s) in &ok {
                    if self.granted.len() >= self.max && !self.granted.contains_key(f) {
                        self.incomplete = true;
                        continue;
                    }
                    self.granted.insert(f.clone(), s.clone());
                }
                if let Some(r) = &self.record {
                    r.durable.add(&self.client_id, ok);
                }
            }
            Some(Pending::Unsubscribe(filters)) => {
                // 3.x acknowledges without codes; 5 says per filter (0x00 removed, 0x11 there
                // was none: gone either way).
                let gone: Vec<String> = filters
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| ack.codes.get(*i).is_none_or(|&c| c == 0x00 || c == 0x11))
                    .map(|(_, f)| f)
                    .collect();
                for f in &gone {
                    self.granted.remove(f);
                }
                if let Some(r) = &self.record {
                    r.durable.remove(&self.client_id, &gone);
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::fixtures::{connect, durable};
    use crate::mqtt::subscribe::encode_subscribe;

    #[test]
    fn only_what_the_broker_granted_is_recorded_and_unsubscribe_removes_it() {
        let d = durable();
        d.on_established(&connect(4, "c"), &[], "b1");
        let mut t = Track::new("c".into(), 4, 100).with_record(d.clone(), "b1".into());
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        // Split mid-packet: the capture spans reads.
        let sub = encode_subscribe(4, 5, &[], &[("a/#", 1), ("secret", 1)]);
        t.feed(true, &mut up, &sub[..4], &mut n).unwrap();
        t.feed(true, &mut up, &sub[4..], &mut n).unwrap();
        assert_eq!(d.placement("c").unwrap().subscriptions, 0, "nothing before the SUBACK");
        // SUBACK id 5: granted QoS 1, refused 0x80.
        t.feed(false, &mut down, &[0x90, 0x04, 0, 5, 1, 0x80], &mut n).unwrap();
        let a = vec![("a/#".to_string(), Sub { options: 1, properties: vec![] })];
        assert_eq!(d.to_restore("c"), a);
        assert_eq!(t.subscriptions(), Some(a));
        // UNSUBSCRIBE id 6 "a/#", UNSUBACK id 6.
        t.feed(true, &mut up, &[0xa2, 0x07, 0, 6, 0, 3, b'a', b'/', b'#'], &mut n).unwrap();
        t.feed(false, &mut down, &[0xb0, 0x02, 0, 6], &mut n).unwrap();
        assert!(d.to_restore("c").is_empty());
        assert_eq!(t.subscriptions(), Some(vec![]));
        assert_eq!(n, 4, "every packet counted");
    }

    #[test]
    fn mqtt5_disconnect_with_expiry_zero_forgets_the_session() {
        let d = durable();
        d.on_established(&connect(5, "v5"), &[], "b1");
        let mut t = Track::new("v5".into(), 5, 100).with_record(d.clone(), "b1".into());
        let mut up = FrameScanner::new(1 << 20);
        let mut n = 0;
        // DISCONNECT reason 0, session expiry 0.
        t.feed(true, &mut up, &[0xe0, 0x07, 0, 5, 0x11, 0, 0, 0, 0], &mut n).unwrap();
        assert!(d.placement("v5").is_none());
    }

    #[test]
    fn a_clean_session_keeps_its_own_subscriptions() {
        let mut t = Track::new("c".into(), 4, 1);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        t.feed(true, &mut up, &encode_subscribe(4, 1, &[], &[("a", 0), ("b", 0)]), &mut n).unwrap();
        t.feed(false, &mut down, &[0x90, 0x04, 0, 1, 0, 0], &mut n).unwrap();
        assert_eq!(t.subscriptions(), None, "one more than max_subs: not all known");
    }

    #[test]
    fn qos_flows_are_counted_open_until_finished_each_way() {
        let mut t = Track::new("c".into(), 4, 10);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        let q1 = crate::mqtt::encode::publish_with(4, "t", b"x", 1, false, 7);
        let q2 = crate::mqtt::encode::publish_with(4, "t", b"x", 2, false, 8);
        let q0 = crate::mqtt::encode::publish(4, "t", b"x");
        t.feed(true, &mut up, &[q1.clone(), q2.clone(), q0.clone()].concat(), &mut n).unwrap();
        assert_eq!((t.up_open, t.down_open), (2, 0));
        // The broker: PUBACK 7, PUBREC 8 (still open), then a QoS 1 delivery to the client.
        t.feed(false, &mut down, &[0x40, 2, 0, 7, 0x50, 2, 0, 8], &mut n).unwrap();
        t.feed(false, &mut down, &q1, &mut n).unwrap();
        assert_eq!((t.up_open, t.down_open, t.settled()), (1, 1, false));
        // The client: PUBREL 8, PUBACK 7 (its delivery); the broker: PUBCOMP 8.
        t.feed(true, &mut up, &[0x62, 2, 0, 8, 0x40, 2, 0, 7], &mut n).unwrap();
        t.feed(false, &mut down, &[0x70, 2, 0, 8], &mut n).unwrap();
        assert!(t.settled(), "{} {}", t.up_open, t.down_open);
    }
}
