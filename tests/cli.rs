//! The command line as an operator uses it: the binary run against a
//! throwaway SQLite database.

mod support;

use std::process::{Command, Output};

use clawfleet::secrets::{EncryptionKey, GatewayToken, KeyRing};
use support::controller::{status_with_token, write_status};
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

/// `clawfleet <args>` with the environment as it is.
fn clawfleet_bare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(args)
        .output()
        .unwrap()
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
    write_status(
        &store,
        &status_with_token("alice", ring.seal("alice", &token).unwrap()),
    )
    .await;

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
    let entry = ok(clawfleet_bare(&["keygen", "--id", "rotated"]));
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

/// `users set --help` lists its own options first; the ~20 global flags come
/// after them under a heading of their own instead of burying them.
#[test]
fn a_commands_help_lists_its_own_options_before_the_global_ones() {
    let help = ok(clawfleet_bare(&["users", "set", "--help"]));
    let heading = help
        .find("Global options")
        .unwrap_or_else(|| panic!("no global heading in:\n{help}"));
    let (own, global) = help.split_at(heading);
    for flag in ["--state", "--idle-timeout", "--image", "--touch"] {
        assert!(
            own.contains(flag),
            "{flag} not among the command's options:\n{help}"
        );
    }
    for flag in [
        "--database-url",
        "--docker-host",
        "--instance",
        "--port-range",
        "--listen",
    ] {
        assert!(
            !own.contains(flag),
            "{flag} listed among the command's own options:\n{help}"
        );
        assert!(
            global.contains(flag),
            "{flag} missing from the global options:\n{help}"
        );
    }
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

/// `clawfleet <args>` on `db` with `data_dir` as its data folder and no keys
/// in the environment; killed (and the test failed) if still running after 60 s.
fn clawfleet_without_keys(db: &TestDb, data_dir: &std::path::Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("CLAWFLEET_DATA_DIR", data_dir)
        .env("CLAWFLEET_LISTEN", "127.0.0.1:0")
        // Nothing may reach the engine: a `run` that got past the keys fails there.
        .env("DOCKER_HOST", "tcp://127.0.0.1:1")
        .env("CLAWFLEET_INSTANCE", "cli-keys-test")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run clawfleet");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("clawfleet {args:?} still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[tokio::test]
async fn run_on_postgres_without_keys_exits_saying_every_replica_needs_the_same_keys() {
    // Regression: each replica made a key file of its own and sealed with its
    // own key, so after a failover the new leader could not open the tokens.
    let db = TestDb::new(Backend::Postgres).await;
    let data = tempfile::tempdir().unwrap();
    let out = clawfleet_without_keys(&db, data.path(), &["run"]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("every replica"), "{message}");
    assert!(message.contains("CLAWFLEET_ENCRYPTION_KEYS"), "{message}");
    assert!(message.contains("clawfleet keygen"), "{message}");
    assert_eq!(
        std::fs::read_dir(data.path()).unwrap().count(),
        0,
        "no key file is made"
    );
    let store = clawfleet::store::Store::connect(&db.url).await.unwrap();
    assert!(
        !store.pending_migrations().await.unwrap().is_empty(),
        "it stops before touching the database"
    );

    // A key file an earlier build made on this host is named, not used.
    let key = EncryptionKey::generate("host1").unwrap();
    std::fs::write(
        data.path().join("encryption.keys"),
        format!("{}\n", key.to_config_entry().as_str()),
    )
    .unwrap();
    let out = clawfleet_without_keys(&db, data.path(), &["run"]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("encryption.keys"), "{}", stderr(&out));
}

#[tokio::test]
async fn on_postgres_every_command_takes_keys_only_from_the_environment() {
    let db = TestDb::new(Backend::Postgres).await;
    let data = tempfile::tempdir().unwrap();
    // Migrations need no key.
    ok(clawfleet_without_keys(&db, data.path(), &["migrate"]));
    ok(clawfleet_without_keys(
        &db,
        data.path(),
        &["users", "set", "alice"],
    ));

    let key = EncryptionKey::generate("host1").unwrap();
    let ring = KeyRing::new(vec![key.clone()]).unwrap();
    std::fs::write(
        data.path().join("encryption.keys"),
        format!("{}\n", key.to_config_entry().as_str()),
    )
    .unwrap();
    let store = db.store().await;
    let token = GatewayToken::generate().unwrap();
    write_status(
        &store,
        &status_with_token("alice", ring.seal("alice", &token).unwrap()),
    )
    .await;
    let out = clawfleet_without_keys(
        &db,
        data.path(),
        &["users", "show", "alice", "--show-token"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("every replica"), "{}", stderr(&out));
    assert!(!stdout(&out).contains(token.expose()));
    ok(clawfleet_without_keys(
        &db,
        data.path(),
        &["users", "show", "alice"],
    ));
}

#[tokio::test]
async fn an_empty_key_file_is_an_error_naming_it_and_is_never_replaced() {
    // Regression: an empty key file (a crash while it was written) said only
    // "no encryption key configured", as if none had ever been made.
    let db = TestDb::new(Backend::Sqlite).await;
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("encryption.keys");
    std::fs::write(&path, "").unwrap();
    let out = clawfleet_without_keys(&db, data.path(), &["run"]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("empty"), "{message}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "left alone");
}

/// Issue 11: after the controller stopped, `users list` still showed
/// `running healthy` with nothing saying that no controller runs.
#[tokio::test]
async fn users_list_and_show_warn_when_the_controller_has_not_written_for_longer_than_it_promised()
{
    let db = TestDb::new(Backend::Sqlite).await;
    ok(clawfleet(&db, &["migrate"]));
    ok(clawfleet(&db, &["users", "set", "alice"]));
    let store = clawfleet::store::Store::connect(&db.url).await.unwrap();
    let outputs = || {
        [
            ok(clawfleet(&db, &["users", "list"])),
            ok(clawfleet(&db, &["users", "show", "alice"])),
            ok(clawfleet(&db, &["users", "list", "--json"])),
            ok(clawfleet(&db, &["users", "show", "alice", "--json"])),
        ]
    };

    // A controller within its promise: nothing is said.
    store
        .beat("default", "running", std::time::Duration::from_secs(900))
        .await
        .unwrap();
    let [list, show, list_json, show_json] = outputs();
    assert!(list.starts_with("USER"), "{list}");
    assert!(show.starts_with("user:"), "{show}");
    assert!(!list_json.contains("controller"), "{list_json}");
    assert!(!show_json.contains("controller"), "{show_json}");

    // One that last wrote long ago: a header line, and the field.
    sea_orm::ConnectionTrait::execute_unprepared(
        store.connection(),
        "UPDATE clawfleet_leases SET renewed_at = '2026-01-01T00:00:00Z', \
         expires_at = '2026-01-01T00:15:00Z' WHERE instance = 'default'",
    )
    .await
    .unwrap();
    let [list, show, list_json, show_json] = outputs();
    let header =
        "! no controller of instance \"default\" has written since 2026-01-01T00:00:00+00:00";
    for text in [&list, &show] {
        assert!(text.starts_with(header), "{text}");
    }
    assert!(list.lines().nth(1).unwrap().starts_with("USER"), "{list}");
    let expected = serde_json::json!({"last_seen": "2026-01-01T00:00:00+00:00", "stale": true});
    let list_json: serde_json::Value = serde_json::from_str(&list_json).unwrap();
    let show_json: serde_json::Value = serde_json::from_str(&show_json).unwrap();
    assert_eq!(list_json[0]["controller"], expected);
    assert_eq!(show_json["controller"], expected);

    // Another instance's controller is not this one's.
    let other = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["users", "list", "--instance", "other"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(ok(other).starts_with("USER"));
}
