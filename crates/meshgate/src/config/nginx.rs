//! Reads the `listen` address and the `upstream` block of an nginx stream config, so an existing nginx front end's file runs unchanged.
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxStream {
    /// Address from the `listen` directive of the stream `server` block that proxies to the upstream, normalised to "host:port" ("1883" -> "0.0.0.0:1883", "[::1]:1883" kept, "localhost:1883" kept). None when no server block listens.
    pub listen: Option<String>,
    /// Name of the upstream used.
    pub upstream: String,
    pub least_conn: bool,
    pub servers: Vec<NginxServer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxServer {
    /// "host:port" exactly as written; nginx stream requires the port, so it is never defaulted.
    pub address: String,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// 0 means unlimited.
    pub max_conns: u32,
    pub backup: bool,
    pub down: bool,
    /// 1-based line of the `server` directive.
    pub line: usize,
}

/// Every message is one line naming the line number where there is one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NginxError {
    /// Malformed syntax or a bad value; `msg` says what and how to fix it.
    #[error("line {line}: {msg}")]
    Syntax { line: usize, msg: String },
    #[error("line {line}: unterminated block: missing `}}`")]
    UnterminatedBlock { line: usize },
    #[error("`include` is not supported (line {line}): inline the included file")]
    Include { line: usize },
    #[error("line {line}: unknown server parameter `{param}` (expected weight=, max_fails=, fail_timeout=, max_conns=, backup, down)")]
    UnknownParameter { line: usize, param: String },
    #[error("line {line}: server parameter `{param}` is not supported by meshgate")]
    Unsupported { line: usize, param: String },
    #[error("line {line}: bad time `{value}` for fail_timeout (use nginx times like 500ms, 30s, 1m)")]
    BadTime { line: usize, value: String },
    #[error("no upstream block found in the stream section")]
    NoUpstream,
    #[error("several upstream blocks and no `proxy_pass` chooses one ({names})")]
    AmbiguousUpstream { names: String },
    #[error("upstream `{name}` named by proxy_pass (line {line}) is not defined")]
    UndefinedUpstream { name: String, line: usize },
    #[error("line {line}: upstream `{name}` has no server lines")]
    EmptyUpstream { name: String, line: usize },
}

fn syntax(line: usize, msg: impl Into<String>) -> NginxError {
    NginxError::Syntax { line, msg: msg.into() }
}

/// nginx time syntax: "10" (seconds), "500ms", "30s", "1m", "1h", "1d", "1m30s"; error otherwise.
pub fn parse_nginx_time(s: &str) -> Option<Duration> {
    // "ms" must be tried before "m"; units must appear largest first, as nginx demands.
    const UNITS: [(&str, u64); 8] = [
        ("y", 365 * 86_400_000),
        ("M", 30 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1_000),
    ];
    if s.is_empty() {
        return None;
    }
    let (mut rest, mut total, mut last) = (s, 0u64, u64::MAX);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = UNITS.iter().find(|(u, _)| rest.starts_with(u)).map_or((1_000, 0), |(u, ms)| (*ms, u.len()));
        // A unitless number means seconds and may only close the value ("1m30").
        if (len == 0 && !rest.is_empty()) || unit >= last {
            return None;
        }
        last = unit;
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[len..];
    }
    Some(Duration::from_millis(total))
}

#[derive(Debug)]
enum Tok {
    Word(String),
    Semi,
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, NginxError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            ';' => out.push((Tok::Semi, line)),
            '{' => out.push((Tok::Open, line)),
            '}' => out.push((Tok::Close, line)),
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '"' | '\'' => {
                let start = line;
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err(syntax(start, "unterminated quoted string")),
                        Some(q) if q == c => break,
                        Some(ch) => {
                            let ch = match ch {
                                '\\' => match chars.next_if(|&e| e == c || e == '\\') {
                                    Some(e) => e,
                                    None => ch,
                                },
                                _ => ch,
                            };
                            line += usize::from(ch == '\n');
                            word.push(ch);
                        }
                    }
                }
                out.push((Tok::Word(word), start));
            }
            _ => {
                let start = line;
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n == '{' && word.ends_with('$') {
                        // `${var}` is a variable reference, not a block opener.
                        for ch in chars.by_ref() {
                            line += usize::from(ch == '\n');
                            word.push(ch);
                            if ch == '}' {
                                break;
                            }
                        }
                        continue;
                    }
                    if n.is_whitespace() || matches!(n, ';' | '{' | '}') {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                out.push((Tok::Word(word), start));
            }
        }
    }
    Ok(out)
}

struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Option<Vec<Directive>>,
}

// Real configs nest 3-4 deep; the cap keeps hostile input from exhausting the stack.
const MAX_DEPTH: usize = 32;

fn parse_block(
    toks: &mut std::vec::IntoIter<(Tok, usize)>,
    opened_at: Option<usize>,
    depth: usize,
) -> Result<Vec<Directive>, NginxError> {
    let mut out = Vec::new();
    loop {
        let (name, line) = match toks.next() {
            None => {
                return match opened_at {
                    Some(line) => Err(NginxError::UnterminatedBlock { line }),
                    None => Ok(out),
                }
            }
            Some((Tok::Close, line)) if opened_at.is_none() => {
                return Err(syntax(line, "unexpected `}` with no open block"))
            }
            Some((Tok::Close, _)) => return Ok(out),
            Some((Tok::Word(w), line)) => (w, line),
            Some((_, line)) => return Err(syntax(line, "expected a directive name before `;` or `{`")),
        };
        let mut args = Vec::new();
        let block = loop {
            match toks.next() {
                Some((Tok::Word(w), _)) => args.push(w),
                Some((Tok::Semi, _)) => break None,
                Some((Tok::Open, _)) if depth >= MAX_DEPTH => return Err(syntax(line, "blocks nested too deeply")),
                Some((Tok::Open, _)) => break Some(parse_block(toks, Some(line), depth + 1)?),
                Some((Tok::Close, _)) | None => {
                    return Err(syntax(line, format!("directive `{name}` is missing its terminating `;`")))
                }
            }
        };
        out.push(Directive { name, args, line, block });
    }
}

/// Accepts "host:port" and "[v6]:port"; the port is mandatory in nginx stream.
fn check_host_port(line: usize, s: &str) -> Result<(), NginxError> {
    let bad = |why: &str| syntax(line, format!("bad address `{s}`: {why}"));
    let missing = || bad("missing port (nginx stream needs host:port, e.g. 127.0.0.1:1883)");
    if s.starts_with("unix:") {
        return Err(bad("unix sockets are not supported by meshgate"));
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            (h, p.strip_prefix(':').ok_or_else(missing)?)
        }
        None => s.rsplit_once(':').ok_or_else(missing)?,
    };
    if host.is_empty() || (host.contains(':') && !s.starts_with('[')) {
        return Err(bad("expected host:port, with IPv6 in brackets like [::1]:1883"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(bad("port must be a number from 1 to 65535")),
    }
}

/// `Ok(None)` for UDP listens, which an MQTT proxy cannot serve.
fn listen_address(d: &Directive) -> Result<Option<String>, NginxError> {
    let Some((addr, params)) = d.args.split_first() else {
        return Err(syntax(d.line, "`listen` needs an address or port"));
    };
    for p in params {
        match p.as_str() {
            "udp" => return Ok(None),
            // Both change the bytes on the socket, so ignoring them would break every client.
            "ssl" | "proxy_protocol" => {
                let msg = format!("listen parameter `{p}` is not supported by meshgate");
                return Err(syntax(d.line, msg));
            }
            _ => {}
        }
    }
    let full = if addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.0.0.0:{addr}")
    } else if let Some(port) = addr.strip_prefix("*:") {
        format!("0.0.0.0:{port}")
    } else {
        addr.clone()
    };
    check_host_port(d.line, &full)?;
    Ok(Some(full))
}

fn parse_server(d: &Directive) -> Result<NginxServer, NginxError> {
    let line = d.line;
    let (Some((address, params)), None) = (d.args.split_first(), &d.block) else {
        return Err(syntax(line, "expected `server host:port [params];` inside an upstream"));
    };
    check_host_port(line, address)?;
    let mut s = NginxServer {
        address: address.clone(),
        weight: 1,
        max_fails: 1,
        fail_timeout: Duration::from_secs(10),
        max_conns: 0,
        backup: false,
        down: false,
        line,
    };
    let number = |key: &str, v: &str, min: u32| match v.parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(syntax(line, format!("bad value `{v}` for {key} (expected a whole number >= {min})"))),
    };
    for p in params {
        let (key, value) = p.split_once('=').map_or((p.as_str(), None), |(k, v)| (k, Some(v)));
        match (key, value) {
            ("backup", None) => s.backup = true,
            ("down", None) => s.down = true,
            ("weight", Some(v)) => s.weight = number(key, v, 1)?,
            ("max_fails", Some(v)) => s.max_fails = number(key, v, 0)?,
            ("max_conns", Some(v)) => s.max_conns = number(key, v, 0)?,
            ("fail_timeout", Some(v)) => {
                let bad = || NginxError::BadTime { line, value: v.to_string() };
                s.fail_timeout = parse_nginx_time(v).ok_or_else(bad)?;
            }
            // nginx-plus only.
            ("resolve" | "slow_start" | "service" | "route" | "drain", _) => {
                return Err(NginxError::Unsupported { line, param: p.clone() })
            }
            _ => return Err(NginxError::UnknownParameter { line, param: p.clone() }),
        }
    }
    Ok(s)
}

