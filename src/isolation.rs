//! How users' containers are kept apart from the host and from each other
//! (README "Security"): the settings' types and parsers (capabilities, log
//! rotation, network isolation) and the check that the agents' network is
//! what the setting says.
//!
//! Invariant: a network whose inter-container traffic disagrees with
//! `--network-isolation` is never used silently. [`NetworkIsolation::mismatch`]
//! is what the reconciler (users go `failed`), `/readyz` and `doctor` all
//! ask, so the three agree.

use std::collections::BTreeMap;
use std::fmt;

use crate::docker::{Engine, ObservedNetwork, OPTION_ENABLE_ICC};

/// Environment variable of `--network-isolation`.
pub const NETWORK_ISOLATION_ENV: &str = "CLAWFLEET_NETWORK_ISOLATION";

/// Linux capability names Docker accepts in `--cap-add`, without `CAP_`.
pub const CAPABILITIES: [&str; 41] = [
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// The capabilities added back after `--cap-drop ALL`, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapAdd(pub Vec<String>);

/// Parses `--cap-add`: comma-separated capability names, with or without
/// `CAP_`, any case (`chown, CAP_SETUID`); each is checked against
/// [`CAPABILITIES`] and written as Docker writes it (`CHOWN`), once.
pub fn parse_cap_add(s: &str) -> Result<CapAdd, String> {
    let mut names: Vec<String> = Vec::new();
    for given in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let upper = given.to_ascii_uppercase();
        let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
        if !CAPABILITIES.contains(&name) {
            return Err(format!(
                "{given:?} is not a Linux capability; write names such as CHOWN,SETUID,SETGID (with or without CAP_)"
            ));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    Ok(CapAdd(names))
}

/// Parses a log file size for the `json-file` driver: bytes, or a number
/// with `k`, `m` or `g` (binary units, as Docker reads `max-size`).
pub fn parse_log_size(s: &str) -> Result<u64, String> {
    match crate::config::parse_size(s, "10m or 512k")? {
        bytes if bytes <= 0 => Err(format!("{s:?}: a log file must be allowed at least 1 byte")),
        bytes => Ok(bytes.unsigned_abs()),
    }
}

/// Whether agents on the shared network can reach each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkIsolation {
    /// One bridge; agents reach each other and services on it by container name.
    #[default]
    Shared,
    /// The bridge is created with inter-container traffic disabled; services
    /// reach agents through `host_url`.
    Isolated,
}

impl NetworkIsolation {
    /// The setting as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Isolated => "isolated",
        }
    }

    /// The driver options the agents' network is created with.
    pub fn network_options(self) -> BTreeMap<String, String> {
        match self {
            Self::Shared => BTreeMap::new(),
            Self::Isolated => BTreeMap::from([(OPTION_ENABLE_ICC.to_owned(), "false".to_owned())]),
        }
    }

    /// Why `observed` (the network called `name`) must not be used under
    /// this setting; `None` when it agrees.
    pub fn mismatch(self, name: &str, observed: &ObservedNetwork) -> Option<NetworkMismatch> {
        let icc = observed.inter_container_traffic();
        let agrees = match self {
            Self::Shared => icc,
            Self::Isolated => !icc,
        };
        (!agrees).then(|| NetworkMismatch {
            network: name.to_owned(),
            setting: self,
        })
    }
}

/// The agents' network exists with options that disagree with `--network-isolation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkMismatch {
    /// The network's name.
    pub network: String,
    /// The setting it disagrees with.
    pub setting: NetworkIsolation,
}

impl fmt::Display for NetworkMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let found = match self.setting {
            NetworkIsolation::Shared => "has inter-container traffic disabled (enable_icc=false)",
            NetworkIsolation::Isolated => {
                "lets its containers reach each other (enable_icc is not false)"
            }
        };
        write!(
            f,
            "network {} {found}, but --network-isolation is {}: remove the network (docker network rm, after its containers) so clawfleet recreates it, or set {NETWORK_ISOLATION_ENV} to match",
            self.network,
            self.setting.as_str()
        )
    }
}

impl std::error::Error for NetworkMismatch {}

impl NetworkMismatch {
    /// A short phrase for `/readyz`.
    pub fn reason(&self) -> String {
        format!(
            "network {} does not match --network-isolation {}",
            self.network,
            self.setting.as_str()
        )
    }
}

/// The mismatch of the network called `name` with `isolation`, if it
/// exists and disagrees. An absent network is fine (it is created as the
/// setting says); an engine that cannot answer is its own readiness check's
/// business.
pub async fn check_network<E: Engine>(
    engine: &E,
    name: &str,
    isolation: NetworkIsolation,
) -> Option<NetworkMismatch> {
    let observed = engine.inspect_network(name).await.ok().flatten()?;
    isolation.mismatch(name, &observed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(options: &[(&str, &str)]) -> ObservedNetwork {
        ObservedNetwork {
            id: "n".to_owned(),
            driver: "bridge".to_owned(),
            attachable: true,
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn capabilities_are_normalised_with_or_without_the_cap_prefix() {
        assert_eq!(
            parse_cap_add("chown, CAP_SETUID,SETGID,Chown").unwrap(),
            CapAdd(vec!["CHOWN".into(), "SETUID".into(), "SETGID".into()])
        );
        assert_eq!(parse_cap_add("").unwrap(), CapAdd::default());
    }

    #[test]
    fn an_unknown_capability_is_refused_naming_it() {
        let err = parse_cap_add("CHOWN,CAP_TELEPORT").unwrap_err();
        assert!(
            err.contains("CAP_TELEPORT") && err.contains("CHOWN,SETUID"),
            "{err}"
        );
        assert!(parse_cap_add("ALL").is_err(), "ALL would undo the drop");
    }

    #[test]
    fn log_sizes_parse_like_docker_and_refuse_nonsense() {
        assert_eq!(parse_log_size("10m").unwrap(), 10 << 20);
        assert_eq!(parse_log_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_log_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_log_size("1000").unwrap(), 1000);
        assert!(parse_log_size("0").is_err());
        assert!(parse_log_size("lots").is_err());
        assert!(parse_log_size("99999999999g").is_err());
    }

    #[test]
    fn isolated_networks_are_created_without_inter_container_traffic() {
        assert!(NetworkIsolation::Shared.network_options().is_empty());
        let options = NetworkIsolation::Isolated.network_options();
        assert_eq!(options[OPTION_ENABLE_ICC], "false");
    }

    #[test]
    fn a_network_disagreeing_with_the_setting_is_a_mismatch_either_way() {
        let open = network(&[]);
        let closed = network(&[(OPTION_ENABLE_ICC, "false")]);
        let explicit_open = network(&[(OPTION_ENABLE_ICC, "true")]);
        assert_eq!(NetworkIsolation::Shared.mismatch("n", &open), None);
        assert_eq!(NetworkIsolation::Isolated.mismatch("n", &closed), None);
        assert!(NetworkIsolation::Isolated
            .mismatch("n", &explicit_open)
            .is_some());
        let wrong = NetworkIsolation::Isolated
            .mismatch("agents", &open)
            .unwrap();
        let text = wrong.to_string();
        assert!(
            text.contains("agents") && text.contains("isolated"),
            "{text}"
        );
        assert!(NetworkIsolation::Shared.mismatch("n", &closed).is_some());
        assert!(wrong.reason().len() < 80);
    }
}
