//! Reads and writes of `desired_containers` and its deletion log.
//!
//! Reads decode column by column into [`RawValue`]s and validate afterwards,
//! so a row holding text in an integer column (SQLite allows it) or a broken
//! timestamp becomes an [`InvalidRow`] while every other row still reads.
//! Writes go through the same SQL any other service would use; the database
//! triggers assign `revision`.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{
    Asterisk, Expr, IntoTableRef, OnConflict, Order, Query, SelectStatement, SimpleExpr, UnionType,
};
use sea_orm::{ConnectionTrait, DatabaseBackend, ExprTrait, QueryResult, Statement, Value};

use clawfleet_entity::{desired_containers as desired, desired_deletions as deletions};

use super::{Store, StoreError};
use crate::desired::{
    validate, validate_user_id, DesiredContainer, DesiredState, InvalidRow, RawDesiredRow, RawValue,
};
use crate::image_ref::ImageRef;

/// A desired row after validation: the container it asks for, or why it is invalid.
pub type DesiredRow = Result<DesiredContainer, InvalidRow>;

/// A user whose desired row changed (inserted, updated or deleted) at `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredChange {
    /// The user.
    pub user_id: String,
    /// The revision of the change.
    pub revision: i64,
    /// True when the change was a deletion.
    pub deleted: bool,
}

/// A write to one user's desired row; `None` fields are left as they are
/// (or take the column default on insert).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredUpdate {
    /// The user.
    pub user_id: String,
    /// New `state`.
    pub state: Option<DesiredState>,
    /// New idle timeout in seconds: `Some(None)` clears it.
    pub idle_timeout_secs: Option<Option<u64>>,
    /// New image: `Some(None)` returns to the configured default.
    pub image: Option<Option<ImageRef>>,
    /// Set `last_active_at` to this instant.
    pub touch: Option<DateTime<Utc>>,
}

/// Columns a writer may fill with anything (SQLite does not enforce types).
const LENIENT: [&str; 5] = [
    "state",
    "idle_timeout_secs",
    "last_active_at",
    "image",
    "restart_nonce",
];

/// The value a timestamp is written as: RFC 3339 text with `Z` on SQLite,
/// `timestamptz` on PostgreSQL.
pub(crate) fn timestamp_value(backend: DatabaseBackend, at: DateTime<Utc>) -> Value {
    match backend {
        DatabaseBackend::Sqlite => at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string().into(),
        _ => at.into(),
    }
}

/// Decodes one column as whatever the database holds, never failing.
///
/// SQLite stores any type in any column, and a driver's view of a value can
/// follow the declared column type rather than what is stored, so SQLite
/// queries select `typeof(c)` and `CAST(c AS TEXT)` and the value is rebuilt
/// from those. PostgreSQL enforces the schema's types, which are read directly.
fn raw_value(row: &QueryResult, backend: DatabaseBackend, column: &str) -> RawValue {
    if backend == DatabaseBackend::Sqlite {
        let kind = row
            .try_get::<Option<String>>("", &format!("{column}__type"))
            .ok()
            .flatten();
        let text = row
            .try_get::<Option<String>>("", &format!("{column}__text"))
            .ok()
            .flatten();
        return match (kind.as_deref(), text) {
            (Some("integer"), Some(t)) => t.parse().map_or(RawValue::Text(t), RawValue::Integer),
            (Some("real"), Some(t)) => t.parse().map_or(RawValue::Text(t), RawValue::Real),
            (Some("text"), Some(t)) => RawValue::Text(t),
            (Some("blob"), _) | (Some("text"), None) => RawValue::Blob(
                row.try_get::<Option<i64>>("", &format!("{column}__len"))
                    .ok()
                    .flatten()
                    .unwrap_or(0) as usize,
            ),
            _ => RawValue::Null,
        };
    }
    if let Ok(v) = row.try_get::<Option<i64>>("", column) {
        return v.map_or(RawValue::Null, RawValue::Integer);
    }
    if let Ok(v) = row.try_get::<Option<String>>("", column) {
        return v.map_or(RawValue::Null, RawValue::Text);
    }
    if let Ok(v) = row.try_get::<Option<DateTime<Utc>>>("", column) {
        return v.map_or(RawValue::Null, RawValue::Timestamp);
    }
    RawValue::Null
}

