//! The JSON API of `clawfleet run`, called over HTTP against a real
//! controller process and the real Docker engine: authentication, every
//! route, bad input, concurrent `ensure-running` calls, a failed user's
//! immediate 409, the in-flight limit, the header-read timeout, and the
//! latency of `ensure-running` (printed, not asserted).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clawfleet::status::Phase;
use serde_json::{json, Value};
use support::controller::{
    gateway, token_of, wait_for_status, wait_running, ControllerConfig, ControllerProcess,
};
use support::docker::{
    docker, ensure_slow_health_image, eventually, DockerFixture, AGENT_IMAGE, SLOW_HEALTH_IMAGE,
};
use support::http::{user_path, Client, Reply};
use support::{Backend, TestDb};

/// The API token of every test controller.
const API_TOKEN: &str = "api-test-token-5f1c7c0e4b2a49d8";

/// A controller with the API on, and a client that knows its token.
struct Api {
    client: Client,
    // Dropped before the fixture: a live controller would recreate what the fixture removes.
    controller: ControllerProcess,
    fx: DockerFixture,
    store: clawfleet::store::Store,
    db: TestDb,
}

impl Api {
    async fn start(tag: &str, backend: Backend) -> Self {
        Self::start_with(tag, backend, |c| c.with("CLAWFLEET_API_TOKEN", API_TOKEN)).await
    }

    async fn start_with(
        tag: &str,
        backend: Backend,
        configure: impl FnOnce(ControllerConfig) -> ControllerConfig,
    ) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let fx = DockerFixture::new(tag);
        let controller = ControllerProcess::start(&configure(ControllerConfig::new(&db, &fx)));
        let addr = controller.http_addr().await;
        Self {
            client: Client::new(addr, Some(API_TOKEN)),
            controller,
            fx,
            store,
            db,
        }
    }

    /// Containers on the engine labelled with this test's instance.
    fn containers(&self) -> Vec<String> {
        let filter = format!("label=io.clawfleet.instance={}", self.fx.instance);
        docker(&["ps", "-aq", "--no-trunc", "--filter", &filter])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    async fn ensure_running(&self, user: &str, wait: &str) -> Reply {
        self.client
            .post(&user_path(user, &format!("/ensure-running?wait={wait}")))
            .await
    }
}

fn assert_status(reply: &Reply, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text);
    reply.json()
}

/// Asserts an error answer: status, `error` code, and a message holding `needle`.
fn assert_error(reply: &Reply, status: u16, code: &str, needle: &str) {
    let body = assert_status(reply, status);
    assert_eq!(body["error"], code, "{}", reply.text);
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "message {message:?} does not mention {needle:?}"
    );
}

#[tokio::test]
async fn requests_without_the_right_bearer_token_are_refused() {
    let api = Api::start("auth", Backend::Sqlite).await;
    let anonymous = api.client.with_token(None);
    let wrong = api.client.with_token(Some("not-the-token"));
    for client in [&anonymous, &wrong] {
        for (method, path) in [
            ("GET", "/v1/users"),
            ("GET", "/v1/users/alice"),
            ("PUT", "/v1/users/alice"),
            ("POST", "/v1/users/alice/ensure-running"),
            ("DELETE", "/v1/users/alice"),
            ("GET", "/v1/no-such-route"),
        ] {
            let reply = client.send(method, path, None).await;
            assert_error(&reply, 401, "unauthorized", "bearer");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            assert!(!reply.text.contains("not-the-token"), "{}", reply.text);
        }
    }
    for value in [
        format!("Basic {API_TOKEN}"),
        API_TOKEN.to_owned(),
        "Bearer".to_owned(),
        format!("Bearer {API_TOKEN}x"),
    ] {
        let reply = api.client.with_authorization(&value).get("/v1/users").await;
        assert_error(&reply, 401, "unauthorized", "bearer");
    }
    // Nothing was written by the refused requests.
    assert!(api.store.desired("alice").await.unwrap().is_none());

    assert_status(&api.client.get("/v1/users").await, 200);
    assert_error(
        &api.client.get("/v1/users/alice").await,
        404,
        "not_found",
        "alice",
    );
    assert_error(
        &api.client.get("/v1/no-such-route").await,
        404,
        "not_found",
        "/v1/no-such-route",
    );
    assert_error(
        &api.client.send("PATCH", "/v1/users/alice", None).await,
        405,
        "method_not_allowed",
        "PATCH",
    );
    assert!(
        !api.controller.log().contains(API_TOKEN),
        "the API token is in the log"
    );
}

