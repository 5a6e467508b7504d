//! Arrival order across clients: a packet one client sends a moment before another client's
//! reaches the broker first through meshgate, as it does directly and through nginx's single
//! event loop. The request/response pattern: a responder's SUBSCRIBE written just before a
//! requester's PUBLISH to that topic must not be overtaken (the responder would miss the
//! request). Runs the real `meshgate run` binary, whose runtime the CLI builds.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::instance::Daemon;
use common::mqtt::blocking::{connected, read_packet};
use common::{mqtt, Net};

/// Request/response pairs per front end. Before the fix, 40 of 40 were overtaken through one
/// worker; at this count a scheduler that reorders wake-ups cannot pass by luck.
const PAIRS: usize = 40;
/// How long both sessions are idle before the two writes.
const QUIET: Duration = Duration::from_millis(5);

fn daemon(net: &Net, workers: u32) -> Daemon {
    Daemon::start(net, &format!("[proxy]\nworkers = {workers}\n"))
}

/// A PINGREQ answered: the broker has taken everything sent before it.
fn pinged(s: &mut TcpStream) {
    s.write_all(&mqtt::pingreq_packet()).unwrap();
    let (first, _) = read_packet(s).expect("PINGRESP");
    assert_eq!(first, 0xd0, "PINGRESP");
}

/// Runs the pairs against `addr`; returns how many responders missed their request.
fn overtaken(addr: SocketAddr, tag: &str) -> usize {
    let mut missed = 0;
    for i in 0..PAIRS {
        let mut responder = connected(addr, &format!("order-{tag}-resp-{i}"), Duration::from_secs(2));
        let mut requester = connected(addr, &format!("order-{tag}-req-{i}"), Duration::from_secs(2));
        let topic = format!("order/{tag}/{i}");
        // Both sessions established through to the broker, then idle for a moment: Mosquitto
        // itself takes a PUBLISH first when both clients were active within the last
        // milliseconds (measured directly: 30 of 40 right after a PINGRESP, 38 of 40 right
        // after the CONNACK, none after 5 ms of quiet; why was not looked into). The scenario is
        // two idle clients, so the quiet is part of it, not a wait for something.
        pinged(&mut responder);
        pinged(&mut requester);
        std::thread::sleep(QUIET);
        // Both sessions are idle, so the front end is parked when the two writes, a few
        // microseconds apart, arrive: they are woken in one batch.
        responder.write_all(&mqtt::subscribe_packet(1, &topic, 0)).unwrap();
        requester.write_all(&mqtt::publish_packet(&topic, b"request", 0, 0, false)).unwrap();
        let (first, _) = read_packet(&mut responder).expect("SUBACK");
        assert_eq!(first, 0x90, "SUBACK first");
        // Delivered within the read timeout, or never: a PUBLISH that reached the broker before
        // the SUBSCRIBE had no subscriber.
        match read_packet(&mut responder) {
            Ok((first, _)) => assert_eq!(first & 0xf0, 0x30, "the request is a PUBLISH"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => missed += 1,
            Err(e) => panic!("responder {i} via {addr}: {e}"),
        }
    }
    missed
}

#[test]
fn a_subscribe_written_first_is_not_overtaken_by_another_clients_publish() {
    let net = Net::start(1);
    // The control: directly, the broker's own event loop keeps the order.
    assert_eq!(overtaken(net.brokers[0].addr, "direct"), 0, "directly to Mosquitto");
    // One worker: one event loop, as nginx's. (With several, two sessions woken together can
    // run on two threads at once, as on two nginx workers: docs/benchmarks.md.)
    let d = daemon(&net, 1);
    let missed = overtaken(net.mqtt_addr(), "meshgate");
    assert_eq!(
        missed,
        0,
        "{missed} of {PAIRS} requests overtook their responder's SUBSCRIBE through meshgate; its log:\n{}",
        d.log()
    );
}
