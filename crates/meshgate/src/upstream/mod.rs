//! The one way to reach a broker: TCP or TLS as the broker's config says, under the proxy's connect timeout, with nodelay, for client sessions, every probe kind, lag probes, replication links and persistent-session work.
//!
//! Every outbound connection goes through here (as in pingora's connectors), so no caller can
//! forget TLS or a timeout: callers name the broker, never an address alone.

pub mod client;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::{BrokerConfig, Config};
use crate::mqtt::io::PacketReader;
use crate::mqtt::{connack, Connack};
use crate::transport::tls::{self, TlsError};
use crate::transport::Conn;

/// Why reaching a broker (and, for a CONNECT, being served by it) failed; the label is the
/// `reason` of `meshgate_upstream_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// meshgate's own resources ran out (file descriptors above all): not the broker's doing,
    /// so it never counts against the broker (passive accounting, probes).
    #[error("meshgate could not open a connection: {0} (its own limit, not the broker's: raise the open-file limit, LimitNOFILE= or ulimit -n)")]
    Local(std::io::Error),
    /// Waited for one of meshgate's own handshake slots to this broker (`HANDSHAKES_PER_BROKER`)
    /// longer than the connect timeout (a move: its own limit): a burst of meshgate's making
    /// (every client of a failed broker at once), not the broker's answer. Those in the slots
    /// count if the broker is slow.
    #[error("no handshake slot to the broker within {0:?} (meshgate's own queue: a burst of connections)")]
    Queued(Duration),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("no CONNACK within {0:?}")]
    ConnackTimeout(Duration),
    #[error("broker closed the connection before its CONNACK")]
    Closed,
    #[error("{0}")]
    Protocol(String),
    #[error("CONNACK {code:#04x}: {reason}")]
    Refused { code: u8, reason: &'static str },
}

impl AttemptError {
    /// meshgate's own shortage or queue, not the broker's answer.
    pub fn is_local(&self) -> bool {
        matches!(self, AttemptError::Local(_) | AttemptError::Queued(_))
    }

    pub fn reason(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect_error",
            AttemptError::Local(_) => LOCAL_ERROR,
            AttemptError::Queued(_) => "handshake_queue",
            AttemptError::ConnectTimeout(_) => "connect_timeout",
            AttemptError::ConnackTimeout(_) => "connack_timeout",
            AttemptError::Closed => "closed_before_connack",
            AttemptError::Protocol(_) => "protocol_error",
            AttemptError::Refused { reason, .. } => reason,
        }
    }

    /// Every reason label, so metrics can show them at zero from the start.
    pub const REASONS: [&'static str; 9] = [
        "connect_error",
        LOCAL_ERROR,
        "handshake_queue",
        "connect_timeout",
        "connack_timeout",
        "closed_before_connack",
        "protocol_error",
        "server_unavailable",
        "server_busy",
    ];
}

/// The reason label of [`AttemptError::Local`]: counted for the broker tried, never held
/// against it.
pub const LOCAL_ERROR: &str = "local_error";

