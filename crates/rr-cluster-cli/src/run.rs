//! `rr-cluster run`: the master. Configuration comes from the file (if any), then the
//! flags; a reload (SIGHUP or `rr-cluster reload`) reads both again.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use rr_cluster::config::{
    ConfigError, LogFormat, parse_bytes, parse_duration, parse_duration_or_off,
};
use rr_cluster::{
    Balance, Config, GiveUpAction, Master, MasterBuilder, MasterError, MasterHandle, MasterSignal,
    Protocol, WorkerCommand,
};

use crate::eprintln_safe;

/// `--heartbeat-timeout`: a duration or `off`. (A newtype: clap gives
/// `Option<Option<T>>` a meaning of its own.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeartbeatTimeout(Option<Duration>);

fn parse_heartbeat_timeout(s: &str) -> Result<HeartbeatTimeout, String> {
    parse_duration_or_off(s).map(HeartbeatTimeout)
}

/// `rr-cluster run` flags. Each overrides the configuration file.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// Configuration file (TOML); flags override what it sets.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address: IP:PORT, [IPv6]:PORT, unix:/path or systemd; repeatable, each
    /// address once [default: 127.0.0.1:8080].
    #[arg(long, short = 'l', value_name = "ADDR")]
    listen: Vec<String>,
    /// Number of workers [default: one per CPU core].
    #[arg(long, short = 'w', value_name = "N")]
    workers: Option<usize>,
    /// How connections are spread.
    #[arg(long, value_name = "round-robin|least-connections|client-ip|shared", value_parser = parse_balance)]
    balance: Option<Balance>,
    /// The protocol the workers speak: binary (rr-cluster's channel; the Rust and
    /// Python libraries) or node (a Node.js program on its own IPC channel).
    #[arg(long, value_name = "binary|node", value_parser = parse_protocol)]
    worker_protocol: Option<Protocol>,
    /// Control socket path [default: $XDG_RUNTIME_DIR/rr-cluster.sock or /tmp/rr-cluster-UID/control.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics (and /livez, /readyz) on this address (IP:PORT).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Log format (the master's logs and the workers' output).
    #[arg(long, value_name = "text|json", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// How long a draining worker may take before SIGKILL (e.g. 30s; at most 24h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// How long a new worker may take to say Ready (at most 24h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ready_timeout: Option<Duration>,
    /// How often workers send a heartbeat (10ms to 1h); a worker two intervals late
    /// gets no new connection until it shows life.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// A worker silent this long is killed and replaced (default 10s, or 3 heartbeat
    /// intervals when that is more; at least 3 intervals, at most 24h; "off": never
    /// killed, still out of rotation while late).
    #[arg(long, value_name = "DURATION|off", value_parser = parse_heartbeat_timeout)]
    heartbeat_timeout: Option<HeartbeatTimeout>,
    /// More boot failures than this within the window is a give-up.
    #[arg(long, value_name = "N")]
    restart_limit: Option<usize>,
    /// The window boot failures are counted in (e.g. 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    restart_window: Option<Duration>,
    /// A worker ready this long was healthy; a reload lets each new worker serve this
    /// long before the old one drains.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    min_uptime: Option<Duration>,
    /// On give-up: exit non-zero, or keep serving with the workers left.
    #[arg(long, value_name = "exit|keep", value_parser = parse_give_up)]
    on_give_up: Option<GiveUpAction>,
    /// Replace a worker (drain-first) after it was handed this many connections.
    #[arg(long, value_name = "N")]
    max_requests: Option<u64>,
    /// A random 0..=N added to each worker's max-requests.
    #[arg(long, value_name = "N")]
    max_requests_jitter: Option<u64>,
    /// Replace a worker (drain-first) whose resident memory exceeds this (e.g. 512MiB;
    /// at least 1MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    max_memory: Option<u64>,
    /// Replace a worker (drain-first) older than this (e.g. 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,
    /// The worker program and its arguments, after `--` [default: this binary's hello-worker].
    #[arg(last = true, value_name = "WORKER-COMMAND")]
    command: Vec<String>,
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    s.parse()
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse()
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!(
            "unknown log format {other:?}: expected text or json"
        )),
    }
}

