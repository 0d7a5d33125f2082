//! Volumes: a set keyed by name, created with their first labels and kept
//! when their container is removed.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use super::names::check_volume_name;
use super::record::Record;
use super::state::State;
use super::MemoryEngine;
use clawfleet::docker::EngineError;

/// A volume, equal to, hashed as and borrowed as its name, so the set of
/// volumes is keyed by name without storing the name twice.
pub(super) struct Volume(pub(super) Record);

impl PartialEq for Volume {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl Eq for Volume {}

impl Hash for Volume {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
    }
}

impl Borrow<str> for Volume {
    fn borrow(&self) -> &str {
        self.0.name()
    }
}

impl State {
    pub(super) fn ensure_volume(
        &mut self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        check_volume_name("volume create", name)?;
        if !self.volumes.contains(name) {
            let record = Record::new(&mut self.interner, name, labels);
            self.volumes.insert(Volume(record));
        }
        Ok(self.volume_label_map(name).unwrap_or_default())
    }

    pub(super) fn volume_label_map(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let volume = self.volumes.get(name)?;
        Some(volume.0.label_map(&self.interner))
    }
}

impl MemoryEngine {
    /// The names of every volume, sorted.
    pub fn volumes(&self) -> Vec<String> {
        let mut volumes: Vec<String> = self
            .lock()
            .volumes
            .iter()
            .map(|volume| volume.0.name().to_owned())
            .collect();
        volumes.sort();
        volumes
    }

    /// The labels of volume `name`, or `None` when there is no such volume.
    pub fn volume_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.lock().volume_label_map(name)
    }

    /// Creates volume `name` with `labels` as `docker volume create` by
    /// someone else would; an existing volume is left as it is.
    pub fn insert_volume(&self, name: &str, labels: &BTreeMap<String, String>) {
        let mut state = self.lock();
        if !state.volumes.contains(name) {
            let record = Record::new(&mut state.interner, name, labels);
            state.volumes.insert(Volume(record));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::fixtures::*;
    use crate::MemoryEngine;
    use clawfleet::docker::{object_labels, Engine};

    #[tokio::test]
    async fn ensure_volume_is_idempotent_and_keeps_the_first_labels() {
        let engine = MemoryEngine::new();
        let first = object_labels(INSTANCE, "alice");

        assert_eq!(engine.ensure_volume("vol-a", &first).await.unwrap(), first);
        let again = engine
            .ensure_volume("vol-a", &object_labels("other", "x"))
            .await
            .unwrap();
        assert_eq!(
            again, first,
            "an existing volume answers with its own labels"
        );
        assert_eq!(
            engine.inspect_volume("vol-a").await.unwrap(),
            Some(first.clone())
        );
        assert_eq!(engine.inspect_volume("vol-b").await.unwrap(), None);

        assert_eq!(engine.volumes(), ["vol-a"]);
        assert_eq!(engine.volume_labels("vol-a"), Some(first));
        let invalid = engine
            .ensure_volume("a", &BTreeMap::new())
            .await
            .unwrap_err();
        assert_eq!(api_status(&invalid), Some(400));
    }
}
