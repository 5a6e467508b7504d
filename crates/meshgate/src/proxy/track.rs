//! What one session's traffic says about its state: the subscriptions its broker acknowledged, and the QoS 1/2 flows still open each way; for persistent sessions the subscriptions also go to their record in `durable`.
//!
//! A session that moves to another broker under its client (`switch`) takes its subscriptions
//! from here and waits here until no flow is open on the old broker; when the old broker
//! failed, it sends the client's unacknowledged PUBLISHes again from the copies kept here. The
//! forwarding path reads most packets' headers only; it reads the few packets that change
//! subscriptions (SUBSCRIBE, UNSUBSCRIBE and their acknowledgements, and an MQTT 5 DISCONNECT
//! that ends a persistent session) whole, QoS 1/2 acknowledgements and the broker's QoS 1/2
//! PUBLISHes as far as their packet identifier, and keeps a copy of each QoS 1/2 PUBLISH of
//! the client until its broker has it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::durable::{Durable, Sub};
use crate::mqtt::frame::Header;
use crate::mqtt::subscribe::{disconnect_expiry, granted, parse_ack, parse_subscribe, parse_unsubscribe};
use crate::mqtt::{kind, Capture, FrameError, FrameScanner, Want};

/// Largest SUBSCRIBE or UNSUBSCRIBE body meshgate reads to record it.
const CAPTURE_LIMIT: usize = 64 * 1024;

/// The most one session keeps in copies of unacknowledged PUBLISHes. A client that has more
/// in flight (or one larger PUBLISH) is not copied past it: a failed broker's session then
/// cannot switch and closes, as without switching (the client sends them again itself).
pub const COPY_LIMIT: usize = 1 << 20;

/// Where one QoS 1/2 PUBLISH of the client stands on its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpStage {
    /// Not acknowledged.
    Sent,
    /// QoS 2 the broker has (PUBREC); the client's PUBREL is to come. Mosquitto passes a QoS 2
    /// message on only at the PUBREL, so until the flow ends the copy is still needed.
    Received,
    /// QoS 2 the client released (PUBREL); the broker's PUBCOMP is owed.
    Released,
}

/// One open QoS 1/2 flow of the client: its stage, and a copy of the PUBLISH (first byte,
/// body) to send again to another broker if this one fails; `None` when it was not kept
/// (past `COPY_LIMIT`, or the session keeps none).
struct UpFlow {
    stage: UpStage,
    copy: Option<(u8, Vec<u8>)>,
}

/// Where one QoS 1/2 PUBLISH of the broker stands with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownFlow {
    /// The client's PUBACK or PUBREC is owed.
    Sent,
    /// QoS 2 the client has (PUBREC); the broker's PUBREL is owed.
    Received,
    /// QoS 2 the broker released; the client's PUBCOMP is owed.
    Released,
}

/// The open QoS 1/2 flows of one session, by packet identifier. Few at a time (a client's
/// in-flight window), so a list: empty, it costs an idle session nothing on the heap.
#[derive(Default)]
struct Flows {
    up: Vec<(u16, UpFlow)>,
    down: Vec<(u16, DownFlow)>,
    /// Bytes held in copies.
    copied: usize,
    /// Whether copies are kept at all (only a session that may switch off a failed broker
    /// needs them).
    keep_copies: bool,
}

impl Flows {
    fn end_up(&mut self, id: u16) {
        if let Some(i) = self.up.iter().position(|(i, _)| *i == id) {
            let (_, f) = self.up.remove(i);
            self.copied -= f.copy.map_or(0, |(_, body)| body.len());
        }
    }

    fn set_up(&mut self, id: u16, to: UpStage) {
        if let Some((_, f)) = self.up.iter_mut().find(|(i, _)| *i == id) {
            f.stage = to;
        }
    }

    fn end_down(&mut self, id: u16) {
        self.down.retain(|(i, _)| *i != id);
    }

    fn set_down(&mut self, id: u16, to: DownFlow) {
        if let Some((_, f)) = self.down.iter_mut().find(|(i, _)| *i == id) {
            *f = to;
        }
    }
}

/// The packet identifier at the start of an acknowledgement's body, and its MQTT 5 reason code
/// (0 when it has none).
fn ack_of(body: &[u8]) -> Option<(u16, u8)> {
    match body {
        [a, b, rest @ ..] => Some((u16::from_be_bytes([*a, *b]), rest.first().copied().unwrap_or(0))),
        _ => None,
    }
}

