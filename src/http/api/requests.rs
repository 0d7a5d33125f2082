//! The API's typed requests and answers: the `{id}` path segment, the
//! queries, the `PUT` body, and the bodies of answers that are not a
//! [`UserView`]. The OpenAPI document is generated from these types.
//!
//! Bad input is refused with the part at fault first in the message
//! (`state: "banana" is not "running" or "stopped"`, README "JSON API"), so
//! the body's fields are read as JSON values and checked one by one rather
//! than left to serde's own messages.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::errors::ApiError;
use crate::config::{parse_idle_timeout, parse_image};
use crate::desired::{validate_user_id, DesiredState, MAX_IDLE_TIMEOUT_SECS};
use crate::image_ref::ImageRef;
use crate::quote::quote_short;
use crate::status::Phase;
use crate::store::DesiredUpdate;
use crate::view::{rfc3339, GatewayAddress, UserView};

/// The `{id}` path segment, percent-decoded and validated as a user id.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct UserId {
    /// The user id (1-128 bytes, any characters), percent-encoded.
    pub id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for UserId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("user_id", e.body_text()))?;
        validate_user_id(&id).map_err(|reason| ApiError::bad_request("user_id", reason))?;
        Ok(Self { id })
    }
}

/// A query, or 400 naming `query`.
pub(super) fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))
}

/// Body of `PUT /v1/users/{id}`: each field optional; a present `null`
/// clears `idle_timeout` / `image`, an absent field leaves the column alone.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    /// The desired state.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = DesiredState, required = false)]
    pub state: Option<Value>,
    /// Stop after this long without activity: a duration (`"30m"`),
    /// `"off"`, whole seconds (0: none), or `null` (none).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<IdleTimeoutInput>, nullable = true)]
    pub idle_timeout: Option<Value>,
    /// An image reference, or `null` for the configured default.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable = true)]
    pub image: Option<Value>,
}

/// An idle timeout as a `PUT` body gives it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum IdleTimeoutInput {
    /// A duration like `"30m"`, or `"off"`.
    Text(String),
    /// Whole seconds; 0: none.
    Seconds(u64),
}

/// Tells a present `null` (`Some(Value::Null)`) from an absent field (`None`).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl PutBody {
    /// Reads a body; an empty one changes nothing.
    pub(super) fn parse(body: &[u8]) -> Result<Self, ApiError> {
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

    /// The write this body asks for.
    pub(super) fn into_update(self, user_id: String) -> Result<DesiredUpdate, ApiError> {
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
fn image_field(value: &Value) -> Result<Option<ImageRef>, ApiError> {
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

/// Query of `GET /v1/users`; checked by hand so a bad value names its parameter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only users whose status row has this phase (pages over status rows).
    #[param(value_type = Option<Phase>)]
    pub phase: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
}

/// Query of `ensure-running`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// How long to wait for the container, e.g. `30s` (default), at most `5m`.
    pub wait: Option<String>,
}

/// Answer of `GET /v1/users`: one page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    /// The users, ordered by id.
    pub users: Vec<UserView>,
    /// The `after` of the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_after: Option<String>,
}

/// Answer of `POST /v1/users/{id}/touch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Touched {
    /// The user.
    pub user_id: String,
    /// The activity just recorded.
    #[serde(with = "rfc3339")]
    pub last_active_at: DateTime<Utc>,
}

/// Answer of `POST /v1/users/{id}/restart`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestartRequested {
    /// The user.
    pub user_id: String,
    /// The new `restart_nonce`; `null` when the row is invalid or gone.
    #[schema(required = true)]
    pub restart_nonce: Option<i64>,
}

/// Answer of a successful `ensure-running`: where the gateway answers, and
/// its plaintext token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Running {
    /// The user.
    pub user_id: String,
    /// Always `running`.
    pub phase: Phase,
    /// Where the gateway answers.
    #[serde(flatten)]
    pub gateway: GatewayAddress,
    /// The gateway token, in clear.
    pub token: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
    fn a_put_body_written_by_a_client_keeps_null_apart_from_absent() {
        let body = PutBody {
            image: Some(Value::Null),
            ..Default::default()
        };
        assert_eq!(serde_json::to_value(&body).unwrap(), json!({"image": null}));
    }
}
