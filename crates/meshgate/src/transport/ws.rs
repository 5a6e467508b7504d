//! MQTT over WebSockets toward clients: the upgrade (path, `mqtt` subprotocol, the forwarded client address from trusted proxies) and a byte stream over binary messages, so a WebSocket client is an ordinary `Conn` to the rest of meshgate.
//!
//! tungstenite does the WebSocket protocol (handshake, framing, masking, ping and pong, close);
//! this module only decides whom to upgrade and turns messages into bytes. MQTT packets may be
//! split across WebSocket messages or several packed into one (MQTT 5 §6): the bytes go to the
//! same packet scanner as a TCP client's, which never assumes a packet per read.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::Conn;
use crate::config::Network;

/// The subprotocols a client may ask for: `mqtt` (MQTT 3.1.1 and 5), `mqttv3.1` (3.1).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Why an upgrade was refused; the `reason` label of `meshgate_rejected_connections_total`.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Handshake(String),
    #[error("path {0} is not the MQTT path")]
    Path(String),
    #[error("subprotocol {0:?} is not MQTT (mqtt or mqttv3.1)")]
    Subprotocol(String),
    #[error("{0}")]
    Admission(&'static str),
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Handshake(_) => "ws_handshake",
            Refused::Path(_) => "ws_path",
            Refused::Subprotocol(_) => "ws_subprotocol",
            Refused::Admission(reason) => reason,
        }
    }
}

/// What the upgrade needs to know of the listener.
pub struct Upgrade<'a> {
    pub path: &'a str,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted: &'a [Network],
    /// The largest MQTT packet meshgate takes, which bounds a WebSocket message too.
    pub max_message: usize,
}

/// A client's WebSocket upgrade. `admit` is asked about the client's address (the forwarded
/// one behind a trusted proxy) before the upgrade is answered, so a refused client gets an
/// HTTP status instead of a WebSocket that closes. Returns the stream, the client's address
/// and what `admit` gave.
pub async fn accept<A>(
    conn: Conn,
    peer: SocketAddr,
    upgrade: &Upgrade<'_>,
    admit: impl FnOnce(IpAddr) -> Result<A, &'static str> + Unpin,
) -> Result<(WsConn, SocketAddr, A), Refused> {
    let mut outcome: Option<Result<(SocketAddr, A), Refused>> = None;
    // tungstenite's callback type: its error is the HTTP response it sends.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: Refused, outcome: &mut Option<Result<(SocketAddr, A), Refused>>| {
            let mut r = ErrorResponse::new(Some(format!("{why}\n")));
            *r.status_mut() = status;
            *outcome = Some(Err(why));
            r
        };
        if req.uri().path() != upgrade.path {
            return Err(refuse(StatusCode::NOT_FOUND, Refused::Path(req.uri().path().to_string()), &mut outcome));
        }
        let asked: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        // A client that names no subprotocol is served (some embedded clients omit it); one
        // that names only others is not speaking MQTT.
        if !asked.is_empty() {
            match asked.iter().find(|p| SUBPROTOCOLS.contains(&p.as_str())) {
                Some(p) => {
                    resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(p).expect("token"));
                }
                None => {
                    return Err(refuse(StatusCode::BAD_REQUEST, Refused::Subprotocol(asked.join(", ")), &mut outcome))
                }
            }
        }
        let client = forwarded_for(peer, req, upgrade.trusted);
        match admit(client.ip()) {
            Ok(a) => {
                outcome = Some(Ok((client, a)));
                Ok(resp)
            }
            Err(reason) => Err(refuse(StatusCode::SERVICE_UNAVAILABLE, Refused::Admission(reason), &mut outcome)),
        }
    };
    let conn = match read_head(conn).await {
        Ok(c) => c,
        Err((mut conn, why)) => {
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{why}\n",
                why.len() + 1
            );
            let _ = super::write_all(&mut conn, answer.as_bytes()).await;
            return Err(Refused::Handshake(why));
        }
    };
    let mut config = WebSocketConfig::default();
    // tungstenite allocates its read buffer whole when the connection is made: 128 KiB by
    // default, which made an idle WebSocket session cost 144 KB (against 3 KB over TCP).
    // Larger packets still arrive whole (the buffer grows to the frame), read 4 KiB at a time.
    config.read_buffer_size = WS_READ_BUFFER;
    config.max_message_size = Some(upgrade.max_message);
    config.max_frame_size = Some(upgrade.max_message);
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(conn, callback, Some(config)).await;
    match (handshake, outcome) {
        (Ok(ws), Some(Ok((client, a)))) => Ok((WsConn { ws, pending: Bytes::new(), eof: false }, client, a)),
        (_, Some(Err(why))) => Err(why),
        (Err(e), _) => Err(Refused::Handshake(e.to_string())),
        (Ok(_), None) => Err(Refused::Handshake("upgrade answered without a decision".into())),
    }
}

/// The longest upgrade request read (browsers send well under 2 KiB).
const MAX_HEAD: usize = 8 * 1024;

/// Reads the HTTP request head: tungstenite gives no answer to a request that is no WebSocket
/// upgrade at all, so that one is refused here, with a 400 that says why. The head is handed
/// on, unconsumed, to tungstenite.
async fn read_head(mut conn: Conn) -> Result<Replay, (Conn, String)> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 124];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value))
                };
                let why = if req.method != Some("GET") {
                    Some("a WebSocket upgrade is a GET request".to_string())
                } else if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
                    Some("not a WebSocket upgrade (no Upgrade: websocket header)".to_string())
                } else if header("sec-websocket-key").is_none() {
                    Some("no Sec-WebSocket-Key header".to_string())
                } else {
                    None
                };
                return match why {
                    Some(why) => Err((conn, why)),
                    None => Ok(Replay { head: Bytes::from(head), inner: conn }),
                };
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err((conn, format!("request head over {MAX_HEAD} bytes"))),
            Err(e) => return Err((conn, format!("not an HTTP request: {e}"))),
        }
        let mut chunk = [0u8; 1024];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err((conn, "closed before a whole request".to_string())),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The connection with the bytes already read in front of it.
pub struct Replay {
    head: Bytes,
    inner: Conn,
}

impl AsyncRead for Replay {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            if this.head.is_empty() {
                // Given back: the session lives on, the request head is done with.
                this.head = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy, then the nearest
/// address in `X-Forwarded-For` that is not itself a trusted proxy (the rightmost ones were
/// added by proxies meshgate trusts; anything left of the first untrusted one could be forged).
fn forwarded_for(peer: SocketAddr, req: &Request, trusted: &[Network]) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let hops: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // From the right: each trusted hop vouches for the one before it. The first untrusted
    // address is the client; a hop that does not read as an address ends the walk at the
    // last one vouched for (what is left of it could be forged).
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else { break };
        // The forwarded header carries no port.
        client = SocketAddr::new(ip, 0);
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// tungstenite's read buffer per WebSocket session (see `accept`).
const WS_READ_BUFFER: usize = 4 * 1024;

/// A WebSocket as a byte stream: each binary message's bytes are read in order, each write
/// goes out as one binary message.
pub struct WsConn {
    ws: WebSocketStream<Replay>,
    /// What the last message brought that the reader has not taken yet.
    pending: Bytes,
    eof: bool,
}

fn io_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl AsyncRead for WsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message: MQTT over WebSockets is binary",
                    )))
                }
                // Pings are answered by tungstenite itself; pongs and raw frames carry nothing.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(io_error)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(io_error)
    }
}