/// Whether a failed `socket()`/`connect()` is meshgate's own shortage rather than the peer's
/// answer: out of file descriptors (process or system), socket buffers or memory. (Not
/// EADDRNOTAVAIL: local ports run out per destination, and an address this host cannot reach
/// at all, a broker's `[::1]` without IPv6, says so too: that is the broker's to answer for.)
pub fn is_local(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(Errno::from_raw(code), Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Timeouts {
    connect: Duration,
    connack: Duration,
}

/// A broker's CONNACK is a few bytes; anything near this is not a broker speaking MQTT.
const CONNACK_READ_LIMIT: usize = 64 * 1024;

/// Handshakes (TCP connect to CONNACK) in flight to one broker address, at most. Mosquitto
/// listens with a backlog of 100: when every client of a failed broker reconnects at once, a
/// thousand simultaneous connects overflow it, and every dropped SYN or handshake ACK costs its
/// client a one-second retransmission (measured: 1,000 clients back after 2.7 s instead of
/// 0.8 s). Queued here instead, the same burst is served in tens of milliseconds.
const HANDSHAKES_PER_BROKER: usize = 64;

/// A connection to a broker with its handshake slot, before the CONNECT (`Upstream::open`).
pub struct Opened {
    conn: Conn,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

pub struct Upstream {
    /// For brokers with `tls = true`; `None` when no CA is configured (then no broker has it).
    tls: ArcSwapOption<tls::BrokerTls>,
    timeouts: ArcSwap<Timeouts>,
    /// Keyed by address, so the slots outlive reloads and a broker's slots are shared by every
    /// session; one entry per broker address ever configured.
    gates: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Where clients reach meshgate: the destination of a PROXY protocol header sent on a
    /// client's behalf.
    front: Option<std::net::SocketAddr>,
    /// Per broker address and PROXY version, the relay rumqttc connects through to a broker that takes a PROXY
    /// protocol header (`mqtt_address`); stopped with this value.
    relays: parking_lot::Mutex<HashMap<String, std::net::SocketAddr>>,
    relays_stop: tokio_util::sync::CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.relays_stop.cancel();
    }
}

impl Upstream {
    /// Reads the broker CA now, so a bad file is one clear error before anything starts.
    pub fn new(config: &Config) -> Result<Upstream, TlsError> {
        let up = Upstream {
            tls: Default::default(),
            timeouts: ArcSwap::from_pointee(timeouts(config)),
            gates: Default::default(),
            front: config.listen.mqtt.parse().ok(),
            relays: Default::default(),
            relays_stop: Default::default(),
        };
        up.reload(config)?;
        Ok(up)
    }

    /// Plain TCP only, with `limit` for connects and CONNACKs: for tools that reach brokers they
    /// started themselves.
    pub fn plain(limit: Duration) -> Upstream {
        Upstream {
            tls: Default::default(),
            timeouts: ArcSwap::from_pointee(Timeouts { connect: limit, connack: limit }),
            gates: Default::default(),
            front: None,
            relays: Default::default(),
            relays_stop: Default::default(),
        }
    }

    /// Re-reads the broker CA (renewed certificates take effect) and the timeouts; a CA that
    /// cannot be used refuses the reload and the running one stays.
    pub fn reload(&self, config: &Config) -> Result<(), TlsError> {
        let connector = tls::connector(&config.tls)?;
        self.tls.store(connector.map(Arc::new));
        self.timeouts.store(Arc::new(timeouts(config)));
        Ok(())
    }

    /// A plain TCP connection to `address` within the connect timeout (the TCP check, and the
    /// first step of every connection).
    pub async fn tcp(&self, address: &str) -> Result<TcpStream, AttemptError> {
        let limit = self.timeouts.load().connect;
        let stream = match timeout(limit, TcpStream::connect(address)).await {
            Err(_) => return Err(AttemptError::ConnectTimeout(limit)),
            Ok(Err(e)) if is_local(&e) => return Err(AttemptError::Local(e)),
            Ok(Err(e)) => return Err(AttemptError::Connect(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A connection to `broker` that speaks what the broker speaks: TCP, or TLS verified against
    /// `[tls] broker_ca` and the broker's `tls_name`.
    pub async fn connect(&self, broker: &BrokerConfig) -> Result<Conn, AttemptError> {
        self.connect_as(broker, None).await
    }

    /// [`Upstream::connect`] on behalf of `client` (its address goes into the PROXY protocol
    /// header of a broker with `proxy_protocol`; meshgate's own address without a client).
    pub async fn connect_as(
        &self,
        broker: &BrokerConfig,
        client: Option<std::net::SocketAddr>,
    ) -> Result<Conn, AttemptError> {
        let mut stream = self.tcp(&broker.address).await?;
        let front = client.map(|c| (c, self.front));
        send_proxy_header(&mut stream, broker, front).await.map_err(AttemptError::Connect)?;
        if !broker.tls {
            return Ok(Conn::Tcp(stream));
        }
        let Some(broker_tls) = self.tls.load_full() else {
            return Err(AttemptError::Protocol(format!(
                "broker {} has tls = true but no [tls] broker_ca",
                broker.name
            )));
        };
        let connector = &broker_tls.connector;
        let name = tls::server_name(&broker.address, broker.tls_name.as_deref()).map_err(AttemptError::Protocol)?;
        let limit = self.timeouts.load().connect;
        // Boxed: the TLS handshake future is over a kilobyte, and every plain session's setup
        // would otherwise carry room for it.
        match timeout(limit, Box::pin(connector.connect(name, stream))).await {
            Err(_) => Err(AttemptError::ConnectTimeout(limit)),
            Ok(Err(e)) => Err(AttemptError::Protocol(format!("TLS handshake with the broker: {e}"))),
            Ok(Ok(s)) => Ok(Conn::BrokerTls(Box::new(s))),
        }
    }

    /// Where rumqttc (replication links, retained snapshots) connects for `broker`: the broker
    /// itself, or, for a plain-TCP broker that takes a PROXY protocol header, a relay on
    /// 127.0.0.1 that opens each connection with meshgate's header and then passes the bytes
    /// through (rumqttc has no hook to write one). A TLS broker is reached directly: its
    /// certificate is checked against the address rumqttc is given.
    pub fn mqtt_address(&self, broker: &BrokerConfig) -> (String, u16) {
        if broker.proxy_protocol == crate::config::ProxyProtocol::Off || broker.tls {
            return split_address(&broker.address);
        }
        // Keyed by where and what it sends: a reload that changes either gets a new relay.
        let key = format!("{} {}", broker.address, broker.proxy_protocol.as_str());
        let mut relays = self.relays.lock();
        if let Some(a) = relays.get(&key) {
            return (a.ip().to_string(), a.port());
        }
        let bound = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .and_then(|l| l.local_addr().map(|a| (l, a)));
        match bound {
            Ok((listener, addr)) => {
                let limit = self.timeouts.load().connect;
                tokio::spawn(relay(listener, broker.clone(), limit, self.relays_stop.clone()));
                relays.insert(key, addr);
                (addr.ip().to_string(), addr.port())
            }
            Err(e) => {
                tracing::warn!(broker = %broker.name, "cannot open the PROXY protocol relay for replication: {e}");
                split_address(&broker.address)
            }
        }
    }

    fn gate(&self, address: &str) -> Arc<tokio::sync::Semaphore> {
        self.gates
            .lock()
            .entry(address.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PER_BROKER)))
            .clone()
    }

    /// One CONNECT to `broker`, answered by its CONNACK within the CONNACK timeout: a client's
    /// attempt and meshgate's own on a client's behalf. Returns the connection, the CONNACK and
    /// the bytes read with it (the CONNACK and whatever the broker sent right behind it).
    /// "Server unavailable" and "server busy" are failures; other refusals are answers.
    pub async fn handshake(
        &self,
        broker: &BrokerConfig,
        packet: &[u8],
        version: u8,
        client: Option<std::net::SocketAddr>,
    ) -> Result<(Conn, Connack, Vec<u8>), AttemptError> {
        // A connecting client's own CONNACK timeout runs meanwhile: its wait for a slot is
        // bounded by the connect timeout.
        let queue = self.timeouts.load().connect;
        let opened = self.open(broker, client, queue).await?;
        self.exchange(opened, packet, version).await
    }

    /// The first half of a handshake: a slot (waited for up to `queue`) and the connection,
    /// nothing sent yet. Dropping it at any point leaves nothing on the broker.
    pub async fn open(
        &self,
        broker: &BrokerConfig,
        client: Option<std::net::SocketAddr>,
        queue: Duration,
    ) -> Result<Opened, AttemptError> {
        let gate = self.gate(&broker.address);
        let Ok(Ok(slot)) = timeout(queue, gate.acquire_owned()).await else {
            return Err(AttemptError::Queued(queue));
        };
        let conn = self.connect_as(broker, client).await?;
        Ok(Opened { conn, _slot: slot })
    }

    /// The second half: the CONNECT, answered by its CONNACK within the CONNACK timeout. Once
    /// the CONNECT is out the broker holds the client's will, which only a DISCONNECT on the
    /// connection it accepted makes it drop.
    pub async fn exchange(
        &self,
        opened: Opened,
        packet: &[u8],
        version: u8,
    ) -> Result<(Conn, Connack, Vec<u8>), AttemptError> {
        let t = **self.timeouts.load();
        let Opened { mut conn, _slot } = opened;
        let deadline = Instant::now() + t.connack;
        let exchange = async {
            crate::transport::write_all(&mut conn, packet).await.map_err(AttemptError::Connect)?;
            let mut reader = PacketReader::new(&mut conn, CONNACK_READ_LIMIT);
            let first = reader.next().await.map_err(|e| match e {
                crate::mqtt::io::ReadError::Closed => AttemptError::Closed,
                crate::mqtt::io::ReadError::Io(e) => AttemptError::Connect(e),
                e => AttemptError::Protocol(e.to_string()),
            })?;
            let (ack, _) = connack::parse(&first.bytes)
                .map_err(|e| AttemptError::Protocol(e.to_string()))?
                .ok_or_else(|| AttemptError::Protocol("malformed CONNACK".into()))?;
            let (_, rest) = reader.into_parts();
            let mut bytes = first.bytes;
            bytes.extend_from_slice(&rest);
            Ok((ack, bytes))
        };
        let (ack, bytes) = match timeout_at(deadline, exchange).await {
            Err(_) => return Err(AttemptError::ConnackTimeout(t.connack)),
            Ok(r) => r?,
        };
        if let Some(reason) = ack.broker_failure(version) {
            return Err(AttemptError::Refused { code: ack.code, reason });
        }
        Ok((conn, ack, bytes))
    }

    /// Whether `broker` is there, asked with a CONNECT outside the handshake slots: `Some(true)`
    /// when it answers with any CONNACK, `Some(false)` when it cannot be reached (connection
    /// refused or timed out), `None` when it took the connection but closed it or said nothing
    /// in time (a process dying, or one at its connection limit: ask again to tell which).
    pub async fn reachable(&self, broker: &BrokerConfig, packet: &[u8]) -> Option<bool> {
        let t = **self.timeouts.load();
        let mut conn = match self.connect(broker).await {
            Ok(c) => c,
            Err(AttemptError::Connect(_) | AttemptError::ConnectTimeout(_)) => return Some(false),
            // meshgate's own shortage, a TLS or protocol error: not whether it is there.
            Err(_) => return None,
        };
        let exchange = async {
            crate::transport::write_all(&mut conn, packet).await.ok()?;
            let p = PacketReader::new(&mut conn, CONNACK_READ_LIMIT).next().await.ok()?;
            (p.kind() == crate::mqtt::kind::CONNACK).then_some(())
        };
        let answered = matches!(timeout(t.connack, exchange).await, Ok(Some(())));
        if !answered {
            return None;
        }
        let disconnect = crate::mqtt::encode::disconnect();
        let _ = timeout(Duration::from_millis(200), crate::transport::write_all(&mut conn, &disconnect)).await;
        Some(true)
    }

    /// How an `rumqttc` client (replication links, snapshots) reaches `broker`: the same TCP or
    /// TLS choice and certificate checks as every other connection.
    pub fn mqtt_transport(&self, broker: &BrokerConfig) -> Result<rumqttc::Transport, String> {
        if !broker.tls {
            return Ok(rumqttc::Transport::tcp());
        }
        let Some(broker_tls) = self.tls.load_full() else {
            return Err(format!("broker {} has tls = true but no [tls] broker_ca", broker.name));
        };
        let config = broker_tls.config_for(&broker.address, broker.tls_name.as_deref())?;
        Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config)))
    }
}

fn timeouts(config: &Config) -> Timeouts {
    Timeouts { connect: config.proxy.upstream_connect_timeout, connack: config.proxy.connack_timeout }
}

/// `host:port` as rumqttc takes it.
pub fn split_address(address: &str) -> (String, u16) {
    match address.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse().unwrap_or(1883)),
        None => (address.to_string(), 1883),
    }
}

