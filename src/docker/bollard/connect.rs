//! From a `DOCKER_HOST` value to a connected, version-negotiated client, read
//! as the docker CLI reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bollard::{Docker, API_DEFAULT_VERSION};

use super::errors::error_chain;
use super::{DockerEngine, DEFAULT_DOCKER_HOST, REQUEST_TIMEOUT};
use crate::docker::EngineError;

/// Port of a plain-HTTP engine endpoint named without one (as the docker CLI assumes).
const DEFAULT_HTTP_PORT: u16 = 2375;
/// Port of a TLS engine endpoint named without one.
const DEFAULT_TLS_PORT: u16 = 2376;

/// Where the engine listens, as parsed from a `DOCKER_HOST` value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Endpoint {
    /// A Unix socket path.
    Unix(String),
    /// `host:port` over plain HTTP.
    Http(String),
    /// `host:port` over TLS with client certificates.
    Https(String),
}

impl DockerEngine {
    /// Connects to `docker_host` and negotiates the API version down to what
    /// the engine speaks.
    ///
    /// `docker_host` is read as the docker CLI reads `DOCKER_HOST`:
    /// `unix:///path`, `tcp://host[:port]` (plain HTTP, or TLS when
    /// `DOCKER_TLS_VERIFY` is set), `http://host[:port]`, `https://host[:port]`,
    /// a socket path, or empty for [`DEFAULT_DOCKER_HOST`]. TLS takes `ca.pem`,
    /// `cert.pem` and `key.pem` from `DOCKER_CERT_PATH` (default `~/.docker`).
    pub async fn connect(docker_host: &str) -> Result<Self, EngineError> {
        let host = match docker_host.trim() {
            "" => DEFAULT_DOCKER_HOST.to_owned(),
            trimmed => trimmed.to_owned(),
        };
        let invalid = |message: String| EngineError::Unreachable {
            host: host.clone(),
            message,
        };
        let tls_verify = std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty());
        let endpoint = parse_docker_host(&host, tls_verify).map_err(invalid)?;
        let timeout = REQUEST_TIMEOUT.as_secs();
        let docker = match &endpoint {
            Endpoint::Unix(path) => Docker::connect_with_unix(path, timeout, API_DEFAULT_VERSION),
            Endpoint::Http(authority) => {
                Docker::connect_with_http(authority, timeout, API_DEFAULT_VERSION)
            }
            Endpoint::Https(authority) => {
                let dir = cert_dir().map_err(invalid)?;
                let (ca, cert, key) = tls_files(&dir).map_err(invalid)?;
                Docker::connect_with_ssl(authority, &key, &cert, &ca, timeout, API_DEFAULT_VERSION)
            }
        }
        .map_err(|err| invalid(error_chain(&err)))?;
        let engine = Self {
            docker,
            host,
            network_creation: Arc::default(),
            overlay: false,
        };
        let docker = engine
            .docker
            .clone()
            .negotiate_version()
            .await
            .map_err(|err| engine.fail("version negotiation", "engine", err))?;
        let engine = Self { docker, ..engine };
        tracing::debug!(
            host = %engine.host,
            api_version = %engine.docker.client_version(),
            "connected to docker engine"
        );
        Ok(engine)
    }

    /// The endpoint as configured (what [`EngineError::Unreachable`] names).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }
}

/// Reads a `DOCKER_HOST` value (already defaulted when empty).
fn parse_docker_host(host: &str, tls_verify: bool) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = host.split_once("://") else {
        // The docker CLI reads a bare value as TCP; a value with a slash can
        // only be meant as a socket path.
        return if host.contains('/') {
            Ok(Endpoint::Unix(host.to_owned()))
        } else {
            tcp_endpoint(host, tls_verify)
        };
    };
    match scheme {
        "unix" if rest.is_empty() => Err("unix:// needs a socket path".to_owned()),
        "unix" => Ok(Endpoint::Unix(rest.to_owned())),
        "tcp" => tcp_endpoint(rest, tls_verify),
        "http" => Ok(Endpoint::Http(authority(rest, DEFAULT_HTTP_PORT)?)),
        "https" => Ok(Endpoint::Https(authority(rest, DEFAULT_TLS_PORT)?)),
        other => Err(format!(
            "unsupported DOCKER_HOST scheme `{other}://` (use unix://, tcp://, http://, https:// or a socket path)"
        )),
    }
}