/// Decodes a row into a [`DesiredRow`]; `None` when even the key cannot be
/// read (a user id that is not text), which no status can be written for.
fn decode_row(row: &QueryResult, backend: DatabaseBackend) -> Option<DesiredRow> {
    let user_id = row.try_get::<String>("", "user_id").ok()?;
    let revision = row.try_get::<i64>("", "revision").ok()?;
    let raw = RawDesiredRow {
        user_id,
        state: raw_value(row, backend, "state"),
        idle_timeout_secs: raw_value(row, backend, "idle_timeout_secs"),
        last_active_at: raw_value(row, backend, "last_active_at"),
        image: raw_value(row, backend, "image"),
        restart_nonce: raw_value(row, backend, "restart_nonce"),
        revision,
    };
    Some(validate(raw))
}

fn decode_rows(rows: &[QueryResult], backend: DatabaseBackend) -> Vec<DesiredRow> {
    let rows: Vec<_> = rows.iter().map(|r| decode_row(r, backend)).collect();
    let undecodable = rows.iter().filter(|r| r.is_none()).count();
    if undecodable > 0 {
        tracing::warn!(
            rows = undecodable,
            "desired rows skipped: user_id or revision is not readable as text/integer"
        );
    }
    rows.into_iter().flatten().collect()
}

fn select_desired(backend: DatabaseBackend) -> SelectStatement {
    let mut select = Query::select();
    select
        .from(desired::Entity)
        .columns(["user_id", "revision"]);
    for column in LENIENT {
        if backend == DatabaseBackend::Sqlite {
            select
                .expr_as(
                    Expr::cust(format!("typeof({column})")),
                    format!("{column}__type"),
                )
                .expr_as(
                    Expr::cust(format!("CAST({column} AS TEXT)")),
                    format!("{column}__text"),
                )
                .expr_as(
                    Expr::cust(format!("length({column})")),
                    format!("{column}__len"),
                );
        } else {
            select.column(column);
        }
    }
    select
}

impl Store {
    /// One user's desired row, validated; `None` when there is no row.
    pub async fn desired(&self, user_id: &str) -> Result<Option<DesiredRow>, StoreError> {
        let select = select_desired(self.backend())
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        let row = self
            .db
            .query_one(&select)
            .await
            .map_err(StoreError::query("read of desired row"))?;
        Ok(row.as_ref().and_then(|r| decode_row(r, self.backend())))
    }

    /// All desired rows, ordered by user id.
    pub async fn desired_all(&self) -> Result<Vec<DesiredRow>, StoreError> {
        let select = select_desired(self.backend())
            .order_by("user_id", Order::Asc)
            .to_owned();
        let rows = self
            .db
            .query_all(&select)
            .await
            .map_err(StoreError::query("read of all desired rows"))?;
        Ok(decode_rows(&rows, self.backend()))
    }

    /// Up to `limit` desired rows with user id after `after`, ordered by user id.
    pub async fn desired_page(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<DesiredRow>, StoreError> {
        let mut select = select_desired(self.backend());
        if let Some(after) = after {
            select.and_where(Expr::col("user_id").gt(after));
        }
        select.order_by("user_id", Order::Asc).limit(limit);
        let rows = self
            .db
            .query_all(&select)
            .await
            .map_err(StoreError::query("read of a page of desired rows"))?;
        Ok(decode_rows(&rows, self.backend()))
    }

    /// The desired rows of the given users (those that have one), ordered by user id.
    pub async fn desired_of(&self, user_ids: &[String]) -> Result<Vec<DesiredRow>, StoreError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let select = select_desired(self.backend())
            .and_where(Expr::col("user_id").is_in(user_ids.iter().cloned()))
            .order_by("user_id", Order::Asc)
            .to_owned();
        let rows = self
            .db
            .query_all(&select)
            .await
            .map_err(StoreError::query("read of desired rows by user"))?;
        Ok(decode_rows(&rows, self.backend()))
    }

