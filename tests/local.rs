//! The local system commands as a user runs them: `cluster up|status|down` with pid files, and `up` with either front end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt as raw;
use common::Slot;

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

/// A config for `brokers` brokers on the slot's addresses, written into a temp dir that also
/// holds the run directory.
struct Setup {
    slot: Slot,
    dir: tempfile::TempDir,
    config: String,
    run: String,
}

impl Setup {
    fn new(brokers: usize) -> Setup {
        let slot = Slot::acquire();
        let dir = tempfile::tempdir().unwrap();
        let text = common::slot_config_text(&slot, brokers, "", "");
        let config = dir.path().join("meshgate.toml");
        std::fs::write(&config, text).unwrap();
        let run = dir.path().join("run").display().to_string();
        Setup { slot, config: config.display().to_string(), run, dir }
    }

    fn meshgate(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", &self.config, "--run-dir", &self.run]);
        let out = Command::new(BIN).args(&all).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// Every number printed after the word "pid".
    fn pids(&self, text: &str) -> Vec<u32> {
        let words: Vec<&str> = text.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "pid").filter_map(|w| w[1].parse().ok()).collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Detached brokers outlive a failed test otherwise.
        let _ = Command::new(BIN).args(["cluster", "down", "--config", &self.config, "--run-dir", &self.run]).output();
        let _ = &self.dir;
    }
}

