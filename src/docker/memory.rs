//! An in-memory [`Engine`]: a simulated Docker engine for property tests,
//! large simulations and fault injection.
//!
//! It keeps the trait's contract the way the real engine does (see the
//! [module docs](super)): names are unique and valid, `start`/`stop` of a
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

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use super::{
    ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError, EngineEvent,
    EngineVersion, ObservedContainer, ResourceLimits, RunState, LABEL_INSTANCE, LABEL_MANAGED,
    LABEL_USER_ID,
};
use crate::status::Health;

/// What the engine calls itself in [`EngineError::Unreachable`].
const HOST: &str = "memory://";
/// Events kept for `since` replays, like the real engine.
const RECENT_EVENTS: usize = 256;
/// Events buffered per subscriber before it is dropped as lagging.
const DEFAULT_EVENT_CAPACITY: usize = 4096;
/// Docker's exit code of a container whose start failed.
const EXIT_START_FAILED: i64 = 128;
/// Exit code of a process ended by SIGKILL.
const EXIT_KILLED: i64 = 137;
/// Exit code of a process that shut down cleanly on `docker stop`.
const EXIT_STOPPED: i64 = 0;
/// Salts that keep container and network ids apart.
const CONTAINER_SALT: u64 = 0x6d65_6d6f_7279_6374;
const NETWORK_SALT: u64 = 0x6d65_6d6f_7279_6e77;

/// The engine operations, for counting calls and injecting failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Engine::version`].
    Version,
    /// [`Engine::list_containers`].
    List,
    /// [`Engine::inspect_container`].
    Inspect,
    /// [`Engine::create_container`].
    Create,
    /// [`Engine::start_container`].
    Start,
    /// [`Engine::stop_container`].
    Stop,
    /// [`Engine::restart_container`].
    Restart,
    /// [`Engine::remove_container`].
    Remove,
    /// [`Engine::rename_container`].
    Rename,
    /// [`Engine::ensure_volume`].
    EnsureVolume,
    /// [`Engine::ensure_network`].
    EnsureNetwork,
    /// [`Engine::image_present`].
    ImagePresent,
    /// [`Engine::pull_image`].
    Pull,
    /// [`Engine::events`].
    Events,
}

impl Op {
    /// Every operation, in declaration order.
    pub const ALL: [Op; 14] = [
        Op::Version,
        Op::List,
        Op::Inspect,
        Op::Create,
        Op::Start,
        Op::Stop,
        Op::Restart,
        Op::Remove,
        Op::Rename,
        Op::EnsureVolume,
        Op::EnsureNetwork,
        Op::ImagePresent,
        Op::Pull,
        Op::Events,
    ];

    /// The operation's name in error messages (`start`, `volume create`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Version => "version",
            Op::List => "list",
            Op::Inspect => "inspect",
            Op::Create => "create",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::Remove => "remove",
            Op::Rename => "rename",
            Op::EnsureVolume => "volume create",
            Op::EnsureNetwork => "network create",
            Op::ImagePresent => "image inspect",
            Op::Pull => "pull",
            Op::Events => "events",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

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

    // ---- images, ports, networks, volumes -------------------------------

    /// Makes `image` present locally (as after a build or a pull).
    pub fn add_image(&self, image: &str) {
        self.lock().image_mut(image).present = true;
    }

    /// Removes `image` like `docker rmi --force`: containers made from it
    /// keep running. Returns whether it was present.
    pub fn remove_image(&self, image: &str) -> bool {
        std::mem::take(&mut self.lock().image_mut(image).present)
    }

    /// Lets [`Engine::pull_image`] fetch `image` from the registry.
    pub fn make_pullable(&self, image: &str) {
        self.lock().image_mut(image).pullable = true;
    }

    /// Says whether `image` has a Docker HEALTHCHECK; containers created from
    /// it afterwards report health `starting` once started.
    pub fn set_image_healthcheck(&self, image: &str, has_healthcheck: bool) {
        self.lock().image_mut(image).healthcheck = has_healthcheck;
    }

    /// The images present locally, normalized (`docker.io/library/alpine:latest`), sorted.
    pub fn images(&self) -> Vec<String> {
        let state = self.lock();
        let mut images: Vec<String> = state
            .images
            .iter()
            .filter(|(_, flags)| flags.present)
            .map(|(image, _)| image.clone())
            .collect();
        images.sort();
        images
    }

    /// Marks `port` on `ip` (all interfaces when `None`) as held by a process
    /// outside Docker, so a container publishing it cannot start.
    pub fn occupy_port(&self, ip: Option<IpAddr>, port: u16) {
        self.lock()
            .foreign_ports
            .insert((port, ip.unwrap_or(ANY_V4)));
    }

    /// Frees a port taken with [`occupy_port`](Self::occupy_port).
    pub fn release_port(&self, ip: Option<IpAddr>, port: u16) {
        self.lock()
            .foreign_ports
            .remove(&(port, ip.unwrap_or(ANY_V4)));
    }

    /// Adds another network called `name`, as engines before 25 allowed;
    /// returns its id.
    pub fn add_duplicate_network(&self, name: &str) -> String {
        let mut state = self.lock();
        let index = state.add_network(name, &BTreeMap::new());
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
        let state = self.lock();
        let volume = state.volumes.get(name)?;
        Some(volume.0.label_map(&state.interner))
    }

    // ---- a human with the docker CLI -------------------------------------

    /// Creates a container as `docker create` (and `docker start` when
    /// `running`) by someone else would: labels as in `spec`, no check that
    /// the image or network exists. Returns its id; when the start fails
    /// (port taken) the container stays created and the error is returned.
    pub fn insert_container(
        &self,
        spec: &ContainerSpec,
        running: bool,
    ) -> Result<String, EngineError> {
        let mut state = self.lock();
        let now = (self.clock)();
        let slot = state.create(spec, false, now)?;
        let id = render_id(state.container(slot).key);
        if running {
            state.start(slot, now)?;
        }
        Ok(id)
    }