#[tokio::test]
async fn with_no_token_configured_every_api_route_is_disabled_but_metrics_and_health_stay_open() {
    let api = Api::start_with("off", Backend::Sqlite, |c| c).await;
    for client in [api.client.clone(), api.client.with_token(None)] {
        for (method, path) in [
            ("GET", "/v1/users"),
            ("GET", "/v1/users/alice"),
            ("PUT", "/v1/users/alice"),
            ("DELETE", "/v1/users/alice"),
            ("POST", "/v1/users/alice/ensure-running"),
            ("POST", "/v1/users/alice/touch"),
            ("POST", "/v1/users/alice/stop"),
            ("POST", "/v1/users/alice/restart"),
            ("GET", "/v1/anything"),
        ] {
            let reply = client.send(method, path, None).await;
            assert_error(&reply, 503, "api_disabled", "CLAWFLEET_API_TOKEN");
        }
    }
    assert!(api.store.desired("alice").await.unwrap().is_none());
    let metrics = api.client.with_token(None).get("/metrics").await;
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    assert!(metrics.text.contains("clawfleet_"), "{}", metrics.text);
    assert_eq!(
        api.client.with_token(None).get("/healthz").await.status,
        200
    );
}

#[tokio::test]
async fn put_creates_and_updates_a_user_keeping_absent_fields_and_clearing_null_ones() {
    let api = Api::start("put", Backend::Sqlite).await;
    let path = user_path("carol", "");
    let created = assert_status(
        &api.client
            .put(
                &path,
                &json!({"state": "stopped", "idle_timeout": "30m", "image": AGENT_IMAGE}),
            )
            .await,
        200,
    );
    assert_eq!(created["user_id"], "carol");
    assert_eq!(created["desired"]["state"], "stopped");
    assert_eq!(created["desired"]["idle_timeout_secs"], 1800);
    assert_eq!(created["desired"]["image"], AGENT_IMAGE);

    let updated = assert_status(
        &api.client.put(&path, &json!({"idle_timeout": 90})).await,
        200,
    );
    assert_eq!(updated["desired"]["idle_timeout_secs"], 90);
    assert_eq!(updated["desired"]["state"], "stopped", "absent: kept");
    assert_eq!(updated["desired"]["image"], AGENT_IMAGE, "absent: kept");
    assert!(
        updated["desired"]["revision"].as_i64() > created["desired"]["revision"].as_i64(),
        "{updated}"
    );

    let cleared = assert_status(
        &api.client
            .put(&path, &json!({"idle_timeout": null, "image": null}))
            .await,
        200,
    );
    assert_eq!(cleared["desired"]["idle_timeout_secs"], Value::Null);
    assert_eq!(cleared["desired"]["image"], Value::Null);
    assert_eq!(cleared["desired"]["state"], "stopped");
    let off = assert_status(
        &api.client.put(&path, &json!({"idle_timeout": "off"})).await,
        200,
    );
    assert_eq!(off["desired"]["idle_timeout_secs"], Value::Null);

    // An empty object (or body) inserts a row with the column defaults.
    let minimal = assert_status(
        &api.client.put(&user_path("dave", ""), &json!({})).await,
        200,
    );
    assert_eq!(minimal["desired"]["state"], "running");
    assert_eq!(minimal["desired"]["restart_nonce"], 0);
    api.client
        .put(&user_path("dave", ""), &json!({"state": "stopped"}))
        .await;

    // Any characters in an id survive the path: @, spaces, unicode, an encoded /.
    for id in [
        "Bob@Example.com",
        "with space",
        "a/b",
        "ünïcødé ✓",
        "1",
        "10",
    ] {
        let put = assert_status(
            &api.client
                .put(&user_path(id, ""), &json!({"state": "stopped"}))
                .await,
            200,
        );
        assert_eq!(put["user_id"], id);
        let got = assert_status(&api.client.get(&user_path(id, "")).await, 200);
        assert_eq!(got["user_id"], id);
        assert_eq!(got["desired"]["state"], "stopped");
        assert!(api.store.desired(id).await.unwrap().is_some(), "{id}");
    }

    // The view is the CLI's `users show --json`, and holds no token.
    // The status of carol's last write (the "off" PUT): one of an earlier
    // revision is written again, with this one, between the two reads below.
    let last = off["desired"]["revision"].as_i64().expect("a revision");
    wait_for_status(
        &api.store,
        "carol",
        Duration::from_secs(30),
        "stopped at carol's last revision",
        |s| s.phase == Phase::Stopped && s.observed_revision == Some(last),
    )
    .await;
    let shown = assert_status(&api.client.get(&path).await, 200);
    assert_eq!(shown["status"]["phase"], "stopped");
    assert!(!api.client.get(&path).await.text.contains("token"));
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["users", "show", "carol", "--json"])
        .env("DATABASE_URL", &api.db.url)
        .output()
        .expect("run clawfleet users show");
    assert!(cli.status.success(), "{cli:?}");
    let cli: Value = serde_json::from_slice(&cli.stdout).expect("cli json");
    assert_eq!(cli, shown);
}

