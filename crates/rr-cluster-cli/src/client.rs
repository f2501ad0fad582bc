//! The control commands: `status`, `reload`, `scale`, `stop`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use rr_cluster::control::{self, Request, Response, Status};

/// `rr-cluster status`: a table, or JSON with `--json`.
pub(crate) async fn status(path: &Path, json: bool) -> ExitCode {
    match control::request(path, &Request::Status).await {
        Ok(Response::Status(status)) => {
            if json {
                match serde_json::to_string_pretty(&status) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("rr-cluster: error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", table(&status));
            }
            ExitCode::SUCCESS
        }
        other => report(other),
    }
}

/// `reload`, `scale`, `stop`: one line of answer.
pub(crate) async fn simple(path: &Path, req: Request) -> ExitCode {
    match control::request(path, &req).await {
        Ok(Response::Ok { message }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        other => report(other),
    }
}

fn report(answer: Result<Response, control::ControlError>) -> ExitCode {
    match answer {
        Ok(Response::Error { message }) => eprintln!("rr-cluster: error: {message}"),
        Ok(other) => eprintln!("rr-cluster: error: unexpected answer: {other:?}"),
        Err(e) => eprintln!("rr-cluster: error: {e}"),
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
    let _ = writeln!(
        out,
        "master pid {}  up {}  generation {}  workers {}  listening {}{}",
        s.master_pid,
        human(s.uptime_ms),
        s.generation,
        s.target_workers,
        s.listeners.join(", "),
        if flags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", flags.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "accepted {}  queued {}  restarts in window {}",
        s.accepted, s.queued, s.restarts_in_window
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>8}  {:<9}  {:>3}  {:>8}  {:>10}  {:>6}  {:>8}",
        "SLOT", "PID", "STATE", "GEN", "UPTIME", "DISPATCHED", "ACTIVE", "RESTARTS"
    );
    for w in &s.workers {
        let pid = w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:<9}  {:>3}  {:>8}  {:>10}  {:>6}  {:>8}",
            w.slot,
            pid,
            w.state.as_str(),
            w.generation,
            if w.pid.is_some() {
                human(w.uptime_ms)
            } else {
                "-".into()
            },
            w.dispatched,
            w.active,
            w.restarts
        );
    }
    out
}

fn human(ms: u64) -> String {
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
        assert!(lines[4].contains("backoff") && lines[4].contains(" - "));
    }
}
