//! The Grafana dashboard (deploy/grafana/meshgate.json) and the Prometheus alert rules (deploy/prometheus/alerts.yml): promtool checks and unit-tests the rules and parses every dashboard query, and every metric either names is found in a live /metrics of meshgate with replication, persistent sessions and [coordination] on a real etcd, in front of real Mosquitto.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::Net;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RULES: &str = "deploy/prometheus/alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/meshgate.json";
const PROMTOOL: &str = "/usr/bin/promtool";
/// Series born with their first observation (probe histograms, lag, links) need a few probe
/// rounds at the 100 ms / 200 ms intervals below; a name still missing after this is not exported.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(20);
/// Metric families meshgate's process exports besides its own `meshgate_*`.
const PREFIXES: &[&str] = &["meshgate_", "process_"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) -> (bool, String) {
    assert!(Path::new(PROMTOOL).exists(), "{PROMTOOL} is missing: run `scripts/deps test` (Debian package prometheus)");
    let out =
        Command::new(PROMTOOL).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// ---- what the files name ------------------------------------------------------

/// Metric names in a PromQL expression: identifiers with one of `PREFIXES`, outside string
/// literals (label values) and not preceded by an identifier character.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                if PREFIXES.iter().any(|p| word.starts_with(p)) {
                    names.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).expect("the dashboard exists");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every PromQL expression in the dashboard: panel targets, annotations, and the template
/// variables' queries.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo(RULES)).expect("the rules exist");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("the rules are YAML");
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("a named rule");
            out.push((name.to_string(), r["expr"].as_str().expect("an expr").to_string()));
        }
    }
    out
}

/// Metric name -> where it is named ("dashboard" or an alert's name).
fn named_metrics() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    let mut named: Vec<(String, String)> =
        exprs.iter().flat_map(|e| metric_names(e)).map(|n| (n, DASHBOARD.to_string())).collect();
    for (alert, expr) in rule_exprs() {
        named.extend(metric_names(&expr).into_iter().map(|n| (n, format!("{RULES} {alert}"))));
    }
    named.sort();
    named.dedup();
    named
}

// ---- what meshgate exports -------------------------------------------------------

/// Names in a Prometheus text exposition: every sample's name (`X_bucket`, `X_sum`, `X_count`
/// of a histogram included) and every family in a `# TYPE` line (the histogram's `X`).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.extend(rest.split_whitespace().next().map(str::to_string));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// A name counts as exported when it is, or when it is a histogram's `_bucket`, `_sum` or
/// `_count` series and the histogram is.
fn missing<'a>(named: &'a [(String, String)], exported: &BTreeSet<String>) -> Vec<&'a (String, String)> {
    let present = |n: &str| {
        exported.contains(n)
            || ["_bucket", "_sum", "_count"].iter().any(|s| n.strip_suffix(s).is_some_and(|b| exported.contains(b)))
    };
    named.iter().filter(|(n, _)| !present(n)).collect()
}

async fn scrape(http: SocketAddr) -> String {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(http).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("GET /metrics answered within 5 s")
        .expect("GET /metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    body.to_string()
}

// ---- the tests -------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check() {
    let (ok, out) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules {RULES}:\n{out}");
}

/// alerts_test.yml: the primary down, a backup tier for more than 10 minutes, no broker, a
/// backup down under priorities 10/20/30, replication links and leaders, the session bound,
/// meshgate unreachable; and that each stays quiet where it should.
#[test]
fn alert_rules_fire_on_synthetic_series() {
    let (ok, out) = promtool(&["test", "rules", RULE_TESTS]);
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{out}");
}

/// Each dashboard query is handed to promtool as a recording rule, so its PromQL is parsed by
/// Prometheus itself (Grafana's `$__rate_interval` stands in as 1m, `$var` only occurs inside
/// label matchers' strings).
#[test]
fn dashboard_queries_are_promql() {
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    let queries: Vec<String> =
        exprs.iter().filter(|e| !e.starts_with("label_values(")).map(|e| e.replace("$__rate_interval", "1m")).collect();
    assert!(queries.len() >= 20, "the dashboard's queries were found: {queries:?}");
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": q}))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    // JSON is YAML.
    std::fs::write(&file, serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string()).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(ok, "a dashboard query is not valid PromQL:\n{out}");
}

