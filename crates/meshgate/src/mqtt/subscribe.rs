//! SUBSCRIBE, UNSUBSCRIBE and their acknowledgements: read from a persistent session's stream, and written to restore one.

use super::{encode_length, Reader};

/// A client's SUBSCRIBE: its packet id, MQTT 5 properties (raw, without their length) and
/// each topic filter with its options byte (QoS in bits 0-1; 5 adds No Local, Retain As
/// Published and Retain Handling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Vec<u8>,
    pub filters: Vec<(String, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<String>,
}

/// SUBACK or UNSUBACK: the packet id and one code per filter (3.x UNSUBACK has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: u16,
    pub codes: Vec<u8>,
}

fn properties<'a>(r: &mut Reader<'a>, version: u8) -> Option<&'a [u8]> {
    if version < 5 {
        return Some(&[]);
    }
    let n = r.varint()? as usize;
    r.take(n)
}

fn utf8(b: &[u8]) -> Option<String> {
    String::from_utf8(b.to_vec()).ok()
}

/// `None` when the body is not a well-formed SUBSCRIBE (the broker will refuse it too).
pub fn parse_subscribe(version: u8, body: &[u8]) -> Option<Subscribe> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    let properties = properties(&mut r, version)?.to_vec();
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let f = utf8(r.binary()?)?;
        filters.push((f, r.u8()?));
    }
    (!filters.is_empty()).then_some(Subscribe { packet_id, properties, filters })
}

pub fn parse_unsubscribe(version: u8, body: &[u8]) -> Option<Unsubscribe> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    properties(&mut r, version)?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        filters.push(utf8(r.binary()?)?);
    }
    (!filters.is_empty()).then_some(Unsubscribe { packet_id, filters })
}

/// SUBACK (any version) or UNSUBACK (5: with reason codes; 3.x: the packet id only).
pub fn parse_ack(version: u8, body: &[u8]) -> Option<Ack> {
    let mut r = Reader::new(body);
    let packet_id = r.u16()?;
    if version >= 5 && r.remaining() > 0 {
        properties(&mut r, version)?;
    }
    let codes = r.take(r.remaining())?.to_vec();
    Some(Ack { packet_id, codes })
}

/// One SUBSCRIBE carrying every filter given, with MQTT 5 `properties` (raw).
pub fn encode_subscribe(version: u8, packet_id: u16, properties: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + filters.iter().map(|(f, _)| f.len() + 3).sum::<usize>());
    b.extend_from_slice(&packet_id.to_be_bytes());
    if version >= 5 {
        encode_length(properties.len(), &mut b);
        b.extend_from_slice(properties);
    }
    for (f, opts) in filters {
        b.extend_from_slice(&(f.len() as u16).to_be_bytes());
        b.extend_from_slice(f.as_bytes());
        b.push(*opts);
    }
    let mut out = Vec::with_capacity(b.len() + 5);
    out.push(0x82);
    encode_length(b.len(), &mut out);
    out.extend_from_slice(&b);
    out
}

/// The Session Expiry Interval an MQTT 5 client's DISCONNECT sets, if any (0 ends the
/// session with the connection). `None` also for a body that does not parse.
pub fn disconnect_expiry(body: &[u8]) -> Option<u32> {
    let mut r = Reader::new(body);
    r.u8()?; // reason code
    let n = r.varint()? as usize;
    let mut p = Reader::new(r.take(n)?);
    while p.remaining() > 0 {
        match p.varint()? {
            0x11 => {
                let v = p.take(4)?;
                return Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            }
            // Reason String, Server Reference.
            0x1f | 0x1c => {
                p.binary()?;
            }
            0x26 => {
                p.binary()?;
                p.binary()?;
            }
            _ => return None,
        }
    }
    None
}

/// A SUBACK code that means the subscription was granted.
pub fn granted(code: u8) -> bool {
    code < 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_round_trips_in_both_versions() {
        for (v, props) in [(4u8, vec![]), (5, vec![0x0b, 0x07])] {
            let pkt = encode_subscribe(v, 9, &props, &[("a/+", 1), ("b/#", 0x22)]);
            let body = &pkt[2..];
            let s = parse_subscribe(v, body).unwrap();
            assert_eq!(s.packet_id, 9);
            assert_eq!(s.properties, props);
            assert_eq!(s.filters, vec![("a/+".to_string(), 1), ("b/#".to_string(), 0x22)]);
        }
        // 3.1.1 byte literal: id 1, "t" QoS 1.
        assert_eq!(encode_subscribe(4, 1, &[], &[("t", 1)]), vec![0x82, 0x06, 0, 1, 0, 1, b't', 1]);
    }

    #[test]
    fn unsubscribe_and_acks() {
        assert_eq!(
            parse_unsubscribe(4, &[0, 3, 0, 1, b'x', 0, 1, b'y']),
            Some(Unsubscribe { packet_id: 3, filters: vec!["x".into(), "y".into()] })
        );
        assert_eq!(
            parse_unsubscribe(5, &[0, 3, 0, 0, 1, b'x']),
            Some(Unsubscribe { packet_id: 3, filters: vec!["x".into()] })
        );
        assert_eq!(parse_ack(4, &[0, 9, 1, 0x80]), Some(Ack { packet_id: 9, codes: vec![1, 0x80] }));
        assert_eq!(parse_ack(5, &[0, 9, 2, 0x1f, 0, 0x00, 0x87]), Some(Ack { packet_id: 9, codes: vec![0, 0x87] }));
        assert_eq!(parse_ack(4, &[0, 9]), Some(Ack { packet_id: 9, codes: vec![] }));
        assert!(parse_subscribe(4, &[0, 1, 0, 5, b'a']).is_none(), "truncated filter");
        assert!(parse_subscribe(4, &[0, 1]).is_none(), "no filter");
    }

    #[test]
    fn disconnect_expiry_is_found_among_other_properties() {
        // Reason 0, properties: reason string "x", session expiry 0.
        assert_eq!(disconnect_expiry(&[0, 9, 0x1f, 0, 1, b'x', 0x11, 0, 0, 0, 0]), Some(0));
        assert_eq!(disconnect_expiry(&[0, 5, 0x11, 0, 0, 0x0e, 0x10]), Some(3600));
        assert_eq!(disconnect_expiry(&[0, 0]), None);
        assert_eq!(disconnect_expiry(&[]), None);
    }
}
