//! The container lifecycle: create, start, stop, remove, rename and health,
//! each keeping the indexes and port bindings in step and emitting the
//! events Docker would.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::ids::{id_key, CONTAINER_SALT};
use super::images::normalize_image;
use super::lookup::Found;
use super::names::{check_container_name, check_volume_name};
use super::record::Record;
use super::state::{text_hash, Container, State};
use super::volumes::Volume;
use clawfleet::docker::{ContainerHealth, ContainerSpec, EngineError, RunState, SecretString};

/// Docker's exit code of a container whose start failed.
const EXIT_START_FAILED: i64 = 128;
/// Exit code of a process ended by SIGKILL.
pub(super) const EXIT_KILLED: i64 = 137;
/// Exit code of a process that shut down cleanly on `docker stop`.
const EXIT_STOPPED: i64 = 0;

impl State {
    /// Creates a container; `checked` applies the image and network checks
    /// of a `create` call (out-of-band inserts skip them).
    pub(super) fn create(
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
        let confinement = self.confinement_index(&spec.confinement);
        let container = Container {
            confinement,
            key,
            record,
            image: self.interner.intern(&spec.image),
            publish: spec.publish,
            started_at: None,
            finished_at: None,
            exit_code: 0,
            state: RunState::Created,
            health: ContainerHealth::None,
            has_healthcheck: flags.healthcheck,
            env: if checked {
                BTreeMap::new()
            } else {
                spec.env
                    .iter()
                    .map(|(key, value)| (key.clone(), SecretString::new(value.expose())))
                    .collect()
            },
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

    pub(super) fn start(&mut self, slot: u32, now: DateTime<Utc>) -> Result<(), EngineError> {
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
        container.health = if container.has_healthcheck {
            ContainerHealth::Starting
        } else {
            ContainerHealth::None
        };
        self.emit(slot, "start", now);
        Ok(())
    }

    /// `docker stop`: a running container exits cleanly; any other is left alone.
    pub(super) fn stop(&mut self, slot: u32, now: DateTime<Utc>) {
        if self.container(slot).state == RunState::Running {
            self.end_run(slot, EXIT_STOPPED, &["kill", "die", "stop"], now);
        }
    }

    /// Ends the run of a running container with `exit_code`, emitting `actions`.
    pub(super) fn end_run(
        &mut self,
        slot: u32,
        exit_code: i64,
        actions: &[&'static str],
        now: DateTime<Utc>,
    ) {
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
        container.health = if container.has_healthcheck {
            ContainerHealth::Unhealthy
        } else {
            ContainerHealth::None
        };
        for action in actions {
            self.emit(slot, action, now);
        }
    }

    /// `docker rm --force`: kills a running container, then removes it; volumes stay.
    pub(super) fn remove(&mut self, slot: u32, now: DateTime<Utc>) {
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

    pub(super) fn rename(
        &mut self,
        slot: u32,
        new_name: &str,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
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

    pub(super) fn set_health(
        &mut self,
        slot: u32,
        health: ContainerHealth,
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
        let changed = std::mem::replace(&mut container.health, health) != health;
        // Docker announces results of probes, never the initial `starting`.
        let action = match health {
            ContainerHealth::None | ContainerHealth::Starting => None,
            ContainerHealth::Healthy => Some("health_status: healthy"),
            ContainerHealth::Unhealthy => Some("health_status: unhealthy"),
        };
        if let Some(action) = action.filter(|_| changed) {
            self.emit(slot, action, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{TimeZone, Utc};

    use crate::fixtures::*;
    use crate::names::is_valid_object_name;
    use crate::MemoryEngine;
    use clawfleet::docker::Op;
    use clawfleet::docker::{
        object_labels, shared_labels, Confinement, ContainerHealth, Engine, EngineError, RunState,
    };

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
            .ensure_network(NETWORK, &shared_labels(INSTANCE), &BTreeMap::new())
            .await
            .unwrap()
            .id;

        for (user, net) in [("byid", &network[..]), ("byprefix", &network[..12])] {
            let mut spec = spec(user);
            spec.network = net.to_owned();
            engine.create_container(&spec).await.unwrap();
        }
        assert_eq!(engine.containers().len(), 2);
    }

    #[tokio::test]
    async fn a_container_keeps_the_confinement_it_was_created_with() {
        let engine = engine().await;
        let mut loose = spec("bob");
        loose.confinement = Confinement::unconfined();
        loose.confinement.cap_add = vec!["CHOWN".to_owned()];

        engine.create_container(&spec("alice")).await.unwrap();
        engine.create_container(&loose).await.unwrap();

        assert_eq!(
            engine.confinement("mosaic-user-alice"),
            Some(Confinement::strict())
        );
        assert_eq!(
            engine.confinement("mosaic-user-bob"),
            Some(loose.confinement)
        );
        assert_eq!(engine.confinement("nobody"), None);
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
        assert_eq!(observed.health, ContainerHealth::None);
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

    // ---- health -----------------------------------------------------------------------

    #[tokio::test]
    async fn a_healthchecked_image_starts_as_starting_and_reports_probe_results() {
        let engine = engine().await;
        engine.set_image_healthcheck(IMAGE, true);
        let id = running(&engine, &spec("alice")).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);
        assert_eq!(
            inspect(&engine, &id).await.health,
            ContainerHealth::Starting
        );

        engine.set_health(&id, ContainerHealth::Healthy).unwrap();
        engine.set_health(&id, ContainerHealth::Healthy).unwrap();
        engine
            .set_health("mosaic-user-alice", ContainerHealth::Unhealthy)
            .unwrap();

        assert_eq!(
            ready_actions(&mut events),
            ["health_status: healthy", "health_status: unhealthy"]
        );
        assert_eq!(
            inspect(&engine, &id).await.health,
            ContainerHealth::Unhealthy
        );
    }

    #[tokio::test]
    async fn health_is_unhealthy_after_exit_and_starting_again_after_a_start() {
        let engine = engine().await;
        engine.set_image_healthcheck(IMAGE, true);
        let id = running(&engine, &spec("alice")).await;
        engine.set_health(&id, ContainerHealth::Healthy).unwrap();

        engine.stop_container(&id, STOP).await.unwrap();
        assert_eq!(
            inspect(&engine, &id).await.health,
            ContainerHealth::Unhealthy
        );
        assert_eq!(
            api_status(
                &engine
                    .set_health(&id, ContainerHealth::Healthy)
                    .unwrap_err()
            ),
            Some(409)
        );

        engine.start_container(&id).await.unwrap();
        assert_eq!(
            inspect(&engine, &id).await.health,
            ContainerHealth::Starting
        );
    }

    #[tokio::test]
    async fn a_container_without_healthcheck_has_no_health() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;

        assert_eq!(inspect(&engine, &id).await.health, ContainerHealth::None);
        assert!(engine.set_health(&id, ContainerHealth::Healthy).is_err());
        engine.stop_container(&id, STOP).await.unwrap();
        assert_eq!(inspect(&engine, &id).await.health, ContainerHealth::None);
    }
}
