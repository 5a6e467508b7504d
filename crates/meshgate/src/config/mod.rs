//! Typed configuration: the TOML file format, defaults, validation, and the nginx upstream import.
//!
//! Parsing happens in two steps, as in pingora and rathole: serde reads the file into `File*`
//! structs that reject unknown keys, then `validate` turns them into a [`Config`] whose values
//! are known to be usable. Every error is one line naming the key and how to fix it.

pub mod nginx;
mod print;
pub use print::MASKED;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Everything meshgate needs to run, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub proxy: ProxyConfig,
    pub health: HealthConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    pub replication: ReplicationConfig,
    pub sessions: SessionsConfig,
    pub access_log: AccessLogConfig,
    /// `[coordination]`: several instances sharing state through etcd; `None` without the
    /// section (one instance, state in files).
    pub coordination: Option<CoordinationConfig>,
    pub brokers: Vec<BrokerConfig>,
    /// What the file said that still works but should change (old key names), one line each;
    /// logged at start and on reload, printed by `validate`.
    pub warnings: Vec<String>,
}

/// One line per ended client session (see `accesslog`).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// The file lines are appended to (opened again on reload, for logrotate); `None`: stdout.
    pub path: Option<std::path::PathBuf>,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Text,
    Json,
}

/// Persistent client sessions that survive a broker failure (see `durable`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionsConfig {
    /// Record acknowledged subscriptions of persistent sessions, restore them and migrate them.
    pub enabled: bool,
    /// Where the record is kept so it survives a meshgate restart (`None`: memory only).
    pub state_file: Option<std::path::PathBuf>,
    /// Sessions recorded at most; the one seen longest ago gives way.
    pub max_sessions: usize,
    /// Subscriptions recorded per session at most; beyond, the session is marked incomplete.
    pub max_subscriptions: usize,
    /// How long a disconnected MQTT 3.x persistent session is kept (5: its own expiry, capped by this).
    pub expiry: Duration,
    /// Keep each persistent session mirrored, offline, on the next broker in priority order.
    pub standby: bool,
    /// How often a standby's queue is emptied while its client is connected elsewhere.
    pub standby_trim: Duration,
}

/// Certificates: the TLS listener's, the CA that client certificates must chain to, and the CA
/// that brokers with `tls = true` must present certificates from. Files are PEM, re-read on reload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsConfig {
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// When set, clients of the TLS listener must present a certificate signed by this CA.
    pub client_ca: Option<std::path::PathBuf>,
    pub broker_ca: Option<std::path::PathBuf>,
}

/// `[coordination] prefix` when the file does not set it.
pub const DEFAULT_COORDINATION_PREFIX: &str = "/meshgate/";
/// `[coordination] lease_ttl` when the file does not set it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// Several meshgate instances as one, through etcd (see `coordination`).
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinationConfig {
    /// etcd client URLs (`http://host:port`); three or more members in production.
    pub etcd: Vec<String>,
    /// This instance's name, unique among the instances (default: the host name).
    pub instance: String,
    /// The key prefix under which the instances keep their state (default "/meshgate/").
    pub prefix: String,
    /// The lease that keeps this instance's keys (and its replication leadership) alive; a
    /// dead instance's keys vanish this long after its last renewal.
    pub lease_ttl: Duration,
}

/// Replication between the brokers (see `replication`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    pub enabled: bool,
    /// Highest QoS of the copies (and of meshgate's own subscriptions), 0..=2.
    pub max_qos: u8,
    /// Topic filters replicated; `#` is everything (but never `$` topics or meshgate's probes).
    pub include: Vec<String>,
    /// Topic filters never replicated.
    pub exclude: Vec<String>,
    /// Where the retained-state record is kept so convergence survives a meshgate restart.
    pub state_file: Option<std::path::PathBuf>,
    /// How often lag probes travel each broker pair.
    pub lag_interval: Duration,
    /// How long a deleted retained topic is remembered, so a stale copy cannot revive it.
    pub tombstone_ttl: Duration,
    /// Messages queued per broker link before copies are dropped (and counted).
    pub queue: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    /// Where MQTT clients connect.
    pub mqtt: String,
    /// Where MQTT clients connect over TLS (conventionally port 8883); needs [tls] cert and key.
    pub mqtts: Option<String>,
    /// Where the HTTP API, metrics and dashboard are served; `None` turns it off.
    pub http: Option<String>,
    /// Where MQTT clients connect over WebSockets (conventionally port 8083 or 9001).
    pub ws: Option<String>,
    /// The same over TLS (wss://, conventionally 8084 or 443); needs [tls] cert and key.
    pub wss: Option<String>,
    /// The HTTP path of the WebSocket upgrade (MQTT.js and paho ask for "/mqtt").
    pub ws_path: String,
    /// Peers whose forwarded client address (`X-Forwarded-For`, a PROXY protocol header) is
    /// believed.
    pub trusted_proxies: Vec<Network>,
    /// Which listeners expect a PROXY protocol header before anything else.
    pub proxy_protocol: ListenerProxyProtocol,
}

/// The PROXY protocol (HAProxy's), as a listener expects it or as a broker is sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

impl ProxyProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// Per client listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenerProxyProtocol {
    pub mqtt: ProxyProtocol,
    pub mqtts: ProxyProtocol,
    pub ws: ProxyProtocol,
    pub wss: ProxyProtocol,
}

/// The client listeners, by what a connection goes through before its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

impl Listener {
    pub const ALL: [Listener; 4] = [Listener::Mqtt, Listener::Mqtts, Listener::Ws, Listener::Wss];

    /// The `listener` label of the metrics, and the `[listen]` key.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Mqtt => "mqtt",
            Listener::Mqtts => "mqtts",
            Listener::Ws => "ws",
            Listener::Wss => "wss",
        }
    }
}

impl Listen {
    /// Whether the client listener is configured.
    pub fn has(&self, listener: Listener) -> bool {
        match listener {
            Listener::Mqtt => true,
            Listener::Mqtts => self.mqtts.is_some(),
            Listener::Ws => self.ws.is_some(),
            Listener::Wss => self.wss.is_some(),
        }
    }
}

impl ListenerProxyProtocol {
    pub fn of(&self, listener: Listener) -> ProxyProtocol {
        match listener {
            Listener::Mqtt => self.mqtt,
            Listener::Mqtts => self.mqtts,
            Listener::Ws => self.ws,
            Listener::Wss => self.wss,
        }
    }
}

/// An address range (CIDR, "10.0.0.0/8"; a bare address is one host).
pub type Network = ipnet::IpNet;

