//! The one HTTP/1.1 client of the tests, on hyper: the controller's
//! listener, the gateways of the agent containers (TCP) and the Docker
//! engine's socket (Unix). One request per connection, as a fresh client
//! would send it; an optional `Authorization` header and JSON body; the
//! answer's status, headers and body, whatever its framing. Path segments are
//! percent-encoded by [`segment`], so a test can name any user id.
//!
//! [`Client`] is async; [`Client::blocking_send`] serves synchronous code
//! (a check inside a closure, a helper of a blocking test) by running the
//! request on a runtime of its own, as `reqwest::blocking` does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// How long one request may take by default (ensure-running waits up to 5 min).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);

/// Where a client connects.
#[derive(Clone, Debug)]
enum Endpoint {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A Unix socket (the engine's).
    Unix(PathBuf),
}

/// A client of one listener, with or without an `Authorization` header.
#[derive(Clone, Debug)]
pub struct Client {
    endpoint: Endpoint,
    /// The whole `Authorization` header value, if any.
    authorization: Option<String>,
    timeout: Duration,
}

/// An answer.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub text: String,
}

impl Reply {
    /// The body parsed as JSON (`Null` when empty); panics on anything else.
    pub fn json(&self) -> serde_json::Value {
        if self.text.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("answer {} is not JSON ({e}): {}", self.status, self.text))
    }

    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-encodes one path segment: everything but RFC 3986's unreserved characters.
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/v1/users/<encoded id><rest>`, e.g. `user_path("a/b", "/touch")`.
pub fn user_path(user_id: &str, rest: &str) -> String {
    format!("/v1/users/{}{rest}", segment(user_id))
}

impl Client {
    /// A client of `addr` sending `token` as its bearer token (none: no header).
    pub fn new(addr: SocketAddr, token: Option<&str>) -> Self {
        Self {
            endpoint: Endpoint::Tcp(addr),
            authorization: token.map(|t| format!("Bearer {t}")),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// A client of the Unix socket at `path`, without a token.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: Endpoint::Unix(path.into()),
            authorization: None,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            authorization: token.map(|t| format!("Bearer {t}")),
            ..self.clone()
        }
    }

    /// The same client sending `value` as its whole `Authorization` header.
    pub fn with_authorization(&self, value: &str) -> Self {
        Self {
            authorization: Some(value.to_owned()),
            ..self.clone()
        }
    }

    /// The same client giving up on a request after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.send("DELETE", path, None).await
    }

    /// `POST path` without a body.
    pub async fn post(&self, path: &str) -> Reply {
        self.send("POST", path, None).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.send("PUT", path, Some(&body.to_string())).await
    }

    /// Any request, with `body` sent as it is (as `application/json`);
    /// panics when no answer comes.
    pub async fn send(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.try_send(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Any request; why it got no answer (no connection, a broken answer,
    /// none within the timeout) as an error.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, String> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }

    /// [`Client::try_send`] for synchronous code: the request runs on a
    /// runtime of its own while the calling thread waits.
    pub fn blocking_send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, String> {
        static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        let runtime = RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("test-http-client")
                .enable_all()
                .build()
                .expect("the HTTP client's runtime")
        });
        let (client, method, path) = (self.clone(), method.to_owned(), path.to_owned());
        let body = body.map(str::to_owned);
        let (answer, reply) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = answer.send(client.try_send(&method, &path, body.as_deref()).await);
        });
        reply
            .recv()
            .unwrap_or_else(|_| Err("the request task ended without an answer".to_owned()))
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, String> {
        let (mut sender, host) = match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                (handshake(stream).await?, addr.to_string())
            }
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("connect {}: {e}", path.display()))?;
                (handshake(stream).await?, "localhost".to_owned())
            }
        };
        let body = body.unwrap_or("");
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(value) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, value);
        }
        if !body.is_empty() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request {method} {path}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("read: {e}"))?
            .to_bytes();
        let text =
            String::from_utf8(body.to_vec()).map_err(|e| format!("body is not UTF-8: {e}"))?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }
}

/// Opens an HTTP/1.1 connection on `stream`, driven by a task of its own
/// that ends when the connection closes.
async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
