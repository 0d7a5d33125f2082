//! Images: which are present locally, which the registry can give, which
//! have a health check, all keyed by Docker's normal form of a reference.

use super::state::State;
use super::MemoryEngine;

#[cfg(doc)]
use clawfleet::docker::Engine;

#[derive(Clone, Copy, Default)]
pub(super) struct ImageFlags {
    pub(super) present: bool,
    pub(super) pullable: bool,
    pub(super) healthcheck: bool,
}

/// The canonical form Docker stores an image under: `alpine` and
/// `docker.io/library/alpine:latest` are one image.
pub(super) fn normalize_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let (repository, tag) = match name.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag)),
        _ => (name, None),
    };
    let (domain, path) = match repository.split_once('/') {
        Some((domain, path))
            if domain.contains('.') || domain.contains(':') || domain == "localhost" =>
        {
            (domain, path)
        }
        _ => ("docker.io", repository),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let mut normalized = if domain == "docker.io" && !path.contains('/') {
        format!("{domain}/library/{path}")
    } else {
        format!("{domain}/{path}")
    };
    match (tag, digest) {
        (Some(tag), _) => {
            normalized.push(':');
            normalized.push_str(tag);
        }
        (None, None) => normalized.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(digest) = digest {
        normalized.push('@');
        normalized.push_str(digest);
    }
    normalized
}

impl State {
    pub(super) fn image_mut(&mut self, image: &str) -> &mut ImageFlags {
        self.images.entry(normalize_image(image)).or_default()
    }
}

impl MemoryEngine {
    /// Makes `image` present locally (as after a build or a pull).
    pub fn add_image(&self, image: &str) {
        self.lock().image_mut(image).present = true;
    }

    /// Removes `image` like `docker rmi --force`: containers made from it
    /// keep running. Returns whether it was present.
    pub fn remove_image(&self, image: &str) -> bool {
        std::mem::take(&mut self.lock().image_mut(image).present)
    }

    /// Lets [`Engine::pull_image`] fetch `image` from the registry.
    pub fn make_pullable(&self, image: &str) {
        self.lock().image_mut(image).pullable = true;
    }

    /// Says whether `image` has a Docker HEALTHCHECK; containers created from
    /// it afterwards report health `starting` once started.
    pub fn set_image_healthcheck(&self, image: &str, has_healthcheck: bool) {
        self.lock().image_mut(image).healthcheck = has_healthcheck;
    }

    /// The images present locally, normalized (`docker.io/library/alpine:latest`), sorted.
    pub fn images(&self) -> Vec<String> {
        let state = self.lock();
        let mut images: Vec<String> = state
            .images
            .iter()
            .filter(|(_, flags)| flags.present)
            .map(|(image, _)| image.clone())
            .collect();
        images.sort();
        images
    }
}

#[cfg(test)]
mod tests {
    use crate::fixtures::*;
    use crate::MemoryEngine;
    use clawfleet::docker::{Engine, EngineError};

    #[tokio::test]
    async fn images_are_matched_in_docker_s_normal_form() {
        let engine = MemoryEngine::new();
        engine.add_image("alpine");
        engine.add_image("ghcr.io/acme/agent:1.2");

        for present in [
            "alpine",
            "alpine:latest",
            "docker.io/library/alpine:latest",
            "library/alpine",
        ] {
            assert!(engine.image_present(present).await.unwrap(), "{present}");
        }
        for absent in ["alpine:3.20", "acme/agent:1.2", "ghcr.io/acme/agent"] {
            assert!(!engine.image_present(absent).await.unwrap(), "{absent}");
        }
        assert!(engine
            .image_present("ghcr.io/acme/agent:1.2")
            .await
            .unwrap());
        assert_eq!(
            engine.images(),
            ["docker.io/library/alpine:latest", "ghcr.io/acme/agent:1.2"]
        );
    }

    #[tokio::test]
    async fn pull_succeeds_only_for_pullable_images() {
        let engine = MemoryEngine::new();

        let error = engine.pull_image(IMAGE).await.unwrap_err();
        assert!(matches!(error, EngineError::ImageNotFound { .. }));
        assert!(!error.is_transient());
        assert!(!engine.image_present(IMAGE).await.unwrap());

        engine.make_pullable(IMAGE);
        engine.pull_image(IMAGE).await.unwrap();
        assert!(engine.image_present(IMAGE).await.unwrap());
    }

    #[tokio::test]
    async fn a_removed_image_blocks_new_containers_but_not_existing_ones() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;

        assert!(engine.remove_image(IMAGE));
        assert!(!engine.remove_image(IMAGE));

        let error = engine.create_container(&spec("bob")).await.unwrap_err();
        assert!(matches!(error, EngineError::ImageNotFound { .. }));
        engine.restart_container(&id, STOP).await.unwrap();
    }
}
