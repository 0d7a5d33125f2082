//! SQLite: a writer may no longer give a row the revision the counter last
//! handed out.
//!
//! The first schema's guard accepted `revision = <current counter value>`,
//! because that is what its own trigger writes. A writer could therefore
//! change a row while keeping a revision the change feed had already seen,
//! and the change went unnoticed until the next full resync. The triggers now
//! mark the row whose revision they are assigning in `clawfleet_revision`
//! (`assigning`, cleared again in the same statement), and the guard refuses
//! every other change of `revision`.
//!
//! PostgreSQL needs nothing: its BEFORE trigger overwrites `revision` with
//! `nextval` on every INSERT and UPDATE, whatever the writer set.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Replaces the SQLite revision triggers with ones that cannot be bypassed.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000003_revision_guard"
    }
}

const SQLITE_UP: &str = "
ALTER TABLE clawfleet_revision ADD COLUMN assigning TEXT NULL;

DROP TRIGGER desired_containers_revision_on_insert;
DROP TRIGGER desired_containers_revision_on_update;
DROP TRIGGER desired_containers_revision_guard;

CREATE TRIGGER desired_containers_revision_on_insert
AFTER INSERT ON desired_containers
BEGIN
    UPDATE clawfleet_revision SET value = value + 1, assigning = NEW.user_id WHERE id = 1;
    UPDATE desired_containers
       SET revision = (SELECT value FROM clawfleet_revision WHERE id = 1)
     WHERE user_id = NEW.user_id;
    UPDATE clawfleet_revision SET assigning = NULL WHERE id = 1;
    DELETE FROM desired_deletions WHERE user_id = NEW.user_id;
END;

-- Fires for writer updates only: the trigger's own update changes revision,
-- so it never re-fires itself, even with PRAGMA recursive_triggers on.
CREATE TRIGGER desired_containers_revision_on_update
AFTER UPDATE ON desired_containers
WHEN NEW.revision IS OLD.revision
BEGIN
    UPDATE clawfleet_revision SET value = value + 1, assigning = NEW.user_id WHERE id = 1;
    UPDATE desired_containers
       SET revision = (SELECT value FROM clawfleet_revision WHERE id = 1),
           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE user_id = NEW.user_id;
    UPDATE clawfleet_revision SET assigning = NULL WHERE id = 1;
END;

-- A writer may not set revision itself, not even to the value the counter
-- last handed out: only the triggers above, for the row they are assigning.
CREATE TRIGGER desired_containers_revision_guard
BEFORE UPDATE OF revision ON desired_containers
WHEN NEW.revision IS NOT OLD.revision
 AND NOT EXISTS (
     SELECT 1 FROM clawfleet_revision
      WHERE id = 1 AND assigning IS NEW.user_id AND value IS NEW.revision)
BEGIN
    SELECT RAISE(ABORT, 'desired_containers.revision is assigned by the database');
END;
";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Sqlite {
            manager
                .get_connection()
                .execute_unprepared(SQLITE_UP)
                .await?;
        }
        Ok(())
    }

    /// Keeps the stricter triggers and their column: they work with the
    /// schema before this migration too (an older build never sets
    /// `revision`), and the first migration's `down` removes them with their
    /// tables.
    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}
