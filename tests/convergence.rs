//! The convergence property: from any observed state, reconciling again and
//! again against the in-memory engine reaches a state the plan leaves alone,
//! and that state is the one the desired row asks for.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use clawfleet::config::{ContainerSettings, PortRange};
use clawfleet::docker::{
    object_labels, Confinement, ContainerFilter, ContainerHealth, ContainerSpec, Engine, EnvValue,
    Op, ResourceLimits, RunState, SecretString, LABEL_SPEC_HASH,
};
use clawfleet::image_ref::ImageRef;
use clawfleet::isolation::NetworkIsolation;
use clawfleet::ports::PortAllocator;
use clawfleet::reconcile::{Reconciler, ReconcilerOptions};
use clawfleet::secrets::GatewayToken;
use clawfleet::status::Phase;
use clawfleet::store::Store;
use clawfleet_engine_sim::MemoryEngine;
use proptest::prelude::*;
use support::controller::{seal_v1, status_with_token, test_key, test_ring, write_status};

const IMAGE: &str = "clawfleet-agent-stub:dev";
const INSTANCE: &str = "prop";
const USER: &str = "alice";
const NAME: &str = "mosaic-user-alice";

#[derive(Clone, Copy, Debug)]
enum Row {
    Missing,
    Deleted,
    Running,
    Stopped,
    Idle,
    Invalid,
    MissingImage,
}

#[derive(Clone, Copy, Debug)]
enum Existing {
    None,
    Labelled {
        hash_matches: bool,
        state: Start,
        health: Option<ContainerHealth>,
    },
    Unlabelled {
        running: bool,
    },
    Foreign,
}

#[derive(Clone, Copy, Debug)]
enum Start {
    Created,
    Running,
    Exited(i64),
}

#[derive(Clone, Debug)]
struct Case {
    row: Row,
    existing: Existing,
    replacement_left: bool,
    stray_left: bool,
    previous_phase: Option<Phase>,
}

fn row() -> impl Strategy<Value = Row> {
    prop_oneof![
        Just(Row::Missing),
        Just(Row::Deleted),
        Just(Row::Running),
        Just(Row::Stopped),
        Just(Row::Idle),
        Just(Row::Invalid),
        Just(Row::MissingImage),
    ]
}

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        Just(Start::Created),
        Just(Start::Running),
        Just(Start::Exited(0)),
        Just(Start::Exited(1)),
        Just(Start::Exited(137)),
        Just(Start::Exited(78)),
    ]
}

fn existing() -> impl Strategy<Value = Existing> {
    prop_oneof![
        Just(Existing::None),
        (
            any::<bool>(),
            start(),
            prop::option::of(prop_oneof![
                Just(ContainerHealth::Healthy),
                Just(ContainerHealth::Unhealthy)
            ])
        )
            .prop_map(|(hash_matches, state, health)| Existing::Labelled {
                hash_matches,
                state,
                health
            }),
        any::<bool>().prop_map(|running| Existing::Unlabelled { running }),
        Just(Existing::Foreign),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        row(),
        existing(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(Phase::ALL.to_vec())),
    )
        .prop_map(
            |(row, existing, replacement_left, stray_left, previous_phase)| Case {
                row,
                existing,
                replacement_left,
                stray_left,
                previous_phase,
            },
        )
}

fn settings() -> ContainerSettings {
    ContainerSettings {
        instance: INSTANCE.into(),
        image: ImageRef::parse(IMAGE).unwrap(),
        network: "mosaic-internal".into(),
        name_prefix: "mosaic-user-".into(),
        port_range: PortRange::new(19000, 19099).unwrap(),
        publish_ip: "127.0.0.1".parse().unwrap(),
        mosaic_api_url: "http://mosaic-api:3000/api".into(),
        allowed_images: clawfleet::image_ref::ImageAllowList::any(),
        stop_timeout: std::time::Duration::from_secs(1),
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        network_isolation: NetworkIsolation::Shared,
    }
}

fn container(name: &str, labels: BTreeMap<String, String>) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: IMAGE.into(),
        env: vec![(
            "OPENCLAW_GATEWAY_TOKEN".into(),
            EnvValue::Secret(SecretString::new("t")),
        )],
        labels,
        volume: format!("{name}-state"),
        mount_path: clawfleet::spec::STATE_PATH.into(),
        network: "mosaic-internal".into(),
        port: clawfleet::spec::GATEWAY_PORT,
        publish: Some(("127.0.0.1".parse().unwrap(), 19000)),
        stop_timeout: std::time::Duration::from_secs(1),
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        node: None,
    }
}

