//! The read-only routes: health, brokers, clients, TCP checks, events and metrics.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tokio::time::Instant;

use super::views::{BrokerView, ClientView, EventsView, HealthView, TcpCheckView};
use super::{ApiError, AppState};

/// Short on purpose: the point of `/tcp-check` is a quick answer while someone is looking.
const TCP_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Turns a query-string rejection into the API's one-line JSON error.
pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))
}

pub(super) fn path(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::BadRequest(format!("bad path: {}", e.body_text())))
}

fn number<T: std::str::FromStr>(key: &str, v: Option<&str>) -> Result<Option<T>, ApiError> {
    v.map(|s| s.parse::<T>().map_err(|_| ApiError::BadRequest(format!("{key} must be a whole number >= 0, got {s:?}"))))
        .transpose()
}

/// Overall state, shared by `/health` and the dashboard.
pub(super) fn health_view(s: &AppState) -> HealthView {
    let now = Instant::now();
    let brokers = s.pool.brokers();
    let available = brokers.iter().filter(|b| b.available(now)).count();
    // The primary tier is the lowest priority configured, whatever state its brokers are in.
    let primary = brokers.iter().map(|b| b.priority()).min();
    let primary_up = brokers.iter().any(|b| Some(b.priority()) == primary && b.available(now));
    let coordination = s.coordination.as_ref().map(|c| c.status());
    let etcd_away = coordination.as_ref().is_some_and(|c| c.reason.is_some());
    let status = match (available, primary_up, etcd_away) {
        (0, _, _) => "down",
        (_, false, _) | (_, _, true) => "degraded",
        _ => "ok",
    };
    HealthView {
        status,
        current_broker: s.pool.current_broker().map(|b| b.name.clone()),
        brokers_total: brokers.len(),
        brokers_available: available,
        sessions: s.pool.session_count(),
        moves_pending: s.pool.moves_pending(),
        version: crate::VERSION,
        uptime_secs: s.pool.uptime_secs(),
        coordination,
    }
}

pub async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let view = health_view(&s);
    let code = if view.brokers_available == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(view))
}

pub async fn brokers(State(s): State<AppState>) -> Json<Vec<BrokerView>> {
    let current = s.pool.current_broker();
    Json(s.pool.brokers().iter().map(|b| BrokerView::new(b, current.as_ref())).collect())
}

pub async fn broker(
    State(s): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<BrokerView>, ApiError> {
    let name = path(name)?;
    let b = s.pool.broker(&name).ok_or(ApiError::UnknownBroker(name))?;
    Ok(Json(BrokerView::new(&b, s.pool.current_broker().as_ref())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsQuery {
    broker: Option<String>,
    limit: Option<String>,
}

pub async fn clients(
    State(s): State<AppState>,
    q: Result<Query<ClientsQuery>, QueryRejection>,
) -> Result<Json<Vec<ClientView>>, ApiError> {
    let q = query(q)?;
    let limit = number::<usize>("limit", q.limit.as_deref())?.unwrap_or(usize::MAX);
    let list = s
        .pool
        .sessions()
        .iter()
        .filter(|x| q.broker.as_ref().is_none_or(|b| &x.broker.name == b))
        .take(limit)
        .map(|x| ClientView::new(x, &s.durable))
        .collect();
    Ok(Json(list))
}

/// Every persistent session meshgate has recorded, connected or not.
pub async fn sessions(State(s): State<AppState>) -> Json<Vec<crate::durable::SessionView>> {
    Json(s.durable.list())
}

pub async fn tcp_check(State(s): State<AppState>) -> Json<Vec<TcpCheckView>> {
    let results = crate::health::tcp_check(&s.pool, &s.upstream, TCP_CHECK_TIMEOUT).await;
    Json(
        results
            .into_iter()
            .map(|(name, address, r)| {
                let ok = r.is_ok();
                let (latency_ms, error) = match r {
                    Ok(ms) => (Some(ms), None),
                    Err(e) => (None, Some(e)),
                };
                TcpCheckView { name, address, ok, latency_ms, error }
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    since: Option<String>,
}

pub async fn events(
    State(s): State<AppState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsView>, ApiError> {
    let q = query(q)?;
    let since = number::<u64>("since", q.since.as_deref())?.unwrap_or(0);
    // Read before `since` so an event logged in between is never skipped: it is either in
    // the list (and last_seq follows the list) or newer than last_seq, for the next poll.
    let before = s.pool.events.last_seq();
    let events = s.pool.events.since(since);
    let last_seq = events.last().map_or(before, |e| e.seq);
    Ok(Json(EventsView { last_seq, events }))
}

pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.pool.refresh();
    // Series of a labelled metric exist only once touched; touching them here makes every
    // broker show its session counts from the first scrape, at 0, instead of appearing later.
    for b in s.pool.brokers().iter() {
        s.pool.metrics.sessions_active.with_label_values(&[&b.name]);
        s.pool.metrics.sessions_total.with_label_values(&[&b.name]);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.pool.metrics.render())
}

/// Every instance of a `[coordination]` group, which leads replication, and this instance's
/// etcd session; one instance and `"state": "off"` without coordination.
pub async fn instances(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(match &s.coordination {
        Some(c) => serde_json::to_value(c.view()).unwrap_or_default(),
        None => serde_json::json!({
            "coordination": { "state": "off" },
            "instances": [{
                "name": crate::config::host_name(),
                "version": crate::VERSION,
                "leader": s.replication.is_some(),
                "self": true,
            }],
        }),
    })
}

/// Replication links, per-pair lag and the retained record; `enabled: false` when replication
/// does not run in this process.
pub async fn replication(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(match &s.replication {
        Some(r) => {
            let mut v = serde_json::to_value(r.view()).unwrap_or_default();
            v["enabled"] = serde_json::Value::Bool(true);
            v
        }
        None => serde_json::json!({ "enabled": false, "links": [], "lag": [], "retained_topics": 0, "tombstones": 0 }),
    })
}