/// Opens a connection to a broker with `proxy_protocol` set with its header: `front` is the
/// client and the address it reached meshgate at, for a client's session; without it the
/// header carries meshgate's own end of the connection.
async fn send_proxy_header(
    stream: &mut TcpStream,
    broker: &BrokerConfig,
    front: Option<(std::net::SocketAddr, Option<std::net::SocketAddr>)>,
) -> std::io::Result<()> {
    if broker.proxy_protocol == crate::config::ProxyProtocol::Off {
        return Ok(());
    }
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let (source, destination) = match front {
        Some((client, reached)) => (client, reached.unwrap_or(local)),
        None => (local, peer),
    };
    let header = crate::transport::proxy_protocol::header(broker.proxy_protocol, source, destination);
    crate::transport::write_all(stream, &header).await
}

/// The relay of `Upstream::mqtt_address`: each connection rumqttc opens becomes one to the
/// broker, PROXY header first, then bytes both ways until either side closes.
async fn relay(
    listener: tokio::net::TcpListener,
    broker: BrokerConfig,
    limit: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let mut inbound = match inbound {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors, say: wait instead of spinning.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let (broker, stop) = (broker.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(Ok(mut outbound)) = timeout(limit, TcpStream::connect(&broker.address)).await else { return };
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            if send_proxy_header(&mut outbound, &broker, None).await.is_err() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::AttemptError;

    #[test]
    fn every_failure_reason_is_listed_for_the_metrics() {
        let errors = [
            AttemptError::Connect(std::io::ErrorKind::Other.into()),
            AttemptError::ConnectTimeout(std::time::Duration::ZERO),
            AttemptError::ConnackTimeout(std::time::Duration::ZERO),
            AttemptError::Closed,
            AttemptError::Protocol(String::new()),
            AttemptError::Refused { code: 3, reason: "server_unavailable" },
            AttemptError::Refused { code: 0x89, reason: "server_busy" },
            AttemptError::Local(std::io::ErrorKind::Other.into()),
            AttemptError::Queued(std::time::Duration::ZERO),
        ];
        for e in errors {
            assert!(AttemptError::REASONS.contains(&e.reason()), "{}", e.reason());
        }
        // The refusal reasons are the CONNACK's own words.
        for (version, code) in [(4, 3), (5, 0x88), (5, 0x89)] {
            let ack = crate::mqtt::Connack { session_present: false, code };
            assert!(AttemptError::REASONS.contains(&ack.broker_failure(version).unwrap()));
        }
    }

    /// Out of descriptors, buffers or memory is meshgate's; a refused, unreachable or
    /// unroutable broker (EADDRNOTAVAIL included) is the broker's.
    #[test]
    fn only_meshgates_own_shortages_are_local() {
        use nix::errno::Errno;
        let err = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        for e in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(super::is_local(&err(e)), "{e}");
        }
        for e in [Errno::ECONNREFUSED, Errno::EHOSTUNREACH, Errno::ENETUNREACH, Errno::EADDRNOTAVAIL] {
            assert!(!super::is_local(&err(e)), "{e}");
        }
        assert!(!super::is_local(&std::io::ErrorKind::TimedOut.into()));
    }
}
