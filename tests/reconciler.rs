//! The controller against the real Docker engine, with rows written by raw
//! SQL as another service would: the main scenario on SQLite and again on
//! PostgreSQL, then crashes, foreign ports, bad rows, adoption, unhealthy
//! containers and a broken event stream.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clawfleet::status::Phase;
use support::controller::{
    gateway, sql_now, token_of, wait_for_status, wait_running, whoami, ControllerConfig,
    ControllerProcess,
};
use support::docker::{
    container_state, docker, eventually, volume_exists, DockerFixture, EngineProxy,
};
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

fn container_names(fx: &DockerFixture) -> Vec<(String, String)> {
    let filter = format!("label=io.clawfleet.instance={}", fx.instance);
    docker(&[
        "ps",
        "-a",
        "--filter",
        &filter,
        "--format",
        "{{.Names}}\t{{.Label \"io.clawfleet.user-id\"}}",
    ])
    .unwrap_or_default()
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| {
        let (name, user) = l.split_once('\t').unwrap_or((l, ""));
        (name.to_owned(), user.to_owned())
    })
    .collect()
}

async fn main_scenario(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let fx = DockerFixture::new("main");
    let mut controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));

    let users = [
        "1",
        "10",
        "alice",
        "Bob@Example.com",
        "u0",
        "u1",
        "u2",
        "u3",
        "u4",
        "u5",
        "u6",
        "u7",
    ];
    for user in users {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
    }
    let mut statuses = BTreeMap::new();
    for user in users {
        statuses.insert(user, wait_running(&store, user).await);
    }
    let ports: HashSet<u16> = statuses.values().map(|s| s.host_port.unwrap()).collect();
    assert_eq!(ports.len(), users.len(), "every user has a port of its own");
    let ids: HashSet<&str> = statuses
        .values()
        .map(|s| s.container_id.as_deref().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        users.len(),
        "every user has a container of its own"
    );
    for (user, s) in &statuses {
        let (code, _) = gateway(s.host_port.unwrap(), "GET", "/healthz", None).unwrap();
        assert_eq!(code, 200, "{user}");
        assert_eq!(
            s.url.as_deref(),
            Some(format!("http://{}:18789", s.container_name.as_deref().unwrap()).as_str())
        );
        assert_eq!(
            s.host_url,
            Some(format!("http://127.0.0.1:{}", s.host_port.unwrap()))
        );
        let me = whoami(s);
        assert_eq!(me["agent_id"], *user);
        assert_eq!(me["boots"], 1);
        assert_eq!(me["agent_token_matches"], true);
    }
    // Regression: user 1 matched user 10's container by substring.
    assert_eq!(
        statuses["1"].container_name.as_deref(),
        Some(fx.name("1").as_str())
    );
    assert_eq!(
        statuses["10"].container_name.as_deref(),
        Some(fx.name("10").as_str())
    );

    // state -> stopped stops.
    db.exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'u0'")
        .await;
    wait_for_status(&store, "u0", LONG, "stopped", |s| {
        s.phase == Phase::Stopped && s.health.is_none()
    })
    .await;
    assert_eq!(container_state(&fx.name("u0")).as_deref(), Some("exited"));

    // A deleted row removes the container and keeps the volume.
    db.exec("DELETE FROM desired_containers WHERE user_id = 'u1'")
        .await;
    eventually(LONG, "u1's status row to go", || async {
        store.status("u1").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(container_state(&fx.name("u1")), None);
    assert!(volume_exists(&format!("{}-state", fx.name("u1"))));

    // The idle deadline stops; activity starts again.
    db.exec(&format!(
        "UPDATE desired_containers SET idle_timeout_secs = 2, last_active_at = {} WHERE user_id = 'u2'",
        sql_now(&db)
    ))
    .await;
    wait_for_status(&store, "u2", LONG, "idle", |s| s.phase == Phase::Idle).await;
    assert_eq!(container_state(&fx.name("u2")).as_deref(), Some("exited"));
    db.exec(&format!("UPDATE desired_containers SET idle_timeout_secs = 3600, last_active_at = {} WHERE user_id = 'u2'", sql_now(&db))).await;
    let u2 = wait_running(&store, "u2").await;
    assert_eq!(
        u2.container_id, statuses["u2"].container_id,
        "started again, not recreated"
    );

    // restart_nonce recreates: a new container on the same volume.
    db.exec("UPDATE desired_containers SET restart_nonce = restart_nonce + 1 WHERE user_id = 'u3'")
        .await;
    let old = statuses["u3"].container_id.clone();
    let u3 = wait_for_status(&store, "u3", LONG, "recreated and healthy", |s| {
        s.container_id != old
            && s.phase == Phase::Running
            && s.health == Some(clawfleet::status::Health::Healthy)
    })
    .await;
    assert_eq!(
        whoami(&u3)["boots"],
        2,
        "the state volume survived the recreate"
    );
    assert_eq!(
        token_of(&u3),
        token_of(&statuses["u3"]),
        "the token is stable across recreates"
    );
    assert_eq!(u3.host_port, statuses["u3"].host_port, "so is the port");

    // What a human does with the docker CLI is undone.
    docker(&["kill", &fx.name("u4")]).unwrap();
    docker(&["stop", &fx.name("u5")]).unwrap();
    docker(&["rm", "-f", &fx.name("u6")]).unwrap();
    let u4 = wait_for_status(&store, "u4", LONG, "restarted after kill", |s| {
        s.restarts >= 1 && s.phase == Phase::Running
    })
    .await;
    assert_eq!(u4.container_id, statuses["u4"].container_id);
    wait_for_status(&store, "u5", LONG, "restarted after stop", |s| {
        s.restarts >= 1 && s.phase == Phase::Running
    })
    .await;
    let u6 = wait_running(&store, "u6").await;
    assert_ne!(u6.container_id, statuses["u6"].container_id);
    for user in ["u4", "u5"] {
        eventually(LONG, "container running again", || async {
            (container_state(&fx.name(user)).as_deref() == Some("running")).then_some(())
        })
        .await;
    }

    // Shutting down leaves every container as it is.
    let status = controller.terminate();
    assert!(
        status.success(),
        "exit status {status}\n{}",
        controller.log()
    );
    assert_eq!(
        container_state(&fx.name("alice")).as_deref(),
        Some("running")
    );
    assert_eq!(container_state(&fx.name("u7")).as_deref(), Some("running"));
}

#[tokio::test]
async fn rows_written_by_sql_converge_on_sqlite() {
    main_scenario(Backend::Sqlite).await;
}

#[tokio::test]
async fn rows_written_by_sql_converge_on_postgres() {
    main_scenario(Backend::Postgres).await;
}

#[tokio::test]
async fn a_controller_killed_mid_convergence_leaves_one_container_per_user_after_restart() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("kill9");
    let config = ControllerConfig::new(&db, &fx).with("CLAWFLEET_CONCURRENCY", "8");
    let users: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let values: Vec<String> = users.iter().map(|u| format!("('{u}')")).collect();
    db.exec(&format!(
        "INSERT INTO desired_containers (user_id) VALUES {}",
        values.join(",")
    ))
    .await;

    for round in 0..3 {
        let mut controller = ControllerProcess::start(&config);
        // Kill it while it is creating containers.
        let target = 3 + round * 8;
        eventually(LONG, "some containers to appear", || async {
            (container_names(&fx).len() >= target).then_some(())
        })
        .await;
        controller.kill9();
    }
    // Bump a few nonces so some recreates are interrupted too.
    db.exec("UPDATE desired_containers SET restart_nonce = 1 WHERE user_id IN ('k0', 'k1', 'k2')")
        .await;
    let mut controller = ControllerProcess::start(&config);
    eventually(LONG, "a recreate to begin", || async {
        controller
            .log()
            .contains("recreating container")
            .then_some(())
    })
    .await;
    controller.kill9();

    let _controller = ControllerProcess::start(&config);
    for user in &users {
        wait_running(&store, user).await;
    }
    eventually(
        LONG,
        "exactly one container per user and nothing else",
        || async {
            let mut names = container_names(&fx);
            names.sort();
            let expected: Vec<(String, String)> = {
                let mut e: Vec<_> = users.iter().map(|u| (fx.name(u), u.clone())).collect();
                e.sort();
                e
            };
            (names == expected).then_some(())
        },
    )
    .await;
    let ports: HashSet<u16> = store
        .status_all()
        .await
        .unwrap()
        .iter()
        .filter_map(|s| s.host_port)
        .collect();
    assert_eq!(ports.len(), users.len());
}

