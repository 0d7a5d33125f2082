//! `clawfleet users ...`: the desired rows, written the way any other service
//! would write them, and what the controller reports about them.

use chrono::Utc;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::io::Write;

use super::table::{display_id, Table};
use super::{CliError, GlobalArgs};
use crate::config::{parse_idle_timeout, parse_image, IdleTimeout};
use crate::desired::{DesiredContainer, DesiredState, Intent};
use crate::image_ref::ImageRef;
use crate::quote::quote_short;
use crate::status::ContainerStatus;
use crate::store::{DesiredUpdate, Store, UserRows};
use crate::view::{ControllerView, UserView};

/// The `users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create or update a user's desired row (unnamed fields keep their value)
    Set(SetArgs),
    /// Record activity now (moves the idle deadline; starts an idle container)
    Touch(UserArg),
    /// Recreate the user's container with fresh configuration (bumps restart_nonce)
    Restart(UserArg),
    /// Delete the desired row: the container is removed, its volume kept
    Delete(UserArg),
    /// Show one user's desired and observed state
    Show(ShowArgs),
    /// List every user's desired and observed state
    List(ListArgs),
}

/// A user id argument.
#[derive(Debug, Args)]
pub struct UserArg {
    /// The user id (1-128 bytes, any characters)
    pub id: String,
}

/// Flags of `users set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The user id (1-128 bytes, any characters)
    pub id: String,
    /// Desired state
    #[arg(long, value_parser = ["running", "stopped"])]
    pub state: Option<String>,
    /// Stop after this long without activity (e.g. 30m), or `off`
    #[arg(long, value_parser = parse_idle_timeout)]
    pub idle_timeout: Option<IdleTimeout>,
    /// Image for this user (instead of the configured default)
    #[arg(long, value_parser = parse_image, conflicts_with = "default_image")]
    pub image: Option<ImageRef>,
    /// Go back to the configured default image
    #[arg(long)]
    pub default_image: bool,
    /// Also record activity now
    #[arg(long)]
    pub touch: bool,
}

