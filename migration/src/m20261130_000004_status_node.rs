//! `container_status.node`: the cluster node that holds a user's state
//! volume, recorded when their agent first runs on the Swarm backend, so it
//! is pinned there from then on (README "Running on Docker Swarm"). Null on
//! the Docker backend and for users that never ran.
//!
//! Adding a nullable column is the same statement on both databases, and
//! neither rewrites the table for it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

/// Adds `container_status.node`.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000004_status_node"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE container_status ADD COLUMN node TEXT NULL")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE container_status DROP COLUMN node")
            .await?;
        Ok(())
    }
}
