//! Packets meshgate writes itself: the probes' CONNECT, SUBSCRIBE, PUBLISH and DISCONNECT.

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

/// CONNECT for level 3 (3.1), 4 (3.1.1) or 5 (with no properties).
pub fn connect(
    version: u8,
    client_id: &str,
    clean: bool,
    keepalive: u16,
    user: Option<&str>,
    pass: Option<&str>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + client_id.len());
    string(&mut b, if version == 3 { b"MQIsdp" } else { b"MQTT" });
    b.push(version);
    let mut flags = if clean { 0x02 } else { 0 };
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    b.push(flags);
    b.extend_from_slice(&keepalive.to_be_bytes());
    if version == 5 {
        b.push(0);
    }
    string(&mut b, client_id.as_bytes());
    if let Some(u) = user {
        string(&mut b, u.as_bytes());
    }
    if let Some(p) = pass {
        string(&mut b, p.as_bytes());
    }
    packet(0x10, &b)
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
    let mut b = Vec::with_capacity(4 + topic.len() + payload.len());
    string(&mut b, topic.as_bytes());
    if version == 5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    packet(0x30, &b)
}

pub fn disconnect() -> [u8; 2] {
    [0xe0, 0x00]
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
