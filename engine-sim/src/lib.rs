//! An in-memory [`Engine`]: a simulated Docker engine for property tests,
//! large simulations and fault injection.
//!
//! It keeps the trait's contract the way the real engine does (see the
//! [seam's docs](clawfleet::docker)): names are unique and valid, `start`/`stop` of a
//! container already in that state succeed, `remove` forces and keeps
//! volumes, a start whose host port is bound elsewhere fails with
//! [`EngineError::PortAllocated`], and every state change emits a
//! Docker-style event (`create`, `start`, `kill`, `die`, `stop`, `restart`,
//! `rename`, `destroy`, `health_status: ...`). Beyond the trait it lets a test
//! play the rest of the world: images and a registry, a foreign process on a
//! port, a human with the docker CLI (crash, kill, rm, health), a cut event
//! stream, injected failures and call counters.
//!
//! Invariants:
//! - the name, id and owner indexes describe exactly the live containers;
//! - a running container with a published port holds it in the port index,
//!   and no two overlapping bindings (the same address, or a wildcard covering
//!   it) are ever held at once;
//! - every event is stored and broadcast under the engine's lock, so a
//!   subscription's replay (`since`) and its live events neither miss nor
//!   repeat one; event times never decrease;
//! - the lock is held for the few steps of one call and never across an
//!   `.await`; a slow subscriber is dropped (it sees an error), never waited for.
//!
//! Cost: every call is O(1) or O(log n) in the number of containers, except
//! `list_containers`, which is O(log n + matches) through an index by instance
//! and user id, and the snapshot helpers. Each object's name and labels share
//! one allocation (label keys interned, values inline); indexes hold hashes
//! and slot numbers, never copies of strings; ids are rendered on demand from
//! a 64-bit key. A container with its labelled volume costs about 400 bytes.
//!
//! Where things are: `state` is the one structure behind the engine's lock
//! (the container slab and its indexes) and `record` how every object keeps
//! its name and labels; `lookup` resolves names, ids and id prefixes, which
//! `ids` and `names` make and check; `containers` is the container lifecycle
//! (create, start, stop, remove, rename, health), `ports` the host port
//! bindings, and `images`, `networks` and `volumes` the other objects;
//! `events` is the event log and its subscriptions, `faults` the call
//! counters and injected failures, and `out_of_band` what a human with the
//! docker CLI does.

mod containers;
mod events;
mod faults;
#[cfg(test)]
mod fixtures;
mod ids;
mod images;
mod lookup;
mod names;
mod networks;
mod out_of_band;
mod ports;
mod record;
mod state;
mod volumes;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use clawfleet::docker::{
    Confinement, ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError,
    EngineEvent, EngineVersion, ObservedContainer, ObservedNetwork, Op,
};

use events::DEFAULT_EVENT_CAPACITY;
use ids::render_id;
use images::normalize_image;
use lookup::{ambiguous_prefix, Found};
use state::State;

/// What the engine calls itself in [`EngineError::Unreachable`].
const HOST: &str = "memory://";

type Clock = Box<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// A Docker engine simulated in memory.
///
/// Trait calls are counted ([`calls`](Self::calls)) and can be made to fail
/// ([`fail_next`](Self::fail_next), [`set_unreachable`](Self::set_unreachable));
/// the other methods act out of band, like a human with the docker CLI, and
/// neither count nor fail.
pub struct MemoryEngine {
    state: Mutex<State>,
    clock: Clock,
}

