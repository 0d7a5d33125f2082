//! `clawfleet import`: desired rows for a fleet that exists without them
//! (README "Taking over from the original service").
//!
//! `import table` reads the original service's `UserContainer` table and
//! writes one desired row per user; `import engine` writes one for each
//! unlabelled `<prefix><id>` container on the engine. Neither replaces a row
//! that exists (`import table` does with `--overwrite`), both write nothing
//! with `--dry-run`, and print what they did (or would do) per user; run
//! twice, the second run changes nothing.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sqlx::{ConnectOptions, Row};

use super::table::{display_id, Table};
use super::{CliError, GlobalArgs};
use crate::config::{parse_idle_timeout, IdleTimeout};
use crate::desired::{validate_user_id, DesiredState, MAX_IDLE_TIMEOUT_SECS};
use crate::docker::{ContainerSummary, DockerEngine, Engine, RunState, LABEL_MANAGED};
use crate::naming::{is_replacement_name, user_id_of};
use crate::store::{redact_url, DesiredUpdate, Store};

/// How many users' existing rows are read per query.
const READ_CHUNK: usize = 500;

/// Rows between two progress lines on stderr.
const PROGRESS_EVERY: usize = 1000;

/// `clawfleet import …`.
#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Write desired rows from the original service's `UserContainer` table (PostgreSQL)
    Table(ImportTableArgs),
    /// Write desired rows for the unlabelled <prefix><id> containers on the engine
    Engine(ImportEngineArgs),
}

/// Flags of `import engine`.
#[derive(Debug, Args)]
pub struct ImportEngineArgs {
    /// Idle timeout of every user written (e.g. 30m), or `off`
    #[arg(long, default_value = "off", value_parser = parse_idle_timeout)]
    pub idle_timeout: IdleTimeout,
    /// Print what would be written, write nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// Flags of `import table`.
#[derive(Debug, Args)]
pub struct ImportTableArgs {
    /// The original service's database, postgres://… (prefer the environment variable: a password in a flag shows in `ps`)
    #[arg(
        long,
        value_name = "URL",
        env = "CLAWFLEET_IMPORT_FROM_URL",
        hide_env_values = true
    )]
    pub from_url: String,
    /// The original service's table, as an SQL name; quote names with capitals
    #[arg(long, default_value = "\"UserContainer\"", value_parser = parse_table_name)]
    pub table: String,
    /// Print what would be written, write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Replace the state, idle timeout and last activity of users that already have a row
    #[arg(long)]
    pub overwrite: bool,
}

/// Accepts an SQL table name, optionally schema-qualified: each part is a
/// plain identifier (`user_container`) or a double-quoted one
/// (`"UserContainer"`) without quotes inside. Anything else is refused: the
/// name goes into the query text.
pub fn parse_table_name(name: &str) -> Result<String, String> {
    let plain = |p: &str| {
        let mut chars = p.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    let quoted = |p: &str| {
        p.len() > 2
            && p.starts_with('"')
            && p.ends_with('"')
            && !p[1..p.len() - 1].contains(['"', '\0'])
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| plain(p) || quoted(p)) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not an SQL table name: use name, schema.name or \"Name\" (quote names with capitals)"
        ))
    }
}

/// One row of the original service's table, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct OriginalRow {
    /// `userId`.
    pub user_id: String,
    /// `status`: `running` or `stopped` as the original wrote it.
    pub status: String,
    /// `idleTimeoutMin`.
    pub idle_timeout_min: Option<i64>,
    /// `lastActiveAt`.
    pub last_active_at: Option<DateTime<Utc>>,
}

/// What the import does with one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No row: one is written.
    Create,
    /// A row exists and `--overwrite` was not given: it is kept as it is.
    Keep,
    /// A row exists that differs, and `--overwrite` replaces its fields.
    Update,
    /// A row exists that already says the same.
    Unchanged,
    /// The original row cannot be imported; why.
    Skip(String),
}

/// One user's line of the import.
#[derive(Clone, Debug)]
pub struct Line {
    /// The original row.
    pub row: OriginalRow,
    /// What is written (for `Create` and `Update`).
    pub update: Option<DesiredUpdate>,
    /// What happens.
    pub action: Action,
    /// A remark for the operator (e.g. a status read as stopped).
    pub note: Option<String>,
}

