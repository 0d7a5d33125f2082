//! The desired/status tables, the revision triggers and the deletion log.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Creates `desired_containers`, `desired_deletions`, `container_status` and
/// the triggers that keep `revision` rising.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261129_000001_create_tables"
    }
}

fn scripts(backend: DatabaseBackend) -> Result<(&'static str, &'static str), DbErr> {
    match backend {
        DatabaseBackend::Sqlite => Ok((
            include_str!("sql/sqlite_up.sql"),
            include_str!("sql/sqlite_down.sql"),
        )),
        DatabaseBackend::Postgres => Ok((
            include_str!("sql/postgres_up.sql"),
            include_str!("sql/postgres_down.sql"),
        )),
        other => Err(DbErr::Migration(format!(
            "clawfleet supports SQLite and PostgreSQL, not {other:?}"
        ))),
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let (up, _) = scripts(manager.get_database_backend())?;
        manager.get_connection().execute_unprepared(up).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let (_, down) = scripts(manager.get_database_backend())?;
        manager.get_connection().execute_unprepared(down).await?;
        Ok(())
    }
}
