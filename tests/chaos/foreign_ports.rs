//! Foreign processes on the port range, and an image that vanishes mid-creation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::support::controller::{port_range, ControllerConfig, ControllerProcess};
use crate::support::docker::{docker, eventually, DockerFixture, AGENT_IMAGE};
use crate::support::fleet::{wait_converged, Want};
use crate::support::{Backend, TestDb};
use clawfleet::naming::container_name;
use clawfleet::status::{ContainerStatus, Phase};
use rand::seq::SliceRandom;

use crate::harness::*;

/// An extra tag of the agent image, removed when dropped (never the agent image itself).
struct ExtraTag(String);

impl ExtraTag {
    fn new(tag: &str) -> Self {
        assert_ne!(tag, AGENT_IMAGE);
        docker(&["tag", AGENT_IMAGE, tag]).expect("docker tag");
        Self(tag.to_owned())
    }
}

impl Drop for ExtraTag {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ports_and_an_image_vanishing_mid_creation_end_with_every_user_running_on_its_own_port(
) {
    let mut rng = chaos_rng("ports-image");
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-image");
    // A tag of this test's own (image names are lowercase).
    let image = format!(
        "clawfleet-chaos-{}:1",
        fx.prefix.trim_end_matches('-').to_ascii_lowercase()
    );
    let tag = ExtraTag::new(&image);
    let (start, end) = port_range(40);
    // A foreign process holds the first ports and a few others of the range.
    let mut held: BTreeMap<u16, TcpListener> = BTreeMap::new();
    let mut candidates: Vec<u16> = (start + 3..=end).collect();
    candidates.shuffle(&mut rng);
    for port in [start, start + 1, start + 2]
        .into_iter()
        .chain(candidates.into_iter().take(5))
    {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.insert(port, listener);
        }
    }
    let config = ControllerConfig::new(&db, &fx)
        .with("OPENCLAW_IMAGE", &image)
        .with("CLAWFLEET_PORT_RANGE", &format!("{start}-{end}"))
        .with("CLAWFLEET_FAILED_RETRY", "3s")
        .with("CLAWFLEET_CONCURRENCY", "4");
    let mut controller = ControllerProcess::start(&config);
    let users: Vec<String> = (0..20).map(|i| format!("i{i}")).collect();
    let want: BTreeMap<String, Want> = users.iter().map(|u| (u.clone(), Want::Running)).collect();
    insert_users(&db, &users[..10]).await;
    eventually(LONG, "a few containers to be made", || async {
        (on_engine(&fx).await.len() >= 3).then_some(())
    })
    .await;

    // The image goes away mid-creation.
    docker_cli(&["rmi", &image]).await.expect("untag");
    let removed = Instant::now();
    insert_users(&db, &users[10..]).await;
    // Another foreign process grabs free ports of the range while users are
    // being given theirs.
    let claimed: HashSet<u16> = statuses(&store)
        .await
        .values()
        .filter_map(|s| s.host_port)
        .collect();
    let mut grabbed = Vec::new();
    for port in start..=end {
        if grabbed.len() == 4 {
            break;
        }
        if held.contains_key(&port) || claimed.contains(&port) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.insert(port, listener);
            grabbed.push(port);
        }
    }
    let failed_of = |rows: HashMap<String, ContainerStatus>| -> BTreeMap<String, String> {
        rows.into_values()
            .filter(|s| s.phase == Phase::Failed)
            .map(|s| (s.user_id, s.message.unwrap_or_default()))
            .collect()
    };
    let mut failed = eventually(LONG, "a user failed naming the missing image", || async {
        let failed = failed_of(statuses(&store).await);
        (!failed.is_empty()).then_some(failed)
    })
    .await;
    let first_failed = removed.elapsed();
    // The image stays away a few seconds more: every user failing meanwhile is noted.
    while removed.elapsed() < first_failed + Duration::from_secs(3) {
        failed.extend(failed_of(statuses(&store).await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (user, message) in &failed {
        assert!(
            message.contains(&image),
            "{user:?} failed with {message:?}, which does not name {image}"
        );
    }
    eprintln!(
        "image gone: first failure {first_failed:?} later; failed meanwhile: {:?}, e.g. {:?}; ports held by others: {:?} (grabbed mid-run: {grabbed:?})",
        failed.keys().collect::<Vec<_>>(),
        failed.values().next(),
        held.keys().collect::<Vec<_>>()
    );
    docker_cli(&["tag", AGENT_IMAGE, &image])
        .await
        .expect("tag again");
    let back = Instant::now();
    let took = wait_converged(&fx, &store, &want, LONG).await;
    eprintln!(
        "image back after {:?}: converged {took:?} later (failed retry 3s)",
        back - removed
    );
    log_summary("ports-image", &controller);
    let seen = seen_all(&store, &want).await;
    let rows = statuses(&store).await;
    for user in &users {
        let port = rows[user].host_port.unwrap();
        assert!(
            !held.contains_key(&port),
            "{user:?} got port {port}, held by another process"
        );
        let published = docker(&["port", &container_name(&fx.prefix, user), "18789/tcp"]).unwrap();
        assert_eq!(published, format!("127.0.0.1:{port}"), "{user:?}");
        assert_eq!(seen[user].boots, 1, "{user:?}");
    }
    for user in failed.keys() {
        assert_eq!(rows[user].phase, Phase::Running, "{user:?} recovered");
    }
    assert_alive(&mut controller, "after the image came back");
    drop(controller);
    drop(tag);
    assert!(
        docker(&["image", "inspect", &image]).is_err(),
        "the extra tag is removed"
    );
    assert!(docker(&["image", "inspect", AGENT_IMAGE]).is_ok());
}
