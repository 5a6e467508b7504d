//! `meshgate bench` works: briefly against a real Mosquitto and against meshgate in-process,
//! and `meshgate bench compare --smoke` against all four front ends. Nothing about speed is
//! asserted, only that the loads ran and their reports make sense.

mod common;

use std::time::Duration;

use common::Net;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

/// Runs `meshgate bench ARGS --json --quiet` and returns its report.
async fn bench(args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .arg("bench")
            .args(args)
            .args(["--json", "--quiet"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("meshgate bench finishes within 60 s")
    .expect("meshgate bench runs");
    assert!(out.status.success(), "meshgate bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path).and_then(Value::as_f64).unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

fn check_pubsub(r: &Value, what: &str) {
    assert_eq!(r["load"], "pubsub", "{what}");
    assert!(f(r, "/messages") > 0.0 && f(r, "/msgs_per_sec") > 0.0, "{what}: no messages: {r:#}");
    assert_eq!(f(r, "/errors/total"), 0.0, "{what}: errors: {r:#}");
    let (p50, p99, p999) = (f(r, "/latency/p50_us"), f(r, "/latency/p99_us"), f(r, "/latency/p999_us"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= f(r, "/latency/max_us"), "{what}: {r:#}");
    assert!(f(r, "/connect/count") >= 2.0, "{what}: {r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_against_mosquitto_and_meshgate() {
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let direct = net.brokers[0].addr.to_string();
    let proxied = mg.mqtt_addr().to_string();
    for (what, target) in [("direct", &direct), ("meshgate", &proxied)] {
        for qos in ["0", "1"] {
            let r = bench(&["pubsub", "--target", target, "--qos", qos, "--duration", "1s", "--warmup", "200ms"]).await;
            check_pubsub(&r, &format!("{what} QoS {qos}"));
            assert_eq!(f(&r, "/lost"), 0.0, "{what} QoS {qos}: {r:#}");
        }
    }
    // CPU time per message: meshgate runs in this test process; the broker is its own.
    let (me, broker) = (std::process::id().to_string(), net.brokers[0].pid().expect("broker runs").to_string());
    let r = bench(&["pubsub", "--target", &proxied, "--duration", "1s", "--pid", &me, "--broker-pid", &broker]).await;
    check_pubsub(&r, "with CPU time");
    for key in ["/cpu_us_per_msg", "/broker_cpu_us_per_msg"] {
        // Every message crosses both processes: some CPU per message, and far below a second.
        assert!((0.01..1_000_000.0).contains(&f(&r, key)), "{key}: {r:#}");
    }
    // Several publishers and subscribers, paced: the rate is kept.
    let r = bench(&["pubsub", "--target", &proxied, "-p", "4", "-s", "4", "--rate", "2000", "--duration", "1s"]).await;
    check_pubsub(&r, "paced 4x4");
    let rate = f(&r, "/msgs_per_sec");
    assert!((1000.0..3000.0).contains(&rate), "paced at 2000/s, measured {rate}: {r:#}");
    assert!(mg.pool().metrics.bytes.with_label_values(&["client_to_broker"]).get() > 0);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_and_idle_sessions_through_meshgate() {
    let net = Net::start(1);
    let mg = net.meshgate("").await;
    let target = mg.mqtt_addr().to_string();
    let r = bench(&["connect", "--target", &target, "--duration", "1s", "--concurrency", "4"]).await;
    assert_eq!(r["load"], "connect");
    assert!(f(&r, "/connects") > 0.0 && f(&r, "/connects_per_sec") > 0.0, "{r:#}");
    assert_eq!(f(&r, "/errors/total"), 0.0, "{r:#}");
    assert!(f(&r, "/latency/p50_us") <= f(&r, "/latency/p99_us"), "{r:#}");

    // meshgate runs in this test process, so its memory is this process's.
    let pid = std::process::id().to_string();
    let r = bench(&["idle", "--target", &target, "--sessions", "100", "--hold", "1s", "--pid", &pid]).await;
    assert_eq!(r["load"], "idle");
    assert_eq!((f(&r, "/sessions_open"), f(&r, "/alive_at_end")), (100.0, 100.0), "{r:#}");
    assert!(r["bytes_per_session"].is_number() && f(&r, "/rss_after_kib") > 0.0, "{r:#}");
    assert_eq!(f(&r, "/errors/total"), 0.0, "{r:#}");
    mg.shutdown().await;
}

/// The idle load over meshgate's TLS, WebSocket and secure WebSocket listeners: every session
/// opens and still answers at the end, with a memory figure (docs/benchmarks.md measures it
/// with 9,000; a WebSocket session was 144 KB before tungstenite's read buffer was cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_over_tls_and_websockets() {
    let net = Net::start(1);
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new(dir.path(), "ca");
    let ip = net.mqtt_addr().ip();
    let (cert, key) = ca.issue(dir.path(), "server", Some(ip), false);
    let (mqtts, ws, wss) = (net.slot.addr(1, 8883), net.slot.addr(1, 8083), net.slot.addr(1, 8084));
    let mg = net
        .meshgate(&format!(
            "mqtts = \"{mqtts}\"\nws = \"{ws}\"\nwss = \"{wss}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ))
        .await;
    let (ca, pid, name) = (dir.path().join("ca.pem"), std::process::id().to_string(), ip.to_string());
    for (transport, target) in [("tls", mqtts), ("ws", ws), ("wss", wss)] {
        let target = target.to_string();
        let args = ["idle", "--target", &target, "--transport", transport, "--sessions", "20", "--hold", "1s"];
        let more = ["--ca", ca.to_str().unwrap(), "--tls-name", &name, "--pid", &pid];
        let r = bench(&[&args[..], &more[..]].concat()).await;
        assert_eq!(r["transport"], transport, "{r:#}");
        assert_eq!((f(&r, "/sessions_open"), f(&r, "/alive_at_end")), (20.0, 20.0), "{transport}: {r:#}");
        assert!(r["bytes_per_session"].is_number(), "{transport}: {r:#}");
        assert_eq!(f(&r, "/errors/total"), 0.0, "{transport}: {r:#}");
    }
    let accepted = |l: &str| mg.pool().metrics.accepted.with_label_values(&[l]).get();
    assert_eq!((accepted("mqtts"), accepted("ws"), accepted("wss")), (20, 20, 20));
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_load_times_the_reconnects() {
    let mut net = Net::start(2);
    let mg = net.meshgate("").await;
    let target = mg.mqtt_addr().to_string();
    let pid = net.broker("broker1").pid().expect("broker1 runs").to_string();
    let r = bench(&["failover", "--target", &target, "--clients", "50", "--hang-pid", &pid, "--deadline", "5s"]).await;
    assert_eq!(r["load"], "failover");
    assert_eq!(f(&r, "/connected_before"), 50.0, "{r:#}");
    // meshgate notices the hung primary and switches its sessions to broker2 under the
    // clients' connections: every client is served again, none had to reconnect.
    assert_eq!(f(&r, "/reconnected"), 50.0, "{r:#}");
    assert_eq!(f(&r, "/kept_session"), 50.0, "{r:#}");
    assert!(f(&r, "/all_reconnected_s") < 5.0, "{r:#}");
    assert_eq!(r["timeline"].as_array().map(Vec::len), Some(50), "{r:#}");
    // The bench resumed the broker it stopped.
    common::blocking(|| net.broker("broker1").resume());
    mg.shutdown().await;
}

/// The comparison's CI mode: every front end (Mosquitto directly, nginx, HAProxy, meshgate)
/// answers every load once for about a second. Needs nginx's stream module and HAProxy.
#[test]
fn compare_smoke_runs_every_load_against_every_front_end() {
    let installed = |bin: &str| {
        ["/usr/sbin", "/usr/bin", "/usr/local/sbin"].iter().any(|d| std::path::Path::new(d).join(bin).exists())
    };
    assert!(
        installed("haproxy") && installed("nginx"),
        "the benchmark comparison needs HAProxy and nginx: install them with `scripts/deps test` (or `sudo apt-get install -y haproxy nginx libnginx-mod-stream`)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["bench", "compare", "--smoke", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("meshgate bench compare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare --smoke failed:\n{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    let results: Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("benchmarks.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    // 7 loads x 4 front ends + failover x 3 proxies + meshgate's TLS and WebSocket idle loads.
    assert_eq!(runs.len(), 33, "{stderr}");
    assert!(runs.iter().all(|r| r["report"].is_object() && r["error"].is_null()), "{stderr}");
    for load in ["idle_tls", "idle_ws"] {
        let run = runs.iter().find(|r| r["load"] == load).unwrap_or_else(|| panic!("no {load} run: {stderr}"));
        assert_eq!(run["front_end"], "meshgate");
        let idle = &run["report"];
        assert_eq!(idle["alive_at_end"], idle["sessions_requested"], "{load}: {run:#}");
    }
    let md = std::fs::read_to_string(out_dir.path().join("benchmarks.md")).unwrap();
    for fe in ["direct", "nginx", "HAProxy", "meshgate", "meshgate / nginx"] {
        assert!(md.contains(fe), "benchmarks.md lacks {fe}:\n{md}");
    }
    for svg in ["benchmarks-throughput.svg", "benchmarks-latency.svg", "benchmarks-failover.svg"] {
        let text = std::fs::read_to_string(out_dir.path().join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg}");
    }
}

/// `compare --coordination --smoke`: meshgate without and with `[coordination]`, in front of
/// the same Mosquitto, against a real etcd the bench starts; every load once for about a
/// second. Both rows come out with rates, etcd's CPU time is reported apart, the claims reached
/// etcd, and an existing page keeps what is outside the section. Needs Debian's etcd-server.
#[test]
fn compare_coordination_smoke_measures_off_and_on() {
    assert!(
        std::path::Path::new("/usr/bin/etcd").exists(),
        "the coordination comparison needs etcd: install it with `scripts/deps test` (Debian package etcd-server)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let md_path = out_dir.path().join("benchmarks.md");
    let kept =
        "# page\n\n<!-- bench-compare:begin (x) -->\nthe four front ends\n<!-- bench-compare:end -->\n\nby hand\n";
    std::fs::write(&md_path, kept).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["bench", "compare", "--coordination", "--smoke", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("meshgate bench compare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare --coordination --smoke failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let results: Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("benchmarks-coordination.json")).unwrap()).unwrap();
    assert_eq!(results["settings"]["coordination"], true);
    let runs = results["runs"].as_array().unwrap();
    // qos0, qos1, connect x off and on.
    assert_eq!(runs.len(), 6, "{stderr}");
    for r in runs {
        assert!(r["report"].is_object() && r["error"].is_null(), "{r:#}\n{stderr}");
        let on = match r["front_end"].as_str() {
            Some("meshgate") => false,
            Some("meshgate_etcd") => true,
            other => panic!("front end {other:?}: {r:#}"),
        };
        let rep = &r["report"];
        match rep["load"].as_str() {
            Some("pubsub") => {
                assert!(f(rep, "/msgs_per_sec") > 0.0 && f(rep, "/cpu_us_per_msg") > 0.0, "{r:#}");
                assert_eq!(rep["etcd_cpu_us_per_msg"].is_number(), on, "etcd CPU only with coordination: {r:#}");
            }
            Some("connect") => {
                assert!(f(rep, "/connects_per_sec") > 0.0 && f(rep, "/cpu_us_per_connect") > 0.0, "{r:#}");
                assert!(f(rep, "/latency/p50_us") <= f(rep, "/latency/p99_us"), "{r:#}");
                // Measured by the comparison until the last claim was written, too.
                assert!(f(r, "/coordination/meshgate_cpu_ns") > 0.0, "{r:#}");
                if on {
                    // etcd applied every CONNECT's claim and release, and spent CPU on them.
                    assert!(f(rep, "/etcd_cpu_us_per_connect") > 0.0, "{r:#}");
                    assert!(f(r, "/coordination/etcd_cpu_ns") > 0.0, "{r:#}");
                    let (puts, connects) = (f(r, "/coordination/etcd_writes/puts"), f(rep, "/connects"));
                    assert!(puts >= connects, "{puts} puts for {connects} CONNECTs: {r:#}");
                    assert!(f(r, "/coordination/etcd_writes/deletes") > 0.0, "{r:#}");
                }
            }
            other => panic!("load {other:?}: {r:#}"),
        }
        // What reached etcd is read only where there is an etcd.
        assert_eq!(r["coordination"]["etcd_writes"].is_object(), on, "{r:#}");
    }
    let md = std::fs::read_to_string(&md_path).unwrap();
    assert!(md.starts_with(kept.trim_end()), "the rest of the page was changed:\n{md}");
    for text in [
        "## Coordination through etcd: on vs off",
        "coordination off",
        "coordination on",
        "on / off",
        "etcd CPU per CONNECT",
        "CONNECT→CONNACK p99",
        "<!-- bench-coordination:end -->",
    ] {
        assert!(md.contains(text), "benchmarks.md lacks {text}:\n{md}");
    }
    let svg = std::fs::read_to_string(out_dir.path().join("benchmarks-coordination-cpu.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// `compare --beside`: a second generator holds idle sessions through the front end during
/// each run and lets them go before the next; `--pin off` says in the report that nothing was
/// pinned. Its own addresses (127.200.5.x), so it runs beside the other comparisons.
#[test]
fn compare_holds_idle_sessions_beside_each_run() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["bench", "compare", "--smoke", "--pin", "off", "--beside", "300", "--net", "127.200.5"])
        .args(["--loads", "qos0,connect", "--front-ends", "meshgate", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("meshgate bench compare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare --beside failed:\n{stderr}");
    let results: Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("benchmarks.json")).unwrap()).unwrap();
    assert_eq!(results["settings"]["beside"], 300);
    assert!(results["settings"]["placement"].is_null(), "{:#}", results["settings"]);
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{stderr}");
    assert!(runs.iter().all(|r| r["report"].is_object() && r["error"].is_null()), "{stderr}");
    let md = std::fs::read_to_string(out_dir.path().join("benchmarks.md")).unwrap();
    for text in ["not pinned (`--pin off`)", "300 idle sessions were held through the front end"] {
        assert!(md.contains(text), "benchmarks.md lacks {text}:\n{md}");
    }
}
