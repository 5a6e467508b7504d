//! The binary as operators meet it: one-line errors with exit codes, JSON logs, SIGHUP reloads, SIGTERM.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mqtt as raw;
use common::Net;

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

fn meshgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("meshgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn write_config(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Asserts stderr is exactly one line, an error, no panic or backtrace.
fn one_line_error(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{stderr}");
    assert!(lines[0].starts_with("meshgate: error: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    lines[0]
}

#[test]
fn config_mistakes_get_one_clear_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let broker = "[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n";
    let cases = [
        (
            "unknown-key",
            format!("[health]\nintervall = \"1s\"\n{broker}"),
            "line 2 in [health]: unknown field `intervall`",
        ),
        ("bad-duration", format!("[health]\ninterval = \"fast\"\n{broker}"), "health.interval: bad duration \"fast\""),
        ("no-brokers", "[listen]\nmqtt = \"127.0.0.1:1883\"\n".to_string(), "no brokers configured"),
        ("not-toml", "[[broker]\nname = \n".to_string(), "line 1"),
    ];
    for (name, text, expect) in cases {
        let path = write_config(&dir, &format!("{name}.toml"), &text);
        for sub in ["run", "validate"] {
            let (code, _, stderr) = meshgate(&[sub, "--config", &path]);
            assert_eq!(code, 2, "{name}/{sub}: {stderr}");
            let line = one_line_error(&stderr);
            assert!(line.contains(expect), "{name}: {line:?} lacks {expect:?}");
            assert!(line.contains(&path), "{name}: names the file: {line}");
        }
    }
    let (code, _, stderr) = meshgate(&["run", "--config", "/nonexistent/meshgate.toml"]);
    assert_eq!(code, 2);
    assert!(one_line_error(&stderr).contains("cannot read config file /nonexistent/meshgate.toml"));
}

#[test]
fn nginx_conf_mistakes_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "bad.conf",
        "stream {\n upstream u {\n  server 127.0.0.10:1883 wieght=5;\n }\n server { listen 1883; proxy_pass u; }\n}\n",
    );
    let (code, _, stderr) = meshgate(&["validate", "--nginx-conf", &path]);
    assert_eq!(code, 2);
    let line = one_line_error(&stderr);
    assert!(line.contains("line 3") && line.contains("wieght=5"), "{line}");
}

#[test]
fn shipped_nginx_conf_runs_unchanged() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (code, stdout, stderr) = meshgate(&["validate", "--nginx-conf", &format!("{root}/nginx/meshgate-stream.conf")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("4 backup server(s) become sequential tiers 2..5 in file order"), "{stderr}");
    for (i, line) in stdout.lines().filter(|l| l.starts_with("broker ")).enumerate() {
        assert!(line.contains(&format!("127.0.0.{}:1883", 10 + i)), "{line}");
        assert!(line.contains(&format!("priority {}", i + 1)), "{line}");
        assert!(line.contains("max_fails 3 fail_timeout 30s"), "{line}");
    }
    assert!(stdout.contains("listen mqtt 127.0.0.1:1883"));
}

#[test]
fn taken_port_is_one_line_with_a_hint() {
    let slot = common::Slot::acquire();
    let taken = std::net::TcpListener::bind(slot.addr(1, 1883)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "m.toml",
        &format!(
            "[listen]\nmqtt = \"{}\"\nhttp = \"{}\"\n[[broker]]\nname = \"b\"\naddress = \"{}\"\n",
            taken.local_addr().unwrap(),
            slot.addr(1, 8080),
            slot.addr(10, 1883)
        ),
    );
    let (code, _, stderr) = meshgate(&["run", "--config", &path]);
    assert_eq!(code, 1);
    let line = one_line_error(&stderr);
    assert!(line.contains(&format!("cannot listen for MQTT on {}", taken.local_addr().unwrap())), "{line}");
    assert!(line.contains("another process holds this port"), "{line}");
}

