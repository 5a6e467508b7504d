//! The etcd session of one instance: lease, registration, election, the watch of the prefix and the claims writer, reconnecting for as long as etcd is away.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{claim_value, parse_claim, Claim, Coordination, Instance};
use crate::config::CoordinationConfig;
use crate::durable::store::Record;

/// How long one etcd request may take before the session counts as broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Claims written in one transaction (etcd's default limit is 128 operations).
const BATCH: usize = 64;
/// How long shutting down waits for a replication term to end and hand its record over.
const HAND_OVER_WAIT: Duration = Duration::from_secs(3);
/// A retained record larger than this is not handed over (etcd refuses requests over 1.5 MiB
/// by default): the next leader starts from the brokers' state.
const HAND_OVER_MAX: usize = 1024 * 1024;

/// Pause between attempts to reach etcd again.
const RETRY: Duration = Duration::from_millis(500);

pub(super) fn client(cfg: &CoordinationConfig) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        // HTTP/2 pings notice a vanished etcd (a dead host, a cut link) without a request.
        .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
        .with_keep_alive_while_idle(true);
    // The channel connects lazily: building it never waits for etcd.
    futures_util::FutureExt::now_or_never(Client::connect(&cfg.etcd, Some(options)))
        .unwrap_or_else(|| Err(etcd_client::Error::InvalidArgs("etcd client did not build at once".into())))
        .map_err(|e| format!("coordination.etcd: {e}"))
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", short(&e))),
        Err(_) => Err(format!("{what}: no answer within {} ms", REQUEST_TIMEOUT.as_millis())),
    }
}

/// tonic's errors carry a whole status dump; an operator needs the first line.
fn short(e: &etcd_client::Error) -> String {
    let s = e.to_string();
    let s = s.split(", details").next().unwrap_or(&s).to_string();
    s.chars().take(200).collect()
}

