//! What carries MQTT bytes: a connection that is plain TCP, TLS or a WebSocket (`Conn`), the certificates behind TLS (`tls`) and the WebSocket upgrade (`ws`), for clients and brokers alike.

pub mod conn;
pub mod proxy_protocol;
pub mod tls;
pub mod ws;

pub use conn::Conn;

/// Writes all of `data` (small: a CONNACK, a request, leftover bytes) and flushes it, which a
/// TLS stream needs before the bytes leave.
pub async fn write_all<W: tokio::io::AsyncWrite + Unpin>(to: &mut W, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    to.write_all(data).await?;
    to.flush().await
}
