//! The one structure behind the engine's lock: the container slab, the
//! indexes over it (by name, id and owner), and the rest of the simulated
//! world (port bindings, images, networks, volumes, events, faults).
//!
//! The name, id and owner indexes hold hashes and slot numbers and describe
//! exactly the live containers; the container transitions that keep them so
//! are in `containers`, the lookups that read them in `lookup`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::events::EventLog;
use super::faults::Fault;
use super::ids::render_id;
use super::images::ImageFlags;
use super::networks::Network;
use super::record::{Interner, Record, Sym};
use super::volumes::Volume;
use clawfleet::docker::Op;
use clawfleet::docker::{
    Confinement, ContainerFilter, ContainerHealth, ContainerSummary, EngineVersion,
    ObservedContainer, RunState, SecretString, LABEL_INSTANCE, LABEL_MANAGED, LABEL_USER_ID,
};

/// A stable 64-bit hash of a string, for ordered indexes that must not store it.
pub(super) fn text_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Symbols of the label keys the engine itself reads; pinned for its life.
pub(super) struct Known {
    pub(super) managed: Sym,
    pub(super) instance: Sym,
    pub(super) user_id: Sym,
}

pub(super) struct Container {
    /// The first 64 bits of the id; the rest is derived from it.
    pub(super) key: u64,
    /// Name and labels.
    pub(super) record: Record,
    pub(super) image: Sym,
    pub(super) publish: Option<(IpAddr, u16)>,
    pub(super) started_at: Option<DateTime<Utc>>,
    pub(super) finished_at: Option<DateTime<Utc>>,
    pub(super) exit_code: i64,
    pub(super) state: RunState,
    pub(super) health: ContainerHealth,
    pub(super) has_healthcheck: bool,
    /// Index into [`State::confinements`]: few distinct values are shared by every container.
    pub(super) confinement: u16,
    /// The environment of a container made out of band (the only ones the
    /// controller reads it from, to take them over); empty for the rest, so
    /// a large simulation does not keep a token per container.
    pub(super) env: BTreeMap<String, SecretString>,
}

impl Container {
    pub(super) fn name(&self) -> &str {
        self.record.name()
    }
}

pub(super) struct State {
    pub(super) interner: Interner,
    pub(super) known: Known,
    /// Containers by slot; a slot is reused after removal.
    pub(super) slots: Vec<Option<Container>>,
    pub(super) free_slots: Vec<u32>,
    /// `(hash of name, slot)`; the name itself lives in the container's record.
    pub(super) by_name: BTreeSet<(u64, u32)>,
    pub(super) by_id: BTreeMap<u64, u32>,
    /// `(hash of instance, hash of user id or 0, slot)` of every container
    /// labelled `managed=true` with an instance: what `list_containers` reads.
    pub(super) by_owner: BTreeSet<(u64, u64, u32)>,
    /// Host bindings of running containers, by `(port, address)`.
    pub(super) bound_ports: BTreeMap<(u16, IpAddr), u32>,
    pub(super) foreign_ports: BTreeSet<(u16, IpAddr)>,
    pub(super) containers_made: u64,
    pub(super) volumes: HashSet<Volume>,
    /// Oldest first.
    pub(super) networks: Vec<Network>,
    pub(super) networks_made: u64,
    /// By normalized reference.
    pub(super) images: HashMap<String, ImageFlags>,
    pub(super) events: EventLog,
    pub(super) calls: [u64; Op::ALL.len()],
    pub(super) faults: [VecDeque<Fault>; Op::ALL.len()],
    /// Calls of each operation still to panic (`MemoryEngine::panic_next`).
    pub(super) panics: [u32; Op::ALL.len()],
    pub(super) unreachable: bool,
    pub(super) version: EngineVersion,
    /// The distinct confinements containers were created with.
    pub(super) confinements: Vec<Confinement>,
}

impl State {
    pub(super) fn new(event_capacity: usize) -> Self {
        let mut interner = Interner::default();
        let known = Known {
            managed: interner.intern(LABEL_MANAGED),
            instance: interner.intern(LABEL_INSTANCE),
            user_id: interner.intern(LABEL_USER_ID),
        };
        Self {
            interner,
            known,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_name: BTreeSet::new(),
            by_id: BTreeMap::new(),
            by_owner: BTreeSet::new(),
            bound_ports: BTreeMap::new(),
            foreign_ports: BTreeSet::new(),
            containers_made: 0,
            volumes: HashSet::new(),
            networks: Vec::new(),
            networks_made: 0,
            images: HashMap::new(),
            events: EventLog::new(event_capacity),
            calls: [0; Op::ALL.len()],
            faults: std::array::from_fn(|_| VecDeque::new()),
            panics: [0; Op::ALL.len()],
            unreachable: false,
            version: EngineVersion {
                version: "28.0.0".to_owned(),
                api_version: "1.48".to_owned(),
            },
            confinements: Vec::new(),
        }
    }

