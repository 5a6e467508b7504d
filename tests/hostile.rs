//! Hostile input and overload against the meshgate binary: a well-behaved client beside it loses nothing, memory stays bounded.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt::{self as raw, wait_until};
use common::Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");
/// meshgate's peak resident memory through all of the attacks below must stay under this.
const MEMORY_BOUND_KB: u64 = 64 * 1024;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Connects from a chosen loopback source address, so each attacker is its own "host".
async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    sock.connect(dst).await
}

async fn metric(http: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

async fn rejected(http: SocketAddr, reason: &str) -> f64 {
    metric(http, &format!("meshgate_rejected_connections_total{{reason=\"{reason}\"}}")).await
}

/// Reads until the peer closes; true when it did within `limit` (a proxy that keeps reading
/// garbage would not close).
async fn closed(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_a_well_behaved_one() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("m.toml");
    std::fs::write(
        &config,
        net.config_text(
            "[proxy]\nclient_connect_timeout = \"1s\"\nconnect_rate_per_source = 100\nmax_sessions_per_source = 2000\nmax_packet_size = 65536\n",
        ),
    )
    .unwrap();
    let child =
        Command::new(BIN).args(["run", "--config", config.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let _daemon = Daemon(child);
    let front = net.mqtt_addr();
    let http = net.http_addr();
    wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(front).is_ok()).await.expect("meshgate listens");
    let rss_start = status_kb(pid, "VmRSS:");
    let host = |last: u8| net.slot.ip(last);

    // The well-behaved client: a subscriber and a publisher from their own address, 600 QoS 1
    // messages over ~6 s while the attacks run.
    let (mut sub, ack) = raw::connect(front, 4, "good-sub", Duration::from_secs(2)).await.unwrap();
    assert_eq!(ack.code, 0);
    sub.write_all(&raw::subscribe_packet(1, "good/#", 1)).await.unwrap();
    raw::read_packet(&mut sub, Duration::from_secs(2)).await.unwrap();
    let receiver = tokio::spawn(async move {
        let mut got = std::collections::BTreeSet::new();
        while got.len() < 600 {
            match raw::read_packet(&mut sub, Duration::from_secs(10)).await {
                Ok((first, body)) if first >> 4 == 3 => {
                    let p = raw::parse_publish(first, &body).unwrap();
                    if let Some(id) = p.packet_id {
                        sub.write_all(&raw::puback_packet(id)).await.unwrap();
                    }
                    if p.topic == "good/data" {
                        got.insert(String::from_utf8(p.payload).unwrap());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("good subscriber cut off after {} messages: {e}", got.len()),
            }
        }
        got.len()
    });
    let publisher = tokio::spawn(async move {
        let (mut p, _) = raw::connect(front, 4, "good-pub", Duration::from_secs(2)).await.unwrap();
        for i in 0..600u16 {
            p.write_all(&raw::publish_packet("good/data", i.to_string().as_bytes(), 1, i + 1, false)).await.unwrap();
            let (first, _) = raw::read_packet(&mut p, Duration::from_secs(5)).await.expect("PUBACK");
            assert_eq!(first, 0x40);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    // Random bytes, from 50 connections.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..50 {
        let mut s = connect_from(host(101), front).await.unwrap();
        let junk: Vec<u8> = (0..1024)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut junk = junk;
        // Not a CONNECT's first byte, so it is refused as malformed at once.
        junk[0] = b'G';
        let _ = s.write_all(&junk).await;
        assert!(closed(&mut s, Duration::from_secs(2)).await, "random bytes: closed");
    }
    // A CONNECT announcing 256 MB: refused from its header.
    let mut s = connect_from(host(102), front).await.unwrap();
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x04]).await.unwrap();
    let t = Instant::now();
    assert!(closed(&mut s, Duration::from_secs(2)).await);
    assert!(t.elapsed() < Duration::from_millis(500), "refused at once, not after reading 256 MB");
    // 1,000 connections that never send anything, from ten addresses (100 each stays inside
    // the per-source CONNECT rate burst, so each one is left to time out).
    let mut silent = Vec::new();
    for i in 0..1000 {
        silent.push(connect_from(host(110 + (i % 10) as u8), front).await.unwrap());
    }
    // A legitimate client that sends its CONNECT and a PUBLISH one byte at a time.
    let slow = tokio::spawn(async move {
        let mut s = connect_from(IpAddr::from([127, 0, 0, 1]), front).await.unwrap();
        let mut bytes = raw::connect_packet(4, "slow", true, 30, None, None);
        for b in bytes.drain(..) {
            s.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (first, _) =
            raw::read_packet(&mut s, Duration::from_secs(3)).await.expect("CONNACK after a byte-by-byte CONNECT");
        assert_eq!(first, 0x20);
        for b in raw::publish_packet("good/slow", b"x", 0, 0, false) {
            s.write_all(&[b]).await.unwrap();
        }
        s
    });
    // 5,000 CONNECTs from one address, 100 at a time.
    let flood_from = host(104);
    let mut admitted = 0;
    for round in 0..50 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            set.spawn(async move {
                let mut s = connect_from(flood_from, front).await.ok()?;
                s.write_all(&raw::connect_packet(4, &format!("flood-{round}-{i}"), true, 30, None, None)).await.ok()?;
                let mut b = [0u8; 4];
                match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await {
                    Ok(Ok(_)) if b[0] == 0x20 => Some(()),
                    _ => None,
                }
            });
        }
        while let Some(r) = set.join_next().await {
            admitted += usize::from(r.unwrap().is_some());
        }
    }
    // A session that goes bad after its CONNECT is closed alone.
    let (mut bad, _) = raw::connect(front, 4, "turns-bad", Duration::from_secs(2)).await.unwrap();
    bad.write_all(&[0x00, 0x00]).await.unwrap();
    assert!(closed(&mut bad, Duration::from_secs(2)).await, "reserved packet type closes the session");

    let slow = slow.await.unwrap();
    publisher.await.unwrap();
    assert_eq!(receiver.await.unwrap(), 600, "the well-behaved client lost nothing");
    // Every silent connection was dropped once its CONNECT time ran out.
    for mut s in silent {
        assert!(closed(&mut s, Duration::from_secs(3)).await, "silent connection dropped");
    }
    drop(slow);

    let peak = status_kb(pid, "VmHWM:");
    eprintln!("meshgate RSS {rss_start} KB at start, peak {peak} KB; flood: {admitted} of 5000 CONNECTs admitted");
    assert!(peak < MEMORY_BOUND_KB, "peak RSS {peak} KB");
    assert_eq!(rejected(http, "connect_timeout").await, 1000.0);
    assert_eq!(rejected(http, "packet_too_large").await, 1.0);
    assert!(rejected(http, "malformed_connect").await >= 45.0, "random bytes refused as malformed CONNECTs");
    let limited = rejected(http, "connect_rate").await;
    assert_eq!(
        limited as usize + admitted,
        5000,
        "every flood CONNECT was either admitted or refused by the rate limit"
    );
    // 100 per second with a burst of 200, over the few seconds the flood took.
    assert!(admitted < 1500, "rate limit held: {admitted} admitted");
    assert!(metric(http, "meshgate_sessions_closed_total{reason=\"malformed\"}").await >= 1.0);
}
