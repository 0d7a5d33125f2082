//! Rows "row deleted" and "labelled, no row and no recorded deletion".

use std::time::Duration;

use clawfleet::docker::{object_labels, Op};

use super::{made_by_hand, running, Fleet};

#[tokio::test(start_paused = true)]
async fn a_deleted_row_removes_the_container_after_a_graceful_stop_and_keeps_the_volume() {
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    assert!(fleet.container("alice").is_some());
    fleet.engine.reset_calls();

    assert!(fleet.store.delete_desired("alice").await.unwrap());
    fleet.changed("alice").await;
    assert!(fleet.container("alice").is_none(), "removed at once");
    assert_eq!(fleet.engine.calls(Op::Stop), 1, "stopped gracefully first");
    assert_eq!(fleet.engine.calls(Op::Remove), 1);
    assert_eq!(
        fleet.engine.volumes(),
        [fleet.volume("alice")],
        "the volume is kept"
    );
    assert!(
        fleet.status("alice").await.is_none(),
        "the status row goes too"
    );
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_labelled_container_without_a_row_or_a_recorded_deletion_is_removed_after_the_5min_orphan_grace(
) {
    let settings = crate::settings();
    let orphan = made_by_hand(&settings, "bob", object_labels(&settings.instance, "bob"));
    // Found by the first full sync, which lists the engine's containers too.
    let fleet = Fleet::start_with(settings, |engine| {
        engine.insert_container(&orphan, true).unwrap();
    })
    .await;
    fleet
        .advance(Duration::from_secs(300) - Duration::from_millis(1))
        .await;
    assert!(
        fleet.container("bob").is_some(),
        "kept during the grace period"
    );
    assert_eq!(fleet.engine.calls(Op::Remove), 0);
    fleet.advance(Duration::from_millis(1)).await;
    assert!(fleet.container("bob").is_none(), "removed when it ended");
    assert_eq!(
        fleet.engine.volumes(),
        [fleet.volume("bob")],
        "the volume is kept"
    );
    fleet.stop().await;
}