/// A `tcp://` endpoint: TLS when `DOCKER_TLS_VERIFY` asks for it, as the docker CLI does.
fn tcp_endpoint(rest: &str, tls_verify: bool) -> Result<Endpoint, String> {
    if tls_verify {
        Ok(Endpoint::Https(authority(rest, DEFAULT_TLS_PORT)?))
    } else {
        Ok(Endpoint::Http(authority(rest, DEFAULT_HTTP_PORT)?))
    }
}

/// `host:port` from what follows the scheme, with the default port added when missing.
fn authority(rest: &str, default_port: u16) -> Result<String, String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("no host given".to_owned());
    }
    if rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace) {
        return Err(format!("`{rest}` is not a host[:port]"));
    }
    // A colon after an IPv6 literal's closing bracket (or in a name) starts the port.
    let host_end = rest.rfind(']').map_or(0, |i| i + 1);
    match rest[host_end..].rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(rest.to_owned()),
        Some((_, port)) => Err(format!("`{port}` is not a port number")),
        None => Ok(format!("{rest}:{default_port}")),
    }
}

/// The folder holding the TLS files, as the docker CLI finds it.
fn cert_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("DOCKER_CERT_PATH").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker"))
        .ok_or_else(|| "TLS needs DOCKER_CERT_PATH (or HOME for ~/.docker)".to_owned())
}

/// `ca.pem`, `cert.pem` and `key.pem` of `dir`, each checked to exist, so a
/// missing file is named now rather than surfacing as a handshake failure.
fn tls_files(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let file = |name: &str| {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "TLS needs {} (ca.pem, cert.pem and key.pem in DOCKER_CERT_PATH)",
                path.display()
            ))
        }
    };
    Ok((file("ca.pem")?, file("cert.pem")?, file("key.pem")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_forms_are_read_as_the_docker_cli_reads_them() {
        let unix = |p: &str| Ok(Endpoint::Unix(p.to_owned()));
        let http = |a: &str| Ok(Endpoint::Http(a.to_owned()));
        let https = |a: &str| Ok(Endpoint::Https(a.to_owned()));
        assert_eq!(
            parse_docker_host("unix:///var/run/docker.sock", false),
            unix("/var/run/docker.sock")
        );
        assert_eq!(
            parse_docker_host("/var/run/docker.sock", false),
            unix("/var/run/docker.sock")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1:2375", false),
            http("10.0.0.1:2375")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1", false),
            http("10.0.0.1:2375")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1", true),
            https("10.0.0.1:2376")
        );
        assert_eq!(
            parse_docker_host("http://docker:2375/", false),
            http("docker:2375")
        );
        assert_eq!(
            parse_docker_host("https://docker", false),
            https("docker:2376")
        );
        assert_eq!(
            parse_docker_host("tcp://[::1]:2375", false),
            http("[::1]:2375")
        );
        assert_eq!(parse_docker_host("tcp://[::1]", false), http("[::1]:2375"));
        assert_eq!(
            parse_docker_host("localhost:2375", false),
            http("localhost:2375")
        );
    }

    #[test]
    fn bad_docker_hosts_are_refused_with_a_reason() {
        for bad in [
            "ssh://user@host",
            "npipe:////./pipe/docker_engine",
            "unix://",
            "tcp://",
            "tcp://host:port",
            "tcp://host:0",
            "tcp://host:2375/path",
        ] {
            let err = parse_docker_host(bad, false).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
        let err = parse_docker_host("ssh://user@host", false).unwrap_err();
        assert!(err.contains("ssh://"), "{err}");
    }

    #[tokio::test]
    pub(super) async fn connect_names_the_host_it_could_not_use() {
        for host in ["ftp://example", "unix:///nonexistent/docker.sock"] {
            match DockerEngine::connect(host).await {
                Err(EngineError::Unreachable {
                    host: named,
                    message,
                }) => {
                    assert_eq!(named, host);
                    assert!(!message.is_empty());
                }
                other => panic!("{host}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_tls_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = tls_files(dir.path()).unwrap_err();
        assert!(err.contains("ca.pem"), "{err}");
        for name in ["ca.pem", "cert.pem"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        let err = tls_files(dir.path()).unwrap_err();
        assert!(err.contains("key.pem"), "{err}");
        std::fs::write(dir.path().join("key.pem"), "x").expect("write");
        assert!(tls_files(dir.path()).is_ok());
    }
}
