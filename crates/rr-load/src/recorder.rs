//! Per-connection statistics, kept without locks by each connection task and merged
//! when the run ends; plus the few shared counters the progress line reads.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::outcome::ErrorKind;

/// The longest `x-worker-id` value kept; longer ones are cut.
pub(crate) const MAX_WORKER_ID: usize = 48;

/// The most failures a single connection remembers for fault attribution; more are
/// counted as unattributed.
const MAX_FAILURE_RECORDS: usize = 1 << 18;

/// The worker that answered, copied out of the read buffer without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerTag {
    id: [u8; MAX_WORKER_ID],
    len: u8,
    /// `x-worker-pid`.
    pub(crate) pid: Option<u32>,
}

impl WorkerTag {
    pub(crate) fn new(id: &[u8], pid: Option<u32>) -> WorkerTag {
        let len = id.len().min(MAX_WORKER_ID);
        let mut tag = WorkerTag {
            id: [0; MAX_WORKER_ID],
            len: len as u8,
            pid,
        };
        tag.id[..len].copy_from_slice(&id[..len]);
        tag
    }

    pub(crate) fn id(&self) -> &[u8] {
        &self.id[..usize::from(self.len)]
    }
}

/// One worker as seen by one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerCount {
    pub(crate) id: Vec<u8>,
    pub(crate) requests: u64,
    pub(crate) pids: Vec<u32>,
}

/// A failed request, for charging it to a fault later. Times are microseconds since
/// the start of the measured run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) started_us: u64,
    pub(crate) failed_us: u64,
    pub(crate) kind: ErrorKind,
}

/// What one connection task measured.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Latency of successful requests, in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Open loop: how late each measured request left after its intended time, in
    /// microseconds.
    pub(crate) send_lag: Histogram<u64>,
    pub(crate) successes: u64,
    pub(crate) errors: [u64; ErrorKind::COUNT],
    /// `(status, count)` of complete responses.
    pub(crate) statuses: Vec<(u16, u64)>,
    pub(crate) workers: Vec<WorkerCount>,
    /// Successful responses without `x-worker-id`.
    pub(crate) without_worker_id: u64,
    /// Keep-alive connections reopened after the server closed them properly.
    pub(crate) reconnects: u64,
    /// Successes that completed within the measured run (from its start to its end),
    /// whenever they started: the throughput's count.
    pub(crate) answered_in_run: u64,
    /// Open loop: sends that left within the measured run, whenever they were due.
    pub(crate) sent_in_run: u64,
    /// Open loop: measured sends (due within the run) that left after its end.
    pub(crate) sent_after_end: u64,
    /// Failures remembered for fault attribution (only when faults are injected).
    pub(crate) failures: Vec<Failure>,
    pub(crate) track_failures: bool,
    /// Failures not remembered because of the cap.
    pub(crate) failures_dropped: u64,
}

impl Recorder {
    pub(crate) fn new(track_failures: bool) -> Recorder {
        Recorder {
            latency: new_histogram(),
            send_lag: new_histogram(),
            successes: 0,
            errors: [0; ErrorKind::COUNT],
            statuses: Vec::new(),
            workers: Vec::new(),
            without_worker_id: 0,
            reconnects: 0,
            answered_in_run: 0,
            sent_in_run: 0,
            sent_after_end: 0,
            failures: Vec::new(),
            track_failures,
            failures_dropped: 0,
        }
    }

    pub(crate) fn requests(&self) -> u64 {
        self.successes + self.errors.iter().sum::<u64>()
    }