async fn set_up(case: &Case, store: &Store, engine: &MemoryEngine, desired_hash: &str) {
    engine.add_image(IMAGE);
    engine.set_image_healthcheck(IMAGE, true);
    engine
        .ensure_network("mosaic-internal", &BTreeMap::new(), &BTreeMap::new())
        .await
        .unwrap();
    let now = Utc::now();
    let sql = |s: String| async move {
        use sea_orm::ConnectionTrait;
        store.connection().execute_unprepared(&s).await.unwrap();
    };
    match case.row {
        Row::Missing => {}
        Row::Deleted => {
            sql(format!("INSERT INTO desired_containers (user_id) VALUES ('{USER}')")).await;
            sql(format!("DELETE FROM desired_containers WHERE user_id = '{USER}'")).await;
        }
        Row::Running => sql(format!("INSERT INTO desired_containers (user_id) VALUES ('{USER}')")).await,
        Row::Stopped => sql(format!("INSERT INTO desired_containers (user_id, state) VALUES ('{USER}', 'stopped')")).await,
        Row::Idle => sql(format!(
            "INSERT INTO desired_containers (user_id, idle_timeout_secs, last_active_at) VALUES ('{USER}', 60, '{}')",
            (now - chrono::Duration::hours(2)).to_rfc3339()
        ))
        .await,
        Row::Invalid => sql(format!("INSERT INTO desired_containers (user_id, state) VALUES ('{USER}', 'banana')")).await,
        Row::MissingImage => sql(format!("INSERT INTO desired_containers (user_id, image) VALUES ('{USER}', 'gone:1')")).await,
    }
    let mut labels = object_labels(INSTANCE, USER);
    match case.existing {
        Existing::None => {}
        Existing::Labelled {
            hash_matches,
            state,
            health,
        } => {
            let hash = if hash_matches { desired_hash } else { "stale" };
            labels.insert(LABEL_SPEC_HASH.into(), hash.into());
            engine
                .insert_container(
                    &container(NAME, labels.clone()),
                    !matches!(state, Start::Created),
                )
                .unwrap();
            if let Start::Exited(code) = state {
                engine.crash(NAME, code).unwrap();
            }
            if let (Start::Running, Some(h)) = (state, health) {
                engine.set_health(NAME, h).unwrap();
            }
        }
        Existing::Unlabelled { running } => {
            engine.insert_unlabelled(NAME, IMAGE, running).unwrap();
        }
        Existing::Foreign => {
            engine
                .insert_container(
                    &container(NAME, object_labels("other-instance", "bob")),
                    true,
                )
                .unwrap();
        }
    }
    if case.replacement_left {
        let mut l = object_labels(INSTANCE, USER);
        l.insert(LABEL_SPEC_HASH.into(), desired_hash.into());
        engine
            .insert_container(&container(&format!("{NAME}-next"), l), false)
            .unwrap();
    }
    if case.stray_left {
        let mut old = container("mosaic-user-alice-old", object_labels(INSTANCE, USER));
        old.publish = Some(("127.0.0.1".parse().unwrap(), 19050));
        engine.insert_container(&old, true).unwrap();
    }
    if let Some(phase) = case.previous_phase {
        let token = test_ring()
            .seal(USER, &GatewayToken::generate().unwrap())
            .unwrap();
        let row = clawfleet::status::ContainerStatus {
            phase,
            host_port: Some(19000),
            ..status_with_token(USER, token)
        };
        write_status(store, &row).await;
    }
}

