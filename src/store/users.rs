//! One user as the two tables know it: the desired ⋈ status join that the
//! command line and the JSON API show.
//!
//! A user exists while either row does: a desired row without a status row
//! is not yet reconciled; a status row without a desired row is a user whose
//! row was deleted and whose container is being removed. Joined lists are
//! ordered by user id.

use std::collections::BTreeMap;

use super::{DesiredRow, Store, StoreError};
use crate::status::{ContainerStatus, Phase};

/// One user's desired and status rows; at least one of them is present.
#[derive(Clone, Debug)]
pub struct UserRows {
    /// The user.
    pub user_id: String,
    /// The desired row, validated; `None` once it is deleted.
    pub desired: Option<DesiredRow>,
    /// The status row; `None` until the controller has written one.
    pub status: Option<ContainerStatus>,
}

/// One page of joined users.
#[derive(Clone, Debug, Default)]
pub struct UserPage {
    /// The users, ordered by id.
    pub users: Vec<UserRows>,
    /// The user id to pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// The user id of a desired row, valid or not.
pub fn desired_user_id(row: &DesiredRow) -> &str {
    match row {
        Ok(d) => &d.user_id,
        Err(invalid) => &invalid.user_id,
    }
}

/// Joins desired and status rows on the user id (a full outer join),
/// ordered by user id.
fn join(desired: Vec<DesiredRow>, statuses: Vec<ContainerStatus>) -> Vec<UserRows> {
    let mut by_user: BTreeMap<String, UserRows> = BTreeMap::new();
    for row in desired {
        let entry = slot(&mut by_user, desired_user_id(&row));
        entry.desired = Some(row);
    }
    for status in statuses {
        let entry = slot(&mut by_user, &status.user_id);
        entry.status = Some(status);
    }
    by_user.into_values().collect()
}

/// The entry of `user_id`, empty when new.
fn slot<'a>(by_user: &'a mut BTreeMap<String, UserRows>, user_id: &str) -> &'a mut UserRows {
    by_user
        .entry(user_id.to_owned())
        .or_insert_with(|| UserRows {
            user_id: user_id.to_owned(),
            desired: None,
            status: None,
        })
}

impl Store {
    /// One user's rows; `None` when there is neither a desired nor a status row.
    pub async fn user(&self, user_id: &str) -> Result<Option<UserRows>, StoreError> {
        let desired = self.desired(user_id).await?;
        let status = self.status(user_id).await?;
        Ok((desired.is_some() || status.is_some()).then(|| UserRows {
            user_id: user_id.to_owned(),
            desired,
            status,
        }))
    }

    /// Every user with a desired or a status row, ordered by id.
    pub async fn users_all(&self) -> Result<Vec<UserRows>, StoreError> {
        let desired = self.desired_all().await?;
        let statuses = self.status_all().await?;
        Ok(join(desired, statuses))
    }

    /// Up to `limit` users with id after `after`, ordered by id. Without
    /// `phase` it pages over desired rows; with it, over status rows of that
    /// phase (which also shows users whose row is gone and whose container
    /// is being removed).
    pub async fn users_page(
        &self,
        phase: Option<Phase>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<UserPage, StoreError> {
        match phase {
            None => {
                // One row more than asked tells whether another page follows.
                let mut rows = self.desired_page(after, limit.saturating_add(1)).await?;
                let next_after = if rows.len() as u64 > limit {
                    rows.truncate(limit as usize);
                    rows.last().map(|r| desired_user_id(r).to_owned())
                } else {
                    None
                };
                let ids: Vec<String> = rows.iter().map(|r| desired_user_id(r).to_owned()).collect();
                let statuses = self.status_of(&ids).await?;
                Ok(UserPage {
                    users: join(rows, statuses),
                    next_after,
                })
            }
            Some(phase) => {
                let page = self.status_page(Some(phase), after, limit).await?;
                let ids: Vec<String> = page.rows.iter().map(|s| s.user_id.clone()).collect();
                let desired = self.desired_of(&ids).await?;
                Ok(UserPage {
                    users: join(desired, page.rows),
                    next_after: page.next_after,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::desired::{DesiredContainer, DesiredState, InvalidRow};

    fn desired(user_id: &str) -> DesiredRow {
        Ok(DesiredContainer {
            user_id: user_id.into(),
            state: DesiredState::Running,
            idle_timeout: None,
            last_active_at: None,
            image: None,
            restart_nonce: 0,
            revision: 1,
        })
    }

    fn status(user_id: &str) -> ContainerStatus {
        ContainerStatus::pending(user_id, Utc::now())
    }

    #[test]
    fn the_join_keeps_users_with_either_row_in_id_order() {
        let invalid = Err(InvalidRow {
            user_id: "carol".into(),
            field: "state",
            reason: "bad".into(),
            revision: 4,
        });
        let users = join(
            vec![desired("bob"), invalid, desired("alice")],
            vec![status("dave"), status("alice")],
        );
        let shape: Vec<(&str, bool, bool)> = users
            .iter()
            .map(|u| (u.user_id.as_str(), u.desired.is_some(), u.status.is_some()))
            .collect();
        assert_eq!(
            shape,
            [
                ("alice", true, true),
                ("bob", true, false),
                ("carol", true, false),
                ("dave", false, true),
            ]
        );
        assert!(users[2].desired.as_ref().unwrap().is_err());
    }
}
