//! Rows "right name, labelled for another user or instance", "state volume
//! labelled for another user or instance" and "agents' network exists with
//! options that disagree".

use std::collections::BTreeMap;
use std::time::Duration;

use clawfleet::docker::{object_labels, Op, RunState, OPTION_ENABLE_ICC};
use clawfleet::status::Phase;

use super::{made_by_hand, running, Fleet};

/// Engine calls that change a container.
const CHANGES: [Op; 5] = [Op::Create, Op::Start, Op::Stop, Op::Remove, Op::Rename];

fn changes(fleet: &Fleet) -> u64 {
    CHANGES.iter().map(|op| fleet.engine.calls(*op)).sum()
}

#[tokio::test(start_paused = true)]
async fn a_container_of_the_right_name_labelled_for_another_instance_fails_the_user_and_is_never_touched(
) {
    let settings = crate::settings();
    let theirs = made_by_hand(
        &settings,
        "alice",
        object_labels("another-instance", "alice"),
    );
    let mut id = String::new();
    let fleet = Fleet::start_with(settings, |engine| {
        id = engine.insert_container(&theirs, true).unwrap();
    })
    .await;
    fleet.write(running("alice")).await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.message.is_some());

    // Looked at again after the slow retry, and still left alone.
    fleet.advance(Duration::from_secs(3600)).await;
    let c = fleet.container("alice").unwrap();
    assert_eq!(c.id, id);
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.instance(), Some("another-instance"));
    assert_eq!(changes(&fleet), 0, "never touched");
    assert_eq!(fleet.status("alice").await.unwrap().phase, Phase::Failed);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_state_volume_labelled_for_another_user_fails_the_user_naming_it_and_is_never_mounted() {
    let settings = crate::settings();
    let instance = settings.instance.clone();
    let alice_volume = clawfleet::naming::volume_name(&settings.name_prefix, "alice");
    let bob_volume = clawfleet::naming::volume_name(&settings.name_prefix, "bob");
    let fleet = Fleet::start_with(settings, |engine| {
        engine.insert_volume(&alice_volume, &object_labels(&instance, "mallory"));
        // An unlabelled volume of the right name is adopted.
        engine.insert_volume(&bob_volume, &BTreeMap::new());
    })
    .await;
    fleet.write(running("alice")).await;
    fleet.write(running("bob")).await;

    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.unwrap_or_default();
    assert!(message.contains(&alice_volume), "{message}");
    assert!(fleet.container("alice").is_none(), "never mounted");
    assert_eq!(
        fleet.engine.volume_labels(&alice_volume),
        Some(object_labels(&fleet.settings.instance, "mallory")),
        "left as it was"
    );

    let bob = fleet.container("bob").expect("bob's container");
    assert_eq!(bob.state, RunState::Running);
    assert_eq!(fleet.status("bob").await.unwrap().phase, Phase::Running);
    fleet.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_agents_network_whose_options_disagree_with_network_isolation_fails_the_user_naming_it_and_nothing_is_created_on_it(
) {
    let settings = crate::settings();
    let network = settings.network.clone();
    let fleet = Fleet::start_with(settings, |engine| {
        engine.insert_network(
            &network,
            &BTreeMap::from([(OPTION_ENABLE_ICC.to_owned(), "false".to_owned())]),
        );
    })
    .await;
    fleet.write(running("alice")).await;
    let status = fleet.status("alice").await.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.unwrap_or_default();
    assert!(message.contains(&format!("network {network}")), "{message}");
    fleet.advance(Duration::from_secs(3600)).await;
    assert!(fleet.engine.containers().is_empty());
    assert_eq!(fleet.engine.calls(Op::Create), 0);
    assert_eq!(
        fleet.engine.networks().len(),
        1,
        "the network is left as it is"
    );
    fleet.stop().await;
}