impl Coordination {
    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.cfg.prefix)
    }

    fn leader_key(&self) -> String {
        self.key("leader/replication")
    }

    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut queue = self.queue.lock().take().expect("one session task");
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => break,
                why = self.session(&mut queue) => why,
            };
            // Until a first session, the reason is still "not reached yet": this is the start.
            if self.degraded().as_deref() == Some(super::NOT_CONTACTED) {
                warn!(etcd = %self.cfg.etcd.join(","), "cannot reach etcd at start ({why}): serving clients degraded, replication waits for etcd; start etcd or fix [coordination] etcd");
            }
            self.set_degraded(Some(why));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
        self.resign().await;
    }

    /// On shutdown: stop leading, then give the lease back, so another instance is elected at
    /// once instead of after `lease_ttl` (this instance's keys go with it).
    async fn resign(&self) {
        self.set_leading(false, "shutting down");
        let mut term = self.term_open.subscribe();
        let _ = tokio::time::timeout(HAND_OVER_WAIT, term.wait_for(|open| !*open)).await;
        let id = self.lease.lock().id.take();
        if let Some(id) = id {
            let mut c = self.client.clone();
            let _ = timed("lease revoke", c.lease_revoke(id)).await;
        }
    }

    /// A lease that is still alive is kept (its keys, the leader key among them, survive a
    /// short outage); otherwise a new one is granted and every claim written again.
    async fn lease(&self, c: &mut Client) -> Result<i64, String> {
        let ttl = self.cfg.lease_ttl.as_secs() as i64;
        let old = self.lease.lock().id;
        if let Some(id) = old {
            let sent = Instant::now();
            let left = timed("lease time-to-live", c.lease_time_to_live(id, None)).await?;
            if left.ttl() > 0 {
                self.renew(id, sent, left.ttl());
                return Ok(id);
            }
            self.set_leading(false, "its etcd lease expired while etcd was unreachable");
        }
        let sent = Instant::now();
        let granted = timed("lease grant", c.lease_grant(ttl, None)).await?;
        self.renew(granted.id(), sent, granted.ttl());
        self.reclaim.store(true, Ordering::Relaxed);
        Ok(granted.id())
    }

    fn renew(&self, id: i64, sent: Instant, ttl_s: i64) {
        let mut l = self.lease.lock();
        l.id = Some(id);
        l.valid_until = sent + Duration::from_secs(ttl_s.max(0) as u64);
        drop(l);
        self.renewed.notify_one();
    }

    /// One etcd session, until something fails; returns why.
    async fn session(&self, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Claim>) -> String {
        match self.session_inner(queue).await {
            Ok(()) => "etcd session ended".to_string(),
            Err(why) => why,
        }
    }

    async fn session_inner(&self, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Claim>) -> Result<(), String> {
        let mut c = self.client.clone();
        let lease = self.lease(&mut c).await?;
        let (mut keeper, mut kept) = timed("lease keep-alive", c.lease_keep_alive(lease)).await?;
        let me = serde_json::to_string(&self.me).expect("instance record serializes");
        let put = PutOptions::new().with_lease(lease);
        timed("register instance", c.put(self.key(&format!("instances/{}", self.me.name)), me, Some(put))).await?;

        // What this instance needs at start, read at one revision (the watch goes on from
        // there): not the client-id claims, which can be many.
        let read = Txn::new().and_then([
            TxnOp::get(self.key("instances/"), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.key("admin/"), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.leader_key(), None),
            TxnOp::get(self.key("sessions/"), Some(GetOptions::new().with_prefix())),
        ]);
        let state = timed("read state", c.txn(read)).await?;
        let revision = state.header().map_or(0, |h| h.revision());
        let at_start = self.first_session.swap(false, Ordering::Relaxed);
        let mut instances = std::collections::BTreeMap::new();
        let mut leader = None;
        let mut sessions = Vec::new();
        for op in state.op_responses() {
            let TxnOpResponse::Get(g) = op else { continue };
            for kv in g.kvs() {
                let key = kv.key_str().unwrap_or_default();
                if let Some(i) = self.instance_of(key, kv.value()) {
                    instances.insert(i.name.clone(), i);
                } else if let Some(broker) = key.strip_prefix(&self.key("admin/")) {
                    self.admin_seen(broker, kv.value_str().unwrap_or_default(), at_start);
                } else if key == self.leader_key() {
                    leader = Some((kv.value_str().unwrap_or_default().to_string(), kv.lease()));
                } else if let Some(id) = key.strip_prefix(&self.key("sessions/")) {
                    sessions.push((id.to_string(), kv.mod_revision(), kv.value().to_vec()));
                }
            }
        }
        self.metrics.instances.set(instances.len() as i64);
        *self.instances.lock() = instances;
        self.sessions_read(sessions);
        let watch = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut events = timed("watch", c.watch(self.cfg.prefix.clone(), Some(watch))).await?;

        // Leadership as etcd has it: ours only if the key is under this very lease.
        match leader {
            Some((name, l)) if l == lease && name == self.me.name => self.set_leading(true, ""),
            Some((name, _)) => {
                self.set_leading(false, &format!("instance {name} leads"));
                *self.leader.lock() = Some(name);
            }
            None => self.campaign(&mut c, lease).await?,
        }
        self.set_degraded(None);
        if self.reclaim.swap(false, Ordering::Relaxed) {
            self.reclaim_all(queue);
        }

        let every = self.cfg.lease_ttl / 3;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let sent = Instant::now();
                    timed("lease keep-alive", keeper.keep_alive()).await?;
                    match timed("lease keep-alive", kept.message()).await? {
                        Some(r) if r.ttl() > 0 => {
                            self.renew(lease, sent, r.ttl());
                            // The fence may have stopped this instance while a renewal was late;
                            // the leader key, under this very lease, is still its own.
                            let ours = self.leader.lock().as_deref() == Some(self.me.name.as_str());
                            if ours && !*self.leading.borrow() {
                                self.set_leading(true, "");
                            }
                        }
                        Some(_) => {
                            self.set_leading(false, "its etcd lease expired");
                            self.lease.lock().id = None;
                            return Err("the etcd lease expired".into());
                        }
                        None => return Err("lease keep-alive stream ended".into()),
                    }
                }
                m = events.message() => {
                    let m = m.map_err(|e| format!("watch: {}", short(&e)))?.ok_or("watch ended")?;
                    if m.canceled() {
                        return Err(format!("watch cancelled by etcd: {}", m.cancel_reason()));
                    }
                    for e in m.events() {
                        let Some(kv) = e.kv() else { continue };
                        let key = kv.key_str().unwrap_or_default();
                        self.on_event(&mut c, lease, e.event_type(), key, kv.value(), kv.mod_revision()).await?;
                    }
                }
                n = queue.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return Ok(());
                    }
                    if let Err(why) = self.write_claims(&mut c, lease, &batch).await {
                        // Kept for the next session, in order, ahead of anything newer.
                        self.requeue(queue, std::mem::take(&mut batch));
                        return Err(why);
                    }
                    self.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
                    self.metrics.queued.set(self.queued.load(Ordering::Relaxed) as i64);
                    batch.clear();
                }
            }
        }
    }

    fn instance_of(&self, key: &str, value: &[u8]) -> Option<Instance> {
        key.strip_prefix(&self.key("instances/"))?;
        serde_json::from_slice(value).ok()
    }

    /// Creates the leader key under `lease` if nobody holds it.
    async fn campaign(&self, c: &mut Client, lease: i64) -> Result<(), String> {
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), self.me.name.clone(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let r = timed("campaign", c.txn(txn)).await?;
        if r.succeeded() {
            *self.leader.lock() = Some(self.me.name.clone());
            self.set_leading(true, "");
        } else {
            let holder = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value_str().unwrap_or_default().to_string()),
                _ => None,
            });
            *self.leader.lock() = holder;
        }
        Ok(())
    }

    async fn on_event(
        &self,
        c: &mut Client,
        lease: i64,
        kind: EventType,
        key: &str,
        value: &[u8],
        revision: i64,
    ) -> Result<(), String> {
        if let Some(name) = key.strip_prefix(&self.key("instances/")) {
            let changed = match kind {
                EventType::Put => self.instance_of(key, value).map(|i| self.instances.lock().insert(i.name.clone(), i)),
                EventType::Delete => Some(self.instances.lock().remove(name)),
            };
            if kind == EventType::Delete && *self.leading.borrow() {
                self.durable.adopt_from_gone_instances();
            }
            let n = self.instances.lock().len();
            self.metrics.instances.set(n as i64);
            match (kind, changed) {
                (EventType::Put, Some(None)) if name != self.me.name => {
                    self.pool.events.push("instance", None, format!("instance {name} joined ({n} now)"));
                }
                (EventType::Delete, Some(Some(_))) if name != self.me.name => {
                    self.pool.events.push_at(
                        crate::events::Severity::Warn,
                        "instance",
                        None,
                        format!("instance {name} left or its lease expired ({n} now)"),
                    );
                }
                _ => {}
            }
        } else if key == self.leader_key() {
            match kind {
                EventType::Put => {
                    let name = String::from_utf8_lossy(value).to_string();
                    if name != self.me.name {
                        self.set_leading(false, &format!("instance {name} leads"));
                    }
                    *self.leader.lock() = Some(name);
                }
                EventType::Delete => {
                    *self.leader.lock() = None;
                    if *self.leading.borrow() {
                        self.set_leading(false, "its leader key was deleted");
                    }
                    self.campaign(c, lease).await?;
                }
            }
        } else if let Some(broker) = key.strip_prefix(&self.key("admin/")) {
            if kind == EventType::Put {
                self.admin_seen(broker, &String::from_utf8_lossy(value), false);
            }
        } else if let Some(client_id) = key.strip_prefix(&self.key("sessions/")) {
            let record = match kind {
                EventType::Put => Some(value),
                EventType::Delete => None,
            };
            self.session_seen(client_id, revision, record);
        } else if let Some(client_id) = key.strip_prefix(&self.key("clients/")) {
            if kind == EventType::Put {
                if let Some((at, instance)) = parse_claim(&String::from_utf8_lossy(value)) {
                    self.claimed_elsewhere(client_id, at, instance);
                }
            }
        }
        Ok(())
    }

    /// After a new lease: the old one took this instance's claims with it, so every open
    /// connection is claimed again (queued releases and claims are replaced by that).
    fn reclaim_all(&self, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Claim>) {
        let mut dropped = 0;
        let mut admin = Vec::new();
        while let Ok(c) = queue.try_recv() {
            match c {
                Claim::Admin { .. } | Claim::Session { .. } => admin.push(c),
                _ => dropped += 1,
            }
        }
        self.queued.fetch_sub(dropped, Ordering::Relaxed);
        // Admin actions and session records are not the lease's: they stay queued, first.
        for c in admin {
            let _ = self.claims.send(c);
        }
        let sessions = self.pool.sessions();
        for s in &sessions {
            self.session_opened(s);
        }
        debug!(claims = sessions.len(), "client ids claimed again under a new lease");
    }

    fn requeue(&self, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Claim>, batch: Vec<Claim>) {
        let mut rest = Vec::new();
        while let Ok(c) = queue.try_recv() {
            rest.push(c);
        }
        // The channel is this module's own: sending cannot fail while `self` lives.
        for c in batch.into_iter().chain(rest) {
            let _ = self.claims.send(c);
        }
    }

    /// Writes a batch of claims in one transaction (a nested one per client id).
    async fn write_claims(&self, c: &mut Client, lease: i64, batch: &[Claim]) -> Result<(), String> {
        let mut ops = Vec::new();
        // What each operation was, to read its answer.
        let mut owns: Vec<Sent> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut rest = Vec::new();
        for claim in batch {
            let (id, at, own) = match claim {
                Claim::Own { client_id, at_ms } => (client_id, *at_ms, true),
                Claim::Release { client_id, at_ms } => (client_id, *at_ms, false),
                Claim::Admin { broker, state } => {
                    let key = self.key(&format!("admin/{broker}"));
                    if !seen.insert(key.clone()) {
                        rest.push(claim.clone());
                        continue;
                    }
                    let value = format!("{} {}", super::admin_word(*state), self.me.name);
                    ops.push(TxnOp::put(key, value, None));
                    owns.push(Sent::Other);
                    continue;
                }
                Claim::Session { client_id } => {
                    let key = self.key(&format!("sessions/{client_id}"));
                    if !seen.insert(key.clone()) {
                        rest.push(claim.clone());
                        continue;
                    }
                    // Out of the pending set before the record is read: a change from now on
                    // queues another write.
                    self.pending_sessions.lock().remove(client_id);
                    let known = self.session_revs.lock().get(client_id).copied().unwrap_or(0);
                    let write = match self.durable.record_json(client_id) {
                        Some(r) => TxnOp::put(key.clone(), r, None),
                        None => TxnOp::delete(key.clone(), None),
                    };
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, known)])
                            .and_then([write])
                            .or_else([TxnOp::get(key, None)]),
                    ));
                    owns.push(Sent::Session(claim.clone()));
                    continue;
                }
            };
            let key = self.key(&format!("clients/{id}"));
            // etcd refuses a transaction that writes one key twice: later ones go next.
            if !seen.insert(key.clone()) {
                rest.push(claim.clone());
                continue;
            }
            let mine = claim_value(at, &self.me.name);
            if own {
                // Unless a later connection (through any instance) holds the id already.
                ops.push(TxnOp::txn(
                    Txn::new()
                        .when([Compare::value(key.clone(), CompareOp::Greater, mine.clone())])
                        .and_then([TxnOp::get(key.clone(), None)])
                        .or_else([TxnOp::put(key, mine, Some(PutOptions::new().with_lease(lease)))]),
                ));
                owns.push(Sent::Own(id.clone()));
            } else {
                if self.still_connected(id, at) {
                    // The session moved between brokers: same connection, same claim.
                    ops.push(TxnOp::get(key, None));
                } else {
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::value(key.clone(), CompareOp::Equal, mine)])
                            .and_then([TxnOp::delete(key, None)]),
                    ));
                }
                owns.push(Sent::Other);
            }
        }
        if !ops.is_empty() {
            let r = timed("write client-id claims", c.txn(Txn::new().and_then(ops))).await?;
            let revision = r.header().map_or(0, |h| h.revision());
            for (op, sent) in r.op_responses().into_iter().zip(owns) {
                let TxnOpResponse::Txn(inner) = op else { continue };
                let id = match sent {
                    Sent::Own(id) => id,
                    Sent::Session(claim) => {
                        if let Some(again) = self.session_written(&claim, &inner, revision) {
                            rest.push(again);
                        }
                        continue;
                    }
                    Sent::Other => continue,
                };
                if !inner.succeeded() {
                    continue;
                }
                // A later connection already claimed the id: this one is the older copy.
                for op in inner.op_responses() {
                    if let TxnOpResponse::Get(g) = op {
                        if let Some((at, instance)) = g.kvs().first().and_then(|kv| {
                            parse_claim(kv.value_str().unwrap_or_default()).map(|(a, i)| (a, i.to_string()))
                        }) {
                            self.claimed_elsewhere(&id, at, &instance);
                        }
                    }
                }
            }
        }
        if !rest.is_empty() {
            Box::pin(self.write_claims(c, lease, &rest)).await?;
        }
        Ok(())
    }

    /// The answer to a conditional write of a session record. Written: its revision is noted
    /// (the watch will echo it, a deletion's too). Refused, because another instance wrote
    /// since: this instance writes again over what it now knows if its record wins
    /// (`Durable::wins_over`: the client is connected through it, and not later through
    /// another), returned to go in the next transaction; otherwise it takes what etcd holds.
    fn session_written(&self, claim: &Claim, inner: &etcd_client::TxnResponse, revision: i64) -> Option<Claim> {
        let Claim::Session { client_id } = claim else { return None };
        if inner.succeeded() {
            self.session_revs.lock().insert(client_id.clone(), revision);
            return None;
        }
        let current = inner.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| (kv.mod_revision(), kv.value().to_vec()))),
            _ => None,
        })?;
        let theirs_rev = current.as_ref().map_or(0, |(rev, _)| *rev);
        let theirs = match current.as_ref().map(|(_, v)| serde_json::from_slice::<Record>(v)) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                warn!(client_id, "unreadable session record in etcd, overwritten: {e}");
                None
            }
            None => None,
        };
        self.session_revs.lock().insert(client_id.clone(), theirs_rev);
        if self.durable.wins_over(client_id, theirs.as_ref()) {
            debug!(client_id, "session record changed through another instance meanwhile: this instance's wins");
            return Some(claim.clone());
        }
        if !self.durable.apply_shared(client_id, theirs) {
            return Some(claim.clone());
        }
        None
    }

    /// A session record on the watch: applied unless it is this instance's own write (or
    /// older than what it already has), or a write of this instance's is still queued (which
    /// settles it). A record this instance keeps instead is written again over it.
    fn session_seen(&self, client_id: &str, revision: i64, record: Option<&[u8]>) {
        let mut revs = self.session_revs.lock();
        if revs.get(client_id).is_some_and(|known| *known >= revision) {
            // Its own deletion, echoed: nothing to keep for the id any more.
            if record.is_none() {
                revs.remove(client_id);
            }
            return;
        }
        drop(revs);
        if self.pending_sessions.lock().contains(client_id) {
            return;
        }
        let record = match record.map(serde_json::from_slice::<Record>) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                warn!(client_id, "unreadable session record in etcd, ignored: {e}");
                return;
            }
            None => None,
        };
        let deleted = record.is_none();
        if self.durable.apply_shared(client_id, record) {
            let mut revs = self.session_revs.lock();
            match deleted {
                // An absent key compares as revision 0.
                true => revs.remove(client_id),
                false => revs.insert(client_id.to_string(), revision),
            };
        } else {
            self.durable.share_again(client_id);
        }
    }

    /// The records etcd holds, read at the start of an etcd session. A record whose write is
    /// still queued is left to that write; one of a client connected through this instance is
    /// written again (another instance may have taken it over while this one was away). A
    /// record this instance has and etcd lacks: written if it was never shared (a single
    /// instance's state file, or a session that began while etcd was away), otherwise it ended
    /// while this instance was away. The leader then takes over the sessions of instances that
    /// are gone.
    fn sessions_read(&self, sessions: Vec<(String, i64, Vec<u8>)>) {
        let mut held = std::collections::HashSet::new();
        for (id, revision, value) in sessions {
            held.insert(id.clone());
            if self.pending_sessions.lock().contains(&id) {
                continue;
            }
            if self.durable.owned_here(&id) {
                self.durable.share_again(&id);
                continue;
            }
            match serde_json::from_slice::<Record>(&value) {
                Ok(r) => {
                    if self.durable.apply_shared(&id, Some(r)) {
                        self.session_revs.lock().insert(id.clone(), revision);
                    }
                }
                Err(e) => warn!(client_id = %id, "unreadable session record in etcd, ignored: {e}"),
            }
        }
        for id in self.durable.ids() {
            if held.contains(&id) || self.pending_sessions.lock().contains(&id) {
                continue;
            }
            if self.durable.owned_here(&id) || !self.durable.was_shared(&id) {
                self.durable.share_again(&id);
            } else {
                self.durable.apply_shared(&id, None);
            }
        }
        if *self.leading.borrow() {
            self.durable.adopt_from_gone_instances();
        }
    }
}

