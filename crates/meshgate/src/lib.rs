//! meshgate: an MQTT-aware failover proxy in front of a prioritized pool of Mosquitto brokers.
//!
//! Each concern has one owner, and dependencies point one way (top to bottom; nothing below
//! imports anything above it, `tests/architecture.rs` checks it):
//!
//! - `http`: health, broker, client and session API, Prometheus metrics, the dashboard.
//! - `proxy`: the client side: accept loops, admission limits shared by every listener, session
//!   setup with CONNECT replay, forwarding, the rebalancer.
//! - `replication`: loop-free broker links and retained convergence.
//! - `coordination`: several instances as one through etcd: the instance registry, which
//!   instance leads replication, one owner per client id; it hears of sessions through the
//!   pool's `Hooks` too.
//! - `durable`: persistent sessions (record, restore, migration, standby); it hears of broker
//!   and session changes through the pool's `Hooks`, which this file wires.
//! - `health`: active probes and one checker loop per broker.
//! - `upstream`: the one way to reach a broker (TCP or TLS as configured, timeouts, handshake
//!   slots), used by everything above that talks to brokers.
//! - `pool`: brokers, health state, tiers, selection, passive accounting, the session registry.
//! - `transport` (TCP/TLS streams, certificates), `mqtt` (framing and the packets meshgate reads
//!   or writes), `config` (the file, every default, validation, nginx import), `events`,
//!   `metrics`, `statefile`: the ground floor.
//!
//! [`Meshgate::start`] binds the listeners and spawns every task; [`run`] is start plus
//! waiting for a shutdown signal, for the CLI. The tooling (load generator, suite, local
//! cluster) lives in the `meshgate-tools` crate and drives this one from outside.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod config;
pub mod coordination;
pub mod durable;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod pool;
pub mod proxy;
pub mod replication;
pub mod sidecar;
pub mod statefile;
pub mod transport;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
use durable::Durable;
use pool::Pool;
use upstream::Upstream;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this was built from (set by build.rs; "unknown" outside a checkout).
pub const COMMIT: &str = env!("MESHGATE_COMMIT");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Tls(#[from] transport::tls::TlsError),
    #[error("{0} (set [access_log] path to a writable file, or leave it out for stdout)")]
    AccessLog(std::io::Error),
    #[error("cannot listen for {what} on {addr}: {err}{hint}")]
    Bind { what: &'static str, addr: String, err: std::io::Error, hint: &'static str },
    #[error("{0}")]
    Coordination(String),
    #[error("cannot start the session event loops ([proxy] workers): {0}")]
    Loops(std::io::Error),
}

impl Error {
    /// A mistake in the configuration (a certificate or file it names cannot be used), as
    /// opposed to the machine's state (a port someone else holds): exit code 2, not 1.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Tls(_) | Error::AccessLog(_) | Error::Coordination(_))
    }
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => " (another process holds this port: stop it, e.g. `ss -ltnp` shows which, or set another address under [listen])",
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        std::io::ErrorKind::AddrNotAvailable => " (this machine has no such address)",
        _ => "",
    }
}

