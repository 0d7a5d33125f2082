//! The deployment files under `deploy/`: the FROM-scratch image converges a
//! fleet on the real engine, the alerting rules pass `promtool`, the compose
//! file is valid, and the dashboard and the alerts query only metrics that
//! clawfleet exports.
//!
//! Needs the Docker engine, `promtool` (Debian's `prometheus` package) and
//! `docker-compose` (or the `docker compose` plugin); each test fails, never
//! skips, when its tool is missing.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::docker::{
    container_state, docker, docker_host, eventually, free_port, DockerFixture, AGENT_IMAGE,
    DEFAULT_SOCKET,
};

/// Tag of the image this test process builds with `deploy/build-image.sh`.
const TEST_IMAGE: &str = "clawfleet:deploy-test";
/// Label every Docker object of a fixture carries (the fixture removes them).
const LABEL_INSTANCE: &str = "io.clawfleet.instance";
/// The image's non-root user.
const IMAGE_USER: &str = "65532:65532";
const LONG: Duration = Duration::from_secs(120);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(file: &str) -> PathBuf {
    repo().join("deploy").join(file)
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Builds [`TEST_IMAGE`] with `deploy/build-image.sh`, at most once per
/// process (the script's cargo build is a no-op when nothing changed, and
/// docker's layer cache keeps the rebuild cheap).
fn ensure_deploy_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = deploy("build-image.sh");
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(&script)
            .env("IMAGE", TEST_IMAGE)
            .env("PROFILE", "image-test")
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(
            id.starts_with("sha256:") && !id.contains('\n'),
            "build-image.sh must print only the image id on stdout, printed {id:?}"
        );
        eprintln!(
            "built {TEST_IMAGE} ({id}) in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
}

/// One plain HTTP/1.1 GET to 127.0.0.1:`port`; status and body.
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    support::controller::gateway(port, "GET", path, None)
}

/// How a container in the test reaches the engine: the socket to mount (and
/// its group, for the image's non-root user), or a `DOCKER_HOST` to pass on.
enum EngineAccess {
    Socket { path: String, gid: u32 },
    Host(String),
}

impl EngineAccess {
    fn of_this_machine() -> Self {
        let host = docker_host();
        if host.is_empty() || host.starts_with("unix://") {
            let path = host.strip_prefix("unix://").unwrap_or(DEFAULT_SOCKET);
            let path = if path.is_empty() {
                DEFAULT_SOCKET
            } else {
                path
            };
            let gid = std::fs::metadata(path)
                .unwrap_or_else(|e| panic!("engine socket {path}: {e}"))
                .gid();
            Self::Socket {
                path: path.to_owned(),
                gid,
            }
        } else {
            Self::Host(host)
        }
    }

    /// `docker run` arguments giving a container (on the host's network) the engine.
    fn run_args(&self) -> Vec<String> {
        match self {
            Self::Socket { path, gid } => vec![
                "-v".into(),
                format!("{path}:/var/run/docker.sock"),
                "--group-add".into(),
                gid.to_string(),
            ],
            Self::Host(host) => vec!["-e".into(), format!("DOCKER_HOST={host}")],
        }
    }
}

/// The controller container of a test: removed when dropped (the fixture
/// would remove it too, by its label), its log printed when the test failed.
struct ControllerContainer {
    name: String,
}

impl Drop for ControllerContainer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = Command::new("docker")
                .args(["logs", "--tail", "200", &self.name])
                .output();
            if let Ok(logs) = logs {
                eprintln!("--- log of {} ---\n{}", self.name, output_text(&logs));
            }
        }
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// Runs the image once as a CLI on the data volume, as an operator would
/// (the image has no shell to `docker exec` into); its stdout.
fn one_shot(fx: &DockerFixture, volume: &str, args: &[&str]) -> String {
    let label = format!("{LABEL_INSTANCE}={}", fx.instance);
    let mount = format!("{volume}:/data");
    let mut run = vec!["run", "--rm", "--label", &label, "-v", &mount, TEST_IMAGE];
    run.extend(args);
    docker(&run).unwrap_or_else(|e| panic!("docker {}: {e}", run.join(" ")))
}

/// A 100-port slice of 40000–49999 of this test's own.
fn port_range() -> (u16, u16) {
    let start = 40_000 + (rand::random::<u16>() % 100) * 100;
    (start, start + 99)
}

