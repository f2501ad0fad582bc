//! Starting worker processes from one long-lived thread.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
//! process. Runtime threads can come and go (`block_in_place`, blocking pools), so every
//! worker is forked by this one thread, which lives exactly as long as the master: when
//! the master ends for any reason, the thread ends and the kernel kills its children.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::sync::mpsc;

use super::supervisor::Input;
use crate::event::ExitInfo;
use crate::sys;
use crate::worker::{ENV_CHANNEL_FD, ENV_GENERATION, ENV_WORKER_ID};

/// The program a master runs as its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
}

impl WorkerCommand {
    /// Runs `program` (looked up in `PATH` when it has no slash).
    pub fn new(program: impl Into<OsString>) -> WorkerCommand {
        WorkerCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// The running executable itself, with `args` (Node's `cluster.fork()`: the same
    /// program, which calls [`Worker::is_worker`](crate::Worker::is_worker)).
    pub fn current_exe() -> io::Result<WorkerCommand> {
        Ok(WorkerCommand::new(std::env::current_exe()?))
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> WorkerCommand {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> WorkerCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the workers (on top of the master's own).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> WorkerCommand {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the workers in `dir`.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> WorkerCommand {
        self.cwd = Some(dir.into());
        self
    }

    /// The program.
    pub fn program(&self) -> &OsString {
        &self.program
    }

    /// The arguments.
    pub fn get_args(&self) -> &[OsString] {
        &self.args
    }
}

/// One worker to start.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) command: WorkerCommand,
    /// The worker's end of its channel; closed here once the child has it.
    pub(crate) channel: OwnedFd,
}

/// Handle to the spawning thread; dropping it ends the thread.
#[derive(Debug)]
pub(crate) struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the thread. Reports `Spawned`/`SpawnFailed` and later `Exited` for each
    /// job to `inputs`. Must be called within a tokio runtime.
    pub(crate) fn start(inputs: mpsc::UnboundedSender<Input>) -> io::Result<Spawner> {
        let handle = tokio::runtime::Handle::current();
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let master_pid = sys::getpid();
        std::thread::Builder::new()
            .name("rr-cluster-spawner".into())
            .spawn(move || {
                let _runtime = handle.enter();
                for job in rx {
                    run(job, &inputs, &handle, master_pid);
                }
            })?;
        Ok(Spawner { jobs })
    }

    /// Queues a job; gives it back if the thread is gone.
    pub(crate) fn spawn(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|e| e.0)
    }
}

fn run(
    job: Job,
    inputs: &mpsc::UnboundedSender<Input>,
    handle: &tokio::runtime::Handle,
    master_pid: u32,
) {
    let command = &job.command;
    let mut cmd = tokio::process::Command::new(&command.program);
    cmd.args(&command.args)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        // Socket activation is the master's business, not the workers'.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env(ENV_CHANNEL_FD, job.channel.as_raw_fd().to_string())
        .env(ENV_WORKER_ID, job.slot.to_string())
        .env(ENV_GENERATION, job.generation.to_string())
        .stdin(Stdio::null())
        // Own process group: a terminal's Ctrl-C reaches the master, which drains the
        // workers, instead of killing everyone at once.
        .process_group(0);
    if let Some(dir) = &command.cwd {
        cmd.current_dir(dir);
    }
    sys::prepare_worker_command(&mut cmd, job.channel.as_fd(), master_pid);
    let id = job.id;
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id().unwrap_or(0);
            let _ = inputs.send(Input::Spawned { id, pid });
            let inputs = inputs.clone();
            handle.spawn(async move {
                let exit = match child.wait().await {
                    Ok(status) => ExitInfo::from_status(status),
                    Err(_) => ExitInfo {
                        code: None,
                        signal: None,
                    },
                };
                let _ = inputs.send(Input::Exited { id, exit });
            });
        }
        Err(e) => {
            let error = format!("{}: {e}", command.program.to_string_lossy());
            let _ = inputs.send(Input::SpawnFailed { id, error });
        }
    }
    drop(job.channel);
}
