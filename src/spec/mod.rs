//! The container a user should have: its Docker spec and the hash that says
//! when an existing container no longer matches it.
//!
//! The hash ([`hash`]) is of the container spec itself and the restart nonce,
//! never the token: it is a label anyone can read. A container whose
//! `io.clawfleet.spec-hash` label is not current for [`DesiredSpec::hash`]
//! is recreated.

mod hash;
mod legacy_hash;

use std::collections::BTreeMap;

pub use hash::SpecHash;

use crate::config::ContainerSettings;
use crate::docker::{object_labels, ContainerSpec, EnvValue, SecretString, LABEL_SPEC_HASH};
use crate::image_ref::ImageRef;
use crate::naming::UserNames;
use crate::secrets::GatewayToken;

/// The gateway's port inside the container.
pub const GATEWAY_PORT: u16 = 18789;
/// Where the state volume is mounted.
pub const STATE_PATH: &str = "/home/node/.openclaw";

/// Everything that decides one user's container, except its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSpec {
    /// The user.
    pub user_id: String,
    /// Container name.
    pub name: String,
    /// State volume name.
    pub volume: String,
    /// Image to run.
    pub image: ImageRef,
    /// Host port the gateway is published on (none until allocated).
    pub host_port: Option<u16>,
    /// The row's restart nonce.
    pub restart_nonce: i64,
    /// Hash of the container spec all of the above and the settings make.
    pub hash: SpecHash,
    /// The cluster node holding the user's volume, once known (the Swarm
    /// backend pins the user there); never part of the hash.
    pub node: Option<String>,
}

impl DesiredSpec {
    /// The spec of `user_id` under `settings`, with the names a user gets today.
    pub fn new(
        settings: &ContainerSettings,
        user_id: &str,
        image: &ImageRef,
        restart_nonce: i64,
        host_port: Option<u16>,
    ) -> Self {
        let names = UserNames::current(&settings.name_prefix, user_id);
        Self::named(settings, &names, user_id, image, restart_nonce, host_port)
    }

    /// The spec of `user_id` under `settings`, with the container and
    /// volume names `names` (a user's earlier names are kept, see
    /// [`UserNames::resolve`]).
    pub fn named(
        settings: &ContainerSettings,
        names: &UserNames,
        user_id: &str,
        image: &ImageRef,
        restart_nonce: i64,
        host_port: Option<u16>,
    ) -> Self {
        let mut spec = Self {
            user_id: user_id.to_owned(),
            name: names.container.clone(),
            volume: names.volume.clone(),
            image: image.clone(),
            host_port,
            restart_nonce,
            hash: SpecHash::exact(String::new()),
            node: None,
        };
        // The placeholder secret is never hashed: secrets hash as a marker.
        let template = spec.unlabelled_spec(
            settings,
            SecretString::new(""),
            &spec.name,
            &settings.network,
        );
        let legacy = legacy_hash::legacy_hash(&template, settings.publish_ip, restart_nonce);
        spec.hash = SpecHash::of(&template, restart_nonce, legacy);
        spec
    }

    /// The name a replacement container takes while a recreate is under way
    /// ([`crate::naming::replacement_name`]).
    pub fn replacement_name(&self) -> String {
        crate::naming::replacement_name(&self.name)
    }

    /// `http://<container name>:18789`, the gateway on the agents' network.
    pub fn url(&self) -> String {
        format!("http://{}:{GATEWAY_PORT}", self.name)
    }

    /// `http://<publish ip>:<host port>`, the gateway from the host.
    pub fn host_url(&self, settings: &ContainerSettings) -> Option<String> {
        let port = self.host_port?;
        Some(match settings.publish_ip {
            std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
            ip => format!("http://{ip}:{port}"),
        })
    }

    /// The Docker spec to create this container under `name` on `network`
    /// (a network id, so duplicate network names cannot make it ambiguous).
    pub fn container_spec(
        &self,
        settings: &ContainerSettings,
        token: &GatewayToken,
        name: &str,
        network: &str,
    ) -> ContainerSpec {
        let secret = SecretString::new(token.expose());
        let mut spec = self.unlabelled_spec(settings, secret, name, network);
        spec.labels
            .insert(LABEL_SPEC_HASH.to_owned(), self.hash.label().to_owned());
        spec
    }

    /// The container spec without its spec-hash label, with `secret` as the token.
    fn unlabelled_spec(
        &self,
        settings: &ContainerSettings,
        secret: SecretString,
        name: &str,
        network: &str,
    ) -> ContainerSpec {
        let mut env: Vec<(String, EnvValue)> = plain_env(settings, &self.user_id)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), EnvValue::Plain(v)))
            .collect();
        for key in SECRET_ENV {
            env.push((key.to_owned(), EnvValue::Secret(secret.clone())));
        }
        let labels: BTreeMap<String, String> = object_labels(&settings.instance, &self.user_id);
        ContainerSpec {
            name: name.to_owned(),
            image: self.image.as_str().to_owned(),
            env,
            labels,
            volume: self.volume.clone(),
            mount_path: STATE_PATH.to_owned(),
            network: network.to_owned(),
            port: GATEWAY_PORT,
            publish: self.host_port.map(|p| (settings.publish_ip, p)),
            stop_timeout: settings.stop_timeout,
            limits: settings.limits,
            confinement: settings.confinement.clone(),
            node: self.node.clone(),
        }
    }
}

/// The token goes in under both names: the original service's and the one the gateway reads.
const SECRET_ENV: [&str; 2] = ["AGENT_TOKEN", "OPENCLAW_GATEWAY_TOKEN"];

