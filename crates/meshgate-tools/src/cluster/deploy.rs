//! Deployment files for real hosts: cloud-init per broker VM (Multipass) or Mosquitto configs for plain Linux hosts, with meshgate's config, its systemd unit and the equivalent nginx config.
//!
//! The input is a [`Network`] (where the brokers run and the front end's own address, kept as
//! `network.toml` next to the output so a render can be repeated) and a meshgate config whose
//! settings (health, proxy, replication, per-broker accounting) carry over; only addresses and
//! paths change. Nothing here connects anywhere: these are files for an operator to copy.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{Array, ArrayOfTables, Decor, DocumentMut, Item, Key, Table, Value};

use super::ClusterError;
use meshgate::config::{BrokerConfig, Config, Failback, OnDown};

/// Which kind of hosts the files are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One Multipass VM per broker, each with a static address on a host bridge.
    Multipass,
    /// Plain Linux hosts (Debian or Ubuntu) that already exist.
    Systemd,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Multipass => "multipass",
            Target::Systemd => "systemd",
        }
    }
}

/// Where meshgate's files go on the front-end host; the unit and the docs use the same paths.
pub const CONFIG_PATH: &str = "/etc/meshgate/meshgate.toml";
pub const BINARY_PATH: &str = "/usr/local/bin/meshgate";
/// The unit's `StateDirectory=meshgate`: the only place the hardened service may write.
pub const STATE_FILE: &str = "/var/lib/meshgate/replication-state.json";
/// Where a deployed meshgate keeps its persistent-session record (same StateDirectory).
pub const SESSIONS_FILE: &str = "/var/lib/meshgate/sessions-state.json";
const MQTT_PORT: u16 = 1883;
const HTTP_PORT: u16 = 8080;

/// The hosts of a deployment, as written in `network.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Broker hosts in backup order (broker1 first): an address or DNS name, `:port` optional.
    pub brokers: Vec<String>,
    /// The front-end host's own address on the brokers' network. The HTTP API binds here rather
    /// than on every interface, so the dashboard and admin routes are not on the clients' side.
    #[serde(default = "default_front_end")]
    pub front_end: String,
    /// Multipass: the host bridge the VMs' second interface is attached to.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Multipass: prefix length of the bridge network.
    #[serde(default = "default_prefix")]
    pub prefix: u8,
}

fn default_front_end() -> String {
    "127.0.0.1".into()
}
fn default_bridge() -> String {
    "localbr".into()
}
fn default_prefix() -> u8 {
    24
}

impl Network {
    pub fn new(brokers: Vec<String>) -> Network {
        Network { brokers, front_end: default_front_end(), bridge: default_bridge(), prefix: default_prefix() }
    }

    pub fn load(path: &Path) -> Result<Network, DeployError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| DeployError::Network { path: path.display().to_string(), message: err.to_string() })?;
        Network::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Network, DeployError> {
        toml::from_str(text).map_err(|e| DeployError::Network {
            path: origin.to_string(),
            message: e.message().trim().replace('\n', " "),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{path}: {message}")]
    Network { path: String, message: String },
    #[error("no broker hosts: pass --hosts ADDR,ADDR,... (broker1 first) or write them to {0}")]
    NoHosts(String),
    #[error("broker host {0:?} is not an address or host name (write it as host or host:port)")]
    BadHost(String),
    #[error("multipass needs an IPv4 address per VM for its static network config, got {0:?}")]
    NotIpv4(String),
    #[error("front end {0:?} must be this host's IP address on the brokers' network (the HTTP API binds to it)")]
    BadFrontEnd(String),
    #[error("multipass prefix {0} is not a usable IPv4 prefix length (8..=30)")]
    BadPrefix(u8),
    #[error("the rendered meshgate config does not validate: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] ClusterError),
}

impl DeployError {
    /// A mistake in what the user asked for (hosts, network file, front end), not a failure
    /// while writing: exits 2 like a bad config.
    pub fn is_usage(&self) -> bool {
        !matches!(self, DeployError::Io(_))
    }
}

/// One rendered file: its name inside the output directory and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub name: String,
    pub text: String,
}

/// A broker of the deployment: settings from the base config, address from the network.
struct Host<'a> {
    settings: BrokerConfig,
    /// What the broker listens on and meshgate connects to (no port).
    host: &'a str,
    port: u16,
}

