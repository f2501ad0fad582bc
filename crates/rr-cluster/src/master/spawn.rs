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
use std::os::fd::{AsFd, OwnedFd};
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

    /// Checks that the program can be started at all: no NUL byte in the program,
    /// its arguments, its environment or its working directory (`exec` cannot pass
    /// one), and no environment variable with an empty name or an `=` in it; the
    /// working directory, when set, is a directory this process can enter; the
    /// program exists (in `PATH` when it has no slash: the command's own `PATH` if it
    /// sets one, as `exec` does), is a file, and is executable by this process. A
    /// master refuses to start with a command that fails this, and a reload that
    /// brings one is refused, instead of crash-looping on it.
    pub fn check(&self) -> Result<PathBuf, String> {
        self.check_strings()?;
        if let Some(dir) = &self.cwd {
            let shown = dir.display();
            let meta =
                std::fs::metadata(dir).map_err(|e| format!("working directory {shown}: {e}"))?;
            if !meta.is_dir() {
                return Err(format!("working directory {shown}: not a directory"));
            }
            if !sys::executable(dir) {
                return Err(format!(
                    "working directory {shown}: this process may not enter it (no search permission)"
                ));
            }
        }
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

impl WorkerCommand {
    /// The strings `exec` is given: none may hold a NUL byte (the spawn would fail
    /// with a message that names none of them), and environment names must be names.
    fn check_strings(&self) -> Result<(), String> {
        let nul = |s: &std::ffi::OsStr| s.as_encoded_bytes().contains(&0);
        let lossy = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        if nul(&self.program) {
            return Err(format!(
                "the program {:?} contains a NUL byte",
                lossy(&self.program)
            ));
        }
        if let Some((i, arg)) = self.args.iter().enumerate().find(|(_, a)| nul(a)) {
            return Err(format!(
                "argument {} ({:?}) contains a NUL byte",
                i + 1,
                lossy(arg)
            ));
        }
        for (key, value) in &self.env {
            let name = lossy(key);
            if key.is_empty() || key.as_encoded_bytes().contains(&b'=') || nul(key) {
                return Err(format!(
                    "environment variable name {name:?} is not a name (empty, or with '=' or a NUL byte)"
                ));
            }
            if nul(value) {
                return Err(format!(
                    "environment variable {name}: the value contains a NUL byte"
                ));
            }
        }
        if let Some(dir) = &self.cwd {
            if nul(dir.as_os_str()) {
                return Err(format!(
                    "working directory {:?} contains a NUL byte",
                    lossy(dir.as_os_str())
                ));
            }
        }
        Ok(())
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
    // The child finds its channel at this number, whatever the channel's number here.
    let fd = sys::WORKER_CHANNEL_FD.to_string();
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
    let slot = sys::prepare_worker_command(&mut cmd, job.channel.as_fd(), master_pid);
    let id = job.id;
    let spawned = cmd.spawn();
    drop(slot);
    match spawned {
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
            // A chdir failure reads as the program's own ("node: No such file or
            // directory"): name the directory too.
            let error = match &command.cwd {
                Some(dir) => format!(
                    "{} (in {}): {e}",
                    command.program.to_string_lossy(),
                    dir.display()
                ),
                None => format!("{}: {e}", command.program.to_string_lossy()),
            };
            let _ = reports.send(Report::Input(Input::SpawnFailed { id, error }));
        }
    }
    drop(job.channel);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    /// Regression (review, sixth round): a worker was told its channel's number in
    /// the master (`RR_CLUSTER_CHANNEL_FD`, `NODE_CHANNEL_FD`), above its soft
    /// descriptor limit in a master holding many descriptors. Every worker finds its
    /// channel at 3 and is told so, in both dialects.
    #[tokio::test]
    async fn a_worker_finds_its_channel_at_3_and_is_told_so() {
        use tokio::io::AsyncReadExt;
        let (reports_tx, mut reports) = mpsc::unbounded_channel();
        let spawner = Spawner::start(reports_tx).expect("spawner");
        for (id, protocol) in [(1, Protocol::Binary), (2, Protocol::Node)] {
            let (_ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
            let channel = OwnedFd::from(theirs);
            let socket = sys::inode(channel.as_fd()).expect("inode");
            let script = "echo \"${RR_CLUSTER_CHANNEL_FD-unset} ${NODE_CHANNEL_FD-unset}\"; \
                          readlink /proc/$$/fd/3";
            let job = Job {
                id,
                slot: 0,
                generation: 0,
                command: WorkerCommand::new("sh")
                    .args(["-c", script])
                    .protocol(protocol),
                heartbeat_ms: 1000,
                listeners_json: "[]".into(),
                capture: true,
                channel,
            };
            assert!(spawner.spawn(job), "the spawner runs");
            let stdout = loop {
                let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
                    .await
                    .expect("in time")
                    .expect("the spawner runs");
                match report {
                    Report::Spawned {
                        id: got, stdout, ..
                    } if got == id => break stdout,
                    Report::Input(Input::SpawnFailed { error, .. }) => panic!("{error}"),
                    _ => {} // the previous worker's exit
                }
            };
            let mut out = String::new();
            tokio::time::timeout(
                Duration::from_secs(10),
                stdout.expect("captured").read_to_string(&mut out),
            )
            .await
            .expect("in time")
            .expect("read");
            let told = match protocol {
                Protocol::Binary => "3 unset",
                _ => "unset 3",
            };
            assert_eq!(out, format!("{told}\nsocket:[{socket}]\n"), "{protocol:?}");
        }
    }

    /// Review (fifth round): a typo in `cwd` passed the check, and every spawn then
    /// failed at chdir reported as "node: No such file or directory" until the pool
    /// gave up; a NUL byte failed every spawn the same way.
    #[test]
    fn the_working_directory_and_nul_bytes_are_checked() {
        let err = WorkerCommand::new("sh")
            .current_dir("/nonexistent")
            .check()
            .expect_err("no such directory");
        assert!(
            err.starts_with("working directory /nonexistent: ") && err.contains("No such file"),
            "{err}"
        );
        let err = WorkerCommand::new("sh")
            .current_dir("/bin/sh")
            .check()
            .expect_err("a file");
        assert_eq!(err, "working directory /bin/sh: not a directory");
        assert!(WorkerCommand::new("sh").current_dir("/").check().is_ok());
        let cases = [
            (
                WorkerCommand::new("s\0h"),
                "the program \"s\\0h\" contains a NUL byte",
            ),
            (
                WorkerCommand::new("sh").arg("-c").arg("a\0b"),
                "argument 2 (\"a\\0b\") contains a NUL byte",
            ),
            (
                WorkerCommand::new("sh").env("A", "x\0y"),
                "environment variable A: the value contains a NUL byte",
            ),
            (
                WorkerCommand::new("sh").env("A=B", "x"),
                "environment variable name \"A=B\" is not a name (empty, or with '=' or a NUL byte)",
            ),
            (
                WorkerCommand::new("sh").current_dir("/tm\0p"),
                "working directory \"/tm\\0p\" contains a NUL byte",
            ),
        ];
        for (command, expected) in cases {
            assert_eq!(command.check().expect_err(expected), expected);
        }
    }
}
