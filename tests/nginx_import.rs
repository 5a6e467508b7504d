//! Differential test of the nginx import: real `nginx -t` and `meshgate validate --nginx-conf` on the
//! shipped nginx config and on a few hundred variants of it, broken and valid. meshgate must accept
//! exactly what nginx accepts, apart from the variants marked `unsupported` (TLS or PROXY protocol
//! listeners, unix sockets, `include`, `proxy_pass` with variables, `listen` without a port),
//! which it refuses saying "not supported", and files cut before their `stream` block, which have
//! nothing to import; where both accept, it must import the brokers the file means.
//!
//! nginx runs with its own prefix in a temp dir (`-p`, `-c`, `-e`, and `pid` there), so it never
//! touches the system service's files. `nginx -t` does bind (and listen on) the `listen` sockets,
//! tolerating only an address already in use, so every variant listens on this test's own
//! loopback slot and the wildcard forms use a port no other test binds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_meshgate");
const SHIPPED: &str = include_str!("../nginx/meshgate-stream.conf");
const SHIPPED_LISTEN: &str = "listen 127.0.0.1:1883;";

#[derive(Debug, Clone, PartialEq)]
struct Broker {
    name: String,
    address: String,
    weight: u64,
    backup: bool,
}

impl Broker {
    fn new(name: &str, address: &str, weight: u64, backup: bool) -> Broker {
        Broker { name: name.into(), address: address.into(), weight, backup }
    }
}

struct Variant {
    name: String,
    text: String,
    /// The brokers when both accept; None: read them from the file's `server` lines.
    brokers: Option<Vec<Broker>>,
    /// The MQTT address meshgate must take; None: not checked.
    listen: Option<String>,
    /// meshgate refuses this on purpose even where nginx accepts it.
    unsupported: bool,
}

/// What `meshgate validate` said.
enum Verdict {
    Accept { listen: String, brokers: Vec<(Broker, usize)> },
    Reject(String),
}

/// A broker name from a trailing comment, by the rule the importer documents.
fn comment_name(comment: &str) -> Option<String> {
    let name = comment.split(',').next()?.trim();
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid.then(|| name.to_string())
}

/// The expected brokers, read naively from the file's lines: one `server` line of the
/// `mqtt_brokers` upstream each (variants with other shapes give their brokers explicitly).
fn brokers_by_line(text: &str) -> Result<Vec<Broker>, String> {
    let (mut inside, mut out, mut named) = (false, Vec::new(), Vec::new());
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("upstream mqtt_brokers") {
            inside = true;
            continue;
        }
        if inside && t.starts_with('}') {
            break;
        }
        let Some(rest) = t.strip_prefix("server ").filter(|_| inside) else { continue };
        let (code, comment) = rest.split_once('#').unwrap_or((rest, ""));
        let unquote = |w: &'_ str| w.trim_matches(|c| c == '"' || c == '\'').to_string();
        let words: Vec<String> = code.trim().trim_end_matches(';').split_whitespace().map(unquote).collect();
        let unreadable = || format!("cannot read the server line {t:?}: give the brokers explicitly");
        let (host, port) = words[0].rsplit_once(':').ok_or_else(unreadable)?;
        let weight = match words.iter().rev().find_map(|w| w.strip_prefix("weight=")) {
            Some(w) => w.parse::<u64>().map_err(|_| unreadable())?.min(u64::from(u32::MAX)),
            None => 1,
        };
        let address = format!("{host}:{}", port.parse::<u16>().map_err(|_| unreadable())?);
        named.push(comment_name(comment));
        out.push(Broker { name: String::new(), address, weight, backup: words.iter().any(|w| w == "backup") });
    }
    let names: Vec<String> =
        named.iter().enumerate().map(|(i, n)| n.clone().unwrap_or_else(|| format!("broker{}", i + 1))).collect();
    let unique = names.iter().collect::<std::collections::HashSet<_>>().len() == names.len();
    for (i, b) in out.iter_mut().enumerate() {
        b.name = if unique { names[i].clone() } else { format!("broker{}", i + 1) };
    }
    Ok(out)
}