fn parse_give_up(s: &str) -> Result<GiveUpAction, String> {
    match s {
        "exit" => Ok(GiveUpAction::Exit),
        "keep" => Ok(GiveUpAction::Keep),
        other => Err(format!(
            "unknown give-up action {other:?}: expected exit or keep"
        )),
    }
}

/// What the binary itself (not the library) takes from the configuration.
#[derive(Debug)]
struct Extras {
    log_format: LogFormat,
    metrics: Option<String>,
    /// Warnings about the configuration, for the logs.
    warnings: Vec<String>,
}

/// This executable, for the demo worker: found once, when the master starts. Asked
/// again at each reload, `current_exe` would say "/path/rr-cluster (deleted)" once the
/// binary was replaced in place (an upgrade), and the demo pool could not reload; the
/// path found at the start runs whatever binary is there now. (A binary replaced
/// before the master looked: its path without the suffix.)
fn demo_worker_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable for the demo worker: {e}"))?;
    Ok(without_deleted_suffix(exe))
}

/// `/path/rr-cluster (deleted)` (Linux's name of an executable unlinked or replaced
/// while it runs) as `/path/rr-cluster`, unless a file has that very name.
fn without_deleted_suffix(exe: PathBuf) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    const DELETED: &[u8] = b" (deleted)";
    let bytes = exe.as_os_str().as_bytes();
    match bytes.strip_suffix(DELETED) {
        Some(path) if !exe.exists() => PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        _ => exe,
    }
}

/// File, then flags, into a builder. `exe`: this executable (for the demo worker),
/// from [`demo_worker_exe`].
fn configure(
    args: &RunArgs,
    exe: &Result<PathBuf, String>,
) -> Result<(MasterBuilder, Extras), String> {
    let config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut b = config.apply(Master::builder()).map_err(|e| e.to_string())?;
    let mut warnings = Vec::new();
    if !args.listen.is_empty() {
        // Logged once the logs are set up (see `run`).
        warnings.extend(rr_cluster::master::socket_activation_mismatch());
        b = b.listen_all(args.listen.iter().cloned());
    } else if rr_cluster::master::socket_activated() {
        // Socket activation: the sockets systemd passed, instead of binding.
        b = b.listen_all(["systemd"]);
    } else if config.listen.is_none() {
        if let Some(mismatch) = rr_cluster::master::socket_activation_mismatch() {
            return Err(format!("{mismatch}; pass --listen to say where to listen"));
        }
        b = b.listen("127.0.0.1:8080");
    }
    if let Some(n) = args.workers {
        b = b.workers(n);
    }
    if let Some(balance) = args.balance {
        b = b.balance(balance);
    }
    if let Some(d) = args.drain_timeout {
        b = b.drain_timeout(d);
    }
    if let Some(d) = args.ready_timeout {
        b = b.ready_timeout(d);
    }
    if let Some(d) = args.heartbeat_interval {
        b = b.heartbeat_interval(d);
    }
    if let Some(HeartbeatTimeout(d)) = args.heartbeat_timeout {
        b = b.heartbeat_timeout(d);
    }
    if let Some(n) = args.restart_limit {
        b = b.restart_limit(n);
    }
    if let Some(d) = args.restart_window {
        b = b.restart_window(d);
    }
    if let Some(d) = args.min_uptime {
        b = b.min_uptime(d);
    }
    if let Some(a) = args.on_give_up {
        b = b.on_give_up(a);
    }
    if args.max_requests.is_some() {
        b = b.max_requests(args.max_requests);
    }
    if let Some(j) = args.max_requests_jitter {
        b = b.max_requests_jitter(j);
    }
    if args.max_memory.is_some() {
        b = b.max_memory(args.max_memory);
    }
    if args.max_age.is_some() {
        b = b.max_age(args.max_age);
    }
    // The command after `--`, else the file's; either way with the file's `[worker]`
    // env, cwd and protocol, and `--worker-protocol` over the file's protocol.
    let argv = match (args.command.is_empty(), &config.worker.command) {
        (false, _) => Some(args.command.as_slice()),
        (true, Some(argv)) => Some(argv.as_slice()),
        (true, None) => None,
    };
    let command = match argv {
        Some(argv) => config.worker.command_for(argv).map_err(|e| e.to_string())?,
        None => {
            let protocol = args.worker_protocol.or(config.worker.protocol);
            if protocol == Some(Protocol::Node) {
                return Err(
                    "a Node.js pool (--worker-protocol node, or [worker] protocol = \"node\") needs a worker command: rr-cluster run --worker-protocol node -- node app.js"
                        .into(),
                );
            }
            let me = WorkerCommand::new(exe.clone()?);
            config.worker.apply_to(me.arg("hello-worker"))
        }
    };
    b = b.command(match args.worker_protocol {
        Some(protocol) => command.protocol(protocol),
        None => command,
    });
    let control = args
        .control
        .clone()
        .or(config.control.clone())
        .unwrap_or_else(rr_cluster::control::default_socket_path);
    b = b.control_socket(control);
    let log_format = args.log_format.or(config.log_format).unwrap_or_default();
    b = b.log_format(log_format);
    let extras = Extras {
        log_format,
        metrics: args.metrics.clone().or(config.metrics.clone()),
        warnings,
    };
    Ok((b, extras))
}

