//! What a human with the docker CLI does behind the controller's back:
//! create or start a container, crash or kill it, set its health, remove
//! it. These calls neither count nor fail like trait calls.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::containers::EXIT_KILLED;
use super::ids::render_id;
use super::MemoryEngine;
use clawfleet::docker::{
    Confinement, ContainerHealth, ContainerSpec, EngineError, EnvValue, ResourceLimits,
};

impl MemoryEngine {
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
        self.insert_unlabelled_with(name, image, running, Vec::new(), None)
    }

    /// Like [`insert_unlabelled`](Self::insert_unlabelled), with the
    /// original service's environment (its `AGENT_TOKEN`) and published
    /// host port.
    pub fn insert_unlabelled_with(
        &self,
        name: &str,
        image: &str,
        running: bool,
        env: Vec<(String, EnvValue)>,
        publish: Option<(IpAddr, u16)>,
    ) -> Result<String, EngineError> {
        let spec = ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            env,
            labels: BTreeMap::new(),
            volume: String::new(),
            mount_path: String::new(),
            network: String::new(),
            port: 18789,
            publish,
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
            confinement: Confinement::unconfined(),
            node: None,
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
    pub fn set_health(&self, name_or_id: &str, health: ContainerHealth) -> Result<(), EngineError> {
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
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use crate::fixtures::*;
    use crate::MemoryEngine;
    use clawfleet::docker::{Engine, EngineError, RunState};

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
}
