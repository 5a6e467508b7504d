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
