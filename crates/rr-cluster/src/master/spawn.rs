//! Starting worker processes from one long-lived thread.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
//! process. Runtime threads can come and go (`block_in_place`, blocking pools), so every
//! worker is forked by this one thread, which lives exactly as long as the master: when
//! the master ends for any reason, the thread ends and the kernel kills its children.
//!
//! Each child gets a pidfd ([`sys::ProcessHandle`]) right after the fork, before anyone
//! can reap it; the master signals workers only through it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::mpsc;

use super::supervisor::Input;
use crate::event::ExitInfo;
use crate::protocol::{ENV_PROTOCOL, PROTOCOL_VERSION, Protocol};
use crate::sys;
use crate::worker::{ENV_CHANNEL_FD, ENV_CHANNEL_INODE, ENV_GENERATION, ENV_WORKER_ID};

/// Environment variable with the heartbeat period in milliseconds (Node.js dialect;
/// the binary protocol has it in `Hello`).
pub const ENV_HEARTBEAT_MS: &str = "RR_CLUSTER_HEARTBEAT_MS";
/// Environment variable with the master's listeners as a JSON array (Node.js dialect).
pub const ENV_LISTENERS: &str = "RR_CLUSTER_LISTENERS";

/// The program a master runs as its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    protocol: Protocol,
}

impl WorkerCommand {
    /// Runs `program` (looked up in `PATH` when it has no slash).
    pub fn new(program: impl Into<OsString>) -> WorkerCommand {
        WorkerCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            protocol: Protocol::Binary,
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

    /// The protocol the workers speak (default [`Protocol::Binary`];
    /// [`Protocol::Node`] for a Node.js program on its own IPC channel).
    pub fn protocol(mut self, protocol: Protocol) -> WorkerCommand {
        self.protocol = protocol;
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

    /// The protocol the workers speak.
    pub fn get_protocol(&self) -> Protocol {
        self.protocol
    }

    /// Checks that the program can be started at all: it exists (in `PATH` when it
    /// has no slash: the command's own `PATH` if it sets one, as `exec` does), is a
    /// file, and is executable by this process. A master refuses to start with a
    /// command that fails this, instead of crash-looping on it.
    pub fn check(&self) -> Result<PathBuf, String> {
        let program = Path::new(&self.program);
        let shown = program.display();
        let resolve = |p: &Path| -> Option<PathBuf> {
            match &self.cwd {
                Some(dir) if p.is_relative() => Some(dir.join(p)),
                _ => Some(p.to_path_buf()),
            }
        };
        let found = if self.program.as_encoded_bytes().contains(&b'/') {
            resolve(program)
        } else {
            // The last PATH the command sets, else the master's. Like `execvp`, the
            // first candidate that can be executed, else the first file found (for
            // the error).
            let path = self
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var_os("PATH"));
            path.and_then(|path| {
                let files: Vec<PathBuf> = std::env::split_paths(&path)
                    .map(|dir| dir.join(program))
                    .filter(|candidate| candidate.is_file())
                    .collect();
                let runnable = files.iter().find(|c| sys::executable(c)).cloned();
                runnable.or_else(|| files.into_iter().next())
            })
        };
        let Some(path) = found else {
            return Err(format!("{shown}: not found in PATH"));
        };
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a file", path.display()));
        }
        if !sys::executable(&path) {
            return Err(format!("{}: not executable", path.display()));
        }
        Ok(path)
    }
}

/// One worker to start.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) command: WorkerCommand,
    pub(crate) heartbeat_ms: u64,
    /// The master's listeners as JSON (Node.js dialect).
    pub(crate) listeners_json: String,
    /// Capture stdout and stderr.
    pub(crate) capture: bool,
    /// The worker's end of its channel; closed here once the child has it.
    pub(crate) channel: OwnedFd,
}

/// What the spawner thread reports.
#[derive(Debug)]
pub(crate) enum Report {
    /// A lifecycle input for the supervisor (`SpawnFailed`, `Exited`).
    Input(Input),
    /// The process of worker `id` started.
    Spawned {
        id: u64,
        process: sys::ProcessHandle,
        stdout: Option<ChildStdout>,
        stderr: Option<ChildStderr>,
    },
}

