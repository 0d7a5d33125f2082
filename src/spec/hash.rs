//! The spec hash: which desired configuration a container was made from.
//!
//! It hashes the container spec itself ([`ContainerSpec`], serialized whole,
//! secrets as their placeholder) with the row's restart nonce, so a field
//! added to the spec is hashed without anyone having to list it. The spec
//! hashed is the one under the canonical name and on the network by name: a
//! replacement (`-next`) or a re-created network does not change it. The
//! label holds `v2:<16 hex>`; a label of the builds before, unversioned, is
//! honoured through [`super::legacy_hash`], so an upgrade recreates nothing
//! (README "Upgrade").

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::docker::ContainerSpec;

/// Prefix of the hashes of this version; a label without it is a legacy hash.
const VERSION_PREFIX: &str = "v2:";

/// What the `io.clawfleet.spec-hash` label of a container made from one
/// desired spec holds, and the legacy hash the same spec had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecHash {
    label: String,
    legacy: Option<String>,
}

impl SpecHash {
    /// The hash of `template` (the container spec under its canonical name,
    /// on the network by name) for a row with `restart_nonce`, accepting the
    /// unversioned `legacy` hash of the same spec.
    pub(super) fn of(template: &ContainerSpec, restart_nonce: i64, legacy: String) -> Self {
        Self {
            label: hash_of(template, restart_nonce),
            legacy: Some(legacy),
        }
    }

    /// A hash that only a container labelled `label` matches.
    pub fn exact(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            legacy: None,
        }
    }

    /// A hash matching `label` and the legacy hash `legacy`, for tests.
    #[cfg(test)]
    pub(crate) fn with_legacy(label: &str, legacy: &str) -> Self {
        Self {
            label: label.to_owned(),
            legacy: Some(legacy.to_owned()),
        }
    }

    /// The label value a container made now gets.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// True when a container labelled `label` was made from this spec, by
    /// this build or by one before hashes were versioned.
    pub fn is_current(&self, label: Option<&str>) -> bool {
        label.is_some_and(|l| l == self.label || self.legacy.as_deref() == Some(l))
    }
}

