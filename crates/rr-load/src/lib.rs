//! rr-load: the load-test harness of rr-cluster.
//!
//! It drives an HTTP/1.1 server with GET requests from many connections, closed loop
//! (each connection sends its next request when the last is answered) or open loop (at
//! a fixed total rate; a request sent late because its connection was busy has its
//! latency measured from its intended send time), in
//! close mode (a connection per request) or keep-alive mode. It reports throughput,
//! errors by kind, latency percentiles from an HDR histogram, and the share of each
//! worker (from the `x-worker-id`/`x-worker-pid` headers rr-cluster's demo worker
//! sends). While loading it can SIGKILL workers or trigger reloads through the
//! master's control socket, and tell how many requests each fault cost.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = rr_load::Config::builder("127.0.0.1:8080")
//!     .connections(64)
//!     .mode(rr_load::Mode::Close)
//!     .duration(std::time::Duration::from_secs(10))
//!     .build()?;
//! let report = rr_load::run_blocking(config)?;
//! print!("{}", report.to_table());
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`Config`], its builder and validation; duration parsing.
//! - [`cli`]: the `rr-load` command line, turned into a [`Config`].
//! - [`http`]: HTTP/1.1 responses: the head through `httparse`, body framing by hand (no
//!   I/O, never panics).
//! - `conn`: one client connection: connect, write, read, classify the failure.
//! - [`outcome`]: [`ErrorKind`], how a request fails.
//! - `recorder`: per-connection counters and histograms, merged at the end.
//! - [`fault`]: killing workers and reloading over the control socket; charging
//!   failures to faults.
//! - `progress`: the live progress line.
//! - `run`: [`run`] and [`run_blocking`], the tasks that make up a run.
//! - [`report`]: [`Report`], its JSON schema and its table.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cli;
pub mod config;
mod conn;
pub mod fault;
pub mod http;
pub mod outcome;
mod progress;
mod recorder;
pub mod report;
mod run;

pub use config::{Config, ConfigBuilder, ConfigError, Mode};
pub use outcome::ErrorKind;
pub use report::Report;
pub use run::{RunError, run, run_blocking};
