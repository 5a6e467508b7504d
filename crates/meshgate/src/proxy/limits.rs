//! Admission limits for client connections: total connections over every listener, connections per source address, CONNECT rate per source.
//!
//! Every connection is accepted and then admitted or closed at once, so a refused client gets
//! a prompt close instead of waiting in the kernel's backlog, and every refusal is counted.
//! A refused connection costs one accept and one close; nothing is read from it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::config::ProxyConfig;

/// Why a connection was refused; the `reason` label of `meshgate_rejected_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    PerSource,
    RateLimited,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerSource => "per_source_connections",
            Refusal::RateLimited => "connect_rate",
        }
    }
}

#[derive(Debug)]
struct Source {
    sessions: u32,
    /// Token bucket for CONNECTs: `tokens` as of `at`.
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
pub struct Limits {
    state: Mutex<State>,
    /// `state.total`, readable without the lock (the file-descriptor budget of moves).
    open: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct State {
    total: u32,
    sources: HashMap<IpAddr, Source>,
    last_sweep: Option<Instant>,
}

/// A connection's place under the limits; released on drop.
pub struct Admission {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut s = self.limits.state.lock();
        s.total = s.total.saturating_sub(1);
        self.limits.open.store(s.total, std::sync::atomic::Ordering::Relaxed);
        if let Some(src) = s.sources.get_mut(&self.ip) {
            src.sessions = src.sessions.saturating_sub(1);
        }
    }
}

impl Limits {
    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, cfg: &ProxyConfig, now: Instant) -> Result<Admission, Refusal> {
        let mut s = self.state.lock();
        s.sweep(cfg, now);
        if cfg.max_connections > 0 && s.total >= cfg.max_connections {
            return Err(Refusal::MaxConnections);
        }
        let burst = cfg.connect_burst_per_source.max(1.0);
        let src = s.sources.entry(ip).or_insert(Source { sessions: 0, tokens: burst, at: now });
        if cfg.max_connections_per_source > 0 && src.sessions >= cfg.max_connections_per_source {
            return Err(Refusal::PerSource);
        }
        if cfg.connect_rate_per_source > 0.0 {
            let refill = now.saturating_duration_since(src.at).as_secs_f64() * cfg.connect_rate_per_source;
            src.tokens = (src.tokens + refill).min(burst);
            src.at = now;
            if src.tokens < 1.0 {
                return Err(Refusal::RateLimited);
            }
            src.tokens -= 1.0;
        }
        src.sessions += 1;
        s.total += 1;
        self.open.store(s.total, std::sync::atomic::Ordering::Relaxed);
        Ok(Admission { limits: self.clone(), ip })
    }

    /// Runs `f` holding the limits' lock (see `Meshgate::panic_holding_shared_locks`).
    #[doc(hidden)]
    pub fn with_locks_held<T>(&self, f: impl FnOnce() -> T) -> T {
        let _state = self.state.lock();
        f()
    }

    /// Client connections admitted and not yet closed, over every listener.
    pub fn open(&self) -> u32 {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn sessions_from(&self, ip: IpAddr) -> u32 {
        self.state.lock().sources.get(&ip).map_or(0, |s| s.sessions)
    }
}

impl State {
    /// Forgets idle sources (no session, bucket refilled) now and then, so a scan from many
    /// addresses cannot grow the table without bound.
    fn sweep(&mut self, cfg: &ProxyConfig, now: Instant) {
        if self.last_sweep.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(10)) {
            return;
        }
        self.last_sweep = Some(now);
        let refill_time = if cfg.connect_rate_per_source > 0.0 {
            Duration::from_secs_f64((cfg.connect_burst_per_source / cfg.connect_rate_per_source).min(3600.0))
        } else {
            Duration::ZERO
        };
        self.sources.retain(|_, s| s.sessions > 0 || now.saturating_duration_since(s.at) < refill_time);
    }
}

/// Logs each cause of refusal once a minute at most, with how many happened since, so a
/// flood cannot flood the log too.
#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RefusalLog {
    pub fn note(&self, reason: &'static str, detail: impl std::fmt::Display) {
        let now = Instant::now();
        let mut last = self.last.lock();
        let entry = last.entry(reason).or_insert((now - Duration::from_secs(3600), 0));
        entry.1 += 1;
        if now.saturating_duration_since(entry.0) >= Duration::from_secs(60) {
            // Limits reached and no broker to serve are the operator's to act on; a client that
            // hangs up early, talks nonsense or fails its TLS handshake (port scanners, an L4
            // balancer's TCP checks) is the client's business.
            match reason {
                "max_connections" | "per_source_connections" | "connect_rate" | "no_broker" => {
                    tracing::warn!(
                        reason,
                        count = entry.1,
                        "refused {} client connection(s) ({reason}): {detail}",
                        entry.1
                    )
                }
                _ => tracing::info!(
                    reason,
                    count = entry.1,
                    "refused {} client connection(s) ({reason}): {detail}",
                    entry.1
                ),
            }
            *entry = (now, 0);
        }
    }
}

