//! The configuration file (`rr-cluster.toml`) and its validation.
//!
//! ```toml
//! listen = ["127.0.0.1:8080"]
//! workers = 4
//! balance = "round-robin"          # "least-connections", "client-ip" or "shared"
//! control = "/run/rr-cluster.sock"
//!
//! [worker]
//! command = ["node", "app.js"]
//! protocol = "node"                # or "binary" (the default)
//! env = { NODE_ENV = "production" }
//! cwd = "/srv/app"                 # env, cwd, protocol: also for a command given
//!                                  # elsewhere (after `--` on the command line)
//!
//! [recycle]                        # replace workers, drain-first
//! max_requests = 10000
//! max_requests_jitter = 500
//! max_memory = "512MiB"
//! max_age = "12h"
//!
//! [logs]
//! capture = true                   # worker stdout/stderr through the master
//! stdout = "/var/log/app/out.log"  # reopened on SIGUSR1; needs capture, and must
//! stderr = "/var/log/app/err.log"  # be writable (opened when the master is built)
//!
//! [restart]
//! limit = 10                       # more than `limit` boot failures within `window`: give up
//! window = "60s"
//! backoff_base = "100ms"           # at least 1ms
//! backoff_max = "10s"
//! min_uptime = "1s"                # healthy after this (never under 1s); also each
//!                                  # slot's wait in a rolling reload
//! on_give_up = "exit"              # or "keep"
//!
//! [timeouts]                       # bounds: see rr_cluster::master::limits
//! ready = "30s"
//! drain = "30s"
//! heartbeat_interval = "1s"
//! heartbeat_timeout = "10s"        # default 10s or 3 intervals if more; at least 3 intervals, or "off" (never kill)
//! ```
//!
//! Unknown keys are errors, and every error names the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::master::LogFormat;
use crate::master::{Balance, BuildError, GiveUpAction, MasterBuilder, WorkerCommand};
use crate::protocol::Protocol;

/// Errors of configuration: a bad value, an unreadable or malformed file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is out of range or inconsistent.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The key (`workers`, `timeouts.drain`, ...).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// The contents of `rr-cluster.toml`. Every key is optional; command-line flags
/// override what the file sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Listen addresses.
    pub listen: Option<Vec<String>>,
    /// Number of workers.
    pub workers: Option<usize>,
    /// How connections are spread.
    pub balance: Option<Balance>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Prometheus metrics address (used by the binary).
    pub metrics: Option<String>,
    /// Log format (used by the binary).
    pub log_format: Option<LogFormat>,
    /// The worker program.
    #[serde(default)]
    pub worker: WorkerSection,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartSection,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: TimeoutSection,
    /// Drain-first replacement of workers.
    #[serde(default)]
    pub recycle: RecycleSection,
    /// Worker output.
    #[serde(default)]
    pub logs: LogsSection,
}

/// `[recycle]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RecycleSection {
    /// Connections handed to a worker before it is replaced.
    pub max_requests: Option<u64>,
    /// A random `0..=jitter` added per worker.
    pub max_requests_jitter: Option<u64>,
    /// Resident memory above which a worker is replaced: bytes, or `"512MiB"`.
    #[serde(default, deserialize_with = "bytes")]
    pub max_memory: Option<u64>,
    /// Age after which a worker is replaced.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub max_age: Option<Duration>,
}

/// `[logs]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LogsSection {
    /// Capture worker stdout and stderr through the master (default true). `false`
    /// with `stdout` or `stderr` set is refused.
    pub capture: Option<bool>,
    /// Append worker stdout to this file (opened, created if need be, when the master
    /// is built: one it cannot write is refused).
    pub stdout: Option<PathBuf>,
    /// Append worker stderr to this file (checked like `stdout`).
    pub stderr: Option<PathBuf>,
}

/// `[worker]`. `env`, `cwd` and `protocol` apply to the worker command wherever it
/// comes from: `command` here, or one given elsewhere (the binary's `-- COMMAND`; see
/// [`WorkerSection::apply_to`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerSection {
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// The protocol the workers speak: `"binary"` (default) or `"node"`.
    pub protocol: Option<Protocol>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