impl Host<'_> {
    fn address(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

fn split_host(s: &str) -> Result<(&str, u16), DeployError> {
    let bad = || DeployError::BadHost(s.to_string());
    let s_trim = s.trim();
    if s_trim.is_empty() || s_trim.contains(char::is_whitespace) {
        return Err(bad());
    }
    if s_trim.parse::<IpAddr>().is_ok() {
        return Ok((s_trim, MQTT_PORT));
    }
    if let Some(rest) = s_trim.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        return Ok((h, p.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?));
    }
    let (h, p) = match s_trim.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
        None => (s_trim, MQTT_PORT),
    };
    let name_ok = !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c));
    if !name_ok {
        return Err(bad());
    }
    Ok((h, p))
}

/// The brokers of the deployment: broker i takes the base config's broker i settings (the
/// last one's, renamed and re-prioritized, when there are more hosts than brokers).
fn hosts<'a>(base: &Config, net: &'a Network) -> Result<Vec<Host<'a>>, DeployError> {
    let last = base.brokers.last().expect("a validated config has at least one broker");
    net.brokers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (host, port) = split_host(h)?;
            let settings = match base.brokers.get(i) {
                Some(b) => b.clone(),
                None => BrokerConfig { name: format!("broker{}", i + 1), priority: i as u32 + 1, ..last.clone() },
            };
            Ok(Host { settings, host, port })
        })
        .collect()
}

/// The meshgate config of the deployment: `base` with the deployment's addresses and paths.
/// (Rendered as text by [`render_meshgate`]; this value is what that text must parse to.)
pub fn deploy_config(base: &Config, net: &Network) -> Result<Config, DeployError> {
    let hosts = hosts(base, net)?;
    let front: IpAddr = net.front_end.parse().map_err(|_| DeployError::BadFrontEnd(net.front_end.clone()))?;
    let port = |a: Option<&str>, default| {
        a.and_then(|a| a.parse::<std::net::SocketAddr>().ok()).map(|s| s.port()).unwrap_or(default)
    };
    let mut c = base.clone();
    c.listen.mqtt = format!("0.0.0.0:{}", port(Some(&base.listen.mqtt), MQTT_PORT));
    c.listen.http = Some(std::net::SocketAddr::new(front, port(base.listen.http.as_deref(), HTTP_PORT)).to_string());
    c.replication.state_file = Some(PathBuf::from(STATE_FILE));
    c.sessions.state_file = c.sessions.enabled.then(|| PathBuf::from(SESSIONS_FILE));
    // A token does not belong in a checked-in example; the file says where to add one.
    c.admin = meshgate::config::AdminConfig::default();
    // Under systemd stdout is the journal: the access log goes there (the default), not to a
    // path of the machine the config was rendered on.
    c.access_log = meshgate::Config::defaults().access_log;
    c.brokers = hosts.iter().map(|h| BrokerConfig { address: h.address(), ..h.settings.clone() }).collect();
    Ok(c)
}

fn duration(d: std::time::Duration) -> Value {
    Value::from(humantime::format_duration(d).to_string())
}

/// A TOML integer; a value TOML cannot hold saturates, and the read-back check then refuses it.
fn int<T: TryInto<i64>>(v: T) -> Value {
    Value::from(v.try_into().unwrap_or(i64::MAX))
}

/// A whole number as a TOML integer (as an operator writes `failback_rate = 10`; meshgate reads
/// it as a float all the same), anything else as a float.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

fn list(v: &[String]) -> Value {
    Value::Array(v.iter().collect::<Array>())
}

/// A table of a rendered TOML file. Values go through toml_edit, which quotes and escapes every
/// string as TOML requires; comments are decor around them, written as given.
struct Section(Table);

impl Section {
    /// A table preceded by a blank line.
    fn new() -> Section {
        Section(Table::new())
    }

    /// A table preceded by `text` (comment lines, blank lines) instead of a blank line.
    fn after(text: &str) -> Section {
        let mut t = Table::new();
        t.decor_mut().set_prefix(text);
        Section(t)
    }

    fn set(&mut self, key: &str, v: Value) -> &mut Section {
        self.0.insert(key, Item::Value(v));
        self
    }

    /// `key = v` followed by `comment` on the same line (`comment` brings its own spacing and `#`).
    fn set_noted(&mut self, key: &str, v: Value, comment: &str) -> &mut Section {
        self.set(key, v.decorated(" ", comment))
    }