/// A meshgate child process that is killed if the test fails.
struct Daemon {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(BIN).args(args).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = common::stderr_lines(&mut child);
        Daemon { child, stderr }
    }

    /// Waits for a log line containing `needle`; returns every line seen up to it.
    fn wait_log(&self, needle: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {needle:?} within {limit:?}; saw:\n{}", seen.join("\n"));
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("meshgate did not exit within {limit:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_sighup_reload_and_sigterm() {
    use nix::sys::signal::Signal;
    let net = Net::start(2);
    let dir = tempfile::tempdir().unwrap();
    let extra = "[proxy]\nshutdown_grace = \"300ms\"\n";
    let path = write_config(&dir, "m.toml", &net.config_text(extra));
    let mut d = Daemon::start(&["run", "--config", &path, "--log-format", "json"]);
    let lines = d.wait_log("meshgate started", Duration::from_secs(5));
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{l}");
    }

    // An established session survives both reloads.
    let (mut s, ack) = raw::connect(net.mqtt_addr(), 4, "survivor", Duration::from_secs(3)).await.unwrap();
    assert_eq!(ack.code, 0);

    // An invalid file is refused, the old config stays.
    std::fs::write(&path, "[[broker]]\nname = \"x\"\n").unwrap();
    d.signal(Signal::SIGHUP);
    let lines = d.wait_log("reload refused", Duration::from_secs(5));
    assert!(lines.last().unwrap().contains("broker[1].address: missing"), "{:?}", lines.last());

    // A valid one is applied: broker2 becomes the only broker.
    let mut text = format!("[listen]\nmqtt = \"{}\"\nhttp = \"{}\"\n{extra}", net.mqtt_addr(), net.http_addr());
    text.push_str(&format!("[[broker]]\nname = \"broker2\"\naddress = \"{}\"\n", net.brokers[1].addr));
    std::fs::write(&path, text).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("configuration reloaded: 1 broker(s)", Duration::from_secs(5));

    // The old session on broker1 (now removed) is still forwarded until the rebalancer moves
    // it; a PINGREQ gets its PINGRESP or the session was closed cleanly.
    use tokio::io::AsyncWriteExt;
    s.write_all(&raw::pingreq_packet()).await.unwrap();
    let reply = raw::read_packet(&mut s, Duration::from_secs(2)).await;
    assert!(matches!(reply, Ok((0xd0, _))) || raw::closed_within(&mut s, Duration::from_millis(10)).await, "{reply:?}");

    d.signal(Signal::SIGTERM);
    let code = d.wait_exit(Duration::from_secs(5));
    assert_eq!(code, 0);
}

/// Exit codes: 2 for every mistake in how meshgate is configured or called, 1 for a failure of
/// the machine's state (a port someone else holds), each with one line.
#[test]
fn configuration_mistakes_exit_2_and_machine_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let slot = common::Slot::acquire();
    let broker = format!("[[broker]]\nname = \"b\"\naddress = \"{}\"\n", slot.addr(10, 1883));
    let listen = format!("[listen]\nmqtt = \"{}\"\nhttp = \"off\"\n", slot.addr(1, 1883));
    // A certificate file that is not there: found when meshgate starts, still the config's fault.
    let tls = write_config(
        &dir,
        "tls.toml",
        &format!(
            "{}mqtts = \"{}\"\n[tls]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n{broker}",
            listen,
            slot.addr(1, 8883)
        ),
    );
    let bad_log_dir = write_config(&dir, "not-a-dir", "");
    let access = write_config(
        &dir,
        "access.toml",
        &format!("{listen}[access_log]\npath = \"{bad_log_dir}/access.log\"\n{broker}"),
    );
    let cwd = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["run"], "no configuration given"),
        (&["--log-level", "verbose", "validate", "--config", &tls], "\"verbose\" is not a level"),
        (&["--log-level", "info[", "validate", "--config", &tls], "--log-level"),
        (&["run", "--config", &tls], "missing.pem"),
        (&["run", "--config", &access], "access log"),
    ];
    for (args, expect) in cases {
        let out = Command::new(BIN).args(args).current_dir(cwd).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let line = one_line_error(&stderr);
        assert!(line.contains(expect), "{args:?}: {line:?} lacks {expect:?}");
    }
    // A port another process holds is the machine's state, not the config: 1.
    let holder = std::net::TcpListener::bind(slot.addr(1, 1883)).unwrap();
    let ok = write_config(&dir, "ok.toml", &format!("{listen}{broker}"));
    let (code, _, stderr) = meshgate(&["run", "--config", &ok]);
    assert_eq!(code, 1, "{stderr}");
    assert!(one_line_error(&stderr).contains("cannot listen for MQTT"), "{stderr}");
    drop(holder);
}

/// Relative paths in a config file are relative to the file's directory, wherever meshgate
/// was started from; `validate --print` shows where they point.
#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("etc");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("meshgate.toml");
    std::fs::write(
        &conf,
        "[sessions]\nstate_file = \"state/sessions.json\"\n[replication]\nstate_file = \"/abs/repl.json\"\n\
         [access_log]\npath = \"../log/access.log\"\n[[broker]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--print", "--config", conf.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let sessions = conf_dir.join("state/sessions.json");
    assert!(printed.contains(&format!("state_file = \"{}\"", sessions.display())), "{printed}");
    assert!(printed.contains("state_file = \"/abs/repl.json\""), "absolute paths stay: {printed}");
    assert!(printed.contains(&format!("path = \"{}\"", conf_dir.join("../log/access.log").display())), "{printed}");
}

