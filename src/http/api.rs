//! The JSON API under `/v1`: what other services call instead of writing
//! `desired_containers` themselves.
//!
//! Every route needs `Authorization: Bearer $CLAWFLEET_API_TOKEN` (compared
//! in constant time); with no token configured every route answers 503. The
//! API writes desired rows exactly as any other service would and reads
//! status rows; it never calls the engine. Errors are always
//! `{"error": <code>, "message": <text>}` with a matching status, and a
//! message never holds a token.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/users?phase=&limit=&after=` | 200 `{"users": [view], "next_after"}` |
//! | `GET /v1/users/{id}` | 200 view, 404 |
//! | `PUT /v1/users/{id}` `{"state", "idle_timeout", "image"}` | 200 view |
//! | `DELETE /v1/users/{id}` | 204, 404 |
//! | `POST /v1/users/{id}/ensure-running?wait=30s` | 200 `{"url", "host_url", "token", ...}`, 409 failed, 504 |
//! | `POST /v1/users/{id}/touch` | 200 `{"user_id", "last_active_at"}`, 404 |
//! | `POST /v1/users/{id}/stop` | 200 view, 404 |
//! | `POST /v1/users/{id}/restart` | 202 `{"user_id", "restart_nonce"}`, 404 |
//!
//! A view is [`crate::view::user_view`], the object `clawfleet users show
//! --json` prints; it never holds the gateway token. Only `ensure-running`
//! hands the token out, to the caller that asked for the container.
//!
//! Limits (README "JSON API"): at most `--api-max-inflight` requests are
//! served at once, past that 503 with `Retry-After`; a request is answered
//! within [`REQUEST_TIMEOUT`] (`ensure-running` within its `wait` plus that).
//! The API reads and writes through a pool of its own, and its
//! `ensure-running` waiters share one watcher per user, so API traffic
//! cannot take the reconcilers' connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::AppState;
use crate::config::{parse_duration, parse_idle_timeout, parse_image};
use crate::desired::{quote_short, validate_user_id, DesiredState, MAX_IDLE_TIMEOUT_SECS};
use crate::secrets::SecretsError;
use crate::status::{ContainerStatus, Health, Phase};
use crate::store::{DesiredRow, DesiredUpdate, StatusSnapshot, StoreError};
use crate::view::user_view;

/// How long `ensure-running` waits when the caller names no `wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest `wait` a caller may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long any `/v1` request may take, beyond the `wait` of `ensure-running`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What `Retry-After` says when the API is busy (seconds).
const RETRY_AFTER_SECS: u64 = 1;
/// The default of `--api-max-inflight`.
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;
/// Page size of `GET /v1/users` when the caller names none.
pub const DEFAULT_LIMIT: u64 = 100;
/// The largest page of `GET /v1/users`.
pub const MAX_LIMIT: u64 = 1000;

