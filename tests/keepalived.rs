//! A floating address in front of two `meshgate run` instances, moved by real keepalived with the configs `cluster render --target keepalived` writes: the holder's meshgate is killed, the address moves to the other instance and clients are served through it again, within the time the configs promise.
//!
//! Each run builds its own network from namespaces: "sw" holds a Linux bridge; "a" and "b" are
//! the two meshgate hosts (one meshgate and one keepalived each); "svc" holds etcd and two
//! Mosquitto brokers; "cl" the clients. Every namespace but "sw" joins the bridge with a veth.
//! Addresses are 100.64.N.0/24 (RFC 6598 shared space) and exist only inside these namespaces:
//! the root namespace gets no interface, address or route, so nothing leaves the machine.
//! Dropping the `Lab` kills every process and deletes the namespaces, on a panic too; namespaces
//! left by a killed run are removed by the next one.
//!
//! Work inside a namespace (starting etcd and the brokers with the common harness, a client's
//! CONNECT, an HTTP GET) runs on a short-lived thread that has joined the namespace: a network
//! namespace belongs to a thread, and the processes it starts inherit it. meshgate and keepalived
//! start through `ip netns exec`, which also gives keepalived the namespace's own /sys.
//!
//! Needs root (CI runs it as root), iproute2, keepalived, curl, etcd and mosquitto
//! (`scripts/deps test`); skips with one line where namespaces cannot be created.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::netns::{die_with_parent, in_ns, ip, remove_stale_namespaces, run, tear_down};
use common::{mqtt, Mosquitto};
use meshgate_tools::cluster::keepalived as ka;

/// Namespaces are named `mgk-<pid>-<role>`, so a later run can tell which belong to a process
/// that no longer exists.
const PREFIX: &str = "mgk";
const MESHGATE: &str = env!("CARGO_BIN_EXE_meshgate");
const KEEPALIVED: &str = "/usr/sbin/keepalived";
const SECOND: Duration = Duration::from_secs(1);
/// A client's TCP connect to the virtual address gives up after this and tries again: while the
/// address moves, a SYN can go to the old holder's MAC and vanish.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Time between two client attempts (a refused connect returns at once).
const ATTEMPT_PACE: Duration = Duration::from_millis(20);
/// Allowance in the bounds for starting curl and for waking keepalived, meshgate and the
/// client on two cores shared with other builds (measured runs used none of it: docs/ha.md).
const SCHEDULING: Duration = Duration::from_millis(250);

// ---- commands and namespaces -------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    A,
    B,
    Svc,
    Client,
}

impl Host {
    fn role(self) -> &'static str {
        match self {
            Host::A => "a",
            Host::B => "b",
            Host::Svc => "svc",
            Host::Client => "cl",
        }
    }
    fn last_octet(self) -> u8 {
        match self {
            Host::A => 2,
            Host::B => 3,
            Host::Client => 4,
            Host::Svc => 10,
        }
    }
}

const HOSTS: [Host; 4] = [Host::A, Host::B, Host::Svc, Host::Client];
/// The second broker's address, a second address of "svc".
const BROKER2_OCTET: u8 = 11;
const VIP_OCTET: u8 = 100;

struct Lab {
    tag: String,
    net: u8,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        tear_down("keepalived lab", &mut self.procs, &self.namespaces, self.dir.path(), 25);
    }
}