impl WorkerSection {
    /// Adds what this section sets besides `command` to `command`: the environment
    /// variables, the working directory, and the protocol (when set; otherwise the
    /// command's own is kept).
    pub fn apply_to(&self, mut command: WorkerCommand) -> WorkerCommand {
        for (k, v) in &self.env {
            command = command.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            command = command.current_dir(dir);
        }
        if let Some(protocol) = self.protocol {
            command = command.protocol(protocol);
        }
        command
    }

    /// `argv` (the program and its arguments) as a worker command, with this section's
    /// environment, working directory and protocol.
    pub fn command_for(&self, argv: &[String]) -> Result<WorkerCommand, ConfigError> {
        let (program, args) = argv.split_first().ok_or(ConfigError::Invalid {
            field: "worker.command",
            reason: "is empty; give the program and its arguments".into(),
        })?;
        Ok(self.apply_to(WorkerCommand::new(program).args(args)))
    }

    /// Whether the section sets something besides `command`.
    fn sets_more_than_command(&self) -> bool {
        !self.env.is_empty() || self.cwd.is_some() || self.protocol.is_some()
    }
}

/// `[restart]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RestartSection {
    /// Restarts allowed within `window`.
    pub limit: Option<usize>,
    /// The window.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub window: Option<Duration>,
    /// First backoff delay (at least 1 ms).
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub backoff_base: Option<Duration>,
    /// Largest backoff delay.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub backoff_max: Option<Duration>,
    /// Uptime that resets the backoff (healthy after it, and never under 1 s); also
    /// each slot's settle time in a rolling reload.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub min_uptime: Option<Duration>,
    /// What to do on give-up.
    pub on_give_up: Option<GiveUpAction>,
}

/// `[timeouts]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TimeoutSection {
    /// Time to say Ready.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub ready: Option<Duration>,
    /// Time to drain.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub drain: Option<Duration>,
    /// Heartbeat period.
    #[serde(
        default,
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub heartbeat_interval: Option<Duration>,
    /// Silence after which a worker counts as hung; `"off"` disables the check.
    #[serde(
        default,
        deserialize_with = "duration_or_off",
        serialize_with = "ser_duration_or_off"
    )]
    pub heartbeat_timeout: Option<Option<Duration>>,
}

/// The largest configuration file read, in bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The longest duration a setting or flag takes: longer is a typo, and would overflow
/// the clock arithmetic (`now + timeout`).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // 365.25 days a year

