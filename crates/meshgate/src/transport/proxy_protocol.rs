//! The PROXY protocol (HAProxy's, v1 text and v2 binary): the header a trusted balancer puts in front of a client's bytes, read before anything else, and the header meshgate puts in front of its own bytes to a broker that asks for it.
//!
//! The `ppp` crate parses and builds the headers; this module only reads exactly the header's
//! bytes off the socket (never a byte of what follows, which is MQTT or a TLS or WebSocket
//! handshake) and decides what the header says about the client.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v2: 12-byte signature, version/command, family/protocol, 2-byte length.
const V2_FIXED: usize = 16;
/// v1: "PROXY TCP6 <39> <39> <5> <5>\r\n" is at most 107 bytes (the specification's bound).
const V1_MAX: usize = 107;
/// v2 addresses and TLVs meshgate reads at most (HAProxy sends a few dozen bytes).
const V2_MAX_REST: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol {0} header: {1}")]
    Malformed(&'static str, String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header `version` says to expect. `Ok(Some(client))` for a proxied TCP connection;
/// `Ok(None)` for one the balancer made itself (v2 LOCAL, v1 UNKNOWN: its own health checks),
/// which keeps the peer's address.
pub async fn read<R: AsyncRead + Unpin>(
    from: &mut R,
    version: ProxyProtocol,
) -> Result<Option<SocketAddr>, HeaderError> {
    match version {
        ProxyProtocol::Off => Ok(None),
        ProxyProtocol::V2 => {
            // The signature first: a client that sends MQTT instead (a CONNECT can be as short
            // as 14 bytes) is told at once, not after waiting for 16.
            let mut head = vec![0u8; V2_FIXED];
            from.read_exact(&mut head[..V2_SIGNATURE.len()]).await?;
            if head[..V2_SIGNATURE.len()] != V2_SIGNATURE {
                return Err(HeaderError::Malformed("v2", "the connection does not start with its signature".into()));
            }
            from.read_exact(&mut head[V2_SIGNATURE.len()..]).await?;
            let rest = u16::from_be_bytes([head[14], head[15]]) as usize;
            if rest > V2_MAX_REST {
                return Err(HeaderError::Malformed("v2", format!("{rest} bytes of addresses and TLVs")));
            }
            head.resize(V2_FIXED + rest, 0);
            from.read_exact(&mut head[V2_FIXED..]).await?;
            let header =
                ppp::v2::Header::try_from(head.as_slice()).map_err(|e| HeaderError::Malformed("v2", e.to_string()))?;
            Ok(match (header.command, header.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                // A proxied connection without an IP address (UNIX, unspecified): nothing
                // better than the peer is known.
                _ => None,
            })
        }
        ProxyProtocol::V1 => {
            // Byte by byte up to CRLF, so nothing after the header is taken off the socket;
            // a handful of reads once per connection.
            let mut line = Vec::with_capacity(V1_MAX);
            while !line.ends_with(b"\r\n") {
                if line.len() == V1_MAX {
                    return Err(HeaderError::Malformed("v1", format!("no CRLF within {V1_MAX} bytes")));
                }
                line.push(from.read_u8().await?);
            }
            let header =
                ppp::v1::Header::try_from(line.as_slice()).map_err(|e| HeaderError::Malformed("v1", e.to_string()))?;
            Ok(match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Unknown => None,
            })
        }
    }
}

/// The header for a connection from `source` to `destination`. Mixed address families (an
/// IPv6 client behind an IPv4 listener) are sent as IPv6, v4 addresses mapped.
pub fn header(version: ProxyProtocol, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (source, destination),
        (s, d) => (to_v6(s), to_v6(d)),
    };
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => {
            // Addresses display as the whole header line.
            ppp::v1::Addresses::from((source, destination)).to_string().into_bytes()
        }
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .expect("a v2 header with two socket addresses always builds"),
    }
}

fn to_v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip_and_leave_what_follows() {
        let src: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut bytes = header(v, src, dst);
            bytes.extend_from_slice(b"\x10MQTT");
            let mut r = bytes.as_slice();
            assert_eq!(read(&mut r, v).await.unwrap(), Some(src), "{v:?}");
            assert_eq!(r, b"\x10MQTT", "{v:?}: the bytes after the header stay on the socket");
        }
        let six: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let mut r: &[u8] = &header(ProxyProtocol::V2, six, dst);
        assert_eq!(read(&mut r, ProxyProtocol::V2).await.unwrap(), Some(six));
    }

    #[tokio::test]
    async fn garbage_and_local_headers() {
        let mut r: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        assert!(matches!(read(&mut r, ProxyProtocol::V2).await, Err(HeaderError::Malformed(..))));
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(read(&mut r, ProxyProtocol::V1).await, Err(HeaderError::Malformed(..))));
        let mut r: &[u8] = b"PROXY UNKNOWN\r\n";
        assert_eq!(read(&mut r, ProxyProtocol::V1).await.unwrap(), None);
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let mut r: &[u8] = &local;
        assert_eq!(read(&mut r, ProxyProtocol::V2).await.unwrap(), None);
    }
}
