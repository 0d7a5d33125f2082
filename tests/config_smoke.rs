//! Every setting of the README's configuration tables, through the real
//! binary: once with a valid value (the command runs and exits cleanly) and
//! once with each invalid value (a non-zero exit and a message naming the
//! setting), by flag and by environment variable, and never a panic.
//!
//! The rows are read from the README itself (every table headed
//! `| flag | environment | default | meaning |`), so a row added there
//! without an entry in [`cases`] fails this test, and a flag the binary's
//! `--help` names without a README row fails it too.
//!
//! Global settings are tried with `users list` (nothing long-running);
//! settings only `run` reads start `clawfleet run` on a throwaway SQLite
//! database, wait for its first full sync, and stop it with SIGTERM.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::controller::{port_range, test_key};
use support::docker::{DockerFixture, AGENT_IMAGE};

/// How long a `run` may take to reach its first full sync, or to exit.
const RUN_DEADLINE: Duration = Duration::from_secs(90);
/// A duration no setting accepts (they are bounded to 10 years).
const HUGE: &str = "1000000y";

/// Which command tries a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// `clawfleet users list`: parses every global setting, reads the database.
    UsersList,
    /// `clawfleet run` until its first full sync, then SIGTERM.
    Run,
}

/// The invalid values of a setting.
#[derive(Clone, Copy, Debug)]
enum Invalid {
    /// Each must be refused at start.
    Values(&'static [&'static str]),
    /// No value is invalid, for this reason.
    None(&'static str),
}

/// How to try one setting. In values, `{db}` is the throwaway database's
/// URL, `{dir}` a fresh folder and `{key}` a valid key ring.
#[derive(Clone, Copy, Debug)]
struct Case {
    probe: Probe,
    valid: &'static str,
    invalid: Invalid,
    /// Variables of the base environment that would hide the setting.
    without: &'static [&'static str],
}

impl Case {
    const fn without(self, without: &'static [&'static str]) -> Self {
        Case { without, ..self }
    }
}