    /// `key = v` preceded by `comment` (whole lines, each ending in a newline).
    fn set_after(&mut self, comment: &str, key: &str, v: Value) -> &mut Section {
        self.0.insert_formatted(&Key::new(key).with_leaf_decor(Decor::new(comment, " ")), Item::Value(v));
        self
    }
}

/// meshgate's TOML for the deployment. Every setting the base config carries is written out,
/// so the file says what runs; a unit test parses it back and compares it with
/// [`deploy_config`].
pub fn render_meshgate(target: Target, base: &Config, net: &Network) -> Result<String, DeployError> {
    let c = deploy_config(base, net)?;
    let what = match target {
        Target::Multipass => "the VM deployment of the reference design (one Multipass VM per broker)",
        Target::Systemd => "brokers on plain Linux hosts",
    };
    let mut doc = DocumentMut::new();

    let mut listen = Section::after(&format!(
        "# meshgate for {what}, rendered by `meshgate cluster render --target {}`.\n\
         # Install as {CONFIG_PATH} on the front-end host; `meshgate validate --config {CONFIG_PATH}` checks it,\n\
         # `systemctl reload meshgate` (SIGHUP) applies changes to brokers, health and proxy settings.\n\n",
        target.as_str()
    ));
    listen.set_noted(
        "mqtt",
        c.listen.mqtt.as_str().into(),
        "          # every address of this host, so a keepalived virtual IP works too",
    );
    if let Some(http) = &c.listen.http {
        listen.set_noted(
            "http",
            http.into(),
            "    # API, metrics, dashboard: this host's address on the brokers' network only",
        );
    }
    if let Some(mqtts) = &c.listen.mqtts {
        listen.set("mqtts", mqtts.into());
    }
    doc.insert("listen", Item::Table(listen.0));

    let h = &c.health;
    let mut health = Section::new();
    health
        .set("probe", h.probe.as_str().into())
        .set("interval", duration(h.interval))
        .set("timeout", duration(h.timeout))
        .set("rise", int(h.rise))
        .set("fall", int(h.fall));
    if h.mqtt_version != 4 {
        health.set("mqtt_version", int(h.mqtt_version));
    }
    if let Some(u) = &h.username {
        health.set("username", u.into());
    }
    if h.password.is_some() {
        // A secret does not belong in an example file that is checked in.
        health.set_noted("password", "CHANGE-ME".into(), "   # the probe user's password on the brokers");
    }
    doc.insert("health", Item::Table(health.0));

    let p = &c.proxy;
    let mut proxy = Section::new();
    proxy
        .set("client_connect_timeout", duration(p.client_connect_timeout))
        .set("upstream_connect_timeout", duration(p.upstream_connect_timeout))
        .set("connack_timeout", duration(p.connack_timeout))
        .set("connect_tries", int(p.connect_tries))
        .set(
            "on_down",
            match p.on_down {
                OnDown::Close => "close",
                OnDown::Keep => "keep",
            }
            .into(),
        )
        .set(
            "failback",
            match p.failback {
                Failback::Drain => "drain",
                Failback::None => "none",
            }
            .into(),
        )
        .set("failback_rate", number(p.failback_rate))
        .set("shutdown_grace", duration(p.shutdown_grace))
        .set("max_packet_size", int(p.max_packet_size))
        .set("max_connections", int(p.max_connections))
        .set("max_connections_per_source", int(p.max_connections_per_source))
        .set("connect_rate_per_source", number(p.connect_rate_per_source));
    if p.connect_rate_per_source > 0.0 {
        proxy.set("connect_burst_per_source", number(p.connect_burst_per_source));
    }
    if p.workers > 0 {
        proxy.set("workers", int(p.workers));
    }
    doc.insert("proxy", Item::Table(proxy.0));

    let r = &c.replication;
    let mut replication = Section::new();
    replication
        .set("enabled", r.enabled.into())
        .set("max_qos", int(r.max_qos))
        .set("include", list(&r.include))
        .set("exclude", list(&r.exclude))
        .set_noted("state_file", STATE_FILE.into(), "   # the unit's StateDirectory")
        .set("lag_interval", duration(r.lag_interval))
        .set("tombstone_ttl", duration(r.tombstone_ttl))
        .set("queue", int(r.queue));
    doc.insert("replication", Item::Table(replication.0));

    let se = &c.sessions;
    let mut sessions = Section::new();
    sessions
        .set("enabled", se.enabled.into())
        .set_noted("state_file", SESSIONS_FILE.into(), "   # the unit's StateDirectory")
        .set("max_sessions", int(se.max_sessions))
        .set("max_subscriptions", int(se.max_subscriptions))
        .set("expiry", duration(se.expiry))
        .set("standby", se.standby.into())
        .set("standby_trim", duration(se.standby_trim));
    doc.insert("sessions", Item::Table(sessions.0));

    let tls = &c.tls;
    let tls_files =
        [("cert", &tls.cert), ("key", &tls.key), ("client_ca", &tls.client_ca), ("broker_ca", &tls.broker_ca)];
    if tls_files.iter().any(|(_, v)| v.is_some()) {
        let mut section = Section::new();
        for (k, v) in tls_files {
            if let Some(v) = v {
                section.set(k, v.display().to_string().into());
            }
        }
        doc.insert("tls", Item::Table(section.0));
    }

    // The admin token is left out (see deploy_config); the comment says where it would go. It
    // sits before the first broker, which is where the file's tables continue.
    let admin = "\n# [admin]\n# token = \"...\"   # enables POST /brokers/{name}/disable|enable|drain; keep this file mode 0640\n\n";
    let mut brokers = ArrayOfTables::new();
    for (i, b) in c.brokers.iter().enumerate() {
        let mut t = if i == 0 { Section::after(admin) } else { Section::new() };
        t.set("name", b.name.as_str().into()).set("address", b.address.as_str().into());
        if b.priority != i as u32 + 1 {
            t.set("priority", int(b.priority));
        }
        t.set("weight", int(b.weight))
            .set("max_fails", int(b.max_fails))
            .set("fail_timeout", duration(b.fail_timeout))
            .set("max_conns", int(b.max_conns));
        if !b.enabled {
            t.set("enabled", false.into());
        }
        if b.tls {
            t.set("tls", true.into());
        }
        if let Some(n) = &b.tls_name {
            t.set("tls_name", n.into());
        }
        brokers.push(t.0);
    }
    if brokers.is_empty() {
        doc.set_trailing(admin);
    }
    doc.insert("broker", Item::ArrayOfTables(brokers));
    let t = doc.to_string();

    // What an operator copies must start: a config meshgate would refuse is a renderer bug.
    let back = Config::from_toml(&t, "rendered").map_err(|e| DeployError::Invalid(e.to_string()))?;
    let mut expected = c.clone();
    if expected.health.password.is_some() {
        expected.health.password = Some("CHANGE-ME".into());
    }
    if back != expected {
        return Err(DeployError::Invalid("it does not read back as the deployment's config".into()));
    }
    Ok(t)
}

