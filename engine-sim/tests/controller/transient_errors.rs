//! A transient failure and the revision the status reports (README
//! "`container_status` (written only by clawfleet)").

use std::sync::Arc;

use chrono::Utc;
use clawfleet::desired::DesiredState;
use clawfleet::docker::{EngineError, Op};
use clawfleet::status::Phase;
use clawfleet::store::DesiredUpdate;
use clawfleet_engine_sim::MemoryEngine;

use crate::{reconciler, sqlite_store, IMAGE};

const USER: &str = "alice";

#[tokio::test]
async fn a_transient_error_does_not_record_the_revision_it_did_not_act_on() {
    let (store, _dir) = sqlite_store().await;
    let engine = Arc::new(MemoryEngine::new());
    engine.add_image(IMAGE);
    let reconciler = reconciler(&store, &engine);
    store
        .upsert_desired(&DesiredUpdate {
            user_id: USER.into(),
            state: Some(DesiredState::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..5 {
        reconciler.reconcile(USER).await.unwrap();
    }
    let before = store.status(USER).await.unwrap().unwrap();
    assert_eq!(before.phase, Phase::Running);
    let acted_on = before.observed_revision.unwrap();

    // A new revision (a touch), then the container crashes and the
    // restart fails with an error worth retrying.
    store.touch(USER, Utc::now()).await.unwrap();
    let revision = match store.desired(USER).await.unwrap() {
        Some(Ok(d)) => d.revision,
        other => panic!("{other:?}"),
    };
    assert!(revision > acted_on);
    let name = before.container_name.clone().unwrap();
    engine.crash(&name, 1).unwrap();
    engine.fail_next(
        Op::Start,
        EngineError::Unreachable {
            host: "unit".into(),
            message: "cut".into(),
        },
    );
    let error = reconciler.reconcile(USER).await.unwrap_err();
    assert!(error.is_transient(), "{error}");

    let after = store.status(USER).await.unwrap().unwrap();
    assert!(
        after.message.as_deref().is_some_and(|m| m.contains("cut")),
        "the error is reported: {after:?}"
    );
    assert_eq!(
        after.observed_revision,
        Some(acted_on),
        "the crashed container is not shown as the one of revision {revision}"
    );
}
