//! The five-broker network across network namespaces, where a failure looks like a network failure: a link that goes down, a blackhole, latency and loss, a broker host cut off from replication.
//!
//! Each test builds its own network: a "switch" namespace holding a Linux bridge, one namespace
//! per broker host, one for meshgate and one for the clients, each joined to the bridge by a
//! veth pair. Addresses come from 100.64.N.0/24 (shared address space, RFC 6598) and exist only
//! inside these namespaces: the root namespace gets no interface, address or route, so nothing
//! here can leave the machine. Everything a test creates is removed when its `Lab` is dropped,
//! on failure too; namespaces left behind by a killed run are removed by the next one.
//!
//! Client-side work (MQTT connects, HTTP reads, publishers, subscribers) runs in helper
//! processes inside the client namespace: this test binary started again with
//! `MESHGATE_NETNS_HELPER` set, so the test process itself never changes namespace.
//!
//! Latency and loss come from `tc netem` where the kernel has sch_netem. Where it does not (the
//! 2-core VMs this project runs on: CONFIG_NET_SCH_NETEM is off), a helper in meshgate's
//! namespace does the same from user space: an iptables NFQUEUE rule hands it meshgate's packets
//! to the brokers, and it releases each 50 ms later or, 1% of the time, never.
//!
//! Needs root (CI runs it as root), iproute2, iptables and mosquitto (`scripts/deps test`).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::netns::{die_with_parent, ip, must, remove_stale_namespaces, run, tear_down};
use serde_json::{json, Value};

/// Every namespace this file creates is named `mgn-<pid>-<test>-<role>`, so a later run can
/// tell which ones belong to a process that no longer exists.
const PREFIX: &str = "mgn";
const BROKERS: usize = 5;
const HELPER_ENV: &str = "MESHGATE_NETNS_HELPER";
/// What a helper reports for the test follows this on a line (libtest may print "test
/// helper_process ... " before it on the same line); everything else is libtest's chatter.
const MARK: &str = "@@ ";
const MESHGATE: &str = env!("CARGO_BIN_EXE_meshgate");

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

// ---- the lab: namespaces, bridge, veths, processes ---------------------------------------

/// Fails in one line when the machine cannot run these tests at all.
fn require_tools() {
    for (tool, why) in [
        ("ip", "iproute2 is not installed"),
        ("iptables", "iptables is not installed (scripts/deps test installs it)"),
        ("/usr/sbin/mosquitto", "mosquitto is not installed (scripts/deps installs it)"),
    ] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        };
        assert!(found, "netns tests cannot run: {why}");
    }
}

/// Which host of the lab.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    Broker(usize),
    Meshgate,
    Client,
}

impl Host {
    fn role(self) -> String {
        match self {
            Host::Broker(i) => format!("b{}", i + 1),
            Host::Meshgate => "mg".into(),
            Host::Client => "cl".into(),
        }
    }
    fn last_octet(self) -> u8 {
        match self {
            Host::Broker(i) => 10 + i as u8,
            Host::Meshgate => 2,
            Host::Client => 3,
        }
    }
    fn all() -> Vec<Host> {
        let mut v: Vec<Host> = (0..BROKERS).map(Host::Broker).collect();
        v.extend([Host::Meshgate, Host::Client]);
        v
    }
}

/// One test's network and the processes in it. Dropping it kills the processes and deletes the
/// namespaces, which takes the bridge and every veth with them.
struct Lab {
    tag: String,
    /// N of 100.64.N.0/24.
    net: u8,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("netns: logs of the failed test were in {} (removed)", self.dir.path().display());
        }
        tear_down("netns", &mut self.procs, &self.namespaces, self.dir.path(), 15);
    }
}