/// Binds with a deep accept queue: when a broker fails, all of its clients reconnect at once,
/// and every connection the kernel drops costs a client a one-second SYN retransmit
/// (measured: 1,000 clients back in 0.74–0.87 s with 4096, 1.7 s with the default 128).
async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, Error> {
    let err = |err: std::io::Error| Error::Bind { what, addr: addr.to_string(), hint: bind_hint(&err), err };
    let sock_addr: SocketAddr = addr.parse().map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let socket = match sock_addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(sock_addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

/// The pool's hooks, wired here so that neither the pool nor the engines that listen know of
/// each other: persistent sessions hear of brokers and persistent clients, coordination of
/// every connection's client id.
struct Wiring {
    durable: Arc<Durable>,
    coordination: std::sync::OnceLock<Arc<coordination::Coordination>>,
}

impl pool::Hooks for Wiring {
    fn broker_changed(&self, broker: &str, lost: bool) {
        self.durable.broker_changed(broker, lost);
    }
    fn wake(&self) {
        pool::Hooks::wake(&*self.durable);
    }
    fn client_registered(&self, client_id: &str) {
        self.durable.client_registered(client_id);
    }
    fn client_gone(&self, client_id: &str) {
        self.durable.client_gone(client_id);
    }
    fn session_opened(&self, session: &pool::Session) {
        if let Some(c) = self.coordination.get() {
            c.session_opened(session);
        }
    }
    fn session_ended(&self, session: &pool::Session) {
        if let Some(c) = self.coordination.get() {
            c.session_ended(session);
        }
    }
}

/// Which parts run: `meshgate run` is the proxy (plus replication if configured),
/// `meshgate replicate` replication alone.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub proxy: bool,
    pub replication: bool,
}

/// A running meshgate: listeners bound, checkers, proxy and API serving.
pub struct Meshgate {
    pool: Arc<Pool>,
    proxy: Arc<proxy::Proxy>,
    /// `[admin] token` as the HTTP API reads it; a reload swaps it.
    admin_token: Arc<ArcSwapOption<String>>,
    /// One reload at a time.
    reloading: Mutex<()>,
    mqtt_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    replication: Option<Arc<replication::Replication>>,
    coordination: Option<Arc<coordination::Coordination>>,
    tracker: TaskTracker,
    /// Stops accepting new clients and the background loops.
    stop: CancellationToken,
    /// Stops the health checkers of the current config generation; the settings they run with.
    checkers: Mutex<(CancellationToken, config::HealthConfig)>,
    /// The certificates the TLS listener and the broker connections were last loaded from.
    tls: Mutex<config::TlsConfig>,
    /// The access log's settings as last applied.
    access_log: Mutex<config::AccessLogConfig>,
    /// Ends the access log's writer, after the sessions, and the writer's task.
    access_stop: CancellationToken,
    access_task: tokio::task::JoinHandle<()>,
    /// The configuration at start: what the settings that are read only then still are.
    started: Config,
    /// Where sessions run when not on the runtime that started meshgate (`start_daemon`);
    /// dropped last, when every session has ended.
    loops: Option<proxy::loops::Loops>,
}

impl Meshgate {
    /// The proxy, and replication when the config enables it.
    pub async fn start(config: Config) -> Result<Meshgate, Error> {
        let replication = config.replication.enabled;
        Meshgate::start_parts(config, Parts { proxy: true, replication }).await
    }

    /// What `meshgate run` starts: the proxy, and replication when the config enables it, with
    /// the sessions on `[proxy] workers` event loops of their own when that is more than one
    /// (0: one per CPU this process may run on); with one, on the calling runtime.
    pub async fn start_daemon(config: Config) -> Result<Meshgate, Error> {
        let n = match config.proxy.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let replication = config.replication.enabled;
        Meshgate::start_on(config, Parts { proxy: true, replication }, if n > 1 { n } else { 0 }).await
    }

    /// Binds every listener first (so a taken port fails before anything starts), then spawns
    /// the checkers, the rebalancer, the proxy, replication and the HTTP API.
    pub async fn start_parts(config: Config, parts: Parts) -> Result<Meshgate, Error> {
        Meshgate::start_on(config, parts, 0).await
    }

    /// With `loops` above zero, the sessions run on that many event loops of their own,
    /// started once every listener is bound.
    async fn start_on(config: Config, parts: Parts, loops: usize) -> Result<Meshgate, Error> {
        let mqtt = match parts.proxy {
            true => Some(bind("MQTT", &config.listen.mqtt).await?),
            false => None,
        };
        // Certificates are checked before anything runs, so a bad file is one clear error.
        let tls_listener = config.listen.mqtts.is_some() || config.listen.wss.is_some();
        let acceptor = match (tls_listener, parts.proxy) {
            (true, true) => Some(transport::tls::acceptor(&config.tls)?),
            _ => None,
        };
        let upstream = Arc::new(Upstream::new(&config)?);
        let mqtts = match (&config.listen.mqtts, parts.proxy) {
            (Some(addr), true) => Some(bind("MQTT over TLS", addr).await?),
            _ => None,
        };
        let ws = match (&config.listen.ws, parts.proxy) {
            (Some(addr), true) => Some(bind("MQTT over WebSockets", addr).await?),
            _ => None,
        };
        let wss = match (&config.listen.wss, parts.proxy) {
            (Some(addr), true) => Some(bind("MQTT over secure WebSockets", addr).await?),
            _ => None,
        };
        let http = match &config.listen.http {
            Some(a) => Some(bind("HTTP", a).await?),
            None => None,
        };
        let mqtt_addr = mqtt.as_ref().map(|l| l.local_addr().expect("bound socket has an address"));
        let http_addr = http.as_ref().map(|l| l.local_addr().expect("bound socket has an address"));
        // The session engine hears of broker and session changes through the pool's hooks; the
        // pool itself knows nothing of it.
        let durable = Arc::new(Durable::new(&config.sessions));
        let wiring = Arc::new(Wiring { durable: durable.clone(), coordination: std::sync::OnceLock::new() });
        let pool = Arc::new(Pool::with_hooks(&config, wiring.clone()));
        if config.sessions.enabled {
            pool.metrics.durable_sessions_limit.set(config.sessions.max_sessions as i64);
        }
        let coordination = match &config.coordination {
            Some(c) => Some(
                coordination::Coordination::new(c, &pool, &durable, mqtt_addr, http_addr)
                    .map_err(Error::Coordination)?,
            ),
            None => None,
        };
        if let Some(c) = &coordination {
            let _ = wiring.coordination.set(c.clone());
            durable.share_with(c.clone());
        }
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        // The writer outlives the sessions' grace period: it stops with the tracker's last task.
        let access_stop = CancellationToken::new();
        let (access, access_task) =
            accesslog::AccessLog::start(&config.access_log, &pool.metrics.registry, &access_stop)
                .await
                .map_err(Error::AccessLog)?;
        let proxy = Arc::new(proxy::Proxy::new(
            pool.clone(),
            upstream.clone(),
            durable.clone(),
            access,
            // With several instances the links are the leader's, not visible here: a switch
            // does not wait for them.
            config.replication.enabled && coordination.is_none(),
            config.listen.clone(),
            tracker.clone(),
        ));
        proxy.acceptor.store(acceptor.map(Arc::new));
        proxy.init_metrics();
        let admin_token = Arc::new(ArcSwapOption::from(config.admin.token.clone().map(Arc::new)));
        let checkers = stop.child_token();
        health::spawn_checkers(&pool, &upstream, &config.health, &tracker, &checkers);
        if mqtt.is_some() {
            tracker.spawn(proxy::rebalance_loop(pool.clone(), stop.clone()));
        }
        let loops = match loops {
            0 => None,
            n => Some(proxy::loops::Loops::start(n).map_err(Error::Loops)?),
        };
        let listeners = [
            (mqtt, proxy::Listener::Mqtt),
            (mqtts, proxy::Listener::Mqtts),
            (ws, proxy::Listener::Ws),
            (wss, proxy::Listener::Wss),
        ];
        for (listener, kind) in listeners {
            if let Some(l) = listener {
                proxy::spawn_accept(l, kind, loops.as_ref(), &proxy, &tracker, &stop).map_err(Error::Loops)?;
            }
        }
        if parts.proxy {
            tracker.spawn(durable::maintain(pool.clone(), durable.clone(), upstream.clone(), stop.clone()));
        }
        if let Some(c) = &coordination {
            c.spawn(&tracker, &stop);
        }
        let terms = coordination.as_ref().map(|c| replication::Terms {
            leading: c.leading(),
            hand_over: c.clone() as Arc<dyn replication::HandOver>,
        });
        let replication = parts
            .replication
            .then(|| replication::Replication::start(&config, &pool, &upstream, &tracker, &stop, terms));
        if let Some(listener) = http {
            let app = http::router(http::AppState {
                pool: pool.clone(),
                durable: durable.clone(),
                upstream: upstream.clone(),
                admin_token: admin_token.clone(),
                replication: replication.clone(),
                coordination: coordination.clone(),
                stop: stop.clone(),
            });
            let stop = stop.clone();
            tracker.spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    warn!("HTTP server ended: {e}");
                }
            });
        }
        for w in &config.warnings {
            warn!("{w}");
        }
        // Addresses as values ("off" when a listener is not there), never as Rust's `Some(..)`.
        let shown = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        info!(
            mqtt = %shown(mqtt_addr),
            http = %shown(http_addr),
            brokers = config.brokers.len(),
            replication = replication.is_some(),
            version = VERSION,
            commit = COMMIT,
            "meshgate started"
        );
        Ok(Meshgate {
            pool,
            proxy,
            admin_token,
            reloading: Mutex::new(()),
            mqtt_addr,
            http_addr,
            replication,
            coordination,
            tracker,
            stop,
            checkers: Mutex::new((checkers, config.health.clone())),
            tls: Mutex::new(config.tls.clone()),
            access_log: Mutex::new(config.access_log.clone()),
            access_stop,
            access_task,
            started: config,
            loops,
        })
    }

    /// The MQTT listener's address (panics in replicate-only mode, which has none).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr.expect("the proxy runs in this Meshgate")
    }
    pub fn replication(&self) -> Option<&Arc<replication::Replication>> {
        self.replication.as_ref()
    }
    /// Present with `[coordination]`.
    pub fn coordination(&self) -> Option<&Arc<coordination::Coordination>> {
        self.coordination.as_ref()
    }
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
    /// Persistent sessions: the record, restores, migrations and standby copies.
    pub fn durable(&self) -> &Arc<Durable> {
        &self.proxy.durable
    }
    /// The client side: admission limits, TLS acceptor, the way to the brokers.
    pub fn proxy(&self) -> &Arc<proxy::Proxy> {
        &self.proxy
    }

    /// Test hook: a task that panics while it holds every lock client sessions share (the
    /// persistent-session record, the session registry, a broker's passive accounting, the
    /// admission limits), as a bug in one session's task would. Returns once it has panicked.
    #[doc(hidden)]
    pub async fn panic_holding_shared_locks(&self) {
        let proxy = self.proxy.clone();
        let task = tokio::spawn(async move {
            proxy.durable.with_locks_held(|| {
                proxy.pool.with_locks_held(|| proxy.limits.with_locks_held(|| panic!("injected panic")))
            })
        });
        assert!(task.await.is_err_and(|e| e.is_panic()), "the injected panic happened");
    }

    /// Applies a new configuration without dropping established sessions, and re-reads the
    /// certificate files (so renewed certificates take effect). Listen addresses cannot
    /// change on a running process; a change there is logged and ignored. A certificate that
    /// cannot be used refuses the whole reload: the running configuration stays.
    pub fn reload(&self, new: Config) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock();
        let acceptor = match new.listen.mqtts.is_some() || new.listen.wss.is_some() {
            true if self.proxy.acceptor.load().is_some() => {
                Some(transport::tls::acceptor(&new.tls).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        // The last step that can fail: a broker CA that cannot be used refuses the whole reload
        // before anything changed.
        self.proxy.upstream.reload(&new).map_err(|e| e.to_string())?;
        if acceptor.is_some() {
            self.proxy.acceptor.store(acceptor.map(Arc::new));
        }
        self.admin_token.store(new.admin.token.clone().map(Arc::new));
        *self.tls.lock() = new.tls.clone();
        self.proxy.access.reopen(&new.access_log);
        *self.access_log.lock() = new.access_log.clone();
        for w in &new.warnings {
            warn!("{w}");
        }
        // Compared with what runs, not with the last file: a key changed twice is still named.
        let restart = self.started.restart_needed(&new);
        if !restart.is_empty() {
            warn!("changed in the new config but read only at start, so kept until a restart: {}", restart.join(", "));
        }
        self.pool.apply(&new);
        self.proxy.init_metrics();
        let fresh = self.stop.child_token();
        health::spawn_checkers(&self.pool, &self.proxy.upstream, &new.health, &self.tracker, &fresh);
        let old = std::mem::replace(&mut *self.checkers.lock(), (fresh, new.health.clone()));
        old.0.cancel();
        self.pool.metrics.reloads.with_label_values(&["ok"]).inc();
        self.pool.events.push("reload", None, format!("configuration reloaded: {} broker(s)", new.brokers.len()));
        Ok(())
    }

    /// The configuration in effect, read back from the parts that use it (the pool's brokers and
    /// proxy settings, the checkers, the admin token, the certificates) rather than from the last
    /// file: a key a reload could not apply shows its old value here.
    pub fn applied_config(&self) -> Config {
        let s = &self.started;
        let mut proxy = (*self.pool.proxy_config()).clone();
        proxy.workers = s.proxy.workers;
        Config {
            listen: s.listen.clone(),
            proxy,
            health: self.checkers.lock().1.clone(),
            admin: config::AdminConfig { token: self.admin_token.load().as_deref().cloned() },
            tls: self.tls.lock().clone(),
            replication: s.replication.clone(),
            sessions: self.proxy.durable.config().clone(),
            access_log: self.access_log.lock().clone(),
            coordination: s.coordination.clone(),
            brokers: self.pool.brokers().iter().filter(|b| !b.is_removed()).map(|b| (*b.config()).clone()).collect(),
            warnings: Vec::new(),
        }
    }

    /// Records a reload that was refused because the new file is invalid.
    pub fn reload_failed(&self, why: &str) {
        self.pool.metrics.reloads.with_label_values(&["error"]).inc();
        self.pool.events.push_at(
            events::Severity::Error,
            "reload",
            None,
            format!("reload refused, old configuration kept: {why}"),
        );
    }

    /// Stops accepting, gives sessions `shutdown_grace` to end by themselves, closes the rest.
    pub async fn shutdown(self) {
        let grace = self.pool.proxy_config().shutdown_grace;
        self.stop.cancel();
        self.tracker.close();
        let open = self.pool.session_count();
        if open > 0 {
            info!(sessions = open, grace = %humantime::format_duration(grace), "shutting down: waiting for sessions to end");
        }
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            // Switched first: a session registered after the close pass below sees it at once.
            self.pool.closing.cancel();
            let sessions = self.pool.sessions();
            info!(sessions = sessions.len(), "grace period over: closing remaining sessions");
            for s in sessions {
                s.close("shutdown");
            }
            self.tracker.wait().await;
        }
        // Every session has ended and queued its access log line: write them, then stop.
        self.access_stop.cancel();
        let _ = self.access_task.await;
        // Their sessions and the moves' own tasks have ended: the loops' threads go.
        if let Some(loops) = self.loops {
            let _ = tokio::task::spawn_blocking(move || drop(loops)).await;
        }
        info!("meshgate stopped");
    }
}

/// What happens to a running meshgate, for whoever reports it (the CLI tells systemd).
pub trait Lifecycle {
    /// Started: every listener is bound.
    fn ready(&self, _mg: &Meshgate) {}
    /// A reload was applied, or refused (the running configuration stays).
    fn reloaded(&self, _mg: &Meshgate, _result: &Result<(), String>) {}
    /// Shutting down: sessions are drained from here on.
    fn stopping(&self) {}
}

/// Nothing to report.
impl Lifecycle for () {}

/// What the CLI runs: start, then serve until `shutdown` resolves. `reloads` yields new
/// configurations (SIGHUP), already validated; an `Err` is a refused reload to record.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Result<Config, String>>,
    lifecycle: &impl Lifecycle,
) -> Result<(), Error> {
    let mg = Meshgate::start_daemon(config).await?;
    lifecycle.ready(&mg);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(r) = reloads.recv() => {
                let result = r.and_then(|c| mg.reload(c));
                if let Err(why) = &result {
                    mg.reload_failed(why);
                }
                lifecycle.reloaded(&mg, &result);
            }
        }
    }
    lifecycle.stopping();
    mg.shutdown().await;
    Ok(())
}