/// Descriptors kept out of every move's reach: listeners, the HTTP API and its clients,
/// probes, replication links, etcd, log files, and clients connecting meanwhile.
const FD_RESERVE: u64 = 256;

/// The file descriptors moves may take. A session moving under its client's connection holds
/// its old broker's connection until the new one is ready: three descriptors instead of two.
/// When every session of a failed broker moves at once, the third must come out of what the
/// open-file limit leaves, or the moves take the last descriptors and accepts, probes and the
/// moves themselves fail (measured: 9,000 sessions leaving a hung broker under a limit of
/// 20,000 hit EMFILE by the thousand). A move that finds no room closes its session instead
/// (a failed broker's: the client reconnects, as without moves) or leaves it where it is.
pub struct FdBudget {
    limit: u64,
    moving: std::sync::atomic::AtomicU64,
}

/// One move's third descriptor, given back on drop.
pub struct MoveRoom<'a>(&'a FdBudget);

impl Drop for MoveRoom<'_> {
    fn drop(&mut self) {
        self.0.moving.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl FdBudget {
    /// The budget under the process's open-file limit (its soft limit, as it is now).
    pub fn from_rlimit() -> FdBudget {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        FdBudget::new(limit)
    }

    pub fn new(limit: u64) -> FdBudget {
        FdBudget { limit, moving: Default::default() }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Room for one more move while `open` client connections (two descriptors each, client
    /// and broker) are open, or `None`.
    pub fn take(&self, open: u32) -> Option<MoveRoom<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        let moving = self.moving.fetch_add(1, Relaxed) + 1;
        if 2 * u64::from(open) + moving + FD_RESERVE > self.limit {
            self.moving.fetch_sub(1, Relaxed);
            return None;
        }
        Some(MoveRoom(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u32, per_source: u32, rate: f64, burst: f64) -> ProxyConfig {
        let mut c =
            crate::Config::from_toml("[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n", "t").unwrap().proxy;
        c.max_connections = max;
        c.max_connections_per_source = per_source;
        c.connect_rate_per_source = rate;
        c.connect_burst_per_source = burst;
        c
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

    #[test]
    fn total_and_per_source_limits_release_on_drop() {
        let l = Arc::new(Limits::default());
        let c = cfg(3, 2, 0.0, 1.0);
        let now = Instant::now();
        let a1 = l.admit(A, &c, now).unwrap();
        let _a2 = l.admit(A, &c, now).unwrap();
        assert_eq!(l.admit(A, &c, now).err(), Some(Refusal::PerSource));
        let _b1 = l.admit(B, &c, now).unwrap();
        assert_eq!(l.admit(B, &c, now).err(), Some(Refusal::MaxConnections));
        drop(a1);
        assert_eq!(l.sessions_from(A), 1);
        assert!(l.admit(B, &c, now).is_ok());
    }

    #[test]
    fn connect_rate_is_a_token_bucket_per_source() {
        let l = Arc::new(Limits::default());
        let c = cfg(0, 0, 10.0, 5.0);
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(l.admit(A, &c, t0).unwrap());
        }
        assert_eq!(l.admit(A, &c, t0).err(), Some(Refusal::RateLimited), "burst used up");
        assert!(l.admit(B, &c, t0).is_ok(), "another source has its own bucket");
        // 10 per second: one more after 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.admit(A, &c, t1).is_ok());
        assert_eq!(l.admit(A, &c, t1).err(), Some(Refusal::RateLimited));
    }

    #[test]
    fn moves_take_only_what_the_open_file_limit_leaves() {
        // 1,000 descriptors: 256 kept back, 600 for 300 connections, so 144 moves fit.
        let budget = FdBudget::new(1000);
        let rooms: Vec<_> = (0..144).map(|_| budget.take(300).expect("room for a move")).collect();
        assert!(budget.take(300).is_none(), "the 145th move would cut into the reserve");
        drop(rooms);
        assert!(budget.take(300).is_some(), "finished moves give their descriptors back");
        assert!(budget.take(373).is_none(), "373 connections leave no room at all");
    }
}
