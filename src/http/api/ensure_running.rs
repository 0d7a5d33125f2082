//! `POST /v1/users/{id}/ensure-running?wait=30s`: the original service's
//! `ensureRunning`, and the wait behind it.
//!
//! It marks the user running and active now, then waits on the user's
//! status watcher (shared by every waiter of that user, see
//! [`crate::store::StatusWatch`]) until the controller reports the container
//! of that revision running, and hands out its addresses and gateway token;
//! 409 at once when the controller reports that revision failed, 504 when
//! `wait` runs out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::Utc;
use tokio::time::Instant;

use super::errors::{ApiError, ErrorBody};
use super::requests::{query, Running, UserId, WaitQuery};
use super::{DEFAULT_WAIT, MAX_WAIT};
use crate::config::parse_duration;
use crate::desired::{quote_short, DesiredState};
use crate::http::AppState;
use crate::status::{ContainerStatus, Health, Phase};
use crate::store::{DesiredUpdate, StatusSnapshot, StoreError};
use crate::view::GatewayAddress;

/// How far apart the clocks of an API process and the leader may be: an idle
/// deadline closer than this counts as possibly passed.
const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// `wait`: a duration up to [`MAX_WAIT`], [`DEFAULT_WAIT`] when absent.
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

/// `POST /v1/users/{id}/ensure-running?wait=30s`.
#[utoipa::path(
    post,
    path = "/users/{id}/ensure-running",
    summary = "Set the user running and active now, and wait until its container runs",
    params(UserId, WaitQuery),
    responses(
        (status = 200, description = "Running: addresses and the gateway token", body = Running),
        (status = 400, description = "A bad parameter (`wait` over 5m)", body = ErrorBody),
        (status = 409, description = "The controller reports this revision failed", body = ErrorBody),
        (status = 504, description = "Not running within `wait`; the phase last seen", body = ErrorBody),
    )
)]
pub(super) async fn ensure_running(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
    params: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Running>, ApiError> {
    let wait = wait_param(query(params)?.wait.as_deref())?;
    let deadline = Instant::now() + wait;
    // Joined before the write, so no status change after it is missed.
    let mut watch = state.store.watch_status(&id);
    let before = state.store.desired(&id).await?.and_then(Result::ok);
    let revision_before = before.as_ref().map(|b| b.revision);
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
    // A mere touch is left to the feed, which spaces activity storms.
    if revision_before != Some(revision) {
        state.nudge.user(&id);
    }
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
fn running_answer(state: &AppState, status: &ContainerStatus) -> Result<Running, ApiError> {
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
    Ok(Running {
        user_id: status.user_id.clone(),
        phase: status.phase,
        gateway: GatewayAddress::of(status),
        token: token.expose().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
