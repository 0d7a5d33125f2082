//! The command line: flags (each with its environment variable), commands,
//! and what each command prints.
//!
//! Secrets are never flags (they would show in `ps`): the key ring comes from
//! `CLAWFLEET_ENCRYPTION_KEYS` or (on SQLite) the key file, the API token from
//! `CLAWFLEET_API_TOKEN`. `--help` shows which environment variable sets each
//! flag but never the variable's current value.

mod doctor;
mod import;
mod run;
mod table;
mod users;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_cpus, parse_duration, parse_image, parse_image_allow_list, parse_instance, parse_memory,
    parse_name_prefix, parse_network, resolve_port_range, ContainerSettings, LogFormat, PortRange,
    RuntimeSettings, ENCRYPTION_KEYS_ENV, PORT_RANGE_START_ENV,
};
use crate::docker::{
    parse_constraint, Confinement, LogLimits, PublishMode, ResourceLimits, SwarmOptions,
};
use crate::image_ref::{ImageAllowList, ImageRef};
use crate::isolation::{parse_cap_add, parse_log_size, CapAdd, NetworkIsolation};
use crate::secrets::{self, SecretsError};
use crate::store::{Store, StoreError};

pub use doctor::doctor;
pub use import::{import, ImportCommand};
pub use run::{run, shutdown_signal, RunArgs};
pub use users::UsersCommand;

const AFTER_HELP: &str = "\
Secrets are read from the environment only, never from flags:
  CLAWFLEET_ENCRYPTION_KEYS  id:base64key,... (first seals, all open); without it
                             on SQLite the key file <data-dir>/encryption.keys is
                             used (`clawfleet run` creates one if missing); on
                             PostgreSQL it is required, the same on every replica
  CLAWFLEET_API_TOKEN        bearer token of the JSON API; unset: the API is off

Durations are humantime: 30s, 5m, 1h 30m.";

