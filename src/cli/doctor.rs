//! `clawfleet doctor`: checks everything `clawfleet run` needs, one line
//! each: ✓ passed, ⚠ a warning (an optional feature off, or something `run`
//! creates itself on its first start) and ✗ a failure, with a hint on ⚠ and ✗.
//! Exits 0 unless a check failed (`--strict`: or warned).
//! It creates nothing: no database file, no migration, no key, no network (an
//! image may be pulled, since "pullable" can only be known by pulling).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use super::{Backend, CliError, GlobalArgs};
use crate::config::{ContainerSettings, API_TOKEN_ENV, ENCRYPTION_KEYS_ENV};
use crate::docker::{DockerEngine, Engine, SwarmEngine};
use crate::image_ref::ImageRef;
use crate::isolation::NetworkIsolation;
use crate::secrets::{KeyRing, KeySource, SealedHeader, KEY_FILE_NAME};
use crate::store::{is_postgres_url, redact_url, sqlite_file, Store};

/// How long each check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// Worth a look, no reason to fail (unless `--strict`).
    Warn,
    Fail,
}

/// One check's verdict.
struct Check {
    verdict: Verdict,
    what: String,
    hint: Option<String>,
}

impl Check {
    fn pass(what: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Pass,
            what: what.into(),
            hint: None,
        }
    }

    fn warn(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Warn,
            what: what.into(),
            hint: Some(hint.into()),
        }
    }

    fn fail(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Fail,
            what: what.into(),
            hint: Some(hint.into()),
        }
    }

    fn line(&self) -> String {
        let mark = match self.verdict {
            Verdict::Pass => "✓",
            Verdict::Warn => "⚠",
            Verdict::Fail => "✗",
        };
        match &self.hint {
            None => format!("{mark} {}", self.what),
            Some(hint) => format!("{mark} {} — {hint}", self.what),
        }
    }
}

/// Opens every stored token (`(user id, sealed)`) and says which key id, in
/// which format, sealed how many; tokens no key opens fail the check by
/// count, never shown.
fn token_check(ring: &KeyRing, source: &KeySource, sealed: &[(String, String)]) -> Check {
    let mut opened: HashMap<(&str, &str), usize> = HashMap::new();
    let mut failures = 0;
    for (user_id, token) in sealed {
        match (ring.open(user_id, token), SealedHeader::parse(token)) {
            (Ok(_), Ok(header)) => *opened.entry((header.key_id, header.version)).or_default() += 1,
            _ => failures += 1,
        }
    }
    // Sealing key first, the current format before the earlier one.
    let shares: Vec<String> = ring
        .key_ids()
        .into_iter()
        .flat_map(|id| ["v2", "v1"].map(|version| (id, version)))
        .filter_map(|share| {
            Some(format!(
                "{}: {} ({})",
                share.0,
                opened.get(&share)?,
                share.1
            ))
        })
        .collect();
    let total = sealed.len();
    let shares = shares.join(", ");
    if failures == 0 {
        let colon = if shares.is_empty() { "" } else { ": " };
        Check::pass(format!(
            "encryption keys from {source} ({} key(s)); {total} stored token(s) open{colon}{shares}",
            ring.key_ids().len(),
        ))
    } else {
        let open = if shares.is_empty() {
            String::new()
        } else {
            format!("; open: {shares}")
        };
        Check::fail(
            format!("encryption keys from {source}: {failures} of {total} stored token(s) do not open{open}"),
            format!("a key that sealed them is missing: add it back to {ENCRYPTION_KEYS_ENV} (after the sealing key); a token copied from another user's row never opens"),
        )
    }
}

/// True for a `Config.User` that means root: empty, `0`, `root`, or those with group `0`/`root`.
fn runs_as_root(user: &str) -> bool {
    let name = user.split(':').next().unwrap_or_default().trim();
    name.is_empty() || name == "0" || name == "root"
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CHECK_TIMEOUT, future).await.ok()
}