const fn list(valid: &'static str, invalid: &'static [&'static str]) -> Case {
    Case {
        probe: Probe::UsersList,
        valid,
        invalid: Invalid::Values(invalid),
        without: &[],
    }
}

const fn run(valid: &'static str, invalid: &'static [&'static str]) -> Case {
    Case {
        probe: Probe::Run,
        valid,
        invalid: Invalid::Values(invalid),
        without: &[],
    }
}

const fn anything(probe: Probe, valid: &'static str, why: &'static str) -> Case {
    Case {
        probe,
        valid,
        invalid: Invalid::None(why),
        without: &[],
    }
}

/// One entry per README setting, keyed by its environment variable (or by
/// its flag when it has none). A row's flag uses the entry of its first
/// variable unless it has one of its own.
fn cases() -> BTreeMap<&'static str, Case> {
    BTreeMap::from([
        ("DATABASE_URL", list("{db}", &["mysql://db/clawfleet"])),
        (
            "DOCKER_HOST",
            run("unix:///var/run/docker.sock", &["ftp://engine"]),
        ),
        ("CLAWFLEET_INSTANCE", list("smoke-instance", &["a b", ""])),
        (
            "OPENCLAW_IMAGE",
            list("registry.example.com:5000/agent:1", &["../x", "Alpine"]),
        ),
        ("OPENCLAW_NETWORK", list("smoke-net", &["-x", "a b"])),
        ("CLAWFLEET_NAME_PREFIX", list("smoke-", &["A/B"])),
        (
            "CLAWFLEET_PORT_RANGE",
            list("20000-20099", &["20099-20000", "0-10", "19000"]),
        ),
        ("OPENCLAW_PORT_RANGE_START", run("21000", &["x", "70000"])),
        ("CLAWFLEET_PUBLISH_IP", list("0.0.0.0", &["localhost"])),
        (
            "MOSAIC_API_URL",
            anything(
                Probe::UsersList,
                "http://api.example.com/api",
                "any text is handed to the containers as MOSAIC_API_URL",
            ),
        ),
        (
            "CLAWFLEET_LISTEN",
            list("127.0.0.1:0", &["nohost", "127.0.0.1"]),
        ),
        (
            "CLAWFLEET_ALLOWED_IMAGES",
            list(
                "alpine/openclaw:*,registry.example.com/*",
                &[",", "a:* b:*"],
            ),
        ),
        ("CLAWFLEET_STOP_TIMEOUT", list("30s", &["forever", HUGE])),
        ("CLAWFLEET_RESYNC_PERIOD", list("1m", &["soon", HUGE])),
        ("CLAWFLEET_CONCURRENCY", list("4", &["0", "1025", "x"])),
        (
            "CLAWFLEET_ENGINE_CONCURRENCY",
            run("3", &["0", "1025", "x"]),
        ),
        ("CLAWFLEET_LOG_FORMAT", list("json", &["xml"])),
        // Only the key file lives there when the database is named.
        (
            "CLAWFLEET_DATA_DIR",
            run("{dir}", &["/dev/null"]).without(&["CLAWFLEET_ENCRYPTION_KEYS"]),
        ),
        ("CLAWFLEET_MEMORY_LIMIT", list("512m", &["1k", "lots"])),
        ("CLAWFLEET_CPU_LIMIT", list("0.5", &["0", "x"])),
        ("CLAWFLEET_PIDS_LIMIT", list("256", &["0", "x"])),
        (
            "CLAWFLEET_CAP_ADD",
            list("chown,CAP_SETUID", &["TELEPORT", "ALL"]),
        ),
        ("CLAWFLEET_LOG_MAX_SIZE", list("1m", &["0", "lots"])),
        ("CLAWFLEET_LOG_MAX_FILE", list("5", &["0", "101", "x"])),
        (
            "CLAWFLEET_NETWORK_ISOLATION",
            list("isolated", &["banana", "Isolated"]),
        ),
        // The engine is a Swarm manager in CI (.ci/run).
        ("CLAWFLEET_BACKEND", run("swarm", &["kubernetes", "Swarm"])),
        ("CLAWFLEET_VOLUME_DRIVER", list("local", &["a b", ""])),
        (
            "CLAWFLEET_PLACEMENT",
            list(
                "node.labels.agents==true,node.role!=manager",
                &["node.role", "==x"],
            ),
        ),
        ("CLAWFLEET_SWARM_PUBLISH_MODE", list("host", &["mesh"])),
        (
            "CLAWFLEET_SWARM_TASK_POLL",
            list("500ms", &["soon", "10ms", HUGE]),
        ),
        ("CLAWFLEET_POLL_INTERVAL", run("100ms", &["soon", HUGE])),
        ("CLAWFLEET_ORPHAN_GRACE", run("1h", &["soon", HUGE])),
        ("CLAWFLEET_FAILED_RETRY", run("1m", &["soon", HUGE])),
        ("CLAWFLEET_SHUTDOWN_TIMEOUT", run("5s", &["soon", HUGE])),
        ("CLAWFLEET_LEASE_TTL", run("20s", &["1s", HUGE])),
        (
            "CLAWFLEET_API_MAX_INFLIGHT",
            run("64", &["0", "x", "1000001"]),
        ),
        ("CLAWFLEET_READINESS_PROBE", run("tcp", &["udp", "HTTP "])),
        (
            "CLAWFLEET_READINESS_PATH",
            run("/ready?x=1", &["healthz", "/a b"]),
        ),
        (
            "CLAWFLEET_HOLDER_ID",
            anything(
                Probe::Run,
                "smoke-holder",
                "any text names the process in the lease",
            ),
        ),
        (
            "CLAWFLEET_ENCRYPTION_KEYS",
            run("{key}", &["garbage", "k1:bm90LWEta2V5"]),
        ),
        (
            "CLAWFLEET_API_TOKEN",
            anything(
                Probe::Run,
                "a-long-api-token-value",
                "any text is a token; empty turns the API off",
            ),
        ),
    ])
}

/// A row of a README configuration table.
#[derive(Debug)]
struct Row {
    /// `run` for `run --poll-interval`; `None` for a global flag.
    subcommand: Option<String>,
    /// `--poll-interval`; `None` for an environment-only setting.
    flag: Option<String>,
    /// Every variable the row names (the first is the setting's own).
    envs: Vec<String>,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The rows of every `| flag | environment | default | meaning |` table of the README.
fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in readme.lines() {
        let line = line.trim();
        if line.replace(' ', "") == "|flag|environment|default|meaning|" {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("|---") || line.starts_with("| ---") {
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<&str> = line.split('|').collect();
        let (flag_cell, env_cell) = (cells[1], cells[2]);
        let (subcommand, flag) = match backticked(flag_cell).first() {
            Some(text) => match text.split_once(' ') {
                Some((sub, flag)) => (Some(sub.to_owned()), Some(flag.trim().to_owned())),
                None => (None, Some(text.clone())),
            },
            None => (None, None),
        };
        let envs: Vec<String> = backticked(env_cell)
            .into_iter()
            .filter(|e| {
                e.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        assert!(
            flag.is_some() || !envs.is_empty(),
            "README configuration row names neither a flag nor a variable: {line}"
        );
        rows.push(Row {
            subcommand,
            flag,
            envs,
        });
    }
    assert!(
        rows.len() > 20,
        "README configuration tables not found: {rows:?}"
    );
    rows
}

/// One way of giving a setting a value.
#[derive(Clone, Debug)]
struct Attempt {
    /// The flag or variable, as the report names it.
    setting: String,
    /// Every name an error message may use for it.
    names: Vec<String>,
    probe: Probe,
    args: Vec<String>,
    env: Option<(String, String)>,
    /// Variables of the same row (and those that would hide it), removed
    /// from the base environment.
    unset: Vec<String>,
    value: String,
    valid: bool,
}

/// Every attempt the README's rows call for, or the settings missing from [`cases`].
fn attempts(rows: &[Row], db: &str) -> Result<Vec<Attempt>, Vec<String>> {
    let cases = cases();
    let key = test_key().to_config_entry().to_string();
    let fill = |value: &str| value.replace("{db}", db).replace("{key}", &key);
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for row in rows {
        let mut settings: Vec<(String, Option<&Case>, bool)> = Vec::new();
        if let Some(flag) = &row.flag {
            let case = cases
                .get(flag.as_str())
                .or_else(|| row.envs.first().and_then(|e| cases.get(e.as_str())));
            settings.push((flag.clone(), case, true));
        }
        for env in &row.envs {
            settings.push((env.clone(), cases.get(env.as_str()), false));
        }
        let mut names: Vec<String> = row.envs.clone();
        names.extend(row.flag.clone());
        for (setting, case, is_flag) in settings {
            let Some(case) = case else {
                missing.push(setting);
                continue;
            };
            // A flag of `run` can only be tried by running.
            let probe = if row.subcommand.is_some() {
                Probe::Run
            } else {
                case.probe
            };
            let mut values = vec![(case.valid, true)];
            match case.invalid {
                Invalid::Values(invalid) => values.extend(invalid.iter().map(|v| (*v, false))),
                Invalid::None(why) => assert!(
                    !why.trim().is_empty(),
                    "{setting}: say why no value of it is invalid"
                ),
            }
            for (value, valid) in values {
                let value = fill(value);
                let (args, env) = if is_flag {
                    // `--flag=value`, so a value starting with '-' stays a value.
                    (vec![format!("{setting}={value}")], None)
                } else {
                    (Vec::new(), Some((setting.clone(), value.clone())))
                };
                out.push(Attempt {
                    setting: setting.clone(),
                    names: names.clone(),
                    probe,
                    args,
                    env,
                    unset: row
                        .envs
                        .iter()
                        .cloned()
                        .chain(case.without.iter().map(|e| (*e).to_owned()))
                        .collect(),
                    value,
                    valid,
                });
            }
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// What one attempt did.
struct Finished {
    status: ExitStatus,
    log: String,
    /// For a `run`: whether it reached its first full sync.
    started: bool,
}

/// The environment every attempt starts from: a throwaway database and
/// folder, and for `run` this test's own instance, names and ports.
fn base_env(db: &str, dir: &Path, fx: &DockerFixture) -> BTreeMap<String, String> {
    let (start, end) = port_range(20);
    BTreeMap::from([
        ("PATH".to_owned(), std::env::var("PATH").unwrap_or_default()),
        ("DATABASE_URL".to_owned(), db.to_owned()),
        ("CLAWFLEET_DATA_DIR".to_owned(), dir.display().to_string()),
        ("CLAWFLEET_INSTANCE".to_owned(), fx.instance.clone()),
        ("OPENCLAW_NETWORK".to_owned(), fx.network.clone()),
        ("CLAWFLEET_NAME_PREFIX".to_owned(), fx.prefix.clone()),
        ("OPENCLAW_IMAGE".to_owned(), AGENT_IMAGE.to_owned()),
        ("CLAWFLEET_PORT_RANGE".to_owned(), format!("{start}-{end}")),
        ("CLAWFLEET_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        (
            "CLAWFLEET_ENCRYPTION_KEYS".to_owned(),
            test_key().to_config_entry().to_string(),
        ),
    ])
}

fn try_attempt(attempt: &Attempt, base: &BTreeMap<String, String>, work: &Path) -> Finished {
    let fresh = work.join("fresh").display().to_string();
    let fill = |text: &String| text.replace("{dir}", &fresh);
    let log_path = work.join("out.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawfleet"));
    cmd.env_clear()
        .envs(base.iter().filter(|(k, _)| !attempt.unset.contains(k)))
        .envs(attempt.env.iter().map(|(k, v)| (k, fill(v))))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    // Each `run` gets a database of its own (SQLite runs are single-instance).
    if attempt.probe == Probe::Run && !attempt.unset.iter().any(|e| e == "DATABASE_URL") {
        cmd.env(
            "DATABASE_URL",
            format!("sqlite://{}/run.db?mode=rwc", work.display()),
        );
    }
    match attempt.probe {
        Probe::UsersList => cmd
            .args(attempt.args.iter().map(fill))
            .args(["users", "list"]),
        Probe::Run => cmd.arg("run").args(attempt.args.iter().map(fill)),
    };
    let mut child = cmd.spawn().expect("start clawfleet");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + RUN_DEADLINE;
    let mut started = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if attempt.probe == Probe::Run && !started && log().contains("first full sync") {
            started = true;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} = {:?}: clawfleet neither exited nor started within {RUN_DEADLINE:?}\n{}",
                attempt.setting,
                attempt.value,
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Finished {
        status,
        log: log(),
        started,
    }
}

/// What is wrong with `finished` as the outcome of `attempt`, if anything.
fn judge(attempt: &Attempt, finished: &Finished) -> Option<String> {
    let what = format!(
        "{} = {:?} ({:?})",
        attempt.setting, attempt.value, attempt.probe
    );
    if finished.log.contains("panicked") || finished.status.code() == Some(101) {
        return Some(format!("{what} panicked:\n{}", finished.log));
    }
    if attempt.valid {
        let clean =
            finished.status.success() && (attempt.probe == Probe::UsersList || finished.started);
        return (!clean).then(|| {
            format!(
                "{what} is valid but clawfleet exited with {}:\n{}",
                finished.status, finished.log
            )
        });
    }
    if finished.status.success() || finished.started {
        return Some(format!(
            "{what} is invalid but clawfleet accepted it:\n{}",
            finished.log
        ));
    }
    let words = |name: &str| {
        name.trim_start_matches('-')
            .to_ascii_lowercase()
            .replace(['-', '_'], " ")
    };
    let text = finished.log.to_ascii_lowercase();
    let named = attempt
        .names
        .iter()
        .any(|name| finished.log.contains(name.as_str()) || text.contains(&words(name)))
        || (!attempt.value.is_empty() && finished.log.contains(&attempt.value));
    (!named).then(|| {
        format!(
            "{what} was refused without naming {:?} or quoting the value:\n{}",
            attempt.names, finished.log
        )
    })
}

#[tokio::test]
async fn every_readme_setting_starts_cleanly_when_valid_and_fails_clearly_when_invalid() {
    let rows = readme_rows();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}/smoke.db?mode=rwc", dir.path().display());
    let attempts = match attempts(&rows, &db) {
        Ok(attempts) => attempts,
        Err(missing) => panic!(
            "README configuration rows without an entry in `cases()` of tests/config_smoke.rs: \
             {missing:?}. Add one per setting: a valid value and its invalid values \
             (or `anything(..)` with the reason none is invalid)."
        ),
    };
    let fx = DockerFixture::new("smoke");
    let base = base_env(&db, dir.path(), &fx);
    // Migrated once, so concurrent `users list` runs do not race to create the schema.
    let status = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .arg("migrate")
        .env_clear()
        .envs(&base)
        .status()
        .expect("migrate");
    assert!(status.success());

    // Four at a time, dealt round-robin so the `run`s (a second or two
    // each, the rest is instant) spread over the workers.
    const WORKERS: usize = 4;
    let problems: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (base, attempts) = (&base, &attempts);
                let dir = dir.path();
                scope.spawn(move || {
                    let mut problems = Vec::new();
                    for i in (w..attempts.len()).step_by(WORKERS) {
                        let attempt = &attempts[i];
                        let work = dir.join(format!("attempt-{i}"));
                        std::fs::create_dir_all(&work).expect("work dir");
                        let finished = try_attempt(attempt, base, &work);
                        problems.extend(judge(attempt, &finished));
                    }
                    problems
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    assert!(
        problems.is_empty(),
        "{} of {} attempts went wrong:\n\n{}",
        problems.len(),
        attempts.len(),
        problems.join("\n\n")
    );
}

#[test]
fn every_variable_the_binary_reads_has_a_readme_row() {
    let documented: Vec<String> = readme_rows().into_iter().flat_map(|r| r.envs).collect();
    for args in [&["--help"][..], &["run", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
            .args(args)
            .env_clear()
            .output()
            .expect("clawfleet --help");
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for piece in help.split("[env: ").skip(1) {
            let var: String = piece
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            assert!(
                documented.contains(&var),
                "`clawfleet {}` names {var}, which has no row in the README's configuration tables",
                args.join(" ")
            );
        }
    }
}