/// The Mosquitto settings of one broker host (`/etc/mosquitto/conf.d/meshgate.conf`).
fn mosquitto_conf(target: Target, h: &Host<'_>) -> String {
    let role = match h.settings.priority {
        1 => "priority 1: the primary".to_string(),
        p => format!("priority {p}: backup {}", p - 1),
    };
    format!(
        "# {name} of the meshgate network ({role}), rendered by `meshgate cluster render --target {target}`.\n\
         # Goes to /etc/mosquitto/conf.d/meshgate.conf; Debian's and Ubuntu's mosquitto.conf includes it and\n\
         # logs to /var/log/mosquitto/mosquitto.log.\n\
         listener {port} {host}\n\
         # Anyone who reaches this address may connect. On a network you do not control, set\n\
         # allow_anonymous false with a password_file, and give meshgate's probes a user\n\
         # ([health] username and password).\n\
         allow_anonymous true\n\
         # Sessions and retained messages survive a broker restart (in /var/lib/mosquitto/).\n\
         persistence true\n\
         autosave_interval 30\n\
         # meshgate probes connect several times a second; logging each would fill the disk.\n\
         connection_messages false\n\
         # meshgate's replication link is a subscriber to everything; Mosquitto's default of 1000\n\
         # queued QoS 1 messages per client would drop copies during a burst.\n\
         max_queued_messages 100000\n",
        name = h.settings.name,
        target = target.as_str(),
        port = h.port,
        host = h.host,
    )
}

