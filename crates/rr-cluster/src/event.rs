//! Lifecycle events a master publishes: to library users through
//! [`MasterHandle::events`](crate::MasterHandle::events), and to the logs.

use std::fmt;
use std::time::Duration;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, when it exited by itself.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// From the status `wait` reported.
    pub fn from_status(status: std::process::ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
        }
    }

    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Ended by a signal that comes from outside the worker (SIGKILL, SIGTERM,
    /// SIGINT, SIGHUP: an operator, the OOM killer), not by a crash of its own
    /// (SIGSEGV, SIGABRT) or an exit.
    pub fn killed_from_outside(&self) -> bool {
        matches!(self.signal, Some(1 | 2 | 9 | 15))
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(9)) => f.write_str("signal 9 (SIGKILL)"),
            (None, Some(15)) => f.write_str("signal 15 (SIGTERM)"),
            (None, Some(sig)) => write!(f, "signal {sig}"),
            (None, None) => f.write_str("unknown status"),
        }
    }
}

/// Something that happened to the pool. Every worker lifecycle transition is one.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    WorkerSpawned {
        /// Slot.
        slot: u32,
        /// Unique id within the master.
        id: u64,
        /// Process id.
        pid: u32,
        /// Pool generation.
        generation: u64,
    },
    /// A worker process could not be started at all.
    SpawnFailed {
        /// Slot.
        slot: u32,
        /// Unique id within the master.
        id: u64,
        /// Why.
        error: String,
    },
    /// A worker said `Ready` and takes connections.
    WorkerReady {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// Process id.
        pid: u32,
    },
    /// A worker announced it is going down (`Suicide`); it is being replaced.
    WorkerSuicide {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// The worker's reason.
        reason: String,
    },
    /// A worker stopped answering (no heartbeat within the heartbeat timeout, or it
    /// stopped reading its channel); it was taken out of rotation and killed.
    WorkerHung {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// Process id.
        pid: u32,
        /// What it failed to do.
        reason: String,
    },
    /// A worker did not say `Ready` within the ready timeout; it was killed.
    WorkerReadyTimeout {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// The ready timeout.
        timeout: Duration,
    },
    /// A ready worker was taken out of rotation for a while: its heartbeat is late,
    /// or it holds connections it has not acknowledged. It gets no new connection
    /// until it shows life again ([`Event::WorkerResumed`]), and is killed if it stays
    /// silent for the heartbeat timeout.
    WorkerStalled {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// What is late.
        reason: String,
    },
    /// A stalled worker showed life again and is back in rotation.
    WorkerResumed {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
    },
    /// A worker is being recycled (`max_requests`, `max_memory`, `max_age`): its
    /// replacement starts now, and the worker drains once the replacement is ready.
    RecycleStarted {
        /// Slot.
        slot: u32,
        /// The worker being replaced.
        id: u64,
        /// Why (which limit).
        reason: String,
    },
    /// A recycled worker's replacement is ready; the old worker drains.
    Recycled {
        /// Slot.
        slot: u32,
        /// The old worker.
        old: u64,
        /// Its replacement.
        new: u64,
        /// Why (which limit).
        reason: String,
    },
    /// A recycle's replacement failed to start; the old worker keeps serving and the
    /// recycle is tried again later.
    RecycleFailed {
        /// Slot.
        slot: u32,
        /// Why.
        reason: String,
    },
    /// After a failed reload, the slots already rolled over go back to the previous
    /// configuration.
    RollbackStarted {
        /// The generation that failed.
        failed: u64,
        /// The generation the pool returns to.
        generation: u64,
    },
    /// The listeners stopped (`paused: true`: the master gave up and no worker is left
    /// to serve, so connection attempts are refused rather than left waiting) or
    /// resumed.
    ListenersPaused {
        /// Whether connections are now refused.
        paused: bool,
    },
    /// A worker's channel broke the protocol or closed; it was taken out of rotation.
    WorkerChannelClosed {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// The protocol error, if any.
        error: Option<String>,
    },
    /// A worker was asked to drain (reload, scale down, stop).
    WorkerDraining {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
    },
    /// A worker outlived its drain deadline and was killed.
    WorkerKilled {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// Process id.
        pid: u32,
    },
    /// A worker process ended.
    WorkerExited {
        /// Slot.
        slot: u32,
        /// Unique id.
        id: u64,
        /// Process id.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
        /// The master asked for it (drain, replaced after suicide); no restart follows.
        planned: bool,
        /// Whether the exit counts as a failure (a restart of the slot follows).
        failure: bool,
    },
    /// A slot's next worker starts after `delay`.
    RestartScheduled {
        /// Slot.
        slot: u32,
        /// Backoff before the spawn.
        delay: Duration,
        /// Unstable restarts counted toward the limit in the current window.
        restarts_in_window: usize,
    },
    /// More than `limit` unstable restarts within `window`: the master stops restarting.
    GiveUp {
        /// Restarts counted in the window.
        restarts: usize,
        /// The window.
        window: Duration,
    },
    /// A rolling reload began.
    ReloadStarted {
        /// The new generation.
        generation: u64,
    },
    /// Every slot runs a worker of the new generation.
    ReloadFinished {
        /// The new generation.
        generation: u64,
    },
    /// A new worker failed during a reload; the old ones keep serving.
    ReloadFailed {
        /// The generation that was being rolled out.
        generation: u64,
        /// The slot whose new worker failed.
        slot: u32,
        /// Why.
        reason: String,
    },
    /// A reload request was refused (for instance an invalid configuration file).
    ReloadRejected {
        /// Why.
        reason: String,
    },
    /// The number of workers changed.
    Scaled {
        /// Old number.
        from: usize,
        /// New number.
        to: usize,
    },
    /// The master began to stop.
    Stopping {
        /// Draining (true) or killing at once (false).
        graceful: bool,
    },
    /// Every worker is gone; the master is about to return.
    Stopped {
        /// The exit code the master reports.
        code: i32,
    },
}

