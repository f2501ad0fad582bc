//! The result of a run: [`Report`], its JSON form and its table.
//!
//! # JSON schema (`schema_version` 2)
//!
//! The JSON written by `--json` is [`Report`] serialized with serde; fields are only
//! ever added within a schema version. Durations are seconds (`*_s`), milliseconds
//! (`*_ms`) or microseconds (`*_us`) as their names say. Version 2 differs from 1 in
//! two values: `busiest_worker.ratio_to_mean` is `null` when the pool's size is unknown
//! (version 1 divided by the number of workers that answered, so a pool of 2 in which
//! one worker never answered read as a perfect balance); and `throughput_rps` counts
//! the successes answered within the measured run, whenever they started (version 1
//! counted those started in it, answered after its end too, over the same
//! `duration_s`). Reports of version 1 still read as a [`Report`].
//!
//! ```text
//! {
//!   "schema_version": 2,
//!   "settings": { "addr": "127.0.0.1:8080", "host": "127.0.0.1:8080", "path": "/",
//!                 "mode": "keepalive" | "close", "connections": 64, "threads": 1,
//!                 "rate": null | 5000.0, "duration_s": 10.0, "warmup_s": 0.0,
//!                 "timeout_s": 5.0, "kill_worker_every_s": null | 0.5,
//!                 "reload_every_s": null | 2.0, "fault_window_s": 1.0 },
//!   "requests": 123456,            // of the measured run (see below)
//!   "successes": 123450,           // complete responses with a 2xx or 3xx status
//!   "errors": { "refused": 0, "reset": 6, "closed": 0, "timeout": 0,
//!               "bad_status": 0, "bad_response": 0, "other": 0, "missed": 0,
//!               "total": 6 },
//!   "throughput_rps": 12345.0,     // successes answered within the run, per second
//!   "latency_us": { "count": 123450, "min": 80, "mean": 510.2, "stdev": 90.1,
//!                   "p50": 490, "p90": 600, "p99": 900, "p99_9": 2100, "max": 5012 },
//!   "open_loop": null | {          // with a rate only
//!     "target_rps": 5000.0, "scheduled": 50000, "sent": 50000, "missed": 0,
//!     "sent_after_end": 0,         // of `sent`: those that left after the end
//!     "sent_in_run": 50000,        // sends that left within the run, whenever due
//!     "sent_rps": 5000.0,          // sent_in_run per second of duration_s
//!     "send_lag_us": { ...like latency_us... } },
//!   "statuses": { "200": 123450 },
//!   "reconnects": 0,               // keep-alive connections the server closed properly
//!   "workers": [ { "id": "0", "requests": 61725, "share_pct": 50.0, "pids": [4242] } ],
//!   "without_worker_id": 0,        // successes without an x-worker-id header
//!   "pool_workers": null | 2,      // the master's worker count, when known (below)
//!   "busiest_worker": null | { "id": "1", "share_pct": 50.0,
//!                              "ratio_to_mean": null | 1.0 },
//!   "faults": null | {
//!     "window_s": 1.0, "injected": 3, "kills": 3, "reloads": 0,
//!     "failed_in_windows": 5, "failed_outside_windows": 0, "untracked_failures": 0,
//!     "outside_by_kind": { ...error counts... },
//!     "events": [ { "at_ms": 500.1, "until_ms": 500.1 | null, // a reload: see below
//!                   "last_seen_ms": null | 900.0,                // the same
//!                   "action": "kill_worker" | "reload", "slot": 0,
//!                   "pid": 4242, "message": null, "failed_requests": 2,
//!                   "failed_by_kind": { ...error counts... } } ],
//!     "attempt_errors": [ { "at_ms": 1000.0, "action": "kill_worker",
//!                           "error": "no worker in state ready" } ]
//!   }
//! }
//! ```
//!
//! `requests` are those of the measured run: started within it (closed loop) or due
//! within it (open loop). In a closed loop no request starts after the end; those
//! still in flight then are waited for, up to the timeout, and counted (answered or
//! `timeout`), so a server that stalls near the end shows. In an open loop, a send due
//! before the end whose connection is still busy then leaves after the end, as long as
//! it is less than a timeout late (`open_loop.sent_after_end`); one whose connection
//! is stuck (its last request timed out) or that would leave later never leaves: it
//! counts as a failure, `missed`, so `requests` is every send scheduled in the
//! measured run. `open_loop.sent_rps` is the send rate actually achieved within the
//! run: the sends that left in it (`sent_in_run`, whenever they were due) per second
//! of `duration_s`.
//!
//! `throughput_rps` is what the server answered per second: the successes that
//! completed within the measured run (from its start to its end, whenever they
//! started: a request of the warm-up answered in the run counts, one of the run
//! answered after its end does not) over `duration_s`, as wrk counts. So one slow
//! answer at the end does not stretch the run for every other one, and a server that
//! answers 4,000 requests a second loaded at 5,000 in an open loop reads 4,000, not the
//! 5,000 the schedule asked for. (`successes` counts the requests of the run, answered
//! after its end too.)
//!
//! Latency is measured for successful requests only: in a closed loop from the moment
//! the request started (connect included in close mode). In an open loop (`rate`), from
//! the request's intended send time when its connection was still busy with the
//! previous request at that time, so a stall counts for every request it delayed;
//! otherwise from the moment it actually left, so the client timer's own lateness (up
//! to about 1 ms; see `open_loop.send_lag_us`) is not charged to the server.
//!
//! `reconnects`, like every other figure, leaves out the warm-up.
//!
//! `pool_workers` is the master's `target_workers`, from its status at the start of the
//! run, when its control socket (`--control`, or the default one) answers and the
//! master listens on the address loaded; otherwise `null`. `busiest_worker.ratio_to_mean`
//! is the busiest share over the mean share of that pool (`null` without it): workers
//! that never answered count, with a share of 0.
//!
//! A fault event's `until_ms` is when it ended: the same as `at_ms` for a kill; for a
//! reload, when the master's status (polled every 100 ms) no longer showed a reload
//! running, or `null` if no poll saw it end before the last request of the run ended
//! (the master wedged, or reloads asked for back to back, faster than one takes).
//! Such a reload's `last_seen_ms` is when a poll last showed a reload running (`at_ms`
//! if none answered; `null` for every other event): it is charged the failures up to
//! then, and those after are outside any fault window.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Mode};
use crate::fault::{self, FaultAttemptError, FaultEvent, FaultLog};
use crate::outcome::ErrorKind;
use crate::recorder::{Recorder, WorkerCount};

