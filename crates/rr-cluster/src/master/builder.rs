//! [`MasterBuilder`]: everything a master is configured with, and its validation into
//! [`Settings`] (the same fields, checked: parsed listen addresses, every duration
//! within its documented bound).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::dispatch::Balance;
use super::listen::ListenSpec;
use super::spawn::WorkerCommand;
use super::supervisor::{GiveUpAction, Policy};
use super::{Master, MasterBuilder};
use crate::event::Event;

/// The most workers one master runs.
pub const MAX_WORKERS: usize = 1024;

/// Upper bounds of the durations a master accepts. Larger values are refused when the
/// master is built and when a reload brings them (a deadline that far out would
/// overflow the clock, and no real deployment waits a day for a worker).
pub mod limits {
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// `ready_timeout`, `drain_timeout`, `heartbeat_timeout`, `min_uptime`: 24 h.
    pub const TIMEOUT: Duration = DAY;
    /// `heartbeat_interval`: 10 ms to 1 h.
    pub const HEARTBEAT_INTERVAL: (Duration, Duration) = (Duration::from_millis(10), HOUR);
    /// `restart_window`: 7 days.
    pub const RESTART_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `backoff_base`, `backoff_max`: 1 h.
    pub const BACKOFF: Duration = HOUR;
    /// `max_age`: 365 days.
    pub const MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
    /// `heartbeat_timeout`: at least this many heartbeat intervals (a worker is taken
    /// out of rotation after two; a heartbeat a little late must not get it killed).
    pub const HEARTBEAT_TIMEOUT_INTERVALS: u32 = 3;
    /// `max_memory`: at least 1 MiB (no worker process lives in less: a smaller limit
    /// would replace every worker every second).
    pub const MIN_MAX_MEMORY: u64 = 1024 * 1024;
    /// `backoff_base`: at least 1 ms (0 would take every backoff away, and a worker
    /// that fails at once would be respawned without pause).
    pub const MIN_BACKOFF_BASE: Duration = Duration::from_millis(1);
    /// A worker that said `Ready` counts as healthy (its replacement starts at once,
    /// its slot's backoff resets) after `min_uptime`, but never before this: 1 s.
    /// `min_uptime` is also a reload's settle time, often set to 0 for fast reloads;
    /// a worker that says `Ready` and exits at once still backs off then.
    pub const MIN_HEALTHY_UPTIME: Duration = Duration::from_secs(1);
    /// `event_capacity`: at most 65,536 events (the channel allocates its capacity up
    /// front, a slot of some 70 bytes per event; a larger value is lowered to this).
    pub const MAX_EVENT_CAPACITY: usize = 1 << 16;
}

/// A function that produces the configuration for a reload (the binary re-reads its
/// file here). An `Err` rejects the reload and keeps the pool as it is.
pub type ReloadHook = Arc<dyn Fn() -> Result<MasterBuilder, String> + Send + Sync>;

/// An invalid configuration, naming the builder method that set the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A value is out of range or inconsistent.
    #[error("{method}(): {reason}")]
    Invalid {
        /// The [`MasterBuilder`] method (`workers`, `drain_timeout`, ...).
        method: &'static str,
        /// Why.
        reason: String,
    },
}

/// When workers are replaced (always drain-first: the replacement is ready before the
/// old worker drains).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Recycle {
    /// Connections handed to a worker before it is replaced (gunicorn's
    /// `max_requests`).
    pub(crate) max_requests: Option<u64>,
    /// A random 0..=jitter added per worker, so that workers do not recycle together.
    pub(crate) max_requests_jitter: u64,
    /// Resident memory (bytes) above which a worker is replaced.
    pub(crate) max_memory: Option<u64>,
    /// Age after which a worker is replaced.
    pub(crate) max_age: Option<Duration>,
}

/// Where worker output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Output {
    /// Capture worker stdout and stderr through the master (line by line, prefixed
    /// with slot and pid); `false`: workers inherit the master's.
    pub(crate) capture: bool,
    /// Append captured stdout to this file instead of the master's log.
    pub(crate) stdout: Option<PathBuf>,
    /// Append captured stderr to this file instead of the master's log.
    pub(crate) stderr: Option<PathBuf>,
    /// Text lines with a `[worker N pid P]` prefix, or JSON objects.
    pub(crate) format: super::output::LogFormat,
}

