//! Typed settings and the parsers for their command-line and environment forms.
//!
//! Every setting is a flag with an environment variable (see `cli`); this
//! module owns the value types and their validation, so a bad value fails at
//! start with a message naming the flag, never deep inside the controller.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::docker::{Confinement, ResourceLimits};
use crate::image_ref::{ImageAllowList, ImageRef};
use crate::isolation::NetworkIsolation;

/// Environment variable of the original service that sets the start of the port range.
pub const PORT_RANGE_START_ENV: &str = "OPENCLAW_PORT_RANGE_START";
/// Environment variable holding the key ring (`id:base64key,...`, first seals).
pub const ENCRYPTION_KEYS_ENV: &str = "CLAWFLEET_ENCRYPTION_KEYS";
/// Environment variable holding the API bearer token.
pub const API_TOKEN_ENV: &str = "CLAWFLEET_API_TOKEN";
/// Port ranges set only by their start span this many ports.
const DEFAULT_RANGE_SIZE: u16 = 1000;

/// An inclusive range of host ports to publish gateways on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// The range `start..=end`; refused when empty or starting at 0.
    pub fn new(start: u16, end: u16) -> Result<Self, String> {
        if start == 0 {
            return Err("port range cannot start at 0".into());
        }
        if start > end {
            return Err(format!(
                "port range {start}-{end} is backwards; write the lower port first, e.g. {end}-{start}"
            ));
        }
        Ok(Self { start, end })
    }

    /// A range of the default size starting at `start`, cut at 65535.
    pub fn starting_at(start: u16) -> Result<Self, String> {
        Self::new(start, start.saturating_add(DEFAULT_RANGE_SIZE - 1))
    }

    /// First port.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Last port.
    pub fn end(&self) -> u16 {
        self.end
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True when `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// The ports, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            start: 19000,
            end: 19999,
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number (1-65535)"))
        };
        match s.split_once('-') {
            Some((start, end)) => Self::new(port(start)?, port(end)?),
            None => Err(format!(
                "{s:?} is not a port range; expected START-END, e.g. 19000-19999"
            )),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// Resolves the port range: the flag or `CLAWFLEET_PORT_RANGE` if given, else
/// the original service's `OPENCLAW_PORT_RANGE_START` (1000 ports from it),
/// else the default 19000-19999.
pub fn resolve_port_range(
    flag: Option<PortRange>,
    legacy_start: Option<&str>,
) -> Result<PortRange, String> {
    if let Some(range) = flag {
        return Ok(range);
    }
    match legacy_start.map(str::trim).filter(|s| !s.is_empty()) {
        Some(start) => {
            let start: u16 = start.parse().map_err(|_| {
                format!("{PORT_RANGE_START_ENV}={start:?} is not a port number (1-65535)")
            })?;
            PortRange::starting_at(start).map_err(|e| format!("{PORT_RANGE_START_ENV}: {e}"))
        }
        None => Ok(PortRange::default()),
    }
}

/// The longest duration a setting accepts: 10 years (of humantime's 365.25
/// days). Durations are added to timestamps (`--failed-retry`,
/// `--orphan-grace`, the lease), and a huge one would overflow them.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Parses a humantime duration such as `30m`, `5s` or `1h 30m`, at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 30s, 5m, 1h 30m"))?;
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than the limit of 10 years"));
    }
    Ok(d)
}

/// An idle timeout as given on the command line: `None` is `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeout(pub Option<Duration>);

/// Parses an idle timeout: a duration, or `off` / `never` / `0` for none.
pub fn parse_idle_timeout(s: &str) -> Result<IdleTimeout, String> {
    parse_idle_duration(s).map(IdleTimeout)
}

fn parse_idle_duration(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "off" | "never" | "none" | "0" => Ok(None),
        other => {
            let d = parse_duration(other)?;
            if d.as_secs() == 0 {
                return Err(format!(
                    "{s:?} is shorter than a second; use `off` for no idle timeout"
                ));
            }
            if d.as_secs() > crate::desired::MAX_IDLE_TIMEOUT_SECS as u64 {
                return Err(format!("{s:?} is more than a year"));
            }
            Ok(Some(d))
        }
    }
}

/// Parses an image reference.
pub fn parse_image(s: &str) -> Result<ImageRef, String> {
    ImageRef::parse(s.trim())
}

/// Parses an instance name: it goes into Docker labels and filters.
pub fn parse_instance(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not an instance name: 1 to 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Parses a Docker network name.
pub fn parse_network(s: &str) -> Result<String, String> {
    let mut chars = s.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a valid Docker network name"))
    }
}