#[tokio::test]
async fn touch_stop_restart_and_delete_act_on_existing_users_and_404_on_unknown_ones() {
    let api = Api::start("verbs", Backend::Sqlite).await;
    let path = |rest: &str| user_path("erin", rest);
    api.client
        .put(
            &path(""),
            &json!({"state": "stopped", "idle_timeout": "1h"}),
        )
        .await;

    let before = chrono::Utc::now();
    let touched = assert_status(&api.client.post(&path("/touch")).await, 200);
    assert_eq!(touched["user_id"], "erin");
    let at =
        chrono::DateTime::parse_from_rfc3339(touched["last_active_at"].as_str().unwrap()).unwrap();
    assert!(at >= before);
    let row = api.store.desired("erin").await.unwrap().unwrap().unwrap();
    assert_eq!(
        row.last_active_at.map(|t| t.timestamp_micros()),
        Some(at.timestamp_micros())
    );

    let restarted = assert_status(&api.client.post(&path("/restart")).await, 202);
    assert_eq!(restarted, json!({"user_id": "erin", "restart_nonce": 1}));
    let again = assert_status(&api.client.post(&path("/restart")).await, 202);
    assert_eq!(again["restart_nonce"], 2);

    api.client
        .put(&path(""), &json!({"state": "running"}))
        .await;
    let stopped = assert_status(&api.client.post(&path("/stop")).await, 200);
    assert_eq!(stopped["desired"]["state"], "stopped");
    assert_eq!(
        stopped["desired"]["idle_timeout_secs"], 3600,
        "stop keeps the rest"
    );

    assert_eq!(api.client.delete(&path("")).await.status, 204);
    assert!(api.store.desired("erin").await.unwrap().is_none());
    assert_error(
        &api.client.delete(&path("")).await,
        404,
        "not_found",
        "erin",
    );
    // The status row goes once the controller has seen the deletion.
    eventually(Duration::from_secs(30), "erin to be gone", || async {
        (api.client.get(&path("")).await.status == 404).then_some(())
    })
    .await;

    for (method, rest) in [
        ("GET", ""),
        ("DELETE", ""),
        ("POST", "/touch"),
        ("POST", "/stop"),
        ("POST", "/restart"),
    ] {
        let reply = api
            .client
            .send(method, &user_path("nobody", rest), None)
            .await;
        assert_error(&reply, 404, "not_found", "nobody");
    }
    assert!(
        api.store.desired("nobody").await.unwrap().is_none(),
        "stop, touch or restart never create a row"
    );
}