/// The settings that validation keeps as the builder set them.
#[derive(Clone)]
pub(crate) struct Common {
    pub(crate) balance: Balance,
    pub(crate) policy: Policy,
    pub(crate) recycle: Recycle,
    pub(crate) output: Output,
    pub(crate) control: Option<PathBuf>,
    pub(crate) reload_hook: Option<ReloadHook>,
    pub(crate) message_queue: usize,
    pub(crate) event_capacity: usize,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
            .field("balance", &self.balance)
            .field("policy", &self.policy)
            .field("recycle", &self.recycle)
            .field("output", &self.output)
            .field("control", &self.control)
            .field("reload_hook", &self.reload_hook.is_some())
            .field("message_queue", &self.message_queue)
            .field("event_capacity", &self.event_capacity)
            .finish()
    }
}

impl Default for Common {
    fn default() -> Self {
        Common {
            balance: Balance::default(),
            policy: Policy::default(),
            recycle: Recycle::default(),
            output: Output {
                capture: true,
                stdout: None,
                stderr: None,
                format: super::output::LogFormat::Text,
            },
            control: None,
            reload_hook: None,
            message_queue: 4096,
            event_capacity: 4096,
        }
    }
}

/// What a [`MasterBuilder`] holds: the three values validation turns into something
/// else (parsed addresses, a resolved worker count, a required command), and the rest.
#[derive(Clone, Default)]
pub(crate) struct Raw {
    pub(crate) listen: Vec<String>,
    pub(crate) workers: Option<usize>,
    pub(crate) command: Option<WorkerCommand>,
    pub(crate) common: Common,
    /// `heartbeat_timeout` was set: otherwise the default follows the interval.
    pub(crate) heartbeat_timeout_set: bool,
}

/// A validated configuration: [`Raw`] with its three values checked.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) listen: Vec<ListenSpec>,
    pub(crate) workers: usize,
    pub(crate) command: WorkerCommand,
    pub(crate) common: Common,
}

impl std::ops::Deref for Settings {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl std::fmt::Debug for MasterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.raw;
        f.debug_struct("MasterBuilder")
            .field("listen", &r.listen)
            .field("workers", &r.workers)
            .field("command", &r.command)
            .field("common", &r.common)
            .finish()
    }
}

