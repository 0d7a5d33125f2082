//! The stub's endpoints: what each request is answered with.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::http::{json_opt_string, Request, Response};

/// What the server does once the response has been sent.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Exit the process with this code (`POST /v1/exit`).
    Exit(i32),
}

/// The stub's state: fixed at start, except for the health flag.
#[derive(Debug)]
pub struct App {
    token: String,
    agent_id: Option<String>,
    mosaic_api_url: Option<String>,
    agent_token_matches: bool,
    boots: u64,
    unhealthy: AtomicBool,
}

impl App {
    /// An app that authenticates with `token` and reports `boots` boots.
    pub fn new(
        token: String,
        agent_id: Option<String>,
        mosaic_api_url: Option<String>,
        agent_token: Option<&str>,
        boots: u64,
    ) -> Self {
        let agent_token_matches =
            agent_token.is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes()));
        Self {
            token,
            agent_id,
            mosaic_api_url,
            agent_token_matches,
            boots,
            unhealthy: AtomicBool::new(false),
        }
    }

    /// Answers `request`.
    pub fn handle(&self, request: &Request) -> (Response, After) {
        let path = request.path.as_str();
        let (allowed, needs_auth) = match path {
            "/healthz" | "/readyz" => ("GET", false),
            "/v1/whoami" => ("GET", true),
            "/v1/unhealthy" | "/v1/exit" => ("POST", true),
            _ => return (Response::error(404, "not found"), After::Continue),
        };
        if request.method != allowed {
            let response = Response::error(405, "method not allowed").with_header("Allow", allowed);
            return (response, After::Continue);
        }
        if needs_auth && !self.authorized(request) {
            let response =
                Response::error(401, "unauthorized").with_header("WWW-Authenticate", "Bearer");
            return (response, After::Continue);
        }
        let response = match path {
            "/healthz" if self.unhealthy.load(Ordering::SeqCst) => {
                Response::json(503, r#"{"status":"unhealthy"}"#)
            }
            "/healthz" => Response::json(200, r#"{"status":"ok"}"#),
            "/readyz" => Response::json(200, r#"{"status":"ready"}"#),
            "/v1/whoami" => Response::json(200, self.whoami()),
            "/v1/unhealthy" => {
                self.unhealthy.store(true, Ordering::SeqCst);
                Response::json(200, r#"{"status":"unhealthy"}"#)
            }
            _ => {
                let code = match request.query_param("code") {
                    None => 1,
                    Some(code) => match code.parse::<u8>() {
                        Ok(code) => i32::from(code),
                        Err(_) => {
                            let message = "code must be an integer from 0 to 255";
                            return (Response::error(400, message), After::Continue);
                        }
                    },
                };
                let body = format!(r#"{{"status":"exiting","code":{code}}}"#);
                return (Response::json(200, body), After::Exit(code));
            }
        };
        (response, After::Continue)
    }

    /// Whether `request` carries `Authorization: Bearer <the gateway token>`.
    fn authorized(&self, request: &Request) -> bool {
        request
            .bearer_token()
            .is_some_and(|t| ct_eq(t.as_bytes(), self.token.as_bytes()))
    }

    /// The body of `GET /v1/whoami`. Never includes the token itself.
    fn whoami(&self) -> String {
        format!(
            r#"{{"agent_id":{},"boots":{},"mosaic_api_url":{},"agent_token_matches":{}}}"#,
            json_opt_string(self.agent_id.as_deref()),
            self.boots,
            json_opt_string(self.mosaic_api_url.as_deref()),
            self.agent_token_matches,
        )
    }
}

/// Compares two byte strings in time that depends only on their lengths, not on the
/// position of the first difference, so a token cannot be guessed byte by byte.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok\"en";

    fn app() -> App {
        App::new(
            TOKEN.into(),
            Some("agent \"7\"".into()),
            None,
            Some(TOKEN),
            3,
        )
    }

    fn request(method: &str, target: &str, token: Option<&str>) -> Request {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        Request {
            method: method.into(),
            path: path.into(),
            query,
            headers: token
                .map(|t| vec![("Authorization".to_owned(), format!("Bearer {t}"))])
                .unwrap_or_default(),
        }
    }

    fn call(app: &App, method: &str, target: &str, token: Option<&str>) -> (u16, String, After) {
        let (response, after) = app.handle(&request(method, target, token));
        (response.status, response.body, after)
    }

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret\0"));
        assert!(!ct_eq(b"secret", b"secre"));
        assert!(!ct_eq(b"", b"x"));
    }

    #[test]
    fn probes_need_no_token() {
        let app = app();
        assert_eq!(call(&app, "GET", "/healthz", None).1, r#"{"status":"ok"}"#);
        assert_eq!(
            call(&app, "GET", "/readyz", None).1,
            r#"{"status":"ready"}"#
        );
    }

    #[test]
    fn whoami_requires_the_token() {
        let app = app();
        assert_eq!(call(&app, "GET", "/v1/whoami", None).0, 401);
        assert_eq!(call(&app, "GET", "/v1/whoami", Some("tok")).0, 401);
        let (status, body, _) = call(&app, "GET", "/v1/whoami", Some(TOKEN));
        assert_eq!(status, 200);
        assert_eq!(
            body,
            r#"{"agent_id":"agent \"7\"","boots":3,"mosaic_api_url":null,"agent_token_matches":true}"#
        );
        assert!(!body.contains(TOKEN));
    }

    #[test]
    fn agent_token_mismatch_is_reported() {
        let app = App::new("a".into(), None, Some("http://m".into()), Some("b"), 1);
        let (_, body, _) = call(&app, "GET", "/v1/whoami", Some("a"));
        assert_eq!(
            body,
            r#"{"agent_id":null,"boots":1,"mosaic_api_url":"http://m","agent_token_matches":false}"#
        );
        let app = App::new("a".into(), None, None, None, 1);
        assert!(call(&app, "GET", "/v1/whoami", Some("a"))
            .1
            .ends_with(":false}"));
    }

    #[test]
    fn unhealthy_turns_healthz_to_503() {
        let app = app();
        assert_eq!(call(&app, "POST", "/v1/unhealthy", None).0, 401);
        assert_eq!(call(&app, "GET", "/healthz", None).0, 200);
        assert_eq!(call(&app, "POST", "/v1/unhealthy", Some(TOKEN)).0, 200);
        assert_eq!(call(&app, "GET", "/healthz", None).0, 503);
        assert_eq!(call(&app, "GET", "/readyz", None).0, 200);
    }

    #[test]
    fn exit_takes_a_code() {
        let app = app();
        assert_eq!(call(&app, "POST", "/v1/exit", None).2, After::Continue);
        assert_eq!(
            call(&app, "POST", "/v1/exit", Some(TOKEN)).2,
            After::Exit(1)
        );
        assert_eq!(
            call(&app, "POST", "/v1/exit?code=0", Some(TOKEN)).2,
            After::Exit(0)
        );
        assert_eq!(
            call(&app, "POST", "/v1/exit?code=255", Some(TOKEN)).2,
            After::Exit(255)
        );
        for bad in ["/v1/exit?code=256", "/v1/exit?code=-1", "/v1/exit?code="] {
            let (status, _, after) = call(&app, "POST", bad, Some(TOKEN));
            assert_eq!((status, after), (400, After::Continue), "{bad}");
        }
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let app = app();
        let (status, body, _) = call(&app, "GET", "/nope", Some(TOKEN));
        assert_eq!((status, body.as_str()), (404, r#"{"error":"not found"}"#));
        let (response, _) = app.handle(&request("POST", "/healthz", None));
        assert_eq!(response.status, 405);
        assert_eq!(response.extra_header, Some(("Allow", "GET")));
        assert_eq!(call(&app, "GET", "/v1/exit", Some(TOKEN)).0, 405);
        assert_eq!(call(&app, "DELETE", "/v1/whoami", Some(TOKEN)).0, 405);
    }
}