/// Regression: the API logged user ids raw (`user_id = %id`), so an id
/// holding a newline wrote a line of its own choosing into the log.
#[tokio::test]
async fn an_id_holding_a_newline_cannot_forge_a_log_line() {
    let api = Api::start("forge", Backend::Sqlite).await;
    let forged = "FORGED clawfleet: all users deleted";
    let path = |rest: &str| user_path(&format!("mallory\n{forged}"), rest);
    assert_status(
        &api.client
            .put(&path(""), &json!({"state": "stopped"}))
            .await,
        200,
    );
    assert_status(&api.client.post(&path("/stop")).await, 200);
    assert_status(&api.client.post(&path("/restart")).await, 202);
    assert_eq!(api.client.delete(&path("")).await.status, 204);
    let log = api.controller.log();
    assert!(log.contains("desired row deleted through the api"), "{log}");
    assert!(
        log.lines()
            .all(|line| !line.trim_start().starts_with("FORGED")),
        "a forged line in the log:\n{log}"
    );
}

#[tokio::test]
async fn list_pages_through_users_in_id_order_and_filters_by_phase() {
    let api = Api::start("list", Backend::Sqlite).await;
    let ids = ["p0", "p1", "p2", "p3", "p4"];
    for id in ids {
        api.client
            .put(&user_path(id, ""), &json!({"state": "stopped"}))
            .await;
    }
    assert_status(&api.ensure_running("runner", "60s").await, 200);

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(a) => format!("/v1/users?limit=2&after={}", support::http::segment(a)),
            None => "/v1/users?limit=2".to_owned(),
        };
        let page = assert_status(&api.client.get(&query).await, 200);
        pages += 1;
        let users = page["users"].as_array().unwrap();
        assert!(users.len() <= 2);
        seen.extend(
            users
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_owned()),
        );
        match page["next_after"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), users.last().and_then(|u| u["user_id"].as_str()));
                after = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4", "runner"]);
    assert_eq!(pages, 3);

    let all = assert_status(&api.client.get("/v1/users").await, 200);
    assert_eq!(all["users"].as_array().unwrap().len(), 6);
    assert_eq!(all["next_after"], Value::Null);

    let running = assert_status(&api.client.get("/v1/users?phase=running").await, 200);
    let running: Vec<&Value> = running["users"].as_array().unwrap().iter().collect();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0]["user_id"], "runner");
    assert_eq!(running[0]["desired"]["state"], "running");
    assert_eq!(running[0]["status"]["phase"], "running");

    // The controller writes a status row for each stopped user too.
    let stopped = eventually(Duration::from_secs(30), "five stopped users", || async {
        let page = api
            .client
            .get("/v1/users?phase=stopped&limit=3")
            .await
            .json();
        (page["users"].as_array()?.len() == 3).then_some(page)
    })
    .await;
    assert_eq!(stopped["next_after"], "p2");
    let rest = assert_status(
        &api.client
            .get("/v1/users?phase=stopped&limit=3&after=p2")
            .await,
        200,
    );
    let rest: Vec<&str> = rest["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["p3", "p4"]);
    let none = assert_status(&api.client.get("/v1/users?phase=removing").await, 200);
    assert_eq!(none, json!({"users": [], "next_after": null}));
}