/// Ctrl-C to `meshgate up`, and its exit status once it has stopped (deadline 15 s).
async fn ctrl_c(child: &mut std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "up did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_status_down_work_from_separate_processes() {
    let s = Setup::new(3);
    let (code, out, err) = s.meshgate(&["cluster", "up"]);
    assert_eq!(code, 0, "{out}{err}");
    let pids = s.pids(&out);
    assert_eq!(pids.len(), 3, "{out}");
    for i in 0..3u8 {
        let (_c, ack) = raw::connect(s.slot.addr(10 + i, 1883), 4, "t", Duration::from_secs(2)).await.unwrap();
        assert_eq!(ack.code, 0);
    }
    let (code, out, _) = s.meshgate(&["cluster", "status"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().filter(|l| l.ends_with(" answers")).count(), 3, "{out}");
    for pid in &pids {
        assert!(out.contains(&pid.to_string()), "status shows pid {pid}: {out}");
    }
    // Starting again while they run says so in one line.
    let (code, _, err) = s.meshgate(&["cluster", "up"]);
    assert_eq!(code, 1);
    assert!(
        err.trim().lines().count() == 1 && err.contains("already answering") && err.contains("meshgate cluster down"),
        "{err}"
    );

    let (code, out, _) = s.meshgate(&["cluster", "down"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("stopped (pid").count(), 3, "{out}");
    for pid in &pids {
        assert!(!alive(*pid), "pid {pid} gone");
    }
    let (_, out, _) = s.meshgate(&["cluster", "status"]);
    assert_eq!(out.lines().filter(|l| l.ends_with("no answer")).count(), 3, "{out}");
}

/// Runs `meshgate up`, waits for its summary, connects through the front end, then Ctrl-C.
async fn up_and_interrupt(front_end: &str) {
    let s = Setup::new(2);
    let mut child = Command::new(BIN)
        .args(["up", "--front-end", front_end, "--config", &s.config, "--run-dir", &s.run])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut summary = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !summary.contains("Ctrl-C stops everything") {
        let left = deadline.checked_duration_since(Instant::now()).expect("summary printed within 20 s");
        summary.push_str(&rx.recv_timeout(left).expect("summary"));
        summary.push('\n');
    }
    assert!(summary.contains(&format!("front    {front_end}")), "{summary}");
    assert!(summary.contains("mosquitto_pub -h"), "{summary}");
    let pids = s.pids(&summary);
    assert!(pids.len() >= 2, "{summary}");

    let (_c, ack) = raw::connect(s.slot.addr(1, 1883), 4, "through-front", Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.code, 0);

    assert!(ctrl_c(&mut child).await.success());
    for pid in pids {
        assert!(!alive(pid), "pid {pid} left behind after Ctrl-C");
    }
    assert!(tokio::net::TcpStream::connect(s.slot.addr(1, 1883)).await.is_err(), "front end gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_meshgate_stops_everything_on_ctrl_c() {
    up_and_interrupt("meshgate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_nginx_stops_everything_on_ctrl_c() {
    up_and_interrupt("nginx").await;
}

/// Outside a checkout (no configs/meshgate.toml), `meshgate up` runs the built-in five-broker
/// network and says so; its state goes to run/ where it was started. Uses the local network's
/// fixed addresses (127.0.0.1 and 127.0.0.10..14:1883), so it skips, saying why, when another
/// local system holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_outside_a_checkout_runs_the_built_in_network() {
    if std::net::TcpListener::bind("127.0.0.1:1883").is_err() || std::net::TcpListener::bind("127.0.0.1:8080").is_err()
    {
        eprintln!("skipped: 127.0.0.1:1883 or :8080 is taken (a local system runs here)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("up")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("Ctrl-C stops everything") {
        let left = deadline.checked_duration_since(Instant::now()).unwrap_or_else(|| panic!("no summary:\n{seen}"));
        seen.push_str(&rx.recv_timeout(left).unwrap_or_else(|_| panic!("no summary:\n{seen}")));
        seen.push('\n');
    }
    assert!(seen.contains("configs/meshgate.toml not found: running the built-in local network"), "{seen}");
    let (_c, ack) =
        raw::connect("127.0.0.1:1883".parse().unwrap(), 4, "built-in", Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.code, 0);
    assert!(ctrl_c(&mut child).await.success());
    assert!(dir.path().join("run").is_dir(), "state and broker files under run/ where it started");
    assert!(dir.path().join("run/access.log").is_file(), "the access log where the built-in config puts it");
}

/// `meshgate up` as a child process; whatever happens to the test, it is interrupted when
/// dropped (killed if it does not stop), and so is anything it started that is still running.
struct Up {
    child: std::process::Child,
    run: String,
}

impl Up {
    /// Every process (other than this test) whose command line names the run directory: `up`
    /// itself (`--run-dir`), its brokers (`-c <run>/brokerN.conf`) and etcd (`--data-dir <run>/etcd`).
    fn processes_of_the_run(&self) -> Vec<(u32, String)> {
        let canonical = std::fs::canonicalize(&self.run).map(|p| p.display().to_string()).unwrap_or(self.run.clone());
        let me = std::process::id();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if pid != me && alive(pid) && (cmd.contains(&self.run) || cmd.contains(&canonical)) {
                found.push((pid, cmd));
            }
        }
        found
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for (pid, _) in self.processes_of_the_run() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// A plain HTTP/1.0 GET; the body, or `None` when nothing answered.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
}

/// `meshgate up --instances 2`: etcd, the brokers and two instances on the test's own addresses
/// (instance i on the slot's address i, HTTP on 8080 + i - 1, etcd on the first address's port
/// 2389, all derived from the config); both instances see both and the same single leader, a
/// message published through instance 2 arrives through instance 1, and Ctrl-C leaves no
/// process of the run and no port taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_two_instances_elects_one_leader_and_ctrl_c_stops_etcd_brokers_and_instances() {
    let s = Setup::new(2);
    let child = Command::new(BIN)
        .args(["up", "--instances", "2", "--config", &s.config, "--run-dir", &s.run])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Up { child, run: s.run.clone() };
    let stdout = up.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut summary = String::new();
    // etcd's first start, the brokers, two instances and an election on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !summary.contains("Ctrl-C stops everything") {
        let left = deadline.checked_duration_since(Instant::now()).unwrap_or_else(|| panic!("no summary:\n{summary}"));
        summary.push_str(&rx.recv_timeout(left).unwrap_or_else(|_| panic!("no summary:\n{summary}")));
        summary.push('\n');
    }
    let (m1, m2) = (s.slot.addr(1, 1883), s.slot.addr(2, 1883));
    let (h1, h2) = (s.slot.addr(1, 8080), s.slot.addr(2, 8081));
    let (etcd, etcd_peer) = (s.slot.addr(1, 2389), s.slot.addr(1, 2390));
    for shown in ["meshgate-1", "meshgate-2", &m1.to_string(), &m2.to_string(), &h2.to_string(), &etcd.to_string()] {
        assert!(summary.contains(shown), "the summary shows {shown}:\n{summary}");
    }
    assert_eq!(summary.matches("leads replication").count(), 1, "one leader named:\n{summary}");
    let pids = s.pids(&summary);
    assert!(pids.len() >= 4, "etcd, two brokers and up itself: {summary}");

    // Each instance's own view: both instances, one leader, the same one.
    let mut leaders = Vec::new();
    for http in [h1, h2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view =
                http_get(http, "/instances").await.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
            let list = view.as_ref().and_then(|v| v["instances"].as_array().cloned()).unwrap_or_default();
            let leading: Vec<String> =
                list.iter().filter(|i| i["leader"] == true).map(|i| i["name"].to_string()).collect();
            if list.len() == 2 && leading.len() == 1 {
                leaders.push(leading[0].clone());
                break;
            }
            assert!(Instant::now() < deadline, "{http}/instances shows 2 instances and exactly one leader: {view:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(leaders[0], leaders[1], "both instances name the same leader");

    // Through instance 2 in, through instance 1 out.
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let sub =
        common::subscribed(m1, "sub-through-1", "demo/#", move |p| g.lock().unwrap().push(p.payload.to_vec())).await;
    let (mut publisher, ack) = raw::connect(m2, 4, "pub-through-2", Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.code, 0);
    use tokio::io::AsyncWriteExt;
    publisher.write_all(&raw::publish_packet("demo/hello", b"through-2", 1, 1, false)).await.unwrap();
    let arrived =
        raw::wait_until(Duration::from_secs(5), || got.lock().unwrap().iter().any(|p| p == b"through-2")).await;
    assert!(arrived.is_some(), "published through instance 2, received through instance 1");
    sub.abort();
    drop(publisher);

    assert!(ctrl_c(&mut up.child).await.success());
    for pid in pids {
        assert!(!alive(pid), "pid {pid} left behind after Ctrl-C");
    }
    let left = up.processes_of_the_run();
    assert!(left.is_empty(), "processes of the run left after Ctrl-C: {left:?}");
    for addr in [m1, m2, h1, h2, etcd, etcd_peer, s.slot.addr(10, 1883), s.slot.addr(11, 1883)] {
        assert!(std::net::TcpListener::bind(addr).is_ok(), "{addr} is free after Ctrl-C");
    }
}

/// A taken etcd port is one line naming it, and nothing of the run is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_instances_says_in_one_line_when_the_etcd_port_is_taken() {
    let s = Setup::new(1);
    let _taken = std::net::TcpListener::bind(s.slot.addr(1, 2389)).unwrap();
    let (code, out, err) = s.meshgate(&["up", "--instances", "2"]);
    assert_eq!(code, 1, "{out}{err}");
    let err = err.trim();
    assert!(err.lines().count() == 1 && err.contains("2389") && err.contains("taken"), "{err}");
}
