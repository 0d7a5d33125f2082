//! Whether a user's gateway answers on its published port (README "JSON
//! API", `ensure-running`): an HTTP GET of a path, or a TCP connect.
//!
//! `ensure-running` answers as soon as the gateway does, rather than when
//! Docker's health check first reports healthy (one full `interval` after
//! start, 30 s by Docker's default). The same HTTP GET serves
//! `clawfleet healthcheck`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use axum::body::Body;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The pause between two attempts.
pub const ATTEMPT_INTERVAL: Duration = Duration::from_millis(50);

/// How the gateway is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `GET <path>`: any answer below 500 means the gateway is up.
    Http {
        /// The path, starting with `/`.
        path: String,
    },
    /// A TCP connection that opens.
    Tcp,
}

impl ProbeKind {
    /// The probe `--readiness-probe` names, with `--readiness-path` for HTTP.
    pub fn new(kind: ProbeMode, path: &ProbePath) -> Self {
        match kind {
            ProbeMode::Http => Self::Http {
                path: path.0.clone(),
            },
            ProbeMode::Tcp => Self::Tcp,
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http { path } => write!(f, "GET {path}"),
            Self::Tcp => f.write_str("a TCP connect"),
        }
    }
}

/// `--readiness-probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// An HTTP GET of `--readiness-path`.
    Http,
    /// A TCP connect.
    Tcp,
}

/// `--readiness-path`: an absolute path, printable ASCII without spaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePath(String);

impl FromStr for ProbePath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('/') && s.len() <= 1024 && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a path: it starts with / and holds printable characters without spaces"
            ))
        }
    }
}

/// A gateway probe: how, and on which host address the ports are published.
#[derive(Clone, Debug)]
pub struct GatewayProbe {
    /// How.
    pub kind: ProbeKind,
    /// The host address (`--publish-ip`; loopback when unspecified).
    pub host: IpAddr,
}

impl GatewayProbe {
    /// A probe of ports published on `publish_ip`.
    pub fn new(kind: ProbeKind, publish_ip: IpAddr) -> Self {
        Self {
            kind,
            host: reachable(publish_ip),
        }
    }

    /// One attempt on `port`: `Ok` when the gateway answered, else why not.
    pub async fn attempt(&self, port: u16) -> Result<(), String> {
        let addr = SocketAddr::new(self.host, port);
        match &self.kind {
            ProbeKind::Tcp => tokio::time::timeout(ATTEMPT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("{addr}: no connection within {ATTEMPT_TIMEOUT:?}"))?
                .map(drop)
                .map_err(|e| format!("{addr}: {e}")),
            ProbeKind::Http { path } => match http_get(addr, path, ATTEMPT_TIMEOUT).await? {
                code if code < 500 => Ok(()),
                code => Err(format!("{addr}: GET {path} answered {code}")),
            },
        }
    }
}

/// The loopback address of `ip`'s family when `ip` is unspecified
/// (`0.0.0.0`, `::`): a listener there is reached on loopback.
pub fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(v6) if v6.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    }
}

/// `GET path` on `addr` over HTTP/1.1: the status code, or why there is none.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string());
        driver.abort();
        answer.map(|response| response.status().as_u16())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| format!("{addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A listener answering every connection with `status_line`.
    async fn server(status_line: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(format!("{status_line}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    fn http(path: &str) -> GatewayProbe {
        GatewayProbe::new(
            ProbeKind::Http { path: path.into() },
            "0.0.0.0".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn an_http_answer_below_500_is_up_and_a_5xx_or_silence_is_not() {
        let up = server("HTTP/1.1 404 Not Found").await;
        assert_eq!(http("/healthz").attempt(up).await, Ok(()));
        let down = server("HTTP/1.1 503 Service Unavailable").await;
        let err = http("/healthz").attempt(down).await.unwrap_err();
        assert!(err.contains("GET /healthz answered 503"), "{err}");
        // Nothing listens on a port just released.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(http("/healthz").attempt(port).await.is_err());
    }

    #[tokio::test]
    async fn a_tcp_probe_needs_only_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = GatewayProbe::new(ProbeKind::Tcp, "127.0.0.1".parse().unwrap());
        assert_eq!(probe.attempt(port).await, Ok(()));
        drop(listener);
        assert!(probe.attempt(port).await.is_err());
    }

    #[test]
    fn a_path_starts_with_a_slash_and_has_no_spaces() {
        assert!("/healthz".parse::<ProbePath>().is_ok());
        assert!("/a/b?x=1".parse::<ProbePath>().is_ok());
        for bad in ["healthz", "/a b", "", "/a\nb"] {
            assert!(bad.parse::<ProbePath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unspecified_publish_address_is_probed_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0".parse().unwrap()),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            reachable("::".parse().unwrap()),
            IpAddr::from(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            reachable("10.1.2.3".parse().unwrap()).to_string(),
            "10.1.2.3"
        );
    }
}
