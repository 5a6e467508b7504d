//! Packets meshgate writes itself: CONNECT, SUBSCRIBE, PUBLISH, acknowledgements and DISCONNECT.

use super::encode_length;

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    encode_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// What a CONNECT that meshgate builds itself says.
#[derive(Debug, Clone, Default)]
pub struct ConnectFields<'a> {
    /// 3 (3.1), 4 (3.1.1) or 5.
    pub version: u8,
    pub client_id: &'a str,
    pub clean: bool,
    pub keepalive: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// MQTT 5 Session Expiry Interval; no property when `None`.
    pub expiry: Option<u32>,
}

/// The one CONNECT builder: probes, lag probes, persistent-session work and the tooling's
/// clients. (Client CONNECTs are never rebuilt: see `Connect::rewrite`.)
pub fn connect_with(f: &ConnectFields<'_>) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + f.client_id.len());
    string(&mut b, if f.version == 3 { b"MQIsdp" } else { b"MQTT" });
    b.push(f.version);
    let mut flags = if f.clean { 0x02 } else { 0 };
    if f.username.is_some() {
        flags |= 0x80;
    }
    if f.password.is_some() {
        flags |= 0x40;
    }
    b.push(flags);
    b.extend_from_slice(&f.keepalive.to_be_bytes());
    if f.version == 5 {
        match f.expiry {
            Some(secs) => {
                b.extend_from_slice(&[5, 0x11]);
                b.extend_from_slice(&secs.to_be_bytes());
            }
            None => b.push(0),
        }
    }
    string(&mut b, f.client_id.as_bytes());
    if let Some(u) = f.username {
        string(&mut b, u.as_bytes());
    }
    if let Some(p) = f.password {
        string(&mut b, p.as_bytes());
    }
    packet(0x10, &b)
}

/// CONNECT for level 3 (3.1), 4 (3.1.1) or 5 (with no properties).
pub fn connect(
    version: u8,
    client_id: &str,
    clean: bool,
    keepalive: u16,
    username: Option<&str>,
    password: Option<&str>,
) -> Vec<u8> {
    connect_with(&ConnectFields { version, client_id, clean, keepalive, username, password, expiry: None })
}

pub fn subscribe(version: u8, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + filter.len());
    b.extend_from_slice(&packet_id.to_be_bytes());
    if version == 5 {
        b.push(0);
    }
    string(&mut b, filter.as_bytes());
    b.push(qos);
    packet(0x82, &b)
}

/// QoS 0 PUBLISH.
pub fn publish(version: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    publish_with(version, topic, payload, 0, false, 0)
}

/// PUBLISH at any QoS (`packet_id` is used from QoS 1 on), with no properties in 5.
pub fn publish_with(version: u8, topic: &str, payload: &[u8], qos: u8, retain: bool, packet_id: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + topic.len() + payload.len());
    string(&mut b, topic.as_bytes());
    if qos > 0 {
        b.extend_from_slice(&packet_id.to_be_bytes());
    }
    if version == 5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &b)
}

pub fn pingreq() -> [u8; 2] {
    [0xc0, 0x00]
}

pub fn pingresp() -> [u8; 2] {
    [0xd0, 0x00]
}

pub fn disconnect() -> [u8; 2] {
    [0xe0, 0x00]
}

/// PUBACK (QoS 1), PUBREC (QoS 2) or PUBCOMP for `packet_id`, without a reason code: success in
/// every version.
pub fn ack(kind: u8, packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [kind << 4, 2, id[0], id[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_literals() {
        assert_eq!(
            connect(4, "p", true, 5, None, None),
            vec![0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5, 0, 1, b'p']
        );
        assert_eq!(subscribe(4, 1, "t", 0), vec![0x82, 0x06, 0, 1, 0, 1, b't', 0]);
        assert_eq!(publish(4, "t", b"x"), vec![0x30, 0x04, 0, 1, b't', b'x']);
        assert_eq!(publish(5, "t", b"x"), vec![0x30, 0x05, 0, 1, b't', 0, b'x']);
    }
}