fn plain_env(settings: &ContainerSettings, user_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MOSAIC_API_URL", settings.mosaic_api_url.clone()),
        ("AGENT_ID", user_id.to_owned()),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::PortRange;
    use crate::docker::{Confinement, ResourceLimits};
    use crate::isolation::NetworkIsolation;
    use std::time::Duration;

    /// Settings of the defaults, for the tests of this crate.
    pub(crate) fn settings() -> ContainerSettings {
        ContainerSettings {
            instance: "default".into(),
            image: ImageRef::parse("alpine/openclaw:latest").unwrap(),
            network: "mosaic-internal".into(),
            name_prefix: "mosaic-user-".into(),
            port_range: PortRange::default(),
            publish_ip: "127.0.0.1".parse().unwrap(),
            mosaic_api_url: "http://mosaic-api:3000/api".into(),
            allowed_images: crate::image_ref::ImageAllowList::any(),
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
            confinement: Confinement::strict(),
            network_isolation: NetworkIsolation::Shared,
        }
    }

    fn spec(nonce: i64, port: Option<u16>) -> DesiredSpec {
        let s = settings();
        DesiredSpec::new(&s, "alice", &s.image, nonce, port)
    }

    #[test]
    fn the_hash_is_stable_and_changes_with_every_input() {
        let base = spec(0, Some(19000));
        assert_eq!(base.hash, spec(0, Some(19000)).hash);
        assert!(base.hash.label().starts_with("v2:"));
        assert_ne!(base.hash, spec(1, Some(19000)).hash, "restart nonce");
        assert_ne!(base.hash, spec(0, Some(19001)).hash, "port");
        let mut s = settings();
        s.image = ImageRef::parse("alpine/openclaw:2").unwrap();
        let other = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert_ne!(base.hash, other.hash, "image");
        let mut s = settings();
        s.limits.memory_bytes = Some(1 << 30);
        let limited = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert_ne!(base.hash, limited.hash, "limits");
        let mut s = settings();
        s.confinement.cap_add = vec!["CHOWN".to_owned()];
        let capable = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert_ne!(base.hash, capable.hash, "capabilities");
        let mut s = settings();
        s.confinement.log = None;
        let unrotated = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert_ne!(base.hash, unrotated.hash, "log rotation");
        let mut s = settings();
        s.confinement.no_new_privileges = false;
        let privileged = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        assert_ne!(base.hash, privileged.hash, "no-new-privileges");
    }

    #[test]
    fn a_legacy_label_stays_current_until_the_row_or_settings_change() {
        let s = settings();
        let legacy_label = |d: &DesiredSpec| {
            legacy_hash::legacy_hash(
                &d.unlabelled_spec(&s, SecretString::new(""), &d.name, &s.network),
                s.publish_ip,
                d.restart_nonce,
            )
        };
        let before = spec(0, Some(19000));
        let label = legacy_label(&before);
        assert!(!label.starts_with("v2:"), "{label}");
        assert!(
            spec(0, Some(19000)).hash.is_current(Some(&label)),
            "unchanged row"
        );
        assert!(
            !spec(1, Some(19000)).hash.is_current(Some(&label)),
            "restart nonce"
        );
        assert!(!spec(0, Some(19001)).hash.is_current(Some(&label)), "port");
        let image = ImageRef::parse("alpine/openclaw:2").unwrap();
        let new_image = DesiredSpec::new(&s, "alice", &image, 0, Some(19000));
        assert!(!new_image.hash.is_current(Some(&label)), "image");
        let mut limited = settings();
        limited.limits.memory_bytes = Some(1 << 30);
        let limits = DesiredSpec::new(&limited, "alice", &limited.image, 0, Some(19000));
        assert!(!limits.hash.is_current(Some(&label)), "limits");
        let c = before.container_spec(&s, &GatewayToken::generate().unwrap(), &before.name, "id");
        assert_eq!(
            c.labels[LABEL_SPEC_HASH],
            before.hash.label(),
            "a new container is labelled v2"
        );
    }

    #[test]
    fn the_token_goes_in_under_both_names_and_never_into_the_hash_or_debug() {
        let s = settings();
        let token = GatewayToken::generate().unwrap();
        let d = spec(0, Some(19000));
        let c = d.container_spec(&s, &token, &d.name, "net-id");
        let value = |k: &str| {
            c.env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.expose().to_owned())
        };
        assert_eq!(value("AGENT_TOKEN").as_deref(), Some(token.expose()));
        assert_eq!(
            value("OPENCLAW_GATEWAY_TOKEN").as_deref(),
            Some(token.expose())
        );
        assert_eq!(value("AGENT_ID").as_deref(), Some("alice"));
        assert_eq!(
            value("MOSAIC_API_URL").as_deref(),
            Some("http://mosaic-api:3000/api")
        );
        assert!(!format!("{c:?}").contains(token.expose()));
        let other = GatewayToken::generate().unwrap();
        let c2 = d.container_spec(&s, &other, &d.name, "net-id");
        assert_eq!(
            c.labels, c2.labels,
            "the hash label does not depend on the token"
        );
        assert_eq!(c.labels[LABEL_SPEC_HASH], d.hash.label());
        assert_eq!(c.publish, Some(("127.0.0.1".parse().unwrap(), 19000)));
    }

    #[test]
    fn urls_use_the_gateway_port_inside_and_the_host_port_outside() {
        // Regression: the original mixed the container name with the host port.
        let d = spec(0, Some(19042));
        assert_eq!(d.url(), "http://mosaic-user-alice:18789");
        assert_eq!(
            d.host_url(&settings()).as_deref(),
            Some("http://127.0.0.1:19042")
        );
        let mut v6 = settings();
        v6.publish_ip = "::1".parse().unwrap();
        assert_eq!(d.host_url(&v6).as_deref(), Some("http://[::1]:19042"));
        assert_eq!(d.replacement_name(), "mosaic-user-alice-next");
    }
}
