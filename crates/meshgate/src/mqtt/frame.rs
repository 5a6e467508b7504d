//! Incremental packet boundary scanner for a byte stream that is forwarded unchanged.
//!
//! It keeps at most the five bytes of a fixed header, never a body, so a session costs the
//! same few bytes whether its packets are 2 bytes or 200 KB.

use super::{decode_length, kind, Length};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed remaining length (more than four length bytes)")]
    BadLength,
    #[error("reserved packet type 0")]
    Reserved,
    #[error("{kind} of {len} bytes exceeds the {max}-byte packet limit")]
    TooLarge { kind: &'static str, len: u32, max: u32 },
    #[error("second CONNECT on an established session")]
    SecondConnect,
}

/// What the scanner saw at the start of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub first_byte: u8,
    pub remaining: u32,
}

impl Header {
    pub fn kind(&self) -> u8 {
        self.first_byte >> 4
    }
}

enum Scanned<'a> {
    Header(Header),
    /// Part of the current packet's body; `true` on its last part.
    Body(&'a [u8], bool),
}

/// How much of a packet `FrameScanner::feed_capture` is to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Skip,
    /// The whole body, if it is at most this long (else as much as fits).
    Whole(usize),
    /// Only as far as the packet identifier: the first two bytes of an acknowledgement, or a
    /// PUBLISH's topic and identifier (never its payload).
    PacketId,
}

/// A packet body being assembled by `FrameScanner::feed_capture`.
#[derive(Debug, Default)]
pub struct Capture {
    current: Option<(Header, Want)>,
    buf: Vec<u8>,
}

impl Capture {
    pub fn new() -> Capture {
        Capture::default()
    }
}

/// How many body bytes `want` asks for, as far as `got` tells (a PUBLISH's topic length comes
/// first).
fn wanted_len(h: Header, want: Want, got: &[u8]) -> usize {
    match want {
        Want::Skip => 0,
        Want::Whole(limit) => limit,
        Want::PacketId if h.kind() == kind::PUBLISH => match got {
            [a, b, ..] => 2 + usize::from(u16::from_be_bytes([*a, *b])) + 2,
            _ => 2,
        },
        Want::PacketId => 2,
    }
}

#[derive(Debug)]
pub struct FrameScanner {
    header: [u8; 5],
    header_len: u8,
    /// Body bytes of the current packet still to come; meaningful when `header_len == 0`.
    body_left: u32,
    max_packet: u32,
}

impl FrameScanner {
    pub fn new(max_packet: u32) -> Self {
        FrameScanner { header: [0; 5], header_len: 0, body_left: 0, max_packet }
    }

    /// Feeds forwarded bytes; calls `on_packet` once per packet header completed in them.
    /// An error means the stream is not MQTT any more and the session must close.
    pub fn feed(&mut self, data: &[u8], mut on_packet: impl FnMut(Header)) -> Result<(), FrameError> {
        self.scan(data, |e| {
            if let Scanned::Header(h) = e {
                on_packet(h)
            }
        })
    }

    /// Like `feed`, and also hands `on_captured` the body of every packet `want` asks for,
    /// assembled in `cap` across reads, with `true` when it holds all that was asked (`false`:
    /// a whole body over its limit, of which it holds the start). The callee may take the
    /// buffer. Used only for the packets meshgate must read (subscriptions, QoS flows), so
    /// ordinary traffic is still only counted.
    pub fn feed_capture(
        &mut self,
        data: &[u8],
        want: impl Fn(Header) -> Want,
        cap: &mut Capture,
        mut on_packet: impl FnMut(Header),
        mut on_captured: impl FnMut(Header, &mut Vec<u8>, bool),
    ) -> Result<(), FrameError> {
        self.scan(data, |e| match e {
            Scanned::Header(h) => {
                on_packet(h);
                let w = want(h);
                cap.current = (w != Want::Skip).then_some((h, w));
                cap.buf.clear();
            }
            Scanned::Body(mut chunk, last) => {
                let Some((h, w)) = cap.current else { return };
                // Taken a piece at a time: a PUBLISH says how much of it is wanted only once
                // its topic length is in.
                while !chunk.is_empty() {
                    let room = wanted_len(h, w, &cap.buf).saturating_sub(cap.buf.len());
                    if room == 0 {
                        break;
                    }
                    let n = room.min(chunk.len()).min(if cap.buf.len() < 2 { 2 - cap.buf.len() } else { usize::MAX });
                    cap.buf.extend_from_slice(&chunk[..n]);
                    chunk = &chunk[n..];
                }
                if last {
                    let complete = match w {
                        Want::Whole(limit) => h.remaining as usize <= limit,
                        _ => cap.buf.len() >= wanted_len(h, w, &cap.buf),
                    };
                    on_captured(h, &mut cap.buf, complete);
                    cap.current = None;
                    // A small buffer is kept for the next acknowledgement; a large one is not
                    // held by an idle session.
                    if cap.buf.capacity() > 256 {
                        cap.buf = Vec::new();
                    }
                    cap.buf.clear();
                }
            }
        })
    }

