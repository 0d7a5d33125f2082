//! The engine operations, named once for metrics and for simulated engines.

#[cfg(doc)]
use super::Engine;

/// The engine operations: the calls of [`Engine`], one for each method, as
/// metrics label them and a simulated engine counts and fails them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Engine::version`].
    Version,
    /// [`Engine::list_containers`].
    List,
    /// [`Engine::inspect_container`].
    Inspect,
    /// [`Engine::create_container`].
    Create,
    /// [`Engine::start_container`].
    Start,
    /// [`Engine::stop_container`].
    Stop,
    /// [`Engine::restart_container`].
    Restart,
    /// [`Engine::remove_container`].
    Remove,
    /// [`Engine::rename_container`].
    Rename,
    /// [`Engine::ensure_volume`].
    EnsureVolume,
    /// [`Engine::inspect_volume`].
    InspectVolume,
    /// [`Engine::ensure_network`].
    EnsureNetwork,
    /// [`Engine::inspect_network`].
    InspectNetwork,
    /// [`Engine::image_present`].
    ImagePresent,
    /// [`Engine::pull_image`].
    Pull,
    /// [`Engine::events`].
    Events,
    /// [`Engine::update_container`].
    Update,
    /// [`Engine::pin_container`].
    Pin,
}

impl Op {
    /// Every operation, in declaration order.
    pub const ALL: [Op; 18] = [
        Op::Version,
        Op::List,
        Op::Inspect,
        Op::Create,
        Op::Start,
        Op::Stop,
        Op::Restart,
        Op::Remove,
        Op::Rename,
        Op::EnsureVolume,
        Op::InspectVolume,
        Op::EnsureNetwork,
        Op::InspectNetwork,
        Op::ImagePresent,
        Op::Pull,
        Op::Events,
        Op::Update,
        Op::Pin,
    ];

    /// The operation's name in error messages (`start`, `volume create`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Version => "version",
            Op::List => "list",
            Op::Inspect => "inspect",
            Op::Create => "create",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::Remove => "remove",
            Op::Rename => "rename",
            Op::EnsureVolume => "volume create",
            Op::InspectVolume => "volume inspect",
            Op::EnsureNetwork => "network create",
            Op::InspectNetwork => "network inspect",
            Op::ImagePresent => "image inspect",
            Op::Pull => "pull",
            Op::Events => "events",
            Op::Update => "update",
            Op::Pin => "pin",
        }
    }
}