#[tokio::test]
async fn a_port_held_by_a_foreign_process_is_stepped_over() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("foreign");
    let config = ControllerConfig::new(&db, &fx);
    let (start, _) = config.ports();
    let _held = std::net::TcpListener::bind(("127.0.0.1", start)).expect("hold the first port");
    let _controller = ControllerProcess::start(&config);
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('p1'), ('p2')")
        .await;
    for user in ["p1", "p2"] {
        let s = wait_running(&store, user).await;
        assert_ne!(
            s.host_port,
            Some(start),
            "{user} got the port a foreign process holds"
        );
    }
}

#[tokio::test]
async fn a_bad_row_is_failed_with_a_message_while_the_others_converge() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("badrow");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx).with(
        "CLAWFLEET_ALLOWED_IMAGES",
        "clawfleet-agent-stub:*,no-such-image:*",
    ));
    db.exec(
        "INSERT INTO desired_containers (user_id, state) VALUES ('bad', 'banana');
         INSERT INTO desired_containers (user_id, image) VALUES ('dots', '../etc/passwd');
         INSERT INTO desired_containers (user_id, image) VALUES ('missing', 'no-such-image:1');
         INSERT INTO desired_containers (user_id) VALUES ('good');",
    )
    .await;
    let bad = wait_for_status(&store, "bad", LONG, "failed", |s| s.phase == Phase::Failed).await;
    assert!(bad.message.as_deref().unwrap().contains("state"), "{bad:?}");
    let dots = wait_for_status(&store, "dots", LONG, "failed", |s| s.phase == Phase::Failed).await;
    assert!(
        dots.message.as_deref().unwrap().contains("image"),
        "{dots:?}"
    );
    let missing = wait_for_status(&store, "missing", LONG, "failed", |s| {
        s.phase == Phase::Failed
    })
    .await;
    assert!(
        missing
            .message
            .as_deref()
            .unwrap()
            .contains("no-such-image:1"),
        "{missing:?}"
    );
    // It says what to do, not only what the engine said (issue 11).
    assert!(
        missing
            .message
            .as_deref()
            .unwrap()
            .contains("`docker load` it"),
        "{missing:?}"
    );
    wait_running(&store, "good").await;
    assert_eq!(container_state(&fx.name("bad")), None);
}