struct Upstream {
    name: String,
    line: usize,
    least_conn: bool,
    servers: Vec<NginxServer>,
}

fn parse_upstream(d: &Directive) -> Result<Upstream, NginxError> {
    let ([name], Some(body)) = (d.args.as_slice(), &d.block) else {
        return Err(syntax(d.line, "expected `upstream NAME { server host:port; ... }`"));
    };
    let (mut least_conn, mut servers) = (false, Vec::new());
    for inner in body {
        match inner.name.as_str() {
            "least_conn" => least_conn = true,
            "include" => return Err(NginxError::Include { line: inner.line }),
            "server" => servers.push(parse_server(inner)?),
            // zone, hash, random, keepalive...: balancing hints meshgate does without.
            _ => {}
        }
    }
    let (name, line) = (name.clone(), d.line);
    if servers.is_empty() {
        return Err(NginxError::EmptyUpstream { name, line });
    }
    Ok(Upstream { name, line, least_conn, servers })
}

pub fn parse(text: &str) -> Result<NginxStream, NginxError> {
    let tree = parse_block(&mut tokenize(text)?.into_iter(), None, 0)?;
    let streams: Vec<&Directive> = tree.iter().filter(|d| d.name == "stream").collect();
    // Without a `stream` block the file is a streams.d snippet. With one, top-level `include`s
    // (typically modules-enabled/*.conf) are left alone: only the stream section must be inline.
    let section: Vec<&Directive> = if streams.is_empty() {
        tree.iter().collect()
    } else {
        streams.iter().flat_map(|d| d.block.iter().flatten()).collect()
    };
    let mut upstreams: Vec<Upstream> = Vec::new();
    let mut vservers: Vec<&[Directive]> = Vec::new();
    for d in section {
        match (d.name.as_str(), &d.block) {
            ("include", _) => return Err(NginxError::Include { line: d.line }),
            ("upstream", _) => {
                let up = parse_upstream(d)?;
                if let Some(first) = upstreams.iter().find(|u| u.name == up.name) {
                    let msg = format!("upstream `{}` is already defined at line {}", up.name, first.line);
                    return Err(syntax(d.line, msg));
                }
                upstreams.push(up);
            }
            ("server", Some(body)) => {
                if let Some(inc) = body.iter().find(|i| i.name == "include") {
                    return Err(NginxError::Include { line: inc.line });
                }
                vservers.push(body);
            }
            ("server", None) => {
                let msg = "`server host:port;` belongs inside `upstream NAME { ... }`";
                return Err(syntax(d.line, msg));
            }
            _ => {}
        }
    }
    let proxied = vservers.iter().find_map(|body| Some((*body, body.iter().find(|d| d.name == "proxy_pass")?)));
    let (chosen, vserver) = match proxied {
        Some((body, pp)) => {
            let [name] = pp.args.as_slice() else {
                return Err(syntax(pp.line, "`proxy_pass` needs exactly one upstream name"));
            };
            let undefined = || NginxError::UndefinedUpstream { name: name.clone(), line: pp.line };
            let idx = upstreams.iter().position(|u| &u.name == name).ok_or_else(undefined)?;
            (idx, Some(body))
        }
        None if upstreams.len() == 1 => (0, vservers.first().copied()),
        None if upstreams.is_empty() => return Err(NginxError::NoUpstream),
        None => {
            let names: Vec<String> = upstreams.iter().map(|u| format!("`{}` line {}", u.name, u.line)).collect();
            return Err(NginxError::AmbiguousUpstream { names: names.join(", ") });
        }
    };
    let mut listen = None;
    // meshgate binds one address: the first TCP listen wins, later ones (a dual-stack twin) are ignored.
    for d in vserver.into_iter().flatten().filter(|d| d.name == "listen") {
        listen = listen_address(d)?;
        if listen.is_some() {
            break;
        }
    }
    let up = upstreams.swap_remove(chosen);
    let (upstream, least_conn, servers) = (up.name, up.least_conn, up.servers);
    Ok(NginxStream { listen, upstream, least_conn, servers })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = r#"load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
events { worker_connections 4096; }
stream {
    log_format mqtt '$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time "$upstream_addr"';
    upstream mqtt_brokers {
        least_conn;
        server 127.0.0.10:1883 weight=5 max_fails=3 fail_timeout=30s;   # broker1, primary
        server 127.0.0.11:1883 max_fails=3 fail_timeout=30s backup;     # broker2
        server 127.0.0.12:1883 max_fails=3 fail_timeout=30s backup;
        server 127.0.0.13:1883 max_fails=3 fail_timeout=30s backup;
        server 127.0.0.14:1883 max_fails=3 fail_timeout=30s backup;
    }
    server {
        listen 1883;
        proxy_pass mqtt_brokers;
        proxy_connect_timeout 1s;
        proxy_timeout 90s;
        access_log /var/log/nginx/mqtt_access.log mqtt;
    }
}
http { upstream web { server 127.0.0.1:3000; } server { listen 80; } }
"#;

    fn err(text: &str) -> String {
        parse(text).expect_err("config should be rejected").to_string()
    }

    #[test]
    fn reference_config() {
        let s = parse(REFERENCE).unwrap();
        assert_eq!(s.listen.as_deref(), Some("0.0.0.0:1883"));
        assert_eq!(s.upstream, "mqtt_brokers");
        assert!(s.least_conn);
        assert_eq!(s.servers.len(), 5);
        let b1 = &s.servers[0];
        assert_eq!((b1.address.as_str(), b1.weight, b1.max_fails), ("127.0.0.10:1883", 5, 3));
        assert_eq!((b1.fail_timeout, b1.backup, b1.down, b1.line), (Duration::from_secs(30), false, false, 8));
        for (i, b) in s.servers[1..].iter().enumerate() {
            assert_eq!(b.address, format!("127.0.0.1{}:1883", i + 1));
            assert_eq!((b.weight, b.max_fails, b.max_conns), (1, 3, 0));
            assert_eq!(b.fail_timeout, Duration::from_secs(30));
            assert!(b.backup && !b.down);
            assert_eq!(b.line, 9 + i);
        }
    }

    #[test]
    fn bare_snippet_and_defaults() {
        let s = parse(
            "upstream u {\n server a.example:1883 down;\n server [::1]:1884 max_conns=100;\n}\n\
             server { listen [::]:1883 reuseport so_keepalive=on backlog=511; proxy_pass u; }\n",
        )
        .unwrap();
        assert_eq!(s.listen.as_deref(), Some("[::]:1883"));
        assert!(!s.least_conn);
        assert!(s.servers[0].down && !s.servers[0].backup);
        assert_eq!((s.servers[0].weight, s.servers[0].max_fails), (1, 1));
        assert_eq!(s.servers[0].fail_timeout, Duration::from_secs(10));
        assert_eq!((s.servers[1].address.as_str(), s.servers[1].max_conns), ("[::1]:1884", 100));
        let only = parse("upstream x { server h:1; hash $remote_addr consistent; zone z 64k; }").unwrap();
        assert_eq!((only.listen, only.upstream.as_str()), (None, "x"));
    }

    #[test]
    fn listen_forms_and_choice() {
        let l = |listen: &str| {
            parse(&format!("stream {{ upstream u {{ server h:1; }} server {{ {listen} proxy_pass u; }} }}"))
                .map(|s| s.listen)
        };
        assert_eq!(l("listen 127.0.0.1:1883;"), Ok(Some("127.0.0.1:1883".into())));
        assert_eq!(l("listen localhost:1883;"), Ok(Some("localhost:1883".into())));
        assert_eq!(l("listen *:1883;"), Ok(Some("0.0.0.0:1883".into())));
        assert_eq!(l("listen 53 udp; listen 1884; listen [::]:1884;"), Ok(Some("0.0.0.0:1884".into())));
        assert_eq!(l(""), Ok(None));
        assert!(l("listen 8883 ssl;").unwrap_err().to_string().contains("`ssl` is not supported"));
        assert!(l("listen 127.0.0.1;").unwrap_err().to_string().contains("missing port"));
        let s = parse(
            "stream {\n upstream a { server h:1; }\n upstream b { server h:2; }\n\
             server { listen 9; return 1; }\n server { listen 1884; proxy_pass \"b\"; }\n}",
        )
        .unwrap();
        assert_eq!((s.upstream.as_str(), s.listen.as_deref()), ("b", Some("0.0.0.0:1884")));
    }

    #[test]
    fn tokenizer_details() {
        let s = parse(
            "# leading comment\nstream { # inline { not a block\n map ${a}x $y { default 1; }\n\
             upstream 'u' { server \"h:1\" weight=2; } }",
        )
        .unwrap();
        assert_eq!((s.upstream.as_str(), s.servers[0].weight, s.servers[0].line), ("u", 2, 4));
    }

    // One case a line: input (with `\n` escapes) => expected part of the message.
    const ERRORS: &str = r"
upstream u {\n server h:1 wieght=5;\n} => line 2: unknown server parameter `wieght=5` (expected weight=
upstream u {\n server h:1 slow_start=10s;\n} => line 2: server parameter `slow_start=10s` is not supported by meshgate
upstream u { server h:1 resolve; } => line 1: server parameter `resolve` is not supported
stream {\n\n upstream u {\n server h:1;\n => line 3: unterminated block: missing `}`
stream {\n include /etc/nginx/streams.d/*.conf;\n} => `include` is not supported (line 2): inline the included file
upstream u {\n server h:1 fail_timeout=30x;\n} => line 2: bad time `30x` for fail_timeout (use nginx times like 500ms, 30s, 1m)
upstream u {\n server h:1 weight=0;\n} => line 2: bad value `0` for weight
upstream u {\n server h:1 max_conns=-1;\n} => line 2: bad value `-1` for max_conns
upstream a { server h:1; }\nupstream b { server h:2; } => several upstream blocks and no `proxy_pass` chooses one (`a` line 1, `b` line 2)
upstream a { server h:1; }\nserver {\n proxy_pass mqtt_brokers;\n} => upstream `mqtt_brokers` named by proxy_pass (line 3) is not defined
\nupstream x { } => line 2: upstream `x` has no server lines
upstream u {\n server 127.0.0.1;\n} => line 2: bad address `127.0.0.1`: missing port
upstream u {\n server ::1:1883;\n} => line 2: bad address `::1:1883`: expected host:port, with IPv6 in brackets
upstream u {\n server h:0;\n} => line 2: bad address `h:0`: port must be
upstream u {\n server unix:/tmp/s;\n} => line 2: bad address `unix:/tmp/s`: unix sockets
upstream u { server h:1; }\nupstream u { server h:2; } => line 2: upstream `u` is already defined at line 1
events {}\nhttp { upstream web { server h:1; } } => no upstream block found in the stream section
upstream u { server h:1; }\n} => line 2: unexpected `}`
upstream u {\n server h:1\n} => line 2: directive `server` is missing its terminating `;`
upstream u { server 'h:1; } => line 1: unterminated quoted string
stream {\n server 127.0.0.99:1883;\n} => line 2: `server host:port;` belongs inside
upstream u;\n => line 1: expected `upstream NAME { server host:port; ... }`
upstream u { server h:1; }\nserver {\n listen 1883 proxy_protocol;\n} => line 3: listen parameter `proxy_protocol` is not supported
";

    #[test]
    fn error_messages() {
        for case in ERRORS.lines().filter(|l| !l.is_empty()) {
            let (text, want) = case.split_once(" => ").unwrap();
            let got = err(&text.replace("\\n", "\n"));
            assert!(got.contains(want), "{text}: got {got:?}");
            assert!(!got.contains('\n'), "{got:?}");
        }
    }

    #[test]
    fn nginx_times() {
        let ok = |s: &str, ms: u64| assert_eq!(parse_nginx_time(s), Some(Duration::from_millis(ms)), "{s}");
        ok("10", 10_000);
        ok("500ms", 500);
        ok("30s", 30_000);
        ok("1m", 60_000);
        ok("1h", 3_600_000);
        ok("1d", 86_400_000);
        ok("1m30s", 90_000);
        ok("1m30", 90_000);
        ok("1s500ms", 1_500);
        ok("0", 0);
        for bad in "30x s 1.5s 30s1m 1s2s -1s 1h1h 99999999999999999999y".split(' ') {
            assert_eq!(parse_nginx_time(bad), None, "{bad}");
        }
        assert_eq!((parse_nginx_time(""), parse_nginx_time("1 m")), (None, None));
    }

    #[test]
    fn no_panic_on_truncated_or_random_input() {
        for (i, _) in REFERENCE.char_indices() {
            let _ = parse(&REFERENCE[..i]);
        }
        let alphabet: Vec<char> = "ab:1 ;{}#'\"\\$\n=[]stream upstream server listen proxy_pass é".chars().collect();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2_000 {
            let text: String = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse(&text);
            let _ = parse_nginx_time(&text);
        }
        assert!(err(&"a {".repeat(10_000)).contains("nested too deeply"));
    }
}
