//! Fault injection while the load runs: SIGKILL a ready worker, or ask for a reload,
//! over the master's control socket; and charging failed requests to those faults.
//!
//! A failed request is charged to a fault if the fault happened while the request was
//! in flight (to the first such fault), or else if the request started at most
//! `window` after the fault (to the latest such fault). Every other failure is
//! "outside any fault window": with a correct master those should be zero.

use std::path::Path;
use std::time::Duration;

use rr_cluster::control::{self, Request, Response, Status, WorkerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::FaultConfig;
use crate::recorder::Failure;
use crate::report::ErrorCounts;

/// What was done to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FaultAction {
    /// A worker process got SIGKILL.
    KillWorker,
    /// The master was asked for a rolling reload.
    Reload,
}

impl FaultAction {
    /// The `snake_case` name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultAction::KillWorker => "kill_worker",
            FaultAction::Reload => "reload",
        }
    }
}

/// One fault that was injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// Milliseconds since the start of the measured run.
    pub at_ms: f64,
    /// What was done.
    pub action: FaultAction,
    /// The killed worker's slot.
    pub slot: Option<u32>,
    /// The killed worker's pid.
    pub pid: Option<u32>,
    /// The master's answer to a reload.
    pub message: Option<String>,
    /// Failed requests charged to this fault.
    pub failed_requests: u64,
    /// The same, by kind.
    pub failed_by_kind: ErrorCounts,
}

/// A fault that could not be injected (no ready worker, control socket down, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultAttemptError {
    /// Milliseconds since the start of the measured run.
    pub at_ms: f64,
    /// What was tried.
    pub action: FaultAction,
    /// Why it failed.
    pub error: String,
}

/// Everything the injector did; times in microseconds since the measured start.
#[derive(Debug, Default)]
pub(crate) struct FaultLog {
    pub(crate) events: Vec<(u64, FaultEvent)>,
    pub(crate) errors: Vec<FaultAttemptError>,
}

/// Injects faults from `start` (the measured start) until `end`.
pub(crate) async fn inject(config: FaultConfig, start: Instant, end: Instant) -> FaultLog {
    let mut log = FaultLog::default();
    let mut next_kill = config.kill_worker_every.map(|d| start + d);
    let mut next_reload = config.reload_every.map(|d| start + d);
    let mut last_slot = None;
    let exclude = [std::process::id()];
    loop {
        let (at, action) = match (next_kill, next_reload) {
            (Some(k), Some(r)) if r < k => (r, FaultAction::Reload),
            (Some(k), _) => (k, FaultAction::KillWorker),
            (None, Some(r)) => (r, FaultAction::Reload),
            (None, None) => break,
        };
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let ms = |t: Instant| t.saturating_duration_since(start).as_secs_f64() * 1e3;
        match action {
            FaultAction::KillWorker => {
                next_kill = next_kill.zip(config.kill_worker_every).map(|(t, d)| t + d);
            }
            FaultAction::Reload => {
                next_reload = next_reload.zip(config.reload_every).map(|(t, d)| t + d);
            }
        }
        let attempt = async {
            match action {
                FaultAction::KillWorker => {
                    kill_one(&config.control, &mut last_slot, &exclude).await
                }
                FaultAction::Reload => reload(&config.control).await,
            }
        };
        // Never wait past the end of the run for a master that does not answer.
        let result = tokio::select! {
            r = attempt => r,
            () = tokio::time::sleep_until(end) => break,
        };
        let now = Instant::now();
        match result {
            Ok(done) => {
                let event = FaultEvent {
                    at_ms: ms(done.at),
                    action,
                    slot: done.slot,
                    pid: done.pid,
                    message: done.message,
                    failed_requests: 0,
                    failed_by_kind: ErrorCounts::default(),
                };
                let us = done.at.saturating_duration_since(start).as_micros() as u64;
                log.events.push((us, event));
            }
            Err(error) => log.errors.push(FaultAttemptError {
                at_ms: ms(now),
                action,
                error,
            }),
        }
    }
    log
}

struct Done {
    at: Instant,
    slot: Option<u32>,
    pid: Option<u32>,
    message: Option<String>,
}

async fn kill_one(
    control_path: &Path,
    last_slot: &mut Option<u32>,
    exclude: &[u32],
) -> Result<Done, String> {
    let status = status(control_path).await?;
    let mut exclude = exclude.to_vec();
    exclude.push(status.master_pid);
    let (slot, pid) = pick_victim(&status, *last_slot, &exclude)
        .ok_or_else(|| "no worker in state ready".to_owned())?;
    kill(pid)?;
    let at = Instant::now();
    *last_slot = Some(slot);
    Ok(Done {
        at,
        slot: Some(slot),
        pid: Some(pid),
        message: None,
    })
}