pub(crate) async fn run(args: RunArgs) -> ExitCode {
    // Caught from the start: a signal while the master starts waits for it instead of
    // killing the process with the default action (and leaving the control socket).
    let signals = match catch_signals() {
        Ok(s) => s,
        Err(e) => return failure(&format!("cannot install signal handlers: {e}")),
    };
    let exe = demo_worker_exe();
    let (builder, extras) = match configure(&args, &exe) {
        Ok(x) => x,
        Err(e) => return usage_error(&e),
    };
    let reload_args = args.clone();
    let serving_metrics = extras.metrics.clone();
    let builder = builder.on_reload(move || {
        let (builder, fresh) = configure(&reload_args, &exe)?;
        // The metrics listener is the binary's, bound once; like the logs (which the
        // library keeps with a warning), it stays as it is.
        if !same_metrics_address(fresh.metrics.as_deref(), serving_metrics.as_deref()) {
            tracing::warn!(
                "the metrics address cannot change on reload; the old one is kept ({}; restart the master to change it)",
                serving_metrics.as_deref().unwrap_or("no metrics")
            );
        }
        Ok(builder)
    });
    let master = match builder.build() {
        Ok(m) => m,
        Err(e) => return usage_error(&ConfigError::from(e).to_string()),
    };
    let metrics = match extras.metrics.as_deref() {
        None => None,
        Some(addr) => match addr.parse::<std::net::SocketAddr>() {
            Err(_) => {
                return usage_error(&format!(
                    "invalid metrics address {addr:?}: expected IP:PORT"
                ));
            }
            Ok(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(e) => return usage_error(&format!("cannot serve metrics on {addr}: {e}")),
            },
        },
    };
    let _logs = init_logs(extras.log_format);
    for warning in &extras.warnings {
        tracing::warn!("{warning}");
    }
    let events = master.events();
    let handle = match master.start().await {
        Ok(h) => h,
        // Nothing was started: bad configuration or environment.
        Err(e @ MasterError::Start(_)) => return failure(&e.to_string()),
        Err(e) => return usage_error(&e.to_string()),
    };
    if let Err(e) = hand_over_signals(signals, &handle).await {
        return failure(&format!("cannot install signal handlers: {e}"));
    }
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics at http://{addr}/metrics (and /livez, /readyz)");
        }
        tokio::spawn(crate::ops::serve_metrics(listener, handle.clone()));
    }
    tokio::spawn(crate::ops::notify_systemd(events, handle.clone()));
    match handle.wait().await {
        0 => ExitCode::SUCCESS,
        code => ExitCode::from(u8::try_from(code).unwrap_or(1)),
    }
}