impl MasterBuilder {
    /// Listens on an address: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, `unix:/path`
    /// or `systemd` (sockets passed by socket activation). May be called several times,
    /// each time with another address (a repeated one is refused by
    /// [`MasterBuilder::build`]; port 0 may repeat: each is a port of its own).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.raw.listen.push(addr.into());
        self
    }

    /// Replaces every listen address.
    pub fn listen_all<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.raw.listen = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// Runs `n` workers (default: one per CPU core), 1 to [`MAX_WORKERS`].
    pub fn workers(mut self, n: usize) -> Self {
        self.raw.workers = Some(n);
        self
    }

    /// The worker program (and the protocol it speaks, [`WorkerCommand::protocol`]).
    pub fn command(mut self, command: WorkerCommand) -> Self {
        self.raw.command = Some(command);
        self
    }

    /// Changes the worker command set so far, if any.
    pub(crate) fn map_command(mut self, f: impl FnOnce(WorkerCommand) -> WorkerCommand) -> Self {
        self.raw.command = self.raw.command.take().map(f);
        self
    }

    /// How connections are spread (default: round-robin).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.raw.common.balance = balance;
        self
    }

    /// More than `limit` boot failures (workers that exit, close their channel or
    /// time out before they say `Ready`) within the restart window is a give-up
    /// (default 10). Workers that became ready are always replaced.
    pub fn restart_limit(mut self, limit: usize) -> Self {
        self.raw.common.policy.restart_limit = limit;
        self
    }

    /// The window boot failures are counted in (default 60 s, at most 7 days).
    pub fn restart_window(mut self, window: Duration) -> Self {
        self.raw.common.policy.restart_window = window;
        self
    }

    /// Delay before the first quick restart of a slot; the n-th waits
    /// `base * 2^(n-1)`, at most [`MasterBuilder::backoff_max`] (default 100 ms; 1 ms to
    /// 1 h: 0 is refused, it would respawn a failing worker without pause). A worker
    /// that was ready waits at most one second.
    pub fn backoff_base(mut self, base: Duration) -> Self {
        self.raw.common.policy.backoff_base = base;
        self
    }

    /// The longest restart delay (default 10 s; 1 ms to 1 h, and at least
    /// [`MasterBuilder::backoff_base`]).
    pub fn backoff_max(mut self, max: Duration) -> Self {
        self.raw.common.policy.backoff_max = max;
        self
    }

    /// A worker ready for this long was healthy: it is replaced at once when it ends,
    /// and its slot's backoff resets (default 1 s, at most 24 h). Never less than
    /// [`limits::MIN_HEALTHY_UPTIME`] (1 s) for this: with `min_uptime` 0, a worker that
    /// ends within a second of `Ready` still waits a backoff (at most a second) before
    /// its replacement.
    ///
    /// It is also how long each slot waits during a rolling reload: the new worker
    /// serves beside the old one for `min_uptime` before the old one drains, so a
    /// reload of N workers takes at least N × `min_uptime`.
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.raw.common.policy.min_uptime = uptime;
        self
    }

    /// A worker must say `Ready` within this (default 30 s, at most 24 h).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.raw.common.policy.ready_timeout = timeout;
        self
    }

    /// Workers send a heartbeat this often (default 1 s; 10 ms to 1 h). A worker whose
    /// heartbeat is two intervals late gets no new connection until it shows life
    /// (also with [`MasterBuilder::heartbeat_timeout`] off).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.raw.common.policy.heartbeat_interval = interval;
        self
    }

    /// A worker silent for this long is killed and replaced (default 10 s, or 3
    /// intervals when that is more; at most 24 h, and at least 3 ×
    /// [`MasterBuilder::heartbeat_interval`]: a worker is only
    /// taken out of rotation after two intervals, and a heartbeat a little late must
    /// not cost a healthy worker its life). `None` never kills a worker for its
    /// silence; one that is late is still taken out of rotation until it shows life.
    pub fn heartbeat_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.raw.common.policy.heartbeat_timeout = timeout;
        self.raw.heartbeat_timeout_set = true;
        self
    }

    /// How long a draining worker may take before SIGKILL (default 30 s, at most 24 h).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.raw.common.policy.drain_timeout = timeout;
        self
    }

    /// What to do when the restart limit is hit (default: exit non-zero).
    pub fn on_give_up(mut self, action: GiveUpAction) -> Self {
        self.raw.common.policy.on_give_up = action;
        self
    }

    /// Replaces a worker after the master handed it `n` connections (gunicorn's
    /// `max_requests`), drain-first. Default: never.
    pub fn max_requests(mut self, n: Option<u64>) -> Self {
        self.raw.common.recycle.max_requests = n;
        self
    }

    /// Adds a random `0..=jitter` to each worker's `max_requests`, so that workers
    /// started together do not recycle together (default 0).
    pub fn max_requests_jitter(mut self, jitter: u64) -> Self {
        self.raw.common.recycle.max_requests_jitter = jitter;
        self
    }

    /// Replaces a worker whose resident memory exceeds `bytes` (at least
    /// [`limits::MIN_MAX_MEMORY`], 1 MiB), drain-first (sampled once a second). Default: never.
    pub fn max_memory(mut self, bytes: Option<u64>) -> Self {
        self.raw.common.recycle.max_memory = bytes;
        self
    }

    /// Replaces a worker older than `age`, drain-first. Default: never.
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.raw.common.recycle.max_age = age;
        self
    }

    /// Captures worker stdout and stderr through the master, line by line with the
    /// worker's slot and pid (default `true`); `false` lets workers write to the
    /// master's own stdout and stderr. `false` with a [`MasterBuilder::stdout_log`] or
    /// [`MasterBuilder::stderr_log`] is refused by [`MasterBuilder::build`] (nothing
    /// would be written to the file).
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.raw.common.output.capture = capture;
        self
    }

    /// How captured worker lines are written: text with a `[worker N pid P]` prefix
    /// (default) or one JSON object per line.
    pub fn log_format(mut self, format: super::output::LogFormat) -> Self {
        self.raw.common.output.format = format;
        self
    }

    /// Appends captured worker stdout (and, with [`MasterBuilder::stderr_log`] unset,
    /// stderr too) to a file, reopened on [`MasterSignal::ReopenLogs`](super::MasterSignal)
    /// (SIGUSR1). [`MasterBuilder::build`] refuses a path the master cannot write
    /// (`access(W_OK)` on the file, or on its directory when the file does not exist
    /// yet), without creating anything: the file is created when the master starts.
    /// A socket, character device or FIFO (`/dev/stdout` under systemd, whose
    /// standard output is a socket to the journal; `/dev/null`) is accepted as it is;
    /// one the master then cannot open (a socket cannot be) is logged, and that
    /// output goes to the master's own stdout or stderr.
    pub fn stdout_log(mut self, path: Option<PathBuf>) -> Self {
        self.raw.common.output.stdout = path;
        self
    }

    /// Appends captured worker stderr to a file (checked like
    /// [`MasterBuilder::stdout_log`]).
    pub fn stderr_log(mut self, path: Option<PathBuf>) -> Self {
        self.raw.common.output.stderr = path;
        self
    }

    /// Serves the control socket at `path` (mode 0600, same user or root only).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.raw.common.control = Some(path.into());
        self
    }

    /// How much of the application messages from workers is kept for
    /// [`MasterHandle::messages`] while it is not read (default 4096): a byte budget of
    /// `n` × 1 KiB, at least 64 KiB and at most 64 MiB, where each message costs its
    /// payload plus 64 bytes. So `n` messages of up to 960 bytes fit, more smaller
    /// ones, fewer larger ones; a message that does not fit is dropped and counted.
    ///
    /// [`MasterHandle::messages`]: super::MasterHandle::messages
    pub fn message_queue(mut self, n: usize) -> Self {
        self.raw.common.message_queue = n.max(1);
        self
    }

    /// Lifecycle events kept for a slow [`Master::events`] subscriber (default 4096;
    /// a subscriber that falls further behind skips events). At least 16 and at most
    /// [`limits::MAX_EVENT_CAPACITY`] (65,536): the channel allocates its capacity up
    /// front, and a value out of that range is brought into it.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.raw.common.event_capacity = n.clamp(16, limits::MAX_EVENT_CAPACITY);
        self
    }

    /// Called on every reload request (SIGHUP, control `reload`) for the new
    /// configuration; without a hook a reload restarts the workers as they are. The
    /// new configuration may not change the listen addresses or the control socket
    /// (the reload is refused: restart the master to change them), and its worker
    /// command must pass [`WorkerCommand::check`] (otherwise the reload is refused
    /// and nothing is started).
    ///
    /// The hook runs on the master's supervising task, synchronously: while it runs,
    /// no worker exit, heartbeat, timeout or control request is dealt with (on a
    /// current-thread runtime, nothing else runs at all). It must not block: read a
    /// file and parse it, but do not wait on the network, a lock held elsewhere or a
    /// user. Work that may take long belongs before the reload is asked for (have the
    /// hook return what was prepared).
    pub fn on_reload<F>(mut self, hook: F) -> Self
    where
        F: Fn() -> Result<MasterBuilder, String> + Send + Sync + 'static,
    {
        self.raw.common.reload_hook = Some(Arc::new(hook));
        self
    }

    /// Checks the configuration and returns a master ready to
    /// [`Master::start`](super::Master::start). The worker log files, if any, are
    /// checked for writing without being opened or created (see
    /// [`MasterBuilder::stdout_log`]).
    pub fn build(self) -> Result<Master, BuildError> {
        let capacity = self.raw.common.event_capacity;
        let settings = self.validate()?;
        // Only here, not in `validate`: a reload keeps the log files it has.
        for (method, path) in [
            ("stdout_log", &settings.output.stdout),
            ("stderr_log", &settings.output.stderr),
        ] {
            let Some(path) = path else { continue };
            check_log_path(path).map_err(|reason| BuildError::Invalid { method, reason })?;
        }
        let (events, _) = tokio::sync::broadcast::channel::<Event>(capacity);
        Ok(Master { settings, events })
    }

    pub(crate) fn validate(self) -> Result<Settings, BuildError> {
        let mut r = self.raw;
        // A timeout left at its default follows a longer interval (3 of them).
        if !r.heartbeat_timeout_set {
            let p = &mut r.common.policy;
            let least = p
                .heartbeat_interval
                .saturating_mul(limits::HEARTBEAT_TIMEOUT_INTERVALS);
            if let Some(t) = p.heartbeat_timeout.as_mut() {
                *t = (*t).max(least);
            }
        }
        let invalid = |method: &'static str, reason: String| BuildError::Invalid { method, reason };
        if r.listen.is_empty() {
            return Err(invalid(
                "listen",
                "at least one listen address is needed".into(),
            ));
        }
        let listen = r
            .listen
            .iter()
            .map(|s| s.parse::<ListenSpec>().map_err(|e| invalid("listen", e)))
            .collect::<Result<Vec<_>, _>>()?;
        // The same address twice would bind it twice (EADDRINUSE, or a stale-socket
        // removal of the first Unix socket) or adopt systemd's descriptors twice.
        for (i, spec) in listen.iter().enumerate() {
            if let Some(j) = listen[..i]
                .iter()
                .position(|other| same_listen(other, spec))
            {
                return Err(invalid(
                    "listen",
                    format!(
                        "{spec} is listed twice ({:?} and {:?}); give each address once",
                        r.listen[j], r.listen[i]
                    ),
                ));
            }
        }
        let workers = r.workers.unwrap_or_else(default_workers);
        if !(1..=MAX_WORKERS).contains(&workers) {
            return Err(invalid(
                "workers",
                format!("{workers} is out of range 1..={MAX_WORKERS}"),
            ));
        }
        let command = r
            .command
            .ok_or_else(|| invalid("command", "a worker command is needed".into()))?;
        if command.program().is_empty() {
            return Err(invalid("command", "the worker program is empty".into()));
        }
        let p = &r.common.policy;
        let within = |method: &'static str, d: Duration, min: Duration, max: Duration| {
            if d < min || d > max {
                Err(invalid(
                    method,
                    format!(
                        "{} is out of range {}..={}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let nonzero = Duration::from_millis(1);
        within(
            "restart_window",
            p.restart_window,
            nonzero,
            limits::RESTART_WINDOW,
        )?;
        within(
            "backoff_base",
            p.backoff_base,
            limits::MIN_BACKOFF_BASE,
            limits::BACKOFF,
        )?;
        within(
            "backoff_max",
            p.backoff_max,
            limits::MIN_BACKOFF_BASE,
            limits::BACKOFF,
        )?;
        if p.backoff_base > p.backoff_max {
            return Err(invalid(
                "backoff_base",
                format!(
                    "{} is more than backoff_max {}",
                    humantime::format_duration(p.backoff_base),
                    humantime::format_duration(p.backoff_max)
                ),
            ));
        }
        within("min_uptime", p.min_uptime, Duration::ZERO, limits::TIMEOUT)?;
        within("ready_timeout", p.ready_timeout, nonzero, limits::TIMEOUT)?;
        within("drain_timeout", p.drain_timeout, nonzero, limits::TIMEOUT)?;
        let (lo, hi) = limits::HEARTBEAT_INTERVAL;
        within("heartbeat_interval", p.heartbeat_interval, lo, hi)?;
        if let Some(t) = p.heartbeat_timeout {
            within("heartbeat_timeout", t, nonzero, limits::TIMEOUT)?;
            let intervals = limits::HEARTBEAT_TIMEOUT_INTERVALS;
            let least = p.heartbeat_interval * intervals;
            if t < least {
                return Err(invalid(
                    "heartbeat_timeout",
                    format!(
                        "{} is too short for the heartbeat interval {}: it must be at least \
                         {intervals} intervals ({}), or off",
                        humantime::format_duration(t),
                        humantime::format_duration(p.heartbeat_interval),
                        humantime::format_duration(least)
                    ),
                ));
            }
        }
        if r.common.recycle.max_requests == Some(0) {
            return Err(invalid("max_requests", "must be at least 1".into()));
        }
        if let Some(bytes) = r.common.recycle.max_memory {
            if bytes < limits::MIN_MAX_MEMORY {
                return Err(invalid(
                    "max_memory",
                    format!(
                        "{bytes} bytes is less than the smallest limit, 1 MiB \
                         ({} bytes): every worker would be replaced every second",
                        limits::MIN_MAX_MEMORY
                    ),
                ));
            }
        }
        if let Some(age) = r.common.recycle.max_age {
            within("max_age", age, Duration::from_secs(1), limits::MAX_AGE)?;
        }
        // Without capture, workers write to the master's own stdout and stderr: a log
        // file would never be written.
        let o = &r.common.output;
        if !o.capture {
            if let Some((method, path)) = [("stdout_log", &o.stdout), ("stderr_log", &o.stderr)]
                .into_iter()
                .find_map(|(m, p)| p.as_ref().map(|p| (m, p)))
            {
                return Err(invalid(
                    method,
                    format!(
                        "{} is set, but worker output is not captured (capture is off): \
                         workers write to the master's own stdout and stderr, never to \
                         the file; remove the path or turn capture on",
                        path.display()
                    ),
                ));
            }
        }
        // A log file is opened (created) once the master runs; a path that cannot be
        // one is refused now, not logged then (`build` also checks that the master
        // may write it).
        for (method, path) in [
            ("stdout_log", &r.common.output.stdout),
            ("stderr_log", &r.common.output.stderr),
        ] {
            let Some(path) = path else { continue };
            if path.is_dir() {
                return Err(invalid(
                    method,
                    format!("{} is a directory", path.display()),
                ));
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    return Err(invalid(
                        method,
                        format!("{}: no such directory", dir.display()),
                    ));
                }
            }
        }
        Ok(Settings {
            listen,
            workers,
            command,
            common: r.common,
        })
    }
}

/// Whether the master can write a worker log at `path`, checked without opening or
/// creating anything (`build` runs before the master binds and starts: a start that
/// fails later leaves no empty file behind). An existing file must be writable by
/// this process; a missing one, its directory. A socket, character device or FIFO
/// is taken as it is: `/dev/stdout` under systemd is a socket to the journal, which
/// cannot be opened as a file (the master's own stdout is used then).
fn check_log_path(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) => {
            let kind = meta.file_type();
            if kind.is_socket() || kind.is_char_device() || kind.is_fifo() {
                return Ok(());
            }
            if kind.is_dir() {
                return Err(format!("{shown} is a directory"));
            }
            crate::sys::writable(path).map_err(|e| format!("cannot write to {shown}: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            crate::sys::can_create_in(dir)
                .map_err(|e| format!("cannot create {shown}: directory {}: {e}", dir.display()))
        }
        Err(e) => Err(format!("cannot check {shown}: {e}")),
    }
}

/// Whether two listen addresses name the same socket (TCP port 0 never does: each
/// is a port of its own).
fn same_listen(a: &ListenSpec, b: &ListenSpec) -> bool {
    match (a, b) {
        (ListenSpec::Tcp(a), ListenSpec::Tcp(b)) => a.port() != 0 && a == b,
        (ListenSpec::Unix(a), ListenSpec::Unix(b)) => {
            let plain = |p: &std::path::Path| {
                p.components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .map(|c| c.as_os_str().to_owned())
                    .collect::<Vec<_>>()
            };
            plain(a) == plain(b)
        }
        (ListenSpec::Systemd, ListenSpec::Systemd) => true,
        _ => false,
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> MasterBuilder {
        MasterBuilder::default()
            .listen("127.0.0.1:0")
            .command(WorkerCommand::new("worker"))
    }

    /// Regression (v0.1, issue 9.7): huge durations were accepted and then panicked at
    /// the first `now + d` (`overflow when adding duration to instant`).
    #[test]
    fn every_duration_is_bounded_and_errors_name_the_method() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let cases: Vec<(&str, MasterBuilder)> = vec![
            ("drain_timeout", base().drain_timeout(huge)),
            ("ready_timeout", base().ready_timeout(huge)),
            ("restart_window", base().restart_window(huge)),
            ("backoff_max", base().backoff_max(huge)),
            ("min_uptime", base().min_uptime(huge)),
            ("heartbeat_interval", base().heartbeat_interval(huge)),
            ("heartbeat_timeout", base().heartbeat_timeout(Some(huge))),
            ("max_age", base().max_age(Some(huge))),
            ("ready_timeout", base().ready_timeout(Duration::ZERO)),
            ("workers", base().workers(0)),
            ("workers", base().workers(MAX_WORKERS + 1)),
            ("max_requests", base().max_requests(Some(0))),
        ];
        for (method, b) in cases {
            let err = b.build().expect_err(method);
            assert!(
                err.to_string().starts_with(&format!("{method}(): ")),
                "{err}"
            );
        }
        let ok = base()
            .drain_timeout(limits::TIMEOUT)
            .restart_window(limits::RESTART_WINDOW)
            .heartbeat_timeout(Some(limits::TIMEOUT));
        ok.build().expect("the bounds themselves are accepted");
    }

    fn reason(b: MasterBuilder) -> String {
        b.build().expect_err("refused").to_string()
    }

    /// Review B1: a timeout just over one interval was accepted, and a heartbeat a few
    /// milliseconds late got a healthy worker killed.
    #[test]
    fn the_heartbeat_timeout_is_at_least_three_intervals() {
        let err = reason(
            base()
                .heartbeat_interval(Duration::from_secs(1))
                .heartbeat_timeout(Some(Duration::from_millis(1001))),
        );
        assert_eq!(
            err,
            "heartbeat_timeout(): 1s 1ms is too short for the heartbeat interval 1s: it must \
             be at least 3 intervals (3s), or off"
        );
        let err = reason(
            base()
                .heartbeat_interval(Duration::from_millis(500))
                .heartbeat_timeout(Some(Duration::from_millis(1499))),
        );
        assert!(err.contains("(1s 500ms)"), "{err}");
        for (interval, timeout) in [
            (Duration::from_secs(1), Some(Duration::from_secs(3))),
            (Duration::from_millis(10), Some(Duration::from_millis(30))),
            (limits::HEARTBEAT_INTERVAL.1, Some(limits::TIMEOUT)),
            (Duration::from_secs(1), None),
            (limits::HEARTBEAT_INTERVAL.1, None),
        ] {
            base()
                .heartbeat_interval(interval)
                .heartbeat_timeout(timeout)
                .build()
                .unwrap_or_else(|e| panic!("{interval:?} {timeout:?}: {e}"));
        }
        // The defaults satisfy the rule.
        let p = Policy::default();
        assert!(
            p.heartbeat_timeout
                .is_some_and(|t| t >= p.heartbeat_interval * limits::HEARTBEAT_TIMEOUT_INTERVALS)
        );
        base().build().expect("defaults");
    }

    /// A longer interval alone is accepted: the default timeout (10 s) follows it.
    #[test]
    fn the_default_heartbeat_timeout_follows_a_long_interval() {
        let settings = base()
            .heartbeat_interval(Duration::from_secs(5))
            .validate()
            .expect("an interval alone");
        assert_eq!(
            settings.policy.heartbeat_timeout,
            Some(Duration::from_secs(15))
        );
        let err = reason(
            base()
                .heartbeat_interval(Duration::from_secs(5))
                .heartbeat_timeout(Some(Duration::from_secs(10))),
        );
        assert!(
            err.contains("is too short for the heartbeat interval 5s"),
            "{err}"
        );
    }

    /// Review B8: a 1-byte limit replaced every worker every second, forever.
    #[test]
    fn max_memory_is_at_least_one_mib() {
        for bytes in [1, 4096, limits::MIN_MAX_MEMORY - 1] {
            let err = reason(base().max_memory(Some(bytes)));
            assert!(
                err.starts_with(&format!("max_memory(): {bytes} bytes is less than")),
                "{err}"
            );
            assert!(err.contains("1 MiB"), "{err}");
        }
        base()
            .max_memory(Some(limits::MIN_MAX_MEMORY))
            .build()
            .expect("1 MiB");
    }

    /// Review B4: `systemd` twice adopted the same descriptors twice (two owners of one
    /// descriptor); the same address twice failed with a misleading bind error.
    #[test]
    fn a_listen_address_given_twice_is_refused() {
        let two = |a: &str, b: &str| {
            MasterBuilder::default()
                .listen(a)
                .listen(b)
                .command(WorkerCommand::new("worker"))
        };
        for (a, b) in [
            ("systemd", "systemd"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("localhost:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::1]:8080"),
            ("unix:/tmp/a.sock", "/tmp/a.sock"),
            ("unix:/tmp//a.sock", "unix:/tmp/a.sock"),
            ("unix:a.sock", "./a.sock"),
        ] {
            let err = reason(two(a, b));
            assert!(
                err.starts_with("listen(): ") && err.contains("listed twice"),
                "{a} {b}: {err}"
            );
            assert!(err.contains(a) && err.contains(b), "{err}");
        }
        for (a, b) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:8080", "127.0.0.1:8081"),
            ("127.0.0.1:8080", "[::1]:8080"),
            ("unix:/tmp/a.sock", "unix:/tmp/b.sock"),
            ("systemd", "127.0.0.1:8080"),
        ] {
            two(a, b).build().unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
    }

    /// Review (fifth round): `backoff_base = 0` took every backoff away, the young
    /// worker's too: a worker that failed at once was respawned without pause.
    #[test]
    fn a_zero_backoff_is_refused() {
        assert_eq!(
            reason(base().backoff_base(Duration::ZERO)),
            "backoff_base(): 0s is out of range 1ms..=1h"
        );
        assert_eq!(
            reason(base().backoff_max(Duration::ZERO)),
            "backoff_max(): 0s is out of range 1ms..=1h"
        );
        base()
            .backoff_base(limits::MIN_BACKOFF_BASE)
            .backoff_max(limits::MIN_BACKOFF_BASE)
            .build()
            .expect("1 ms");
    }

    /// Review (fifth round): `event_capacity(usize::MAX)` panicked in tokio's
    /// broadcast channel, and `1 << 32` allocated that many slots up front.
    #[test]
    fn the_event_capacity_is_bounded() {
        for n in [usize::MAX, 1 << 32, limits::MAX_EVENT_CAPACITY + 1] {
            let b = base().event_capacity(n);
            assert_eq!(b.raw.common.event_capacity, limits::MAX_EVENT_CAPACITY);
            b.build().expect("built, not a panic");
        }
        assert_eq!(base().event_capacity(0).raw.common.event_capacity, 16);
        assert_eq!(base().event_capacity(100).raw.common.event_capacity, 100);
    }

    /// Review (fifth round): log paths with capture off were ignored without a word,
    /// and a log file the master cannot write passed validation (its worker output
    /// then went to the master's stdout).
    #[test]
    fn log_files_need_capture_and_must_be_writable() {
        let dir = std::env::temp_dir().join(format!("rr-builder-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("out.log");
        let err = reason(base().capture_output(false).stderr_log(Some(out.clone())));
        assert!(
            err.starts_with(&format!(
                "stderr_log(): {} is set, but worker output is not captured",
                out.display()
            )),
            "{err}"
        );
        assert!(!out.exists(), "nothing created for a refused configuration");
        // The directory exists, but no file can be made in it, root or not.
        let err = reason(base().stdout_log(Some("/proc/self/rr-cluster-test.log".into())));
        assert!(
            err.starts_with(
                "stdout_log(): cannot create /proc/self/rr-cluster-test.log: directory /proc/self: "
            ),
            "{err}"
        );
        base()
            .stdout_log(Some(out.clone()))
            .build()
            .expect("a writable path");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Regression (review, sixth round): `build` opened (created) each log file to
    /// check it. `stdout = "/dev/stdout"` under systemd, whose stdout is a socket to
    /// the journal, then failed (ENXIO: a socket cannot be opened) where the master
    /// used to log to its own stdout; and a start that failed later (a port in use)
    /// left empty log files behind.
    #[test]
    fn log_paths_are_checked_without_opening_or_creating_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rr-builder-nolog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // What `/dev/stdout` is under systemd's StandardOutput=journal.
        let journal = dir.join("journal.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&journal).expect("bind");
        let (out, err) = (dir.join("out.log"), dir.join("err.log"));
        let built = base()
            .stdout_log(Some(out.clone()))
            .stderr_log(Some(err.clone()))
            .build();
        let created = (out.exists(), err.exists());
        let cases = [
            ("/dev/stdout".into(), "/dev/null".into()),
            ("/dev/null".into(), "/dev/stderr".into()),
            (journal.clone(), journal.clone()),
        ];
        let special: Vec<_> = cases
            .into_iter()
            .map(|(o, e): (PathBuf, PathBuf)| {
                let shown = format!("{} {}", o.display(), e.display());
                (
                    shown,
                    base().stdout_log(Some(o)).stderr_log(Some(e)).build(),
                )
            })
            .collect();
        // A directory this process may not write to (root may write anywhere).
        let locked = dir.join("locked");
        std::fs::create_dir(&locked).expect("dir");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        let refused = (crate::sys::getuid() != 0)
            .then(|| reason(base().stderr_log(Some(locked.join("err.log")))));
        let _ = std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700));
        let _ = std::fs::remove_dir_all(&dir);
        built.expect("writable paths");
        assert_eq!(created, (false, false), "files created by build()");
        for (shown, built) in special {
            built.unwrap_or_else(|e| panic!("{shown}: {e}"));
        }
        if let Some(err) = refused {
            assert!(
                err.starts_with(&format!(
                    "stderr_log(): cannot create {}: directory {}: ",
                    locked.join("err.log").display(),
                    locked.display()
                )) && err.contains("Permission denied"),
                "{err}"
            );
        }
    }
}
