//! Loop-free replication between the brokers: one MQTT 5 link per broker, copies marked with their origin.
//!
//! Each link subscribes to the replicated filters with **No Local** (the broker never sends a
//! link what the link itself published) and **Retain As Published**, and with Retain Handling
//! "never" so that only live publishes arrive on it. What a link receives from its broker was
//! published there by a client; it is forwarded once to every other broker through their
//! links, with a user property `meshgate-origin` naming the broker it came from. A copy can
//! reach a link only if someone else re-published it, and marked messages are never forwarded,
//! so nothing loops and each message reaches each broker once. (A Mosquitto bridge mesh has no
//! such rule: measured, one publish reached one subscriber 54,034 times in 4 s; see
//! docs/replication.md.)
//!
//! Retained state converges through [`retained::Store`]; lag is measured by probe messages
//! that travel the real path (published on broker i by a probe client, received on broker j
//! by another).

pub mod retained;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, PublishProperties, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{topic_matches, Config, ReplicationConfig};
use crate::events::unix_ms;
use crate::health::probe::PROBE_TOPIC_PREFIX;
use crate::pool::Pool;
use crate::upstream::client::RawClient;
use crate::upstream::Upstream;
use retained::{Action, Store, Value};

/// How a term's retained record passes from one leader to the next (`coordination`, through
/// etcd). A record is only worth handing over whole: one that missed the last changes before
/// its leader died would set brokers back to older values, so a leader hands its record over
/// when its term ends cleanly, and the next term starts from it only if it was handed over.
pub trait HandOver: Send + Sync {
    /// At a term's start: the record the previous leader handed over, if it ended its term
    /// cleanly (taken, so a later leader cannot start from it again). `Err` when that could
    /// not be settled (etcd did not answer): the term must not start, or a record left there
    /// could be taken by a later leader, long after it was current.
    fn take(&self) -> futures_util::future::BoxFuture<'_, Result<Option<String>, String>>;
    /// At a term's end: this leader's record, for the next one.
    fn hand_over(&self, record: String) -> futures_util::future::BoxFuture<'_, ()>;
}

/// Whether replication runs in terms while this instance leads (`[coordination]`), and how
/// the retained record passes between terms.
pub struct Terms {
    pub leading: watch::Receiver<bool>,
    pub hand_over: Arc<dyn HandOver>,
}

/// The user property that marks a copy and names its origin broker.
pub const ORIGIN: &str = "meshgate-origin";
/// Topic prefix of the lag probes; these are replicated like any message, on purpose.
pub const LAG_TOPIC_PREFIX: &str = "meshgate/lag/";

/// How long a broker keeps a persistent link's session (and queues for it) while no instance
/// leads replication (`[coordination]` only).
pub const LINK_SESSION_EXPIRY_S: u32 = 24 * 3600;

struct Metrics {
    forwarded: IntCounterVec,
    dropped: IntCounterVec,
    duplicated: IntCounterVec,
    redelivered: IntCounterVec,
    lag: GaugeVec,
    link_up: prometheus::IntGaugeVec,
    retained_repairs: IntCounterVec,
}

impl Metrics {
    fn new(registry: &Registry, brokers: &[crate::config::BrokerConfig]) -> Metrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap();
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let lag = GaugeVec::new(
            Opts::new(
                "meshgate_replication_lag_seconds",
                "Last measured time for a message published on `from` to reach `to`",
            ),
            &["from", "to"],
        )
        .unwrap();
        registry.register(Box::new(lag.clone())).expect("unique metric");
        let link_up = prometheus::IntGaugeVec::new(
            Opts::new("meshgate_replication_link_up", "1 while meshgate's replication link to the broker is connected"),
            &["broker"],
        )
        .unwrap();
        registry.register(Box::new(link_up.clone())).expect("unique metric");
        let dropped = counter(
            "meshgate_replication_dropped_total",
            "Copies not sent: the target link was down or its queue full, or the target broker refused them",
            &["to", "reason"],
        );
        // At zero from the first scrape, so that increase() and alerts see the first drop.
        for b in brokers {
            for reason in ["link_down", "queue_full", "refused"] {
                dropped.with_label_values(&[&b.name, reason]);
            }
        }
        Metrics {
            forwarded: counter(
                "meshgate_replication_forwarded_total",
                "Copies sent from one broker to another",
                &["from", "to"],
            ),
            dropped,
            duplicated: counter(
                "meshgate_replication_duplicates_total",
                "Messages received that were already copies (marked with their origin), and so not forwarded again",
                &["broker"],
            ),
            redelivered: counter(
                "meshgate_replication_redelivered_total",
                "Messages a broker delivered to its link again (after a reconnect or a leader takeover) and that were forwarded again: each may reach the other brokers twice",
                &["broker"],
            ),
            lag,
            link_up,
            retained_repairs: counter(
                "meshgate_replication_retained_repairs_total",
                "Retained values set, deleted or adopted to make a broker current",
                &["broker", "action"],
            ),
        }
    }
}

