//! `clawfleet doctor`: passes in a good setup, and fails with the right line
//! for a wrong DOCKER_HOST, an unreachable database and a missing key.

mod support;

use std::process::{Command, Output};

use clawfleet::secrets::{EncryptionKey, GatewayToken, KeyRing};
use support::controller::{
    port_range, seal_v1, status_with_token, test_key, test_ring, write_status,
};
use support::docker::{docker, ensure_agent_image, DockerFixture, AGENT_IMAGE};
use support::{Backend, TestDb};

fn doctor(db_url: &str, env: &[(&str, &str)]) -> (bool, String) {
    doctor_with(db_url, env, &[])
}

/// `clawfleet doctor <args>` with the test's settings, `env` changed.
fn doctor_with(db_url: &str, env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let (start, end) = port_range(50);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawfleet"));
    cmd.arg("doctor")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("CLAWFLEET_DATA_DIR", data.path())
        .env("OPENCLAW_IMAGE", AGENT_IMAGE)
        .env("OPENCLAW_NETWORK", "clawfleet-doctor-test-net")
        .env("CLAWFLEET_PORT_RANGE", format!("{start}-{end}"))
        .env(
            "CLAWFLEET_ENCRYPTION_KEYS",
            test_key().to_config_entry().as_str(),
        )
        .env("CLAWFLEET_API_TOKEN", "doctor-test-api-token-0123456789");
    for (k, v) in env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let out: Output = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn failed_line<'a>(text: &'a str, topic: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with('✗') && l.contains(topic))
        .unwrap_or_else(|| panic!("no ✗ line about {topic}:\n{text}"))
}

#[tokio::test]
async fn doctor_passes_in_a_good_setup() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let (ok, text) = doctor(&db.url, &[]);
    assert!(ok, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with('✓')).count(),
        7,
        "{text}"
    );
    assert!(text.contains("all 7 checks passed"), "{text}");
    assert!(
        !text.contains("doctor-test-api-token"),
        "the API token is never printed"
    );
}

#[tokio::test]
async fn doctor_fails_on_a_wrong_docker_host() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let (ok, text) = doctor(&db.url, &[("DOCKER_HOST", "tcp://127.0.0.1:1")]);
    assert!(!ok);
    assert!(
        failed_line(&text, "docker engine").contains("DOCKER_HOST"),
        "{text}"
    );
    assert!(
        text.contains("✓ database"),
        "other checks still run: {text}"
    );
}

#[tokio::test]
async fn doctor_fails_on_an_unreachable_database() {
    let (ok, text) = doctor("postgres://clawfleet:secret-pw@127.0.0.1:1/none", &[]);
    assert!(!ok);
    assert!(
        failed_line(&text, "database").contains("DATABASE_URL"),
        "{text}"
    );
    assert!(!text.contains("secret-pw"), "the password is never printed");
    assert!(text.contains("✓ docker engine"), "{text}");
}

#[tokio::test]
async fn doctor_checks_the_image_given_after_the_subcommand() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let missing = "clawfleet-doctor-test/missing:none";
    let (ok, text) = doctor_with(&db.url, &[], &["--image", missing]);
    assert!(!ok, "{text}");
    assert!(failed_line(&text, "image").contains(missing), "{text}");
    // Before the subcommand it is the default the one after overrides.
    let (ok, text) = doctor_with(
        &db.url,
        &[("OPENCLAW_IMAGE", missing)],
        &["--image", AGENT_IMAGE],
    );
    assert!(ok, "{text}");
}

/// The line marked `mark` (✓, ⚠ or ✗) about `topic`.
fn line_of<'a>(text: &'a str, mark: char, topic: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(mark) && l.contains(topic))
        .unwrap_or_else(|| panic!("no {mark} line about {topic}:\n{text}"))
}

#[tokio::test]
async fn a_missing_key_file_is_a_warning_until_a_stored_token_needs_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let no_keys = [("CLAWFLEET_ENCRYPTION_KEYS", "")];
    let (ok, text) = doctor(&db.url, &no_keys);
    assert!(ok, "{text}");
    assert!(
        line_of(&text, '⚠', "no key file").contains("`clawfleet run` creates one"),
        "{text}"
    );
    let (ok, text) = doctor_with(&db.url, &no_keys, &["--strict"]);
    assert!(!ok, "--strict fails on a warning: {text}");
    assert!(text.contains("failures with --strict"), "{text}");

    // With a stored token, a key that opens it is required.
    let sealed = test_ring()
        .seal("alice", &GatewayToken::generate().unwrap())
        .unwrap();
    store_token(&store, "alice", sealed).await;
    let (ok, text) = doctor(&db.url, &no_keys);
    assert!(!ok, "{text}");
    assert!(
        failed_line(&text, "encryption keys").contains("no encryption key"),
        "{text}"
    );
}