    fn scan(&mut self, mut data: &[u8], mut on: impl FnMut(Scanned<'_>)) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.header_len == 0 && self.body_left > 0 {
                let n = (self.body_left as usize).min(data.len());
                self.body_left -= n as u32;
                on(Scanned::Body(&data[..n], self.body_left == 0));
                data = &data[n..];
                continue;
            }
            // Accumulate header bytes: one type byte plus up to four length bytes.
            self.header[self.header_len as usize] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if self.header_len == 1 {
                if self.header[0] >> 4 == 0 {
                    return Err(FrameError::Reserved);
                }
                continue;
            }
            match decode_length(&self.header[1..self.header_len as usize]) {
                Length::Partial => continue,
                Length::Malformed => return Err(FrameError::BadLength),
                Length::Done(len, _) => {
                    let h = Header { first_byte: self.header[0], remaining: len };
                    if h.kind() == kind::CONNECT {
                        return Err(FrameError::SecondConnect);
                    }
                    let total = len.saturating_add(u32::from(self.header_len));
                    if total > self.max_packet {
                        return Err(FrameError::TooLarge {
                            kind: kind::name(h.kind()),
                            len: total,
                            max: self.max_packet,
                        });
                    }
                    self.header_len = 0;
                    self.body_left = len;
                    on(Scanned::Header(h));
                    if len == 0 {
                        on(Scanned::Body(&[], true));
                    }
                }
            }
        }
        Ok(())
    }

    /// Body bytes of the current packet still to come, once its header is complete (`None`
    /// while in the middle of a fixed header).
    pub fn left_in_packet(&self) -> Option<u32> {
        (self.header_len == 0).then_some(self.body_left)
    }

    /// True between packets: nothing of a packet is pending.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]], max: u32) -> (Result<(), FrameError>, Vec<Header>) {
        let mut s = FrameScanner::new(max);
        let mut seen = Vec::new();
        for c in chunks {
            if let Err(e) = s.feed(c, |h| seen.push(h)) {
                return (Err(e), seen);
            }
        }
        (Ok(()), seen)
    }

    #[test]
    fn finds_packets_in_one_chunk() {
        // PINGREQ, PUBLISH "a" "hi" QoS 0, DISCONNECT
        let bytes = [0xc0, 0x00, 0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i', 0xe0, 0x00];
        let (r, seen) = scan(&[&bytes], 1024);
        r.unwrap();
        assert_eq!(seen.iter().map(|h| h.kind()).collect::<Vec<_>>(), vec![12, 3, 14]);
        assert_eq!(seen[1].remaining, 5);
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_packets() {
        let bytes = [0xc0, 0x00, 0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i', 0xe0, 0x00];
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let (r, seen) = scan(&chunks, 1024);
        r.unwrap();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn multi_byte_length_split_across_reads() {
        // PUBLISH with remaining length 200 = 0xc8 0x01
        let mut bytes = vec![0x30, 0xc8, 0x01];
        bytes.extend(std::iter::repeat_n(0u8, 200));
        let (r, seen) = scan(&[&bytes[..2], &bytes[2..100], &bytes[100..]], 1024);
        r.unwrap();
        assert_eq!(seen, vec![Header { first_byte: 0x30, remaining: 200 }]);
    }

    #[test]
    fn rejects_reserved_type_and_bad_length() {
        assert_eq!(scan(&[&[0x00, 0x00]], 1024).0, Err(FrameError::Reserved));
        assert_eq!(scan(&[&[0x30, 0xff, 0xff, 0xff, 0xff]], 1024).0, Err(FrameError::BadLength));
    }

    #[test]
    fn oversized_packet_is_refused_from_its_header() {
        // 256 MB announced; rejected after 5 bytes, nothing buffered.
        let (r, _) = scan(&[&[0x30, 0xff, 0xff, 0xff, 0x7f]], 1 << 20);
        assert!(matches!(r, Err(FrameError::TooLarge { len: 268_435_460, .. })), "{r:?}");
    }

    #[test]
    fn captures_wanted_bodies_across_reads() {
        // PINGREQ, SUBSCRIBE id 1 "a/b" QoS 1, PUBLISH "a" "hi", UNSUBACK id 7 (empty-bodied
        // types are reported too).
        let bytes = [
            0xc0, 0x00, 0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x30, 0x05, 0x00, 0x01, b'a', b'h',
            b'i', 0xb0, 0x02, 0x00, 0x07,
        ];
        for split in [1usize, 3, 7, bytes.len()] {
            let mut s = FrameScanner::new(1024);
            let mut cap = Capture::new();
            let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
            let mut headers = 0;
            for chunk in bytes.chunks(split) {
                s.feed_capture(
                    chunk,
                    |h| match h.kind() {
                        8 | 11 | 12 => Want::Whole(64),
                        _ => Want::Skip,
                    },
                    &mut cap,
                    |_| headers += 1,
                    |h, b, whole| {
                        assert!(whole);
                        got.push((h.kind(), b.to_vec()))
                    },
                )
                .unwrap();
            }
            assert_eq!(headers, 4);
            assert_eq!(
                got,
                vec![(12, vec![]), (8, vec![0, 1, 0, 3, b'a', b'/', b'b', 1]), (11, vec![0, 7])],
                "split {split}"
            );
        }
    }

    #[test]
    fn capture_over_limit_keeps_its_start_and_says_so() {
        let mut s = FrameScanner::new(1024);
        let mut cap = Capture::new();
        let mut got = Vec::new();
        let bytes = [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0xc0, 0x00];
        let want = |h: Header| if h.kind() == 8 || h.kind() == 12 { Want::Whole(4) } else { Want::Skip };
        s.feed_capture(&bytes, want, &mut cap, |_| {}, |h, b, whole| got.push((h.kind(), b.to_vec(), whole))).unwrap();
        assert_eq!(got, vec![(8, vec![0, 1, 0, 3], false), (12, vec![], true)]);
    }

    #[test]
    fn packet_id_capture_reads_a_publish_up_to_its_identifier_only() {
        // PUBLISH QoS 1 "a/b" id 0x0102, payload of 300 bytes; PUBACK id 9.
        let mut bytes = vec![0x32, 0xb3, 0x02, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x02];
        bytes.extend(std::iter::repeat_n(7u8, 300));
        bytes.extend([0x40, 0x02, 0x00, 0x09]);
        for split in [1usize, 2, 5, bytes.len()] {
            let mut s = FrameScanner::new(1024);
            let mut cap = Capture::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                s.feed_capture(
                    chunk,
                    |_| Want::PacketId,
                    &mut cap,
                    |_| {},
                    |h, b, whole| got.push((h.kind(), b.to_vec(), whole)),
                )
                .unwrap();
            }
            assert_eq!(
                got,
                vec![(3, vec![0, 3, b'a', b'/', b'b', 1, 2], true), (4, vec![0, 9], true)],
                "split {split}"
            );
        }
    }

    #[test]
    fn second_connect_is_refused() {
        assert_eq!(scan(&[&[0x10, 0x00]], 1024).0, Err(FrameError::SecondConnect));
    }
}
