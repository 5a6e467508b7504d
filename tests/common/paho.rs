//! tests/sessions/paho_sub.py: a persistent paho-mqtt subscriber (MQTT 3.1.1 or 5) in a python3 child process, its JSON lines handed to the test.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts the subscriber on `filter` through `addr`; `version` is "4" or "5". Each line it
/// prints (a CONNACK, a SUBACK, a message) goes to `on_line`. The child dies with the handle.
pub fn spawn_sub(
    addr: std::net::SocketAddr,
    id: &str,
    filter: &str,
    version: &str,
    mut on_line: impl FnMut(serde_json::Value) + Send + 'static,
) -> tokio::process::Child {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "paho-mqtt is not installed for python3: run `scripts/deps test`");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sessions/paho_sub.py");
    let mut child = tokio::process::Command::new("python3")
        .args([script, &addr.ip().to_string(), &addr.port().to_string(), id, filter, version])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let out = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            on_line(serde_json::from_str(&line).expect("paho_sub.py prints JSON"));
        }
    });
    child
}
