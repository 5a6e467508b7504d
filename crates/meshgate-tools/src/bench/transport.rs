//! How the idle load reaches the front end: plain TCP, TLS (the mqtts listener), MQTT over WebSockets (ws) or both (wss), so memory per idle session is measured on every kind of listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::wire::{self, WireError};
use meshgate::mqtt::encode;

/// A byte stream the WebSocket runs over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// Where and how: the kind, and for TLS the CA that signed the front end's certificate and
/// the name it carries; for WebSockets the path.
#[derive(Clone)]
pub struct Transport {
    pub kind: Kind,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
    pub path: String,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("kind", &self.kind).field("path", &self.path).finish_non_exhaustive()
    }
}

impl Transport {
    /// `ca` (PEM) must be given for tls and wss; `name` is what the certificate names.
    pub fn new(kind: Kind, ca: Option<PathBuf>, name: &str, path: &str) -> anyhow::Result<Transport> {
        let tls = match kind {
            Kind::Tcp | Kind::Ws => None,
            Kind::Tls | Kind::Wss => {
                let Some(ca) = ca else {
                    anyhow::bail!(
                        "--transport tls and wss need --ca: the CA (PEM) that signed the front end's certificate"
                    )
                };
                let cfg = meshgate::config::TlsConfig { broker_ca: Some(ca), ..Default::default() };
                let connector = meshgate::transport::tls::connector(&cfg)?.expect("a CA is set").connector;
                let name = meshgate::transport::tls::server_name(name, Some(name)).map_err(anyhow::Error::msg)?;
                Some((connector, name))
            }
        };
        Ok(Transport { kind, tls, path: path.to_string() })
    }
}

/// One open session over any transport.
pub enum Conn {
    Plain(Box<dyn Io>),
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
}

fn io_error(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        e => std::io::Error::other(e),
    }
}

/// Connects, and for TLS completes the handshake, within `limit`.
async fn stream(t: &Transport, addr: SocketAddr, limit: Duration) -> Result<Box<dyn Io>, WireError> {
    let tcp = wire::dial(addr, limit).await?;
    match &t.tls {
        None => Ok(Box::new(tcp)),
        Some((connector, name)) => match timeout(limit, connector.connect(name.clone(), tcp)).await {
            Err(_) => Err(WireError::ConnackTimeout(limit)),
            Ok(Err(e)) => Err(WireError::Protocol(format!("TLS handshake: {e}"))),
            Ok(Ok(s)) => Ok(Box::new(s)),
        },
    }
}

impl Conn {
    /// A clean-session 3.1.1 session, accepted, within `limit` (every handshake included).
    pub async fn open(
        t: &Transport,
        addr: SocketAddr,
        id: &str,
        keepalive: u16,
        limit: Duration,
    ) -> Result<Conn, WireError> {
        let deadline = Instant::now() + limit;
        let mut s = stream(t, addr, limit).await?;
        let left = || deadline.saturating_duration_since(Instant::now());
        let connect = encode::connect(4, id, true, keepalive, None, None);
        match t.kind {
            Kind::Tcp | Kind::Tls => {
                match timeout(left(), wire::handshake(&mut s, &connect)).await {
                    Err(_) => return Err(WireError::ConnackTimeout(limit)),
                    Ok(r) => r?,
                }
                Ok(Conn::Plain(s))
            }
            Kind::Ws | Kind::Wss => {
                let scheme = if t.kind == Kind::Wss { "wss" } else { "ws" };
                let mut req = format!("{scheme}://{addr}{}", t.path)
                    .into_client_request()
                    .map_err(|e| WireError::Protocol(e.to_string()))?;
                req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().expect("a valid header"));
                let exchange = async {
                    let (mut ws, _) = tokio_tungstenite::client_async(req, s)
                        .await
                        .map_err(|e| WireError::Protocol(format!("WebSocket upgrade: {e}")))?;
                    ws.send(Message::binary(connect)).await.map_err(io_error)?;
                    let mut got = Vec::new();
                    while let Some(m) = ws.next().await {
                        got.extend_from_slice(&m.map_err(io_error)?.into_data());
                        match meshgate::mqtt::connack::parse(&got) {
                            Ok(Some((ack, _))) if ack.code == 0 => return Ok(ws),
                            Ok(Some((ack, _))) => return Err(WireError::Refused(ack.code)),
                            Ok(None) => {}
                            Err(e) => return Err(WireError::Protocol(e.to_string())),
                        }
                    }
                    Err(WireError::Closed)
                };
                match timeout(left(), exchange).await {
                    Err(_) => Err(WireError::ConnackTimeout(limit)),
                    Ok(r) => Ok(Conn::Ws(Box::new(r?))),
                }
            }
        }
    }

    /// PINGREQ, its PINGRESP, then DISCONNECT: whether the session was still served.
    pub async fn ping_and_leave(&mut self) -> std::io::Result<()> {
        const PINGREQ: [u8; 2] = [0xc0, 0x00];
        match self {
            Conn::Plain(s) => {
                s.write_all(&PINGREQ).await?;
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await?;
                if b != [0xd0, 0x00] {
                    return Err(std::io::Error::other(format!("not a PINGRESP: {b:02x?}")));
                }
                let _ = s.write_all(&encode::disconnect()).await;
            }
            Conn::Ws(ws) => {
                ws.send(Message::binary(PINGREQ.to_vec())).await.map_err(io_error)?;
                loop {
                    match ws.next().await {
                        None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Some(m) => {
                            let data = m.map_err(io_error)?.into_data();
                            if data.is_empty() {
                                continue;
                            }
                            if data.as_ref() != [0xd0, 0x00] {
                                return Err(std::io::Error::other(format!("not a PINGRESP: {:02x?}", data.as_ref())));
                            }
                            break;
                        }
                    }
                }
                let _ = ws.send(Message::binary(encode::disconnect().to_vec())).await;
            }
        }
        Ok(())
    }
}
