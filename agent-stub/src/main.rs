//! `agent-stub`: a tiny, dependency-free stand-in for the OpenClaw gateway.
//!
//! clawfleet runs one OpenClaw gateway container per user. The machines clawfleet is
//! developed and tested on cannot pull images, so its tests and demo run this stub
//! instead, built into a `FROM scratch` image by `agent-stub/build-image.sh` (see
//! `deploy/agent-stub/Dockerfile`). It imitates what the controller relies on:
//!
//! * without `OPENCLAW_GATEWAY_TOKEN` it refuses to start, exiting with 78 (`EX_CONFIG`);
//! * it counts its boots in `<state dir>/boot-count`, so a test can tell whether the
//!   state volume survived a re-create;
//! * it serves HTTP on port 18789: `GET /healthz`, `GET /readyz`, and, with
//!   `Authorization: Bearer <OPENCLAW_GATEWAY_TOKEN>`, `GET /v1/whoami` (what it was
//!   started with), `POST /v1/unhealthy` (from then on `/healthz` answers 503) and
//!   `POST /v1/exit?code=N` (exit with N, default 1, to simulate a crash);
//! * `agent-stub healthcheck` exits 0 when `/healthz` answers 200, for the image's
//!   `HEALTHCHECK` (a scratch image has no shell and no curl);
//! * `agent-stub connect HOST:PORT` exits 0 when a TCP connection to HOST:PORT opens
//!   within 3 s and 1 when it does not (HOST may be a name the container resolves), so a
//!   test can ask from inside one agent's container whether another agent is reachable.
//!
//! Environment: `OPENCLAW_GATEWAY_TOKEN` (required), `OPENCLAW_GATEWAY_PORT` (default
//! 18789), `OPENCLAW_STATE_DIR` (default `/home/node/.openclaw`), and, reported by
//! `/v1/whoami`, `AGENT_ID`, `MOSAIC_API_URL` and `AGENT_TOKEN` (only whether it equals
//! the gateway token). The token is never written to a response or a log.

mod app;
mod boot;
mod http;

use std::env::{self, VarError};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use app::{After, App};
use http::{ReadError, Response};

const DEFAULT_PORT: u16 = 18789;
const DEFAULT_STATE_DIR: &str = "/home/node/.openclaw";
/// Connections served at once; further ones are closed unanswered.
const MAX_CONNECTIONS: usize = 256;
/// Read and write timeout of a served connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect, read and write timeout of `agent-stub healthcheck`.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(8);
/// Connect timeout of `agent-stub connect`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// sysexits.h: command line usage error.
const EX_USAGE: i32 = 64;
/// sysexits.h: configuration error; what the real gateway exits with when misconfigured.
const EX_CONFIG: i32 = 78;

fn main() {
    let args: Vec<_> = env::args_os().skip(1).collect();
    let code = match args.as_slice() {
        [] => serve(),
        [command] if command == "healthcheck" => healthcheck(),
        [command, target] if command == "connect" => match target.to_str() {
            Some(target) => connect(target),
            None => EX_USAGE,
        },
        _ => {
            eprintln!("usage: agent-stub [healthcheck | connect HOST:PORT]");
            EX_USAGE
        }
    };
    process::exit(code);
}

/// The port from `OPENCLAW_GATEWAY_PORT`, or the default.
fn port() -> Result<u16, String> {
    match env::var("OPENCLAW_GATEWAY_PORT") {
        Ok(port) if !port.is_empty() => port
            .parse()
            .map_err(|_| format!("OPENCLAW_GATEWAY_PORT={port:?} is not a port number")),
        Ok(_) | Err(VarError::NotPresent) => Ok(DEFAULT_PORT),
        Err(VarError::NotUnicode(_)) => Err("OPENCLAW_GATEWAY_PORT is not UTF-8".to_owned()),
    }
}

/// An environment variable, or `None` when it is unset or not UTF-8.
fn var(name: &str) -> Option<String> {
    env::var(name).ok()
}

