//! Looking at the engine: which names the user has, and what holds them.
//!
//! Invariant: only a container of exactly the canonical name that is ours or
//! unlabelled (adoptable) is the user's; one labelled for another user or
//! instance is reported as the holder of the name, never touched.

use std::collections::BTreeMap;

use crate::docker::{
    ContainerFilter, ContainerSummary, Engine, ObservedContainer, LABEL_INSTANCE, LABEL_MANAGED,
    LABEL_USER_ID,
};
use crate::naming::UserNames;
use crate::quote::quote_short;
use crate::status::ContainerStatus;

use super::{ReconcileError, Reconciler};

/// What the engine shows for one user, before the plan's view of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Found {
    /// The container of the canonical name, ours or unlabelled.
    pub canonical: Option<ObservedContainer>,
    /// Who holds the canonical name, when someone else does.
    pub foreign_holder: Option<String>,
    /// Other containers labelled for the user.
    pub strays: Vec<ContainerSummary>,
}

impl Found {
    /// Sorts what the engine returned for `user_id` of `instance`: the
    /// containers `labelled` for the user and the one `inspected` under
    /// the canonical `name`.
    fn sort(
        instance: &str,
        user_id: &str,
        name: &str,
        labelled: Vec<ContainerSummary>,
        inspected: Option<ObservedContainer>,
    ) -> Self {
        let mut found = Found {
            strays: labelled.into_iter().filter(|c| c.name != name).collect(),
            ..Found::default()
        };
        match inspected {
            None => {}
            Some(c) if !c.labels.contains_key(LABEL_MANAGED) => found.canonical = Some(c),
            Some(c) if c.instance() == Some(instance) && c.user_id() == Some(user_id) => {
                found.canonical = Some(c)
            }
            Some(c) => {
                found.foreign_holder = Some(format!(
                    "container {} labelled for user {} of instance {}",
                    &c.id[..c.id.len().min(12)],
                    quote_short(c.user_id().unwrap_or("?")),
                    quote_short(c.instance().unwrap_or("?")),
                ))
            }
        }
        found
    }
}

impl<E: Engine> Reconciler<E> {
    /// The user's container and volume names: today's, unless the user
    /// already has names of the earlier 12-hex form — recorded in its status
    /// row, or, with no container recorded, an earlier state volume of ours
    /// still on the engine (a deleted user coming back) — which it keeps.
    pub(super) async fn names(
        &self,
        user_id: &str,
        previous: Option<&ContainerStatus>,
    ) -> Result<UserNames, ReconcileError> {
        let prefix = &self.settings.name_prefix;
        let recorded = previous.and_then(|p| p.container_name.as_deref());
        if recorded.is_some() {
            return Ok(UserNames::resolve(prefix, user_id, recorded));
        }
        let Some(legacy) = UserNames::legacy(prefix, user_id) else {
            return Ok(UserNames::current(prefix, user_id));
        };
        match self.engine.inspect_volume(&legacy.volume).await? {
            Some(labels) if foreign_owner(&labels, &self.settings.instance, user_id).is_none() => {
                Ok(legacy)
            }
            _ => Ok(UserNames::current(prefix, user_id)),
        }
    }

    /// What the engine holds for `user_id` whose container is called `name`.
    pub(super) async fn observe(&self, user_id: &str, name: &str) -> Result<Found, ReconcileError> {
        let filter = ContainerFilter {
            instance: self.settings.instance.clone(),
            user_id: Some(user_id.to_owned()),
        };
        let labelled = self.engine.list_containers(&filter).await?;
        let by_name = labelled
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id.clone());
        // Docker resolves a name it does not know as an id prefix: only a
        // container of exactly this name counts.
        let inspected = self
            .engine
            .inspect_container(by_name.as_deref().unwrap_or(name))
            .await?
            .filter(|c| c.name == name);
        let instance = &self.settings.instance;
        Ok(Found::sort(instance, user_id, name, labelled, inspected))
    }
}