#[tokio::test]
async fn ensure_running_a_new_user_hands_out_a_working_gateway_token() {
    let api = Api::start("ensure", Backend::Sqlite).await;
    let user = "Frank@Example.com";
    let reply = api.ensure_running(user, "60s").await;
    let body = assert_status(&reply, 200);
    let status = api.store.status(user).await.unwrap().expect("status row");
    assert_eq!(body["phase"], "running");
    assert_eq!(
        body["container_name"],
        status.container_name.clone().unwrap()
    );
    assert_eq!(
        body["url"],
        format!("http://{}:18789", status.container_name.as_deref().unwrap())
    );
    let port = status.host_port.unwrap();
    assert_eq!(body["host_url"], format!("http://127.0.0.1:{port}"));
    let token = body["token"].as_str().expect("a token");
    assert_eq!(token, token_of(&status), "the token the status row holds");

    // The answer comes once the container runs; its gateway may need a moment to listen.
    let answered = Instant::now();
    let mut last_error = String::new();
    let (code, whoami) = eventually(Duration::from_secs(10), "the gateway to answer", || {
        let reply = gateway(port, "GET", "/v1/whoami", Some(token));
        if let Err(e) = &reply {
            last_error.clone_from(e);
        }
        async move { reply.ok() }
    })
    .await;
    eprintln!(
        "gateway answered {:?} after ensure-running (last error before: {last_error:?})",
        answered.elapsed()
    );
    assert_eq!(code, 200, "{whoami}");
    let whoami: Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["agent_id"], user, "{whoami}");
    let (code, _) = gateway(port, "GET", "/v1/whoami", Some("wrong")).expect("whoami");
    assert_eq!(code, 401);

    // The token is handed out only by ensure-running: never in a view.
    let view = api.client.get(&user_path(user, "")).await;
    assert!(!view.text.contains(token), "{}", view.text);
    let list = api.client.get("/v1/users").await;
    assert!(!list.text.contains(token), "{}", list.text);
    assert!(
        !api.controller.log().contains(token),
        "the token is in the log"
    );

    // Asking again for a running user answers with the same container and token.
    let again = assert_status(&api.ensure_running(user, "60s").await, 200);
    assert_eq!(again["token"], token);
    assert_eq!(again["host_url"], body["host_url"]);
    assert_eq!(api.containers().len(), 1);
}

#[tokio::test]
async fn ensure_running_works_the_same_on_postgres() {
    let api = Api::start("ensurepg", Backend::Postgres).await;
    let body = assert_status(&api.ensure_running("grace", "60s").await, 200);
    let status = api
        .store
        .status("grace")
        .await
        .unwrap()
        .expect("status row");
    assert_eq!(body["token"], token_of(&status));
    let stopped = assert_status(&api.client.post(&user_path("grace", "/stop")).await, 200);
    assert_eq!(stopped["desired"]["state"], "stopped");
    wait_for_status(
        &api.store,
        "grace",
        Duration::from_secs(30),
        "stopped",
        |s| s.phase == Phase::Stopped,
    )
    .await;
    let body = assert_status(&api.ensure_running("grace", "60s").await, 200);
    assert_eq!(
        body["token"],
        token_of(&status),
        "a restart keeps the token"
    );
}

#[tokio::test]
async fn ensure_running_an_idle_user_waits_for_its_container_to_run_again() {
    let api = Api::start("ensureidle", Backend::Sqlite).await;
    let user = "ivy";
    let first = assert_status(&api.ensure_running(user, "60s").await, 200);
    // A touch of a running user with time to spare answers at once, with
    // the same container.
    let again = assert_status(&api.ensure_running(user, "60s").await, 200);
    assert_eq!(again["container_name"], first["container_name"]);
    // Idle for ages under a timeout long enough that the container, once
    // woken, is not idle again before it is healthy on a loaded machine.
    api.db
        .exec(
            "UPDATE desired_containers SET idle_timeout_secs = 600, \
             last_active_at = '2000-01-01T00:00:00Z' WHERE user_id = 'ivy'",
        )
        .await;
    wait_for_status(&api.store, user, Duration::from_secs(30), "idle", |s| {
        s.phase == Phase::Idle
    })
    .await;
    let name = first["container_name"].as_str().expect("a container name");
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Status}}", name]).unwrap(),
        "exited"
    );
    // The row still says running: only a reconcile of the touch may answer.
    let woken = assert_status(&api.ensure_running(user, "60s").await, 200);
    assert_eq!(woken["phase"], "running");
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Status}}", name]).unwrap(),
        "running",
        "ensure-running answered before the idle container was started again"
    );
}

