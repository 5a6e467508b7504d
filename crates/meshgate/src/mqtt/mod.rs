//! MQTT framing and the few packets meshgate reads or writes; everything else passes through as bytes.
//!
//! meshgate never re-encodes a client's packets: it reads the fixed header to find packet
//! boundaries (so it can count, limit and later inspect packets) and copies the bytes unchanged.
//! Length is always checked from the remaining-length field before any body is buffered.

pub mod connack;
pub mod connect;
pub mod encode;
pub mod frame;
pub mod io;
pub mod subscribe;

pub use connack::{Connack, ConnackError};
pub use connect::{Connect, ConnectError};
pub use frame::{Capture, FrameError, FrameScanner, Want};

/// The protocol a CONNECT's level names, as the API shows it.
pub fn protocol_name(level: u8) -> &'static str {
    match level {
        3 => "3.1",
        4 => "3.1.1",
        5 => "5",
        _ => "unknown",
    }
}

/// The largest value the four-byte remaining-length field can carry (256 MB).
pub const MAX_REMAINING_LENGTH: u32 = 268_435_455;

/// Packet type numbers from the first byte's high nibble.
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;

    pub fn name(t: u8) -> &'static str {
        const NAMES: [&str; 16] = [
            "reserved(0)",
            "CONNECT",
            "CONNACK",
            "PUBLISH",
            "PUBACK",
            "PUBREC",
            "PUBREL",
            "PUBCOMP",
            "SUBSCRIBE",
            "SUBACK",
            "UNSUBSCRIBE",
            "UNSUBACK",
            "PINGREQ",
            "PINGRESP",
            "DISCONNECT",
            "AUTH",
        ];
        NAMES[(t & 0x0f) as usize]
    }
}

/// Outcome of decoding a remaining-length field from the start of `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// The value and how many bytes the field took.
    Done(u32, usize),
    /// More bytes are needed.
    Partial,
    /// A fifth continuation byte: not MQTT.
    Malformed,
}

/// Decodes the variable-length remaining-length field (1 to 4 bytes, 7 bits each).
pub fn decode_length(buf: &[u8]) -> Length {
    let mut value: u32 = 0;
    for (i, &b) in buf.iter().enumerate().take(4) {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Length::Done(value, i + 1);
        }
    }
    if buf.len() >= 4 {
        Length::Malformed
    } else {
        Length::Partial
    }
}

pub fn encode_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// A cursor over one packet body that reports which field was cut short.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([s[0], s[1]]))
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    /// A two-byte-length-prefixed field (string or binary data).
    pub(crate) fn binary(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    pub(crate) fn varint(&mut self) -> Option<u32> {
        match decode_length(&self.buf[self.pos..]) {
            Length::Done(v, n) => {
                self.pos += n;
                Some(v)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_round_trips_at_the_boundaries() {
        for v in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, MAX_REMAINING_LENGTH as usize] {
            let mut out = Vec::new();
            encode_length(v, &mut out);
            assert_eq!(decode_length(&out), Length::Done(v as u32, out.len()), "{v}");
        }
    }

    #[test]
    fn remaining_length_partial_and_malformed() {
        assert_eq!(decode_length(&[]), Length::Partial);
        assert_eq!(decode_length(&[0x80, 0x80]), Length::Partial);
        assert_eq!(decode_length(&[0xff, 0xff, 0xff, 0xff]), Length::Malformed);
        assert_eq!(decode_length(&[0xff, 0xff, 0xff, 0x7f]), Length::Done(MAX_REMAINING_LENGTH, 4));
    }
}
