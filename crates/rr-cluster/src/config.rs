//! The configuration file (`rr-cluster.toml`) and its validation.
//!
//! ```toml
//! listen = ["127.0.0.1:8080"]
//! workers = 4
//! balance = "round-robin"          # or "least-connections"
//! control = "/run/rr-cluster.sock"
//!
//! [worker]
//! command = ["node", "app.js"]
//! env = { NODE_ENV = "production" }
//! cwd = "/srv/app"
//!
//! [restart]
//! limit = 10                       # more than `limit` restarts within `window`: give up
//! window = "60s"
//! backoff_base = "100ms"
//! backoff_max = "10s"
//! min_uptime = "1s"
//! on_give_up = "exit"              # or "keep"
//!
//! [timeouts]
//! ready = "30s"
//! drain = "30s"
//! heartbeat_interval = "1s"
//! heartbeat_timeout = "10s"        # or "off"
//! ```
//!
//! Unknown keys are errors, and every error names the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::master::{Balance, GiveUpAction, MasterBuilder, WorkerCommand};

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
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[worker]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerSection {
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
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
    /// First backoff delay.
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
    /// Uptime that resets the backoff.
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

/// Parses a duration the way the configuration file and the flags do (`500ms`,
/// `30s`, `2m`, `1m 30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"500ms\", \"30s\", \"2m\""))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
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

impl Config {
    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
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
            let (program, args) = argv.split_first().ok_or(ConfigError::Invalid {
                field: "worker.command",
                reason: "is empty; give the program and its arguments".into(),
            })?;
            let mut command = WorkerCommand::new(program).args(args);
            for (k, v) in &self.worker.env {
                command = command.env(k, v);
            }
            if let Some(dir) = &self.worker.cwd {
                command = command.current_dir(dir);
            }
            b = b.command(command);
        } else if !self.worker.env.is_empty() || self.worker.cwd.is_some() {
            return Err(ConfigError::Invalid {
                field: "worker.command",
                reason: "worker.env and worker.cwd need worker.command".into(),
            });
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
"#,
        )
        .expect("valid");
        assert_eq!(c.workers, Some(4));
        assert_eq!(c.balance, Some(Balance::LeastConnections));
        assert_eq!(c.restart.window, Some(Duration::from_secs(30)));
        assert_eq!(c.restart.on_give_up, Some(GiveUpAction::Keep));
        assert_eq!(c.timeouts.drain, Some(Duration::from_secs(90)));
        assert_eq!(c.timeouts.heartbeat_timeout, Some(None));
        let b = c.apply(MasterBuilder::default()).expect("apply");
        b.build().expect("valid master");
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
            err.to_string(),
            "invalid workers: 0 is out of range 1..=1024"
        );
        let c = parse("[worker]\ncommand = []\n").expect("parses");
        let err = c
            .apply(MasterBuilder::default())
            .expect_err("empty command");
        assert!(err.to_string().contains("worker.command"), "{err}");
    }
}
