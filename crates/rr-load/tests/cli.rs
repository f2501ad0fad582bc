//! The `rr-load` binary: exit codes, error lines, JSON output.

mod support;

use std::process::{Command, Output};

fn rr_load(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rr-load"))
        .args(args)
        .output()
        .expect("run rr-load")
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let out = rr_load(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    if !needle.starts_with("--") {
        // Our own errors fit on the first line.
        assert!(first.contains(needle), "{needle:?} not in {first:?}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_exits_with_2_and_one_error_line() {
    assert_usage_error(&[], "--addr");
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--connections", "0"],
        "connections must be greater than zero",
    );
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--duration", "10 parsecs"],
        "invalid duration",
    );
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--mode", "pipelined"],
        "pipelined",
    );
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--rate", "-5"],
        "rate must be a positive",
    );
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--rate", "0"],
        "rate must be a positive",
    );
    assert_usage_error(&["--addr", "no-port"], "cannot resolve");
    assert_usage_error(&["--addr", "192.0.2.1:80"], "not a loopback address");
    assert_usage_error(
        &["--addr", "127.0.0.1:1", "--path", "nope"],
        "path must start",
    );
}

#[test]
fn json_to_stdout_and_table_to_stderr() {
    let server = support::start(support::Behavior::Ok);
    let addr = server.addr.to_string();
    let out = rr_load(&["--addr", &addr, "-c", "4", "-d", "300ms", "--json", "-"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["schema_version"], 2);
    assert!(json["requests"].as_u64().expect("requests") > 0);
    assert_eq!(json["errors"]["total"], 0);
    assert_eq!(json["workers"].as_array().map(Vec::len), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("throughput"), "{stderr}");
    // Not a terminal: no progress line.
    assert!(!stderr.contains('\r'));
}

#[test]
fn json_to_a_file_and_table_to_stdout() {
    let server = support::start(support::Behavior::Ok);
    let addr = server.addr.to_string();
    let path = std::env::temp_dir().join(format!("rr-load-cli-{}.json", std::process::id()));
    let path_str = path.to_str().expect("utf-8 temp path");
    let out = rr_load(&[
        "--addr", &addr, "-c", "2", "-d", "200ms", "--mode", "close", "--json", path_str,
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("requests"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("json file")).expect("JSON");
    let _ = std::fs::remove_file(&path);
    assert_eq!(json["settings"]["mode"], "close");
    assert!(json["successes"].as_u64().expect("successes") > 0);
}
