//! `make demo` (README "Quick start"), run through its scripts with the test
//! binary, on names of its own: it converges, says so, and prints commands
//! that reach its own database and containers; a user that cannot converge is
//! reported as such, never as "Converged".

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::controller::port_range;
use support::docker::{docker, free_port, DockerFixture};

/// The demo's environment for `fx`: its own directory, instance, prefix,
/// network, listener and port range, and the test binary.
fn demo(script: &str, fx: &DockerFixture, dir: &Path, extra: &[(&str, &str)]) -> Output {
    let (first, last) = port_range(10);
    let mut cmd = Command::new("bash");
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(script),
    )
    .env("CLAWFLEET_BIN", env!("CARGO_BIN_EXE_clawfleet"))
    .env("DEMO_DIR", dir)
    .env("DEMO_INSTANCE", &fx.instance)
    .env("DEMO_NAME_PREFIX", &fx.prefix)
    .env("DEMO_NETWORK", &fx.network)
    .env("DEMO_LISTEN", format!("127.0.0.1:{}", free_port()))
    .env("CLAWFLEET_PORT_RANGE", format!("{first}-{last}"))
    // A loaded machine may take a while; the verdict is what the demo saw.
    .env("DEMO_WAIT", "300")
    .env_remove("CLAWFLEET_ENCRYPTION_KEYS")
    .env_remove("DATABASE_URL");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("run the demo script")
}

/// Stops the demo's controller (and removes its objects) when the test ends,
/// however it ends; the fixture then removes anything left with its names.
struct StopDemo<'a>(&'a DockerFixture, &'a Path);

impl Drop for StopDemo<'_> {
    fn drop(&mut self) {
        let out = demo("demo-stop.sh", self.0, self.1, &[]);
        eprintln!("demo-stop: {}", String::from_utf8_lossy(&out.stdout));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_demo_converges_on_names_of_its_own_and_its_hints_reach_them() {
    let fx = DockerFixture::new("demo");
    let dir = tempfile::tempdir().unwrap();
    let _stop = StopDemo(&fx, dir.path());
    let out = demo("demo.sh", &fx, dir.path(), &[]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("Converged."), "{shown}");
    let db = dir.path().join("clawfleet.db");
    assert!(
        shown.contains(&format!("DATABASE_URL='sqlite://{}", db.display())),
        "hints name the demo's database: {shown}"
    );
    assert!(
        shown.contains(&format!("docker kill {}alice", fx.prefix)),
        "hint names the demo's container: {shown}"
    );
    // Four users run (dave is stopped), each named with the demo's prefix.
    let names = docker(&[
        "ps",
        "--filter",
        &format!("label=io.clawfleet.instance={}", fx.instance),
        "--format",
        "{{.Names}}",
    ])
    .unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with(&fx.prefix)), "{names:?}");

    // demo-stop removes what the demo made, and only that.
    drop(_stop);
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.clawfleet.instance={}", fx.instance),
    ])
    .unwrap();
    assert!(left.trim().is_empty(), "left: {left}");
}

#[test]
fn a_demo_whose_users_fail_says_which_and_why_and_exits_1() {
    let fx = DockerFixture::new("demofail");
    let dir = tempfile::tempdir().unwrap();
    let _stop = StopDemo(&fx, dir.path());
    // No registry here: an image that is not on the engine cannot be pulled.
    let missing = "clawfleet-agent-stub:missing-for-demo-test";
    let out = demo("demo.sh", &fx, dir.path(), &[("DEMO_IMAGE", missing)]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(!shown.contains("Converged."), "{shown}");
    assert!(shown.contains("Not converged: 4 user(s)"), "{shown}");
    for user in ["alice", "bob", "Carol@Example.com", "erin"] {
        assert!(
            shown.contains(&format!("  {user}: desired running, phase failed")),
            "{user} not reported failed: {shown}"
        );
    }
}