/// One broker of the pool, as configured. Its live health lives in `pool::Broker`.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    pub name: String,
    /// `host:port`; resolved at connect time so hostnames of real deployments work.
    pub address: String,
    /// 1 = primary tier; a higher tier is used only when every broker of all lower tiers is unavailable.
    pub priority: u32,
    /// Share of sessions within its tier (least connections by weight).
    pub weight: u32,
    /// Failed attempts within `fail_timeout` that bar the broker for `fail_timeout` (0 = never).
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Most proxied sessions at once (0 = no limit); a full broker is skipped.
    pub max_conns: u32,
    /// `false` is the nginx `down` flag or an admin disable at start.
    pub enabled: bool,
    /// Talk TLS to this broker (verified against [tls] broker_ca).
    pub tls: bool,
    /// Name to verify the broker's certificate against; default: the host part of `address`.
    pub tls_name: Option<String>,
    /// A PROXY protocol header starts every connection to the broker (Mosquitto >= 2.1
    /// `enable_proxy_protocol`): the client's address for client sessions, meshgate's own for
    /// its probes and its own connections.
    pub proxy_protocol: ProxyProtocol,
    /// Where the broker was defined when that is not a [[broker]] table: "FILE line N" of the
    /// nginx `server` line it was imported from, for `validate` to show.
    pub source: Option<String>,
}

impl BrokerConfig {
    /// A broker at `address` with every default (named after its address): for tools that
    /// reach brokers outside a configuration.
    pub fn at(address: &str) -> BrokerConfig {
        BrokerConfig {
            name: address.to_string(),
            address: address.to_string(),
            priority: 1,
            weight: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            enabled: true,
            tls: false,
            tls_name: None,
            proxy_protocol: ProxyProtocol::Off,
            source: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Mqtt,
    Pubsub,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Mqtt => "mqtt",
            ProbeKind::Pubsub => "pubsub",
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub probe: ProbeKind,
    /// MQTT protocol level of the probe's CONNECT: 4 (3.1.1) or 5.
    pub mqtt_version: u8,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDown {
    Close,
    Keep,
}

/// What meshgate does with a session it moves (failback, drain, disable, a removed broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Open the session on the new broker and switch the client's stream over at a packet
    /// boundary; the client's connection stays open (see `proxy::switch`).
    Switch,
    /// Close the client's connection; it reconnects to the new broker.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    Drain,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Time a client has to send its whole CONNECT after the TCP accept.
    pub client_connect_timeout: Duration,
    /// Time allowed for the TCP connect to a broker.
    pub upstream_connect_timeout: Duration,
    /// Time a broker has to answer our forwarded CONNECT with a CONNACK.
    pub connack_timeout: Duration,
    /// Brokers tried for one client CONNECT before the client is told "server unavailable".
    pub connect_tries: u32,
    pub on_down: OnDown,
    pub failback: Failback,
    /// How sessions move: switched under the client's connection, or closed.
    pub moves: Move,
    /// Sessions per second moved off a lower tier (failback) or a drained broker.
    pub failback_rate: f64,
    /// Time sessions get to end by themselves after SIGTERM before they are closed.
    pub shutdown_grace: Duration,
    /// Largest MQTT packet accepted from a client, checked from the remaining-length field.
    pub max_packet_size: u32,
    /// Most concurrent client connections over every listener together (0 = no limit beyond
    /// file descriptors). Not to be confused with `[sessions] max_sessions`, the persistent
    /// sessions recorded.
    pub max_connections: u32,
    /// Most concurrent client connections from one source address (0 = no limit).
    pub max_connections_per_source: u32,
    /// CONNECTs per second allowed from one source address (0 = no limit) ...
    pub connect_rate_per_source: f64,
    /// ... with bursts of up to this many.
    pub connect_burst_per_source: f64,
    /// Threads that run client sessions (and everything else); 0 = one per core, or
    /// `TOKIO_WORKER_THREADS` when set. Read at start only.
    pub workers: u32,
}

impl ProxyConfig {
    /// Sessions of a broker that fails are switched under their clients' connections (rather
    /// than closed, or left where they are): only then are the clients' PUBLISHes copied.
    pub fn switches_off_failed_brokers(&self) -> bool {
        self.moves == Move::Switch && self.on_down == OnDown::Close
    }
}

#[derive(Clone, PartialEq, Default)]
pub struct AdminConfig {
    pub token: Option<String>,
}

/// How a secret shows in Debug output and `validate`: whether it is set, never its value.
pub fn masked(secret: &Option<String>) -> &'static str {
    match secret {
        Some(_) => "(set)",
        None => "(not set)",
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig").field("token", &masked(&self.token)).finish()
    }
}

impl std::fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthConfig")
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("rise", &self.rise)
            .field("fall", &self.fall)
            .field("probe", &self.probe)
            .field("mqtt_version", &self.mqtt_version)
            .field("username", &self.username)
            .field("password", &masked(&self.password))
            .finish()
    }
}

/// Why a configuration cannot be used; each variant prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid { path: String, key: String, message: String },
    #[error("{path}: {err}")]
    Nginx { path: String, err: nginx::NginxError },
}

