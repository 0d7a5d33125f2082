//! The command line as an operator uses it: the binary run against a
//! throwaway SQLite database.

mod support;

use std::process::{Command, Output};

use chrono::Utc;
use clawfleet::secrets::{EncryptionKey, GatewayToken, KeyRing};
use clawfleet::status::{ContainerStatus, Phase};
use support::{Backend, TestDb};

fn clawfleet(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env(
            "CLAWFLEET_DATA_DIR",
            std::env::temp_dir().join("clawfleet-cli-test-none"),
        )
        .output()
        .expect("run clawfleet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[tokio::test]
async fn users_set_show_list_touch_restart_delete_round_trip() {
    let db = TestDb::new(Backend::Sqlite).await;
    ok(clawfleet(&db, &["migrate"]));
    ok(clawfleet(
        &db,
        &["users", "set", "alice", "--idle-timeout", "30m", "--touch"],
    ));
    ok(clawfleet(
        &db,
        &[
            "users",
            "set",
            "Bob@Example.com",
            "--state",
            "stopped",
            "--image",
            "clawfleet-agent-stub:dev",
        ],
    ));

    let shown = ok(clawfleet(&db, &["users", "show", "alice"]));
    assert!(shown.contains("desired state:     running"), "{shown}");
    assert!(shown.contains("idle timeout:      30m"), "{shown}");
    assert!(shown.contains("not yet reconciled"), "{shown}");

    let list = ok(clawfleet(&db, &["users", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("USER"), "{list}");
    let phase_col = lines[0].find("PHASE").unwrap();
    for line in &lines[1..3] {
        assert_eq!(
            line.chars().nth(phase_col - 1),
            Some(' '),
            "aligned: {list}"
        );
    }
    assert!(
        list.contains("Bob@Example.com") && list.contains("stopped"),
        "{list}"
    );
    assert!(list.ends_with("2 users\n"), "{list}");

    let json: serde_json::Value =
        serde_json::from_str(&ok(clawfleet(&db, &["users", "list", "--json"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    ok(clawfleet(&db, &["users", "restart", "alice"]));
    ok(clawfleet(&db, &["users", "touch", "alice"]));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(clawfleet(&db, &["users", "show", "alice", "--json"]))).unwrap();
    assert_eq!(shown["desired"]["restart_nonce"], 1);

    ok(clawfleet(&db, &["users", "delete", "alice"]));
    let missing = clawfleet(&db, &["users", "touch", "alice"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no user \"alice\""),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test]
async fn users_show_prints_the_token_only_when_asked() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let key = EncryptionKey::generate("k1").unwrap();
    let ring = KeyRing::new(vec![key.clone()]).unwrap();
    let token = GatewayToken::generate().unwrap();
    ok(clawfleet(&db, &["users", "set", "alice"]));
    let now = Utc::now();
    store
        .write_status(
            &ContainerStatus {
                user_id: "alice".into(),
                phase: Phase::Running,
                container_id: None,
                container_name: None,
                host_port: None,
                url: None,
                host_url: None,
                health: None,
                gateway_token: Some(ring.seal(&token).unwrap()),
                observed_revision: None,
                message: None,
                restarts: 0,
                last_transition_at: now,
                updated_at: now,
            },
            now,
        )
        .await
        .unwrap();

    let plain = ok(clawfleet(&db, &["users", "show", "alice"]));
    assert!(!plain.contains(token.expose()));
    assert!(plain.contains("--show-token"), "{plain}");
    let json = ok(clawfleet(&db, &["users", "show", "alice", "--json"]));
    assert!(!json.contains(token.expose()));

    let without_key = clawfleet(&db, &["users", "show", "alice", "--show-token"]);
    assert!(!without_key.status.success());
    assert!(
        stderr(&without_key).contains("CLAWFLEET_ENCRYPTION_KEYS"),
        "{}",
        stderr(&without_key)
    );

    let with_key = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["users", "show", "alice", "--show-token"])
        .env("DATABASE_URL", &db.url)
        .env("CLAWFLEET_ENCRYPTION_KEYS", key.to_config_entry().as_str())
        .output()
        .unwrap();
    assert!(ok(with_key).contains(token.expose()));
}

#[tokio::test]
async fn bad_values_are_refused_with_a_message_naming_them() {
    let db = TestDb::new(Backend::Sqlite).await;
    for (args, expected) in [
        (vec!["--port-range", "19999-19000", "migrate"], "backwards"),
        (
            vec!["users", "set", "a", "--idle-timeout", "soon"],
            "not a duration",
        ),
        (vec!["users", "set", "a", "--state", "banana"], "banana"),
        (
            vec!["users", "set", "a", "--image", "../x"],
            "not a valid host name",
        ),
        (
            vec!["migrate", "--stop-timeout", "forever"],
            "not a duration",
        ),
        (vec!["migrate", "--instance", "a b"], "instance"),
        (vec!["migrate", "--concurrency", "0"], "0"),
        (vec!["users", "set", ""], "user_id"),
    ] {
        let out = clawfleet(&db, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn help_names_environment_variables_but_never_their_values() {
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .arg("--help")
        .env("DATABASE_URL", "postgres://app:hunter2@db/clawfleet")
        .env(
            "CLAWFLEET_ENCRYPTION_KEYS",
            "k1:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
        )
        .env("CLAWFLEET_API_TOKEN", "api-token-value")
        .output()
        .unwrap();
    let help = ok(out);
    for var in [
        "DATABASE_URL",
        "DOCKER_HOST",
        "OPENCLAW_IMAGE",
        "CLAWFLEET_PORT_RANGE",
        "CLAWFLEET_ENCRYPTION_KEYS",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    for secret in ["hunter2", "c2VjcmV0", "api-token-value"] {
        assert!(!help.contains(secret), "{secret} leaked into --help");
    }
}

#[test]
fn keygen_prints_a_key_the_ring_accepts() {
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["keygen", "--id", "rotated"])
        .output()
        .unwrap();
    let entry = ok(out);
    let ring = KeyRing::parse(entry.trim()).unwrap();
    assert_eq!(ring.key_ids(), ["rotated"]);
}

#[test]
fn global_flags_are_accepted_after_the_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args([
            "users",
            "list",
            "--database-url",
            "sqlite::memory:",
            "--instance",
            "x",
        ])
        .output()
        .unwrap();
    assert!(ok(out).contains("0 users"));
}

/// Regression: `users show` printed the id raw, so an id holding a newline
/// forged a line of its output.
#[tokio::test]
async fn users_show_and_list_escape_an_id_holding_a_newline() {
    let db = TestDb::new(Backend::Sqlite).await;
    let id = "evil\nphase:             running";
    ok(clawfleet(&db, &["users", "set", id]));
    for args in [vec!["users", "show", id], vec!["users", "list"]] {
        let out = ok(clawfleet(&db, &args));
        assert!(
            out.lines()
                .all(|line| !line.starts_with("phase:             running")),
            "{args:?} printed a forged line:\n{out}"
        );
        assert!(out.contains(r"evil\nphase:"), "{args:?}:\n{out}");
    }
}

/// Regression: replicas of an HA group starting at once ran migrations
/// concurrently on one fresh database and some of them failed.
#[tokio::test]
async fn concurrent_migrates_on_one_fresh_postgres_database_all_succeed() {
    for _ in 0..3 {
        let db = TestDb::new(Backend::Postgres).await;
        let migrates: Vec<_> = (0..6)
            .map(|_| {
                let url = db.url.clone();
                std::thread::spawn(move || {
                    Command::new(env!("CARGO_BIN_EXE_clawfleet"))
                        .arg("migrate")
                        .env_clear()
                        .env("DATABASE_URL", url)
                        .output()
                        .expect("run clawfleet migrate")
                })
            })
            .collect();
        let mut applied = 0;
        for migrate in migrates {
            let out = migrate.join().expect("migrate thread");
            assert!(
                out.status.success(),
                "a concurrent migrate failed: {}",
                stderr(&out)
            );
            if stdout(&out).contains("applied") {
                applied += 1;
            }
        }
        assert_eq!(applied, 1, "exactly one process applied the migrations");
        db.store().await;
    }
}