/// A user's desired row, as far as an import compares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    /// `state`.
    pub state: DesiredState,
    /// `idle_timeout_secs`, 0 for none.
    pub idle_timeout_secs: u64,
    /// `last_active_at`, to the millisecond.
    pub last_active_at: Option<DateTime<Utc>>,
}

/// Decides, for each original row, what the import does. `existing` holds
/// the users that have a desired row (`None`: a row that is not valid).
pub fn plan(
    rows: Vec<OriginalRow>,
    existing: &HashMap<String, Option<Existing>>,
    overwrite: bool,
) -> Vec<Line> {
    let mut seen = HashSet::new();
    rows.into_iter()
        .map(|row| {
            let skip = |reason: String| Line {
                row: row.clone(),
                update: None,
                action: Action::Skip(reason),
                note: None,
            };
            if let Err(reason) = validate_user_id(&row.user_id) {
                return skip(format!("userId {reason}"));
            }
            if !seen.insert(row.user_id.clone()) {
                return skip("userId appears twice in the table".into());
            }
            let idle_secs = match row.idle_timeout_min {
                None => 0,
                Some(m) if m < 0 => return skip(format!("idleTimeoutMin {m} is negative")),
                Some(m) if m.saturating_mul(60) > MAX_IDLE_TIMEOUT_SECS => {
                    return skip(format!("idleTimeoutMin {m} is more than a year"))
                }
                Some(m) => (m * 60) as u64,
            };
            let (state, note) = match row.status.as_str() {
                "running" => (DesiredState::Running, None),
                "stopped" => (DesiredState::Stopped, None),
                other => (
                    DesiredState::Stopped,
                    Some(format!("status {other:?} read as stopped")),
                ),
            };
            let wanted = Existing {
                state,
                idle_timeout_secs: idle_secs,
                last_active_at: row.last_active_at.map(to_millis),
            };
            let action = match existing.get(&row.user_id) {
                None => Action::Create,
                Some(_) if !overwrite => Action::Keep,
                Some(Some(have)) if same(have, &wanted) => Action::Unchanged,
                Some(_) => Action::Update,
            };
            let update = matches!(action, Action::Create | Action::Update).then(|| DesiredUpdate {
                user_id: row.user_id.clone(),
                state: Some(state),
                idle_timeout_secs: Some(Some(idle_secs)),
                image: None,
                touch: row.last_active_at,
            });
            Line {
                row,
                update,
                action,
                note,
            }
        })
        .collect()
}

/// The rows `import engine` reads from the containers listed under
/// `prefix`: one per unlabelled container whose name gives a user id back,
/// running or stopped as the container is, active `now`; and the lines of
/// the containers it skips, with why. Containers of clawfleet (labelled)
/// and replacements left by a recreate are not the original service's.
pub fn engine_rows(
    prefix: &str,
    mut containers: Vec<ContainerSummary>,
    now: DateTime<Utc>,
) -> (Vec<OriginalRow>, Vec<Line>) {
    containers.retain(|c| !c.labels.contains_key(LABEL_MANAGED) && !is_replacement_name(&c.name));
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for c in containers {
        let running = matches!(
            c.state,
            RunState::Running | RunState::Restarting | RunState::Paused
        );
        let mut row = OriginalRow {
            user_id: c.name.clone(),
            status: if running { "running" } else { "stopped" }.to_owned(),
            idle_timeout_min: None,
            last_active_at: Some(now),
        };
        match user_id_of(prefix, &c.name) {
            Ok(user_id) => {
                row.user_id = user_id;
                rows.push(row);
            }
            Err(why) => skipped.push(Line {
                row,
                update: None,
                action: Action::Skip(why.to_string()),
                note: None,
            }),
        }
    }
    (rows, skipped)
}

/// True when `have` already says what the import would write; a missing
/// `lastActiveAt` is not written, so it never differs.
fn same(have: &Existing, wanted: &Existing) -> bool {
    have.state == wanted.state
        && have.idle_timeout_secs == wanted.idle_timeout_secs
        && (wanted.last_active_at.is_none()
            || have.last_active_at.map(to_millis) == wanted.last_active_at)
}

/// `at` cut to the millisecond (the precision of the original's timestamps).
fn to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

/// `clawfleet import …`.
pub async fn import(global: &GlobalArgs, command: &ImportCommand) -> Result<(), CliError> {
    match command {
        ImportCommand::Table(args) => import_table(global, args).await,
        ImportCommand::Engine(args) => import_engine(global, args).await,
    }
}