/// What a `/v1` request can fail with; each variant is one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` names the part at fault.
    #[error("{field}: {reason}")]
    BadRequest {
        /// The path segment, query parameter, body field or `body`.
        field: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// No bearer token, another scheme, or the wrong token.
    #[error("missing or wrong bearer token: send Authorization: Bearer <CLAWFLEET_API_TOKEN>")]
    Unauthorized,
    /// No API token is configured.
    #[error("the JSON API is off: set CLAWFLEET_API_TOKEN to enable it")]
    Disabled,
    /// The user has no row (the quoted, shortened id).
    #[error("no user {0}")]
    NoSuchUser(String),
    /// No such route under `/v1`.
    #[error("no route {0}")]
    NoRoute(String),
    /// The route exists but not for this method.
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// `ensure-running` waited its whole `wait` without the container running.
    #[error("user {user} is not running after {}", humantime::format_duration(*.waited))]
    Timeout {
        /// The quoted, shortened user id.
        user: String,
        /// How long the caller waited.
        waited: Duration,
        /// The phase last seen, if the controller wrote one.
        phase: Option<Phase>,
        /// The status message last seen.
        status_message: Option<String>,
    },
    /// The database failed.
    #[error("the database is unavailable: {0}")]
    Store(#[source] StoreError),
    /// The user's gateway token could not be opened with the configured keys.
    #[error("the gateway token of user {user} cannot be opened: {source}")]
    Token {
        /// The quoted, shortened user id.
        user: String,
        /// Why (never the token itself).
        #[source]
        source: SecretsError,
    },
    /// The status row says running but holds no token.
    #[error("user {0} is running but its status row holds no gateway token")]
    NoToken(String),
    /// `ensure-running`: the status shows `failed` for the row's revision.
    #[error("user {user} failed: {}", .status_message.as_deref().unwrap_or("no message"))]
    Failed {
        /// The quoted, shortened user id.
        user: String,
        /// The status message.
        status_message: Option<String>,
    },
    /// `--api-max-inflight` requests are being served already.
    #[error("the api is busy ({0} requests in flight); retry after {RETRY_AFTER_SECS}s")]
    Busy(usize),
    /// The request took longer than its time limit.
    #[error("the request did not finish within {}; retry later", humantime::format_duration(*.0))]
    TooSlow(Duration),
}

impl ApiError {
    fn bad_request(field: &'static str, reason: impl Into<String>) -> Self {
        Self::BadRequest {
            field,
            reason: reason.into(),
        }
    }

    /// The status code and the machine-readable `error` code.
    pub fn code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Disabled => (StatusCode::SERVICE_UNAVAILABLE, "api_disabled"),
            Self::NoSuchUser(_) | Self::NoRoute(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Failed { .. } => (StatusCode::CONFLICT, "failed"),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::TooSlow(_) => (StatusCode::SERVICE_UNAVAILABLE, "request_timeout"),
            Self::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Token { .. } | Self::NoToken(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NoSuchUser(user) => Self::NoSuchUser(user),
            StoreError::Invalid { field, reason } => Self::BadRequest { field, reason },
            other => Self::Store(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        let message = match &self {
            // The driver's text stays in the log: callers only need to retry.
            Self::Store(e) => {
                tracing::warn!(error = %e, "api request failed: database unavailable");
                "the database is unavailable; try again".to_owned()
            }
            other => {
                if status.is_server_error() {
                    tracing::warn!(error = %other, "api request failed");
                }
                other.to_string()
            }
        };
        let mut body = json!({ "error": code, "message": message });
        if let Self::Timeout {
            phase,
            status_message,
            ..
        } = &self
        {
            body["phase"] = json!(phase.map(Phase::as_str));
            body["status_message"] = json!(status_message);
        }
        if let Self::Failed { .. } = &self {
            body["phase"] = json!(Phase::Failed.as_str());
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Busy(_) | Self::TooSlow(_) | Self::Store(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            _ => {}
        }
        response
    }
}

/// The `/v1` routes, behind the bearer-token check and the in-flight limit.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let limit = state.max_inflight.clamp(1, Semaphore::MAX_PERMITS);
    let inflight = Inflight {
        permits: Arc::new(Semaphore::new(limit)),
        limit,
    };
    let waiting = ensure_running_time_limit();
    Router::new()
        .route("/users", get(list_users))
        .route(
            "/users/{id}",
            get(show_user).put(put_user).delete(delete_user),
        )
        .route("/users/{id}/touch", post(touch_user))
        .route("/users/{id}/stop", post(stop_user))
        .route("/users/{id}/restart", post(restart_user))
        .route_layer(middleware::from_fn_with_state(REQUEST_TIMEOUT, time_limit))
        // Bounded by its own `wait`, so by a longer limit.
        .route(
            "/users/{id}/ensure-running",
            post(ensure_running).layer(middleware::from_fn_with_state(waiting, time_limit)),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Layers (not route layers) so unknown routes are refused alike; the
        // last added runs first: authentication, then the in-flight limit.
        .layer(middleware::from_fn_with_state(inflight, limit_inflight))
        .layer(middleware::from_fn_with_state(state, authenticate))
}

/// The time limit of `ensure-running`: its longest `wait`, plus the time
/// any request may take.
pub fn ensure_running_time_limit() -> Duration {
    MAX_WAIT + REQUEST_TIMEOUT
}

/// The in-flight limit: a request holds a permit while it is served.
#[derive(Clone)]
struct Inflight {
    permits: Arc<Semaphore>,
    limit: usize,
}

/// Serves a request only while fewer than the limit are in flight; 503
/// with `Retry-After` past it (the caller retries, nothing queues).
async fn limit_inflight(
    State(inflight): State<Inflight>,
    request: Request,
    next: Next,
) -> Response {
    match inflight.permits.try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Busy(inflight.limit).into_response(),
    }
}

/// Answers 503 when the request takes longer than `limit` (a slow body
/// or a slow database): nothing holds a connection and a permit for good.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TooSlow(limit).into_response(),
    }
}

/// Lets a request through only with the configured bearer token.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.api_token else {
        return ApiError::Disabled.into_response();
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(token) if expected.matches(token) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn no_route(request: Request) -> ApiError {
    // Nesting strips the `/v1` prefix from the path this handler sees.
    ApiError::NoRoute(format!("{} /v1{}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(request.method().to_string())
}

/// The `{id}` path segment, percent-decoded and validated as a user id.
struct UserId(String);

impl<S: Send + Sync> FromRequestParts<S> for UserId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("user_id", e.body_text()))?;
        validate_user_id(&id).map_err(|reason| ApiError::bad_request("user_id", reason))?;
        Ok(Self(id))
    }
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))
}

