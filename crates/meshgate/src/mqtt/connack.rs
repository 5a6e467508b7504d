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
