//! Networks: few, kept oldest first, and — as engines before 25 allowed —
//! possibly several of one name.

use std::collections::BTreeMap;

use super::ids::{id_key, render_id, NETWORK_SALT};
use super::lookup::Found;
use super::record::Record;
use super::state::State;
use super::MemoryEngine;
use clawfleet::docker::ObservedNetwork;

pub(super) struct Network {
    pub(super) key: u64,
    pub(super) record: Record,
    /// Driver options, as given at creation.
    pub(super) options: BTreeMap<String, String>,
}

impl State {
    pub(super) fn add_network(
        &mut self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> usize {
        self.networks_made += 1;
        let record = Record::new(&mut self.interner, name, labels);
        self.networks.push(Network {
            key: id_key(NETWORK_SALT, self.networks_made),
            record,
            options: options.clone(),
        });
        self.networks.len() - 1
    }

    /// The oldest network called exactly `name`.
    pub(super) fn network_named(&self, name: &str) -> Option<ObservedNetwork> {
        let network = self.networks.iter().find(|n| n.record.name() == name)?;
        Some(ObservedNetwork {
            id: render_id(network.key),
            driver: "bridge".to_owned(),
            attachable: true,
            options: network.options.clone(),
        })
    }
}

impl MemoryEngine {
    /// Adds another network called `name`, as engines before 25 allowed;
    /// returns its id.
    pub fn add_duplicate_network(&self, name: &str) -> String {
        self.insert_network(name, &BTreeMap::new())
    }

    /// Creates a network called `name` with driver `options`, as `docker
    /// network create` by someone else would; returns its id.
    pub fn insert_network(&self, name: &str, options: &BTreeMap<String, String>) -> String {
        let mut state = self.lock();
        let index = state.add_network(name, &BTreeMap::new(), options);
        render_id(state.networks[index].key)
    }

    /// Every network as `(id, name)`, oldest first.
    pub fn networks(&self) -> Vec<(String, String)> {
        self.lock()
            .networks
            .iter()
            .map(|network| (render_id(network.key), network.record.name().to_owned()))
            .collect()
    }

    /// The labels of the network `name_or_id` (the oldest of that name), or
    /// `None` when there is no such network.
    pub fn network_labels(&self, name_or_id: &str) -> Option<BTreeMap<String, String>> {
        let state = self.lock();
        let index = match state.find_network(name_or_id) {
            Found::One(index) => index as usize,
            Found::Ambiguous => state
                .networks
                .iter()
                .position(|n| n.record.name() == name_or_id)?,
            Found::Missing => return None,
        };
        Some(state.networks[index].record.label_map(&state.interner))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::fixtures::*;
    use crate::MemoryEngine;
    use clawfleet::docker::{shared_labels, Engine, OPTION_ENABLE_ICC};

    #[tokio::test]
    async fn ensure_network_is_idempotent_with_a_stable_id() {
        let engine = MemoryEngine::new();
        let labels = shared_labels(INSTANCE);
        let none = BTreeMap::new();

        let id = engine
            .ensure_network(NETWORK, &labels, &none)
            .await
            .unwrap()
            .id;
        assert_eq!(
            engine
                .ensure_network(NETWORK, &BTreeMap::new(), &none)
                .await
                .unwrap()
                .id,
            id
        );

        assert_eq!(id.len(), 64);
        assert_eq!(engine.networks(), [(id.clone(), NETWORK.to_owned())]);
        assert_eq!(engine.network_labels(&id), Some(labels));
    }

    #[tokio::test]
    async fn ensure_network_returns_the_oldest_of_duplicate_networks() {
        let engine = MemoryEngine::new();
        engine.add_image(IMAGE);
        let oldest = engine
            .ensure_network(NETWORK, &shared_labels(INSTANCE), &BTreeMap::new())
            .await
            .unwrap()
            .id;
        let duplicate = engine.add_duplicate_network(NETWORK);

        assert_ne!(duplicate, oldest);
        assert_eq!(
            engine
                .ensure_network(NETWORK, &BTreeMap::new(), &BTreeMap::new())
                .await
                .unwrap()
                .id,
            oldest
        );
        assert_eq!(engine.networks().len(), 2);
        // By name the network is now ambiguous, as on the real engine; by id it is not.
        let by_name = engine.create_container(&spec("alice")).await.unwrap_err();
        assert_eq!(api_status(&by_name), Some(400));
        let mut by_id = spec("alice");
        by_id.network = oldest;
        engine.create_container(&by_id).await.unwrap();
    }

    #[tokio::test]
    async fn a_network_keeps_the_options_it_was_created_with() {
        let engine = MemoryEngine::new();
        let isolated = BTreeMap::from([(OPTION_ENABLE_ICC.to_owned(), "false".to_owned())]);

        let made = engine
            .ensure_network(NETWORK, &shared_labels(INSTANCE), &isolated)
            .await
            .unwrap();
        let again = engine
            .ensure_network(NETWORK, &BTreeMap::new(), &BTreeMap::new())
            .await
            .unwrap();

        assert!(!made.inter_container_traffic());
        assert_eq!(again, made, "an existing network is returned as it is");
        assert_eq!(engine.inspect_network(NETWORK).await.unwrap(), Some(made));
        assert_eq!(engine.inspect_network("other").await.unwrap(), None);
    }
}
