//! Where Docker is called: each planned action carried out on the engine.
//!
//! Invariants:
//! - a recreate creates the new container before touching the old one, so a
//!   failed create leaves the user with the container they had;
//! - a create is handed its [`Blueprint`], so it never runs without the
//!   port and token claimed for it;
//! - a state volume labelled for another user or instance is never mounted,
//!   and no container is created on a network that disagrees with
//!   `--network-isolation` (README "Security"): both need a human.

use tracing::{info, warn};

use crate::docker::{object_labels, shared_labels, Engine, EngineError};
use crate::plan::{Action, Blueprint, StartReason, StopReason};
use crate::status::{ContainerStatus, Phase};

use super::finish::set_phase;
use super::observe::foreign_owner;
use super::{Pass, Priority, ReconcileError, Reconciler};

impl<E: Engine> Reconciler<E> {
    /// Carries out `action` of `pass`, keeping `pass.current` and the status
    /// row in step with what the engine now holds.
    pub(super) async fn apply(
        &self,
        action: &Action,
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        let timeout = self.settings.stop_timeout;
        let (user_id, now) = (pass.user_id, pass.now);
        let name = pass.name.as_str();
        let current_id = pass
            .current
            .as_ref()
            .map_or_else(|| name.to_owned(), |c| c.id.clone());
        let row = &mut pass.row;
        let previous = pass.previous.as_ref();
        match action {
            Action::AdoptReplacement { id } => {
                info!(container = %name, "finishing an interrupted recreate");
                self.engine.rename_container(id, name).await?;
            }
            Action::RemoveStray { id, name: stray } => {
                info!(container = %stray, "removing leftover container");
                self.engine.remove_container(id).await?;
            }
            Action::Create { blueprint, start } => {
                let spec = &blueprint.spec;
                set_phase(row, Phase::Creating, now);
                row.message = None;
                self.write(row, previous, now).await?;
                info!(container = %name, image = %spec.image, port = ?spec.host_port, "creating container");
                self.make_and_start(blueprint, None, *start, pass).await?;
            }
            Action::Recreate {
                blueprint,
                reason,
                start,
            } => {
                info!(container = %name, reason = ?reason, "recreating container");
                set_phase(row, Phase::Creating, now);
                self.write(row, previous, now).await?;
                if self.engine.updates_in_place() {
                    // One update of the whole spec (a Swarm service update,
                    // stop-first): there is no second container to rename.
                    let replace = Some(current_id.as_str());
                    return self.make_and_start(blueprint, replace, *start, pass).await;
                }
                let next = blueprint.spec.replacement_name();
                let new_id = self
                    .create(blueprint, row, &next, now, pass.priority)
                    .await?;
                // The new container exists: only now is the old one let go.
                self.engine.stop_container(&current_id, timeout).await?;
                self.engine.remove_container(&current_id).await?;
                self.engine.rename_container(&new_id, name).await?;
                pass.current = self.engine.inspect_container(&new_id).await?;
                if *start {
                    self.start(
                        &new_id,
                        Some(blueprint.claim.host_port),
                        row,
                        now,
                        pass.priority,
                    )
                    .await?;
                }
            }
            Action::Start { reason } => {
                if let StartReason::Crashed { exit_code } = reason {
                    info!(container = %name, exit_code = ?exit_code, restarts = row.restarts + 1, "restarting crashed container");
                    self.count_restart(user_id, row, now);
                    self.telemetry.restarted("crash");
                } else {
                    info!(container = %name, "starting container");
                }
                // A container is only seen with a claimed port, so the row holds it.
                self.start(&current_id, row.host_port, row, now, pass.priority)
                    .await?;
            }
            Action::Restart { reason } => {
                info!(container = %name, reason = ?reason, restarts = row.restarts + 1, "restarting unhealthy container");
                self.count_restart(user_id, row, now);
                self.telemetry.restarted("unhealthy");
                let _turn = self.turn(pass.priority).await;
                self.engine.restart_container(&current_id, timeout).await?;
            }
            Action::Stop { reason } => {
                info!(container = %name, reason = ?reason, "stopping container");
                set_phase(row, Phase::Stopping, now);
                self.write(row, previous, now).await?;
                self.engine.stop_container(&current_id, timeout).await?;
                if *reason == StopReason::Idle {
                    self.telemetry.idle_stop();
                }
            }
            Action::Pin { node } => {
                info!(container = %name, node = %node, "pinning to the node holding its volume");
                self.engine.pin_container(&current_id, node).await?;
            }
            Action::Remove { id } => {
                info!(container = %name, "removing container (volume kept)");
                set_phase(row, Phase::Removing, now);
                self.write(row, previous, now).await?;
                self.engine.stop_container(id, timeout).await?;
                self.engine.remove_container(id).await?;
                pass.current = None;
            }
        }
        Ok(())
    }