#[tokio::test]
async fn an_unlabelled_container_of_the_right_name_is_adopted_with_its_volume() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("adopt");
    // What the original service left behind: no labels, only AGENT_TOKEN.
    let name = fx.name("legacy");
    let volume = format!("{name}-state:/home/node/.openclaw");
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-v",
        &volume,
        "-e",
        "OPENCLAW_GATEWAY_TOKEN=old",
        "-e",
        "AGENT_TOKEN=old",
        support::docker::AGENT_IMAGE,
    ])
    .unwrap();
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('legacy')")
        .await;
    let s = wait_running(&store, "legacy").await;
    let labels = docker(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"io.clawfleet.user-id\"}}",
        &name,
    ])
    .unwrap();
    assert_eq!(labels, "legacy");
    assert_eq!(
        whoami(&s)["boots"],
        2,
        "the old container's volume was kept"
    );
}

#[tokio::test]
async fn a_container_whose_id_starts_with_a_users_name_is_not_taken_for_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("idprefix");
    let foreign = fx.name("foreign");
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &foreign,
        "-e",
        "OPENCLAW_GATEWAY_TOKEN=foreign",
        support::docker::AGENT_IMAGE,
    ])
    .unwrap();
    // The engine answers an inspect of a name it does not know with the
    // container whose id starts with it: make a user's name such a prefix.
    let (prefix, user) = (&id[..8], &id[8..12]);
    let config = ControllerConfig::new(&db, &fx).with("CLAWFLEET_NAME_PREFIX", prefix);
    let _controller = ControllerProcess::start(&config);
    db.exec(&format!(
        "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
    ))
    .await;
    let s = wait_running(&store, user).await;
    assert_eq!(s.container_name.as_deref(), Some(&id[..12]));
    assert_ne!(s.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.Name}} {{index .Config.Labels \"io.clawfleet.managed\"}}",
            &id
        ])
        .unwrap()
        .trim(),
        format!("running /{foreign}"),
        "the foreign container is left as it was"
    );
}

