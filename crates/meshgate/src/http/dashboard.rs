//! The live dashboard: `GET /` serves one page whose CSS and JS are compiled into the binary,
//! `GET /stream` pushes what it shows over Server-Sent Events.
//!
//! The page needs nothing from the network but this listener. Its style and script are inlined
//! and allowed by a fresh CSP nonce per response, so the policy can forbid every other source
//! (no inline code from anywhere else, no CDN, no frames) while the routes stay exactly the
//! documented [`super::ROUTES`].
//!
//! Both routes negotiate: a browser asks for `text/html` and `text/event-stream`; any other
//! client (curl, scripts, the API tests) gets JSON: an index of the routes, or one update.
//!
//! A stream costs one timer and one event-log subscription, no task: it is polled by the
//! connection that carries it, so a viewer that goes away drops it with the connection. The state
//! itself is built at most once per [`STATE_MAX_AGE`] however many viewers are open ([`Feed`]).

use std::convert::Infallible;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::views::{BrokerView, ClientView, HealthView};
use super::AppState;
use crate::events::{unix_ms, Event};

const TEMPLATE: &str = include_str!("assets/dashboard.html");
const STYLE: &str = include_str!("assets/dashboard.css");
const SCRIPT: &str = include_str!("assets/dashboard.js");

/// A viewer gets an update at least this often, and right after every event.
const PUSH_EVERY: Duration = Duration::from_secs(1);
/// After an event, wait this long before pushing: a state change is followed at once by the
/// failover it causes, and one update showing both beats two in a row.
const SETTLE: Duration = Duration::from_millis(50);
/// What the browser's EventSource waits before reconnecting (e.g. while meshgate restarts).
const RETRY: Duration = Duration::from_secs(1);
/// Sessions listed per update (the newest); the total is always sent. A table of thousands
/// helps nobody and would cost every viewer that much JSON every second.
const CLIENTS_MAX: usize = 500;
/// Events a viewer gets when it (re)connects; later updates carry only what is new.
const EVENTS_BACKLOG: u64 = 200;
/// Viewers pushed within this interval of each other share one built state.
const STATE_MAX_AGE: Duration = Duration::from_millis(100);

/// Everything the page draws except the event log.
#[derive(Debug, Serialize)]
pub struct DashboardState {
    pub at_ms: u64,
    /// When this meshgate started; the page notices a restart when it changes.
    pub started_ms: u64,
    /// Whether `[admin] token` is set, i.e. whether the page offers the admin buttons.
    pub admin: bool,
    pub health: HealthView,
    pub process: ProcessView,
    pub brokers: Vec<BrokerView>,
    pub clients_total: usize,
    /// The newest [`CLIENTS_MAX`] sessions, oldest first.
    pub clients: Vec<ClientView>,
    /// `null` when replication does not run in this process.
    pub replication: Option<crate::replication::View>,
    /// With `[coordination]`: what `GET /instances` answers (every instance, which leads,
    /// this instance's etcd session); `null` without it, and the page shows no panel.
    pub instances: Option<crate::coordination::InstancesView>,
}

/// meshgate's own footprint, from /proc (each `null` where that is unavailable).
#[derive(Debug, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub rss_bytes: Option<u64>,
    pub threads: Option<u64>,
    pub open_fds: Option<u64>,
    /// The machine's 1-minute load average and core count, to read it against.
    pub load1: Option<f64>,
    pub cpus: usize,
}