/// A reconciler of `case` set up on a fresh SQLite store (in `dir`) and
/// in-memory engine, with the spec hash a running user should have.
async fn reconciler_for(
    case: &Case,
    dir: &std::path::Path,
) -> (Reconciler<MemoryEngine>, Store, Arc<MemoryEngine>, String) {
    let store = Store::connect(&format!("sqlite://{}/p.db?mode=rwc", dir.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let engine = Arc::new(MemoryEngine::new());
    let settings = Arc::new(settings());
    let desired_hash =
        clawfleet::spec::DesiredSpec::new(&settings, USER, &settings.image, 0, Some(19000))
            .hash
            .label()
            .to_owned();
    set_up(case, &store, &engine, &desired_hash).await;
    let reconciler = Reconciler::new(
        store.clone(),
        engine.clone(),
        settings.clone(),
        test_ring(),
        PortAllocator::new(settings.port_range, settings.publish_ip).without_probe(),
        ReconcilerOptions {
            orphan_grace: std::time::Duration::ZERO,
            ..Default::default()
        },
    );
    (reconciler, store, engine, desired_hash)
}

async fn check(case: Case) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (reconciler, store, engine, desired_hash) = reconciler_for(&case, dir.path()).await;

    let mut rounds = 0;
    let last = loop {
        let outcome = reconciler.reconcile(USER).await;
        rounds += 1;
        match outcome {
            Ok(o) if o.actions == 0 => break o,
            Ok(_) => {}
            Err(e) => prop_assert!(rounds < 8, "still failing after {rounds} rounds: {e}"),
        }
        prop_assert!(rounds < 8, "no convergence after {rounds} rounds");
    };
    // Converged means: once more plans nothing.
    let again = reconciler.reconcile(USER).await.unwrap();
    prop_assert_eq!(again.actions, 0);

    let ours = engine
        .list_containers(&ContainerFilter {
            instance: INSTANCE.into(),
            user_id: Some(USER.into()),
        })
        .await
        .unwrap();
    let canonical = engine.container(NAME);
    let status = store.status(USER).await.unwrap();
    match (case.row, case.existing) {
        (_, Existing::Foreign) => {
            prop_assert_eq!(last.phase, Some(Phase::Failed));
            prop_assert!(
                canonical.unwrap().instance() == Some("other-instance"),
                "the foreign container is untouched"
            );
        }
        (Row::Missing | Row::Deleted, existing) => {
            prop_assert!(ours.is_empty(), "no container of ours is left: {:?}", ours);
            prop_assert!(status.is_none());
            if let Existing::Unlabelled { .. } = existing {
                prop_assert!(
                    canonical.is_some(),
                    "an unlabelled container is never removed for a missing row"
                );
            }
        }
        (Row::Invalid, _) => {
            prop_assert_eq!(last.phase, Some(Phase::Failed));
            prop_assert!(status.unwrap().message.unwrap().contains("state"));
        }
        (Row::MissingImage, _) => {
            prop_assert_eq!(last.phase, Some(Phase::Failed));
        }
        (Row::Running, existing) => {
            let c = canonical.expect("a canonical container");
            prop_assert_eq!(ours.len(), 1, "exactly one container: {:?}", ours);
            prop_assert_eq!(c.spec_hash(), Some(desired_hash.as_str()));
            let config_error = matches!(
                existing,
                Existing::Labelled {
                    hash_matches: true,
                    state: Start::Exited(78),
                    ..
                }
            );
            if config_error {
                prop_assert_eq!(last.phase, Some(Phase::Failed));
            } else {
                prop_assert_eq!(c.state, RunState::Running);
                prop_assert_eq!(last.phase, Some(Phase::Running));
            }
        }
        (Row::Stopped | Row::Idle, _) => {
            prop_assert!(ours.len() <= 1, "at most one container: {:?}", ours);
            if let Some(c) = canonical {
                prop_assert!(c.state != RunState::Running, "stopped as desired");
            }
            let expected = if matches!(case.row, Row::Idle) {
                Phase::Idle
            } else {
                Phase::Stopped
            };
            prop_assert_eq!(last.phase, Some(expected));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn reconciling_from_any_observed_state_converges_then_plans_nothing(case in case()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(check(case))?;
    }
}

#[tokio::test]
async fn a_v1_token_is_resealed_as_v2_at_the_next_reconcile_and_the_container_stays() {
    let case = Case {
        row: Row::Running,
        existing: Existing::None,
        replacement_left: false,
        stray_left: false,
        previous_phase: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let (reconciler, store, engine, _) = reconciler_for(&case, dir.path()).await;
    for _ in 0..8 {
        if reconciler.reconcile(USER).await.unwrap().converged {
            break;
        }
    }
    let before = store.status(USER).await.unwrap().expect("a status row");
    assert_eq!(before.phase, Phase::Running);
    let container_id = before.container_id.clone().expect("a container");
    let token = test_ring()
        .open(USER, before.gateway_token.as_deref().unwrap())
        .unwrap();

    // The row as a build before v2 left it.
    let v1 = seal_v1(&test_key(), &token);
    let row = clawfleet::status::ContainerStatus {
        gateway_token: Some(v1.clone()),
        ..before.clone()
    };
    write_status(&store, &row).await;
    engine.reset_calls();

    let outcome = reconciler.reconcile(USER).await.unwrap();
    assert_eq!(outcome.actions, 0, "nothing is done to the container");
    let after = store.status(USER).await.unwrap().unwrap();
    let sealed = after.gateway_token.as_deref().unwrap();
    assert!(sealed.starts_with("v2:test:"), "resealed as v2: {sealed}");
    assert_ne!(sealed, v1);
    assert_eq!(
        test_ring().open(USER, sealed).unwrap(),
        token,
        "same plaintext"
    );
    assert_eq!(after.container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(after.restarts, before.restarts);
    assert_eq!(engine.calls(Op::Create), 0, "no container is recreated");
    assert_eq!(engine.calls(Op::Remove), 0);
    assert_eq!(
        engine.container(NAME).map(|c| c.id),
        Some(container_id),
        "the same container runs"
    );
}