/// Before a takeover (README "Taking over from the original service"): the
/// unlabelled `<prefix>*` containers and their volumes, and how many of
/// their users have a desired row; `None` when there is no such container
/// (or the engine did not list them: its own check says why).
async fn takeover_check(
    engine: &DockerEngine,
    prefix: &str,
    store: Option<&Store>,
) -> Option<Check> {
    let listed = within(engine.list_by_name_prefix(prefix)).await?.ok()?;
    let (rows, skipped) = super::import::engine_rows(prefix, listed, chrono::Utc::now());
    let containers = rows.len() + skipped.len();
    if containers == 0 {
        return None;
    }
    let mut volumes = 0;
    for row in &rows {
        let volume = crate::naming::volume_name(prefix, &row.user_id);
        if let Some(Ok(Some(labels))) = within(engine.inspect_volume(&volume)).await {
            volumes += usize::from(!labels.contains_key(crate::docker::LABEL_MANAGED));
        }
    }
    let ids: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
    let mut with_row = 0;
    if let Some(store) = store {
        for chunk in ids.chunks(500) {
            with_row += store.desired_of(chunk).await.map_or(0, |rows| rows.len());
        }
    }
    let mut what = format!(
        "{containers} unlabelled {prefix}* container(s) and {volumes} unlabelled volume(s) of theirs to take over; {with_row} of {} user(s) have a desired row",
        ids.len()
    );
    if !skipped.is_empty() {
        what.push_str(&format!("; {} name(s) give no user id back", skipped.len()));
    }
    Some(if with_row == ids.len() && skipped.is_empty() {
        Check::pass(what)
    } else {
        Check::warn(what, "write their rows with `clawfleet import engine` (or `clawfleet import table` from the original service's table) before `clawfleet run`")
    })
}

