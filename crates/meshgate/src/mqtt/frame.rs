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

/// A packet body being assembled by `FrameScanner::feed_capture`.
#[derive(Debug)]
pub struct Capture {
    current: Option<Header>,
    buf: Vec<u8>,
    overflow: bool,
    limit: usize,
}

impl Capture {
    /// Bodies longer than `limit` are reported as `None` instead of being kept.
    pub fn new(limit: usize) -> Capture {
        Capture { current: None, buf: Vec::new(), overflow: false, limit }
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

    /// Like `feed`, and also hands `on_captured` the whole body of every packet whose type
    /// `want` accepts, assembled in `cap` across reads. Used only for the few packet types
    /// meshgate must read (a persistent session's SUBSCRIBE and SUBACK), so ordinary traffic
    /// is still only counted.
    pub fn feed_capture(
        &mut self,
        data: &[u8],
        want: impl Fn(u8) -> bool,
        cap: &mut Capture,
        mut on_packet: impl FnMut(Header),
        mut on_captured: impl FnMut(Header, Option<&[u8]>),
    ) -> Result<(), FrameError> {
        self.scan(data, |e| match e {
            Scanned::Header(h) => {
                on_packet(h);
                cap.current = want(h.kind()).then_some(h);
                cap.buf.clear();
                cap.overflow = false;
            }
            Scanned::Body(chunk, last) => {
                let Some(h) = cap.current else { return };
                if cap.buf.len() + chunk.len() > cap.limit {
                    cap.overflow = true;
                } else if !cap.overflow {
                    cap.buf.extend_from_slice(chunk);
                }
                if last {
                    on_captured(h, (!cap.overflow).then_some(&cap.buf[..]));
                    cap.current = None;
                    cap.buf = Vec::new();
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
            let mut cap = Capture::new(64);
            let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
            let mut headers = 0;
            for chunk in bytes.chunks(split) {
                s.feed_capture(
                    chunk,
                    |k| k == 8 || k == 11 || k == 12,
                    &mut cap,
                    |_| headers += 1,
                    |h, b| got.push((h.kind(), b.unwrap().to_vec())),
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
    fn capture_over_limit_is_reported_as_none() {
        let mut s = FrameScanner::new(1024);
        let mut cap = Capture::new(4);
        let mut got = Vec::new();
        let bytes = [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0xc0, 0x00];
        s.feed_capture(&bytes, |k| k == 8 || k == 12, &mut cap, |_| {}, |h, b| got.push((h.kind(), b.is_some())))
            .unwrap();
        assert_eq!(got, vec![(8, false), (12, true)]);
    }

    #[test]
    fn second_connect_is_refused() {
        assert_eq!(scan(&[&[0x10, 0x00]], 1024).0, Err(FrameError::SecondConnect));
    }
}