impl Lab {
    /// The network, or `None` (after one line on stderr) where namespaces cannot be created.
    fn build() -> Option<Lab> {
        for (tool, why) in [
            (KEEPALIVED, "keepalived is not installed (scripts/deps test installs it)"),
            (ka::CURL, "curl is not installed: the rendered track script runs it"),
            ("/usr/sbin/mosquitto", "mosquitto is not installed (scripts/deps installs it)"),
        ] {
            assert!(Path::new(tool).exists(), "keepalived test cannot run: {why}");
        }
        remove_stale_namespaces(PREFIX);
        let pid = std::process::id();
        let tag = format!("{PREFIX}-{pid}");
        let net = (pid % 250 + 1) as u8;
        let mut lab = Lab { tag, net, namespaces: Vec::new(), procs: Vec::new(), dir: tempfile::tempdir().unwrap() };
        let sw = lab.ns_name("sw");
        if let Err(e) = run("ip", &["netns", "add", &sw]) {
            eprintln!("SKIPPED keepalived test: cannot create a network namespace (needs root, as in CI): {e}");
            return None;
        }
        lab.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for host in HOSTS {
            let ns = lab.ns(host);
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let _ = run("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            let port = format!("p-{}", host.role());
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", lab.addr(host)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &lab.ns(Host::Svc), "addr", "add", &format!("{}/24", lab.ip(BROKER2_OCTET)), "dev", "eth0"]);
        let root = ip(&["-4", "route", "show"]);
        assert!(!root.contains(&format!("100.64.{}.", net)), "the root namespace routes into the lab's block: {root}");
        Some(lab)
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }
    fn ns(&self, host: Host) -> String {
        self.ns_name(host.role())
    }
    fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, self.net, last)
    }
    fn addr(&self, host: Host) -> Ipv4Addr {
        self.ip(host.last_octet())
    }
    fn vip(&self) -> Ipv4Addr {
        self.ip(VIP_OCTET)
    }
    fn http(&self, host: Host) -> SocketAddr {
        SocketAddr::new(self.addr(host).into(), 8080)
    }

    fn spawn(&mut self, host: Host, name: &str, program: &str, args: &[&str]) -> u32 {
        let file = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host), program]).args(args);
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id();
        self.procs.push((name.to_string(), child));
        pid
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn kill(&mut self, name: &str) {
        let (_, child) = self.procs.iter_mut().find(|(n, _)| n == name).expect("started");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether `host` has the virtual address on its eth0 (the kernel's view, through netlink).
    fn holds_vip(&self, host: Host) -> bool {
        let out = ip(&["-n", &self.ns(host), "-4", "-o", "addr", "show", "dev", "eth0"]);
        out.contains(&format!(" {}/", self.vip()))
    }

    /// meshgate on `host`: every address's port 1883 (the virtual one comes and goes), its own
    /// HTTP address, sharing state with the other instance through etcd.
    fn start_meshgate(&mut self, host: Host, etcd: &str, brokers: &[&Mosquitto]) {
        let mut text = format!(
            "[listen]\nmqtt = \"0.0.0.0:1883\"\nhttp = \"{}\"\n[access_log]\nenabled = false\n\
             [replication]\nenabled = true\n\
             [coordination]\netcd = [\"{etcd}\"]\ninstance = \"gw-{}\"\nlease_ttl = \"3s\"\n",
            self.http(host),
            host.role()
        );
        for b in brokers {
            text.push_str(&format!("[[broker]]\nname = \"{}\"\naddress = \"{}\"\n", b.name, b.addr));
        }
        let conf = self.dir.path().join(format!("meshgate-{}.toml", host.role()));
        std::fs::write(&conf, text).unwrap();
        let name = format!("meshgate-{}", host.role());
        self.spawn(host, &name, MESHGATE, &["run", "--config", conf.to_str().unwrap()]);
        let http = self.http(host);
        let deadline = Instant::now() + 15 * SECOND;
        while in_ns(&self.ns(host), || health_status(http)) != Some(200) {
            assert!(Instant::now() < deadline, "{name}: /health is not 200 within 15 s:\n{}", self.log(&name));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// keepalived on `host` with the rendered config: the VRRP process only, in the foreground,
    /// its pid files in the test's directory (not /run, where another keepalived may run).
    fn start_keepalived(&mut self, host: Host, conf_text: &str) {
        let role = host.role();
        let d = self.dir.path();
        let conf = d.join(format!("keepalived-{role}.conf"));
        std::fs::write(&conf, conf_text).unwrap();
        let p = |what: &str| d.join(format!("keepalived-{role}{what}.pid")).display().to_string();
        let conf = conf.display().to_string();
        // The real parser has nothing to say about the rendered file. (`-t` prints every
        // complaint; it ends by SIGTERMing itself even when there is none, so its exit status
        // says nothing.)
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), KEEPALIVED, "--config-test", "--use-file", &conf])
            .output()
            .expect("keepalived runs");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(said.trim().is_empty(), "keepalived -t on the rendered config ({}): {said}", out.status);
        let args = [
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--vrrp",
            "--use-file",
            &conf,
            "--pid",
            &p(""),
            "--vrrp_pid",
            &p("-vrrp"),
            "--checkers_pid",
            &p("-checkers"),
        ];
        self.spawn(host, &format!("keepalived-{role}"), KEEPALIVED, &args);
    }

    fn wait_for(&self, limit: Duration, what: &str, mut cond: impl FnMut(&Lab) -> bool) -> Duration {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

/// The status code of `GET /health`, or `None` when nothing answered.
fn health_status(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(2 * SECOND)).ok()?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// One whole MQTT packet, blocking up to the stream's read timeout.
fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let mut len = Vec::new();
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len.push(b[0]);
        if b[0] & 0x80 == 0 || len.len() == 4 {
            break;
        }
    }
    let (n, _) = mqtt::decode_remaining_length(&len)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad length"))?;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)?;
    Ok((first[0], body))
}