fn nginx_check(nginx: &Path, dir: &Path, text: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, text).unwrap();
    let mut cmd = Command::new(nginx);
    cmd.arg("-p").arg(format!("{}/", dir.display())).arg("-c").arg(&conf);
    cmd.arg("-e").arg(dir.join("logs/error.log")).arg("-t").arg("-q");
    // Without a `pid` of its own, `nginx -t` would create the system one (/run/nginx.pid).
    if !text.lines().any(|l| l.trim_start().strip_prefix("pid").is_some_and(|r| r.starts_with([' ', '\t']))) {
        cmd.arg("-g").arg("pid nginx.pid;");
    }
    let out = cmd.output().expect("nginx runs");
    match out.status.success() {
        true => Ok(()),
        false => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let emerg = stderr.lines().find(|l| l.contains("[emerg]")).or_else(|| stderr.lines().next());
            Err(emerg.unwrap_or_default().to_string())
        }
    }
}

fn meshgate_check(conf: &Path) -> Verdict {
    let out = Command::new(BIN).arg("validate").arg("--nginx-conf").arg(conf).output().expect("meshgate runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
        return Verdict::Reject(lines[0].to_string());
    }
    let listen = stdout.lines().find_map(|l| l.strip_prefix("listen mqtt ")).expect("listen line");
    let listen = listen.split_whitespace().next().unwrap_or_default().to_string();
    let brokers = stdout
        .lines()
        .filter(|l| l.starts_with("broker "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let field = |key: &str| w[w.iter().position(|x| *x == key).expect(key) + 1];
            let line = l.rsplit_once(" line ").and_then(|(_, n)| n.trim_end_matches(')').parse().ok()).unwrap_or(0);
            let broker = Broker {
                name: w[1].into(),
                address: w[2].into(),
                weight: field("weight").parse().unwrap(),
                backup: field("priority") != "1",
            };
            (broker, line)
        })
        .collect();
    Verdict::Accept { listen, brokers }
}

/// Builds the variants from `base`, the shipped file listening on `listen`.
struct Gen<'a> {
    base: &'a str,
    listen: String,
    out: Vec<Variant>,
}

impl Gen<'_> {
    fn push(&mut self, name: impl Into<String>, text: String) -> &mut Variant {
        let listen = Some(self.listen.clone());
        self.out.push(Variant { name: name.into(), text, brokers: None, listen, unsupported: false });
        self.out.last_mut().unwrap()
    }

    /// `base` with `from` (which must be there) replaced once by `to`.
    fn edit(&mut self, name: impl Into<String>, from: &str, to: &str) -> &mut Variant {
        assert!(self.base.contains(from), "{from:?} is not in the shipped config");
        let text = self.base.replacen(from, to, 1);
        self.push(name, text)
    }

    fn after(&mut self, anchor: &str, insert: &str) -> &mut Variant {
        self.edit(format!("after {anchor:?}: {insert}"), anchor, &format!("{anchor}\n        {insert}"))
    }
}

const LEAST_CONN: &str = "least_conn;";
const LAST_SERVER: &str = "server 127.0.0.14:1883 max_fails=3 fail_timeout=30s backup;  # broker5";
const PRIMARY: &str = "server 127.0.0.10:1883 weight=5 max_fails=3 fail_timeout=30s;  # broker1";
const PROXY_PASS: &str = "proxy_pass mqtt_brokers;";
const STREAM_OPEN: &str = "stream {";
const EVENTS_OPEN: &str = "events {";

fn shipped_brokers() -> Vec<Broker> {
    let mut v = vec![Broker::new("broker1", "127.0.0.10:1883", 5, false)];
    v.extend((1..5).map(|i| Broker::new(&format!("broker{}", i + 1), &format!("127.0.0.1{i}:1883"), 1, true)));
    v
}

