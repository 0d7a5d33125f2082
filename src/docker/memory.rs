//! An in-memory [`Engine`](super::Engine) for simulations and property tests.

/// A Docker engine simulated in memory.
#[derive(Debug, Default)]
pub struct MemoryEngine {}

/// The engine operations, for counting calls and injecting failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {}
