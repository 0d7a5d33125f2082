//! clawfleet's controller, reconciler and event watcher against the
//! simulated engine: the tests that need an engine to misbehave on cue
//! (panic, fail a call, break its event stream) and no real Docker.
//!
//! They live here rather than in clawfleet's own unit tests because the
//! simulator depends on clawfleet, and a unit test of clawfleet cannot
//! depend on it in turn.

mod event_watcher;
mod panics;
mod transient_errors;
mod triggers;

use std::time::Duration;

use clawfleet::config::{ContainerSettings, PortRange};
use clawfleet::docker::{Confinement, ResourceLimits};
use clawfleet::image_ref::{ImageAllowList, ImageRef};
use clawfleet::isolation::NetworkIsolation;

/// The image every user runs.
const IMAGE: &str = "agent:1";

/// Settings of a small fleet: ten ports, a short stop timeout.
fn settings() -> ContainerSettings {
    let image = ImageRef::parse(IMAGE).unwrap();
    ContainerSettings {
        instance: "panics".into(),
        allowed_images: ImageAllowList::of_repository(&image),
        image,
        network: "agents".into(),
        name_prefix: "agent-".into(),
        port_range: PortRange::new(19000, 19009).unwrap(),
        publish_ip: "127.0.0.1".parse().unwrap(),
        mosaic_api_url: "http://mosaic-api:3000/api".into(),
        stop_timeout: Duration::from_secs(1),
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        network_isolation: NetworkIsolation::Shared,
    }
}
