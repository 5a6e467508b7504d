//! The effective configuration as TOML (`meshgate validate --print`, nginx's `-T`): every key with the value in force, defaults filled in, secrets masked; the output is itself a valid configuration that means the same.

use std::path::Path;
use std::time::Duration;

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

use super::{AccessLogFormat, Config, Failback, Move, OnDown};

/// What a secret reads as in the printout: a placeholder that still validates.
pub const MASKED: &str = "(masked)";

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn strings(v: &[String]) -> Array {
    v.iter().map(String::as_str).collect()
}

/// `s` into `table` under `key`, when there is one (an absent optional key stays absent).
fn opt(table: &mut Table, key: &str, s: Option<String>) {
    if let Some(s) = s {
        table[key] = value(s);
    }
}

impl Config {
    /// The configuration as a TOML document, sections in the README's order.
    pub fn to_toml(&self) -> String {
        let mut doc = DocumentMut::new();
        let mut listen = Table::new();
        listen["mqtt"] = value(&self.listen.mqtt);
        listen["mqtts"] = value(self.listen.mqtts.as_deref().unwrap_or("off"));
        listen["http"] = value(self.listen.http.as_deref().unwrap_or("off"));
        listen["ws"] = value(self.listen.ws.as_deref().unwrap_or("off"));
        listen["wss"] = value(self.listen.wss.as_deref().unwrap_or("off"));
        listen["ws_path"] = value(&self.listen.ws_path);
        let mut trusted = toml_edit::Array::new();
        for n in &self.listen.trusted_proxies {
            trusted.push(n.to_string());
        }
        listen["trusted_proxies"] = value(trusted);
        let pp = &self.listen.proxy_protocol;
        let mut per = toml_edit::InlineTable::new();
        for (k, v) in [("mqtt", pp.mqtt), ("mqtts", pp.mqtts), ("ws", pp.ws), ("wss", pp.wss)] {
            per.insert(k, v.as_str().into());
        }
        listen["proxy_protocol"] = value(per);
        doc["listen"] = Item::Table(listen);

        let h = &self.health;
        let mut health = Table::new();
        health["probe"] = value(h.probe.as_str());
        health["interval"] = value(duration(h.interval));
        health["timeout"] = value(duration(h.timeout));
        health["rise"] = value(i64::from(h.rise));
        health["fall"] = value(i64::from(h.fall));
        health["mqtt_version"] = value(i64::from(h.mqtt_version));
        opt(&mut health, "username", h.username.clone());
        opt(&mut health, "password", h.password.as_ref().map(|_| MASKED.to_string()));
        doc["health"] = Item::Table(health);

        let p = &self.proxy;
        let mut proxy = Table::new();
        proxy["client_connect_timeout"] = value(duration(p.client_connect_timeout));
        proxy["upstream_connect_timeout"] = value(duration(p.upstream_connect_timeout));
        proxy["connack_timeout"] = value(duration(p.connack_timeout));
        proxy["connect_tries"] = value(i64::from(p.connect_tries));
        proxy["on_down"] = value(match p.on_down {
            OnDown::Close => "close",
            OnDown::Keep => "keep",
        });
        proxy["failback"] = value(match p.failback {
            Failback::Drain => "drain",
            Failback::None => "none",
        });
        proxy["move"] = value(match p.moves {
            Move::Switch => "switch",
            Move::Close => "close",
        });
        proxy["failback_rate"] = value(p.failback_rate);
        proxy["shutdown_grace"] = value(duration(p.shutdown_grace));
        proxy["max_packet_size"] = value(i64::from(p.max_packet_size));
        proxy["max_connections"] = value(i64::from(p.max_connections));
        proxy["max_connections_per_source"] = value(i64::from(p.max_connections_per_source));
        proxy["connect_rate_per_source"] = value(p.connect_rate_per_source);
        proxy["connect_burst_per_source"] = value(p.connect_burst_per_source);
        proxy["workers"] = value(i64::from(p.workers));
        doc["proxy"] = Item::Table(proxy);

        let t = &self.tls;
        let mut tls = Table::new();
        opt(&mut tls, "cert", t.cert.as_deref().map(path));
        opt(&mut tls, "key", t.key.as_deref().map(path));
        opt(&mut tls, "client_ca", t.client_ca.as_deref().map(path));
        opt(&mut tls, "broker_ca", t.broker_ca.as_deref().map(path));
        doc["tls"] = Item::Table(tls);

        let r = &self.replication;
        let mut repl = Table::new();
        repl["enabled"] = value(r.enabled);
        repl["max_qos"] = value(i64::from(r.max_qos));
        repl["include"] = value(strings(&r.include));
        repl["exclude"] = value(strings(&r.exclude));
        opt(&mut repl, "state_file", r.state_file.as_deref().map(path));
        repl["lag_interval"] = value(duration(r.lag_interval));
        repl["tombstone_ttl"] = value(duration(r.tombstone_ttl));
        repl["queue"] = value(r.queue as i64);
        doc["replication"] = Item::Table(repl);

        let s = &self.sessions;
        let mut sessions = Table::new();
        sessions["enabled"] = value(s.enabled);
        opt(&mut sessions, "state_file", s.state_file.as_deref().map(path));
        sessions["max_sessions"] = value(s.max_sessions as i64);
        sessions["max_subscriptions"] = value(s.max_subscriptions as i64);
        sessions["expiry"] = value(duration(s.expiry));
        sessions["standby"] = value(s.standby);
        sessions["standby_trim"] = value(duration(s.standby_trim));
        doc["sessions"] = Item::Table(sessions);

        let a = &self.access_log;
        let mut access = Table::new();
        access["enabled"] = value(a.enabled);
        opt(&mut access, "path", a.path.as_deref().map(path));
        access["format"] = value(match a.format {
            AccessLogFormat::Text => "text",
            AccessLogFormat::Json => "json",
        });
        doc["access_log"] = Item::Table(access);

        if let Some(co) = &self.coordination {
            let mut coord = Table::new();
            coord["etcd"] = value(strings(&co.etcd));
            coord["instance"] = value(&co.instance);
            coord["prefix"] = value(&co.prefix);
            coord["lease_ttl"] = value(duration(co.lease_ttl));
            doc["coordination"] = Item::Table(coord);
        }

        let mut admin = Table::new();
        opt(&mut admin, "token", self.admin.token.as_ref().map(|_| MASKED.to_string()));
        doc["admin"] = Item::Table(admin);

        let mut brokers = ArrayOfTables::new();
        for b in &self.brokers {
            let mut t = Table::new();
            t["name"] = value(&b.name);
            t["address"] = value(&b.address);
            t["priority"] = value(i64::from(b.priority));
            t["weight"] = value(i64::from(b.weight));
            t["max_fails"] = value(i64::from(b.max_fails));
            t["fail_timeout"] = value(duration(b.fail_timeout));
            t["max_conns"] = value(i64::from(b.max_conns));
            t["enabled"] = value(b.enabled);
            t["tls"] = value(b.tls);
            opt(&mut t, "tls_name", b.tls_name.clone());
            t["proxy_protocol"] = value(b.proxy_protocol.as_str());
            brokers.push(t);
        }
        doc["broker"] = Item::ArrayOfTables(brokers);
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Printing and reading back gives the same configuration (secrets aside, which print
    /// masked), and printing that gives the same text.
    #[test]
    fn the_printout_reads_back_as_the_same_configuration() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/meshgate.toml");
        let shipped = Config::load(Path::new(root)).unwrap();
        let mut secret = shipped.clone();
        secret.health.username = Some("probe".into());
        secret.health.password = Some("hunter2".into());
        secret.admin.token = Some("t0ken".into());
        secret.listen.mqtts = Some("127.0.0.1:8883".into());
        secret.tls.cert = Some("server.pem".into());
        secret.tls.key = Some("server.key".into());
        secret.listen.ws = Some("127.0.0.1:8083".into());
        secret.listen.wss = Some("127.0.0.1:8084".into());
        secret.listen.ws_path = "/ws".into();
        secret.listen.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()];
        secret.listen.proxy_protocol.mqtt = crate::config::ProxyProtocol::V2;
        secret.listen.proxy_protocol.ws = crate::config::ProxyProtocol::V1;
        secret.brokers[0].proxy_protocol = crate::config::ProxyProtocol::V2;
        for c in [shipped, secret] {
            let text = c.to_toml();
            assert!(!text.contains("hunter2") && !text.contains("t0ken"), "{text}");
            let mut back = Config::from_toml(&text, "printed").unwrap_or_else(|e| panic!("{e}\n{text}"));
            // A masked secret reads back as the placeholder, and says so.
            let masked = [&c.admin.token, &c.health.password].iter().filter(|x| x.is_some()).count();
            assert_eq!(back.warnings.len(), masked, "{:?}", back.warnings);
            assert!(back.warnings.iter().all(|w| w.contains("placeholder")), "{:?}", back.warnings);
            back.warnings.clear();
            let mut expected = c.clone();
            expected.health.password = c.health.password.as_ref().map(|_| MASKED.into());
            expected.admin.token = c.admin.token.as_ref().map(|_| MASKED.into());
            assert_eq!(back, expected, "{text}");
            assert_eq!(back.to_toml(), text);
        }
    }

    #[test]
    fn durations_print_as_the_file_writes_them() {
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(86_400)), "1day");
        assert_eq!(duration(Duration::from_secs(90)), "1m30s");
        for d in ["250ms", "1day", "1m30s"] {
            assert!(super::super::parse_duration(d).is_some(), "{d}");
        }
    }
}
