//! A connection that is plain TCP, TLS (a client of the mqtts listener, or a broker with `tls = true`) or a client's WebSocket (ws and wss listeners), behind one AsyncRead/AsyncWrite type.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Conn {
    Tcp(TcpStream),
    /// TLS toward a client; boxed because a TLS session is large and most connections are plain.
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    BrokerTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// MQTT over WebSockets, over TCP or TLS (`ws`).
    ClientWs(Box<super::ws::WsConn>),
    /// A connection given up before its owner is done with it (a failed broker's, closed at
    /// the start of a move for lack of file descriptors): reads end, writes fail.
    Released,
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::BrokerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::ClientWs(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Released => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::BrokerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::ClientWs(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Released => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::BrokerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::ClientWs(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Released => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::BrokerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::ClientWs(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Released => Poll::Ready(Ok(())),
        }
    }
}
