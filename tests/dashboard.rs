//! The dashboard in a real browser: Debian's headless Chromium, driven over WebDriver by
//! chromedriver, against five real Mosquitto brokers and meshgate in-process.
//!
//! Screenshots go to target/dashboard-screenshots/ (desktop and phone, light and dark); a
//! failed wait saves one there too. Browser tests take turns: each starts a Chromium, and
//! several at once on a 2-core machine would make the timing assertions about the machine.

mod common;
#[path = "dashboard/webdriver.rs"]
mod webdriver;

use std::net::SocketAddr;
use std::time::Duration;

use common::etcd::Etcd;
use common::instance::{eventually, Instance, LEASE_TTL};
use common::mqtt as raw;
use common::{blocking, Net};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use webdriver::Browser;

const SECOND: Duration = Duration::from_secs(1);
/// First load: Chromium's cold start on a busy machine plus the first update.
const LOAD: Duration = Duration::from_secs(20);
/// The issue's bound from stopping a broker to the page showing it.
const SHOWN_WITHIN: Duration = Duration::from_secs(3);
const TOKEN: &str = "dash-token";

static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cards as the page shows them, once five are there and the stream is live.
const CARDS: &str = r#"
    const cards = [...document.querySelectorAll('.card[data-broker]')];
    if (cards.length !== 5 || document.getElementById('live').dataset.live !== 'live') return null;
    return cards.map(c => ({
        name: c.dataset.broker,
        state: c.dataset.state,
        badge: c.querySelector('.badge').textContent,
        current: c.dataset.current === 'true',
        actions: !c.querySelector('.actions').hidden,
    }));
"#;

async fn open(mg: &meshgate::Meshgate, width: u32, height: u32) -> (Browser, Value) {
    let browser = Browser::start(width, height).await;
    browser.goto(&format!("http://{}/", http(mg))).await;
    let cards = browser.wait_for("five broker cards on a live page", LOAD, CARDS).await;
    (browser, cards)
}

fn http(mg: &meshgate::Meshgate) -> SocketAddr {
    mg.http_addr().expect("the test config has an HTTP listener")
}

fn names(cards: &Value) -> Vec<&str> {
    cards.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect()
}

fn card<'a>(cards: &'a Value, name: &str) -> &'a Value {
    cards.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no card {name}: {cards}"))
}

