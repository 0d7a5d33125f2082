//! The engine unreachable while containers are killed, stopped and removed behind its back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::controller::{gateway, token_of, ControllerConfig, ControllerProcess};
use crate::support::docker::{eventually, volume_exists, DockerFixture, EngineProxy};
use crate::support::fleet::{wait_converged, Want};
use crate::support::{Backend, TestDb};
use clawfleet::naming::{container_name, volume_name};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_away_while_containers_are_killed_stopped_and_removed_behind_its_back_converges_when_back(
) {
    let flaps: usize = env_or("CHAOS_ROUNDS", 6);
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-engine");
    let proxy = EngineProxy::unix().await;
    // A long resync period: only the event stream's reconnect (events since
    // the last one, and a relist) can find what happened meanwhile.
    let config = ControllerConfig::new(&db, &fx)
        .with("DOCKER_HOST", &proxy.docker_host)
        .with("CLAWFLEET_RESYNC_PERIOD", "1h");
    let mut controller = ControllerProcess::start(&config);
    let addr = controller.http_addr().await;
    let users: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
    insert_users(&db, &users).await;
    let mut want: BTreeMap<String, Want> =
        users.iter().map(|u| (u.clone(), Want::Running)).collect();
    wait_converged(&fx, &store, &want, LONG).await;
    let before = seen_all(&store, &want).await;
    let rows = statuses(&store).await;
    let reconnects = |m: &BTreeMap<String, f64>| {
        m.get("clawfleet_docker_event_stream_reconnects_total")
            .copied()
            .unwrap_or(0.0)
    };
    let reconnects_before = reconnects(&metrics(addr).await);

    proxy.set_down(true);
    let down_at = Instant::now();
    let (code, body) = eventually(
        Duration::from_secs(20),
        "not ready without the engine",
        || async {
            let (code, body) = http_get(addr, "/readyz").await;
            (code == 503).then_some((code, body))
        },
    )
    .await;
    assert!(body.contains("docker"), "{code} {body}");
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "alive all the same"
    );

    // Behind its back, through the engine's own socket.
    let name = |u: &str| container_name(&fx.prefix, u);
    docker_cli(&["kill", &name("d0")]).await.unwrap();
    docker_cli(&["stop", "-t", "1", &name("d1")]).await.unwrap();
    docker_cli(&["rm", "-f", &name("d2")]).await.unwrap();
    let (code, _) = blocking({
        let (port, token) = (rows["d3"].host_port.unwrap(), token_of(&rows["d3"]));
        move || gateway(port, "POST", "/v1/exit?code=3", Some(&token))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "the gateway accepted to exit");
    docker_cli(&["kill", &name("d4")]).await.unwrap();
    docker_cli(&["start", &name("d4")]).await.unwrap();
    // And in the database, which it can still read.
    db.exec("UPDATE desired_containers SET restart_nonce = restart_nonce + 1 WHERE user_id = 'd5'")
        .await;
    db.exec("DELETE FROM desired_containers WHERE user_id = 'd6'")
        .await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('d8')")
        .await;
    want.insert("d6".into(), Want::Deleted);
    want.insert("d8".into(), Want::Running);

    let outage = Duration::from_secs(5);
    while down_at.elapsed() < outage {
        assert_alive(&mut controller, "while the engine was away");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    proxy.set_down(false);
    let took = wait_converged(&fx, &store, &want, LONG).await;
    eprintln!("engine away {outage:?}: converged {took:?} after it came back");
    let after = seen_all(&store, &want).await;
    let rows = statuses(&store).await;
    for user in ["d0", "d1", "d3"] {
        assert_eq!(
            after[user].id, before[user].id,
            "{user:?}: restarted in place"
        );
        assert!(rows[user].restarts >= 1, "{user:?}: {:?}", rows[user]);
        assert_eq!(after[user].boots, 2, "{user:?}");
    }
    assert_eq!(after["d4"].id, before["d4"].id, "d4: started again by hand");
    for user in ["d2", "d5"] {
        assert_ne!(after[user].id, before[user].id, "{user:?}: a new container");
        assert_eq!(after[user].boots, 2, "{user:?}: on its old volume");
    }
    assert_eq!(after["d7"].id, before["d7"].id, "d7 was left alone");
    assert_eq!(after["d7"].boots, 1, "d7 was left alone");
    for (user, seen) in &before {
        if want[user] == Want::Running {
            assert_eq!(after[user].token, seen.token, "{user:?}: its token changed");
        }
    }
    assert!(
        volume_exists(&volume_name(&fx.prefix, "d6")),
        "d6's volume is kept"
    );
    let reconnects_after = reconnects(&metrics(addr).await);
    assert!(
        reconnects_after > reconnects_before,
        "the event stream was re-subscribed: {reconnects_before} -> {reconnects_after}"
    );

    // Flapping: down and up every 300 ms while more happens behind its back.
    let flapped = Instant::now();
    for flap in 0..flaps {
        proxy.set_down(true);
        match flap {
            1 => drop(docker_cli(&["kill", &name("d7")]).await.unwrap()),
            3 => drop(docker_cli(&["rm", "-f", &name("d0")]).await.unwrap()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set_down(false);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = wait_converged(&fx, &store, &want, LONG).await;
    eprintln!(
        "engine flapping {flaps} times: converged {took:?} after the last flap ({:?} in all)",
        flapped.elapsed()
    );
    let last = seen_all(&store, &want).await;
    let rows = statuses(&store).await;
    assert_eq!(last["d7"].id, before["d7"].id, "d7: restarted in place");
    assert!(rows["d7"].restarts >= 1);
    assert_ne!(last["d0"].id, after["d0"].id, "d0: a new container");
    assert_eq!(last["d0"].boots, 3, "d0: on its old volume");
    assert_eq!(last["d0"].token, before["d0"].token);
    let reconnects_last = reconnects(&metrics(addr).await);
    eprintln!(
        "event stream reconnects: {reconnects_before} before, {reconnects_after} after the outage, {reconnects_last} after flapping"
    );
    log_summary("engine-away", &controller);
    assert_alive(&mut controller, "after the engine came back");
}
