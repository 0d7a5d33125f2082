//! The `/v1` router called in process with `tower::ServiceExt::oneshot`:
//! routes, authentication, errors and the OpenAPI document, with no socket
//! and no engine (the real-binary tests are in tests/api.rs).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use futures::future::BoxFuture;
use sea_orm::ConnectionTrait;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::requests::UserList;
use super::{openapi, PREFIX};
use crate::http::{router, ApiToken, AppState, Readiness, ReadinessReport};
use crate::image_ref::ImageRef;
use crate::metrics::Metrics;
use crate::nudge::Nudge;
use crate::probe::{GatewayProbe, ProbeKind};
use crate::secrets::{EncryptionKey, KeyRing};
use crate::store::Store;
use crate::view::UserView;

const TOKEN: &str = "unit-test-token";

struct AlwaysReady;

impl Readiness for AlwaysReady {
    fn check(&self) -> BoxFuture<'_, ReadinessReport> {
        Box::pin(async { ReadinessReport::default() })
    }
}

/// A router over a fresh SQLite database, and the directory holding it.
async fn test_app(api_token: Option<&str>) -> (axum::Router, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/api.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let state = Arc::new(AppState {
        store: store.clone(),
        keys: KeyRing::new(vec![EncryptionKey::generate("t").unwrap()]).unwrap(),
        api_token: api_token.and_then(ApiToken::new),
        instance: "default".to_owned(),
        default_image: ImageRef::parse("clawfleet-agent-stub:dev").unwrap(),
        readiness: Arc::new(AlwaysReady),
        max_inflight: 8,
        metrics: Metrics::new(),
        gateway_probe: GatewayProbe::new(ProbeKind::Tcp, "127.0.0.1".parse().unwrap()),
        nudge: Arc::new(Nudge::new()),
    });
    (router(state), store, dir)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(app: &axum::Router, method: Method, path: &str, body: Option<Value>) -> Answer {
    call_as(app, Some(TOKEN), method, path, body).await
}

async fn call_as(
    app: &axum::Router,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// The `(METHOD, /v1/path)` pairs of the document.
fn documented_routes() -> BTreeSet<(String, String)> {
    let document = serde_json::to_value(openapi()).unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

/// The `(METHOD, /v1/path)` pairs of the README's route table (JSON API).
fn readme_routes() -> BTreeSet<(String, String)> {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("\n## JSON API")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a JSON API section");
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter_map(|route| {
            let (method, path) = route.split_once(' ')?;
            let path = path.split('?').next()?;
            Some((method.to_owned(), path.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn every_documented_route_is_served_and_the_readme_lists_the_same_routes() {
    let (app, _store, _dir) = test_app(Some(TOKEN)).await;
    let documented = documented_routes();
    let mut expected = readme_routes();
    // The document does not describe itself.
    assert!(expected.remove(&("GET".to_owned(), format!("{PREFIX}/openapi.json"))));
    assert_eq!(
        documented, expected,
        "the OpenAPI document and README disagree"
    );
    for (method, path) in &documented {
        let mut path = path.replace("{id}", "nobody");
        if path.ends_with("/ensure-running") {
            // No controller runs here: give up at once.
            path.push_str("?wait=1ms");
        }
        let answer = call(&app, method.parse().unwrap(), &path, None).await;
        assert_ne!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_ne!(answer.body["message"], format!("no route {method} {path}"));
        assert_ne!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert!(
            answer.status.is_success() || answer.body["error"].is_string(),
            "{method} {path}: {}",
            answer.body
        );
    }
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token_even_with_the_api_off() {
    for token in [Some(TOKEN), None] {
        let (app, _store, _dir) = test_app(token).await;
        let answer = call_as(&app, None, Method::GET, "/v1/openapi.json", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body["openapi"], "3.1.0");
        assert_eq!(answer.body["info"]["title"], "clawfleet");
        assert_eq!(answer.body["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(answer.body, serde_json::to_value(openapi()).unwrap());
    }
}

#[tokio::test]
async fn without_the_token_every_other_route_and_unknown_paths_answer_401() {
    let (app, _store, _dir) = test_app(Some(TOKEN)).await;
    for (method, path) in [
        (Method::GET, "/v1/users"),
        (Method::PUT, "/v1/users/alice"),
        (Method::GET, "/v1/no-such-route"),
    ] {
        for token in [None, Some("wrong")] {
            let answer = call_as(&app, token, method.clone(), path, None).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(answer.body["error"], "unauthorized");
            assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer");
        }
    }
    let unknown = call(&app, Method::GET, "/v1/no-such-route", None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.body["message"], "no route GET /v1/no-such-route");
    let patch = call(&app, Method::PATCH, "/v1/users/alice", None).await;
    assert_eq!(patch.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(patch.body["error"], "method_not_allowed");

    let (off, _store, _dir) = test_app(None).await;
    let answer = call(&off, Method::GET, "/v1/users", None).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body["error"], "api_disabled");
}

#[tokio::test]
async fn put_show_and_list_answer_typed_views_with_null_for_what_is_unset() {
    let (app, _store, _dir) = test_app(Some(TOKEN)).await;
    let put = call(
        &app,
        Method::PUT,
        "/v1/users/alice",
        Some(json!({"state": "stopped", "idle_timeout": "30m"})),
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    assert_eq!(put.body["desired"]["idle_timeout_secs"], 1800);
    assert!(put.body["desired"]["image"].is_null());
    assert!(put.body["status"].is_null());
    assert!(put.body.as_object().unwrap().contains_key("status"));
    let view: UserView = serde_json::from_value(put.body.clone()).unwrap();
    assert_eq!(view.user_id, "alice");

    let cleared = call(
        &app,
        Method::PUT,
        "/v1/users/alice",
        Some(json!({"idle_timeout": null})),
    )
    .await;
    assert!(cleared.body["desired"]["idle_timeout_secs"].is_null());
    assert_eq!(cleared.body["desired"]["state"], "stopped");

    let shown = call(&app, Method::GET, "/v1/users/alice", None).await;
    assert_eq!(shown.body, cleared.body);

    call(&app, Method::PUT, "/v1/users/bob", None).await;
    let first = call(&app, Method::GET, "/v1/users?limit=1", None).await;
    let page: UserList = serde_json::from_value(first.body).unwrap();
    assert_eq!(page.users.len(), 1);
    assert_eq!(page.next_after.as_deref(), Some("alice"));
    let last = call(&app, Method::GET, "/v1/users?after=alice", None).await;
    assert_eq!(last.body["users"][0]["user_id"], "bob");
    assert!(last.body["next_after"].is_null());

    let bad = call(&app, Method::GET, "/v1/users?limit=0", None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body["message"].as_str().unwrap().starts_with("limit: "));
}

#[tokio::test]
async fn touch_restart_and_delete_answer_their_own_bodies() {
    let (app, _store, _dir) = test_app(Some(TOKEN)).await;
    let missing = call(&app, Method::POST, "/v1/users/alice/touch", None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    call(&app, Method::PUT, "/v1/users/alice", None).await;
    let touched = call(&app, Method::POST, "/v1/users/alice/touch", None).await;
    assert_eq!(touched.status, StatusCode::OK);
    let at = touched.body["last_active_at"].as_str().unwrap();
    assert!(at.ends_with("+00:00"), "{at}");
    let restarted = call(&app, Method::POST, "/v1/users/alice/restart", None).await;
    assert_eq!(restarted.status, StatusCode::ACCEPTED);
    assert_eq!(
        restarted.body,
        json!({"user_id": "alice", "restart_nonce": 1})
    );
    let deleted = call(&app, Method::DELETE, "/v1/users/alice", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = call(&app, Method::DELETE, "/v1/users/alice", None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

/// Runs `python3 -m openapi_spec_validator` on `document`: `Err` with its
/// output when it refuses it. Panics when the validator is not installed.
fn openapi_spec_validator(document: &Value) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(document).unwrap()).unwrap();
    let output = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 runs (the OpenAPI check needs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named openapi_spec_validator"),
        "openapi-spec-validator is not installed: \
         python3 -m pip install openapi-spec-validator (.ci/run does)"
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        ))
    }
}

#[test]
fn the_openapi_document_passes_openapi_spec_validator() {
    let document = serde_json::to_value(openapi()).unwrap();
    if let Err(refusal) = openapi_spec_validator(&document) {
        panic!("openapi-spec-validator refused the document:\n{refusal}");
    }
    // The validator does look: a document missing its info is refused.
    let mut broken = document;
    broken.as_object_mut().unwrap().remove("info");
    assert!(openapi_spec_validator(&broken).is_err());
}

#[tokio::test]
async fn views_say_when_no_controller_has_written_for_longer_than_it_promised() {
    let (app, store, _dir) = test_app(Some(TOKEN)).await;
    let put = call(&app, Method::PUT, "/v1/users/alice", Some(json!({}))).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);

    // A controller that beats within its promise: nothing is said.
    store
        .beat("default", "running", std::time::Duration::from_secs(900))
        .await
        .unwrap();
    let shown = call(&app, Method::GET, "/v1/users/alice", None).await;
    let listed = call(&app, Method::GET, "/v1/users", None).await;
    assert_eq!(shown.body.get("controller"), None, "{}", shown.body);
    assert_eq!(
        listed.body["users"][0].get("controller"),
        None,
        "{}",
        listed.body
    );

    // One that last wrote long ago: every view says since when.
    store
        .connection()
        .execute_unprepared(
            "UPDATE clawfleet_leases SET renewed_at = '2026-01-01T00:00:00Z', \
             expires_at = '2026-01-01T00:15:00Z' WHERE instance = 'default'",
        )
        .await
        .unwrap();
    let expected = json!({"last_seen": "2026-01-01T00:00:00+00:00", "stale": true});
    let shown = call(&app, Method::GET, "/v1/users/alice", None).await;
    assert_eq!(shown.body["controller"], expected, "{}", shown.body);
    let listed = call(&app, Method::GET, "/v1/users", None).await;
    assert_eq!(
        listed.body["users"][0]["controller"], expected,
        "{}",
        listed.body
    );
    let parsed: UserList = serde_json::from_value(listed.body).unwrap();
    assert!(parsed.users[0].controller.is_some_and(|c| c.stale));
}