#[tokio::test]
async fn the_deploy_image_converges_three_users_with_sqlite() {
    ensure_deploy_image();
    let fx = DockerFixture::new("deploy");
    let users = ["u1", "u2", "u3"];

    // The image as built: non-root, no shell to rely on, the documented defaults.
    let user = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        TEST_IMAGE,
    ])
    .expect("inspect the image");
    assert_eq!(user, IMAGE_USER);
    let entrypoint = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        TEST_IMAGE,
    ])
    .expect("inspect the image");
    assert_eq!(entrypoint, r#"["/clawfleet"] ["run"]"#);

    // The data volume, labelled so the fixture removes it.
    let volume = format!("{}-data", fx.instance);
    let label = format!("{LABEL_INSTANCE}={}", fx.instance);
    docker(&["volume", "create", "--label", &label, &volume]).expect("create the data volume");

    let listen = free_port();
    let (first_port, last_port) = port_range();
    let controller = ControllerContainer {
        name: format!("{}-controller", fx.instance),
    };
    let mut run: Vec<String> = [
        "run",
        "-d",
        "--name",
        &controller.name,
        "--label",
        &label,
        "--network",
        "host",
        "-v",
        &format!("{volume}:/data"),
    ]
    .map(String::from)
    .to_vec();
    run.extend(EngineAccess::of_this_machine().run_args());
    for (key, value) in [
        ("CLAWFLEET_INSTANCE", fx.instance.clone()),
        ("OPENCLAW_NETWORK", fx.network.clone()),
        ("CLAWFLEET_NAME_PREFIX", fx.prefix.clone()),
        ("OPENCLAW_IMAGE", AGENT_IMAGE.to_owned()),
        ("CLAWFLEET_PORT_RANGE", format!("{first_port}-{last_port}")),
        ("CLAWFLEET_LISTEN", format!("127.0.0.1:{listen}")),
    ] {
        run.push("-e".into());
        run.push(format!("{key}={value}"));
    }
    run.push(TEST_IMAGE.into());
    let args: Vec<&str> = run.iter().map(String::as_str).collect();
    docker(&args).unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")));

    // Up and migrated before the one-shot CLI writes to the same SQLite file.
    eventually(LONG, "the controller's /readyz to answer 200", || async {
        assert_eq!(
            container_state(&controller.name).as_deref(),
            Some("running"),
            "the controller container stopped"
        );
        http_get(listen, "/readyz")
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await;
    let (code, body) = http_get(listen, "/healthz").expect("GET /healthz");
    assert_eq!(code, 200, "{body}");

    for user in users {
        one_shot(&fx, &volume, &["users", "set", user]);
    }

    for user in users {
        let name = fx.name(user);
        eventually(LONG, &format!("container {name} to run"), || async {
            (container_state(&name).as_deref() == Some("running")).then_some(())
        })
        .await;
        // Labelled for this instance, published in this test's range, and answering.
        let instance = docker(&[
            "inspect",
            "--format",
            &format!("{{{{index .Config.Labels \"{LABEL_INSTANCE}\"}}}}"),
            &name,
        ])
        .expect("inspect the agent");
        assert_eq!(instance, fx.instance);
        let port: u16 = docker(&[
            "inspect",
            "--format",
            "{{(index (index .NetworkSettings.Ports \"18789/tcp\") 0).HostPort}}",
            &name,
        ])
        .expect("inspect the agent's port")
        .parse()
        .expect("a port number");
        assert!((first_port..=last_port).contains(&port), "port {port}");
        eventually(LONG, &format!("{name}'s gateway to answer"), || async {
            http_get(port, "/healthz")
                .ok()
                .filter(|(code, _)| *code == 200)
        })
        .await;
    }

    let (code, body) = http_get(listen, "/readyz").expect("GET /readyz");
    assert_eq!(code, 200, "{body}");
    eventually(LONG, "three running users in the metrics", || async {
        let (_, metrics) = http_get(listen, "/metrics").ok()?;
        metrics
            .lines()
            .any(|l| l == r#"clawfleet_containers{phase="running"} 3"#)
            .then_some(())
    })
    .await;

    // Every metric the dashboard and the alerts query is in the live exposition.
    let (_, metrics) = http_get(listen, "/metrics").expect("GET /metrics");
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut queried = dashboard_metrics();
    queried.extend(alert_metrics());
    for metric in queried.iter().filter(|m| *m != "up") {
        let family = strip_histogram_suffix(metric);
        assert!(
            exported.contains(family),
            "{metric} is queried by deploy/ but not exported by clawfleet"
        );
    }

    // The CLI in the same image reads the same database.
    let list = one_shot(&fx, &volume, &["users", "list"]);
    for user in users {
        assert!(list.contains(user), "users list lacks {user}:\n{list}");
    }

    // SIGTERM as PID 1: a clean exit well within the stop timeout.
    let stopped = Instant::now();
    docker(&["stop", "-t", "40", &controller.name]).expect("docker stop");
    let exit = docker(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &controller.name,
    ])
    .expect("inspect the stopped controller");
    assert_eq!(exit, "0", "the controller must exit 0 on SIGTERM");
    assert!(
        stopped.elapsed() < Duration::from_secs(35),
        "docker stop took {:?}: SIGTERM was not handled",
        stopped.elapsed()
    );
    // Users' containers outlive the controller.
    for user in users {
        assert_eq!(container_state(&fx.name(user)).as_deref(), Some("running"));
    }
}

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool (Debian's prometheus package) must be installed: .ci/run installs it")
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
    ] {
        let output = promtool(&args);
        assert!(
            output.status.success(),
            "promtool {} failed:\n{}",
            args.join(" "),
            output_text(&output)
        );
    }
    // Every alert of the brief exists and has a unit test.
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    let tests =
        std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).expect("alerts_test.yml");
    for alert in [
        "ClawfleetDown",
        "ClawfleetReconcileErrors",
        "ClawfleetWorkqueueStuck",
        "ClawfleetEventStreamDisconnected",
        "ClawfleetContainersFailed",
        "ClawfleetSlowStarts",
        "ClawfleetNoLeader",
        "ClawfleetResyncStale",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}\n")),
            "no rule {alert}"
        );
        let cases = tests.matches(&format!("alertname: {alert}\n")).count();
        assert!(
            cases >= 2,
            "{alert} needs a firing and a not-firing test, has {cases}"
        );
    }
}