async fn import_engine(global: &GlobalArgs, args: &ImportEngineArgs) -> Result<(), CliError> {
    let engine = DockerEngine::connect(&global.docker_host)
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let containers = engine
        .list_by_name_prefix(&global.name_prefix)
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let (rows, skipped) = engine_rows(&global.name_prefix, containers, Utc::now());
    eprintln!(
        "found {} unlabelled container(s) named {}* on {}",
        rows.len() + skipped.len(),
        global.name_prefix,
        global.docker_host
    );
    let idle_secs = args.idle_timeout.0.map_or(0, |d| d.as_secs());
    let store = Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let existing = existing_rows(&store, &rows).await?;
    let mut lines = plan(rows, &existing, false);
    for update in lines.iter_mut().filter_map(|l| l.update.as_mut()) {
        update.idle_timeout_secs = Some(Some(idle_secs));
    }
    lines.extend(skipped);
    write_and_print(&store, &mut lines, args.dry_run).await
}

async fn import_table(global: &GlobalArgs, args: &ImportTableArgs) -> Result<(), CliError> {
    let rows = read_original(&args.from_url, &args.table).await?;
    eprintln!(
        "read {} row(s) from {} in {}",
        rows.len(),
        args.table,
        redact_url(&args.from_url)
    );
    let store = Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let existing = existing_rows(&store, &rows).await?;
    let mut lines = plan(rows, &existing, args.overwrite);
    write_and_print(&store, &mut lines, args.dry_run).await
}

/// Writes the lines' rows (unless `dry_run`) and prints what was done.
async fn write_and_print(store: &Store, lines: &mut [Line], dry_run: bool) -> Result<(), CliError> {
    if !dry_run {
        write(store, lines).await?;
    }
    print(lines, dry_run)
}