/// `GET /v1/users/{id}`.
async fn show_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
) -> Result<Json<Value>, ApiError> {
    view_of(&state, &id).await.map(Json)
}

/// The view of one user; 404 when there is neither a desired nor a status row.
async fn view_of(state: &AppState, user_id: &str) -> Result<Value, ApiError> {
    let desired = state.store.desired(user_id).await?;
    let status = state.store.status(user_id).await?;
    if desired.is_none() && status.is_none() {
        return Err(ApiError::NoSuchUser(quote_short(user_id)));
    }
    Ok(user_view(
        user_id,
        desired.as_ref(),
        status.as_ref(),
        Utc::now(),
    ))
}

/// Body of `PUT /v1/users/{id}`: each field optional; a present `null`
/// clears `idle_timeout` / `image`, an absent field leaves the column alone.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default, deserialize_with = "present")]
    state: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    idle_timeout: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    image: Option<Value>,
}

/// Tells a present `null` (`Some(Value::Null)`) from an absent field (`None`).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl PutBody {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request("body", format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::bad_request(
                "body",
                "expected a JSON object with state, idle_timeout and/or image",
            ));
        }
        serde_json::from_value(value).map_err(|e| ApiError::bad_request("body", e.to_string()))
    }

    fn into_update(self, user_id: String) -> Result<DesiredUpdate, ApiError> {
        Ok(DesiredUpdate {
            user_id,
            state: self.state.as_ref().map(state_field).transpose()?,
            idle_timeout_secs: self
                .idle_timeout
                .as_ref()
                .map(idle_timeout_field)
                .transpose()?,
            image: self.image.as_ref().map(image_field).transpose()?,
            touch: None,
        })
    }
}

fn state_field(value: &Value) -> Result<DesiredState, ApiError> {
    match value {
        Value::String(text) => DesiredState::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "state",
                format!("{} is not \"running\" or \"stopped\"", quote_short(text)),
            )
        }),
        other => Err(ApiError::bad_request(
            "state",
            format!("expected \"running\" or \"stopped\", got {other}"),
        )),
    }
}

/// `"30m"`, `"off"`, whole seconds (0: none), or `null` (none).
fn idle_timeout_field(value: &Value) -> Result<Option<u64>, ApiError> {
    let invalid = |reason: String| ApiError::bad_request("idle_timeout", reason);
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_idle_timeout(text)
            .map(|t| t.0.map(|d| d.as_secs()))
            .map_err(invalid),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Ok(None),
            Some(secs) if secs > MAX_IDLE_TIMEOUT_SECS as u64 => Err(invalid(format!(
                "{secs} seconds is more than a year (limit {MAX_IDLE_TIMEOUT_SECS})"
            ))),
            Some(secs) => Ok(Some(secs)),
            None => Err(invalid(format!(
                "{n} is not a whole number of seconds >= 0"
            ))),
        },
        other => Err(invalid(format!(
            "expected a duration like \"30m\", \"off\", whole seconds or null, got {other}"
        ))),
    }
}