impl Event {
    /// Writes the event to the log with structured fields.
    pub(crate) fn log(&self) {
        use tracing::{error, info, warn};
        match self {
            Event::WorkerSpawned {
                slot,
                id,
                pid,
                generation,
            } => info!(worker = slot, id, pid, generation, "worker spawned"),
            Event::SpawnFailed { slot, id, error } => {
                error!(worker = slot, id, %error, "worker could not be spawned")
            }
            Event::WorkerReady { slot, id, pid } => info!(worker = slot, id, pid, "worker ready"),
            Event::WorkerSuicide { slot, id, reason } => {
                warn!(worker = slot, id, %reason, "worker going down; replacing it")
            }
            Event::WorkerHung {
                slot,
                id,
                pid,
                reason,
            } => {
                warn!(worker = slot, id, pid, %reason, "worker unresponsive; killed")
            }
            Event::WorkerReadyTimeout { slot, id, timeout } => {
                warn!(
                    worker = slot,
                    id,
                    timeout_ms = timeout.as_millis() as u64,
                    "worker not ready in time (no Ready message within the ready timeout); killed"
                )
            }
            Event::WorkerStalled { slot, id, reason } => {
                warn!(worker = slot, id, %reason, "worker stalled; out of rotation")
            }
            Event::WorkerResumed { slot, id } => {
                info!(worker = slot, id, "worker resumed; back in rotation")
            }
            Event::RecycleStarted { slot, id, reason } => {
                info!(worker = slot, id, %reason, "recycling worker; replacement starting")
            }
            Event::Recycled {
                slot,
                old,
                new,
                reason,
            } => info!(worker = slot, old, new, %reason, "worker recycled"),
            Event::RecycleFailed { slot, reason } => {
                warn!(worker = slot, %reason, "recycle failed; old worker kept")
            }
            Event::RollbackStarted { failed, generation } => {
                warn!(
                    failed,
                    generation, "rolling back to the previous generation"
                )
            }
            Event::ListenersPaused { paused } => {
                if *paused {
                    error!("no worker left to serve: listeners paused, connections refused")
                } else {
                    info!("listeners resumed")
                }
            }
            Event::WorkerChannelClosed { slot, id, error } => match error {
                Some(error) => warn!(worker = slot, id, %error, "worker channel error"),
                None => info!(worker = slot, id, "worker channel closed"),
            },
            Event::WorkerDraining { slot, id } => info!(worker = slot, id, "worker draining"),
            Event::WorkerKilled { slot, id, pid } => {
                warn!(
                    worker = slot,
                    id, pid, "worker outlived its drain deadline; killed"
                )
            }
            Event::WorkerExited {
                slot,
                id,
                pid,
                exit,
                planned,
                failure,
            } => {
                if *failure {
                    warn!(worker = slot, id, pid, %exit, "worker died")
                } else {
                    info!(worker = slot, id, pid, %exit, planned, "worker exited")
                }
            }
            Event::RestartScheduled {
                slot,
                delay,
                restarts_in_window,
            } => info!(
                worker = slot,
                delay_ms = delay.as_millis() as u64,
                restarts_in_window,
                "restart scheduled"
            ),
            Event::GiveUp { restarts, window } => error!(
                restarts,
                window_s = window.as_secs_f64(),
                "too many restarts; giving up"
            ),
            Event::ReloadStarted { generation } => info!(generation, "reload started"),
            Event::ReloadFinished { generation } => info!(generation, "reload finished"),
            Event::ReloadFailed {
                generation,
                slot,
                reason,
            } => error!(generation, worker = slot, %reason, "reload failed; old workers kept"),
            Event::ReloadRejected { reason } => error!(%reason, "reload rejected; pool unchanged"),
            Event::Scaled { from, to } => info!(from, to, "scaled"),
            Event::Stopping { graceful } => info!(graceful, "stopping"),
            Event::Stopped { code } => info!(code, "stopped"),
        }
    }
}