/// Runs every check, prints one line each, and fails when any fails (with
/// `strict`, also when any warns).
pub async fn doctor(
    global: &GlobalArgs,
    image: Option<ImageRef>,
    strict: bool,
) -> Result<(), CliError> {
    let settings = global.container_settings(image)?;
    let mut checks = Vec::new();

    let engine = match within(DockerEngine::connect(&global.docker_host)).await {
        Some(Ok(engine)) => match within(engine.version()).await {
            Some(Ok(v)) => {
                checks.push(Check::pass(format!(
                    "docker engine {} reachable at {} (API {})",
                    v.version, global.docker_host, v.api_version
                )));
                Some(engine)
            }
            Some(Err(e)) => {
                checks.push(Check::fail(
                    format!("docker engine: {e}"),
                    "check DOCKER_HOST / --docker-host and that the daemon runs",
                ));
                None
            }
            None => {
                checks.push(Check::fail(
                    "docker engine did not answer within 10s",
                    "check DOCKER_HOST / --docker-host and that the daemon runs",
                ));
                None
            }
        },
        Some(Err(e)) => {
            checks.push(Check::fail(format!("docker engine: {e}"), "check DOCKER_HOST / --docker-host (unix:///var/run/docker.sock, tcp://host:2375, ...)"));
            None
        }
        None => {
            checks.push(Check::fail(
                "docker engine did not answer within 10s",
                "check DOCKER_HOST / --docker-host",
            ));
            None
        }
    };

    let shown_url = redact_url(&global.database_url);
    let absent_file = sqlite_file(&global.database_url).filter(|f| !f.exists());
    let store = if let Some(file) = &absent_file {
        // Connecting would create it: say what `run` will do instead.
        checks.push(Check::warn(
            format!("database file {} does not exist yet", file.display()),
            "`clawfleet run` creates it and applies the migrations on its first start",
        ));
        None
    } else {
        store_check(&mut checks, global, &shown_url).await
    };

    let key_file = global.data_dir.join(KEY_FILE_NAME);
    let keys_from_file = std::env::var(ENCRYPTION_KEYS_ENV).map_or(true, |v| v.trim().is_empty())
        && !is_postgres_url(&global.database_url);
    let stored_tokens = match &store {
        Some(store) => store.status_all().await.map_or(0, |rows| {
            rows.iter().filter(|r| r.gateway_token.is_some()).count()
        }),
        None => 0,
    };
    checks.push(match global.key_ring(false) {
        Err(_) if keys_from_file && !key_file.exists() && stored_tokens == 0 => Check::warn(
            format!("no key file {} yet", key_file.display()),
            format!("`clawfleet run` creates one on its first start (back it up), or set {ENCRYPTION_KEYS_ENV}"),
        ),
        Ok((ring, source)) => match &store {
            Some(store) => match store.status_all().await {
                Ok(rows) => {
                    let sealed: Vec<(String, String)> = rows
                        .into_iter()
                        .filter_map(|r| Some((r.user_id, r.gateway_token?)))
                        .collect();
                    token_check(&ring, &source, &sealed)
                }
                Err(e) => Check::fail(
                    format!("encryption keys from {source}: stored tokens not read: {e}"),
                    "fix the database first",
                ),
            },
            None => token_check(&ring, &source, &[]),
        },
        Err(e) => {
            let hint = if crate::store::is_postgres_url(&global.database_url) {
                format!("set the same {ENCRYPTION_KEYS_ENV} on every replica (`clawfleet keygen` makes a key); with stored tokens it must hold the key that sealed them")
            } else {
                format!("or let `clawfleet run` create the key file in --data-dir; with stored tokens, restore the key that sealed them into {ENCRYPTION_KEYS_ENV}")
            };
            Check::fail(format!("encryption keys: {e}"), hint)
        }
    });

    if let Some(engine) = &engine {
        let image = settings.image.as_str();
        match within(engine.image_present(image)).await {
            Some(Ok(true)) => checks.push(Check::pass(format!("image {image} present"))),
            Some(Ok(false)) => match within(engine.pull_image(image)).await {
                Some(Ok(())) => checks.push(Check::pass(format!("image {image} pulled"))),
                Some(Err(e)) => checks.push(Check::fail(
                    format!("image {image} missing and not pullable: {e}"),
                    "load the image (docker load) or set OPENCLAW_IMAGE / --image",
                )),
                None => checks.push(Check::fail(
                    format!("image {image}: pull did not finish within 10s"),
                    "pull it by hand with `docker pull`",
                )),
            },
            Some(Err(e)) => checks.push(Check::fail(
                format!("image {image}: {e}"),
                "check the engine",
            )),
            None => checks.push(Check::fail(
                format!("image {image}: no answer within 10s"),
                "check the engine",
            )),
        }
        if let Some(Ok(Some(user))) = within(engine.image_user(image)).await {
            if runs_as_root(&user) && settings.confinement.cap_add.is_empty() {
                checks.push(Check::warn(
                    format!("image {image} runs as root with every capability dropped: an entrypoint that chowns or switches user will fail"),
                    "give back what it needs with CLAWFLEET_CAP_ADD (e.g. CHOWN,SETUID,SETGID,DAC_OVERRIDE,FOWNER), or use an image with a non-root USER",
                ));
            }
        }
        let isolation = settings.network_isolation;
        match within(engine.inspect_network(&settings.network)).await {
            Some(Ok(Some(network))) => match isolation.mismatch(&settings.network, &network) {
                None => checks.push(Check::pass(format!(
                    "network {} present ({}), {}",
                    settings.network,
                    &network.id[..network.id.len().min(12)],
                    isolation.as_str()
                ))),
                Some(mismatch) => checks.push(Check::fail(mismatch.reason(), mismatch.to_string())),
            },
            Some(Ok(None)) => checks.push(Check::pass(format!(
                "network {} absent; it will be created on first use ({})",
                settings.network,
                isolation.as_str()
            ))),
            Some(Err(e)) => checks.push(Check::fail(
                format!("network {}: {e}", settings.network),
                "check the engine",
            )),
            None => checks.push(Check::fail(
                format!("network {}: no answer within 10s", settings.network),
                "check the engine",
            )),
        }
        if global.backend == Backend::Swarm {
            swarm_checks(&mut checks, engine, global, &settings).await;
        }
        if let Some(check) = takeover_check(engine, &global.name_prefix, store.as_ref()).await {
            checks.push(check);
        }
    } else {
        checks.push(Check::fail(
            "image and network: not checked",
            "fix the docker engine first",
        ));
    }

    let ours: Vec<u16> = match &store {
        Some(store) => store.ports_in_use().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let foreign: Vec<u16> = settings
        .port_range
        .iter()
        .filter(|p| !ours.contains(p))
        .filter(|p| {
            matches!(
                TcpListener::bind(SocketAddr::new(settings.publish_ip, *p)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
            )
        })
        .collect();
    if foreign.is_empty() {
        checks.push(Check::pass(format!(
            "port range {} on {}: {} free, {} held by users",
            settings.port_range,
            settings.publish_ip,
            settings.port_range.len() - ours.len(),
            ours.len()
        )));
    } else {
        let shown: Vec<String> = foreign.iter().take(5).map(u16::to_string).collect();
        checks.push(Check::fail(
            format!("port range {}: {} port(s) held by other processes ({}{})", settings.port_range, foreign.len(), shown.join(", "), if foreign.len() > 5 { ", …" } else { "" }),
            "clawfleet steps over them, but move --port-range / CLAWFLEET_PORT_RANGE away from other services",
        ));
    }

    match std::env::var(API_TOKEN_ENV) {
        Ok(t) if t.trim().len() >= 16 => checks.push(Check::pass("API token set")),
        Ok(t) if !t.trim().is_empty() => checks.push(Check::fail(
            "API token shorter than 16 characters",
            format!("use a long random {API_TOKEN_ENV}, e.g. `openssl rand -hex 32`"),
        )),
        _ => checks.push(Check::warn(
            "API token not set: the JSON API is off",
            format!("set {API_TOKEN_ENV} to enable it"),
        )),
    }

    for check in &checks {
        println!("{}", check.line());
    }
    let count = |v: Verdict| checks.iter().filter(|c| c.verdict == v).count();
    let (passed, warned, failed) = (
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail),
    );
    if failed > 0 || (strict && warned > 0) {
        let strict_note = if strict && warned > 0 {
            format!("; {warned} warning(s), failures with --strict")
        } else {
            String::new()
        };
        return Err(CliError::Config(format!(
            "{failed} of {} checks failed{strict_note}",
            checks.len()
        )));
    }
    match warned {
        0 => println!("all {passed} checks passed"),
        n => println!("all {passed} checks passed, {n} warning(s) (⚠; --strict fails on them)"),
    }
    Ok(())
}

/// Connects to the database and checks its migrations.
/// The Swarm backend's checks (README "Running on Docker Swarm"): the
/// engine is a manager, some node can take a task, and the agents' network
/// is (or will be) an attachable overlay.
async fn swarm_checks(
    checks: &mut Vec<Check>,
    engine: &DockerEngine,
    global: &GlobalArgs,
    settings: &ContainerSettings,
) {
    let swarm = SwarmEngine::new(engine.clone(), global.swarm_options());
    match within(swarm.nodes()).await {
        Some(Ok(nodes)) => {
            let usable = nodes.iter().filter(|n| n.unusable().is_none()).count();
            let line = format!(
                "Swarm manager at {}: {} node(s), {usable} ready and active",
                global.docker_host,
                nodes.len()
            );
            if usable == 0 {
                checks.push(Check::fail(line, "no node can take a task: bring a node back or `docker node update --availability active`"));
            } else {
                checks.push(Check::pass(line));
            }
        }
        Some(Err(e)) => checks.push(Check::fail(
            format!("--backend swarm: {e}"),
            "point DOCKER_HOST at a Swarm manager, or make this engine one with `docker swarm init --advertise-addr <address>`",
        )),
        None => checks.push(Check::fail(
            "--backend swarm: the engine did not list nodes within 10s",
            "check the manager",
        )),
    }
    if settings.network_isolation == NetworkIsolation::Isolated {
        checks.push(Check::fail(
            "--network-isolation isolated is not possible on Swarm",
            "overlay networks cannot disable traffic between agents; use shared, and reach agents through host_url",
        ));
    }
    if let Some(Ok(Some(network))) = within(engine.inspect_network(&settings.network)).await {
        if network.driver != "overlay" || !network.attachable {
            checks.push(Check::fail(
                format!(
                    "network {} is a{} {} network; the Swarm backend needs an attachable overlay",
                    settings.network,
                    if network.attachable { "n attachable" } else { " non-attachable" },
                    network.driver
                ),
                "remove it (after its containers) so clawfleet creates it, or pick another --network",
            ));
        } else {
            checks.push(Check::pass(format!(
                "network {} is an attachable overlay",
                settings.network
            )));
        }
    }
}

async fn store_check(
    checks: &mut Vec<Check>,
    global: &GlobalArgs,
    shown_url: &str,
) -> Option<Store> {
    match within(Store::connect(&global.database_url)).await {
        Some(Ok(store)) => match store.pending_migrations().await {
            Ok(pending) if pending.is_empty() => {
                checks.push(Check::pass(format!(
                    "database {shown_url} reachable, migrations current"
                )));
                Some(store)
            }
            Ok(pending) => {
                checks.push(Check::warn(
                    format!(
                        "database {shown_url} reachable, {} migration(s) pending",
                        pending.len()
                    ),
                    "`clawfleet run` applies them when it starts (or run `clawfleet migrate`)",
                ));
                Some(store)
            }
            Err(e) => {
                checks.push(Check::fail(
                    format!("database {shown_url}: {e}"),
                    "check the database user's rights",
                ));
                None
            }
        },
        Some(Err(e)) => {
            checks.push(Check::fail(
                format!("database: {e}"),
                "check DATABASE_URL / --database-url and that the server runs",
            ));
            None
        }
        None => {
            checks.push(Check::fail(
                format!("database {shown_url} did not answer within 10s"),
                "check DATABASE_URL / --database-url",
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_an_empty_user_uid_0_or_root_with_any_group() {
        for root in ["", "0", "0:0", "root", "root:root", "0:1000"] {
            assert!(runs_as_root(root), "{root:?}");
        }
        for other in ["node", "1000", "1000:0", "65532:65532"] {
            assert!(!runs_as_root(other), "{other:?}");
        }
    }
}
