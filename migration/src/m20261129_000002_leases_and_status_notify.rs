//! The leader lease table (high availability on PostgreSQL) and, on
//! PostgreSQL, a NOTIFY on every `container_status` change so API processes
//! that do not reconcile still learn of status changes at once.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Creates `clawfleet_leases` and the status NOTIFY trigger.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261129_000002_leases_and_status_notify"
    }
}

const SQLITE_UP: &str = "
CREATE TABLE clawfleet_leases (
    instance    TEXT NOT NULL PRIMARY KEY,
    holder      TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    renewed_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);";

const SQLITE_DOWN: &str = "DROP TABLE IF EXISTS clawfleet_leases;";

const POSTGRES_UP: &str = "
CREATE TABLE clawfleet_leases (
    instance    text        NOT NULL PRIMARY KEY,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE FUNCTION clawfleet_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('clawfleet_status', clawfleet_notify_payload(OLD.user_id));
        RETURN OLD;
    END IF;
    PERFORM pg_notify('clawfleet_status', clawfleet_notify_payload(NEW.user_id));
    RETURN NEW;
END
$$;

CREATE TRIGGER container_status_changed
AFTER INSERT OR UPDATE OR DELETE ON container_status
FOR EACH ROW EXECUTE FUNCTION clawfleet_status_changed();
";

const POSTGRES_DOWN: &str = "
DROP TRIGGER IF EXISTS container_status_changed ON container_status;
DROP FUNCTION IF EXISTS clawfleet_status_changed();
DROP TABLE IF EXISTS clawfleet_leases;
";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DatabaseBackend::Sqlite => SQLITE_UP,
            _ => POSTGRES_UP,
        };
        manager.get_connection().execute_unprepared(sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DatabaseBackend::Sqlite => SQLITE_DOWN,
            _ => POSTGRES_DOWN,
        };
        manager.get_connection().execute_unprepared(sql).await?;
        Ok(())
    }
}
