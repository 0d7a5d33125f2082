//! How one user is shown to people and programs: the JSON object of
//! `clawfleet users show --json`, `users list --json` and the `/v1` API.
//!
//! One set of types renders it so the command line and the API can never
//! drift apart, and the API's OpenAPI document describes the same types. The view never holds the gateway token, sealed or open: a caller
//! that must hand the token out adds it itself, on purpose.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::desired::{DesiredState, InvalidRow};
use crate::status::{ContainerStatus, Health, Phase};
use crate::store::{ControllerSeen, DesiredRow, UserRows};

/// The JSON view of one user: `{"user_id", "desired", "status"}`.
///
/// `desired` is `null` when the row is gone (deleted, container being
/// removed); `status` is `null` until the controller has written a status
/// row. Both keys are always present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    /// The user id.
    pub user_id: String,
    /// The desired row; `null` once it is deleted.
    #[schema(required = true)]
    pub desired: Option<DesiredView>,
    /// What the controller reports; `null` until it has reconciled the user.
    #[schema(required = true)]
    pub status: Option<StatusView>,
    /// Present only when no controller has written for longer than it
    /// promised (stopped, died, or cut off from the database): `status` may
    /// then be out of date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub controller: Option<ControllerView>,
}

/// The controller as readers last heard of it, shown when it went quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ControllerView {
    /// When a controller of this instance last wrote its heartbeat.
    #[serde(with = "rfc3339")]
    pub last_seen: DateTime<Utc>,
    /// True: no controller has written since longer than it promised.
    pub stale: bool,
}

impl ControllerView {
    /// What the views say about `seen`: nothing while the controller is
    /// fresh or none ever ran (a new database), the last sighting once stale.
    pub fn of(seen: Option<ControllerSeen>) -> Option<Self> {
        seen.filter(|s| s.stale).map(|s| Self {
            last_seen: s.last_seen,
            stale: true,
        })
    }

    /// The warning line `users list` and `users show` print above the user(s).
    pub fn warning(&self, instance: &str) -> String {
        format!(
            "! no controller of instance {} has written since {}: the status below may be out of date (is `clawfleet run` running?)",
            crate::quote::quote_short(instance),
            self.last_seen.to_rfc3339()
        )
    }
}

/// A desired row as shown: valid, or why it is invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DesiredView {
    /// A row that passes validation.
    Valid(ValidDesiredView),
    /// A row that fails validation.
    Invalid(InvalidDesiredView),
}

/// A valid desired row with its effective state and idle deadline at the
/// time it was shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ValidDesiredView {
    /// The `state` column.
    pub state: DesiredState,
    /// `state`, after idleness: `stopped` once the idle deadline has passed.
    pub effective_state: DesiredState,
    /// The idle timeout in seconds; `null`: none.
    #[schema(required = true)]
    pub idle_timeout_secs: Option<u64>,
    /// When idleness stops the container; `null`: never.
    #[serde(with = "rfc3339::option")]
    #[schema(required = true)]
    pub idle_deadline: Option<DateTime<Utc>>,
    /// The last recorded activity; `null`: never.
    #[serde(with = "rfc3339::option")]
    #[schema(required = true)]
    pub last_active_at: Option<DateTime<Utc>>,
    /// The user's image; `null`: the configured default.
    #[schema(required = true)]
    pub image: Option<String>,
    /// Bumped to ask for a recreate with fresh configuration.
    pub restart_nonce: i64,
    /// The row's revision (assigned by the database on every write).
    pub revision: i64,
}

/// An invalid desired row: the field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvalidDesiredView {
    /// What is wrong with the row.
    pub invalid: InvalidField,
    /// The row's revision.
    pub revision: i64,
}

/// The field of an invalid row at fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvalidField {
    /// The column.
    pub field: String,
    /// What is wrong, in words.
    pub reason: String,
}

/// The status row as shown: everything but the gateway token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// Where the container is in its life.
    pub phase: Phase,
    /// Docker's health status; `null` without a health check.
    #[schema(required = true)]
    pub health: Option<Health>,
    /// The container's id.
    #[schema(required = true)]
    pub container_id: Option<String>,
    /// Where the container's gateway answers.
    #[serde(flatten)]
    pub gateway: GatewayAddress,
    /// How often the controller restarted the container.
    pub restarts: i64,
    /// The desired revision this status reflects.
    #[schema(required = true)]
    pub observed_revision: Option<i64>,
    /// Why the phase is what it is, in words.
    #[schema(required = true)]
    pub message: Option<String>,
    /// When the phase last changed.
    #[serde(with = "rfc3339")]
    pub last_transition_at: DateTime<Utc>,
    /// The Swarm node holding the user's state volume, where they are
    /// pinned; `null` on the Docker backend and before a first run.
    #[schema(required = true)]
    pub node: Option<String>,
}

/// Where a user's gateway answers; each part `null` until known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GatewayAddress {
    /// The container's name.
    #[schema(required = true)]
    pub container_name: Option<String>,
    /// The published host port.
    #[schema(required = true)]
    pub host_port: Option<u16>,
    /// The gateway's address on the agent network.
    #[schema(required = true)]
    pub url: Option<String>,
    /// The gateway's address on the host.
    #[schema(required = true)]
    pub host_url: Option<String>,
}

impl GatewayAddress {
    /// The address a status row reports.
    pub fn of(s: &ContainerStatus) -> Self {
        Self {
            container_name: s.container_name.clone(),
            host_port: s.host_port,
            url: s.url.clone(),
            host_url: s.host_url.clone(),
        }
    }
}

