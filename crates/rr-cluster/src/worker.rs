//! The worker side: a process started by a master picks up its channel from the
//! environment, shakes hands, says `Ready`, and receives accepted connections.
//!
//! ```no_run
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn demo() -> Result<(), rr_cluster::WorkerError> {
//! let worker = rr_cluster::Worker::from_env().await?;
//! worker.install_panic_hook();
//! let mut incoming = worker.ready().await?;
//! while let Some(mut conn) = incoming.accept().await {
//!     tokio::spawn(async move {
//!         let mut buf = [0u8; 1024];
//!         while let Ok(n) = conn.read(&mut buf).await {
//!             if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
//!                 break;
//!             }
//!         }
//!     });
//! }
//! // The master asked us to drain (or went away): finish what is open, then return.
//! worker.drained().await;
//! # Ok(())
//! # }
//! ```
//!
//! An HTTP worker needs none of this: [`crate::http::serve`] does the loop, the drain
//! and keep-alive rules included.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, ChannelError, ChannelReader, ChannelWriter};
use crate::protocol::{
    self, ACK_EVERY, ENV_PROTOCOL, Hello, ListenerInfo, ListenerKind, PROTOCOL_VERSION,
    ProtocolError, ToMaster, ToWorker,
};
use crate::sys;
use crate::wake::WakeFlag;

/// Environment variable naming the channel descriptor.
pub const ENV_CHANNEL_FD: &str = "RR_CLUSTER_CHANNEL_FD";
/// Environment variable holding the inode of the channel socket, so that a process
/// that merely inherited the environment (a worker's own child) is not taken for a
/// worker.
pub const ENV_CHANNEL_INODE: &str = "RR_CLUSTER_CHANNEL_INODE";
/// Environment variable holding the worker's slot.
pub const ENV_WORKER_ID: &str = "RR_CLUSTER_WORKER_ID";
/// Environment variable holding the pool generation.
pub const ENV_GENERATION: &str = "RR_CLUSTER_GENERATION";

/// Descriptors a worker keeps for itself (files, logs, outgoing connections) when it
/// derives its connection capacity from `RLIMIT_NOFILE`.
const FD_RESERVE: u64 = 64;

/// The longest incoming and message queues ([`WorkerBuilder::incoming_queue`],
/// [`WorkerBuilder::message_queue`]): tokio's channels panic beyond `usize::MAX >> 3`.
const MAX_QUEUE: usize = 1 << 20;

/// The channel is adopted once per process.
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// Errors of the worker side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The process was not started by a master (`RR_CLUSTER_CHANNEL_FD` is unset).
    #[error("not started by an rr-cluster master ({ENV_CHANNEL_FD} is not set)")]
    NotAWorker,
    /// An environment variable holds something unusable.
    #[error("{var}={value:?}: {reason}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The channel was already adopted by this process ([`Worker::from_env`] called
    /// twice): clone the first [`Worker`] instead.
    #[error("the channel was already adopted by this process; clone the first Worker")]
    AlreadyAdopted,
    /// The channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The handshake broke the protocol.
    #[error("handshake: {0}")]
    Handshake(#[from] ProtocolError),
    /// No `Hello` arrived in time.
    #[error("no handshake from the master within {0:?}")]
    HandshakeTimeout(Duration),
    /// The master closed the channel.
    #[error("the master is gone")]
    MasterGone,
    /// [`Worker::ready`] was called twice.
    #[error("ready() was already called")]
    AlreadyReady,
}

/// How a worker is set up: queue sizes, timeouts and its connection capacity. Start
/// from [`Worker::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), rr_cluster::WorkerError> {
/// let worker = rr_cluster::Worker::builder()
///     .max_connections(10_000)
///     .incoming_queue(1024)
///     .from_env()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    incoming_queue: usize,
    message_queue: usize,
    handshake_timeout: Duration,
    orphan_drain: Duration,
    max_connections: Option<u32>,
    max_version: u32,
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        WorkerBuilder {
            incoming_queue: 256,
            message_queue: 1024,
            handshake_timeout: Duration::from_secs(10),
            orphan_drain: Duration::from_secs(10),
            max_connections: None,
            max_version: PROTOCOL_VERSION,
        }
    }
}

impl WorkerBuilder {
    /// Connections received but not yet taken by [`Incoming::accept`], at most
    /// (default 256; 1 to 1,048,576, a value beyond is taken as the nearest). With
    /// protocol version 2 the capacity the worker announces never exceeds the free
    /// places (the master sends the rest elsewhere, and the reader never waits for
    /// room, so `Ping`s are answered however slow the application); once the queue was
    /// full, the window reopens when a quarter of it is free, but never later than
    /// when 64 places are (`ACK_EVERY`), and at the first free place in a queue of
    /// fewer than 8. A small queue makes `Ack`s more frequent (one per quarter of the
    /// window). With version 1 the worker stops reading its channel while the queue is
    /// full. [`crate::http::serve`] has no queue: it spawns each connection's task as
    /// the connection arrives.
    pub fn incoming_queue(mut self, n: usize) -> Self {
        self.incoming_queue = n.clamp(1, MAX_QUEUE);
        self
    }

    /// Application messages from the master not yet taken from
    /// [`Worker::messages`], at most (default 1024; 1 to 1,048,576, a value beyond is
    /// taken as the nearest). Beyond this new messages are dropped and counted
    /// ([`Worker::dropped_messages`]): messages never hold up connections.
    pub fn message_queue(mut self, n: usize) -> Self {
        self.message_queue = n.clamp(1, MAX_QUEUE);
        self
    }

    /// How long to wait for the master's `Hello` (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// When the channel ends without a `Drain` (the master is gone, or the worker
    /// ended the channel itself: see [`Worker::master_gone`]), how long
    /// [`Worker::drained`] waits for open connections before it completes anyway
    /// (default 10 s).
    pub fn orphan_drain(mut self, timeout: Duration) -> Self {
        self.orphan_drain = timeout;
        self
    }

    /// The most connections this worker holds at once (default: the descriptor limit
    /// `RLIMIT_NOFILE` less 64 for the worker's own files). With shared balancing the
    /// worker stops accepting while it holds that many. With protocol version 2 the
    /// worker announces its room in its `Ack`s and the master never sends more; once
    /// it is full, the first connection to close tells the master that it has room
    /// again (an `Ack`), without waiting for the next heartbeat. Version 1 has no way
    /// to say so: the master sends regardless, and the worker takes what comes.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// The highest protocol version to speak (default [`PROTOCOL_VERSION`]); the
    /// session speaks the lower of this and the master's offer.
    pub fn max_protocol_version(mut self, version: u32) -> Self {
        self.max_version = version.clamp(protocol::MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
        self
    }

    /// Picks up the channel named by `RR_CLUSTER_CHANNEL_FD` and waits for the master's
    /// `Hello`. Must be called within a tokio runtime with both the time and the I/O
    /// drivers enabled (`#[tokio::main]`, or `Builder::enable_all`: the channel is a
    /// socket, and the handshake, heartbeats and drain deadlines are timers), once per
    /// process.
    pub async fn from_env(self) -> Result<Worker, WorkerError> {
        let fd = adopt_channel()?;
        self.from_fd(fd).await
    }

    /// Like [`WorkerBuilder::from_env`] with an explicit channel descriptor (the
    /// version offer is still read from `RR_CLUSTER_PROTOCOL`).
    pub async fn from_fd(self, fd: OwnedFd) -> Result<Worker, WorkerError> {
        self.start(fd, std::env::var(ENV_PROTOCOL).ok()).await
    }

    /// [`WorkerBuilder::from_fd`] with the master's version offer given.
    async fn start(self, fd: OwnedFd, offered: Option<String>) -> Result<Worker, WorkerError> {
        let version =
            protocol::negotiate(offered.as_deref(), self.max_version).map_err(|reason| {
                WorkerError::BadEnv {
                    var: ENV_PROTOCOL,
                    value: offered.clone().unwrap_or_default(),
                    reason,
                }
            })?;
        let stream = channel::from_std(std::os::unix::net::UnixStream::from(fd))
            .map_err(ChannelError::Io)?;
        let (mut reader, writer) = channel::split(stream);
        let hello = tokio::time::timeout(self.handshake_timeout, reader.recv_hello())
            .await
            .map_err(|_| WorkerError::HandshakeTimeout(self.handshake_timeout))?
            .map_err(|e| match e {
                ChannelError::Protocol(p) => WorkerError::Handshake(p),
                other => WorkerError::Channel(other),
            })?
            .ok_or(WorkerError::MasterGone)?;

        let max_connections = self.max_connections.unwrap_or_else(|| {
            let limit = sys::nofile_limit().unwrap_or(1024);
            u32::try_from(limit.saturating_sub(FD_RESERVE).max(16)).unwrap_or(u32::MAX)
        });
        let (incoming_tx, incoming_rx) = mpsc::channel(self.incoming_queue);
        let incoming_tx = Sink::Queue(incoming_tx);
        let (messages_tx, messages_rx) = mpsc::channel(self.message_queue);
        let listeners: Arc<[ListenerInfo]> = hello.listeners.clone().into();
        let inner = Arc::new(Inner {
            hello,
            listeners,
            version,
            writer,
            counters: Arc::new(Counters::default()),
            max_connections,
            draining: CancellationToken::new(),
            master_gone: AtomicBool::new(false),
            finish_by: watch::Sender::new(None),
            orphan_drain: self.orphan_drain,
            incoming: Mutex::new(Some(incoming_rx)),
            messages: Mutex::new(Some(messages_rx)),
            incoming_tx: Mutex::new(Some(incoming_tx)),
            incoming_done: CancellationToken::new(),
            sealed: CancellationToken::new(),
            abandoned: CancellationToken::new(),
            end_announced: AtomicBool::new(false),
            dropped_messages: AtomicU64::new(0),
            ack_lock: tokio::sync::Mutex::new(()),
        });
        let reading = tokio::spawn(read_loop(Arc::downgrade(&inner), reader, messages_tx));
        // A reader that panics (in the handler of `ready_with`, say) reads nothing more:
        // the worker must not look healthy, with heartbeats going on, and its channel
        // full of connections and a `Drain` nobody reads.
        let watched = Arc::downgrade(&inner);
        tokio::spawn(async move {
            if let Err(e) = reading.await {
                if e.is_panic() {
                    if let Some(inner) = watched.upgrade() {
                        tracing::error!("the channel's reader panicked: this worker ends");
                        inner.unannounced_end();
                    }
                }
            }
        });
        Ok(Worker { inner })
    }
}

/// Takes ownership of the channel named by `RR_CLUSTER_CHANNEL_FD` (checked against
/// `RR_CLUSTER_CHANNEL_INODE`, made close-on-exec), without the handshake: for workers
/// that speak the protocol themselves through [`crate::channel`]. Once per process;
/// [`Worker::from_env`] calls it.
pub fn adopt_channel() -> Result<OwnedFd, WorkerError> {
    let value = std::env::var(ENV_CHANNEL_FD).map_err(|_| WorkerError::NotAWorker)?;
    let raw: RawFd = value.parse().map_err(|_| WorkerError::BadEnv {
        var: ENV_CHANNEL_FD,
        value: value.clone(),
        reason: "not a descriptor number".into(),
    })?;
    if let Some(expected) = env_inode() {
        if sys::socket_inode_of(raw) != Some(expected) {
            return Err(WorkerError::BadEnv {
                var: ENV_CHANNEL_FD,
                value,
                reason: "not the channel the master created (inherited environment?)".into(),
            });
        }
    }
    if ADOPTED.swap(true, Ordering::SeqCst) {
        return Err(WorkerError::AlreadyAdopted);
    }
    sys::adopt_inherited_socket(raw).map_err(|e| {
        ADOPTED.store(false, Ordering::SeqCst);
        WorkerError::BadEnv {
            var: ENV_CHANNEL_FD,
            value,
            reason: e.to_string(),
        }
    })
}

fn env_inode() -> Option<u64> {
    std::env::var(ENV_CHANNEL_INODE).ok()?.parse().ok()
}

/// The worker's end of the channel to its master. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hello: Hello,
    listeners: Arc<[ListenerInfo]>,
    /// The negotiated protocol version.
    version: u32,
    writer: Arc<ChannelWriter>,
    counters: Arc<Counters>,
    max_connections: u32,
    /// Cancelled when the worker must stop taking connections.
    draining: CancellationToken,
    master_gone: AtomicBool,
    /// When [`Worker::drained`] completes at the latest (the master's deadline, or the
    /// orphan drain once the master is gone).
    finish_by: watch::Sender<Option<Instant>>,
    orphan_drain: Duration,
    /// Receiving ends handed out once each.
    incoming: Mutex<Option<mpsc::Receiver<Connection>>>,
    messages: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    /// Where connections go; dropped (on `Drain` or when the master is gone) to end
    /// `Incoming` once the queued connections are taken.
    incoming_tx: Mutex<Option<Sink>>,
    /// Cancelled once `Incoming` has handed out its last connection (or the handler of
    /// [`Worker::ready_with`] has had it).
    incoming_done: CancellationToken,
    /// Cancelled once no more connections can come: the master's `Drain`, the end of
    /// the channel, or an end the master was not told of (`begin_drain`).
    sealed: CancellationToken,
    /// Cancelled when the application stopped taking connections (dropped `Incoming`,
    /// or the handler of [`Worker::ready_with`]) before the drain: the worker announces
    /// its end, and its window stays shut.
    abandoned: CancellationToken,
    /// A `Suicide` was sent (or is on its way): one is enough.
    end_announced: AtomicBool,
    dropped_messages: AtomicU64,
    /// Held while an `Ack` is made and sent.
    ack_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Counters {
    active: AtomicU32,
    /// Descriptors taken off the channel (including `lost`): `Heartbeat.served` and
    /// `Ack.received`.
    received: AtomicU64,
    lost: AtomicU64,
    /// `received` at the last `Ack`.
    acked: AtomicU64,
    /// Received descriptors after which the next `Ack` is due (`protocol::ack_after`
    /// of the last `Ack`'s capacity).
    ack_after: AtomicU64,
    /// The last `Ack` announced a capacity of 0 (or one is being made): the master
    /// sends nothing more until another `Ack`, which the next connection to close asks
    /// for (`reopen`).
    window_shut: AtomicBool,
    /// A connection closed while the window was shut: an `Ack` is due now.
    reopen: Notify,
    /// Connections the application took from `Incoming` (written by `Incoming` alone,
    /// so a load and a store; read by the heartbeat task's stuck-queue check).
    taken: AtomicU64,
    /// Accept tasks (shared balancing) waiting for the worker to have room, and their
    /// wake-up when a connection closes.
    room_waiters: AtomicU32,
    room: Notify,
    idle: Notify,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            active: AtomicU32::new(0),
            received: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            ack_after: AtomicU64::new(ACK_EVERY),
            window_shut: AtomicBool::new(false),
            reopen: Notify::new(),
            taken: AtomicU64::new(0),
            room_waiters: AtomicU32::new(0),
            room: Notify::new(),
            idle: Notify::new(),
        }
    }
}

