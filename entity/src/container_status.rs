//! `container_status`: what the controller observed, one row per user.

use sea_orm::entity::prelude::*;

/// One user's observed container, as written by the controller.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "container_status")]
pub struct Model {
    /// The user this status belongs to.
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
    /// pending, creating, starting, running, stopping, stopped, idle, failed, removing.
    pub phase: String,
    /// Docker's container id.
    pub container_id: Option<String>,
    /// Docker's container name.
    pub container_name: Option<String>,
    /// Published gateway port on the host; unique among rows.
    pub host_port: Option<i32>,
    /// Gateway URL on the agents' network.
    pub url: Option<String>,
    /// Gateway URL on the host.
    pub host_url: Option<String>,
    /// Docker health status: starting, healthy, unhealthy, or null.
    pub health: Option<String>,
    /// Sealed gateway token (`v1:<key id>:<base64>`), generated once per user.
    pub gateway_token: Option<String>,
    /// The desired revision last acted on.
    pub observed_revision: Option<i64>,
    /// Last error or reason; null when fine.
    pub message: Option<String>,
    /// Times the controller restarted a crashed or unhealthy container.
    pub restarts: i64,
    /// When `phase` last changed.
    pub last_transition_at: DateTimeUtc,
    /// When the row was last written.
    pub updated_at: DateTimeUtc,
    /// The cluster node holding the user's state volume (Swarm backend); null otherwise.
    pub node: Option<String>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
