//! Row "missing image that cannot be pulled, disallowed image, invalid row".

use std::time::Duration;

use clawfleet::docker::Op;
use clawfleet::image_ref::ImageRef;
use clawfleet::status::Phase;
use clawfleet::store::DesiredUpdate;
use sea_orm::ConnectionTrait;

use super::{running, Fleet};

fn image(reference: &str) -> DesiredUpdate {
    DesiredUpdate {
        image: Some(Some(ImageRef::parse(reference).unwrap())),
        ..running("alice")
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_that_cannot_be_pulled_fails_the_user_and_is_not_retried_before_5min_unless_the_row_changes(
) {
    // Written before the start, so that nothing but the clock (and the row
    // changing) brings the user back.
    let fleet = Fleet::start_with_rows(&[image("agent:9")]).await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.unwrap_or_default();
    assert!(message.contains("agent:9"), "{message}");
    let pulls = fleet.engine.calls(Op::Pull);
    assert!(pulls >= 1);
    assert_eq!(
        fleet.errors(),
        0,
        "a failure that needs a human is no error to retry"
    );

    fleet
        .advance(Duration::from_secs(300) - Duration::from_millis(1))
        .await;
    assert_eq!(
        fleet.engine.calls(Op::Pull),
        pulls,
        "not retried before 5 min"
    );
    fleet.advance(Duration::from_millis(1)).await;
    assert!(fleet.engine.calls(Op::Pull) > pulls, "retried after 5 min");
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Failed);

    // The image can be had now, but nothing looks before the next retry...
    fleet.engine.make_pullable("agent:9");
    fleet.advance(Duration::from_secs(60)).await;
    assert!(fleet.container("alice").is_none());
    // ...unless the row changes.
    fleet.store.touch("alice", fleet.now()).await.unwrap();
    fleet.changed("alice").await;
    assert!(fleet.container("alice").is_some(), "retried at once");
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Running);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_disallowed_image_fails_the_user_with_a_message_and_the_engine_is_never_asked_for_it() {
    let fleet = Fleet::start().await;
    fleet.write(image("elsewhere/agent:1")).await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status
        .message
        .unwrap_or_default()
        .contains("elsewhere/agent:1"));
    fleet.advance(Duration::from_secs(3600)).await;
    assert_eq!(fleet.engine.calls(Op::Pull), 0);
    assert_eq!(fleet.engine.calls(Op::ImagePresent), 0);
    assert!(fleet.engine.containers().is_empty());
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_row_fails_the_user_with_a_message_and_makes_nothing() {
    let fleet = Fleet::start().await;
    fleet
        .store
        .connection()
        .execute_unprepared(
            "INSERT INTO desired_containers (user_id, state) VALUES ('alice', 'banana')",
        )
        .await
        .unwrap();
    fleet.changed("alice").await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.message.unwrap_or_default().contains("banana"));
    fleet.advance(Duration::from_secs(3600)).await;
    assert!(fleet.engine.containers().is_empty());
    fleet.stop().await;
}
