//! Fault injection while the load runs: SIGKILL a ready worker, or ask for a reload,
//! over the master's control socket; and charging failed requests to those faults.
//!
//! A kill happens at an instant; a reload lasts: it is a [`Span`] from the request
//! until the master's status, polled every [`RELOAD_POLL`], no longer shows a reload
//! running (a rolling reload drains slot *k* only after the new workers of the slots
//! before it served for `min_uptime` each: seconds after the request). A failed
//! request is charged to a fault that began while the request was in flight (to the
//! first such fault), or else to one that was going on, or had ended at most `window`
//! before, when the request started (to the latest such fault). Every other failure is
//! "outside any fault window": with a correct master those should be zero.
//!
//! A reload that no status poll saw end (the master wedged, or reloads asked for
//! faster than a rolling reload takes, back to back) is taken to run only as long as
//! a poll saw it running: what fails after the last such poll is outside any window,
//! not charged to it, and its event says so (`until_ms` `None`, `last_seen_ms`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// When the fault ended, in milliseconds since the start of the measured run: `at_ms`
    /// for a kill; for a reload, when the master's status no longer showed a reload
    /// running, or `None` if one still ran when the last request of the run ended.
    #[serde(default)]
    pub until_ms: Option<f64>,
    /// A reload that never was seen to end (`until_ms` is `None`): when the master's
    /// status last showed a reload running (`at_ms` if no poll answered). It is charged
    /// the failures up to then; later ones are outside any window.
    #[serde(default)]
    pub last_seen_ms: Option<f64>,
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

/// How often the master's status is asked for while a reload that was injected runs.
pub const RELOAD_POLL: Duration = Duration::from_millis(100);

/// How long one status request of [`RELOAD_POLL`] may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// When a fault began and ended, in microseconds since the start of the measured run.
/// A kill ends when it begins. A reload still running when the last request ended
/// (`open`) ends, for the attribution, when a status poll last saw it running: it
/// takes no failure after that, not even within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) from_us: u64,
    pub(crate) until_us: u64,
    /// Never seen to end.
    pub(crate) open: bool,
}

impl Span {
    /// A fault of no duration.
    pub(crate) fn at(us: u64) -> Span {
        Span {
            from_us: us,
            until_us: us,
            open: false,
        }
    }
}

/// Everything the injector did; times in microseconds since the measured start.
#[derive(Debug, Default)]
pub(crate) struct FaultLog {
    pub(crate) events: Vec<(Span, FaultEvent)>,
    pub(crate) errors: Vec<FaultAttemptError>,
}

/// Injects faults from `start` (the measured start) until `end`, then waits for the
/// reloads it asked for to end, until `stop` fires (the last request has ended): a
/// reload still running then is left open.
pub(crate) async fn inject(
    config: FaultConfig,
    start: Instant,
    end: Instant,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> FaultLog {
    let mut log = FaultLog::default();
    let mut next_kill = config.kill_worker_every.map(|d| start + d);
    let mut next_reload = config.reload_every.map(|d| start + d);
    let mut last_slot = None;
    let exclude = [std::process::id()];
    let ms = |t: Instant| t.saturating_duration_since(start).as_secs_f64() * 1e3;
    let us = |t: Instant| {
        u64::try_from(t.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX)
    };
    // Each running reload's watcher, by the index of its event.
    let mut reloads = tokio::task::JoinSet::new();
    // Each reload's event index and when a status poll last saw it running.
    let mut seen = Vec::new();
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
                let at_ms = ms(done.at);
                let mut span = Span::at(us(done.at));
                let reload = action == FaultAction::Reload;
                if reload {
                    // Open until its watcher sees it end.
                    span.until_us = u64::MAX;
                }
                let event = FaultEvent {
                    at_ms,
                    until_ms: (!reload).then_some(at_ms),
                    last_seen_ms: None,
                    action,
                    slot: done.slot,
                    pid: done.pid,
                    message: done.message,
                    failed_requests: 0,
                    failed_by_kind: ErrorCounts::default(),
                };
                if reload {
                    let index = log.events.len();
                    let control = config.control.clone();
                    let running = std::sync::Arc::new(std::sync::Mutex::new(done.at));
                    seen.push((index, std::sync::Arc::clone(&running)));
                    reloads.spawn(async move { (index, reload_ended(control, &running).await) });
                }
                log.events.push((span, event));
            }
            Err(error) => log.errors.push(FaultAttemptError {
                at_ms: ms(now),
                action,
                error,
            }),
        }
    }
    // Until the last request has ended, the end of a reload can still matter.
    let mut ended = Vec::new();
    let all_ended = async {
        while let Some(joined) = reloads.join_next().await {
            if let Ok(end) = joined {
                ended.push(end);
            }
        }
    };
    tokio::select! {
        () = all_ended => {}
        _ = stop => {}
    }
    drop(reloads); // aborts the watchers still running
    // Until a poll sees them end, reloads are open: running up to when one last saw
    // them running.
    for (index, running) in seen {
        let last = *running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((span, event)) = log.events.get_mut(index) {
            span.until_us = us(last).max(span.from_us);
            span.open = true;
            event.last_seen_ms = Some(ms(last).max(event.at_ms));
        }
    }
    for (index, at) in ended {
        if let Some((span, event)) = log.events.get_mut(index) {
            span.until_us = us(at).max(span.from_us);
            span.open = false;
            event.until_ms = Some(ms(at).max(event.at_ms));
            event.last_seen_ms = None;
        }
    }
    log
}