#[tokio::test]
async fn an_optional_feature_off_is_a_warning_and_strict_fails_on_it() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let no_api = [("CLAWFLEET_API_TOKEN", ""), ("CLAWFLEET_CAP_ADD", "CHOWN")];
    let (ok, text) = doctor(&db.url, &no_api);
    assert!(ok, "a warning is not a failure: {text}");
    assert!(
        line_of(&text, '⚠', "API token not set").contains("CLAWFLEET_API_TOKEN"),
        "{text}"
    );
    assert!(text.contains("1 warning(s)"), "{text}");
    let (ok, text) = doctor_with(&db.url, &no_api, &["--strict"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("0 of 7 checks failed; 1 warning(s)"),
        "{text}"
    );
}

#[tokio::test]
async fn before_the_first_start_doctor_warns_of_what_run_creates_and_creates_nothing() {
    ensure_agent_image();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data").join("clawfleet.db");
    let url = format!("sqlite://{}?mode=rwc", file.display());
    let env = [
        ("CLAWFLEET_ENCRYPTION_KEYS", ""),
        ("CLAWFLEET_CAP_ADD", "CHOWN"),
    ];
    let (ok, text) = doctor(&url, &env);
    assert!(ok, "{text}");
    assert!(
        line_of(&text, '⚠', "does not exist yet").contains("`clawfleet run` creates it"),
        "{text}"
    );
    line_of(&text, '⚠', "no key file");
    assert!(!text.contains('✗'), "{text}");
    assert!(
        !file.parent().unwrap().exists(),
        "doctor created {}",
        file.parent().unwrap().display()
    );

    // A database file without the schema: the migrations `run` applies.
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::File::create(&file).unwrap();
    let (ok, text) = doctor(&url, &env);
    assert!(ok, "{text}");
    assert!(
        line_of(&text, '⚠', "migration(s) pending").contains("`clawfleet run` applies them"),
        "{text}"
    );
}

/// Writes a status row for `user` holding `sealed` as its token.
async fn store_token(store: &clawfleet::store::Store, user: &str, sealed: String) {
    write_status(store, &status_with_token(user, sealed)).await;
}

#[tokio::test]
async fn doctor_fails_when_a_stored_token_cannot_be_opened() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let other = KeyRing::new(vec![EncryptionKey::generate("other").unwrap()]).unwrap();
    let token = GatewayToken::generate().unwrap();
    store_token(&store, "u", other.seal("u", &token).unwrap()).await;
    let (ok, text) = doctor(&db.url, &[]);
    assert!(!ok);
    assert!(
        failed_line(&text, "encryption keys").contains("1 of 1 stored token(s) do not open"),
        "{text}"
    );
    assert!(!text.contains(token.expose()), "the token is never printed");
}

#[tokio::test]
async fn doctor_says_which_key_id_sealed_how_many_tokens_in_which_format() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let old = EncryptionKey::generate("old").unwrap();
    let ring = KeyRing::new(vec![test_key(), old.clone()]).unwrap();
    let keys = format!(
        "{},{}",
        test_key().to_config_entry().as_str(),
        old.to_config_entry().as_str()
    );
    let tokens: Vec<GatewayToken> = (0..4).map(|_| GatewayToken::generate().unwrap()).collect();
    store_token(&store, "a", ring.seal("a", &tokens[0]).unwrap()).await;
    store_token(&store, "b", ring.seal("b", &tokens[1]).unwrap()).await;
    store_token(&store, "c", seal_v1(&old, &tokens[2])).await;
    let (ok, text) = doctor(&db.url, &[("CLAWFLEET_ENCRYPTION_KEYS", &keys)]);
    assert!(ok, "{text}");
    assert!(
        text.contains("3 stored token(s) open: test: 2 (v2), old: 1 (v1)"),
        "{text}"
    );

    // Regression: a token copied into another user's row opened there.
    store_token(&store, "d", ring.seal("a", &tokens[3]).unwrap()).await;
    let (ok, text) = doctor(&db.url, &[("CLAWFLEET_ENCRYPTION_KEYS", &keys)]);
    assert!(!ok, "{text}");
    let line = failed_line(&text, "encryption keys");
    assert!(
        line.contains("1 of 4 stored token(s) do not open"),
        "{text}"
    );
    assert!(line.contains("test: 2 (v2), old: 1 (v1)"), "{text}");
    for token in &tokens {
        assert!(!text.contains(token.expose()), "a token is never printed");
    }
}

#[tokio::test]
async fn doctor_on_postgres_takes_keys_only_from_the_environment() {
    let db = TestDb::new(Backend::Postgres).await;
    db.store().await;
    let (ok, text) = doctor(&db.url, &[("CLAWFLEET_ENCRYPTION_KEYS", "")]);
    assert!(!ok);
    let line = failed_line(&text, "encryption keys");
    assert!(line.contains("every replica"), "{text}");
    assert!(line.contains("clawfleet keygen"), "{text}");
}