/// Whose an object is when its labels name another instance or user than
/// `instance`/`user_id`; `None` for ours or an unlabelled one (adopted, as a
/// takeover from the original service needs).
pub(super) fn foreign_owner(
    labels: &BTreeMap<String, String>,
    instance: &str,
    user_id: &str,
) -> Option<String> {
    let other = |key: &str, ours: &str| labels.get(key).filter(|v| v.as_str() != ours);
    if other(LABEL_INSTANCE, instance).is_none() && other(LABEL_USER_ID, user_id).is_none() {
        return None;
    }
    Some(format!(
        "user {} of instance {}",
        quote_short(labels.get(LABEL_USER_ID).map_or("?", String::as_str)),
        quote_short(labels.get(LABEL_INSTANCE).map_or("?", String::as_str)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::{object_labels, RunState};
    use crate::reconcile::testing::{container, now, reconciler, StubEngine};

    const NAME: &str = "mosaic-user-alice";

    fn summary(id: &str, name: &str) -> ContainerSummary {
        ContainerSummary {
            id: id.into(),
            name: name.into(),
            labels: object_labels("default", "alice"),
            state: RunState::Created,
        }
    }

    #[test]
    fn objects_labelled_for_another_user_or_instance_are_foreign() {
        assert_eq!(
            foreign_owner(&object_labels("default", "alice"), "default", "alice"),
            None
        );
        assert_eq!(foreign_owner(&BTreeMap::new(), "default", "alice"), None);
        assert_eq!(
            foreign_owner(&object_labels("default", "bob"), "default", "alice").as_deref(),
            Some("user \"bob\" of instance \"default\"")
        );
        assert_eq!(
            foreign_owner(&object_labels("staging", "alice"), "default", "alice").as_deref(),
            Some("user \"alice\" of instance \"staging\"")
        );
    }

    #[test]
    fn a_canonical_name_held_for_another_user_is_reported_not_taken() {
        let mut c = container(RunState::Running, now());
        c.id = "0123456789abcdef".into();
        c.labels = object_labels("default", "bob");
        let found = Found::sort("default", "alice", NAME, Vec::new(), Some(c));
        assert_eq!(found.canonical, None);
        assert_eq!(
            found.foreign_holder.as_deref(),
            Some("container 0123456789ab labelled for user \"bob\" of instance \"default\"")
        );
    }

    #[test]
    fn ours_or_unlabelled_is_canonical_and_other_labelled_ones_are_strays() {
        let ours = container(RunState::Running, now());
        let labelled = vec![summary("c1", NAME), summary("n1", "mosaic-user-alice-next")];
        let found = Found::sort("default", "alice", NAME, labelled, Some(ours.clone()));
        assert_eq!(found.canonical, Some(ours.clone()));
        assert_eq!(found.strays, [summary("n1", "mosaic-user-alice-next")]);

        let mut unlabelled = ours;
        unlabelled.labels.clear();
        let found = Found::sort(
            "default",
            "alice",
            NAME,
            Vec::new(),
            Some(unlabelled.clone()),
        );
        assert_eq!(found.canonical, Some(unlabelled), "adopted");
    }

    #[tokio::test]
    async fn a_container_answering_to_the_name_as_an_id_prefix_is_not_the_users() {
        let mut other = container(RunState::Running, now());
        other.name = "mosaic-user-alice2".into();
        let engine = StubEngine {
            inspected: Some(other),
            ..StubEngine::default()
        };
        let (r, _dir) = reconciler(engine).await;
        assert_eq!(r.observe("alice", NAME).await.unwrap(), Found::default());
    }

    #[tokio::test]
    async fn a_legacy_volume_of_another_user_does_not_give_its_names() {
        let (prefix, user) = ("mosaic-user-", "Alice B");
        let legacy = UserNames::legacy(prefix, user).expect("an escaped id had legacy names");
        let ours = StubEngine {
            volume_labels: Some(object_labels("default", user)),
            ..StubEngine::default()
        };
        let (r, _dir) = reconciler(ours).await;
        assert_eq!(r.names(user, None).await.unwrap(), legacy);
        let theirs = StubEngine {
            volume_labels: Some(object_labels("default", "bob")),
            ..StubEngine::default()
        };
        let (r, _dir) = reconciler(theirs).await;
        assert_eq!(
            r.names(user, None).await.unwrap(),
            UserNames::current(prefix, user)
        );
    }
}
