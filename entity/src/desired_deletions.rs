//! `desired_deletions`: one tombstone per deleted user id, written by the
//! database's delete trigger so a poller can see deletions after the fact.

use sea_orm::entity::prelude::*;

/// A deleted desired row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "desired_deletions")]
pub struct Model {
    /// The user whose desired row was deleted.
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
    /// Revision assigned to the deletion, from the same counter as inserts and updates.
    pub revision: i64,
    /// When the row was deleted.
    pub deleted_at: DateTimeUtc,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