// ---- the file format ------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: FileListen,
    #[serde(default)]
    proxy: FileProxy,
    #[serde(default)]
    health: FileHealth,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    replication: FileReplication,
    #[serde(default)]
    sessions: FileSessions,
    #[serde(default)]
    access_log: FileAccessLog,
    coordination: Option<FileCoordination>,
    #[serde(default)]
    broker: Vec<FileBroker>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    broker_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplication {
    enabled: Option<bool>,
    max_qos: Option<u8>,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    state_file: Option<String>,
    lag_interval: Option<String>,
    tombstone_ttl: Option<String>,
    queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSessions {
    enabled: Option<bool>,
    state_file: Option<String>,
    max_sessions: Option<usize>,
    max_subscriptions: Option<usize>,
    expiry: Option<String>,
    standby: Option<bool>,
    standby_trim: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCoordination {
    etcd: Option<Vec<String>>,
    instance: Option<String>,
    prefix: Option<String>,
    lease_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccessLog {
    enabled: Option<bool>,
    path: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    mqtt: Option<String>,
    mqtts: Option<String>,
    http: Option<String>,
    ws: Option<String>,
    wss: Option<String>,
    ws_path: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    proxy_protocol: Option<FileProxyProtocol>,
}

/// `proxy_protocol = "v2"` (every client listener) or `{ mqtt = "v2", ws = "off", ... }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileProxyProtocol {
    All(String),
    Each { mqtt: Option<String>, mqtts: Option<String>, ws: Option<String>, wss: Option<String> },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBroker {
    name: Option<String>,
    address: Option<String>,
    priority: Option<u32>,
    weight: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
    max_conns: Option<u32>,
    enabled: Option<bool>,
    tls: Option<bool>,
    tls_name: Option<String>,
    proxy_protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    probe: Option<String>,
    mqtt_version: Option<u8>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProxy {
    client_connect_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    connack_timeout: Option<String>,
    connect_tries: Option<u32>,
    on_down: Option<String>,
    failback: Option<String>,
    #[serde(rename = "move")]
    moves: Option<String>,
    failback_rate: Option<f64>,
    shutdown_grace: Option<String>,
    max_packet_size: Option<u32>,
    max_connections: Option<u32>,
    max_connections_per_source: Option<u32>,
    /// The old names of `max_connections` and `max_connections_per_source`, still accepted.
    max_sessions: Option<u32>,
    max_sessions_per_source: Option<u32>,
    connect_rate_per_source: Option<f64>,
    connect_burst_per_source: Option<f64>,
    workers: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    token: Option<String>,
}

/// More worker threads than this is a typo, not a machine.
pub const MAX_WORKERS: u32 = 1024;

pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

impl Config {
    /// Every default in one place: what each key is when the file leaves it out (no brokers).
    pub fn defaults() -> Config {
        Config {
            listen: Listen {
                mqtt: DEFAULT_MQTT_LISTEN.into(),
                mqtts: None,
                http: Some(DEFAULT_HTTP_LISTEN.into()),
                ws: None,
                wss: None,
                ws_path: "/mqtt".into(),
                trusted_proxies: Vec::new(),
                proxy_protocol: ListenerProxyProtocol::default(),
            },
            proxy: ProxyConfig {
                client_connect_timeout: Duration::from_secs(10),
                upstream_connect_timeout: Duration::from_secs(1),
                connack_timeout: Duration::from_secs(1),
                connect_tries: 3,
                on_down: OnDown::Close,
                failback: Failback::Drain,
                moves: Move::Switch,
                failback_rate: 10.0,
                shutdown_grace: Duration::from_secs(5),
                max_packet_size: 1 << 20,
                max_connections: 0,
                max_connections_per_source: 0,
                connect_rate_per_source: 0.0,
                // Two seconds' worth of the rate when not set (see `validate`): a device that
                // reconnects twice in a row is not an attack.
                connect_burst_per_source: 1.0,
                workers: 0,
            },
            health: HealthConfig {
                interval: Duration::from_millis(250),
                timeout: Duration::from_millis(250),
                rise: 2,
                fall: 2,
                probe: ProbeKind::Mqtt,
                mqtt_version: 4,
                username: None,
                password: None,
            },
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            replication: ReplicationConfig {
                enabled: false,
                max_qos: 1,
                include: vec!["#".to_string()],
                exclude: Vec::new(),
                state_file: None,
                lag_interval: Duration::from_secs(1),
                tombstone_ttl: Duration::from_secs(3600),
                queue: 100_000,
            },
            sessions: SessionsConfig {
                enabled: true,
                state_file: None,
                max_sessions: 100_000,
                max_subscriptions: 100,
                expiry: Duration::from_secs(24 * 3600),
                standby: false,
                standby_trim: Duration::from_secs(10),
            },
            access_log: AccessLogConfig { enabled: true, path: None, format: AccessLogFormat::Text },
            coordination: None,
            brokers: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Reads and validates a TOML config file. Relative paths in it (state files, certificates,
    /// the access log) are relative to the file's directory, as in nginx and Mosquitto, not to
    /// wherever meshgate was started from.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let mut config = Config::from_toml(&text, &path.display().to_string())?;
        config.resolve_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes every relative path in the configuration relative to `dir` instead.
    pub fn resolve_paths(&mut self, dir: &Path) {
        if dir.as_os_str().is_empty() {
            return;
        }
        // Absolute, so that what `validate --print` shows means the same from anywhere.
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let dir = dir.as_path();
        let t = &mut self.tls;
        let paths = [&mut t.cert, &mut t.key, &mut t.client_ca, &mut t.broker_ca].into_iter().chain([
            &mut self.replication.state_file,
            &mut self.sessions.state_file,
            &mut self.access_log.path,
        ]);
        for p in paths.flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_string(), message: toml_message(&e, text) })?;
        validate(file, origin, None)
    }

    /// Builds a config from an nginx stream file: its `listen` and upstream servers, with the
    /// other settings from `base` TOML text (may be empty). nginx `backup` servers become
    /// sequential tiers in file order, because that is the order operators write them in.
    pub fn from_nginx(
        nginx_text: &str,
        nginx_origin: &str,
        base_text: &str,
        base_origin: &str,
    ) -> Result<(Config, nginx::NginxStream), ConfigError> {
        let stream =
            nginx::parse(nginx_text).map_err(|err| ConfigError::Nginx { path: nginx_origin.to_string(), err })?;
        let file: FileConfig = toml::from_str(base_text)
            .map_err(|e| ConfigError::Parse { path: base_origin.to_string(), message: toml_message(&e, base_text) })?;
        let mut config = validate(file, base_origin, Some((&stream, nginx_origin)))?;
        // Only here are the nginx file's name and its notes both at hand.
        for b in &mut config.brokers {
            if let Some(line) = &mut b.source {
                *line = format!("{nginx_origin} {line}");
            }
        }
        let notes = stream.warnings.iter().map(|w| format!("{nginx_origin}: {w}"));
        config.warnings.splice(0..0, notes);
        Ok((config, stream))
    }

    pub fn load_nginx(nginx_path: &Path, base: Option<&Path>) -> Result<(Config, nginx::NginxStream), ConfigError> {
        let nginx_text = read(nginx_path)?;
        let (base_text, base_origin) = match base {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (String::new(), "(defaults)".to_string()),
        };
        let (mut config, stream) =
            Config::from_nginx(&nginx_text, &nginx_path.display().to_string(), &base_text, &base_origin)?;
        if let Some(dir) = base.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        Ok((config, stream))
    }

    /// The settings read only at start that differ in `new`: what a reload to `new` must name
    /// in its warning, because it keeps them until a restart. Everything else applies on reload.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let changed = [
            ("listen.mqtt", self.listen.mqtt != new.listen.mqtt),
            ("listen.mqtts", self.listen.mqtts != new.listen.mqtts),
            ("listen.http", self.listen.http != new.listen.http),
            ("listen.ws", self.listen.ws != new.listen.ws),
            ("listen.wss", self.listen.wss != new.listen.wss),
            ("listen.ws_path", self.listen.ws_path != new.listen.ws_path),
            ("listen.trusted_proxies", self.listen.trusted_proxies != new.listen.trusted_proxies),
            ("listen.proxy_protocol", self.listen.proxy_protocol != new.listen.proxy_protocol),
            ("proxy.workers", self.proxy.workers != new.proxy.workers),
            ("[replication]", self.replication != new.replication),
            ("[sessions]", self.sessions != new.sessions),
            ("[coordination]", self.coordination != new.coordination),
        ];
        for (key, differs) in changed {
            if differs {
                keys.push(key);
            }
        }
        keys
    }

    pub fn broker(&self, name: &str) -> Option<&BrokerConfig> {
        self.brokers.iter().find(|b| b.name == name)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.display().to_string(), err })
}

/// toml's errors span several lines with a source excerpt; operators get one line with the
/// line number and the table the mistake is in, which is what they need to find it.
fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else { return msg };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| format!(" in {}", l.split(']').next().unwrap_or(l).to_string() + "]"))
        .unwrap_or_default();
    format!("line {line}{table}: {msg}")
}

/// The default instance name: the host name, as `hostname` prints it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshgate".to_string())
}