/// The version of the JSON layout.
pub const SCHEMA_VERSION: u32 = 2;

/// The outcome of a run; `serde` gives its stable JSON form (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// What was run.
    pub settings: Settings,
    /// Requests of the measured run: those that started (closed loop) or were due (open
    /// loop) within it, answered or failed, including those waited for after its end;
    /// in an open loop also the sends that never left (`errors.missed`).
    pub requests: u64,
    /// Complete responses with a 2xx or 3xx status.
    pub successes: u64,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Successes that completed within the measured run (whenever they started) per
    /// second of it: what the server answered per second.
    pub throughput_rps: f64,
    /// Latency of the successes, in microseconds.
    pub latency_us: LatencySummary,
    /// How well an open loop kept its schedule; `null` for a closed loop.
    #[serde(default)]
    pub open_loop: Option<OpenLoopReport>,
    /// Complete responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Keep-alive connections reopened because the server had closed them properly
    /// (during the measured run).
    pub reconnects: u64,
    /// Successes by `x-worker-id`, in id order.
    pub workers: Vec<WorkerShare>,
    /// Successes whose response had no `x-worker-id`.
    pub without_worker_id: u64,
    /// Workers in the pool (the master's `target_workers` at the start of the run), when
    /// the control socket answered and the master listens on the address loaded.
    #[serde(default)]
    pub pool_workers: Option<usize>,
    /// The worker that answered most, when any answered with an id.
    pub busiest_worker: Option<BusiestWorker>,
    /// Fault injection, when enabled.
    pub faults: Option<FaultReport>,
}

/// The settings a report was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Settings {
    /// The address connected to.
    pub addr: String,
    /// The `Host` header (the address as given).
    pub host: String,
    /// The request target.
    pub path: String,
    /// Close or keep-alive.
    pub mode: Mode,
    /// Concurrent connections.
    pub connections: usize,
    /// Runtime threads.
    pub threads: usize,
    /// Open-loop rate in requests per second; `null` for a closed loop.
    pub rate: Option<f64>,
    /// The measured run time.
    pub duration_s: f64,
    /// The unmeasured warm-up.
    pub warmup_s: f64,
    /// The per-request timeout.
    pub timeout_s: f64,
    /// Interval between worker kills.
    pub kill_worker_every_s: Option<f64>,
    /// Interval between reloads.
    pub reload_every_s: Option<f64>,
    /// How long after a fault (a reload: after it ended) a failed request is still
    /// charged to it.
    pub fault_window_s: f64,
}