    /// Inserts a container without clawfleet's labels, volume, network or
    /// published port, like one the original service made. Returns its id.
    pub fn insert_unlabelled(
        &self,
        name: &str,
        image: &str,
        running: bool,
    ) -> Result<String, EngineError> {
        let spec = ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            env: Vec::new(),
            labels: BTreeMap::new(),
            volume: String::new(),
            network: String::new(),
            publish: None,
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
        };
        self.insert_container(&spec, running)
    }

    /// Makes a running container exit on its own with `exit_code` (emits `die`).
    pub fn crash(&self, name_or_id: &str, exit_code: i64) -> Result<(), EngineError> {
        let mut state = self.lock();
        let now = (self.clock)();
        let slot = state.require_running("crash", name_or_id)?;
        state.end_run(slot, exit_code, &["die"], now);
        Ok(())
    }

    /// `docker kill`: the container exits with 137 (emits `kill`, `die`).
    pub fn kill(&self, name_or_id: &str) -> Result<(), EngineError> {
        let mut state = self.lock();
        let now = (self.clock)();
        let slot = state.require_running("kill", name_or_id)?;
        state.end_run(slot, EXIT_KILLED, &["kill", "die"], now);
        Ok(())
    }

    /// Sets the health of a running container whose image has a health
    /// check; a change to healthy or unhealthy emits `health_status: ...`.
    pub fn set_health(&self, name_or_id: &str, health: Health) -> Result<(), EngineError> {
        let mut state = self.lock();
        let now = (self.clock)();
        let slot = state.require_running("health", name_or_id)?;
        state.set_health(slot, health, now)
    }

    /// `docker rm --force` by someone else; a missing container is [`EngineError::NotFound`].
    pub fn remove_out_of_band(&self, name_or_id: &str) -> Result<(), EngineError> {
        let mut state = self.lock();
        let now = (self.clock)();
        let slot = state.require("rm", name_or_id)?;
        state.remove(slot, now);
        Ok(())
    }

    // ---- snapshots and counters -------------------------------------------

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

    /// How many times `op` was called, failed calls included.
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls[op.index()]
    }

    /// Sets every call counter back to zero.
    pub fn reset_calls(&self) {
        self.lock().calls = [0; Op::ALL.len()];
    }

    /// How many event subscriptions are open.
    pub fn event_subscribers(&self) -> usize {
        self.lock().events.sender.receiver_count()
    }

    // ---- faults ----------------------------------------------------------

    /// Makes the next call of `op` fail with `error`, without effect.
    /// Several calls queue several failures.
    pub fn fail_next(&self, op: Op, error: EngineError) {
        self.lock().faults[op.index()].push_back(Fault {
            error,
            after_effect: false,
        });
    }

    /// Makes the next call of `op` take effect and then fail with `error`, as
    /// when the engine acts but the reply is lost. A call that fails anyway
    /// uses it up. For [`Op::Events`] it is the same as [`fail_next`](Self::fail_next).
    pub fn lose_next_reply(&self, op: Op, error: EngineError) {
        self.lock().faults[op.index()].push_back(Fault {
            error,
            after_effect: true,
        });
    }

    /// While `true`, every call fails with [`EngineError::Unreachable`];
    /// turning it on also cuts the open event streams.
    pub fn set_unreachable(&self, unreachable: bool) {
        let mut state = self.lock();
        state.unreachable = unreachable;
        if unreachable {
            state.events.cut_all();
        }
    }

    /// Ends every open event subscription with an [`EngineError::Unreachable`]
    /// item, as a cut connection would; later subscriptions work.
    pub fn break_event_streams(&self) {
        self.lock().events.cut_all();
    }

    /// Sets what [`Engine::version`] reports.
    pub fn set_version(&self, version: EngineVersion) {
        self.lock().version = version;
    }

    // ---- internals ---------------------------------------------------------

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
        let lost_reply = state.admit(op)?;
        let now = (self.clock)();
        let result = body(&mut state, now);
        match lost_reply {
            Some(error) if result.is_ok() => Err(error),
            _ => result,
        }
    }

    fn subscribe(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        let mut state = self.lock();
        match state.admit(Op::Events) {
            Err(error) | Ok(Some(error)) => return stream::iter([Err(error)]).boxed(),
            Ok(None) => {}
        }
        let backlog = since_nanos.map_or_else(VecDeque::new, |since| {
            state
                .events
                .recent
                .iter()
                .filter(|record| record.event.time_nanos >= since && record.matches(filter))
                .map(|record| record.event.clone())
                .collect()
        });
        let subscription = Subscription {
            filter: filter.clone(),
            backlog,
            live: state.events.sender.subscribe(),
            cut: state.events.cut.subscribe(),
        };
        drop(state);
        subscription.into_stream()
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
    ) -> Result<(), EngineError> {
        self.call(Op::EnsureVolume, |state, _| {
            state.ensure_volume(name, labels)
        })
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        self.call(Op::EnsureNetwork, |state, _| {
            let index = match state.networks.iter().position(|n| n.record.name() == name) {
                Some(oldest) => oldest,
                None => state.add_network(name, labels),
            };
            Ok(render_id(state.networks[index].key))
        })
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

// ---- state ------------------------------------------------------------------

/// An interned string: a label key or an image reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Sym(u32);

/// Reference-counted interning of the few strings every object shares:
/// label keys and image references.
#[derive(Default)]
struct Interner {
    entries: Vec<Option<Interned>>,
    free: Vec<u32>,
    index: HashMap<Arc<str>, Sym>,
}

struct Interned {
    text: Arc<str>,
    refs: u32,
}

impl Interner {
    fn intern(&mut self, text: &str) -> Sym {
        if let Some(&sym) = self.index.get(text) {
            self.entry_mut(sym).refs += 1;
            return sym;
        }
        let text: Arc<str> = Arc::from(text);
        let entry = Interned {
            text: Arc::clone(&text),
            refs: 1,
        };
        let sym = match self.free.pop() {
            Some(free) => {
                self.entries[free as usize] = Some(entry);
                Sym(free)
            }
            None => {
                self.entries.push(Some(entry));
                Sym(u32::try_from(self.entries.len() - 1).expect("fewer than 2^32 strings"))
            }
        };
        self.index.insert(text, sym);
        sym
    }

    fn release(&mut self, sym: Sym) {
        let entry = self.entry_mut(sym);
        entry.refs -= 1;
        if entry.refs == 0 {
            if let Some(gone) = self.entries[sym.0 as usize].take() {
                self.index.remove(&*gone.text);
            }
            self.free.push(sym.0);
        }
    }

    fn resolve(&self, sym: Sym) -> &str {
        &self.entry(sym).text
    }

    fn entry(&self, sym: Sym) -> &Interned {
        self.entries[sym.0 as usize]
            .as_ref()
            .expect("a live symbol")
    }

    fn entry_mut(&mut self, sym: Sym) -> &mut Interned {
        self.entries[sym.0 as usize]
            .as_mut()
            .expect("a live symbol")
    }

    /// Number of distinct live strings.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }
}

/// A name and its labels in one allocation: how every object is stored.
///
/// Layout: `name_len: u32`, `count: u32`, `count` entries of `(key: Sym,
/// value_end: u32)` in key order (little-endian; ends are offsets into the
/// values), the name's bytes, then the values' bytes back to back. Keys are
/// few and shared by every object, so they are interned; values are mostly
/// the object's own (user id, spec hash) or tiny (`true`), so interning them
/// would cost more than it saves.
///
/// A record holds one interner reference per key, given back by
/// [`release`](Self::release) (or handed on by [`renamed`](Self::renamed)).
struct Record(Box<[u8]>);

impl Record {
    const HEADER: usize = 8;
    const ENTRY: usize = 8;

    fn new(interner: &mut Interner, name: &str, labels: &BTreeMap<String, String>) -> Self {
        let values: usize = labels.values().map(String::len).sum();
        let mut bytes =
            Vec::with_capacity(Self::HEADER + Self::ENTRY * labels.len() + name.len() + values);
        bytes.extend(word(name.len()));
        bytes.extend(word(labels.len()));
        let mut end = 0;
        for (key, value) in labels {
            end += value.len();
            bytes.extend(interner.intern(key).0.to_le_bytes());
            bytes.extend(word(end));
        }
        bytes.extend(name.as_bytes());
        for value in labels.values() {
            bytes.extend(value.as_bytes());
        }
        Self(bytes.into_boxed_slice())
    }

    /// The same labels under `name`; the interner references move to the new record.
    fn renamed(self, name: &str) -> Self {
        let (head, _) = self.0.split_at(self.name_start());
        let values = &self.0[self.values_start()..];
        let mut bytes = Vec::with_capacity(head.len() + name.len() + values.len());
        bytes.extend(word(name.len()));
        bytes.extend(&head[4..]);
        bytes.extend(name.as_bytes());
        bytes.extend(values);
        Self(bytes.into_boxed_slice())
    }

    /// Gives back the record's interner references.
    fn release(self, interner: &mut Interner) {
        for (key, _) in self.labels() {
            interner.release(key);
        }
    }

    fn name(&self) -> &str {
        text(&self.0[self.name_start()..self.values_start()])
    }

    fn label(&self, key: Sym) -> Option<&str> {
        self.labels()
            .find(|&(k, _)| k == key)
            .map(|(_, value)| value)
    }

    fn labels(&self) -> impl Iterator<Item = (Sym, &str)> + '_ {
        let values = &self.0[self.values_start()..];
        let mut begin = 0;
        (0..self.count()).map(move |index| {
            let at = Self::HEADER + Self::ENTRY * index;
            let end = self.read(at + 4) as usize;
            let value = text(&values[begin..end]);
            begin = end;
            (Sym(self.read(at)), value)
        })
    }

    fn label_map(&self, interner: &Interner) -> BTreeMap<String, String> {
        self.labels()
            .map(|(key, value)| (interner.resolve(key).to_owned(), value.to_owned()))
            .collect()
    }

    fn read(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("four bytes"))
    }

    fn count(&self) -> usize {
        self.read(4) as usize
    }

    fn name_start(&self) -> usize {
        Self::HEADER + Self::ENTRY * self.count()
    }

    fn values_start(&self) -> usize {
        self.name_start() + self.read(0) as usize
    }
}

/// A length or offset as stored in a [`Record`].
fn word(n: usize) -> [u8; 4] {
    u32::try_from(n)
        .expect("labels smaller than 4 GiB")
        .to_le_bytes()
}

/// Bytes a [`Record`] copied from a `&str`, cut at the same boundaries.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("cut from a str at its boundaries")
}

/// A volume, equal to, hashed as and borrowed as its name, so the set of
/// volumes is keyed by name without storing the name twice.
struct Volume(Record);

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

/// A stable 64-bit hash of a string, for ordered indexes that must not store it.
fn text_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Symbols of the label keys the engine itself reads; pinned for its life.
struct Known {
    managed: Sym,
    instance: Sym,
    user_id: Sym,
}

struct Container {
    /// The first 64 bits of the id; the rest is derived from it.
    key: u64,
    /// Name and labels.
    record: Record,
    image: Sym,
    publish: Option<(IpAddr, u16)>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    exit_code: i64,
    state: RunState,
    health: Option<Health>,
    has_healthcheck: bool,
}

impl Container {
    fn name(&self) -> &str {
        self.record.name()
    }
}

struct Network {
    key: u64,
    record: Record,
}

#[derive(Clone, Copy, Default)]
struct ImageFlags {
    present: bool,
    pullable: bool,
    healthcheck: bool,
}

struct Fault {
    error: EngineError,
    after_effect: bool,
}