/// Whether two `metrics` settings name the same address (`127.0.0.1:09090` is
/// `127.0.0.1:9090`).
fn same_metrics_address(a: Option<&str>, b: Option<&str>) -> bool {
    let parsed = |s: &str| s.parse::<std::net::SocketAddr>().map_err(|_| s.to_owned());
    a.map(parsed) == b.map(parsed)
}

/// The signals [`MasterHandle::forward_os_signals`] handles, caught from before the
/// master starts, with what each asks of the master (SIGUSR2: nothing, it is only
/// kept from ending the process).
type EarlySignals = Vec<(tokio::signal::unix::Signal, Option<MasterSignal>)>;

fn catch_signals() -> std::io::Result<EarlySignals> {
    use rustix::process::Signal as Sig;
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        (SignalKind::terminate(), Some(MasterSignal::Terminate)),
        (SignalKind::interrupt(), Some(MasterSignal::Interrupt)),
        (SignalKind::quit(), Some(MasterSignal::Quit)),
        (SignalKind::hangup(), Some(MasterSignal::Hangup)),
        (
            SignalKind::from_raw(Sig::TTIN.as_raw()),
            Some(MasterSignal::IncreaseWorkers),
        ),
        (
            SignalKind::from_raw(Sig::TTOU.as_raw()),
            Some(MasterSignal::DecreaseWorkers),
        ),
        (SignalKind::user_defined1(), Some(MasterSignal::ReopenLogs)),
        (SignalKind::user_defined2(), None),
    ];
    kinds
        .into_iter()
        .map(|(kind, sig)| Ok((signal(kind)?, sig)))
        .collect()
}

/// Hands the master's signals over to [`MasterHandle::forward_os_signals`], and then
/// passes on those that came while the master started.
///
/// No signal is lost or passed on twice: the streams are looked at, and the library's
/// made, with no turn of the runtime in between (one thread: signals reach the streams
/// only on such a turn). What came before is in the early streams alone; what comes
/// after goes to the library's streams (and to the early ones, dropped unread).
async fn hand_over_signals(early: EarlySignals, handle: &MasterHandle) -> std::io::Result<()> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut came = Vec::new();
    for (mut stream, sig) in early {
        if let std::task::Poll::Ready(Some(())) = stream.poll_recv(&mut cx) {
            came.extend(sig);
        }
    }
    handle.forward_os_signals()?;
    for sig in came {
        tracing::info!(signal = ?sig, "signal received while starting");
        if handle.signal(sig).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn failure(msg: &str) -> ExitCode {
    eprintln_safe(&format!("rr-cluster: error: {msg}"));
    ExitCode::FAILURE
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln_safe(&format!("rr-cluster: error: {msg}"));
    ExitCode::from(crate::EXIT_USAGE)
}

/// Stderr that never fails: a log reader that went away (a broken pipe, a restarted
/// journald) costs log lines, never the master.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Logs go through a bounded queue to a writer thread: a slow or stuck stderr drops
/// log lines instead of blocking the master (tracing-appender, lossy mode).
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(16_384)
        .finish(QuietStderr);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        _ => builder.try_init(),
    };
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_executable_is_named_by_its_path() {
        let me = std::env::current_exe().expect("current_exe");
        let mut deleted = me.clone().into_os_string();
        deleted.push(" (deleted)");
        assert_eq!(without_deleted_suffix(PathBuf::from(deleted)), me);
        assert_eq!(without_deleted_suffix(me.clone()), me);
    }
}
