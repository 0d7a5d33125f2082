//! The Swarm backend on a real multi-node swarm: a manager and two workers,
//! each its own `dockerd` in a network namespace of this machine
//! (`scripts/swarm-cluster.sh`), with the controller in the host's namespace
//! talking to the manager's socket. Users spread over the workers and are
//! pinned there; a worker killed makes its users `pending`, naming it, and
//! leaves the others alone; when it returns its users run again on their
//! volumes (README "Running on Docker Swarm").
//!
//! Traffic stays on this machine: the nodes' bridge lives in a namespace of
//! its own, reached from the host by one veth. The cluster is removed when
//! the test ends, passing or failing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clawfleet::status::{ContainerStatus, Phase};
use support::controller::{token_of, wait_for_status, ControllerConfig, ControllerProcess};
use support::docker::{eventually, DockerFixture};
use support::http::Client;
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(240);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/swarm-cluster.sh")
}

/// Runs `swarm-cluster.sh args…`; its `KEY=VALUE` lines.
fn cluster(args: &[&str]) -> BTreeMap<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .env("SWARM_HEARTBEAT", "1s")
        .output()
        .expect("run swarm-cluster.sh");
    assert!(
        out.status.success(),
        "swarm-cluster.sh {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A cluster of this test's own, taken down when dropped.
struct Cluster {
    name: String,
    env: BTreeMap<String, String>,
}

impl Cluster {
    fn up(name: &str, workers: u8) -> Self {
        // Down first: a cluster left by a killed run of this test goes.
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", name])
            .output();
        // Made before `up`, so a failed `up` is taken down too.
        let mut made = Self {
            name: name.to_owned(),
            env: BTreeMap::new(),
        };
        made.env = cluster(&["up", name, &workers.to_string()]);
        made
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from {:?}", self.env))
    }

    /// Node id of worker `i` (from 1).
    fn worker_id(&self, i: u8) -> String {
        self.get(&format!("SWARM_NODE_{i}_ID")).to_owned()
    }

    fn stop_worker(&self, i: u8) {
        cluster(&["stop-node", &self.name, &i.to_string()]);
    }

    fn start_worker(&self, i: u8) {
        cluster(&["start-node", &self.name, &i.to_string()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", &self.name])
            .output();
    }
}

/// `GET /v1/whoami` of the gateway at `status.host_url`, if it answers.
async fn whoami_at(status: &ContainerStatus) -> Option<serde_json::Value> {
    let url = status.host_url.as_deref()?;
    let addr = url.strip_prefix("http://")?.parse().ok()?;
    let reply = Client::new(addr, Some(&token_of(status)))
        .with_timeout(Duration::from_secs(5))
        .try_send("GET", "/v1/whoami", None)
        .await
        .ok()?;
    (reply.status == 200).then(|| reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_spread_over_workers_stay_pinned_and_wait_out_a_dead_worker() {
    let cluster = Cluster::up(&format!("cft{:x}", std::process::id() % 0xffff), 2);
    let (w1, w2) = (cluster.worker_id(1), cluster.worker_id(2));
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("mnode");
    let config = ControllerConfig::new(&db, &fx)
        .with("DOCKER_HOST", cluster.get("SWARM_MANAGER_HOST"))
        .with("CLAWFLEET_BACKEND", "swarm")
        // No IPVS in this kernel: no routing mesh; each port answers on its node.
        .with("CLAWFLEET_SWARM_PUBLISH_MODE", "host")
        .with("CLAWFLEET_PLACEMENT", "node.labels.agents==true")
        .with("CLAWFLEET_SWARM_TASK_POLL", "500ms");
    let _controller = ControllerProcess::start(&config);

    let users: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for user in &users {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
    }
    let mut node_of = BTreeMap::new();
    for user in &users {
        let s = wait_for_status(&store, user, LONG, "running on a worker", |s| {
            s.phase == Phase::Running && s.node.is_some()
        })
        .await;
        let me = eventually(LONG, "the gateway on its node", || whoami_at(&s)).await;
        assert_eq!(me["boots"], 1, "{user}");
        node_of.insert(user.clone(), s.node.clone().unwrap());
    }
    eprintln!("users by node (workers {w1}, {w2}): {node_of:?}");
    let used: BTreeSet<&String> = node_of.values().collect();
    assert_eq!(
        used,
        BTreeSet::from([&w1, &w2]),
        "users spread over both workers, never the manager: {node_of:?}"
    );
    let on_w1: Vec<&String> = node_of
        .iter()
        .filter(|(_, n)| **n == w1)
        .map(|(u, _)| u)
        .collect();
    let on_w2: Vec<&String> = node_of
        .iter()
        .filter(|(_, n)| **n == w2)
        .map(|(u, _)| u)
        .collect();
    let before: BTreeMap<String, ContainerStatus> = {
        let mut m = BTreeMap::new();
        for user in &users {
            m.insert(user.clone(), store.status(user).await.unwrap().unwrap());
        }
        m
    };

    // Worker 1's dockerd killed: its users wait, naming it; the others run on.
    cluster.stop_worker(1);
    for user in &on_w1 {
        let s = wait_for_status(&store, user, LONG, "pending on the dead worker", |s| {
            s.phase == Phase::Pending
                && s.message
                    .as_deref()
                    .is_some_and(|m| m.contains(&w1) && m.contains("volume lives there"))
        })
        .await;
        assert_eq!(s.node.as_deref(), Some(w1.as_str()), "still pinned");
        eprintln!("{user} while worker 1 is down: {:?}", s.message);
    }
    for user in &on_w2 {
        let s = store.status(user).await.unwrap().unwrap();
        assert_eq!(s.phase, Phase::Running, "{user} untouched");
        assert_eq!(s.container_id, before[*user].container_id);
        assert_eq!(s.restarts, before[*user].restarts);
        let me = whoami_at(&s).await.expect("still answering");
        assert_eq!(me["boots"], 1, "{user} was not restarted");
    }

    // Back: its users run again on it, on their volumes (the boot counter goes on).
    cluster.start_worker(1);
    for user in &on_w1 {
        let s = wait_for_status(&store, user, LONG, "running again on its worker", |s| {
            s.phase == Phase::Running
        })
        .await;
        assert_eq!(s.node.as_deref(), Some(w1.as_str()));
        let me = eventually(LONG, "the gateway back on its node", || async {
            let s = store.status(user).await.ok().flatten()?;
            whoami_at(&s).await
        })
        .await;
        assert_eq!(me["boots"], 2, "{user} booted again on the same volume");
        eprintln!("{user} back on worker 1: boots {}", me["boots"]);
    }
}