impl Counters {
    /// Completes once no connection is open.
    async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Where the connections from the master go.
#[derive(Clone)]
enum Sink {
    /// To [`Incoming`], where the application takes them.
    Queue(mpsc::Sender<Connection>),
    /// Straight to a handler ([`Worker::ready_with`]).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Direct(Arc<DirectSink>),
}

impl Sink {
    /// Hands `conn` on; `false` when nobody takes connections any more (the
    /// application dropped [`Incoming`]), and `conn` is closed.
    async fn deliver(&self, conn: Connection) -> bool {
        match self {
            Sink::Queue(tx) => tx.send(conn).await.is_ok(),
            Sink::Direct(direct) => {
                (direct.handler)(conn);
                // The queue's send counted against the task's budget; so does this,
                // so that a flood of connections lets the spawned ones (and the
                // drain) run.
                tokio::task::coop::consume_budget().await;
                true
            }
        }
    }

    /// Connections waiting in the queue for the application (none for a handler).
    fn queued(&self) -> usize {
        match self {
            Sink::Queue(tx) => tx.max_capacity() - tx.capacity(),
            Sink::Direct(_) => 0,
        }
    }

    /// How many more connections it takes without waiting: the free places in the
    /// queue; a handler takes any number.
    fn room(&self) -> u32 {
        match self {
            Sink::Queue(tx) => u32::try_from(tx.capacity()).unwrap_or(u32::MAX),
            Sink::Direct(_) => u32::MAX,
        }
    }
}

struct DirectSink {
    handler: Box<dyn Fn(Connection) + Send + Sync>,
    /// Cancelled once the last holder lets go: the handler has had every connection.
    done: CancellationToken,
}

/// Takes the handler of [`Worker::ready_with`] out when dropped (if it is still in).
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) struct DirectGuard {
    inner: Arc<Inner>,
    sink: std::sync::Weak<DirectSink>,
}

impl DirectGuard {
    /// Takes the handler out of the worker if it is still there; `mark` first says the
    /// application no longer takes connections (an `Ack` made meanwhile announces no
    /// room).
    fn take_sink(&self, mark: bool) -> Option<Sink> {
        let mut slot = lock(&self.inner.incoming_tx);
        match &*slot {
            Some(Sink::Direct(d)) if std::ptr::eq(Arc::as_ptr(d), self.sink.as_ptr()) => {
                if mark && !self.inner.draining.is_cancelled() {
                    self.inner.abandoned.cancel();
                }
                slot.take()
            }
            _ => None,
        }
    }
}

impl Drop for DirectGuard {
    fn drop(&mut self) {
        let sink = self.take_sink(true);
        if sink.is_some() {
            // Outside the lock: this drops the application's handler.
            drop(sink);
            self.inner.abandoned("the connection handler was dropped");
        }
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sink::Queue(_) => "Sink::Queue",
            Sink::Direct(_) => "Sink::Direct",
        })
    }
}

impl Drop for DirectSink {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

impl Worker {
    /// A builder to set queue sizes, timeouts and the connection capacity.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// Picks up the channel with the default settings ([`WorkerBuilder::from_env`]).
    pub async fn from_env() -> Result<Worker, WorkerError> {
        WorkerBuilder::default().from_env().await
    }

    /// True when this process was started by a master (Node's `cluster.isWorker`):
    /// the channel named by the environment is open here, and is the socket the
    /// master created. A worker's own child processes, which inherit the environment
    /// but not the channel, are not workers.
    pub fn is_worker() -> bool {
        let Some(raw) = std::env::var(ENV_CHANNEL_FD)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
        else {
            return false;
        };
        let Some(inode) = sys::socket_inode_of(raw) else {
            return false;
        };
        env_inode().is_none_or(|expected| expected == inode)
    }

    /// The slot from the environment, without connecting (`None` outside a pool).
    pub fn id_from_env() -> Option<u32> {
        std::env::var(ENV_WORKER_ID).ok()?.parse().ok()
    }

    /// The worker's slot, `0..N`, stable across restarts.
    pub fn id(&self) -> u32 {
        self.inner.hello.worker_id
    }

    /// How many times the pool was reloaded when this worker was started.
    pub fn generation(&self) -> u64 {
        self.inner.hello.generation
    }

    /// The protocol version this session speaks (negotiated with the master).
    pub fn protocol_version(&self) -> u32 {
        self.inner.version
    }

    /// The master's listeners; [`Connection::listener`] indexes this list.
    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.inner.listeners
    }

    /// Tells the master this worker takes connections, starts the heartbeat, and
    /// returns the stream of incoming connections. Call once.
    ///
    /// If the master is already gone (its end of the channel closed), the worker
    /// drains as it would on end-of-file: the returned [`Incoming`] ends at once and
    /// [`Worker::master_gone`] is true, so the usual serve-then-exit path runs.
    ///
    /// Dropped before it completes (a `timeout` around it), it is as if the returned
    /// [`Incoming`] were dropped: the worker announces its end.
    pub async fn ready(&self) -> Result<Incoming, WorkerError> {
        let rx = lock(&self.inner.incoming)
            .take()
            .ok_or(WorkerError::AlreadyReady)?;
        // Once the window was shut for want of room in the queue, it reopens when a
        // quarter of the queue is free (at most `ACK_EVERY` places): not at every
        // connection taken.
        let reopen_at = (rx.max_capacity() / 4).clamp(1, ACK_EVERY as usize);
        // Made before the first await: if this future is dropped once the `Ready` is
        // out (its `Ack` waiting for room), dropping `Incoming` tells the master, which
        // would otherwise send connections that are closed unanswered.
        let incoming = Incoming {
            rx,
            counters: Arc::clone(&self.inner.counters),
            reopen_at,
            inner: Arc::clone(&self.inner),
        };
        if let Err(e) = self.say_ready().await {
            // Never ready: `Incoming` goes without announcing anything.
            drop(incoming.take_sink(false));
            return Err(e);
        }
        Ok(incoming)
    }