/// One broker's link.
pub struct Link {
    pub name: String,
    pub address: String,
    /// How this link, its snapshots and its lag probes reach the broker (TCP or TLS).
    config: crate::config::BrokerConfig,
    /// The pool's view of this broker, looked up once: its probe state is read per copy.
    broker: Option<Arc<crate::pool::Broker>>,
    client: AsyncClient,
    connected: AtomicBool,
    /// Copies were dropped while probes said the broker was down but the link stayed up (a
    /// short hang): its retained state must be repaired once it is back.
    needs_repair: AtomicBool,
    since_ms: AtomicU64,
    received: AtomicU64,
    /// Counts the link's connections: an acknowledgement belongs to the one it came on.
    generation: AtomicU64,
    /// With `[coordination]` only: a single instance's clean links keep rumqttc's own
    /// acknowledgements and track nothing per copy.
    inflight: Option<Mutex<Inflight>>,
}

/// The copies a link carries, in the order rumqttc sends them, each with the message it is a
/// copy of: that message is acknowledged to its own broker only once every copy is with its
/// target broker (or the target is down). A leader that dies leaves its unacknowledged messages
/// with their brokers, which deliver them again to the next leader: nothing acknowledged by a
/// broker to a link is lost on the way.
#[derive(Default)]
struct Inflight {
    /// Handed to rumqttc, not yet seen going out.
    queued: VecDeque<Option<Arc<Source>>>,
    /// Sent, until the target broker's PUBACK (or PUBREC).
    sent: HashMap<u16, Option<Arc<Source>>>,
    /// How many of `queued` were handed over before the connection was lost: rumqttc keeps
    /// them for the next session, and drops them (with every retransmission) when the broker
    /// answers without one.
    cut: usize,
}

/// A message received on a link, acknowledged to its broker when its last copy is delivered.
struct Source {
    link: Arc<Link>,
    publish: Publish,
    generation: u64,
    remaining: AtomicUsize,
}

impl Source {
    fn done(&self) {
        // Acknowledged on the connection it came on only: after a reconnect the broker sends
        // it again, and that delivery is acknowledged instead.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && self.link.generation.load(Ordering::Acquire) == self.generation
            && self.link.client.try_ack(&self.publish).is_err()
        {
            // The link's queue is full (its broker is slow to take copies): an acknowledgement
            // is never dropped, since a broker stops delivering once its window of
            // unacknowledged messages is full.
            let (client, publish) = (self.link.client.clone(), self.publish.clone());
            tokio::spawn(async move {
                let _ = client.ack(&publish).await;
            });
        }
    }
}

fn done(source: Option<Arc<Source>>) {
    if let Some(s) = source {
        s.done();
    }
}