/// clawfleet: keeps per-user agent containers on a Docker engine converged to
/// the rows other services write in `desired_containers`.
#[derive(Debug, Parser)]
#[command(name = "clawfleet", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Settings shared by every command, listed under their own heading in
    /// every command's `--help` so a command's own options stand apart.
    #[command(
        flatten,
        next_help_heading = "Global options (any command; each also from its environment variable)"
    )]
    pub global: GlobalArgs,

    /// Default image for users whose row names none [default: alpine/openclaw:latest]
    #[arg(long = "image", env = "OPENCLAW_IMAGE", value_parser = parse_image, hide_env_values = true)]
    pub default_image: Option<ImageRef>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after any subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Database holding desired_containers and container_status (sqlite://PATH or postgres://...)
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://./data/clawfleet.db?mode=rwc",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,

    /// Docker endpoint: unix:///path, tcp://host:port, http(s)://host:port, or a socket path
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock",
        global = true,
        hide_env_values = true
    )]
    pub docker_host: String,

    /// Instance name: only Docker objects labelled with it are listed, watched or removed
    #[arg(long, env = "CLAWFLEET_INSTANCE", default_value = "default", value_parser = parse_instance, global = true, hide_env_values = true)]
    pub instance: String,

    /// Docker network the containers join
    #[arg(long, env = "OPENCLAW_NETWORK", default_value = "mosaic-internal", value_parser = parse_network, global = true, hide_env_values = true)]
    pub network: String,

    /// Container name prefix (`<prefix><user>`; volume `<prefix><user>-state`)
    #[arg(long, env = "CLAWFLEET_NAME_PREFIX", default_value = "mosaic-user-", value_parser = parse_name_prefix, global = true, hide_env_values = true)]
    pub name_prefix: String,

    /// Host ports for gateways, START-END [default: 19000-19999, or 1000 ports from OPENCLAW_PORT_RANGE_START]
    #[arg(
        long,
        env = "CLAWFLEET_PORT_RANGE",
        global = true,
        hide_env_values = true
    )]
    pub port_range: Option<PortRange>,

    /// Host address gateway ports are published on
    #[arg(
        long,
        env = "CLAWFLEET_PUBLISH_IP",
        default_value = "127.0.0.1",
        global = true,
        hide_env_values = true
    )]
    pub publish_ip: IpAddr,

    /// MOSAIC_API_URL given to every container
    #[arg(
        long,
        env = "MOSAIC_API_URL",
        default_value = "http://mosaic-api:3000/api",
        global = true,
        hide_env_values = true
    )]
    pub mosaic_api_url: String,

    /// Listener for /metrics, /healthz, /readyz and the JSON API
    #[arg(
        long,
        env = "CLAWFLEET_LISTEN",
        default_value = "127.0.0.1:8089",
        global = true,
        hide_env_values = true
    )]
    pub listen: SocketAddr,

    /// Comma-separated image patterns rows may ask for (`*` is a wildcard; `*` alone allows any image) [default: any tag or digest of the default image's repository]
    #[arg(long, env = "CLAWFLEET_ALLOWED_IMAGES", value_parser = parse_image_allow_list, global = true, hide_env_values = true)]
    pub allowed_images: Option<ImageAllowList>,

    /// Grace period of `docker stop` before the container is killed
    #[arg(long, env = "CLAWFLEET_STOP_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true, hide_env_values = true)]
    pub stop_timeout: Duration,

    /// Period of the full resync that catches anything missed
    #[arg(long, env = "CLAWFLEET_RESYNC_PERIOD", default_value = "5m", value_parser = parse_duration, global = true, hide_env_values = true)]
    pub resync_period: Duration,

    /// Reconciles running at once
    #[arg(long, env = "CLAWFLEET_CONCURRENCY", default_value_t = crate::controller::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=1024), global = true, hide_env_values = true)]
    pub concurrency: u16,

    /// Creates and starts of bulk work in flight at once within a minute of a wake (otherwise up to --concurrency); a wake never waits for one
    #[arg(long, env = "CLAWFLEET_ENGINE_CONCURRENCY", default_value_t = crate::reconcile::DEFAULT_ENGINE_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=1024), global = true, hide_env_values = true)]
    pub engine_concurrency: u16,

    /// Memory limit of each container (e.g. 512m, 2g) [default: none]
    #[arg(long, env = "CLAWFLEET_MEMORY_LIMIT", value_parser = parse_memory, global = true, hide_env_values = true)]
    pub memory_limit: Option<i64>,

    /// CPU limit of each container in cores (e.g. 0.5, 2) [default: none]
    #[arg(long, env = "CLAWFLEET_CPU_LIMIT", value_parser = parse_cpus, global = true, hide_env_values = true)]
    pub cpu_limit: Option<i64>,

    /// Process limit of each container
    #[arg(long, env = "CLAWFLEET_PIDS_LIMIT", default_value_t = 512, value_parser = clap::value_parser!(i64).range(1..), global = true, hide_env_values = true)]
    pub pids_limit: i64,

    /// Capabilities given back to each container after all are dropped, comma-separated (CHOWN,SETUID) [default: none]
    #[arg(long, env = "CLAWFLEET_CAP_ADD", value_parser = parse_cap_add, global = true, hide_env_values = true)]
    pub cap_add: Option<CapAdd>,

    /// Size at which a container's log file is rotated (json-file driver; 10m, 512k)
    #[arg(long, env = "CLAWFLEET_LOG_MAX_SIZE", default_value = "10m", value_parser = parse_log_size, global = true, hide_env_values = true)]
    pub log_max_size: u64,

    /// Log files kept per container, the current one included
    #[arg(long, env = "CLAWFLEET_LOG_MAX_FILE", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100), global = true, hide_env_values = true)]
    pub log_max_file: u32,

    /// Whether agents on the network can reach each other: shared, or isolated (inter-container traffic disabled; reach agents through host_url)
    #[arg(
        long,
        env = "CLAWFLEET_NETWORK_ISOLATION",
        value_enum,
        default_value = "shared",
        global = true,
        hide_env_values = true
    )]
    pub network_isolation: NetworkIsolation,

    /// What runs the agents: docker (one engine, one container per user) or swarm (DOCKER_HOST is a Swarm manager; one service per user)
    #[arg(
        long,
        env = "CLAWFLEET_BACKEND",
        value_enum,
        default_value = "docker",
        global = true,
        hide_env_values = true
    )]
    pub backend: Backend,

    /// Swarm: a multi-host volume driver for the state volumes; unset, volumes are node-local and each user is pinned to the node of their first run
    #[arg(long, env = "CLAWFLEET_VOLUME_DRIVER", value_parser = parse_volume_driver, global = true, hide_env_values = true)]
    pub volume_driver: Option<String>,

    /// Swarm: placement constraints every user's service gets, comma-separated (node.labels.agents==true,node.role==worker) [default: none]
    #[arg(long, env = "CLAWFLEET_PLACEMENT", value_parser = parse_placement, global = true, hide_env_values = true)]
    pub placement: Option<Placement>,

    /// Swarm: how gateway ports are published: ingress (routing mesh, every node) or host (only the user's node; host_url names it)
    #[arg(
        long,
        env = "CLAWFLEET_SWARM_PUBLISH_MODE",
        value_enum,
        default_value = "ingress",
        global = true,
        hide_env_values = true
    )]
    pub swarm_publish_mode: PublishMode,

    /// Swarm: how often this instance's tasks are listed to see state changes (one list call each time)
    #[arg(long, env = "CLAWFLEET_SWARM_TASK_POLL", default_value = "1s", value_parser = parse_task_poll, global = true, hide_env_values = true)]
    pub swarm_task_poll: Duration,

    /// Log format
    #[arg(
        long,
        env = "CLAWFLEET_LOG_FORMAT",
        value_enum,
        default_value = "pretty",
        global = true,
        hide_env_values = true
    )]
    pub log_format: LogFormat,

    /// Folder for the key file (and the default SQLite database)
    #[arg(
        long,
        env = "CLAWFLEET_DATA_DIR",
        default_value = "./data",
        global = true,
        hide_env_values = true
    )]
    pub data_dir: PathBuf,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (migrates first)
    Run(RunArgs),
    /// Apply database migrations and exit
    Migrate,
    /// Read and write users' desired rows
    #[command(subcommand)]
    Users(UsersCommand),
    /// Print a new encryption key entry for CLAWFLEET_ENCRYPTION_KEYS
    Keygen(KeygenArgs),
    /// Write desired rows for a fleet that exists without them (taking over from the original service)
    #[command(subcommand)]
    Import(ImportCommand),
    /// Check everything `run` needs, creating nothing; one line per check (✓, ⚠ warning, ✗ failure), exit 0 unless one fails
    Doctor(DoctorArgs),
    /// Probe a running controller's /healthz on --listen (for container HEALTHCHECKs); exit 0 when healthy
    Healthcheck,
}

