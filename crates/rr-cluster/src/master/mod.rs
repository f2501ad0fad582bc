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
//! - `listen`: listener sources and the accept loop.
//! - `dispatch`: choosing a worker and sending it the sockets.
//! - `supervisor`: the worker lifecycle as a pure state machine.
//! - `spawn`: starting worker processes from one long-lived thread.
//! - `driver`: the task that runs the state machine and carries out its actions.
//! - `control`: the control socket server.
//! - `metrics`: Prometheus metrics text.

mod control;
mod dispatch;
mod driver;
mod listen;
mod metrics;
mod spawn;
mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use dispatch::Balance;
pub use listen::{ListenSpec, LocalAddr, socket_activated};
pub use spawn::WorkerCommand;
pub use supervisor::GiveUpAction;

use crate::config::ConfigError;
use crate::control::Status;
use crate::event::Event;
use driver::Command;
use supervisor::Policy;

/// Errors of a master.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    /// The master has stopped; the handle can no longer reach it.
    #[error("the master has stopped")]
    Stopped,
}

/// A signal the master reacts to (see DESIGN: SIGTERM/SIGINT stop, SIGQUIT stops at
/// once, SIGHUP reloads, SIGTTIN/SIGTTOU add or remove a worker).
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
}

/// A function that produces the configuration for a reload (the binary re-reads its
/// file here). An `Err` rejects the reload and keeps the pool as it is.
pub type ReloadHook = Arc<dyn Fn() -> Result<MasterBuilder, String> + Send + Sync>;

/// Everything a master is configured with. Built by [`MasterBuilder`].
#[derive(Clone)]
pub struct MasterBuilder {
    listen: Vec<String>,
    workers: Option<usize>,
    command: Option<WorkerCommand>,
    balance: Balance,
    policy: Policy,
    heartbeat_interval: Duration,
    control: Option<PathBuf>,
    reload_hook: Option<ReloadHook>,
}

impl std::fmt::Debug for MasterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterBuilder")
            .field("listen", &self.listen)
            .field("workers", &self.workers)
            .field("command", &self.command)
            .field("balance", &self.balance)
            .field("policy", &self.policy)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("control", &self.control)
            .field("reload_hook", &self.reload_hook.is_some())
            .finish()
    }
}

impl Default for MasterBuilder {
    fn default() -> Self {
        MasterBuilder {
            listen: Vec::new(),
            workers: None,
            command: None,
            balance: Balance::default(),
            policy: Policy::default(),
            heartbeat_interval: Duration::from_secs(1),
            control: None,
            reload_hook: None,
        }
    }
}

/// The most workers one master runs.
pub const MAX_WORKERS: usize = 1024;

