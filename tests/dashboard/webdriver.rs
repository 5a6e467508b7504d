//! A small W3C WebDriver client for Debian's headless Chromium: chromedriver on a free loopback
//! port, a fresh profile, JSON over raw HTTP/1.1. Dropping a [`Browser`] ends the session and
//! kills chromedriver with every process it started, also when the test panicked.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL: &str = "install them with `apt-get install -y chromium chromium-driver` (or run `scripts/deps test`)";
/// W3C's key for an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// A cold Chromium start on a busy 2-core machine can take several seconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
    /// Where screenshots go; failures save one there too.
    shots: PathBuf,
    ended: bool,
}

/// Where the test's screenshots are saved: `target/dashboard-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        for (path, what) in [(CHROMIUM, "Chromium"), (CHROMEDRIVER, "chromedriver")] {
            assert!(Path::new(path).exists(), "{what} is missing ({path} not found): {INSTALL}");
        }
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so one signal reaches chromedriver and every browser process.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER} ({e}): {INSTALL}"));
        let profile = tempfile::tempdir().expect("temp dir for the browser profile");
        let mut b =
            Browser { driver, addr, session: String::new(), _profile: profile, shots: screenshot_dir(), ended: false };
        b.wait_ready().await;
        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-breakpad",
            format!("--user-data-dir={}", b._profile.path().display()),
            format!("--window-size={width},{height}"),
        ]);
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let (status, v) = b.raw("POST", "/session", Some(caps)).await;
        let session = v["value"]["sessionId"].as_str().map(str::to_owned);
        let session = session.unwrap_or_else(|| {
            panic!("Chromium did not start under chromedriver (HTTP {status}): {}; {INSTALL}", v["value"]["message"])
        });
        b.session = session;
        b
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.driver.try_wait() {
                panic!("{CHROMEDRIVER} exited at start ({st}): {INSTALL}");
            }
            if let Ok(Ok((200, v))) =
                tokio::time::timeout(Duration::from_secs(2), request(self.addr, "GET", "/status", None)).await
            {
                if v["value"]["ready"] == true {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{CHROMEDRIVER} did not answer on {} within 20 s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        match tokio::time::timeout(COMMAND_TIMEOUT, request(self.addr, method, path, body)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("WebDriver {method} {path}: {e}"),
            Err(_) => panic!("WebDriver {method} {path}: no answer within {COMMAND_TIMEOUT:?}"),
        }
    }

    /// Runs a session command and returns its `value`; panics on a WebDriver error.
    pub async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.session);
        let (status, mut v) = self.raw(method, &full, body).await;
        assert!(status == 200, "WebDriver {method} {path} answered {status}: {}", v["value"]);
        v["value"].take()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its result.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// Polls `script` every 50 ms until it returns something other than null or false, and
    /// returns that; after `deadline`, saves a screenshot and panics saying what was awaited.
    pub async fn wait_for(&self, what: &str, deadline: Duration, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, json!([])).await;
            if !v.is_null() && v != false {
                return v;
            }
            if start.elapsed() >= deadline {
                let shot = self.screenshot(&format!("failed-{}", slug(what))).await;
                panic!("waited {deadline:?} for {what}; screenshot: {}", shot.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first element matching a CSS selector, as a WebDriver element id.
    pub async fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_owned()
    }

    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    /// Clears a text field and types `text` into it, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({}))).await;
        if !text.is_empty() {
            self.cmd("POST", &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
        }
    }

    /// The text of an open alert or confirm, or None when there is none.
    pub async fn alert_text(&self) -> Option<String> {
        let full = format!("/session/{}/alert/text", self.session);
        match self.raw("GET", &full, None).await {
            (200, v) => v["value"].as_str().map(str::to_owned),
            _ => None,
        }
    }

    pub async fn accept_alert(&self) {
        self.cmd("POST", "/alert/accept", Some(json!({}))).await;
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.cmd("POST", "/goog/cdp/execute", Some(json!({ "cmd": cmd, "params": params }))).await
    }

    /// Makes the page see `prefers-color-scheme: dark` (or light).
    pub async fn color_scheme(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({ "features": [{ "name": "prefers-color-scheme", "value": value }] }),
        )
        .await;
    }

    /// Emulates a viewport of `width` x `height` CSS pixels (`mobile` as a phone would).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await;
    }

    /// Saves what the viewport shows as `<name>.png` and returns the path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None).await;
        self.save_png(name, b64.as_str().expect("screenshot is base64"))
    }

    /// Saves the whole page, not just the viewport, as `<name>.png`.
    pub async fn full_page_screenshot(&self, name: &str) -> PathBuf {
        let v = self.cdp("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true })).await;
        self.save_png(name, v["data"].as_str().expect("screenshot is base64"))
    }

    fn save_png(&self, name: &str, b64: &str) -> PathBuf {
        let png = base64_decode(b64);
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Console messages at level SEVERE (errors, failed loads, CSP violations) since the last call.
    pub async fn console_errors(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", Some(json!({ "type": "browser" }))).await;
        v.as_array()
            .map(|a| a.iter().filter(|e| e["level"] == "SEVERE").map(|e| e["message"].to_string()).collect())
            .unwrap_or_default()
    }

    /// Ends the session (closing Chromium) and stops chromedriver.
    pub async fn quit(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = tokio::time::timeout(Duration::from_secs(10), request(self.addr, "DELETE", &path, None)).await;
        self.kill();
    }

    fn kill(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        // The group is chromedriver's pid (process_group(0)); it holds every Chromium process.
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // A panicking test: ask chromedriver to close the browser (blocking, briefly), then
        // kill whatever is left of the group either way.
        if !self.session.is_empty() {
            let _ = blocking_delete(self.addr, &format!("/session/{}", self.session));
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    l.local_addr().expect("bound").port()
}

fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(60).collect()
}

/// One HTTP/1.1 exchange; returns the status and the JSON body. chromedriver keeps the
/// connection open whatever `Connection` says, so the body is read by its Content-Length.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> std::io::Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(done) = complete(&raw) {
            return Ok(parse(&raw[..done]));
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(parse(&raw));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// The length of the whole response once `raw` holds it (headers and Content-Length bytes).
fn complete(raw: &[u8]) -> Option<usize> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
    (raw.len() >= end + len).then_some(end + len)
}

fn blocking_delete(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
    // The answer comes once the browser is closed; its content does not matter.
    let mut answer = [0u8; 1024];
    s.read(&mut answer).map(|_| ())
}

fn parse(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// Standard base64 (screenshots arrive that way); panics on anything else.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: byte {c:#04x}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for quad in clean.chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let mut n = 0u32;
        for (i, &c) in data.iter().enumerate() {
            n |= value(c) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..data.len()]);
    }
    out
}

#[test]
fn base64_round_trips_known_values() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
