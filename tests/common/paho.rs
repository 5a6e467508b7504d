//! Client scripts in child processes, their JSON lines handed to the test: paho-mqtt in python3 (tests/sessions/paho_sub.py, a persistent subscriber, MQTT 3.1.1 or 5; tests/coordination/paho_list.py, one with an address list; tests/ws/paho_ws.py over WebSockets) and MQTT.js in node (tests/ws/mqttjs_client.js). The paho scripts share their event lines and subscribe-once logic (tests/paho_callbacks.py).

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts the subscriber on `filter` through `addr`; `version` is "4" or "5". Each line it
/// prints (a CONNACK, a SUBACK, a message) goes to `on_line`. The child dies with the handle.
pub fn spawn_sub(
    addr: std::net::SocketAddr,
    id: &str,
    filter: &str,
    version: &str,
    on_line: impl FnMut(serde_json::Value) + Send + 'static,
) -> tokio::process::Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sessions/paho_sub.py");
    spawn(script, &[&addr.ip().to_string(), &addr.port().to_string(), id, filter, version], on_line)
}

/// Runs a paho-mqtt script (a path under tests/) with `args`; each JSON line it prints goes to
/// `on_line`. The child dies with the handle.
pub fn spawn(
    script: &str,
    args: &[&str],
    on_line: impl FnMut(serde_json::Value) + Send + 'static,
) -> tokio::process::Child {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "paho-mqtt is not installed for python3: run `scripts/deps test`");
    spawn_with("python3", script, args, &[], on_line)
}

/// Runs an MQTT.js script (a path under tests/ws/, where `scripts/deps test` installs MQTT.js)
/// with node; each JSON line it prints goes to `on_line`. The child dies with the handle.
pub fn spawn_node(
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    on_line: impl FnMut(serde_json::Value) + Send + 'static,
) -> tokio::process::Child {
    let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/node_modules/mqtt");
    assert!(std::path::Path::new(modules).exists(), "MQTT.js is not installed in tests/ws: run `scripts/deps test`");
    spawn_with("node", script, args, env, on_line)
}

fn spawn_with(
    program: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    mut on_line: impl FnMut(serde_json::Value) + Send + 'static,
) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(program)
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let out = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            on_line(serde_json::from_str(&line).expect("a client script prints JSON"));
        }
    });
    child
}