/// What Grafana needs to import it: a data source input used by every panel, known panel
/// types, unique ids, panels inside the 24-column grid and not overlapping, the variables.
#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for v in ["DS_PROMETHEUS", "job", "instance", "broker"] {
        assert!(vars.contains(&v), "variable {v} in {vars:?}");
    }
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(ids.insert(p["id"].as_u64().expect("a numeric id")), "duplicate id in {title}");
        let g = &p["gridPos"];
        let (x, y, w, h) =
            (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24 && w > 0 && h > 0, "{title} is outside the grid: {g}");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{title} overlaps another panel at {cell:?}");
        }
        let kind = p["type"].as_str().unwrap();
        assert!(["row", "timeseries", "stat", "table"].contains(&kind), "{title}: panel type {kind}");
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}'s data source");
        let targets =
            p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title} has queries"));
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}'s query data source");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}: a query");
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for t in ["Brokers up (probes)", "Current tier", "Sessions per broker", "Replication lag", "Instances"] {
        assert!(titles.contains(&t), "panel {t:?} in {titles:?}");
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"sum by (reason) (rate(meshgate_rejected_connections_total{reason=~"meshgate_not_a_metric|x"}[5m])) > on (job) group_left () max(process_open_fds) unless meshgate_broker_up:recorded"#,
    );
    let want: BTreeSet<String> =
        ["meshgate_rejected_connections_total", "process_open_fds", "meshgate_broker_up:recorded"]
            .map(String::from)
            .into();
    assert_eq!(names, want);
}

/// Every metric the dashboard and the alerts name is in a live /metrics: meshgate with three
/// brokers, replication, persistent sessions and [coordination] (one instance, so it leads and
/// its coordination gauges are set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_named_metric_is_exported() {
    let named = named_metrics();
    for must in [
        "meshgate_broker_up",
        "meshgate_broker_current",
        "meshgate_replication_lag_seconds",
        "meshgate_coordination_leader",
    ] {
        assert!(named.iter().any(|(n, _)| n == must), "{must} is named: {named:?}");
    }
    let mut net = common::blocking(|| Net::start(3));
    let etcd = common::blocking(|| Etcd::start(net.slot.addr(50, 2379)));
    let mg = net
        .meshgate(&format!(
            "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\n\
             [replication]\nenabled = true\nlag_interval = \"200ms\"\n\
             [coordination]\netcd = [\"{}\"]\ninstance = \"monitoring\"\nlease_ttl = \"3s\"\n",
            etcd.url()
        ))
        .await;
    let http = mg.http_addr().expect("an HTTP listener");

    let deadline = Instant::now() + SCRAPE_DEADLINE;
    let names = loop {
        let names = exported(&scrape(http).await);
        if missing(&named, &names).is_empty() || Instant::now() >= deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gone: Vec<String> = missing(&named, &names).iter().map(|(n, w)| format!("{n} (in {w})")).collect();
    assert!(
        gone.is_empty(),
        "named but not in meshgate's /metrics after {SCRAPE_DEADLINE:?}:\n  {}",
        gone.join("\n  ")
    );

    // The check itself can fail: a name meshgate does not export is reported, a histogram's
    // series are found through the histogram.
    let bogus = [("meshgate_no_such_metric".to_string(), "here".to_string())];
    assert_eq!(missing(&bogus, &names).len(), 1);
    let bucket = [("meshgate_connack_duration_seconds_bucket".to_string(), "here".to_string())];
    assert!(missing(&bucket, &names).is_empty());
    assert!(names.contains("meshgate_connack_duration_seconds"), "the histogram's family is read from # TYPE");

    // The gauges the tier alerts rest on: priorities, the current broker, and after broker1
    // is killed, broker2 current and broker1 down; the persistent-session bound.
    let text = scrape(http).await;
    for (b, p) in [("broker1", 1.0), ("broker2", 2.0), ("broker3", 3.0)] {
        assert_eq!(value(&text, "meshgate_broker_priority", b), Some(p), "{b}'s priority");
    }
    assert_eq!(value(&text, "meshgate_broker_current", "broker1"), Some(1.0));
    assert_eq!(value(&text, "meshgate_broker_current", "broker2"), Some(0.0));
    assert_eq!(value(&text, "meshgate_persistent_sessions_limit", ""), Some(100_000.0), "[sessions] max_sessions");
    common::blocking(|| net.broker("broker1").kill());
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = |t: &str| {
        value(t, "meshgate_broker_current", "broker1") == Some(0.0)
            && value(t, "meshgate_broker_current", "broker2") == Some(1.0)
            && value(t, "meshgate_broker_up", "broker1") == Some(0.0)
    };
    let mut text = scrape(http).await;
    while !want(&text) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(http).await;
    }
    assert!(want(&text), "broker2 current and broker1 down within 5 s of broker1's death:\n{text}");

    mg.shutdown().await;
    drop(etcd);
}

/// The value of `name`'s sample for `broker` (`""`: a sample without labels).
fn value(text: &str, name: &str, broker: &str) -> Option<f64> {
    let head = match broker {
        "" => name.to_string(),
        b => format!("{name}{{broker=\"{b}\"}}"),
    };
    text.lines().find_map(|l| l.strip_prefix(&head)?.strip_prefix(' ')?.trim().parse().ok())
}
