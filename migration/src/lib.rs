//! Schema migrations for clawfleet, on SQLite and PostgreSQL.
//!
//! The schema is written as plain SQL per backend (`src/sql/`) rather than
//! through the schema builder, because its heart is a pair of database-side
//! triggers that sea-query cannot express: every INSERT and UPDATE of
//! `desired_containers`, by any writer in any language, gets a `revision`
//! above every earlier one, and every DELETE leaves a tombstone in
//! `desired_deletions` with a revision from the same counter. On PostgreSQL
//! the triggers also `pg_notify('clawfleet_desired', user_id)`.

pub use sea_orm_migration::prelude::*;

mod m20261129_000001_create_tables;
mod m20261129_000002_leases_and_status_notify;
mod m20261130_000003_revision_guard;
mod m20261130_000004_status_node;

/// The NOTIFY channel the PostgreSQL triggers signal on; the payload is the user id
/// (empty when the id is too long for a notification payload).
pub const NOTIFY_CHANNEL: &str = "clawfleet_desired";

/// The NOTIFY channel on which PostgreSQL announces `container_status` changes (payload: user id).
pub const STATUS_NOTIFY_CHANNEL: &str = "clawfleet_status";

/// All of clawfleet's migrations, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261129_000001_create_tables::Migration),
            Box::new(m20261129_000002_leases_and_status_notify::Migration),
            Box::new(m20261130_000003_revision_guard::Migration),
            Box::new(m20261130_000004_status_node::Migration),
        ]
    }
}