/// A PUBLISH body's packet identifier (it follows the topic).
fn publish_id(body: &[u8]) -> Option<u16> {
    let topic = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    Some(u16::from_be_bytes([*body.get(2 + topic)?, *body.get(3 + topic)?]))
}

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
    /// The record's key (kept here only: a session without a record has no use for it).
    client_id: String,
    /// The broker the session is connected to (where an MQTT 5 DISCONNECT ends it).
    broker: String,
}

pub struct Track {
    subs: Subs,
    up: Capture,
    down: Capture,
    flows: Flows,
    /// The client's PINGREQs its broker has not answered yet.
    pub pings_open: u32,
}

/// The subscription side of a `Track`.
struct Subs {
    version: u8,
    /// Boxed: only persistent sessions have one.
    record: Option<Box<Record>>,
    /// By packet identifier; a list, as `Flows`: at most `MAX_PENDING`, and empty it costs an
    /// idle session nothing on the heap (a map's hasher state alone took 16 bytes).
    pending: Vec<(u16, Pending)>,
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
    pub fn new(version: u8, max_subs: usize) -> Track {
        Track {
            subs: Subs {
                version,
                record: None,
                pending: Vec::new(),
                pending_bytes: 0,
                granted: BTreeMap::new(),
                max: max_subs,
                incomplete: false,
            },
            up: Capture::new(),
            down: Capture::new(),
            flows: Flows { keep_copies: true, ..Flows::default() },
            pings_open: 0,
        }
    }

    /// Subscription changes also go to this persistent session's record, which lives on `broker`.
    pub fn with_record(mut self, durable: Arc<Durable>, client_id: String, broker: String) -> Track {
        self.subs.record = Some(Box::new(Record { durable, client_id, broker }));
        self
    }