fn coordination(c: &Checker, f: FileCoordination) -> Result<CoordinationConfig, ConfigError> {
    let etcd = f.etcd.unwrap_or_default();
    if etcd.is_empty() {
        return Err(c.err(
            "coordination.etcd",
            "must list at least one etcd client URL, e.g. [\"http://127.0.0.1:2379\"] (three members in production)",
        ));
    }
    for url in &etcd {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(c.err(
                "coordination.etcd",
                format!("{url:?} is not an http://host:port URL (TLS to etcd is not supported yet)"),
            ));
        };
        let hostport = rest.trim_end_matches('/');
        if !hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)) {
            return Err(
                c.err("coordination.etcd", format!("{url:?} needs a host and a port, e.g. http://127.0.0.1:2379"))
            );
        }
    }
    let instance = f.instance.unwrap_or_else(host_name);
    if instance.is_empty()
        || instance.len() > 64
        || !instance.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
    {
        return Err(c.err(
            "coordination.instance",
            format!("{instance:?} must be 1 to 64 letters, digits, '-', '_' or '.' (and unique among the instances)"),
        ));
    }
    let prefix = f.prefix.unwrap_or_else(|| DEFAULT_COORDINATION_PREFIX.to_string());
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        return Err(
            c.err("coordination.prefix", format!("{prefix:?} must start and end with '/', e.g. \"/meshgate/\""))
        );
    }
    let lease_ttl = c.positive_duration("coordination.lease_ttl", f.lease_ttl.as_ref(), DEFAULT_LEASE_TTL)?;
    if lease_ttl.subsec_nanos() != 0 || !(2..=300).contains(&lease_ttl.as_secs()) {
        return Err(c.err(
            "coordination.lease_ttl",
            "must be whole seconds from 2s to 300s (etcd leases count seconds; shorter than 2s etcd refuses)",
        ));
    }
    Ok(CoordinationConfig { etcd, instance, prefix, lease_ttl })
}

pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    humantime::parse_duration(s).ok()
}

struct Checker<'a> {
    path: &'a str,
}