impl fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryEngine").finish_non_exhaustive()
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEngine {
    /// An engine with no containers, images, volumes or networks, on the system clock.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::new(DEFAULT_EVENT_CAPACITY)),
            clock: Box::new(Utc::now),
        }
    }

    /// Reads the time (start and finish times, event times) from `clock`.
    pub fn with_clock(mut self, clock: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Buffers at most `capacity` (at least 1) events per subscriber before
    /// dropping it as lagging; the default is 4096.
    pub fn with_event_capacity(mut self, capacity: usize) -> Self {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        state.events.sender = broadcast::channel(capacity.max(1)).0;
        self
    }

    /// Every container, labelled or not, sorted by name.
    pub fn containers(&self) -> Vec<ObservedContainer> {
        let state = self.lock();
        let mut containers: Vec<ObservedContainer> =
            state.live_slots().map(|slot| state.observe(slot)).collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        containers
    }

    /// One container by name or id, without counting a call.
    pub fn container(&self, name_or_id: &str) -> Option<ObservedContainer> {
        let state = self.lock();
        match state.find(name_or_id) {
            Found::One(slot) => Some(state.observe(slot)),
            Found::Missing | Found::Ambiguous => None,
        }
    }

    /// The confinement container `name_or_id` was created with (what
    /// `docker inspect` shows as CapDrop, CapAdd, SecurityOpt and LogConfig).
    pub fn confinement(&self, name_or_id: &str) -> Option<Confinement> {
        let state = self.lock();
        match state.find(name_or_id) {
            Found::One(slot) => {
                let index = state.container(slot).confinement;
                Some(state.confinements[usize::from(index)].clone())
            }
            Found::Missing | Found::Ambiguous => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // One panicking test task must not turn every later call into a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one trait call: counts it, applies unreachability and injected
    /// faults, and runs `body` under the lock.
    fn call<T>(
        &self,
        op: Op,
        body: impl FnOnce(&mut State, DateTime<Utc>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut state = self.lock();
        if state.take_panic(op) {
            drop(state);
            panic!("injected panic in the memory engine's {}", op.as_str());
        }
        let lost_reply = state.admit(op)?;
        let now = (self.clock)();
        let result = body(&mut state, now);
        match lost_reply {
            Some(error) if result.is_ok() => Err(error),
            _ => result,
        }
    }
}

impl Engine for MemoryEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        self.call(Op::Version, |state, _| Ok(state.version.clone()))
    }

    async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.call(Op::List, |state, _| Ok(state.list(filter)))
    }

    async fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.call(Op::List, |state, _| Ok(state.list_by_name_prefix(prefix)))
    }

    async fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ObservedContainer>, EngineError> {
        self.call(Op::Inspect, |state, _| match state.find(name_or_id) {
            Found::One(slot) => Ok(Some(state.observe(slot))),
            Found::Missing => Ok(None),
            Found::Ambiguous => Err(ambiguous_prefix("inspect", name_or_id)),
        })
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        self.call(Op::Create, |state, now| {
            let slot = state.create(spec, true, now)?;
            Ok(render_id(state.container(slot).key))
        })
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.call(Op::Start, |state, now| {
            let slot = state.require("start", id)?;
            state.start(slot, now)
        })
    }

    async fn stop_container(&self, id: &str, _timeout: Duration) -> Result<(), EngineError> {
        self.call(Op::Stop, |state, now| {
            let slot = state.require("stop", id)?;
            state.stop(slot, now);
            Ok(())
        })
    }

    async fn restart_container(&self, id: &str, _timeout: Duration) -> Result<(), EngineError> {
        self.call(Op::Restart, |state, now| {
            let slot = state.require("restart", id)?;
            state.stop(slot, now);
            state.start(slot, now)?;
            state.emit(slot, "restart", now);
            Ok(())
        })
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        self.call(Op::Remove, |state, now| match state.find(id) {
            Found::One(slot) => {
                state.remove(slot, now);
                Ok(())
            }
            Found::Missing => Ok(()),
            Found::Ambiguous => Err(ambiguous_prefix("remove", id)),
        })
    }

    async fn rename_container(&self, id: &str, new_name: &str) -> Result<(), EngineError> {
        self.call(Op::Rename, |state, now| {
            let slot = state.require("rename", id)?;
            state.rename(slot, new_name, now)
        })
    }

    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        self.call(Op::EnsureVolume, |state, _| {
            state.ensure_volume(name, labels)
        })
    }

    async fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, EngineError> {
        self.call(Op::InspectVolume, |state, _| {
            Ok(state.volume_label_map(name))
        })
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<ObservedNetwork, EngineError> {
        self.call(Op::EnsureNetwork, |state, _| {
            Ok(match state.network_named(name) {
                Some(oldest) => oldest,
                None => {
                    let index = state.add_network(name, labels, options);
                    ObservedNetwork {
                        id: render_id(state.networks[index].key),
                        driver: "bridge".to_owned(),
                        attachable: true,
                        options: options.clone(),
                    }
                }
            })
        })
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        self.call(Op::InspectNetwork, |state, _| Ok(state.network_named(name)))
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        self.call(Op::ImagePresent, |state, _| {
            Ok(state
                .images
                .get(&normalize_image(image))
                .is_some_and(|flags| flags.present))
        })
    }

    async fn pull_image(&self, image: &str) -> Result<(), EngineError> {
        self.call(Op::Pull, |state, _| {
            let flags = state.image_mut(image);
            if !flags.pullable {
                return Err(EngineError::ImageNotFound {
                    image: image.to_owned(),
                    message: format!(
                        "pull access denied for {image}, repository does not exist or may require 'docker login'"
                    ),
                });
            }
            flags.present = true;
            Ok(())
        })
    }

    fn events(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        self.subscribe(filter, since_nanos)
    }
}
