//! Reading whole packets from a stream: the one packet reader of every MQTT client meshgate runs itself (broker attempts, probes, lag probes, persistent-session work).
//!
//! Client traffic never goes through here: forwarding only finds packet boundaries
//! (`FrameScanner`) and copies bytes. This is for the connections where meshgate itself is the
//! MQTT client and must act on what the broker answers.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{decode_length, kind, Length};

/// One packet as read: its bytes (fixed header included) and where the body starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub bytes: Vec<u8>,
    body_at: usize,
}

impl Packet {
    /// The fixed header's first byte: packet type and flags.
    pub fn first(&self) -> u8 {
        self.bytes[0]
    }
    /// The packet type (`mqtt::kind`).
    pub fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.body_at..]
    }
    pub fn name(&self) -> &'static str {
        kind::name(self.kind())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("broker closed the connection")]
    Closed,
    #[error("broker sent a malformed packet (bad remaining length)")]
    Malformed,
    #[error("broker sent a packet of {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("read: {0}")]
    Io(#[from] io::Error),
}

/// Whole packets from `stream`. Reading is cancel-safe (bytes go straight into the buffer),
/// so callers put `next` under their own deadline.
pub struct PacketReader<S> {
    stream: S,
    buf: Vec<u8>,
    max: usize,
}

impl<S: AsyncRead + Unpin> PacketReader<S> {
    /// `max` bounds one packet, so a broker that is not speaking MQTT cannot grow the buffer.
    pub fn new(stream: S, max: usize) -> Self {
        PacketReader { stream, buf: Vec::new(), max }
    }

    /// Starts after bytes that were already read from `stream` (what followed a CONNACK).
    pub fn with_buffered(stream: S, already: Vec<u8>, max: usize) -> Self {
        PacketReader { stream, buf: already, max }
    }

    /// The whole packet at the start of the buffer, if it is there.
    fn take(&mut self) -> Result<Option<Packet>, ReadError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        match decode_length(&self.buf[1..]) {
            Length::Done(len, n) => {
                let total = 1 + n + len as usize;
                if total > self.max {
                    return Err(ReadError::TooLarge { len: total, max: self.max });
                }
                if self.buf.len() < total {
                    return Ok(None);
                }
                let rest = self.buf.split_off(total);
                let bytes = std::mem::replace(&mut self.buf, rest);
                Ok(Some(Packet { bytes, body_at: 1 + n }))
            }
            Length::Partial => Ok(None),
            Length::Malformed => Err(ReadError::Malformed),
        }
    }

    /// The next whole packet.
    pub async fn next(&mut self) -> Result<Packet, ReadError> {
        loop {
            if let Some(p) = self.take()? {
                return Ok(p);
            }
            if self.buf.capacity() - self.buf.len() < 256 {
                self.buf.reserve(4096);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// The stream, for writing (replies, requests) between reads.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The stream and the bytes read but not yet returned as packets.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn packets_split_across_reads_and_packed_into_one() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = PacketReader::with_buffered(rx, vec![0x20], 1024);
        // The rest of a CONNACK, then a PUBLISH and a SUBACK in one write.
        tx.write_all(&[0x02, 0x00, 0x00, 0x30, 0x03, 0, 1, b't', 0x90, 0x03, 0, 1, 0]).await.unwrap();
        let a = r.next().await.unwrap();
        assert_eq!((a.kind(), a.body()), (kind::CONNACK, &[0u8, 0][..]));
        let b = r.next().await.unwrap();
        assert_eq!((b.name(), b.body()), ("PUBLISH", &[0u8, 1, b't'][..]));
        assert_eq!(r.next().await.unwrap().kind(), kind::SUBACK);
        drop(tx);
        assert!(matches!(r.next().await, Err(ReadError::Closed)));
    }

    #[tokio::test]
    async fn oversized_and_malformed_are_refused_before_their_body() {
        let mut r = PacketReader::with_buffered(tokio::io::empty(), vec![0x30, 0xff, 0x01], 64);
        assert!(matches!(r.next().await, Err(ReadError::TooLarge { len: 258, max: 64 })));
        let mut r = PacketReader::with_buffered(tokio::io::empty(), vec![0x30, 0xff, 0xff, 0xff, 0xff], 64);
        assert!(matches!(r.next().await, Err(ReadError::Malformed)));
    }
}