#[tokio::test]
async fn an_unhealthy_container_is_restarted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("unhealthy");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('sick')")
        .await;
    let s = wait_running(&store, "sick").await;
    let (code, _) = gateway(
        s.host_port.unwrap(),
        "POST",
        "/v1/unhealthy",
        Some(&token_of(&s)),
    )
    .unwrap();
    assert_eq!(code, 200);
    let after = wait_for_status(&store, "sick", LONG, "restarted and healthy", |s| {
        s.restarts >= 1 && s.health == Some(clawfleet::status::Health::Healthy)
    })
    .await;
    assert_eq!(after.container_id, s.container_id, "restarted in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_event_stream_is_reconnected_and_what_happened_meanwhile_is_undone() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("cut");
    let proxy = EngineProxy::unix().await;
    // A long resync period: only the reconnect (events since, and a relist) can catch up.
    let config = ControllerConfig::new(&db, &fx)
        .with("DOCKER_HOST", &proxy.docker_host)
        .with("CLAWFLEET_RESYNC_PERIOD", "1h");
    let controller = ControllerProcess::start(&config);
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('e1'), ('e2')")
        .await;
    let e1 = wait_running(&store, "e1").await;
    wait_running(&store, "e2").await;
    for _ in 0..3 {
        proxy.cut();
        // While it waits out its restart back-off the container is not
        // running, and `docker kill` refuses: that is fine.
        let _ = docker(&["kill", &fx.name("e1")]);
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut();
    }
    docker(&["rm", "-f", &fx.name("e2")]).unwrap();
    proxy.cut();
    let after = wait_for_status(&store, "e1", LONG, "restarted after the cut", |s| {
        s.restarts >= 1 && s.phase == Phase::Running
    })
    .await;
    assert_eq!(after.container_id, e1.container_id);
    wait_running(&store, "e2").await;
    assert!(
        controller.log().contains("reconnect"),
        "the controller noticed the cut"
    );
}

/// The value of one sample of the controller's `/metrics`.
fn metric(addr: std::net::SocketAddr, sample: &str) -> Option<f64> {
    let (_, body) = gateway(addr.port(), "GET", "/metrics", None).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces): state is the
    // first, utime and stime the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

