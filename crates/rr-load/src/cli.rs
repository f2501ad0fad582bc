//! The command line of `rr-load`, turned into a [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Config, ConfigError, Mode, parse_duration};

/// `rr-load`'s arguments.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "rr-load",
    version,
    about = "HTTP/1.1 load generator for rr-cluster: throughput, latency percentiles, \
             per-worker share, and fault injection (kill workers, reload) while loading"
)]
#[non_exhaustive]
pub struct Args {
    /// The server to load.
    #[arg(long, short = 'a', value_name = "HOST:PORT")]
    pub addr: String,
    /// Concurrent connections.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 64)]
    pub connections: usize,
    /// How long to measure (e.g. 10s, 500ms, 1m).
    #[arg(long, short = 'd', value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// close: a new connection per request (with `Connection: close`); keepalive: reuse.
    #[arg(long, short = 'm', value_enum, default_value_t = Mode::KeepAlive)]
    pub mode: Mode,
    /// Open loop: this many requests per second in total, latency measured from each
    /// request's intended send time when its connection was busy then. Default: closed
    /// loop.
    #[arg(
        long,
        short = 'r',
        value_name = "REQ_PER_S",
        allow_negative_numbers = true
    )]
    pub rate: Option<f64>,
    /// Also write the report as JSON to FILE (`-` for stdout; the table then goes to
    /// stderr).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// A request (connect included) slower than this fails as a timeout. Requests in
    /// flight when the run ends are waited for up to this long (in an open loop, sends
    /// due before the end may still leave up to this long after it).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Load for this long before measuring.
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// SIGKILL a ready worker (from the master's status) at this interval.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub kill_worker_every: Option<Duration>,
    /// Ask the master for a rolling reload at this interval.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub reload_every: Option<Duration>,
    /// The master's control socket [default: $XDG_RUNTIME_DIR/rr-cluster.sock or
    /// /tmp/rr-cluster-UID/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// A failed request that started this long after a fault (a reload: after it
    /// finished) is still charged to it.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    pub fault_window: Duration,
    /// The request target.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub path: String,
    /// Runtime threads (the server under test usually shares the machine).
    #[arg(long, short = 't', value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// No live progress line (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
}

impl Args {
    /// The configuration these arguments describe; `stderr_is_terminal` decides the
    /// progress line.
    pub fn to_config(&self, stderr_is_terminal: bool) -> Result<Config, ConfigError> {
        Config::builder(self.addr.clone())
            .connections(self.connections)
            .duration(self.duration)
            .mode(self.mode)
            .rate(self.rate)
            .timeout(self.timeout)
            .warmup(self.warmup)
            .kill_worker_every(self.kill_worker_every)
            .reload_every(self.reload_every)
            .control(self.control.clone())
            .fault_window(self.fault_window)
            .path(self.path.clone())
            .threads(self.threads)
            .progress(stderr_is_terminal && !self.no_progress)
            .allow_remote(self.allow_remote)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("rr-load").chain(args.iter().copied()))
    }

    #[test]
    fn full_command_line() {
        let args = parse(&[
            "--addr",
            "127.0.0.1:8080",
            "--connections",
            "8",
            "--duration",
            "2s",
            "--mode",
            "close",
            "--rate",
            "1000",
            "--json",
            "-",
            "--timeout",
            "250ms",
            "--warmup",
            "1s",
            "--kill-worker-every",
            "500ms",
            "--reload-every",
            "3s",
            "--control",
            "/tmp/x.sock",
            "--path",
            "/hello",
            "--threads",
            "2",
        ])
        .expect("valid");
        let c = args.to_config(true).expect("config");
        assert_eq!(c.connections, 8);
        assert_eq!(c.duration, Duration::from_secs(2));
        assert_eq!(c.mode, Mode::Close);
        assert_eq!(c.rate, Some(1000.0));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.warmup, Duration::from_secs(1));
        assert_eq!(c.faults.kill_worker_every, Some(Duration::from_millis(500)));
        assert_eq!(c.faults.reload_every, Some(Duration::from_secs(3)));
        assert_eq!(c.faults.control, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.path, "/hello");
        assert_eq!(c.threads, 2);
        assert!(c.progress);
        assert_eq!(args.json, Some(PathBuf::from("-")));
    }

    #[test]
    fn defaults() {
        let c = parse(&["--addr", "127.0.0.1:1"])
            .expect("valid")
            .to_config(false)
            .expect("config");
        assert_eq!(c.connections, 64);
        assert_eq!(c.mode, Mode::KeepAlive);
        assert_eq!(c.rate, None);
        assert_eq!(c.threads, 1);
        assert!(!c.progress);
        assert!(!c.faults.enabled());
        assert!(parse(&["--addr", "127.0.0.1:1", "--mode", "keep-alive"]).is_ok());
    }

    #[test]
    fn bad_input_is_rejected() {
        use clap::error::ErrorKind as K;
        let kind = |a: &[&str]| parse(a).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(kind(&[]), Err(K::MissingRequiredArgument));
        assert_eq!(
            kind(&["--addr", "x:1", "--duration", "soon"]),
            Err(K::ValueValidation)
        );
        assert_eq!(
            kind(&["--addr", "x:1", "--mode", "sometimes"]),
            Err(K::InvalidValue)
        );
        assert_eq!(
            kind(&["--addr", "x:1", "--connections", "-1"]),
            Err(K::UnknownArgument)
        );
        assert_eq!(
            kind(&["--addr", "x:1", "--connections", "many"]),
            Err(K::ValueValidation)
        );
        let zero = parse(&["--addr", "127.0.0.1:1", "--connections", "0"]).expect("parses");
        assert_eq!(
            zero.to_config(false),
            Err(ConfigError::Zero {
                what: "connections"
            })
        );
    }
}