/// Flags of `doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Default image to check (overrides the one given before the subcommand)
    #[arg(long = "image", value_parser = parse_image)]
    pub default_image: Option<ImageRef>,
    /// Fail on warnings too (an optional feature off, a database or key file `run` would create)
    #[arg(long)]
    pub strict: bool,
}

/// Flags of `keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Key id to put in sealed tokens [default: k<today's date>]
    #[arg(long)]
    pub id: Option<String>,
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A database operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key or token operation failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
    /// A user has no desired row.
    #[error("no user {0}: it has no desired row (create it with `clawfleet users set`)")]
    NoSuchUser(String),
    /// Writing output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl GlobalArgs {
    /// The container settings these flags describe.
    pub fn container_settings(
        &self,
        image: Option<ImageRef>,
    ) -> Result<ContainerSettings, CliError> {
        let legacy = std::env::var(PORT_RANGE_START_ENV).ok();
        let image = image.unwrap_or_else(|| {
            ImageRef::parse("alpine/openclaw:latest").expect("the default image is valid")
        });
        // Unset, the list follows the default image (README "Configuration").
        let allowed_images = self
            .allowed_images
            .clone()
            .unwrap_or_else(|| ImageAllowList::of_repository(&image));
        Ok(ContainerSettings {
            instance: self.instance.clone(),
            image,
            network: self.network.clone(),
            name_prefix: self.name_prefix.clone(),
            port_range: resolve_port_range(self.port_range, legacy.as_deref())
                .map_err(CliError::Config)?,
            publish_ip: self.publish_ip,
            mosaic_api_url: self.mosaic_api_url.clone(),
            allowed_images,
            stop_timeout: self.stop_timeout,
            limits: ResourceLimits {
                memory_bytes: self.memory_limit,
                nano_cpus: self.cpu_limit,
                pids: Some(self.pids_limit),
            },
            confinement: Confinement {
                cap_add: self.cap_add.clone().unwrap_or_default().0,
                log: Some(LogLimits {
                    max_size_bytes: self.log_max_size,
                    max_files: self.log_max_file,
                }),
                ..Confinement::strict()
            },
            network_isolation: self.network_isolation,
        })
    }

    /// The Swarm backend's settings these flags describe.
    pub fn swarm_options(&self) -> SwarmOptions {
        SwarmOptions {
            placement: self.placement.clone().unwrap_or_default().0,
            volume_driver: self.volume_driver.clone(),
            publish_mode: self.swarm_publish_mode,
            task_poll: self.swarm_task_poll,
        }
    }

    /// The process settings these flags describe.
    pub fn runtime_settings(&self) -> RuntimeSettings {
        RuntimeSettings {
            database_url: self.database_url.clone(),
            docker_host: self.docker_host.clone(),
            listen: self.listen,
            resync_period: self.resync_period,
            concurrency: usize::from(self.concurrency),
            engine_concurrency: usize::from(self.engine_concurrency),
            data_dir: self.data_dir.clone(),
            log_format: self.log_format,
        }
    }

    /// Connects to the database and applies migrations.
    pub async fn open_store(&self) -> Result<Store, CliError> {
        let store = Store::connect(&self.database_url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Loads the key ring from `CLAWFLEET_ENCRYPTION_KEYS`, else on SQLite from
    /// the key file in `--data-dir` (with `create`, made when missing). On
    /// PostgreSQL keys come only from the environment: every replica of a
    /// group must seal with the same keys (README "High availability").
    pub fn key_ring(
        &self,
        create: bool,
    ) -> Result<(secrets::KeyRing, secrets::KeySource), CliError> {
        let env = std::env::var(ENCRYPTION_KEYS_ENV).ok();
        let file = if crate::store::is_postgres_url(&self.database_url) {
            secrets::KeyFileUse::Never
        } else if create {
            secrets::KeyFileUse::Create
        } else {
            secrets::KeyFileUse::Read
        };
        secrets::load_key_ring(env.as_deref(), &self.data_dir, file).map_err(|e| match env {
            // Name the variable: the error cannot quote its (secret) value.
            Some(_) => CliError::Config(format!("{ENCRYPTION_KEYS_ENV}: {e}")),
            None => e.into(),
        })
    }
}

/// What runs the agents (README "Running on Docker Swarm").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One Docker engine; a container per user.
    #[default]
    Docker,
    /// A Docker Swarm (DOCKER_HOST is a manager); a service per user.
    Swarm,
}

