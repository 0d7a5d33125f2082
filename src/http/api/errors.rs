//! What a `/v1` request can fail with, and the JSON body every failure
//! answers: `{"error": <code>, "message": <text>}` with a matching status
//! (README "JSON API"). A message never holds a token, and a database
//! error's driver text stays in the log.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::RETRY_AFTER_SECS;
use crate::secrets::SecretsError;
use crate::status::Phase;
use crate::store::StoreError;

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

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The machine-readable code: `bad_request`, `unauthorized`,
    /// `api_disabled`, `not_found`, `method_not_allowed`, `failed`,
    /// `unavailable`, `busy`, `request_timeout`, `timeout` or `internal`.
    pub error: String,
    /// What failed, in words (a `bad_request` message starts with the field).
    pub message: String,
    /// `ensure-running` only: on 504 the phase last seen (`null` before the
    /// controller wrote a status row), on 409 `failed`; absent otherwise.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Phase>)]
    pub phase: Option<Option<Phase>>,
    /// `ensure-running` only: on 504 the status message last seen (or
    /// `null`); absent otherwise.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub status_message: Option<Option<String>>,
}

/// A present field, `null` or not (`Some`); an absent one stays `None` by `default`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ApiError {
    pub(super) fn bad_request(field: &'static str, reason: impl Into<String>) -> Self {
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

    /// The JSON body of this error.
    fn body(&self) -> ErrorBody {
        let (status, code) = self.code();
        let message = match self {
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
        let (phase, status_message) = match self {
            Self::Timeout {
                phase,
                status_message,
                ..
            } => (Some(*phase), Some(status_message.clone())),
            Self::Failed { .. } => (Some(Some(Phase::Failed)), None),
            _ => (None, None),
        };
        ErrorBody {
            error: code.to_owned(),
            message,
            phase,
            status_message,
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
        let mut response = (self.code().0, Json(self.body())).into_response();
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

/// The answer to a path no route matches.
pub(super) async fn no_route(request: Request) -> ApiError {
    // Nesting strips the `/v1` prefix from the path this handler sees.
    ApiError::NoRoute(format!("{} /v1{}", request.method(), request.uri().path()))
}

/// The answer to a route asked with a method it does not serve.
pub(super) async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(request.method().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_timeout_shows_null_for_what_it_never_saw_and_a_failure_only_its_phase() {
        let timeout = ApiError::Timeout {
            user: "\"alice\"".into(),
            waited: Duration::from_secs(3),
            phase: None,
            status_message: None,
        };
        let body = serde_json::to_value(timeout.body()).unwrap();
        assert_eq!(body["error"], "timeout");
        assert!(body["phase"].is_null() && body["status_message"].is_null());
        assert_eq!(body.as_object().unwrap().len(), 4, "{body}");
        assert_eq!(
            serde_json::from_value::<ErrorBody>(body).unwrap(),
            timeout.body()
        );

        let failed = ApiError::Failed {
            user: "\"alice\"".into(),
            status_message: Some("image missing".into()),
        };
        let body = serde_json::to_value(failed.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "error": "failed",
                "message": "user \"alice\" failed: image missing",
                "phase": "failed",
            })
        );
        assert_eq!(
            serde_json::from_value::<ErrorBody>(body).unwrap(),
            failed.body()
        );

        let plain = serde_json::to_value(ApiError::Unauthorized.body()).unwrap();
        assert_eq!(plain.as_object().unwrap().len(), 2, "{plain}");
        assert_eq!(
            serde_json::from_value::<ErrorBody>(plain).unwrap(),
            ApiError::Unauthorized.body()
        );
    }
}