/// Handle to the spawning thread; dropping it ends the thread.
#[derive(Debug)]
pub(crate) struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the thread. Reports `Spawned`/`SpawnFailed` and later `Exited` for each
    /// job to `reports`. Must be called within a tokio runtime.
    pub(crate) fn start(reports: mpsc::UnboundedSender<Report>) -> io::Result<Spawner> {
        let handle = tokio::runtime::Handle::current();
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let master_pid = sys::getpid();
        std::thread::Builder::new()
            .name("rr-cluster-spawner".into())
            .spawn(move || {
                let _runtime = handle.enter();
                for job in rx {
                    run(job, &reports, &handle, master_pid);
                }
            })?;
        Ok(Spawner { jobs })
    }

    /// Queues a job; `false` if the thread is gone.
    pub(crate) fn spawn(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

fn run(
    job: Job,
    reports: &mpsc::UnboundedSender<Report>,
    handle: &tokio::runtime::Handle,
    master_pid: u32,
) {
    let command = &job.command;
    let fd = job.channel.as_raw_fd().to_string();
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
        // Node's cluster module must not take the child for one of its own workers.
        .env_remove("NODE_UNIQUE_ID")
        .env(ENV_WORKER_ID, job.slot.to_string())
        .env(ENV_GENERATION, job.generation.to_string())
        .stdin(Stdio::null())
        // Own process group: a terminal's Ctrl-C reaches the master, which drains the
        // workers, instead of killing everyone at once; and the master can signal
        // whatever the worker leaves behind.
        .process_group(0);
    match command.protocol {
        Protocol::Binary => {
            let inode = sys::inode(job.channel.as_fd()).unwrap_or(0);
            cmd.env(ENV_CHANNEL_FD, &fd)
                .env(ENV_CHANNEL_INODE, inode.to_string())
                .env(ENV_PROTOCOL, PROTOCOL_VERSION.to_string())
                .env_remove("NODE_CHANNEL_FD");
        }
        Protocol::Node => {
            cmd.env("NODE_CHANNEL_FD", &fd)
                .env("NODE_CHANNEL_SERIALIZATION_MODE", "json")
                .env(ENV_PROTOCOL, "node")
                .env(ENV_HEARTBEAT_MS, job.heartbeat_ms.to_string())
                .env(ENV_LISTENERS, &job.listeners_json)
                .env_remove(ENV_CHANNEL_FD)
                .env_remove(ENV_CHANNEL_INODE);
        }
    }
    if job.capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    if let Some(dir) = &command.cwd {
        cmd.current_dir(dir);
    }
    sys::prepare_worker_command(&mut cmd, job.channel.as_fd(), master_pid);
    let id = job.id;
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id().unwrap_or(0);
            // Not reaped before this: the Child is ours and nobody waits on it yet.
            let process = match sys::ProcessHandle::open(pid) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(id, pid, error = %e, "cannot open a pidfd for the worker");
                    let _ = child.start_kill();
                    let _ = reports.send(Report::Input(Input::SpawnFailed {
                        id,
                        error: format!("pidfd_open: {e}"),
                    }));
                    return;
                }
            };
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let reaper = process.clone();
            let _ = reports.send(Report::Spawned {
                id,
                process,
                stdout,
                stderr,
            });
            let reports = reports.clone();
            handle.spawn(async move {
                // What the worker left in its process group is killed before the
                // worker is reaped, while its pid still names its group.
                let exit = match reaper.reap(child).await {
                    Ok(status) => ExitInfo::from_status(status),
                    Err(_) => ExitInfo {
                        code: None,
                        signal: None,
                    },
                };
                let _ = reports.send(Report::Input(Input::Exited { id, exit }));
            });
        }
        Err(e) => {
            let error = format!("{}: {e}", command.program.to_string_lossy());
            let _ = reports.send(Report::Input(Input::SpawnFailed { id, error }));
        }
    }
    drop(job.channel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_that_cannot_start_are_named() {
        let err = WorkerCommand::new("/nonexistent/bin")
            .check()
            .expect_err("missing");
        assert!(err.contains("/nonexistent/bin"), "{err}");
        let err = WorkerCommand::new("no-such-program-rr")
            .check()
            .expect_err("not in PATH");
        assert!(err.contains("not found in PATH"), "{err}");
        let plain = std::env::temp_dir().join(format!("rr-spawn-check-{}", std::process::id()));
        std::fs::write(&plain, "not a program").expect("write");
        let err = WorkerCommand::new(&plain)
            .check()
            .expect_err("not executable");
        let _ = std::fs::remove_file(&plain);
        assert!(err.contains("not executable"), "{err}");
        assert!(WorkerCommand::new("sh").check().is_ok());
        assert!(WorkerCommand::new("/bin/sh").check().is_ok());
    }

    #[test]
    fn the_commands_own_path_is_searched_and_unrunnable_files_skipped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rr-spawn-path-{}", std::process::id()));
        let (first, second) = (dir.join("first"), dir.join("second"));
        std::fs::create_dir_all(&first).expect("dir");
        std::fs::create_dir_all(&second).expect("dir");
        let name = "rr-spawn-path-program";
        // Found only through the command's PATH; the first one found is not runnable.
        std::fs::write(first.join(name), "#!/bin/sh\n").expect("write");
        std::fs::write(second.join(name), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(second.join(name), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = std::env::join_paths([&first, &second]).expect("PATH");
        let checked = WorkerCommand::new(name).env("PATH", &path).check();
        let without = WorkerCommand::new(name).check();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(checked, Ok(second.join(name)));
        assert!(without.is_err(), "{without:?}");
    }
}
