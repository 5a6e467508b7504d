//! Admin actions (disable, enable, drain a broker) and the bearer-token check that guards them.
//!
//! Off unless the config sets `[admin] token`: a proxy in front of production brokers should
//! not be steerable by whoever can reach its HTTP port just because nobody thought about it.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;

use super::api::path;
use super::views::BrokerView;
use super::{ApiError, AppState};
use crate::pool::AdminState;

pub async fn disable(
    State(s): State<AppState>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<BrokerView>, ApiError> {
    act(&s, &headers, name, AdminState::Disabled)
}

pub async fn enable(
    State(s): State<AppState>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<BrokerView>, ApiError> {
    act(&s, &headers, name, AdminState::Enabled)
}

pub async fn drain(
    State(s): State<AppState>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<BrokerView>, ApiError> {
    act(&s, &headers, name, AdminState::Draining)
}

/// Authorizes first, so an unauthenticated caller cannot even learn which broker names exist.
fn act(
    s: &AppState,
    headers: &HeaderMap,
    name: Result<Path<String>, PathRejection>,
    to: AdminState,
) -> Result<Json<BrokerView>, ApiError> {
    authorize(s.admin_token.load().as_deref().map(String::as_str), headers)?;
    let name = path(name)?;
    s.pool.set_admin(&name, to).ok_or_else(|| ApiError::UnknownBroker(name.clone()))?;
    // Every other instance applies it too, and one that starts later finds it.
    if let Some(c) = &s.coordination {
        c.admin_changed(&name, to);
    }
    let b = s.pool.broker(&name).ok_or(ApiError::UnknownBroker(name))?;
    Ok(Json(BrokerView::new(&b, s.pool.current_broker().as_ref())))
}

fn authorize(token: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let want = token.ok_or(ApiError::AdminOff)?;
    let given = headers.get(header::AUTHORIZATION).and_then(|v| bearer(v.as_bytes())).ok_or(ApiError::Unauthorized)?;
    if same_secret(given, want.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive, RFC 9110).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right. The time depends on the guess's length only, which the guesser already knows.
fn same_secret(given: &[u8], want: &[u8]) -> bool {
    if want.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != want.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ want[i % want.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn secrets_match_only_exactly() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for wrong in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"s3crets3cret", b"x"] {
            assert!(!same_secret(wrong, b"s3cret"), "{wrong:?}");
        }
        assert!(!same_secret(b"", b""), "an empty configured token never matches");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }

    #[test]
    fn admin_off_beats_everything_and_tokens_are_checked() {
        let mut h = HeaderMap::new();
        assert!(matches!(authorize(None, &h), Err(ApiError::AdminOff)));
        assert!(matches!(authorize(Some("t"), &h), Err(ApiError::Unauthorized)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer wrong"));
        assert!(matches!(authorize(None, &h), Err(ApiError::AdminOff)));
        assert!(matches!(authorize(Some("t"), &h), Err(ApiError::Unauthorized)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert!(authorize(Some("t"), &h).is_ok());
    }
}