fn variants(base: &str, ip: &str, wildcard_port: u16, dir: &Path) -> Vec<Variant> {
    let listen = format!("{ip}:1883");
    let mut g = Gen { base, listen: listen.clone(), out: Vec::new() };
    g.push("shipped", base.to_string()).brokers = Some(shipped_brokers());

    // Every `;`, `{` and `}` dropped in turn (those in comments change nothing).
    for ch in [';', '{', '}'] {
        for (at, _) in base.match_indices(ch) {
            let text = format!("{}{}", &base[..at], &base[at + 1..]);
            g.push(format!("drop {ch:?} at byte {at}"), text);
        }
    }

    // Every directive line: an extra argument, one fewer, none, twice, gone.
    let lines: Vec<&str> = base.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let with = |new: &str| {
            let mut l = lines.clone();
            l[i] = new;
            l.join("\n") + "\n"
        };
        let Some(term) = t.find([';', '{']) else { continue };
        let (head, tail) = line.split_at(line.find([';', '{']).unwrap());
        let words: Vec<&str> = t[..term].split_whitespace().collect();
        let n = i + 1;
        for extra in ["x", "1"] {
            g.push(format!("line {n} + arg {extra}"), with(&format!("{} {extra} {tail}", head.trim_end())));
        }
        if words.len() > 1 {
            let fewer = format!("{} {tail}", words[..words.len() - 1].join(" "));
            g.push(format!("line {n} - last arg"), with(&fewer));
            g.push(format!("line {n} - all args"), with(&format!("{} {tail}", words[0])));
        }
        if t.ends_with(';') || t.contains("; ") {
            g.push(format!("line {n} twice"), with(&format!("{line}\n{line}")));
        }
        // Without load_module, whether `stream` exists depends on how nginx was built (Debian's
        // is a module, nginx.org's is built in): meshgate cannot know, so that one is left out.
        if !t.starts_with("load_module") {
            let mut l = lines.clone();
            l.remove(i);
            g.push(format!("line {n} deleted"), l.join("\n") + "\n");
        }
    }

    // The file cut short after each line.
    for k in 1..lines.len() {
        g.push(format!("first {k} lines"), lines[..k].join("\n") + "\n");
    }

    // Directives nginx does or does not take in the upstream block.
    for d in [
        "bogus 1;",
        "keepalive 2;",
        "ip_hash;",
        "least_time connect;",
        "sticky cookie srv;",
        "server_name x;",
        "ntlm;",
        "resolver 127.0.0.53;",
        "health_check;",
        "queue 10;",
        "least_conn;",
        "random;",
        "hash $remote_addr consistent;",
        "zone mqtt 64k;",
        "zone mqtt 16k;",
        "zone mqtt 32k;",
        "zone mqtt 31k;",
        "zone mqtt;",
        "zone mqtt 64q;",
        "zone mqtt 1m;",
        "zone a 64k; zone b 128k;",
        "include /nonexistent/*.conf;",
    ] {
        let v = g.after(LEAST_CONN, d);
        v.unsupported = d.starts_with("include");
    }
    // Balancing methods after the servers (where `backup` no longer clashes with them).
    for d in [
        "hash $remote_addr consistent;",
        "hash $remote_addr;",
        "hash $remote_addr Consistent;",
        "hash $remote_adr;",
        "hash ${remote_addr;",
        "hash ${remote_addr}x;",
        "hash $Remote_Addr;",
        "hash a$;",
        "hash $;",
        "hash $1;",
        "hash \"\";",
        "hash $ssl_preread_server_name;",
        "hash $remote_addr; least_conn;",
        "random;",
        "random two;",
        "random two least_conn;",
        "random two least_time;",
        "random least_conn;",
        "random three;",
        "zone mqtt 64k;",
    ] {
        g.after(LAST_SERVER, d);
    }

    // Server parameters, on the primary.
    for p in [
        "weight=0",
        "weight=-1",
        "weight=",
        "weight=01",
        "weight=+1",
        "weight=99999999999",
        "weight=9999999999999999999",
        "wieght=5",
        "Weight=5",
        "weight=5x",
        "weight=5 weight=2",
        "weight=5 max_fails=x",
        "weight=5 max_fails=0 max_conns=10",
        "weight=5 max_conns=-1",
        "weight=5 fail_timeout=30x",
        "weight=5 fail_timeout=500ms",
        "weight=5 fail_timeout=1y",
        "weight=5 fail_timeout=1M",
        "weight=5 fail_timeout=0",
        "weight=5 fail_timeout=1s5",
        "weight=5 fail_timeout=",
        "weight=5 \"fail_timeout=1m 30s\"",
        "weight=5 down",
        "weight=5 backup",
        "weight=5 Backup",
        "weight=5 resolve",
        "weight=5 slow_start=1s",
        "weight=5 route=a",
        "weight=5 drain",
        "weight=5 service=_mqtt",
    ] {
        let v = g.edit(format!("primary {p}"), "weight=5", p);
        if p.contains("fail_timeout=1m 30s") {
            v.brokers = Some(shipped_brokers());
        }
    }
    let all_backup = base.replacen("fail_timeout=30s;  # broker1", "fail_timeout=30s backup;  # broker1", 1);
    g.push("every server a backup", all_backup);
    g.push("every server down", base.replace("fail_timeout=30s", "fail_timeout=30s down"));
    g.push("no backups", base.replace(" backup;", ";"));

    // Server addresses, on the primary.
    for (a, unsupported) in [
        ("127.0.0.10", false),
        ("127.0.0.10:0", false),
        ("127.0.0.10:65536", false),
        ("127.0.0.10:65535", false),
        ("127.0.0.10:01883", false),
        ("[::1]:1883", false),
        ("[::1]", false),
        ("::1:1883", false),
        ("localhost:1883", false),
        ("127.0.0.10:1883/x", false),
        ("\"\"", false),
        ("unix:", false),
        ("unix:/tmp/meshgate-nginx-import.sock", true),
    ] {
        g.edit(format!("primary at {a}"), "127.0.0.10:1883", a).unsupported = unsupported;
    }

    // Listen forms and parameters.
    let listen_line = format!("listen {listen};");
    let wild = format!("0.0.0.0:{wildcard_port}");
    let sock = dir.join("mqtt.sock").display().to_string();
    #[rustfmt::skip]
    let listens: Vec<(String, Option<String>, bool)> = vec![
        (format!("listen {ip};"), None, true),
        (format!("listen {ip}:0;"), None, false),
        (format!("listen {ip}:65536;"), None, false),
        (format!("listen {ip}:01883;"), Some(listen.clone()), false),
        (format!("listen {wildcard_port};"), Some(wild.clone()), false),
        (format!("listen *:{wildcard_port};"), Some(wild.clone()), false),
        (format!("listen :{wildcard_port};"), None, false),
        (format!("listen unix:{sock};"), None, true),
        ("listen unix:;".to_string(), None, false),
        (format!("listen {ip}:1883 udp;"), None, false),
        (format!("listen {ip}:1883 UDP;"), None, false),
        (format!("listen {ip}:1883 udp backlog=5;"), None, false),
        (format!("listen {ip}:1883 udp so_keepalive=on;"), None, false),
        (format!("listen {ip}:1883 ssl;"), None, true),
        (format!("listen {ip}:1883 proxy_protocol;"), None, true),
        (format!("listen {ip}:1883 backlog=0;"), None, false),
        (format!("listen {ip}:1883 backlog=511 rcvbuf=8k sndbuf=1m;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883 rcvbuf=8q;"), None, false),
        (format!("listen {ip}:1883 so_keepalive=on reuseport bind;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883 so_keepalive=30m::10;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883 so_keepalive=::;"), None, false),
        (format!("listen {ip}:1883 so_keepalive=1ms;"), None, false),
        (format!("listen {ip}:1883 so_keepalive=ON;"), None, false),
        (format!("listen {ip}:1883 ipv6only=on fastopen=5;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883 ipv6only=of;"), None, false),
        (format!("listen {ip}:1883 default_server;"), None, false),
        (format!("listen {ip}:1883; listen {ip}:1883;"), None, false),
        (format!("listen {ip}:1883; listen {ip}:1883 udp;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883; listen {ip}:1884;"), Some(listen.clone()), false),
        (format!("listen {ip}:1884 udp; listen {ip}:1883;"), Some(listen.clone()), false),
        (format!("listen {ip}:1883 ssl; listen {ip}:1884;"), None, true),
    ];
    for (l, expect, unsupported) in listens {
        let v = g.edit(l.clone(), &listen_line, &l);
        v.listen = expect;
        v.unsupported = unsupported;
    }

    // proxy_pass targets.
    #[rustfmt::skip]
    let targets: Vec<(&str, Option<Vec<Broker>>, bool)> = vec![
        ("proxy_pass MQTT_BROKERS;", None, false),
        ("proxy_pass \"mqtt_brokers\";", None, false),
        ("proxy_pass 'mqtt_brokers' ;", None, false),
        ("proxy_pass mqtt_brokers:1883;", None, false),
        ("proxy_pass nothere;", None, false),
        ("proxy_pass '';", None, false),
        ("proxy_pass 127.0.0.10:1883;", Some(vec![Broker::new("broker1", "127.0.0.10:1883", 1, false)]), false),
        ("proxy_pass 127.0.0.10;", None, false),
        ("proxy_pass $remote_addr;", None, true),
        ("proxy_pass $nothere;", None, false),
        ("proxy_pass unix:/tmp/meshgate-nginx-import.sock;", None, true),
        ("proxy_pass \"mqtt_brokers\")x;", None, false),
        ("proxy_pass mqtt_brokers; return 1;", None, false),
        ("return 1; proxy_pass mqtt_brokers;", None, false),
        ("return 1;", None, false),
    ];
    for (p, brokers, unsupported) in targets {
        let v = g.edit(p, PROXY_PASS, p);
        if brokers.is_some() {
            v.brokers = brokers;
        }
        if p.starts_with("proxy_pass mqtt_brokers; return") || p == "return 1;" {
            // The block no longer proxies: meshgate imports the only upstream and no listen.
            v.listen = None;
        }
        v.unsupported = unsupported;
    }

    // Directives nginx does or does not take in the server block.
    for d in [
        "bogus 1;",
        "server_name x;",
        "keepalive_timeout 5;",
        "pass 127.0.0.1:1;",
        "proxy_timeout 1s;",
        "preread_timeout 1x;",
        "preread_timeout 500ms;",
        "preread_timeout 1y;",
        "preread_timeout 1M;",
        "preread_timeout \"1m 30s\";",
        "preread_timeout 1s5;",
        "preread_timeout 0;",
        "preread_timeout 1w2d;",
        "preread_timeout 1m 30s;",
        "proxy_next_upstream_timeout 30s1m;",
        "ssl_session_timeout 500ms;",
        "ssl_session_timeout 1y;",
        "tcp_nodelay ON;",
        "tcp_nodelay maybe;",
        "tcp_nodelay on; tcp_nodelay off;",
        "proxy_buffer_size 16k;",
        "proxy_buffer_size 1M;",
        "proxy_buffer_size 1.5k;",
        "proxy_buffer_size 1g;",
        "proxy_buffer_size 1kb;",
        "proxy_buffer_size 16k; proxy_upstream_buffer 1k;",
        "proxy_downstream_buffer 1k;",
        "proxy_next_upstream_tries -1;",
        "proxy_next_upstream_tries 0;",
        "proxy_upload_rate $remote_addr;",
        "proxy_upload_rate 1q;",
        "proxy_download_rate 1k; proxy_download_rate 2k;",
        "limit_conn_log_level WARN;",
        "limit_conn_log_level debug;",
        "ssl_verify_client maybe;",
        "ssl_verify_client optional_no_ca;",
        "ssl_protocols TLSv1.2 tlsv1.3;",
        "ssl_protocols TLSv1.4;",
        "ssl_protocols TLSv1.2; ssl_protocols TLSv1.3;",
        "ssl_ciphers a; ssl_ciphers b;",
        "ssl_certificate a; ssl_certificate b;",
        "proxy_ssl_conf_command a b; proxy_ssl_conf_command c d;",
        "set $x 1;",
        "set x 1;",
        "error_log logs/e.log notice warn;",
        "error_log logs/e.log debug_stream;",
        "error_log logs/e.log notice debug_core;",
        "error_log logs/e.log Notice;",
        "access_log off;",
        "access_log off mqtt;",
        "access_log logs/b.log;",
        "access_log logs/b.log combined;",
        "access_log logs/b.log mqtt buffer=1k flush=1s;",
        "access_log logs/b.log mqtt bogus;",
        "allow 127.0.0.1; deny all; allow all;",
        "proxy_bind 127.0.0.1 transparent;",
        "proxy_bind a b c;",
        "resolver 127.0.0.53; resolver 127.0.0.53;",
        "open_log_file_cache off;",
        "ssl_alpn mqtt; ssl_alpn mqtt;",
        "include /nonexistent/*.conf;",
    ] {
        g.after(PROXY_PASS, d).unsupported = d.starts_with("include");
    }

    // Directives in the stream block, the main context and events.
    for d in [
        "bogus 1;",
        "proxy_timeout 10m;",
        "proxy_timeout 10m; proxy_timeout 1m;",
        "upstream mqtt_brokers { server 127.0.0.1:1; }",
        "upstream MQTT_BROKERS { server 127.0.0.1:1; }",
        "upstream other { server 127.0.0.1:1 backup; }",
        "upstream other { server 127.0.0.1:1; zone mqtt 64k; }",
        "upstream other { server 127.0.0.1:1; zone mqtt 128k; } upstream third { server 127.0.0.1:1; zone mqtt 64k; }",
        "upstream other { server 127.0.0.1:1; zone mqtt; } upstream third { server 127.0.0.1:1; zone mqtt 64k; }",
        "limit_conn_zone $remote_addr zone=mqtt:1m; upstream other { server 127.0.0.1:1; zone mqtt 64k; }",
        "upstream other { server unix:/tmp/meshgate-nginx-import.sock; }",
        "upstream other { }",
        "map $remote_addr $bucket { default 1; } upstream other { hash $bucket; server 127.0.0.1:1; }",
        "upstream other { hash $bucket; server 127.0.0.1:1; } map $remote_addr $bucket { default 1; }",
        "upstream other { hash $bucket; server 127.0.0.1:1; }",
        "server 127.0.0.99:1883;",
        "log_format mqtt x;",
        "log_format other x; log_format other y;",
        "variables_hash_max_size 1024;",
        "include /nonexistent/*.conf;",
    ] {
        g.after(STREAM_OPEN, d).unsupported = d.starts_with("include");
    }
    for d in [
        format!("server {{ listen {ip}:1885; return x; }}"),
        format!("server {{ listen {ip}:1885; }}"),
        "server { return x; }".to_string(),
        format!("server {{ listen {ip}:1885; proxy_pass mqtt_brokers; }}"),
        format!("server {{ listen {ip}:1883; return x; }}"),
        format!("server {{ listen {ip}:1885 ssl; proxy_pass mqtt_brokers; }}"),
    ] {
        // Appended to the stream block, after the imported server.
        let close = base.rfind("\n}\n").expect("the stream block closes the file");
        let text = format!("{}\n    {d}{}", &base[..close], &base[close..]);
        g.push(format!("stream + {d}"), text);
    }
    for d in [
        "bogus 1;",
        "worker_processess 1;",
        "worker_processes auto;",
        "daemon maybe;",
        "daemon off;",
        "pcre_jit on;",
        "thread_pool default threads=2;",
        "env FOO;",
        "user;",
        "timer_resolution 1x;",
        "worker_rlimit_nofile x;",
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
    ] {
        g.edit(format!("main + {d}"), "worker_processes 1;", &format!("worker_processes 1;\n{d}"));
    }
    for d in ["http { }", "stream { }", "events { }", "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"] {
        g.push(format!("appended {d}"), format!("{base}{d}\n"));
    }
    for d in ["multi_accept on;", "use epoll;", "use foo;", "worker_connections 1;", "accept_mutex_delay 1x;", "bogus;"]
    {
        g.after(EVENTS_OPEN, d);
    }

    // How nginx reads words: quotes, escapes, comments, `${`, `)`, the 4 KiB limit, CRLF, tabs.
    for l in [
        "\"least_conn\";",
        "'least_conn';",
        "least_conn ;",
        "least_conn;# c",
        "least_conn # c\n;",
        "least_conn\t;",
        "least_conn}",
        "least_conn\"\";",
        "least_\\conn;",
        "\"least_conn\"x;",
    ] {
        g.edit(format!("tokens: {l:?}"), LEAST_CONN, l);
    }
    let quoted = "server \"127.0.0.10:1883\" 'weight=5' \"max_fails=3\" fail_timeout=30s;  # broker1";
    g.edit("quoted server words", PRIMARY, quoted);
    let q = "server 127.0.0.10:1883 weight=5 max_fails=3 fail_timeout=\"30s\";  # broker1";
    g.edit("quote inside a word", PRIMARY, q);
    for p in
        ["weight=5#c", "weight=\\5", "\"weight=5\"x", "\"weight=5\")", "weight=\"5\"", "\"weight=\\5\"", "weight=5\\"]
    {
        g.edit(format!("tokens: {p}"), "weight=5", p);
    }
    let split = "server 127.0.0.10:1883 # the primary\n        weight=5 max_fails=3 fail_timeout=30s;  # broker1";
    g.edit("server statement over two lines", PRIMARY, split).brokers = Some(shipped_brokers());
    let format_line = base.lines().find(|l| l.trim_start().starts_with("log_format mqtt")).unwrap().trim_start();
    g.edit("escaped quotes", format_line, "log_format mqtt '$remote_addr \\'x\\' \"$upstream_addr\"';");
    g.edit("unterminated quote", "\"$upstream_addr\"';", "\"$upstream_addr\";");
    g.push("CRLF line ends", base.replace('\n', "\r\n")).brokers = Some(shipped_brokers());
    g.push("tabs", base.replace("    ", "\t")).brokers = Some(shipped_brokers());
    for n in [4094, 4095, 4096] {
        g.push(format!("comment of {n} bytes"), format!("#{}\n{base}", "c".repeat(n - 1)));
        let fmt = format!("log_format long '{}';", "f".repeat(n - 2));
        g.edit(format!("quoted parameter of {n} bytes"), "log_format mqtt", &format!("{fmt}\n    log_format mqtt"));
        let fmt = format!("log_format long {};", "f".repeat(n));
        g.edit(format!("bare parameter of {n} bytes"), "log_format mqtt", &format!("{fmt}\n    log_format mqtt"));
    }

    // Names from comments.
    g.edit("comment names: primary named", "# broker1", "# primary, the big one");
    g.edit("comment names: free text", "# broker1", "# the primary");
    g.edit("comment names: duplicate", "# broker2", "# broker3");
    let clash = base.replacen("  # broker5\n", "\n", 1).replacen("# broker1", "# broker5", 1);
    g.push("comment names: clash with a default", clash);
    g.edit("comment names: taken by another", "# broker1", "# broker2");

    g.out
}