fn assert_no_console_errors(errors: &[String]) {
    assert!(errors.is_empty(), "the browser console has errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_loads_without_console_errors_and_shows_five_broker_cards() {
    let _turn = ONE_BROWSER.lock().await;
    let net = Net::start(5);
    let mg = net.meshgate("").await;
    let (browser, cards) = open(&mg, 1280, 800).await;

    assert_eq!(names(&cards), ["broker1", "broker2", "broker3", "broker4", "broker5"]);
    for c in cards.as_array().unwrap() {
        assert_eq!(c["state"], "up", "{c}");
        assert_eq!(c["badge"], "up", "the state is shown, not only an attribute: {c}");
        assert_eq!(c["actions"], false, "no admin buttons without [admin] token: {c}");
    }
    assert_eq!(card(&cards, "broker1")["current"], true, "broker1 takes new clients");
    let shown = browser
        .js(
            r#"return {
                current: document.getElementById('current').textContent,
                status: document.getElementById('status').textContent,
                nodes: document.querySelectorAll('#topology [data-broker]').length,
                admin: document.getElementById('self-admin').textContent,
                version: document.getElementById('self-version').textContent,
                instancesShown: !document.getElementById('instances-panel').hidden,
            };"#,
            json!([]),
        )
        .await;
    assert_eq!(shown["current"], "broker1", "{shown}");
    assert_eq!(shown["status"], "ok", "{shown}");
    assert_eq!(shown["nodes"], 5, "the topology draws every broker: {shown}");
    assert!(shown["admin"].as_str().unwrap().starts_with("off"), "{shown}");
    assert!(shown["version"].as_str().unwrap().starts_with(meshgate::VERSION), "{shown}");
    assert_eq!(shown["instancesShown"], false, "no instances panel without [coordination]: {shown}");
    // The TCP check runs on load and lists every broker.
    let tcp = browser
        .wait_for(
            "TCP check results",
            5 * SECOND,
            "const r = document.querySelectorAll('#tcp tbody tr'); return r.length === 5 ? [...r].map(x => x.textContent) : null;",
        )
        .await;
    assert!(tcp.as_array().unwrap().iter().all(|r| r.as_str().unwrap().contains("connects")), "{tcp}");

    // Nothing moves while the numbers update: every panel and card keeps its box across updates.
    const BOXES: &str = r#"
        const boxes = [...document.querySelectorAll('.panel, .card, .pill, #current, #live')]
            .map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height].map(Math.round).join(','); });
        return { updates: Number(document.body.dataset.updates), boxes };
    "#;
    let before = browser.js(BOXES, json!([])).await;
    let script = format!("return Number(document.body.dataset.updates) >= {} + 3;", before["updates"]);
    browser.wait_for("three more updates", 6 * SECOND, &script).await;
    let after = browser.js(BOXES, json!([])).await;
    assert_eq!(before["boxes"], after["boxes"], "the layout moved between updates");

    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_broker1_shows_it_down_and_the_new_active_broker_within_3s_without_reload() {
    let _turn = ONE_BROWSER.lock().await;
    let mut net = Net::start(5);
    let mg = net.meshgate("").await;
    let (browser, cards) = open(&mg, 1280, 800).await;
    assert_eq!(card(&cards, "broker1")["current"], true);
    // A reload would lose this.
    browser.js("window.__sameDocument = 'still here'; return true;", json!([])).await;
    // A client on broker1, which meshgate switches to broker2 under its connection.
    let (_client, ack) = raw::connect(net.mqtt_addr(), 4, "dash-mover", Duration::from_secs(5)).await.unwrap();
    assert_eq!(ack.code, 0);

    let stopped = Instant::now();
    blocking(|| net.broker("broker1").kill());
    let shown = browser
        .wait_for(
            "broker1 down and broker2 taking new clients",
            SHOWN_WITHIN,
            r#"
            const b1 = document.querySelector('.card[data-broker="broker1"]');
            const b2 = document.querySelector('.card[data-broker="broker2"]');
            // Once its probes have said so: the sessions' lost connections bar a killed broker
            // (passively) a moment before.
            const ok = b1.dataset.state === 'down' && b1.querySelector('.badge').textContent === 'down'
                && b1.querySelector('.reason').textContent.includes('probes failing')
                && b2.dataset.current === 'true' && b1.dataset.current === 'false'
                && document.getElementById('current').textContent === 'broker2';
            return ok ? { reason: b1.querySelector('.reason').textContent, role: b2.querySelector('.role').textContent } : null;
            "#,
        )
        .await;
    let took = stopped.elapsed();
    assert!(took < SHOWN_WITHIN, "shown after {took:?}");
    assert!(shown["reason"].as_str().unwrap().contains("probes failing"), "the card says why: {shown}");
    assert!(shown["role"].as_str().unwrap().contains("takes new clients"), "{shown}");
    let same = browser.js("return window.__sameDocument;", json!([])).await;
    assert_eq!(same, "still here", "the page was not reloaded");
    // The event log shows the failover, with its time.
    let failover = browser
        .wait_for(
            "the failover in the event log",
            SECOND,
            r#"const e = [...document.querySelectorAll('#events li')].find(li => li.textContent.includes('new clients now go to broker2'));
               return e ? e.querySelector('time').textContent : null;"#,
        )
        .await;
    assert!(failover.as_str().is_some_and(|t| t.len() == 8 && t.as_bytes()[2] == b':'), "HH:MM:SS: {failover}");
    // The client's move shows as a switch, not as a disconnect.
    let moved = browser
        .wait_for(
            "the switch in the event log",
            SECOND,
            r#"const e = [...document.querySelectorAll('#events li')].find(li => li.textContent.includes('off broker1 (broker_down)'));
               return e ? { badge: e.querySelector('.kind').textContent, msg: e.querySelector('.msg').textContent } : null;"#,
        )
        .await;
    assert_eq!(moved["badge"], "switch", "{moved}");
    assert!(moved["msg"].as_str().unwrap().contains("under their clients' connections"), "{moved}");
    let closed = browser
        .js("return document.querySelectorAll('#events .kind[data-kind=\"session_closed\"]').length;", json!([]))
        .await;
    assert_eq!(closed, 0, "no session shown as closed");
    let status = browser.js("return document.getElementById('status').textContent;", json!([])).await;
    assert_eq!(status, "degraded", "the primary tier is down");
    println!("broker1 stopped -> page showed it down and broker2 current after {took:?}");

    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connected_through_meshgate_appears_in_the_clients_table() {
    let _turn = ONE_BROWSER.lock().await;
    let net = Net::start(5);
    let mg = net.meshgate("").await;
    let (browser, _) = open(&mg, 1280, 800).await;
    let empty = browser.js("return !document.getElementById('clients-empty').hidden;", json!([])).await;
    assert_eq!(empty, true, "an empty table says so");

    let (_alice, ack) = raw::connect(net.mqtt_addr(), 4, "dashboard-alice", 5 * SECOND).await.expect("alice connects");
    assert_eq!(ack.code, 0);
    // A client id is whatever the client sends; the page must show it as text, never as markup.
    let sneaky = "<img src=x id=injected>";
    let (_sneaky, ack) = raw::connect(net.mqtt_addr(), 4, sneaky, 5 * SECOND).await.expect("second client connects");
    assert_eq!(ack.code, 0);
    let (_bob, ack) = raw::connect_with(net.mqtt_addr(), 4, "dashboard-bob", false, None, None, 5 * SECOND)
        .await
        .expect("a persistent client connects");
    assert_eq!(ack.code, 0);
    const ROWS: &str = r#"
        return [...document.querySelectorAll('#clients tbody tr')]
            .map(r => ({ id: r.dataset.clientId, cells: [...r.cells].map(c => c.textContent) }));
    "#;
    let rows = browser
        .wait_for(
            "the three clients in the table",
            3 * SECOND,
            &format!("const rows = (() => {{ {ROWS} }})(); return rows.length === 3 ? rows : null;"),
        )
        .await;
    let alice = rows.as_array().unwrap().iter().find(|r| r["id"] == "dashboard-alice").expect("alice's row");
    assert_eq!(alice["cells"][0], "dashboard-alice");
    assert_eq!(alice["cells"][1], "broker1", "the broker it landed on: {alice}");
    assert_eq!(alice["cells"][3], "3.1.1", "{alice}");
    assert_eq!(alice["cells"][8], "clean", "{alice}");
    let bob = rows.as_array().unwrap().iter().find(|r| r["id"] == "dashboard-bob").expect("bob's row");
    assert_eq!(bob["cells"][8], "kept on broker1", "where its persistent session lives: {bob}");
    assert!(rows.as_array().unwrap().iter().any(|r| r["cells"][0] == sneaky), "shown as text: {rows}");
    let injected = browser.js("return document.getElementById('injected') !== null;", json!([])).await;
    assert_eq!(injected, false, "a client id became markup");

    // Search, as a person types it.
    browser.type_into("#client-search", "alice").await;
    let rows = browser.js(ROWS, json!([])).await;
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["id"], "dashboard-alice");
    browser.type_into("#client-search", "nobody-has-this-id").await;
    let shown = browser
        .js("return [document.querySelectorAll('#clients tbody tr').length, document.getElementById('clients-empty').textContent];", json!([]))
        .await;
    assert_eq!(shown, json!([0, "No client matches."]));
    browser.type_into("#client-search", "").await;
    // The per-broker filter.
    let set_broker = "const s = document.getElementById('client-broker'); s.value = arguments[0]; s.dispatchEvent(new Event('change')); return s.value;";
    assert_eq!(browser.js(set_broker, json!(["broker2"])).await, "broker2");
    assert_eq!(browser.js(ROWS, json!([])).await, json!([]), "nobody is on broker2");
    assert_eq!(browser.js(set_broker, json!(["broker1"])).await, "broker1");
    assert_eq!(browser.js(ROWS, json!([])).await.as_array().unwrap().len(), 3);
    let count = browser.js("return document.getElementById('clients-count').textContent;", json!([])).await;
    assert_eq!(count, "3 of 3");

    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_buttons_ask_for_the_token_then_drain_and_enable_a_broker() {
    let _turn = ONE_BROWSER.lock().await;
    let net = Net::start(5);
    let mg = net.meshgate(&format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    let (browser, cards) = open(&mg, 1280, 800).await;
    assert!(cards.as_array().unwrap().iter().all(|c| c["actions"] == true), "admin configured: buttons shown: {cards}");

    browser.click(r#".card[data-broker="broker3"] button[data-action="drain"]"#).await;
    let start = Instant::now();
    let confirm = loop {
        if let Some(text) = browser.alert_text().await {
            break text;
        }
        assert!(start.elapsed() < 3 * SECOND, "drain asks for confirmation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(confirm.contains("Drain broker3"), "{confirm}");
    browser.accept_alert().await;
    browser.wait_for("the token dialog", 3 * SECOND, "return document.getElementById('token-dialog').open;").await;
    browser.type_into("#token-input", TOKEN).await;
    browser.click("#token-form button[type=submit]").await;
    browser
        .wait_for(
            "broker3 draining",
            3 * SECOND,
            r#"return document.querySelector('.card[data-broker="broker3"]').dataset.state === 'draining';"#,
        )
        .await;
    assert_eq!(mg.pool().broker("broker3").unwrap().admin(), meshgate::pool::AdminState::Draining);
    let kept = browser.js("return sessionStorage.getItem('meshgate-admin-token');", json!([])).await;
    assert_eq!(kept, TOKEN, "kept for this tab");

    // Enable asks no confirmation and reuses the kept token.
    browser.click(r#".card[data-broker="broker3"] button[data-action="enable"]"#).await;
    browser
        .wait_for(
            "broker3 up again",
            3 * SECOND,
            r#"return document.querySelector('.card[data-broker="broker3"]').dataset.state === 'up'
                && !document.getElementById('token-dialog').open;"#,
        )
        .await;
    assert_eq!(mg.pool().broker("broker3").unwrap().admin(), meshgate::pool::AdminState::Enabled);

    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_by_itself_when_meshgate_restarts() {
    let _turn = ONE_BROWSER.lock().await;
    let net = Net::start(5);
    // An open stream ends when meshgate closes what is left after the grace period.
    let extra = "[proxy]\nshutdown_grace = \"300ms\"\n";
    let mg = net.meshgate(extra).await;
    let (browser, _) = open(&mg, 1280, 800).await;
    let started = browser.js("return document.body.dataset.started;", json!([])).await;

    tokio::time::timeout(5 * SECOND, mg.shutdown()).await.expect("an open dashboard does not hold up shutdown");
    browser
        .wait_for(
            "the page to notice",
            6 * SECOND,
            "return document.getElementById('live').dataset.live === 'reconnecting';",
        )
        .await;
    let mg = net.meshgate(extra).await;
    let script = format!(
        "return document.getElementById('live').dataset.live === 'live' && document.body.dataset.started !== {started};"
    );
    browser.wait_for("the page live again on the new meshgate", 10 * SECOND, &script).await;
    // Console errors are expected here: the browser reports the refused reconnects.
    browser.quit().await;
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_at_desktop_and_phone_width_in_light_and_dark() {
    let _turn = ONE_BROWSER.lock().await;
    let mut net = Net::start(5);
    // Admin buttons and replication on, so every part of the page has something to show.
    let extra = format!("[admin]\ntoken = \"{TOKEN}\"\n[replication]\nenabled = true\nlag_interval = \"300ms\"\n");
    let mg = net.meshgate(&extra).await;
    let mut clients = Vec::new();
    for id in ["sensor-kitchen-01", "sensor-garage-02", "control-panel"] {
        clients.push(raw::connect(net.mqtt_addr(), 4, id, 5 * SECOND).await.expect("client connects").0);
    }
    // Something to see: a broker down, with its events.
    blocking(|| net.broker("broker4").kill());
    let (browser, _) = open(&mg, 1280, 800).await;
    let settled = r#"return document.querySelector('.card[data-broker="broker4"]').dataset.state === 'down'
        && document.querySelectorAll('#clients tbody tr').length === 3
        && document.querySelectorAll('#tcp tbody tr').length === 5
        && [...document.querySelectorAll('#repl .matrix td')].filter(td => td.textContent.endsWith(' ms')).length >= 12;"#;
    browser.wait_for("broker4 down, three clients, TCP checks, replication lag", 10 * SECOND, settled).await;

    let mut saved = Vec::new();
    for (label, width, height, mobile) in [("desktop", 1280, 800, false), ("phone", 390, 844, true)] {
        browser.viewport(width, height, mobile).await;
        for dark in [false, true] {
            browser.color_scheme(dark).await;
            // Let a redraw at the new size (the topology follows the width) and an update land.
            let n = browser.js("return Number(document.body.dataset.updates);", json!([])).await;
            browser
                .wait_for(
                    "an update at the new size",
                    3 * SECOND,
                    &format!("return Number(document.body.dataset.updates) > {n};"),
                )
                .await;
            // Nothing wider than the screen: the page is not zoomed out to fit, and no panel
            // sticks out of its box (wide tables scroll inside theirs).
            let fit = browser
                .js(
                    r#"return {
                        width: window.innerWidth,
                        overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,
                        over: [...document.querySelectorAll('.panel')].filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.className),
                    };"#,
                    json!([]),
                )
                .await;
            assert_eq!(fit, json!({ "width": width, "overflow": false, "over": [] }), "{label}: fits the screen");
            let scheme = if dark { "dark" } else { "light" };
            let bg = browser.js("return getComputedStyle(document.body).backgroundColor;", json!([])).await;
            let expect = if dark { "rgb(15, 20, 27)" } else { "rgb(244, 246, 249)" };
            assert_eq!(bg, expect, "{label} {scheme}: follows the system's color scheme");
            saved.push(browser.screenshot(&format!("{label}-{scheme}")).await);
            saved.push(browser.full_page_screenshot(&format!("{label}-{scheme}-full")).await);
        }
    }
    for p in &saved {
        println!("screenshot: {}", p.display());
    }
    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
    drop(clients);
    mg.shutdown().await;
}

// ---- the routes themselves, without a browser ------------------------------------------

/// Sends a GET with `accept`, returns the head and whatever body arrived within `wait`.
async fn get(addr: SocketAddr, path: &str, accept: &str, wait: Duration) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to meshgate's HTTP listener");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = Instant::now() + wait;
    // For a stream: read until the first whole event; for the rest, to the end.
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if text.contains("event-stream") && text.split_once("\r\n\r\n").is_some_and(|(_, b)| b.contains("\n\n")) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer to GET {path}: {text:?}"));
    (head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_stream_negotiate_and_the_page_has_a_strict_policy() {
    let net = Net::start(5);
    let mg = net.meshgate("[proxy]\nshutdown_grace = \"300ms\"\n").await;
    let api = http(&mg);

    let (head, body) = get(api, "/", "text/html,*/*;q=0.8", 5 * SECOND).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    let csp = head.lines().find_map(|l| l.strip_prefix("content-security-policy: ")).expect("a CSP header");
    assert!(
        csp.starts_with("default-src 'none';") && !csp.contains("unsafe") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let nonce = csp.split("'nonce-").nth(1).and_then(|r| r.split('\'').next()).expect("a nonce");
    assert!(body.contains(&format!("<script nonce=\"{nonce}\">")), "the script carries this response's nonce");
    assert!(!body.contains("src=\"http") && !body.contains("href=\"http"), "nothing loaded from elsewhere");

    let (head, body) = get(api, "/", "*/*", 5 * SECOND).await;
    assert!(head.contains("application/json"), "{head}");
    let index: Value = serde_json::from_str(&body).unwrap();
    assert!(index["routes"].as_array().unwrap().iter().any(|r| r["path"] == "/stream"), "{index}");

    let (head, body) = get(api, "/stream", "text/event-stream", 3 * SECOND).await;
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let body = dechunk(&body);
    assert!(body.contains("retry: 1000\n"), "reconnect after 1 s: {body:.200}");
    assert!(body.contains("event: update\n"), "{body:.200}");
    let data = body.lines().find_map(|l| l.strip_prefix("data: ")).expect("a data line");
    let update: Value = serde_json::from_str(data).unwrap();
    assert_eq!(update["reset"], true);
    assert_eq!(update["state"]["brokers"].as_array().unwrap().len(), 5);
    assert_eq!(update["state"]["health"]["current_broker"], "broker1");
    assert_eq!(update["state"]["admin"], false);
    assert!(update["state"]["replication"].is_null(), "replication is off in this meshgate");
    assert!(update["state"]["instances"].is_null(), "no [coordination] in this meshgate");

    let (head, body) = get(api, "/stream", "*/*", 5 * SECOND).await;
    assert!(head.contains("application/json"), "{head}");
    let once: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(once["state"]["clients_total"], 0);
    // The document describes what is sent.
    let doc: Value = serde_yaml_ng::from_str(include_str!("../docs/openapi.yaml")).expect("openapi.yaml is YAML");
    for (schema, value) in
        [("DashboardUpdate", &once), ("DashboardState", &once["state"]), ("Process", &once["state"]["process"])]
    {
        let required = match schema {
            "Process" => &doc["components"]["schemas"]["DashboardState"]["properties"]["process"]["required"],
            _ => &doc["components"]["schemas"][schema]["required"],
        };
        let required: Vec<&str> =
            required.as_array().expect("required keys").iter().map(|k| k.as_str().unwrap()).collect();
        let sent: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = required.clone();
        let mut got = sent.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{schema}: the keys sent are the keys documented");
    }

    // An open stream neither keeps meshgate from stopping nor outlives it.
    let mut open = TcpStream::connect(api).await.unwrap();
    let req = format!("GET /stream HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\n\r\n");
    open.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    let n = tokio::time::timeout(3 * SECOND, open.read(&mut first)).await.expect("the stream starts").unwrap();
    assert!(n > 0);
    tokio::time::timeout(5 * SECOND, mg.shutdown()).await.expect("shutdown with an open stream");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(3 * SECOND, open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stream ended with meshgate");
}

/// Chunked transfer coding off an SSE body (sizes in hex, each chunk followed by CRLF).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            out.push_str(&after[..after.len().min(size)]);
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The instances panel as the page shows it, once the stream is live and the panel is there:
/// every row's instance, whether it leads, whether it is the page's own, and etcd's state.
const INSTANCES: &str = r#"
    const panel = document.getElementById('instances-panel');
    if (panel.hidden || document.getElementById('live').dataset.live !== 'live') return null;
    const rows = [...panel.querySelectorAll('tbody tr[data-instance]')].map(r => ({
        name: r.dataset.instance,
        leader: r.dataset.leader === 'true',
        self: r.dataset.self === 'true',
        role: r.cells[1].textContent,
    }));
    return { etcd: document.getElementById('etcd-state').textContent, rows };
"#;

/// Two `meshgate run` instances on a real etcd, the page open on the one that does not lead:
/// the panel lists both and marks exactly one as leader; after the leader is SIGKILLed, the
/// same page (no reload) shows the survivor leading within `lease_ttl` + 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instances_panel_lists_both_instances_and_shows_the_takeover_after_the_leader_dies() {
    let _turn = ONE_BROWSER.lock().await;
    let net = Net::start_with(3, "max_queued_messages 0");
    let etcd = blocking(|| Etcd::start(net.slot.addr(50, 2379)));
    let mut a = blocking(|| Instance::start("a", &net.slot, 1, &net, &etcd.url(), "", &[]));
    blocking(|| eventually(10 * SECOND, "a leads replication", || a.leading()));
    let b = blocking(|| Instance::start("b", &net.slot, 2, &net, &etcd.url(), "", &[]));
    let browser = Browser::start(1280, 800).await;
    browser.goto(&format!("http://{}/", b.http)).await;
    let both = browser
        .wait_for(
            "both instances in the panel, one leading",
            LOAD,
            &format!(
                "const v = (() => {{ {INSTANCES} }})(); \
                 return v && v.rows.length === 2 && v.rows.filter(r => r.leader).length === 1 ? v : null;"
            ),
        )
        .await;
    let rows = both["rows"].as_array().unwrap();
    let leaders: Vec<_> = rows.iter().filter(|r| r["leader"] == true).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {both}");
    assert_eq!(leaders[0]["name"], "a", "{both}");
    assert!(leaders[0]["role"].as_str().unwrap().contains("leads replication"), "the role is shown: {both}");
    let me = rows.iter().find(|r| r["self"] == true).expect("the page's own instance is marked");
    assert_eq!(me["name"], "b", "{both}");
    assert_eq!(both["etcd"], "up", "{both}");
    browser.screenshot("instances-panel").await;
    browser.js("window.__sameDocument = 'still here'; return true;", json!([])).await;

    let killed = Instant::now();
    blocking(|| a.kill());
    let after = browser
        .wait_for(
            "b leading in the panel after a's death",
            LEASE_TTL + 3 * SECOND,
            &format!(
                "const v = (() => {{ {INSTANCES} }})(); \
                 return v && v.rows.filter(r => r.leader).map(r => r.name).join() === 'b' ? v : null;"
            ),
        )
        .await;
    let took = killed.elapsed();
    println!("leader killed -> the survivor's panel showed it leading after {took:?}: {after}");
    assert!(took <= LEASE_TTL + SECOND, "shown after {took:?}, beyond lease_ttl + 1 s");
    let same = browser.js("return window.__sameDocument;", json!([])).await;
    assert_eq!(same, "still here", "the page was not reloaded");
    // a's record went with its lease: the panel lists the survivor alone.
    browser
        .wait_for(
            "a gone from the panel",
            2 * SECOND,
            &format!("const v = (() => {{ {INSTANCES} }})(); return v && v.rows.length === 1 ? v : null;"),
        )
        .await;
    assert_no_console_errors(&browser.console_errors().await);
    browser.quit().await;
}
