//! `rr-cluster conformance` end to end: the demo worker passes every required check;
//! a worker that breaks one rule on purpose (tests/fixtures/conformance_worker.py)
//! fails the check of that rule, named, with exit status 1.
//!
//! The Python fixtures need `python3`; without it those tests are skipped (with the
//! reason on stderr).

mod common;
use common::missing_tool;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rr-cluster");
/// A conformance run takes well under a minute; this bounds a hung one.
const RUN_LIMIT: Duration = Duration::from_secs(120);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The verdict (`PASS`, `FAIL`, `SKIP`) printed for check `name`.
    fn verdict(&self, name: &str) -> Option<&str> {
        self.stdout.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let verdict = words.next()?;
            (words.next() == Some(name)).then_some(verdict)
        })
    }

    fn line(&self, name: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or("")
    }

    fn assert_verdict(&self, name: &str, expected: &str) {
        assert_eq!(
            self.verdict(name),
            Some(expected),
            "check {name}:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `rr-cluster ARGS`, bounded by [`RUN_LIMIT`] (killed past it: it is our child,
/// not reaped yet).
fn rr_cluster(args: &[&str]) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rr-cluster");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rr-cluster {args:?} still running after {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        code,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    eprintln!(
        "rr-cluster {args:?} ({:.1} s):\n{}",
        started.elapsed().as_secs_f64(),
        run.stdout
    );
    run
}

fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conformance_worker.py")
        .display()
        .to_string()
}

fn python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing_tool("python3 is not installed (the broken-worker fixtures need it)");
    }
    ok
}

/// Conformance of the fixture with one rule broken by `flag`.
fn broken(flag: &str) -> Run {
    let fixture = fixture();
    rr_cluster(&["conformance", "--", "python3", &fixture, flag])
}

#[test]
fn the_demo_worker_passes_every_check() {
    let run = rr_cluster(&["conformance", "--json", "--", BIN, "hello-worker"]);
    assert_eq!(run.code, Some(0), "{}\nstderr:\n{}", run.stdout, run.stderr);
    let checks: serde_json::Value = serde_json::from_str(&run.stdout).expect("a JSON array");
    let checks = checks.as_array().expect("an array");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for name in [
        "handshake",
        "heartbeats",
        "heartbeats-while-busy",
        "batch-64",
        "ack",
        "ping",
        "messages",
        "fd-leak",
        "drain-in-flight",
        "drain-keepalive-close",
        "drain-queued",
        "drain-idle-grace",
        "drain-exit",
        "eof",
        "reload-under-load",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    for check in checks {
        assert!(check["evidence"].is_string(), "{check}");
        if check["required"] == true {
            assert_eq!(check["pass"], true, "{check}");
        }
    }
    // Without --echo-messages the message check is skipped: not evaluated.
    let messages = checks
        .iter()
        .find(|c| c["name"] == "messages")
        .expect("messages");
    assert_eq!(messages["pass"], serde_json::Value::Null);
    assert_eq!(messages["required"], false);
}

#[test]
fn a_worker_that_never_says_ready_fails_the_handshake() {
    if !python() {
        return;
    }
    let run = broken("--no-ready");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    run.assert_verdict("handshake", "FAIL");
    assert!(
        run.line("handshake").contains("no Ready"),
        "{}",
        run.line("handshake")
    );
}

#[test]
fn a_worker_that_ignores_drain_fails_drain_exit() {
    if !python() {
        return;
    }
    let run = broken("--ignore-drain");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    run.assert_verdict("drain-exit", "FAIL");
    assert!(
        run.line("drain-exit").contains("still running"),
        "{}",
        run.line("drain-exit")
    );
    // The rest of the protocol it follows.
    for name in ["handshake", "heartbeats", "batch-64", "ack", "ping", "eof"] {
        run.assert_verdict(name, "PASS");
    }
}

#[test]
fn a_worker_that_closes_idle_connections_at_once_fails_the_grace() {
    if !python() {
        return;
    }
    let run = broken("--close-idle-on-drain");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    run.assert_verdict("drain-idle-grace", "FAIL");
    assert!(
        run.line("drain-idle-grace")
            .contains("closed by the worker"),
        "{}",
        run.line("drain-idle-grace")
    );
    for name in ["handshake", "batch-64", "drain-queued", "drain-exit", "eof"] {
        run.assert_verdict(name, "PASS");
    }
}

#[test]
fn bad_usage_is_exit_2() {
    assert_eq!(rr_cluster(&["conformance"]).code, Some(2));
    assert_eq!(
        rr_cluster(&["conformance", "--", "/nonexistent/worker"]).code,
        Some(2)
    );
    assert_eq!(
        rr_cluster(&["conformance", "--probe", "ftp", "--", "true"]).code,
        Some(2)
    );
}
