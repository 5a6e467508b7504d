//! The client's CONNECT: checked for length first, then parsed for what routing and the API need.

use std::ops::Range;

use super::{decode_length, kind, Length, Reader};

/// What meshgate learns from a client's CONNECT. The packet itself is kept as bytes and
/// replayed unchanged to each broker tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub version: u8,
    pub client_id: String,
    pub username: Option<String>,
    /// Clean session (3.x) or clean start (5).
    pub clean: bool,
    pub keepalive: u16,
    /// MQTT 5 Session Expiry Interval, seconds; `None` when absent (= 0).
    pub session_expiry: Option<u32>,
    pub will: bool,
    /// MQTT 5 enhanced authentication (an Authentication Method property): a conversation
    /// with the broker that meshgate cannot replay to another one.
    pub enhanced_auth: bool,
    /// Where the fields meshgate may edit sit in the packet (see [`Connect::rewrite`]).
    spans: Spans,
}

/// Byte offsets into the packet the CONNECT was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spans {
    /// Where the body starts (after the fixed header).
    body: usize,
    /// The connect flags byte.
    flags: usize,
    /// MQTT 5: the properties, without their length field.
    properties: Option<Range<usize>>,
    /// From the end of the client id to the end of the will (will properties, topic, payload).
    will: Option<Range<usize>>,
}

/// How meshgate's own connections differ from the client's CONNECT they are made from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Set or clear clean session / clean start.
    pub clean: Option<bool>,
    /// Leave the will out: meshgate's connections must never make a broker publish the will of
    /// a client that is alive.
    pub drop_will: bool,
    /// MQTT 5: the Session Expiry Interval to send instead of the client's.
    pub expiry: Option<u32>,
}

