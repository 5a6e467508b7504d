//! What carries MQTT bytes: a connection that is plain TCP or TLS (`Conn`), and the certificates behind TLS (`tls`), for clients and brokers alike.

pub mod conn;
pub mod tls;

pub use conn::Conn;