/// An image reference, or `null` for the configured default.
fn image_field(value: &Value) -> Result<Option<crate::image_ref::ImageRef>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_image(text)
            .map(Some)
            .map_err(|reason| ApiError::bad_request("image", reason)),
        other => Err(ApiError::bad_request(
            "image",
            format!("expected an image reference or null, got {other}"),
        )),
    }
}

/// `PUT /v1/users/{id}`: creates or updates the desired row.
async fn put_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request("body", e.body_text()))?;
    let update = PutBody::parse(&body)?.into_update(id.clone())?;
    state.store.upsert_desired(&update).await?;
    tracing::info!(user_id = %quote_short(&id), "desired row written through the api");
    view_of(&state, &id).await.map(Json)
}

/// `DELETE /v1/users/{id}`: the container is removed, its volume kept.
async fn delete_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
) -> Result<StatusCode, ApiError> {
    if !state.store.delete_desired(&id).await? {
        return Err(ApiError::NoSuchUser(quote_short(&id)));
    }
    tracing::info!(user_id = %quote_short(&id), "desired row deleted through the api");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/users/{id}/touch`: records activity now.
async fn touch_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
) -> Result<Json<Value>, ApiError> {
    let now = Utc::now();
    state.store.touch(&id, now).await?;
    Ok(Json(json!({
        "user_id": id,
        "last_active_at": now.to_rfc3339(),
    })))
}

/// `POST /v1/users/{id}/stop`: sets `state = stopped` on an existing row.
async fn stop_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
) -> Result<Json<Value>, ApiError> {
    state.store.set_state(&id, DesiredState::Stopped).await?;
    tracing::info!(user_id = %quote_short(&id), "stop requested through the api");
    view_of(&state, &id).await.map(Json)
}

/// `POST /v1/users/{id}/restart`: bumps `restart_nonce`, so the controller
/// recreates the container with fresh configuration.
async fn restart_user(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.store.request_restart(&id).await?;
    tracing::info!(user_id = %quote_short(&id), "restart requested through the api");
    let nonce = match state.store.desired(&id).await? {
        Some(Ok(d)) => Some(d.restart_nonce),
        _ => None,
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "user_id": id, "restart_nonce": nonce })),
    ))
}

/// Query of `GET /v1/users`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    phase: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /v1/users`: one page of users ordered by id. Without `phase` it pages
/// over desired rows; with it, over status rows of that phase (which also
/// shows users whose row is gone and whose container is being removed).
async fn list_users(
    State(state): State<Arc<AppState>>,
    params: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = query(params)?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "limit",
                    format!(
                        "{} is not a whole number from 1 to {MAX_LIMIT}",
                        quote_short(text)
                    ),
                )
            })?,
    };
    let phase = params
        .phase
        .as_deref()
        .map(|text| {
            Phase::parse(text).ok_or_else(|| {
                let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                ApiError::bad_request(
                    "phase",
                    format!("{} is not one of {}", quote_short(text), names.join(", ")),
                )
            })
        })
        .transpose()?;
    let after = params.after.as_deref().filter(|a| !a.is_empty());
    let now = Utc::now();
    let (users, next_after) = match phase {
        None => {
            // One row more than asked tells whether another page follows.
            let mut rows = state.store.desired_page(after, limit + 1).await?;
            let next_after = if rows.len() as u64 > limit {
                rows.truncate(limit as usize);
                rows.last().map(|r| row_user_id(r).to_owned())
            } else {
                None
            };
            let ids: Vec<String> = rows.iter().map(|r| row_user_id(r).to_owned()).collect();
            let mut statuses: HashMap<String, ContainerStatus> = state
                .store
                .status_of(&ids)
                .await?
                .into_iter()
                .map(|s| (s.user_id.clone(), s))
                .collect();
            let users: Vec<Value> = rows
                .iter()
                .map(|row| {
                    let id = row_user_id(row);
                    user_view(id, Some(row), statuses.remove(id).as_ref(), now)
                })
                .collect();
            (users, next_after)
        }
        Some(phase) => {
            let page = state.store.status_page(Some(phase), after, limit).await?;
            let ids: Vec<String> = page.rows.iter().map(|s| s.user_id.clone()).collect();
            let mut desired: HashMap<String, DesiredRow> = state
                .store
                .desired_of(&ids)
                .await?
                .into_iter()
                .map(|row| (row_user_id(&row).to_owned(), row))
                .collect();
            let users: Vec<Value> = page
                .rows
                .iter()
                .map(|s| {
                    user_view(
                        &s.user_id,
                        desired.remove(&s.user_id).as_ref(),
                        Some(s),
                        now,
                    )
                })
                .collect();
            (users, page.next_after)
        }
    };
    Ok(Json(json!({ "users": users, "next_after": next_after })))
}