impl Connect {
    pub fn protocol_name(&self) -> &'static str {
        super::protocol_name(self.version)
    }

    /// The client's CONNECT (`packet`, the bytes this was parsed from) with `edit` applied;
    /// everything else (credentials, keepalive, other properties) stays as the client sent it.
    pub fn rewrite(&self, packet: &[u8], edit: Rewrite) -> Vec<u8> {
        let sp = &self.spans;
        let mut body = Vec::with_capacity(packet.len());
        let mut flags = packet[sp.flags];
        if let Some(clean) = edit.clean {
            flags = if clean { flags | 0x02 } else { flags & !0x02 };
        }
        let drop_will = edit.drop_will && sp.will.is_some();
        if drop_will {
            flags &= !(0x04 | 0x18 | 0x20);
        }
        match (&sp.properties, edit.expiry) {
            (Some(props), Some(secs)) => {
                // Up to the properties' length field; then the properties without any expiry,
                // plus the new one.
                let len_at = sp.flags + 3;
                body.extend_from_slice(&packet[sp.body..len_at]);
                let mut kept = Vec::with_capacity(props.len() + 5);
                let _ = walk_properties(&packet[props.clone()], |id, raw| {
                    if id != 0x11 {
                        kept.extend_from_slice(raw);
                    }
                });
                kept.push(0x11);
                kept.extend_from_slice(&secs.to_be_bytes());
                super::encode_length(kept.len(), &mut body);
                body.extend_from_slice(&kept);
                body.extend_from_slice(&packet[props.end..]);
            }
            _ => body.extend_from_slice(&packet[sp.body..]),
        }
        // Offsets in `body` for the flags and the will, shifted by a changed property length.
        let shift = body.len() as isize - (packet.len() - sp.body) as isize;
        body[sp.flags - sp.body] = flags;
        if drop_will {
            let will = sp.will.clone().expect("checked above");
            let at = |i: usize| (i - sp.body) as isize + shift;
            body.drain(at(will.start) as usize..at(will.end) as usize);
        }
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(0x10);
        super::encode_length(body.len(), &mut out);
        out.extend_from_slice(&body);
        out
    }

    /// The broker keeps this client's session after it disconnects.
    pub fn persistent(&self) -> bool {
        match self.version {
            5 => self.session_expiry.unwrap_or(0) > 0,
            _ => !self.clean,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is {0}, not CONNECT")]
    NotConnect(&'static str),
    #[error("CONNECT fixed-header flags must be 0, got {0:#x}")]
    BadHeaderFlags(u8),
    #[error("malformed remaining length")]
    BadLength,
    #[error("CONNECT of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u32, max: u32 },
    #[error("unknown protocol name {0:?}")]
    BadProtocolName(String),
    #[error("unsupported protocol level {0} (meshgate speaks MQTT 3.1, 3.1.1 and 5)")]
    BadLevel(u8),
    #[error("reserved connect flag is set")]
    ReservedFlag,
    #[error("CONNECT truncated in {0}")]
    Truncated(&'static str),
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("{0} trailing bytes after the CONNECT payload")]
    Trailing(usize),
}

/// Looks at the start of `buf` without parsing the body: `Ok(Some(n))` when a whole packet of
/// `n` bytes is there, `Ok(None)` when more bytes are needed. Oversized or non-CONNECT input is
/// refused here, before its body is read.
pub fn check(buf: &[u8], max: u32) -> Result<Option<usize>, ConnectError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first >> 4 != kind::CONNECT {
        return Err(ConnectError::NotConnect(kind::name(first >> 4)));
    }
    if first & 0x0f != 0 {
        return Err(ConnectError::BadHeaderFlags(first & 0x0f));
    }
    match decode_length(&buf[1..]) {
        Length::Partial => Ok(None),
        Length::Malformed => Err(ConnectError::BadLength),
        Length::Done(len, n) => {
            let total = 1 + n + len as usize;
            if total > max as usize {
                return Err(ConnectError::TooLarge { len: total as u32, max });
            }
            Ok((buf.len() >= total).then_some(total))
        }
    }
}

/// Parses one whole CONNECT packet (fixed header included), as delimited by [`check`].
pub fn parse(packet: &[u8]) -> Result<Connect, ConnectError> {
    use ConnectError::Truncated;
    let (len, n) = match decode_length(packet.get(1..).unwrap_or_default()) {
        Length::Done(len, n) => (len as usize, n),
        _ => return Err(ConnectError::BadLength),
    };
    let body = packet.get(1 + n..1 + n + len).ok_or(Truncated("fixed header"))?;
    let mut r = Reader::new(body);

    let name = r.binary().ok_or(Truncated("protocol name"))?;
    let version = r.u8().ok_or(Truncated("protocol level"))?;
    match (name, version) {
        (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
        (b"MQTT", v) | (b"MQIsdp", v) => return Err(ConnectError::BadLevel(v)),
        (other, _) => return Err(ConnectError::BadProtocolName(String::from_utf8_lossy(other).into_owned())),
    }
    let flags = r.u8().ok_or(Truncated("connect flags"))?;
    if flags & 0x01 != 0 {
        return Err(ConnectError::ReservedFlag);
    }
    let keepalive = r.u16().ok_or(Truncated("keep alive"))?;

    let body_at = 1 + n;
    let mut session_expiry = None;
    let mut enhanced_auth = false;
    let mut properties = None;
    if version == 5 {
        let props_len = r.varint().ok_or(Truncated("properties length"))? as usize;
        let start = body_at + r.position();
        let props = r.take(props_len).ok_or(Truncated("properties"))?;
        properties = Some(start..start + props_len);
        session_expiry = session_expiry_of(props)?;
        walk_properties(props, |id, _| enhanced_auth |= id == 0x15)?;
    }

    let client_id = utf8(r.binary().ok_or(Truncated("client id"))?, "client id")?;
    let will = flags & 0x04 != 0;
    let will_start = body_at + r.position();
    if will {
        if version == 5 {
            let n = r.varint().ok_or(Truncated("will properties length"))? as usize;
            r.take(n).ok_or(Truncated("will properties"))?;
        }
        r.binary().ok_or(Truncated("will topic"))?;
        r.binary().ok_or(Truncated("will payload"))?;
    }
    let will_span = will.then(|| will_start..body_at + r.position());
    let username =
        if flags & 0x80 != 0 { Some(utf8(r.binary().ok_or(Truncated("username"))?, "username")?) } else { None };
    if flags & 0x40 != 0 {
        r.binary().ok_or(Truncated("password"))?;
    }
    if r.remaining() > 0 {
        return Err(ConnectError::Trailing(r.remaining()));
    }
    // The flags byte follows the protocol name (2 + its length) and the level.
    let flags_at = body_at + 2 + name.len() + 1;
    Ok(Connect {
        version,
        client_id,
        username,
        clean: flags & 0x02 != 0,
        keepalive,
        session_expiry,
        will,
        enhanced_auth,
        spans: Spans { body: body_at, flags: flags_at, properties, will: will_span },
    })
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, ConnectError> {
    std::str::from_utf8(b).map(str::to_owned).map_err(|_| ConnectError::Utf8(what))
}

/// MQTT 5 CONNECT's Session Expiry Interval (0x11), if the properties carry one.
fn session_expiry_of(props: &[u8]) -> Result<Option<u32>, ConnectError> {
    let mut expiry = None;
    walk_properties(props, |id, raw| {
        if id == 0x11 {
            expiry = Some(u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]));
        }
    })?;
    Ok(expiry)
}

/// Walks MQTT 5 CONNECT properties, giving each one's id and raw bytes (id included), skipping
/// by their declared types so that an unknown property cannot desynchronise the walk.
fn walk_properties(props: &[u8], mut each: impl FnMut(u32, &[u8])) -> Result<(), ConnectError> {
    use ConnectError::Truncated;
    let mut r = Reader::new(props);
    while r.remaining() > 0 {
        let start = r.position();
        let id = r.varint().ok_or(Truncated("property id"))?;
        match id {
            0x11 | 0x27 => {
                r.take(4).ok_or(Truncated("four-byte property"))?;
            }
            0x21 | 0x22 => {
                r.take(2).ok_or(Truncated("two-byte property"))?;
            }
            0x17 | 0x19 => {
                r.take(1).ok_or(Truncated("byte property"))?;
            }
            0x15 | 0x16 => {
                r.binary().ok_or(Truncated("authentication property"))?;
            }
            0x26 => {
                r.binary().ok_or(Truncated("user property"))?;
                r.binary().ok_or(Truncated("user property"))?;
            }
            _ => return Err(Truncated("properties (unknown CONNECT property)")),
        }
        each(id, &props[start..r.position()]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::encode;

    #[test]
    fn parses_a_3_1_1_connect() {
        let p = encode::connect(4, "dev-1", false, 30, Some("alice"), Some("pw"));
        assert_eq!(check(&p, 1024), Ok(Some(p.len())));
        let c = parse(&p).unwrap();
        assert_eq!(c.version, 4);
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert!(!c.clean);
        assert!(c.persistent());
        assert_eq!(c.keepalive, 30);
    }

    #[test]
    fn parses_byte_literal_3_1_connect() {
        // MQTT 3.1: "MQIsdp", level 3, clean session, keepalive 60, client id "a".
        let p = [0x10, 0x0f, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a'];
        let c = parse(&p).unwrap();
        assert_eq!((c.version, c.clean, c.keepalive, c.client_id.as_str()), (3, true, 60, "a"));
    }

    #[test]
    fn parses_v5_with_session_expiry_and_will() {
        // MQTT 5 CONNECT, clean start, will flag, properties: session expiry 3600.
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x06, 0x00, 0x0a];
        body.extend([0x05, 0x11, 0x00, 0x00, 0x0e, 0x10]);
        body.extend([0x00, 0x02, b'c', b'1']);
        body.extend([0x00, 0x00, 0x01, b't', 0x00, 0x01, b'x']); // will props, topic, payload
        let mut p = vec![0x10];
        crate::mqtt::encode_length(body.len(), &mut p);
        p.extend(body);
        let c = parse(&p).unwrap();
        assert_eq!(c.version, 5);
        assert_eq!(c.session_expiry, Some(3600));
        assert!(c.will && c.clean && c.persistent());
    }

    #[test]
    fn check_refuses_before_reading_the_body() {
        assert_eq!(check(&[0x30, 0x00], 1024), Err(ConnectError::NotConnect("PUBLISH")));
        assert_eq!(check(&[0x12, 0x00], 1024), Err(ConnectError::BadHeaderFlags(2)));
        assert!(matches!(check(&[0x10, 0xff, 0xff, 0xff, 0x7f], 65536), Err(ConnectError::TooLarge { .. })));
        assert_eq!(check(&[0x10, 0xff, 0xff], 65536), Ok(None));
        assert_eq!(check(&[], 65536), Ok(None));
    }

    #[test]
    fn rejects_bad_protocol_and_truncation() {
        let mut p = encode::connect(4, "x", true, 0, None, None);
        p[4] = b'X';
        assert!(matches!(parse(&p), Err(ConnectError::BadProtocolName(_))));
        let mut p = encode::connect(4, "x", true, 0, None, None);
        p[8] = 9;
        assert_eq!(parse(&p), Err(ConnectError::BadLevel(9)));
        // Username flag set but no username bytes.
        let mut p = encode::connect(4, "x", true, 0, None, None);
        p[9] |= 0x80;
        assert_eq!(parse(&p), Err(ConnectError::Truncated("username")));
    }

    #[test]
    fn never_panics_on_any_prefix_or_bit_flip() {
        let p = encode::connect(5, "client", false, 10, Some("u"), Some("p"));
        for n in 0..=p.len() {
            let _ = check(&p[..n], 1024);
            let _ = parse(&p[..n]);
        }
        for i in 0..p.len() {
            for bit in 0..8 {
                let mut q = p.clone();
                q[i] ^= 1 << bit;
                let _ = parse(&q);
            }
        }
    }
}