impl Checker<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_string(), key: key.into(), message: message.into() }
    }

    fn duration(&self, key: &str, v: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s)
                .ok_or_else(|| self.err(key, format!("bad duration {s:?} (write it like \"250ms\", \"1s\", \"30s\")"))),
        }
    }

    fn positive_duration(&self, key: &str, v: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v, default)?;
        if d.is_zero() {
            return Err(self.err(key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn socket_addr(&self, key: &str, v: &str) -> Result<(), ConfigError> {
        // Listen addresses must be literal: binding to a name that resolves to several
        // addresses would silently pick one.
        v.parse::<SocketAddr>()
            .map(|_| ())
            .map_err(|_| self.err(key, format!("{v:?} is not an ip:port address (e.g. \"127.0.0.1:1883\")")))
    }
}

/// A key that has a new name: either may be set, not both; the old one earns a warning.
fn renamed<T>(
    c: &Checker,
    warnings: &mut Vec<String>,
    key: &str,
    value: Option<T>,
    old_key: &str,
    old_value: Option<T>,
) -> Result<Option<T>, ConfigError> {
    match (value, old_value) {
        (Some(_), Some(_)) => Err(c.err(old_key, format!("is the old name of {key}: set only {key}"))),
        (None, Some(v)) => {
            warnings.push(format!("{}: {old_key} is now called {key}; the old name still works", c.path));
            Ok(Some(v))
        }
        (v, None) => Ok(v),
    }
}

fn validate(file: FileConfig, path: &str, nginx: Option<(&nginx::NginxStream, &str)>) -> Result<Config, ConfigError> {
    let c = Checker { path };
    let mut warnings = Vec::new();
    // Every default lives in `Config::defaults`; a key left out of the file takes it from there.
    let d = Config::defaults();

    let mqtt = match (nginx.and_then(|(n, _)| n.listen.clone()), file.listen.mqtt) {
        (Some(from_nginx), _) => from_nginx,
        (None, Some(v)) => v,
        (None, None) => d.listen.mqtt.clone(),
    };
    c.socket_addr("listen.mqtt", &mqtt)?;
    let optional_listener = |key: &str, v: Option<String>| match v {
        Some(v) if v.is_empty() || v == "off" => Ok(None),
        Some(v) => c.socket_addr(key, &v).map(|()| Some(v)),
        None => Ok(None),
    };
    let mqtts = optional_listener("listen.mqtts", file.listen.mqtts)?;
    let ws = optional_listener("listen.ws", file.listen.ws)?;
    let wss = optional_listener("listen.wss", file.listen.wss)?;
    let ws_path = file.listen.ws_path.unwrap_or_else(|| d.listen.ws_path.clone());
    if !ws_path.starts_with('/') || ws_path.contains(char::is_whitespace) {
        return Err(
            c.err("listen.ws_path", format!("{ws_path:?} must be an HTTP path starting with / (e.g. \"/mqtt\")"))
        );
    }
    let mut trusted_proxies = Vec::new();
    for v in file.listen.trusted_proxies.unwrap_or_default() {
        let net = v.parse::<Network>().or_else(|_| v.parse::<std::net::IpAddr>().map(Network::from)).map_err(|_| {
            c.err(
                "listen.trusted_proxies",
                format!("{v:?} is not an address or range (e.g. \"10.0.0.0/8\", \"127.0.0.1\")"),
            )
        })?;
        trusted_proxies.push(net);
    }
    let path = |v: Option<String>| v.filter(|s| !s.is_empty()).map(std::path::PathBuf::from);
    let tls = TlsConfig {
        cert: path(file.tls.cert),
        key: path(file.tls.key),
        client_ca: path(file.tls.client_ca),
        broker_ca: path(file.tls.broker_ca),
    };
    let pp = |key: &str, v: Option<&String>| -> Result<ProxyProtocol, ConfigError> {
        match v.map(String::as_str) {
            None | Some("off") => Ok(ProxyProtocol::Off),
            Some("v1") => Ok(ProxyProtocol::V1),
            Some("v2") => Ok(ProxyProtocol::V2),
            Some(other) => Err(c.err(key, format!("{other:?} is not one of \"v1\", \"v2\", \"off\""))),
        }
    };
    let proxy_protocol = match &file.listen.proxy_protocol {
        None => ListenerProxyProtocol::default(),
        Some(FileProxyProtocol::All(v)) => {
            let all = pp("listen.proxy_protocol", Some(v))?;
            ListenerProxyProtocol { mqtt: all, mqtts: all, ws: all, wss: all }
        }
        Some(FileProxyProtocol::Each { mqtt, mqtts, ws, wss }) => ListenerProxyProtocol {
            mqtt: pp("listen.proxy_protocol.mqtt", mqtt.as_ref())?,
            mqtts: pp("listen.proxy_protocol.mqtts", mqtts.as_ref())?,
            ws: pp("listen.proxy_protocol.ws", ws.as_ref())?,
            wss: pp("listen.proxy_protocol.wss", wss.as_ref())?,
        },
    };
    let any_pp = [proxy_protocol.mqtt, proxy_protocol.mqtts, proxy_protocol.ws, proxy_protocol.wss]
        .iter()
        .any(|p| *p != ProxyProtocol::Off);
    if any_pp && trusted_proxies.is_empty() {
        return Err(c.err(
            "listen.proxy_protocol",
            "needs listen.trusted_proxies: the addresses of the balancers that send the header (a header from anyone else is refused)",
        ));
    }
    for (key, on) in [("listen.mqtts", mqtts.is_some()), ("listen.wss", wss.is_some())] {
        if on && (tls.cert.is_none() || tls.key.is_none()) {
            return Err(c.err(key, "a TLS listener needs [tls] cert and key (PEM files)"));
        }
    }
    let http = match file.listen.http {
        Some(v) if v.is_empty() || v == "off" => None,
        Some(v) => {
            c.socket_addr("listen.http", &v)?;
            Some(v)
        }
        None => d.listen.http.clone(),
    };

    let h = file.health;
    let probe = match h.probe.as_deref() {
        None => d.health.probe,
        Some("mqtt") => ProbeKind::Mqtt,
        Some("tcp") => ProbeKind::Tcp,
        Some("pubsub") => ProbeKind::Pubsub,
        Some(other) => {
            return Err(c.err("health.probe", format!("unknown probe {other:?} (use \"tcp\", \"mqtt\" or \"pubsub\")")))
        }
    };
    let health = HealthConfig {
        interval: c.positive_duration("health.interval", h.interval.as_ref(), d.health.interval)?,
        timeout: c.positive_duration("health.timeout", h.timeout.as_ref(), d.health.timeout)?,
        rise: h.rise.unwrap_or(d.health.rise),
        fall: h.fall.unwrap_or(d.health.fall),
        probe,
        mqtt_version: h.mqtt_version.unwrap_or(d.health.mqtt_version),
        username: h.username,
        password: h.password,
    };
    if health.rise == 0 {
        return Err(c.err("health.rise", "must be at least 1"));
    }
    if health.fall == 0 {
        return Err(c.err("health.fall", "must be at least 1"));
    }
    if !matches!(health.mqtt_version, 4 | 5) {
        return Err(c.err("health.mqtt_version", "must be 4 (MQTT 3.1.1) or 5"));
    }
    if health.password.is_some() && health.username.is_none() {
        return Err(c.err("health.password", "a password needs health.username as well"));
    }

    let p = file.proxy;
    let on_down = match p.on_down.as_deref() {
        None => d.proxy.on_down,
        Some("close") => OnDown::Close,
        Some("keep") => OnDown::Keep,
        Some(o) => return Err(c.err("proxy.on_down", format!("{o:?} is not \"close\" or \"keep\""))),
    };
    let failback = match p.failback.as_deref() {
        None => d.proxy.failback,
        Some("drain") => Failback::Drain,
        Some("none") => Failback::None,
        Some(o) => return Err(c.err("proxy.failback", format!("{o:?} is not \"drain\" or \"none\""))),
    };
    let moves = match p.moves.as_deref() {
        None => d.proxy.moves,
        Some("switch") => Move::Switch,
        Some("close") => Move::Close,
        Some(o) => return Err(c.err("proxy.move", format!("{o:?} is not \"switch\" or \"close\""))),
    };
    let proxy = ProxyConfig {
        client_connect_timeout: c.positive_duration(
            "proxy.client_connect_timeout",
            p.client_connect_timeout.as_ref(),
            d.proxy.client_connect_timeout,
        )?,
        upstream_connect_timeout: c.positive_duration(
            "proxy.upstream_connect_timeout",
            p.upstream_connect_timeout.as_ref(),
            d.proxy.upstream_connect_timeout,
        )?,
        connack_timeout: c.positive_duration(
            "proxy.connack_timeout",
            p.connack_timeout.as_ref(),
            d.proxy.connack_timeout,
        )?,
        connect_tries: p.connect_tries.unwrap_or(d.proxy.connect_tries),
        on_down,
        failback,
        moves,
        failback_rate: p.failback_rate.unwrap_or(d.proxy.failback_rate),
        shutdown_grace: c.duration("proxy.shutdown_grace", p.shutdown_grace.as_ref(), d.proxy.shutdown_grace)?,
        max_packet_size: p.max_packet_size.unwrap_or(d.proxy.max_packet_size),
        max_connections: renamed(
            &c,
            &mut warnings,
            "proxy.max_connections",
            p.max_connections,
            "proxy.max_sessions",
            p.max_sessions,
        )?
        .unwrap_or(d.proxy.max_connections),
        max_connections_per_source: renamed(
            &c,
            &mut warnings,
            "proxy.max_connections_per_source",
            p.max_connections_per_source,
            "proxy.max_sessions_per_source",
            p.max_sessions_per_source,
        )?
        .unwrap_or(d.proxy.max_connections_per_source),
        connect_rate_per_source: p.connect_rate_per_source.unwrap_or(d.proxy.connect_rate_per_source),
        connect_burst_per_source: d.proxy.connect_burst_per_source,
        workers: p.workers.unwrap_or(d.proxy.workers),
    };
    if proxy.connect_tries == 0 {
        return Err(c.err("proxy.connect_tries", "must be at least 1"));
    }
    if !(proxy.failback_rate.is_finite() && proxy.failback_rate > 0.0) {
        return Err(c.err("proxy.failback_rate", "must be a positive number of sessions per second"));
    }
    if !(proxy.connect_rate_per_source.is_finite() && proxy.connect_rate_per_source >= 0.0) {
        return Err(c.err("proxy.connect_rate_per_source", "must be a number of CONNECTs per second, 0 for no limit"));
    }
    let mut proxy = proxy;
    proxy.connect_burst_per_source = match p.connect_burst_per_source {
        Some(b) if !(b.is_finite() && b >= 1.0) => {
            return Err(c.err("proxy.connect_burst_per_source", "must be at least 1"));
        }
        Some(b) => b,
        // Two seconds' worth: a device that reconnects twice in a row is not an attack.
        None => (proxy.connect_rate_per_source * 2.0).max(d.proxy.connect_burst_per_source),
    };
    if proxy.workers > MAX_WORKERS {
        return Err(c.err("proxy.workers", format!("must be at most {MAX_WORKERS} (0 = one per core)")));
    }
    if proxy.max_packet_size < 64 {
        return Err(c.err("proxy.max_packet_size", "must be at least 64 bytes"));
    }

    let admin = AdminConfig {
        token: match file.admin.token {
            Some(t) if t.trim().is_empty() => {
                return Err(c.err("admin.token", "must not be empty (leave it out to turn admin actions off)"))
            }
            t => t,
        },
    };

    let r = file.replication;
    let replication = ReplicationConfig {
        enabled: r.enabled.unwrap_or(d.replication.enabled),
        max_qos: r.max_qos.unwrap_or(d.replication.max_qos),
        include: r.include.unwrap_or_else(|| d.replication.include.clone()),
        exclude: r.exclude.unwrap_or_default(),
        state_file: r.state_file.filter(|s| !s.is_empty()).map(std::path::PathBuf::from),
        lag_interval: c.positive_duration(
            "replication.lag_interval",
            r.lag_interval.as_ref(),
            d.replication.lag_interval,
        )?,
        tombstone_ttl: c.positive_duration(
            "replication.tombstone_ttl",
            r.tombstone_ttl.as_ref(),
            d.replication.tombstone_ttl,
        )?,
        queue: r.queue.unwrap_or(d.replication.queue),
    };
    if replication.max_qos > 2 {
        return Err(c.err("replication.max_qos", "must be 0, 1 or 2"));
    }
    for (key, list) in [("replication.include", &replication.include), ("replication.exclude", &replication.exclude)] {
        if let Some(bad) = list.iter().find(|f| !valid_filter(f)) {
            return Err(c.err(key, format!("{bad:?} is not an MQTT topic filter ('#' only last, '+' a whole level)")));
        }
    }
    if replication.include.is_empty() {
        return Err(c.err("replication.include", "must name at least one topic filter (\"#\" for everything)"));
    }
    if replication.queue == 0 {
        return Err(c.err("replication.queue", "must be at least 1"));
    }

    let se = file.sessions;
    let sessions = SessionsConfig {
        enabled: se.enabled.unwrap_or(d.sessions.enabled),
        state_file: se.state_file.filter(|s| !s.is_empty()).map(std::path::PathBuf::from),
        max_sessions: se.max_sessions.unwrap_or(d.sessions.max_sessions),
        max_subscriptions: se.max_subscriptions.unwrap_or(d.sessions.max_subscriptions),
        expiry: c.positive_duration("sessions.expiry", se.expiry.as_ref(), d.sessions.expiry)?,
        standby: se.standby.unwrap_or(d.sessions.standby),
        standby_trim: c.positive_duration(
            "sessions.standby_trim",
            se.standby_trim.as_ref(),
            d.sessions.standby_trim,
        )?,
    };
    if sessions.max_subscriptions > 10_000 {
        return Err(c.err("sessions.max_subscriptions", "must be at most 10000"));
    }
    if sessions.max_sessions == 0 || sessions.max_subscriptions == 0 {
        let key = if sessions.max_sessions == 0 { "sessions.max_sessions" } else { "sessions.max_subscriptions" };
        return Err(c.err(key, "must be at least 1 (set sessions.enabled = false to record nothing)"));
    }

    let a = file.access_log;
    let access_log = AccessLogConfig {
        enabled: a.enabled.unwrap_or(d.access_log.enabled),
        path: path(a.path),
        format: match a.format.as_deref() {
            None => d.access_log.format,
            Some("text") => AccessLogFormat::Text,
            Some("json") => AccessLogFormat::Json,
            Some(o) => return Err(c.err("access_log.format", format!("{o:?} is not \"text\" or \"json\""))),
        },
    };

    let coordination = file.coordination.map(|f| coordination(&c, f)).transpose()?;
    if coordination.is_some() && replication.enabled && replication.max_qos == 2 {
        return Err(c.err(
            "replication.max_qos",
            "must be 0 or 1 with [coordination]: a new leader cannot finish the QoS 2 flows of the links' persistent sessions",
        ));
    }
    if coordination.is_some() && replication.enabled && replication.max_qos == 0 {
        warnings.push(format!(
            "{}: replication.max_qos = 0 with [coordination]: brokers queue nothing for the replication links while no instance leads, so what is published during a leader takeover is not replicated (set 1)",
            c.path
        ));
    }

    let brokers = match nginx {
        Some((stream, nginx_path)) => {
            if !file.broker.is_empty() {
                return Err(c.err("broker", format!("[[broker]] tables cannot be combined with --nginx-conf {nginx_path}: the brokers come from its upstream block")));
            }
            brokers_from_nginx(stream)
        }
        None => brokers_from_file(&c, file.broker)?,
    };
    if brokers.is_empty() {
        return Err(c.err("broker", "no brokers configured: add at least one [[broker]] with name and address"));
    }
    if let Some(b) = brokers.iter().find(|b| b.tls) {
        if tls.broker_ca.is_none() {
            return Err(c.err(
                "tls.broker_ca",
                format!(
                    "broker {:?} has tls = true: set [tls] broker_ca to the CA its certificate is signed by",
                    b.name
                ),
            ));
        }
    }
    if replication.enabled {
        if let Some(b) = brokers.iter().find(|b| b.proxy_protocol != ProxyProtocol::Off && b.tls) {
            warnings.push(format!(
                "{}: broker {:?} has tls = true and proxy_protocol set, and replication is on: replication links reach a TLS broker directly and send no PROXY header, so replication to it fails while its listener requires one",
                c.path, b.name
            ));
        }
    }
    for (key, secret) in [("admin.token", &admin.token), ("health.password", &health.password)] {
        if secret.as_deref() == Some(print::MASKED) {
            warnings.push(format!(
                "{}: {key} is {:?}, the placeholder `validate --print` writes for a secret: put the real one here",
                c.path,
                print::MASKED
            ));
        }
    }
    Ok(Config {
        listen: Listen { mqtt, mqtts, http, ws, wss, ws_path, trusted_proxies, proxy_protocol },
        proxy,
        health,
        admin,
        tls,
        replication,
        sessions,
        access_log,
        coordination,
        brokers,
        warnings,
    })
}

fn brokers_from_file(c: &Checker, list: Vec<FileBroker>) -> Result<Vec<BrokerConfig>, ConfigError> {
    let mut out: Vec<BrokerConfig> = Vec::with_capacity(list.len());
    let dflt = BrokerConfig::at("");
    for (i, b) in list.into_iter().enumerate() {
        let key = |k: &str| format!("broker[{}].{k}", i + 1);
        let name = b.name.ok_or_else(|| c.err(key("name"), "missing (every [[broker]] needs a name)"))?;
        if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            return Err(c.err(key("name"), format!("{name:?} must be non-empty letters, digits, '-', '_' or '.'")));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(c.err(key("name"), format!("{name:?} is used by two brokers")));
        }
        let address = b
            .address
            .ok_or_else(|| c.err(key("address"), format!("missing for broker {name:?} (e.g. \"127.0.0.10:1883\")")))?;
        check_host_port(&address).map_err(|m| c.err(key("address"), m))?;
        let priority = b.priority.unwrap_or(i as u32 + 1);
        if priority == 0 {
            return Err(c.err(key("priority"), "must be 1 (primary) or higher"));
        }
        let weight = b.weight.unwrap_or(dflt.weight);
        if weight == 0 {
            return Err(c.err(key("weight"), "must be at least 1 (use enabled = false to take a broker out)"));
        }
        out.push(BrokerConfig {
            name,
            address,
            priority,
            weight,
            max_fails: b.max_fails.unwrap_or(dflt.max_fails),
            fail_timeout: c.positive_duration(&key("fail_timeout"), b.fail_timeout.as_ref(), dflt.fail_timeout)?,
            max_conns: b.max_conns.unwrap_or(dflt.max_conns),
            enabled: b.enabled.unwrap_or(dflt.enabled),
            tls: b.tls.unwrap_or(dflt.tls),
            tls_name: b.tls_name,
            proxy_protocol: match b.proxy_protocol.as_deref() {
                None | Some("off") => ProxyProtocol::Off,
                Some("v1") => ProxyProtocol::V1,
                Some("v2") => ProxyProtocol::V2,
                Some(other) => {
                    return Err(c.err(key("proxy_protocol"), format!("{other:?} is not one of \"v1\", \"v2\", \"off\"")))
                }
            },
            source: None,
        });
    }
    Ok(out)
}

fn brokers_from_nginx(stream: &nginx::NginxStream) -> Vec<BrokerConfig> {
    let mut backup_tier = 1;
    stream
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let priority = if s.backup {
                backup_tier += 1;
                backup_tier
            } else {
                1
            };
            BrokerConfig {
                // A trailing `# name` comment names the broker; nginx.rs keeps names unique.
                name: s.name.clone().unwrap_or_else(|| format!("broker{}", i + 1)),
                address: s.address.clone(),
                priority,
                weight: s.weight.max(1),
                max_fails: s.max_fails,
                fail_timeout: s.fail_timeout,
                max_conns: s.max_conns,
                enabled: !s.down,
                tls: false,
                tls_name: None,
                proxy_protocol: ProxyProtocol::Off,
                source: Some(format!("line {}", s.line)),
            }
        })
        .collect()
}