/// TCP connect (CONNECT_TIMEOUT), CONNECT, and the CONNACK's return code.
fn connack(addr: SocketAddr, id: &str) -> Result<u8, String> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).ok();
    s.write_all(&mqtt::connect_packet(4, id, true, 30, None, None)).map_err(|e| format!("write: {e}"))?;
    // meshgate's own limit for a broker's CONNACK is 1 s ([proxy] connack_timeout), with a retry.
    s.set_read_timeout(Some(3 * SECOND)).ok();
    match read_packet(&mut s) {
        Ok((0x20, body)) if body.len() >= 2 => Ok(body[1]),
        Ok((first, _)) => Err(format!("not a CONNACK: {first:#04x}")),
        Err(e) => Err(format!("CONNACK: {e}")),
    }
}

/// The two instances' keepalived configs, from the library the CLI renders with.
fn render(lab: &Lab) -> (String, String) {
    let base = meshgate::Config::from_toml(
        "[listen]\nmqtt = \"0.0.0.0:1883\"\nhttp = \"127.0.0.1:8080\"\n[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1883\"\n",
        "base",
    )
    .unwrap();
    let net = ka::Network::from_toml(
        &format!(
            "virtual_address = \"{}/24\"\nvirtual_router_id = {}\n\
             [[instance]]\nname = \"gw-a\"\naddress = \"{}\"\n[[instance]]\nname = \"gw-b\"\naddress = \"{}\"\n",
            lab.vip(),
            lab.net,
            lab.addr(Host::A),
            lab.addr(Host::B)
        ),
        "test network",
    )
    .unwrap();
    let files = ka::render(&base, &net).expect("the test network renders");
    let text = |n: &str| files.iter().find(|f| f.name == n).unwrap().text.clone();
    (text("keepalived-gw-a.conf"), text("keepalived-gw-b.conf"))
}