fn row_user_id(row: &DesiredRow) -> &str {
    match row {
        Ok(d) => &d.user_id,
        Err(invalid) => &invalid.user_id,
    }
}

/// Query of `ensure-running`.
#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

fn wait_param(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_WAIT);
    };
    let wait = parse_duration(text).map_err(|reason| ApiError::bad_request("wait", reason))?;
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(
            "wait",
            format!(
                "{} is longer than the limit of {}",
                quote_short(text),
                humantime::format_duration(MAX_WAIT)
            ),
        ));
    }
    Ok(wait)
}

/// How far apart the clocks of an API process and the leader may be: an idle
/// deadline closer than this counts as possibly passed.
const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// True when `status` shows the container of revision `revision` (or later)
/// running and, if its image has a health check, past its start period: the
/// caller gets a gateway that answers.
fn is_ready(status: &ContainerStatus, revision: i64) -> bool {
    status.phase == Phase::Running
        && !matches!(status.health, Some(Health::Starting | Health::Unhealthy))
        && status.container_id.is_some()
        && status.host_port.is_some()
        && status.observed_revision.is_some_and(|r| r >= revision)
}

/// True when `status` shows the user failed at revision `revision` (or
/// later): waiting cannot help, the row must change or a human act first.
fn has_failed(status: &ContainerStatus, revision: i64) -> bool {
    status.phase == Phase::Failed && status.observed_revision.is_some_and(|r| r >= revision)
}

/// `POST /v1/users/{id}/ensure-running?wait=30s`: the original service's
/// `ensureRunning`. Marks the user running and active now, then waits until
/// the controller reports the container of that revision running, and hands
/// out its addresses and gateway token; 409 at once when the controller
/// reports that revision failed.
async fn ensure_running(
    State(state): State<Arc<AppState>>,
    UserId(id): UserId,
    params: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let wait = wait_param(query(params)?.wait.as_deref())?;
    let deadline = Instant::now() + wait;
    // Joined before the write, so no status change after it is missed.
    let mut watch = state.store.watch_status(&id);
    let before = state.store.desired(&id).await?.and_then(Result::ok);
    state
        .store
        .upsert_desired(&DesiredUpdate {
            user_id: id.clone(),
            state: Some(DesiredState::Running),
            touch: Some(Utc::now()),
            ..Default::default()
        })
        .await?;
    let revision = match state.store.desired(&id).await? {
        // A touch of a user already running with time to spare changes no
        // container: the one of the revision before the touch will do (no
        // reconcile could have stopped it for idleness, its deadline being
        // still ahead now that the touch is committed).
        Some(Ok(d)) => match before {
            Some(b) if b.only_touched_into(&d, Utc::now(), CLOCK_SKEW) => b.revision,
            _ => d.revision,
        },
        Some(Err(invalid)) => invalid.revision,
        // Deleted by someone else in between.
        None => return Err(ApiError::NoSuchUser(quote_short(&id))),
    };
    loop {
        let status = match watch.latest() {
            StatusSnapshot::NotRead => None,
            StatusSnapshot::Failed(reason) => {
                return Err(ApiError::Store(StoreError::Shared {
                    operation: "read of status row",
                    reason,
                }))
            }
            StatusSnapshot::Read(status) => {
                if let Some(status) = status.as_ref() {
                    if is_ready(status, revision) {
                        return running_answer(&state, status).map(Json);
                    }
                    if has_failed(status, revision) {
                        return Err(ApiError::Failed {
                            user: quote_short(&id),
                            status_message: status.message.clone(),
                        });
                    }
                }
                status
            }
        };
        if tokio::time::timeout_at(deadline, watch.changed())
            .await
            .is_err()
        {
            return Err(ApiError::Timeout {
                user: quote_short(&id),
                waited: wait,
                phase: status.as_ref().map(|s| s.phase),
                status_message: status.and_then(|s| s.message),
            });
        }
    }
}

