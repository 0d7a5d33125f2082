//! What the memory engine's tests share: specs, a ready engine, a clock the
//! test moves by hand, and readers of an event stream that never wait.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use super::MemoryEngine;
use clawfleet::docker::{
    object_labels, shared_labels, Confinement, ContainerFilter, ContainerSpec, Engine, EngineError,
    EngineEvent, ObservedContainer, ResourceLimits, LABEL_SPEC_HASH,
};

pub(super) const IMAGE: &str = "alpine/openclaw:latest";
pub(super) const NETWORK: &str = "mosaic-internal";
pub(super) const INSTANCE: &str = "default";
pub(super) const STOP: Duration = Duration::from_secs(10);
pub(super) const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub(super) type Events = BoxStream<'static, Result<EngineEvent, EngineError>>;

pub(super) fn spec(user: &str) -> ContainerSpec {
    spec_in(INSTANCE, user)
}

pub(super) fn spec_in(instance: &str, user: &str) -> ContainerSpec {
    let name = format!("mosaic-user-{user}");
    let mut labels = object_labels(instance, user);
    labels.insert(LABEL_SPEC_HASH.to_owned(), format!("hash-{user}"));
    ContainerSpec {
        volume: format!("{name}-state"),
        name,
        image: IMAGE.to_owned(),
        env: Vec::new(),
        labels,
        mount_path: "/home/node/.openclaw".to_owned(),
        network: NETWORK.to_owned(),
        port: 18789,
        publish: None,
        stop_timeout: STOP,
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        node: None,
    }
}

pub(super) fn published(mut spec: ContainerSpec, ip: IpAddr, port: u16) -> ContainerSpec {
    spec.publish = Some((ip, port));
    spec
}

pub(super) fn filter(instance: &str, user_id: Option<&str>) -> ContainerFilter {
    ContainerFilter {
        instance: instance.to_owned(),
        user_id: user_id.map(str::to_owned),
    }
}

/// An engine with the default image and the agents' network.
pub(super) async fn ready(engine: MemoryEngine) -> MemoryEngine {
    engine.add_image(IMAGE);
    engine
        .ensure_network(NETWORK, &shared_labels(INSTANCE), &BTreeMap::new())
        .await
        .unwrap();
    engine
}

pub(super) async fn engine() -> MemoryEngine {
    ready(MemoryEngine::new()).await
}

pub(super) async fn running(engine: &MemoryEngine, spec: &ContainerSpec) -> String {
    let id = engine.create_container(spec).await.unwrap();
    engine.start_container(&id).await.unwrap();
    id
}

pub(super) async fn inspect(engine: &MemoryEngine, name_or_id: &str) -> ObservedContainer {
    engine
        .inspect_container(name_or_id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name_or_id} exists"))
}

/// A clock the test moves by hand.
#[derive(Clone)]
pub(super) struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    pub(super) fn new() -> Self {
        Self(Arc::new(Mutex::new(
            Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
        )))
    }

    pub(super) fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }

    pub(super) fn advance(&self, seconds: i64) {
        *self.0.lock().unwrap() += chrono::Duration::seconds(seconds);
    }

    pub(super) fn engine(&self) -> MemoryEngine {
        let clock = self.clone();
        MemoryEngine::new().with_clock(move || clock.now())
    }
}

/// Every item `events` has ready, without waiting; stops after the end.
pub(super) fn ready_items(events: &mut Events) -> (Vec<Result<EngineEvent, EngineError>>, bool) {
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
pub(super) fn ready_actions(events: &mut Events) -> Vec<String> {
    ready_items(events)
        .0
        .into_iter()
        .map(|item| item.expect("an event").action)
        .collect()
}

pub(super) fn api_status(error: &EngineError) -> Option<u16> {
    match error {
        EngineError::Api { status, .. } => Some(*status),
        _ => None,
    }
}