impl Lab {
    /// Builds the network of test number `k` (unique within this file) and checks its routes.
    fn build(k: u32) -> Lab {
        require_tools();
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| remove_stale_namespaces(PREFIX));
        let pid = std::process::id();
        let tag = format!("{PREFIX}-{pid}-{k}");
        let net = ((pid as usize * 7 + k as usize) % 250 + 1) as u8;
        let mut lab =
            Lab { tag, net, namespaces: Vec::new(), procs: Vec::new(), dir: tempfile::tempdir().expect("temp dir") };
        let sw = lab.ns_name("sw");
        if let Err(e) = run("ip", &["netns", "add", &sw]) {
            panic!("netns tests cannot run: cannot create a network namespace (needs root or CAP_NET_ADMIN and CAP_SYS_ADMIN): {e}");
        }
        lab.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for host in Host::all() {
            let ns = lab.ns_name(&host.role());
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            // No IPv6: its neighbour discovery and router solicitations are noise on the bridge.
            // (Best effort: a kernel without IPv6 has nothing to turn off.)
            let _ = run("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            let port = format!("p-{}", host.role());
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let cidr = format!("{}/24", lab.addr(host));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab.check_routes();
        lab
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }
    fn ns(&self, host: Host) -> String {
        self.ns_name(&host.role())
    }
    fn switch(&self) -> String {
        self.ns_name("sw")
    }
    fn addr(&self, host: Host) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, self.net, host.last_octet())
    }
    fn mqtt(&self) -> String {
        format!("{}:1883", self.addr(Host::Meshgate))
    }
    fn broker_mqtt(&self, i: usize) -> String {
        format!("{}:1883", self.addr(Host::Broker(i)))
    }

    /// Before anything is sent: meshgate's and the clients' only route is the lab's /24 on
    /// their veth, whose other end is a port of this lab's bridge; the root namespace has no
    /// route into the block.
    fn check_routes(&self) {
        let sw = self.switch();
        let ports = ip(&["-n", &sw, "-br", "link", "show", "master", "br0"]);
        for host in Host::all() {
            let port = format!("p-{}", host.role());
            assert!(ports.lines().any(|l| l.starts_with(&format!("{port}@"))), "{port} is not on br0: {ports}");
        }
        for from in [Host::Meshgate, Host::Client] {
            let ns = self.ns(from);
            let routes = ip(&["-n", &ns, "-4", "route", "show"]);
            let expected = format!("100.64.{}.0/24 dev eth0 proto kernel scope link src {}", self.net, self.addr(from));
            assert_eq!(routes.trim(), expected, "{ns} must have exactly one route, the lab's block");
            let link = ip(&["-n", &ns, "-d", "link", "show", "eth0"]);
            assert!(link.contains(&format!("link-netns {sw}")), "{ns}'s eth0 is not joined to {sw}: {link}");
            for to in Host::all().into_iter().filter(|h| *h != from) {
                let route = ip(&["-n", &ns, "-4", "route", "get", &self.addr(to).to_string()]);
                assert!(route.contains(" dev eth0 "), "{ns} reaches {} elsewhere: {route}", self.addr(to));
            }
        }
        let root = ip(&["-4", "route", "show"]);
        let block = format!("100.64.{}.", self.net);
        assert!(!root.contains(&block), "the root namespace has a route into the lab's block: {root}");
    }

    fn spawn(&mut self, host: Host, name: &str, program: &str, args: &[&str], env: Option<&str>) -> &mut Child {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host), program]).args(args);
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        if let Some(spec) = env {
            cmd.env(HELPER_ENV, spec);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.procs.push((name.to_string(), child));
        &mut self.procs.last_mut().unwrap().1
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Five Mosquitto brokers, each in its own namespace on its own address.
    fn start_brokers(&mut self) {
        for i in 0..BROKERS {
            let name = format!("broker{}", i + 1);
            let conf = self.dir.path().join(format!("{name}.conf"));
            let log = self.dir.path().join(format!("{name}.mosquitto.log"));
            // `user root`: tests run as root and Mosquitto would otherwise switch to a user that
            // cannot write the log in our temp dir.
            std::fs::write(
                &conf,
                format!(
                    "listener 1883 {}\nallow_anonymous true\npersistence false\nuser root\nlog_dest file {}\n\
                     connection_messages false\nmax_queued_messages 100000\n",
                    self.addr(Host::Broker(i)),
                    log.display()
                ),
            )
            .unwrap();
            let conf = conf.display().to_string();
            self.spawn(Host::Broker(i), &name, "/usr/sbin/mosquitto", &["-c", &conf], None);
        }
        for i in 0..BROKERS {
            let name = format!("broker{}", i + 1);
            let log = self.dir.path().join(format!("{name}.mosquitto.log"));
            let deadline = Instant::now() + Duration::from_secs(10);
            // Mosquitto logs "running" once its listener is bound.
            while !std::fs::read_to_string(&log).unwrap_or_default().contains(" running") {
                assert!(Instant::now() < deadline, "{name} did not start: {}", self.log(&name));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// meshgate in its namespace with the reference design's broker settings and default
    /// health checks; waits until every broker has been probed up.
    fn start_meshgate(&mut self, replication: bool) {
        let mut t = format!(
            "[listen]\nmqtt = \"{}\"\nhttp = \"{}:8080\"\n\n[health]\n{}\n\n[replication]\nenabled = {replication}\nstate_file = \"{}\"\n",
            self.mqtt(),
            self.addr(Host::Meshgate),
            health(),
            self.dir.path().join("replication-state.json").display()
        );
        for i in 0..BROKERS {
            t.push_str(&format!(
                "\n[[broker]]\nname = \"broker{}\"\naddress = \"{}\"\nmax_fails = 3\nfail_timeout = \"30s\"\n{}",
                i + 1,
                self.broker_mqtt(i),
                if i == 0 { "weight = 5\n" } else { "" }
            ));
        }
        let conf = self.dir.path().join("meshgate.toml");
        std::fs::write(&conf, t).unwrap();
        let conf = conf.display().to_string();
        self.spawn(Host::Meshgate, "meshgate", MESHGATE, &["run", "--config", &conf], None);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(b) = self.try_json("/brokers") {
                let all_up =
                    b.as_array().is_some_and(|a| a.len() == BROKERS && a.iter().all(|b| b["probe_up"] == true));
                if all_up {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "meshgate did not see every broker up within 15 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        if replication {
            self.wait_for(Duration::from_secs(15), "every replication link connected", |lab| {
                lab.json("/replication")["links"]
                    .as_array()
                    .is_some_and(|l| l.len() == BROKERS && l.iter().all(|l| l["connected"] == true))
            });
        }
    }

    fn wait_for(&self, limit: Duration, what: &str, mut cond: impl FnMut(&Lab) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if cond(self) {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// This test binary, run again in `host`'s namespace as the helper for `spec`.
    fn helper_command(&self, host: Host, spec: &Value) -> Command {
        let mut cmd = Command::new("ip");
        // /proc/<pid>/exe still runs this binary if cargo rebuilds the file meanwhile.
        cmd.args(["netns", "exec", &self.ns(host), &format!("/proc/{}/exe", std::process::id())])
            .args(["helper_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, spec.to_string())
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        cmd
    }

    /// Runs a helper to completion in `host`'s namespace; returns what it reported.
    fn helper(&self, host: Host, spec: Value) -> Vec<Value> {
        let out = self.helper_command(host, &spec).output().expect("helper runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helper {} failed: {}{}",
            spec["role"],
            stdout.lines().filter(|l| l.contains("panicked") || l.contains(MARK)).collect::<Vec<_>>().join(" "),
            String::from_utf8_lossy(&out.stderr).lines().take(5).collect::<Vec<_>>().join(" ")
        );
        marked(&stdout)
    }

    /// Starts a helper that runs alongside the test; its reports arrive on a channel.
    fn start_helper(&self, host: Host, spec: Value) -> Running {
        let mut cmd = self.helper_command(host, &spec);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("helper starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(v) = report_in(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Running { child, rx }
    }

    fn try_json(&self, path: &str) -> Result<Value, String> {
        let spec = json!({"role": "http", "addr": format!("{}:8080", self.addr(Host::Meshgate)), "path": path});
        let out = self.helper_command(Host::Client, &spec).output().map_err(|e| e.to_string())?;
        let lines = marked(&String::from_utf8_lossy(&out.stdout));
        let reply = lines.first().ok_or("no answer")?;
        if reply["status"] != 200 {
            return Err(format!("HTTP {}", reply["status"]));
        }
        let body = reply["body"].as_str().ok_or("no body")?;
        if path == "/metrics" {
            return Ok(Value::String(body.to_string()));
        }
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    /// GET on meshgate's HTTP API, from the client namespace.
    fn json(&self, path: &str) -> Value {
        self.try_json(path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn metrics(&self) -> String {
        self.json("/metrics").as_str().unwrap().to_string()
    }

    fn events_since(&self, seq: u64) -> Vec<Value> {
        self.json(&format!("/events?since={seq}"))["events"].as_array().cloned().unwrap_or_default()
    }

    fn last_event_seq(&self) -> u64 {
        self.json("/events?since=0")["last_seq"].as_u64().unwrap_or(0)
    }

    fn retained(&self, broker: usize) -> BTreeMap<String, String> {
        let spec = json!({"role": "retained", "addr": self.broker_mqtt(broker), "filter": "repl/r/#"});
        let out = self.helper(Host::Client, spec);
        serde_json::from_value(out[0]["retained"].clone()).unwrap()
    }

    /// A fault on broker `i`'s host, applied from outside meshgate.
    fn fault(&self, fault: Fault, i: usize, on: bool) {
        match fault {
            // The switch port goes down: the host's cable is pulled. No RST, no ICMP: frames
            // for the host are dropped by the bridge.
            Fault::LinkDown => {
                let port = format!("p-{}", Host::Broker(i).role());
                ip(&["-n", &self.switch(), "link", "set", &port, if on { "down" } else { "up" }]);
            }
            // Everything arriving at the host is dropped silently.
            Fault::Blackhole => {
                let op = if on { "-A" } else { "-D" };
                must("ip", &["netns", "exec", &self.ns(Host::Broker(i)), "iptables", op, "INPUT", "-j", "DROP"]);
            }
        }
    }
}

/// Lines the helper marked, parsed.
fn marked(stdout: &str) -> Vec<Value> {
    stdout.lines().filter_map(report_in).collect()
}

fn report_in(line: &str) -> Option<Value> {
    serde_json::from_str(line.split_once(MARK)?.1).ok()
}

/// A helper process running beside the test; killed when dropped.
struct Running {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Running {
    fn next(&self, limit: Duration) -> Value {
        self.rx.recv_timeout(limit).unwrap_or_else(|_| panic!("helper reported nothing within {limit:?}"))
    }
    /// Waits for the helper to end by itself; returns everything it reported since.
    fn finish(mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "helper failed: {status}");
                // The reader thread ends with the pipe; collect what is left.
                return self.rx.iter().collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("helper still running after {limit:?}");
    }
    /// Stops it and returns what it reported since the last read.
    fn stop(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.rx.try_iter().collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    LinkDown,
    Blackhole,
}

/// `[health]` of every scenario: the defaults (probe every 250 ms, timeout 250 ms) with three
/// failures in a row to mark a broker down instead of two. Under 50 ms delay and 1% loss a probe
/// fails whenever its SYN or its CONNECT is lost (1.87% of 11,986 probes in a 600 s run with
/// fall = rise = 1); two failures in a row happened twice in those 600 s, three never, so with
/// fall = 2 the 60 s scenario marks a broker down falsely in roughly one run of four or five.
/// fall = 3 keeps detection within 1 s (250 ms + 3 x 250 ms). MESHGATE_NETNS_HEALTH replaces
/// these lines for measurements ("fall = 1\nrise = 1" makes every failed probe an event).
fn health() -> String {
    match std::env::var("MESHGATE_NETNS_HEALTH") {
        Ok(lines) => lines.replace("\\n", "\n"),
        Err(_) => "fall = 3".into(),
    }
}

// ---- metrics ----------------------------------------------------------------------------

/// The value of the sample of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches = n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Probe counters of one broker from /metrics: (probes, sum of seconds, probes within 250 ms).
fn probe_counts(metrics: &str, broker: &str) -> (f64, f64, f64) {
    let l = [("broker", broker)];
    let count = sample(metrics, "meshgate_probe_duration_seconds_count", &l).unwrap_or(0.0);
    let sum = sample(metrics, "meshgate_probe_duration_seconds_sum", &l).unwrap_or(0.0);
    let fast =
        sample(metrics, "meshgate_probe_duration_seconds_bucket", &[("broker", broker), ("le", "0.25")]).unwrap_or(0.0);
    (count, sum, fast)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Successful probe latencies of each broker in /brokers' history (the last 60 probes).
fn history(brokers: &Value) -> BTreeMap<String, (Vec<f64>, usize)> {
    brokers
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let h = b["probe_history"].as_array().unwrap();
            let ok: Vec<f64> = h.iter().filter_map(Value::as_f64).collect();
            let failed = h.len() - ok.len();
            (b["name"].as_str().unwrap().to_string(), (ok, failed))
        })
        .collect()
}

// ---- scenarios ---------------------------------------------------------------------------

/// broker1 (the primary) fails the way `fault` makes it fail while a client connects every
/// 100 ms through meshgate; then the fault is lifted.
fn failover_scenario(k: u32, fault: Fault) {
    let mut lab = Lab::build(k);
    lab.start_brokers();
    lab.start_meshgate(false);
    let seq = lab.last_event_seq();
    // A client connected before the fault, on broker1: meshgate switches it under its
    // connection, so every one of its pings is answered, the slowest after the detection.
    let kept = lab.start_helper(
        Host::Client,
        json!({"role": "keep", "addr": lab.mqtt(), "every_ms": 200, "for_ms": 6000, "timeout_ms": 5000}),
    );
    let clients = lab.start_helper(
        Host::Client,
        json!({"role": "connect_loop", "addr": lab.mqtt(), "every_ms": 100, "for_ms": 6000, "timeout_ms": 8000}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let t_fault = now_ms();
    lab.fault(fault, 0, true);
    let attempts = clients.finish(Duration::from_secs(20));
    let pings = kept.finish(Duration::from_secs(20));
    let events = lab.events_since(seq);
    let down = events
        .iter()
        .find(|e| {
            e["kind"] == "state_change"
                && e["broker"] == "broker1"
                && e["message"].as_str().unwrap().contains("is down")
        })
        .unwrap_or_else(|| panic!("broker1 never marked down; events: {events:?}"));
    let detection = down["at_ms"].as_f64().unwrap() - t_fault;
    let brokers = lab.json("/brokers");
    let b1 = &brokers[0];
    let current = brokers.as_array().unwrap().iter().find(|b| b["current"] == true).map(|b| b["name"].clone());

    let failed: Vec<&Value> = attempts.iter().filter(|a| a["ok"] != true).collect();
    let after: Vec<&Value> = attempts.iter().filter(|a| a["t"].as_f64().unwrap() >= t_fault).collect();
    // An attempt that went to broker1 first waited for upstream_connect_timeout (1 s) before
    // meshgate replayed its CONNECT to broker2; a fast one went straight to a broker that serves.
    let slow: Vec<f64> = after
        .iter()
        .filter(|a| a["ms"].as_f64().unwrap() >= 500.0)
        .map(|a| a["t"].as_f64().unwrap() - t_fault)
        .collect();
    let last_routed = slow.iter().cloned().fold(0.0, f64::max);
    let worst = attempts.iter().filter_map(|a| a["ms"].as_f64()).fold(0.0, f64::max);

    let t_restore = now_ms();
    lab.fault(fault, 0, false);
    let mut recovered = None;
    lab.wait_for(Duration::from_secs(10), "broker1 back up after the fault is lifted", |lab| {
        let up = lab.events_since(seq).into_iter().find(|e| {
            e["kind"] == "state_change" && e["broker"] == "broker1" && e["message"].as_str().unwrap().contains("is up")
        });
        recovered = up.map(|e| e["at_ms"].as_f64().unwrap() - t_restore);
        recovered.is_some()
    });
    println!(
        "netns {fault:?}: broker1 marked down {detection:.0} ms after the fault; {} connects ({} after it), {} failed, \
         {} routed to broker1 after the fault (last started {last_routed:.0} ms after it), slowest CONNACK {worst:.0} ms; \
         up again {:.0} ms after the fault was lifted",
        attempts.len(),
        after.len(),
        failed.len(),
        slow.len(),
        recovered.unwrap()
    );
    assert!(detection <= 1500.0, "broker1 marked down {detection:.0} ms after the fault (limit 1500)");
    assert!(failed.is_empty(), "client connects failed: {failed:?}");
    assert!(after.len() >= 30, "the client kept connecting after the fault");
    assert!(last_routed <= 1500.0, "a client was still routed to broker1 {last_routed:.0} ms after the fault");
    assert_eq!(b1["state"], "down", "{b1}");
    assert_eq!(current, Some(json!("broker2")), "new clients go to broker2");
    let slowest_ping = pings.iter().filter_map(|p| p["ms"].as_f64()).fold(0.0, f64::max);
    println!(
        "netns {fault:?}: the client connected before the fault: {} pings, slowest answered after {slowest_ping:.0} ms",
        pings.len()
    );
    assert!(pings.len() >= 20 && pings.iter().all(|p| p["ok"] == true), "its connection was kept: {pings:?}");
    assert!(slowest_ping <= detection + 500.0, "slowest ping {slowest_ping:.0} ms, detection {detection:.0} ms");
    let switches =
        sample(&lab.metrics(), "meshgate_session_switches_total", &[("reason", "broker_down"), ("result", "ok")]);
    assert_eq!(switches, Some(1.0), "switched to broker2");
}

#[test]
fn a_broker_link_that_goes_down_is_left_within_1_5_s_and_no_connect_fails() {
    failover_scenario(0, Fault::LinkDown);
}

#[test]
fn a_blackholed_broker_is_left_within_1_5_s_and_no_connect_fails() {
    failover_scenario(1, Fault::Blackhole);
}

/// 50 ms of delay and 1% loss on everything meshgate sends to the brokers, for 60 s.
#[test]
fn latency_and_loss_mark_no_broker_down_and_show_in_probe_latency() {
    const DELAY_MS: f64 = 50.0;
    const LOSS: f64 = 0.01;
    // MESHGATE_NETNS_SECS makes the run longer for a measurement; the test is 60 s.
    let run_for = std::env::var("MESHGATE_NETNS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let run_secs = Duration::from_secs(run_for);
    let mut lab = Lab::build(2);
    lab.start_brokers();
    lab.start_meshgate(false);
    std::thread::sleep(Duration::from_secs(3));
    let baseline = history(&lab.json("/brokers"));
    let seq = lab.last_event_seq();

    // tc netem where the kernel has it; otherwise the same impairment from user space:
    // meshgate's packets to the brokers are queued (NFQUEUE) and released 50 ms later, 1% of
    // them never. Both delay one direction, as netem on meshgate's interface does.
    let mg = lab.ns(Host::Meshgate);
    let netem = run(
        "ip",
        &["netns", "exec", &mg, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "50ms", "loss", "1%"],
    );
    let mut queue = None;
    let how = match netem {
        Ok(_) => "tc netem".to_string(),
        Err(e) => {
            let q = lab.start_helper(
                Host::Meshgate,
                json!({"role": "nfq_delay", "queue": 0, "delay_ms": DELAY_MS, "loss": LOSS}),
            );
            assert_eq!(q.next(Duration::from_secs(5))["ready"], true);
            let brokers: Vec<String> = (0..BROKERS).map(|i| lab.addr(Host::Broker(i)).to_string()).collect();
            let dst = brokers.join(",");
            must(
                "ip",
                &[
                    "netns",
                    "exec",
                    &mg,
                    "iptables",
                    "-A",
                    "OUTPUT",
                    "-d",
                    &dst,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    "0",
                    "--queue-bypass",
                ],
            );
            queue = Some(q);
            format!("NFQUEUE delay line (no tc netem here: {e})")
        }
    };
    let m0 = lab.metrics();
    let started = Instant::now();
    // Probe results keep the broker list busy; the client side reads /brokers every 10 s so a
    // false down would also show as a state in between, not only as an event.
    let mut states_seen_down = 0;
    while started.elapsed() < run_secs {
        std::thread::sleep(Duration::from_secs(10).min(run_secs - started.elapsed()));
        let b = lab.json("/brokers");
        states_seen_down += b.as_array().unwrap().iter().filter(|b| b["probe_up"] == false).count();
    }
    let m1 = lab.metrics();
    let brokers = lab.json("/brokers");
    let events = lab.events_since(seq);
    let stats = queue.map(|q| q.stop()).and_then(|v| v.last().cloned());
    let downs: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "state_change" && e["message"].as_str().unwrap().contains("is down"))
        .collect();
    // How long each false down lasted: with rise = 1 that is how many probes in a row failed.
    let mut periods = Vec::new();
    for d in &downs {
        let t = d["at_ms"].as_f64().unwrap();
        let up = events.iter().find(|e| {
            e["broker"] == d["broker"]
                && e["at_ms"].as_f64().unwrap() >= t
                && e["message"].as_str().unwrap().contains("is up")
        });
        periods.push(up.map(|u| u["at_ms"].as_f64().unwrap() - t).unwrap_or(f64::NAN));
    }
    if events.len() >= 1000 {
        println!("netns: the event ring overflowed; counts below are a lower bound");
    }
    let delayed = history(&brokers);
    let mut lines = Vec::new();
    let mut total_failed = 0.0;
    let mut total_probes = 0.0;
    for (name, (ok, failed_recent)) in &delayed {
        let (c0, s0, f0) = probe_counts(&m0, name);
        let (c1, s1, f1) = probe_counts(&m1, name);
        let probes = c1 - c0;
        let failed = probes - (f1 - f0);
        let mean = (s1 - s0) / probes * 1000.0;
        total_failed += failed;
        total_probes += probes;
        let base = median(baseline[name].0.clone());
        let now = median(ok.clone());
        lines.push(format!(
            "{name}: median {base:.1} -> {now:.1} ms, /metrics mean {mean:.1} ms over {probes} probes, {failed} over 250 ms ({failed_recent} in the last 60)"
        ));
        assert!(
            now >= base + 90.0 && now < 250.0,
            "{name}: probe latency {now:.1} ms does not show the added delay (baseline {base:.1} ms)"
        );
        assert!(mean >= 90.0, "{name}: /metrics mean probe latency {mean:.1} ms does not show the added delay");
    }
    println!(
        "netns latency+loss via {how}: {} false down(s) in {:?}, {total_failed} of {total_probes} probes failed ({:.2}%); queue {}",
        downs.len(),
        run_secs,
        total_failed / total_probes * 100.0,
        stats.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
    );
    for l in &lines {
        println!("  {l}");
    }
    if !periods.is_empty() {
        periods.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let runs: Vec<String> = periods.iter().map(|p| format!("{p:.0}")).collect();
        println!("  down periods (ms): {}", runs.join(" "));
    }
    assert!(downs.is_empty() && states_seen_down == 0, "brokers marked down under 50 ms / 1% loss: {downs:?}");
}

/// broker1's host is cut off while clients publish through meshgate; the reachable brokers
/// stay in step; when broker1 returns, replication brings its retained state up to date.
#[test]
fn replication_keeps_reachable_brokers_in_step_and_catches_a_cut_off_broker_up() {
    const RETAINED: usize = 20;
    const LIVE: usize = 50;
    let mut lab = Lab::build(3);
    lab.start_brokers();
    lab.start_meshgate(true);
    let seq = lab.last_event_seq();
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let publish = |lab: &Lab, round: &str, expected: &mut BTreeMap<String, String>| {
        let mut messages = Vec::new();
        for i in 0..RETAINED {
            // The last topic is deleted in the second round (an empty retained message).
            let value = if round == "v2" && i == RETAINED - 1 { String::new() } else { format!("{round}-{i}") };
            messages.push(json!({"topic": format!("repl/r/{i}"), "payload": value, "retain": true}));
            if value.is_empty() {
                expected.remove(&format!("repl/r/{i}"));
            } else {
                expected.insert(format!("repl/r/{i}"), value);
            }
        }
        for i in 0..LIVE {
            messages.push(
                json!({"topic": format!("repl/live/{round}"), "payload": format!("{round}-live-{i}"), "retain": false}),
            );
        }
        lab.helper(Host::Client, json!({"role": "publish", "addr": lab.mqtt(), "messages": messages}));
    };

    let t_cut = now_ms();
    lab.fault(Fault::LinkDown, 0, true);
    lab.wait_for(Duration::from_secs(3), "broker1 marked down", |lab| lab.json("/brokers/broker1")["state"] == "down");
    // Subscribers straight on every reachable broker, then publishers through meshgate (which
    // now sends them to broker2).
    let subs: Vec<Running> = (1..BROKERS)
        .map(|i| {
            let s = lab.start_helper(
                Host::Client,
                json!({"role": "subscribe", "addr": lab.broker_mqtt(i), "filter": "repl/live/#", "for_ms": 6000}),
            );
            assert_eq!(s.next(Duration::from_secs(5))["ready"], true);
            s
        })
        .collect();
    publish(&lab, "v1", &mut expected);
    for (i, s) in subs.into_iter().enumerate() {
        let got = s.finish(Duration::from_secs(15));
        let payloads = got.last().unwrap()["payloads"].as_array().unwrap().len();
        assert_eq!(payloads, LIVE, "broker{} got {payloads} of {LIVE} live messages while broker1 was cut off", i + 2);
    }
    for i in 1..BROKERS {
        assert_eq!(lab.retained(i), expected, "broker{}'s retained state while broker1 is cut off", i + 1);
    }
    // The replication link to broker1 has no RST to notice: it is declared lost when its MQTT
    // keepalive (10 s) goes unanswered. Changes made after that are repaired on return.
    let link_lost = {
        let start = Instant::now();
        loop {
            let links = lab.json("/replication")["links"].clone();
            if links[0]["connected"] == false {
                break Some(now_ms() - t_cut);
            }
            if start.elapsed() > Duration::from_secs(35) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    publish(&lab, "v2", &mut expected);
    for i in 1..BROKERS {
        assert_eq!(lab.retained(i), expected, "broker{}'s retained state after the second round", i + 1);
    }

    let t_back = now_ms();
    lab.fault(Fault::LinkDown, 0, false);
    let mut caught_up = None;
    let limit = Duration::from_secs(30);
    let start = Instant::now();
    while start.elapsed() < limit {
        if lab.retained(0) == expected {
            caught_up = Some(now_ms() - t_back);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = lab.events_since(seq);
    let at = |pred: &dyn Fn(&str) -> bool| {
        events
            .iter()
            .filter(|e| e["broker"] == "broker1" && pred(e["message"].as_str().unwrap()))
            .filter_map(|e| e["at_ms"].as_f64())
            .find(|t| *t >= t_back)
            .map(|t| t - t_back)
    };
    let probed_up = at(&|m| m.contains("is up"));
    let relinked = at(&|m| m.contains("replication link to broker1 connected"));
    let repaired = at(&|m| m.contains("brought up to date"));
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "never".into());
    println!(
        "netns replication: broker1 cut off for {:.1} s; replication link declared lost {} after the cut; \
         after the return: probed up {}, link {}, retained repaired {}, broker1 holds the {} current values {}",
        (t_back - t_cut) / 1000.0,
        link_lost.map(|d| format!("{:.1} s", d / 1000.0)).unwrap_or_else(|| "never (within 35 s)".into()),
        fmt(probed_up),
        fmt(relinked),
        fmt(repaired),
        expected.len(),
        fmt(caught_up),
    );
    assert!(caught_up.is_some(), "broker1 did not catch up within {limit:?}: holds {:?}", lab.retained(0));
}

// ---- helper processes --------------------------------------------------------------------

/// Not a test: the other tests run this binary again inside a namespace with
/// `MESHGATE_NETNS_HELPER` set to a JSON job; without it this returns at once.
#[test]
#[ignore = "a helper the netns tests start inside their namespaces"]
fn helper_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else { return };
    let spec: Value = serde_json::from_str(&spec).expect("helper spec is JSON");
    helper::run(&spec);
}

mod helper {
    use super::*;
    use common::mqtt;

    fn report(v: Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{MARK}{v}");
        let _ = out.flush();
    }

    fn ms(spec: &Value, key: &str, default: u64) -> Duration {
        Duration::from_millis(spec[key].as_u64().unwrap_or(default))
    }

    pub fn run(spec: &Value) {
        match spec["role"].as_str().unwrap() {
            "http" => http(spec),
            "connect_loop" => connect_loop(spec),
            "keep" => keep(spec),
            "publish" => publish(spec),
            "subscribe" => subscribe(spec),
            "retained" => retained(spec),
            "nfq_delay" => nfq::run(spec),
            r => panic!("unknown helper role {r}"),
        }
    }

    fn addr(spec: &Value) -> std::net::SocketAddr {
        spec["addr"].as_str().unwrap().parse().unwrap()
    }

    fn http(spec: &Value) {
        let mut s = TcpStream::connect_timeout(&addr(spec), Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // HTTP/1.0: the server closes after the reply and never chunks it.
        write!(s, "GET {} HTTP/1.0\r\nHost: meshgate\r\n\r\n", spec["path"].as_str().unwrap()).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("read reply");
        let reply = String::from_utf8_lossy(&reply);
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        report(json!({"status": status, "body": body}));
    }

    /// One whole packet, blocking up to the stream's read timeout.
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

    /// TCP connect, CONNECT, CONNACK within `timeout`; the CONNACK code.
    fn connect(addr: std::net::SocketAddr, id: &str, timeout: Duration) -> Result<(TcpStream, u8), String> {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        s.write_all(&mqtt::connect_packet(4, id, true, 30, None, None)).map_err(|e| format!("write: {e}"))?;
        s.set_read_timeout(Some(timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1)))).ok();
        let (first, body) = read_packet(&mut s).map_err(|e| format!("CONNACK: {e}"))?;
        if first != 0x20 || body.len() < 2 {
            return Err(format!("not a CONNACK: {first:#04x}"));
        }
        Ok((s, body[1]))
    }

    /// A fresh client connects every `every_ms` for `for_ms`, each on its own thread so a slow
    /// CONNACK does not delay the next attempt; one report per attempt.
    fn connect_loop(spec: &Value) {
        let (every, total, timeout) =
            (ms(spec, "every_ms", 100), ms(spec, "for_ms", 5000), ms(spec, "timeout_ms", 8000));
        let addr = addr(spec);
        let start = Instant::now();
        let mut threads = Vec::new();
        let mut n = 0u32;
        while start.elapsed() < total {
            let id = format!("netns-loop-{}-{n}", std::process::id());
            threads.push(std::thread::spawn(move || {
                let t = now_ms();
                let began = Instant::now();
                let r = connect(addr, &id, timeout);
                let took = began.elapsed().as_secs_f64() * 1000.0;
                match r {
                    Ok((mut s, 0)) => {
                        let _ = s.write_all(&mqtt::disconnect_packet());
                        report(json!({"t": t, "ok": true, "ms": took}));
                    }
                    Ok((_, code)) => {
                        report(json!({"t": t, "ok": false, "ms": took, "err": format!("CONNACK code {code}")}))
                    }
                    Err(e) => report(json!({"t": t, "ok": false, "ms": took, "err": e})),
                }
            }));
            n += 1;
            std::thread::sleep((start + every * n).saturating_duration_since(Instant::now()));
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    /// One client that stays connected: a PINGREQ every `every_ms` for `for_ms`, each waited
    /// for up to `timeout_ms`; one report per ping, and it stops at the first that fails (its
    /// connection closed or its PINGRESP never came).
    fn keep(spec: &Value) {
        let (every, total, timeout) =
            (ms(spec, "every_ms", 200), ms(spec, "for_ms", 5000), ms(spec, "timeout_ms", 5000));
        let id = format!("netns-keep-{}", std::process::id());
        let (mut s, code) = connect(addr(spec), &id, Duration::from_secs(5)).expect("the client connects");
        assert_eq!(code, 0, "the client was refused");
        s.set_read_timeout(Some(timeout)).unwrap();
        let start = Instant::now();
        while start.elapsed() < total {
            let t = now_ms();
            let began = Instant::now();
            let answered = s.write_all(&mqtt::pingreq_packet()).and_then(|_| loop {
                if read_packet(&mut s)?.0 == 0xd0 {
                    return Ok(());
                }
            });
            let took = began.elapsed().as_secs_f64() * 1000.0;
            report(json!({"t": t, "ok": answered.is_ok(), "ms": took}));
            if answered.is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    }

    /// Publishes each message at QoS 1 and waits for its PUBACK.
    fn publish(spec: &Value) {
        let id = format!("netns-pub-{}", std::process::id());
        let (mut s, code) = connect(addr(spec), &id, Duration::from_secs(5)).expect("publisher connects");
        assert_eq!(code, 0, "publisher refused");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let messages = spec["messages"].as_array().unwrap();
        for (i, m) in messages.iter().enumerate() {
            let pid = i as u16 + 1;
            let pkt = mqtt::publish_packet(
                m["topic"].as_str().unwrap(),
                m["payload"].as_str().unwrap().as_bytes(),
                1,
                pid,
                m["retain"].as_bool().unwrap(),
            );
            s.write_all(&pkt).unwrap();
            loop {
                let (first, body) = read_packet(&mut s).expect("PUBACK");
                if first == 0x40 && body[..2] == pid.to_be_bytes() {
                    break;
                }
            }
        }
        let _ = s.write_all(&mqtt::disconnect_packet());
        report(json!({"published": messages.len()}));
    }

    /// Subscribes (QoS 1), reports ready, then collects payloads for `for_ms`.
    fn subscribe(spec: &Value) {
        let id = format!("netns-sub-{}", std::process::id());
        let (mut s, code) = connect(addr(spec), &id, Duration::from_secs(5)).expect("subscriber connects");
        assert_eq!(code, 0);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&mqtt::subscribe_packet(1, spec["filter"].as_str().unwrap(), 1)).unwrap();
        loop {
            let (first, _) = read_packet(&mut s).expect("SUBACK");
            if first == 0x90 {
                break;
            }
        }
        report(json!({"ready": true}));
        let end = Instant::now() + ms(spec, "for_ms", 5000);
        let mut payloads = Vec::new();
        while Instant::now() < end {
            s.set_read_timeout(Some(end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).ok();
            match read_packet(&mut s) {
                Ok((first, body)) => {
                    if let Some(p) = mqtt::parse_publish(first, &body) {
                        if let Some(id) = p.packet_id {
                            let _ = s.write_all(&mqtt::puback_packet(id));
                        }
                        payloads.push(String::from_utf8_lossy(&p.payload).into_owned());
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) => panic!("subscriber: {e}"),
            }
        }
        payloads.sort();
        payloads.dedup();
        report(json!({"payloads": payloads}));
    }

    /// The retained messages a broker holds under `filter`: collected until 300 ms pass
    /// without one after the SUBACK.
    fn retained(spec: &Value) {
        let id = format!("netns-ret-{}", std::process::id());
        let (mut s, code) = connect(addr(spec), &id, Duration::from_secs(5)).expect("reader connects");
        assert_eq!(code, 0);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&mqtt::subscribe_packet(1, spec["filter"].as_str().unwrap(), 0)).unwrap();
        let mut held = BTreeMap::new();
        let mut subacked = false;
        loop {
            match read_packet(&mut s) {
                Ok((0x90, _)) => subacked = true,
                Ok((first, body)) => {
                    if let Some(p) = mqtt::parse_publish(first, &body).filter(|p| p.retain) {
                        held.insert(p.topic, String::from_utf8_lossy(&p.payload).into_owned());
                    }
                }
                Err(e)
                    if subacked
                        && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break
                }
                Err(e) => panic!("retained reader: {e}"),
            }
            if subacked {
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            }
        }
        let _ = s.write_all(&mqtt::disconnect_packet());
        report(json!({"retained": held}));
    }

    /// A user-space stand-in for `tc netem delay D loss L` on kernels without sch_netem:
    /// packets an iptables NFQUEUE rule hands over are held for `delay_ms`, then accepted, or
    /// dropped with probability `loss` (dropping by verdict is silent to the sender, as netem's
    /// loss is; an iptables DROP in OUTPUT would fail the send with EPERM instead).
    mod nfq {
        use super::*;
        use std::collections::VecDeque;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

        const NETLINK_NETFILTER: i32 = 12;
        const NFNL_SUBSYS_QUEUE: u16 = 3;
        const NFQNL_MSG_PACKET: u16 = 0;
        const NFQNL_MSG_VERDICT: u16 = 1;
        const NFQNL_MSG_CONFIG: u16 = 2;
        const NFQA_CFG_CMD: u16 = 1;
        const NFQA_CFG_PARAMS: u16 = 2;
        const NFQNL_CFG_CMD_BIND: u8 = 1;
        const NFQNL_COPY_META: u8 = 1;
        const NFQA_PACKET_HDR: u16 = 1;
        const NFQA_VERDICT_HDR: u16 = 2;
        const NF_DROP: u32 = 0;
        const NF_ACCEPT: u32 = 1;
        const NLM_F_REQUEST: u16 = 1;
        const NLM_F_ACK: u16 = 4;
        const NLMSG_ERROR: u16 = 2;

        fn message(msg_type: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
            let mut m = vec![0u8; 16];
            // nfgenmsg: family AF_UNSPEC, version 0, the queue number (big endian)
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&queue.to_be_bytes());
            for (t, payload) in attrs {
                m.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
                m.extend_from_slice(&t.to_ne_bytes());
                m.extend_from_slice(payload);
                while !m.len().is_multiple_of(4) {
                    m.push(0);
                }
            }
            let len = m.len() as u32;
            m[0..4].copy_from_slice(&len.to_ne_bytes());
            m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg_type).to_ne_bytes());
            m[6..8].copy_from_slice(&flags.to_ne_bytes());
            m
        }

        fn send(fd: &OwnedFd, m: &[u8]) {
            // SAFETY: m is a valid buffer of m.len() bytes; the socket is connected to the kernel.
            let n = unsafe { libc::send(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
            assert!(n == m.len() as isize, "netlink send: {}", std::io::Error::last_os_error());
        }

        pub fn run(spec: &Value) {
            let queue = spec["queue"].as_u64().unwrap_or(0) as u16;
            let delay = Duration::from_secs_f64(spec["delay_ms"].as_f64().unwrap() / 1000.0);
            let loss = spec["loss"].as_f64().unwrap_or(0.0);
            // SAFETY: plain socket(2); the result is checked before it is wrapped.
            let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
            assert!(raw >= 0, "netlink socket: {}", std::io::Error::last_os_error());
            // SAFETY: raw is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt with a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            // SAFETY: a zeroed sockaddr_nl is valid; family set below.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as u16;
            // SAFETY: sa is a sockaddr_nl of the size passed.
            let rc = unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            assert!(rc == 0, "netlink bind: {}", std::io::Error::last_os_error());
            send(
                &fd,
                &message(
                    NFQNL_MSG_CONFIG,
                    NLM_F_REQUEST | NLM_F_ACK,
                    queue,
                    &[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])],
                ),
            );
            let mut params = 0u32.to_be_bytes().to_vec();
            params.push(NFQNL_COPY_META);
            send(&fd, &message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, &[(NFQA_CFG_PARAMS, &params)]));

            let mut held: VecDeque<(Instant, u32, bool)> = VecDeque::new();
            let (mut queued, mut dropped, mut acks) = (0u64, 0u64, 0u32);
            let mut ready = false;
            let mut next_stats = Instant::now() + Duration::from_secs(1);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let now = Instant::now();
                while let Some(&(due, id, drop)) = held.front() {
                    if due > now {
                        break;
                    }
                    held.pop_front();
                    let mut v = (if drop { NF_DROP } else { NF_ACCEPT }).to_be_bytes().to_vec();
                    v.extend_from_slice(&id.to_be_bytes());
                    send(&fd, &message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, queue, &[(NFQA_VERDICT_HDR, &v)]));
                }
                if now >= next_stats {
                    next_stats = now + Duration::from_secs(1);
                    report(json!({"queued": queued, "dropped": dropped}));
                }
                let wait = held.front().map(|h| h.0).unwrap_or(next_stats).min(next_stats);
                let timeout = wait.saturating_duration_since(Instant::now());
                let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // Round up: waking a little late is what a delay line may do, early is not.
                let ms = (timeout.as_micros() as i32 + 999) / 1000;
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                    continue;
                }
                // SAFETY: buf is valid for buf.len() bytes.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue; // ENOBUFS: the kernel dropped queued packets; netem would have too
                }
                let arrived = Instant::now();
                let mut off = 0usize;
                let n = n as usize;
                while off + 16 <= n {
                    let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                    let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                    if len < 16 || off + len > n {
                        break;
                    }
                    let msg = &buf[off..off + len];
                    if kind == NLMSG_ERROR {
                        let err = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
                        assert!(err == 0, "NFQUEUE config refused: errno {}", -err);
                        acks += 1;
                        if acks == 2 && !ready {
                            ready = true;
                            report(json!({"ready": true}));
                        }
                    } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                        let mut a = 20;
                        while a + 4 <= len {
                            let alen = u16::from_ne_bytes(msg[a..a + 2].try_into().unwrap()) as usize;
                            let atype = u16::from_ne_bytes(msg[a + 2..a + 4].try_into().unwrap()) & 0x3fff;
                            if alen < 4 {
                                break;
                            }
                            if atype == NFQA_PACKET_HDR {
                                let id = u32::from_be_bytes(msg[a + 4..a + 8].try_into().unwrap());
                                let drop = rand::random::<f64>() < loss;
                                queued += 1;
                                dropped += u64::from(drop);
                                held.push_back((arrived + delay, id, drop));
                            }
                            a += (alen + 3) & !3;
                        }
                    }
                    off += (len + 3) & !3;
                }
            }
        }
    }
}