/// An MQTT topic filter: non-empty, `#` only as the whole last level, `+` only as a whole level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

/// Does `topic` match `filter` (MQTT rules; `#` also matches the parent level)?
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let hint = "write it as host:port, e.g. \"127.0.0.10:1883\" or \"broker1.lan:1883\"";
    let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("{address:?} has no port: {hint}"))?;
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains(':') {
        return Err(format!("{address:?} is not a valid host: {hint}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?} has a bad port: {hint}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, "test.toml").map_err(|e| e.to_string())
    }

    const FIVE: &str = r#"
        [[broker]]
        name = "broker1"
        address = "127.0.0.10:1883"
        [[broker]]
        name = "broker2"
        address = "127.0.0.11:1883"
    "#;

    #[test]
    fn defaults_follow_the_file_order() {
        let c = parse(FIVE).unwrap();
        assert_eq!(c.listen.mqtt, "127.0.0.1:1883");
        assert_eq!(c.listen.http.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(c.brokers[0].priority, 1);
        assert_eq!(c.brokers[1].priority, 2);
        assert_eq!(c.brokers[0].max_fails, 1);
        assert_eq!(c.brokers[0].fail_timeout, Duration::from_secs(10));
        assert_eq!(c.health.interval, Duration::from_millis(250));
        assert_eq!(c.health.timeout, Duration::from_millis(250));
        assert_eq!((c.health.rise, c.health.fall), (2, 2));
        assert_eq!(c.health.probe, ProbeKind::Mqtt);
        assert_eq!(c.proxy.connack_timeout, Duration::from_secs(1));
        assert_eq!(c.proxy.on_down, OnDown::Close);
        assert_eq!(c.proxy.failback, Failback::Drain);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[health]\nintervall = \"1s\"\n").unwrap_err();
        assert!(e.starts_with("test.toml: line 2 in [health]: unknown field `intervall`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e =
            parse(&format!("{FIVE}\n[[broker]]\nname = \"b3\"\naddress = \"127.0.0.1:1\"\nwieght = 2\n")).unwrap_err();
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let e = parse(&format!("[health]\ninterval = \"fast\"\n{FIVE}")).unwrap_err();
        assert_eq!(e, "test.toml: health.interval: bad duration \"fast\" (write it like \"250ms\", \"1s\", \"30s\")");
        let e = parse(&format!(
            "{FIVE}\n[[broker]]\nname = \"b3\"\naddress = \"127.0.0.1:1\"\nfail_timeout = \"30 parsecs\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("broker[3].fail_timeout: bad duration"), "{e}");
    }

    #[test]
    fn no_brokers_is_an_error() {
        let e = parse("[listen]\nmqtt = \"127.0.0.1:1883\"\n").unwrap_err();
        assert_eq!(e, "test.toml: broker: no brokers configured: add at least one [[broker]] with name and address");
    }

    #[test]
    fn broker_errors() {
        let e = parse("[[broker]]\nname = \"a\"\n").unwrap_err();
        assert!(e.contains("broker[1].address: missing"), "{e}");
        let e = parse("[[broker]]\nname = \"a\"\naddress = \"127.0.0.1\"\n").unwrap_err();
        assert!(e.contains("has no port"), "{e}");
        let e = parse("[[broker]]\nname = \"a\"\naddress = \"h:1\"\n[[broker]]\nname = \"a\"\naddress = \"h:2\"\n")
            .unwrap_err();
        assert!(e.contains("used by two brokers"), "{e}");
        assert!(parse("[[broker]]\nname = \"a\"\naddress = \"broker1.lan:1883\"\n").is_ok());
    }

    #[test]
    fn listen_must_be_an_address() {
        let e = parse(&format!("[listen]\nmqtt = \"localhost\"\n{FIVE}")).unwrap_err();
        assert!(e.contains("listen.mqtt"), "{e}");
    }

    #[test]
    fn explicit_priorities_and_tiers() {
        let c = parse(
            "[[broker]]\nname=\"a\"\naddress=\"h:1\"\npriority=1\n[[broker]]\nname=\"b\"\naddress=\"h:2\"\npriority=1\nweight=3\n[[broker]]\nname=\"c\"\naddress=\"h:3\"\npriority=2\n",
        )
        .unwrap();
        assert_eq!(c.brokers.iter().map(|b| b.priority).collect::<Vec<_>>(), vec![1, 1, 2]);
        assert_eq!(c.brokers[1].weight, 3);
    }

    #[test]
    fn shipped_config_is_valid() {
        let text =
            std::fs::read_to_string(concat!(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."), "/configs/meshgate.toml"))
                .unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(c.brokers.len(), 5);
        for (i, b) in c.brokers.iter().enumerate() {
            assert_eq!(b.name, format!("broker{}", i + 1));
            assert_eq!(b.address, format!("127.0.0.{}:1883", 10 + i));
            assert_eq!(b.priority, i as u32 + 1);
        }
    }

    #[test]
    fn fixtures() {
        let dir = concat!(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."), "/tests/fixtures/config");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let result = Config::load(&path);
            if name.starts_with("valid-") {
                assert!(result.is_ok(), "{name}: {}", result.unwrap_err());
            } else if name.starts_with("invalid-") {
                let err = result.expect_err(&name).to_string();
                // The first comment line of each invalid fixture holds the expected message part.
                let text = std::fs::read_to_string(&path).unwrap();
                let expect = text.lines().next().unwrap().trim_start_matches("# expect: ");
                assert!(err.contains(expect), "{name}: {err:?} lacks {expect:?}");
                assert!(!err.contains('\n'), "{name}: not one line: {err}");
            }
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = parse(
            "[health]\nusername = \"probe\"\npassword = \"hunter2\"\n[admin]\ntoken = \"t0ken\"\n\
             [[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("hunter2") && !shown.contains("t0ken"), "{shown}");
        assert!(shown.contains("(set)") && shown.contains("probe"), "{shown}");
    }

    #[test]
    fn old_connection_limit_names_still_work_with_a_warning() {
        let b = "[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n";
        let c = parse(&format!("[proxy]\nmax_sessions = 7\nmax_sessions_per_source = 2\n{b}")).unwrap();
        assert_eq!((c.proxy.max_connections, c.proxy.max_connections_per_source), (7, 2));
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("proxy.max_sessions is now called proxy.max_connections"), "{:?}", c.warnings);
        let c = parse(&format!("[proxy]\nmax_connections = 7\n{b}")).unwrap();
        assert!(c.warnings.is_empty());
        let e = parse(&format!("[proxy]\nmax_connections = 7\nmax_sessions = 7\n{b}")).unwrap_err();
        assert!(e.contains("proxy.max_sessions") && e.contains("only proxy.max_connections"), "{e}");
    }

    #[test]
    fn coordination_is_checked_key_by_key() {
        let c =
            parse(&format!("[coordination]\netcd = [\"http://127.0.0.1:2379\"]\ninstance = \"a\"\n{FIVE}")).unwrap();
        let co = c.coordination.unwrap();
        assert_eq!((co.prefix.as_str(), co.lease_ttl), ("/meshgate/", Duration::from_secs(3)));
        for (body, key) in [
            ("etcd = []", "coordination.etcd"),
            ("etcd = [\"https://h:1\"]", "coordination.etcd"),
            ("etcd = [\"http://h\"]", "coordination.etcd"),
            ("etcd = [\"http://h:1\"]\ninstance = \"a b\"", "coordination.instance"),
            ("etcd = [\"http://h:1\"]\nprefix = \"x\"", "coordination.prefix"),
            ("etcd = [\"http://h:1\"]\nlease_ttl = \"1500ms\"", "coordination.lease_ttl"),
        ] {
            let e = parse(&format!("[coordination]\n{body}\n{FIVE}")).unwrap_err();
            assert!(e.contains(key), "{body}: {e}");
        }
        let e = parse(&format!(
            "[replication]\nenabled = true\nmax_qos = 2\n[coordination]\netcd = [\"http://h:1\"]\n{FIVE}"
        ))
        .unwrap_err();
        assert!(e.contains("replication.max_qos"), "{e}");
        assert!(parse(FIVE).unwrap().coordination.is_none(), "no section, no coordination");
    }

    #[test]
    fn websocket_and_proxy_protocol_listeners_are_checked_key_by_key() {
        let c = parse(&format!(
            "[listen]\nws = \"127.0.0.1:8083\"\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.5\"]\n\
             proxy_protocol = {{ mqtt = \"v2\", ws = \"v1\" }}\n{FIVE}"
        ))
        .unwrap();
        assert_eq!(c.listen.ws_path, "/mqtt");
        assert_eq!(c.listen.trusted_proxies.len(), 2);
        let pp = c.listen.proxy_protocol;
        assert_eq!(
            (pp.mqtt, pp.mqtts, pp.ws, pp.wss),
            (ProxyProtocol::V2, ProxyProtocol::Off, ProxyProtocol::V1, ProxyProtocol::Off)
        );
        let all =
            parse(&format!("[listen]\ntrusted_proxies = [\"10.0.0.1\"]\nproxy_protocol = \"v1\"\n{FIVE}")).unwrap();
        assert_eq!(all.listen.proxy_protocol.wss, ProxyProtocol::V1, "a string applies to every listener");
        for (body, key) in [
            ("ws = \"nowhere\"", "listen.ws"),
            ("wss = \"127.0.0.1:8084\"", "listen.wss"),
            ("ws_path = \"mqtt\"", "listen.ws_path"),
            ("trusted_proxies = [\"10.0.0.0/33\"]", "listen.trusted_proxies"),
            ("proxy_protocol = \"v3\"\ntrusted_proxies = [\"10.0.0.1\"]", "listen.proxy_protocol"),
            ("proxy_protocol = {{ ws = \"on\" }}\ntrusted_proxies = [\"10.0.0.1\"]", "listen.proxy_protocol.ws"),
            ("proxy_protocol = \"v2\"", "listen.proxy_protocol"),
        ] {
            let e = parse(&format!("[listen]\n{}\n{FIVE}", body.replace("{{", "{").replace("}}", "}"))).unwrap_err();
            assert!(e.contains(key), "{body}: {e}");
        }
        let e = parse("[[broker]]\nname = \"b\"\naddress = \"h:1\"\nproxy_protocol = \"yes\"\n").unwrap_err();
        assert!(e.contains("broker[1].proxy_protocol"), "{e}");
    }

    #[test]
    fn a_file_without_settings_gets_every_default() {
        let c = parse("[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n").unwrap();
        let d = Config::defaults();
        assert_eq!(
            (&c.listen, &c.proxy, &c.health, &c.admin, &c.tls, &c.replication, &c.sessions),
            (&d.listen, &d.proxy, &d.health, &d.admin, &d.tls, &d.replication, &d.sessions)
        );
        let b = BrokerConfig::at("127.0.0.1:1");
        assert_eq!(c.brokers[0], BrokerConfig { name: "b".into(), ..b });
    }

    #[test]
    fn workers_default_to_one_per_core() {
        assert_eq!(parse(FIVE).unwrap().proxy.workers, 0);
        assert_eq!(parse(&format!("[proxy]\nworkers = 1\n{FIVE}")).unwrap().proxy.workers, 1);
        let e = parse(&format!("[proxy]\nworkers = 5000\n{FIVE}")).unwrap_err();
        assert!(e.contains("proxy.workers: must be at most 1024"), "{e}");
    }

    #[test]
    fn topic_filters() {
        assert!(valid_filter("#") && valid_filter("a/+/c") && valid_filter("a/#"));
        assert!(!valid_filter("a/#/c") && !valid_filter("a+") && !valid_filter(""));
        assert!(topic_matches("#", "a/b") && topic_matches("a/#", "a") && topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("#", "$SYS/x") && !topic_matches("a/+", "a/b/c") && !topic_matches("a/b", "a"));
        let e = parse(&format!("[replication]\nexclude = [\"a/#/b\"]\n{FIVE}")).unwrap_err();
        assert!(e.contains("replication.exclude"), "{e}");
    }

    #[test]
    fn nginx_backups_become_sequential_tiers() {
        let nginx_text = "stream { upstream u { least_conn; server 127.0.0.10:1883 weight=5 max_fails=3 fail_timeout=30s; server 127.0.0.11:1883 backup; server 127.0.0.12:1883 backup down; } server { listen 127.0.0.1:1883; proxy_pass u; } }";
        let (c, _) = Config::from_nginx(nginx_text, "n.conf", "", "(defaults)").unwrap();
        assert_eq!(c.listen.mqtt, "127.0.0.1:1883");
        assert_eq!(c.brokers.iter().map(|b| b.priority).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(c.brokers[0].weight, 5);
        assert_eq!(c.brokers[0].max_fails, 3);
        assert_eq!(c.brokers[0].fail_timeout, Duration::from_secs(30));
        assert!(!c.brokers[2].enabled);
    }
}
