//! The HTTP API: health, brokers, clients, events, TCP checks, admin actions and Prometheus metrics.

use std::sync::Arc;

use axum::{extract::State, routing::get, Router};

use crate::pool::Pool;

#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<Pool>,
    pub admin_token: Option<String>,
}

pub fn router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

async fn metrics(State(s): State<AppState>) -> String {
    s.pool.refresh();
    s.pool.metrics.render()
}
