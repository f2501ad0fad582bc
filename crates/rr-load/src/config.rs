//! What to run: [`Config`], built and validated by [`ConfigBuilder`].

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A new TCP connection for every request, which sends `Connection: close`.
    Close,
    /// Each connection carries request after request; it is reopened when the server
    /// closes it after a complete response that said `Connection: close`.
    #[value(name = "keepalive", alias = "keep-alive")]
    #[serde(rename = "keepalive")]
    KeepAlive,
}

impl Mode {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Close => "close",
            Mode::KeepAlive => "keepalive",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fault injection while the load runs, over the master's control socket.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FaultConfig {
    /// SIGKILL one `ready` worker (taken from the master's status) at this interval.
    pub kill_worker_every: Option<Duration>,
    /// Ask the master for a rolling reload at this interval.
    pub reload_every: Option<Duration>,
    /// The master's control socket.
    pub control: PathBuf,
    /// A failed request is charged to a fault that happened while it was in flight, or
    /// that was going on or had ended (a kill ends at once, a reload when the master
    /// reports it finished) at most this long before it started.
    pub window: Duration,
}

impl FaultConfig {
    /// Any fault is to be injected.
    pub fn enabled(&self) -> bool {
        self.kill_worker_every.is_some() || self.reload_every.is_some()
    }
}

/// A validated load-test configuration; see [`Config::builder`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The address connected to.
    pub addr: SocketAddr,
    /// The `Host` header sent: the address as given.
    pub host: String,
    /// Concurrent connections (closed loop: requests in flight at most).
    pub connections: usize,
    /// How long the measured run lasts (after the warm-up).
    pub duration: Duration,
    /// Close or keep-alive.
    pub mode: Mode,
    /// Open loop: requests per second in total, sent at fixed intended times. `None`
    /// is a closed loop: each connection sends its next request when the last is done.
    pub rate: Option<f64>,
    /// A request (connect included) that takes longer fails as a timeout.
    pub timeout: Duration,
    /// Load that runs before the measured `duration` and is not counted.
    pub warmup: Duration,
    /// The request target, starting with `/`.
    pub path: String,
    /// Runtime threads: 1 is a current-thread runtime.
    pub threads: usize,
    /// Fault injection.
    pub faults: FaultConfig,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
}

impl Config {
    /// Starts a configuration for the server at `addr` (`HOST:PORT`).
    pub fn builder(addr: impl Into<String>) -> ConfigBuilder {
        ConfigBuilder {
            addr: addr.into(),
            connections: 64,
            duration: Duration::from_secs(10),
            mode: Mode::KeepAlive,
            rate: None,
            timeout: Duration::from_secs(5),
            warmup: Duration::ZERO,
            path: "/".to_owned(),
            threads: 1,
            kill_worker_every: None,
            reload_every: None,
            control: None,
            fault_window: Duration::from_secs(1),
            progress: false,
            allow_remote: false,
        }
    }

    /// The bytes of the request every connection sends.
    pub fn request_bytes(&self) -> Vec<u8> {
        let connection = match self.mode {
            Mode::Close => "Connection: close\r\n",
            Mode::KeepAlive => "",
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rr-load\r\n{connection}\r\n",
            self.path, self.host
        )
        .into_bytes()
    }
}

/// Builds a [`Config`]; [`ConfigBuilder::build`] checks it.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    addr: String,
    connections: usize,
    duration: Duration,
    mode: Mode,
    rate: Option<f64>,
    timeout: Duration,
    warmup: Duration,
    path: String,
    threads: usize,
    kill_worker_every: Option<Duration>,
    reload_every: Option<Duration>,
    control: Option<PathBuf>,
    fault_window: Duration,
    progress: bool,
    allow_remote: bool,
}