/// The outcome of resolving a name, id or id prefix.
enum Found {
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

struct State {
    interner: Interner,
    known: Known,
    /// Containers by slot; a slot is reused after removal.
    slots: Vec<Option<Container>>,
    free_slots: Vec<u32>,
    /// `(hash of name, slot)`; the name itself lives in the container's record.
    by_name: BTreeSet<(u64, u32)>,
    by_id: BTreeMap<u64, u32>,
    /// `(hash of instance, hash of user id or 0, slot)` of every container
    /// labelled `managed=true` with an instance: what `list_containers` reads.
    by_owner: BTreeSet<(u64, u64, u32)>,
    /// Host bindings of running containers, by `(port, address)`.
    bound_ports: BTreeMap<(u16, IpAddr), u32>,
    foreign_ports: BTreeSet<(u16, IpAddr)>,
    containers_made: u64,
    volumes: HashSet<Volume>,
    /// Oldest first.
    networks: Vec<Network>,
    networks_made: u64,
    /// By normalized reference.
    images: HashMap<String, ImageFlags>,
    events: EventLog,
    calls: [u64; Op::ALL.len()],
    faults: [VecDeque<Fault>; Op::ALL.len()],
    unreachable: bool,
    version: EngineVersion,
}

impl State {
    fn new(event_capacity: usize) -> Self {
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
            unreachable: false,
            version: EngineVersion {
                version: "28.0.0".to_owned(),
                api_version: "1.48".to_owned(),
            },
        }
    }

    /// Counts a call of `op` and applies unreachability and the next
    /// injected fault: `Err` fails the call now, `Ok(Some)` after its effect.
    fn admit(&mut self, op: Op) -> Result<Option<EngineError>, EngineError> {
        self.calls[op.index()] += 1;
        if self.unreachable {
            return Err(EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "connection refused".to_owned(),
            });
        }
        match self.faults[op.index()].pop_front() {
            None => Ok(None),
            Some(Fault {
                error,
                after_effect: false,
            }) => Err(error),
            Some(Fault {
                error,
                after_effect: true,
            }) => Ok(Some(error)),
        }
    }

    fn image_mut(&mut self, image: &str) -> &mut ImageFlags {
        self.images.entry(normalize_image(image)).or_default()
    }

    // ---- lookup ---------------------------------------------------------------

    fn container(&self, slot: u32) -> &Container {
        self.slots[slot as usize].as_ref().expect("a live slot")
    }

    fn container_mut(&mut self, slot: u32) -> &mut Container {
        self.slots[slot as usize].as_mut().expect("a live slot")
    }

    fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, container)| container.is_some())
            .map(|(slot, _)| slot as u32)
    }

    fn slot_named(&self, name: &str) -> Option<u32> {
        let hash = text_hash(name);
        self.by_name
            .range((hash, 0)..=(hash, u32::MAX))
            .map(|&(_, slot)| slot)
            .find(|&slot| self.container(slot).name() == name)
    }

    /// Resolves like Docker: a full id, then an exact name (a leading `/`
    /// allowed), then a unique id prefix.
    fn find(&self, target: &str) -> Found {
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

    fn require(&self, op: &'static str, target: &str) -> Result<u32, EngineError> {
        match self.find(target) {
            Found::One(slot) => Ok(slot),
            Found::Missing => Err(EngineError::NotFound {
                op,
                target: target.to_owned(),
            }),
            Found::Ambiguous => Err(ambiguous_prefix(op, target)),
        }
    }

    fn require_running(&self, op: &'static str, target: &str) -> Result<u32, EngineError> {
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
    fn find_network(&self, term: &str) -> Found {
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

    // ---- containers -----------------------------------------------------------

    /// Creates a container; `checked` applies the image and network checks
    /// of a `create` call (out-of-band inserts skip them).
    fn create(
        &mut self,
        spec: &ContainerSpec,
        checked: bool,
        now: DateTime<Utc>,
    ) -> Result<u32, EngineError> {
        let flags = self
            .images
            .get(&normalize_image(&spec.image))
            .copied()
            .unwrap_or_default();
        if checked && !flags.present {
            return Err(EngineError::ImageNotFound {
                image: spec.image.clone(),
                message: format!("No such image: {}", spec.image),
            });
        }
        let name = self.name_for(&spec.name)?;
        if checked && !spec.network.is_empty() {
            let refusal = |status: u16, message: String| EngineError::Api {
                op: "create",
                target: name.clone(),
                status,
                message,
            };
            match self.find_network(&spec.network) {
                Found::One(_) => {}
                Found::Missing => {
                    return Err(refusal(404, format!("network {} not found", spec.network)))
                }
                Found::Ambiguous => {
                    return Err(refusal(
                        400,
                        format!(
                            "network {} is ambiguous (several matches found based on name)",
                            spec.network
                        ),
                    ))
                }
            }
        }
        if !spec.volume.is_empty() {
            check_volume_name("create", &spec.volume)?;
            // Docker creates a missing named volume on create, without labels.
            if !self.volumes.contains(spec.volume.as_str()) {
                let record = Record::new(&mut self.interner, &spec.volume, &BTreeMap::new());
                self.volumes.insert(Volume(record));
            }
        }
        self.containers_made += 1;
        let key = id_key(CONTAINER_SALT, self.containers_made);
        let record = Record::new(&mut self.interner, &name, &spec.labels);
        let owner = self.owner(&record);
        let container = Container {
            key,
            record,
            image: self.interner.intern(&spec.image),
            publish: spec.publish,
            started_at: None,
            finished_at: None,
            exit_code: 0,
            state: RunState::Created,
            health: None,
            has_healthcheck: flags.healthcheck,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(container);
                slot
            }
            None => {
                self.slots.push(Some(container));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 containers")
            }
        };
        self.by_name.insert((text_hash(&name), slot));
        self.by_id.insert(key, slot);
        if let Some((instance, user)) = owner {
            self.by_owner.insert((instance, user, slot));
        }
        self.emit(slot, "create", now);
        Ok(slot)
    }

    /// The name a new container takes: `requested` checked like Docker, or a
    /// generated one when empty.
    fn name_for(&self, requested: &str) -> Result<String, EngineError> {
        let requested = requested.strip_prefix('/').unwrap_or(requested);
        if requested.is_empty() {
            let mut n = self.containers_made + 1;
            loop {
                let generated = format!("memory_{n}");
                if self.slot_named(&generated).is_none() {
                    return Ok(generated);
                }
                n += 1;
            }
        }
        check_container_name("create", requested)?;
        if self.slot_named(requested).is_some() {
            return Err(EngineError::NameConflict {
                name: requested.to_owned(),
            });
        }
        Ok(requested.to_owned())
    }

    /// A container's key in `by_owner`, when it is labelled `managed=true`
    /// with an instance.
    fn owner(&self, record: &Record) -> Option<(u64, u64)> {
        if record.label(self.known.managed) != Some("true") {
            return None;
        }
        let instance = record.label(self.known.instance)?;
        let user = record.label(self.known.user_id).map_or(0, text_hash);
        Some((text_hash(instance), user))
    }

    fn start(&mut self, slot: u32, now: DateTime<Utc>) -> Result<(), EngineError> {
        let container = self.container(slot);
        if container.state == RunState::Running {
            return Ok(());
        }
        if let Some((ip, port)) = container.publish {
            if let Some(message) = self.port_conflict(slot, ip, port) {
                let container = self.container_mut(slot);
                if container.exit_code == 0 {
                    container.exit_code = EXIT_START_FAILED;
                }
                return Err(EngineError::PortAllocated {
                    port: Some(port),
                    message,
                });
            }
            self.bound_ports.insert((port, ip), slot);
        }
        let container = self.container_mut(slot);
        container.state = RunState::Running;
        container.started_at = Some(now);
        container.exit_code = 0;
        container.health = container.has_healthcheck.then_some(Health::Starting);
        self.emit(slot, "start", now);
        Ok(())
    }

    /// Why `slot` cannot bind `ip:port`, in the engine's words, if it cannot.
    fn port_conflict(&self, slot: u32, ip: IpAddr, port: u16) -> Option<String> {
        let ranges = overlapping_bindings(ip, port);
        let address = SocketAddr::new(ip, port);
        let held_by_container = ranges.iter().any(|range| {
            self.bound_ports
                .range(range.clone())
                .any(|(_, &holder)| holder != slot)
        });
        if held_by_container {
            let container = self.container(slot);
            return Some(format!(
                "driver failed programming external connectivity on endpoint {} ({}): Bind for {address} failed: port is already allocated",
                container.name(),
                render_id(container.key),
            ));
        }
        let held_by_process = ranges
            .into_iter()
            .any(|range| self.foreign_ports.range(range).next().is_some());
        held_by_process
            .then(|| format!("failed to bind host port for {address}: address already in use"))
    }

    /// `docker stop`: a running container exits cleanly; any other is left alone.
    fn stop(&mut self, slot: u32, now: DateTime<Utc>) {
        if self.container(slot).state == RunState::Running {
            self.end_run(slot, EXIT_STOPPED, &["kill", "die", "stop"], now);
        }
    }

    /// Ends the run of a running container with `exit_code`, emitting `actions`.
    fn end_run(&mut self, slot: u32, exit_code: i64, actions: &[&'static str], now: DateTime<Utc>) {
        let container = self.slots[slot as usize].as_mut().expect("a live slot");
        if let Some((ip, port)) = container.publish {
            if self.bound_ports.get(&(port, ip)) == Some(&slot) {
                self.bound_ports.remove(&(port, ip));
            }
        }
        container.state = RunState::Exited;
        container.exit_code = exit_code;
        container.finished_at = Some(now);
        // Docker reports a stopped health monitor as unhealthy.
        container.health = container.has_healthcheck.then_some(Health::Unhealthy);
        for action in actions {
            self.emit(slot, action, now);
        }
    }

    /// `docker rm --force`: kills a running container, then removes it; volumes stay.
    fn remove(&mut self, slot: u32, now: DateTime<Utc>) {
        if self.container(slot).state == RunState::Running {
            self.end_run(slot, EXIT_KILLED, &["kill", "die"], now);
        }
        self.emit(slot, "destroy", now);
        let container = self.slots[slot as usize].take().expect("a live slot");
        self.by_name.remove(&(text_hash(container.name()), slot));
        self.by_id.remove(&container.key);
        if let Some((instance, user)) = self.owner(&container.record) {
            self.by_owner.remove(&(instance, user, slot));
        }
        container.record.release(&mut self.interner);
        self.interner.release(container.image);
        self.free_slots.push(slot);
    }

    fn rename(&mut self, slot: u32, new_name: &str, now: DateTime<Utc>) -> Result<(), EngineError> {
        let new_name = new_name.strip_prefix('/').unwrap_or(new_name);
        check_container_name("rename", new_name)?;
        if self.container(slot).name() == new_name {
            return Err(EngineError::Api {
                op: "rename",
                target: new_name.to_owned(),
                status: 400,
                message: "Renaming a container with the same name as its current name".to_owned(),
            });
        }
        if self.slot_named(new_name).is_some() {
            return Err(EngineError::NameConflict {
                name: new_name.to_owned(),
            });
        }
        let container = self.container_mut(slot);
        let old_hash = text_hash(container.name());
        let record = std::mem::replace(&mut container.record, Record(Box::default()));
        container.record = record.renamed(new_name);
        self.by_name.remove(&(old_hash, slot));
        self.by_name.insert((text_hash(new_name), slot));
        self.emit(slot, "rename", now);
        Ok(())
    }

    fn set_health(
        &mut self,
        slot: u32,
        health: Health,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let container = self.container_mut(slot);
        if !container.has_healthcheck {
            return Err(EngineError::Api {
                op: "health",
                target: container.name().to_owned(),
                status: 409,
                message: "the container's image has no health check".to_owned(),
            });
        }
        let changed = container.health.replace(health) != Some(health);
        // Docker announces results of probes, never the initial `starting`.
        let action = match health {
            Health::Starting => None,
            Health::Healthy => Some("health_status: healthy"),
            Health::Unhealthy => Some("health_status: unhealthy"),
        };
        if let Some(action) = action.filter(|_| changed) {
            self.emit(slot, action, now);
        }
        Ok(())
    }

    fn observe(&self, slot: u32) -> ObservedContainer {
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
        }
    }

    fn list(&self, filter: &ContainerFilter) -> Vec<ContainerSummary> {
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
            .map(|container| ContainerSummary {
                id: render_id(container.key),
                name: container.name().to_owned(),
                labels: container.record.label_map(&self.interner),
                state: container.state,
            })
            .collect()
    }

    // ---- volumes and networks ---------------------------------------------------

    fn ensure_volume(
        &mut self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        check_volume_name("volume create", name)?;
        if !self.volumes.contains(name) {
            let record = Record::new(&mut self.interner, name, labels);
            self.volumes.insert(Volume(record));
        }
        Ok(())
    }

    fn add_network(&mut self, name: &str, labels: &BTreeMap<String, String>) -> usize {
        self.networks_made += 1;
        let record = Record::new(&mut self.interner, name, labels);
        self.networks.push(Network {
            key: id_key(NETWORK_SALT, self.networks_made),
            record,
        });
        self.networks.len() - 1
    }

    // ---- events -----------------------------------------------------------------

    fn emit(&mut self, slot: u32, action: &'static str, now: DateTime<Utc>) {
        let container = self.container(slot);
        let record = &container.record;
        let event = EngineEvent {
            user_id: record.label(self.known.user_id).map(str::to_owned),
            action: action.to_owned(),
            container_id: render_id(container.key),
            time_nanos: 0,
        };
        let instance = record.label(self.known.instance).map(Box::from);
        let managed = record.label(self.known.managed) == Some("true");
        self.events.publish(event, instance, managed, now);
    }
}

/// One event as stored and broadcast, with what subscribers filter on.
struct Recorded {
    event: EngineEvent,
    instance: Option<Box<str>>,
    managed: bool,
}

impl Recorded {
    fn matches(&self, filter: &ContainerFilter) -> bool {
        self.managed
            && self.instance.as_deref() == Some(filter.instance.as_str())
            && filter
                .user_id
                .as_ref()
                .is_none_or(|user| self.event.user_id.as_ref() == Some(user))
    }
}

struct EventLog {
    /// Live subscribers; a lagging one is dropped by the channel, not waited for.
    sender: broadcast::Sender<Arc<Recorded>>,
    /// The last [`RECENT_EVENTS`] events, for `since`.
    recent: VecDeque<Arc<Recorded>>,
    /// Bumped to cut every open subscription.
    cut: watch::Sender<u64>,
    last_nanos: i64,
}

impl EventLog {
    fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
            recent: VecDeque::with_capacity(RECENT_EVENTS),
            cut: watch::Sender::new(0),
            last_nanos: i64::MIN,
        }
    }

    fn publish(
        &mut self,
        mut event: EngineEvent,
        instance: Option<Box<str>>,
        managed: bool,
        now: DateTime<Utc>,
    ) {
        // Never backwards, so `since` = the last time seen never skips an event.
        let nanos = now
            .timestamp_nanos_opt()
            .unwrap_or(i64::MAX)
            .max(self.last_nanos);
        self.last_nanos = nanos;
        event.time_nanos = nanos;
        let record = Arc::new(Recorded {
            event,
            instance,
            managed,
        });
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(Arc::clone(&record));
        // No subscriber is not an error.
        let _ = self.sender.send(record);
    }

    fn cut_all(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}