    /// [`Worker::ready`] for the library's own servers: each connection goes to
    /// `handler` as it comes off the channel (or the shared listener), called by the
    /// task that takes it (no queue and no task hop). [`Worker::shutdown_signal`]
    /// completes once the worker drains and the handler has had the last connection.
    /// Dropping the returned guard takes the handler out again: later connections are
    /// closed, as when an application drops [`Incoming`].
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) async fn ready_with(
        &self,
        handler: impl Fn(Connection) + Send + Sync + 'static,
    ) -> Result<DirectGuard, WorkerError> {
        let mut rx = lock(&self.inner.incoming)
            .take()
            .ok_or(WorkerError::AlreadyReady)?;
        let direct = Arc::new(DirectSink {
            handler: Box::new(handler),
            done: self.inner.incoming_done.clone(),
        });
        {
            let mut sink = lock(&self.inner.incoming_tx);
            // Already draining: nothing more comes (dropping `direct` says so).
            if sink.is_some() {
                *sink = Some(Sink::Direct(Arc::clone(&direct)));
            }
        }
        let guard = DirectGuard {
            inner: Arc::clone(&self.inner),
            sink: Arc::downgrade(&direct),
        };
        // The master sends connections (and a shared listener) only after `Ready`: the
        // queue is empty, and no task holds its sender.
        while let Ok(conn) = rx.try_recv() {
            (direct.handler)(conn);
        }
        drop(rx);
        drop(direct);
        if let Err(e) = self.say_ready().await {
            // Never ready: the handler goes without announcing anything.
            drop(guard.take_sink(false));
            return Err(e);
        }
        Ok(guard)
    }

    /// Tells the master this worker takes connections and starts the heartbeat.
    async fn say_ready(&self) -> Result<(), WorkerError> {
        let ready = ToMaster::Ready {
            pid: sys::getpid(),
            version: self.inner.version,
        };
        let mut sent = self.inner.writer.send_msg(&ready).await;
        if sent.is_ok() && self.inner.version >= 2 {
            sent = self.inner.send_ack().await;
        }
        match sent {
            Ok(()) => {}
            Err(ChannelError::Closed) => {
                self.inner.master_gone.store(true, Ordering::SeqCst);
                self.inner.begin_drain(Some(after(self.inner.orphan_drain)));
            }
            Err(e) => return Err(e.into()),
        }
        let interval = Duration::from_millis(u64::from(self.inner.hello.heartbeat_ms.max(10)));
        tokio::spawn(heartbeat_loop(Arc::downgrade(&self.inner), interval));
        Ok(())
    }

    /// Completes once the worker drains and [`Incoming`] has handed out the last
    /// connection the master sent (with [`crate::http::serve`]: once it has spawned
    /// the last one): a graceful-shutdown signal that loses no queued connection (for
    /// `axum::serve(..).with_graceful_shutdown(..)`, say). Also once [`Incoming`] is
    /// dropped, drained to its end or not: nothing more is handed out then (connections
    /// it still held are closed).
    pub async fn shutdown_signal(&self) {
        self.inner.incoming_done.cancelled().await;
    }

    /// Sends an application message to the master (Node's `process.send`).
    pub async fn send(&self, payload: Vec<u8>) -> Result<(), WorkerError> {
        Ok(self.inner.writer.send_msg(&ToMaster::User(payload)).await?)
    }

    /// The application messages from the master (Node's `process.on('message')`).
    /// `None` after the first call. Messages that arrive while the queue is full are
    /// dropped and counted ([`Worker::dropped_messages`]).
    pub fn messages(&self) -> Option<mpsc::Receiver<Vec<u8>>> {
        lock(&self.inner.messages).take()
    }

    /// Application messages dropped because the application did not take them.
    pub fn dropped_messages(&self) -> u64 {
        self.inner.dropped_messages.load(Ordering::Relaxed)
    }

    /// Cancelled when the worker must stop taking new work: the master sent `Drain`;
    /// the application announced the worker's end ([`Worker::suicide`], a panic with
    /// [`Worker::install_panic_hook`]); a shared listener failed; or the channel
    /// ended ([`Worker::master_gone`]). When the library announces the end because the
    /// application stopped taking connections (it dropped [`Incoming`] or its HTTP
    /// server, or took none for 30 s), it is cancelled by the master's `Drain` that
    /// answers. Connection handlers watch it to close keep-alive connections politely.
    pub fn draining(&self) -> CancellationToken {
        self.inner.draining.clone()
    }

    /// True once the channel ended without a `Drain`: the master closed it (it died or
    /// dropped this worker), or the worker ended it itself (the master broke the
    /// protocol, or a `Suicide` could not be sent). The worker drains as for a `Drain`,
    /// with the [`WorkerBuilder::orphan_drain`] deadline.
    pub fn master_gone(&self) -> bool {
        self.inner.master_gone.load(Ordering::SeqCst)
    }

    /// Connections this worker holds open now (including received ones the
    /// application has not accepted yet).
    pub fn active(&self) -> u32 {
        self.inner.counters.active.load(Ordering::SeqCst)
    }

    /// Connections the kernel dropped on their way to this worker because its
    /// descriptor table was full (see [`WorkerBuilder::max_connections`]).
    pub fn lost_connections(&self) -> u64 {
        self.inner.counters.lost.load(Ordering::Relaxed)
    }

    /// When the worker must be done by, once draining: the master's drain deadline
    /// (less a quarter of a second), or the orphan drain once the master is gone.
    pub fn deadline(&self) -> Option<Instant> {
        *self.inner.finish_by.borrow()
    }

    /// Completes once the worker is draining, no more connections can come (the
    /// master's `Drain` arrived, or the channel ended) and it holds none; or at the
    /// master's drain deadline (less a quarter of a second) with connections still
    /// open, or [`WorkerBuilder::orphan_drain`] after the master went away. Return
    /// from `main` then: the process must exit. After [`Worker::suicide`] it waits
    /// for the master's `Drain`, which follows the connections sent before the
    /// master read the `Suicide`.
    pub async fn drained(&self) {
        self.inner.draining.cancelled().await;
        let mut finish_by = self.inner.finish_by.subscribe();
        loop {
            let deadline = *finish_by.borrow_and_update();
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let idle = async {
                self.inner.sealed.cancelled().await;
                self.inner.counters.idle().await;
            };
            tokio::select! {
                () = idle => return,
                () = until => return,
                changed = finish_by.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Announces that this worker is going down (`Suicide`): the master starts a
    /// replacement at once, sends no more connections and answers with `Drain`.
    /// [`Worker::draining`] is cancelled at once; `Incoming` ends with the `Drain`,
    /// after the connections the master sent before it knew.
    pub async fn suicide(&self, reason: impl Into<String>) -> Result<(), WorkerError> {
        let reason = bounded_reason(reason.into());
        self.inner.end_announced.store(true, Ordering::SeqCst);
        self.inner.draining.cancel();
        let sent = self
            .inner
            .writer
            .send_msg(&ToMaster::Suicide { reason })
            .await;
        if sent.is_err() {
            self.inner.unannounced_end();
        }
        Ok(sent?)
    }

    /// Installs a panic hook that announces the worker's end to the master (`Suicide`
    /// with the panic message) before the previous hook runs; the worker then drains
    /// as after [`Worker::suicide`].
    ///
    /// Opt-in, and process-wide: the hook runs for every panic of the process,
    /// including panics inside tokio tasks that tokio catches (the task's `JoinHandle`
    /// reports them; the runtime goes on). A worker that panicked anywhere is taken to
    /// be in an unknown state: it finishes its connections and is replaced.
    pub fn install_panic_hook(&self) {
        let inner = Arc::downgrade(&self.inner);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(inner) = inner.upgrade() {
                let reason = bounded_reason(format!("panic: {info}"));
                inner.end_announced.store(true, Ordering::SeqCst);
                inner.draining.cancel();
                if !inner.suicide_blocking(&reason) {
                    inner.unannounced_end();
                }
            }
            previous(info);
        }));
    }
}

impl Inner {
    /// The worker goes down but its `Suicide` did not reach the master: end the
    /// channel, so that the master stops sending (and replaces the worker) rather than
    /// send connections into a drain it does not know of (a frame cut short, the
    /// panic hook's, ends there too), and drain with the orphan drain's deadline, as
    /// no `Drain` will come.
    fn unannounced_end(&self) {
        self.writer.shutdown();
        self.begin_drain(Some(after(self.orphan_drain)));
    }

    /// Connections the application has taken off the queue since the start, and how
    /// many wait there now (from the master's channel or a shared listener alike).
    fn taken_and_queued(&self) -> (u64, usize) {
        let queued = lock(&self.incoming_tx).as_ref().map_or(0, Sink::queued);
        (self.counters.taken.load(Ordering::Relaxed), queued)
    }

    /// Connections have waited in the queue for [`NOT_TAKEN_AFTER`] while the
    /// application took none: it is wedged (a deadlocked accept loop). With the window
    /// the size of the queue's room, the master sends nothing more and sees nothing
    /// wrong, so the worker says so: the master replaces it, and the drain still hands
    /// the queued connections on.
    fn not_taken(self: &Arc<Self>) {
        if self.draining.is_cancelled() || self.abandoned.is_cancelled() {
            return;
        }
        tracing::error!(
            "connections have waited {} s for the application, which took none: the worker asks to be replaced",
            NOT_TAKEN_AFTER.as_secs()
        );
        self.abandoned.cancel();
        self.announce_end("connections not taken", false);
    }

    /// The application stopped taking connections (its `Incoming` or handler is
    /// gone, and with it the sink) though the worker was not draining.
    fn abandoned(self: &Arc<Self>, what: &'static str) {
        if self.draining.is_cancelled() {
            return; // the end of a drain, or after a `Suicide`: nothing is amiss
        }
        tracing::error!("{what} before the drain: later connections would be closed unanswered");
        self.abandoned.cancel();
        self.announce_end("connections no longer taken", false);
    }