impl ConfigBuilder {
    /// Concurrent connections (default 64).
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// The measured run time (default 10 s).
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }

    /// Close or keep-alive (default keep-alive).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Open loop at this many requests per second in total (default: closed loop).
    pub fn rate(mut self, rate: Option<f64>) -> Self {
        self.rate = rate;
        self
    }

    /// The per-request timeout (default 5 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Unmeasured load before the run (default none).
    pub fn warmup(mut self, d: Duration) -> Self {
        self.warmup = d;
        self
    }

    /// The request target (default `/`).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Runtime threads (default 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Kill a ready worker at this interval.
    pub fn kill_worker_every(mut self, d: Option<Duration>) -> Self {
        self.kill_worker_every = d;
        self
    }

    /// Trigger a reload at this interval.
    pub fn reload_every(mut self, d: Option<Duration>) -> Self {
        self.reload_every = d;
        self
    }

    /// The master's control socket (default
    /// [`rr_cluster::control::default_socket_path`]).
    pub fn control(mut self, path: Option<PathBuf>) -> Self {
        self.control = path;
        self
    }

    /// How long after a fault (a reload: after it finished) a failure is still charged
    /// to it (default 1 s).
    pub fn fault_window(mut self, d: Duration) -> Self {
        self.fault_window = d;
        self
    }

    /// Show a progress line on stderr (default off).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Allow an address that is not a loopback address (default: refused, so that a
    /// typo cannot load someone else's server).
    pub fn allow_remote(mut self, allow: bool) -> Self {
        self.allow_remote = allow;
        self
    }

    /// Checks the settings and resolves the address.
    pub fn build(self) -> Result<Config, ConfigError> {
        if self.connections == 0 {
            return Err(ConfigError::Zero {
                what: "connections",
            });
        }
        if self.connections > MAX_CONNECTIONS {
            return Err(ConfigError::TooManyConnections {
                connections: self.connections,
                max: MAX_CONNECTIONS,
            });
        }
        if self.duration.is_zero() {
            return Err(ConfigError::Zero { what: "duration" });
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Zero { what: "timeout" });
        }
        if self.threads == 0 {
            return Err(ConfigError::Zero { what: "threads" });
        }
        if self.threads > MAX_THREADS {
            return Err(ConfigError::TooManyThreads {
                threads: self.threads,
                max: MAX_THREADS,
            });
        }
        if self.kill_worker_every.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero {
                what: "kill-worker-every",
            });
        }
        if self.reload_every.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero {
                what: "reload-every",
            });
        }
        for (what, d) in [
            ("duration", Some(self.duration)),
            ("warmup", Some(self.warmup)),
            ("timeout", Some(self.timeout)),
            ("fault-window", Some(self.fault_window)),
            ("kill-worker-every", self.kill_worker_every),
            ("reload-every", self.reload_every),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::TooLong {
                    what,
                    max: MAX_DURATION,
                });
            }
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate)) {
                return Err(ConfigError::BadRate { rate });
            }
        }
        if !self.path.starts_with('/')
            || self
                .path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ConfigError::BadPath { path: self.path });
        }
        let addr = resolve(&self.addr)?;
        if !self.allow_remote && !addr.ip().is_loopback() {
            return Err(ConfigError::NotLoopback {
                addr: self.addr,
                resolved: addr,
            });
        }
        Ok(Config {
            addr,
            host: self.addr,
            connections: self.connections,
            duration: self.duration,
            mode: self.mode,
            rate: self.rate,
            timeout: self.timeout,
            warmup: self.warmup,
            path: self.path,
            threads: self.threads,
            faults: FaultConfig {
                kill_worker_every: self.kill_worker_every,
                reload_every: self.reload_every,
                control: self
                    .control
                    .unwrap_or_else(rr_cluster::control::default_socket_path),
                window: self.fault_window,
            },
            progress: self.progress,
        })
    }
}

/// The longest duration accepted for any setting (30 days).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The lowest open-loop rate, in requests per second.
pub const MIN_RATE: f64 = 0.001;
/// The highest open-loop rate, in requests per second.
pub const MAX_RATE: f64 = 1e8;
/// The most connections one run may open.
pub const MAX_CONNECTIONS: usize = 100_000;
/// The most runtime threads.
pub const MAX_THREADS: usize = 256;

