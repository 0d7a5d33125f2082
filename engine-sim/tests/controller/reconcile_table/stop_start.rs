//! Rows "running / stopped or idle deadline passed" and "exited, stopped by
//! clawfleet / running".

use std::time::Duration;

use clawfleet::desired::DesiredState;
use clawfleet::docker::RunState;
use clawfleet::status::Phase;
use clawfleet::store::DesiredUpdate;

use super::{running, Fleet};

/// A fleet where alice ran, then her row said `stopped`; her container's id.
async fn alice_ran_then_was_stopped() -> (Fleet, String) {
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    let id = fleet.container("alice").unwrap().id;
    fleet.set_state("alice", DesiredState::Stopped).await;
    (fleet, id)
}

#[tokio::test(start_paused = true)]
async fn a_running_container_whose_row_says_stopped_is_stopped() {
    let (fleet, id) = alice_ran_then_was_stopped().await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Exited);
    assert_eq!(c.id, id, "stopped, not removed");
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Stopped);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_running_container_is_stopped_at_its_idle_deadline() {
    let fleet = Fleet::start().await;
    let active = fleet.now();
    fleet
        .write(DesiredUpdate {
            idle_timeout_secs: Some(Some(60)),
            touch: Some(active),
            ..running("alice")
        })
        .await;
    assert_eq!(fleet.container("alice").unwrap().state, RunState::Running);

    fleet.advance(Duration::from_millis(59_999)).await;
    assert_eq!(fleet.container("alice").unwrap().state, RunState::Running);
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Running);
    fleet.advance(Duration::from_millis(1)).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Exited, "stopped at the deadline");
    assert_eq!(c.finished_at, Some(active + chrono::Duration::seconds(60)));
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Idle);

    // Activity moves the deadline: it runs again until a minute after it.
    let touched = fleet.now();
    fleet.store.touch("alice", touched).await.unwrap();
    fleet.changed("alice").await;
    assert_eq!(fleet.container("alice").unwrap().state, RunState::Running);
    fleet.advance(Duration::from_secs(60)).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Exited);
    assert_eq!(c.finished_at, Some(touched + chrono::Duration::seconds(60)));
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_exited_container_clawfleet_stopped_is_started_when_its_row_says_running() {
    let (fleet, id) = alice_ran_then_was_stopped().await;
    fleet.advance(Duration::from_secs(3600)).await;
    assert_eq!(fleet.container("alice").unwrap().state, RunState::Exited);

    fleet.set_state("alice", DesiredState::Running).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.id, id, "the same container");
    assert_eq!(c.started_at, Some(fleet.now()), "at once");
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.restarts, 0, "a start asked for is not a restart");
    fleet.stop().await;
}
