//! Images: the user an image runs as, and what a failed pull means.

use bollard::errors::Error as BollardError;

use super::errors::{error_chain, is_transport};
use super::DockerEngine;
use crate::docker::EngineError;
use crate::image_ref::ImageRef;

impl DockerEngine {
    /// The user an image's entrypoint runs as (`Config.User`, empty for
    /// root); `None` when the image is not present.
    pub async fn image_user(&self, image: &str) -> Result<Option<String>, EngineError> {
        if ImageRef::parse(image).is_err() {
            return Ok(None);
        }
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(Some(
                inspect.config.and_then(|c| c.user).unwrap_or_default(),
            )),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("image inspect", image, err)),
        }
    }
}

/// A pull failure: the engine's refusal, at any point of the pull, means the
/// image cannot be had; only a lost connection is something else.
pub(super) fn pull_failed(host: &str, image: &str, err: BollardError) -> EngineError {
    match err {
        BollardError::DockerResponseServerError { message, .. }
        | BollardError::DockerStreamError { error: message } => EngineError::ImageNotFound {
            image: image.to_owned(),
            message,
        },
        err if is_transport(&err) => EngineError::Unreachable {
            host: host.to_owned(),
            message: error_chain(&err),
        },
        err => EngineError::ImageNotFound {
            image: image.to_owned(),
            message: error_chain(&err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::server_error;
    use super::*;

    #[test]
    fn a_pull_refusal_at_any_point_is_image_not_found() {
        let refused = pull_failed("h", "a:1", server_error(500, "no such host"));
        assert!(matches!(refused, EngineError::ImageNotFound { .. }));
        let mid_stream = pull_failed(
            "h",
            "a:1",
            BollardError::DockerStreamError {
                error: "manifest unknown".to_owned(),
            },
        );
        assert!(
            matches!(mid_stream, EngineError::ImageNotFound { ref message, .. } if message == "manifest unknown")
        );
        let lost = pull_failed("h", "a:1", BollardError::RequestTimeoutError);
        assert!(matches!(lost, EngineError::Unreachable { .. }));
    }
}
