//! The full resync: every user the controller should look at, from all three
//! sources — desired rows, status rows, and this instance's managed
//! containers (which is how orphans are found and garbage-collected).

use std::collections::BTreeSet;

use crate::docker::{ContainerFilter, Engine, EngineError};
use crate::store::{Store, StoreError};

/// A resync could not list its sources.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The database could not be read.
    #[error("full resync: {0}")]
    Store(#[from] StoreError),
    /// The engine could not be listed.
    #[error("full resync: {0}")]
    Engine(#[from] EngineError),
}

/// Every user id with a desired row, a status row or a managed container of `instance`.
pub async fn all_users<E: Engine>(
    store: &Store,
    engine: &E,
    instance: &str,
) -> Result<BTreeSet<String>, ResyncError> {
    let mut users: BTreeSet<String> = store.desired_user_ids().await?.into_iter().collect();
    users.extend(store.status_user_ids().await?);
    let containers = engine
        .list_containers(&ContainerFilter {
            instance: instance.to_owned(),
            user_id: None,
        })
        .await?;
    users.extend(
        containers
            .iter()
            .filter_map(|c| c.user_id().map(str::to_owned)),
    );
    Ok(users)
}