/// Failed requests by [`ErrorKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorCounts {
    /// [`ErrorKind::Refused`].
    pub refused: u64,
    /// [`ErrorKind::Reset`].
    pub reset: u64,
    /// [`ErrorKind::Closed`].
    pub closed: u64,
    /// [`ErrorKind::Timeout`].
    pub timeout: u64,
    /// [`ErrorKind::BadStatus`].
    pub bad_status: u64,
    /// [`ErrorKind::BadResponse`].
    pub bad_response: u64,
    /// [`ErrorKind::Other`].
    pub other: u64,
    /// [`ErrorKind::Missed`] (open loop only).
    #[serde(default)]
    pub missed: u64,
    /// All of them.
    pub total: u64,
}

impl ErrorCounts {
    /// The count of one kind.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        match kind {
            ErrorKind::Refused => self.refused,
            ErrorKind::Reset => self.reset,
            ErrorKind::Closed => self.closed,
            ErrorKind::Timeout => self.timeout,
            ErrorKind::BadStatus => self.bad_status,
            ErrorKind::BadResponse => self.bad_response,
            ErrorKind::Other => self.other,
            ErrorKind::Missed => self.missed,
        }
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn add_n(&mut self, kind: ErrorKind, n: u64) {
        let slot = match kind {
            ErrorKind::Refused => &mut self.refused,
            ErrorKind::Reset => &mut self.reset,
            ErrorKind::Closed => &mut self.closed,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::BadStatus => &mut self.bad_status,
            ErrorKind::BadResponse => &mut self.bad_response,
            ErrorKind::Other => &mut self.other,
            ErrorKind::Missed => &mut self.missed,
        };
        *slot += n;
        self.total += n;
    }

    pub(crate) fn add(&mut self, kind: ErrorKind) {
        self.add_n(kind, 1);
    }

    fn from_array(counts: &[u64; ErrorKind::COUNT]) -> ErrorCounts {
        let mut c = ErrorCounts::default();
        for kind in ErrorKind::ALL {
            c.add_n(kind, counts[kind.index()]);
        }
        c
    }

    /// `reset 3, timeout 1`, or `none`.
    fn summary(&self) -> String {
        let parts: Vec<String> = ErrorKind::ALL
            .iter()
            .filter(|&&k| self.get(k) > 0)
            .map(|&k| format!("{} {}", k.as_str(), self.get(k)))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Latency percentiles in microseconds (all zero when nothing succeeded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
    /// Largest.
    pub max: u64,
}

impl LatencySummary {
    /// Summarizes a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            stdev: h.stdev(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// How well an open loop kept its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OpenLoopReport {
    /// The rate asked for, in requests per second.
    pub target_rps: f64,
    /// Sends due within the measured run (the same as `requests`).
    pub scheduled: u64,
    /// Sends that left (some maybe after the end: `sent_after_end`).
    pub sent: u64,
    /// Of `sent`, those that left after the end of the run, because their connection
    /// was still busy with earlier requests then.
    #[serde(default)]
    pub sent_after_end: u64,
    /// Sends that left within the measured run, whenever they were due.
    #[serde(default)]
    pub sent_in_run: u64,
    /// Sends that never left because their connection was still busy with an earlier
    /// request when the run ended (the same as `errors.missed`).
    pub missed: u64,
    /// `sent_in_run` per second of the measured run: the send rate achieved.
    pub sent_rps: f64,
    /// How late the sent requests left after their intended times, in microseconds: the
    /// client timer's lateness (up to about 1 ms, not in `latency_us`) and the waits
    /// for a busy connection (in `latency_us`).
    pub send_lag_us: LatencySummary,
}

/// One worker's part of the successes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerShare {
    /// The `x-worker-id` value (a slot for rr-cluster's demo worker).
    pub id: String,
    /// Successes it answered.
    pub requests: u64,
    /// Its percentage of the successes that carried a worker id.
    pub share_pct: f64,
    /// Every `x-worker-pid` seen with this id, ascending.
    pub pids: Vec<u32>,
}