#[tokio::test]
async fn doctor_fails_on_a_network_whose_isolation_disagrees_with_the_setting() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let fx = DockerFixture::new("doctornet");
    docker(&["network", "create", &fx.network]).expect("network create");
    let network = [("OPENCLAW_NETWORK", fx.network.as_str())];
    let (_, text) = doctor(&db.url, &network);
    // Judged by its own line: the port check beside it looks at ports that
    // tests running alongside may hold.
    assert!(
        text.lines()
            .any(|l| l.starts_with('✓') && l.contains(&fx.network) && l.contains("shared")),
        "a shared network agrees with the default: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with('✗') && l.contains(&fx.network)),
        "{text}"
    );

    let isolated = [
        ("OPENCLAW_NETWORK", fx.network.as_str()),
        ("CLAWFLEET_NETWORK_ISOLATION", "isolated"),
    ];
    let (ok, text) = doctor(&db.url, &isolated);
    assert!(!ok, "{text}");
    let line = failed_line(&text, &fx.network);
    assert!(
        line.contains("--network-isolation isolated") && line.contains("docker network rm"),
        "{text}"
    );
}

#[tokio::test]
async fn doctor_warns_when_the_image_runs_as_root_with_every_capability_dropped() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    // The stand-in image has no USER: it runs as root.
    let (ok, text) = doctor(&db.url, &[]);
    assert!(ok, "a warning is not a failure: {text}");
    let warning = text
        .lines()
        .find(|l| l.starts_with('⚠') && l.contains("runs as root"))
        .unwrap_or_else(|| panic!("no warning about root:\n{text}"));
    assert!(warning.contains("CLAWFLEET_CAP_ADD"), "{warning}");
    let (ok, text) = doctor(&db.url, &[("CLAWFLEET_CAP_ADD", "CHOWN")]);
    assert!(ok, "{text}");
    assert!(!text.contains("runs as root"), "{text}");
}

#[tokio::test]
async fn before_a_takeover_doctor_counts_unlabelled_containers_and_warns_while_users_lack_a_row() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("doctor-takeover");
    let prefix = [("CLAWFLEET_NAME_PREFIX", fx.prefix.as_str())];
    let (_, text) = doctor(&db.url, &prefix);
    assert!(
        !text.contains("to take over"),
        "no line without a fleet: {text}"
    );

    let name = fx.name("1");
    let volume = format!("{name}-state:/data");
    docker(&["create", "--name", &name, "-v", &volume, AGENT_IMAGE]).expect("docker create");
    let (ok, text) = doctor(&db.url, &prefix);
    assert!(ok, "a warning does not fail: {text}");
    let line = line_of(&text, '⚠', "to take over");
    assert!(
        line.contains(&format!(
            "1 unlabelled {}* container(s) and 1 unlabelled volume(s) of theirs to take over; 0 of 1 user(s) have a desired row",
            fx.prefix
        )),
        "{line}"
    );
    assert!(line.contains("clawfleet import engine"), "{line}");

    let row = clawfleet::store::DesiredUpdate {
        user_id: "1".into(),
        ..Default::default()
    };
    store.upsert_desired(&row).await.unwrap();
    let (_, text) = doctor(&db.url, &prefix);
    let line = line_of(&text, '✓', "to take over");
    assert!(line.contains("1 of 1 user(s) have a desired row"), "{line}");
}

#[tokio::test]
async fn on_swarm_doctor_checks_the_manager_and_that_the_network_is_an_attachable_overlay() {
    ensure_agent_image();
    let db = TestDb::new(Backend::Sqlite).await;
    db.store().await;
    let swarm = [("CLAWFLEET_BACKEND", "swarm")];
    let (ok, text) = doctor(&db.url, &swarm);
    assert!(ok, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("✓ Swarm manager at") && l.contains("ready and active")),
        "the engine is a manager (.ci/run makes it one): {text}"
    );

    // A bridge network of the agents' name is refused on Swarm.
    let network = format!("cf-doctor-bridge-{}", std::process::id());
    docker(&[
        "network",
        "create",
        "--label",
        "io.clawfleet.test=doctor",
        &network,
    ])
    .expect("create a bridge network");
    let (ok, bridge) = doctor(&db.url, &[swarm[0], ("OPENCLAW_NETWORK", network.as_str())]);
    let _ = docker(&["network", "rm", &network]);
    assert!(!ok, "{bridge}");
    assert!(
        failed_line(&bridge, "attachable overlay").contains("bridge"),
        "{bridge}"
    );

    // Overlays cannot disable traffic between agents.
    let (ok, isolated) = doctor(
        &db.url,
        &[swarm[0], ("CLAWFLEET_NETWORK_ISOLATION", "isolated")],
    );
    assert!(!ok, "{isolated}");
    failed_line(&isolated, "not possible on Swarm");
}
