//! [`Engine`](super::Engine) on a real Docker engine, through bollard.

/// A Docker engine reached through bollard.
#[derive(Clone, Debug)]
pub struct DockerEngine {}