/// Polls the master's status every [`RELOAD_POLL`] until it shows no reload running;
/// returns when it did, and notes in `running` when one last showed it running. A
/// status that cannot be had is asked for again: the caller stops waiting when the run
/// is over.
async fn reload_ended(control: PathBuf, running: &std::sync::Mutex<Instant>) -> Instant {
    loop {
        tokio::time::sleep(RELOAD_POLL).await;
        let asked = control::request_within(&control, &Request::Status, POLL_TIMEOUT).await;
        if let Ok(Response::Status(s)) = asked {
            if !s.reloading {
                return Instant::now();
            }
            *running.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
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

/// Asks the master at `control_path` for its status (waiting up to 10 s).
pub(crate) async fn status(control_path: &Path) -> Result<Status, String> {
    status_within(control_path, Duration::from_secs(10)).await
}

/// Asks the master at `control_path` for its status, waiting up to `timeout`.
pub(crate) async fn status_within(
    control_path: &Path,
    timeout: Duration,
) -> Result<Status, String> {
    match control::request_within(control_path, &Request::Status, timeout).await {
        Ok(Response::Status(status)) => Ok(status),
        Ok(Response::Error { message } | Response::Busy { message }) => {
            Err(format!("the master refused: {message}"))
        }
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The number of workers of the pool behind `addr`, if the master of `status` is the
/// one listening there (on `addr` itself, or on the unspecified address of its port):
/// a master on the control socket may serve another address.
pub(crate) fn pool_size(status: &Status, addr: SocketAddr) -> Option<usize> {
    let listens = status.listeners.iter().any(|l| {
        l.parse::<SocketAddr>().is_ok_and(|l| {
            l == addr
                || (l.port() == addr.port()
                    && l.ip().is_unspecified()
                    && (l.is_ipv6() || addr.is_ipv4()))
        })
    });
    (listens && status.target_workers > 0).then_some(status.target_workers)
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

/// Charges each failure to a fault (see the module documentation). `faults` holds
/// the faults' spans, ascending by start. Returns the counts per fault and those
/// outside any fault window.
pub(crate) fn attribute(
    faults: &[Span],
    failures: &[Failure],
    window: Duration,
) -> (Vec<ErrorCounts>, ErrorCounts) {
    let window_us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    // How long after its end a fault still takes failures: a reload never seen to end
    // only as long as it was seen running.
    let reach = |s: &Span| {
        if s.open {
            s.until_us
        } else {
            s.until_us.saturating_add(window_us)
        }
    };
    // The furthest reach of the faults up to each one: the backward search below stops
    // where no earlier fault reaches the request's start.
    let furthest: Vec<u64> = faults
        .iter()
        .scan(0, |max, s| {
            *max = reach(s).max(*max);
            Some(*max)
        })
        .collect();
    let mut per_fault = vec![ErrorCounts::default(); faults.len()];
    let mut outside = ErrorCounts::default();
    for f in failures {
        // The first fault that began at or after the request started.
        let first = faults.partition_point(|s| s.from_us < f.started_us);
        let charged = if faults.get(first).is_some_and(|s| s.from_us <= f.failed_us) {
            Some(first)
        } else {
            // The latest fault, begun before the request started, that was still going
            // on or had ended at most `window` before.
            (0..first)
                .rev()
                .take_while(|&i| furthest[i] >= f.started_us)
                .find(|&i| reach(&faults[i]) >= f.started_us)
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
        let faults = [Span::at(1_000_000), Span::at(3_000_000)];
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

    /// Regression: a reload was a fault of no duration at the time it was asked for,
    /// and a rolling reload drains slot k only after the new workers of the slots
    /// before served for `min_uptime` each (1 s by default, the default window too):
    /// the failures of its later drains read as spontaneous ones.
    #[test]
    fn a_reload_takes_the_failures_of_its_whole_span() {
        let reload = Span {
            from_us: 0,
            until_us: 3_000_000,
            open: false,
        };
        let window = Duration::from_secs(1);
        let failures = [
            // Started 2 s into the reload.
            failure(2_000_000, 2_000_100, ErrorKind::Reset),
            // Within the window after its end.
            failure(3_900_000, 3_900_100, ErrorKind::Closed),
            // Past it.
            failure(4_100_000, 4_100_100, ErrorKind::Reset),
        ];
        let (per, outside) = attribute(&[reload], &failures, window);
        assert_eq!((per[0].reset, per[0].closed), (1, 1));
        assert_eq!((outside.total(), outside.reset), (1, 1));

        // A kill during the reload takes what fails in its own window, or was in
        // flight when it happened; the reload takes the rest of its span.
        let kill = Span::at(1_000_000);
        let failures = [
            failure(900_000, 1_000_100, ErrorKind::Reset),
            failure(1_500_000, 1_500_100, ErrorKind::Refused),
            failure(2_500_000, 2_500_100, ErrorKind::Closed),
            failure(100, 200, ErrorKind::Timeout),
        ];
        let (per, outside) = attribute(&[reload, kill], &failures, window);
        assert_eq!((per[0].closed, per[0].timeout, per[0].total()), (1, 1, 2));
        assert_eq!((per[1].reset, per[1].refused, per[1].total()), (1, 1, 2));
        assert_eq!(outside.total(), 0);
    }

    /// Regression: a reload no status poll saw end (the master wedged, or reloads back
    /// to back) stayed open to the end of the run, and every later failure was charged
    /// to it: `failed_outside_windows` read 0. It takes the failures up to when a poll
    /// last saw it running; those after are outside any window.
    #[test]
    fn a_reload_never_seen_to_end_takes_no_failure_after_it_was_last_seen() {
        let open = Span {
            from_us: 1_000_000,
            until_us: 2_000_000,
            open: true,
        };
        let window = Duration::from_secs(1);
        let failures = [
            // While it was seen running.
            failure(1_500_000, 1_500_100, ErrorKind::Reset),
            // In flight when it began.
            failure(900_000, 1_000_100, ErrorKind::Closed),
            // After it was last seen running (within what would be the window).
            failure(2_500_000, 2_500_100, ErrorKind::Refused),
            // Long after.
            failure(60_000_000, 60_000_001, ErrorKind::Timeout),
        ];
        let (per, outside) = attribute(&[open], &failures, window);
        assert_eq!((per[0].reset, per[0].closed, per[0].total()), (1, 1, 2));
        assert_eq!(
            (outside.refused, outside.timeout, outside.total()),
            (1, 1, 2)
        );
    }

    #[test]
    fn the_pool_is_that_of_the_master_listening_on_the_address() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let with = |listeners: &[&str], workers| Status {
            target_workers: workers,
            listeners: listeners.iter().map(|l| (*l).to_owned()).collect(),
            ..Status::default()
        };
        assert_eq!(pool_size(&with(&["127.0.0.1:8080"], 2), addr), Some(2));
        assert_eq!(
            pool_size(&with(&["unix:/x", "0.0.0.0:8080"], 3), addr),
            Some(3)
        );
        assert_eq!(pool_size(&with(&["[::]:8080"], 4), addr), Some(4));
        // Another port, another address, nothing parseable, or no workers: unknown.
        assert_eq!(pool_size(&with(&["127.0.0.1:8081"], 2), addr), None);
        assert_eq!(pool_size(&with(&["127.0.0.2:8080"], 2), addr), None);
        assert_eq!(pool_size(&with(&["unix:/tmp/s"], 2), addr), None);
        assert_eq!(pool_size(&with(&["127.0.0.1:8080"], 0), addr), None);
        let v6: SocketAddr = "[::1]:8080".parse().expect("addr");
        assert_eq!(pool_size(&with(&["0.0.0.0:8080"], 2), v6), None);
    }
}
