//! Just enough HTTP/1.1 for the stub: read and parse a request head, write a
//! `Connection: close` JSON response, and read the status of a response (for
//! `agent-stub healthcheck`). Request bodies are never read.

use std::fmt::Write as _;
use std::io::{self, Read, Write};

/// Largest request head (request line plus headers) the stub accepts.
pub const MAX_HEAD: usize = 16 * 1024;

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target up to any `?`, e.g. `/v1/exit`.
    pub path: String,
    /// The part of the request target after the first `?`, if any.
    pub query: Option<String>,
    /// Header names and values in arrival order, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header, if there is one.
    pub fn bearer_token(&self) -> Option<&str> {
        let (scheme, token) = self.header("authorization")?.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }

    /// The value of query parameter `name`, without any percent-decoding.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

/// Why no request could be parsed from a connection.
#[derive(Debug)]
pub enum ReadError {
    /// The connection failed, timed out or closed early: there is no one to answer.
    Closed,
    /// The head is longer than [`MAX_HEAD`]: answer 431.
    TooLarge,
    /// The head is not HTTP/1.x: answer 400 with this reason.
    Malformed(&'static str),
}

/// Reads from `reader` up to the blank line that ends a request head, and returns the
/// head without that blank line. Bytes after it (a body) may have been consumed too.
pub fn read_head(reader: &mut impl Read) -> Result<Vec<u8>, ReadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Closed),
        };
        // The terminator may straddle two reads: look back three bytes.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at;
            if end > MAX_HEAD {
                return Err(ReadError::TooLarge);
            }
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(ReadError::TooLarge);
        }
    }
}

/// Parses a request head as returned by [`read_head`].
pub fn parse_head(head: &[u8]) -> Result<Request, ReadError> {
    let malformed = ReadError::Malformed;
    let text = std::str::from_utf8(head).map_err(|_| malformed("request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("request line is not `METHOD TARGET VERSION`"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(malformed("bad method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(malformed("request target must be an absolute path"));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(malformed("only HTTP/1.x is supported"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(malformed("header line without a colon"));
        };
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(malformed("bad header name"));
        }
        headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        headers,
    })
}

/// A JSON response; always sent with `Connection: close`.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// An extra header, e.g. `("Allow", "GET")`.
    pub extra_header: Option<(&'static str, &'static str)>,
    /// The JSON body.
    pub body: String,
}

impl Response {
    /// A response with `status` and the JSON `body`.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            extra_header: None,
            body: body.into(),
        }
    }

    /// A response whose body is `{"error": <message>}`.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, format!("{{\"error\":{}}}", json_string(message)))
    }

    /// This response with an extra header.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.extra_header = Some((name, value));
        self
    }

    /// The response as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        if let Some((name, value)) = self.extra_header {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }

    /// Writes the response to `writer` and flushes it.
    pub fn write_to(&self, writer: &mut impl Write) -> io::Result<()> {
        writer.write_all(&self.to_bytes())?;
        writer.flush()
    }
}

/// The reason phrase for the status codes the stub uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The status code in the status line of an HTTP/1.x response.
pub fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.trim_end_matches('\r');
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

/// `s` as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` as a JSON string literal, or `null` when there is none.
pub fn json_opt_string(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_owned(), json_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &str) -> Result<Request, ReadError> {
        let head = read_head(&mut Cursor::new(raw.as_bytes()))?;
        parse_head(&head)
    }

    fn malformed(raw: &str) -> bool {
        matches!(parse(raw), Err(ReadError::Malformed(_)))
    }

    #[test]
    fn parses_request_line_and_headers() {
        let req = parse(
            "POST /v1/exit?code=3&x HTTP/1.1\r\nHost: a\r\nAUTHORIZATION:  bearer s3cret \r\n\r\nbody",
        )
        .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/exit");
        assert_eq!(req.query.as_deref(), Some("code=3&x"));
        assert_eq!(req.query_param("code"), Some("3"));
        assert_eq!(req.query_param("x"), Some(""));
        assert_eq!(req.query_param("y"), None);
        assert_eq!(req.header("host"), Some("a"));
        assert_eq!(req.bearer_token(), Some("s3cret"));
    }

    #[test]
    fn bearer_token_needs_the_bearer_scheme_and_a_token() {
        let with = |value: &str| Request {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            headers: vec![("Authorization".into(), value.into())],
        };
        assert_eq!(with("Basic abc").bearer_token(), None);
        assert_eq!(with("Bearer").bearer_token(), None);
        assert_eq!(with("Bearer  ").bearer_token(), None);
        assert_eq!(with("Bearer a b").bearer_token(), Some("a b"));
    }

    #[test]
    fn head_terminator_split_across_reads_is_found() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = first;
                self.0 = rest;
                Ok(1)
            }
        }
        let head = read_head(&mut Trickle(b"GET / HTTP/1.0\r\nA: b\r\n\r\nrest")).unwrap();
        assert_eq!(head, b"GET / HTTP/1.0\r\nA: b");
    }

    #[test]
    fn rejects_malformed_heads() {
        assert!(malformed("GET /\r\n\r\n"));
        assert!(malformed("GET / HTTP/1.1 extra\r\n\r\n"));
        assert!(malformed("GET  / HTTP/1.1\r\n\r\n"));
        assert!(malformed("G3T / HTTP/1.1\r\n\r\n"));
        assert!(malformed("GET http://x/ HTTP/1.1\r\n\r\n"));
        assert!(malformed("GET / HTTP/2\r\n\r\n"));
        assert!(malformed("GET / HTTP/1.1\r\nno colon\r\n\r\n"));
        assert!(malformed("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"));
        assert!(malformed("GET / HTTP/1.1\r\n folded: x\r\n\r\n"));
        assert!(malformed("GET /\u{7f} HTTP/1.1\r\n\r\n"));
        assert!(matches!(
            parse_head(b"GET /\xff HTTP/1.1"),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn early_eof_and_oversized_heads_are_errors() {
        assert!(matches!(parse(""), Err(ReadError::Closed)));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\n"),
            Err(ReadError::Closed)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(&big), Err(ReadError::TooLarge)));
        let endless = "a".repeat(3 * MAX_HEAD);
        assert!(matches!(parse(&endless), Err(ReadError::TooLarge)));
    }

    #[test]
    fn response_has_correct_length_and_headers() {
        let body = "{\"s\":\"é\"}";
        let bytes = Response::json(405, body)
            .with_header("Allow", "GET")
            .to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(rest, body);
        assert!(head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(head.contains("\r\nContent-Type: application/json\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(head.contains("\r\nConnection: close\r\n"));
        assert!(head.ends_with("\r\nAllow: GET"));
        assert_eq!(parse_status(text.as_bytes()), Some(405));
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_status(b"SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(json_string("plain"), r#""plain""#);
        assert_eq!(json_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(json_string("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(json_string("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(json_string("ü/</script>"), "\"ü/</script>\"");
        assert_eq!(json_opt_string(None), "null");
        assert_eq!(json_opt_string(Some("x")), r#""x""#);
    }
}