impl Link {
    /// Hands a copy to rumqttc and remembers whose it is, in the order rumqttc will send it.
    fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: bytes::Bytes,
        props: PublishProperties,
        source: Option<Arc<Source>>,
    ) -> Result<(), String> {
        let Some(inflight) = &self.inflight else {
            return self
                .client
                .try_publish_with_properties(topic, qos, retain, payload, props)
                .map_err(|e| e.to_string());
        };
        let mut f = inflight.lock();
        if let Some(s) = &source {
            s.remaining.fetch_add(1, Ordering::AcqRel);
        }
        match self.client.try_publish_with_properties(topic, qos, retain, payload, props) {
            Ok(()) => {
                f.queued.push_back(source);
                Ok(())
            }
            Err(e) => {
                drop(f);
                done(source);
                Err(e.to_string())
            }
        }
    }

    fn went_out(&self, pkid: u16) {
        let Some(inflight) = &self.inflight else { return };
        let mut f = inflight.lock();
        // A retransmission after a reconnect reuses its packet id; it is not a new copy.
        if pkid != 0 && f.sent.contains_key(&pkid) {
            return;
        }
        let source = f.queued.pop_front().flatten();
        if pkid == 0 {
            drop(f);
            done(source);
        } else {
            f.sent.insert(pkid, source);
        }
    }

    fn delivered(&self, pkid: u16) {
        let Some(inflight) = &self.inflight else { return };
        let source = inflight.lock().sent.remove(&pkid).flatten();
        done(source);
    }

    /// The connection was lost: what was handed over until now waits for the next session.
    fn lost(&self) {
        let Some(inflight) = &self.inflight else { return };
        let mut f = inflight.lock();
        f.cut = f.queued.len();
        drop(f);
        self.abandon();
    }

    /// Connected again. Without a session rumqttc has dropped every retransmission and every
    /// copy handed over before the loss: none of them will go out, so none is waited for.
    fn reconnected(&self, session_present: bool) {
        let Some(inflight) = &self.inflight else { return };
        let mut f = inflight.lock();
        if !session_present {
            let cut = f.cut.min(f.queued.len());
            f.queued.drain(..cut);
            f.sent.clear();
        }
        f.cut = 0;
    }

    /// The target is gone (link lost, or probes say down): its copies no longer hold their
    /// messages back; the broker is caught up on retained state when it returns.
    fn abandon(&self) {
        let Some(inflight) = &self.inflight else { return };
        let mut f = inflight.lock();
        // The packet ids stay (without their messages): rumqttc sends them again after a
        // reconnect, and a retransmission must not be taken for the next new copy.
        let mut gone: Vec<Arc<Source>> = f.sent.values_mut().filter_map(Option::take).collect();
        gone.extend(f.queued.iter_mut().filter_map(Option::take));
        drop(f);
        for s in gone {
            s.done();
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    pub broker: String,
    pub address: String,
    pub connected: bool,
    pub since_ms: u64,
    pub received: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LagView {
    pub from: String,
    pub to: String,
    pub lag_ms: f64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// Replication runs in this process now (with `[coordination]`: this instance leads it).
    pub active: bool,
    pub links: Vec<LinkView>,
    pub lag: Vec<LagView>,
    pub retained_topics: usize,
    pub tombstones: usize,
}

pub struct Replication {
    cfg: ReplicationConfig,
    brokers: Vec<crate::config::BrokerConfig>,
    /// With `[coordination]`: links keep persistent sessions under fixed client ids, so each
    /// broker queues what the next leader must forward.
    persistent: bool,
    /// The links of the running term (empty while another instance leads).
    links: ArcSwap<Vec<Arc<Link>>>,
    store: Mutex<Store>,
    dirty: AtomicBool,
    metrics: Metrics,
    pool: Arc<Pool>,
    upstream: Arc<Upstream>,
    lag: Mutex<HashMap<(String, String), (f64, u64)>>,
}

/// rumqttc options for a connection to `broker`, through `upstream`'s choice of TCP or TLS.
fn mqtt_options(upstream: &Upstream, broker: &crate::config::BrokerConfig, client_id: String) -> MqttOptions {
    let (host, port) = upstream.mqtt_address(broker);
    let mut opts = MqttOptions::new(client_id, host, port);
    match upstream.mqtt_transport(broker) {
        Ok(t) => {
            opts.set_transport(t);
        }
        // Configuration validation requires a CA for TLS brokers: this is only reachable when
        // the CA vanished, and then the link fails its handshakes visibly.
        Err(e) => warn!(broker = %broker.name, "replication link: {e}"),
    }
    opts.set_max_packet_size(Some(256 * 1024 * 1024));
    // rumqttc allocates a slot for every packet id up to this limit when the client is made,
    // whatever the broker then allows (Mosquitto: 20): by default 65,536 slots of a few hundred
    // bytes, 16 MB per link, 82 MB resident for an idle daemon with five brokers.
    opts.set_outgoing_inflight_upper_limit(LINK_INFLIGHT);
    opts
}

/// Copies a link has sent and not yet had acknowledged, at most (the broker's receive maximum
/// lowers it further): far more than a loopback or LAN link needs to keep a broker busy.
const LINK_INFLIGHT: u16 = 1024;

impl Replication {
    /// Loads the retained record; no link exists until a term starts.
    pub fn new(config: &Config, pool: &Arc<Pool>, upstream: &Arc<Upstream>, persistent: bool) -> Arc<Replication> {
        let cfg = config.replication.clone();
        let store = match &cfg.state_file {
            Some(path) => Store::load(path).unwrap_or_else(|e| {
                warn!("replication state unreadable, starting empty: {e}");
                Store::default()
            }),
            None => Store::default(),
        };
        Arc::new(Replication {
            cfg,
            brokers: config.brokers.clone(),
            persistent,
            links: ArcSwap::from_pointee(Vec::new()),
            store: Mutex::new(store),
            dirty: AtomicBool::new(false),
            metrics: Metrics::new(&pool.metrics.registry, &config.brokers),
            pool: pool.clone(),
            upstream: upstream.clone(),
            lag: Mutex::new(HashMap::new()),
        })
    }

    /// One link per broker, not yet connected, with their event loops.
    fn build_links(&self) -> (Arc<Vec<Arc<Link>>>, Vec<EventLoop>) {
        let mut links = Vec::new();
        let mut loops = Vec::new();
        for b in &self.brokers {
            let id = match self.persistent {
                // The same id from every instance: the broker's client-id takeover closes a
                // stale leader's link when the next one connects.
                true => format!("meshgate-repl-{}", b.name),
                false => format!("meshgate-repl-{}-{}", b.name, std::process::id()),
            };
            let mut opts = mqtt_options(&self.upstream, b, id);
            // rumqttc's shortest keepalive; a silently cut link is noticed in about 7.5 s, and
            // sooner through the health probes (copies to a broker they mark down are held back).
            opts.set_keep_alive(Duration::from_secs(5));
            opts.set_clean_start(!self.persistent);
            if self.persistent {
                opts.set_session_expiry_interval(Some(LINK_SESSION_EXPIRY_S));
            }
            // With coordination a message is acknowledged to its broker once its copies are
            // delivered (`Inflight`), so a leader's death loses nothing. A single instance keeps
            // rumqttc's own acknowledgements (clean sessions: nothing would be redelivered).
            opts.set_manual_acks(self.persistent);
            let (client, eventloop) = AsyncClient::new(opts, self.cfg.queue);
            links.push(Arc::new(Link {
                name: b.name.clone(),
                address: b.address.clone(),
                config: b.clone(),
                broker: self.pool.broker(&b.name),
                client,
                connected: AtomicBool::new(false),
                needs_repair: AtomicBool::new(false),
                since_ms: AtomicU64::new(unix_ms(SystemTime::now())),
                received: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                inflight: self.persistent.then(|| Mutex::new(Inflight::default())),
            }));
            loops.push(eventloop);
        }
        (Arc::new(links), loops)
    }

    /// Starts the state saver and replication: at once, or with `[coordination]` whenever
    /// `leading` says this instance leads (and stopped as soon as it says otherwise).
    pub fn start(
        config: &Config,
        pool: &Arc<Pool>,
        upstream: &Arc<Upstream>,
        tracker: &TaskTracker,
        stop: &CancellationToken,
        terms: Option<Terms>,
    ) -> Arc<Replication> {
        let repl = Replication::new(config, pool, upstream, terms.is_some());
        tracker.spawn(repl.clone().saver(stop.clone()));
        match terms {
            None => repl.start_term(tracker, stop),
            Some(terms) => {
                tracker.spawn(repl.clone().follow(terms, stop.clone()));
            }
        }
        repl
    }

    /// Every link, the lag probes: one term of replication, until `stop`.
    fn start_term(self: &Arc<Self>, tracker: &TaskTracker, stop: &CancellationToken) {
        let (links, loops) = self.build_links();
        self.links.store(links.clone());
        for (i, eventloop) in loops.into_iter().enumerate() {
            tracker.spawn(self.clone().link_loop(links.clone(), i, eventloop, stop.clone()));
        }
        for i in 0..links.len() {
            tracker.spawn(self.clone().lag_probe(links.clone(), i, stop.clone()));
        }
        info!(brokers = links.len(), include = %self.cfg.include.join(" "), "replication started");
    }

    /// Runs a term while this instance leads; a term ends (every link closed) before the
    /// leadership could pass to another instance.
    async fn follow(self: Arc<Self>, terms: Terms, stop: CancellationToken) {
        let Terms { mut leading, hand_over } = terms;
        loop {
            while !*leading.borrow_and_update() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = leading.changed() => if r.is_err() { return },
                }
            }
            if !self.take_record(&*hand_over, &leading, &stop).await {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            let term = stop.child_token();
            let tasks = TaskTracker::new();
            self.start_term(&tasks, &term);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = leading.changed() => if r.is_err() || !*leading.borrow_and_update() { break },
                }
            }
            term.cancel();
            tasks.close();
            tasks.wait().await;
            self.end_term();
            let record = serde_json::to_string(&*self.store.lock()).expect("retained record serializes");
            hand_over.hand_over(record).await;
            info!("replication stopped: this instance no longer leads it");
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// A term starts from the record the previous leader handed over; without one (the
    /// previous leader died, or this is the first term) from the brokers' own retained state,
    /// since another instance may have led since this one's record was written.
    /// Returns false when the term must not start (leadership lost, or stopping) before the
    /// record could be taken.
    async fn take_record(
        &self,
        hand_over: &dyn HandOver,
        leading: &watch::Receiver<bool>,
        stop: &CancellationToken,
    ) -> bool {
        let taken = loop {
            match hand_over.take().await {
                Ok(taken) => break taken,
                Err(e) => warn!("{e}: the replication term waits until it is settled"),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if !*leading.borrow() {
                return false;
            }
        };
        let store = match taken.as_deref().map(serde_json::from_str::<Store>) {
            Some(Ok(store)) => {
                info!(
                    topics = store.entries.len(),
                    "replication starts from the retained record the previous leader handed over"
                );
                store
            }
            Some(Err(e)) => {
                warn!("the retained record handed over is unreadable, starting from the brokers' state: {e}");
                Store::default()
            }
            None => Store::default(),
        };
        *self.store.lock() = store;
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    /// After a term: no link left, nothing held (what was not acknowledged is delivered to the
    /// next leader by the brokers).
    fn end_term(&self) {
        let links = self.links.swap(Arc::new(Vec::new()));
        for l in links.iter() {
            // Breaks the cycles between links' pending copies and the links they came on.
            if let Some(inflight) = &l.inflight {
                let mut f = inflight.lock();
                f.sent.clear();
                f.queued.clear();
            }
            if let Some(b) = &l.broker {
                b.set_replicated(false);
            }
            self.metrics.link_up.with_label_values(&[&l.name]).set(0);
        }
    }

    fn replicated(&self, topic: &str) -> bool {
        !topic.starts_with(PROBE_TOPIC_PREFIX)
            && !topic.starts_with('$')
            && self.cfg.include.iter().any(|f| topic_matches(f, topic))
            && !self.cfg.exclude.iter().any(|f| topic_matches(f, topic))
    }

    fn qos(&self, q: QoS) -> QoS {
        let cap = match self.cfg.max_qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        if (q as u8) < (cap as u8) {
            q
        } else {
            cap
        }
    }

    async fn link_loop(
        self: Arc<Self>,
        links: Arc<Vec<Arc<Link>>>,
        i: usize,
        mut eventloop: EventLoop,
        stop: CancellationToken,
    ) {
        let link = links[i].clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = link.client.try_disconnect();
                    return;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    link.reconnected(ack.session_present);
                    link.generation.fetch_add(1, Ordering::AcqRel);
                    link.connected.store(true, Ordering::Relaxed);
                    if let Some(b) = &link.broker {
                        b.set_replicated(true);
                    }
                    link.since_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                    self.metrics.link_up.with_label_values(&[&link.name]).set(1);
                    let filters: Vec<Filter> = self
                        .cfg
                        .include
                        .iter()
                        .map(|f| Filter {
                            path: f.clone(),
                            qos: self.qos(QoS::ExactlyOnce),
                            nolocal: true,
                            preserve_retain: true,
                            retain_forward_rule: RetainForwardRule::Never,
                        })
                        .collect();
                    if let Err(e) = link.client.try_subscribe_many(filters) {
                        warn!(broker = %link.name, "replication subscribe not queued: {e}");
                    }
                    self.pool.events.push(
                        "replication",
                        Some(&link.name),
                        format!("replication link to {} connected", link.name),
                    );
                    tokio::spawn(self.clone().reconcile(links.clone(), i));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(&links, i, p),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => link.went_out(pkid),
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if !matches!(a.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                        self.metrics.dropped.with_label_values(&[&link.name, "refused"]).inc();
                    }
                    link.delivered(a.pkid)
                }
                Ok(Event::Incoming(Packet::PubRec(r))) => link.delivered(r.pkid),
                Ok(_) => {}
                Err(e) => {
                    link.lost();
                    if let Some(b) = &link.broker {
                        b.set_replicated(false);
                    }
                    if link.connected.swap(false, Ordering::Relaxed) {
                        self.metrics.link_up.with_label_values(&[&link.name]).set(0);
                        link.since_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                        self.pool.events.push_at(
                            crate::events::Severity::Warn,
                            "replication",
                            Some(&link.name),
                            format!("replication link to {} lost: {e}", link.name),
                        );
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    fn on_publish(&self, links: &[Arc<Link>], i: usize, p: Publish) {
        let from = &links[i];
        from.received.fetch_add(1, Ordering::Relaxed);
        // Held until every copy is delivered; released at the end of this function when none
        // was sent (or every copy is already out).
        let source = (self.persistent && p.qos != QoS::AtMostOnce).then(|| {
            Arc::new(Source {
                link: from.clone(),
                publish: p.clone(),
                generation: from.generation.load(Ordering::Acquire),
                remaining: AtomicUsize::new(1),
            })
        });
        self.forward(links, i, p, source.clone());
        done(source);
    }

    fn forward(&self, links: &[Arc<Link>], i: usize, p: Publish, source: Option<Arc<Source>>) {
        let from = &links[i];
        let Ok(topic) = std::str::from_utf8(&p.topic) else { return };
        let mut props = p.properties.unwrap_or_default();
        if props.user_properties.iter().any(|(k, _)| k == ORIGIN) {
            // A copy that came back (another replicator, a bridge): forwarding it again is how
            // storms start.
            self.metrics.duplicated.with_label_values(&[&from.name]).inc();
            return;
        }
        if !self.replicated(topic) {
            return;
        }
        if p.dup && !self.persistent {
            // A clean link is never sent anything again: a DUP here is someone else's
            // redelivery, and forwarding it again is how storms start.
            self.metrics.duplicated.with_label_values(&[&from.name]).inc();
            return;
        }
        if p.dup {
            // Delivered before to a link that did not acknowledge it (a leader that died, a
            // link that dropped): it may or may not have been forwarded then, so it is
            // forwarded now and counted as a possible duplicate.
            self.metrics.redelivered.with_label_values(&[&from.name]).inc();
            debug!(broker = %from.name, topic, "redelivered message forwarded again");
        }
        if p.retain {
            let mut store = self.store.lock();
            store.write(topic, &p.payload, p.qos as u8, unix_ms(SystemTime::now()));
            self.dirty.store(true, Ordering::Relaxed);
        }
        // Per-subscription ids and aliases belong to the link's own connection, not the message.
        props.subscription_identifiers.clear();
        props.topic_alias = None;
        props.user_properties.push((ORIGIN.to_string(), from.name.clone()));
        let qos = self.qos(p.qos);
        for (j, to) in links.iter().enumerate() {
            if j == i {
                continue;
            }
            self.send(
                to,
                Copy { topic, qos, retain: p.retain, payload: p.payload.clone(), props: props.clone() },
                &from.name,
                source.clone(),
            );
        }
    }

    fn send(&self, to: &Link, copy: Copy<'_>, from: &str, source: Option<Arc<Source>>) {
        let Copy { topic, qos, retain, payload, props } = copy;
        // The health probes notice a dead or hung broker well before the link's keepalive
        // does; copies sent into such a link would only be lost.
        let probed_down = to.broker.as_ref().is_some_and(|b| b.probe_up() == Some(false));
        if probed_down {
            to.needs_repair.store(true, Ordering::Relaxed);
        }
        // A link that has not connected yet in this term (a new leader's, while another link
        // already delivers what its broker queued) takes the copy into its queue: the broker is
        // up as far as the probes know. A link that was lost is down.
        let lost =
            !to.connected.load(Ordering::Relaxed) && (!self.persistent || to.generation.load(Ordering::Acquire) > 0);
        if lost || probed_down {
            // The broker is down: its clients are elsewhere; retained state is caught up when
            // the link returns.
            self.metrics.dropped.with_label_values(&[&to.name, "link_down"]).inc();
            return;
        }
        match to.publish(topic, qos, retain, payload, props, source) {
            Ok(()) => self.metrics.forwarded.with_label_values(&[from, &to.name]).inc(),
            Err(e) => {
                self.metrics.dropped.with_label_values(&[&to.name, "queue_full"]).inc();
                debug!(to = %to.name, "copy dropped: {e}");
            }
        }
    }

    /// Reads the broker's retained set and makes it current (see [`retained`]).
    async fn reconcile(self: Arc<Self>, links: Arc<Vec<Arc<Link>>>, i: usize) {
        let link = links[i].clone();
        let started = Instant::now();
        let since = self.store.lock().seq;
        let holds = match self.snapshot(&link.config).await {
            Ok(h) => h,
            Err(e) => {
                warn!(broker = %link.name, "cannot read retained messages for convergence: {e}");
                return;
            }
        };
        let actions = self.store.lock().reconcile(&holds, since, unix_ms(SystemTime::now()));
        self.dirty.store(true, Ordering::Relaxed);
        let n = actions.len();
        for a in actions {
            info!(broker = %link.name, "retained repair: {a:?}");
            let origin_props = |origin: &str| PublishProperties {
                user_properties: vec![(ORIGIN.to_string(), origin.to_string())],
                ..Default::default()
            };
            match a {
                Action::Set { topic, value } => {
                    self.metrics.retained_repairs.with_label_values(&[&link.name, "set"]).inc();
                    let q = self.qos(qos_of(value.qos));
                    let _ = link.publish(&topic, q, true, value.payload().into(), origin_props("meshgate"), None);
                }
                Action::Delete { topic } => {
                    self.metrics.retained_repairs.with_label_values(&[&link.name, "delete"]).inc();
                    let _ = link.publish(
                        &topic,
                        QoS::AtLeastOnce,
                        true,
                        bytes::Bytes::new(),
                        origin_props("meshgate"),
                        None,
                    );
                }
                Action::Adopt { topic, value } => {
                    self.metrics.retained_repairs.with_label_values(&[&link.name, "adopt"]).inc();
                    let q = self.qos(qos_of(value.qos));
                    for (j, to) in links.iter().enumerate() {
                        if j != i {
                            let copy = Copy {
                                topic: &topic,
                                qos: q,
                                retain: true,
                                payload: value.payload().into(),
                                props: origin_props(&link.name),
                            };
                            self.send(to, copy, &link.name, None);
                        }
                    }
                }
            }
        }
        if n > 0 {
            self.pool.events.push(
                "replication",
                Some(&link.name),
                format!(
                    "{}: {n} retained topic(s) brought up to date in {:.0} ms",
                    link.name,
                    started.elapsed().as_secs_f64() * 1000.0
                ),
            );
        }
    }

    /// The retained messages a broker holds now: subscribe to the replicated filters with a
    /// throwaway client and collect until the broker goes quiet.
    async fn snapshot(&self, broker: &crate::config::BrokerConfig) -> Result<HashMap<String, Value>, String> {
        let id = format!("meshgate-snap-{}-{}", std::process::id(), unix_ms(SystemTime::now()) % 1_000_000_000);
        let mut opts = mqtt_options(&self.upstream, broker, id);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let filters: Vec<Filter> = self.cfg.include.iter().map(|f| Filter::new(f.clone(), QoS::AtLeastOnce)).collect();
        client.subscribe_many(filters).await.map_err(|e| e.to_string())?;
        let mut holds = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Mosquitto sends every retained message right after the SUBACK. Live traffic keeps
        // flowing on the same subscription (with retain = 0), so the set is complete once no
        // retained message has come for 200 ms.
        let mut quiet_until: Option<Instant> = None;
        loop {
            let wait = match quiet_until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3),
            };
            match tokio::time::timeout(wait, eventloop.poll()).await {
                Err(_) if quiet_until.is_some() => break,
                Err(_) => return Err("no SUBACK within 3 s".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    quiet_until = Some(Instant::now() + Duration::from_millis(200))
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain => {
                    quiet_until = Some(Instant::now() + Duration::from_millis(200));
                    if let Ok(topic) = std::str::from_utf8(&p.topic) {
                        if self.replicated(topic) {
                            holds.insert(topic.to_string(), Value::new(&p.payload, p.qos as u8));
                        }
                    }
                }
                Ok(Ok(_)) => {}
            }
            if Instant::now() > deadline {
                return Err("retained set did not settle within 10 s".into());
            }
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        Ok(holds)
    }

    /// Expires old tombstones and saves the retained record when it changed (if a state file
    /// is configured).
    async fn saver(self: Arc<Self>, stop: CancellationToken) {
        let path = self.cfg.state_file.clone().map(Arc::new);
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => false,
            };
            // A target that probes say is down holds nothing back (a hung broker never answers).
            for l in self.links.load().iter() {
                if l.broker.as_ref().is_some_and(|b| b.probe_up() == Some(false)) {
                    l.abandon();
                }
            }
            let now = unix_ms(SystemTime::now());
            let expired = self.store.lock().expire(now, self.cfg.tombstone_ttl.as_millis() as u64);
            let changed = self.dirty.swap(false, Ordering::Relaxed) || expired > 0;
            if let (true, Some(path)) = (changed, &path) {
                let snapshot = self.store.lock().clone();
                let path = path.clone();
                let saved = tokio::task::spawn_blocking(move || snapshot.save(&path)).await;
                if let Err(e) = saved.unwrap_or_else(|e| Err(e.to_string())) {
                    warn!("cannot save replication state: {e}");
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Publishes a timestamped probe on broker `i` and measures when the copies arrive on the
    /// others: the real path, through the brokers and this process's links.
    async fn lag_probe(self: Arc<Self>, links: Arc<Vec<Arc<Link>>>, i: usize, stop: CancellationToken) {
        let me = links[i].clone();
        let id = format!("meshgate-lag-{}-{}", me.name, std::process::id());
        let started = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let client = RawClient::connect_via(&self.upstream, &me.config, &id, true, Duration::from_secs(2)).await;
            let Ok((mut c, 0, _)) = client else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            };
            if c.subscribe(&format!("{LAG_TOPIC_PREFIX}#"), 0, Duration::from_secs(2)).await.is_err() {
                continue;
            }
            let mut next = Instant::now();
            loop {
                if Instant::now() >= next {
                    next = Instant::now() + self.cfg.lag_interval;
                    // This probe client just reached the broker: if copies were dropped while
                    // it looked down, bring its retained state up to date now.
                    let up = me.broker.as_ref().is_none_or(|b| b.probe_up() != Some(false));
                    if up && me.connected.load(Ordering::Relaxed) && me.needs_repair.swap(false, Ordering::Relaxed) {
                        tokio::spawn(self.clone().reconcile(links.clone(), i));
                    }
                    let sent = started.elapsed().as_micros() as u64;
                    let topic = format!("{LAG_TOPIC_PREFIX}{}", me.name);
                    if c.publish(&topic, sent.to_string().as_bytes(), 0, false, Duration::from_secs(1)).await.is_err() {
                        break;
                    }
                }
                let wait = next.saturating_duration_since(Instant::now());
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = c.next_message(wait) => m,
                };
                match msg {
                    Err(_) => break,
                    Ok(None) => {}
                    Ok(Some(m)) => {
                        let from = m.topic.trim_start_matches(LAG_TOPIC_PREFIX).to_string();
                        let Ok(sent) = String::from_utf8_lossy(&m.payload).parse::<u64>() else { continue };
                        if from == me.name {
                            continue; // our own publish, delivered locally
                        }
                        let lag = (started.elapsed().as_micros() as u64).saturating_sub(sent) as f64 / 1e6;
                        self.metrics.lag.with_label_values(&[&from, &me.name]).set(lag);
                        self.lag.lock().insert((from, me.name.clone()), (lag, unix_ms(SystemTime::now())));
                    }
                }
            }
        }
    }

    /// For `/replication` and the dashboard.
    pub fn view(&self) -> View {
        let current = self.links.load();
        let links = current
            .iter()
            .map(|l| LinkView {
                broker: l.name.clone(),
                address: l.address.clone(),
                connected: l.connected.load(Ordering::Relaxed),
                since_ms: l.since_ms.load(Ordering::Relaxed),
                received: l.received.load(Ordering::Relaxed),
            })
            .collect();
        let mut lag: Vec<LagView> = self
            .lag
            .lock()
            .iter()
            .map(|((from, to), (s, at))| LagView { from: from.clone(), to: to.clone(), lag_ms: s * 1000.0, at_ms: *at })
            .collect();
        lag.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        let store = self.store.lock();
        let tombstones = store.entries.values().filter(|e| e.value.is_none()).count();
        View { active: !current.is_empty(), links, lag, retained_topics: store.entries.len() - tombstones, tombstones }
    }
}

/// One message to send to another broker.
struct Copy<'a> {
    topic: &'a str,
    qos: QoS,
    retain: bool,
    payload: bytes::Bytes,
    props: PublishProperties,
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