/// Mosquitto binds the VM address at start; if the interface is not configured yet on a boot it
/// exits, and Ubuntu's unit does not restart it by itself.
const MOSQUITTO_DROP_IN: &str = "[Unit]\n\
     Wants=network-online.target\n\
     After=network-online.target\n\
     [Service]\n\
     Restart=on-failure\n\
     RestartSec=2s\n";

fn mac(i: usize) -> String {
    // 52:54:00 is the prefix QEMU and Multipass use for their own guests; 6d:67 is "mg".
    format!("52:54:00:6d:67:{:02x}", i + 1)
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{pad}{l}\n") }).collect()
}

/// The cloud-init user data of one broker VM: static address on the bridge NIC, Mosquitto
/// installed with meshgate's settings, the service enabled.
fn cloud_init(h: &Host<'_>, i: usize, net: &Network) -> Result<String, DeployError> {
    let ip: std::net::Ipv4Addr = h.host.parse().map_err(|_| DeployError::NotIpv4(h.host.to_string()))?;
    let name = &h.settings.name;
    let mac = mac(i);
    let netplan = format!(
        "network:\n  version: 2\n  ethernets:\n    meshgate0:\n      match:\n        macaddress: \"{mac}\"\n      \
         set-name: meshgate0\n      dhcp4: false\n      addresses: [{ip}/{prefix}]\n",
        prefix = net.prefix
    );
    Ok(format!(
        "#cloud-config\n\
         # {name} of the meshgate reference design, rendered by `meshgate cluster render --target multipass`.\n\
         # Launch (see docs/deploy.md):\n\
         #   multipass launch 24.04 --name {name} --cloud-init {name}.yaml \\\n\
         #     --network name={bridge},mode=manual,mac={mac}\n\
         # The VM keeps Multipass's default interface for the internet (apt) and gets {ip}\n\
         # on its second interface, the one with the MAC address above, attached to the bridge {bridge}.\n\
         package_update: true\n\
         packages:\n\
         \x20 - mosquitto\n\
         \x20 - mosquitto-clients\n\
         write_files:\n\
         \x20 - path: /etc/netplan/60-meshgate.yaml\n\
         \x20   permissions: \"0600\"\n\
         \x20   content: |\n\
         {netplan}\
         \x20 - path: /etc/mosquitto/conf.d/meshgate.conf\n\
         \x20   content: |\n\
         {conf}\
         \x20 - path: /etc/systemd/system/mosquitto.service.d/meshgate.conf\n\
         \x20   content: |\n\
         {drop_in}\
         runcmd:\n\
         \x20 - netplan apply\n\
         \x20 - systemctl daemon-reload\n\
         \x20 - systemctl enable mosquitto\n\
         \x20 - systemctl restart mosquitto\n",
        bridge = net.bridge,
        netplan = indent(&netplan, 6),
        conf = indent(&mosquitto_conf(Target::Multipass, h), 6),
        drop_in = indent(MOSQUITTO_DROP_IN, 6),
    ))
}

/// The systemd unit of meshgate on the front-end host (the binary copied to [`BINARY_PATH`]).
pub fn render_unit(target: Target) -> String {
    unit(&format!("rendered by `meshgate cluster render --target {}`", target.as_str()), BINARY_PATH, true)
}

/// Where the Debian package (`cargo deb`) installs the binary.
pub const PACKAGE_BINARY_PATH: &str = "/usr/bin/meshgate";

/// The unit the Debian package ships as debian/meshgate.service: the same service as
/// [`render_unit`], with the packaged binary, and installed but not enabled (the example config
/// names brokers that must be edited first).
pub fn render_package_unit() -> String {
    unit("shipped by the meshgate Debian package (`cargo deb`)", PACKAGE_BINARY_PATH, false)
}