/// Runs the gateway stand-in; returns only on a start-up failure.
fn serve() -> i32 {
    let Some(token) = var("OPENCLAW_GATEWAY_TOKEN").filter(|t| !t.is_empty()) else {
        eprintln!("agent-stub: OPENCLAW_GATEWAY_TOKEN is not set; refusing to start");
        return EX_CONFIG;
    };
    let port = match port() {
        Ok(port) => port,
        Err(e) => {
            eprintln!("agent-stub: {e}");
            return EX_CONFIG;
        }
    };
    let state_dir = env::var_os("OPENCLAW_STATE_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
    let boots = match boot::bump(&state_dir) {
        Ok(boots) => boots,
        Err(e) => {
            eprintln!("agent-stub: boot counter in {}: {e}", state_dir.display());
            return 1;
        }
    };
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("agent-stub: cannot listen on port {port}: {e}");
            return 1;
        }
    };
    let app = Arc::new(App::new(
        token,
        var("AGENT_ID"),
        var("MOSAIC_API_URL"),
        var("AGENT_TOKEN").as_deref(),
        boots,
    ));
    match listener.local_addr() {
        Ok(addr) => log(format_args!("boot {boots}, listening on {addr}")),
        Err(_) => log(format_args!("boot {boots}, listening on port {port}")),
    }

    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                eprintln!("agent-stub: accept: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue; // Dropping the stream closes it.
        }
        let slot = Slot(Arc::clone(&active));
        let app = Arc::clone(&app);
        let spawned = thread::Builder::new().spawn(move || {
            let _slot = slot;
            serve_connection(&app, stream);
        });
        if let Err(e) = spawned {
            eprintln!("agent-stub: cannot start a connection thread: {e}");
        }
    }
    1
}

/// Writes one line to stdout. Unlike `println!`, never panics (e.g. on a closed pipe).
fn log(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "agent-stub: {line}");
}

/// One of the [`MAX_CONNECTIONS`] connection slots; freed on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers the one request on `stream`, logs it, and closes the connection.
fn serve_connection(app: &App, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let parsed = http::read_head(&mut stream).and_then(|head| http::parse_head(&head));
    let (method, path, response, after) = match parsed {
        Ok(request) => {
            let (response, after) = app.handle(&request);
            (request.method, request.path, response, after)
        }
        Err(ReadError::Closed) => return, // Nobody to answer.
        Err(ReadError::TooLarge) => {
            let response = Response::error(431, "request head too large");
            ("-".to_owned(), "-".to_owned(), response, After::Continue)
        }
        Err(ReadError::Malformed(why)) => {
            let response = Response::error(400, why);
            ("-".to_owned(), "-".to_owned(), response, After::Continue)
        }
    };
    // Method and path only: headers carry the token.
    log(format_args!(
        "{} {} {}",
        method.escape_debug(),
        path.escape_debug(),
        response.status
    ));
    if let Err(e) = response.write_to(&mut stream) {
        eprintln!("agent-stub: writing the response: {e}");
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Wait (briefly) for the client to close: closing a socket with unread request bytes
    // would reset the connection and could destroy the response before it is read.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut (&mut stream).take(64 * 1024), &mut io::sink());
    if let After::Exit(code) = after {
        log(format_args!("exiting with code {code} as requested"));
        process::exit(code);
    }
}

/// `agent-stub connect HOST:PORT`: 0 when a TCP connection to any address
/// HOST resolves to opens within [`CONNECT_TIMEOUT`], 1 when none does, and
/// [`EX_USAGE`] when the target is not `HOST:PORT`.
fn connect(target: &str) -> i32 {
    use std::net::ToSocketAddrs;
    let addrs = match target.to_socket_addrs() {
        Ok(addrs) => addrs,
        Err(e) if target.rsplit_once(':').is_some() => {
            eprintln!("agent-stub connect: {target}: {e}");
            return 1;
        }
        Err(e) => {
            eprintln!("agent-stub connect: {target} is not HOST:PORT: {e}");
            return EX_USAGE;
        }
    };
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => {
                log(format_args!("connected to {addr}"));
                return 0;
            }
            Err(e) => eprintln!("agent-stub connect: {addr}: {e}"),
        }
    }
    1
}

/// `agent-stub healthcheck`: 0 when `GET /healthz` on the local port answers 200, else 1.
fn healthcheck() -> i32 {
    let status = port()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        .and_then(probe_healthz);
    match status {
        Ok(200) => 0,
        Ok(status) => {
            eprintln!("agent-stub healthcheck: /healthz answered {status}");
            1
        }
        Err(e) => {
            eprintln!("agent-stub healthcheck: {e}");
            1
        }
    }
}

/// The status code `GET /healthz` on 127.0.0.1:`port` answers with.
fn probe_healthz(port: u16) -> io::Result<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, HEALTHCHECK_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    http::parse_status(&response)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/1.x response"))
}