/// Regression: ensure-running waited for Docker's health check, whose first
/// probe comes one full `interval` after start (30 s by Docker's default), so
/// every wake took 30 s or more. It answers within a second of the gateway.
#[tokio::test]
async fn ensure_running_answers_within_a_second_of_the_gateway_not_at_the_first_health_check() {
    ensure_slow_health_image();
    let api = Api::start_with("wakefast", Backend::Sqlite, |c| {
        c.with("CLAWFLEET_API_TOKEN", API_TOKEN)
            .with("OPENCLAW_IMAGE", SLOW_HEALTH_IMAGE)
    })
    .await;
    let user = "wendy";
    let first = assert_status(&api.ensure_running(user, "120s").await, 200);
    let port = first["host_port"].as_u64().expect("a host port") as u16;
    assert_status(&api.client.post(&user_path(user, "/stop")).await, 200);
    wait_for_status(&api.store, user, Duration::from_secs(60), "stopped", |s| {
        s.phase == Phase::Stopped
    })
    .await;

    // The test's own poller sees when the gateway first answers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if matches!(gateway(port, "GET", "/healthz", None), Ok((code, _)) if code < 500) {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        })
    };
    let asked = Instant::now();
    let woken = assert_status(&api.ensure_running(user, "120s").await, 200);
    let answered = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gateway_up = poller
        .join()
        .unwrap()
        .expect("the gateway answered the test's poller");
    assert_eq!(woken["host_port"], first["host_port"]);
    let health = api.store.status(user).await.unwrap().and_then(|s| s.health);
    eprintln!(
        "wake with a 30 s health interval: ensure-running {:?}, gateway first answered the test after {:?}; health then {health:?}",
        answered - asked,
        gateway_up - asked
    );
    assert!(
        answered.saturating_duration_since(gateway_up) <= Duration::from_secs(1),
        "ensure-running answered {:?} after the gateway did",
        answered - gateway_up
    );
    // The ensure-running calls were wakes: their creates and starts took
    // wake turns at the engine (README "Wakes are not slowed by bulk work").
    // At least one: the feed may see a row before the API queues its user.
    let metrics = support::fleet::scrape(api.controller.http_addr().await);
    let wake_turns = metrics.get("clawfleet_engine_turn_wait_seconds_count{priority=\"wake\"}");
    assert!(wake_turns >= Some(&1.0), "wake turns: {wake_turns:?}");
}

