//! meshgate's own shortage of file descriptors is its own: never held against a broker (no passive bar, no probe failure), and a session leaving a hung broker moves under its client's connection even when no descriptor is left to spare for a second broker connection. Runs the real `meshgate run` binary under a small open-file limit, in front of real Mosquitto.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::instance::Daemon;
use common::mqtt::blocking::{connected, read_packet};
use common::{mqtt, Net};

const SECOND: Duration = Duration::from_secs(1);

/// A clean-session 3.1.1 client, accepted (CONNACK 0).
fn client(addr: SocketAddr, id: &str) -> TcpStream {
    connected(addr, id, 5 * SECOND)
}

/// PINGREQ on `s`; true when its PINGRESP comes back on the same connection.
fn pings(s: &mut TcpStream) -> bool {
    if s.write_all(&mqtt::pingreq_packet()).is_err() {
        return false;
    }
    loop {
        match read_packet(s) {
            Ok((0xd0, _)) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

fn wait_for(limit: Duration, what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With every descriptor taken (idle connections that never send a CONNECT), a client's
/// connection to the broker and the broker's probes fail with EMFILE. Before the fix each
/// counted against the broker: with `max_fails = 1` one such CONNECT barred it for
/// `fail_timeout`, and two probes took it down ("no broker is available"). The probes run
/// once an hour while the table is filled for the client (so none takes the last descriptor
/// first), then, after a reload, every 100 ms with the table full.
#[test]
fn running_out_of_descriptors_is_not_held_against_the_broker() {
    const NOFILE: u64 = 64;
    let net = Net::start(1);
    let d = Daemon::start_limited(&net, "[health]\ninterval = \"1h\"\n", Some(NOFILE));
    let addr = net.mqtt_addr();
    // Descriptors numbered below the limit: what it allows. (A test binary may hand its child
    // an inherited descriptor numbered above it, cargo's jobserver pipe, which takes no slot.)
    let slots = || {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).unwrap();
        fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok()).filter(|&n| n < NOFILE).count() as u64
    };
    // Every descriptor but one (no probe runs meanwhile): the next client's accept takes it,
    // and its broker connection finds none.
    // The count settles first: the readiness check's HTTP connection closes just after it.
    let settled = Instant::now();
    let mut last = slots();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = slots();
        if now == last {
            break;
        }
        assert!(settled.elapsed() < 5 * SECOND, "meshgate's descriptors never settled:\n{}", d.log());
        last = now;
    }
    let mut idle = Vec::new();
    while slots() < NOFILE - 1 {
        let before = slots();
        idle.push(TcpStream::connect(addr).unwrap());
        wait_for(5 * SECOND, "an idle connection accepted", &d, || slots() > before);
    }
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(5 * SECOND)).unwrap();
    c.write_all(&mqtt::connect_packet(4, "short", true, 60, None, None)).unwrap();
    match read_packet(&mut c) {
        Ok((0x20, body)) => {
            assert_ne!(body.get(1), Some(&0), "served without a descriptor for the broker:\n{}", d.log())
        }
        Ok((first, _)) => panic!("{first:#04x} instead of a CONNACK"),
        Err(_) => {}
    }
    let shortages = || d.log().matches("could not open a connection").count();
    wait_for(5 * SECOND, "the client's EMFILE logged", &d, || shortages() >= 1);
    // Probes every 100 ms (the refused client's descriptor reads the file), then the table full
    // again: each probe finds no descriptor, is counted and logged once a second at most; a
    // second line means a second of failed probes, where fall = 2 would have taken it down.
    d.reload(&net, "[health]\ninterval = \"100ms\"\n");
    wait_for(5 * SECOND, "the reload applied", &d, || d.log().contains("configuration reloaded"));
    // Idle connections until one cannot be accepted (a probe may hold the last descriptor for
    // a moment, so the count alone does not tell): then every descriptor is taken.
    let refused_accepts = || d.log().matches("accept failed").count();
    let refused_before = refused_accepts();
    while refused_accepts() == refused_before {
        let before = slots();
        idle.push(TcpStream::connect(addr).unwrap());
        wait_for(5 * SECOND, "an idle connection accepted or refused", &d, || {
            slots() > before || refused_accepts() > refused_before
        });
    }
    wait_for(5 * SECOND, "a second of probes without a descriptor", &d, || shortages() >= 2);
    drop(idle);
    wait_for(5 * SECOND, "the idle connections closed", &d, || slots() < NOFILE / 2);
    let log = d.log();
    assert!(log.contains("LimitNOFILE"), "the error says what to raise:\n{log}");
    assert!(!log.contains("barred"), "a shortage of meshgate's own barred the broker:\n{log}");
    assert!(!log.contains("broker1 is down"), "a shortage of meshgate's own took the broker down:\n{log}");
    let local = "meshgate_upstream_failures_total{broker=\"broker1\",reason=\"local_error\"}";
    assert!(d.metric(local) >= 2.0, "the client's attempt and the probes counted as local errors:\n{log}");
    assert_eq!(d.metric("meshgate_upstream_failures_total{broker=\"broker1\",reason=\"connect_error\"}"), 0.0);
    assert_eq!(d.metric("meshgate_broker_available{broker=\"broker1\"}"), 1.0);
    // Served at once, descriptors back.
    let mut c = client(addr, "after");
    assert!(pings(&mut c));
}

/// Ten sessions on a broker that hangs, under an open-file limit that leaves no descriptor
/// for a second broker connection beside theirs (2 per session + 256 kept back > 200): each
/// leaves the hung broker under its client's connection all the same, its connection to the
/// hung one closed first (before the fix: closed, "no file descriptor to spare"). When the
/// broker is back, the failback, which does need both connections at once, leaves the
/// sessions where they are (`no_fds`) and they go on being served.
#[test]
fn a_hung_broker_is_left_under_the_clients_connections_without_a_descriptor_to_spare() {
    const CLIENTS: usize = 10;
    let mut net = Net::start(2);
    let extra = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\n[proxy]\nfailback_rate = 100\n";
    let d = Daemon::start_limited(&net, extra, Some(200));
    let mut clients: Vec<TcpStream> = (0..CLIENTS).map(|i| client(net.mqtt_addr(), &format!("tight-{i}"))).collect();
    common::blocking(|| net.broker("broker1").hang());
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(pings(c), "tight-{i}: answered on its own connection after the hang:\n{}", d.log());
    }
    let switched = "meshgate_session_switches_total{reason=\"broker_down\",result=\"ok\"}";
    wait_for(5 * SECOND, "every session switched", &d, || d.metric(switched) == CLIENTS as f64);
    assert_eq!(d.metric("meshgate_sessions_closed_total{reason=\"broker_down\"}"), 0.0, "none closed");
    common::blocking(|| net.broker("broker1").resume());
    let stayed = "meshgate_session_switches_total{reason=\"failback\",result=\"no_fds\"}";
    wait_for(10 * SECOND, "a failback tried", &d, || d.metric(stayed) >= 1.0);
    assert_eq!(d.metric("meshgate_session_switches_total{reason=\"failback\",result=\"ok\"}"), 0.0);
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(pings(c), "tight-{i}: still served where it is:\n{}", d.log());
    }
    assert!(d.log().contains("no file descriptor to spare"), "{}", d.log());
}