/// Parses the container name prefix.
pub fn parse_name_prefix(s: &str) -> Result<String, String> {
    crate::naming::validate_prefix(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Parses the allow-list of image patterns (comma-separated, `*` alone for any image).
pub fn parse_image_allow_list(s: &str) -> Result<ImageAllowList, String> {
    ImageAllowList::parse(s)
}

/// Parses a size as Docker reads one: bytes, or a number with `k`, `m`,
/// `g` (binary units); `example` shows the form in the error.
pub fn parse_size(s: &str, example: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, unit) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. {example}"))?;
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a memory size: bytes, or a number with `k`, `m`, `g` (binary units, as Docker's `--memory`).
pub fn parse_memory(s: &str) -> Result<i64, String> {
    let bytes = parse_size(s, "512m or 2g")?;
    // Docker refuses memory limits under 6 MiB.
    if bytes < 6 << 20 {
        return Err(format!("{s:?} is below Docker's minimum of 6m"));
    }
    Ok(bytes)
}

/// Parses a CPU limit in cores (`1.5`) into Docker's billionths of a CPU.
pub fn parse_cpus(s: &str) -> Result<i64, String> {
    let cpus: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of CPUs; write e.g. 0.5 or 2"))?;
    if !(cpus > 0.0 && cpus <= 1024.0) {
        return Err(format!("{s:?} CPUs is out of range (0 to 1024)"));
    }
    Ok((cpus * 1e9).round() as i64)
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Everything the controller needs to know about how to make containers.
#[derive(Clone, Debug)]
pub struct ContainerSettings {
    /// `io.clawfleet.instance` label value; scopes everything the controller touches.
    pub instance: String,
    /// Default image.
    pub image: ImageRef,
    /// Network the containers join.
    pub network: String,
    /// Container name prefix.
    pub name_prefix: String,
    /// Host ports to publish gateways on.
    pub port_range: PortRange,
    /// Host address ports are published on.
    pub publish_ip: IpAddr,
    /// `MOSAIC_API_URL` passed to containers.
    pub mosaic_api_url: String,
    /// Images rows may ask for.
    pub allowed_images: ImageAllowList,
    /// Grace period `docker stop` gives a container.
    pub stop_timeout: Duration,
    /// Optional memory, CPU and process limits of every container.
    pub limits: ResourceLimits,
    /// Capabilities, privileges and log rotation of every container.
    pub confinement: Confinement,
    /// Whether the agents' network lets agents reach each other.
    pub network_isolation: NetworkIsolation,
}

impl ContainerSettings {
    /// True when `image` may be used.
    pub fn image_allowed(&self, image: &ImageRef) -> bool {
        self.allowed_images.allows(image)
    }
}

/// How the controller process runs.
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    /// Database URL.
    pub database_url: String,
    /// Docker endpoint.
    pub docker_host: String,
    /// HTTP listener for metrics, health and the API.
    pub listen: SocketAddr,
    /// Period of the full resync.
    pub resync_period: Duration,
    /// Reconciles running at once.
    pub concurrency: usize,
    /// Creates and starts of bulk work in flight at once.
    pub engine_concurrency: usize,
    /// Folder for the key file and the SQLite database by default.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_backwards_ones_say_how_to_fix_them() {
        let r: PortRange = "19000-19999".parse().unwrap();
        assert_eq!((r.start(), r.end(), r.len()), (19000, 19999, 1000));
        let err = "19999-19000".parse::<PortRange>().unwrap_err();
        assert!(
            err.contains("backwards") && err.contains("19000-19999"),
            "{err}"
        );
        assert!("19000"
            .parse::<PortRange>()
            .unwrap_err()
            .contains("START-END"));
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("1-70000"
            .parse::<PortRange>()
            .unwrap_err()
            .contains("70000"));
    }

    #[test]
    fn the_original_port_start_variable_sets_a_1000_port_range() {
        assert_eq!(
            resolve_port_range(None, Some("20000")).unwrap(),
            PortRange::new(20000, 20999).unwrap()
        );
        assert_eq!(
            resolve_port_range(None, Some("65000")).unwrap().end(),
            65535
        );
        assert_eq!(
            resolve_port_range(None, None).unwrap(),
            PortRange::default()
        );
        let flag = PortRange::new(1, 2).unwrap();
        assert_eq!(resolve_port_range(Some(flag), Some("20000")).unwrap(), flag);
        assert!(resolve_port_range(None, Some("x"))
            .unwrap_err()
            .contains(PORT_RANGE_START_ENV));
    }

    #[test]
    fn durations_use_humantime_and_bad_ones_explain_the_form() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("soon").unwrap_err().contains("30s, 5m"));
    }

    /// Regression: a huge `--failed-retry` or `--orphan-grace` overflowed
    /// `DateTime + Duration` and panicked the controller.
    #[test]
    fn durations_longer_than_ten_years_are_refused() {
        assert_eq!(parse_duration("10y").unwrap(), MAX_DURATION);
        for huge in ["11y", "1000000000y", "18446744073709551615s"] {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains("10 years"), "{huge}: {err}");
        }
    }

    #[test]
    fn idle_timeouts_accept_off() {
        assert_eq!(parse_idle_timeout("off").unwrap(), IdleTimeout(None));
        assert_eq!(
            parse_idle_timeout("30m").unwrap(),
            IdleTimeout(Some(Duration::from_secs(1800)))
        );
        assert!(parse_idle_timeout("soon").is_err());
        assert!(parse_idle_timeout("400days").is_err());
    }

    #[test]
    fn instance_and_network_names_are_checked() {
        assert!(parse_instance("default").is_ok());
        assert!(parse_instance("a b").is_err());
        assert!(parse_instance("").is_err());
        assert!(parse_network("mosaic-internal").is_ok());
        assert!(parse_network("-x").is_err());
    }

    #[test]
    fn memory_and_cpu_limits_parse_like_docker() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2g").unwrap(), 2 << 30);
        assert_eq!(parse_memory("2GB").unwrap(), 2 << 30);
        assert!(parse_memory("1k").unwrap_err().contains("minimum"));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_cpus("1.5").unwrap(), 1_500_000_000);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn settings_allow_only_the_images_of_their_list() {
        let image = ImageRef::parse("clawfleet-agent-stub:dev").unwrap();
        let s = ContainerSettings {
            instance: "t".into(),
            allowed_images: ImageAllowList::of_repository(&image),
            image,
            network: "n".into(),
            name_prefix: "p-".into(),
            port_range: PortRange::default(),
            publish_ip: "127.0.0.1".parse().unwrap(),
            mosaic_api_url: "http://x".into(),
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
            confinement: Confinement::strict(),
            network_isolation: NetworkIsolation::Shared,
        };
        assert!(!s.image_allowed(&ImageRef::parse("evil:latest").unwrap()));
        assert!(s.image_allowed(&ImageRef::parse("clawfleet-agent-stub:other").unwrap()));
    }
}