/// `validate --print` is the whole effective configuration: defaults filled in, secrets
/// masked, and itself a configuration that prints the same again.
#[test]
fn validate_print_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = format!("{root}/configs/meshgate.toml");
    let with_secrets = std::fs::read_to_string(&shipped).unwrap().replace(
        "[health]",
        "[admin]\ntoken = \"s3cret-token\"\n[health]\nusername = \"probe\"\npassword = \"hunter2\"",
    );
    let first = write_config(&dir, "first.toml", &with_secrets);
    let (code, printed, stderr) = meshgate(&["validate", "--print", "--config", &first]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!printed.contains("s3cret-token") && !printed.contains("hunter2"), "secrets masked: {printed}");
    for key in ["client_connect_timeout = \"10s\"", "max_connections = 0", "[access_log]", "token = \"(masked)\""] {
        assert!(printed.contains(key), "defaults filled in: {key} missing from\n{printed}");
    }
    let second = write_config(&dir, "second.toml", &printed);
    let (code, again, stderr) = meshgate(&["validate", "--print", "--config", &second]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again, printed, "printing the printout gives the same text");
}

/// With `--log-level warn` an operator sees what needs acting on and nothing else: a broker
/// down, the failover, a total outage as an error, a refused reload as one error, each once;
/// clients that a retry served, or that meshgate moved, do not fill the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_are_the_events_an_operator_must_act_on() {
    let mut net = Net::start(2);
    let dir = tempfile::tempdir().unwrap();
    let extra = "[proxy]\nshutdown_grace = \"300ms\"\n[health]\ninterval = \"100ms\"\n";
    let path = write_config(&dir, "m.toml", &net.config_text(extra));
    let d = Daemon::start(&["run", "--config", &path, "--log-format", "json", "--log-level", "warn"]);
    // Nothing at warn on a healthy start (no line to wait for: wait until it listens), and a
    // client connects and works.
    let addr = net.mqtt_addr();
    let mut listening = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(listening, "meshgate listens within 5 s");
    let (_s, ack) = raw::connect(net.mqtt_addr(), 4, "quiet", Duration::from_secs(5)).await.unwrap();
    assert_eq!(ack.code, 0);
    common::blocking(|| net.broker("broker1").kill());
    // The sessions' lost connections or the probes tell first; both are logged.
    let mut seen = d.wait_log("new clients now go to broker2 (was broker1)", Duration::from_secs(5));
    if !seen.iter().any(|l| l.contains("broker1 is down")) {
        seen.extend(d.wait_log("broker1 is down", Duration::from_secs(5)));
    }
    // Clients reconnecting through the failover are served by broker2 without a warning.
    for i in 0..5 {
        let (_c, ack) = raw::connect(net.mqtt_addr(), 4, &format!("after-{i}"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(ack.code, 0);
    }
    common::blocking(|| net.broker("broker2").kill());
    let mut seen = [seen, d.wait_log("no broker is available", Duration::from_secs(5))].concat();
    std::fs::write(&path, "[[broker]]\nname = \"x\"\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    seen.extend(d.wait_log("reload refused", Duration::from_secs(5)));
    let parsed: Vec<serde_json::Value> =
        seen.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let with = |needle: &str| -> Vec<&serde_json::Value> {
        parsed.iter().filter(|v| v["message"].as_str().unwrap_or("").contains(needle)).collect()
    };
    let level = |v: &serde_json::Value| v["level"].as_str().unwrap_or("").to_string();
    let down = with("broker1 is down");
    assert_eq!(down.len(), 1, "broker1 down logged once: {seen:#?}");
    assert_eq!(level(down[0]), "WARN");
    assert_eq!(level(with("new clients now go to broker2")[0]), "WARN");
    let outage = with("no broker is available");
    assert_eq!((outage.len(), level(outage[0])), (1, "ERROR".to_string()), "{seen:#?}");
    let refused = with("reload refused");
    assert_eq!((refused.len(), level(refused[0])), (1, "ERROR".to_string()), "one line for a refused reload");
    for v in &parsed {
        let text = v.to_string();
        assert!(matches!(level(v).as_str(), "WARN" | "ERROR"), "{text}");
        assert!(!text.contains("Some(") && !text.contains("None"), "Rust debug text in the log: {text}");
        assert!(!text.contains("after-"), "no line per client: {text}");
    }
}
