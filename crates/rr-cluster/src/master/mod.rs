//! The master: listeners, dispatch, the supervisor, the control socket and signals.
//!
//! ```no_run
//! use rr_cluster::{Master, WorkerCommand};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let master = Master::builder()
//!     .listen("127.0.0.1:8080")
//!     .workers(4)
//!     .command(WorkerCommand::new("./my-worker").arg("--verbose"))
//!     .build()?;
//! let code = master.run().await?; // until SIGTERM/SIGINT or `rr-cluster stop`
//! std::process::exit(code);
//! # }
//! ```
//!
//! # Layout
//!
//! - `builder`: [`MasterBuilder`] and its validation into the settings.
//! - `listen`: listener sources and the accept loop.
//! - `dispatch`: choosing a worker and sending it the sockets.
//! - `link`: the master's side of one worker's channel (both dialects).
//! - `supervisor`: the worker lifecycle as a pure state machine.
//! - `spawn`: starting worker processes from one long-lived thread.
//! - `output`: worker stdout/stderr capture.
//! - `driver`: the task that runs the state machine and carries out its actions.
//! - `command`: requests to the driver and their typed answers.
//! - `reload`: reading and applying a new configuration.
//! - `status`: status and metrics assembly; `procstat`: CPU and memory from /proc.
//! - `control`: the control socket server.
//! - `metrics`: Prometheus metrics text.

mod builder;
mod command;
mod control;
mod dispatch;
mod driver;
mod link;
mod listen;
mod metrics;
mod output;
mod procstat;
mod reload;
mod spawn;
mod status;
mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use builder::{BuildError, MAX_WORKERS, ReloadHook, limits};
pub use command::{Outcome, Refusal, ScaleTo, StopMode};
pub use dispatch::Balance;
pub use link::{Messages, WorkerMessage};
pub use listen::{ListenSpec, LocalAddr, socket_activated, socket_activation_mismatch};
pub use output::LogFormat;
pub use spawn::{ENV_HEARTBEAT_MS, ENV_LISTENERS, WorkerCommand};
pub use supervisor::GiveUpAction;

use crate::control::Status;
use crate::event::Event;
use builder::{Raw, Settings};
use command::Command;

/// Errors of a master.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// The configuration is invalid.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The worker command cannot be started at all (not found, not executable).
    #[error("cannot start the worker command: {0}")]
    Command(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The control socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The master could not start its tasks.
    #[error("cannot start the master: {0}")]
    Start(std::io::Error),
    /// The master refused the request; the pool is unchanged.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The master has stopped; the handle can no longer reach it.
    #[error("the master has stopped")]
    Stopped,
}

/// A signal the master reacts to (SIGTERM/SIGINT stop, SIGQUIT stops at once, SIGHUP
/// reloads, SIGTTIN/SIGTTOU add or remove a worker, SIGUSR1 reopens log files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MasterSignal {
    /// SIGTERM: graceful stop.
    Terminate,
    /// SIGINT: graceful stop; a second one stops at once.
    Interrupt,
    /// SIGQUIT: immediate stop.
    Quit,
    /// SIGHUP: reload.
    Hangup,
    /// SIGTTIN: one worker more.
    IncreaseWorkers,
    /// SIGTTOU: one worker fewer.
    DecreaseWorkers,
    /// SIGUSR1: reopen the worker log files (logrotate's convention).
    ReopenLogs,
}

/// Everything a master is configured with. Start from [`Master::builder`]; every
/// setting has a default except the listen addresses and the worker command.
#[derive(Clone, Default)]
pub struct MasterBuilder {
    raw: Raw,
}

/// A configured master, not yet started.
#[derive(Debug)]
pub struct Master {
    settings: Settings,
    events: broadcast::Sender<Event>,
}

impl Master {
    /// A builder with the defaults.
    pub fn builder() -> MasterBuilder {
        MasterBuilder::default()
    }

    /// Events from the start on (subscribe before [`Master::start`] to miss none).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Binds the listeners and the control socket, starts the workers, and returns a
    /// handle. Must be called within a tokio runtime.
    ///
    /// The library installs no logger: lifecycle events are logged through `tracing`
    /// (targets `rr_cluster::*`), so install a subscriber (for instance
    /// `tracing_subscriber::fmt::init()`) to see them, or read [`Master::events`].
    pub async fn start(self) -> Result<MasterHandle, MasterError> {
        driver::start(self.settings, self.events).await
    }

