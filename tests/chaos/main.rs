//! Chaos against the real engine and databases: a controller SIGKILLed at
//! random moments, the engine unreachable while containers are killed behind
//! its back, the database away for ten seconds, foreign processes on the
//! port range and an image that vanishes mid-creation, and a storm of
//! activity updates. Each test ends by checking that nothing was lost (see
//! `support::fleet`): every user has exactly one container, running or
//! stopped as wanted, on its own port, with its volume and its token, and no
//! container is left over.
//!
//! Bounded in time and size by default (CI); `make chaos-soak` runs the same
//! tests longer and bigger through these variables:
//! - `CHAOS_SEED`: the seed of the random choices (printed by every test
//!   that makes any, so a failure can be replayed); default: the clock;
//! - `CHAOS_ROUNDS`: SIGKILL rounds (default 5) and engine flaps (default 6);
//! - `CHAOS_USERS`: users of the SIGKILL test (default 50);
//! - `CHAOS_SECONDS`: length of the activity storm (default 30);
//! - `CHAOS_TOUCH_RATE`: activity updates per second in the storm (default 1000,
//!   from 4 writers on SQLite and 8 on PostgreSQL);
//! - `CHAOS_IDLE_TOLERANCE_MS`: how late an idle stop may be (default 2500).

#[path = "../support/mod.rs"]
mod support;

mod harness;

mod activity_storm;
mod database_outage;
mod engine_away;
mod foreign_ports;
mod sigkill;