#[tokio::test]
async fn a_wrapped_port_cursor_never_moves_a_running_user_and_a_full_range_waits_idle() {
    // Regression: the allocator did not record the ports it handed out. Once
    // its cursor wrapped, the bind probe found the engine's listeners of this
    // instance's own containers, quarantined their ports, and at the next
    // full resync their owners were moved off their ports (and recreated).
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("wrap");
    let (start, end) = support::controller::port_range(4);
    let range = format!("{start}-{end}");
    let config = ControllerConfig::new(&db, &fx)
        .with("CLAWFLEET_PORT_RANGE", &range)
        .with("CLAWFLEET_RESYNC_PERIOD", "2s");
    let mut controller = ControllerProcess::start(&config);
    let addr = controller.http_addr().await;

    let mut first = BTreeMap::new();
    for user in ["w1", "w2", "w3", "w4"] {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
        first.insert(user, wait_running(&store, user).await);
    }
    db.exec("DELETE FROM desired_containers WHERE user_id = 'w4'")
        .await;
    eventually(LONG, "w4's status row to go", || async {
        store.status("w4").await.unwrap().is_none().then_some(())
    })
    .await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('w5')")
        .await;
    let w5 = wait_running(&store, "w5").await;
    assert_eq!(
        w5.host_port, first["w4"].host_port,
        "the cursor wrapped to the only free port"
    );

    // Two full resyncs later every user has been looked at again.
    let since = chrono::Utc::now().timestamp() as f64;
    let resync = "clawfleet_last_full_resync_timestamp_seconds";
    let after = eventually(LONG, "a full resync after the wrap", || async {
        metric(addr, resync).filter(|t| *t >= since + 1.0)
    })
    .await;
    eventually(LONG, "a second full resync", || async {
        metric(addr, resync).filter(|t| *t > after)
    })
    .await;
    for user in ["w1", "w2", "w3"] {
        let now = store.status(user).await.unwrap().expect("status");
        let was = &first[user];
        assert_eq!(
            (
                now.phase,
                now.host_port,
                now.container_id.as_deref(),
                now.restarts
            ),
            (
                Phase::Running,
                was.host_port,
                was.container_id.as_deref(),
                was.restarts
            ),
            "{user} was moved or recreated: {:?}",
            now.message
        );
        assert_eq!(
            docker(&["inspect", "-f", "{{.Id}}", &fx.name(user)])
                .unwrap()
                .trim(),
            was.container_id.as_deref().unwrap(),
            "{user}'s container is the one it had"
        );
    }

    // With the range full, a sixth user waits, idle, until a port frees. A
    // fresh controller at the default periods (resync every 5 min) shows
    // what it costs and who wakes the user.
    assert!(controller.terminate().success());
    let mut controller = ControllerProcess::start(
        &config
            .clone()
            .with("CLAWFLEET_RESYNC_PERIOD", "5m")
            .with("CLAWFLEET_POLL_INTERVAL", "250ms"),
    );
    controller.http_addr().await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('w6')")
        .await;
    let w6 = wait_for_status(&store, "w6", LONG, "failed for a full range", |s| {
        s.phase == Phase::Failed
    })
    .await;
    let message = w6.message.unwrap_or_default();
    assert!(
        message.contains(&format!("port range {range} is exhausted"))
            && message.contains("--port-range")
            && message.contains("CLAWFLEET_PORT_RANGE"),
        "{message}"
    );
    assert_eq!(w6.host_port, None);
    let pid = controller.pid();
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = cpu_seconds(pid) - before;
    eprintln!("controller CPU over 10 s with the range full: {used:.3} s");
    assert!(
        used < 0.5,
        "the controller used {used:.2} s of CPU in 10 s while the range was full"
    );
    assert!(controller.try_exit().is_none(), "{}", controller.log());

    // A deleted user frees its port: the waiting user takes it without
    // waiting for a resync or the failed-retry delay.
    db.exec("DELETE FROM desired_containers WHERE user_id = 'w5'")
        .await;
    let w6 = wait_running(&store, "w6").await;
    assert_eq!(w6.host_port, w5.host_port);
}