/// Reads the original table: `userId`, `status`, `idleTimeoutMin`,
/// `lastActiveAt` (as UTC, whether the column has a time zone or not).
async fn read_original(url: &str, table: &str) -> Result<Vec<OriginalRow>, CliError> {
    let shown = redact_url(url);
    if !crate::store::is_postgres_url(url) {
        return Err(CliError::Config(format!(
            "--from-url {shown}: the original service's database is PostgreSQL (postgres://…)"
        )));
    }
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| CliError::Config(format!("--from-url {shown}: {e}")))?;
    let mut conn = tokio::time::timeout(Duration::from_secs(30), options.connect())
        .await
        .map_err(|_| CliError::Config(format!("{shown}: no connection within 30s")))?
        .map_err(|e| CliError::Config(format!("{shown}: {e}")))?;
    // `extract(epoch …)` is UTC seconds for timestamptz, and the nominal
    // seconds of a timestamp without time zone (Prisma writes UTC there).
    let sql = format!(
        r#"SELECT "userId"::text AS user_id, "status"::text AS status,
                  "idleTimeoutMin"::bigint AS idle_min,
                  extract(epoch FROM "lastActiveAt")::float8 AS last_active
           FROM {table} ORDER BY "userId""#
    );
    // The table name passed parse_table_name: an identifier, nothing else.
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut conn)
        .await
        .map_err(|e| CliError::Config(format!("reading {table} from {shown}: {e}")))?;
    rows.iter()
        .map(|r| {
            let epoch: Option<f64> = r.try_get("last_active")?;
            Ok(OriginalRow {
                user_id: r.try_get("user_id")?,
                status: r
                    .try_get::<Option<String>, _>("status")?
                    .unwrap_or_default(),
                idle_timeout_min: r.try_get("idle_min")?,
                last_active_at: epoch.and_then(|s| {
                    DateTime::from_timestamp_micros((s * 1_000_000.0).round() as i64)
                }),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| CliError::Config(format!("reading {table} from {shown}: {e}")))
}

/// The desired rows the users of `rows` have now.
async fn existing_rows(
    store: &Store,
    rows: &[OriginalRow],
) -> Result<HashMap<String, Option<Existing>>, CliError> {
    let ids: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
    let mut existing = HashMap::new();
    for chunk in ids.chunks(READ_CHUNK) {
        for row in store.desired_of(chunk).await? {
            match row {
                Ok(d) => existing.insert(
                    d.user_id.clone(),
                    Some(Existing {
                        state: d.state,
                        idle_timeout_secs: d.idle_timeout.map_or(0, |t| t.as_secs()),
                        last_active_at: d.last_active_at,
                    }),
                ),
                Err(invalid) => existing.insert(invalid.user_id.clone(), None),
            };
        }
    }
    Ok(existing)
}

/// Writes the lines' rows. A row another writer inserted since it was read
/// is kept, not replaced (unless `--overwrite`, which made the line an update).
async fn write(store: &Store, lines: &mut [Line]) -> Result<(), CliError> {
    let total = lines.iter().filter(|l| l.update.is_some()).count();
    let mut written = 0;
    for line in lines.iter_mut() {
        let Some(update) = &line.update else { continue };
        match line.action {
            Action::Create => {
                if !store.insert_desired(update).await? {
                    line.action = Action::Keep;
                }
            }
            _ => store.upsert_desired(update).await?,
        }
        written += 1;
        if written % PROGRESS_EVERY == 0 {
            eprintln!("written {written} of {total}");
        }
    }
    Ok(())
}

/// The idle timeout shown for a line: the original's minutes, else what is
/// written.
fn idle_text(line: &Line) -> String {
    let written = line.update.as_ref().and_then(|u| u.idle_timeout_secs);
    match (line.row.idle_timeout_min, written) {
        (Some(m), _) => format!("{m}m"),
        (None, Some(Some(secs))) if secs > 0 => {
            humantime::format_duration(Duration::from_secs(secs)).to_string()
        }
        _ => "-".into(),
    }
}

/// Prints one line per user and a summary.
fn print(lines: &[Line], dry_run: bool) -> Result<(), CliError> {
    let would = if dry_run { "would " } else { "" };
    let mut table = Table::new(["USER", "STATE", "IDLE", "LAST ACTIVE", "ACTION"]);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in lines {
        let (key, text) = match &line.action {
            Action::Create => ("create", format!("{would}create")),
            Action::Update => ("update", format!("{would}update (--overwrite)")),
            Action::Keep => ("keep", "exists, kept (--overwrite replaces it)".to_owned()),
            Action::Unchanged => ("unchanged", "exists, unchanged".to_owned()),
            Action::Skip(why) => ("skip", format!("skipped: {why}")),
        };
        *counts.entry(key).or_default() += 1;
        let text = match &line.note {
            Some(note) => format!("{text}; {note}"),
            None => text,
        };
        table.row([
            display_id(&line.row.user_id),
            line.row.status.clone(),
            idle_text(line),
            line.row.last_active_at.map_or("-".into(), |t| {
                t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
            }),
            text,
        ]);
    }
    let mut out = std::io::stdout().lock();
    table.write(&mut out)?;
    let n = |k: &str| counts.get(k).copied().unwrap_or(0);
    let (created, updated) = if dry_run {
        ("to create", "to update")
    } else {
        ("created", "updated")
    };
    writeln!(
        out,
        "{} user(s): {} {created}, {} {updated}, {} kept, {} unchanged, {} skipped{}",
        lines.len(),
        n("create"),
        n("update"),
        n("keep"),
        n("unchanged"),
        n("skip"),
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, status: &str, idle: Option<i64>) -> OriginalRow {
        OriginalRow {
            user_id: user.into(),
            status: status.into(),
            idle_timeout_min: idle,
            last_active_at: Some("2026-11-30T10:00:00.123Z".parse().unwrap()),
        }
    }

    fn actions(lines: &[Line]) -> Vec<Action> {
        lines.iter().map(|l| l.action.clone()).collect()
    }

    #[test]
    fn a_table_name_is_a_plain_or_quoted_identifier_and_nothing_else() {
        for ok in [
            "\"UserContainer\"",
            "user_container",
            "public.\"UserContainer\"",
            "_t$1",
        ] {
            assert_eq!(parse_table_name(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "\"\"",
            "UserContainer; DROP TABLE x",
            "\"a\"\"b\"",
            "a.b.c",
            "1abc",
            "\"x",
            "t--",
        ] {
            assert!(parse_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_and_minutes_map_to_state_and_seconds() {
        let lines = plan(
            vec![
                row("a", "running", Some(30)),
                row("b", "stopped", None),
                row("c", "error", Some(0)),
            ],
            &HashMap::new(),
            false,
        );
        assert_eq!(
            actions(&lines),
            [Action::Create, Action::Create, Action::Create]
        );
        let update = |i: usize| lines[i].update.clone().unwrap();
        assert_eq!(update(0).state, Some(DesiredState::Running));
        assert_eq!(update(0).idle_timeout_secs, Some(Some(1800)));
        assert_eq!(update(0).touch, lines[0].row.last_active_at);
        assert_eq!(update(1).state, Some(DesiredState::Stopped));
        assert_eq!(update(1).idle_timeout_secs, Some(Some(0)));
        assert_eq!(update(2).state, Some(DesiredState::Stopped));
        assert_eq!(
            lines[2].note.as_deref(),
            Some("status \"error\" read as stopped")
        );
    }

    #[test]
    fn an_existing_row_is_kept_unless_overwrite_and_an_equal_one_is_unchanged() {
        let rows = vec![row("a", "running", Some(30)), row("b", "running", Some(30))];
        let same_as_a = Existing {
            state: DesiredState::Running,
            idle_timeout_secs: 1800,
            last_active_at: rows[0].last_active_at,
        };
        let other = Existing {
            state: DesiredState::Stopped,
            ..same_as_a.clone()
        };
        let existing = HashMap::from([
            ("a".to_owned(), Some(same_as_a)),
            ("b".to_owned(), Some(other)),
        ]);
        let kept = plan(rows.clone(), &existing, false);
        assert_eq!(actions(&kept), [Action::Keep, Action::Keep]);
        assert!(
            kept.iter().all(|l| l.update.is_none()),
            "nothing is written"
        );
        let replaced = plan(rows, &existing, true);
        assert_eq!(actions(&replaced), [Action::Unchanged, Action::Update]);
        assert!(replaced[0].update.is_none());
        assert!(replaced[1].update.is_some());
    }

    fn listed(name: &str, state: RunState, managed: bool) -> ContainerSummary {
        let labels = if managed {
            crate::docker::object_labels("default", name)
        } else {
            // An image label: not one of clawfleet's.
            [("maintainer".to_owned(), "x".to_owned())].into()
        };
        ContainerSummary {
            id: format!("id-{name}"),
            name: name.into(),
            labels,
            state,
        }
    }

    #[test]
    fn the_engine_gives_one_row_per_unlabelled_container_and_skips_escaped_names() {
        let now: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().unwrap();
        let escaped = crate::naming::container_name("mosaic-user-", "Alice B");
        let containers = vec![
            listed("mosaic-user-2", RunState::Exited, false),
            listed("mosaic-user-1", RunState::Running, false),
            listed("mosaic-user-3", RunState::Running, true),
            listed("mosaic-user-4-next", RunState::Created, false),
            listed(&escaped, RunState::Running, false),
        ];
        let (rows, skipped) = engine_rows("mosaic-user-", containers, now);
        let got: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.user_id.as_str(), r.status.as_str()))
            .collect();
        assert_eq!(got, [("1", "running"), ("2", "stopped")]);
        assert!(rows.iter().all(|r| r.last_active_at == Some(now)));
        assert_eq!(skipped.len(), 1);
        assert!(
            matches!(&skipped[0].action, Action::Skip(why) if why.contains("cannot be recovered")),
            "{:?}",
            skipped[0].action
        );
        let existing = HashMap::from([("2".to_owned(), None)]);
        let lines = plan(rows, &existing, false);
        assert_eq!(
            actions(&lines),
            [Action::Create, Action::Keep],
            "never replaced"
        );
    }

    #[test]
    fn rows_that_cannot_be_imported_are_skipped_with_the_reason() {
        let lines = plan(
            vec![
                row("", "running", Some(30)),
                row("x", "running", Some(-1)),
                row("y", "running", Some(600_000)),
                row("z", "running", Some(5)),
                row("z", "stopped", Some(5)),
            ],
            &HashMap::new(),
            false,
        );
        let reasons: Vec<String> = lines
            .iter()
            .map(|l| match &l.action {
                Action::Skip(why) => why.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert!(reasons[0].starts_with("userId empty"), "{reasons:?}");
        assert_eq!(reasons[1], "idleTimeoutMin -1 is negative");
        assert_eq!(reasons[2], "idleTimeoutMin 600000 is more than a year");
        assert_eq!(reasons[3], "Create");
        assert_eq!(reasons[4], "userId appears twice in the table");
    }
}
