//! `rr-cluster`: runs any worker command as a pool behind one listener.
//!
//! # Layout
//!
//! - `main`: the command line (clap) and exit codes.
//! - `run`: `rr-cluster run`, the master: configuration file + flags, logs, signals.
//! - `client`: `status`, `reload`, `scale`, `stop` over the control socket.
//! - `conformance`: `rr-cluster conformance -- CMD`, checks a worker against
//!   docs/PROTOCOL.md.
//! - `hello`: `rr-cluster hello-worker`, the bundled demo worker.
//! - `top`: `rr-cluster top`, the live terminal view.
//! - `ops`: the Prometheus and health endpoints and systemd notifications.

mod client;
mod conformance;
mod hello;
mod ops;
mod run;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Exit code for bad command-line input or configuration (nothing was started).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "rr-cluster",
    version,
    about = "A process manager: one master accepts, workers get the sockets"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a pool of workers behind the listeners (the demo worker when no command is
    /// given): `rr-cluster run [FLAGS] -- PROGRAM ARGS...`.
    Run(Box<run::RunArgs>),
    /// Show the pool: slot, pid, state, CPU, memory, connections, restarts.
    Status {
        #[command(flatten)]
        control: ControlArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Roll every worker over (re-reading the configuration file).
    Reload {
        #[command(flatten)]
        control: ControlArg,
        /// Return when the reload is done; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = rr_cluster::config::parse_duration)]
        timeout: Duration,
    },
    /// Run N workers from now on; +N / -N add or remove some.
    Scale {
        /// The new number of workers, or +N / -N.
        #[arg(allow_hyphen_values = true, value_parser = parse_scale)]
        workers: rr_cluster::ScaleTo,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Stop the pool: drain the workers (or kill them with --now) and exit.
    Stop {
        #[command(flatten)]
        control: ControlArg,
        /// Kill the workers instead of draining them.
        #[arg(long)]
        now: bool,
        /// Return once the master has stopped, with its exit code.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = rr_cluster::config::parse_duration)]
        timeout: Duration,
    },
    /// A live view of the pool (CPU, memory, connections/s per worker); keys: r
    /// reload, + / - scale, q quit.
    Top {
        #[command(flatten)]
        control: ControlArg,
        /// How often to refresh.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = rr_cluster::config::parse_duration)]
        interval: Duration,
    },
    /// The bundled demo worker: HTTP hello world that names its worker.
    HelloWorker,
    /// Check a worker program against the protocol (docs/PROTOCOL.md) under a private
    /// test master: `rr-cluster conformance [FLAGS] -- PROGRAM ARGS...`. Exit status 0
    /// when every required check passes, 1 otherwise.
    Conformance(Box<conformance::ConformanceArgs>),
}

/// `N` (1 to [`rr_cluster::master::MAX_WORKERS`]), `+N` or `-N` (less than the maximum: a
/// bigger step can never land in range).
fn parse_scale(s: &str) -> Result<rr_cluster::ScaleTo, String> {
    let max = rr_cluster::master::MAX_WORKERS;
    let bad = || format!("invalid number of workers {s:?}: expected N (1 to {max}), +N or -N");
    if s.starts_with('+') || s.starts_with('-') {
        let digits = &s[1..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let by = s.parse::<i64>().ok();
        return match by {
            Some(by) if by.unsigned_abs() < max as u64 => Ok(rr_cluster::ScaleTo::By(by)),
            _ => Err(format!(
                "{s} workers is out of range: a pool has 1 to {max} workers"
            )),
        };
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(rr_cluster::ScaleTo::Exactly(n)),
        _ => Err(format!("{s} workers is out of range 1..={max}")),
    }
}

#[derive(Debug, clap::Args)]
struct ControlArg {
    /// The master's control socket [default: $XDG_RUNTIME_DIR/rr-cluster.sock or /tmp/rr-cluster-UID/control.sock]
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl ControlArg {
    fn path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(rr_cluster::control::default_socket_path)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line (or a line of our own where clap's says nothing by
            // itself), and its tip when it has one (`run node app.js`: "to pass 'node'
            // as a value, use '-- node'"), without the usage epilogue.
            let text = e.render().to_string();
            let mut lines = text.lines();
            let first = lines.next().unwrap_or("invalid arguments");
            let first = usage_line(&e).unwrap_or_else(|| first.to_owned());
            eprintln_safe(&format!("rr-cluster: {first}"));
            let mut tips: Vec<String> = lines
                .filter(|l| l.trim_start().starts_with("tip:"))
                .map(|l| l.trim().to_owned())
                .collect();
            if tips.is_empty() {
                tips.extend(worker_command_tip(&e));
            }
            for tip in tips {
                eprintln_safe(&format!("rr-cluster: {tip}"));
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread each. Workers: the pool is the parallelism. The master: its work per
    // connection is a few system calls, and on one thread no wake-up crosses threads
    // (a multi-thread runtime cost it a fifth more CPU per connection, benches/). The
    // process-spawning thread and the log writer are threads of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln_safe(&format!("rr-cluster: error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let top = matches!(cli.command, Cmd::Top { .. });
    let code = runtime.block_on(async move {
        use rr_cluster::control::Request;
        match cli.command {
            Cmd::Run(args) => run::run(*args).await,
            Cmd::Status { control, json } => client::status(&control.path(), json).await,
            Cmd::Reload {
                control,
                wait,
                timeout,
            } => client::simple(&control.path(), Request::Reload { wait }, timeout).await,
            Cmd::Scale { workers, control } => {
                let (workers, by) = match workers {
                    rr_cluster::ScaleTo::Exactly(n) => (Some(n), None),
                    rr_cluster::ScaleTo::By(by) => (None, Some(by)),
                    _ => (None, None),
                };
                let req = Request::Scale { workers, by };
                client::simple(&control.path(), req, Duration::from_secs(10)).await
            }
            Cmd::Stop {
                control,
                now,
                wait,
                timeout,
            } => client::simple(&control.path(), Request::Stop { now, wait }, timeout).await,
            Cmd::Top { control, interval } => {
                top::main(control.path(), interval.max(Duration::from_millis(100))).await
            }
            Cmd::HelloWorker => hello::main().await,
            Cmd::Conformance(args) => conformance::main(*args).await,
        }
    });
    if top {
        // `top`'s view thread may be stuck writing to a terminal that went away (it
        // was told to end, and the terminal restored): not waited for.
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
    code
}

/// The one line for the errors whose first line from clap says nothing by itself:
/// no subcommand (clap shows the help, whose first line is the `about` text), and a
/// missing argument (clap names it on the lines after its first).
fn usage_line(e: &clap::Error) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            let cli = Cli::command();
            let names: Vec<&str> = cli
                .get_subcommands()
                .map(clap::Command::get_name)
                .filter(|n| *n != "help")
                .collect();
            Some(format!(
                "error: a subcommand is required: {} (rr-cluster --help)",
                names.join(", ")
            ))
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(args)) if !args.is_empty() => args.join(", "),
                Some(ContextValue::String(arg)) => arg.clone(),
                _ => "a required argument".to_owned(),
            };
            let usage = match e.get(ContextKind::Usage) {
                Some(ContextValue::StyledStr(u)) => u
                    .to_string()
                    .trim()
                    .trim_start_matches("Usage:")
                    .trim()
                    .to_owned(),
                _ => String::new(),
            };
            Some(if usage.is_empty() {
                format!("error: missing {missing}")
            } else {
                format!("error: missing {missing}: usage: {usage}")
            })
        }
        _ => None,
    }
}

/// `rr-cluster run node app.js` (or `conformance`): the worker command goes after `--`.
fn worker_command_tip(e: &clap::Error) -> Option<String> {
    if e.kind() != clap::error::ErrorKind::UnknownArgument {
        return None;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = args.first().map(String::as_str)?;
    if sub != "run" && sub != "conformance" {
        return None;
    }
    let clap::error::ContextValue::String(arg) = e.get(clap::error::ContextKind::InvalidArg)?
    else {
        return None;
    };
    if arg.starts_with('-') {
        return None;
    }
    let at = args.iter().position(|a| a == arg)?;
    Some(format!(
        "tip: the worker command goes after `--`: rr-cluster {sub} [OPTIONS] -- {}",
        args[at..].join(" ")
    ))
}

/// Writes a line to stderr; a closed or broken stderr is not an error (a panic in
/// `eprintln!` would take the master down with it).
pub(crate) fn eprintln_safe(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Writes a line to stdout, ignoring a closed pipe (`rr-cluster status | head -1`).
pub(crate) fn println_safe(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
}
