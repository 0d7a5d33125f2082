//! The spec hash of the builds before hashes were versioned, frozen.
//!
//! Containers made by those builds carry this hash, unversioned, in their
//! `io.clawfleet.spec-hash` label. Such a container is current while this
//! function of today's desired spec still gives its label, so upgrading
//! recreates no container; any real change (image, restart nonce, limits,
//! ...) makes it differ, and the recreate labels the new container with the
//! versioned hash of [`super::SpecHash`] (README "Upgrade").
//!
//! Never change what this function hashes, and never let it gain a field:
//! its only job is to give, bit for bit, the value those builds wrote
//! (pinned by the test below). The exhaustive destructuring makes a new
//! [`ContainerSpec`] field a compile error here, so whoever adds one sees
//! that a legacy-labelled container would not notice a change of it; if
//! that matters, the new field's value must make [`super::SpecHash`] drop
//! the legacy hash, never be hashed here.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::docker::{Confinement, ContainerSpec, EnvValue, LogLimits, ResourceLimits};

/// The legacy hash of `template` (the container spec under its canonical
/// name, on the network by name) for a row with `restart_nonce`, published
/// on `publish_ip`.
pub(super) fn legacy_hash(
    template: &ContainerSpec,
    publish_ip: IpAddr,
    restart_nonce: i64,
) -> String {
    let ContainerSpec {
        name,
        image,
        env,
        // Labels were never hashed: they name the owner, which is the same
        // for every container a controller looks at.
        labels: _,
        volume,
        mount_path,
        network,
        publish,
        port,
        stop_timeout,
        limits,
        confinement,
        // A Swarm pin is never hashed: pinning recreates nothing.
        node: _,
    } = template;
    let ResourceLimits {
        memory_bytes,
        nano_cpus,
        pids,
    } = limits;
    let Confinement {
        drop_all_capabilities,
        cap_add,
        no_new_privileges,
        log,
    } = confinement;
    let mut hasher = Sha256::new();
    let mut field = |key: &str, value: &str| {
        // Length-prefixed so no two field lists hash alike.
        for part in [key, value] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    };
    field("version", "1");
    field("name", name);
    field("volume", volume);
    field("state_path", mount_path);
    field("image", image);
    field("network", network);
    field("gateway_port", &port.to_string());
    field("publish_ip", &publish_ip.to_string());
    field(
        "host_port",
        &publish.map_or(String::new(), |(_, p)| p.to_string()),
    );
    field("stop_timeout_s", &stop_timeout.as_secs().to_string());
    field("memory", &format!("{memory_bytes:?}"));
    field("nano_cpus", &format!("{nano_cpus:?}"));
    field("pids", &format!("{pids:?}"));
    field("cap_drop_all", &drop_all_capabilities.to_string());
    field("cap_add", &cap_add.join(","));
    field("no_new_privileges", &no_new_privileges.to_string());
    field(
        "log",
        &log.map_or(String::new(), |l: LogLimits| {
            format!("{}x{}", l.max_size(), l.max_files)
        }),
    );
    field("restart_nonce", &restart_nonce.to_string());
    // The old builds hashed the plain variables and then the secret names,
    // the order in which the container spec lists them.
    for (key, value) in env {
        match value {
            EnvValue::Plain(v) => field(key, v),
            EnvValue::Secret(_) => field(key, "<token>"),
        }
    }
    hex::encode(&hasher.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use crate::spec::tests::settings;
    use crate::spec::DesiredSpec;

    /// The label the builds before versioned hashes wrote for alice with the
    /// default settings, port 19000 and restart nonce 0.
    const LEGACY_ALICE: &str = "e9b4a1c80b5531f1";

    #[test]
    fn the_legacy_hash_is_the_value_the_builds_before_wrote() {
        let s = settings();
        let alice = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert!(alice.hash.is_current(Some(LEGACY_ALICE)));
        assert_ne!(alice.hash.label(), LEGACY_ALICE);
    }
}
