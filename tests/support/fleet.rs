//! What a fixture's fleet looks like, on the engine and in `container_status`,
//! checked against what a test wants of each user: the end state the chaos
//! tests demand once the chaos is over ("nothing is lost").
//!
//! Converged means, for every user the test knows of:
//! - wanted running: status `running` and healthy, and exactly one container,
//!   named `<prefix><user>`, labelled for the user, running, with the id the
//!   status names;
//! - wanted stopped: status `stopped` or `idle`, and at most one container of
//!   that name (none if it never ran), not running;
//! - deleted: no status row and no container;
//!
//! and nothing else: no other container labelled with the fixture's instance,
//! no other container whose name starts with its prefix (a `-next` left over
//! from a recreate), and no two status rows with one port.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clawfleet::naming::container_name;
use clawfleet::status::{ContainerStatus, Health, Phase};
use clawfleet::store::Store;

use super::controller::gateway;
use super::docker::{docker, DockerFixture};

/// What a test wants of one user at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A running, healthy container.
    Running,
    /// A stopped container (or none, if it never ran).
    Stopped,
    /// The row was deleted: no container, no status row.
    Deleted,
}

/// One container on the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineContainer {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// Docker's state: `created`, `running`, `exited`, ...
    pub state: String,
    /// The `io.clawfleet.user-id` label (empty when missing).
    pub user: String,
}

/// Every container a fixture could own: labelled with its `instance`, or
/// named with its `prefix` (deduplicated by id).
pub fn engine_containers(instance: &str, prefix: &str) -> Result<Vec<EngineContainer>, String> {
    const FORMAT: &str = "{{.ID}}\t{{.Names}}\t{{.State}}\t{{.Label \"io.clawfleet.user-id\"}}";
    let parse = |out: String| -> Vec<EngineContainer> {
        out.lines()
            .filter_map(|line| {
                let mut parts = line.split('\t');
                Some(EngineContainer {
                    id: parts.next()?.to_owned(),
                    name: parts.next()?.to_owned(),
                    state: parts.next()?.to_owned(),
                    user: parts.next().unwrap_or("").to_owned(),
                })
            })
            .collect()
    };
    let label = format!("label=io.clawfleet.instance={instance}");
    let mut all = parse(docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &label,
        "--format",
        FORMAT,
    ])?);
    // The CLI's name filter matches substrings: keep only true prefixes.
    let name = format!("name={prefix}");
    let named = parse(docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &name,
        "--format",
        FORMAT,
    ])?);
    for c in named {
        if c.name.starts_with(prefix) && !all.iter().any(|a| a.id == c.id) {
            all.push(c);
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// Why the fleet is not converged to `want` yet (`Ok` when it is).
pub async fn check_converged(
    fx: &DockerFixture,
    store: &Store,
    want: &BTreeMap<String, Want>,
) -> Result<(), String> {
    let statuses: HashMap<String, ContainerStatus> = store
        .status_all()
        .await
        .map_err(|e| format!("status rows unreadable: {e}"))?
        .into_iter()
        .map(|s| (s.user_id.clone(), s))
        .collect();
    // The revision each user's row is at: converged means acted on it (a
    // running container of an older revision, before its recreate, is not).
    let revisions: HashMap<String, i64> = store
        .desired_all()
        .await
        .map_err(|e| format!("desired rows unreadable: {e}"))?
        .into_iter()
        .map(|row| match row {
            Ok(d) => (d.user_id, d.revision),
            Err(invalid) => (invalid.user_id, invalid.revision),
        })
        .collect();
    let acted_on_its_row = |user: &str, s: &ContainerStatus| match revisions.get(user) {
        Some(&revision) if s.observed_revision != Some(revision) => Err(format!(
            "{user:?}: row at revision {revision}, status observed {:?}",
            s.observed_revision
        )),
        _ => Ok(()),
    };
    // Off the runtime's threads: a test's proxies forward on them meanwhile.
    let (instance, prefix) = (fx.instance.clone(), fx.prefix.clone());
    let engine = tokio::task::spawn_blocking(move || engine_containers(&instance, &prefix))
        .await
        .map_err(|e| e.to_string())??;
    let mut expected_names = BTreeMap::new();
    for (user, wanted) in want {
        let name = container_name(&fx.prefix, user);
        let on_engine: Vec<&EngineContainer> = engine.iter().filter(|c| c.name == name).collect();
        let status = statuses.get(user);
        match wanted {
            Want::Running => {
                let s = status.ok_or_else(|| format!("{user:?}: no status row"))?;
                acted_on_its_row(user, s)?;
                if s.phase != Phase::Running || s.health != Some(Health::Healthy) {
                    return Err(format!(
                        "{user:?}: phase {} health {:?} message {:?}",
                        s.phase, s.health, s.message
                    ));
                }
                if s.container_name.as_deref() != Some(name.as_str()) {
                    return Err(format!("{user:?}: status names {:?}", s.container_name));
                }
                let [c] = on_engine.as_slice() else {
                    return Err(format!(
                        "{user:?}: {} containers named {name}",
                        on_engine.len()
                    ));
                };
                if c.state != "running" || c.user != *user {
                    return Err(format!("{user:?}: container {c:?}"));
                }
                if s.container_id.as_deref() != Some(c.id.as_str()) {
                    return Err(format!(
                        "{user:?}: status id {:?}, engine id {}",
                        s.container_id, c.id
                    ));
                }
                expected_names.insert(name, user.clone());
            }
            Want::Stopped => {
                let s = status.ok_or_else(|| format!("{user:?}: no status row"))?;
                acted_on_its_row(user, s)?;
                if !matches!(s.phase, Phase::Stopped | Phase::Idle) {
                    return Err(format!(
                        "{user:?}: phase {} (wanted stopped) message {:?}",
                        s.phase, s.message
                    ));
                }
                match on_engine.as_slice() {
                    [] => {}
                    [c] if c.state != "running" && c.user == *user => {
                        expected_names.insert(name, user.clone());
                    }
                    more => return Err(format!("{user:?}: wanted stopped, engine has {more:?}")),
                }
            }
            Want::Deleted => {
                if let Some(s) = status {
                    return Err(format!("{user:?}: deleted but has status {}", s.phase));
                }
                if !on_engine.is_empty() {
                    return Err(format!("{user:?}: deleted but engine has {on_engine:?}"));
                }
            }
        }
    }
    for c in &engine {
        match expected_names.get(&c.name) {
            Some(user) if *user == c.user => {}
            _ => return Err(format!("container no user claims: {c:?}")),
        }
    }
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    for s in statuses.values() {
        if let Some(port) = s.host_port {
            if let Some(other) = ports.insert(port, &s.user_id) {
                return Err(format!("port {port} held by {other:?} and {:?}", s.user_id));
            }
        }
    }
    Ok(())
}

/// Waits until the fleet converges to `want`; how long it took. Panics after
/// `deadline` with the last reason it was not converged.
pub async fn wait_converged(
    fx: &DockerFixture,
    store: &Store,
    want: &BTreeMap<String, Want>,
    deadline: Duration,
) -> Duration {
    let start = Instant::now();
    let mut last;
    loop {
        match check_converged(fx, store, want).await {
            Ok(()) => return start.elapsed(),
            Err(reason) => last = reason,
        }
        assert!(
            start.elapsed() < deadline,
            "not converged after {deadline:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The samples of a controller's `/metrics`: `name{labels}` → value (empty
/// when the listener does not answer).
pub fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (_, text) = gateway(addr.port(), "GET", "/metrics", None).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` (all label combinations).
pub fn total(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(key, _)| {
            key.strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, value)| value)
        .sum()
}