/// The worker with the largest share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BusiestWorker {
    /// Its id.
    pub id: String,
    /// Its share in percent.
    pub share_pct: f64,
    /// Its share divided by the mean share of the pool (1.0 is a perfect balance);
    /// `None` when the pool's size is unknown (see [`Report::pool_workers`]).
    pub ratio_to_mean: Option<f64>,
}

/// What fault injection did and cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FaultReport {
    /// The attribution window.
    pub window_s: f64,
    /// Faults injected.
    pub injected: u64,
    /// Workers killed.
    pub kills: u64,
    /// Reloads requested.
    pub reloads: u64,
    /// Failed requests charged to some fault.
    pub failed_in_windows: u64,
    /// Failed requests outside any fault's window.
    pub failed_outside_windows: u64,
    /// Failures beyond the per-connection memory cap, not attributed (also counted in
    /// `failed_outside_windows`).
    pub untracked_failures: u64,
    /// The failures outside any window, by kind (untracked ones are not in it).
    pub outside_by_kind: ErrorCounts,
    /// Each fault and what it cost.
    pub events: Vec<FaultEvent>,
    /// Faults that could not be injected.
    pub attempt_errors: Vec<FaultAttemptError>,
}

impl Report {
    /// The report of a run of `config` that measured `rec`, injected the faults of
    /// `log`, against a pool of `pool_workers` (when known).
    pub(crate) fn new(
        config: &Config,
        rec: Recorder,
        log: Option<FaultLog>,
        pool_workers: Option<usize>,
    ) -> Report {
        let seconds = config.duration.as_secs_f64();
        let errors = ErrorCounts::from_array(&rec.errors);
        let (workers, busiest_worker) = shares(&rec.workers, pool_workers);
        let faults = log.map(|log| fault_report(config, &rec, log));
        let open_loop = config.rate.map(|rate| {
            let scheduled = rec.requests();
            let sent = scheduled - errors.missed;
            OpenLoopReport {
                target_rps: rate,
                scheduled,
                sent,
                sent_after_end: rec.sent_after_end,
                sent_in_run: rec.sent_in_run,
                missed: errors.missed,
                sent_rps: rec.sent_in_run as f64 / seconds,
                send_lag_us: LatencySummary::from_histogram(&rec.send_lag),
            }
        });
        Report {
            schema_version: SCHEMA_VERSION,
            settings: Settings {
                addr: config.addr.to_string(),
                host: config.host.clone(),
                path: config.path.clone(),
                mode: config.mode,
                connections: config.connections,
                threads: config.threads,
                rate: config.rate,
                duration_s: seconds,
                warmup_s: config.warmup.as_secs_f64(),
                timeout_s: config.timeout.as_secs_f64(),
                kill_worker_every_s: config.faults.kill_worker_every.map(|d| d.as_secs_f64()),
                reload_every_s: config.faults.reload_every.map(|d| d.as_secs_f64()),
                fault_window_s: config.faults.window.as_secs_f64(),
            },
            requests: rec.requests(),
            successes: rec.successes,
            errors,
            throughput_rps: rec.answered_in_run as f64 / seconds,
            latency_us: LatencySummary::from_histogram(&rec.latency),
            open_loop,
            statuses: rec.statuses.iter().copied().collect(),
            reconnects: rec.reconnects,
            workers,
            without_worker_id: rec.without_worker_id,
            pool_workers,
            busiest_worker,
            faults,
        }
    }

