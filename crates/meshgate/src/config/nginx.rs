//! The nginx import: reads an nginx stream config exactly as strictly as nginx 1.22 does and takes
//! from it the `listen` address and the upstream servers, so an existing nginx front end's file
//! runs unchanged and a file nginx refuses is refused here too, with its line.
//!
//! The whole file is tokenized by nginx's own rules (a port of `ngx_conf_read_token`: statements
//! end with `;`, blocks balance, quotes, `\` escapes, `#` comments, `${var}`, the 4 KiB limit on a
//! parameter). Every directive of the main context, the `events` block and the `stream` section
//! (its `server` and `upstream` blocks included) is checked against nginx 1.22.1's command tables:
//! where it may appear, how many arguments it takes, the value of on/off, time, size and number
//! settings, and "is duplicate". The parts meshgate imports (`listen`, `proxy_pass`, `upstream`,
//! its `server` lines, `least_conn`, `hash`, `random`, `zone`) are checked as nginx checks them.
//! What nginx accepts but meshgate does differently is a warning ([`NginxStream::warnings`]);
//! what meshgate cannot do at all (TLS or PROXY protocol listeners, a `listen` without a port,
//! unix sockets, `include`, a `proxy_pass` with variables) is an error saying "not supported".
//! A file that loads other modules may use directives meshgate does not know: those become
//! warnings rather than errors.
//!
//! Not checked here, though `nginx -t` checks them: the contents of `http`, `map`, `geo` and
//! `split_clients` blocks; host names (nginx resolves them when it loads the file, meshgate when
//! it connects); files named by `ssl_*`, `access_log` and the like; variables anywhere but in
//! `hash`; the values of directives with a syntax of their own (`resolver`, `allow`, `access_log`,
//! `limit_conn`, `return`, `ssl_*`...), none of which meshgate uses.
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxStream {
    /// Address from the `listen` directive of the stream `server` block that proxies to the upstream, normalised to "host:port" ("1883" -> "0.0.0.0:1883", "[::1]:1883" kept, "localhost:1883" kept). None when no server block listens.
    pub listen: Option<String>,
    /// Name of the upstream used (or the address of a `proxy_pass host:port`).
    pub upstream: String,
    pub least_conn: bool,
    pub servers: Vec<NginxServer>,
    /// What nginx accepts but meshgate does differently, one line each, starting "line N: ".
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxServer {
    /// "host:port" as written (the port as a plain number); nginx stream requires the port, so it is never defaulted.
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
    /// Broker name from a trailing `# name` comment on the `server` line (`# broker1` or
    /// `# broker1, primary`); None without one, or when the names would not be unique.
    pub name: Option<String>,
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
    /// nginx's "invalid number of arguments"; `hint` points at a missing `;` when the statement spans lines.
    #[error("line {line}: `{directive}` {takes}, got {got}{hint}")]
    Arguments { line: usize, directive: String, takes: &'static str, got: String, hint: String },
    /// nginx's "unknown directive" and "is not allowed here".
    #[error("line {line}: `{directive}` is not a directive nginx accepts in {place}")]
    NotAllowed { line: usize, directive: String, place: &'static str },
    #[error("line {line}: `{directive}` is duplicate: nginx allows it once per block (first at line {first})")]
    Duplicate { line: usize, directive: String, first: usize },
    #[error("line {line}: invalid value `{value}` for `{directive}`: {expected}")]
    Value { line: usize, directive: String, value: String, expected: String },
    #[error("line {line}: unknown server parameter `{param}` (expected weight=, max_fails=, fail_timeout=, max_conns=, backup, down)")]
    UnknownParameter { line: usize, param: String },
    #[error("line {line}: server parameter `{param}` is not supported by meshgate (nor by open-source nginx 1.22)")]
    Unsupported { line: usize, param: String },
    #[error(
        "line {line}: bad time `{value}` for fail_timeout (nginx wants seconds, or units like 30s, 1m, 1h; not ms)"
    )]
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

/// nginx time syntax as the msec settings read it (`proxy_timeout`...): "10" (seconds), "500ms",
/// "30s", "1m", "1h", "1d", "1w", "1m30s", "1m30"; None otherwise.
pub fn parse_nginx_time(s: &str) -> Option<Duration> {
    parse_time(s, false).map(|ms| Duration::from_millis(ms as u64))
}

/// A port of nginx's `ngx_parse_time`: milliseconds, or with `is_sec` whole seconds (where `ms`
/// is refused and `y` and `M` are allowed). Units must come largest first; a bare number at the
/// end counts as seconds; a space also ends a seconds value ("1m 30").
fn parse_time(s: &str, is_sec: bool) -> Option<i64> {
    #[derive(PartialEq, PartialOrd, Clone, Copy)]
    enum Step {
        Start,
        Year,
        Month,
        Week,
        Day,
        Hour,
        Min,
        Sec,
        Msec,
        Last,
    }
    const MAX: i64 = i64::MAX;
    let b = s.as_bytes();
    let (mut step, mut valid, mut value, mut total, mut p) =
        (if is_sec { Step::Start } else { Step::Month }, false, 0i64, 0i64, 0);
    while p < b.len() {
        let c = b[p];
        p += 1;
        if c.is_ascii_digit() {
            value = value.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
            valid = true;
            continue;
        }
        let (next, mut max, mut scale) = match c {
            b'y' if step == Step::Start => (Step::Year, MAX / (86_400 * 365), 86_400 * 365),
            b'M' if step < Step::Month => (Step::Month, MAX / (86_400 * 30), 86_400 * 30),
            b'w' if step < Step::Week => (Step::Week, MAX / (86_400 * 7), 86_400 * 7),
            b'd' if step < Step::Day => (Step::Day, MAX / 86_400, 86_400),
            b'h' if step < Step::Hour => (Step::Hour, MAX / 3_600, 3_600),
            b'm' if b.get(p) == Some(&b's') => {
                if is_sec || step >= Step::Msec {
                    return None;
                }
                p += 1;
                (Step::Msec, MAX, 1)
            }
            b'm' if step < Step::Min => (Step::Min, MAX / 60, 60),
            b's' if step < Step::Sec => (Step::Sec, MAX, 1),
            b' ' if step < Step::Sec => (Step::Last, MAX, 1),
            _ => return None,
        };
        step = next;
        if step != Step::Msec && !is_sec {
            scale *= 1000;
            max /= 1000;
        }
        if value > max {
            return None;
        }
        total = total.checked_add(value * scale)?;
        value = 0;
        while b.get(p) == Some(&b' ') {
            p += 1;
        }
    }
    if !valid {
        return None;
    }
    if !is_sec {
        value = value.checked_mul(1000)?;
    }
    total.checked_add(value)
}

/// nginx's `ngx_atoi`: decimal digits only, no sign, up to i64::MAX.
fn atoi(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0i64, |n, b| n.checked_mul(10)?.checked_add(i64::from(b - b'0')))
}

/// nginx's `ngx_parse_size` (k, m) and, with `offset`, `ngx_parse_offset` (k, m, g).
fn parse_size(s: &str, offset: bool) -> Option<i64> {
    let (digits, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' if offset => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    atoi(digits)?.checked_mul(scale)
}

/// nginx weights and counters are 64-bit; past u32 they all mean "effectively unlimited".
fn saturate(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Tokens and statements

/// nginx reads the file through a 4 KiB buffer and refuses a parameter or comment that fills it.
const NGX_CONF_BUFFER: usize = 4096;

/// Real configs nest 3-4 deep; the cap keeps hostile input from exhausting the stack.
const MAX_DEPTH: usize = 32;

/// One statement as nginx reads it: the words up to `;` or `{`, and the block after a `{`.
struct Stmt {
    name: String,
    args: Vec<String>,
    /// Line of the first word, where an operator looks for the directive.
    line: usize,
    /// Line of the `;` or `{` that ends the words: past `line` when a `;` went missing.
    end_line: usize,
    /// Byte offset of that `;` or `{`, to find the comment trailing it.
    end: usize,
    block: Option<Vec<Stmt>>,
}

impl Stmt {
    /// The directive as written, shortened for messages.
    fn text(&self) -> String {
        let mut t = self.name.clone();
        for a in &self.args {
            t.push(' ');
            t.push_str(a);
        }
        shorten(&t, 60)
    }
}

fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

enum Token {
    Stmt { words: Vec<String>, line: usize, end_line: usize, end: usize, opens: bool },
    Close { line: usize },
    Eof,
}

struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
    /// Comments that begin where a statement could: (offset of the `#`, text after it).
    comments: Vec<(usize, String)>,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// nginx's escapes, applied to quoted and bare words alike: `\"`, `\'`, `\\`, `\t`, `\r`, `\n`;
/// any other backslash stays as it is.
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' {
            let esc = match raw.get(i + 1) {
                Some(&c @ (b'"' | b'\'' | b'\\')) => Some(c),
                Some(b't') => Some(b'\t'),
                Some(b'r') => Some(b'\r'),
                Some(b'n') => Some(b'\n'),
                _ => None,
            };
            if let Some(c) = esc {
                out.push(c);
                i += 2;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Lexer<'_> {
    /// A port of nginx 1.22's `ngx_conf_read_token`, state for state and in its order of tests,
    /// so that quotes, escapes, comments, `${`, `)` after a quote and the 4 KiB limit behave
    /// exactly as in nginx. Notably `}` and `#` inside a bare word are part of the word.
    fn token(&mut self) -> Result<Token, NginxError> {
        let mut words: Vec<String> = Vec::new();
        let (mut need_space, mut last_space, mut sharp_comment, mut variable) = (false, true, false, false);
        let (mut quoted, mut s_quoted, mut d_quoted) = (false, false, false);
        // `start` follows nginx's `start` pointer exactly: the 4 KiB check depends on it.
        let (mut start, mut start_line, mut first_line) = (self.pos, self.line, self.line);
        loop {
            if self.pos >= self.text.len() {
                if words.is_empty() && last_space {
                    return Ok(Token::Eof);
                }
                return Err(if d_quoted || s_quoted {
                    syntax(start_line, "unterminated quoted string")
                } else if let Some(name) = words.first() {
                    syntax(
                        first_line,
                        format!("directive `{name}` is missing its terminating `;` at the end of the file"),
                    )
                } else {
                    syntax(self.line, "unexpected end of file, expecting `;` or `}`")
                });
            }
            if self.pos - start == NGX_CONF_BUFFER {
                let shown = String::from_utf8_lossy(&self.text[start..start + 10]).into_owned();
                return Err(syntax(
                    start_line,
                    match d_quoted || s_quoted {
                        true => {
                            "quoted parameter longer than nginx's 4 KiB limit: probably a missing closing quote".into()
                        }
                        false => {
                            format!("parameter or comment starting `{shown}...` is longer than nginx's 4 KiB limit")
                        }
                    },
                ));
            }
            let ch = self.text[self.pos];
            self.pos += 1;
            if ch == b'\n' {
                self.line += 1;
                sharp_comment = false;
            }
            if sharp_comment {
                continue;
            }
            if quoted {
                quoted = false;
                continue;
            }
            if need_space {
                if is_space(ch) {
                    last_space = true;
                    need_space = false;
                    continue;
                }
                if ch == b';' || ch == b'{' {
                    let (line, end_line, end) = (first_line, self.line, self.pos - 1);
                    return Ok(Token::Stmt { words, line, end_line, end, opens: ch == b'{' });
                }
                if ch != b')' {
                    let msg = format!(
                        "unexpected `{}` right after a quoted string (nginx needs a space, `;` or `{{` there)",
                        char::from(ch)
                    );
                    return Err(syntax(self.line, msg));
                }
                // `)` closes an `if (...)` condition; nginx reads it as the start of a new word.
                last_space = true;
                need_space = false;
            }
            if last_space {
                start = self.pos - 1;
                start_line = self.line;
                if is_space(ch) {
                    continue;
                }
                match ch {
                    b';' | b'{' if words.is_empty() => {
                        return Err(syntax(self.line, "expected a directive name before `;` or `{`"))
                    }
                    b';' | b'{' => {
                        let (line, end_line, end) = (first_line, self.line, self.pos - 1);
                        return Ok(Token::Stmt { words, line, end_line, end, opens: ch == b'{' });
                    }
                    b'}' if words.is_empty() => return Ok(Token::Close { line: self.line }),
                    b'}' => {
                        let msg = format!("directive `{}` is missing its terminating `;`", words[0]);
                        return Err(syntax(first_line, msg));
                    }
                    b'#' => {
                        sharp_comment = true;
                        if words.is_empty() {
                            let rest = &self.text[self.pos..];
                            let len = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
                            self.comments.push((self.pos - 1, String::from_utf8_lossy(&rest[..len]).into_owned()));
                        }
                        continue;
                    }
                    b'\\' => quoted = true,
                    b'"' => {
                        start += 1;
                        d_quoted = true;
                    }
                    b'\'' => {
                        start += 1;
                        s_quoted = true;
                    }
                    b'$' => variable = true,
                    _ => {}
                }
                last_space = false;
                if words.is_empty() {
                    first_line = self.line;
                }
                continue;
            }
            // Inside a word.
            if ch == b'{' && variable {
                continue;
            }
            variable = false;
            if ch == b'\\' {
                quoted = true;
                continue;
            }
            if ch == b'$' {
                variable = true;
                continue;
            }
            let found = if d_quoted || s_quoted {
                let closes = (d_quoted && ch == b'"') || (s_quoted && ch == b'\'');
                if closes {
                    (d_quoted, s_quoted, need_space) = (false, false, true);
                }
                closes
            } else if is_space(ch) || ch == b';' || ch == b'{' {
                last_space = true;
                true
            } else {
                false
            };
            if found {
                words.push(unescape(&self.text[start..self.pos - 1]));
                if ch == b';' || ch == b'{' {
                    let (line, end_line, end) = (first_line, self.line, self.pos - 1);
                    return Ok(Token::Stmt { words, line, end_line, end, opens: ch == b'{' });
                }
            }
        }
    }

    fn block(&mut self, opened: Option<usize>, depth: usize) -> Result<Vec<Stmt>, NginxError> {
        let mut out = Vec::new();
        loop {
            match self.token()? {
                Token::Eof => {
                    return match opened {
                        Some(line) => Err(NginxError::UnterminatedBlock { line }),
                        None => Ok(out),
                    }
                }
                Token::Close { line } => {
                    return match opened {
                        Some(_) => Ok(out),
                        None => Err(syntax(line, "unexpected `}` with no open block")),
                    }
                }
                Token::Stmt { mut words, line, end_line, end, opens } => {
                    let name = words.remove(0);
                    let block = match opens {
                        true if depth >= MAX_DEPTH => return Err(syntax(line, "blocks nested too deeply")),
                        true => Some(self.block(Some(line), depth + 1)?),
                        false => None,
                    };
                    out.push(Stmt { name, args: words, line, end_line, end, block });
                }
            }
        }
    }

    /// The comment right after a statement's `;` on the same line, if any.
    fn trailing_comment(&self, end: usize) -> Option<&str> {
        let i = self.comments.partition_point(|(at, _)| *at <= end);
        let (at, text) = self.comments.get(i)?;
        self.text[end + 1..*at].iter().all(|&c| c == b' ' || c == b'\t').then_some(text.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// nginx's command tables

// Directive type bits, as in nginx's ngx_conf_file.h, so the tables read like nginx's own.
const NOARGS: u32 = 0x1;
const TAKE1: u32 = 0x2;
const TAKE2: u32 = 0x4;
const TAKE3: u32 = 0x8;
const TAKE4: u32 = 0x10;
const TAKE12: u32 = TAKE1 | TAKE2;
const TAKE23: u32 = TAKE2 | TAKE3;
const TAKE1234: u32 = TAKE1 | TAKE2 | TAKE3 | TAKE4;
const BLOCK: u32 = 0x100;
const FLAG: u32 = 0x200;
const ANY: u32 = 0x400;
const MORE1: u32 = 0x800;
const MORE2: u32 = 0x1000;

// Contexts meshgate checks.
const MAIN: u8 = 1;
const EVENTS: u8 = 2;
const STREAM: u8 = 4;
const SERVER: u8 = 8;
const UPSTREAM: u8 = 16;
const ST_SRV: u8 = STREAM | SERVER;

/// How nginx checks a directive's value before the directive takes effect.
#[derive(Clone, Copy)]
enum Value {
    /// Not checked here (a path, a name, or a syntax of its own).
    Free,
    Flag,
    Msec,
    Sec,
    Size,
    Offset,
    Number,
    /// One of these, any case.
    OneOf(&'static [&'static str]),
    /// One of these, exactly.
    Exactly(&'static [&'static str]),
    /// SSL protocol names, any number, any case.
    Protocols,
    /// A size, or anything with a variable in it.
    SizeOrVariable,
    WorkerProcesses,
    LogLevels,
    /// `set $name value`.
    Variable,
}

struct Spec {
    name: &'static str,
    ctx: u8,
    args: u32,
    value: Value,
    /// Directives sharing a key may appear once per block ("is duplicate").
    once: Option<&'static str>,
}

const fn d(name: &'static str, ctx: u8, args: u32, value: Value, once: bool) -> Spec {
    Spec { name, ctx, args, value, once: if once { Some(name) } else { None } }
}

const PROTOCOLS: &[&str] = &["SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"];

/// nginx 1.22.1's core, events and stream modules as Debian builds them (read from the command
/// tables of `nginx` and `ngx_stream_module.so`): name, where, arguments, value, once.
#[rustfmt::skip]
const SPECS: &[Spec] = &[
    // main context
    d("daemon", MAIN, FLAG, Value::Flag, true),
    d("master_process", MAIN, FLAG, Value::Flag, true),
    d("timer_resolution", MAIN, TAKE1, Value::Msec, true),
    d("pid", MAIN, TAKE1, Value::Free, true),
    d("lock_file", MAIN, TAKE1, Value::Free, true),
    d("worker_processes", MAIN, TAKE1, Value::WorkerProcesses, true),
    d("debug_points", MAIN, TAKE1, Value::OneOf(&["stop", "abort"]), true),
    d("user", MAIN, TAKE12, Value::Free, true),
    d("worker_priority", MAIN, TAKE1, Value::Free, true),
    d("worker_cpu_affinity", MAIN, MORE1, Value::Free, true),
    d("worker_rlimit_nofile", MAIN, TAKE1, Value::Number, true),
    d("worker_rlimit_core", MAIN, TAKE1, Value::Offset, true),
    d("worker_shutdown_timeout", MAIN, TAKE1, Value::Msec, true),
    d("working_directory", MAIN, TAKE1, Value::Free, true),
    d("env", MAIN, TAKE1, Value::Free, false),
    d("load_module", MAIN, TAKE1, Value::Free, false),
    d("error_log", MAIN | ST_SRV, MORE1, Value::LogLevels, false),
    d("include", MAIN | EVENTS | ST_SRV | UPSTREAM, TAKE1, Value::Free, false),
    d("events", MAIN, BLOCK | NOARGS, Value::Free, true),
    d("thread_pool", MAIN, TAKE23, Value::Free, false),
    d("ssl_engine", MAIN, TAKE1, Value::Free, false),
    d("pcre_jit", MAIN, FLAG, Value::Flag, true),
    d("http", MAIN, BLOCK | NOARGS, Value::Free, true),
    d("stream", MAIN, BLOCK | NOARGS, Value::Free, true),
    // events
    d("worker_connections", EVENTS, TAKE1, Value::Number, true),
    d("use", EVENTS, TAKE1, Value::Exactly(&["epoll", "poll", "select"]), true),
    d("multi_accept", EVENTS, FLAG, Value::Flag, true),
    d("accept_mutex", EVENTS, FLAG, Value::Flag, true),
    d("accept_mutex_delay", EVENTS, TAKE1, Value::Msec, true),
    d("debug_connection", EVENTS, TAKE1, Value::Free, false),
    d("epoll_events", EVENTS, TAKE1, Value::Number, true),
    d("worker_aio_requests", EVENTS, TAKE1, Value::Number, true),
    // stream, its server blocks and its upstream blocks
    d("upstream", STREAM, BLOCK | TAKE1, Value::Free, false),
    d("server", STREAM, BLOCK | NOARGS, Value::Free, false),
    d("server", UPSTREAM, MORE1, Value::Free, false),
    d("least_conn", UPSTREAM, NOARGS, Value::Free, false),
    d("hash", UPSTREAM, TAKE12, Value::Free, false),
    d("random", UPSTREAM, NOARGS | TAKE12, Value::Free, false),
    d("zone", UPSTREAM, TAKE12, Value::Free, false),
    d("listen", SERVER, MORE1, Value::Free, false),
    d("proxy_pass", SERVER, TAKE1, Value::Free, true),
    d("return", SERVER, TAKE1, Value::Free, true),
    d("set", SERVER, TAKE2, Value::Variable, false),
    d("access_log", ST_SRV, MORE1, Value::Free, false),
    d("allow", ST_SRV, TAKE1, Value::Free, false),
    d("deny", ST_SRV, TAKE1, Value::Free, false),
    d("geo", STREAM, BLOCK | TAKE12, Value::Free, false),
    d("map", STREAM, BLOCK | TAKE2, Value::Free, false),
    d("split_clients", STREAM, BLOCK | TAKE2, Value::Free, false),
    d("limit_conn", ST_SRV, TAKE2, Value::Free, false),
    d("limit_conn_dry_run", ST_SRV, FLAG, Value::Flag, true),
    d("limit_conn_log_level", ST_SRV, TAKE1, Value::OneOf(&["info", "notice", "warn", "error"]), true),
    d("limit_conn_zone", STREAM, TAKE2, Value::Free, false),
    d("log_format", STREAM, MORE2, Value::Free, false),
    d("map_hash_bucket_size", STREAM, TAKE1, Value::Number, true),
    d("map_hash_max_size", STREAM, TAKE1, Value::Number, true),
    d("open_log_file_cache", ST_SRV, TAKE1234, Value::Free, true),
    d("preread_buffer_size", ST_SRV, TAKE1, Value::Size, true),
    d("preread_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("proxy_bind", ST_SRV, TAKE12, Value::Free, true),
    // The two deprecated names set proxy_buffer_size: nginx calls any second one a duplicate.
    Spec { name: "proxy_buffer_size", ctx: ST_SRV, args: TAKE1, value: Value::Size, once: Some("proxy_buffer_size") },
    Spec { name: "proxy_downstream_buffer", ctx: ST_SRV, args: TAKE1, value: Value::Size, once: Some("proxy_buffer_size") },
    Spec { name: "proxy_upstream_buffer", ctx: ST_SRV, args: TAKE1, value: Value::Size, once: Some("proxy_buffer_size") },
    d("proxy_connect_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("proxy_download_rate", ST_SRV, TAKE1, Value::SizeOrVariable, true),
    d("proxy_upload_rate", ST_SRV, TAKE1, Value::SizeOrVariable, true),
    d("proxy_half_close", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_next_upstream", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_next_upstream_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("proxy_next_upstream_tries", ST_SRV, TAKE1, Value::Number, true),
    d("proxy_protocol", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_protocol_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("proxy_requests", ST_SRV, TAKE1, Value::Number, true),
    d("proxy_responses", ST_SRV, TAKE1, Value::Number, true),
    d("proxy_socket_keepalive", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("proxy_ssl", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_ssl_certificate", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_certificate_key", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_ciphers", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_conf_command", ST_SRV, TAKE2, Value::Free, false),
    d("proxy_ssl_crl", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_name", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_password_file", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_protocols", ST_SRV, MORE1, Value::Protocols, false),
    d("proxy_ssl_server_name", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_ssl_session_reuse", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_ssl_trusted_certificate", ST_SRV, TAKE1, Value::Free, true),
    d("proxy_ssl_verify", ST_SRV, FLAG, Value::Flag, true),
    d("proxy_ssl_verify_depth", ST_SRV, TAKE1, Value::Number, true),
    d("resolver", ST_SRV, MORE1, Value::Free, true),
    d("resolver_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("set_real_ip_from", ST_SRV, TAKE1, Value::Free, false),
    d("ssl_alpn", ST_SRV, MORE1, Value::Free, true),
    d("ssl_certificate", ST_SRV, TAKE1, Value::Free, false),
    d("ssl_certificate_key", ST_SRV, TAKE1, Value::Free, false),
    d("ssl_ciphers", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_client_certificate", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_conf_command", ST_SRV, TAKE2, Value::Free, false),
    d("ssl_crl", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_dhparam", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_ecdh_curve", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_handshake_timeout", ST_SRV, TAKE1, Value::Msec, true),
    d("ssl_password_file", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_prefer_server_ciphers", ST_SRV, FLAG, Value::Flag, true),
    d("ssl_preread", ST_SRV, FLAG, Value::Flag, true),
    d("ssl_protocols", ST_SRV, MORE1, Value::Protocols, false),
    d("ssl_session_cache", ST_SRV, TAKE12, Value::Free, false),
    d("ssl_session_ticket_key", ST_SRV, TAKE1, Value::Free, false),
    d("ssl_session_tickets", ST_SRV, FLAG, Value::Flag, true),
    d("ssl_session_timeout", ST_SRV, TAKE1, Value::Sec, true),
    d("ssl_trusted_certificate", ST_SRV, TAKE1, Value::Free, true),
    d("ssl_verify_client", ST_SRV, TAKE1, Value::OneOf(&["on", "off", "optional", "optional_no_ca"]), true),
    d("ssl_verify_depth", ST_SRV, TAKE1, Value::Number, true),
    d("tcp_nodelay", ST_SRV, FLAG, Value::Flag, true),
    d("variables_hash_bucket_size", STREAM, TAKE1, Value::Number, true),
    d("variables_hash_max_size", STREAM, TAKE1, Value::Number, true),
];

/// The stream module's own variables in nginx 1.22 (core, upstream, ssl, ssl_preread, realip, limit_conn).
#[rustfmt::skip]
const STREAM_VARIABLES: &[&str] = &[
    "binary_remote_addr", "bytes_received", "bytes_sent", "connection", "hostname", "msec",
    "nginx_version", "pid", "protocol", "proxy_protocol_addr", "proxy_protocol_port",
    "proxy_protocol_server_addr", "proxy_protocol_server_port", "remote_addr", "remote_port",
    "server_addr", "server_port", "session_time", "status", "time_iso8601", "time_local",
    "upstream_addr", "upstream_bytes_received", "upstream_bytes_sent", "upstream_connect_time",
    "upstream_first_byte_time", "upstream_session_time", "realip_remote_addr", "realip_remote_port",
    "limit_conn_status", "ssl_alpn_protocol", "ssl_cipher", "ssl_ciphers", "ssl_client_cert",
    "ssl_client_escaped_cert", "ssl_client_fingerprint", "ssl_client_i_dn", "ssl_client_raw_cert",
    "ssl_client_s_dn", "ssl_client_serial", "ssl_client_v_end", "ssl_client_v_remain",
    "ssl_client_v_start", "ssl_client_verify", "ssl_curve", "ssl_curves", "ssl_protocol",
    "ssl_server_name", "ssl_session_id", "ssl_session_reused", "ssl_preread_alpn_protocols",
    "ssl_preread_protocol", "ssl_preread_server_name",
];

/// The smallest upstream zone nginx takes: 8 pages of 4 KiB.
const MIN_ZONE: i64 = 8 * 4096;

fn args_ok(bits: u32, n: usize) -> bool {
    if bits & ANY != 0 {
        true
    } else if bits & FLAG != 0 {
        n == 1
    } else if bits & MORE1 != 0 {
        n >= 1
    } else if bits & MORE2 != 0 {
        n >= 2
    } else {
        n <= 7 && bits & (1 << n) != 0
    }
}

fn takes(bits: u32) -> &'static str {
    match bits & !BLOCK {
        NOARGS => "takes no arguments",
        TAKE1 => "takes 1 argument",
        TAKE2 => "takes 2 arguments",
        TAKE12 => "takes 1 or 2 arguments",
        TAKE23 => "takes 2 or 3 arguments",
        TAKE1234 => "takes 1 to 4 arguments",
        FLAG => "takes `on` or `off`",
        MORE1 => "takes at least 1 argument",
        MORE2 => "takes at least 2 arguments",
        x if x == NOARGS | TAKE12 => "takes 0, 1 or 2 arguments",
        _ => "takes another number of arguments",
    }
}

/// `error_log FILE [level]`: one severity and any `debug_*` masks, nginx's `ngx_log_set_levels`.
fn log_levels(levels: &[String]) -> Result<(), String> {
    const SEVERITY: &[&str] = &["emerg", "alert", "crit", "error", "warn", "notice", "info", "debug"];
    const DEBUG: &[&str] =
        &["debug_core", "debug_alloc", "debug_mutex", "debug_event", "debug_http", "debug_mail", "debug_stream"];
    let (mut severity, mut masks) = (false, false);
    for l in levels {
        if SEVERITY.contains(&l.as_str()) {
            if severity || masks {
                return Err(format!("duplicate log level `{l}`"));
            }
            severity = true;
        } else if DEBUG.contains(&l.as_str()) && !severity {
            masks = true;
        } else {
            return Err(format!("invalid log level `{l}` (one of {}, or debug_* alone)", SEVERITY.join(", ")));
        }
    }
    Ok(())
}

fn check_value(d: &Stmt, value: Value) -> Result<(), NginxError> {
    let first = d.args.first().map(String::as_str).unwrap_or("");
    let bad = |value: &str, expected: &str| {
        Err(NginxError::Value {
            line: d.line,
            directive: d.name.clone(),
            value: value.to_string(),
            expected: expected.to_string(),
        })
    };
    let one_of = |v: &str, list: &[&str], any_case: bool| {
        list.iter().any(|x| if any_case { x.eq_ignore_ascii_case(v) } else { *x == v })
    };
    match value {
        Value::Free => Ok(()),
        Value::Flag if one_of(first, &["on", "off"], true) => Ok(()),
        Value::Flag => bad(first, "it must be `on` or `off`"),
        Value::Msec if parse_time(first, false).is_some() => Ok(()),
        Value::Msec => bad(first, "expected a time like 500ms, 30s, 1m (no y or M)"),
        Value::Sec if parse_time(first, true).is_some() => Ok(()),
        Value::Sec => bad(first, "expected a time in seconds like 30s, 5m, 1h (no ms)"),
        Value::Size if parse_size(first, false).is_some() => Ok(()),
        Value::Size => bad(first, "expected a size like 512, 16k, 1m"),
        Value::Offset if parse_size(first, true).is_some() => Ok(()),
        Value::Offset => bad(first, "expected a size like 512, 16k, 1m, 1g"),
        Value::Number if atoi(first).is_some() => Ok(()),
        Value::Number => bad(first, "expected a whole number"),
        Value::WorkerProcesses if first == "auto" || atoi(first).is_some() => Ok(()),
        Value::WorkerProcesses => bad(first, "expected `auto` or a whole number"),
        Value::SizeOrVariable if first.contains('$') || parse_size(first, false).is_some() => Ok(()),
        Value::SizeOrVariable => bad(first, "expected a size like 512, 16k, 1m, or a variable"),
        Value::OneOf(list) if one_of(first, list, true) => Ok(()),
        Value::Exactly(list) if one_of(first, list, false) => Ok(()),
        Value::OneOf(list) | Value::Exactly(list) => bad(first, &format!("expected one of {}", list.join(", "))),
        Value::Protocols => match d.args.iter().find(|a| !one_of(a, PROTOCOLS, true)) {
            Some(a) => bad(a, &format!("expected {}", PROTOCOLS.join(", "))),
            None => Ok(()),
        },
        Value::LogLevels => match log_levels(&d.args[1..]) {
            Ok(()) => Ok(()),
            Err(why) => Err(syntax(d.line, format!("`error_log`: {why}"))),
        },
        Value::Variable if first.len() > 1 && first.starts_with('$') => Ok(()),
        Value::Variable => bad(first, "a variable name starts with `$`"),
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses

/// Host and port of an nginx address ("host:port", "[v6]:port", a bare host), without `unix:`.
/// nginx splits at the first `:`, so an IPv6 address needs brackets.
fn split_address(s: &str) -> Result<(&str, Option<u16>, bool), &'static str> {
    let port = |p: &str| match atoi(p) {
        Some(n @ 1..=65535) => Ok(n as u16),
        _ => Err("port must be a number from 1 to 65535"),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing `]`")?;
        host.parse::<Ipv6Addr>().map_err(|_| "invalid IPv6 address")?;
        return match after {
            "" => Ok((host, None, true)),
            p => Ok((host, Some(port(p.strip_prefix(':').ok_or("expected `:port` after `]`")?)?), true)),
        };
    }
    if s.contains('/') {
        return Err("invalid host");
    }
    let Some((host, p)) = s.split_once(':') else {
        return Ok((s, None, false));
    };
    if p.contains(':') {
        return Err("expected host:port, with IPv6 in brackets like [::1]:1883");
    }
    let port = port(p)?;
    if host.is_empty() {
        return Err("no host");
    }
    Ok((host, Some(port), false))
}

/// A name nginx could resolve: anything else fails at `nginx -t` with "host not found".
fn plausible_host(host: &str) -> bool {
    !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn join_host_port(host: &str, port: u16, bracketed: bool) -> String {
    match bracketed {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// An upstream `server` address, as nginx's `ngx_parse_url` reads it there: the port is required.
/// `Ok(None)` for a unix socket, which nginx takes but meshgate cannot reach.
fn upstream_address(line: usize, s: &str) -> Result<Option<String>, NginxError> {
    let bad = |why: &str| syntax(line, format!("bad address `{s}`: {why}"));
    if let Some(path) = s.strip_prefix("unix:") {
        return if path.is_empty() { Err(bad("no path in the unix domain socket")) } else { Ok(None) };
    }
    let (host, port, bracketed) = split_address(s).map_err(bad)?;
    let Some(port) = port else {
        return Err(bad("missing port (nginx stream needs host:port, e.g. 127.0.0.1:1883)"));
    };
    if !bracketed && !plausible_host(host) {
        return Err(bad("invalid host"));
    }
    Ok(Some(join_host_port(host, port, bracketed)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ListenAddr {
    Unix(String),
    /// `host` is "*" for a wildcard ("1883", "*:1883"); `port` None makes nginx take a random one.
    Inet {
        host: String,
        port: Option<u16>,
        bracketed: bool,
    },
}

struct Listen {
    line: usize,
    text: String,
    addr: ListenAddr,
    udp: bool,
    ssl: bool,
    proxy_protocol: bool,
}

impl Listen {
    /// What nginx compares to find a "duplicate address and port pair" (host names unresolved).
    fn key(&self) -> String {
        let addr = match &self.addr {
            ListenAddr::Unix(path) => format!("unix:{path}"),
            ListenAddr::Inet { host, port, .. } => {
                let port = port.unwrap_or(0);
                match (host.as_str(), host.parse::<Ipv4Addr>(), host.parse::<Ipv6Addr>()) {
                    ("*", _, _) => format!("0.0.0.0:{port}"),
                    (_, Ok(v4), _) => format!("{v4}:{port}"),
                    (_, _, Ok(v6)) => format!("[{v6}]:{port}"),
                    (name, _, _) => format!("{}:{port}", name.to_ascii_lowercase()),
                }
            }
        };
        format!("{}{addr}", if self.udp { "udp " } else { "" })
    }
}

/// `so_keepalive=on|off|[idle]:[interval]:[count]`, as nginx 1.22 reads it.
fn so_keepalive_ok(v: &str) -> bool {
    if v == "on" || v == "off" {
        return true;
    }
    let mut parts = v.splitn(3, ':');
    let idle = parts.next().filter(|p| !p.is_empty()).map(|p| parse_time(p, true));
    let interval = parts.next().filter(|p| !p.is_empty()).map(|p| parse_time(p, true));
    let count = parts.next().filter(|p| !p.is_empty()).map(atoi);
    let values = [idle, interval, count];
    values.iter().all(|v| !matches!(v, Some(None))) && values.iter().any(|v| matches!(v, Some(Some(n)) if *n != 0))
}

type ValueCheck = fn(&str) -> bool;

/// The `listen` parameters that take a value, and nginx's check of it.
const LISTEN_VALUES: &[(&str, ValueCheck)] = &[
    ("backlog=", |v| atoi(v).is_some_and(|n| n != 0)),
    ("rcvbuf=", |v| parse_size(v, false).is_some()),
    ("sndbuf=", |v| parse_size(v, false).is_some()),
    ("ipv6only=o", |v| v == "n" || v == "ff"),
    ("so_keepalive=", so_keepalive_ok),
    ("fastopen=", |v| atoi(v).is_some()),
];

/// A stream `listen` directive with nginx 1.22's address forms and parameters.
fn parse_listen(d: &Stmt) -> Result<Listen, NginxError> {
    let text = d.args[0].clone();
    let bad = |why: &str| syntax(d.line, format!("bad listen address `{text}`: {why}"));
    let addr = if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("no path in the unix domain socket"));
        }
        ListenAddr::Unix(path.to_string())
    } else if !text.starts_with('[') && !text.contains(':') && atoi(&text).is_some() {
        // A bare number is a port on every address.
        let (_, port, _) = split_address(&format!("*:{text}")).map_err(bad)?;
        ListenAddr::Inet { host: "*".into(), port, bracketed: false }
    } else {
        let (host, port, bracketed) = split_address(&text).map_err(bad)?;
        if !bracketed && host != "*" && !plausible_host(host) {
            return Err(bad(if host.is_empty() { "no host" } else { "invalid host" }));
        }
        ListenAddr::Inet { host: host.to_string(), port, bracketed }
    };
    let mut l = Listen { line: d.line, text, addr, udp: false, ssl: false, proxy_protocol: false };
    let (mut backlog, mut so_keepalive) = (false, false);
    for p in &d.args[1..] {
        match p.as_str() {
            "udp" => l.udp = true,
            "ssl" => l.ssl = true,
            "proxy_protocol" => l.proxy_protocol = true,
            "bind" | "reuseport" => {}
            _ => {
                let Some((prefix, ok)) = LISTEN_VALUES.iter().find(|(prefix, _)| p.starts_with(prefix)) else {
                    let msg = format!("invalid `listen` parameter `{p}` (nginx 1.22 stream knows udp, ssl, proxy_protocol, bind, reuseport, backlog=, rcvbuf=, sndbuf=, ipv6only=, so_keepalive=, fastopen=)");
                    return Err(syntax(d.line, msg));
                };
                if !ok(&p[prefix.len()..]) {
                    return Err(syntax(d.line, format!("invalid `listen` parameter value `{p}`")));
                }
                backlog |= *prefix == "backlog=";
                so_keepalive |= *prefix == "so_keepalive=";
            }
        }
    }
    if l.udp {
        let clash = [
            ("backlog", backlog),
            ("ssl", l.ssl),
            ("so_keepalive", so_keepalive),
            ("proxy_protocol", l.proxy_protocol),
        ];
        if let Some((param, _)) = clash.iter().find(|(_, on)| *on) {
            return Err(syntax(d.line, format!("`listen` parameter `{param}` is incompatible with `udp`")));
        }
    }
    Ok(l)
}

/// `access_log off` or `access_log PATH FORMAT [buffer=] [gzip[=]] [flush=] [if=]`, the format
/// defined by a `log_format` earlier in the file (nginx looks it up there and then).
fn access_log(d: &Stmt, formats: &HashMap<String, usize>) -> Result<(), NginxError> {
    let bad = |msg: String| Err(syntax(d.line, format!("`access_log`: {msg}")));
    let (path, rest) = d.args.split_first().expect("MORE1 has an argument");
    if path == "off" {
        return match rest.first() {
            Some(p) => bad(format!("invalid parameter `{p}` after `off`")),
            None => Ok(()),
        };
    }
    let Some((format, params)) = rest.split_first() else {
        return bad("no log format (stream has no default: name a `log_format`)".into());
    };
    if !formats.contains_key(format) {
        return bad(format!("unknown log format `{format}` (a `log_format` must come before it)"));
    }
    for p in params {
        let ok = if let Some(v) = p.strip_prefix("buffer=") {
            parse_size(v, false).is_some()
        } else if let Some(v) = p.strip_prefix("flush=") {
            parse_time(v, false).is_some()
        } else if let Some(v) = p.strip_prefix("gzip=") {
            matches!(atoi(v), Some(1..=9))
        } else {
            p == "gzip" || p.starts_with("if=")
        };
        if !ok {
            return bad(format!("invalid parameter `{p}`"));
        }
    }
    Ok(())
}

/// The variables a complex value such as a `hash` key uses, by nginx's script rules: `$name`,
/// `${name}`, `$1`..`$9` (regex captures, not variables).
fn variables_in(value: &str) -> Result<Vec<String>, String> {
    let b = value.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    let name_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        i += 1;
        if b.get(i).is_some_and(|c| (b'1'..=b'9').contains(c)) {
            i += 1;
            continue;
        }
        let bracket = b.get(i) == Some(&b'{');
        if bracket {
            i += 1;
            if i == b.len() {
                return Err("invalid variable name".into());
            }
        }
        let from = i;
        while i < b.len() && name_char(b[i]) {
            i += 1;
        }
        let name = &value[from..i];
        if bracket {
            if b.get(i) != Some(&b'}') {
                return Err(format!("the closing bracket in variable `{name}` is missing"));
            }
            i += 1;
        }
        if name.is_empty() {
            return Err("invalid variable name".into());
        }
        out.push(name.to_ascii_lowercase());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The checks

struct Upstream<'t> {
    name: String,
    line: usize,
    servers: Vec<NginxServer>,
    /// `server` entries at unix sockets: line and address.
    unix: Vec<(usize, String)>,
    /// `least_conn`, `hash` and `random` in file order; nginx uses the last.
    methods: Vec<&'t Stmt>,
    zones: Vec<&'t Stmt>,
}

enum Handler<'t> {
    Proxy(&'t Stmt),
    Return,
}

struct VServer<'t> {
    stmt: &'t Stmt,
    listens: Vec<Listen>,
    /// The last of `proxy_pass` and `return`: nginx runs that one.
    handler: Option<Handler<'t>>,
    /// Everything else, for the "not imported" warning.
    others: Vec<&'t Stmt>,
}

/// Where a `proxy_pass` sends clients.
enum Target {
    Upstream(usize),
    /// `proxy_pass host:port`: a pool of one, at the `proxy_pass` line.
    Address(String, usize),
    /// Variables or a unix socket: valid nginx, not something meshgate can import.
    Unsupported(&'static str, usize),
}

struct Checker<'t> {
    lexer: &'t Lexer<'t>,
    warnings: Vec<String>,
    /// The file loads modules (or includes files that may): names meshgate does not know may be theirs.
    lenient: bool,
}

impl<'t> Checker<'t> {
    fn warn(&mut self, line: usize, msg: impl AsRef<str>) {
        self.warnings.push(format!("line {line}: {}", msg.as_ref()));
    }

    /// nginx's `ngx_conf_handler` for one directive: allowed here, `;` or `{`, argument count,
    /// value, once per block. None when the directive is unknown and left to a loaded module.
    /// A directive inside a block whose contents meshgate imports (`upstream`, `server`):
    /// checked as `directive` does, with `include` refused (what it names cannot be imported).
    /// `false` when it is to be skipped.
    fn imported_child(
        &mut self,
        d: &Stmt,
        ctx: u8,
        place: &'static str,
        seen: &mut HashMap<&'static str, usize>,
    ) -> Result<bool, NginxError> {
        if d.name == "include" {
            return Err(NginxError::Include { line: d.line });
        }
        Ok(self.directive(d, ctx, place, seen)?.is_some())
    }

    fn directive(
        &mut self,
        d: &Stmt,
        ctx: u8,
        place: &'static str,
        seen: &mut HashMap<&'static str, usize>,
    ) -> Result<Option<&'static Spec>, NginxError> {
        let Some(spec) = SPECS.iter().find(|s| s.name == d.name && s.ctx & ctx != 0) else {
            if self.lenient && !SPECS.iter().any(|s| s.name == d.name) {
                let msg =
                    format!("`{}` is not an nginx 1.22 directive meshgate knows (a loaded module's?): ignored", d.name);
                self.warn(d.line, msg);
                return Ok(None);
            }
            return Err(NginxError::NotAllowed { line: d.line, directive: d.name.clone(), place });
        };
        match (spec.args & BLOCK != 0, d.block.is_some()) {
            (true, false) => return Err(syntax(d.line, format!("directive `{}` has no opening `{{`", d.name))),
            (false, true) => return Err(syntax(d.line, format!("directive `{}` is not terminated by `;`", d.name))),
            _ => {}
        }
        if !args_ok(spec.args, d.args.len()) {
            let got = match d.args.len() {
                0 => "none".to_string(),
                n => format!("{n}: `{}`", shorten(&d.args.join(" "), 40)),
            };
            let hint = match d.end_line > d.line {
                true => format!("; is the `;` at the end of line {} missing?", d.line),
                false => String::new(),
            };
            let directive = d.name.clone();
            return Err(NginxError::Arguments { line: d.line, directive, takes: takes(spec.args), got, hint });
        }
        check_value(d, spec.value)?;
        if let Some(key) = spec.once {
            if let Some(&first) = seen.get(key) {
                return Err(NginxError::Duplicate { line: d.line, directive: d.name.clone(), first });
            }
            seen.insert(key, d.line);
        }
        Ok(Some(spec))
    }

    /// The main context of a whole nginx.conf; returns the `stream` block's contents, if any.
    fn main_context(&mut self, tree: &'t [Stmt]) -> Result<Option<&'t [Stmt]>, NginxError> {
        let (mut seen, mut stream, mut blocks_seen) = (HashMap::new(), None, false);
        let mut modules: HashMap<&str, usize> = HashMap::new();
        for d in tree {
            if self.directive(d, MAIN, "the main context", &mut seen)?.is_none() {
                continue;
            }
            match d.name.as_str() {
                "load_module" if blocks_seen => {
                    let msg =
                        "`load_module` comes too late: nginx needs it before the `events`, `http` and `stream` blocks";
                    return Err(syntax(d.line, msg));
                }
                "load_module" => {
                    let module = d.args[0].rsplit('/').next().unwrap_or_default();
                    if let Some(first) = modules.insert(module, d.line) {
                        return Err(syntax(d.line, format!("module `{module}` is already loaded (line {first})")));
                    }
                }
                "events" => {
                    blocks_seen = true;
                    let mut seen = HashMap::new();
                    for inner in d.block.iter().flatten() {
                        self.directive(inner, EVENTS, "the `events` block", &mut seen)?;
                    }
                }
                "http" => blocks_seen = true,
                "stream" => {
                    blocks_seen = true;
                    stream = d.block.as_deref();
                }
                _ => {}
            }
        }
        Ok(stream)
    }

    fn upstream(&mut self, d: &'t Stmt) -> Result<Upstream<'t>, NginxError> {
        let mut up = Upstream {
            name: d.args[0].clone(),
            line: d.line,
            servers: Vec::new(),
            unix: Vec::new(),
            methods: Vec::new(),
            zones: Vec::new(),
        };
        let mut seen = HashMap::new();
        for inner in d.block.iter().flatten() {
            if !self.imported_child(inner, UPSTREAM, "a stream `upstream` block", &mut seen)? {
                continue;
            }
            match inner.name.as_str() {
                "server" => {
                    // hash and random cannot order servers, so nginx refuses `backup` after them.
                    let backup_ok = up.methods.last().is_none_or(|m| m.name == "least_conn");
                    let comment = self.lexer.trailing_comment(inner.end);
                    match parse_server(inner, backup_ok, comment)? {
                        Some(s) => up.servers.push(s),
                        None => up.unix.push((inner.line, inner.args[0].clone())),
                    }
                }
                "least_conn" | "hash" | "random" => {
                    if let Some(prev) = up.methods.last() {
                        let msg = format!(
                            "load balancing method redefined (nginx warns too): `{}` replaces `{}` (line {})",
                            inner.name, prev.name, prev.line
                        );
                        self.warn(inner.line, msg);
                    }
                    let param_ok = match (inner.name.as_str(), inner.args.as_slice()) {
                        ("hash", [_, c]) => c == "consistent",
                        ("random", [two, rest @ ..]) => two == "two" && rest.iter().all(|m| m == "least_conn"),
                        _ => true,
                    };
                    if !param_ok {
                        let msg = format!("invalid parameter in `{}` (nginx takes `hash KEY [consistent]`, `random [two [least_conn]]`)", inner.text());
                        return Err(syntax(inner.line, msg));
                    }
                    up.methods.push(inner);
                }
                "zone" => {
                    if let Some(size) = inner.args.get(1) {
                        match parse_size(size, false) {
                            None => return Err(syntax(inner.line, format!("invalid zone size `{size}`"))),
                            Some(n) if n < MIN_ZONE => {
                                let msg = format!("zone `{}` is too small: nginx needs at least 32k", inner.args[0]);
                                return Err(syntax(inner.line, msg));
                            }
                            Some(_) => {}
                        }
                    }
                    up.zones.push(inner);
                }
                _ => {}
            }
        }
        if up.servers.is_empty() && up.unix.is_empty() {
            return Err(NginxError::EmptyUpstream { name: up.name, line: up.line });
        }
        if up.unix.is_empty() && up.servers.iter().all(|s| s.backup) {
            let msg = format!("upstream `{}` has only `backup` servers: nginx needs one that is not a backup", up.name);
            return Err(syntax(up.line, msg));
        }
        Ok(up)
    }

    fn vserver(
        &mut self,
        d: &'t Stmt,
        variables: &mut HashSet<String>,
        log_formats: &HashMap<String, usize>,
    ) -> Result<VServer<'t>, NginxError> {
        let mut v = VServer { stmt: d, listens: Vec::new(), handler: None, others: Vec::new() };
        let mut seen = HashMap::new();
        for inner in d.block.iter().flatten() {
            if !self.imported_child(inner, SERVER, "a stream `server` block", &mut seen)? {
                continue;
            }
            match inner.name.as_str() {
                "listen" => v.listens.push(parse_listen(inner)?),
                "access_log" => {
                    access_log(inner, log_formats)?;
                    v.others.push(inner);
                }
                "proxy_pass" => v.handler = Some(Handler::Proxy(inner)),
                "return" => {
                    if let Some(Handler::Proxy(p)) = v.handler {
                        let msg = format!("`return` overrides `proxy_pass` (line {}): nginx answers with the text instead of proxying", p.line);
                        self.warn(inner.line, msg);
                    }
                    v.handler = Some(Handler::Return);
                }
                "set" => {
                    variables.insert(inner.args[0][1..].to_ascii_lowercase());
                    v.others.push(inner);
                }
                _ => v.others.push(inner),
            }
        }
        Ok(v)
    }

    /// nginx's lookup of a `proxy_pass` target: an upstream by name (any case), else an address.
    fn target(&self, pp: &Stmt, upstreams: &[Upstream]) -> Result<Target, NginxError> {
        let arg = &pp.args[0];
        if arg.contains('$') {
            return Ok(Target::Unsupported("a `proxy_pass` with variables", pp.line));
        }
        if arg.starts_with("unix:") {
            upstream_address(pp.line, arg)?;
            return Ok(Target::Unsupported("a `proxy_pass` to a unix socket", pp.line));
        }
        let (host, port, _) =
            split_address(arg).map_err(|why| syntax(pp.line, format!("bad address `{arg}`: {why}")))?;
        if let Some(i) = upstreams.iter().position(|u| u.name.eq_ignore_ascii_case(host)) {
            return match port {
                None => Ok(Target::Upstream(i)),
                Some(p) => Err(syntax(pp.line, format!("upstream `{host}` may not have port {p}"))),
            };
        }
        if port.is_none() {
            return Err(NginxError::UndefinedUpstream { name: arg.clone(), line: pp.line });
        }
        Ok(Target::Address(upstream_address(pp.line, arg)?.unwrap_or_default(), pp.line))
    }

    fn stream(&mut self, body: &'t [Stmt]) -> Result<NginxStream, NginxError> {
        let mut variables: HashSet<String> = STREAM_VARIABLES.iter().map(|v| v.to_string()).collect();
        let (mut upstreams, mut vservers, mut inherited) = (Vec::<Upstream>::new(), Vec::<VServer>::new(), Vec::new());
        let (mut seen, mut log_formats, mut conn_zones) = (HashMap::new(), HashMap::new(), Vec::new());
        for d in body {
            // The importer's own wording for the mistakes operators make most.
            match (d.name.as_str(), &d.block) {
                ("include", _) => return Err(NginxError::Include { line: d.line }),
                ("server", None) => {
                    return Err(syntax(d.line, "`server host:port;` belongs inside `upstream NAME { ... }`"))
                }
                ("upstream", b) if b.is_none() || d.args.len() != 1 => {
                    return Err(syntax(d.line, "expected `upstream NAME { server host:port; ... }`"))
                }
                _ => {}
            }
            let Some(spec) = self.directive(d, STREAM, "the `stream` block", &mut seen)? else {
                continue;
            };
            let define = |vars: &mut HashSet<String>, v: Option<&String>| {
                if let Some(name) = v.and_then(|v| v.strip_prefix('$')) {
                    vars.insert(name.to_ascii_lowercase());
                }
            };
            match d.name.as_str() {
                "upstream" => {
                    let up = self.upstream(d)?;
                    if let Some(first) = upstreams.iter().find(|u| u.name.eq_ignore_ascii_case(&up.name)) {
                        let msg = format!("upstream `{}` is already defined at line {}", up.name, first.line);
                        return Err(syntax(d.line, msg));
                    }
                    upstreams.push(up);
                }
                "server" => vservers.push(self.vserver(d, &mut variables, &log_formats)?),
                "map" | "split_clients" => define(&mut variables, d.args.get(1)),
                "geo" => define(&mut variables, d.args.last()),
                "limit_conn_zone" => {
                    if let Some(zone) = d.args[1].strip_prefix("zone=").and_then(|z| z.split(':').next()) {
                        conn_zones.push((zone.to_string(), d.line));
                    }
                }
                "log_format" => {
                    if let Some(first) = log_formats.insert(d.args[0].clone(), d.line) {
                        let msg = format!("duplicate `log_format` name `{}` (first at line {first})", d.args[0]);
                        return Err(syntax(d.line, msg));
                    }
                }
                "access_log" => {
                    access_log(d, &log_formats)?;
                    inherited.push(d);
                }
                "proxy_downstream_buffer" | "proxy_upstream_buffer" => {
                    let msg = format!("`{}` is deprecated (nginx warns too): use `proxy_buffer_size`", d.name);
                    self.warn(d.line, msg);
                    inherited.push(d);
                }
                _ if spec.ctx & SERVER != 0 => inherited.push(d),
                _ => {}
            }
        }
        self.zones(&upstreams, &conn_zones)?;
        self.hash_variables(&upstreams, &variables)?;
        let mut bound: HashMap<String, usize> = HashMap::new();
        for l in vservers.iter().flat_map(|v| &v.listens) {
            if let Some(first) = bound.insert(l.key(), l.line) {
                let msg = format!("duplicate listen address `{}` (first at line {first})", l.text);
                return Err(syntax(l.line, msg));
            }
        }
        let mut targets: Vec<Option<Target>> = Vec::with_capacity(vservers.len());
        for v in &vservers {
            targets.push(match &v.handler {
                Some(Handler::Proxy(pp)) => Some(self.target(pp, &upstreams)?),
                _ => None,
            });
        }
        // The block meshgate becomes: the first that proxies. Without one, the first that does
        // nothing (nginx refuses it below, after the more specific messages).
        let imported =
            targets.iter().position(Option::is_some).or_else(|| vservers.iter().position(|v| v.handler.is_none()));
        let listen = match imported {
            Some(i) => self.import_listen(&vservers[i])?,
            None => None,
        };
        complete(&vservers, &inherited)?;
        let target = match imported.and_then(|i| targets[i].take()) {
            Some(t) => t,
            None if upstreams.len() == 1 => Target::Upstream(0),
            None if upstreams.is_empty() => return Err(NginxError::NoUpstream),
            None => {
                let names: Vec<String> = upstreams.iter().map(|u| format!("`{}` line {}", u.name, u.line)).collect();
                return Err(NginxError::AmbiguousUpstream { names: names.join(", ") });
            }
        };
        let (upstream, least_conn, mut servers) = match target {
            Target::Unsupported(what, line) => {
                return Err(syntax(line, format!("{what} is not supported by meshgate: name an upstream block")));
            }
            Target::Address(address, line) => {
                // nginx's defaults for a server line without parameters.
                let server = NginxServer {
                    address: address.clone(),
                    weight: 1,
                    max_fails: 1,
                    fail_timeout: Duration::from_secs(10),
                    max_conns: 0,
                    backup: false,
                    down: false,
                    line,
                    name: None,
                };
                (address, false, vec![server])
            }
            Target::Upstream(i) => {
                let up = upstreams.swap_remove(i);
                if let Some((line, address)) = up.unix.first() {
                    let msg = format!("bad address `{address}`: unix sockets are not supported by meshgate");
                    return Err(syntax(*line, msg));
                }
                self.method_warnings(&up);
                let least_conn = up.methods.last().is_some_and(|m| m.name == "least_conn");
                (up.name, least_conn, up.servers)
            }
        };
        if let Some(i) = imported {
            self.not_imported(&vservers, i, &inherited, &upstream);
        }
        self.name_brokers(&mut servers);
        Ok(NginxStream { listen, upstream, least_conn, servers, warnings: std::mem::take(&mut self.warnings) })
    }

    /// Every variable a `hash` key uses exists (nginx's own, or made by map, geo, split_clients, set).
    fn hash_variables(&mut self, upstreams: &[Upstream], variables: &HashSet<String>) -> Result<(), NginxError> {
        for m in upstreams.iter().flat_map(|u| &u.methods).filter(|m| m.name == "hash") {
            let used = variables_in(&m.args[0]).map_err(|why| syntax(m.line, format!("`hash`: {why}")))?;
            for v in used.iter().filter(|v| !variables.contains(*v)) {
                if !self.lenient {
                    return Err(syntax(m.line, format!("`hash`: unknown variable `${v}`")));
                }
                self.warn(m.line, format!("`hash`: variable `${v}` is not one meshgate knows (a loaded module's?)"));
            }
        }
        Ok(())
    }

    /// Upstream zones: sized somewhere, one size per name, not a `limit_conn_zone`'s name.
    fn zones(&self, upstreams: &[Upstream], conn_zones: &[(String, usize)]) -> Result<(), NginxError> {
        let mut sized: HashMap<&str, (i64, usize)> = HashMap::new();
        for z in upstreams.iter().flat_map(|u| &u.zones) {
            let name = z.args[0].as_str();
            if let Some((_, other)) = conn_zones.iter().find(|(n, _)| n == name) {
                let msg =
                    format!("zone `{name}` is already declared for a different use (`limit_conn_zone`, line {other})");
                return Err(syntax(z.line, msg));
            }
            let Some(size) = z.args.get(1).and_then(|s| parse_size(s, false)) else { continue };
            match sized.get(name) {
                Some((first, line)) if *first != size => {
                    let msg = format!("the size of zone `{name}` conflicts with the one declared at line {line}");
                    return Err(syntax(z.line, msg));
                }
                Some(_) => {}
                None => {
                    sized.insert(name, (size, z.line));
                }
            }
        }
        for z in upstreams.iter().flat_map(|u| &u.zones) {
            if !sized.contains_key(z.args[0].as_str()) {
                let msg = format!(
                    "zone `{}` has no size anywhere (nginx refuses a zero size zone: write `zone {} 64k;`)",
                    z.args[0], z.args[0]
                );
                return Err(syntax(z.line, msg));
            }
        }
        Ok(())
    }

    /// The one MQTT address meshgate binds: the block's first TCP listen, which must be one it can serve.
    fn import_listen(&mut self, v: &VServer) -> Result<Option<String>, NginxError> {
        let mut chosen: Option<(String, usize)> = None;
        for l in &v.listens {
            let text = format!("listen {}", l.text);
            if l.udp {
                self.warn(l.line, format!("`{text} udp...` is not imported: meshgate proxies MQTT over TCP only"));
                continue;
            }
            if let Some((first, line)) = &chosen {
                self.warn(
                    l.line,
                    format!("`{text}` is not imported: meshgate listens on one MQTT address ({first}, line {line})"),
                );
                continue;
            }
            let unsupported = |what: String| syntax(l.line, format!("{what} is not supported by meshgate"));
            // Both change the bytes on the socket, so ignoring them would break every client.
            for (param, on) in [("ssl", l.ssl), ("proxy_protocol", l.proxy_protocol)] {
                if on {
                    return Err(unsupported(format!("listen parameter `{param}`")));
                }
            }
            let address = match &l.addr {
                ListenAddr::Unix(_) => return Err(unsupported(format!("listen on a unix socket (`{}`)", l.text))),
                ListenAddr::Inet { port: None, .. } => {
                    let msg = format!("bad listen address `{}`: missing port (nginx would pick a random one; that is not supported by meshgate: write host:1883)", l.text);
                    return Err(syntax(l.line, msg));
                }
                ListenAddr::Inet { host, port: Some(port), bracketed } => match host.as_str() {
                    "*" => format!("0.0.0.0:{port}"),
                    h => join_host_port(h, *port, *bracketed),
                },
            };
            chosen = Some((address, l.line));
        }
        Ok(chosen.map(|(a, _)| a))
    }

    fn method_warnings(&mut self, up: &Upstream) {
        const INSTEAD: &str = "meshgate balances by least connections by weight within each tier";
        match up.methods.last() {
            None => {
                let msg = format!(
                    "upstream `{}` has no `least_conn`: nginx would use weighted round robin; {INSTEAD}",
                    up.name
                );
                self.warn(up.line, msg);
            }
            Some(m) if m.name == "hash" => {
                let msg = format!(
                    "`{}` is not implemented: {INSTEAD}, so clients are not pinned to a broker by their key",
                    m.text()
                );
                self.warn(m.line, msg);
            }
            Some(m) if m.name == "random" => self.warn(m.line, format!("`{}` is not implemented: {INSTEAD}", m.text())),
            Some(_) => {}
        }
        for z in &up.zones {
            let msg = format!(
                "`{}` has no effect: meshgate keeps its brokers' state in one process, shared by all its workers",
                z.text()
            );
            self.warn(z.line, msg);
        }
    }

    /// Say what of the stream section meshgate leaves out: other server blocks, and the settings
    /// of the imported block (its own and those it inherits from `stream`).
    fn not_imported(&mut self, vservers: &[VServer], imported: usize, inherited: &[&Stmt], upstream: &str) {
        let line = vservers[imported].stmt.line;
        for (_, v) in vservers.iter().enumerate().filter(|(i, _)| *i != imported) {
            let listens: Vec<&str> = v.listens.iter().map(|l| l.text.as_str()).collect();
            let msg = format!(
                "this `server` block (listen {}) is not imported: meshgate serves only the one proxying to `{upstream}` (line {line})",
                listens.join(", ")
            );
            self.warn(v.stmt.line, msg);
        }
        let instead = |name: &str| match name {
            "proxy_connect_timeout" => "; meshgate: [proxy] upstream_connect_timeout",
            "access_log" => "; meshgate: [access_log]",
            "error_log" => "; meshgate: --log-level",
            _ => "",
        };
        let skipped: Vec<String> = inherited
            .iter()
            .chain(&vservers[imported].others)
            .map(|d| format!("{} (line {}{})", d.name, d.line, instead(&d.name)))
            .collect();
        if !skipped.is_empty() {
            let msg = format!(
                "settings of the imported `server` block that meshgate does not take over (its TOML config has its own): {}",
                skipped.join(", ")
            );
            self.warn(line, msg);
        }
    }

    /// Names from trailing `# name` comments stay only if every broker ends up with a distinct name.
    fn name_brokers(&mut self, servers: &mut [NginxServer]) {
        if servers.iter().all(|s| s.name.is_none()) {
            return;
        }
        let names: Vec<String> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| s.name.clone().unwrap_or_else(|| format!("broker{}", i + 1)))
            .collect();
        let mut seen = HashSet::new();
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
            let msg = format!("broker names from `# name` comments are not used: `{dup}` would name two brokers; they are called broker1, broker2, ... in file order");
            self.warn(servers[0].line, msg);
            for s in servers.iter_mut() {
                s.name = None;
            }
        }
    }
}

/// What nginx demands of every stream `server` block once it is read: a `listen`, something to
/// do (`proxy_pass` or `return`), and certificates for a `listen ... ssl`.
fn complete(vservers: &[VServer], inherited: &[&Stmt]) -> Result<(), NginxError> {
    let count = |ds: &[&Stmt], name: &str| ds.iter().filter(|d| d.name == name).count();
    for v in vservers {
        let line = v.stmt.line;
        if v.listens.is_empty() {
            return Err(syntax(line, "stream `server` block has no `listen` (nginx refuses it)"));
        }
        if v.handler.is_none() {
            return Err(syntax(line, "stream `server` block has neither `proxy_pass` nor `return` (nginx refuses it)"));
        }
        if let Some(l) = v.listens.iter().find(|l| l.ssl) {
            // A block without certificates of its own inherits the stream block's.
            let from: &[&Stmt] = if count(&v.others, "ssl_certificate") > 0 { &v.others } else { inherited };
            let (certs, keys) = (count(from, "ssl_certificate"), count(from, "ssl_certificate_key"));
            if certs == 0 || keys < certs {
                let missing = if certs == 0 { "ssl_certificate" } else { "ssl_certificate_key" };
                return Err(syntax(l.line, format!("no `{missing}` for `listen {} ssl` (nginx refuses it)", l.text)));
            }
        }
    }
    Ok(())
}

/// `# broker1` or `# broker1, primary` names the broker "broker1"; other comments name nothing.
fn comment_name(comment: &str) -> Option<String> {
    let name = comment.split(',').next()?.trim();
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid.then(|| name.to_string())
}

/// An upstream `server` line by nginx 1.22's rules. `Ok(None)` for a unix socket: valid nginx,
/// refused later only if meshgate would import it.
fn parse_server(d: &Stmt, backup_ok: bool, comment: Option<&str>) -> Result<Option<NginxServer>, NginxError> {
    let line = d.line;
    let address = upstream_address(line, &d.args[0])?;
    let mut s = NginxServer {
        address: address.clone().unwrap_or_default(),
        weight: 1,
        max_fails: 1,
        fail_timeout: Duration::from_secs(10),
        max_conns: 0,
        backup: false,
        down: false,
        line,
        name: comment.and_then(comment_name),
    };
    let number = |key: &str, v: &str, min: i64| match atoi(v) {
        Some(n) if n >= min => Ok(saturate(n)),
        _ => Err(syntax(line, format!("bad value `{v}` for {key} (expected a whole number >= {min})"))),
    };
    // nginx matches these by prefix and lets a later one win, as here.
    for p in &d.args[1..] {
        if let Some(v) = p.strip_prefix("weight=") {
            s.weight = number("weight", v, 1)?;
        } else if let Some(v) = p.strip_prefix("max_conns=") {
            s.max_conns = number("max_conns", v, 0)?;
        } else if let Some(v) = p.strip_prefix("max_fails=") {
            s.max_fails = number("max_fails", v, 0)?;
        } else if let Some(v) = p.strip_prefix("fail_timeout=") {
            let secs = parse_time(v, true).ok_or_else(|| NginxError::BadTime { line, value: v.to_string() })?;
            s.fail_timeout = Duration::from_secs(secs as u64);
        } else if p == "backup" {
            if !backup_ok {
                let msg = "server parameter `backup` is not allowed after `hash` or `random` (nginx refuses it)";
                return Err(syntax(line, msg));
            }
            s.backup = true;
        } else if p == "down" {
            s.down = true;
        } else if matches!(p.split('=').next(), Some("resolve" | "slow_start" | "service" | "route" | "drain")) {
            // nginx Plus parameters.
            return Err(NginxError::Unsupported { line, param: p.clone() });
        } else {
            return Err(NginxError::UnknownParameter { line, param: p.clone() });
        }
    }
    Ok(address.map(|_| s))
}

pub fn parse(text: &str) -> Result<NginxStream, NginxError> {
    let mut lexer = Lexer { text: text.as_bytes(), pos: 0, line: 1, comments: Vec::new() };
    let tree = lexer.block(None, 0)?;
    // Another module's directives are unknown to meshgate: with one loaded (or a top-level
    // include, which may load one), an unknown name is a warning rather than an error.
    let lenient = tree.iter().any(|d| match d.name.as_str() {
        "include" => true,
        "load_module" => d.args.first().is_some_and(|p| !p.ends_with("ngx_stream_module.so")),
        _ => false,
    });
    let mut checker = Checker { lexer: &lexer, warnings: Vec::new(), lenient };
    let main_only = |d: &Stmt| {
        SPECS.iter().any(|s| s.name == d.name && s.ctx & MAIN != 0)
            && !SPECS.iter().any(|s| s.name == d.name && s.ctx & STREAM != 0)
    };
    if tree.iter().any(main_only) {
        // A whole nginx.conf, or a file with `stream { ... }` that nginx.conf includes.
        match checker.main_context(&tree)? {
            Some(body) => checker.stream(body),
            None => Err(NginxError::NoUpstream),
        }
    } else {
        // A streams.d snippet: the inside of a `stream` block.
        checker.stream(&tree)
    }
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
        // nginx refuses a server block without `listen`.
        assert!(l("").unwrap_err().to_string().contains("has no `listen`"));
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
upstream u {\n server h:1 fail_timeout=30x;\n} => line 2: bad time `30x` for fail_timeout (nginx wants seconds, or units like 30s, 1m, 1h; not ms)
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

    /// A whole stream section around `upstream` and `server` block contents.
    fn conf(upstream: &str, server: &str) -> String {
        format!("stream {{\n upstream u {{\n  {upstream}\n }}\n server {{\n  listen 127.0.0.1:1883;\n  proxy_pass u;\n  {server}\n }}\n}}\n")
    }

    #[test]
    fn a_missing_semicolon_is_refused_with_its_line() {
        let text = REFERENCE.replacen("least_conn;", "least_conn", 1);
        let e = err(&text);
        assert!(e.starts_with("line 7: `least_conn` takes no arguments, got 5: `server 127.0.0.10:1883"), "{e}");
        assert!(e.ends_with("is the `;` at the end of line 7 missing?"), "{e}");
    }

    // Each line: upstream contents | server contents, as nginx 1.22.1 `nginx -t` judged them.
    const NGINX_ACCEPTS: &str = r#"
server 127.0.0.1:1; least_conn; least_conn; |
server 127.0.0.1:1 backup; hash $remote_addr consistent; server 127.0.0.1:2; |
server 127.0.0.1:1; random two least_conn; |
server 127.0.0.1:1; zone z 32k; |
server 127.0.0.1:1 weight=1 weight=99999999999 fail_timeout=1y max_fails=0; |
server 127.0.0.1:1 fail_timeout=1s5 down; server 127.0.0.1:2 fail_timeout=1M backup; |
server 127.0.0.1:1; hash $Remote_Addr; |
server 127.0.0.1:1; hash ${remote_addr}x$1; |
server 127.0.0.1:1; include_not; | tcp_nodelay ON; proxy_timeout "1m 30s"; preread_timeout 1w2d;
server 127.0.0.1:1; | proxy_buffer_size 16K; proxy_upload_rate $remote_addr; ssl_protocols tlsv1.3;
server 127.0.0.1:1; | return x;
server 127.0.0.1:1; | listen 127.0.0.1:1884 udp; listen [::1]:1883 so_keepalive=30m::10 fastopen=3;
"#;

    const NGINX_REFUSES: &str = r#"
server 127.0.0.1:1; keepalive 2; | => `keepalive` is not a directive nginx accepts in a stream `upstream` block
server 127.0.0.1:1; ip_hash; | => `ip_hash` is not a directive
hash $remote_addr; server 127.0.0.1:1 backup; | => `backup` is not allowed after `hash` or `random`
server 127.0.0.1:1 backup; | => has only `backup` servers
server 127.0.0.1:1; hash $remote_addr Consistent; | => invalid parameter in `hash
server 127.0.0.1:1; hash $remote_adr; | => unknown variable `$remote_adr`
server 127.0.0.1:1; hash ${remote_addr; | => the closing bracket
server 127.0.0.1:1; random three; | => invalid parameter in `random three`
server 127.0.0.1:1; zone z 31k; | => zone `z` is too small
server 127.0.0.1:1; zone z; | => has no size anywhere
server 127.0.0.1:1 fail_timeout=500ms; | => bad time `500ms` for fail_timeout
server 127.0.0.1:1 weight=9999999999999999999; | => bad value
server 127.0.0.1:1 weight=+1; | => bad value `+1` for weight
server 127.0.0.1:1/x; | => invalid host
server 127.0.0.1:1; | proxy_timeout 1s; proxy_timeout 2s; => `proxy_timeout` is duplicate
server 127.0.0.1:1; | proxy_buffer_size 1k; proxy_upstream_buffer 1k; => `proxy_upstream_buffer` is duplicate
server 127.0.0.1:1; | proxy_timeout 1y; => invalid value `1y` for `proxy_timeout`
server 127.0.0.1:1; | tcp_nodelay maybe; => it must be `on` or `off`
server 127.0.0.1:1; | proxy_buffer_size 1g; => expected a size
server 127.0.0.1:1; | server_name x; => `server_name` is not a directive nginx accepts in a stream `server` block
server 127.0.0.1:1; | proxy_pass u; => `proxy_pass` is duplicate
server 127.0.0.1:1; | listen 127.0.0.1:1883; => duplicate listen address
server 127.0.0.1:1; | listen 1884 default_server; => invalid `listen` parameter `default_server`
server 127.0.0.1:1; | listen 1884 udp backlog=5; => `backlog` is incompatible with `udp`
server 127.0.0.1:1; | listen 1884 so_keepalive=0:0:0; => invalid `listen` parameter value
server 127.0.0.1:1; | listen 1884 ssl; => no `ssl_certificate` for `listen 1884 ssl`
server 127.0.0.1:1; | access_log logs/a.log; => no log format
server 127.0.0.1:1; | access_log logs/a.log combined; => unknown log format `combined`
server 127.0.0.1:1; | error_log logs/e.log notice warn; => duplicate log level `warn`
server 127.0.0.1:1; | set x 1; => a variable name starts with `$`
server 127.0.0.1:1; | proxy_timeout "1s"x; => unexpected `x` right after a quoted string
server 127.0.0.1:1; | proxy_timeout 1s}; => invalid value `1s}`
"#;

    #[test]
    fn directives_checked_as_nginx_checks_them() {
        for case in NGINX_ACCEPTS.lines().filter(|l| !l.is_empty()) {
            let (up, srv) = case.split_once(" |").unwrap();
            let text = conf(up, srv).replace("include_not;", "");
            assert!(parse(&text).is_ok(), "{case}: {:?}", parse(&text).err());
        }
        for case in NGINX_REFUSES.lines().filter(|l| !l.is_empty()) {
            let (input, want) = case.split_once(" => ").unwrap();
            let (up, srv) = input.split_once(" |").unwrap();
            let got = err(&conf(up, srv));
            assert!(got.contains(want), "{case}: got {got:?}");
            assert!(!got.contains('\n'), "{got:?}");
        }
    }

    #[test]
    fn main_context_and_events_are_checked() {
        let stream = "stream { upstream u { least_conn; server h:1; } }";
        assert!(parse(&format!("worker_processes auto;\nevents {{ use epoll; }}\n{stream}")).is_ok());
        for (main, want) in [
            ("worker_processes 1 2;", "`worker_processes` takes 1 argument, got 2"),
            ("worker_processes 1; worker_processes 2;", "is duplicate"),
            ("worker_processess 1;", "`worker_processess` is not a directive nginx accepts in the main context"),
            ("events { worker_connections x; }", "expected a whole number"),
            ("events x { }", "`events` takes no arguments, got 1"),
            ("events;", "directive `events` has no opening `{`"),
            ("pid a { }", "directive `pid` is not terminated by `;`"),
            ("events { } load_module a/ngx_stream_module.so;", "`load_module` comes too late"),
            ("load_module a/m.so; load_module b/m.so; events { }", "module `m.so` is already loaded"),
            ("stream { } events { }", "`stream` is duplicate"),
        ] {
            let got = err(&format!("{main}\n{stream}"));
            assert!(got.contains(want), "{main}: {got}");
        }
        // A module of its own may bring directives meshgate does not know.
        let s = parse(&format!("load_module modules/ngx_stream_js_module.so;\n{stream}\n")).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let s = parse("load_module modules/ngx_stream_js_module.so;\nstream { js_import a.js; upstream u { least_conn; server h:1; } }")
            .unwrap();
        assert!(s.warnings.iter().any(|w| w.contains("`js_import` is not an nginx 1.22 directive meshgate knows")));
    }

    #[test]
    fn words_are_read_as_nginx_reads_them() {
        // `}` and `#` inside a word belong to it; `)` after a quote starts a new word.
        assert!(err("upstream u { server h:1}\n").contains("end of the file"));
        assert!(err("upstream u { server h:1 weight=2#x; }").contains("bad value `2#x` for weight"));
        assert!(err("upstream u { server \"h:1\")x; }").contains("unknown server parameter `)x`"));
        // Escapes: `\"` inside quotes, `\t`; other backslashes stay.
        let s = parse("upstream \"u\\\"q\" { server h:1; }").unwrap();
        assert_eq!(s.upstream, "u\"q");
        assert!(err("upstream u { server h:1 weight=\\2; }").contains("bad value `\\2` for weight"));
        // A comment between the words of a statement, CRLF line ends, tabs.
        let s = parse("upstream u {\r\n\tserver h:1 # the first\r\n\t\tweight=3;\r\n}\r\n").unwrap();
        assert_eq!((s.servers[0].weight, s.servers[0].line), (3, 2));
        // nginx's 4 KiB limit on one parameter or comment.
        let ok = format!("#{}\nupstream u {{ server h:1; }}", "c".repeat(4094));
        assert!(parse(&ok).is_ok());
        let long = format!("#{}\nupstream u {{ server h:1; }}", "c".repeat(4095));
        assert!(err(&long).contains("longer than nginx's 4 KiB limit"), "{}", err(&long));
        assert!(err(&format!("log_format a '{}';", "f".repeat(4095))).contains("4 KiB"));
        assert!(parse(&format!("log_format a '{}';\nupstream u {{ server h:1; }}", "f".repeat(4094))).is_ok());
    }

    #[test]
    fn warnings_say_what_meshgate_does_instead() {
        let s = parse(&conf(
            "server 127.0.0.1:1; server 127.0.0.1:2; hash $remote_addr consistent; zone z 64k;",
            "listen 127.0.0.1:1884; listen 127.0.0.1:1885 udp; proxy_timeout 90s; proxy_connect_timeout 1s;",
        ))
        .unwrap();
        let all = s.warnings.join("\n");
        assert!(all.contains("line 3: `hash $remote_addr consistent` is not implemented: meshgate balances by least connections by weight within each tier, so clients are not pinned"), "{all}");
        assert!(all.contains("line 3: `zone z 64k` has no effect"), "{all}");
        assert!(all.contains("line 8: `listen 127.0.0.1:1884` is not imported: meshgate listens on one MQTT address (127.0.0.1:1883, line 6)"), "{all}");
        assert!(
            all.contains("`listen 127.0.0.1:1885 udp...` is not imported: meshgate proxies MQTT over TCP only"),
            "{all}"
        );
        assert!(
            all.contains(
                "proxy_timeout (line 8), proxy_connect_timeout (line 8; meshgate: [proxy] upstream_connect_timeout)"
            ),
            "{all}"
        );
        assert!(s.warnings.iter().all(|w| w.starts_with("line ") && !w.contains('\n')));
        let round_robin = parse(&conf("server 127.0.0.1:1;", "")).unwrap();
        assert!(round_robin.warnings[0].contains("has no `least_conn`: nginx would use weighted round robin"));
        let random = parse(&conf("server 127.0.0.1:1; random two;", "")).unwrap();
        assert!(random.warnings[0].contains("`random two` is not implemented"), "{:?}", random.warnings);
        let plain = parse(&conf("least_conn; server 127.0.0.1:1;", "")).unwrap();
        assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);
        let two =
            parse(&format!("{}\nstream {{ server {{ listen 1; return x; }} }}", conf("least_conn; server h:1;", "")))
                .unwrap_err();
        assert!(two.to_string().contains("`stream` is duplicate"), "{two}");
    }

    #[test]
    fn trailing_comments_name_brokers_when_names_stay_unique() {
        let names = |servers: &str| {
            let s = parse(&format!("upstream u {{\n least_conn;\n{servers}\n}}")).unwrap();
            (s.servers.iter().map(|s| s.name.clone()).collect::<Vec<_>>(), s.warnings)
        };
        let (n, w) =
            names(" server h:1; # primary, the big one\n server h:2 backup;  # b-2\n server h:3; # not a name");
        assert_eq!(n, vec![Some("primary".into()), Some("b-2".into()), None]);
        assert!(w.is_empty(), "{w:?}");
        // `broker2` from a comment would clash with the second broker's default name.
        let (n, w) = names(" server h:1; # broker2\n server h:2;");
        assert_eq!(n, vec![None, None]);
        assert!(w[0].contains("`broker2` would name two brokers"), "{w:?}");
        // Only a comment after the `;` on the same line counts.
        let (n, _) = names(" server h:1; server h:2; # second\n # own line\n server h:3;");
        assert_eq!(n, vec![None, Some("second".into()), None]);
    }

    #[test]
    fn proxy_pass_targets() {
        let pp = |target: &str| {
            parse(&format!(
                "stream {{ upstream Up {{ least_conn; server h:1; }} server {{ listen 1; proxy_pass {target}; }} }}"
            ))
        };
        assert_eq!(pp("UP").unwrap().upstream, "Up");
        let one = pp("127.0.0.9:01883").unwrap();
        assert_eq!(
            (one.upstream.as_str(), one.servers[0].address.as_str(), one.servers[0].weight),
            ("127.0.0.9:1883", "127.0.0.9:1883", 1)
        );
        assert!(pp("up:1883").unwrap_err().to_string().contains("upstream `up` may not have port 1883"));
        assert!(pp("nothere")
            .unwrap_err()
            .to_string()
            .contains("upstream `nothere` named by proxy_pass (line 1) is not defined"));
        assert!(pp("$remote_addr").unwrap_err().to_string().contains("variables is not supported by meshgate"));
        assert!(pp("unix:/tmp/s").unwrap_err().to_string().contains("unix socket is not supported by meshgate"));
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
    fn times_in_seconds() {
        // fail_timeout, ssl_session_timeout, so_keepalive: seconds, where y and M count and ms does not.
        for (s, secs) in
            [("30", 30), ("30s", 30), ("1m30", 90), ("1s5", 6), ("1y", 31_536_000), ("1M", 2_592_000), ("1m 30s", 90)]
        {
            assert_eq!(parse_time(s, true), Some(secs), "{s}");
        }
        for s in ["500ms", "1s500ms", "", "s", "1ss", "1 m"] {
            assert_eq!(parse_time(s, true), None, "{s}");
        }
        assert_eq!(
            (parse_time("1y", false), parse_time("1M", false), parse_time("1s5", false)),
            (None, None, Some(6_000))
        );
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
