//! Every key of the shipped example config (and every other key the file format has), changed
//! by a reload, is either applied by the running meshgate or named in the reload's
//! restart-needed warning: nothing a reload is given is silently ignored.

use std::path::Path;

use meshgate::{Config, Meshgate};
use toml::{Table, Value};

/// Keys the shipped example leaves at their defaults, so that every key is exercised.
const MORE: &str = r##"
[proxy]
client_connect_timeout = "10s"
upstream_connect_timeout = "1s"
shutdown_grace = "5s"
max_packet_size = 1048576
max_connections = 0
max_connections_per_source = 0
connect_rate_per_source = 0.0
connect_burst_per_source = 1.0
workers = 0
move = "switch"
[health]
mqtt_version = 4
username = "probe"
password = "secret"
[admin]
token = "t0ken"
[sessions]
enabled = true
max_sessions = 100000
max_subscriptions = 100
expiry = "24h"
standby_trim = "10s"
[replication]
include = ["#"]
exclude = ["private/#"]
lag_interval = "1s"
tombstone_ttl = "1h"
queue = 100000
"##;

const BROKER_MORE: &str = "priority = 1\nmax_conns = 0\nenabled = true\ntls_name = \"broker.example\"\n";

/// The shipped example with its listeners on free loopback ports, its state files in `dir`,
/// and every key it leaves out set explicitly.
fn base(dir: &Path) -> Table {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/meshgate.toml");
    let mut t: Table = std::fs::read_to_string(root).unwrap().parse().unwrap();
    let more: Table = MORE.parse().unwrap();
    for (section, keys) in more {
        let table = t.entry(section).or_insert_with(|| Value::Table(Table::new())).as_table_mut().unwrap();
        for (k, v) in keys.as_table().unwrap() {
            table.entry(k.clone()).or_insert(v.clone());
        }
    }
    let listen = t["listen"].as_table_mut().unwrap();
    listen.insert("mqtt".into(), Value::String("127.0.0.1:0".into()));
    listen.insert("http".into(), Value::String("127.0.0.1:0".into()));
    for section in ["sessions", "replication"] {
        let s = t[section].as_table_mut().unwrap();
        s.insert("state_file".into(), Value::String(dir.join(format!("{section}.json")).display().to_string()));
    }
    let access = t["access_log"].as_table_mut().unwrap();
    access.insert("path".into(), Value::String(dir.join("access.log").display().to_string()));
    access.insert("enabled".into(), Value::Boolean(true));
    let extra: Table = BROKER_MORE.parse().unwrap();
    for b in t["broker"].as_array_mut().unwrap() {
        for (k, v) in &extra {
            b.as_table_mut().unwrap().entry(k.clone()).or_insert(v.clone());
        }
    }
    t
}

/// A different value of the same kind that the config still accepts.
fn changed(key: &str, v: &Value) -> Value {
    match v {
        Value::Boolean(b) => Value::Boolean(!b),
        Value::Integer(i) => Value::Integer(match key {
            "max_qos" => (i + 1) % 3,
            "mqtt_version" => 9 - i,
            "priority" => i + 7,
            _ => i + 1,
        }),
        Value::Float(f) => Value::Float(f * 2.0 + 1.0),
        Value::String(s) => Value::String(match (key, s.as_str()) {
            ("probe", "mqtt") => "tcp".into(),
            ("probe", _) => "mqtt".into(),
            ("on_down", "close") => "keep".into(),
            ("on_down", _) => "close".into(),
            ("failback", "drain") => "none".into(),
            ("failback", _) => "drain".into(),
            ("move", "switch") => "close".into(),
            ("move", _) => "switch".into(),
            ("format", "text") => "json".into(),
            ("format", _) => "text".into(),
            ("mqtt" | "http" | "mqtts", _) => "127.0.0.1:1".into(),
            ("address", a) => a.replace(":1883", ":1884"),
            _ if meshgate::config::parse_duration(s).is_some() => "7s".into(),
            _ => format!("{s}-changed"),
        }),
        Value::Array(_) => Value::Array(vec![Value::String("changed/#".into())]),
        other => panic!("{key}: no change for {other:?}"),
    }
}

/// Every (path, changed table) for the scalar keys of `t`, one key changed at a time.
fn variants(t: &Table) -> Vec<(String, Table)> {
    let mut out = Vec::new();
    for (section, v) in t {
        match v {
            Value::Table(keys) => {
                for (k, val) in keys {
                    let mut n = t.clone();
                    n[section].as_table_mut().unwrap().insert(k.clone(), changed(k, val));
                    out.push((format!("{section}.{k}"), n));
                }
            }
            Value::Array(items) => {
                for (k, val) in items[0].as_table().unwrap() {
                    let mut n = t.clone();
                    n[section].as_array_mut().unwrap()[0].as_table_mut().unwrap().insert(k.clone(), changed(k, val));
                    out.push((format!("{section}[1].{k}"), n));
                }
            }
            _ => panic!("top-level key {section}"),
        }
    }
    out
}

fn parse(t: &Table, what: &str) -> Config {
    Config::from_toml(&toml::to_string(t).unwrap(), what).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_changed_by_a_reload_is_applied_or_named_as_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let base_table = base(dir.path());
    let base = parse(&base_table, "base");
    let mg = Meshgate::start(base.clone()).await.unwrap();
    // What runs reads back as the file, listen addresses aside (they were port 0).
    let mut running = mg.applied_config();
    running.listen = base.listen.clone();
    assert_eq!(running, Config { warnings: vec![], ..base.clone() });

    let cases = variants(&base_table);
    assert!(cases.len() >= 45, "every key is exercised: {}", cases.len());
    let mut applied = Vec::new();
    let mut warned = Vec::new();
    for (key, table) in cases {
        let new = parse(&table, &key);
        assert_ne!(Config { warnings: vec![], ..new.clone() }, base, "{key}: the change shows in the config");
        mg.reload(new.clone()).unwrap_or_else(|e| panic!("{key}: reload refused: {e}"));
        let restart = base.restart_needed(&new);
        let now = mg.applied_config();
        let sections: [(&str, bool, bool); 9] = [
            ("access_log", now.access_log == new.access_log, now.access_log == base.access_log),
            ("listen", now.listen == new.listen, now.listen == base.listen),
            ("proxy", now.proxy == new.proxy, now.proxy == base.proxy),
            ("health", now.health == new.health, now.health == base.health),
            ("admin", now.admin == new.admin, now.admin == base.admin),
            ("tls", now.tls == new.tls, now.tls == base.tls),
            ("replication", now.replication == new.replication, now.replication == base.replication),
            ("sessions", now.sessions == new.sessions, now.sessions == base.sessions),
            ("broker", now.brokers == new.brokers, now.brokers == base.brokers),
        ];
        for (section, is_new, is_old) in sections {
            if is_new {
                continue;
            }
            assert!(is_old, "{key}: [{section}] is neither the new nor the old value");
            assert!(
                restart.iter().any(|r| r.trim_matches(['[', ']']).starts_with(section)),
                "{key}: [{section}] was not applied and the reload does not say it needs a restart ({restart:?})"
            );
        }
        if restart.is_empty() {
            applied.push(key);
        } else {
            warned.push(key);
        }
        mg.reload(base.clone()).unwrap();
    }
    assert!(applied.len() > 30 && !warned.is_empty(), "applied {applied:?}\nrestart {warned:?}");
    mg.shutdown().await;
}