/// `docker-compose`, or the `docker compose` plugin when that is what exists.
fn compose(args: &[&str]) -> Output {
    match Command::new("docker-compose").args(args).output() {
        Ok(output) => output,
        Err(_) => Command::new("docker")
            .arg("compose")
            .args(args)
            .output()
            .expect("docker-compose (or the docker compose plugin) must be installed"),
    }
}

#[test]
fn the_compose_file_and_dashboard_are_valid() {
    let file = deploy("docker-compose.yml");
    let env = deploy(".env.example");
    let (file, env) = (file.to_str().unwrap(), env.to_str().unwrap());
    let output = compose(&["--env-file", env, "-f", file, "config", "-q"]);
    assert!(
        output.status.success(),
        "compose config failed:\n{}",
        output_text(&output)
    );
    let output = compose(&["--env-file", env, "-f", file, "config"]);
    let config = String::from_utf8_lossy(&output.stdout);
    for needed in [
        "clawfleet:dev",
        "postgres:15",
        "prom/prometheus",
        "/var/run/docker.sock:/var/run/docker.sock",
        "postgres://clawfleet:",
        "@postgres:5432/clawfleet",
    ] {
        assert!(
            config.contains(needed),
            "compose config lacks {needed}:\n{config}"
        );
    }

    // Secrets come from .env: the compose file names variables, never values.
    let text = std::fs::read_to_string(deploy("docker-compose.yml")).expect("compose file");
    for secret in [
        "CLAWFLEET_ENCRYPTION_KEYS",
        "CLAWFLEET_API_TOKEN",
        "POSTGRES_PASSWORD",
    ] {
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{secret}:")))
        {
            assert!(line.contains("${"), "{secret} is hard-coded: {line}");
        }
    }

    let dashboard = read_dashboard();
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut ids = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{}",
                panel["title"]
            );
        }
    }
    let queried = dashboard_metrics();
    assert!(queried.len() > 20, "the dashboard queries only {queried:?}");

    let known = readme_metrics();
    let mut checked = queried.clone();
    checked.extend(alert_metrics());
    for metric in &checked {
        let ok = metric == "up"
            || metric.starts_with("process_")
            || known.contains(metric.as_str())
            || known.contains(strip_histogram_suffix(metric));
        assert!(ok, "{metric} is not in README's metric table");
    }
    // And every metric of the table is on the dashboard.
    for metric in &known {
        let shown = queried
            .iter()
            .any(|q| q == metric || strip_histogram_suffix(q) == metric);
        assert!(shown, "{metric} is not on the dashboard");
    }
}