    /// Starts the master, obeys the process's signals (SIGTERM, SIGINT, SIGQUIT,
    /// SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1; see [`MasterHandle::forward_os_signals`])
    /// and returns the exit code once it has stopped.
    ///
    /// The signals are forwarded only once [`Master::start`] has returned (listeners
    /// bound, first workers spawned): one that arrives while the master starts has its
    /// default action (SIGTERM, SIGINT, SIGHUP end the process). To catch them from the
    /// first moment, install handlers before starting and call `start` and
    /// `forward_os_signals` yourself, as the `rr-cluster` binary does.
    pub async fn run(self) -> Result<i32, MasterError> {
        let handle = self.start().await?;
        handle.forward_os_signals().map_err(MasterError::Start)?;
        Ok(handle.wait().await)
    }
}

/// Talks to a running master. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MasterHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    messages: Arc<link::MessageQueue>,
    addrs: Arc<Vec<LocalAddr>>,
    done: watch::Receiver<Option<i32>>,
    control: Option<PathBuf>,
    /// The process's signals are forwarded to this master (once per master, whichever
    /// clone of the handle asked).
    forwarding: Arc<std::sync::atomic::AtomicBool>,
}

impl MasterHandle {
    /// The bound addresses, in the order they were configured.
    pub fn local_addrs(&self) -> &[LocalAddr] {
        &self.addrs
    }

