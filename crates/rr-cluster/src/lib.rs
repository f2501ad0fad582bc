//! rr-cluster: Node's `cluster` module done in Rust, on tokio.
//!
//! One master process owns the listening sockets, accepts every connection itself and
//! hands each accepted socket to one of N worker processes, round-robin, over a Unix
//! domain socket (`SCM_RIGHTS`). A supervisor restarts workers that die, replaces a
//! worker that announces it is going down, gives up on crash loops, and rolls the pool
//! over to new code without refusing a connection.
//!
//! # Layout
//!
//! - [`protocol`]: the messages, the frame layout and their encoding (no I/O).
//! - [`channel`]: a framed Unix stream that carries descriptors.
//! - [`node`]: the Node.js dialect of the channel (JSON lines on Node's IPC channel).
//! - `sys`: the crate's system calls (through rustix) and its only `unsafe` code: seven
//!   blocks, for five things with no safe wrapper (see the module's documentation).
//! - [`master`]: [`Master`], its builder and handle; listeners, dispatch, the
//!   supervisor state machine, the control socket, signals.
//! - [`worker`]: [`Worker`], the worker side of the channel.
//! - `http` (feature `http`, on by default): a drain-correct HTTP server for workers
//!   (hyper-util; an axum listener with the `axum` feature).
//! - [`config`]: the TOML configuration file and its validation.
//! - [`event`]: [`Event`], the lifecycle events a master publishes.
//! - [`control`]: the control-socket protocol (JSON lines) and its client.
#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod channel;
pub mod config;
pub mod control;
pub mod event;
#[cfg(feature = "http")]
pub mod http;
pub mod master;
pub mod node;
pub mod protocol;
mod sys;
mod wake;
pub mod worker;

pub use channel::ChannelError;
pub use config::{Config, ConfigError};
pub use event::{Event, ExitInfo};
pub use master::{
    Balance, BuildError, GiveUpAction, ListenSpec, LocalAddr, LogFormat, Master, MasterBuilder,
    MasterError, MasterHandle, MasterSignal, Messages, Outcome, Refusal, ScaleTo, StopMode,
    WorkerCommand, WorkerMessage,
};
pub use protocol::Protocol;
pub use worker::{Connection, Incoming, Worker, WorkerBuilder, WorkerError};