    /// The index of `confinement` in [`Self::confinements`], added when new.
    pub(super) fn confinement_index(&mut self, confinement: &Confinement) -> u16 {
        let index = match self.confinements.iter().position(|c| c == confinement) {
            Some(index) => index,
            None => {
                self.confinements.push(confinement.clone());
                self.confinements.len() - 1
            }
        };
        u16::try_from(index).expect("fewer than 2^16 distinct confinements")
    }

    pub(super) fn container(&self, slot: u32) -> &Container {
        self.slots[slot as usize].as_ref().expect("a live slot")
    }

    pub(super) fn container_mut(&mut self, slot: u32) -> &mut Container {
        self.slots[slot as usize].as_mut().expect("a live slot")
    }

    pub(super) fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, container)| container.is_some())
            .map(|(slot, _)| slot as u32)
    }

    pub(super) fn observe(&self, slot: u32) -> ObservedContainer {
        let container = self.container(slot);
        ObservedContainer {
            id: render_id(container.key),
            name: container.name().to_owned(),
            labels: container.record.label_map(&self.interner),
            image: self.interner.resolve(container.image).to_owned(),
            state: container.state,
            exit_code: Some(container.exit_code),
            health: container.health,
            started_at: container.started_at,
            finished_at: container.finished_at,
            host_port: container.publish.map(|(_, port)| port),
            env: container.env.clone(),
            placement: Default::default(),
        }
    }

    /// Every container whose name starts with `prefix`, labelled or not.
    pub(super) fn list_by_name_prefix(&self, prefix: &str) -> Vec<ContainerSummary> {
        self.live_slots()
            .map(|slot| self.container(slot))
            .filter(|container| container.name().starts_with(prefix))
            .map(|container| self.summary(container))
            .collect()
    }

    fn summary(&self, container: &Container) -> ContainerSummary {
        ContainerSummary {
            id: render_id(container.key),
            name: container.name().to_owned(),
            labels: container.record.label_map(&self.interner),
            state: container.state,
        }
    }

    pub(super) fn list(&self, filter: &ContainerFilter) -> Vec<ContainerSummary> {
        let instance = text_hash(&filter.instance);
        let (low, high) = match &filter.user_id {
            Some(user_id) => {
                let user = text_hash(user_id);
                ((instance, user, 0), (instance, user, u32::MAX))
            }
            None => ((instance, 0, 0), (instance, u64::MAX, u32::MAX)),
        };
        let known = &self.known;
        self.by_owner
            .range(low..=high)
            .map(|&(_, _, slot)| self.container(slot))
            // The index holds hashes: check the labels themselves.
            .filter(|container| {
                let record = &container.record;
                record.label(known.instance) == Some(filter.instance.as_str())
                    && filter
                        .user_id
                        .as_deref()
                        .is_none_or(|user| record.label(known.user_id) == Some(user))
            })
            .map(|container| self.summary(container))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use crate::fixtures::*;
    use clawfleet::docker::{
        ContainerSummary, Engine, EnvValue, RunState, SecretString, LABEL_MANAGED,
    };

    #[tokio::test]
    async fn a_name_prefix_lists_labelled_and_unlabelled_containers_and_out_of_band_ones_show_their_env(
    ) {
        let engine = engine().await;
        running(&engine, &spec("alice")).await;
        let token = EnvValue::Secret(SecretString::new("old-token"));
        engine
            .insert_unlabelled_with(
                "mosaic-user-dave",
                IMAGE,
                false,
                vec![("AGENT_TOKEN".to_owned(), token)],
                Some((LOCALHOST, 19005)),
            )
            .unwrap();
        engine.insert_unlabelled("other-erin", IMAGE, true).unwrap();

        let mut listed = engine.list_by_name_prefix("mosaic-user-").await.unwrap();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        let shown: Vec<(&str, bool, RunState)> = listed
            .iter()
            .map(|c| (c.name.as_str(), c.user_id().is_some(), c.state))
            .collect();
        assert_eq!(
            shown,
            [
                ("mosaic-user-alice", true, RunState::Running),
                ("mosaic-user-dave", false, RunState::Created),
            ]
        );
        let dave = inspect(&engine, "mosaic-user-dave").await;
        assert_eq!(dave.env["AGENT_TOKEN"].expose(), "old-token");
        assert_eq!(dave.host_port, Some(19005));
        let alice = inspect(&engine, "mosaic-user-alice").await;
        assert!(alice.env.is_empty(), "kept for out-of-band containers only");
    }

    #[tokio::test]
    async fn list_shows_only_managed_containers_of_the_instance() {
        let engine = engine().await;
        running(&engine, &spec("alice")).await;
        engine.create_container(&spec("bob")).await.unwrap();
        engine
            .create_container(&spec_in("other", "carol"))
            .await
            .unwrap();
        engine
            .insert_unlabelled("mosaic-user-dave", IMAGE, true)
            .unwrap();
        let mut unmanaged = spec("erin");
        unmanaged
            .labels
            .insert(LABEL_MANAGED.to_owned(), "false".to_owned());
        engine.create_container(&unmanaged).await.unwrap();

        let names = |list: Vec<ContainerSummary>| {
            let mut names: Vec<String> = list.into_iter().map(|c| c.name).collect();
            names.sort();
            names
        };
        let all = engine
            .list_containers(&filter(INSTANCE, None))
            .await
            .unwrap();
        assert_eq!(names(all), ["mosaic-user-alice", "mosaic-user-bob"]);
        let alice = engine
            .list_containers(&filter(INSTANCE, Some("alice")))
            .await
            .unwrap();
        assert_eq!(alice.len(), 1);
        assert_eq!(alice[0].state, RunState::Running);
        assert_eq!(alice[0].user_id(), Some("alice"));
        let other = engine
            .list_containers(&filter("other", None))
            .await
            .unwrap();
        assert_eq!(names(other), ["mosaic-user-carol"]);
        for (instance, user) in [
            (INSTANCE, Some("carol")),
            (INSTANCE, Some("nobody")),
            ("none", None),
        ] {
            let list = engine
                .list_containers(&filter(instance, user))
                .await
                .unwrap();
            assert!(list.is_empty(), "{instance} {user:?}");
        }
    }

    #[tokio::test]
    async fn list_by_user_shows_every_container_of_that_user() {
        let engine = engine().await;
        engine.create_container(&spec("alice")).await.unwrap();
        let mut replacement = spec("alice");
        replacement.name = "mosaic-user-alice-next".to_owned();
        engine.create_container(&replacement).await.unwrap();
        engine.create_container(&spec("alicia")).await.unwrap();

        let list = engine
            .list_containers(&filter(INSTANCE, Some("alice")))
            .await
            .unwrap();

        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|c| c.user_id() == Some("alice")));
    }

    #[tokio::test]
    async fn removed_containers_release_their_interned_strings() {
        let engine = engine().await;
        let baseline = engine.lock().interner.len();

        for n in 0..50 {
            let id = running(&engine, &spec(&format!("u{n}"))).await;
            engine
                .rename_container(&id, &format!("renamed-{n}"))
                .await
                .unwrap();
            engine.remove_container(&id).await.unwrap();
        }

        let state = engine.lock();
        assert_eq!(state.interner.len(), baseline);
        assert!(state.by_name.is_empty() && state.by_id.is_empty() && state.by_owner.is_empty());
        assert!(state.slots.len() <= 1, "slots are reused");
    }

    fn address_of(n: u32) -> IpAddr {
        let [_, b, c, d] = n.to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(127, b, c, d))
    }

    #[tokio::test]
    async fn ten_thousand_users_run_list_and_tear_down_consistently() {
        const USERS: u32 = 10_000;
        let engine = engine().await;
        let baseline = engine.lock().interner.len();

        for n in 0..USERS {
            let spec = published(spec(&format!("user{n}")), address_of(n), 19000);
            running(&engine, &spec).await;
        }

        let all = engine
            .list_containers(&filter(INSTANCE, None))
            .await
            .unwrap();
        assert_eq!(all.len(), USERS as usize);
        assert!(all.iter().all(|c| c.state == RunState::Running));
        let one = engine
            .list_containers(&filter(INSTANCE, Some("user4242")))
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "mosaic-user-user4242");
        assert_eq!(engine.lock().bound_ports.len(), USERS as usize);

        for summary in all {
            engine.remove_container(&summary.id).await.unwrap();
        }
        assert!(engine
            .list_containers(&filter(INSTANCE, None))
            .await
            .unwrap()
            .is_empty());
        let state = engine.lock();
        assert!(state.bound_ports.is_empty() && state.by_owner.is_empty());
        assert_eq!(state.interner.len(), baseline);
        assert_eq!(state.volumes.len(), USERS as usize);
    }
}
