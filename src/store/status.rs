//! Reads and writes of `container_status`, written only by clawfleet.
//!
//! `host_port` is unique in the table, so claiming a port is writing it: two
//! reconciles that pick the same port cannot both succeed, and the loser sees
//! [`StoreError::PortTaken`] and picks another.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict, Order, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, ExprTrait, QueryFilter, QueryOrder,
    QuerySelect, SqlErr,
};

use clawfleet_entity::container_status as status;

use super::desired::timestamp_value;
use super::{Store, StoreError};
use crate::status::{ContainerStatus, Health, Phase};

/// A full status row to write (the store stamps `updated_at`).
pub type StatusWrite = ContainerStatus;

/// One page of status rows.
#[derive(Clone, Debug, Default)]
pub struct StatusPage {
    /// The rows, ordered by user id.
    pub rows: Vec<ContainerStatus>,
    /// The user id to pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<String>,
}

fn from_model(m: status::Model) -> ContainerStatus {
    ContainerStatus {
        phase: Phase::parse(&m.phase).unwrap_or(Phase::Pending),
        container_id: m.container_id,
        container_name: m.container_name,
        host_port: m.host_port.and_then(|p| u16::try_from(p).ok()),
        url: m.url,
        host_url: m.host_url,
        health: m.health.as_deref().and_then(Health::parse),
        gateway_token: m.gateway_token,
        observed_revision: m.observed_revision,
        message: m.message,
        restarts: m.restarts,
        last_transition_at: m.last_transition_at,
        updated_at: m.updated_at,
        node: m.node,
        user_id: m.user_id,
    }
}

fn port_conflict(err: &DbErr) -> bool {
    match err.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(detail)) => detail.contains("host_port"),
        _ => false,
    }
}

impl Store {
    /// One user's status row.
    pub async fn status(&self, user_id: &str) -> Result<Option<ContainerStatus>, StoreError> {
        status::Entity::find_by_id(user_id.to_owned())
            .one(&self.db)
            .await
            .map(|m| m.map(from_model))
            .map_err(StoreError::query("read of status row"))
    }

    /// Status rows ordered by user id, after `after`, optionally of one phase.
    pub async fn status_page(
        &self,
        phase: Option<Phase>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<StatusPage, StoreError> {
        let mut query = status::Entity::find().order_by(status::Column::UserId, Order::Asc);
        if let Some(phase) = phase {
            query = query.filter(status::Column::Phase.eq(phase.as_str()));
        }
        if let Some(after) = after {
            query = query.filter(status::Column::UserId.gt(after));
        }
        // One row more than asked tells whether another page follows.
        let limit = std::cmp::min(limit, i64::MAX as u64 - 1);
        let mut rows: Vec<ContainerStatus> = query
            .limit(limit + 1)
            .all(&self.db)
            .await
            .map_err(StoreError::query("read of status rows"))?
            .into_iter()
            .map(from_model)
            .collect();
        let next_after = if rows.len() as u64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.user_id.clone())
        } else {
            None
        };
        Ok(StatusPage { rows, next_after })
    }

    /// The status rows of the given users (those that have one), ordered by user id.
    pub async fn status_of(&self, user_ids: &[String]) -> Result<Vec<ContainerStatus>, StoreError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(status::Entity::find()
            .filter(status::Column::UserId.is_in(user_ids.iter().cloned()))
            .order_by(status::Column::UserId, Order::Asc)
            .all(&self.db)
            .await
            .map_err(StoreError::query("read of status rows by user"))?
            .into_iter()
            .map(from_model)
            .collect())
    }

    /// Every status row, ordered by user id.
    pub async fn status_all(&self) -> Result<Vec<ContainerStatus>, StoreError> {
        Ok(status::Entity::find()
            .order_by(status::Column::UserId, Order::Asc)
            .all(&self.db)
            .await
            .map_err(StoreError::query("read of all status rows"))?
            .into_iter()
            .map(from_model)
            .collect())
    }

    /// Ids of every user with a status row.
    pub async fn status_user_ids(&self) -> Result<Vec<String>, StoreError> {
        status::Entity::find()
            .select_only()
            .column(status::Column::UserId)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(StoreError::query("read of status user ids"))
    }

    /// Host ports held by any status row.
    pub async fn ports_in_use(&self) -> Result<Vec<u16>, StoreError> {
        let ports: Vec<Option<i32>> = status::Entity::find()
            .select_only()
            .column(status::Column::HostPort)
            .filter(status::Column::HostPort.is_not_null())
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(StoreError::query("read of ports in use"))?;
        Ok(ports
            .into_iter()
            .flatten()
            .filter_map(|p| u16::try_from(p).ok())
            .collect())
    }

    /// Writes a whole status row, stamping `updated_at` with `now`. Fails with
    /// [`StoreError::PortTaken`] when another row holds `host_port`.
    pub async fn write_status(
        &self,
        row: &StatusWrite,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let backend = self.backend();
        let ts = |t: DateTime<Utc>| timestamp_value(backend, t);
        use status::Column as C;
        let columns = [
            C::UserId,
            C::Phase,
            C::ContainerId,
            C::ContainerName,
            C::HostPort,
            C::Url,
            C::HostUrl,
            C::Health,
            C::GatewayToken,
            C::ObservedRevision,
            C::Message,
            C::Restarts,
            C::LastTransitionAt,
            C::UpdatedAt,
            C::Node,
        ];
        let insert = Query::insert()
            .into_table(status::Entity)
            .columns(columns)
            .values_panic([
                row.user_id.clone().into(),
                row.phase.as_str().into(),
                row.container_id.clone().into(),
                row.container_name.clone().into(),
                row.host_port.map(i32::from).into(),
                row.url.clone().into(),
                row.host_url.clone().into(),
                row.health.map(|h| h.as_str()).into(),
                row.gateway_token.clone().into(),
                row.observed_revision.into(),
                row.message.clone().into(),
                row.restarts.into(),
                Expr::val(ts(row.last_transition_at)),
                Expr::val(ts(now)),
                row.node.clone().into(),
            ])
            .on_conflict(
                OnConflict::column(C::UserId)
                    .update_columns(columns[1..].iter().copied())
                    .to_owned(),
            )
            .to_owned();
        let in_flight = self.write_in_flight();
        let result = self.db.execute(&insert).await;
        drop(in_flight);
        self.note_write(match &result {
            Ok(_) => true,
            Err(e) => port_conflict(e),
        });
        match result {
            Ok(_) => {
                self.announce_status(&row.user_id);
                Ok(())
            }
            Err(e) if port_conflict(&e) => Err(StoreError::PortTaken(row.host_port.unwrap_or(0))),
            Err(e) => Err(StoreError::Query {
                operation: "write of status row",
                source: e,
            }),
        }
    }

    /// Deletes one user's status row (after its container is removed).
    pub async fn delete_status(&self, user_id: &str) -> Result<(), StoreError> {
        let delete = Query::delete()
            .from_table(status::Entity)
            .and_where(Expr::col("user_id").eq(user_id))
            .to_owned();
        self.db
            .execute(&delete)
            .await
            .map_err(StoreError::query("delete of status row"))?;
        self.announce_status(user_id);
        Ok(())
    }
}