async fn reload(control_path: &Path) -> Result<Done, String> {
    let at = Instant::now();
    match control::request(control_path, &Request::Reload { wait: false }).await {
        Ok(Response::Ok { message }) => Ok(Done {
            at,
            slot: None,
            pid: None,
            message: Some(message),
        }),
        Ok(Response::Error { message } | Response::Busy { message }) => {
            Err(format!("the master refused: {message}"))
        }
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Asks the master at `control_path` for its status.
pub(crate) async fn status(control_path: &Path) -> Result<Status, String> {
    match control::request(control_path, &Request::Status).await {
        Ok(Response::Status(status)) => Ok(status),
        Ok(Response::Error { message } | Response::Busy { message }) => {
            Err(format!("the master refused: {message}"))
        }
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Chooses the worker to kill: a `ready` worker with a pid not in `exclude`, taking the
/// slots in turn: the first slot after `after` (wrapping around).
pub(crate) fn pick_victim(
    status: &Status,
    after: Option<u32>,
    exclude: &[u32],
) -> Option<(u32, u32)> {
    let mut ready: Vec<(u32, u32)> = status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .filter_map(|w| w.pid.map(|pid| (w.slot, pid)))
        .filter(|&(_, pid)| pid > 1 && !exclude.contains(&pid))
        .collect();
    ready.sort_unstable();
    let next = after.and_then(|a| ready.iter().find(|&&(slot, _)| slot > a));
    next.or_else(|| ready.first()).copied()
}

fn kill(pid: u32) -> Result<(), String> {
    let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let pid_t = rustix::process::Pid::from_raw(raw).ok_or_else(|| format!("invalid pid {pid}"))?;
    rustix::process::kill_process(pid_t, rustix::process::Signal::KILL)
        .map_err(|e| format!("kill -KILL {pid}: {e}"))
}

/// Charges each failure to a fault (see the module documentation). `faults_us` holds
/// the fault times in microseconds, ascending. Returns the counts per fault and those
/// outside any fault window.
pub(crate) fn attribute(
    faults_us: &[u64],
    failures: &[Failure],
    window: Duration,
) -> (Vec<ErrorCounts>, ErrorCounts) {
    let window_us = window.as_micros() as u64;
    let mut per_fault = vec![ErrorCounts::default(); faults_us.len()];
    let mut outside = ErrorCounts::default();
    for f in failures {
        // The first fault at or after the request started.
        let first = faults_us.partition_point(|&at| at < f.started_us);
        let charged = if faults_us.get(first).is_some_and(|&at| at <= f.failed_us) {
            Some(first)
        } else if first > 0 && faults_us[first - 1] + window_us >= f.started_us {
            Some(first - 1)
        } else {
            None
        };
        match charged {
            Some(i) => per_fault[i].add(f.kind),
            None => outside.add(f.kind),
        }
    }
    (per_fault, outside)
}

#[cfg(test)]
mod tests {
    use rr_cluster::control::WorkerStatus;

    use super::*;
    use crate::outcome::ErrorKind;

    fn worker(slot: u32, pid: Option<u32>, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            slot,
            id: u64::from(slot) + 1,
            pid,
            state,
            generation: 0,
            uptime_ms: 1,
            ..WorkerStatus::default()
        }
    }

    fn status(workers: Vec<WorkerStatus>) -> Status {
        Status {
            master_pid: 100,
            target_workers: workers.len(),
            workers,
            ..Status::default()
        }
    }

    #[test]
    fn victims_rotate_over_ready_slots() {
        let s = status(vec![
            worker(2, Some(12), WorkerState::Ready),
            worker(0, Some(10), WorkerState::Ready),
            worker(1, Some(11), WorkerState::Starting),
            worker(3, None, WorkerState::Backoff),
            worker(4, Some(14), WorkerState::Draining),
            worker(5, Some(15), WorkerState::Ready),
        ]);
        assert_eq!(pick_victim(&s, None, &[]), Some((0, 10)));
        assert_eq!(pick_victim(&s, Some(0), &[]), Some((2, 12)));
        assert_eq!(pick_victim(&s, Some(2), &[]), Some((5, 15)));
        assert_eq!(pick_victim(&s, Some(5), &[]), Some((0, 10)));
        assert_eq!(pick_victim(&s, Some(0), &[12]), Some((5, 15)));
        let none = status(vec![worker(0, Some(10), WorkerState::Starting)]);
        assert_eq!(pick_victim(&none, None, &[]), None);
        // Never pid 1 or 0, never an excluded pid (ourselves, the master).
        let odd = status(vec![
            worker(0, Some(1), WorkerState::Ready),
            worker(1, Some(100), WorkerState::Ready),
        ]);
        assert_eq!(pick_victim(&odd, None, &[100]), None);
    }

    fn failure(started_us: u64, failed_us: u64, kind: ErrorKind) -> Failure {
        Failure {
            started_us,
            failed_us,
            kind,
        }
    }

    #[test]
    fn failures_are_charged_to_faults() {
        let faults = [1_000_000, 3_000_000];
        let window = Duration::from_secs(1);
        let failures = [
            // In flight at the first fault.
            failure(900_000, 1_000_100, ErrorKind::Reset),
            // Started 0.5 s after the first fault.
            failure(1_500_000, 1_500_010, ErrorKind::Refused),
            // Started 1.5 s after the first fault: outside.
            failure(2_500_000, 2_500_010, ErrorKind::Reset),
            // Before any fault: outside.
            failure(10, 20, ErrorKind::Timeout),
            // In flight across both faults: the first one.
            failure(500_000, 3_500_000, ErrorKind::Timeout),
            // In flight at the second fault.
            failure(2_999_000, 3_000_001, ErrorKind::Closed),
            // Exactly at the fault time counts as in flight.
            failure(3_000_000, 3_000_000, ErrorKind::Reset),
        ];
        let (per, outside) = attribute(&faults, &failures, window);
        assert_eq!(per[0].total(), 3);
        assert_eq!(per[0].reset, 1);
        assert_eq!(per[0].refused, 1);
        assert_eq!(per[0].timeout, 1);
        assert_eq!(per[1].total(), 2);
        assert_eq!(outside.total(), 2);
        assert_eq!(outside.reset, 1);
        assert_eq!(outside.timeout, 1);
        let (per, outside) = attribute(&[], &failures, window);
        assert!(per.is_empty());
        assert_eq!(outside.total(), failures.len() as u64);
    }
}