    /// Ids of every user with a desired row.
    pub async fn desired_user_ids(&self) -> Result<Vec<String>, StoreError> {
        let select = Query::select()
            .column("user_id")
            .from(desired::Entity)
            .to_owned();
        let rows = self
            .db
            .query_all(&select)
            .await
            .map_err(StoreError::query("read of desired user ids"))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String>("", "user_id").ok())
            .collect())
    }

    /// Changes (inserts, updates, deletions) with a revision above `after` or
    /// in `also` (revisions seen missing earlier, which a slower transaction
    /// may since have committed), ordered by revision, at most `limit`.
    pub async fn desired_changes(
        &self,
        after: i64,
        also: &[i64],
        limit: u64,
    ) -> Result<Vec<DesiredChange>, StoreError> {
        let filter = |column: &'static str| -> SimpleExpr {
            let newer = Expr::col(column).gt(after);
            if also.is_empty() {
                newer
            } else {
                newer.or(Expr::col(column).is_in(also.iter().copied()))
            }
        };
        // One statement, so one snapshot: read in two, an insert and a
        // deletion committed between the reads would come back as just the
        // deletion, and the cursor would move past the insert for good.
        let side = |table, deleted: bool| {
            let page = Query::select()
                .columns(["user_id", "revision"])
                .expr_as(Expr::val(i32::from(deleted)), "deleted")
                .from(table)
                .and_where(filter("revision"))
                .order_by("revision", Order::Asc)
                .limit(limit)
                .to_owned();
            Query::select()
                .column(Asterisk)
                .from_subquery(page, if deleted { "d" } else { "u" })
                .to_owned()
        };
        let both = side(desired::Entity.into_table_ref(), false)
            .union(
                UnionType::All,
                side(deletions::Entity.into_table_ref(), true),
            )
            .to_owned();
        let rows = self
            .db
            .query_all(&both)
            .await
            .map_err(StoreError::query("read of desired changes"))?;
        let mut changes: Vec<DesiredChange> = rows
            .iter()
            .filter_map(|r| {
                Some(DesiredChange {
                    user_id: r.try_get("", "user_id").ok()?,
                    revision: r.try_get("", "revision").ok()?,
                    deleted: r.try_get::<i32>("", "deleted").ok()? != 0,
                })
            })
            .collect();
        changes.sort_by_key(|c| c.revision);
        // Each side was cut at `limit`; beyond the smaller cut the merge may miss rows.
        changes.truncate(limit as usize);
        Ok(changes)
    }

    /// The revision of the user's deletion tombstone, if the row was deleted.
    pub async fn deleted_revision(&self, user_id: &str) -> Result<Option<i64>, StoreError> {
        let select = Query::select()
            .column("revision")
            .from(deletions::Entity)
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        let row = self
            .db
            .query_one(&select)
            .await
            .map_err(StoreError::query("read of deletion tombstone"))?;
        Ok(row.and_then(|r| r.try_get::<i64>("", "revision").ok()))
    }

    /// The highest revision handed out so far (0 on an empty database).
    pub async fn max_revision(&self) -> Result<i64, StoreError> {
        let sql = "SELECT MAX(r) AS max_revision FROM (\
                   SELECT MAX(revision) AS r FROM desired_containers \
                   UNION ALL SELECT MAX(revision) AS r FROM desired_deletions) AS revisions";
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.backend(), sql))
            .await
            .map_err(StoreError::query("read of the latest revision"))?;
        Ok(row
            .and_then(|r| r.try_get::<Option<i64>>("", "max_revision").ok().flatten())
            .unwrap_or(0))
    }

    /// Inserts or updates one user's desired row with the given fields.
    pub async fn upsert_desired(&self, update: &DesiredUpdate) -> Result<(), StoreError> {
        self.write_desired(update, true).await.map(drop)
    }

    /// Inserts one user's desired row with the given fields unless the user
    /// has one already (then nothing is written). True when it inserted.
    pub async fn insert_desired(&self, update: &DesiredUpdate) -> Result<bool, StoreError> {
        self.write_desired(update, false).await
    }

    /// An INSERT of `update`'s fields; on a user that has a row, those
    /// fields are updated when `update_existing`, else nothing is written.
    /// True when a row was inserted or updated.
    async fn write_desired(
        &self,
        update: &DesiredUpdate,
        update_existing: bool,
    ) -> Result<bool, StoreError> {
        validate_user_id(&update.user_id).map_err(|reason| StoreError::Invalid {
            field: "user_id",
            reason,
        })?;
        let backend = self.backend();
        let mut columns = vec![desired::Column::UserId];
        let mut values: Vec<SimpleExpr> = vec![update.user_id.clone().into()];
        if let Some(state) = update.state {
            columns.push(desired::Column::State);
            values.push(state.as_str().into());
        }
        if let Some(timeout) = update.idle_timeout_secs {
            columns.push(desired::Column::IdleTimeoutSecs);
            values.push(timeout.map(|s| s as i64).into());
        }
        if let Some(image) = &update.image {
            columns.push(desired::Column::Image);
            values.push(image.as_ref().map(|i| i.as_str().to_owned()).into());
        }
        if let Some(at) = update.touch {
            columns.push(desired::Column::LastActiveAt);
            values.push(timestamp_value(backend, at).into());
        }
        let on_conflict = if update_existing && columns.len() > 1 {
            OnConflict::column(desired::Column::UserId)
                .update_columns(columns[1..].iter().copied())
                .to_owned()
        } else {
            OnConflict::column(desired::Column::UserId)
                .do_nothing()
                .to_owned()
        };
        let insert = Query::insert()
            .into_table(desired::Entity)
            .columns(columns)
            .values_panic(values)
            .on_conflict(on_conflict)
            .to_owned();
        let result = self
            .db
            .execute(&insert)
            .await
            .map_err(StoreError::query("write of desired row"))?;
        Ok(result.rows_affected() > 0)
    }

    /// Sets `last_active_at` of an existing row.
    pub async fn touch(&self, user_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let update = Query::update()
            .table(desired::Entity)
            .value(
                desired::Column::LastActiveAt,
                timestamp_value(self.backend(), at),
            )
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        self.update_existing(user_id, update, "touch of desired row")
            .await
    }

    /// Sets `state` of an existing row; never inserts one (stopping a user
    /// who has no row must not create one).
    pub async fn set_state(&self, user_id: &str, state: DesiredState) -> Result<(), StoreError> {
        let update = Query::update()
            .table(desired::Entity)
            .value(desired::Column::State, state.as_str())
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        self.update_existing(user_id, update, "state change of desired row")
            .await
    }

    /// Bumps `restart_nonce` of an existing row, asking for a recreate.
    pub async fn request_restart(&self, user_id: &str) -> Result<(), StoreError> {
        let update = Query::update()
            .table(desired::Entity)
            .value(
                desired::Column::RestartNonce,
                Expr::col(desired::Column::RestartNonce).add(1),
            )
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        self.update_existing(user_id, update, "restart of desired row")
            .await
    }

    async fn update_existing(
        &self,
        user_id: &str,
        update: sea_orm::sea_query::UpdateStatement,
        operation: &'static str,
    ) -> Result<(), StoreError> {
        let result = self
            .db
            .execute(&update)
            .await
            .map_err(StoreError::query(operation))?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NoSuchUser(crate::quote::quote_short(user_id)));
        }
        Ok(())
    }

    /// Deletes one user's desired row; false when there was none.
    pub async fn delete_desired(&self, user_id: &str) -> Result<bool, StoreError> {
        let delete = Query::delete()
            .from_table(desired::Entity)
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        let result = self
            .db
            .execute(&delete)
            .await
            .map_err(StoreError::query("delete of desired row"))?;
        Ok(result.rows_affected() > 0)
    }
}