async fn feed_survives_a_revision_jump(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let fx = DockerFixture::new("jump");
    let controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let addr = controller.http_addr().await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('before')")
        .await;
    wait_running(&store, "before").await;

    db.exec(match backend {
        Backend::Sqlite => {
            "UPDATE clawfleet_revision SET value = value + 1000000000000 WHERE id = 1"
        }
        Backend::Postgres => {
            "SELECT setval('clawfleet_revision_seq', \
             (SELECT last_value FROM clawfleet_revision_seq) + 1000000000000)"
        }
    })
    .await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('after')")
        .await;
    eventually(LONG, "the row after the jump to converge", || async {
        let (code, _) = gateway(addr.port(), "GET", "/healthz", None)
            .unwrap_or_else(|e| panic!("/healthz unanswered during the jump: {e}"));
        assert_eq!(code, 200, "/healthz during the jump");
        let s = store.status("after").await.ok().flatten()?;
        (s.phase == Phase::Running && s.health == Some(clawfleet::status::Health::Healthy))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revision_counter_moved_far_ahead_does_not_stall_the_feed_on_sqlite() {
    // Regression: the feed's cursor inserted every skipped revision, so a
    // writer moving the counter ahead stalled it (and ran it out of memory).
    feed_survives_a_revision_jump(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_revision_counter_moved_far_ahead_does_not_stall_the_feed_on_postgres() {
    feed_survives_a_revision_jump(Backend::Postgres).await;
}

/// Regression: with no `--allowed-images` any row could run any image from
/// any registry; the default list is now the default image's repository.
#[tokio::test]
async fn a_row_asking_for_an_image_outside_the_default_allow_list_is_failed_naming_the_list() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("allowlist");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec(
        "INSERT INTO desired_containers (user_id, image) VALUES ('outside', '10.0.0.1:5000/agent:1');
         INSERT INTO desired_containers (user_id) VALUES ('good');",
    )
    .await;
    let outside = wait_for_status(&store, "outside", LONG, "failed", |s| {
        s.phase == Phase::Failed
    })
    .await;
    let message = outside.message.as_deref().unwrap_or_default();
    for needle in [
        "10.0.0.1:5000/agent:1",
        "not allowed",
        "clawfleet-agent-stub:*",
        "clawfleet-agent-stub@*",
    ] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    wait_running(&store, "good").await;
    assert_eq!(container_state(&fx.name("outside")), None);
}

/// Regression: any value of `--allowed-images` panicked at start.
#[tokio::test]
async fn allowing_any_image_with_a_star_starts_and_logs_a_warning() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("anyimage");
    let controller = ControllerProcess::start(
        &ControllerConfig::new(&db, &fx).with("CLAWFLEET_ALLOWED_IMAGES", "*"),
    );
    controller.http_addr().await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('good');")
        .await;
    wait_running(&store, "good").await;
    let log = controller.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("allows any image")),
        "{log}"
    );
}

/// Issue 11: after the controller stopped, nothing told readers that the
/// status had stopped being kept.
#[tokio::test]
async fn a_running_controller_writes_its_heartbeat_and_leaves_it_stale_when_it_stops() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("heartbeat");
    let mut controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let running = eventually(LONG, "the controller's first heartbeat", || async {
        store.controller_seen(&fx.instance).await.unwrap()
    })
    .await;
    assert!(!running.stale, "{running:?}\n{}", controller.log());
    assert!(controller.terminate().success(), "{}", controller.log());
    let stopped = store.controller_seen(&fx.instance).await.unwrap().unwrap();
    assert!(
        stopped.stale,
        "a stopped controller says so at once: {stopped:?}"
    );
    assert!(stopped.last_seen >= running.last_seen, "{stopped:?}");
}

/// Issue 11: without the default image and no way to pull it, every user
/// was `failed` with a bare registry error.
#[tokio::test]
async fn without_the_default_image_a_user_is_failed_with_a_message_saying_what_to_do() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("noimage");
    let _controller = ControllerProcess::start(
        &ControllerConfig::new(&db, &fx).with("OPENCLAW_IMAGE", "no-such-image:1"),
    );
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice');")
        .await;
    let alice = wait_for_status(&store, "alice", LONG, "failed", |s| {
        s.phase == Phase::Failed
    })
    .await;
    let message = alice.message.unwrap_or_default();
    for words in [
        "no-such-image:1",
        "OPENCLAW_IMAGE",
        "`docker load`",
        "make agent-image",
    ] {
        assert!(message.contains(words), "{message} lacks {words}");
    }
}
