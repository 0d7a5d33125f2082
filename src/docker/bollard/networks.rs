//! Networks: found by exact name, created single-flight, and settled on the
//! oldest when racing creators (or old engines) made several of one name.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{Network, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptionsBuilder;
use chrono::{DateTime, Utc};

use super::containers::docker_time;
use super::{to_hash_map, DockerEngine};
use crate::docker::{EngineError, ObservedNetwork};

/// How long the networks of one name must stay unchanged, at least, before
/// a caller that raced to create one trusts what it sees (twice its own
/// create's time when that is longer: a racing create is as slow).
pub(super) const NETWORK_SETTLE_QUIET: Duration = Duration::from_secs(1);
/// How often a settling caller lists the networks of the name.
pub(super) const NETWORK_SETTLE_POLL: Duration = Duration::from_millis(100);
/// The longest a caller settles; past it, it takes what it sees.
pub(super) const NETWORK_SETTLE_MAX: Duration = Duration::from_secs(30);

impl DockerEngine {
    /// The networks called exactly `name`, oldest first.
    pub(super) async fn networks_named(
        &self,
        name: &str,
    ) -> Result<Vec<ObservedNetwork>, EngineError> {
        let filters = HashMap::from([("name".to_owned(), vec![name.to_owned()])]);
        let options = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|err| self.fail("network list", name, err))?;
        Ok(oldest_first(name, networks))
    }

    /// The network called `name` to use, if any: the only one, or, while
    /// there are several (a race in progress, or duplicates made by hand),
    /// the oldest once they have settled.
    pub(super) async fn existing_network(
        &self,
        name: &str,
    ) -> Result<Option<ObservedNetwork>, EngineError> {
        let found = self.networks_named(name).await?;
        if found.len() > 1 {
            return self
                .settle_network(name, None, NETWORK_SETTLE_QUIET)
                .await
                .map(Some);
        }
        Ok(found.into_iter().next())
    }

    /// Lists the networks called `name` until they have stayed the same for
    /// `quiet` (at most [`NETWORK_SETTLE_MAX`]) and picks the oldest, as every
    /// other caller does. `own`, a network this call has just created, is
    /// removed if it lost: nothing is attached to it yet, so controllers
    /// that raced to create the network end up sharing one.
    ///
    /// Engines before API 1.44 check for a duplicate name without a lock, and
    /// a racing create becomes visible only when it is done, possibly older
    /// than a network listed before it: settling waits for it.
    pub(super) async fn settle_network(
        &self,
        name: &str,
        own: Option<&str>,
        quiet: Duration,
    ) -> Result<ObservedNetwork, EngineError> {
        let ids = |networks: &[ObservedNetwork]| -> Vec<String> {
            networks.iter().map(|n| n.id.clone()).collect()
        };
        let give_up = tokio::time::Instant::now() + NETWORK_SETTLE_MAX;
        let mut seen = self.networks_named(name).await?;
        let mut unchanged_since = tokio::time::Instant::now();
        while unchanged_since.elapsed() < quiet && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(NETWORK_SETTLE_POLL).await;
            let now = self.networks_named(name).await?;
            if ids(&now) != ids(&seen) {
                seen = now;
                unchanged_since = tokio::time::Instant::now();
            }
        }
        let winner = seen.first().cloned().ok_or_else(|| EngineError::NotFound {
            op: "network create",
            target: name.to_owned(),
        })?;
        if let Some(own) =
            own.filter(|own| *own != winner.id && ids(&seen).iter().any(|id| id == own))
        {
            match self.docker.remove_network(own).await {
                Ok(())
                | Err(BollardError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    tracing::info!(network = name, duplicate = own, kept = %winner.id, "removed a duplicate network that lost a creation race");
                }
                Err(err) => {
                    let err = self.fail("network remove", name, err);
                    tracing::warn!(network = name, duplicate = own, kept = %winner.id, error = %err, "could not remove a duplicate network that lost a creation race");
                }
            }
        }
        Ok(winner)
    }

    /// Creates the network, asking the engine to refuse a duplicate name;
    /// its id, or `None` when the engine refused (another creator won).
    pub(super) async fn create_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<Option<String>, EngineError> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(if self.overlay { "overlay" } else { "bridge" }.to_owned()),
            attachable: self.overlay.then_some(true),
            labels: Some(to_hash_map(labels)),
            options: (!options.is_empty()).then(|| to_hash_map(options)),
            ..Default::default()
        };
        // Engines before API 1.44 create a second network of a taken name
        // unless asked not to, and bollard's model has no `CheckDuplicate`
        // field any more: this one request's body is rewritten to carry it.
        // Newer engines ignore the field (they always refuse duplicates).
        let mut body = serde_json::to_value(&request).map_err(|err| EngineError::Api {
            op: "network create",
            target: name.to_owned(),
            status: 0,
            message: format!("request could not be encoded: {err}"),
        })?;
        if let Some(fields) = body.as_object_mut() {
            fields.insert("CheckDuplicate".to_owned(), serde_json::Value::Bool(true));
        }
        let body = body.to_string();
        let docker = self.docker.clone().with_request_modifier(move |request| {
            if request.uri().path().ends_with("/networks/create") {
                request.map(|_| bollard::body_full(body.clone().into()))
            } else {
                request
            }
        });
        match docker.create_network(request).await {
            Ok(created) => Ok(Some(created.id)),
            // Another creator won the race: the caller re-lists.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("network create", name, err)),
        }
    }
}

/// The networks named exactly `name` (the engine's name filter matches
/// substrings), oldest first, ties broken by id, so every caller picks the
/// same one of duplicates.
pub(super) fn oldest_first(name: &str, networks: Vec<Network>) -> Vec<ObservedNetwork> {
    let mut named: Vec<(Option<DateTime<Utc>>, ObservedNetwork)> = networks
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
        .filter_map(|n| {
            let created = n.created.as_deref().and_then(docker_time);
            let options = n.options.unwrap_or_default().into_iter().collect();
            let driver = n.driver.unwrap_or_default();
            let attachable = n.attachable.unwrap_or(false) || driver == "bridge";
            let network = ObservedNetwork {
                id: n.id?,
                driver,
                attachable,
                options,
            };
            Some((created, network))
        })
        .collect();
    // An unreadable creation time sorts last rather than winning.
    named.sort_by(|(a_time, a), (b_time, b)| {
        (a_time.is_none(), a_time, &a.id).cmp(&(b_time.is_none(), b_time, &b.id))
    });
    named.into_iter().map(|(_, network)| network).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_network_of_the_exact_name_wins() {
        let network = |name: &str, id: &str, created: &str| Network {
            name: Some(name.to_owned()),
            id: Some(id.to_owned()),
            created: Some(created.to_owned()),
            ..Default::default()
        };
        let networks = vec![
            network("net", "b", "2024-01-01T00:00:02Z"),
            network("net-2", "z", "2023-01-01T00:00:00Z"),
            network("net", "c", "not a time"),
            network("net", "a", "2024-01-01T00:00:02Z"),
            network("net", "d", "2024-01-01T00:00:01.5+00:00"),
        ];
        let ids: Vec<String> = oldest_first("net", networks)
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(ids, ["d", "a", "b", "c"]);
    }
}
