//! Rows "exited on its own", "exited with code 78" and "unhealthy".

use std::time::Duration;

use clawfleet::docker::{ContainerHealth, RunState};
use clawfleet::status::Phase;

use super::{running, Fleet};
use crate::IMAGE;

const MS: Duration = Duration::from_millis(1);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Crashes `user`'s running container, waits `delay` less a millisecond
/// (still down), then a millisecond more: it must be running again, started
/// exactly `delay` after the crash.
async fn crash_and_expect_restart_after(fleet: &Fleet, user: &str, delay: Duration) {
    let name = fleet.name(user);
    let crashed_at = fleet.now();
    fleet
        .behind_its_back(|engine| engine.crash(&name, 1).unwrap())
        .await;
    if !delay.is_zero() {
        fleet.advance(delay - MS).await;
        let c = fleet.container(user).unwrap();
        assert_eq!(
            c.state,
            RunState::Exited,
            "restarted before its back-off of {delay:?} ended"
        );
        fleet.advance(MS).await;
    }
    let c = fleet.container(user).unwrap();
    assert_eq!(
        c.state,
        RunState::Running,
        "not restarted {delay:?} after the crash"
    );
    let expected = crashed_at + chrono::Duration::from_std(delay).unwrap();
    assert_eq!(c.started_at, Some(expected), "restart time");
}

#[tokio::test(start_paused = true)]
async fn a_container_that_exits_on_its_own_is_started_again_at_once_then_after_1s_2s_4s_up_to_5min()
{
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    let id = fleet.container("alice").unwrap().id;

    // `docker kill` and `docker stop` behind its back count as exits of their own.
    fleet
        .behind_its_back(|engine| engine.kill(&fleet.name("alice")).unwrap())
        .await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Running, "started again at once");
    assert_eq!(c.started_at, Some(fleet.now()));
    assert_eq!(fleet.status("alice").await.unwrap().restarts, 1);

    let delays = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
    for (i, delay) in delays.into_iter().enumerate() {
        crash_and_expect_restart_after(&fleet, "alice", secs(delay)).await;
        let status = fleet.status("alice").await.unwrap();
        assert_eq!(
            status.restarts,
            i as i64 + 2,
            "`restarts` counts each restart"
        );
        assert_eq!(status.phase, Phase::Running);
    }
    assert_eq!(
        fleet.container("alice").unwrap().id,
        id,
        "restarted in place"
    );
    assert_eq!(fleet.errors(), 0);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_container_that_ran_stably_before_it_crashed_is_started_again_at_once() {
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    crash_and_expect_restart_after(&fleet, "alice", Duration::ZERO).await;
    crash_and_expect_restart_after(&fleet, "alice", secs(1)).await;
    // Ten minutes up end the crash streak.
    fleet.advance(secs(600)).await;
    crash_and_expect_restart_after(&fleet, "alice", Duration::ZERO).await;
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_container_that_exits_with_code_78_is_failed_as_a_configuration_error_and_tried_again_after_5min(
) {
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    let name = fleet.name("alice");
    let crashed_at = fleet.now();
    fleet
        .behind_its_back(|engine| engine.crash(&name, 78).unwrap())
        .await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.unwrap_or_default();
    assert!(message.contains("configuration error"), "{message}");

    fleet.advance(secs(300) - MS).await;
    assert_eq!(fleet.container("alice").unwrap().state, RunState::Exited);
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Failed);
    fleet.advance(MS).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Running, "tried again after 5 min");
    assert_eq!(
        c.started_at,
        Some(crashed_at + chrono::Duration::seconds(300))
    );
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Running);
    fleet.stop().await;
}

/// Turns `name`'s health check unhealthy, behind the controller's back.
async fn turn_unhealthy(fleet: &Fleet, name: &str) {
    fleet
        .behind_its_back(|engine| engine.set_health(name, ContainerHealth::Unhealthy).unwrap())
        .await;
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_container_is_restarted_in_place_with_the_same_back_off() {
    let fleet = Fleet::start_with(crate::settings(), |engine| {
        engine.set_image_healthcheck(IMAGE, true)
    })
    .await;
    fleet.write(running("alice")).await;
    let name = fleet.name("alice");
    let id = fleet.container("alice").unwrap().id;

    let first = fleet.now();
    turn_unhealthy(&fleet, &name).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.id, id, "restarted in place, not recreated");
    assert_eq!(c.started_at, Some(first), "restarted at once");
    assert_ne!(c.health, ContainerHealth::Unhealthy);
    assert_eq!(fleet.status("alice").await.unwrap().restarts, 1);

    // Unhealthy again at once: the next restart waits 1 s, the one after 2 s.
    for (restarts, delay) in [(2, 1), (3, 2)] {
        let at = fleet.now();
        turn_unhealthy(&fleet, &name).await;
        fleet.advance(secs(delay) - MS).await;
        assert_eq!(
            fleet.container("alice").unwrap().health,
            ContainerHealth::Unhealthy,
            "restarted before its back-off of {delay} s ended"
        );
        fleet.advance(MS).await;
        let c = fleet.container("alice").unwrap();
        assert_eq!(
            c.started_at,
            Some(at + chrono::Duration::seconds(delay as i64))
        );
        assert_eq!(c.id, id);
        assert_eq!(fleet.status("alice").await.unwrap().restarts, restarts);
    }
    fleet.stop().await;
}
