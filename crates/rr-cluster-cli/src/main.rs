//! `rr-cluster`: runs any worker command as a pool behind one listener.
//!
//! # Layout
//!
//! - `main`: the command line (clap) and exit codes.
//! - `run`: `rr-cluster run`, the master: configuration file + flags, logs, signals.
//! - `client`: `status`, `reload`, `scale`, `stop` over the control socket.
//! - `hello`: `rr-cluster hello-worker`, the bundled demo worker.
//! - `ops`: the Prometheus endpoint and systemd notifications.

mod client;
mod hello;
mod ops;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Run a pool of workers behind the listeners (the demo worker when no command is given).
    Run(Box<run::RunArgs>),
    /// Show the pool: slot, pid, state, uptime, connections dispatched, restarts.
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
    },
    /// Run N workers from now on.
    Scale {
        /// The new number of workers.
        workers: usize,
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
    },
    /// The bundled demo worker: HTTP/1.1 hello world that names its worker.
    HelloWorker,
}

#[derive(Debug, clap::Args)]
struct ControlArg {
    /// The master's control socket [default: $XDG_RUNTIME_DIR/rr-cluster.sock or /tmp/rr-cluster-UID.sock]
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
            // One line: clap's first line, without its "try --help" epilogue.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("rr-cluster: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match cli.command {
        // Workers run on one thread each: the pool is the parallelism.
        Cmd::HelloWorker => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rr-cluster: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Cmd::Run(args) => run::run(*args).await,
            Cmd::Status { control, json } => client::status(&control.path(), json).await,
            Cmd::Reload { control } => {
                client::simple(&control.path(), rr_cluster::control::Request::Reload).await
            }
            Cmd::Scale { workers, control } => {
                client::simple(
                    &control.path(),
                    rr_cluster::control::Request::Scale { workers },
                )
                .await
            }
            Cmd::Stop { control, now } => {
                client::simple(&control.path(), rr_cluster::control::Request::Stop { now }).await
            }
            Cmd::HelloWorker => hello::main().await,
        }
    })
}