/// Parses a duration the way the configuration file and the flags do (`500ms`,
/// `30s`, `2m`, `1m 30s`), at most [`MAX_DURATION`] (100 years).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"2m\"")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration {s:?} is out of range (at most 100 years)"
        ));
    }
    Ok(d)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parses a size in bytes: a number, or a number with a unit (`512MiB`, `1G`, `64kB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {s:?}; write e.g. \"512MiB\" or a number of bytes"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    let bytes = number * factor;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes as u64)
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(Some(n)),
        Size::Text(t) => parse_bytes(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A duration, or `off` (`None`): the heartbeat timeout.
pub fn parse_duration_or_off(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "off" {
        return Ok(None);
    }
    parse_duration(s).map(Some)
}

fn duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Duration>>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration_or_off(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

fn ser_duration_or_off<S: serde::Serializer>(
    d: &Option<Option<Duration>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(Some(d)) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        Some(None) => s.serialize_str("off"),
        None => s.serialize_none(),
    }
}

impl ConfigError {
    /// A builder error, named by the configuration key (and flag) that sets the value.
    pub fn from_build(e: BuildError) -> ConfigError {
        let BuildError::Invalid { method, reason } = e;
        ConfigError::Invalid {
            field: key_for(method),
            reason,
        }
    }
}

/// The configuration key a [`MasterBuilder`] method sets.
pub fn key_for(method: &'static str) -> &'static str {
    match method {
        "restart_limit" => "restart.limit",
        "restart_window" => "restart.window",
        "backoff_base" => "restart.backoff_base",
        "backoff_max" => "restart.backoff_max",
        "min_uptime" => "restart.min_uptime",
        "on_give_up" => "restart.on_give_up",
        "ready_timeout" => "timeouts.ready",
        "drain_timeout" => "timeouts.drain",
        "heartbeat_interval" => "timeouts.heartbeat_interval",
        "heartbeat_timeout" => "timeouts.heartbeat_timeout",
        "max_requests" => "recycle.max_requests",
        "max_memory" => "recycle.max_memory",
        "max_age" => "recycle.max_age",
        "command" => "worker.command",
        "stdout_log" => "logs.stdout",
        "stderr_log" => "logs.stderr",
        "capture_output" => "logs.capture",
        other => other,
    }
}

impl From<BuildError> for ConfigError {
    fn from(e: BuildError) -> ConfigError {
        ConfigError::from_build(e)
    }
}

impl Config {
    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        // Bounded: a path to /dev/zero (or any huge file) is an error, not all memory.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_error(std::io::Error::other(format!(
                "larger than {} MiB",
                MAX_CONFIG_BYTES >> 20
            ))));
        }
        let text =
            String::from_utf8(bytes).map_err(|_| read_error(std::io::Error::other("not UTF-8")))?;
        Config::from_toml(&text, path)
    }

    /// Parses configuration text; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })
    }

    /// Applies what the file sets to `builder` (flags applied afterwards override).
    ///
    /// Without `worker.command`, the file's `worker.env`, `worker.cwd` and
    /// `worker.protocol` go to the command `builder` already has; a command set
    /// afterwards gets them through [`WorkerSection::apply_to`].
    pub fn apply(&self, mut b: MasterBuilder) -> Result<MasterBuilder, ConfigError> {
        if let Some(listen) = &self.listen {
            b = b.listen_all(listen.iter().cloned());
        }
        if let Some(n) = self.workers {
            b = b.workers(n);
        }
        if let Some(balance) = self.balance {
            b = b.balance(balance);
        }
        if let Some(path) = &self.control {
            b = b.control_socket(path.clone());
        }
        if let Some(argv) = &self.worker.command {
            b = b.command(self.worker.command_for(argv)?);
        } else if self.worker.sets_more_than_command() {
            b = b.map_command(|command| self.worker.apply_to(command));
        }
        let c = &self.recycle;
        if c.max_requests.is_some() {
            b = b.max_requests(c.max_requests);
        }
        if let Some(j) = c.max_requests_jitter {
            b = b.max_requests_jitter(j);
        }
        if c.max_memory.is_some() {
            b = b.max_memory(c.max_memory);
        }
        if c.max_age.is_some() {
            b = b.max_age(c.max_age);
        }
        let l = &self.logs;
        if let Some(capture) = l.capture {
            b = b.capture_output(capture);
        }
        if l.stdout.is_some() {
            b = b.stdout_log(l.stdout.clone());
        }
        if l.stderr.is_some() {
            b = b.stderr_log(l.stderr.clone());
        }
        if let Some(format) = self.log_format {
            b = b.log_format(format);
        }
        let r = &self.restart;
        if let Some(n) = r.limit {
            b = b.restart_limit(n);
        }
        if let Some(d) = r.window {
            b = b.restart_window(d);
        }
        if let Some(d) = r.backoff_base {
            b = b.backoff_base(d);
        }
        if let Some(d) = r.backoff_max {
            b = b.backoff_max(d);
        }
        if let Some(d) = r.min_uptime {
            b = b.min_uptime(d);
        }
        if let Some(a) = r.on_give_up {
            b = b.on_give_up(a);
        }
        let t = &self.timeouts;
        if let Some(d) = t.ready {
            b = b.ready_timeout(d);
        }
        if let Some(d) = t.drain {
            b = b.drain_timeout(d);
        }
        if let Some(d) = t.heartbeat_interval {
            b = b.heartbeat_interval(d);
        }
        if let Some(d) = t.heartbeat_timeout {
            b = b.heartbeat_timeout(d);
        }
        Ok(b)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("rr-cluster.toml"))
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
listen = ["127.0.0.1:8080", "unix:/tmp/a.sock"]
workers = 4
balance = "least-connections"
[worker]
command = ["node", "app.js"]
env = { NODE_ENV = "production" }
[restart]
limit = 5
window = "30s"
on_give_up = "keep"
[timeouts]
drain = "1m 30s"
heartbeat_timeout = "off"
[recycle]
max_requests = 1000
max_memory = "512MiB"
max_age = "1h"
[logs]
stdout = "/tmp/out.log"
"#,
        )
        .expect("valid");
        assert_eq!(c.workers, Some(4));
        assert_eq!(c.balance, Some(Balance::LeastConnections));
        assert_eq!(c.restart.window, Some(Duration::from_secs(30)));
        assert_eq!(c.restart.on_give_up, Some(GiveUpAction::Keep));
        assert_eq!(c.timeouts.drain, Some(Duration::from_secs(90)));
        assert_eq!(c.timeouts.heartbeat_timeout, Some(None));
        assert_eq!(c.recycle.max_memory, Some(512 * 1024 * 1024));
        assert_eq!(c.recycle.max_requests, Some(1000));
        // `build` creates the log file: one of this test's own, not /tmp/out.log.
        let log = std::env::temp_dir().join(format!("rr-config-full-{}.log", std::process::id()));
        let b = c
            .apply(MasterBuilder::default())
            .expect("apply")
            .stdout_log(Some(log.clone()));
        let built = b.build().map(|_| ());
        let _ = std::fs::remove_file(&log);
        built.expect("valid master");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = parse("workers = 2\nwrokers = 3\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.starts_with("rr-cluster.toml:2:1:"), "{msg}");
        assert!(msg.contains("wrokers"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        let err = parse("[timeouts]\ndrian = \"1s\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("drian"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("[timeouts]\ndrain = \"soon\"\n").expect_err("bad duration");
        let msg = err.to_string();
        assert!(
            msg.contains("soon") && msg.contains("rr-cluster.toml:2"),
            "{msg}"
        );
        let err = parse("balance = \"random\"\n").expect_err("bad enum");
        assert!(err.to_string().contains("random"), "{err}");
        let err = parse("workers = -1\n").expect_err("negative");
        assert!(err.to_string().contains("rr-cluster.toml:1"), "{err}");
        let c = parse("workers = 0\n[worker]\ncommand = [\"x\"]\nlisten=[\"127.0.0.1:0\"]").err();
        assert!(c.is_some(), "listen after a table is a key of [worker]");
        let c = parse("listen = [\"127.0.0.1:0\"]\nworkers = 0\n[worker]\ncommand = [\"x\"]\n")
            .expect("parses");
        let err = c
            .apply(MasterBuilder::default())
            .expect("applies")
            .build()
            .expect_err("0 workers");
        assert_eq!(
            ConfigError::from(err).to_string(),
            "invalid workers: 0 is out of range 1..=1024"
        );
        // Beyond any clock: refused where it is written (the client's `now + timeout`
        // panicked on it).
        let err = parse("[timeouts]\ndrain = \"500000000000y\"\n").expect_err("huge");
        let msg = err.to_string();
        assert!(
            msg.contains("out of range") && msg.contains("rr-cluster.toml:2"),
            "{msg}"
        );
        assert!(parse_duration("18446744073709551615s").is_err());
        assert_eq!(parse_duration("100y").map(|d| d <= MAX_DURATION), Ok(true));
        // Long but parsable: the setting's own bound.
        let c = parse("listen = [\"127.0.0.1:0\"]\n[worker]\ncommand = [\"x\"]\n[timeouts]\ndrain = \"50y\"\n")
            .expect("parses");
        let err = c
            .apply(MasterBuilder::default())
            .expect("applies")
            .build()
            .expect_err("huge");
        let msg = ConfigError::from(err).to_string();
        assert!(msg.starts_with("invalid timeouts.drain: "), "{msg}");
        let c = parse("listen = [\"127.0.0.1:0\"]\n[worker]\ncommand = [\"x\"]\n[logs]\nstdout = \"/nonexistent-dir/x.log\"\n")
            .expect("parses");
        let err = c
            .apply(MasterBuilder::default())
            .expect("applies")
            .build()
            .expect_err("no such directory");
        assert_eq!(
            ConfigError::from(err).to_string(),
            "invalid logs.stdout: /nonexistent-dir: no such directory"
        );
        let build = |text: &str| {
            parse(text)
                .expect("parses")
                .apply(MasterBuilder::default())
                .expect("applies")
                .build()
                .map_err(|e| ConfigError::from(e).to_string())
        };
        let head = "listen = [\"127.0.0.1:0\"]\n[worker]\ncommand = [\"x\"]\n";
        // Review (fifth round): log paths with capture off were ignored, a log file the
        // master cannot open passed, and a zero backoff took every backoff away.
        let err = build(&format!(
            "{head}[logs]\ncapture = false\nstdout = \"/tmp/out.log\"\n"
        ))
        .expect_err("paths without capture");
        assert!(
            err.starts_with(
                "invalid logs.stdout: /tmp/out.log is set, but worker output is not captured"
            ),
            "{err}"
        );
        let err = build(&format!(
            "{head}[logs]\nstderr = \"/proc/self/rr-test.log\"\n"
        ))
        .expect_err("cannot be created");
        assert!(
            err.starts_with(
                "invalid logs.stderr: cannot create /proc/self/rr-test.log: directory /proc/self: "
            ),
            "{err}"
        );
        let err =
            build(&format!("{head}[restart]\nbackoff_base = \"0s\"\n")).expect_err("zero backoff");
        assert_eq!(
            err,
            "invalid restart.backoff_base: 0s is out of range 1ms..=1h"
        );
        let err = Config::from_file(Path::new("/dev/zero")).expect_err("endless");
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
        let c = parse("[worker]\ncommand = []\n").expect("parses");
        let err = c
            .apply(MasterBuilder::default())
            .expect_err("empty command");
        assert!(err.to_string().contains("worker.command"), "{err}");
    }
}

#[cfg(test)]
mod worker_section {
    use super::*;

    /// Review B3: `[worker] env` and `cwd` were refused without `worker.command`, so
    /// they could not go with a command given on the command line.
    #[test]
    fn env_cwd_and_protocol_apply_without_a_command_in_the_file() {
        let c = Config::from_toml(
            "listen = [\"127.0.0.1:0\"]\n[worker]\nenv = { A = \"1\" }\ncwd = \"/srv\"\nprotocol = \"node\"\n",
            Path::new("rr-cluster.toml"),
        )
        .expect("parses");
        let expected = WorkerCommand::new("app")
            .arg("x")
            .env("A", "1")
            .current_dir("/srv")
            .protocol(Protocol::Node);
        let argv = ["app".to_owned(), "x".to_owned()];
        assert_eq!(c.worker.command_for(&argv).expect("argv"), expected);
        let b = MasterBuilder::default().command(WorkerCommand::new("app").arg("x"));
        let settings = c.apply(b).expect("applies").validate().expect("valid");
        assert_eq!(settings.command, expected);
        // No command anywhere: still the one error about it.
        let err = c
            .apply(MasterBuilder::default())
            .expect("applies")
            .build()
            .expect_err("no command");
        assert_eq!(
            ConfigError::from(err).to_string(),
            "invalid worker.command: a worker command is needed"
        );
        // Without a protocol in the file, the command keeps its own.
        let c =
            Config::from_toml("[worker]\ncwd = \"/srv\"\n", Path::new("x.toml")).expect("parses");
        let node = WorkerCommand::new("node").protocol(Protocol::Node);
        assert_eq!(c.worker.apply_to(node.clone()), node.current_dir("/srv"));
    }
}

#[cfg(test)]
mod sizes {
    use super::parse_bytes;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512MiB"), Ok(512 * 1024 * 1024));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5 KiB"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