    /// The worker can no longer do its work though it is not draining: it says so
    /// (`Suicide`, sent by a task of its own; if that fails, the end the master is
    /// not told of), and the master replaces it and answers with `Drain`. With
    /// `drain_now`, [`Worker::draining`] is cancelled at once, as [`Worker::suicide`]
    /// does; otherwise with the `Drain`.
    fn announce_end(self: &Arc<Self>, reason: &'static str, drain_now: bool) {
        let announce =
            !self.draining.is_cancelled() && !self.end_announced.swap(true, Ordering::SeqCst);
        if drain_now {
            self.draining.cancel();
        }
        if !announce {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if !self.suicide_blocking(reason) {
                self.unannounced_end();
            }
            return;
        };
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            let suicide = ToMaster::Suicide {
                reason: reason.to_owned(),
            };
            if inner.writer.send_msg(&suicide).await.is_err() {
                inner.unannounced_end();
            }
        });
    }

    /// Stops taking connections: ends `Incoming` once queued connections are taken,
    /// and sets the time by which the worker must be done.
    fn begin_drain(&self, finish_by: Option<Instant>) {
        self.draining.cancel();
        if let Some(at) = finish_by {
            self.finish_by.send_modify(|d| {
                *d = Some(d.map_or(at, |old| old.min(at)));
            });
        }
        // Dropping the reader's sender ends `Incoming` once queued connections are taken.
        // Dropped outside the lock: a direct sink drops the application's handler.
        let sink = lock(&self.incoming_tx).take();
        drop(sink);
        self.sealed.cancel();
    }

    /// How many more connections this worker can take: the connections it may still
    /// open, and no more than the queue has room for (the reader never waits for room
    /// then, and answers every `Ping`); none once the application stopped taking them.
    fn capacity(&self) -> u32 {
        if self.abandoned.is_cancelled() {
            return 0;
        }
        // No sink: nobody takes connections any more (the drain, or the application
        // dropped its `Incoming` after its own suicide).
        let room = lock(&self.incoming_tx).as_ref().map_or(0, Sink::room);
        self.max_connections
            .saturating_sub(self.counters.active.load(Ordering::SeqCst))
            .min(room)
    }

    async fn send_ack(&self) -> Result<(), ChannelError> {
        // One at a time (the reader and the heartbeat both send them): the threshold
        // kept is the one of the `Ack` the master gets last.
        let _one = self.ack_lock.lock().await;
        // Acquire: the connections counted in `received` are in the queue (the reader
        // counts them once delivered), and the room read below leaves them out.
        let received = self.counters.received.load(Ordering::Acquire);
        self.counters.acked.fetch_max(received, Ordering::Relaxed);
        // Raised before the capacity is read, lowered after if there is room: a
        // connection that closes in between either is counted in the capacity or sees
        // the flag and asks for another `Ack` (every access is `SeqCst`).
        self.counters.window_shut.store(true, Ordering::SeqCst);
        let capacity = self.capacity();
        if capacity > 0 {
            self.counters.window_shut.store(false, Ordering::SeqCst);
        }
        self.counters
            .ack_after
            .store(protocol::ack_after(capacity), Ordering::Relaxed);
        self.writer
            .send_msg(&ToMaster::Ack {
                received,
                lost: self.counters.lost.load(Ordering::Relaxed),
                capacity,
            })
            .await
    }

    /// Writes a `Suicide` frame from a context that cannot await (a panic hook): waits
    /// at most a short while for the writer lock and for room in the socket. Whether
    /// the frame went out.
    fn suicide_blocking(&self, reason: &str) -> bool {
        let Ok(frame) = protocol::frame(&ToMaster::Suicide {
            reason: reason.to_owned(),
        }) else {
            return false;
        };
        // A panic hook must not hang: half a second in all.
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // `None`: the writer lock is busy; `Some(None)`: a frame's tail is still
            // pending (another thread flushes it); writing now would corrupt the stream.
            let attempt = self.writer.with_exclusive(|idle| {
                idle.then(|| sys::send_all_for(self.writer.as_fd(), &frame, left))
            });
            match attempt {
                Some(Some(sent)) => return sent.is_ok(),
                Some(None) | None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        false
    }
}

async fn read_loop(
    inner: std::sync::Weak<Inner>,
    mut reader: ChannelReader,
    messages: mpsc::Sender<Vec<u8>>,
) {
    let Some(counters) = inner.upgrade().map(|i| Arc::clone(&i.counters)) else {
        return;
    };
    let mut lost_seen = 0u64;
    loop {
        let frame = reader.recv::<ToWorker>().await;
        let Some(this) = inner.upgrade() else { return };
        match frame {
            Ok(Some((ToWorker::Connections { listener, count }, fds))) => {
                let lost = reader.lost() - lost_seen;
                lost_seen = reader.lost();
                if lost > 0 {
                    counters.lost.fetch_add(lost, Ordering::Relaxed);
                    tracing::warn!(
                        lost,
                        "descriptor table full: the kernel dropped {lost} connections on their \
                         way to this worker (raise its RLIMIT_NOFILE or lower max_connections)"
                    );
                }
                // Delivered until the master's `Drain` (which follows every connection it
                // sent) or until the application drops `Incoming`; a connection that
                // cannot be delivered is closed here.
                let tx = lock(&this.incoming_tx).clone();
                for fd in fds {
                    let Some(conn) = Connection::from_fd(listener, &this.listeners, fd, &counters)
                    else {
                        continue;
                    };
                    if let Some(tx) = &tx {
                        tx.deliver(conn).await;
                    }
                }
                drop(tx);
                // Counted once delivered: an `Ack` meanwhile (the heartbeat's) announces
                // the room in the queue beyond what it counts, so the master's window,
                // counted from `received`, never holds more than the queue can take.
                counters
                    .received
                    .fetch_add(u64::from(count), Ordering::Release);
                let unacked = counters.received.load(Ordering::Relaxed)
                    - counters.acked.load(Ordering::Relaxed);
                if this.version >= 2
                    && unacked >= counters.ack_after.load(Ordering::Relaxed)
                    && this.send_ack().await.is_err()
                {
                    continue;
                }
            }
            Ok(Some((ToWorker::Listener { listener }, fds))) => {
                for fd in fds {
                    accept_shared(&this, listener, fd);
                }
            }
            Ok(Some((ToWorker::Drain { deadline_ms }, _))) => {
                tracing::debug!(deadline_ms, "drain requested");
                let finish_by = after(
                    Duration::from_millis(deadline_ms).saturating_sub(Duration::from_millis(250)),
                );
                this.begin_drain(Some(finish_by));
            }
            Ok(Some((ToWorker::Ping, _))) => {
                // After every frame before it: acknowledge what arrived, then answer.
                if this.version >= 2 {
                    let _ = this.send_ack().await;
                }
                let _ = this.writer.send_msg(&ToMaster::Pong).await;
            }
            Ok(Some((ToWorker::User(payload), _))) => {
                if messages.try_send(payload).is_err() {
                    let n = this.dropped_messages.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            dropped = n,
                            "message from the master dropped: the application does not read \
                             Worker::messages()"
                        );
                    }
                }
            }
            Ok(Some((ToWorker::Hello(_), _))) => {
                tracing::warn!("unexpected second Hello from the master; ignored");
            }
            Ok(None) | Err(_) => {
                if let Err(e) = frame {
                    tracing::error!(error = %e, "channel to the master failed");
                    // Nothing more is read from it: end it, so that the master sees the
                    // end now and sends no more connections here.
                    this.writer.shutdown();
                }
                this.master_gone.store(true, Ordering::SeqCst);
                // No orphan outlives its master: `drained()` completes once the open
                // connections are done, or after the orphan drain at the latest.
                this.begin_drain(Some(after(this.orphan_drain)));
                return;
            }
        }
    }
}

/// Shared balancing: accept connections from the master's listening socket ourselves,
/// until the worker drains (then the listener is closed first).
///
/// Every worker that shares the listener is woken for each connection and only one
/// gets it, so `poll` (zero timeout) is asked before each `accept` (the first
/// [`sys::POLLED_ACCEPTS`] of a wake-up; then it is a flood): an `accept` that fails
/// with `EAGAIN` costs Linux a socket's allocation and release.
fn accept_shared(inner: &Arc<Inner>, listener: u16, fd: OwnedFd) {
    let Some(kind) = inner.listeners.get(usize::from(listener)).map(|l| l.kind) else {
        tracing::warn!(listener, "listening socket for an unknown listener; closed");
        return;
    };
    let Some(tx) = lock(&inner.incoming_tx).clone() else {
        return;
    };
    let socket = match sys::set_nonblocking(fd)
        .and_then(|fd| sys::register_owned_for(fd, tokio::io::Interest::READABLE))
    {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!(listener, error = %e, "cannot accept on the shared listener");
            // It would look healthy and take nothing.
            inner.announce_end("cannot accept on the shared listener", true);
            return;
        }
    };
    let draining = inner.draining.clone();
    let abandoned = inner.abandoned.clone();
    let counters = Arc::clone(&inner.counters);
    let listeners = Arc::clone(&inner.listeners);
    let max_connections = inner.max_connections;
    // The drain is heard through a flag (its own task waits on the token): the
    // token's future, polled with every wait, would take a lock each time. The
    // application that stops taking connections raises it too.
    let drained = Arc::new(WakeFlag::default());
    let announcer = {
        let (draining, drained) = (draining.clone(), Arc::clone(&drained));
        tokio::spawn(async move {
            tokio::select! {
                () = draining.cancelled() => {}
                () = abandoned.cancelled() => {}
            }
            drained.raise();
        })
    };
    let accepting = tokio::spawn(async move {
        // The announcer ends with the drain; if this task ends first, so does it.
        let _announcer = tokio_util::task::AbortOnDropHandle::new(announcer);
        loop {
            // A full worker leaves connections in the backlog, for another worker or
            // for later: the descriptors it keeps for its own files stay free.
            if !room_for_one_more(&counters, max_connections, &draining).await {
                return AcceptEnd::Drained;
            }
            // The drain first: once it is heard, no connection is taken.
            // `poll_read_ready` keeps the task's waker in the registration's own slot,
            // where `readable()` would queue a waiter per wait.
            let ready = std::future::poll_fn(|cx| {
                if drained.poll_raised(cx).is_ready() {
                    return Poll::Ready(None);
                }
                socket.poll_read_ready(cx).map(Some)
            })
            .await;
            let mut guard = match ready {
                None => return AcceptEnd::Drained,
                Some(Ok(guard)) => guard,
                Some(Err(e)) => {
                    tracing::error!(listener, error = %e, "shared listener failed");
                    return AcceptEnd::Failed;
                }
            };
            // The token decides: its announcer may not have run yet (on a multi-thread
            // runtime, the listener can be ready first).
            if draining.is_cancelled() {
                return AcceptEnd::Drained;
            }
            let mut accepted = 0;
            loop {
                // A flood, or a hand-over that waited: the drain may have come since.
                if drained.is_raised() {
                    return AcceptEnd::Drained;
                }
                if counters.active.load(Ordering::SeqCst) >= max_connections {
                    break; // readiness kept: accepting goes on once there is room
                }
                if accepted < sys::POLLED_ACCEPTS
                    && !sys::connection_waiting(guard.get_inner().as_fd())
                {
                    // Another worker took it, or the backlog is empty. A connection
                    // that comes meanwhile is reported by the reactor's next turn.
                    guard.clear_ready();
                    break;
                }
                match guard.try_io(|l| sys::accept_nonblocking(l.get_ref().as_fd())) {
                    Ok(Ok(fd)) => {
                        accepted += 1;
                        let Some(conn) =
                            Connection::adopt(listener, &listeners, kind, fd, true, &counters)
                        else {
                            continue;
                        };
                        if !tx.deliver(conn).await {
                            // `Incoming` was dropped: `Inner::abandoned` has told.
                            return AcceptEnd::Drained;
                        }
                    }
                    Ok(Err(e)) if sys::is_transient_accept_error(&e) => {}
                    Ok(Err(e)) => {
                        accept_failed(&e).await;
                        break;
                    }
                    Err(_would_block) => break,
                }
            }
        }
    });
    // Any other end (the listener failed, a panic in the handler): the worker takes no
    // more connections here, and must not look healthy.
    let watched = Arc::downgrade(inner);
    tokio::spawn(async move {
        let reason = match accepting.await {
            Ok(AcceptEnd::Drained) => return,
            Ok(AcceptEnd::Failed) => "the shared listener failed",
            Err(e) if e.is_panic() => "the shared listener's accept task panicked",
            Err(_) => return, // cancelled: the runtime shuts down
        };
        if let Some(inner) = watched.upgrade() {
            inner.announce_end(reason, true);
        }
    });
}

