//! SIGKILL at random moments: the controller killed while fifty users converge loses nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::controller::{port_range, token_of, ControllerConfig, ControllerProcess};
use crate::support::docker::{eventually, volume_exists, DockerFixture};
use crate::support::fleet::{wait_converged, Want};
use crate::support::{Backend, TestDb};
use clawfleet::naming::volume_name;
use clawfleet::status::Phase;
use rand::seq::IndexedRandom;
use rand::Rng;

use crate::harness::*;

/// When a round kills the controller.
#[derive(Clone, Copy, Debug)]
enum KillMoment {
    /// This long after it became leader (zero: during the first full sync).
    After(Duration),
    /// Right after it logged this many more "creating container" lines.
    AfterCreates(usize),
    /// A random jitter after it started a recreate or a removal.
    MidRecreate(Duration),
}

/// Waits until `controller` logs `more` lines containing any of `needles`
/// (beyond those logged so far); false when `max` passes first.
async fn wait_for_lines(
    controller: &ControllerProcess,
    needles: &[&str],
    more: usize,
    max: Duration,
) -> bool {
    let base = count_lines(&controller.log(), needles);
    let until = Instant::now() + max;
    while Instant::now() < until {
        if count_lines(&controller.log(), needles) >= base + more {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_at_random_moments_while_fifty_users_converge_lose_nothing() {
    let mut rng = chaos_rng("sigkill");
    let rounds: usize = env_or("CHAOS_ROUNDS", 5);
    let n: usize = env_or("CHAOS_USERS", 50).max(4);
    // PostgreSQL (the SQLite variant lives in tests/reconciler.rs): a killed
    // leader's lease must expire before the restarted process may act, so
    // some kills land on a standby still waiting, others mid-sync.
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-kill");
    let (start, end) = port_range(u16::try_from(2 * n).unwrap_or(400).max(200));
    let config = ControllerConfig::new(&db, &fx)
        .with("CLAWFLEET_LEASE_TTL", "3s")
        .with("CLAWFLEET_CONCURRENCY", "8")
        .with("CLAWFLEET_PORT_RANGE", &format!("{start}-{end}"));

    // Two ids that need escaping, so a half-made container of an escaped
    // name must be recognised after a crash too.
    let mut users: Vec<String> = (0..n - 2).map(|i| format!("k{i}")).collect();
    users.push("Chaos.User@Example.com".to_owned());
    users.push("chaos user/two".to_owned());
    let mut want: BTreeMap<String, Want> =
        users.iter().map(|u| (u.clone(), Want::Running)).collect();
    insert_users(&db, &users).await;

    // What must never change once seen: a user's token (until its row is
    // deleted) and its boot count (never goes back: the volume survives).
    let mut tokens: HashMap<String, String> = HashMap::new();
    let mut boots: HashMap<String, u64> = HashMap::new();
    let mut bumped_since_seen: HashSet<String> = HashSet::new();
    let mut had_container: HashSet<String> = HashSet::new();

    let chaos_start = Instant::now();
    for round in 0..rounds {
        let mut controller = ControllerProcess::start(&config);
        let started = Instant::now();
        eventually(LONG, "the restarted controller to lead", || async {
            controller.log().contains("became leader").then_some(())
        })
        .await;
        let led_after = started.elapsed();
        let moment = match rng.random_range(0..4) {
            0 => KillMoment::After(Duration::ZERO),
            1 => KillMoment::After(Duration::from_millis(rng.random_range(100..4000))),
            2 => KillMoment::AfterCreates(rng.random_range(1..12)),
            _ => KillMoment::MidRecreate(Duration::from_millis(rng.random_range(0..400))),
        };
        let hit = match moment {
            KillMoment::After(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            KillMoment::AfterCreates(k) => {
                wait_for_lines(
                    &controller,
                    &["creating container"],
                    k,
                    Duration::from_secs(5),
                )
                .await
            }
            KillMoment::MidRecreate(jitter) => {
                let hit = wait_for_lines(
                    &controller,
                    &[
                        "recreating container",
                        "finishing an interrupted recreate",
                        "removing container",
                    ],
                    1,
                    Duration::from_secs(5),
                )
                .await;
                tokio::time::sleep(jitter).await;
                hit
            }
        };
        assert_alive(&mut controller, "before its SIGKILL");
        controller.kill9();

        // The controller is dead; its containers live on. Look at them.
        let rows = statuses(&store).await;
        let containers = on_engine(&fx).await;
        for c in &containers {
            had_container.insert(c.user.clone());
        }
        for (user, status) in &rows {
            // A deleted user's status row stays until the controller gets to
            // the deletion; its token is not the user's any more: re-inserted,
            // the user is new, with a new token (README "container_status").
            if status.gateway_token.is_none() || want.get(user) == Some(&Want::Deleted) {
                continue;
            }
            let token = token_of(status);
            let first = tokens.entry(user.clone()).or_insert_with(|| token.clone());
            assert_eq!(
                *first, token,
                "{user:?}: its gateway token changed (round {round})"
            );
            if status.phase == Phase::Running {
                if let Ok((agent, count)) = ask_whoami(status).await {
                    if agent == *user {
                        let before = boots.insert(user.clone(), count).unwrap_or(0);
                        assert!(
                            count >= before,
                            "{user:?}: boot count went from {before} to {count}: its volume was lost"
                        );
                        bumped_since_seen.remove(user);
                    }
                }
            }
        }
        eprintln!(
            "round {round}: led after {led_after:?}, killed {:?} later ({moment:?}, reached: {hit}); {} containers, {} status rows",
            started.elapsed() - led_after,
            containers.len(),
            rows.len()
        );

        // Between lives: recreates, deletions, re-insertions, stops and starts.
        let running: Vec<String> = want
            .iter()
            .filter(|(_, w)| **w == Want::Running)
            .map(|(u, _)| u.clone())
            .collect();
        let how_many = rng.random_range(1..=3);
        let bump: Vec<String> = running
            .choose_multiple(&mut rng, how_many)
            .cloned()
            .collect();
        let mut changes = vec![format!("nonce+1 {bump:?}")];
        db.exec(&format!(
            "UPDATE desired_containers SET restart_nonce = restart_nonce + 1 WHERE user_id IN ({})",
            sql_list(&bump)
        ))
        .await;
        bumped_since_seen.extend(bump.iter().cloned());
        let alive: Vec<String> = want
            .iter()
            .filter(|(u, w)| **w != Want::Deleted && !bump.contains(u))
            .map(|(u, _)| u.clone())
            .collect();
        if rng.random_bool(0.7) {
            if let Some(user) = alive.choose(&mut rng) {
                db.exec(&format!(
                    "DELETE FROM desired_containers WHERE user_id = '{user}'"
                ))
                .await;
                want.insert(user.clone(), Want::Deleted);
                tokens.remove(user);
                changes.push(format!("delete {user:?}"));
            }
        }
        let deleted: Vec<String> = want
            .iter()
            .filter(|(_, w)| **w == Want::Deleted)
            .map(|(u, _)| u.clone())
            .collect();
        if rng.random_bool(0.4) {
            if let Some(user) = deleted.choose(&mut rng) {
                insert_users(&db, std::slice::from_ref(user)).await;
                want.insert(user.clone(), Want::Running);
                // New or kept, whichever the controller saw first.
                tokens.remove(user);
                changes.push(format!("re-insert {user:?}"));
            }
        }
        let flip: Vec<String> = want
            .iter()
            .filter(|(u, w)| **w != Want::Deleted && !bump.contains(u))
            .map(|(u, _)| u.clone())
            .collect();
        if rng.random_bool(0.5) {
            if let Some(user) = flip.choose(&mut rng) {
                let to = if want[user] == Want::Running {
                    Want::Stopped
                } else {
                    Want::Running
                };
                let state = if to == Want::Running {
                    "running"
                } else {
                    "stopped"
                };
                db.exec(&format!(
                    "UPDATE desired_containers SET state = '{state}' WHERE user_id = '{user}'"
                ))
                .await;
                want.insert(user.clone(), to);
                changes.push(format!("{state} {user:?}"));
            }
        }
        eprintln!("round {round}: {}", changes.join(", "));
    }

    let mut controller = ControllerProcess::start(&config);
    let restarted = Instant::now();
    let took = wait_converged(&fx, &store, &want, LONG).await;
    eprintln!(
        "sigkill: {rounds} kills over {:?}; converged {took:?} after the last restart ({:?} in all); {} running, {} stopped, {} deleted",
        restarted - chaos_start,
        chaos_start.elapsed(),
        want.values().filter(|w| **w == Want::Running).count(),
        want.values().filter(|w| **w == Want::Stopped).count(),
        want.values().filter(|w| **w == Want::Deleted).count(),
    );
    let seen = seen_all(&store, &want).await;
    for (user, now) in &seen {
        if let Some(first) = tokens.get(user) {
            assert_eq!(*first, now.token, "{user:?}: its gateway token changed");
        }
        if let Some(before) = boots.get(user) {
            let at_least = before + u64::from(bumped_since_seen.contains(user));
            assert!(
                now.boots >= at_least,
                "{user:?}: {} boots, expected at least {at_least}: its volume was lost or its recreate skipped",
                now.boots
            );
        }
    }
    for (user, wanted) in &want {
        if *wanted == Want::Deleted && had_container.contains(user) {
            assert!(
                volume_exists(&volume_name(&fx.prefix, user)),
                "{user:?}: its volume went with its row"
            );
        }
    }
    log_summary("sigkill", &controller);
    assert_alive(&mut controller, "after converging");
}