impl MasterBuilder {
    /// Listens on an address: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, `unix:/path`
    /// or `systemd` (sockets passed by socket activation). May be called several times.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push(addr.into());
        self
    }

    /// Replaces every listen address.
    pub fn listen_all<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.listen = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// Runs `n` workers (default: one per CPU core).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// The worker program.
    pub fn command(mut self, command: WorkerCommand) -> Self {
        self.command = Some(command);
        self
    }

    /// How connections are spread (default: round-robin).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// More than `limit` unstable restarts within the restart window is a give-up
    /// (default 10). Unstable: the worker never became ready, or was ready for less than
    /// [`MasterBuilder::min_uptime`]; deaths of workers that served for a while are
    /// always replaced.
    pub fn restart_limit(mut self, limit: usize) -> Self {
        self.policy.restart_limit = limit;
        self
    }

    /// The window restarts are counted in (default 60 s).
    pub fn restart_window(mut self, window: Duration) -> Self {
        self.policy.restart_window = window;
        self
    }

    /// Delay before the first quick restart of a slot; the n-th waits
    /// `base * 2^(n-1)`, at most [`MasterBuilder::backoff_max`] (default 100 ms).
    pub fn backoff_base(mut self, base: Duration) -> Self {
        self.policy.backoff_base = base;
        self
    }

    /// The longest restart delay (default 10 s).
    pub fn backoff_max(mut self, max: Duration) -> Self {
        self.policy.backoff_max = max;
        self
    }

    /// A worker ready for this long resets its slot's backoff (default 1 s).
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.policy.min_uptime = uptime;
        self
    }

    /// A worker must say `Ready` within this (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.policy.ready_timeout = timeout;
        self
    }

    /// Workers send a heartbeat this often (default 1 s).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// A worker silent for this long is killed and replaced; `None` turns the check
    /// off (default 10 s).
    pub fn heartbeat_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.policy.heartbeat_timeout = timeout;
        self
    }

    /// How long a draining worker may take before SIGKILL (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.policy.drain_timeout = timeout;
        self
    }

    /// What to do when the restart limit is hit (default: exit non-zero).
    pub fn on_give_up(mut self, action: GiveUpAction) -> Self {
        self.policy.on_give_up = action;
        self
    }

    /// Serves the control socket at `path` (mode 0600).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }

    /// Called on every reload request (SIGHUP, control `reload`) for the new
    /// configuration; without a hook a reload restarts the workers as they are.
    pub fn on_reload(mut self, hook: ReloadHook) -> Self {
        self.reload_hook = Some(hook);
        self
    }

    /// Checks the configuration and returns a master ready to [`Master::start`].
    pub fn build(self) -> Result<Master, ConfigError> {
        let settings = self.validate()?;
        let (events, _) = broadcast::channel(4096);
        Ok(Master { settings, events })
    }

    fn validate(self) -> Result<Settings, ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        if self.listen.is_empty() {
            return Err(invalid(
                "listen",
                "at least one listen address is needed".into(),
            ));
        }
        let listen = self
            .listen
            .iter()
            .map(|s| s.parse::<ListenSpec>().map_err(|e| invalid("listen", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let workers = self.workers.unwrap_or_else(default_workers);
        if !(1..=MAX_WORKERS).contains(&workers) {
            return Err(invalid(
                "workers",
                format!("{workers} is out of range 1..={MAX_WORKERS}"),
            ));
        }
        let command = self
            .command
            .ok_or_else(|| invalid("command", "a worker command is needed".into()))?;
        if command.program().is_empty() {
            return Err(invalid("command", "the worker program is empty".into()));
        }
        let p = &self.policy;
        if p.restart_window.is_zero() {
            return Err(invalid("restart.window", "must be longer than 0".into()));
        }
        if p.backoff_base > p.backoff_max {
            return Err(invalid(
                "restart.backoff_base",
                format!(
                    "{:?} is more than backoff_max {:?}",
                    p.backoff_base, p.backoff_max
                ),
            ));
        }
        if p.ready_timeout.is_zero() {
            return Err(invalid("timeouts.ready", "must be longer than 0".into()));
        }
        if p.drain_timeout.is_zero() {
            return Err(invalid("timeouts.drain", "must be longer than 0".into()));
        }
        if self.heartbeat_interval < Duration::from_millis(10)
            || self.heartbeat_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "timeouts.heartbeat_interval",
                format!("{:?} is out of range 10ms..=1h", self.heartbeat_interval),
            ));
        }
        if let Some(t) = p.heartbeat_timeout {
            if t <= self.heartbeat_interval {
                return Err(invalid(
                    "timeouts.heartbeat_timeout",
                    format!(
                        "{t:?} must be longer than the heartbeat interval {:?}",
                        self.heartbeat_interval
                    ),
                ));
            }
        }
        Ok(Settings {
            listen,
            workers,
            command,
            balance: self.balance,
            policy: self.policy,
            heartbeat_interval: self.heartbeat_interval,
            control: self.control,
            reload_hook: self.reload_hook,
        })
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A validated configuration.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) listen: Vec<ListenSpec>,
    pub(crate) workers: usize,
    pub(crate) command: WorkerCommand,
    pub(crate) balance: Balance,
    pub(crate) policy: Policy,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) control: Option<PathBuf>,
    pub(crate) reload_hook: Option<ReloadHook>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("workers", &self.workers)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
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
    pub async fn start(self) -> Result<MasterHandle, MasterError> {
        driver::start(self.settings, self.events).await
    }

    /// Starts the master, obeys the process's signals (SIGTERM, SIGINT, SIGQUIT,
    /// SIGHUP, SIGTTIN, SIGTTOU) and returns the exit code once it has stopped.
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
    addrs: Arc<Vec<LocalAddr>>,
    done: watch::Receiver<Option<i32>>,
    control: Option<PathBuf>,
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

    /// Lifecycle events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
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

    /// Rolls every worker over (re-reading the configuration through the reload hook).
    /// `Ok(Err(reason))`: the reload was refused and the pool is unchanged.
    pub async fn reload(&self) -> Result<Result<String, String>, MasterError> {
        self.ask(Command::Reload).await
    }

    /// Runs `workers` workers from now on.
    pub async fn scale(&self, workers: usize) -> Result<Result<String, String>, MasterError> {
        self.ask(|tx| Command::Scale(workers, tx)).await
    }

    /// Begins a stop: `graceful` drains the workers first. Returns at once; see
    /// [`MasterHandle::wait`].
    pub async fn stop(&self, graceful: bool) -> Result<(), MasterError> {
        self.commands
            .send(Command::Stop { graceful })
            .await
            .map_err(|_| MasterError::Stopped)
    }

    /// Sends an application message to the worker of `slot`, or to every worker when
    /// `None` (Node's `worker.send`). Returns how many workers it was sent to.
    pub async fn send(&self, slot: Option<u32>, payload: Vec<u8>) -> Result<usize, MasterError> {
        self.ask(|tx| Command::Send {
            slot,
            payload,
            reply: tx,
        })
        .await
    }

    /// The Prometheus metrics (OpenMetrics text): connections accepted and dispatched
    /// per worker, dispatch errors, restarts, give-ups, workers by state, accept queue.
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

    /// Turns the process's SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN and SIGTTOU into
    /// [`MasterHandle::signal`] calls, until the master stops.
    pub fn forward_os_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
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
        ];
        for (kind, sig) in kinds {
            let mut stream = signal(kind)?;
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
