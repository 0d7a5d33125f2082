//! The observed state the controller reports for one user: the vocabulary of
//! `container_status`.

use std::fmt;

use chrono::{DateTime, Utc};

use crate::docker::ContainerHealth;

/// Where a user's container is in its life, as written to `container_status.phase`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Seen, nothing done yet.
    Pending,
    /// Creating the container (and its volume, network, image).
    Creating,
    /// Created or stopped, being started.
    Starting,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped because the row says `stopped`.
    Stopped,
    /// Stopped because the idle deadline passed.
    Idle,
    /// Needs a human: bad row, missing or disallowed image, configuration error.
    Failed,
    /// Being removed because the row was deleted.
    Removing,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Creating,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Idle,
        Phase::Failed,
        Phase::Removing,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Creating => "creating",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Idle => "idle",
            Self::Failed => "failed",
            Self::Removing => "removing",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Docker's health status of a container with a health check.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Within the start period, or no result yet.
    Starting,
    /// The last checks passed.
    Healthy,
    /// The checks failed `retries` times in a row.
    Unhealthy,
}

impl Health {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }

    /// The health to report for a container the engine reports as `health`;
    /// `None` for one without a health check.
    pub fn of_container(health: ContainerHealth) -> Option<Self> {
        match health {
            ContainerHealth::None => None,
            ContainerHealth::Starting => Some(Self::Starting),
            ContainerHealth::Healthy => Some(Self::Healthy),
            ContainerHealth::Unhealthy => Some(Self::Unhealthy),
        }
    }

    /// Parses the stored name; anything else is no health.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "starting" => Some(Self::Starting),
            "healthy" => Some(Self::Healthy),
            "unhealthy" => Some(Self::Unhealthy),
            _ => None,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user's row of `container_status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    /// The user.
    pub user_id: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Docker's container id.
    pub container_id: Option<String>,
    /// Docker's container name.
    pub container_name: Option<String>,
    /// Published gateway port.
    pub host_port: Option<u16>,
    /// `http://<container name>:18789` on the agents' network.
    pub url: Option<String>,
    /// `http://<publish ip>:<host port>`.
    pub host_url: Option<String>,
    /// Docker health.
    pub health: Option<Health>,
    /// Sealed gateway token.
    pub gateway_token: Option<String>,
    /// The desired revision last acted on.
    pub observed_revision: Option<i64>,
    /// Last error or reason; `None` when fine.
    pub message: Option<String>,
    /// Restarts of crashed or unhealthy containers.
    pub restarts: i64,
    /// When `phase` last changed.
    pub last_transition_at: DateTime<Utc>,
    /// When the row was last written.
    pub updated_at: DateTime<Utc>,
    /// The cluster node holding the user's state volume, where the Swarm
    /// backend pins them; `None` on the Docker backend and before a first run.
    pub node: Option<String>,
}

impl ContainerStatus {
    /// A `pending` row for `user_id` with nothing known yet: where a
    /// reconcile starts for a user without a row.
    pub fn pending(user_id: &str, now: DateTime<Utc>) -> Self {
        Self {
            user_id: user_id.to_owned(),
            phase: Phase::Pending,
            container_id: None,
            container_name: None,
            host_port: None,
            url: None,
            host_url: None,
            health: None,
            gateway_token: None,
            observed_revision: None,
            message: None,
            restarts: 0,
            last_transition_at: now,
            updated_at: now,
            node: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_its_name() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
        assert_eq!(Phase::parse("Running"), None);
    }

    #[test]
    fn docker_health_names_parse_and_none_means_no_check() {
        assert_eq!(Health::parse("healthy"), Some(Health::Healthy));
        assert_eq!(Health::parse("none"), None);
    }

    #[test]
    fn an_engine_health_maps_to_the_same_reported_health_and_none_to_none() {
        assert_eq!(Health::of_container(ContainerHealth::None), None);
        for health in [Health::Starting, Health::Healthy, Health::Unhealthy] {
            let engine = ContainerHealth::parse(health.as_str());
            assert_eq!(Health::of_container(engine), Some(health));
        }
    }
}
