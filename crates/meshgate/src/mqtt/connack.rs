//! The broker's CONNACK: the one packet meshgate must understand to decide whether a broker served.

use super::{decode_length, kind, Length};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connack {
    pub session_present: bool,
    /// 3.x return code or MQTT 5 reason code.
    pub code: u8,
}

impl Connack {
    /// The broker could not serve and another broker should be tried: 3.x "server unavailable"
    /// (3), MQTT 5 "server unavailable" (0x88) or "server busy" (0x89). Every other refusal is
    /// the client's business (credentials, authorisation) and passes through.
    pub fn broker_failure(&self, version: u8) -> Option<&'static str> {
        match (version, self.code) {
            (3 | 4, 3) | (5, 0x88) => Some("server_unavailable"),
            (5, 0x89) => Some("server_busy"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnackError {
    #[error("broker sent {0} instead of CONNACK")]
    NotConnack(&'static str),
    #[error("malformed CONNACK")]
    Malformed,
}

/// `Ok(Some((connack, n)))` when the first `n` bytes of `buf` are a whole CONNACK.
pub fn parse(buf: &[u8]) -> Result<Option<(Connack, usize)>, ConnackError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first >> 4 != kind::CONNACK {
        return Err(ConnackError::NotConnack(kind::name(first >> 4)));
    }
    match decode_length(&buf[1..]) {
        Length::Partial => Ok(None),
        Length::Malformed => Err(ConnackError::Malformed),
        // A CONNACK body is 2 bytes (3.x) or 2 bytes plus properties (5); anything bigger
        // than a few KB is not a broker talking MQTT.
        Length::Done(len, _) if !(2..=65_536).contains(&len) => Err(ConnackError::Malformed),
        Length::Done(len, n) => {
            let total = 1 + n + len as usize;
            if buf.len() < total {
                return Ok(None);
            }
            let body = &buf[1 + n..];
            Ok(Some((Connack { session_present: body[0] & 1 == 1, code: body[1] }, total)))
        }
    }
}

/// Sets the session-present flag of the CONNACK at the start of `buf` (after meshgate put a
/// persistent session's subscriptions back).
pub fn set_session_present(buf: &mut [u8]) {
    if let Length::Done(_, n) = decode_length(buf.get(1..).unwrap_or(&[])) {
        if let Some(flags) = buf.get_mut(1 + n) {
            *flags |= 1;
        }
    }
}

/// Removes the Topic Alias Maximum property from the MQTT 5 CONNACK at the start of `buf`
/// (absent means 0), so the client never sends topic aliases: an alias is state of one
/// broker connection, and a session that moves to another broker (`proxy::switch`) could not
/// take it along. Broker-to-client aliases are unaffected. `false` when the CONNACK is not
/// one meshgate can read (it is then left as it is).
pub fn forbid_topic_aliases(buf: &mut Vec<u8>) -> bool {
    let Ok(Some((_, total))) = parse(buf) else { return false };
    let Length::Done(_, n) = decode_length(&buf[1..]) else { return false };
    let body = &buf[1 + n..total];
    let Some(props_at) = body.get(2..) else { return false };
    let Length::Done(plen, pn) = decode_length(props_at) else { return true };
    let Some(props) = props_at.get(pn..pn + plen as usize) else { return false };
    let mut kept = Vec::with_capacity(props.len());
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        // Fixed sizes by property type (MQTT 5.0, 2.2.2.2); strings and binary data carry
        // their length; a user property is two strings.
        let len = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x21 | 0x22 | 0x13 => 2,
            0x11 | 0x27 => 4,
            0x12 | 0x1f | 0x1a | 0x1c | 0x15 | 0x16 => {
                let Some(l) = props.get(i + 1..i + 3) else { return false };
                2 + u16::from_be_bytes([l[0], l[1]]) as usize
            }
            0x26 => {
                let Some(l) = props.get(i + 1..i + 3) else { return false };
                let first = 2 + u16::from_be_bytes([l[0], l[1]]) as usize;
                let Some(l2) = props.get(i + 1 + first..i + 3 + first) else { return false };
                first + 2 + u16::from_be_bytes([l2[0], l2[1]]) as usize
            }
            _ => return false,
        };
        let Some(p) = props.get(i..i + 1 + len) else { return false };
        if id != 0x22 {
            kept.extend_from_slice(p);
        }
        i += 1 + len;
    }
    if kept.len() == props.len() {
        return true;
    }
    let mut packet_body = body[..2].to_vec();
    super::encode_length(kept.len(), &mut packet_body);
    packet_body.extend_from_slice(&kept);
    let mut packet = vec![buf[0]];
    super::encode_length(packet_body.len(), &mut packet);
    packet.extend_from_slice(&packet_body);
    buf.splice(..total, packet);
    true
}

/// What meshgate sends a client when no broker could take it: exactly one CONNACK saying
/// "server unavailable" in the client's protocol version.
pub fn unavailable(version: u8) -> &'static [u8] {
    if version == 5 {
        &[0x20, 0x03, 0x00, 0x88, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x03]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v4_and_v5_connacks() {
        assert_eq!(parse(&[0x20, 0x02, 0x01, 0x00]), Ok(Some((Connack { session_present: true, code: 0 }, 4))));
        // v5 with a 3-byte property block (receive maximum = 10) and a trailing PUBLISH byte.
        let buf = [0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x0a, 0x30];
        assert_eq!(parse(&buf), Ok(Some((Connack { session_present: false, code: 0 }, 8))));
        assert_eq!(parse(&[0x20, 0x02, 0x00]), Ok(None));
        assert_eq!(parse(&[0x30]), Err(ConnackError::NotConnack("PUBLISH")));
    }

    #[test]
    fn topic_aliases_are_taken_out_of_a_v5_connack() {
        // Receive Maximum 10, Topic Alias Maximum 10, a user property ("a" = "b"), then a PUBLISH.
        let mut buf =
            vec![0x20, 0x10, 0x00, 0x00, 0x0d, 0x21, 0, 10, 0x22, 0, 10, 0x26, 0, 1, b'a', 0, 1, b'b', 0x30, 0];
        assert!(forbid_topic_aliases(&mut buf));
        assert_eq!(buf, vec![0x20, 0x0d, 0x00, 0x00, 0x0a, 0x21, 0, 10, 0x26, 0, 1, b'a', 0, 1, b'b', 0x30, 0]);
        assert_eq!(parse(&buf).unwrap().unwrap().1, 15);
        // Nothing to take out, or a 3.1.1 CONNACK: unchanged.
        let mut plain = vec![0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0, 10];
        assert!(forbid_topic_aliases(&mut plain));
        assert_eq!(plain, vec![0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0, 10]);
        let mut v4 = vec![0x20, 0x02, 0x00, 0x00];
        forbid_topic_aliases(&mut v4);
        assert_eq!(v4, vec![0x20, 0x02, 0x00, 0x00]);
    }

    #[test]
    fn only_unavailable_and_busy_are_broker_failures() {
        let c = |code| Connack { session_present: false, code };
        assert_eq!(c(3).broker_failure(4), Some("server_unavailable"));
        assert_eq!(c(5).broker_failure(4), None); // not authorized
        assert_eq!(c(4).broker_failure(3), None); // bad credentials
        assert_eq!(c(0x88).broker_failure(5), Some("server_unavailable"));
        assert_eq!(c(0x89).broker_failure(5), Some("server_busy"));
        assert_eq!(c(0x86).broker_failure(5), None);
        assert_eq!(parse(unavailable(4)).unwrap().unwrap().0.code, 3);
        assert_eq!(parse(unavailable(5)).unwrap().unwrap().0.code, 0x88);
    }
}
