//! Rows "spec hash differs" and "no clawfleet labels, right name".

use std::collections::BTreeMap;

use clawfleet::docker::{ContainerFilter, Engine, RunState};
use clawfleet::status::Phase;
use futures::{FutureExt, StreamExt};

use super::{made_by_hand, running, Fleet};

#[tokio::test(start_paused = true)]
async fn a_container_whose_spec_hash_differs_is_recreated_creating_the_next_one_before_the_old_one_goes(
) {
    let fleet = Fleet::start().await;
    fleet.write(running("alice")).await;
    let old = fleet.container("alice").unwrap();
    let port = fleet.status("alice").await.unwrap().host_port;
    let mut events = fleet.engine.events(
        &ContainerFilter {
            instance: fleet.settings.instance.clone(),
            user_id: Some("alice".into()),
        },
        None,
    );

    fleet.store.request_restart("alice").await.unwrap();
    fleet.changed("alice").await;

    let new = fleet.container("alice").unwrap();
    assert_ne!(new.id, old.id, "recreated");
    assert_ne!(new.spec_hash(), old.spec_hash());
    assert_eq!(new.state, RunState::Running);
    assert_eq!(new.host_port, port, "on the same port");
    let names: Vec<String> = fleet
        .engine
        .containers()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [fleet.name("alice")], "no `-next` is left");
    assert_eq!(
        fleet.engine.volumes(),
        [fleet.volume("alice")],
        "the same volume"
    );
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.container_id.as_deref(), Some(new.id.as_str()));

    let mut seen = Vec::new();
    while let Some(Some(event)) = events.next().now_or_never() {
        let event = event.unwrap();
        let whose = if event.container_id == old.id {
            "old"
        } else if event.container_id == new.id {
            "new"
        } else {
            "other"
        };
        seen.push(format!("{whose} {}", event.action));
    }
    let at = |what: &str| {
        seen.iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("no `{what}` in {seen:?}"))
    };
    assert!(at("new create") < at("old stop"), "{seen:?}");
    assert!(at("old stop") < at("old destroy"), "{seen:?}");
    assert!(at("old destroy") < at("new rename"), "{seen:?}");
    assert!(at("new rename") < at("new start"), "{seen:?}");
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_container_of_the_right_name_without_labels_is_adopted_by_a_recreate_with_labels_on_the_same_volume(
) {
    let settings = crate::settings();
    let by_hand = made_by_hand(&settings, "alice", BTreeMap::new());
    let mut old_id = String::new();
    let fleet = Fleet::start_with(settings, |engine| {
        old_id = engine.insert_container(&by_hand, true).unwrap();
    })
    .await;
    assert_eq!(fleet.engine.volumes(), [fleet.volume("alice")]);

    fleet.write(running("alice")).await;
    let c = fleet.container("alice").unwrap();
    assert_ne!(c.id, old_id, "recreated");
    assert_eq!(c.user_id(), Some("alice"));
    assert_eq!(c.instance(), Some(fleet.settings.instance.as_str()));
    assert!(c.spec_hash().is_some());
    assert_eq!(c.state, RunState::Running);
    assert_eq!(
        fleet.engine.containers().len(),
        1,
        "the unlabelled one is gone"
    );
    assert_eq!(
        fleet.engine.volumes(),
        [fleet.volume("alice")],
        "its volume is kept and used"
    );
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Running);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_container_taken_over_keeps_its_port_and_stays_stopped() {
    let settings = crate::settings();
    let mut by_hand = made_by_hand(&settings, "alice", BTreeMap::new());
    by_hand.publish = Some((settings.publish_ip, 19004));
    let fleet = Fleet::start_with(settings, |engine| {
        engine.insert_container(&by_hand, false).unwrap();
    })
    .await;

    fleet
        .write(clawfleet::store::DesiredUpdate {
            state: Some(clawfleet::desired::DesiredState::Stopped),
            ..running("alice")
        })
        .await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.user_id(), Some("alice"), "taken over");
    assert_eq!(c.state, RunState::Created, "recreated, never started");
    assert_eq!(c.host_port, Some(19004), "on its old port");
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Stopped);
    assert_eq!(status.host_port, Some(19004));
    assert_eq!(status.message, None, "nothing moved");
    fleet.stop().await;
}