    /// The report as a human-readable table.
    pub fn to_table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let load = match s.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "rr-load {} {}: {} connections, {}, {} for {}s{}, {} thread{}",
            s.host,
            s.path,
            s.connections,
            s.mode,
            load,
            s.duration_s,
            if s.warmup_s > 0.0 {
                format!(" after {}s warm-up", s.warmup_s)
            } else {
                String::new()
            },
            s.threads,
            if s.threads == 1 { "" } else { "s" },
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  requests     {:>12}", self.requests);
        let _ = writeln!(out, "  successes    {:>12}", self.successes);
        let _ = writeln!(
            out,
            "  errors       {:>12}   {}",
            self.errors.total,
            self.errors.summary()
        );
        let _ = writeln!(out, "  throughput   {:>12.1} req/s", self.throughput_rps);
        if let Some(o) = &self.open_loop {
            let _ = writeln!(
                out,
                "  sent         {:>12}   of {} scheduled, {} missed; {} left after the end",
                o.sent, o.scheduled, o.missed, o.sent_after_end
            );
            let _ = writeln!(
                out,
                "  send rate    {:>12.1} req/s of {} asked ({} sends left within the run)",
                o.sent_rps, o.target_rps, o.sent_in_run
            );
            let lag = &o.send_lag_us;
            let _ = writeln!(
                out,
                "  send lag     p50 {}, p99 {}, max {} after the intended time",
                fmt_us(lag.p50 as f64),
                fmt_us(lag.p99 as f64),
                fmt_us(lag.max as f64),
            );
        }
        if self.reconnects > 0 {
            let _ = writeln!(out, "  reconnects   {:>12}", self.reconnects);
        }
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        if !statuses.is_empty() {
            let _ = writeln!(out, "  statuses     {}", statuses.join(", "));
        }
        let l = &self.latency_us;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  latency      {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "mean", "stdev", "p50", "p90", "p99", "p99.9", "max"
        );
        let _ = writeln!(
            out,
            "               {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            fmt_us(l.mean),
            fmt_us(l.stdev),
            fmt_us(l.p50 as f64),
            fmt_us(l.p90 as f64),
            fmt_us(l.p99 as f64),
            fmt_us(l.p99_9 as f64),
            fmt_us(l.max as f64),
        );
        if !self.workers.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "  worker     requests    share  pids");
            for w in &self.workers {
                let pids: Vec<String> = w.pids.iter().map(u32::to_string).collect();
                let _ = writeln!(
                    out,
                    "  {:<8} {:>10} {:>7.1}%  {}",
                    w.id,
                    w.requests,
                    w.share_pct,
                    pids.join(" ")
                );
            }
            if let Some(b) = &self.busiest_worker {
                let _ = match (b.ratio_to_mean, self.pool_workers) {
                    (Some(ratio), Some(pool)) => writeln!(
                        out,
                        "  busiest worker {} with {:.1}% ({ratio:.2}x the mean share of a pool of {pool})",
                        b.id, b.share_pct
                    ),
                    _ => writeln!(
                        out,
                        "  busiest worker {} with {:.1}% ({} of an unknown number answered)",
                        b.id,
                        b.share_pct,
                        match self.workers.len() {
                            1 => "1 worker".to_owned(),
                            n => format!("{n} workers"),
                        }
                    ),
                };
            }
        }
        if self.without_worker_id > 0 {
            let _ = writeln!(
                out,
                "  {} successes had no x-worker-id header",
                self.without_worker_id
            );
        }
        if let Some(f) = &self.faults {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  faults       {} injected ({} kills, {} reloads), {} failed attempts",
                f.injected,
                f.kills,
                f.reloads,
                f.attempt_errors.len()
            );
            let _ = writeln!(
                out,
                "  failed requests: {} within {}s of a fault, {} outside any fault window ({})",
                f.failed_in_windows,
                f.window_s,
                f.failed_outside_windows,
                f.outside_by_kind.summary()
            );
            if !f.events.is_empty() {
                let _ = writeln!(out, "  {:>10}  {:<28} failed", "at", "fault");
                for e in &f.events {
                    let what = match e.action {
                        fault::FaultAction::KillWorker => format!(
                            "kill slot {} pid {}",
                            e.slot.map_or("?".to_owned(), |s| s.to_string()),
                            e.pid.map_or("?".to_owned(), |p| p.to_string())
                        ),
                        fault::FaultAction::Reload => match e.until_ms {
                            Some(until) => format!("reload until {:.3}s", until / 1e3),
                            None => "reload never seen to finish".to_owned(),
                        },
                    };
                    let _ = writeln!(
                        out,
                        "  {:>9.3}s  {:<28} {} ({})",
                        e.at_ms / 1e3,
                        what,
                        e.failed_requests,
                        e.failed_by_kind.summary()
                    );
                    if let (None, Some(seen)) = (e.until_ms, e.last_seen_ms) {
                        let _ = writeln!(
                            out,
                            "  {:>10}  (last seen running at {:.3}s: what failed after that is outside any fault window)",
                            "",
                            seen / 1e3
                        );
                    }
                }
            }
            for a in &f.attempt_errors {
                let _ = writeln!(
                    out,
                    "  {:>9.3}s  {} not injected: {}",
                    a.at_ms / 1e3,
                    a.action.as_str(),
                    a.error
                );
            }
        }
        out
    }
}