/// How a shared listener's accept task ended.
enum AcceptEnd {
    /// The worker drains, or the application stopped taking connections.
    Drained,
    /// The listener failed.
    Failed,
}

/// Completes once the worker holds fewer than `max` connections (at once if it does);
/// `false` if it drains first.
async fn room_for_one_more(counters: &Counters, max: u32, draining: &CancellationToken) -> bool {
    /// Counts a waiter in `room_waiters` while it lives.
    struct Waiting<'a>(&'a AtomicU32);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    // Bounded only by the worker's life: each turn waits for a connection to close.
    loop {
        if counters.active.load(Ordering::SeqCst) < max {
            return true;
        }
        let closed = counters.room.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        // Counted, then looked at again: a connection that closes in between either
        // shows in `active` or sees the waiter and wakes it (every access is `SeqCst`).
        counters.room_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&counters.room_waiters);
        if counters.active.load(Ordering::SeqCst) < max {
            return true;
        }
        tokio::select! {
            () = draining.cancelled() => return false,
            () = &mut closed => {}
        }
    }
}

/// After a failed `accept` (not a connection reset before it was taken): a pause, so
/// that a listener in a lasting error state (no descriptors left, or shut down) is not
/// asked again in a busy loop.
async fn accept_failed(e: &io::Error) {
    if sys::is_resource_exhaustion(e) {
        tracing::warn!(error = %e, "accept failed; backing off");
    } else {
        tracing::error!(error = %e, "accept failed; backing off");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Sends a `Heartbeat` (and an `Ack`) every `every`, and an `Ack` alone as soon as a
/// connection closes while the last `Ack` announced no capacity.
async fn heartbeat_loop(inner: std::sync::Weak<Inner>, every: Duration) {
    // Holding the counters does not keep the worker alive.
    let Some(counters) = inner.upgrade().map(|this| Arc::clone(&this.counters)) else {
        return;
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The application's progress: connections taken, and since when none was while
    // some waited.
    let mut taken_before = 0;
    let mut waiting_since: Option<tokio::time::Instant> = None;
    loop {
        let tick = tokio::select! {
            _ = ticker.tick() => true,
            () = counters.reopen.notified() => false,
        };
        let Some(this) = inner.upgrade() else { return };
        if tick {
            let (taken, queued) = this.taken_and_queued();
            if queued == 0 || taken != taken_before {
                waiting_since = None;
            } else if waiting_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                >= NOT_TAKEN_AFTER
            {
                this.not_taken();
            }
            taken_before = taken;
            let beat = ToMaster::Heartbeat {
                active: counters.active.load(Ordering::Relaxed),
                served: counters.received.load(Ordering::Relaxed),
            };
            if this.writer.send_msg(&beat).await.is_err() {
                return;
            }
        } else if !counters.window_shut.load(Ordering::Relaxed) || this.capacity() == 0 {
            // An `Ack` since reopened the window, or there is no room yet (a connection
            // closed while the queue is full): the next event that makes room asks again.
            continue;
        }
        if this.version >= 2 && this.send_ack().await.is_err() {
            return;
        }
    }
}

/// How long connections may wait in the queue while the application takes none
/// before the worker asks to be replaced (see `Inner::not_taken`). A slow application
/// that takes one now and then is not affected; one that stops taking connections for
/// this long on purpose (every permit held by a long-lived connection) is replaced,
/// gracefully: the drain still hands it the queued connections.
///
/// Checked at each heartbeat (one tick sees connections waiting, a later one sees the
/// time run out): the worker notices between 30 s and 30 s plus two heartbeat
/// intervals after the connections began to wait (within two intervals when the
/// interval is over 30 s).
const NOT_TAKEN_AFTER: Duration = Duration::from_secs(30);

/// The longest `Suicide` reason sent, in bytes: a panic message or a reason can be
/// any size, a frame cannot.
const MAX_REASON: usize = 4096;

/// `reason` cut to [`MAX_REASON`] bytes, at a character boundary (`String::truncate`
/// panics elsewhere, and a panic inside the panic hook aborts the process).
fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// `wait` from now, never a panic: a longer wait than a century (a third-party
/// master's `deadline_ms`, `orphan_drain(Duration::MAX)`) is cut to one, and a clock
/// that cannot reach that far gets a day.
fn after(wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let now = Instant::now();
    now.checked_add(wait.min(CENTURY))
        .or_else(|| now.checked_add(wait.min(DAY)))
        .unwrap_or(now)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connections handed to this worker, in the order the master sent them. Ends when
/// the worker drains or the master is gone. It keeps the worker alive (the channel,
/// its heartbeats) for as long as it lives, even without a [`Worker`].
///
/// Dropped before it ended (the application stops taking connections but runs on),
/// it closes the connections it still held, and the worker announces its end
/// (`Suicide`, "connections no longer taken"): the master replaces it at once and
/// sends it `Drain`. Connections sent before the master read that are closed
/// unanswered as they arrive.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Connection>,
    counters: Arc<Counters>,
    /// Free places in the queue at which a window shut for want of them reopens.
    reopen_at: usize,
    inner: Arc<Inner>,
}

impl Incoming {
    /// The next connection; `None` once the worker drains.
    pub async fn accept(&mut self) -> Option<Connection> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection (`Ready(None)` once the worker drains).
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Connection>> {
        let next = self.rx.poll_recv(cx);
        match next {
            // The last `Ack` said the queue was full (version 2): room again opens the
            // window at once, as a connection that closes does (`ActiveGuard`).
            Poll::Ready(Some(_)) => {
                // One writer: no read-modify-write needed.
                let taken = self.counters.taken.load(Ordering::Relaxed);
                self.counters.taken.store(taken + 1, Ordering::Relaxed);
                if self.counters.window_shut.load(Ordering::SeqCst)
                    && self.rx.capacity() >= self.reopen_at
                {
                    self.counters.reopen.notify_one();
                }
            }
            Poll::Ready(None) => self.inner.incoming_done.cancel(),
            Poll::Pending => {}
        }
        next
    }
}

impl Incoming {
    /// Takes the queue's sender out of the worker if it is still there; `mark` first
    /// says the application no longer takes connections (an `Ack` made meanwhile
    /// announces no room).
    fn take_sink(&self, mark: bool) -> Option<Sink> {
        let mut slot = lock(&self.inner.incoming_tx);
        match &*slot {
            Some(Sink::Queue(_)) => {
                if mark && !self.inner.draining.is_cancelled() {
                    self.inner.abandoned.cancel();
                }
                slot.take()
            }
            _ => None,
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let sink = self.take_sink(true);
        if sink.is_some() {
            drop(sink);
            self.inner.abandoned("Incoming was dropped");
        }
        // Nothing more is handed out: `Worker::shutdown_signal` completes (an
        // application that left its accept loop at the drain and dropped `Incoming`
        // without polling it to its end waits on it next).
        self.inner.incoming_done.cancel();
    }
}

impl futures_core::Stream for Incoming {
    type Item = Connection;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Connection>> {
        self.poll_accept(cx)
    }
}

/// The socket of an accepted connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Socket {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix-socket listener.
    Unix(UnixStream),
}

/// Keeps a connection counted as active (for heartbeats, least-connections balancing
/// and the capacity the worker reports) until dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    counters: Arc<Counters>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.counters.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.counters.idle.notify_waiters();
        }
        // The worker said it was full: tell the master at once that it has room again,
        // rather than at the next heartbeat (up to a second of refused work).
        if self.counters.window_shut.load(Ordering::SeqCst) {
            self.counters.reopen.notify_one();
        }
        if self.counters.room_waiters.load(Ordering::SeqCst) > 0 {
            self.counters.room.notify_waiters();
        }
    }
}

/// An accepted connection the master handed to this worker. Reads and writes go to
/// the socket; the connection counts as active until dropped.
///
/// The socket is registered with tokio's reactor only once a read or a write would
/// block (or [`Connection::socket`] asks for it), and each direction goes to the
/// socket at once until it would block (each direct read or write counts against the
/// task's tokio budget, as tokio's own do). A connection whose request is there when it
/// is first read, and whose answer is written in the same poll and fits in the socket's
/// buffer, never costs the reactor anything: not the two `epoll_ctl` calls, and not the
/// reactor turn and second poll of its task that tokio would spend learning that the
/// client's first bytes are there (tokio assumes as much for the sockets its own
/// `accept` returns).
///
/// Reads and writes must be polled within a tokio runtime with I/O enabled, like any
/// tokio socket's: the registration happens in the first one that has to wait.
#[derive(Debug)]
pub struct Connection {
    listener: u16,
    listeners: Arc<[ListenerInfo]>,
    io: Io,
    guard: ActiveGuard,
    /// Reads go to the socket at once until one would block; then through tokio.
    read_direct: bool,
    /// The last direct read came back short: the socket is empty. The next read
    /// answers `Pending` (its task woken at once) without asking the socket, and the
    /// one after it asks. hyper reads once more after a request, to hear of a client
    /// that goes away; answered this way, a connection whose answer is written in the
    /// same poll ends without a system call for that read, or a registration.
    read_drained: bool,
    /// Writes go to the socket at once until one would block; then through tokio.
    write_direct: bool,
    /// The descriptor is known to be non-blocking (accepted here). One the master sent
    /// is made so when it is registered.
    nonblocking: bool,
}

/// A connection's socket, before and after its registration with tokio's reactor.
#[derive(Debug)]
enum Io {
    /// Not registered: reads and writes go to the socket until one would block.
    Direct(OwnedFd, ListenerKind),
    /// Registered: reads and writes go through tokio.
    Registered(Socket),
    /// The registration failed (the reactor is gone, or out of memory); the socket was
    /// closed with it.
    Lost,
}

impl Connection {
    /// A connection the master sent (its descriptor may be blocking).
    fn from_fd(
        listener: u16,
        listeners: &Arc<[ListenerInfo]>,
        fd: OwnedFd,
        counters: &Arc<Counters>,
    ) -> Option<Connection> {
        let Some(kind) = listeners.get(usize::from(listener)).map(|l| l.kind) else {
            tracing::warn!(listener, "connection for an unknown listener; closed");
            return None;
        };
        // Made non-blocking only if it is registered with the reactor: until then every
        // read and write passes `MSG_DONTWAIT`.
        Connection::adopt(listener, listeners, kind, fd, false, counters)
    }

