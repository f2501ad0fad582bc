//! The control commands: `status`, `reload`, `scale`, `stop`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::{eprintln_safe, println_safe};

use rr_cluster::control::{self, Request, Response, Status};

/// `rr-cluster status`: a table, or JSON with `--json`.
pub(crate) async fn status(path: &Path, json: bool) -> ExitCode {
    match control::request(path, &Request::Status).await {
        Ok(Response::Status(status)) => {
            if json {
                match serde_json::to_string_pretty(&status) {
                    Ok(text) => println_safe(&format!("{text}\n")),
                    Err(e) => {
                        eprintln_safe(&format!("rr-cluster: error: {e}"));
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println_safe(&table(&status));
            }
            ExitCode::SUCCESS
        }
        other => report(other),
    }
}

/// `reload`, `scale`, `stop`: one line of answer. A refusal (or a reload that
/// failed, with `--wait`) exits 1; `stop --wait` exits with the master's exit code.
pub(crate) async fn simple(path: &Path, req: Request, timeout: Duration) -> ExitCode {
    match control::request_within(path, &req, timeout).await {
        Ok(Response::Ok { message }) => {
            println_safe(&format!("{message}\n"));
            ExitCode::SUCCESS
        }
        Ok(Response::Stopped { message, code }) => {
            println_safe(&format!("{message}\n"));
            exit_code(code)
        }
        other => report(other),
    }
}

/// A master's exit code as this process's: 0 stays 0, anything else that does not
/// fit a byte is 1.
fn exit_code(code: i32) -> ExitCode {
    match u8::try_from(code) {
        Ok(c) => ExitCode::from(c),
        Err(_) => ExitCode::FAILURE,
    }
}

fn report(answer: Result<Response, control::ControlError>) -> ExitCode {
    match answer {
        Ok(Response::Error { message } | Response::Busy { message }) => {
            eprintln_safe(&format!("rr-cluster: error: {message}"))
        }
        Ok(other) => eprintln_safe(&format!("rr-cluster: error: unexpected answer: {other:?}")),
        Err(e) => eprintln_safe(&format!("rr-cluster: error: {e}")),
    }
    ExitCode::FAILURE
}

/// The human-readable status.
pub(crate) fn table(s: &Status) -> String {
    let mut out = String::new();
    let mut flags = Vec::new();
    if s.reloading {
        flags.push("reloading");
    }
    if s.stopping {
        flags.push("stopping");
    }
    if s.gave_up {
        flags.push("GAVE UP (restart limit hit)");
    }
    if s.paused {
        flags.push("PAUSED (refusing connections)");
    }
    let _ = writeln!(
        out,
        "master pid {}  up {}  generation {}  workers {}  balance {}  protocol {}  listening {}{}",
        s.master_pid,
        human(s.uptime_ms),
        s.generation,
        s.target_workers,
        if s.balance.is_empty() {
            "-"
        } else {
            &s.balance
        },
        if s.protocol.is_empty() {
            "-"
        } else {
            &s.protocol
        },
        s.listeners.join(", "),
        if flags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", flags.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "accepted {}  conn/s {:.0}  queued {}  restarts in window {}  master cpu {}  rss {}",
        s.accepted,
        s.connections_per_sec,
        s.queued,
        s.restarts_in_window,
        percent(s.master_cpu_percent),
        bytes(s.master_rss_bytes)
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>8}  {:<9}  {:>3}  {:>8}  {:>6}  {:>8}  {:>10}  {:>7}  {:>6}  {:>8}",
        "SLOT",
        "PID",
        "STATE",
        "GEN",
        "UPTIME",
        "CPU",
        "RSS",
        "DISPATCHED",
        "CONN/S",
        "ACTIVE",
        "RESTARTS"
    );
    for w in &s.workers {
        let pid = w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:<9}  {:>3}  {:>8}  {:>6}  {:>8}  {:>10}  {:>7.0}  {:>6}  {:>8}",
            w.slot,
            pid,
            w.state.as_str(),
            w.generation,
            if w.pid.is_some() {
                human(w.uptime_ms)
            } else {
                "-".into()
            },
            percent(w.cpu_percent),
            bytes(w.rss_bytes),
            w.dispatched,
            w.connections_per_sec,
            w.active,
            w.restarts
        );
    }
    out
}

/// `12.5%`, or `-` when not sampled yet.
pub(crate) fn percent(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"))
}

/// `4.2M`, or `-` when not sampled yet.
pub(crate) fn bytes(b: Option<u64>) -> String {
    let Some(b) = b else { return "-".to_owned() };
    let b = b as f64;
    match b {
        b if b >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1}G", b / (1024.0 * 1024.0 * 1024.0)),
        b if b >= 1024.0 * 1024.0 => format!("{:.1}M", b / (1024.0 * 1024.0)),
        b if b >= 1024.0 => format!("{:.0}K", b / 1024.0),
        b => format!("{b:.0}B"),
    }
}

pub(crate) fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rr_cluster::control::{WorkerState, WorkerStatus};

    #[test]
    fn table_lists_every_worker() {
        let row = |slot, pid: Option<u32>, state| WorkerStatus {
            slot,
            id: u64::from(slot) + 1,
            pid,
            state,
            generation: 1,
            uptime_ms: 61_500,
            dispatched: 500,
            active: 2,
            restarts: 3,
            cpu_percent: pid.map(|_| 12.5),
            rss_bytes: pid.map(|_| 6 * 1024 * 1024),
            ..WorkerStatus::default()
        };
        let s = Status {
            master_pid: 42,
            generation: 1,
            target_workers: 2,
            listeners: vec!["127.0.0.1:8080".into()],
            accepted: 1000,
            uptime_ms: 3_700_000,
            workers: vec![
                row(0, Some(100), WorkerState::Ready),
                row(1, None, WorkerState::Backoff),
            ],
            ..Status::default()
        };
        let t = table(&s);
        assert!(t.contains("up 1h01m"), "{t}");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(
            lines[3].contains("ready") && lines[3].contains("1m01s") && lines[3].contains("500")
        );
        assert!(
            lines[3].contains("12.5%") && lines[3].contains("6.0M"),
            "{t}"
        );
        assert!(lines[4].contains("backoff") && lines[4].contains(" - "));
    }
}