fn unit(origin: &str, binary: &str, copy: bool) -> String {
    let install = match copy {
        true => {
            "# Install as /etc/systemd/system/meshgate.service, then:\n\
                 #   systemctl daemon-reload && systemctl enable --now meshgate\n"
        }
        false => "# Edit /etc/meshgate/meshgate.toml (the brokers), then: systemctl enable --now meshgate\n",
    };
    format!(
        "# meshgate as a systemd service, {origin}.\n\
         {install}\
         # `systemctl reload meshgate` validates the config and sends SIGHUP: brokers, health and proxy\n\
         # settings change without dropping a session (listen addresses and replication need a restart).\n\
         [Unit]\n\
         Description=meshgate MQTT failover proxy\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         # meshgate tells systemd READY=1 once every listener is bound, so units ordered after this one\n\
         # start when clients can connect; RELOADING=1 and READY=1 around a reload, STOPPING=1 on stop.\n\
         Type=notify\n\
         User=meshgate\n\
         Group=meshgate\n\
         ExecStartPre={binary} validate --config {CONFIG_PATH}\n\
         ExecStart={binary} run --config {CONFIG_PATH}\n\
         # A refused config fails the reload visibly here; meshgate would also keep the old one.\n\
         ExecReload={binary} validate --config {CONFIG_PATH}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         # SIGTERM: stop accepting, give sessions [proxy] shutdown_grace (5 s) to end, then close them.\n\
         TimeoutStopSec=15s\n\
         Restart=on-failure\n\
         RestartSec=1s\n\
         # One descriptor per client and one per broker connection.\n\
         LimitNOFILE=65536\n\
         # The replication and session state files live in /var/lib/meshgate; an [access_log] path\n\
         # belongs in /var/log/meshgate. Everything else is read-only to the service.\n\
         StateDirectory=meshgate\n\
         StateDirectoryMode=0750\n\
         LogsDirectory=meshgate\n\
         LogsDirectoryMode=0750\n\
         # Ports 1883 and 8080 need no capability. To move a listener below 1024, set both:\n\
         #   CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n\
         #   AmbientCapabilities=CAP_NET_BIND_SERVICE\n\
         CapabilityBoundingSet=\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         # TCP and TLS to clients and brokers, the notify socket (AF_UNIX). No netlink: glibc's\n\
         # getaddrinfo uses it only to sort a name's addresses and falls back when it cannot.\n\
         RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// nginx's stream config for the same brokers and listen address (the comparison front end).
fn render_nginx(target: Target, config: &Config) -> String {
    format!(
        "# The nginx alternative to meshgate for this deployment (`--target {}`): same brokers, same\n\
         # listen address. nginx notices neither a hung broker nor backup order; it is here to compare.\n\
         # Run it in place of meshgate with its own prefix, not as the system service:\n\
         #   mkdir -p /var/lib/nginx-mqtt/logs && nginx -p /var/lib/nginx-mqtt -c /etc/meshgate/nginx-stream.conf\n\
         # `meshgate run --nginx-conf` reads this file as it is.\n\
         {}",
        target.as_str(),
        super::nginx::render(config)
    )
}

/// `network.toml`, normalized, so the output directory says how it was rendered and a second
/// render without `--hosts` gives the same files.
pub fn render_network(target: Target, net: &Network) -> String {
    let mut root = Section(Table::new());
    root.set_after(
        &format!(
            "# The hosts of this deployment, read by `meshgate cluster render --target {} --out <this directory>`,\n\
             # which writes every other file here. Change the addresses here (or pass --hosts) and render again.\n\
             \n\
             # Broker hosts in backup order: broker1 (the primary) first. host or host:port (1883).\n",
            target.as_str()
        ),
        "brokers",
        list(&net.brokers),
    )
    .set_after(
        "# This front-end host's own address on the brokers' network: meshgate's HTTP API binds here.\n",
        "front_end",
        net.front_end.as_str().into(),
    );
    if target == Target::Multipass {
        root.set_after(
            "# The host bridge the VMs' second interface attaches to, and its prefix length.\n",
            "bridge",
            net.bridge.as_str().into(),
        )
        .set("prefix", int(net.prefix));
    }
    DocumentMut::from(root.0).to_string()
}

/// Every file of a deployment, in a stable order.
pub fn render(target: Target, base: &Config, net: &Network) -> Result<Vec<File>, DeployError> {
    if net.brokers.is_empty() {
        return Err(DeployError::NoHosts("network.toml".into()));
    }
    if target == Target::Multipass && !(8..=30).contains(&net.prefix) {
        return Err(DeployError::BadPrefix(net.prefix));
    }
    let hosts = hosts(base, net)?;
    let config = deploy_config(base, net)?;
    let mut files = vec![File { name: "network.toml".into(), text: render_network(target, net) }];
    for (i, h) in hosts.iter().enumerate() {
        let file = match target {
            Target::Multipass => File { name: format!("{}.yaml", h.settings.name), text: cloud_init(h, i, net)? },
            Target::Systemd => File { name: format!("{}.conf", h.settings.name), text: mosquitto_conf(target, h) },
        };
        files.push(file);
    }
    files.push(File { name: "meshgate.toml".into(), text: render_meshgate(target, base, net)? });
    files.push(File { name: "meshgate.service".into(), text: render_unit(target) });
    files.push(File { name: "nginx-stream.conf".into(), text: render_nginx(target, &config) });
    Ok(files)
}

/// Writes the files into `dir` (created if missing); returns their paths.
/// Writes every rendered file into `dir`, or none of them (see `cluster::write_together`).
pub fn write(dir: &Path, files: &[File]) -> Result<Vec<PathBuf>, DeployError> {
    let files: Vec<(PathBuf, String)> = files.iter().map(|f| (dir.join(&f.name), f.text.clone())).collect();
    Ok(super::write_together(&files)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    fn base() -> Config {
        Config::load(&root().join("configs/meshgate.toml")).unwrap()
    }

    fn shipped(target: Target) -> Network {
        Network::load(&root().join("deploy").join(target.as_str()).join("network.toml")).unwrap()
    }

    #[test]
    fn shipped_examples_equal_the_rendered_output() {
        for target in [Target::Multipass, Target::Systemd] {
            let dir = root().join("deploy").join(target.as_str());
            let files = render(target, &base(), &shipped(target)).unwrap();
            for entry in std::fs::read_dir(&dir).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    files.iter().any(|f| f.name == name),
                    "deploy/{}/{name} is not rendered any more: delete it",
                    target.as_str()
                );
            }
            for f in files {
                let on_disk = std::fs::read_to_string(dir.join(&f.name)).unwrap_or_else(|e| {
                    panic!("deploy/{}/{}: {e} (run `meshgate cluster render --target {0}`)", target.as_str(), f.name)
                });
                assert_eq!(
                    on_disk,
                    f.text,
                    "deploy/{}/{} is stale: run `meshgate cluster render --target {0}`",
                    target.as_str(),
                    f.name
                );
            }
        }
    }

    #[test]
    fn the_rendered_config_keeps_every_setting_and_changes_only_addresses_and_paths() {
        let base = base();
        for target in [Target::Multipass, Target::Systemd] {
            let net = shipped(target);
            let text = render_meshgate(target, &base, &net).unwrap();
            let back = Config::from_toml(&text, "rendered").unwrap();
            assert_eq!(back.health, base.health);
            assert_eq!(back.proxy, base.proxy);
            assert_eq!(back.replication.state_file.as_deref(), Some(Path::new(STATE_FILE)));
            assert_eq!(back.replication.include, base.replication.include);
            assert_eq!(back.listen.mqtt, "0.0.0.0:1883");
            assert_eq!(back.listen.http, Some(format!("{}:8080", net.front_end)));
            assert_eq!(back.brokers.len(), net.brokers.len());
            for ((b, orig), host) in back.brokers.iter().zip(&base.brokers).zip(&net.brokers) {
                assert_eq!(b.address, format!("{host}:1883"));
                let moved = BrokerConfig { address: orig.address.clone(), ..b.clone() };
                assert_eq!(&moved, orig, "{} lost a setting", b.name);
            }
        }
    }

    #[test]
    fn cloud_init_is_yaml_with_the_broker_config_inside() {
        let net = shipped(Target::Multipass);
        let files = render(Target::Multipass, &base(), &net).unwrap();
        let systemd = render(Target::Systemd, &base(), &net).unwrap();
        for (i, host) in net.brokers.iter().enumerate() {
            let name = format!("broker{}", i + 1);
            let f = files.iter().find(|f| f.name == format!("{name}.yaml")).unwrap();
            assert!(f.text.starts_with("#cloud-config\n"), "cloud-init needs its first line");
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&f.text).unwrap();
            assert_eq!(doc["packages"][0], "mosquitto");
            let files_of = |path: &str| {
                doc["write_files"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|w| w["path"] == path)
                    .unwrap_or_else(|| panic!("{name}: no {path}"))["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            };
            let conf = files_of("/etc/mosquitto/conf.d/meshgate.conf");
            assert!(conf.contains(&format!("listener 1883 {host}\n")), "{conf}");
            assert!(conf.contains("max_queued_messages 100000\n"));
            // The same settings as the plain-host file, apart from the target named in the header.
            let plain = &systemd.iter().find(|f| f.name == format!("{name}.conf")).unwrap().text;
            assert_eq!(conf.replace("multipass", "systemd"), *plain);
            let netplan: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(&files_of("/etc/netplan/60-meshgate.yaml")).unwrap();
            let nic = &netplan["network"]["ethernets"]["meshgate0"];
            assert_eq!(nic["addresses"][0], format!("{host}/{}", net.prefix));
            assert_eq!(nic["match"]["macaddress"], mac(i));
            assert!(f.text.contains(&format!("mac={}", mac(i))), "the launch line names the same MAC");
            let runcmd: Vec<&str> = doc["runcmd"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(runcmd.first(), Some(&"netplan apply"), "the address must exist before Mosquitto binds it");
            assert!(runcmd.contains(&"systemctl enable mosquitto"));
        }
    }

    #[test]
    fn unit_and_nginx_agree_with_the_config() {
        let net = shipped(Target::Systemd);
        let files = render(Target::Systemd, &base(), &net).unwrap();
        let unit = &files.iter().find(|f| f.name == "meshgate.service").unwrap().text;
        for line in [
            "ExecStart=/usr/local/bin/meshgate run --config /etc/meshgate/meshgate.toml\n",
            "Type=notify\n",
            "ExecReload=/bin/kill -HUP $MAINPID\n",
            "Restart=on-failure\n",
            "LimitNOFILE=65536\n",
            "StateDirectory=meshgate\n",
            "NoNewPrivileges=yes\n",
            "ProtectSystem=strict\n",
        ] {
            assert!(unit.contains(line), "unit lacks {line}");
        }
        assert!(STATE_FILE.starts_with("/var/lib/meshgate/"), "StateDirectory=meshgate is the writable place");
        let nginx = &files.iter().find(|f| f.name == "nginx-stream.conf").unwrap().text;
        let (from_nginx, _) = Config::from_nginx(nginx, "rendered", "", "(defaults)").unwrap();
        let config = deploy_config(&base(), &net).unwrap();
        assert_eq!(from_nginx.listen.mqtt, config.listen.mqtt);
        let addrs = |c: &Config| c.brokers.iter().map(|b| b.address.clone()).collect::<Vec<_>>();
        assert_eq!(addrs(&from_nginx), addrs(&config));
    }

    #[test]
    fn network_round_trips_through_its_own_file() {
        for target in [Target::Multipass, Target::Systemd] {
            let net = shipped(target);
            assert_eq!(Network::from_toml(&render_network(target, &net), "t").unwrap(), net);
        }
    }

    #[test]
    fn hosts_are_checked() {
        let base = base();
        let names = |v: &[&str]| Network::new(v.iter().map(|s| s.to_string()).collect());
        // Host names work for plain hosts (Mosquitto and meshgate resolve them) ...
        let files = render(Target::Systemd, &base, &names(&["mq1.example", "mq2.example:1884"])).unwrap();
        let toml = &files.iter().find(|f| f.name == "meshgate.toml").unwrap().text;
        assert!(toml.contains("address = \"mq2.example:1884\""), "{toml}");
        // ... but a VM's static address must be an IPv4 address.
        let e = render(Target::Multipass, &base, &names(&["mq1.example"])).unwrap_err().to_string();
        assert!(e.contains("IPv4"), "{e}");
        let e = render(Target::Systemd, &base, &names(&["bad host"])).unwrap_err().to_string();
        assert!(e.contains("not an address"), "{e}");
        let e = render(Target::Systemd, &base, &names(&[])).unwrap_err().to_string();
        assert!(e.contains("--hosts"), "{e}");
        let mut net = names(&["mq1.example"]);
        net.front_end = "front.example".into();
        let e = render(Target::Systemd, &base, &net).unwrap_err().to_string();
        assert!(e.contains("front end"), "{e}");
    }

    #[test]
    fn more_hosts_than_configured_brokers_become_further_backups() {
        let hosts: Vec<String> = (1..=7).map(|i| format!("mq{i}.example")).collect();
        let config = deploy_config(&base(), &Network::new(hosts)).unwrap();
        assert_eq!(config.brokers.len(), 7);
        assert_eq!(config.brokers[6].name, "broker7");
        assert_eq!(config.brokers[6].priority, 7);
        assert_eq!(config.brokers[6].max_fails, config.brokers[4].max_fails);
    }
}