/// `v2:` and 16 hex digits of the SHA-256 of `template` and `restart_nonce`.
fn hash_of(template: &ContainerSpec, restart_nonce: i64) -> String {
    #[derive(Serialize)]
    struct Hashed<'a> {
        restart_nonce: i64,
        container: &'a ContainerSpec,
    }
    let hashed = Hashed {
        restart_nonce,
        container: template,
    };
    // Serializing fails only for maps without string keys, and a spec has none.
    let json = serde_json::to_vec(&hashed).expect("a container spec always serializes");
    format!(
        "{VERSION_PREFIX}{}",
        hex::encode(&Sha256::digest(json)[..8])
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::docker::{
        object_labels, Confinement, EnvValue, LogLimits, ResourceLimits, SecretString,
    };

    fn template() -> ContainerSpec {
        ContainerSpec {
            name: "mosaic-user-alice".into(),
            image: "alpine/openclaw:latest".into(),
            env: vec![
                ("AGENT_ID".into(), EnvValue::Plain("alice".into())),
                (
                    "AGENT_TOKEN".into(),
                    EnvValue::Secret(SecretString::new("")),
                ),
            ],
            labels: object_labels("default", "alice"),
            volume: "mosaic-user-alice-state".into(),
            mount_path: "/home/node/.openclaw".into(),
            network: "mosaic-internal".into(),
            port: 18789,
            publish: Some(("127.0.0.1".parse().unwrap(), 19000)),
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
            confinement: Confinement::strict(),
            node: None,
        }
    }

    #[test]
    fn a_change_to_any_field_of_the_container_spec_changes_the_hash() {
        let base = template();
        // Destructured without `..`: a field added to the spec fails to
        // compile here until it gets a case below.
        let ContainerSpec {
            name,
            image,
            env,
            labels,
            volume,
            mount_path,
            network,
            port,
            publish,
            stop_timeout,
            limits:
                ResourceLimits {
                    memory_bytes,
                    nano_cpus,
                    pids,
                },
            confinement:
                Confinement {
                    drop_all_capabilities,
                    cap_add,
                    no_new_privileges,
                    log,
                },
            node,
        } = base.clone();
        let with = |change: &dyn Fn(&mut ContainerSpec)| {
            let mut spec = base.clone();
            change(&mut spec);
            spec
        };
        let mut extra_label = labels.clone();
        extra_label.insert("io.clawfleet.extra".into(), "1".into());
        let cases: Vec<(&str, ContainerSpec)> = vec![
            ("name", with(&|s| s.name = format!("{name}x"))),
            ("image", with(&|s| s.image = format!("{image}x"))),
            (
                "env value",
                with(&|s| s.env[0].1 = EnvValue::Plain("bob".into())),
            ),
            ("env name", with(&|s| s.env[0].0 = format!("{}X", env[0].0))),
            ("env order", with(&|s| s.env.reverse())),
            (
                "env secret",
                with(&|s| s.env[0].1 = EnvValue::Secret(SecretString::new("alice"))),
            ),
            ("labels", with(&|s| s.labels = extra_label.clone())),
            ("volume", with(&|s| s.volume = format!("{volume}x"))),
            (
                "mount path",
                with(&|s| s.mount_path = format!("{mount_path}x")),
            ),
            ("network", with(&|s| s.network = format!("{network}x"))),
            ("port", with(&|s| s.port = port + 1)),
            (
                "publish port",
                with(&|s| s.publish = publish.map(|(ip, p)| (ip, p + 1))),
            ),
            (
                "publish ip",
                with(&|s| s.publish = Some(("::1".parse().unwrap(), 19000))),
            ),
            ("unpublished", with(&|s| s.publish = None)),
            (
                "stop timeout",
                with(&|s| s.stop_timeout = stop_timeout + Duration::from_millis(1)),
            ),
            (
                "memory",
                with(&|s| s.limits.memory_bytes = Some(memory_bytes.unwrap_or(0) + 1)),
            ),
            (
                "cpus",
                with(&|s| s.limits.nano_cpus = Some(nano_cpus.unwrap_or(0) + 1)),
            ),
            (
                "pids",
                with(&|s| s.limits.pids = Some(pids.unwrap_or(0) + 1)),
            ),
            (
                "cap drop",
                with(&|s| s.confinement.drop_all_capabilities = !drop_all_capabilities),
            ),
            (
                "cap add",
                with(&|s| s.confinement.cap_add = [cap_add.clone(), vec!["CHOWN".into()]].concat()),
            ),
            (
                "no new privileges",
                with(&|s| s.confinement.no_new_privileges = !no_new_privileges),
            ),
            ("log off", with(&|s| s.confinement.log = None)),
            (
                "log size",
                with(&|s| {
                    s.confinement.log = Some(LogLimits {
                        max_size_bytes: 1 << 20,
                        ..log.unwrap_or_default()
                    })
                }),
            ),
            (
                "log files",
                with(&|s| {
                    s.confinement.log = Some(LogLimits {
                        max_files: 9,
                        ..log.unwrap_or_default()
                    })
                }),
            ),
        ];
        let hash = hash_of(&base, 0);
        assert_ne!(hash, hash_of(&base, 1), "restart nonce");
        // The one field left out: a Swarm pin must never recreate a user.
        let pinned = with(&|s| s.node = Some(format!("{}n1", node.clone().unwrap_or_default())));
        assert_eq!(hash_of(&pinned, 0), hash, "the node pin is not hashed");
        for (field, changed) in cases {
            assert_ne!(changed, base, "{field}: the case changes nothing");
            assert_ne!(hash_of(&changed, 0), hash, "{field} escapes the hash");
        }
    }

    #[test]
    fn the_hash_is_versioned_and_never_depends_on_a_secret_value() {
        let base = template();
        let mut other = base.clone();
        other.env[1].1 = EnvValue::Secret(SecretString::new("another-token"));
        assert_eq!(hash_of(&base, 0), hash_of(&other, 0));
        let hash = hash_of(&base, 0);
        assert!(hash.starts_with("v2:"), "{hash}");
        assert_eq!(hash.len(), 3 + 16, "{hash}");
    }

    #[test]
    fn a_label_matches_the_versioned_hash_or_the_legacy_one_and_nothing_else() {
        let hash = SpecHash::of(&template(), 0, "0123456789abcdef".into());
        assert!(hash.is_current(Some(hash.label())));
        assert!(hash.is_current(Some("0123456789abcdef")));
        assert!(!hash.is_current(Some("fedcba9876543210")));
        assert!(!hash.is_current(Some("")));
        assert!(!hash.is_current(None));
        let exact = SpecHash::exact("h1");
        assert!(exact.is_current(Some("h1")));
        assert!(!exact.is_current(Some("")));
    }
}