    pub(crate) fn status(&mut self, status: u16) {
        match self.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => self.statuses.push((status, 1)),
        }
    }

    pub(crate) fn success(&mut self, latency_us: u64, worker: Option<&WorkerTag>) {
        self.successes += 1;
        // Not `saturating_record`: it clamps to the current range instead of growing
        // an auto-resizing histogram. `record` only fails beyond u64 range.
        if self.latency.record(latency_us).is_err() {
            self.latency.saturating_record(latency_us);
        }
        let Some(tag) = worker else {
            self.without_worker_id += 1;
            return;
        };
        let i = match self.workers.iter().position(|w| w.id == tag.id()) {
            Some(i) => i,
            None => {
                self.workers.push(WorkerCount {
                    id: tag.id().to_vec(),
                    requests: 0,
                    pids: Vec::new(),
                });
                self.workers.len() - 1
            }
        };
        let entry = &mut self.workers[i];
        entry.requests += 1;
        if let Some(pid) = tag.pid {
            if !entry.pids.contains(&pid) {
                entry.pids.push(pid);
            }
        }
    }

    /// An open-loop request left `lag_us` after its intended time.
    pub(crate) fn sent_late(&mut self, lag_us: u64) {
        if self.send_lag.record(lag_us).is_err() {
            self.send_lag.saturating_record(lag_us);
        }
    }

    /// `n` open-loop sends that never left ([`ErrorKind::Missed`]), found at
    /// `failed_us`. `started_us` yields their intended times; it is only read for the
    /// failures remembered for fault attribution.
    pub(crate) fn missed(&mut self, n: u64, started_us: impl Iterator<Item = u64>, failed_us: u64) {
        self.errors[ErrorKind::Missed.index()] += n;
        if !self.track_failures {
            return;
        }
        let room = MAX_FAILURE_RECORDS.saturating_sub(self.failures.len());
        let kept = n.min(room as u64);
        self.failures
            .extend(started_us.take(kept as usize).map(|started_us| Failure {
                started_us,
                failed_us,
                kind: ErrorKind::Missed,
            }));
        self.failures_dropped += n - kept;
    }

    pub(crate) fn failure(&mut self, kind: ErrorKind, started_us: u64, failed_us: u64) {
        self.errors[kind.index()] += 1;
        if !self.track_failures {
            return;
        }
        if self.failures.len() < MAX_FAILURE_RECORDS {
            self.failures.push(Failure {
                started_us,
                failed_us,
                kind,
            });
        } else {
            self.failures_dropped += 1;
        }
    }

    /// Adds `other` into `self`.
    pub(crate) fn merge(&mut self, other: Recorder) {
        // Both are auto-resizing, so adding cannot fail for lack of range.
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
        self.successes += other.successes;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for (status, n) in other.statuses {
            match self.statuses.iter_mut().find(|(s, _)| *s == status) {
                Some((_, m)) => *m += n,
                None => self.statuses.push((status, n)),
            }
        }
        for w in other.workers {
            match self.workers.iter_mut().find(|v| v.id == w.id) {
                Some(v) => {
                    v.requests += w.requests;
                    for pid in w.pids {
                        if !v.pids.contains(&pid) {
                            v.pids.push(pid);
                        }
                    }
                }
                None => self.workers.push(w),
            }
        }
        self.without_worker_id += other.without_worker_id;
        self.reconnects += other.reconnects;
        self.answered_in_run += other.answered_in_run;
        self.sent_in_run += other.sent_in_run;
        self.sent_after_end += other.sent_after_end;
        self.failures.extend(other.failures);
        self.failures_dropped += other.failures_dropped;
    }
}

/// An auto-resizing histogram with three significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"));
    h.auto(true);
    h
}

/// Counters shared by all connections for the live progress line.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// Measured requests.
    pub(crate) requests: AtomicU64,
    /// Measured failures.
    pub(crate) errors: AtomicU64,
    /// Requests during the warm-up.
    pub(crate) warmup: AtomicU64,
}

