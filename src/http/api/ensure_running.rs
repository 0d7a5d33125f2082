//! `POST /v1/users/{id}/ensure-running?wait=30s`: the original service's
//! `ensureRunning`, and the wait behind it.
//!
//! It marks the user running and active now, then waits on the user's
//! status watcher (shared by every waiter of that user, see
//! [`crate::store::StatusWatch`]) until the controller reports the container
//! of that revision started, probes the gateway on its published port every
//! 50 ms until it answers ([`crate::probe`]), and hands out its addresses and
//! gateway token; 409 at once when the controller reports that revision
//! failed, 504 when `wait` runs out. Docker's health status is not waited
//! for: its first probe comes one full `interval` after start.

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
use crate::desired::DesiredState;
use crate::http::AppState;
use crate::probe::{GatewayProbe, ATTEMPT_INTERVAL};
use crate::quote::quote_short;
use crate::status::{ContainerStatus, Phase};
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

/// The published port of the container of revision `revision` (or later)
/// when `status` shows it started: the gateway is then probed.
fn started_port(status: &ContainerStatus, revision: i64) -> Option<u16> {
    (status.phase == Phase::Running
        && status.container_id.is_some()
        && status.observed_revision.is_some_and(|r| r >= revision))
    .then_some(status.host_port)
    .flatten()
}

/// Probes the gateway on `port` every [`ATTEMPT_INTERVAL`] until it answers
/// (`Ok`) or `deadline` passes (the last attempt's error).
async fn until_answers(probe: &GatewayProbe, port: u16, deadline: Instant) -> Result<(), String> {
    loop {
        let attempt = tokio::time::timeout_at(deadline, probe.attempt(port)).await;
        match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) if Instant::now() + ATTEMPT_INTERVAL < deadline => {
                tokio::time::sleep(ATTEMPT_INTERVAL).await;
            }
            Ok(Err(why)) => return Err(why),
            Err(_) => return Err("no answer before the wait ran out".into()),
        }
    }
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
                    if let Some(port) = started_port(status, revision) {
                        tokio::select! {
                            answered = until_answers(&state.gateway_probe, port, deadline) => {
                                return match answered {
                                    Ok(()) => running_answer(&state, status).map(Json),
                                    Err(why) => Err(ApiError::Timeout {
                                        user: quote_short(&id),
                                        waited: wait,
                                        phase: Some(status.phase),
                                        status_message: Some(format!(
                                            "the container runs but its gateway did not answer {} on port {port}: {why}",
                                            state.gateway_probe.kind
                                        )),
                                    }),
                                };
                            }
                            // A new status (stopped, failed, recreated): judge it afresh.
                            _ = watch.changed() => continue,
                        }
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