/// `850us`, `1.23ms`, `2.50s`.
fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// Shares per worker, ordered by id (numerically when ids are numbers), and the
/// busiest worker, whose ratio to the mean share needs the number of workers in the
/// pool (`pool`; those that answered, if they are more).
fn shares(
    workers: &[WorkerCount],
    pool: Option<usize>,
) -> (Vec<WorkerShare>, Option<BusiestWorker>) {
    let total: u64 = workers.iter().map(|w| w.requests).sum();
    let mut out: Vec<WorkerShare> = workers
        .iter()
        .map(|w| WorkerShare {
            id: String::from_utf8_lossy(&w.id).into_owned(),
            requests: w.requests,
            share_pct: if total == 0 {
                0.0
            } else {
                w.requests as f64 * 100.0 / total as f64
            },
            pids: {
                let mut pids = w.pids.clone();
                pids.sort_unstable();
                pids
            },
        })
        .collect();
    out.sort_by(|a, b| {
        let key = |w: &WorkerShare| w.id.parse::<u64>().ok();
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.id.cmp(&b.id),
        }
    });
    let busiest = out
        .iter()
        .max_by_key(|w| w.requests)
        .filter(|_| total > 0)
        .map(|w| BusiestWorker {
            id: w.id.clone(),
            share_pct: w.share_pct,
            ratio_to_mean: pool.map(|pool| {
                let mean = 100.0 / pool.max(out.len()) as f64;
                w.share_pct / mean
            }),
        });
    (out, busiest)
}

