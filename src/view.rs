//! How one user is shown to people and programs: the JSON object of
//! `clawfleet users show --json`, `users list --json` and the `/v1` API.
//!
//! One function renders it so the command line and the API can never drift
//! apart. The view never holds the gateway token, sealed or open: a caller
//! that must hand the token out adds it itself, on purpose.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::desired::InvalidRow;
use crate::status::ContainerStatus;
use crate::store::DesiredRow;

/// The JSON view of one user: `{"user_id", "desired", "status"}`.
///
/// `desired` is `null` when the row is gone (deleted, container being
/// removed), `{"invalid": {"field", "reason"}, "revision"}` when the row
/// fails validation, and otherwise the row with its effective state and idle
/// deadline at `now`. `status` is `null` until the controller has written a
/// status row.
pub fn user_view(
    user_id: &str,
    desired: Option<&DesiredRow>,
    status: Option<&ContainerStatus>,
    now: DateTime<Utc>,
) -> Value {
    let desired = match desired {
        Some(Ok(d)) => json!({
            "state": d.state.as_str(),
            "effective_state": d.effective_state(now).as_str(),
            "idle_timeout_secs": d.idle_timeout.map(|t| t.as_secs()),
            "idle_deadline": d.idle_deadline().map(|t| t.to_rfc3339()),
            "last_active_at": d.last_active_at.map(|t| t.to_rfc3339()),
            "image": d.image.as_ref().map(|i| i.as_str()),
            "restart_nonce": d.restart_nonce,
            "revision": d.revision,
        }),
        Some(Err(InvalidRow {
            field,
            reason,
            revision,
            ..
        })) => json!({
            "invalid": { "field": field, "reason": reason },
            "revision": revision,
        }),
        None => Value::Null,
    };
    let status = status.map(|s| {
        json!({
            "phase": s.phase.as_str(),
            "health": s.health.map(|h| h.as_str()),
            "container_id": s.container_id,
            "container_name": s.container_name,
            "host_port": s.host_port,
            "url": s.url,
            "host_url": s.host_url,
            "restarts": s.restarts,
            "observed_revision": s.observed_revision,
            "message": s.message,
            "last_transition_at": s.last_transition_at.to_rfc3339(),
        })
    });
    json!({
        "user_id": user_id,
        "desired": desired,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredContainer, DesiredState};
    use crate::status::Phase;

    fn status_with_token() -> ContainerStatus {
        let now = Utc::now();
        ContainerStatus {
            user_id: "alice".into(),
            phase: Phase::Running,
            container_id: Some("abc".into()),
            container_name: Some("mosaic-user-alice".into()),
            host_port: Some(19000),
            url: Some("http://mosaic-user-alice:18789".into()),
            host_url: Some("http://127.0.0.1:19000".into()),
            health: None,
            gateway_token: Some("v1:k:SEALED".into()),
            observed_revision: Some(3),
            message: None,
            restarts: 0,
            last_transition_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn the_view_never_holds_the_sealed_token() {
        let desired: DesiredRow = Ok(DesiredContainer {
            user_id: "alice".into(),
            state: DesiredState::Running,
            idle_timeout: None,
            last_active_at: None,
            image: None,
            restart_nonce: 0,
            revision: 3,
        });
        let view = user_view(
            "alice",
            Some(&desired),
            Some(&status_with_token()),
            Utc::now(),
        );
        let text = view.to_string();
        assert!(!text.contains("SEALED"), "{text}");
        assert!(!text.contains("token"), "{text}");
        assert_eq!(view["status"]["phase"], "running");
        assert_eq!(view["desired"]["effective_state"], "running");
    }

    #[test]
    fn a_deleted_row_shows_as_null_desired() {
        let view = user_view("alice", None, Some(&status_with_token()), Utc::now());
        assert!(view["desired"].is_null());
        assert_eq!(view["user_id"], "alice");
    }
}