#[test]
fn the_floating_address_moves_to_the_other_instance_and_clients_are_served_again() {
    let Some(mut lab) = Lab::build() else { return };
    let svc = lab.ns(Host::Svc);
    let etcd_addr = SocketAddr::new(lab.addr(Host::Svc).into(), 2379);
    let etcd = in_ns(&svc, || Etcd::start(etcd_addr));
    let (b1, b2) =
        (SocketAddr::new(lab.addr(Host::Svc).into(), 1883), SocketAddr::new(lab.ip(BROKER2_OCTET).into(), 1883));
    let pool = in_ns(&svc, || [Mosquitto::start("broker1", b1, ""), Mosquitto::start("broker2", b2, "")]);
    let brokers: Vec<&Mosquitto> = pool.iter().collect();
    let (conf_a, conf_b) = render(&lab);

    // A first, alone: it takes the address once its check has passed `rise` times and it has
    // heard no holder for 3 advertisements.
    lab.start_meshgate(Host::A, &etcd.url(), &brokers);
    lab.start_keepalived(Host::A, &conf_a);
    lab.wait_for(20 * SECOND, "instance a holds the virtual address", |l| l.holds_vip(Host::A));
    lab.start_meshgate(Host::B, &etcd.url(), &brokers);
    lab.start_keepalived(Host::B, &conf_b);
    // b is a ready backup once its own check has passed `rise` times (it leaves FAULT).
    lab.wait_for(20 * SECOND, "instance b's keepalived is a ready backup", |l| {
        l.log("keepalived-b").contains("Entering BACKUP STATE") && l.log("keepalived-b").contains("succeeded")
    });
    assert!(lab.holds_vip(Host::A) && !lab.holds_vip(Host::B), "nopreempt: b must not take the address from a");

    let vip = SocketAddr::new(lab.vip().into(), 1883);
    let client = lab.ns(Host::Client);
    assert_eq!(in_ns(&client, || connack(vip, "ka-before")), Ok(0), "a client is served through the virtual address");

    // The stop: SIGKILL, as a crash. From here a client keeps trying through the virtual address.
    let (moved, served, attempts) = std::thread::scope(|s| {
        let stopped = Instant::now();
        lab.kill("meshgate-a");
        let client = &client;
        let served = s.spawn(move || {
            in_ns(client, || {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    if connack(vip, &format!("ka-after-{attempts}")) == Ok(0) {
                        return (stopped.elapsed(), attempts);
                    }
                    if stopped.elapsed() > 30 * SECOND {
                        return (Duration::MAX, attempts);
                    }
                    std::thread::sleep(ATTEMPT_PACE);
                }
            })
        });
        lab.wait_for(30 * SECOND, "the virtual address moves to b", |l| l.holds_vip(Host::B));
        let moved = stopped.elapsed();
        let (served, attempts) = served.join().unwrap();
        (moved, served, attempts)
    });
    assert!(!lab.holds_vip(Host::A), "a gave the address up");
    assert!(lab.holds_vip(Host::B), "b holds the address");

    // The bounds, from the rendered configs:
    //   fall x interval: the last passed check may have run just before the kill, and the
    //     holder resigns after `fall` failed checks, one every `interval` (3 x 1 s);
    //   + b's skew time: on the resignation (a priority-0 advertisement) b waits
    //     (256 - 190) / 256 x advert_int before it takes the address (0.26 s);
    //   + SCHEDULING (0.25 s): the address has moved by then (3.51 s);
    //   + CONNECT_TIMEOUT: a client attempt begun just before the move may wait that long for a
    //     SYN sent to the old holder's MAC before the next attempt (0.25 s): served (3.76 s).
    let b_priority = ka::PRIORITY_FIRST - ka::PRIORITY_STEP;
    let move_bound = SECOND * ka::FALL * ka::CHECK_INTERVAL_S + ka::skew_time(b_priority) + SCHEDULING;
    let serve_bound = move_bound + CONNECT_TIMEOUT;
    println!(
        "keepalived: meshgate-a SIGKILLed; address on b after {:.2} s, first CONNACK through it after {:.2} s \
         ({attempts} attempts); bounds {:.2} s / {:.2} s",
        moved.as_secs_f64(),
        served.as_secs_f64(),
        move_bound.as_secs_f64(),
        serve_bound.as_secs_f64()
    );
    assert!(served <= serve_bound, "first CONNACK {served:?} after the kill, bound {serve_bound:?}");
    assert!(moved <= move_bound, "address moved {moved:?} after the kill, bound {move_bound:?}");
}