    /// A connection on descriptor `fd`, already non-blocking if `nonblocking`.
    fn adopt(
        listener: u16,
        listeners: &Arc<[ListenerInfo]>,
        kind: ListenerKind,
        fd: OwnedFd,
        nonblocking: bool,
        counters: &Arc<Counters>,
    ) -> Option<Connection> {
        // TCP_NODELAY: inherited from the master's listener.
        counters.active.fetch_add(1, Ordering::SeqCst);
        Some(Connection {
            listener,
            listeners: Arc::clone(listeners),
            io: Io::Direct(fd, kind),
            guard: ActiveGuard {
                counters: Arc::clone(counters),
            },
            read_direct: true,
            read_drained: false,
            write_direct: true,
            nonblocking,
        })
    }

    /// Which listener accepted it (an index into [`Worker::listeners`]).
    pub fn listener(&self) -> u16 {
        self.listener
    }

    /// The listener that accepted it (its kind and address).
    pub fn listener_info(&self) -> Option<&ListenerInfo> {
        self.listeners.get(usize::from(self.listener))
    }

    /// The client's address (TCP; `None` for a Unix-socket connection).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match &self.io {
            Io::Direct(fd, ListenerKind::Tcp) => sys::peer_addr(fd.as_fd()),
            Io::Registered(Socket::Tcp(s)) => s.peer_addr().ok(),
            _ => None,
        }
    }

    /// The local address the client connected to (TCP; `None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.io {
            Io::Direct(fd, ListenerKind::Tcp) => sys::local_addr(fd.as_fd()),
            Io::Registered(Socket::Tcp(s)) => s.local_addr().ok(),
            _ => None,
        }
    }

    /// The socket, registered with tokio's reactor first if it is not yet (call it
    /// within the runtime, like any tokio socket's constructor). An error if the
    /// registration fails; the socket is closed then.
    pub fn socket(&mut self) -> io::Result<&Socket> {
        self.registered().map(|socket| &*socket)
    }

    fn registered(&mut self) -> io::Result<&mut Socket> {
        if matches!(self.io, Io::Direct(..)) {
            if let Io::Direct(fd, kind) = std::mem::replace(&mut self.io, Io::Lost) {
                let fd = if self.nonblocking {
                    fd
                } else {
                    sys::set_nonblocking(fd)?
                };
                self.io = Io::Registered(register(fd, kind)?);
            }
        }
        match &mut self.io {
            Io::Registered(socket) => Ok(socket),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection's socket was closed: its registration with the reactor failed",
            )),
        }
    }

    /// The socket (registered with tokio's reactor, as [`Connection::socket`] does) and
    /// the guard that keeps it counted as active.
    pub fn into_parts(mut self) -> io::Result<(Socket, ActiveGuard)> {
        self.registered()?;
        match self.io {
            Io::Registered(socket) => Ok((socket, self.guard)),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket's descriptor (`None` once a failed registration closed it).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.io {
            Io::Direct(fd, _) => Some(fd.as_fd()),
            Io::Registered(Socket::Tcp(s)) => Some(s.as_fd()),
            Io::Registered(Socket::Unix(s)) => Some(s.as_fd()),
            Io::Lost => None,
        }
    }
}