impl Backend {
    /// The backend as written on the command line (and in `clawfleet_build_info`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Swarm => "swarm",
        }
    }
}

/// `--placement`: Swarm placement constraints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement(pub Vec<String>);

fn parse_placement(text: &str) -> Result<Placement, String> {
    text.split(',')
        .filter(|c| !c.trim().is_empty())
        .map(parse_constraint)
        .collect::<Result<Vec<_>, _>>()
        .map(Placement)
}

fn parse_volume_driver(text: &str) -> Result<String, String> {
    let name = text.trim();
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
    if name.is_empty() || !plain {
        return Err(format!(
            "{text:?} is not a volume driver name (letters, digits, - _ . / :)"
        ));
    }
    Ok(name.to_owned())
}

fn parse_task_poll(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
        return Err(format!("{text:?}: use between 100ms and 60s"));
    }
    Ok(d)
}

/// `clawfleet migrate`.
pub async fn migrate(global: &GlobalArgs) -> Result<(), CliError> {
    let store = Store::connect(&global.database_url).await?;
    let pending = store.migrate().await?;
    if pending.is_empty() {
        println!("database is up to date");
    } else {
        for name in pending {
            println!("applied {name}");
        }
    }
    Ok(())
}

/// `clawfleet keygen`: prints one `id:base64key` entry.
pub fn keygen(args: &KeygenArgs) -> Result<(), CliError> {
    let id = args.id.clone().unwrap_or_else(secrets::default_key_id);
    let key = secrets::EncryptionKey::generate(&id)?;
    println!("{}", key.to_config_entry().as_str());
    eprintln!(
        "new key {id:?}: put it FIRST in {ENCRYPTION_KEYS_ENV} (comma-separated) to seal with it; keep older keys after it so existing tokens still open"
    );
    Ok(())
}

/// `clawfleet healthcheck`: GET /healthz on the `--listen` address (a
/// wildcard address is probed on loopback), 2 s timeout; healthy on 200.
pub async fn healthcheck(global: &GlobalArgs) -> Result<(), CliError> {
    let addr = SocketAddr::new(
        crate::probe::reachable(global.listen.ip()),
        global.listen.port(),
    );
    let fail = |why: String| CliError::Config(format!("unhealthy: {addr}: {why}"));
    match crate::probe::http_get(addr, "/healthz", Duration::from_secs(2)).await {
        Ok(200) => Ok(()),
        Ok(code) => Err(fail(format!("answered {code}"))),
        Err(why) => Err(fail(why)),
    }
}

/// Runs a users subcommand.
pub async fn users(global: &GlobalArgs, command: &UsersCommand) -> Result<(), CliError> {
    users::run(global, command).await
}
