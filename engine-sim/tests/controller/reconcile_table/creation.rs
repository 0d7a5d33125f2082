//! Rows "no container" (running; stopped / idle), and the port the engine
//! refuses (the paragraph under the table).

use std::time::Duration;

use clawfleet::config::PortRange;
use clawfleet::desired::DesiredState;
use clawfleet::docker::{EngineError, Op, RunState};
use clawfleet::image_ref::ImageRef;
use clawfleet::status::Phase;
use clawfleet::store::DesiredUpdate;

use super::{running, Fleet};

#[tokio::test(start_paused = true)]
async fn no_container_and_desired_running_claims_a_port_and_a_token_then_creates_pulling_the_missing_image_and_starts(
) {
    let fleet = Fleet::start().await;
    fleet.engine.make_pullable("agent:2");
    // The first create fails: the claim is already in `container_status`.
    fleet.engine.fail_next(
        Op::Create,
        EngineError::Unreachable {
            host: "sim".into(),
            message: "cut".into(),
        },
    );
    fleet
        .write(DesiredUpdate {
            image: Some(Some(ImageRef::parse("agent:2").unwrap())),
            ..running("alice")
        })
        .await;
    assert!(fleet.container("alice").is_none());
    let claimed = fleet.status("alice").await.unwrap();
    assert_eq!(claimed.host_port, Some(19000), "{claimed:?}");
    assert!(
        claimed.gateway_token.is_some(),
        "the token is claimed first"
    );
    assert_eq!(fleet.errors(), 1);

    // The queue's retry back-off (500 ms with jitter) ends within 2 s.
    fleet.advance(Duration::from_secs(2)).await;
    let c = fleet.container("alice").expect("created on the retry");
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.image, "agent:2");
    assert_eq!(c.host_port, Some(19000), "published on the claimed port");
    assert_eq!(fleet.engine.calls(Op::Pull), 1, "pulled once");
    assert!(
        fleet
            .engine
            .images()
            .iter()
            .any(|i| i.ends_with("/agent:2")),
        "{:?}",
        fleet.engine.images()
    );
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.host_port, Some(19000));
    assert_eq!(status.gateway_token, claimed.gateway_token, "one token");
    assert_eq!(status.container_id, Some(c.id));
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_container_and_desired_stopped_or_idle_makes_nothing() {
    let fleet = Fleet::start().await;
    fleet
        .write(DesiredUpdate {
            state: Some(DesiredState::Stopped),
            ..running("alice")
        })
        .await;
    fleet
        .write(DesiredUpdate {
            idle_timeout_secs: Some(Some(60)),
            touch: Some(fleet.now() - chrono::Duration::hours(2)),
            ..running("bob")
        })
        .await;
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Stopped);
    assert_eq!(fleet.status("bob").await.unwrap().phase, Phase::Idle);
    // Still nothing once every requeue has come due.
    fleet.advance(Duration::from_secs(3600)).await;
    assert!(fleet.engine.containers().is_empty());
    assert_eq!(fleet.engine.calls(Op::Create), 0);
    assert!(fleet.engine.volumes().is_empty());
    fleet.stop().await;
}

/// Deletes `user`'s row; waits until the user it frees a port for runs.
async fn delete_freeing_a_port_for(fleet: &Fleet, user: &str, waiting: &str) {
    assert!(fleet.store.delete_desired(user).await.unwrap());
    fleet.changed(user).await;
    fleet
        .until("the waiting user to be woken", || {
            fleet.container(waiting).is_some()
        })
        .await;
    fleet.settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_port_the_engine_reports_already_allocated_is_quarantined_for_10min_and_its_user_moved() {
    let mut settings = crate::settings();
    settings.port_range = PortRange::new(19000, 19002).unwrap();
    let ip = settings.publish_ip;
    // Another process holds 19000; without the bind probe only the engine sees it.
    let fleet = Fleet::start_with(settings, |engine| engine.occupy_port(Some(ip), 19000)).await;
    let refused_at = fleet.now();
    fleet.write(running("alice")).await;
    // The queue's retry back-off (500 ms with jitter) ends within 2 s.
    fleet.advance(Duration::from_secs(2)).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.host_port, Some(19001), "moved to another port");
    assert_eq!(fleet.status("alice").await.unwrap().host_port, Some(19001));

    // The other process goes away, but 19000 stays quarantined: carol finds
    // the range full, and waits for a port to be released.
    fleet.engine.release_port(Some(ip), 19000);
    fleet.write(running("bob")).await;
    assert_eq!(fleet.container("bob").unwrap().host_port, Some(19002));
    fleet.write(running("carol")).await;
    let failed = fleet.status("carol").await.unwrap();
    assert_eq!(failed.phase, Phase::Failed);
    let message = failed.message.unwrap_or_default();
    assert!(message.contains("exhausted"), "{message}");

    // Five minutes on, bob's port frees: the search starts at 19000 again
    // (the cursor wrapped) and steps over it, still quarantined.
    fleet.advance(Duration::from_secs(300)).await;
    delete_freeing_a_port_for(&fleet, "bob", "carol").await;
    assert_eq!(fleet.container("carol").unwrap().host_port, Some(19002));
    fleet.write(running("dave")).await;
    assert_eq!(fleet.status("dave").await.unwrap().phase, Phase::Failed);

    // Once ten minutes have passed since the refusal, 19000 is handed out again.
    let quarantine_ends = refused_at + chrono::Duration::seconds(600);
    let left = (quarantine_ends - fleet.now()).to_std().unwrap();
    fleet.advance(left).await;
    delete_freeing_a_port_for(&fleet, "carol", "dave").await;
    let c = fleet.container("dave").unwrap();
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.host_port, Some(19000));
    fleet.stop().await;
}