/// Registers a connection's socket with the current runtime's reactor.
fn register(fd: OwnedFd, kind: ListenerKind) -> io::Result<Socket> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "a connection's socket can only be registered within a tokio runtime",
        ));
    }
    Ok(match kind {
        ListenerKind::Tcp => Socket::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?),
        ListenerKind::Unix => Socket::Unix(UnixStream::from_std(
            std::os::unix::net::UnixStream::from(fd),
        )?),
    })
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(())); // as a read of nothing from the socket would
        }
        if this.read_direct {
            if std::mem::take(&mut this.read_drained) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(fd) = this.fd() {
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                let wanted = buf.remaining();
                match sys::recv_now(fd, buf) {
                    Err(e) if sys::is_not_ready(&e) => this.read_direct = false,
                    done => {
                        coop.made_progress();
                        let got = wanted - buf.remaining();
                        this.read_drained = done.is_ok() && got > 0 && got < wanted;
                        return Poll::Ready(done);
                    }
                }
            }
        }
        match this.registered() {
            Ok(Socket::Tcp(s)) => Pin::new(s).poll_read(cx, buf),
            Ok(Socket::Unix(s)) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_direct {
            if let Some(fd) = this.fd() {
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                match sys::send_now(fd, buf) {
                    Err(e) if sys::is_not_ready(&e) => this.write_direct = false,
                    done => {
                        coop.made_progress();
                        return Poll::Ready(done);
                    }
                }
            }
        }
        match this.registered() {
            Ok(Socket::Tcp(s)) => Pin::new(s).poll_write(cx, buf),
            Ok(Socket::Unix(s)) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_direct {
            if let Some(fd) = this.fd() {
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                match sys::send_vectored_now(fd, bufs) {
                    Err(e) if sys::is_not_ready(&e) => this.write_direct = false,
                    done => {
                        coop.made_progress();
                        return Poll::Ready(done);
                    }
                }
            }
        }
        match this.registered() {
            Ok(Socket::Tcp(s)) => Pin::new(s).poll_write_vectored(cx, bufs),
            Ok(Socket::Unix(s)) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true // `sendmsg` before the registration; tokio's streams after
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Registered(Socket::Tcp(s)) => Pin::new(s).poll_flush(cx),
            Io::Registered(Socket::Unix(s)) => Pin::new(s).poll_flush(cx),
            Io::Direct(..) | Io::Lost => Poll::Ready(Ok(())), // nothing is buffered
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Direct(fd, _) => Poll::Ready(sys::shutdown_write(fd.as_fd())),
            Io::Registered(Socket::Tcp(s)) => Pin::new(s).poll_shutdown(cx),
            Io::Registered(Socket::Unix(s)) => Pin::new(s).poll_shutdown(cx),
            Io::Lost => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A master's end of a channel, after the `Hello` (protocol version 1: the
    /// environment offers none here), and the worker on the other end.
    pub(crate) async fn fake_master() -> (
        crate::channel::ChannelReader,
        Arc<crate::channel::ChannelWriter>,
        Worker,
    ) {
        fake_master_with(Worker::builder(), None).await
    }

    /// [`fake_master`] with the worker built by `builder`, and the master's version
    /// offer (`Some("2")`: a version-2 session).
    async fn fake_master_with(
        builder: WorkerBuilder,
        offer: Option<&str>,
    ) -> (
        crate::channel::ChannelReader,
        Arc<crate::channel::ChannelWriter>,
        Worker,
    ) {
        fake_master_beating(builder, offer, 60_000).await
    }

    /// [`fake_master_with`], with heartbeats every `heartbeat_ms`.
    async fn fake_master_beating(
        builder: WorkerBuilder,
        offer: Option<&str>,
        heartbeat_ms: u32,
    ) -> (
        crate::channel::ChannelReader,
        Arc<crate::channel::ChannelWriter>,
        Worker,
    ) {
        use crate::protocol::{HELLO_VERSION, Hello, ListenerInfo, ListenerKind, ToWorker};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (reader, writer) =
            crate::channel::split(crate::channel::from_std(ours).expect("channel"));
        let hello = ToWorker::Hello(Hello {
            version: HELLO_VERSION,
            worker_id: 0,
            generation: 0,
            heartbeat_ms,
            listeners: vec![ListenerInfo {
                kind: ListenerKind::Tcp,
                address: "127.0.0.1:0".into(),
            }],
        });
        writer.send_msg(&hello).await.expect("hello");
        let worker = builder
            .start(std::os::fd::OwnedFd::from(theirs), offer.map(str::to_owned))
            .await
            .expect("worker");
        (reader, writer, worker)
    }

    /// The worker's next frame that `wanted` picks, the others skipped (100 frames and
    /// 10 s at most).
    async fn frame_where(
        reader: &mut crate::channel::ChannelReader,
        wanted: impl Fn(&ToMaster) -> bool,
    ) -> ToMaster {
        tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..100 {
                let (msg, _) = reader
                    .recv::<ToMaster>()
                    .await
                    .expect("read")
                    .expect("a frame");
                if wanted(&msg) {
                    return msg;
                }
            }
            panic!("not among the worker's next 100 frames");
        })
        .await
        .expect("the frame in time")
    }

    /// `n` TCP connections on 127.0.0.1, handed to the worker in one `Connections`
    /// frame; the clients' ends.
    async fn hand(writer: &Arc<crate::channel::ChannelWriter>, n: u16) -> Vec<std::net::TcpStream> {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..n {
            clients.push(std::net::TcpStream::connect(addr).expect("connect"));
            servers.push(listener.accept().expect("accept").0);
        }
        let fds: Vec<RawFd> = servers.iter().map(AsRawFd::as_raw_fd).collect();
        let frame = protocol::frame(&ToWorker::Connections {
            listener: 0,
            count: n,
        })
        .expect("frame");
        writer.send(&frame, &fds).await.expect("send");
        clients
    }

    /// True when the worker closed the client's connection without a byte (10 s at
    /// most).
    async fn closed_unanswered(client: std::net::TcpStream) -> bool {
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut client = client;
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            match client.read(&mut [0u8; 16]) {
                Ok(0) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .await
        .expect("client")
    }

    async fn send_drain(writer: &Arc<crate::channel::ChannelWriter>, deadline_ms: u64) {
        writer
            .send_msg(&ToWorker::Drain { deadline_ms })
            .await
            .expect("drain");
    }

    fn is_ready(m: &ToMaster) -> bool {
        matches!(m, ToMaster::Ready { .. })
    }

    fn is_suicide(m: &ToMaster) -> bool {
        matches!(m, ToMaster::Suicide { .. })
    }

    /// An application that stops taking connections (drops `Incoming`) but runs on
    /// was a black hole: every later connection closed unanswered while its heartbeats
    /// looked healthy. It announces its end, and the master replaces it.
    #[tokio::test]
    async fn dropping_incoming_announces_the_workers_end() {
        let (mut reader, writer, worker) = fake_master().await;
        let incoming = worker.ready().await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        drop(incoming);
        let end = frame_where(&mut reader, is_suicide).await;
        assert!(
            matches!(&end, ToMaster::Suicide { reason } if reason.contains("no longer taken")),
            "{end:?}"
        );
        // A connection the master sent before it read the `Suicide` is closed.
        let client = hand(&writer, 1).await.pop().expect("a client");
        assert!(closed_unanswered(client).await);
        // The master answers with `Drain`; the worker holds nothing: it is done.
        send_drain(&writer, 60_000).await;
        tokio::time::timeout(Duration::from_secs(10), worker.drained())
            .await
            .expect("drained");
    }

    /// `ready()` dropped once its `Ready` was out, while the `Ack` after it waited (a
    /// `timeout` around it): the connection queue went with it and nothing said so.
    /// The master put the worker in rotation, and every connection it sent was closed
    /// unanswered until the heartbeat timeout. Now the worker announces its end.
    #[tokio::test]
    async fn ready_dropped_once_its_ready_went_out_announces_the_workers_end() {
        let (mut reader, writer, worker) = fake_master_with(Worker::builder(), Some("2")).await;
        // The `Ack` after `Ready` waits: for the lock that Acks share here, for room in
        // a full channel (or behind the reader's `Ack`) in the field.
        let held = worker.inner.ack_lock.lock().await;
        let cut = tokio::time::timeout(Duration::from_millis(10), worker.ready()).await;
        assert!(cut.is_err(), "ready() waits for its Ack");
        frame_where(&mut reader, is_ready).await;
        drop(held);
        let client = hand(&writer, 1).await.pop().expect("a client");
        assert!(closed_unanswered(client).await);
        let end = frame_where(&mut reader, is_suicide).await;
        assert!(
            matches!(&end, ToMaster::Suicide { reason } if reason.contains("no longer taken")),
            "{end:?}"
        );
    }

    /// An application that leaves its accept loop at the drain (a `select!` on
    /// `draining()`) and drops `Incoming` without polling it to its end: its wait on
    /// `shutdown_signal()` lasted for ever (until the master's SIGKILL).
    #[tokio::test]
    async fn shutdown_signal_completes_once_incoming_is_dropped() {
        let (_reader, writer, worker) = fake_master().await;
        let incoming = worker.ready().await.expect("ready");
        send_drain(&writer, 60_000).await;
        tokio::time::timeout(Duration::from_secs(10), worker.draining().cancelled())
            .await
            .expect("drains");
        drop(incoming);
        tokio::time::timeout(Duration::from_secs(1), worker.shutdown_signal())
            .await
            .expect("shutdown_signal completes");
    }

    /// `incoming_queue(usize::MAX)` (or `message_queue`) made tokio's channel panic as
    /// the worker started.
    #[tokio::test]
    async fn queue_sizes_beyond_the_maximum_are_taken_as_the_maximum() {
        let builder = Worker::builder()
            .incoming_queue(usize::MAX)
            .message_queue(usize::MAX)
            .max_connections(u32::MAX);
        let (mut reader, _writer, worker) = fake_master_with(builder.clone(), Some("2")).await;
        let _incoming = worker.ready().await.expect("ready");
        let ack = frame_where(&mut reader, |m| matches!(m, ToMaster::Ack { .. })).await;
        assert!(
            matches!(ack, ToMaster::Ack { capacity, .. } if capacity as usize == MAX_QUEUE),
            "{ack:?}"
        );
        assert_eq!(
            (builder.incoming_queue, builder.message_queue),
            (MAX_QUEUE, MAX_QUEUE)
        );
    }

    /// The same for the handler of `ready_with` (an `http::serve` future dropped).
    #[tokio::test]
    async fn dropping_the_handler_announces_the_workers_end() {
        let (mut reader, _writer, worker) = fake_master().await;
        let guard = worker.ready_with(|_conn| {}).await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        drop(guard);
        frame_where(&mut reader, is_suicide).await;
        assert!(
            !worker.draining().is_cancelled(),
            "draining comes with the master's Drain"
        );
    }

    /// A slow application (not a wedged one) filled the incoming queue; the reader
    /// then waited for room, left `Ping`s unanswered, and the master killed the
    /// worker as stalled. The window now never exceeds the room in the queue.
    #[tokio::test]
    async fn the_window_is_the_room_in_the_incoming_queue_and_reopens_as_it_empties() {
        let (mut reader, writer, worker) =
            fake_master_with(Worker::builder().incoming_queue(4), Some("2")).await;
        assert_eq!(worker.protocol_version(), 2);
        let mut incoming = worker.ready().await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        let is_ack = |m: &ToMaster| matches!(m, ToMaster::Ack { .. });
        let ack = frame_where(&mut reader, is_ack).await;
        assert!(
            matches!(ack, ToMaster::Ack { capacity: 4, .. }),
            "the room in the queue: {ack:?}"
        );
        // The first heartbeat and its `Ack`, before the connections.
        frame_where(&mut reader, |m| matches!(m, ToMaster::Heartbeat { .. })).await;
        frame_where(&mut reader, is_ack).await;
        // The master fills the window; the application takes nothing yet.
        let _clients = hand(&writer, 4).await;
        let ack = frame_where(&mut reader, |m| {
            matches!(m, ToMaster::Ack { received: 4, .. })
        })
        .await;
        assert!(
            matches!(ack, ToMaster::Ack { capacity: 0, .. }),
            "shut: {ack:?}"
        );
        // The reader is free: a `Ping` is answered.
        writer.send_msg(&ToWorker::Ping).await.expect("ping");
        frame_where(&mut reader, |m| matches!(m, ToMaster::Pong)).await;
        // Taking a connection reopens the window at once (the heartbeat is a minute
        // away).
        let conn = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("in time");
        assert!(conn.is_some());
        let ack = frame_where(
            &mut reader,
            |m| matches!(m, ToMaster::Ack { capacity, .. } if *capacity > 0),
        )
        .await;
        assert!(
            matches!(
                ack,
                ToMaster::Ack {
                    received: 4,
                    capacity: 1,
                    ..
                }
            ),
            "{ack:?}"
        );
    }

    /// With the window the size of the queue's room, an application that holds its
    /// `Incoming` and takes nothing (a deadlocked accept loop) would keep its window
    /// shut and look healthy for good: after NOT_TAKEN_AFTER the worker says so.
    #[tokio::test(start_paused = true)]
    async fn connections_left_waiting_in_the_queue_end_the_worker() {
        let (mut reader, writer, worker) =
            fake_master_beating(Worker::builder().incoming_queue(4), Some("2"), 1_000).await;
        let _incoming = worker.ready().await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        let started = tokio::time::Instant::now();
        let _clients = hand(&writer, 2).await;
        let mut end = None;
        for _ in 0..500 {
            let next = tokio::time::timeout(Duration::from_secs(120), reader.recv::<ToMaster>())
                .await
                .expect("a frame in time")
                .expect("a frame");
            if let Some((msg, _)) = next {
                if matches!(msg, ToMaster::Suicide { .. }) {
                    end = Some(msg);
                    break;
                }
            }
        }
        let end = end.expect("the worker says it is stuck");
        assert!(
            matches!(&end, ToMaster::Suicide { reason } if reason.contains("not taken")),
            "{end:?}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= NOT_TAKEN_AFTER && waited <= NOT_TAKEN_AFTER + Duration::from_secs(3),
            "{waited:?}"
        );
    }

    /// A slow application in shared mode, taking one connection every 10 s while
    /// others wait in the queue, is not taken for a wedged one (connections accepted
    /// from a shared listener are counted as taken when the application takes them).
    #[tokio::test(start_paused = true)]
    async fn a_slow_application_in_shared_mode_is_not_taken_for_a_stuck_one() {
        use std::os::fd::AsRawFd;
        let (mut reader, writer, worker) =
            fake_master_beating(Worker::builder().incoming_queue(4), Some("2"), 1_000).await;
        let mut incoming = worker.ready().await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let frame = protocol::frame(&ToWorker::Listener { listener: 0 }).expect("frame");
        writer
            .send(&frame, &[listener.as_raw_fd()])
            .await
            .expect("send");
        let _clients: Vec<_> = (0..8)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        // The frames the worker sends meanwhile, read by a task of their own.
        let frames = tokio::spawn(async move {
            let mut reasons = Vec::new();
            while let Ok(Ok(Some((msg, _)))) =
                tokio::time::timeout(Duration::from_secs(120), reader.recv::<ToMaster>()).await
            {
                if let ToMaster::Suicide { reason } = msg {
                    reasons.push(reason);
                }
            }
            reasons
        });
        for _ in 0..7 {
            let conn = tokio::time::timeout(Duration::from_secs(60), incoming.accept())
                .await
                .expect("a connection in time");
            assert!(conn.is_some());
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        drop(writer);
        drop(incoming);
        drop(worker);
        let reasons = tokio::time::timeout(Duration::from_secs(300), frames)
            .await
            .expect("the channel ends")
            .expect("join");
        // The only one allowed: the end, when `Incoming` was dropped.
        assert!(
            reasons.iter().all(|r| r.contains("no longer taken")),
            "a slow application taken for a stuck one: {reasons:?}"
        );
    }

    /// A shared listener the worker cannot accept on (here not even a socket): it
    /// takes no connection, so it says so rather than look healthy.
    #[tokio::test]
    async fn a_shared_listener_the_worker_cannot_use_ends_it() {
        use std::os::fd::AsRawFd;
        let (mut reader, writer, worker) = fake_master_with(Worker::builder(), Some("2")).await;
        let _incoming = worker.ready().await.expect("ready");
        frame_where(&mut reader, is_ready).await;
        let file = std::fs::File::open(std::env::current_exe().expect("exe")).expect("open");
        let frame = protocol::frame(&ToWorker::Listener { listener: 0 }).expect("frame");
        writer
            .send(&frame, &[file.as_raw_fd()])
            .await
            .expect("send");
        frame_where(&mut reader, is_suicide).await;
        assert!(worker.draining().is_cancelled());
    }

    /// The shared accept task ended by a panic (in the handler): the worker stopped
    /// accepting but looked healthy.
    #[tokio::test]
    async fn a_panic_in_the_shared_accept_task_ends_the_worker() {
        use std::os::fd::AsRawFd;
        let (mut reader, writer, worker) = fake_master_with(Worker::builder(), Some("2")).await;
        let _guard = worker
            .ready_with(|_conn| panic!("a handler that panics"))
            .await
            .expect("ready");
        frame_where(&mut reader, is_ready).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let frame = protocol::frame(&ToWorker::Listener { listener: 0 }).expect("frame");
        writer
            .send(&frame, &[listener.as_raw_fd()])
            .await
            .expect("send");
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        frame_where(&mut reader, is_suicide).await;
        assert!(worker.draining().is_cancelled());
    }

    /// After a `Suicide`, `drained()` completed as soon as no connection was open,
    /// while connections the master sent before it read the `Suicide` were still on
    /// their way.
    #[tokio::test]
    async fn after_a_suicide_drained_waits_for_the_masters_drain() {
        let (mut reader, writer, worker) = fake_master().await;
        let mut incoming = worker.ready().await.expect("ready");
        let drained = tokio::spawn({
            let worker = worker.clone();
            async move { worker.drained().await }
        });
        worker.suicide("test").await.expect("suicide");
        frame_where(&mut reader, is_suicide).await;
        let _client = hand(&writer, 1).await;
        let conn = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("in time")
            .expect("delivered after the Suicide");
        assert!(!drained.is_finished(), "more may come until the Drain");
        send_drain(&writer, 60_000).await;
        let end = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("in time");
        assert!(end.is_none(), "Incoming ends with the Drain");
        drop(conn);
        tokio::time::timeout(Duration::from_secs(10), drained)
            .await
            .expect("drained in time")
            .expect("task");
    }

    /// `Worker::from_env().await?.ready().await?` dropped the worker at once, and
    /// `Incoming` ended right after `Ready`.
    #[tokio::test]
    async fn incoming_keeps_the_worker_alive() {
        let (mut reader, writer, worker) = fake_master().await;
        let mut incoming = worker.ready().await.expect("ready");
        drop(worker);
        frame_where(&mut reader, is_ready).await;
        let _client = hand(&writer, 1).await;
        let conn = tokio::time::timeout(Duration::from_secs(10), incoming.accept())
            .await
            .expect("in time");
        assert!(conn.is_some(), "Incoming ended without the worker");
    }

    #[tokio::test]
    async fn a_drain_deadline_beyond_the_clock_is_taken() {
        let (_reader, writer, worker) = fake_master().await;
        let _incoming = worker.ready().await.expect("ready");
        send_drain(&writer, u64::MAX).await;
        tokio::time::timeout(Duration::from_secs(10), worker.draining().cancelled())
            .await
            .expect("drains");
        assert!(worker.deadline().is_some());
    }

    #[tokio::test]
    async fn an_endless_orphan_drain_is_taken() {
        let (_reader, writer, worker) =
            fake_master_with(Worker::builder().orphan_drain(Duration::MAX), None).await;
        let _incoming = worker.ready().await.expect("ready");
        writer.shutdown(); // the master is gone
        tokio::time::timeout(Duration::from_secs(10), worker.draining().cancelled())
            .await
            .expect("drains");
        assert!(worker.master_gone());
        assert!(worker.deadline().is_some());
    }

    /// A panic in the reader (here in the handler it calls) killed the reader alone:
    /// the heartbeats went on, and nothing read the channel any more.
    #[tokio::test]
    async fn a_panic_in_the_reader_ends_the_channel() {
        let (mut reader, writer, worker) = fake_master().await;
        let _guard = worker
            .ready_with(|_conn| panic!("a handler that panics"))
            .await
            .expect("ready");
        frame_where(&mut reader, is_ready).await;
        let _client = hand(&writer, 1).await;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..100 {
                if !matches!(reader.recv::<ToMaster>().await, Ok(Some(_))) {
                    return;
                }
            }
            panic!("the worker keeps talking");
        })
        .await;
        assert!(end.is_ok(), "the worker ends its channel");
        assert!(worker.draining().is_cancelled(), "and drains");
    }

    /// A connection as the worker adopts one, and the client's end (a Unix socket pair,
    /// or a TCP connection on 127.0.0.1).
    fn adopted(kind: ListenerKind) -> (Connection, OwnedFd) {
        let (ours, client): (OwnedFd, OwnedFd) = match kind {
            ListenerKind::Unix => {
                let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
                (a.into(), b.into())
            }
            ListenerKind::Tcp => {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                    .expect("connect");
                (listener.accept().expect("accept").0.into(), client.into())
            }
        };
        let listeners: Arc<[ListenerInfo]> = Arc::from(vec![ListenerInfo {
            kind,
            address: "test".into(),
        }]);
        let counters = Arc::new(Counters::default());
        let conn = Connection::from_fd(0, &listeners, ours, &counters).expect("adopted");
        (conn, client)
    }

    fn stream(fd: OwnedFd) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::from(fd)
    }

    #[tokio::test]
    async fn a_connection_served_at_once_never_needs_the_reactor() {
        use std::io::{Read, Write};
        let (mut conn, client) = adopted(ListenerKind::Unix);
        let mut client = stream(client);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
        // One poll, before the reactor has had a turn: a socket registered with tokio
        // would answer `Pending` here, and the task would wait for the reactor.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut none = ReadBuf::new(&mut []);
        let read = Pin::new(&mut conn).poll_read(&mut cx, &mut none);
        assert!(matches!(read, Poll::Ready(Ok(()))), "no room: {read:?}");
        let mut storage = [0u8; 64];
        let mut buf = ReadBuf::new(&mut storage);
        let read = Pin::new(&mut conn).poll_read(&mut cx, &mut buf);
        assert!(matches!(read, Poll::Ready(Ok(()))), "{read:?}");
        assert_eq!(buf.filled(), b"GET / HTTP/1.1\r\n\r\n");
        let answer = [
            io::IoSlice::new(b"HTTP/1.1 200 OK\r\n"),
            io::IoSlice::new(b"\r\n"),
        ];
        let wrote = Pin::new(&mut conn).poll_write_vectored(&mut cx, &answer);
        assert!(matches!(wrote, Poll::Ready(Ok(19))), "{wrote:?}");
        let wrote = Pin::new(&mut conn).poll_write(&mut cx, b"!");
        assert!(matches!(wrote, Poll::Ready(Ok(1))), "{wrote:?}");
        let shut = Pin::new(&mut conn).poll_shutdown(&mut cx);
        assert!(matches!(shut, Poll::Ready(Ok(()))), "{shut:?}");
        assert!(matches!(conn.io, Io::Direct(..)), "never registered");
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("receive");
        assert_eq!(
            got, b"HTTP/1.1 200 OK\r\n\r\n!",
            "end of file after the shutdown"
        );
    }

    #[tokio::test]
    async fn after_a_short_read_the_next_read_wakes_its_task_instead_of_asking_the_socket() {
        use std::io::Write;
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (mut conn, client) = adopted(ListenerKind::Unix);
        let mut client = stream(client);
        client.write_all(b"first").expect("send");
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut storage = [0u8; 64];
        let mut buf = ReadBuf::new(&mut storage);
        let read = Pin::new(&mut conn).poll_read(&mut cx, &mut buf);
        assert!(matches!(read, Poll::Ready(Ok(()))), "{read:?}");
        assert_eq!(buf.filled(), b"first");
        // Short: the socket is empty. More comes, but the next read does not ask.
        client.write_all(b"second").expect("send");
        let mut buf = ReadBuf::new(&mut storage);
        assert!(
            Pin::new(&mut conn)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken at once");
        assert!(matches!(conn.io, Io::Direct(..)), "and not registered");
        // The one after it asks, still directly.
        let read = Pin::new(&mut conn).poll_read(&mut cx, &mut buf);
        assert!(matches!(read, Poll::Ready(Ok(()))), "{read:?}");
        assert_eq!(buf.filled(), b"second");
        assert!(matches!(conn.io, Io::Direct(..)));
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_the_socket_and_waits_for_the_reactor() {
        use std::io::Write;
        let (mut conn, client) = adopted(ListenerKind::Unix);
        let mut client = stream(client);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = [0u8; 64];
        let mut buf = ReadBuf::new(&mut storage);
        assert!(
            Pin::new(&mut conn)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert!(matches!(conn.io, Io::Registered(Socket::Unix(_))));
        let writer = std::thread::spawn(move || {
            client.write_all(b"late").expect("send");
            client
        });
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut got))
            .await
            .expect("woken by the reactor")
            .expect("read");
        assert_eq!(&got, b"late");
        let mut client = writer.join().expect("writer");
        conn.write_all(b"ok").await.expect("write");
        conn.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut back).expect("receive");
        assert_eq!(back, b"ok");
    }

    #[tokio::test]
    async fn a_write_that_would_block_registers_the_socket_and_waits_for_the_reactor() {
        let (mut conn, client) = adopted(ListenerKind::Unix);
        let mut client = stream(client);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let chunk = [7u8; 16 * 1024];
        let mut sent = 0usize;
        // Fill the socket's buffer; bounded: a Unix socket's holds far less than this.
        for _ in 0..10_000 {
            match Pin::new(&mut conn).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => panic!("write: {e}"),
                Poll::Pending => break,
            }
        }
        assert!(matches!(conn.io, Io::Registered(_)), "registered once full");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut all).expect("receive");
            all.len()
        });
        tokio::time::timeout(Duration::from_secs(10), conn.write_all(b"end"))
            .await
            .expect("woken by the reactor")
            .expect("write");
        conn.shutdown().await.expect("shutdown");
        drop(conn);
        assert_eq!(reader.join().expect("reader"), sent + 3);
    }

    #[tokio::test]
    async fn a_tcp_connection_tells_its_addresses_before_and_after_registration() {
        let (mut conn, client) = adopted(ListenerKind::Tcp);
        let client = std::net::TcpStream::from(client);
        assert!(matches!(conn.io, Io::Direct(..)));
        assert_eq!(conn.peer_addr(), Some(client.local_addr().expect("addr")));
        assert_eq!(conn.local_addr(), Some(client.peer_addr().expect("addr")));
        assert!(conn.fd().is_some());
        let peer = conn.peer_addr();
        assert!(matches!(conn.socket().expect("registered"), Socket::Tcp(_)));
        assert!(matches!(conn.io, Io::Registered(_)));
        assert_eq!(conn.peer_addr(), peer);
        let (socket, _guard) = conn.into_parts().expect("parts");
        let Socket::Tcp(socket) = socket else {
            panic!("a TCP listener's connection is TCP");
        };
        assert_eq!(socket.peer_addr().ok(), peer);
        // A Unix socket's connection has no addresses.
        let (unix, _client) = adopted(ListenerKind::Unix);
        assert_eq!((unix.peer_addr(), unix.local_addr()), (None, None));
    }

    /// A worker that cannot read its master's frames any more ended its drain but kept
    /// the channel open: the master went on sending it connections, unread.
    #[tokio::test]
    async fn a_worker_that_gets_garbage_from_its_master_ends_the_channel() {
        let (mut reader, writer, worker) = fake_master().await;
        // A frame length beyond any frame's.
        writer.send(&[0xff; 16], &[]).await.expect("send garbage");
        let mut frames = 0;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = reader.recv::<crate::protocol::ToMaster>().await {
                frames += 1;
                assert!(frames < 100, "the worker keeps talking");
            }
        })
        .await;
        assert!(end.is_ok(), "the worker ends its channel");
        assert!(worker.draining().is_cancelled(), "and drains");
    }

    #[test]
    fn a_reason_is_cut_at_a_character_boundary() {
        // 'é' is two bytes: byte 4096 falls inside one.
        let long = format!("x{}", "é".repeat(3000));
        let cut = bounded_reason(long.clone());
        assert_eq!(cut.len(), MAX_REASON - 1);
        assert!(long.starts_with(&cut));
        assert_eq!(bounded_reason("short".into()), "short");
    }
}