#[tokio::test]
async fn bad_input_is_refused_with_a_message_naming_the_field() {
    let api = Api::start("bad", Backend::Sqlite).await;
    let path = user_path("heidi", "");
    for (body, field) in [
        ("{\"state\": ", "body"),
        ("[1, 2]", "body"),
        (r#"{"colour": "blue"}"#, "colour"),
        (r#"{"state": "banana"}"#, "state"),
        (r#"{"state": "RUNNING"}"#, "state"),
        (r#"{"state": null}"#, "state"),
        (r#"{"idle_timeout": "soon"}"#, "idle_timeout"),
        (r#"{"idle_timeout": -5}"#, "idle_timeout"),
        (r#"{"idle_timeout": "100y"}"#, "idle_timeout"),
        (r#"{"image": "../x"}"#, "image"),
        (r#"{"image": ""}"#, "image"),
        (r#"{"image": 7}"#, "image"),
    ] {
        let reply = api.client.send("PUT", &path, Some(body)).await;
        assert_error(&reply, 400, "bad_request", field);
    }
    assert!(
        api.store.desired("heidi").await.unwrap().is_none(),
        "a refused PUT writes nothing"
    );

    for wait in ["forever", "10m", "-1s"] {
        let reply = api.ensure_running("heidi", wait).await;
        assert_error(&reply, 400, "bad_request", "wait");
    }
    assert!(api.store.desired("heidi").await.unwrap().is_none());
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("phase=sleeping", "phase"),
    ] {
        let reply = api.client.get(&format!("/v1/users?{query}")).await;
        assert_error(&reply, 400, "bad_request", field);
    }

    let long = "x".repeat(200);
    for (method, rest) in [
        ("GET", ""),
        ("PUT", ""),
        ("DELETE", ""),
        ("POST", "/ensure-running"),
        ("POST", "/touch"),
    ] {
        let reply = api.client.send(method, &user_path(&long, rest), None).await;
        assert_error(&reply, 400, "bad_request", "user_id");
        assert!(reply.text.contains("200 bytes"), "{}", reply.text);
    }
    let nul = api.client.get(&user_path("a\0b", "")).await;
    assert_error(&nul, 400, "bad_request", "user_id");
}

#[tokio::test]
async fn a_hundred_concurrent_ensure_running_calls_for_new_users_all_succeed() {
    let api = Api::start("hundred", Backend::Sqlite).await;
    let started = Instant::now();
    let calls = (0..100).map(|i| {
        let client = api.client.clone();
        tokio::spawn(async move {
            let user = format!("crowd{i:03}");
            let reply = client
                .post(&user_path(&user, "/ensure-running?wait=300s"))
                .await;
            (user, reply)
        })
    });
    let replies = futures::future::join_all(calls).await;
    eprintln!(
        "100 concurrent ensure-running calls for new users took {:?}",
        started.elapsed()
    );
    let mut ports = HashSet::new();
    let mut names = HashSet::new();
    for reply in replies {
        let (user, reply) = reply.expect("task");
        let body = assert_status(&reply, 200);
        assert_eq!(body["user_id"], user);
        ports.insert(body["host_port"].as_u64().expect("port"));
        names.insert(body["container_name"].as_str().expect("name").to_owned());
    }
    assert_eq!(ports.len(), 100, "distinct host ports");
    assert_eq!(names.len(), 100, "distinct containers");
    assert_eq!(api.containers().len(), 100);
}

#[tokio::test]
async fn fifty_concurrent_ensure_running_calls_for_one_new_user_share_one_container() {
    let api = Api::start("fifty", Backend::Sqlite).await;
    let calls = (0..50).map(|_| {
        let client = api.client.clone();
        tokio::spawn(async move {
            client
                .post(&user_path("ivan", "/ensure-running?wait=60s"))
                .await
        })
    });
    let replies = futures::future::join_all(calls).await;
    let mut tokens = HashSet::new();
    let mut urls = HashSet::new();
    for reply in replies {
        let body = assert_status(&reply.expect("task"), 200);
        tokens.insert(body["token"].as_str().expect("token").to_owned());
        urls.insert(body["host_url"].as_str().expect("host_url").to_owned());
    }
    assert_eq!(tokens.len(), 1, "every caller gets the same token");
    assert_eq!(urls.len(), 1, "every caller gets the same address");
    assert_eq!(api.containers().len(), 1, "one container");
    let status = api.store.status("ivan").await.unwrap().unwrap();
    assert!(tokens.contains(&token_of(&status)));
}

/// Regression: a failed user's `ensure-running` waited its whole `wait`
/// (then 504) although waiting could not help.
#[tokio::test]
async fn ensure_running_a_failed_user_answers_409_at_once_with_the_status_message() {
    let api = Api::start_with("noimage", Backend::Sqlite, |c| {
        c.with("CLAWFLEET_API_TOKEN", API_TOKEN).with(
            "CLAWFLEET_ALLOWED_IMAGES",
            "clawfleet-agent-stub:*,no-such-image:*",
        )
    })
    .await;
    assert_status(
        &api.client
            .put(&user_path("judy", ""), &json!({"image": "no-such-image:1"}))
            .await,
        200,
    );
    // A wait far longer than a failed pull takes: a 504 would mean it waited.
    let reply = api.ensure_running("judy", "120s").await;
    assert_error(&reply, 409, "failed", "no-such-image");
    let body = reply.json();
    assert_eq!(body["phase"], "failed", "{body}");
    assert!(api.containers().is_empty());
}

/// Opens a connection and sends `head` (no body), leaving it open.
async fn send_head(addr: std::net::SocketAddr, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

#[tokio::test]
async fn past_the_inflight_limit_api_calls_answer_503_with_retry_after() {
    let api = Api::start_with("inflight", Backend::Sqlite, |c| {
        c.with("CLAWFLEET_API_TOKEN", API_TOKEN)
            .with("CLAWFLEET_API_MAX_INFLIGHT", "2")
    })
    .await;
    let addr = api.controller.http_addr().await;
    // PUTs whose bodies never come hold the places. The listener takes
    // connections in any order, so each round adds one until a call is
    // refused (a PUT refused itself, or beaten by a call, holds nothing).
    let head = format!(
        "PUT /v1/users/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let held = tokio::sync::Mutex::new(Vec::new());
    let busy = eventually(Duration::from_secs(30), "a busy answer", || async {
        held.lock().await.push(send_head(addr, &head).await);
        let reply = api.client.get("/v1/users").await;
        (reply.status == 503).then_some(reply)
    })
    .await;
    assert_error(&busy, 503, "busy", "retry");
    assert_eq!(busy.header("retry-after"), Some("1"), "{busy:?}");
    // Health and metrics are not API calls: never refused for it.
    assert_eq!(
        api.client.with_token(None).get("/healthz").await.status,
        200
    );

    drop(held);
    eventually(
        Duration::from_secs(30),
        "the places to be given back",
        || async { (api.client.get("/v1/users").await.status == 200).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let api = Api::start("slowloris", Backend::Sqlite).await;
    let addr = api.controller.http_addr().await;
    let mut stream = send_head(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    // The header-read timeout is 10 s; a generous deadline for a busy machine.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection was still open after 60 s without headers"
    );
    assert_eq!(
        api.client.with_token(None).get("/healthz").await.status,
        200,
        "the listener serves others meanwhile"
    );
}

/// Prints how long `ensure-running` takes for a new user, a stopped one and
/// a running one (a few samples each; a report, not an assertion).
async fn report_ensure_running_latency(backend: Backend) {
    let api = Api::start("latency", backend).await;
    let mut new = Vec::new();
    let mut stopped = Vec::new();
    let mut running = Vec::new();
    let timed = |reply: &Reply, since: Instant| {
        assert_status(reply, 200);
        since.elapsed()
    };
    for i in 0..3 {
        let user = format!("lat{i}");
        let t = Instant::now();
        new.push(timed(&api.ensure_running(&user, "60s").await, t));
        for _ in 0..3 {
            let t = Instant::now();
            running.push(timed(&api.ensure_running(&user, "60s").await, t));
        }
        wait_running(&api.store, &user).await;
        assert_status(&api.client.post(&user_path(&user, "/stop")).await, 200);
        wait_for_status(&api.store, &user, Duration::from_secs(30), "stopped", |s| {
            s.phase == Phase::Stopped
        })
        .await;
        let t = Instant::now();
        stopped.push(timed(&api.ensure_running(&user, "60s").await, t));
    }
    let show = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "ensure-running latency on {backend:?}, new user:     {}",
        show(&new)
    );
    eprintln!(
        "ensure-running latency on {backend:?}, stopped user: {}",
        show(&stopped)
    );
    eprintln!(
        "ensure-running latency on {backend:?}, running user: {}",
        show(&running)
    );
}

#[tokio::test]
async fn ensure_running_latency_of_new_stopped_and_running_users_is_reported_on_sqlite() {
    report_ensure_running_latency(Backend::Sqlite).await;
}

#[tokio::test]
async fn ensure_running_latency_of_new_stopped_and_running_users_is_reported_on_postgres() {
    report_ensure_running_latency(Backend::Postgres).await;
}
