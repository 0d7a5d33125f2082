//! Resolving a name, an id or an id prefix the way Docker does, for
//! containers and networks: an exact match wins, and a prefix shared by two
//! objects is an error, never a guess.

use super::ids::{id_has_prefix, id_head, id_head_range, is_lower_hex};
use super::state::{text_hash, State};
use clawfleet::docker::{EngineError, RunState};

/// The outcome of resolving a name, id or id prefix.
pub(super) enum Found {
    One(u32),
    Missing,
    Ambiguous,
}

/// `One` when `hits` yields exactly one item.
fn unique(mut hits: impl Iterator<Item = u32>) -> Found {
    match (hits.next(), hits.next()) {
        (Some(hit), None) => Found::One(hit),
        (None, _) => Found::Missing,
        (Some(_), Some(_)) => Found::Ambiguous,
    }
}

impl State {
    pub(super) fn slot_named(&self, name: &str) -> Option<u32> {
        let hash = text_hash(name);
        self.by_name
            .range((hash, 0)..=(hash, u32::MAX))
            .map(|&(_, slot)| slot)
            .find(|&slot| self.container(slot).name() == name)
    }

    /// Resolves like Docker: a full id, then an exact name (a leading `/`
    /// allowed), then a unique id prefix.
    pub(super) fn find(&self, target: &str) -> Found {
        if target.len() == 64 && is_lower_hex(target) {
            if let Some(&slot) = self.by_id.get(&id_head(target)) {
                if id_has_prefix(self.container(slot).key, target) {
                    return Found::One(slot);
                }
            }
        }
        if let Some(slot) = self.slot_named(target.strip_prefix('/').unwrap_or(target)) {
            return Found::One(slot);
        }
        if target.is_empty() || target.len() >= 64 || !is_lower_hex(target) {
            return Found::Missing;
        }
        let (low, high) = id_head_range(target);
        unique(
            self.by_id
                .range(low..=high)
                .filter(|(&key, _)| id_has_prefix(key, target))
                .map(|(_, &slot)| slot),
        )
    }

    pub(super) fn require(&self, op: &'static str, target: &str) -> Result<u32, EngineError> {
        match self.find(target) {
            Found::One(slot) => Ok(slot),
            Found::Missing => Err(EngineError::NotFound {
                op,
                target: target.to_owned(),
            }),
            Found::Ambiguous => Err(ambiguous_prefix(op, target)),
        }
    }

    pub(super) fn require_running(
        &self,
        op: &'static str,
        target: &str,
    ) -> Result<u32, EngineError> {
        let slot = self.require(op, target)?;
        if self.container(slot).state != RunState::Running {
            return Err(EngineError::Api {
                op,
                target: target.to_owned(),
                status: 409,
                message: format!("container {target} is not running"),
            });
        }
        Ok(slot)
    }

    /// Resolves a network like Docker: a full id, then an exact name, then a
    /// unique id prefix. Networks are few, so this scans them.
    pub(super) fn find_network(&self, term: &str) -> Found {
        let indexes = || 0..self.networks.len() as u32;
        let id_like = !term.is_empty() && term.len() <= 64 && is_lower_hex(term);
        let has_id_prefix =
            |index: &u32| id_like && id_has_prefix(self.networks[*index as usize].key, term);
        if term.len() == 64 {
            if let Found::One(index) = unique(indexes().filter(has_id_prefix)) {
                return Found::One(index);
            }
        }
        let named = indexes().filter(|&index| self.networks[index as usize].record.name() == term);
        match unique(named) {
            Found::Missing => unique(indexes().filter(has_id_prefix)),
            found => found,
        }
    }
}

pub(super) fn ambiguous_prefix(op: &'static str, target: &str) -> EngineError {
    EngineError::Api {
        op,
        target: target.to_owned(),
        status: 400,
        message: format!("multiple IDs found with provided prefix: {target}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::fixtures::*;
    use crate::ids::is_lower_hex;
    use clawfleet::docker::{Engine, RunState};

    #[tokio::test]
    async fn create_returns_a_64_hex_id_that_inspect_finds_by_id_name_and_prefix() {
        let engine = engine().await;
        let spec = spec("alice");
        let id = engine.create_container(&spec).await.unwrap();

        assert_eq!(id.len(), 64);
        assert!(is_lower_hex(&id));
        for target in [
            &id[..],
            &id[..12],
            &id[..20],
            "mosaic-user-alice",
            "/mosaic-user-alice",
        ] {
            assert_eq!(
                inspect(&engine, target).await.id,
                id,
                "looked up by {target}"
            );
        }
        let observed = inspect(&engine, &id).await;
        assert_eq!(observed.name, "mosaic-user-alice");
        assert_eq!(observed.labels, spec.labels);
        assert_eq!(observed.image, IMAGE);
        assert_eq!(observed.state, RunState::Created);
        assert_eq!(observed.exit_code, Some(0));
        assert_eq!(observed.started_at, None);
        assert_eq!(observed.host_port, None);
        assert_eq!(observed.user_id(), Some("alice"));
    }

    #[tokio::test]
    async fn ids_are_distinct_and_the_same_calls_give_the_same_ids() {
        let (first, second) = (engine().await, engine().await);
        let mut ids = Vec::new();
        for user in ["a1", "b2", "c3"] {
            let id = first.create_container(&spec(user)).await.unwrap();
            assert_eq!(second.create_container(&spec(user)).await.unwrap(), id);
            ids.push(id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 3);
    }

    #[tokio::test]
    async fn inspect_of_a_missing_container_is_none_and_never_a_substring_match() {
        let engine = engine().await;
        engine.create_container(&spec("10")).await.unwrap();

        for target in [
            "mosaic-user-1",
            "mosaic-user-100",
            "user-10",
            "ffffffffffffffffff0",
            "",
        ] {
            assert_eq!(
                engine.inspect_container(target).await.unwrap(),
                None,
                "{target}"
            );
        }
    }

    #[tokio::test]
    async fn an_id_prefix_shared_by_two_containers_is_an_error_not_a_guess() {
        let engine = engine().await;
        let mut ids = Vec::new();
        // Seventeen ids must share a first hex digit.
        for n in 0..17 {
            ids.push(
                engine
                    .create_container(&spec(&format!("u{n}")))
                    .await
                    .unwrap(),
            );
        }
        let shared = (0..ids.len())
            .flat_map(|i| (i + 1..ids.len()).map(move |j| (i, j)))
            .find(|&(i, j)| ids[i][..1] == ids[j][..1])
            .map(|(i, _)| ids[i][..1].to_owned())
            .unwrap();

        let error = engine.inspect_container(&shared).await.unwrap_err();
        assert_eq!(api_status(&error), Some(400));
        let error = engine.start_container(&shared).await.unwrap_err();
        assert_eq!(api_status(&error), Some(400));
    }
}