    /// The first TCP address (handy with port 0).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.addrs.iter().find_map(LocalAddr::tcp)
    }

    /// The control socket path, if one is served.
    pub fn control_path(&self) -> Option<&std::path::Path> {
        self.control.as_deref()
    }

    /// Lifecycle events from now on. A subscriber that falls more than the event
    /// capacity behind skips events (`RecvError::Lagged`).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The application messages workers send (Node's `worker.on('message')`), on their
    /// own channel: lagging lifecycle events never cost a message. `None` after the
    /// first call. Until it is called, messages are not kept; once it is, unread
    /// messages wait within the byte budget [`MasterBuilder::message_queue`] sets
    /// (`n` × 1 KiB, 64 KiB to 64 MiB, each message counted as its payload + 64
    /// bytes); one that does not fit is dropped and counted.
    pub fn messages(&self) -> Option<Messages> {
        self.messages.take()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MasterError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| MasterError::Stopped)?;
        rx.await.map_err(|_| MasterError::Stopped)
    }

    /// A snapshot of the pool.
    pub async fn status(&self) -> Result<Status, MasterError> {
        self.ask(Command::Status).await
    }

    /// Rolls every worker over (re-reading the configuration through the reload
    /// hook): [`Outcome::Reloading`] or, while another reload runs,
    /// [`Outcome::ReloadQueued`]. A refusal is [`MasterError::Refused`] and the pool is
    /// unchanged.
    pub async fn reload(&self) -> Result<Outcome, MasterError> {
        Ok(self
            .ask(|reply| Command::Reload { wait: false, reply })
            .await??)
    }

    /// Like [`MasterHandle::reload`], but returns once the reload finished
    /// ([`Outcome::Reloaded`]) or failed ([`Refusal::ReloadFailed`]: the old workers
    /// keep serving).
    pub async fn reload_and_wait(&self) -> Result<Outcome, MasterError> {
        Ok(self
            .ask(|reply| Command::Reload { wait: true, reply })
            .await??)
    }

    /// Runs `workers` workers from now on.
    pub async fn scale(&self, workers: usize) -> Result<Outcome, MasterError> {
        self.scale_to(ScaleTo::Exactly(workers)).await
    }

    /// Changes the number of workers, absolutely or relatively.
    pub async fn scale_to(&self, to: ScaleTo) -> Result<Outcome, MasterError> {
        Ok(self.ask(|reply| Command::Scale { to, reply }).await??)
    }

    /// Begins a stop and returns at once; see [`MasterHandle::wait`].
    pub async fn stop(&self, mode: StopMode) -> Result<(), MasterError> {
        self.commands
            .send(Command::Stop { mode, wait: None })
            .await
            .map_err(|_| MasterError::Stopped)
    }

    /// Sends an application message to the worker of `slot`, or to every worker when
    /// `None` (Node's `worker.send`). Returns how many workers it was queued for (a
    /// worker whose queue is full does not get it). A Node.js pool takes JSON values
    /// only ([`Refusal::BadMessage`] otherwise).
    pub async fn send(&self, slot: Option<u32>, payload: Vec<u8>) -> Result<usize, MasterError> {
        Ok(self
            .ask(|reply| Command::Send {
                slot,
                payload,
                reply,
            })
            .await??)
    }

    /// The Prometheus metrics (OpenMetrics text): connections accepted and dispatched
    /// per worker, dispatch errors, restarts, give-ups, workers by state, accept queue,
    /// per-worker CPU and memory.
    pub async fn metrics(&self) -> Result<String, MasterError> {
        self.ask(Command::Metrics).await
    }

    /// Acts as if the process had received `signal`.
    pub async fn signal(&self, signal: MasterSignal) -> Result<(), MasterError> {
        self.commands
            .send(Command::Signal(signal))
            .await
            .map_err(|_| MasterError::Stopped)
    }

    /// Waits until the master has stopped; its exit code (0 after a normal stop, 1
    /// after a give-up).
    pub async fn wait(&self) -> i32 {
        let mut done = self.done.clone();
        loop {
            if let Some(code) = *done.borrow_and_update() {
                return code;
            }
            if done.changed().await.is_err() {
                return done.borrow().unwrap_or(1);
            }
        }
    }

    /// Turns the process's SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU and
    /// SIGUSR1 into [`MasterHandle::signal`] calls, until the master stops. SIGUSR2
    /// (an in-place upgrade elsewhere: unicorn, nginx) is logged and otherwise
    /// ignored, where its default action would end the master without a drain.
    ///
    /// Once per master: a second call, on this handle or any clone of it, does
    /// nothing and returns `Ok` (forwarding twice would deliver each signal twice, and
    /// one Ctrl-C would count as the second and stop at once).
    pub fn forward_os_signals(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        use tokio::signal::unix::{SignalKind, signal};
        if self.forwarding.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut usr2 = signal(SignalKind::user_defined2())
            .inspect_err(|_| self.forwarding.store(false, Ordering::Release))?;
        let kinds = [
            (SignalKind::terminate(), MasterSignal::Terminate),
            (SignalKind::interrupt(), MasterSignal::Interrupt),
            (SignalKind::quit(), MasterSignal::Quit),
            (SignalKind::hangup(), MasterSignal::Hangup),
            (
                SignalKind::from_raw(crate::sys::SIGTTIN),
                MasterSignal::IncreaseWorkers,
            ),
            (
                SignalKind::from_raw(crate::sys::SIGTTOU),
                MasterSignal::DecreaseWorkers,
            ),
            (SignalKind::user_defined1(), MasterSignal::ReopenLogs),
        ];
        // Every stream first: a failure forwards nothing, and a later call may try again.
        let streams = kinds
            .into_iter()
            .map(|(kind, sig)| Ok((signal(kind)?, sig)))
            .collect::<std::io::Result<Vec<_>>>()
            .inspect_err(|_| self.forwarding.store(false, Ordering::Release))?;
        let mut done = self.done.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = usr2.recv() => {
                        if got.is_none() {
                            return;
                        }
                        tracing::warn!("SIGUSR2 ignored: rr-cluster has no in-place upgrade of the master (restart it; with socket activation the port stays open)");
                    }
                    _ = async { let _ = done.wait_for(Option::is_some).await; } => return,
                }
            }
        });
        for (mut stream, sig) in streams {
            let handle = self.clone();
            tokio::spawn(async move {
                let mut done = handle.done.clone();
                loop {
                    tokio::select! {
                        got = stream.recv() => {
                            if got.is_none() || handle.signal(sig).await.is_err() {
                                return;
                            }
                        }
                        _ = async { let _ = done.wait_for(Option::is_some).await; } => return,
                    }
                }
            });
        }
        Ok(())
    }
}
