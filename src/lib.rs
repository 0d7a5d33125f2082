//! clawfleet: a Kubernetes-style reconciling controller for per-user agent
//! containers on a Docker engine.
//!
//! Other services write what they want in `desired_containers`; clawfleet
//! converges the engine to it and reports in `container_status`. The modules
//! are the pieces of that loop:
//!
//! - [`desired`]: a desired row and its validation; [`status`]: the phases it reports.
//! - [`store`]: the database edge (sea-orm): reads desired rows, writes status rows.
//! - [`naming`]: the one place a user id becomes a Docker name.
//! - [`docker`]: the engine seam (bollard, and an in-memory engine for simulations).
//! - [`secrets`]: gateway tokens and the key ring that seals them.
//! - [`config`], [`image_ref`]: typed settings and their validation;
//!   [`quote`]: untrusted text quoted and cut for messages.
//! - [`isolation`]: how containers are kept apart (capabilities, logs, network).
//! - [`clock`]: the one clock deadlines, back-offs and quarantines read.
//! - [`probe`]: whether a user's gateway answers on its published port.
//! - [`leader`], [`heartbeat`]: who reconciles, and how readers know one does.
//! - [`cli`]: the command line.

pub mod cli;
pub mod clock;
pub mod config;
pub mod controller;
pub mod desired;
pub mod docker;
pub mod events;
pub mod feed;
pub mod heartbeat;
pub mod http;
pub mod image_ref;
pub mod isolation;
pub mod leader;
pub mod metrics;
pub mod naming;
pub mod nudge;
pub mod plan;
pub mod ports;
pub mod probe;
pub mod progress;
pub mod queue;
pub mod quote;
pub mod reconcile;
pub mod resync;
pub mod secrets;
pub mod spec;
pub mod status;
pub mod store;
pub mod view;
