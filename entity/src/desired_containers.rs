//! `desired_containers`: what other services want, one row per user.

use sea_orm::entity::prelude::*;

/// One user's desired container, as stored.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "desired_containers")]
pub struct Model {
    /// Opaque user id, 1–128 bytes.
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
    /// `running` or `stopped`.
    pub state: String,
    /// Stop after this many seconds without activity; null or 0: never.
    pub idle_timeout_secs: Option<i64>,
    /// Last activity, bumped by services on each request.
    pub last_active_at: Option<DateTimeUtc>,
    /// Per-user image; null means the configured default.
    pub image: Option<String>,
    /// Bumped to recreate the container with fresh config.
    pub restart_nonce: i64,
    /// Assigned by the database on every insert and update.
    pub revision: i64,
    /// When the row was inserted.
    pub created_at: DateTimeUtc,
    /// When the row was last updated.
    pub updated_at: DateTimeUtc,
}

/// No relations: the tables are joined by `user_id` only in queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
