//! `clawfleet import table` (README "Taking over from the original
//! service") through the real binary, against a PostgreSQL table with the
//! original service's columns; and the README's single SQL statement, which
//! must import what the command imports.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use clawfleet::store::Store;
use support::{Backend, TestDb};

/// The original service's table as Prisma creates it.
const ORIGINAL_TABLE: &str = r#"
CREATE TABLE "UserContainer" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "userId" TEXT NOT NULL UNIQUE,
    "containerId" TEXT,
    "containerName" TEXT NOT NULL,
    "gatewayPort" INTEGER,
    "gatewayToken" TEXT NOT NULL,
    "status" TEXT NOT NULL DEFAULT 'stopped',
    "lastActiveAt" TIMESTAMP(3),
    "idleTimeoutMin" INTEGER NOT NULL DEFAULT 30,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
INSERT INTO "UserContainer" ("id", "userId", "containerName", "gatewayPort", "gatewayToken", "status", "lastActiveAt", "idleTimeoutMin") VALUES
  ('c1', 'alice', 'mosaic-user-alice', 19000, 'enc:alice', 'running', '2026-11-30 10:00:00.123', 30),
  ('c2', 'bob', 'mosaic-user-bob', NULL, 'enc:bob', 'stopped', NULL, 60),
  ('c3', 'carol', 'mosaic-user-carol', 19001, 'enc:carol', 'running', '2026-11-29 08:30:00', 0),
  ('c4', 'dave', 'mosaic-user-dave', NULL, 'enc:dave', 'error', '2026-11-28 00:00:00', 15),
  ('c5', 'eve', 'mosaic-user-eve', NULL, 'enc:eve', 'running', NULL, -5);
"#;

/// A fresh PostgreSQL database holding the original table and its rows.
async fn original_db() -> TestDb {
    let db = TestDb::new(Backend::Postgres).await;
    db.exec(ORIGINAL_TABLE).await;
    db
}

/// `clawfleet import table <args>` from `source` into `target`.
fn import(source: &TestDb, target: &TestDb, args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["import", "table"])
        .args(args)
        .env("CLAWFLEET_IMPORT_FROM_URL", &source.url)
        .env("DATABASE_URL", &target.url)
        .env_remove("CLAWFLEET_ENCRYPTION_KEYS")
        .output()
        .expect("run clawfleet import");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    (out, text)
}

/// The line of `user` in the import's table.
fn line<'a>(text: &'a str, user: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(&format!("{user} ")))
        .unwrap_or_else(|| panic!("no line for {user}:\n{text}"))
}

/// Every desired row as (state, idle timeout secs, last active), by user.
async fn rows(store: &Store) -> BTreeMap<String, (String, u64, Option<String>)> {
    let ids = store.desired_user_ids().await.unwrap();
    store
        .desired_of(&ids)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let d = r.expect("valid row");
            (
                d.user_id.clone(),
                (
                    d.state.to_string(),
                    d.idle_timeout.map_or(0, |t| t.as_secs()),
                    d.last_active_at.map(|t| t.to_rfc3339()),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn import_table_writes_a_row_per_user_keeps_existing_ones_and_a_second_run_changes_nothing() {
    let source = original_db().await;
    let target = TestDb::new(Backend::Sqlite).await;
    let store = target.store().await;
    // carol has a row already: it is never replaced without --overwrite.
    target
        .exec("INSERT INTO desired_containers (user_id, state) VALUES ('carol', 'stopped')")
        .await;

    let (_, text) = import(&source, &target, &["--dry-run"]);
    assert!(line(&text, "alice").contains("would create"), "{text}");
    assert!(line(&text, "carol").contains("exists, kept"), "{text}");
    assert!(
        line(&text, "eve").contains("skipped: idleTimeoutMin -5 is negative"),
        "{text}"
    );
    assert!(text.contains("5 user(s): 3 to create, 0 to update, 1 kept, 0 unchanged, 1 skipped (dry run: nothing written)"), "{text}");
    assert!(
        !text.contains(":clawfleet@"),
        "the source's password is never printed: {text}"
    );
    assert_eq!(rows(&store).await.len(), 1, "a dry run writes nothing");

    let (_, text) = import(&source, &target, &[]);
    assert!(
        text.contains("3 created, 0 updated, 1 kept, 0 unchanged, 1 skipped"),
        "{text}"
    );
    assert!(
        line(&text, "dave").contains("create; status \"error\" read as stopped"),
        "{text}"
    );
    let imported = rows(&store).await;
    let row = |s: &str, idle: u64, at: Option<&str>| (s.to_owned(), idle, at.map(str::to_owned));
    assert_eq!(
        imported["alice"],
        row("running", 1800, Some("2026-11-30T10:00:00.123+00:00"))
    );
    assert_eq!(imported["bob"], row("stopped", 3600, None));
    assert_eq!(imported["carol"], row("stopped", 0, None), "kept as it was");
    assert_eq!(
        imported["dave"],
        row("stopped", 900, Some("2026-11-28T00:00:00+00:00"))
    );
    assert!(!imported.contains_key("eve"));

    let revision = store.max_revision().await.unwrap();
    let (_, text) = import(&source, &target, &[]);
    assert!(
        text.contains("0 created, 0 updated, 4 kept, 0 unchanged, 1 skipped"),
        "{text}"
    );
    assert_eq!(
        store.max_revision().await.unwrap(),
        revision,
        "nothing was written"
    );

    // --overwrite makes carol what the original says; run again, it is unchanged.
    let (_, text) = import(&source, &target, &["--overwrite"]);
    assert!(
        line(&text, "carol").contains("update (--overwrite)"),
        "{text}"
    );
    assert!(
        text.contains("0 created, 1 updated, 0 kept, 3 unchanged, 1 skipped"),
        "{text}"
    );
    assert_eq!(
        rows(&store).await["carol"],
        row("running", 0, Some("2026-11-29T08:30:00+00:00"))
    );
    let revision = store.max_revision().await.unwrap();
    let (_, text) = import(&source, &target, &["--overwrite"]);
    assert!(text.contains("0 updated, 0 kept, 4 unchanged"), "{text}");
    assert_eq!(store.max_revision().await.unwrap(), revision);
}

#[tokio::test]
async fn a_table_name_that_is_not_an_identifier_is_refused_before_any_query() {
    // The URL as a flag this time (the other tests use the environment).
    let source = original_db().await;
    let target = TestDb::new(Backend::Sqlite).await;
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args([
            "import",
            "table",
            "--table",
            "\"UserContainer\"; DROP TABLE x",
        ])
        .args(["--from-url", &source.url])
        .env("DATABASE_URL", &target.url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not an SQL table name"), "{err}");
}

/// The README's statement, from its ```sql block that starts with the
/// "import from the original service's table" comment.
fn readme_import_sql() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("-- import from the original service's table")
        .expect("the README's import statement");
    let end = readme[start..].find("```").expect("end of the block") + start;
    readme[start..end].to_owned()
}

#[tokio::test]
async fn the_readme_sql_statement_imports_what_import_table_imports() {
    // The statement needs both tables in one database.
    let both = original_db().await;
    let by_sql = both.store().await;
    both.exec(&readme_import_sql()).await;

    let source = original_db().await;
    let target = TestDb::new(Backend::Postgres).await;
    let by_command = target.store().await;
    import(&source, &target, &[]);

    let (sql_rows, command_rows) = (rows(&by_sql).await, rows(&by_command).await);
    assert_eq!(sql_rows.len(), 4, "{sql_rows:?}");
    assert_eq!(sql_rows, command_rows);
}