fn resolve(addr: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |reason: String| ConfigError::BadAddr {
        addr: addr.to_owned(),
        reason,
    };
    let mut addrs = addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    let all: Vec<SocketAddr> = addrs.by_ref().collect();
    // Prefer IPv4, as `localhost` may list ::1 first where the server only binds 0.0.0.0.
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| bad("no address found".to_owned()))
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A count or duration that must be positive is zero.
    #[error("{what} must be greater than zero")]
    Zero {
        /// Which setting.
        what: &'static str,
    },
    /// More connections than the harness opens.
    #[error("{connections} connections is more than the maximum of {max}")]
    TooManyConnections {
        /// Asked for.
        connections: usize,
        /// The limit.
        max: usize,
    },
    /// More threads than allowed.
    #[error("{threads} threads is more than the maximum of {max}")]
    TooManyThreads {
        /// Asked for.
        threads: usize,
        /// The limit.
        max: usize,
    },
    /// A duration is longer than [`MAX_DURATION`].
    #[error("{what} must be at most {max:?}")]
    TooLong {
        /// Which setting.
        what: &'static str,
        /// The limit.
        max: Duration,
    },
    /// The rate is not a positive number in range.
    #[error("rate must be a positive number of requests per second (0.001 to 1e8), not {rate}")]
    BadRate {
        /// The value given.
        rate: f64,
    },
    /// The request path is not `/...` or holds whitespace.
    #[error("path must start with '/' and contain no whitespace: {path:?}")]
    BadPath {
        /// The value given.
        path: String,
    },
    /// The address does not resolve.
    #[error("cannot resolve address {addr:?} (expected HOST:PORT): {reason}")]
    BadAddr {
        /// The value given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The address is not a loopback address and remote targets were not allowed.
    #[error("{addr} ({resolved}) is not a loopback address; pass --allow-remote to load it")]
    NotLoopback {
        /// The value given.
        addr: String,
        /// What it resolved to.
        resolved: SocketAddr,
    },
}

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: expected a number with a unit: us, ms, s, m or h (e.g. 500ms, 1.5s)"
)]
pub struct DurationError {
    /// The text given.
    pub input: String,
}

/// Parses `500ms`, `2s`, `1.5s`, `100us`, `3m`, `1h`, or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.to_owned(),
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(err());
    }
    let value: f64 = number.parse().map_err(|_| err())?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).expect(s);
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("2"), Duration::from_secs(2));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("100us"), Duration::from_micros(100));
        assert_eq!(ok("3m"), Duration::from_secs(180));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok(" 10 s "), Duration::from_secs(10));
        assert_eq!(ok("0s"), Duration::ZERO);
        for bad in [
            "",
            "s",
            "-1s",
            "1x",
            "1.s",
            ".5s",
            "1..2s",
            "1e3s",
            "ms5",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn builder_validates() {
        let b = || Config::builder("127.0.0.1:8080");
        assert!(b().build().is_ok());
        assert_eq!(
            b().connections(0).build(),
            Err(ConfigError::Zero {
                what: "connections"
            })
        );
        assert_eq!(
            b().duration(Duration::ZERO).build(),
            Err(ConfigError::Zero { what: "duration" })
        );
        assert_eq!(
            b().threads(0).build(),
            Err(ConfigError::Zero { what: "threads" })
        );
        assert!(matches!(
            b().rate(Some(0.0)).build(),
            Err(ConfigError::BadRate { .. })
        ));
        assert!(matches!(
            b().rate(Some(f64::NAN)).build(),
            Err(ConfigError::BadRate { .. })
        ));
        assert!(matches!(
            b().rate(Some(1e-9)).build(),
            Err(ConfigError::BadRate { .. })
        ));
        assert!(b().rate(Some(0.5)).build().is_ok());
        assert!(matches!(
            b().duration(Duration::from_secs(u64::MAX)).build(),
            Err(ConfigError::TooLong {
                what: "duration",
                ..
            })
        ));
        assert!(matches!(
            b().reload_every(Some(Duration::from_secs(1 << 40))).build(),
            Err(ConfigError::TooLong { .. })
        ));
        assert!(matches!(
            b().path("x").build(),
            Err(ConfigError::BadPath { .. })
        ));
        assert!(matches!(
            b().path("/a b").build(),
            Err(ConfigError::BadPath { .. })
        ));
        assert!(matches!(
            b().kill_worker_every(Some(Duration::ZERO)).build(),
            Err(ConfigError::Zero { .. })
        ));
        assert!(matches!(
            Config::builder("nonsense").build(),
            Err(ConfigError::BadAddr { .. })
        ));
        assert!(matches!(
            Config::builder("192.0.2.1:80").build(),
            Err(ConfigError::NotLoopback { .. })
        ));
        assert!(
            Config::builder("192.0.2.1:80")
                .allow_remote(true)
                .build()
                .is_ok()
        );
        assert!(Config::builder("[::1]:80").build().is_ok());
    }

    #[test]
    fn request_bytes_per_mode() {
        let c = Config::builder("localhost:8080")
            .mode(Mode::Close)
            .path("/x?y=1")
            .build()
            .expect("config");
        assert_eq!(c.addr.ip().to_string(), "127.0.0.1");
        assert_eq!(
            c.request_bytes(),
            b"GET /x?y=1 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: rr-load\r\nConnection: close\r\n\r\n"
        );
        let c = Config::builder("127.0.0.1:1").build().expect("config");
        assert!(!String::from_utf8_lossy(&c.request_bytes()).contains("Connection"));
    }
}