impl UserView {
    /// The view of one user at `now`.
    pub fn new(
        user_id: &str,
        desired: Option<&DesiredRow>,
        status: Option<&ContainerStatus>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            user_id: user_id.to_owned(),
            desired: desired.map(|row| DesiredView::new(row, now)),
            status: status.map(StatusView::new),
            controller: None,
        }
    }

    /// The view, saying what [`ControllerView::of`] says about the controller.
    pub fn with_controller(mut self, controller: Option<ControllerView>) -> Self {
        self.controller = controller;
        self
    }

    /// The view of a user's joined rows at `now`.
    pub fn of(rows: &UserRows, now: DateTime<Utc>) -> Self {
        Self::new(
            &rows.user_id,
            rows.desired.as_ref(),
            rows.status.as_ref(),
            now,
        )
    }
}

impl DesiredView {
    fn new(row: &DesiredRow, now: DateTime<Utc>) -> Self {
        match row {
            Ok(d) => Self::Valid(ValidDesiredView {
                state: d.state,
                effective_state: d.intent(now).state(),
                idle_timeout_secs: d.idle_timeout.map(|t| t.as_secs()),
                idle_deadline: d.idle_deadline(),
                last_active_at: d.last_active_at,
                image: d.image.as_ref().map(|i| i.as_str().to_owned()),
                restart_nonce: d.restart_nonce,
                revision: d.revision,
            }),
            Err(InvalidRow {
                field,
                reason,
                revision,
                ..
            }) => Self::Invalid(InvalidDesiredView {
                invalid: InvalidField {
                    field: (*field).to_owned(),
                    reason: reason.clone(),
                },
                revision: *revision,
            }),
        }
    }
}

impl StatusView {
    fn new(s: &ContainerStatus) -> Self {
        Self {
            phase: s.phase,
            health: s.health,
            container_id: s.container_id.clone(),
            gateway: GatewayAddress::of(s),
            restarts: s.restarts,
            observed_revision: s.observed_revision,
            message: s.message.clone(),
            last_transition_at: s.last_transition_at,
            node: s.node.clone(),
        }
    }
}

/// Timestamps as RFC 3339 text with a `+00:00` offset, the form the views
/// have always had (serde's default for chrono writes `Z`).
pub mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `at` as RFC 3339.
    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&at.to_rfc3339())
    }

    /// Reads RFC 3339 text with any offset.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }

    /// The same for an optional timestamp (`null` for none).
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `at` as RFC 3339, or `null`.
        pub fn serialize<S: Serializer>(
            at: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => super::serialize(at, s),
                None => s.serialize_none(),
            }
        }

        /// Reads RFC 3339 text or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| {
                    DateTime::parse_from_rfc3339(&text)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
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
            node: None,
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
        let view = serde_json::to_value(UserView::new(
            "alice",
            Some(&desired),
            Some(&status_with_token()),
            Utc::now(),
        ))
        .unwrap();
        let text = view.to_string();
        assert!(!text.contains("SEALED"), "{text}");
        assert!(!text.contains("token"), "{text}");
        assert_eq!(view["status"]["phase"], "running");
        assert_eq!(view["desired"]["effective_state"], "running");
    }

    #[test]
    fn a_deleted_row_shows_as_null_desired() {
        let view = serde_json::to_value(UserView::new(
            "alice",
            None,
            Some(&status_with_token()),
            Utc::now(),
        ))
        .unwrap();
        assert!(view["desired"].is_null());
        assert_eq!(view["user_id"], "alice");
    }

    #[test]
    fn absent_values_are_null_keys_and_timestamps_keep_their_offset_form() {
        let at = "2026-01-02T03:04:05+00:00"
            .parse::<DateTime<Utc>>()
            .unwrap();
        let desired: DesiredRow = Ok(DesiredContainer {
            user_id: "alice".into(),
            state: DesiredState::Running,
            idle_timeout: None,
            last_active_at: Some(at),
            image: None,
            restart_nonce: 2,
            revision: 3,
        });
        let view = UserView::new("alice", Some(&desired), None, at);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "user_id": "alice",
                "desired": {
                    "state": "running",
                    "effective_state": "running",
                    "idle_timeout_secs": null,
                    "idle_deadline": null,
                    "last_active_at": "2026-01-02T03:04:05+00:00",
                    "image": null,
                    "restart_nonce": 2,
                    "revision": 3,
                },
                "status": null,
            })
        );
        assert_eq!(serde_json::from_value::<UserView>(json).unwrap(), view);
    }

    #[test]
    fn an_invalid_row_shows_its_field_and_reason() {
        let invalid: DesiredRow = Err(InvalidRow {
            user_id: "alice".into(),
            field: "state",
            reason: "banana".into(),
            revision: 7,
        });
        let view = UserView::new(
            "alice",
            Some(&invalid),
            Some(&status_with_token()),
            Utc::now(),
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json["desired"],
            serde_json::json!({"invalid": {"field": "state", "reason": "banana"}, "revision": 7})
        );
        assert_eq!(serde_json::from_value::<UserView>(json).unwrap(), view);
    }

    #[test]
    fn phases_health_and_states_go_over_the_wire_as_their_stored_names() {
        let name = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for phase in Phase::ALL {
            assert_eq!(name(serde_json::to_value(phase).unwrap()), phase.as_str());
        }
        for health in [Health::Starting, Health::Healthy, Health::Unhealthy] {
            assert_eq!(name(serde_json::to_value(health).unwrap()), health.as_str());
        }
        for state in [DesiredState::Running, DesiredState::Stopped] {
            assert_eq!(name(serde_json::to_value(state).unwrap()), state.as_str());
        }
    }
}