/// What one operation of a claims transaction was.
enum Sent {
    Own(String),
    Session(Claim),
    Other,
}

/// The retained record between replication terms, under `replication/retained`.
impl crate::replication::HandOver for Coordination {
    fn take(&self) -> futures_util::future::BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move {
            self.term_open.send_replace(true);
            let key = self.key("replication/retained");
            // Only while the leader key is this instance's: read and removed at once.
            let txn = Txn::new()
                .when([Compare::value(self.leader_key(), CompareOp::Equal, self.me.name.clone())])
                .and_then([TxnOp::get(key.clone(), None), TxnOp::delete(key, None)]);
            let mut c = self.client.clone();
            let r = timed("take the retained record", c.txn(txn)).await?;
            if !r.succeeded() {
                return Err("taking the retained record: this instance does not hold the leader key".into());
            }
            Ok(r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => {
                    let kv = g.kvs().first()?;
                    let handed: HandedOver = serde_json::from_slice(kv.value()).ok()?;
                    debug!(by = %handed.by, "retained record handed over");
                    Some(handed.record)
                }
                _ => None,
            }))
        })
    }

    fn hand_over(&self, record: String) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            if record.len() > HAND_OVER_MAX {
                warn!(
                    bytes = record.len(),
                    "retained record too large to hand over through etcd: the next leader starts from the brokers' state"
                );
            } else {
                let value = serde_json::to_string(&HandedOver { by: self.me.name.clone(), record })
                    .expect("hand-over serializes");
                let txn = Txn::new()
                    .when([Compare::value(self.leader_key(), CompareOp::Equal, self.me.name.clone())])
                    .and_then([TxnOp::put(self.key("replication/retained"), value, None)]);
                let mut c = self.client.clone();
                match timed("hand over the retained record", c.txn(txn)).await {
                    Ok(r) if r.succeeded() => debug!("retained record handed over to the next leader"),
                    Ok(_) => debug!("another instance leads already: its term started from the brokers' state"),
                    Err(e) => warn!("{e}: the next leader starts from the brokers' retained state"),
                }
            }
            self.term_open.send_replace(false);
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HandedOver {
    by: String,
    record: String,
}