impl ProcessView {
    fn read() -> ProcessView {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
        };
        ProcessView {
            pid: std::process::id(),
            rss_bytes: field("VmRSS:").map(|kib| kib * 1024),
            threads: field("Threads:"),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
            load1: std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split(' ').next()?.parse().ok()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl DashboardState {
    pub fn build(s: &AppState) -> DashboardState {
        let current = s.pool.current_broker();
        let sessions = s.pool.sessions();
        let skip = sessions.len().saturating_sub(CLIENTS_MAX);
        DashboardState {
            at_ms: crate::pool::Pool::now_ms(),
            started_ms: unix_ms(s.pool.started),
            admin: s.admin_token.load().is_some(),
            health: super::api::health_view(s),
            process: ProcessView::read(),
            brokers: s.pool.brokers().iter().map(|b| BrokerView::new(b, current.as_ref())).collect(),
            clients_total: sessions.len(),
            clients: sessions[skip..].iter().map(|x| ClientView::new(x, &s.durable)).collect(),
            replication: s.replication.as_ref().map(|r| r.view()),
            instances: s.coordination.as_ref().map(|c| c.view()),
        }
    }
}

/// The last built state as JSON, shared by every viewer of one meshgate.
#[derive(Default)]
pub struct Feed {
    last: Mutex<Option<(Instant, Arc<str>)>>,
}

impl Feed {
    /// The state as JSON, built after `not_before` (reused when it already was).
    fn state(&self, s: &AppState, not_before: Instant) -> Arc<str> {
        // Held while building, so viewers woken by the same event build it once between them.
        let mut last = self.last.lock();
        if let Some((at, json)) = &*last {
            if *at >= not_before {
                return json.clone();
            }
        }
        let json: Arc<str> = serde_json::to_string(&DashboardState::build(s))
            .expect("the dashboard state serializes: it holds only strings, numbers and lists")
            .into();
        *last = Some((Instant::now(), json.clone()));
        json
    }
}

/// One update as JSON: `{"reset": bool, "events": [...], "state": {...}}`. `reset` says the
/// events are the recent backlog (a fresh connection), not only what is new.
fn update(s: &AppState, feed: &Feed, since: u64, reset: bool, not_before: Instant) -> (String, u64) {
    // Read before `since` so an event logged in between is sent now or next time, never skipped.
    let before = s.pool.events.last_seq();
    let events = s.pool.events.since(since);
    let last_seq = events.last().map_or(before, |e| e.seq);
    let events = serde_json::to_string(&events).expect("events serialize");
    let state = feed.state(s, not_before);
    (format!(r#"{{"reset":{reset},"events":{events},"state":{state}}}"#), last_seq)
}

/// True when the request's `Accept` header names `mime` (no weighing of q-values: the page's
/// own requests name exactly what they want, everything else gets JSON).
fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| part.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(mime))
}

/// `GET /`: the page for browsers, an index of the routes for everyone else.
pub async fn index(headers: HeaderMap) -> Response {
    if !accepts(&headers, "text/html") {
        let routes: Vec<_> = super::ROUTES.iter().map(|(m, p)| serde_json::json!({ "method": m, "path": p })).collect();
        return Json(serde_json::json!({
            "service": "meshgate",
            "version": crate::VERSION,
            "dashboard": "open this address in a browser",
            "routes": routes,
        }))
        .into_response();
    }
    let nonce = nonce();
    let mut res = Html(page(&nonce)).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, csp(&nonce));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// 128 random bits, hex: CSP nonces must not be guessable by whoever could inject markup.
fn nonce() -> String {
    rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect()
}

/// The page with this response's nonce on its `<style>` and `<script>`. The nonce goes into the
/// template before the assets do, so nothing in the CSS or JS can be mistaken for a placeholder.
fn page(nonce: &str) -> String {
    TEMPLATE
        .replace("{{NONCE}}", nonce)
        .replace("{{VERSION}}", crate::VERSION)
        .replacen("{{STYLE}}", STYLE, 1)
        .replacen("{{SCRIPT}}", SCRIPT, 1)
}

/// Only this response's inline style and script run; data goes only to this origin; images
/// only from it or inline (the favicon is a `data:` SVG, so the browser asks for no /favicon.ico).
fn csp(nonce: &str) -> HeaderValue {
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).expect("the policy is ASCII")
}

/// `GET /stream`: Server-Sent Events for the page (`event: update`, data as [`update`]),
/// or one update as JSON for a client that does not ask for `text/event-stream`.
pub async fn stream(State(s): State<AppState>, feed: Arc<Feed>, headers: HeaderMap) -> Response {
    let since = s.pool.events.last_seq().saturating_sub(EVENTS_BACKLOG);
    if !accepts(&headers, "text/event-stream") {
        let (json, _) = update(&s, &feed, since, true, Instant::now());
        return ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    }
    let mut tick = tokio::time::interval(PUSH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let viewer = Viewer { wake: s.pool.events.subscribe(), app: s, feed, tick, last_seq: since, first: true };
    Sse::new(viewer.into_stream()).into_response()
}

/// One open stream's state.
struct Viewer {
    app: AppState,
    feed: Arc<Feed>,
    /// Live events; used only to push early. The update's events come from the log itself.
    wake: broadcast::Receiver<Event>,
    tick: Interval,
    last_seq: u64,
    first: bool,
}

impl Viewer {
    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
        stream::unfold(self, |mut v| async move {
            let not_before = v.wait().await?;
            let (json, last_seq) = v.app_update(not_before);
            let mut event = SseEvent::default().event("update").data(json);
            if v.first {
                event = event.retry(RETRY);
            }
            v.first = false;
            v.last_seq = last_seq;
            Some((Ok(event), v))
        })
    }

    fn app_update(&self, not_before: Instant) -> (String, u64) {
        update(&self.app, &self.feed, self.last_seq, self.first, not_before)
    }

    /// Waits until the next update is due; returns how fresh its state must be, or `None`
    /// when the stream should end (meshgate is closing what is left after its grace period).
    async fn wait(&mut self) -> Option<Instant> {
        if self.first {
            self.tick.reset();
            return Some(Instant::now());
        }
        tokio::select! {
            _ = self.app.pool.closing.cancelled() => None,
            _ = self.app.stop.cancelled() => None,
            _ = self.tick.tick() => {
                let now = Instant::now();
                Some(now.checked_sub(STATE_MAX_AGE).unwrap_or(now))
            }
            r = self.wake.recv() => {
                if let Err(RecvError::Closed) = r {
                    return None;
                }
                let woke = Instant::now();
                tokio::time::sleep(SETTLE).await;
                // Whatever else arrived meanwhile is in this update too.
                while !matches!(self.wake.try_recv(), Err(TryRecvError::Empty | TryRecvError::Closed)) {}
                self.tick.reset();
                Some(woke)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
        h
    }

    #[test]
    fn browsers_get_the_page_and_the_stream_others_json() {
        let nav = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8";
        assert!(accepts(&headers(nav), "text/html"));
        assert!(accepts(&headers("text/event-stream"), "text/event-stream"));
        assert!(!accepts(&headers("*/*"), "text/html"));
        assert!(!accepts(&headers("application/json"), "text/event-stream"));
        assert!(!accepts(&HeaderMap::new(), "text/html"));
    }

    #[test]
    fn the_page_carries_its_nonce_and_every_asset() {
        let n = nonce();
        assert_eq!(n.len(), 32);
        assert_ne!(n, nonce(), "a fresh nonce per response");
        let html = page(&n);
        assert!(!html.contains("{{"), "every placeholder filled");
        assert!(html.contains(&format!("<style nonce=\"{n}\">")) && html.contains(&format!("<script nonce=\"{n}\">")));
        assert!(html.contains(STYLE) && html.contains(SCRIPT));
        // Anything that could load from elsewhere would be blocked by the policy anyway; this
        // keeps the page from even trying.
        // The SVG namespace (in the script and the favicon) is a name, not something to load.
        let html = html.replace("http://www.w3.org/2000/svg", "SVG_NS");
        assert!(!html.contains("http://") && !html.contains("https://"), "no external URL in the page");
        let policy = csp(&n);
        let policy = policy.to_str().unwrap();
        assert!(policy.starts_with("default-src 'none';") && policy.contains(&format!("'nonce-{n}'")));
        assert!(!policy.contains("unsafe"));
    }

    #[test]
    fn process_view_reads_proc() {
        let p = ProcessView::read();
        assert!(p.cpus >= 1);
        if cfg!(target_os = "linux") {
            assert!(p.rss_bytes.is_some_and(|r| r > 0) && p.threads.is_some() && p.open_fds.is_some());
        }
    }
}
