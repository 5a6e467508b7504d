//! What carries MQTT bytes: a connection that is plain TCP or TLS (`Conn`), and the certificates behind TLS (`tls`), for clients and brokers alike.

pub mod conn;
pub mod tls;

pub use conn::Conn;

/// Writes all of `data` (small: a CONNACK, a request, leftover bytes) and flushes it, which a
/// TLS stream needs before the bytes leave.
pub async fn write_all<W: tokio::io::AsyncWrite + Unpin>(to: &mut W, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    to.write_all(data).await?;
    to.flush().await
}