/// Flags of `users show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The user id
    pub id: String,
    /// Print the gateway token in clear (it is a secret: only where needed)
    #[arg(long)]
    pub show_token: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Flags of `users list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON (one array) instead of a table
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(global: &GlobalArgs, command: &UsersCommand) -> Result<(), CliError> {
    let store = global.open_store().await?;
    match command {
        UsersCommand::Set(args) => set(&store, args).await,
        UsersCommand::Touch(UserArg { id }) => {
            store
                .touch(id, Utc::now())
                .await
                .map_err(no_such_user(id))?;
            println!("touched {}", quote_short(id));
            Ok(())
        }
        UsersCommand::Restart(UserArg { id }) => {
            store.request_restart(id).await.map_err(no_such_user(id))?;
            println!(
                "restart requested for {}: the container will be recreated",
                quote_short(id)
            );
            Ok(())
        }
        UsersCommand::Delete(UserArg { id }) => {
            if !store.delete_desired(id).await? {
                return Err(CliError::NoSuchUser(quote_short(id)));
            }
            println!(
                "deleted {}: its container will be removed, its volume kept",
                quote_short(id)
            );
            Ok(())
        }
        UsersCommand::Show(args) => show(global, &store, args).await,
        UsersCommand::List(args) => list(global, &store, args).await,
    }
}

/// What the views say about this instance's controller: `Some` when it has
/// gone quiet (README "The tables").
async fn controller(
    global: &GlobalArgs,
    store: &Store,
) -> Result<Option<ControllerView>, CliError> {
    Ok(ControllerView::of(
        store.controller_seen(&global.instance).await?,
    ))
}

fn no_such_user(id: &str) -> impl FnOnce(crate::store::StoreError) -> CliError + '_ {
    move |e| match e {
        crate::store::StoreError::NoSuchUser(_) => CliError::NoSuchUser(quote_short(id)),
        other => other.into(),
    }
}

async fn set(store: &Store, args: &SetArgs) -> Result<(), CliError> {
    let image = match (&args.image, args.default_image) {
        (Some(image), _) => Some(Some(image.clone())),
        (None, true) => Some(None),
        (None, false) => None,
    };
    let update = DesiredUpdate {
        user_id: args.id.clone(),
        state: args.state.as_deref().and_then(DesiredState::parse),
        idle_timeout_secs: args.idle_timeout.map(|t| t.0.map(|d| d.as_secs())),
        image,
        touch: args.touch.then(Utc::now),
    };
    store.upsert_desired(&update).await?;
    println!("set {}", quote_short(&args.id));
    Ok(())
}

/// What `users show --json` prints: the view, and the gateway token when
/// `--show-token` asks for it.
#[derive(Serialize)]
struct ShownUser<'a> {
    #[serde(flatten)]
    view: UserView,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_token: Option<&'a str>,
}

async fn show(global: &GlobalArgs, store: &Store, args: &ShowArgs) -> Result<(), CliError> {
    let Some(rows) = store.user(&args.id).await? else {
        return Err(CliError::NoSuchUser(quote_short(&args.id)));
    };
    let UserRows {
        desired, status, ..
    } = &rows;
    let token = match (status, args.show_token) {
        (
            Some(ContainerStatus {
                gateway_token: Some(sealed),
                ..
            }),
            true,
        ) => {
            let (ring, _) = global.key_ring(false)?;
            Some(ring.open(&args.id, sealed)?)
        }
        _ => None,
    };
    let controller = controller(global, store).await?;
    let now = Utc::now();
    let mut out = std::io::stdout().lock();
    if args.json {
        let shown = ShownUser {
            view: UserView::of(&rows, now).with_controller(controller),
            gateway_token: token.as_ref().map(|t| t.expose()),
        };
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        )?;
        return Ok(());
    }
    if let Some(controller) = &controller {
        writeln!(out, "{}", controller.warning(&global.instance))?;
    }
    writeln!(out, "user:              {}", quote_short(&args.id))?;
    match desired {
        Some(Ok(d)) => {
            writeln!(out, "desired state:     {}", d.state)?;
            writeln!(out, "effective state:   {}", d.intent(now).state())?;
            writeln!(out, "idle timeout:      {}", idle_text(d))?;
            if let Some(deadline) = d.idle_deadline() {
                writeln!(out, "idle deadline:     {}", deadline.to_rfc3339())?;
            }
            writeln!(
                out,
                "last active:       {}",
                d.last_active_at.map_or("never".into(), |t| t.to_rfc3339())
            )?;
            writeln!(
                out,
                "image:             {}",
                d.image.as_ref().map_or("(default)", |i| i.as_str())
            )?;
            writeln!(out, "restart nonce:     {}", d.restart_nonce)?;
            writeln!(out, "revision:          {}", d.revision)?;
        }
        Some(Err(invalid)) => writeln!(
            out,
            "desired row:       INVALID: {}: {}",
            invalid.field, invalid.reason
        )?,
        None => writeln!(out, "desired row:       none (deleted)")?,
    }
    match status {
        Some(s) => {
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            writeln!(out, "phase:             {}", s.phase)?;
            writeln!(
                out,
                "health:            {}",
                s.health.map_or("-", |h| h.as_str())
            )?;
            writeln!(
                out,
                "container:         {} ({})",
                opt(&s.container_name),
                opt(&s.container_id)
            )?;
            writeln!(
                out,
                "host port:         {}",
                s.host_port.map_or("-".into(), |p| p.to_string())
            )?;
            writeln!(out, "url:               {}", opt(&s.url))?;
            writeln!(out, "host url:          {}", opt(&s.host_url))?;
            writeln!(out, "restarts:          {}", s.restarts)?;
            writeln!(
                out,
                "observed revision: {}",
                s.observed_revision.map_or("-".into(), |r| r.to_string())
            )?;
            writeln!(out, "message:           {}", opt(&s.message))?;
            writeln!(
                out,
                "since:             {}",
                s.last_transition_at.to_rfc3339()
            )?;
            match (&token, &s.gateway_token) {
                (Some(token), _) => writeln!(out, "gateway token:     {}", token.expose())?,
                (None, Some(_)) => {
                    writeln!(out, "gateway token:     (sealed; --show-token prints it)")?
                }
                (None, None) => writeln!(out, "gateway token:     none yet")?,
            }
        }
        None => writeln!(out, "phase:             - (not yet reconciled)")?,
    }
    Ok(())
}

fn idle_text(d: &DesiredContainer) -> String {
    d.idle_timeout
        .map_or("off".into(), |t| humantime::format_duration(t).to_string())
}

async fn list(global: &GlobalArgs, store: &Store, args: &ListArgs) -> Result<(), CliError> {
    let controller = controller(global, store).await?;
    let users = store.users_all().await?;
    let now = Utc::now();
    let mut out = std::io::stdout().lock();
    if args.json {
        let views: Vec<UserView> = users
            .iter()
            .map(|u| UserView::of(u, now).with_controller(controller))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&views).unwrap_or_default()
        )?;
        return Ok(());
    }
    if let Some(controller) = &controller {
        writeln!(out, "{}", controller.warning(&global.instance))?;
    }
    let mut table = Table::new([
        "USER", "DESIRED", "PHASE", "HEALTH", "PORT", "IDLE", "RESTARTS", "MESSAGE",
    ]);
    for UserRows {
        user_id: id,
        desired: d,
        status: s,
    } in &users
    {
        let desired = match d {
            Some(Ok(d)) => match d.intent(now) {
                Intent::Idle => "running (idle)".to_owned(),
                intent => intent.state().to_string(),
            },
            Some(Err(_)) => "invalid".to_owned(),
            None => "deleted".to_owned(),
        };
        let idle = match d {
            Some(Ok(d)) => idle_text(d),
            _ => "-".into(),
        };
        let dash = || "-".to_owned();
        table.row([
            display_id(id),
            desired,
            s.as_ref().map_or("-".into(), |s| s.phase.to_string()),
            s.as_ref()
                .and_then(|s| s.health)
                .map_or_else(dash, |h| h.to_string()),
            s.as_ref()
                .and_then(|s| s.host_port)
                .map_or_else(dash, |p| p.to_string()),
            idle,
            s.as_ref().map_or_else(dash, |s| s.restarts.to_string()),
            match (d, s) {
                (Some(Err(e)), _) => e.status_message(),
                (_, Some(s)) => s.message.clone().unwrap_or_default(),
                _ => String::new(),
            },
        ]);
    }
    table.write(&mut out)?;
    writeln!(out, "{} users", users.len())?;
    Ok(())
}
