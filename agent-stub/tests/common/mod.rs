//! Helpers shared by the integration tests: a tiny HTTP client and deadline polling.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Status and body of an HTTP response.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body, checked against `Content-Length`.
    pub body: String,
}

/// Sends one `Connection: close` request to `addr`, with a bearer token if given.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw).ok_or_else(|| {
        let text = String::from_utf8_lossy(&raw);
        io::Error::new(io::ErrorKind::InvalidData, format!("bad response {text:?}"))
    })
}

/// Sends raw bytes to `addr` and returns the status code of the answer.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(bytes)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad response"))
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let length: usize = lines
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .parse()
        .ok()?;
    let json = head.contains("\r\nContent-Type: application/json\r\n");
    (json && length == body.len()).then(|| Reply {
        status,
        body: body.to_owned(),
    })
}

/// Calls `probe` every 100 ms until it returns `Ok`, and returns that value; panics with
/// the last `Err` once `timeout` has passed.
pub fn wait_for<T, E: Display>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The value of `"key":<value>` in a flat JSON object, as it is written.
pub fn json_field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let start = body.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &body[start..];
    let end = if let Some(string) = rest.strip_prefix('"') {
        string.find('"')? + 2
    } else {
        rest.find([',', '}'])?
    };
    Some(&rest[..end])
}