impl Live {
    pub(crate) fn add(&self, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_warmup(&self) {
        self.warmup.fetch_add(1, Ordering::Relaxed);
    }

    /// `(measured requests, measured errors, warm-up requests)`.
    pub(crate) fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.warmup.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_tags_are_counted_and_merged() {
        let mut a = Recorder::new(false);
        a.success(100, Some(&WorkerTag::new(b"0", Some(10))));
        a.success(200, Some(&WorkerTag::new(b"1", Some(11))));
        a.success(300, Some(&WorkerTag::new(b"0", Some(12))));
        a.success(300, None);
        a.status(200);
        a.status(200);
        let mut b = Recorder::new(true);
        b.success(50, Some(&WorkerTag::new(b"1", Some(11))));
        b.failure(ErrorKind::Reset, 1, 2);
        b.status(503);
        (a.answered_in_run, b.answered_in_run) = (9, 5);
        (a.sent_in_run, b.sent_in_run, b.sent_after_end) = (1, 2, 3);
        a.merge(b);
        assert_eq!(a.answered_in_run, 14);
        assert_eq!((a.sent_in_run, a.sent_after_end), (3, 3));
        assert_eq!(a.successes, 5);
        assert_eq!(a.errors[ErrorKind::Reset.index()], 1);
        assert_eq!(a.requests(), 6);
        assert_eq!(a.latency.len(), 5);
        assert_eq!(a.without_worker_id, 1);
        assert_eq!(a.statuses, vec![(200, 2), (503, 1)]);
        let w0 = a.workers.iter().find(|w| w.id == b"0").expect("worker 0");
        assert_eq!((w0.requests, w0.pids.clone()), (2, vec![10, 12]));
        let w1 = a.workers.iter().find(|w| w.id == b"1").expect("worker 1");
        assert_eq!((w1.requests, w1.pids.clone()), (2, vec![11]));
        assert_eq!(a.failures.len(), 1);
    }

    /// Regression: latencies above 2 ms were clamped (saturating_record does not resize).
    #[test]
    fn large_latencies_are_recorded_exactly() {
        let mut r = Recorder::new(false);
        for us in [2, 12_000, 5_000_000, 3_600_000_000] {
            r.success(us, None);
        }
        assert_eq!(r.latency.min(), 2);
        assert!(r.latency.max() >= 3_600_000_000);
        let p50 = r.latency.value_at_quantile(0.5);
        assert!((11_990..=12_010).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn long_worker_ids_are_cut_not_rejected() {
        let long = [b'x'; 200];
        let tag = WorkerTag::new(&long, None);
        assert_eq!(tag.id().len(), MAX_WORKER_ID);
    }

    #[test]
    fn missed_sends_are_errors_and_tracked_up_to_the_cap() {
        let mut r = Recorder::new(true);
        r.missed(3, [10, 20, 30].into_iter(), 40);
        assert_eq!(r.errors[ErrorKind::Missed.index()], 3);
        assert_eq!(r.requests(), 3);
        let started: Vec<u64> = r.failures.iter().map(|f| f.started_us).collect();
        assert_eq!(started, [10, 20, 30]);
        assert!(r.failures.iter().all(|f| f.failed_us == 40));
        // Beyond the cap they are counted, not remembered (and the iterator is not
        // read further).
        r.failures.resize(MAX_FAILURE_RECORDS - 1, r.failures[0]);
        r.missed(5, std::iter::repeat(7), 50);
        assert_eq!(r.failures.len(), MAX_FAILURE_RECORDS);
        assert_eq!(r.failures_dropped, 4);
        assert_eq!(r.errors[ErrorKind::Missed.index()], 8);
        let mut untracked = Recorder::new(false);
        untracked.missed(2, std::iter::empty(), 1);
        assert_eq!(untracked.errors[ErrorKind::Missed.index()], 2);
        assert!(untracked.failures.is_empty());
    }

    #[test]
    fn failures_are_only_kept_when_tracked() {
        let mut r = Recorder::new(false);
        r.failure(ErrorKind::Timeout, 0, 5);
        assert!(r.failures.is_empty());
        assert_eq!(r.errors[ErrorKind::Timeout.index()], 1);
    }
}