/// One open event stream: the replayed backlog, then live events.
struct Subscription {
    filter: ContainerFilter,
    backlog: VecDeque<EngineEvent>,
    live: broadcast::Receiver<Arc<Recorded>>,
    cut: watch::Receiver<u64>,
}

impl Subscription {
    fn into_stream(self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        // The stream ends after its first error, like a dropped connection,
        // and stays ended however often it is polled.
        stream::unfold(Some(self), |subscription| async move {
            let mut subscription = subscription?;
            let item = subscription.next_item().await?;
            let open = item.is_ok();
            Some((item, open.then_some(subscription)))
        })
        .fuse()
        .boxed()
    }

    async fn next_item(&mut self) -> Option<Result<EngineEvent, EngineError>> {
        match self.cut.has_changed() {
            Ok(true) => return Some(Err(stream_cut())),
            Ok(false) => {}
            Err(_) => return None,
        }
        if let Some(event) = self.backlog.pop_front() {
            return Some(Ok(event));
        }
        loop {
            tokio::select! {
                biased;
                changed = self.cut.changed() => return changed.ok().map(|()| Err(stream_cut())),
                received = self.live.recv() => match received {
                    Ok(record) if record.matches(&self.filter) => return Some(Ok(record.event.clone())),
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        return Some(Err(EngineError::Unreachable {
                            host: HOST.to_owned(),
                            message: format!(
                                "event subscriber dropped after falling {missed} events behind"
                            ),
                        }))
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

fn stream_cut() -> EngineError {
    EngineError::Unreachable {
        host: HOST.to_owned(),
        message: "event stream cut".to_owned(),
    }
}

fn ambiguous_prefix(op: &'static str, target: &str) -> EngineError {
    EngineError::Api {
        op,
        target: target.to_owned(),
        status: 400,
        message: format!("multiple IDs found with provided prefix: {target}"),
    }
}

// ---- ids, names, images, addresses --------------------------------------------

/// The unspecified IPv4 address: "all interfaces".
const ANY_V4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// SplitMix64's finalizer: a bijection of `u64`, so distinct counters give distinct keys.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn id_key(salt: u64, counter: u64) -> u64 {
    mix(counter ^ salt)
}

/// The four 64-bit words of the id whose first word is `key`.
fn id_parts(key: u64) -> [u64; 4] {
    [
        key,
        mix(key ^ 0x1111_1111_1111_1111),
        mix(key ^ 0x2222_2222_2222_2222),
        mix(key ^ 0x3333_3333_3333_3333),
    ]
}

/// The 64-hex-digit id of `key`.
fn render_id(key: u64) -> String {
    let [a, b, c, d] = id_parts(key);
    format!("{a:016x}{b:016x}{c:016x}{d:016x}")
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key of a full id (lowercase hex, 64 digits).
fn id_head(id: &str) -> u64 {
    u64::from_str_radix(&id[..16], 16).unwrap_or(0)
}

/// The keys whose ids can start with `prefix` (lowercase hex, 1 to 63 digits).
fn id_head_range(prefix: &str) -> (u64, u64) {
    let head = &prefix[..prefix.len().min(16)];
    let value = u64::from_str_radix(head, 16).unwrap_or(0);
    let free_bits = 64 - 4 * head.len() as u32;
    if free_bits == 0 {
        return (value, value);
    }
    let low = value << free_bits;
    (low, low | (u64::MAX >> (64 - free_bits)))
}

/// True when the id of `key` starts with `prefix` (lowercase hex, at most 64 digits).
fn id_has_prefix(key: u64, prefix: &str) -> bool {
    prefix
        .as_bytes()
        .chunks(16)
        .zip(id_parts(key))
        .all(|(chunk, word)| {
            let value = std::str::from_utf8(chunk)
                .ok()
                .and_then(|text| u64::from_str_radix(text, 16).ok());
            let shift = 64 - 4 * chunk.len() as u32;
            value == Some(word >> shift)
        })
}

/// Docker's rule for container and local volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
fn is_valid_object_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_container_name(op: &'static str, name: &str) -> Result<(), EngineError> {
    if is_valid_object_name(name) {
        return Ok(());
    }
    Err(EngineError::Api {
        op,
        target: name.to_owned(),
        status: 400,
        message: format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        ),
    })
}

fn check_volume_name(op: &'static str, name: &str) -> Result<(), EngineError> {
    if is_valid_object_name(name) {
        return Ok(());
    }
    Err(EngineError::Api {
        op,
        target: name.to_owned(),
        status: 400,
        message: format!(
            "\"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed"
        ),
    })
}

/// The canonical form Docker stores an image under: `alpine` and
/// `docker.io/library/alpine:latest` are one image.
fn normalize_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let (repository, tag) = match name.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag)),
        _ => (name, None),
    };
    let (domain, path) = match repository.split_once('/') {
        Some((domain, path))
            if domain.contains('.') || domain.contains(':') || domain == "localhost" =>
        {
            (domain, path)
        }
        _ => ("docker.io", repository),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let mut normalized = if domain == "docker.io" && !path.contains('/') {
        format!("{domain}/library/{path}")
    } else {
        format!("{domain}/{path}")
    };
    match (tag, digest) {
        (Some(tag), _) => {
            normalized.push(':');
            normalized.push_str(tag);
        }
        (None, None) => normalized.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(digest) = digest {
        normalized.push('@');
        normalized.push_str(digest);
    }
    normalized
}

/// The `(port, address)` keys whose binding conflicts with binding `ip:port`:
/// the same address, or a wildcard covering either (`0.0.0.0` covers IPv4,
/// dual-stack `::` covers everything). Each range is a cheap index probe.
fn overlapping_bindings(ip: IpAddr, port: u16) -> Vec<RangeInclusive<(u16, IpAddr)>> {
    const ANY_V6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    const LAST_V4: IpAddr = IpAddr::V4(Ipv4Addr::BROADCAST);
    const LAST_V6: IpAddr = IpAddr::V6(Ipv6Addr::from_bits(u128::MAX));
    let only = |ip: IpAddr| (port, ip)..=(port, ip);
    match ip {
        IpAddr::V6(v6) if v6.is_unspecified() => vec![(port, ANY_V4)..=(port, LAST_V6)],
        IpAddr::V4(v4) if v4.is_unspecified() => {
            vec![(port, ANY_V4)..=(port, LAST_V4), only(ANY_V6)]
        }
        IpAddr::V4(_) => vec![only(ip), only(ANY_V4), only(ANY_V6)],
        IpAddr::V6(_) => vec![only(ip), only(ANY_V6)],
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use chrono::{DateTime, TimeZone, Utc};
    use futures::stream::BoxStream;
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::docker::{object_labels, shared_labels, LABEL_SPEC_HASH};

    const IMAGE: &str = "alpine/openclaw:latest";
    const NETWORK: &str = "mosaic-internal";
    const INSTANCE: &str = "default";
    const STOP: Duration = Duration::from_secs(10);
    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    type Events = BoxStream<'static, Result<EngineEvent, EngineError>>;

    fn spec(user: &str) -> ContainerSpec {
        spec_in(INSTANCE, user)
    }

    fn spec_in(instance: &str, user: &str) -> ContainerSpec {
        let name = format!("mosaic-user-{user}");
        let mut labels = object_labels(instance, user);
        labels.insert(LABEL_SPEC_HASH.to_owned(), format!("hash-{user}"));
        ContainerSpec {
            volume: format!("{name}-state"),
            name,
            image: IMAGE.to_owned(),
            env: Vec::new(),
            labels,
            network: NETWORK.to_owned(),
            publish: None,
            stop_timeout: STOP,
            limits: ResourceLimits::default(),
        }
    }

    fn published(mut spec: ContainerSpec, ip: IpAddr, port: u16) -> ContainerSpec {
        spec.publish = Some((ip, port));
        spec
    }

    fn filter(instance: &str, user_id: Option<&str>) -> ContainerFilter {
        ContainerFilter {
            instance: instance.to_owned(),
            user_id: user_id.map(str::to_owned),
        }
    }

    /// An engine with the default image and the agents' network.
    async fn ready(engine: MemoryEngine) -> MemoryEngine {
        engine.add_image(IMAGE);
        engine
            .ensure_network(NETWORK, &shared_labels(INSTANCE))
            .await
            .unwrap();
        engine
    }

    async fn engine() -> MemoryEngine {
        ready(MemoryEngine::new()).await
    }

    async fn running(engine: &MemoryEngine, spec: &ContainerSpec) -> String {
        let id = engine.create_container(spec).await.unwrap();
        engine.start_container(&id).await.unwrap();
        id
    }

    async fn inspect(engine: &MemoryEngine, name_or_id: &str) -> ObservedContainer {
        engine
            .inspect_container(name_or_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name_or_id} exists"))
    }

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct TestClock(Arc<Mutex<DateTime<Utc>>>);

    impl TestClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(
                Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            )))
        }

        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }

        fn advance(&self, seconds: i64) {
            *self.0.lock().unwrap() += chrono::Duration::seconds(seconds);
        }

        fn engine(&self) -> MemoryEngine {
            let clock = self.clone();
            MemoryEngine::new().with_clock(move || clock.now())
        }
    }

    /// Every item `events` has ready, without waiting; stops after the end.
    fn ready_items(events: &mut Events) -> (Vec<Result<EngineEvent, EngineError>>, bool) {
        let mut items = Vec::new();
        loop {
            match events.next().now_or_never() {
                Some(Some(item)) => items.push(item),
                Some(None) => return (items, true),
                None => return (items, false),
            }
        }
    }

    /// The actions of the events `events` has ready; panics on an error.
    fn ready_actions(events: &mut Events) -> Vec<String> {
        ready_items(events)
            .0
            .into_iter()
            .map(|item| item.expect("an event").action)
            .collect()
    }

    fn api_status(error: &EngineError) -> Option<u16> {
        match error {
            EngineError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    // ---- identity and lookup ------------------------------------------------

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

    // ---- create ----------------------------------------------------------------

    #[tokio::test]
    async fn create_of_a_name_in_use_is_a_name_conflict() {
        let engine = engine().await;
        engine.create_container(&spec("alice")).await.unwrap();

        let error = engine.create_container(&spec("alice")).await.unwrap_err();
        assert!(
            matches!(error, EngineError::NameConflict { ref name } if name == "mosaic-user-alice")
        );
        assert_eq!(engine.containers().len(), 1);
    }

    #[tokio::test]
    async fn create_of_a_missing_image_is_image_not_found_and_makes_nothing() {
        let engine = engine().await;
        let mut spec = spec("alice");
        spec.image = "ghcr.io/acme/absent:1".to_owned();

        let error = engine.create_container(&spec).await.unwrap_err();
        assert!(
            matches!(error, EngineError::ImageNotFound { ref image, .. } if *image == spec.image)
        );
        assert!(engine.containers().is_empty());
        assert!(engine.volumes().is_empty());
    }

    #[tokio::test]
    async fn create_on_a_missing_network_is_docker_s_404() {
        let engine = MemoryEngine::new();
        engine.add_image(IMAGE);

        let error = engine.create_container(&spec("alice")).await.unwrap_err();
        assert_eq!(api_status(&error), Some(404));
        assert!(error
            .to_string()
            .contains("network mosaic-internal not found"));
        assert!(engine.containers().is_empty());
    }

    #[tokio::test]
    async fn create_accepts_the_network_by_id_or_id_prefix() {
        let engine = MemoryEngine::new();
        engine.add_image(IMAGE);
        let network = engine
            .ensure_network(NETWORK, &shared_labels(INSTANCE))
            .await
            .unwrap();

        for (user, net) in [("byid", &network[..]), ("byprefix", &network[..12])] {
            let mut spec = spec(user);
            spec.network = net.to_owned();
            engine.create_container(&spec).await.unwrap();
        }
        assert_eq!(engine.containers().len(), 2);
    }

    #[tokio::test]
    async fn create_makes_a_missing_volume_without_labels_and_keeps_an_existing_one() {
        let engine = engine().await;
        let labelled = object_labels(INSTANCE, "alice");
        engine
            .ensure_volume("mosaic-user-alice-state", &labelled)
            .await
            .unwrap();

        engine.create_container(&spec("alice")).await.unwrap();
        engine.create_container(&spec("bob")).await.unwrap();

        assert_eq!(
            engine.volumes(),
            ["mosaic-user-alice-state", "mosaic-user-bob-state"]
        );
        assert_eq!(
            engine.volume_labels("mosaic-user-alice-state"),
            Some(labelled)
        );
        assert_eq!(
            engine.volume_labels("mosaic-user-bob-state"),
            Some(BTreeMap::new())
        );
    }

    #[tokio::test]
    async fn invalid_names_are_refused_like_docker_and_an_empty_one_is_generated() {
        let engine = engine().await;
        for bad in ["a", "-lead", "has space", "sl/ash", "ünï"] {
            let mut spec = spec("alice");
            spec.name = bad.to_owned();
            let error = engine.create_container(&spec).await.unwrap_err();
            assert_eq!(api_status(&error), Some(400), "{bad}");
        }
        let mut spec = spec("alice");
        spec.volume = "not/a/volume".to_owned();
        assert_eq!(
            api_status(&engine.create_container(&spec).await.unwrap_err()),
            Some(400)
        );
        assert!(engine.containers().is_empty());

        spec.volume = String::new();
        spec.name = String::new();
        let id = engine.create_container(&spec).await.unwrap();
        assert!(is_valid_object_name(&inspect(&engine, &id).await.name));
    }

    // ---- start, stop, restart ----------------------------------------------------

    #[tokio::test]
    async fn start_runs_the_container_at_the_clock_s_time_and_again_is_a_no_op() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        clock.advance(5);

        engine.start_container(&id).await.unwrap();
        clock.advance(5);
        engine.start_container(&id).await.unwrap();

        let observed = inspect(&engine, &id).await;
        assert_eq!(observed.state, RunState::Running);
        assert_eq!(
            observed.started_at,
            Some(Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 5).unwrap())
        );
        assert_eq!(observed.health, None);
        assert_eq!(engine.calls(Op::Start), 2);
    }

    #[tokio::test]
    async fn stop_exits_a_running_container_and_leaves_others_alone() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        let created = engine.create_container(&spec("created")).await.unwrap();
        let id = running(&engine, &spec("alice")).await;
        clock.advance(60);

        engine.stop_container(&id, STOP).await.unwrap();
        engine.stop_container(&id, STOP).await.unwrap();
        engine.stop_container(&created, STOP).await.unwrap();

        let observed = inspect(&engine, &id).await;
        assert_eq!(observed.state, RunState::Exited);
        assert_eq!(observed.exit_code, Some(0));
        assert_eq!(observed.finished_at, Some(clock.now()));
        assert_eq!(inspect(&engine, &created).await.state, RunState::Created);
    }

    #[tokio::test]
    async fn calls_on_a_missing_container_are_not_found_except_remove() {
        let engine = engine().await;
        let missing = "mosaic-user-nobody";

        let not_found = |result: Result<(), EngineError>| matches!(result, Err(EngineError::NotFound { ref target, .. }) if target == missing);
        assert!(not_found(engine.start_container(missing).await));
        assert!(not_found(engine.stop_container(missing, STOP).await));
        assert!(not_found(engine.restart_container(missing, STOP).await));
        assert!(not_found(
            engine.rename_container(missing, "other-name").await
        ));
        engine.remove_container(missing).await.unwrap();
    }

    #[tokio::test]
    async fn start_fails_while_a_running_container_publishes_the_same_port() {
        let engine = engine().await;
        let holder = running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
        let blocked = engine
            .create_container(&published(spec("bob"), LOCALHOST, 19000))
            .await
            .unwrap();

        let error = engine.start_container(&blocked).await.unwrap_err();
        assert!(matches!(
            error,
            EngineError::PortAllocated {
                port: Some(19000),
                ..
            }
        ));
        assert!(error.is_transient());
        let observed = inspect(&engine, &blocked).await;
        assert_eq!(observed.state, RunState::Created);
        assert_eq!(observed.exit_code, Some(128));

        engine.stop_container(&holder, STOP).await.unwrap();
        engine.start_container(&blocked).await.unwrap();
        assert_eq!(inspect(&engine, &blocked).await.host_port, Some(19000));
    }

    #[tokio::test]
    async fn only_overlapping_addresses_conflict_on_a_port() {
        let engine = engine().await;
        running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
        let other_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let all_v4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let all_v6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

        running(&engine, &published(spec("bob"), other_ip, 19000)).await;
        running(&engine, &published(spec("carol"), LOCALHOST, 19001)).await;
        running(
            &engine,
            &published(spec("v6"), IpAddr::V6(Ipv6Addr::LOCALHOST), 19000),
        )
        .await;
        for (user, ip) in [("wild4", all_v4), ("wild6", all_v6)] {
            let id = engine
                .create_container(&published(spec(user), ip, 19000))
                .await
                .unwrap();
            let result = engine.start_container(&id).await;
            assert!(
                matches!(result, Err(EngineError::PortAllocated { .. })),
                "{ip}"
            );
        }
    }

    #[tokio::test]
    async fn created_and_exited_containers_hold_no_port() {
        let engine = engine().await;
        engine
            .create_container(&published(spec("created"), LOCALHOST, 19000))
            .await
            .unwrap();
        let exited = running(&engine, &published(spec("exited"), LOCALHOST, 19000)).await;
        engine.crash(&exited, 1).unwrap();

        running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
    }

    #[tokio::test]
    async fn start_fails_on_a_port_held_by_a_foreign_process_until_it_is_released() {
        let engine = engine().await;
        engine.occupy_port(None, 19000);
        engine.occupy_port(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))), 19001);
        let id = engine
            .create_container(&published(spec("alice"), LOCALHOST, 19000))
            .await
            .unwrap();

        let error = engine.start_container(&id).await.unwrap_err();
        assert!(matches!(
            error,
            EngineError::PortAllocated {
                port: Some(19000),
                ..
            }
        ));
        running(&engine, &published(spec("bob"), LOCALHOST, 19001)).await;

        engine.release_port(None, 19000);
        engine.start_container(&id).await.unwrap();
    }

    #[tokio::test]
    async fn restart_stops_then_starts_and_says_restart() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        let id = running(&engine, &spec("alice")).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);
        clock.advance(30);

        engine.restart_container(&id, STOP).await.unwrap();

        assert_eq!(
            ready_actions(&mut events),
            ["kill", "die", "stop", "start", "restart"]
        );
        let observed = inspect(&engine, &id).await;
        assert_eq!(observed.state, RunState::Running);
        assert_eq!(observed.started_at, Some(clock.now()));
        assert_eq!(observed.finished_at, Some(clock.now()));
    }

    #[tokio::test]
    async fn restart_of_a_created_container_starts_it() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();

        engine.restart_container(&id, STOP).await.unwrap();

        assert_eq!(inspect(&engine, &id).await.state, RunState::Running);
    }

    // ---- remove and rename -------------------------------------------------------

    #[tokio::test]
    async fn remove_forces_a_running_container_and_keeps_its_volume() {
        let engine = engine().await;
        let spec = published(spec("alice"), LOCALHOST, 19000);
        let id = running(&engine, &spec).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.remove_container(&id).await.unwrap();
        engine.remove_container(&id).await.unwrap();

        assert_eq!(ready_actions(&mut events), ["kill", "die", "destroy"]);
        assert_eq!(engine.inspect_container(&id).await.unwrap(), None);
        assert_eq!(engine.volumes(), ["mosaic-user-alice-state"]);
        // The name and the port are free again.
        running(&engine, &spec).await;
    }

    #[tokio::test]
    async fn rename_moves_the_name_and_frees_the_old_one() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine
            .rename_container(&id, "mosaic-user-alice-old")
            .await
            .unwrap();

        assert_eq!(inspect(&engine, "mosaic-user-alice-old").await.id, id);
        assert_eq!(
            engine.inspect_container("mosaic-user-alice").await.unwrap(),
            None
        );
        assert_eq!(ready_actions(&mut events), ["rename"]);
        engine.create_container(&spec("alice")).await.unwrap();
    }

    #[tokio::test]
    async fn rename_to_a_taken_same_or_invalid_name_is_refused() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        engine.create_container(&spec("bob")).await.unwrap();

        let taken = engine
            .rename_container(&id, "mosaic-user-bob")
            .await
            .unwrap_err();
        assert!(
            matches!(taken, EngineError::NameConflict { ref name } if name == "mosaic-user-bob")
        );
        let same = engine
            .rename_container(&id, "mosaic-user-alice")
            .await
            .unwrap_err();
        assert_eq!(api_status(&same), Some(400));
        let invalid = engine.rename_container(&id, "no way").await.unwrap_err();
        assert_eq!(api_status(&invalid), Some(400));
        assert_eq!(inspect(&engine, &id).await.name, "mosaic-user-alice");
    }

    // ---- volumes and networks ------------------------------------------------------

    #[tokio::test]
    async fn ensure_volume_is_idempotent_and_keeps_the_first_labels() {
        let engine = MemoryEngine::new();
        let first = object_labels(INSTANCE, "alice");

        engine.ensure_volume("vol-a", &first).await.unwrap();
        engine
            .ensure_volume("vol-a", &object_labels("other", "x"))
            .await
            .unwrap();

        assert_eq!(engine.volumes(), ["vol-a"]);
        assert_eq!(engine.volume_labels("vol-a"), Some(first));
        let invalid = engine
            .ensure_volume("a", &BTreeMap::new())
            .await
            .unwrap_err();
        assert_eq!(api_status(&invalid), Some(400));
    }

    #[tokio::test]
    async fn ensure_network_is_idempotent_with_a_stable_id() {
        let engine = MemoryEngine::new();
        let labels = shared_labels(INSTANCE);

        let id = engine.ensure_network(NETWORK, &labels).await.unwrap();
        assert_eq!(
            engine
                .ensure_network(NETWORK, &BTreeMap::new())
                .await
                .unwrap(),
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
            .ensure_network(NETWORK, &shared_labels(INSTANCE))
            .await
            .unwrap();
        let duplicate = engine.add_duplicate_network(NETWORK);

        assert_ne!(duplicate, oldest);
        assert_eq!(
            engine
                .ensure_network(NETWORK, &BTreeMap::new())
                .await
                .unwrap(),
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

    // ---- images -----------------------------------------------------------------------

    #[tokio::test]
    async fn images_are_matched_in_docker_s_normal_form() {
        let engine = MemoryEngine::new();
        engine.add_image("alpine");
        engine.add_image("ghcr.io/acme/agent:1.2");

        for present in [
            "alpine",
            "alpine:latest",
            "docker.io/library/alpine:latest",
            "library/alpine",
        ] {
            assert!(engine.image_present(present).await.unwrap(), "{present}");
        }
        for absent in ["alpine:3.20", "acme/agent:1.2", "ghcr.io/acme/agent"] {
            assert!(!engine.image_present(absent).await.unwrap(), "{absent}");
        }
        assert!(engine
            .image_present("ghcr.io/acme/agent:1.2")
            .await
            .unwrap());
        assert_eq!(
            engine.images(),
            ["docker.io/library/alpine:latest", "ghcr.io/acme/agent:1.2"]
        );
    }

    #[tokio::test]
    async fn pull_succeeds_only_for_pullable_images() {
        let engine = MemoryEngine::new();

        let error = engine.pull_image(IMAGE).await.unwrap_err();
        assert!(matches!(error, EngineError::ImageNotFound { .. }));
        assert!(!error.is_transient());
        assert!(!engine.image_present(IMAGE).await.unwrap());

        engine.make_pullable(IMAGE);
        engine.pull_image(IMAGE).await.unwrap();
        assert!(engine.image_present(IMAGE).await.unwrap());
    }

    #[tokio::test]
    async fn a_removed_image_blocks_new_containers_but_not_existing_ones() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;

        assert!(engine.remove_image(IMAGE));
        assert!(!engine.remove_image(IMAGE));

        let error = engine.create_container(&spec("bob")).await.unwrap_err();
        assert!(matches!(error, EngineError::ImageNotFound { .. }));
        engine.restart_container(&id, STOP).await.unwrap();
    }

    // ---- health -----------------------------------------------------------------------

    #[tokio::test]
    async fn a_healthchecked_image_starts_as_starting_and_reports_probe_results() {
        let engine = engine().await;
        engine.set_image_healthcheck(IMAGE, true);
        let id = running(&engine, &spec("alice")).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);
        assert_eq!(inspect(&engine, &id).await.health, Some(Health::Starting));

        engine.set_health(&id, Health::Healthy).unwrap();
        engine.set_health(&id, Health::Healthy).unwrap();
        engine
            .set_health("mosaic-user-alice", Health::Unhealthy)
            .unwrap();

        assert_eq!(
            ready_actions(&mut events),
            ["health_status: healthy", "health_status: unhealthy"]
        );
        assert_eq!(inspect(&engine, &id).await.health, Some(Health::Unhealthy));
    }

    #[tokio::test]
    async fn health_is_unhealthy_after_exit_and_starting_again_after_a_start() {
        let engine = engine().await;
        engine.set_image_healthcheck(IMAGE, true);
        let id = running(&engine, &spec("alice")).await;
        engine.set_health(&id, Health::Healthy).unwrap();

        engine.stop_container(&id, STOP).await.unwrap();
        assert_eq!(inspect(&engine, &id).await.health, Some(Health::Unhealthy));
        assert_eq!(
            api_status(&engine.set_health(&id, Health::Healthy).unwrap_err()),
            Some(409)
        );

        engine.start_container(&id).await.unwrap();
        assert_eq!(inspect(&engine, &id).await.health, Some(Health::Starting));
    }

    #[tokio::test]
    async fn a_container_without_healthcheck_has_no_health() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;

        assert_eq!(inspect(&engine, &id).await.health, None);
        assert!(engine.set_health(&id, Health::Healthy).is_err());
        engine.stop_container(&id, STOP).await.unwrap();
        assert_eq!(inspect(&engine, &id).await.health, None);
    }

    // ---- lists ------------------------------------------------------------------------

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

    // ---- events -----------------------------------------------------------------------

    #[tokio::test]
    async fn events_reach_only_subscribers_of_the_container_s_instance() {
        let engine = engine().await;
        let mut mine = engine.events(&filter(INSTANCE, None), None);
        let mut theirs = engine.events(&filter("other", None), None);

        let id = running(&engine, &spec("alice")).await;
        engine
            .insert_unlabelled("mosaic-user-old", IMAGE, true)
            .unwrap();

        let (items, ended) = ready_items(&mut mine);
        assert!(!ended);
        let events: Vec<EngineEvent> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].action, "create");
        assert_eq!(events[1].action, "start");
        assert!(events
            .iter()
            .all(|e| e.user_id.as_deref() == Some("alice") && e.container_id == id));
        assert!(events[0].time_nanos <= events[1].time_nanos);
        assert!(ready_actions(&mut theirs).is_empty());
    }

    #[tokio::test]
    async fn events_filtered_by_user_show_only_that_user() {
        let engine = engine().await;
        let mut alice = engine.events(&filter(INSTANCE, Some("alice")), None);

        running(&engine, &spec("bob")).await;
        running(&engine, &spec("alice")).await;

        let (items, _) = ready_items(&mut alice);
        assert_eq!(items.len(), 2);
        assert!(items
            .iter()
            .all(|item| item.as_ref().unwrap().user_id.as_deref() == Some("alice")));
    }

    #[tokio::test]
    async fn events_since_replay_the_recent_past_then_continue_live() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        engine.create_container(&spec("alice")).await.unwrap();
        clock.advance(1);
        engine.create_container(&spec("bob")).await.unwrap();
        let since = clock.now().timestamp_nanos_opt().unwrap();

        let mut events = engine.events(&filter(INSTANCE, None), Some(since));
        engine.create_container(&spec("carol")).await.unwrap();

        let users: Vec<Option<String>> = ready_items(&mut events)
            .0
            .into_iter()
            .map(|item| item.unwrap().user_id)
            .collect();
        assert_eq!(users, [Some("bob".to_owned()), Some("carol".to_owned())]);
    }

    #[tokio::test]
    async fn replay_reaches_back_only_over_the_last_256_events() {
        let engine = engine().await;
        for n in 0..300 {
            engine
                .create_container(&spec(&format!("u{n}")))
                .await
                .unwrap();
        }

        let mut events = engine.events(&filter(INSTANCE, None), Some(0));

        let (items, _) = ready_items(&mut events);
        assert_eq!(items.len(), RECENT_EVENTS);
        assert_eq!(items[0].as_ref().unwrap().user_id.as_deref(), Some("u44"));
    }

    #[tokio::test]
    async fn event_times_never_go_backwards_even_when_the_clock_does() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.create_container(&spec("alice")).await.unwrap();
        clock.advance(-3600);
        engine.create_container(&spec("bob")).await.unwrap();

        let times: Vec<i64> = ready_items(&mut events)
            .0
            .into_iter()
            .map(|item| item.unwrap().time_nanos)
            .collect();
        assert_eq!(times.len(), 2);
        assert!(times[0] <= times[1]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_an_unreachable_error_and_its_stream_ends() {
        let engine = ready(MemoryEngine::new().with_event_capacity(4)).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        for n in 0..10 {
            engine
                .create_container(&spec(&format!("u{n}")))
                .await
                .unwrap();
        }

        let (items, ended) = ready_items(&mut events);
        assert_eq!(items.len(), 1);
        assert!(matches!(items[0], Err(EngineError::Unreachable { .. })));
        assert!(ended);
        // The engine never waited for the slow reader.
        assert_eq!(engine.containers().len(), 10);
    }

    #[tokio::test]
    async fn breaking_event_streams_ends_them_with_an_error_and_new_ones_work() {
        let engine = engine().await;
        let mut old = engine.events(&filter(INSTANCE, None), None);
        assert_eq!(engine.event_subscribers(), 1);

        engine.break_event_streams();
        let mut new = engine.events(&filter(INSTANCE, None), None);
        engine.create_container(&spec("alice")).await.unwrap();

        let (items, ended) = ready_items(&mut old);
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]));
        assert!(ended);
        assert_eq!(ready_actions(&mut new), ["create"]);
    }

    #[tokio::test]
    async fn an_event_stream_is_static_and_can_move_to_another_task() {
        let engine = Arc::new(engine().await);
        let mut events = engine.events(&filter(INSTANCE, None), None);
        let reader = tokio::spawn(async move { events.next().await });

        engine.create_container(&spec("alice")).await.unwrap();

        let event = reader.await.unwrap().unwrap().unwrap();
        assert_eq!(event.action, "create");
    }

    // ---- faults and counters --------------------------------------------------------

    #[tokio::test]
    async fn fail_next_fails_only_the_next_call_of_that_op_without_effect() {
        let engine = engine().await;
        engine.fail_next(
            Op::Create,
            EngineError::Api {
                op: "create",
                target: "x".to_owned(),
                status: 500,
                message: "boom".to_owned(),
            },
        );

        let error = engine.create_container(&spec("alice")).await.unwrap_err();
        assert_eq!(api_status(&error), Some(500));
        assert!(engine.containers().is_empty());
        engine.create_container(&spec("alice")).await.unwrap();
        assert_eq!(engine.calls(Op::Create), 2);
    }

    #[tokio::test]
    async fn lose_next_reply_takes_effect_but_reports_the_error() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        engine.lose_next_reply(
            Op::Start,
            EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "connection reset".to_owned(),
            },
        );

        assert!(engine.start_container(&id).await.is_err());
        assert_eq!(inspect(&engine, &id).await.state, RunState::Running);
        engine.start_container(&id).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_engine_fails_every_call_and_cuts_event_streams() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        let mut open = engine.events(&filter(INSTANCE, None), None);

        engine.set_unreachable(true);

        let unreachable = |error: EngineError| matches!(error, EngineError::Unreachable { .. });
        assert!(unreachable(engine.version().await.unwrap_err()));
        assert!(unreachable(
            engine
                .list_containers(&filter(INSTANCE, None))
                .await
                .unwrap_err()
        ));
        assert!(unreachable(
            engine.inspect_container(&id).await.unwrap_err()
        ));
        assert!(unreachable(engine.start_container(&id).await.unwrap_err()));
        assert!(unreachable(engine.remove_container(&id).await.unwrap_err()));
        assert!(unreachable(engine.image_present(IMAGE).await.unwrap_err()));
        let (items, ended) = ready_items(&mut open);
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);
        let (items, ended) = ready_items(&mut engine.events(&filter(INSTANCE, None), None));
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);

        engine.set_unreachable(false);
        engine.start_container(&id).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_subscription_yields_its_error_and_ends() {
        let engine = engine().await;
        engine.fail_next(
            Op::Events,
            EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "refused".to_owned(),
            },
        );

        let (items, ended) = ready_items(&mut engine.events(&filter(INSTANCE, None), None));
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);
        assert_eq!(engine.calls(Op::Events), 1);
    }

    #[tokio::test]
    async fn calls_count_trait_calls_but_not_out_of_band_actions() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;
        engine.crash(&id, 1).unwrap();
        engine
            .insert_unlabelled("mosaic-user-old", IMAGE, false)
            .unwrap();
        engine.version().await.unwrap();

        assert_eq!(engine.calls(Op::Create), 1);
        assert_eq!(engine.calls(Op::Start), 1);
        assert_eq!(engine.calls(Op::Version), 1);
        assert_eq!(engine.calls(Op::EnsureNetwork), 1);
        assert_eq!(engine.calls(Op::Stop), 0);

        engine.reset_calls();
        assert!(Op::ALL.iter().all(|&op| engine.calls(op) == 0));
    }

    #[tokio::test]
    async fn version_reports_what_the_test_set() {
        let engine = MemoryEngine::new();
        let old = EngineVersion {
            version: "20.10.24".to_owned(),
            api_version: "1.41".to_owned(),
        };

        engine.set_version(old.clone());

        assert_eq!(engine.version().await.unwrap(), old);
    }

    // ---- out-of-band actions ------------------------------------------------------------

    #[tokio::test]
    async fn crash_exits_with_its_code_and_says_die() {
        let engine = engine().await;
        let id = running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.crash("mosaic-user-alice", 78).unwrap();

        assert_eq!(ready_actions(&mut events), ["die"]);
        let observed = inspect(&engine, &id).await;
        assert_eq!(
            (observed.state, observed.exit_code),
            (RunState::Exited, Some(78))
        );
        assert_eq!(api_status(&engine.crash(&id, 1).unwrap_err()), Some(409));
        assert!(matches!(
            engine.crash("nobody", 1),
            Err(EngineError::NotFound { .. })
        ));
        // Its port is free for someone else.
        running(&engine, &published(spec("bob"), LOCALHOST, 19000)).await;
    }

    #[tokio::test]
    async fn kill_exits_with_137_and_says_kill_then_die() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.kill(&id).unwrap();

        assert_eq!(ready_actions(&mut events), ["kill", "die"]);
        assert_eq!(inspect(&engine, &id).await.exit_code, Some(137));
    }

    #[tokio::test]
    async fn remove_out_of_band_destroys_and_a_missing_one_is_not_found() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.remove_out_of_band(&id).unwrap();

        assert_eq!(ready_actions(&mut events), ["destroy"]);
        assert!(matches!(
            engine.remove_out_of_band(&id),
            Err(EngineError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn an_unlabelled_container_is_found_by_name_but_never_listed_or_announced() {
        let engine = engine().await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        let id = engine
            .insert_unlabelled("mosaic-user-alice", "node:old", true)
            .unwrap();

        let observed = inspect(&engine, "mosaic-user-alice").await;
        assert_eq!(observed.id, id);
        assert_eq!(observed.state, RunState::Running);
        assert!(observed.labels.is_empty());
        assert!(!observed.is_managed());
        assert_eq!(observed.image, "node:old");
        assert!(engine
            .list_containers(&filter(INSTANCE, None))
            .await
            .unwrap()
            .is_empty());
        assert!(ready_actions(&mut events).is_empty());
        let conflict = engine.create_container(&spec("alice")).await.unwrap_err();
        assert!(matches!(conflict, EngineError::NameConflict { .. }));
    }

    #[tokio::test]
    async fn insert_container_keeps_the_spec_s_labels_and_port() {
        let engine = MemoryEngine::new();
        let spec = published(spec("alice"), IpAddr::V4(Ipv4Addr::UNSPECIFIED), 19000);

        let id = engine.insert_container(&spec, true).unwrap();

        let observed = engine.container(&id).unwrap();
        assert_eq!(observed.labels, spec.labels);
        assert_eq!(observed.host_port, Some(19000));
        let blocked = engine
            .insert_container(&published(spec_in(INSTANCE, "bob"), LOCALHOST, 19000), true)
            .unwrap_err();
        assert!(matches!(blocked, EngineError::PortAllocated { .. }));
        assert_eq!(
            engine.container("mosaic-user-bob").unwrap().state,
            RunState::Created
        );
    }

    // ---- storage ------------------------------------------------------------------------

    #[test]
    fn a_record_keeps_its_name_and_labels_through_a_rename() {
        let mut interner = Interner::default();
        let labels = BTreeMap::from([
            ("empty".to_owned(), String::new()),
            ("io.clawfleet.user-id".to_owned(), "Üser 1/ü".to_owned()),
            ("zeta".to_owned(), "last".to_owned()),
        ]);
        let record = Record::new(&mut interner, "mosaic-user-a", &labels);
        assert_eq!(record.name(), "mosaic-user-a");
        assert_eq!(record.label_map(&interner), labels);

        let renamed = record.renamed("mosaic-user-a-old-name");

        assert_eq!(renamed.name(), "mosaic-user-a-old-name");
        assert_eq!(renamed.label_map(&interner), labels);
        let key = interner.intern("zeta");
        assert_eq!(renamed.label(key), Some("last"));
        interner.release(key);
        renamed.release(&mut interner);
        assert_eq!(interner.len(), 0);
    }

    #[test]
    fn a_record_without_labels_is_just_its_name() {
        let mut interner = Interner::default();
        let record = Record::new(&mut interner, "vol", &BTreeMap::new());

        assert_eq!(record.name(), "vol");
        assert_eq!(record.labels().count(), 0);
        assert_eq!(record.0.len(), Record::HEADER + 3);
    }

    #[test]
    fn wildcards_overlap_their_family_and_dual_stack_overlaps_all() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let overlap = |a: IpAddr, b: IpAddr| {
            overlapping_bindings(a, 80)
                .iter()
                .any(|range| range.contains(&(80, b)))
        };
        for (a, b, expected) in [
            (v4, v4, true),
            (v4, LOCALHOST, false),
            (v4, any4, true),
            (v4, any6, true),
            (v4, v6, false),
            (v6, any4, false),
            (v6, any6, true),
            (any4, v4, true),
            (any4, v6, false),
            (any6, v4, true),
            (any6, v6, true),
        ] {
            assert_eq!(overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(overlap(b, a), expected, "{b} vs {a}");
        }
        assert!(!overlapping_bindings(v4, 80)
            .iter()
            .any(|range| range.contains(&(81, v4))));
    }

    // ---- bookkeeping and scale ------------------------------------------------------------

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