    fn count_restart(
        &self,
        user_id: &str,
        row: &mut ContainerStatus,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        row.restarts += 1;
        self.memory.count_restart(user_id, row.restarts, now);
    }

    /// Makes the canonical container of `pass` from `blueprint`
    /// ([`Self::make`]; in place of `replace` when given), keeps it in
    /// `pass.current`, and starts it when `start`.
    async fn make_and_start(
        &self,
        blueprint: &Blueprint,
        replace: Option<&str>,
        start: bool,
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        let (now, priority) = (pass.now, pass.priority);
        let id = self
            .make(blueprint, &mut pass.row, &pass.name, replace, now, priority)
            .await?;
        pass.current = self.engine.inspect_container(&id).await?;
        if start {
            let port = Some(blueprint.claim.host_port);
            self.start(&id, port, &mut pass.row, now, priority).await?;
        }
        Ok(())
    }

    /// Creates a container of `blueprint` named `name`, pulling the image if missing.
    async fn create(
        &self,
        blueprint: &Blueprint,
        row: &mut ContainerStatus,
        name: &str,
        now: chrono::DateTime<chrono::Utc>,
        priority: Priority,
    ) -> Result<String, ReconcileError> {
        self.make(blueprint, row, name, None, now, priority).await
    }

    /// Makes a container of `blueprint` named `name`: a new one, or, with
    /// `replace`, the container `replace` updated in place (engines that
    /// [update in place](Engine::updates_in_place)); pulls the image if missing.
    async fn make(
        &self,
        blueprint: &Blueprint,
        row: &mut ContainerStatus,
        name: &str,
        replace: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
        priority: Priority,
    ) -> Result<String, ReconcileError> {
        let spec = &blueprint.spec;
        let token = self
            .keys
            .open(&spec.user_id, &blueprint.claim.sealed_token)?;
        let network = self.network_id().await?;
        let volume_labels = self
            .engine
            .ensure_volume(
                &spec.volume,
                &object_labels(&self.settings.instance, &spec.user_id),
            )
            .await?;
        if let Some(holder) = foreign_owner(&volume_labels, &self.settings.instance, &spec.user_id)
        {
            return Err(ReconcileError::ForeignVolume {
                volume: spec.volume.clone(),
                holder,
            });
        }
        let container = spec.container_spec(&self.settings, &token, name, &network);
        let turn = self.turn(priority).await;
        let created = match replace {
            Some(id) => self.engine.update_container(id, &container).await,
            None => self.engine.create_container(&container).await,
        };
        drop(turn);
        match created {
            Ok(id) => Ok(id),
            Err(EngineError::ImageNotFound { image, .. }) => {
                info!(image = %image, "image not present; pulling");
                row.message = Some(format!("pulling image {image}"));
                self.write(row, None, now).await?;
                self.engine.pull_image(&image).await?;
                row.message = None;
                let _turn = self.turn(priority).await;
                Ok(self.engine.create_container(&container).await?)
            }
            Err(e @ EngineError::Api { status: 404, .. }) => {
                // Most likely the network was removed behind our back: look it up again next time.
                *self.network.lock().await = None;
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts `id`; a port the engine refuses is quarantined and released so
    /// the next reconcile moves the user to another one.
    async fn start(
        &self,
        id: &str,
        port: Option<u16>,
        row: &mut ContainerStatus,
        now: chrono::DateTime<chrono::Utc>,
        priority: Priority,
    ) -> Result<(), ReconcileError> {
        let turn = self.turn(priority).await;
        let started = self.engine.start_container(id).await;
        drop(turn);
        match started {
            Err(e @ EngineError::PortAllocated { .. }) => {
                let busy = match &e {
                    EngineError::PortAllocated { port: Some(p), .. } => Some(*p),
                    _ => port,
                };
                if let Some(busy) = busy {
                    warn!(
                        port = busy,
                        "host port taken outside clawfleet; moving to another port"
                    );
                    self.ports.quarantine(busy);
                    self.ports.release(busy);
                    if row.host_port == Some(busy) {
                        row.host_port = None;
                        row.message = Some(e.to_string());
                        self.store.write_status(row, now).await?;
                    }
                }
                Err(e.into())
            }
            other => Ok(other?),
        }
    }

    /// The agents' network id, created once (single-flight: one creator at a
    /// time) with the options `--network-isolation` asks for. A network that
    /// disagrees with the setting is refused, and asked about again next time.
    async fn network_id(&self) -> Result<String, ReconcileError> {
        let mut cached = self.network.lock().await;
        if let Some(id) = cached.as_ref() {
            return Ok(id.clone());
        }
        let isolation = self.settings.network_isolation;
        let network = self
            .engine
            .ensure_network(
                &self.settings.network,
                &shared_labels(&self.settings.instance),
                &isolation.network_options(),
            )
            .await?;
        if let Some(mismatch) = isolation.mismatch(&self.settings.network, &network) {
            return Err(mismatch.into());
        }
        *cached = Some(network.id.clone());
        Ok(network.id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::desired::DesiredState;
    use crate::docker::{object_labels, RunState};
    use crate::plan::{Intent, RecreateReason, Target};
    use crate::reconcile::testing::{
        container, desired, names, now, pass, reconciler, StubEngine, FIRST_PORT,
    };

    /// A pass over alice whose target (a running container) has been
    /// resolved, with her container in `state` if any.
    async fn present(
        r: &Reconciler<StubEngine>,
        state: Option<RunState>,
    ) -> (Pass<'static>, Arc<Blueprint>) {
        let mut p = pass(Some(desired(DesiredState::Running, 1)), None);
        p.current = state.map(|s| container(s, now()));
        match r.target(&mut p, &names(), None).await.unwrap() {
            Target::Present {
                intent: Intent::Running,
                blueprint,
            } => (p, blueprint),
            other => panic!("expected a running target, got {other:?}"),
        }
    }

    /// Applies a create-and-start of alice's container, which must fail.
    async fn create_and_start(r: &Reconciler<StubEngine>) -> (ReconcileError, Pass<'static>) {
        let (mut p, blueprint) = present(r, None).await;
        let create = Action::Create {
            blueprint,
            start: true,
        };
        let err = r.apply(&create, &mut p).await.unwrap_err();
        (err, p)
    }

    #[tokio::test]
    async fn a_recreate_creates_the_new_container_before_letting_the_old_one_go() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let (mut p, blueprint) = present(&r, Some(RunState::Running)).await;
        let recreate = Action::Recreate {
            blueprint,
            reason: RecreateReason::SpecChanged,
            start: true,
        };
        r.apply(&recreate, &mut p).await.unwrap();
        let next = "mosaic-user-alice-next";
        assert_eq!(
            r.engine.calls(),
            [
                format!("create {next}"),
                "stop c1".into(),
                "remove c1".into(),
                format!("rename id-{next} mosaic-user-alice"),
                format!("start id-{next}"),
            ]
        );
        assert_eq!(p.row.phase, Phase::Creating);
    }

    #[tokio::test]
    async fn a_volume_labelled_for_another_user_is_never_mounted() {
        let engine = StubEngine {
            volume_labels: Some(object_labels("default", "bob")),
            ..StubEngine::default()
        };
        let (r, _dir) = reconciler(engine).await;
        let (err, _) = create_and_start(&r).await;
        assert!(
            matches!(&err, ReconcileError::ForeignVolume { holder, .. } if holder.contains("\"bob\"")),
            "{err}"
        );
        assert!(!err.is_transient());
        assert_eq!(r.engine.calls(), Vec::<String>::new(), "nothing created");
    }

    #[tokio::test]
    async fn a_port_the_engine_refuses_is_quarantined_and_given_up() {
        let engine = StubEngine {
            port_taken: Some(FIRST_PORT),
            ..StubEngine::default()
        };
        let (r, _dir) = reconciler(engine).await;
        let (err, p) = create_and_start(&r).await;
        assert!(err.is_transient(), "the next pass moves to another port");
        assert!(!r.ports.usable(FIRST_PORT));
        assert_eq!(p.row.host_port, None);
        let stored = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(stored.host_port, None);
        assert!(stored.message.unwrap().contains("already in use"));
    }

    #[tokio::test]
    async fn a_crash_restart_is_counted_in_the_row_and_in_the_streak() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let (mut p, _) = present(&r, Some(RunState::Exited)).await;
        let start = Action::Start {
            reason: StartReason::Crashed { exit_code: Some(1) },
        };
        r.apply(&start, &mut p).await.unwrap();
        assert_eq!(r.engine.calls(), ["start c1"]);
        assert_eq!(p.row.restarts, 1);
        let streak = r
            .memory
            .crash_history("alice", None, now(), r.options.stable_after);
        assert_eq!(streak.consecutive, 1);
        assert_eq!(streak.last_restart_at, Some(now()));
    }
}
