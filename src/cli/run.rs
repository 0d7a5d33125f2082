//! `clawfleet run`: the controller process.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tracing::{info, warn};

use super::{CliError, GlobalArgs};
use crate::config::{parse_duration, parse_image};
use crate::controller::{Controller, ControllerOptions, Observers};
use crate::docker::{DockerEngine, Engine};
use crate::feed::FeedOptions;
use crate::image_ref::ImageRef;
use crate::ports::PortAllocator;
use crate::reconcile::{Reconciler, ReconcilerOptions};
use crate::secrets::KeySource;

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Default image (overrides the one given before the subcommand)
    #[arg(long = "image", value_parser = parse_image)]
    pub default_image: Option<ImageRef>,

    /// How often the database is polled for changed desired rows
    #[arg(long, env = "CLAWFLEET_POLL_INTERVAL", default_value = "250ms", value_parser = parse_duration, hide_env_values = true)]
    pub poll_interval: Duration,

    /// How long a managed container with no desired row (and no recorded deletion) is kept before removal
    #[arg(long, env = "CLAWFLEET_ORPHAN_GRACE", default_value = "5m", value_parser = parse_duration, hide_env_values = true)]
    pub orphan_grace: Duration,

    /// How long shutdown waits for reconciles in flight
    #[arg(long, env = "CLAWFLEET_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, hide_env_values = true)]
    pub shutdown_timeout: Duration,
}

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(
    global: &GlobalArgs,
    image: Option<ImageRef>,
    args: &RunArgs,
) -> Result<(), CliError> {
    let settings = global.container_settings(args.default_image.clone().or(image))?;
    let runtime = global.runtime_settings();
    let store = global.open_store().await?;
    info!(database = %crate::store::redact_url(&runtime.database_url), "database migrated");
    let (keys, source) = global.key_ring(true)?;
    match &source {
        KeySource::Created(path) => warn!(
            path = %path.display(),
            "no encryption key configured: created a new key file; back it up, without it stored tokens cannot be opened"
        ),
        other => info!(source = %other, keys = keys.key_ids().len(), "encryption keys loaded"),
    }
    if let KeySource::File(path) = &source {
        if crate::secrets::key_file_is_shared(path) {
            warn!(path = %path.display(), "key file is readable by other users; chmod 600 it");
        }
    }
    let engine = DockerEngine::connect(&runtime.docker_host)
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let version = engine
        .version()
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    info!(engine = %version.version, api = %version.api_version, host = %runtime.docker_host, "docker engine reachable");
    info!(
        instance = %settings.instance,
        image = %settings.image,
        network = %settings.network,
        ports = %settings.port_range,
        publish_ip = %settings.publish_ip,
        concurrency = runtime.concurrency,
        "controller starting"
    );
    let ports = PortAllocator::new(settings.port_range, settings.publish_ip);
    let reconciler = Reconciler::new(
        store.clone(),
        Arc::new(engine),
        Arc::new(settings),
        keys,
        ports,
        ReconcilerOptions {
            orphan_grace: args.orphan_grace,
            ..Default::default()
        },
    );
    let options = ControllerOptions {
        concurrency: runtime.concurrency,
        resync_period: runtime.resync_period,
        feed: FeedOptions {
            poll_interval: args.poll_interval,
            ..Default::default()
        },
        shutdown_timeout: args.shutdown_timeout,
        ..Default::default()
    };
    let controller = Controller::new(store, reconciler, options, Observers::default());
    controller
        .run(shutdown_signal())
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the controller");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