    /// Keeps no copies of the client's PUBLISHes: this session never switches off a failed
    /// broker (`[proxy] move = "close"` or `on_down = "keep"`), so the forwarding path copies
    /// nothing.
    pub fn without_copies(mut self) -> Track {
        self.flows.keep_copies = false;
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

    /// QoS 1 and 2 PUBLISHes of the client its broker has not finished (PUBACK, PUBCOMP).
    pub fn up_open(&self) -> u32 {
        self.flows.up.len() as u32
    }

    /// QoS 1 and 2 PUBLISHes of the broker the client has not finished.
    pub fn down_open(&self) -> u32 {
        self.flows.down.len() as u32
    }

    /// The packet identifiers of the client's open QoS 1/2 flows.
    pub fn up_ids(&self) -> Vec<u16> {
        self.flows.up.iter().map(|(id, _)| *id).collect()
    }

    /// Whether the client's flow `id` is still open on its broker.
    pub fn up_is_open(&self, id: u16) -> bool {
        self.flows.up.iter().any(|(i, _)| *i == id)
    }

    /// No QoS 1 or 2 flow is open either way, and every request of the client (SUBSCRIBE,
    /// UNSUBSCRIBE, PINGREQ) has its broker's answer: nothing the client waits for is owed by
    /// its current broker.
    pub fn settled(&self) -> bool {
        self.flows.up.is_empty() && self.flows.down.is_empty() && self.pings_open == 0 && self.subs.pending.is_empty()
    }

    /// A failed broker's session may switch: the client has answered every QoS 2 PUBREC of
    /// its (its PUBREL is what finishes the flow on the new broker), and has finished every
    /// delivery of the old broker's (so the two brokers' identifiers never meet at the client).
    pub fn ready_to_leave_failed_broker(&self) -> bool {
        self.flows.down.is_empty() && self.flows.up.iter().all(|(_, f)| f.stage != UpStage::Received)
    }

    /// Every open flow of the client's has its copy.
    pub fn all_copied(&self) -> bool {
        self.flows.up.iter().all(|(_, f)| f.copy.is_some())
    }

    /// The client's PUBLISHes its (failed) broker never acknowledged, to send to the new one:
    /// marked DUP, in the order the client sent them. `None` when a copy was not kept.
    pub fn unacknowledged(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for (_, f) in self.flows.up.iter().filter(|(_, f)| f.stage == UpStage::Sent) {
            dup_publish(f.copy.as_ref()?, &mut out);
        }
        Some(out)
    }

    /// The client's released QoS 2 PUBLISHes whose PUBCOMP its (failed) broker still owed, by
    /// packet identifier, each marked DUP: they are finished on the new broker (PUBLISH,
    /// PUBREL), since Mosquitto passes a QoS 2 message on only at its PUBREL. `None` when a
    /// copy was not kept.
    pub fn released(&self) -> Option<Vec<(u16, Vec<u8>)>> {
        let mut out = Vec::new();
        for (id, f) in self.flows.up.iter().filter(|(_, f)| f.stage == UpStage::Released) {
            let mut p = Vec::new();
            dup_publish(f.copy.as_ref()?, &mut p);
            out.push((*id, p));
        }
        Some(out)
    }

    /// What a failed broker owed the client for its deliveries the client has (QoS 2, after
    /// the client's PUBREC): the PUBREL, which meshgate sends in its place.
    pub fn owed_by_failed_broker(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (id, f) in &self.flows.down {
            if *f == DownFlow::Received {
                out.extend_from_slice(&pubrel(*id));
            }
        }
        out
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
        let Track { subs, up, down, flows, pings_open } = self;
        let version = subs.version;
        let cap = if from_client { up } else { down };
        // Room for copies, updated as they are taken within one read.
        let room = std::cell::Cell::new(if flows.keep_copies { COPY_LIMIT.saturating_sub(flows.copied) } else { 0 });
        let want = |h: Header| -> Want {
            match h.kind() {
                kind::PUBLISH if h.first_byte & 0x06 == 0 => Want::Skip,
                // A copy of the client's PUBLISH, while the session has room for it (else
                // only its packet identifier).
                kind::PUBLISH if from_client && h.remaining as usize <= room.get() => Want::Whole(room.get()),
                kind::PUBLISH | kind::PUBACK | kind::PUBREL | kind::PUBCOMP => Want::PacketId,
                // An MQTT 5 PUBREC with a failure reason ends the flow.
                kind::PUBREC => Want::Whole(3),
                kind::SUBSCRIBE | kind::UNSUBSCRIBE if from_client => Want::Whole(CAPTURE_LIMIT),
                // MQTT 5 DISCONNECT can end the session (Session Expiry Interval 0).
                kind::DISCONNECT if from_client && version == 5 => Want::Whole(CAPTURE_LIMIT),
                kind::SUBACK | kind::UNSUBACK if !from_client => Want::Whole(CAPTURE_LIMIT),
                _ => Want::Skip,
            }
        };
        scanner.feed_capture(
            data,
            want,
            cap,
            |h: Header| {
                *packets += 1;
                match h.kind() {
                    kind::PINGREQ if from_client => *pings_open += 1,
                    kind::PINGRESP if !from_client => *pings_open = pings_open.saturating_sub(1),
                    _ => {}
                }
            },
            |h, body, whole| match h.kind() {
                kind::PUBLISH | kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP => {
                    flows.seen(from_client, h, body, whole);
                    room.set(if flows.keep_copies { COPY_LIMIT.saturating_sub(flows.copied) } else { 0 });
                }
                _ => subs.captured(from_client, h, whole.then_some(&body[..])),
            },
        )
    }
}

/// Appends a copied PUBLISH, marked DUP.
fn dup_publish((first, body): &(u8, Vec<u8>), out: &mut Vec<u8>) {
    out.push(first | 0x08);
    crate::mqtt::encode_length(body.len(), out);
    out.extend_from_slice(body);
}

/// PUBREL for `packet_id` (its fixed header has flag bits 0010).
pub fn pubrel(packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [0x62, 2, id[0], id[1]]
}

impl Flows {
    /// One QoS packet going `from_client` or to it; `body` as far as `Track::feed` asked.
    fn seen(&mut self, from_client: bool, h: Header, body: &mut Vec<u8>, whole: bool) {
        if h.kind() == kind::PUBLISH {
            let Some(id) = publish_id(body) else { return };
            if from_client {
                // A whole body is a copy only if one was asked for (else it is the start).
                let copy = (whole && body.len() == h.remaining as usize && self.keep_copies)
                    .then(|| (h.first_byte, std::mem::take(body)));
                self.end_up(id);
                self.copied += copy.as_ref().map_or(0, |(_, b)| b.len());
                self.up.push((id, UpFlow { stage: UpStage::Sent, copy }));
            } else {
                self.end_down(id);
                self.down.push((id, DownFlow::Sent));
            }
            return;
        }
        let Some((id, reason)) = ack_of(body) else { return };
        let failed = reason >= 0x80;
        match (h.kind(), from_client) {
            // The broker's answers to the client's flows.
            (kind::PUBACK | kind::PUBCOMP, false) => self.end_up(id),
            (kind::PUBREC, false) if failed => self.end_up(id),
            (kind::PUBREC, false) => self.set_up(id, UpStage::Received),
            (kind::PUBREL, true) => self.set_up(id, UpStage::Released),
            // The client's answers to the broker's.
            (kind::PUBACK | kind::PUBCOMP, true) => self.end_down(id),
            (kind::PUBREC, true) if failed => self.end_down(id),
            (kind::PUBREC, true) => self.set_down(id, DownFlow::Received),
            (kind::PUBREL, false) => self.set_down(id, DownFlow::Released),
            _ => {}
        }
    }
}

impl Subs {
    /// A request awaiting its answer; one reusing a pending identifier replaces it, as its
    /// answer will be to the new one.
    fn pend(&mut self, id: u16, request: Pending) {
        self.pending.retain(|(i, _)| *i != id);
        self.pending.push((id, request));
    }