#[test]
fn meshgate_accepts_exactly_what_nginx_accepts() {
    let nginx = meshgate_tools::cluster::nginx::nginx_binary()
        .expect("nginx with its stream module (Debian: nginx-light or nginx plus libnginx-mod-stream)");
    let slot = common::Slot::acquire();
    let ip = slot.ip(1).to_string();
    // A port nobody else binds, for the listen forms that take every address.
    let wildcard_port = 29_000 + (slot.index() % 1000) as u16;
    let tmp = tempfile::tempdir().unwrap();
    assert!(SHIPPED.contains(SHIPPED_LISTEN));
    let base = SHIPPED.replacen(SHIPPED_LISTEN, &format!("listen {ip}:1883;"), 1);
    let variants = variants(&base, &ip, wildcard_port, tmp.path());

    let results: Vec<(Result<(), String>, Verdict)> = std::thread::scope(|s| {
        let chunks: Vec<_> = variants.chunks(variants.len().div_ceil(4)).enumerate().collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|(c, chunk)| {
                let (nginx, tmp) = (&nginx, tmp.path());
                s.spawn(move || {
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let dir: PathBuf = tmp.join(format!("v{c}-{i}"));
                            let n = nginx_check(nginx, &dir, &v.text);
                            (n, meshgate_check(&dir.join("nginx.conf")))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });

    let (mut both_accept, mut both_refuse, mut empty, mut mismatches) = (0, 0, 0, Vec::new());
    let mut on_purpose = Vec::new();
    for (v, (nginx, meshgate)) in variants.iter().zip(results) {
        let mut fail = |why: String| mismatches.push(format!("{}: {why}", v.name));
        match (nginx, meshgate) {
            (Err(_), Verdict::Reject(_)) => both_refuse += 1,
            // The file cut before its `stream` block: valid nginx with nothing to proxy.
            (Ok(()), Verdict::Reject(m)) if !v.text.contains("stream {") && m.contains("no upstream block found") => {
                empty += 1
            }
            (Ok(()), Verdict::Reject(m)) if v.unsupported && m.contains("not supported") => {
                on_purpose.push(v.name.as_str())
            }
            (Ok(()), Verdict::Reject(m)) => fail(format!("nginx accepts, meshgate refuses: {m}")),
            (Err(e), Verdict::Accept { .. }) => fail(format!("nginx refuses ({e}), meshgate accepts")),
            (Ok(()), Verdict::Accept { listen, brokers }) => {
                both_accept += 1;
                if v.unsupported {
                    fail("meant to be refused as not supported, but accepted".into());
                }
                if brokers.iter().any(|(_, line)| *line == 0) {
                    fail("validate shows no source line for a broker".into());
                }
                let got: Vec<Broker> = brokers.iter().map(|(b, _)| b.clone()).collect();
                match v.brokers.clone().map_or_else(|| brokers_by_line(&v.text), Ok) {
                    Ok(want) if got != want => fail(format!("brokers\n  got  {got:?}\n  want {want:?}")),
                    Ok(_) => {}
                    Err(why) => fail(why),
                }
                // Each broker names the line of its `server` statement.
                let text_lines: Vec<&str> = v.text.lines().collect();
                for (b, line) in brokers.iter().filter(|(_, line)| *line > 0) {
                    let host = b.address.rsplit_once(':').map_or("", |(h, _)| h);
                    let at = text_lines.get(line - 1).copied().unwrap_or("");
                    if !(at.contains("server") || at.contains("proxy_pass")) || !at.contains(host) {
                        fail(format!("broker {} said to come from line {line}: {at:?}", b.name));
                    }
                }
                if let Some(want) = &v.listen {
                    if &listen != want {
                        fail(format!("listen {listen}, want {want}"));
                    }
                }
            }
        }
    }
    let tried = variants.len();
    println!(
        "nginx import, differential: {tried} variants; {} agreed ({both_accept} both accept, {both_refuse} both refuse), \
         {} refused by meshgate as not supported, {empty} without a stream section, {} disagreed\n\
         refused as not supported: {}",
        both_accept + both_refuse,
        on_purpose.len(),
        mismatches.len(),
        on_purpose.join("; ")
    );
    assert!(mismatches.is_empty(), "{} of {tried} variants disagree:\n{}", mismatches.len(), mismatches.join("\n"));
    assert!(tried > 300 && both_accept > 60 && both_refuse > 150, "the generator lost its variety");
}

/// `nginx -t` binds the listen sockets but tolerates an address in use, so the differential test
/// cannot disturb (or be disturbed by) whatever holds an address; a non-local one would fail.
#[test]
fn nginx_t_passes_with_its_listen_address_taken() {
    let nginx = meshgate_tools::cluster::nginx::nginx_binary().expect("nginx with its stream module");
    let slot = common::Slot::acquire();
    let held = std::net::TcpListener::bind(slot.addr(1, 1883)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = SHIPPED.replacen(SHIPPED_LISTEN, &format!("listen {};", held.local_addr().unwrap()), 1);
    assert_eq!(nginx_check(&nginx, tmp.path(), &text), Ok(()));
    // Everything nginx wrote is under its prefix.
    for f in ["nginx.pid", "logs/error.log", "logs/mqtt_access.log"] {
        assert!(tmp.path().join(f).exists(), "{f}");
    }
}
