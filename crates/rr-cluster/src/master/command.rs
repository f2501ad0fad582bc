//! Requests to the driver (from handles, the control socket and signals) and their
//! typed answers.

use tokio::sync::oneshot;

use super::MasterSignal;
use crate::control::Status;

/// What a successful request did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A rolling reload into this generation began.
    Reloading {
        /// The new generation.
        generation: u64,
    },
    /// Another reload runs; this one follows it (requests coalesce).
    ReloadQueued,
    /// A reload finished: every slot runs this generation (an answer to a reload that
    /// was waited for).
    Reloaded {
        /// The generation now in effect.
        generation: u64,
    },
    /// The number of workers changes.
    Scaling {
        /// Old number.
        from: usize,
        /// New number.
        to: usize,
    },
    /// Nothing to do (for instance a scale to the current number).
    Unchanged {
        /// The number of workers.
        workers: usize,
    },
    /// A stop began.
    Stopping {
        /// Draining (true) or killing at once (false).
        graceful: bool,
    },
    /// The master stopped with this exit code (an answer to a stop that was waited
    /// for).
    Stopped {
        /// The exit code.
        code: i32,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reloading { generation } => {
                write!(f, "rolling the workers over to generation {generation}")
            }
            Outcome::ReloadQueued => {
                f.write_str("a reload is in progress; another one will follow it")
            }
            Outcome::Reloaded { generation } => {
                write!(f, "reloaded: every worker runs generation {generation}")
            }
            Outcome::Scaling { from, to } => write!(f, "scaling from {from} to {to} workers"),
            Outcome::Unchanged { workers } => write!(f, "already {workers} workers"),
            Outcome::Stopping { graceful: true } => f.write_str("stopping: draining workers"),
            Outcome::Stopping { graceful: false } => f.write_str("stopping now"),
            Outcome::Stopped { code } => write!(f, "stopped with exit code {code}"),
        }
    }
}

/// Why a request was refused; the pool is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The master is stopping.
    #[error("the master is stopping")]
    Stopping,
    /// The reload hook rejected the new configuration.
    #[error("reload rejected, pool unchanged: {reason}")]
    ConfigRejected {
        /// Why (e.g. the configuration file's error).
        reason: String,
    },
    /// The new configuration changes what a reload cannot change.
    #[error(
        "reload rejected, pool unchanged: {what} cannot change on reload (restart the master to change it)"
    )]
    CannotChange {
        /// `listen addresses` or `the control socket`.
        what: &'static str,
    },
    /// A number of workers out of range.
    #[error("{requested} workers is out of range 1..={max}")]
    WorkersOutOfRange {
        /// The number asked for (negative for a relative change below 1).
        requested: i64,
        /// The limit.
        max: usize,
    },
    /// A waited-for reload failed; the old workers keep serving.
    #[error("reload to generation {generation} failed, old workers kept: {reason}")]
    ReloadFailed {
        /// The generation that failed.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// A message that the workers' protocol cannot carry (a Node.js pool takes JSON
    /// values only).
    #[error("cannot send this message: {reason}")]
    BadMessage {
        /// Why.
        reason: String,
    },
}

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StopMode {
    /// Stop accepting, drain every worker, SIGKILL what is left at the drain timeout.
    #[default]
    Graceful,
    /// SIGKILL every worker at once.
    Now,
}

/// A scale request: an absolute number of workers, or a change by some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScaleTo {
    /// Exactly this many workers.
    Exactly(usize),
    /// This many more (or fewer, when negative) than now.
    By(i64),
}

/// A request to the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Status(oneshot::Sender<Status>),
    Metrics(oneshot::Sender<String>),
    Reload {
        /// Answer when the reload finished or failed, not when it began.
        wait: bool,
        reply: oneshot::Sender<Result<Outcome, Refusal>>,
    },
    Scale {
        to: ScaleTo,
        reply: oneshot::Sender<Result<Outcome, Refusal>>,
    },
    Stop {
        mode: StopMode,
        /// Answered with the exit code once the master has stopped.
        wait: Option<oneshot::Sender<i32>>,
    },
    Send {
        slot: Option<u32>,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<usize, Refusal>>,
    },
    Signal(MasterSignal),
}