    fn mark_incomplete(&mut self) {
        self.incomplete = true;
        if let Some(r) = &self.record {
            r.durable.mark_incomplete(&r.client_id);
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
                        r.durable.forget(&r.client_id, &r.broker);
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
                    self.pend(s.packet_id, Pending::Subscribe(subs));
                }
            } else if let Some(u) = parse_unsubscribe(version, body) {
                self.pend(u.packet_id, Pending::Unsubscribe(u.filters));
            }
            return;
        }
        let Some(ack) = body.and_then(|b| parse_ack(version, b)) else { return };
        let answered = self.pending.iter().position(|(id, _)| *id == ack.packet_id);
        let answered = answered.map(|i| self.pending.swap_remove(i).1);
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
                    r.durable.add(&r.client_id, ok);
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
                    r.durable.remove(&r.client_id, &gone);
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
        let mut t = Track::new(4, 100).with_record(d.clone(), "c".into(), "b1".into());
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
        let mut t = Track::new(5, 100).with_record(d.clone(), "v5".into(), "b1".into());
        let mut up = FrameScanner::new(1 << 20);
        let mut n = 0;
        // DISCONNECT reason 0, session expiry 0.
        t.feed(true, &mut up, &[0xe0, 0x07, 0, 5, 0x11, 0, 0, 0, 0], &mut n).unwrap();
        assert!(d.placement("v5").is_none());
    }

    #[test]
    fn a_clean_session_keeps_its_own_subscriptions() {
        let mut t = Track::new(4, 1);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        t.feed(true, &mut up, &encode_subscribe(4, 1, &[], &[("a", 0), ("b", 0)]), &mut n).unwrap();
        t.feed(false, &mut down, &[0x90, 0x04, 0, 1, 0, 0], &mut n).unwrap();
        assert_eq!(t.subscriptions(), None, "one more than max_subs: not all known");
    }

    #[test]
    fn qos_flows_are_counted_open_until_finished_each_way() {
        let mut t = Track::new(4, 10);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        let q1 = crate::mqtt::encode::publish_with(4, "t", b"x", 1, false, 7);
        let q2 = crate::mqtt::encode::publish_with(4, "t", b"x", 2, false, 8);
        let q0 = crate::mqtt::encode::publish(4, "t", b"x");
        t.feed(true, &mut up, &[q1.clone(), q2.clone(), q0.clone()].concat(), &mut n).unwrap();
        assert_eq!((t.up_open(), t.down_open()), (2, 0));
        // The broker: PUBACK 7, PUBREC 8 (still open), then a QoS 1 delivery to the client.
        t.feed(false, &mut down, &[0x40, 2, 0, 7, 0x50, 2, 0, 8], &mut n).unwrap();
        t.feed(false, &mut down, &q1, &mut n).unwrap();
        assert_eq!((t.up_open(), t.down_open(), t.settled()), (1, 1, false));
        // The client: PUBREL 8, PUBACK 7 (its delivery); the broker: PUBCOMP 8.
        t.feed(true, &mut up, &[0x62, 2, 0, 8, 0x40, 2, 0, 7], &mut n).unwrap();
        t.feed(false, &mut down, &[0x70, 2, 0, 8], &mut n).unwrap();
        assert!(t.settled(), "{} {}", t.up_open(), t.down_open());
    }

    #[test]
    fn a_failed_brokers_unfinished_flows_are_sent_again_or_finished_for_it() {
        let mut t = Track::new(4, 10);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        let p = |qos, id| crate::mqtt::encode::publish_with(4, "t", &[id as u8; 3], qos, false, id);
        // The client: QoS 1 id 1 (acked), QoS 1 id 2, QoS 2 id 3 (PUBREC'd, then released),
        // QoS 2 id 4; split mid-packet.
        let sent = [p(1, 1), p(1, 2), p(2, 3), p(2, 4)].concat();
        t.feed(true, &mut up, &sent[..5], &mut n).unwrap();
        t.feed(true, &mut up, &sent[5..], &mut n).unwrap();
        t.feed(false, &mut down, &[0x40, 2, 0, 1, 0x50, 2, 0, 3], &mut n).unwrap();
        t.feed(true, &mut up, &pubrel(3), &mut n).unwrap();
        // The broker: QoS 2 id 9 the client PUBRECs (its PUBREL never comes), QoS 1 id 8.
        t.feed(false, &mut down, &[p(2, 9), p(1, 8)].concat(), &mut n).unwrap();
        t.feed(true, &mut up, &[0x50, 2, 0, 9], &mut n).unwrap();
        assert_eq!((t.up_open(), t.down_open()), (3, 2));
        let dup = |qos: u8, id| {
            let mut b = p(qos, id);
            b[0] |= 0x08;
            b
        };
        assert_eq!(t.unacknowledged(), Some([dup(1, 2), dup(2, 4)].concat()), "unacknowledged ones, DUP, in order");
        // QoS 2 id 3 was released: it is finished on the new broker, from its copy.
        assert_eq!(t.released(), Some(vec![(3, dup(2, 3))]));
        // The broker's delivery 9 the client has: meshgate sends its PUBREL.
        assert_eq!(t.owed_by_failed_broker(), pubrel(9).to_vec());
        assert!(!t.ready_to_leave_failed_broker(), "deliveries 8 and 9 not finished by the client");
        let owed = t.owed_by_failed_broker();
        t.feed(false, &mut down, &owed, &mut n).unwrap();
        t.feed(true, &mut up, &[0x70, 2, 0, 9, 0x40, 2, 0, 8], &mut n).unwrap();
        assert!(t.ready_to_leave_failed_broker());
        // The new broker's PUBCOMP for 3 (after meshgate finished it there) reaches the client.
        t.feed(false, &mut down, &[0x70, 2, 0, 3], &mut n).unwrap();
        assert_eq!((t.up_open(), t.down_open()), (2, 0));
        assert_eq!(t.up_ids(), vec![2, 4]);
    }

    #[test]
    fn a_pubrec_not_yet_answered_by_the_client_holds_a_failed_brokers_switch() {
        let mut t = Track::new(4, 10);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        t.feed(true, &mut up, &crate::mqtt::encode::publish_with(4, "t", b"x", 2, false, 3), &mut n).unwrap();
        t.feed(false, &mut down, &[0x50, 2, 0, 3], &mut n).unwrap();
        assert!(!t.ready_to_leave_failed_broker(), "the client's PUBREL is to come");
        t.feed(true, &mut up, &pubrel(3), &mut n).unwrap();
        assert!(t.ready_to_leave_failed_broker());
        assert_eq!(t.released().map(|r| r.len()), Some(1));
    }

    #[test]
    fn a_session_without_copies_copies_nothing_and_cannot_resend() {
        let mut t = Track::new(4, 10).without_copies();
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        t.feed(true, &mut up, &crate::mqtt::encode::publish_with(4, "t", b"x", 1, false, 3), &mut n).unwrap();
        assert_eq!((t.up_open(), t.flows.copied, t.unacknowledged()), (1, 0, None));
        t.feed(false, &mut down, &[0x40, 2, 0, 3], &mut n).unwrap();
        assert_eq!(t.unacknowledged(), Some(vec![]));
    }

    #[test]
    fn an_mqtt5_pubrec_with_a_failure_reason_ends_the_flow() {
        let mut t = Track::new(5, 10);
        let (mut up, mut down) = (FrameScanner::new(1 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        t.feed(true, &mut up, &crate::mqtt::encode::publish_with(5, "t", b"x", 2, false, 5), &mut n).unwrap();
        // PUBREC id 5, reason 0x87 (not authorized), no properties.
        t.feed(false, &mut down, &[0x50, 3, 0, 5, 0x87], &mut n).unwrap();
        assert!(t.settled());
    }

    #[test]
    fn copies_stop_at_the_limit_and_the_flow_is_still_counted() {
        let mut t = Track::new(4, 10);
        let (mut up, mut down) = (FrameScanner::new(4 << 20), FrameScanner::new(u32::MAX));
        let mut n = 0;
        let big = crate::mqtt::encode::publish_with(4, "t", &vec![0; COPY_LIMIT + 10], 1, false, 1);
        t.feed(true, &mut up, &big, &mut n).unwrap();
        assert_eq!((t.up_open(), t.unacknowledged()), (1, None));
        t.feed(false, &mut down, &[0x40, 2, 0, 1], &mut n).unwrap();
        assert_eq!((t.up_open(), t.unacknowledged()), (0, Some(vec![])));
        assert_eq!(t.flows.copied, 0);
    }
}