fn read_dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(deploy("grafana/clawfleet.json")).expect("dashboard");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Metric names in every `expr` of the dashboard, and in its variables' queries.
fn dashboard_metrics() -> BTreeSet<String> {
    fn walk(value: &serde_json::Value, exprs: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            exprs.push(s.clone())
                        }
                        _ => walk(v, exprs),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&read_dashboard(), &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no expr");
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// Metric names in every `expr` of the alerting rules (a one-line or block scalar).
fn alert_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((indent, value)) = line.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| {
                    l.trim().is_empty() || l.len() - l.trim_start().len() > indent.len()
                })
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(value.to_owned());
        }
    }
    assert_eq!(exprs.len(), 8, "alerts.yml: {exprs:?}");
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// The metric names a PromQL expression reads: every identifier that is not a
/// function, a keyword, a Grafana variable, or inside a label matcher, a
/// range, a string or a `by (...)`-style label list. Panics on a call of a
/// function it does not know, so a misspelt metric cannot hide as one.
fn metric_names(expr: &str) -> Vec<String> {
    const FUNCTIONS: &[&str] = &[
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "deriv",
        "histogram_quantile",
        "time",
        "abs",
        "clamp_min",
        "clamp_max",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];

    // Grafana's `label_values(metric, label)`: only the metric is one.
    let expr = match expr.strip_prefix("label_values(") {
        Some(args) => args.split([',', ')']).next().unwrap_or_default(),
        None => expr,
    };
    // Drop strings, label matchers and ranges.
    let mut plain = Vec::new();
    let (mut braces, mut brackets, mut quote) = (0, 0, None);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{') => braces += 1,
            (None, '}') => braces -= 1,
            (None, '[') => brackets += 1,
            (None, ']') => brackets -= 1,
            (None, c) if braces == 0 && brackets == 0 => plain.push(c),
            _ => {}
        }
    }
    let next_non_space = |from: usize| {
        plain[from..]
            .iter()
            .position(|c| !c.is_whitespace())
            .map(|p| from + p)
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < plain.len() {
        let c = plain[i];
        if c.is_ascii_digit() || c == '.' {
            // A number such as 0.95 or 1e3: skip it whole.
            while i < plain.len() && (plain[i].is_ascii_alphanumeric() || plain[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || matches!(c, '_' | ':' | '$')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < plain.len()
            && (plain[i].is_ascii_alphanumeric() || matches!(plain[i], '_' | ':' | '$'))
        {
            i += 1;
        }
        let word: String = plain[start..i].iter().collect();
        let open = next_non_space(i).filter(|&j| plain[j] == '(');
        if LABEL_LISTS.contains(&word.as_str()) {
            if let Some(j) = open {
                i = plain[j..]
                    .iter()
                    .position(|&c| c == ')')
                    .map_or(plain.len(), |p| j + p + 1);
            }
        } else if !(word.starts_with('$')
            || KEYWORDS.contains(&word.as_str())
            || FUNCTIONS.contains(&word.as_str()))
        {
            assert!(open.is_none(), "unknown PromQL function {word} in {expr}");
            names.push(word);
        }
    }
    names
}

fn strip_histogram_suffix(metric: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| metric.strip_suffix(s))
        .unwrap_or(metric)
}

/// The metric names of README's Metrics table.
fn readme_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let known: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `clawfleet_"))
        .filter_map(|l| l.split('`').next())
        .map(|name| format!("clawfleet_{name}"))
        .collect();
    assert!(known.len() > 20, "README's metric table: {known:?}");
    known
}

#[test]
fn metric_names_reads_metrics_but_not_functions_labels_or_variables() {
    assert_eq!(
        metric_names(
            r#"sum by (job, instance) (rate(clawfleet_reconcile_total{result="error"}[5m])) / on (job) sum without(result) (rate(clawfleet_reconcile_total[$__rate_interval])) > 0.1"#
        ),
        ["clawfleet_reconcile_total", "clawfleet_reconcile_total"]
    );
    assert_eq!(
        metric_names(
            "time() - clawfleet_last_full_resync_timestamp_seconds{job=~\"$job\"} > 3 * 300 or up == 0"
        ),
        ["clawfleet_last_full_resync_timestamp_seconds", "up"]
    );
    assert_eq!(
        metric_names(
            "histogram_quantile(0.95, sum by (le) (rate(clawfleet_container_start_duration_seconds_bucket[10m]))) > 1e3"
        ),
        ["clawfleet_container_start_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names(r#"label_values(clawfleet_build_info{job=~"$job"}, instance)"#),
        ["clawfleet_build_info"]
    );
}

#[test]
#[should_panic(expected = "unknown PromQL function")]
fn metric_names_refuses_a_call_of_an_unknown_function() {
    metric_names("histogram_quantil(0.5, clawfleet_reconcile_duration_seconds_bucket)");
}
