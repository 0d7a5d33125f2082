//! A tiny HTTP/1.1 client for the controller's listener: one request per
//! connection (`Connection: close`), an optional bearer token and JSON body,
//! the answer's status, headers and body. Path segments are percent-encoded
//! here, so a test can name any user id.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take before the test fails (ensure-running waits up to 5 min).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);

/// A client of one listener, with or without a bearer token.
#[derive(Clone, Debug)]
pub struct Client {
    addr: SocketAddr,
    /// The whole `Authorization` header value, if any.
    authorization: Option<String>,
}

/// An answer.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased, in order.
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
            addr,
            authorization: token.map(|t| format!("Bearer {t}")),
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self::new(self.addr, token)
    }

    /// The same client sending `value` as its whole `Authorization` header.
    pub fn with_authorization(&self, value: &str) -> Self {
        Self {
            addr: self.addr,
            authorization: Some(value.to_owned()),
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

    /// Any request, with `body` sent as it is (as `application/json`).
    pub async fn send(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let what = format!("{method} {path}");
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, String> {
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.addr
        );
        if let Some(value) = &self.authorization {
            request.push_str(&format!("Authorization: {value}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_reply(&raw)
    }
}

fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        text: String::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?,
    })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without an end")?;
        let size_text = String::from_utf8_lossy(&body[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("chunk without its line end")?;
    }
}