/// The answer of a successful `ensure-running`, with the plaintext token.
fn running_answer(state: &AppState, status: &ContainerStatus) -> Result<Value, ApiError> {
    let user = || quote_short(&status.user_id);
    let sealed = status
        .gateway_token
        .as_deref()
        .ok_or_else(|| ApiError::NoToken(user()))?;
    let token = state
        .keys
        .open(&status.user_id, sealed)
        .map_err(|source| ApiError::Token {
            user: user(),
            source,
        })?;
    Ok(json!({
        "user_id": status.user_id,
        "phase": status.phase.as_str(),
        "container_name": status.container_name,
        "host_port": status.host_port,
        "url": status.url,
        "host_url": status.host_url,
        "token": token.expose(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_others_are_refused() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn an_absent_field_is_kept_and_a_null_one_cleared() {
        let update = PutBody::parse(br#"{"image": null}"#)
            .unwrap()
            .into_update("alice".into())
            .unwrap();
        assert_eq!(update.image, Some(None));
        assert_eq!(update.idle_timeout_secs, None);
        assert_eq!(update.state, None);
    }

    #[test]
    fn idle_timeouts_are_durations_seconds_off_or_null() {
        let secs = |v: Value| idle_timeout_field(&v);
        assert_eq!(secs(json!("30m")).unwrap(), Some(1800));
        assert_eq!(secs(json!("off")).unwrap(), None);
        assert_eq!(secs(json!(90)).unwrap(), Some(90));
        assert_eq!(secs(json!(0)).unwrap(), None);
        assert_eq!(secs(Value::Null).unwrap(), None);
        for bad in [
            json!("soon"),
            json!(-1),
            json!(1.5),
            json!(true),
            json!(10_000_000_000u64),
        ] {
            let err = secs(bad.clone()).unwrap_err();
            assert!(
                err.to_string().starts_with("idle_timeout: "),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bad_bodies_name_the_field_at_fault() {
        let message = |body: &str| {
            PutBody::parse(body.as_bytes())
                .and_then(|b| b.into_update("alice".into()))
                .unwrap_err()
                .to_string()
        };
        assert!(message("{").starts_with("body: not valid JSON"));
        assert!(message("[]").starts_with("body: "));
        assert!(message(r#"{"colour": 1}"#).contains("unknown field `colour`"));
        assert!(message(r#"{"state": "banana"}"#).starts_with("state: "));
        assert!(message(r#"{"state": null}"#).starts_with("state: "));
        assert!(message(r#"{"image": "../x"}"#).starts_with("image: "));
    }

    #[test]
    fn wait_defaults_to_thirty_seconds_and_stops_at_five_minutes() {
        assert_eq!(wait_param(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(wait_param(Some("5m")).unwrap(), MAX_WAIT);
        assert!(wait_param(Some("5m 1s")).is_err());
        assert!(wait_param(Some("forever"))
            .unwrap_err()
            .to_string()
            .starts_with("wait: "));
    }

    #[test]
    fn database_errors_are_unavailable_and_missing_users_not_found() {
        let missing: ApiError = StoreError::NoSuchUser("\"x\"".into()).into();
        assert_eq!(missing.code().0, StatusCode::NOT_FOUND);
        let invalid: ApiError = StoreError::Invalid {
            field: "user_id",
            reason: "empty".into(),
        }
        .into();
        assert_eq!(invalid.code().0, StatusCode::BAD_REQUEST);
        let down: ApiError = StoreError::PortTaken(1).into();
        assert_eq!(
            down.code(),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
    }
}