fn fault_report(config: &Config, rec: &Recorder, log: FaultLog) -> FaultReport {
    let mut events = log.events;
    events.sort_by_key(|(span, _)| span.from_us);
    let spans: Vec<fault::Span> = events.iter().map(|(span, _)| *span).collect();
    let (per_fault, outside) = fault::attribute(&spans, &rec.failures, config.faults.window);
    let events: Vec<FaultEvent> = events
        .into_iter()
        .zip(per_fault)
        .map(|((_, mut e), counts)| {
            e.failed_requests = counts.total;
            e.failed_by_kind = counts;
            e
        })
        .collect();
    let count = |a| events.iter().filter(|e| e.action == a).count() as u64;
    FaultReport {
        window_s: config.faults.window.as_secs_f64(),
        injected: events.len() as u64,
        kills: count(fault::FaultAction::KillWorker),
        reloads: count(fault::FaultAction::Reload),
        failed_in_windows: events.iter().map(|e| e.failed_requests).sum(),
        failed_outside_windows: outside.total + rec.failures_dropped,
        untracked_failures: rec.failures_dropped,
        outside_by_kind: outside,
        attempt_errors: log.errors,
        events,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::recorder::WorkerTag;

    fn config() -> Config {
        Config::builder("127.0.0.1:8080")
            .connections(2)
            .duration(Duration::from_secs(2))
            .build()
            .expect("config")
    }

    #[test]
    fn report_math() {
        let mut rec = Recorder::new(false);
        for i in 1..=100u64 {
            let id = if i % 4 == 0 { b"1" } else { b"0" };
            rec.success(i * 10, Some(&WorkerTag::new(id, Some(7))));
            rec.status(200);
        }
        rec.answered_in_run = 100;
        rec.failure(ErrorKind::Reset, 0, 1);
        rec.failure(ErrorKind::Reset, 0, 1);
        rec.failure(ErrorKind::BadStatus, 0, 1);
        rec.status(503);
        let r = Report::new(&config(), rec, None, Some(2));
        assert_eq!(r.requests, 103);
        assert_eq!(r.successes, 100);
        assert_eq!(r.errors.reset, 2);
        assert_eq!(r.errors.bad_status, 1);
        assert_eq!(r.errors.total, 3);
        assert!((r.throughput_rps - 50.0).abs() < 1e-9);
        assert_eq!(r.latency_us.count, 100);
        assert_eq!(r.latency_us.min, 10);
        assert_eq!(r.latency_us.max, 1000);
        assert_eq!(r.latency_us.p50, 500);
        assert_eq!(r.latency_us.p90, 900);
        assert_eq!(r.latency_us.p99, 990);
        assert_eq!(r.statuses.get(&200), Some(&100));
        assert_eq!(r.statuses.get(&503), Some(&1));
        assert_eq!(r.workers.len(), 2);
        assert_eq!(r.workers[0].id, "0");
        assert!((r.workers[0].share_pct - 75.0).abs() < 1e-9);
        assert!((r.workers[1].share_pct - 25.0).abs() < 1e-9);
        let b = r.busiest_worker.as_ref().expect("busiest");
        assert_eq!(b.id, "0");
        assert_eq!(b.ratio_to_mean, Some(1.5));
        let table = r.to_table();
        assert!(table.contains("reset 2, bad_status 1"), "{table}");
        assert!(table.contains("75.0%"), "{table}");
        assert!(
            table.contains("(1.50x the mean share of a pool of 2)"),
            "{table}"
        );
    }

    #[test]
    fn open_loop_reports_its_schedule() {
        let config = Config::builder("127.0.0.1:8080")
            .connections(2)
            .rate(Some(50.0))
            .duration(Duration::from_secs(2))
            .build()
            .expect("config");
        let mut rec = Recorder::new(false);
        for lag in [0, 300, 900] {
            rec.success(1_000, None);
            rec.sent_late(lag);
        }
        rec.failure(ErrorKind::Timeout, 0, 1);
        rec.sent_late(2_000);
        rec.missed(96, std::iter::empty(), 3);
        // One of the four left after the end; one due in the warm-up left in the run.
        rec.sent_after_end = 1;
        rec.sent_in_run = 4;
        let r = Report::new(&config, rec, None, None);
        assert_eq!((r.requests, r.errors.missed, r.errors.total), (100, 96, 97));
        let o = r.open_loop.as_ref().expect("open loop");
        assert_eq!((o.scheduled, o.sent, o.missed), (100, 4, 96));
        assert_eq!((o.sent_after_end, o.sent_in_run), (1, 4));
        assert!((o.sent_rps - 2.0).abs() < 1e-9);
        assert!((o.target_rps - 50.0).abs() < 1e-9);
        assert_eq!(o.send_lag_us.count, 4);
        assert_eq!(o.send_lag_us.max, 2_000);
        let table = r.to_table();
        assert!(table.contains("timeout 1, missed 96"), "{table}");
        assert!(
            table.contains("4   of 100 scheduled, 96 missed; 1 left after the end"),
            "{table}"
        );
        assert!(
            table.contains("2.0 req/s of 50 asked (4 sends left within the run)"),
            "{table}"
        );
        assert!(table.contains("max 2.00ms after"), "{table}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["open_loop"]["missed"], 96);
        assert_eq!(json["errors"]["missed"], 96);
        // Reports written before `missed` and `open_loop` existed still read.
        let mut old = json.clone();
        let errors = old["errors"].as_object_mut().expect("errors");
        errors.remove("missed");
        old.as_object_mut().expect("report").remove("open_loop");
        let back: Report = serde_json::from_value(old).expect("old report");
        assert_eq!(back.errors.missed, 0);
        assert!(back.open_loop.is_none());
    }

    #[test]
    fn empty_run_reports_zeros() {
        let r = Report::new(&config(), Recorder::new(false), None, None);
        assert_eq!(r.requests, 0);
        assert_eq!(r.latency_us, LatencySummary::default());
        assert!(r.busiest_worker.is_none());
        assert!(!r.to_table().is_empty());
    }

    #[test]
    fn worker_ids_sort_numerically() {
        let w = |id: &[u8], n| WorkerCount {
            id: id.to_vec(),
            requests: n,
            pids: vec![],
        };
        let (s, _) = shares(&[w(b"10", 1), w(b"b", 1), w(b"2", 1), w(b"a", 1)], None);
        let ids: Vec<&str> = s.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["2", "10", "a", "b"]);
    }

    /// Regression: the mean share was taken over the workers that answered, so a pool
    /// of 2 in which one worker served nothing read "100.0% (1.00x the mean share)".
    #[test]
    fn the_busiest_share_is_compared_with_the_whole_pool() {
        let one = [WorkerCount {
            id: b"1".to_vec(),
            requests: 10,
            pids: vec![],
        }];
        let (_, b) = shares(&one, Some(2));
        let b = b.expect("busiest");
        assert_eq!((b.share_pct, b.ratio_to_mean), (100.0, Some(2.0)));
        // More workers answered than the pool has (a scale-down during the run): the
        // mean is over those that answered.
        let (_, b) = shares(&one, Some(0));
        assert_eq!(b.expect("busiest").ratio_to_mean, Some(1.0));
        // Unknown pool: no ratio, and the table says how many answered.
        let (_, b) = shares(&one, None);
        assert_eq!(b.expect("busiest").ratio_to_mean, None);
        let mut rec = Recorder::new(false);
        rec.success(10, Some(&WorkerTag::new(b"1", None)));
        let table = Report::new(&config(), rec, None, None).to_table();
        assert!(
            table.contains("100.0% (1 worker of an unknown number answered)"),
            "{table}"
        );
    }

    /// A report of schema version 1 (a number for `ratio_to_mean`, none of the fields
    /// added since) still reads.
    #[test]
    fn version_1_reports_still_read() {
        let mut rec = Recorder::new(false);
        rec.success(10, Some(&WorkerTag::new(b"1", None)));
        let r = Report::new(&config(), rec, None, Some(2));
        let mut json = serde_json::to_value(&r).expect("json");
        json["schema_version"] = 1.into();
        json["busiest_worker"]["ratio_to_mean"] = 1.0.into();
        let report = json.as_object_mut().expect("report");
        report.remove("pool_workers");
        let back: Report = serde_json::from_value(json).expect("version 1");
        assert_eq!(
            back.busiest_worker.expect("busiest").ratio_to_mean,
            Some(1.0)
        );
        assert_eq!(back.pool_workers, None);
    }

    /// Regression: a reload never seen to end took every failure after it, to the end
    /// of the run, and the report read like one that had finished. Now it takes those
    /// up to when it was last seen running; the rest are outside any window, and the
    /// table says it never finished.
    #[test]
    fn a_reload_never_seen_to_end_is_reported_as_such() {
        let mut rec = Recorder::new(true);
        rec.failure(ErrorKind::Reset, 1_500, 1_600);
        rec.failure(ErrorKind::Reset, 500_000, 500_100);
        let mut log = FaultLog::default();
        log.events.push((
            fault::Span {
                from_us: 1_000,
                until_us: 2_000,
                open: true,
            },
            FaultEvent {
                at_ms: 1.0,
                until_ms: None,
                last_seen_ms: Some(2.0),
                action: fault::FaultAction::Reload,
                slot: None,
                pid: None,
                message: Some("reloading".into()),
                failed_requests: 0,
                failed_by_kind: ErrorCounts::default(),
            },
        ));
        let r = Report::new(&config(), rec, Some(log), None);
        let f = r.faults.as_ref().expect("faults");
        assert_eq!((f.failed_in_windows, f.failed_outside_windows), (1, 1));
        assert_eq!(f.events[0].until_ms, None);
        let table = r.to_table();
        assert!(table.contains("reload never seen to finish"), "{table}");
        assert!(table.contains("last seen running at 0.002s"), "{table}");
    }

    #[test]
    fn json_is_stable_and_round_trips() {
        let mut rec = Recorder::new(true);
        rec.success(100, Some(&WorkerTag::new(b"0", Some(1234))));
        rec.failure(ErrorKind::Reset, 1_000, 1_100);
        rec.failure(ErrorKind::Timeout, 10, 20);
        let mut log = FaultLog::default();
        log.events.push((
            fault::Span::at(1_050),
            FaultEvent {
                at_ms: 1.05,
                until_ms: Some(1.05),
                last_seen_ms: None,
                action: fault::FaultAction::KillWorker,
                slot: Some(0),
                pid: Some(1234),
                message: None,
                failed_requests: 0,
                failed_by_kind: ErrorCounts::default(),
            },
        ));
        let r = Report::new(&config(), rec, Some(log), None);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["schema_version"], 2);
        assert_eq!(json["settings"]["mode"], "keepalive");
        assert_eq!(json["errors"]["reset"], 1);
        assert_eq!(json["errors"]["total"], 2);
        assert_eq!(json["latency_us"]["p99_9"], 100);
        assert_eq!(json["statuses"].as_object().map(|o| o.len()), Some(0));
        assert_eq!(json["workers"][0]["pids"][0], 1234);
        assert_eq!(json["faults"]["events"][0]["action"], "kill_worker");
        assert_eq!(json["faults"]["events"][0]["failed_requests"], 1);
        assert_eq!(json["faults"]["failed_outside_windows"], 1);
        assert_eq!(json["faults"]["outside_by_kind"]["timeout"], 1);
        assert_eq!(json["errors"]["missed"], 0);
        assert!(json["open_loop"].is_null());
        let back: Report = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, r);
        assert!(r.to_table().contains("kill slot 0 pid 1234"));
    }
}
