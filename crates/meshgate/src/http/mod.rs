//! The HTTP API: health, brokers, clients, events, TCP checks, admin actions, Prometheus metrics,
//! and the live dashboard (`GET /` and its update stream `GET /stream`, see [`dashboard`]).
//!
//! [`ROUTES`] is the one list of what the API serves: the router is built from it and a test
//! holds `docs/openapi.yaml` to exactly the same set, so the document cannot drift from the code.
//! Every answer that is not a success is JSON `{"error": "one line"}`.

mod admin;
mod api;
mod dashboard;
mod views;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};

use crate::pool::Pool;

#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<Pool>,
    /// Persistent sessions, for `/sessions` and the session fields of `/clients`.
    pub durable: Arc<crate::durable::Durable>,
    /// For `/tcp-check`: reaches brokers the way everything else does.
    pub upstream: Arc<crate::upstream::Upstream>,
    /// `[admin] token`; swapped by a reload, so a new token takes effect at once.
    pub admin_token: Arc<arc_swap::ArcSwapOption<String>>,
    /// Present when replication runs in this process.
    pub replication: Option<Arc<crate::replication::Replication>>,
    /// Present with `[coordination]`: the instances, the leader, the etcd session's state.
    pub coordination: Option<Arc<crate::coordination::Coordination>>,
    /// Cancelled when meshgate stops: long-lived responses (the dashboard's stream) end then,
    /// so an open browser does not hold the shutdown for its grace period.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Every route as (method, path in OpenAPI form). Axum 0.8 writes path parameters the same
/// way (`{name}`), so these strings are used for routing as they are.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/stream"),
    ("GET", "/health"),
    ("GET", "/brokers"),
    ("GET", "/brokers/{name}"),
    ("GET", "/clients"),
    ("GET", "/sessions"),
    ("GET", "/tcp-check"),
    ("GET", "/events"),
    ("GET", "/metrics"),
    ("GET", "/replication"),
    ("GET", "/instances"),
    ("POST", "/brokers/{name}/disable"),
    ("POST", "/brokers/{name}/enable"),
    ("POST", "/brokers/{name}/drain"),
];

/// Largest request body accepted. Nothing in the API takes a body; the cap only keeps a
/// client from making the server buffer one.
pub const BODY_LIMIT: usize = 16 * 1024;

/// Largest total size of a request's headers.
pub const HEADER_LIMIT: usize = 16 * 1024;

/// The handler of one [`ROUTES`] entry. `feed` is the dashboard state its viewers share.
fn endpoint(method: &str, path: &str, feed: &Arc<dashboard::Feed>) -> MethodRouter<AppState> {
    match (method, path) {
        ("GET", "/") => get(dashboard::index),
        ("GET", "/stream") => {
            let feed = feed.clone();
            get(move |state, headers| dashboard::stream(state, feed, headers))
        }
        ("GET", "/health") => get(api::health),
        ("GET", "/brokers") => get(api::brokers),
        ("GET", "/brokers/{name}") => get(api::broker),
        ("GET", "/clients") => get(api::clients),
        ("GET", "/sessions") => get(api::sessions),
        ("GET", "/tcp-check") => get(api::tcp_check),
        ("GET", "/events") => get(api::events),
        ("GET", "/metrics") => get(api::metrics),
        ("GET", "/replication") => get(api::replication),
        ("GET", "/instances") => get(api::instances),
        ("POST", "/brokers/{name}/disable") => post(admin::disable),
        ("POST", "/brokers/{name}/enable") => post(admin::enable),
        ("POST", "/brokers/{name}/drain") => post(admin::drain),
        // Reached only when ROUTES gains an entry without a handler; the unit test that
        // builds the router catches that before anything ships.
        _ => panic!("http::ROUTES lists {method} {path} but no handler serves it"),
    }
}

pub fn router(state: AppState) -> Router {
    let mut app = Router::new();
    let feed = Arc::new(dashboard::Feed::default());
    for &(method, path) in ROUTES {
        app = app.route(path, endpoint(method, path, &feed));
    }
    app.fallback(not_found)
        // Applies to the routes added above, so it must come after them.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(guard))
        .with_state(state)
}

/// Why a request failed; each variant is one line and knows its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no broker named {0:?}")]
    UnknownBroker(String),
    #[error("admin actions are off: set [admin] token = \"...\" in the config and send it as `Authorization: Bearer <token>`")]
    AdminOff,
    #[error(
        "missing or wrong admin token: send `Authorization: Bearer <token>` with the [admin] token from the config"
    )]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("no such route: {method} {path}")]
    NotFound { method: Method, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: Method, path: String },
    #[error("request body larger than {BODY_LIMIT} bytes")]
    BodyTooLarge,
    #[error("request headers larger than {HEADER_LIMIT} bytes")]
    HeadersTooLarge,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownBroker(_) | ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::AdminOff => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut res = (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"meshgate admin\""));
        }
        res
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound { method, path: uri.path().to_string() }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method, path: uri.path().to_string() }
}

/// Refuses oversized bodies up front (no handler reads a body, so `DefaultBodyLimit` alone
/// would never fire) and marks every answer uncacheable: it is live state.
async fn guard(req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // hyper itself stops reading headers at about 400 KB; nothing here needs more than a few.
    let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let mut res = match declared {
        _ if header_bytes > HEADER_LIMIT => ApiError::HeadersTooLarge.into_response(),
        Some(n) if n > BODY_LIMIT as u64 => ApiError::BodyTooLarge.into_response(),
        _ => next.run(req).await,
    };
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        let config =
            crate::Config::from_toml("[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n", "test").unwrap();
        AppState {
            pool: Arc::new(Pool::new(&config)),
            durable: Arc::new(crate::durable::Durable::new(&config.sessions)),
            upstream: Arc::new(crate::upstream::Upstream::new(&config).unwrap()),
            admin_token: Default::default(),
            replication: None,
            coordination: None,
            stop: Default::default(),
        }
    }

    #[test]
    fn every_route_has_a_handler() {
        // Panics if ROUTES and `endpoint` disagree, or if two entries collide in the router.
        let _ = router(state());
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(seen.insert(r), "{r:?} listed twice");
        }
    }

    #[test]
    fn errors_are_one_line_with_their_status() {
        let cases = [
            (ApiError::UnknownBroker("x".into()), 404),
            (ApiError::AdminOff, 403),
            (ApiError::Unauthorized, 401),
            (ApiError::BadRequest("bad".into()), 400),
            (ApiError::NotFound { method: Method::GET, path: "/x".into() }, 404),
            (ApiError::MethodNotAllowed { method: Method::PUT, path: "/x".into() }, 405),
            (ApiError::BodyTooLarge, 413),
            (ApiError::HeadersTooLarge, 431),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
