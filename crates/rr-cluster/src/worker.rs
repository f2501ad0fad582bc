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

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::channel::{self, ChannelError, ChannelReader, ChannelWriter};
use crate::protocol::{
    self, Hello, ListenerInfo, ListenerKind, PROTOCOL_VERSION, ProtocolError, ToMaster, ToWorker,
};
use crate::sys;

/// Environment variable naming the channel descriptor.
pub const ENV_CHANNEL_FD: &str = "RR_CLUSTER_CHANNEL_FD";
/// Environment variable holding the worker's slot.
pub const ENV_WORKER_ID: &str = "RR_CLUSTER_WORKER_ID";
/// Environment variable holding the pool generation.
pub const ENV_GENERATION: &str = "RR_CLUSTER_GENERATION";

/// How long a new worker waits for the master's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose master is gone may take to finish its connections.
const ORPHAN_DRAIN: Duration = Duration::from_secs(10);
/// Connections received but not yet accepted by the application, at most; beyond
/// this the channel backs up and the master skips this worker.
const INCOMING_QUEUE: usize = 256;

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

/// The worker's end of the channel to its master. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hello: Hello,
    writer: Arc<ChannelWriter>,
    counters: Arc<Counters>,
    /// Cancelled when the worker must stop taking connections.
    draining: CancellationToken,
    master_gone: AtomicBool,
    /// Receiving ends handed out once each.
    incoming: Mutex<Option<mpsc::Receiver<Connection>>>,
    messages: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    /// The one sender of connections; dropped (on `Drain` or when the master is gone)
    /// to end `Incoming` once the queued connections are taken.
    incoming_tx: Mutex<Option<mpsc::Sender<Connection>>>,
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicU32,
    served: AtomicU64,
    idle: Notify,
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

impl Worker {
    /// True when this process was started by a master (Node's `cluster.isWorker`).
    pub fn is_worker() -> bool {
        std::env::var_os(ENV_CHANNEL_FD).is_some()
    }

    /// The slot from the environment, without connecting (`None` outside a pool).
    pub fn id_from_env() -> Option<u32> {
        std::env::var(ENV_WORKER_ID).ok()?.parse().ok()
    }

    /// Picks up the channel named by `RR_CLUSTER_CHANNEL_FD` and waits for the master's
    /// `Hello`. Must be called within a tokio runtime, once per process.
    pub async fn from_env() -> Result<Worker, WorkerError> {
        let value = std::env::var(ENV_CHANNEL_FD).map_err(|_| WorkerError::NotAWorker)?;
        let raw: RawFd = value.parse().map_err(|_| WorkerError::BadEnv {
            var: ENV_CHANNEL_FD,
            value: value.clone(),
            reason: "not a descriptor number".into(),
        })?;
        let fd = sys::adopt_inherited_socket(raw).map_err(|e| WorkerError::BadEnv {
            var: ENV_CHANNEL_FD,
            value,
            reason: e.to_string(),
        })?;
        Self::from_fd(fd).await
    }

    /// Like [`Worker::from_env`] with an explicit channel descriptor.
    pub async fn from_fd(fd: OwnedFd) -> Result<Worker, WorkerError> {
        let stream = channel::from_std(std::os::unix::net::UnixStream::from(fd))
            .map_err(ChannelError::Io)?;
        let (mut reader, writer) = channel::split(stream);
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv_hello())
            .await
            .map_err(|_| WorkerError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
            .map_err(|e| match e {
                ChannelError::Protocol(p) => WorkerError::Handshake(p),
                other => WorkerError::Channel(other),
            })?
            .ok_or(WorkerError::MasterGone)?;

        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        let (messages_tx, messages_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            hello,
            writer,
            counters: Arc::default(),
            draining: CancellationToken::new(),
            master_gone: AtomicBool::new(false),
            incoming: Mutex::new(Some(incoming_rx)),
            messages: Mutex::new(Some(messages_rx)),
            incoming_tx: Mutex::new(Some(incoming_tx)),
        });
        tokio::spawn(read_loop(Arc::downgrade(&inner), reader, messages_tx));
        Ok(Worker { inner })
    }

    /// The worker's slot, `0..N`, stable across restarts.
    pub fn id(&self) -> u32 {
        self.inner.hello.worker_id
    }

    /// How many times the pool was reloaded when this worker was started.
    pub fn generation(&self) -> u64 {
        self.inner.hello.generation
    }

    /// The master's listeners; [`Connection::listener`] indexes this list.
    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.inner.hello.listeners
    }

    /// Tells the master this worker takes connections, starts the heartbeat, and
    /// returns the stream of incoming connections. Call once.
    pub async fn ready(&self) -> Result<Incoming, WorkerError> {
        let rx = lock(&self.inner.incoming)
            .take()
            .ok_or(WorkerError::AlreadyReady)?;
        self.inner
            .writer
            .send_msg(&ToMaster::Ready {
                pid: sys::getpid(),
                version: PROTOCOL_VERSION,
            })
            .await?;
        let interval = Duration::from_millis(u64::from(self.inner.hello.heartbeat_ms.max(10)));
        tokio::spawn(heartbeat_loop(Arc::downgrade(&self.inner), interval));
        Ok(Incoming { rx })
    }

    /// Sends an application message to the master (Node's `process.send`).
    pub async fn send(&self, payload: Vec<u8>) -> Result<(), WorkerError> {
        Ok(self.inner.writer.send_msg(&ToMaster::User(payload)).await?)
    }

    /// The application messages from the master (Node's `process.on('message')`).
    /// `None` after the first call.
    pub fn messages(&self) -> Option<mpsc::Receiver<Vec<u8>>> {
        lock(&self.inner.messages).take()
    }

    /// Cancelled when the worker must stop taking new work: the master sent `Drain`,
    /// the worker announced its own end, or the master is gone. Connection handlers
    /// watch it to close keep-alive connections politely.
    pub fn draining(&self) -> CancellationToken {
        self.inner.draining.clone()
    }

    /// True when the master closed the channel (it died or dropped this worker).
    pub fn master_gone(&self) -> bool {
        self.inner.master_gone.load(Ordering::SeqCst)
    }

    /// Connections this worker holds open now.
    pub fn active(&self) -> u32 {
        self.inner.counters.active.load(Ordering::SeqCst)
    }

    /// Completes once the worker is draining and holds no connection.
    pub async fn drained(&self) {
        self.inner.draining.cancelled().await;
        self.inner.counters.idle().await;
    }

    /// Announces that this worker is going down (`Suicide`): the master starts a
    /// replacement at once, sends no more connections and answers with `Drain`.
    /// [`Worker::draining`] is cancelled at once; `Incoming` ends with the `Drain`,
    /// after the connections the master sent before it knew.
    pub async fn suicide(&self, reason: impl Into<String>) -> Result<(), WorkerError> {
        let reason = reason.into();
        self.inner.draining.cancel();
        let sent = self
            .inner
            .writer
            .send_msg(&ToMaster::Suicide { reason })
            .await;
        if sent.is_err() {
            self.inner.begin_drain();
        }
        Ok(sent?)
    }

    /// Installs a panic hook that announces the worker's end to the master (`Suicide`
    /// with the panic message) before the previous hook runs; the worker then drains
    /// as after [`Worker::suicide`].
    pub fn install_panic_hook(&self) {
        let inner = Arc::downgrade(&self.inner);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(inner) = inner.upgrade() {
                let mut reason = format!("panic: {info}");
                reason.truncate(4096);
                inner.draining.cancel();
                if !inner.suicide_blocking(&reason) {
                    inner.begin_drain();
                }
            }
            previous(info);
        }));
    }
}

impl Inner {
    fn begin_drain(&self) {
        self.draining.cancel();
        // Dropping the reader's sender ends `Incoming` once queued connections are taken.
        lock(&self.incoming_tx).take();
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
    let Some((kinds, counters)) = inner.upgrade().map(|i| {
        let kinds: Vec<ListenerKind> = i.hello.listeners.iter().map(|l| l.kind).collect();
        (kinds, Arc::clone(&i.counters))
    }) else {
        return;
    };
    loop {
        let frame = reader.recv::<ToWorker>().await;
        let Some(this) = inner.upgrade() else { return };
        match frame {
            Ok(Some((ToWorker::Connections { listener, .. }, fds))) => {
                counters
                    .served
                    .fetch_add(fds.len() as u64, Ordering::Relaxed);
                let kind = kinds.get(usize::from(listener)).copied();
                // Delivered until the master's `Drain` (which follows every connection it
                // sent) or until the application drops `Incoming`; a connection that
                // cannot be delivered is closed here.
                let tx = lock(&this.incoming_tx).clone();
                for fd in fds {
                    let Some(conn) = Connection::from_fd(listener, kind, fd, &counters) else {
                        continue;
                    };
                    if let Some(tx) = &tx {
                        let _ = tx.send(conn).await;
                    }
                }
            }
            Ok(Some((ToWorker::Drain { deadline_ms }, _))) => {
                tracing::debug!(deadline_ms, "drain requested");
                this.begin_drain();
            }
            Ok(Some((ToWorker::Ping, _))) => {
                let writer = Arc::clone(&this.writer);
                tokio::spawn(async move { writer.send_msg(&ToMaster::Pong).await });
            }
            Ok(Some((ToWorker::User(payload), _))) => {
                let _ = messages.send(payload).await;
            }
            Ok(Some((ToWorker::Hello(_), _))) => {
                tracing::warn!("unexpected second Hello from the master; ignored");
            }
            Ok(None) | Err(_) => {
                if let Err(e) = frame {
                    tracing::error!(error = %e, "channel to the master failed");
                }
                this.master_gone.store(true, Ordering::SeqCst);
                this.begin_drain();
                // No orphan outlives its master: finish what is open, then exit.
                let counters = Arc::clone(&this.counters);
                drop(this);
                orphan_exit(counters).await;
                return;
            }
        }
    }
}

/// The master is gone: wait (bounded) for open connections to finish, then exit the
/// process. Nothing would hand this worker work again.
async fn orphan_exit(counters: Arc<Counters>) {
    let _ = tokio::time::timeout(ORPHAN_DRAIN, counters.idle()).await;
    // Give the application a moment to return from main on its own.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tracing::warn!("master gone; worker exiting");
    std::process::exit(0);
}

async fn heartbeat_loop(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(this) = inner.upgrade() else { return };
        let beat = ToMaster::Heartbeat {
            active: this.counters.active.load(Ordering::Relaxed),
            served: this.counters.served.load(Ordering::Relaxed),
        };
        let writer = Arc::clone(&this.writer);
        drop(this);
        if writer.send_msg(&beat).await.is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connections handed to this worker, in the order the master sent them. Ends when
/// the worker drains or the master is gone.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Connection>,
}

impl Incoming {
    /// The next connection; `None` once the worker drains.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Incoming {
    type Item = Connection;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Connection>> {
        self.rx.poll_recv(cx)
    }
}

/// The socket of an accepted connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix-socket listener.
    Unix(UnixStream),
}

/// Keeps a connection counted as active (for heartbeats and least-connections
/// balancing) until dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    counters: Arc<Counters>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.counters.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.counters.idle.notify_waiters();
        }
    }
}

/// An accepted connection the master handed to this worker. Reads and writes go to
/// the socket; the connection counts as active until dropped.
#[derive(Debug)]
pub struct Connection {
    listener: u16,
    stream: Stream,
    guard: ActiveGuard,
}

impl Connection {
    fn from_fd(
        listener: u16,
        kind: Option<ListenerKind>,
        fd: OwnedFd,
        counters: &Arc<Counters>,
    ) -> Option<Connection> {
        let stream = match kind {
            Some(ListenerKind::Tcp) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true).ok()?;
                let _ = std.set_nodelay(true);
                Stream::Tcp(TcpStream::from_std(std).ok()?)
            }
            Some(ListenerKind::Unix) => {
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true).ok()?;
                Stream::Unix(UnixStream::from_std(std).ok()?)
            }
            None => {
                tracing::warn!(listener, "connection for an unknown listener; closed");
                return None;
            }
        };
        counters.active.fetch_add(1, Ordering::SeqCst);
        Some(Connection {
            listener,
            stream,
            guard: ActiveGuard {
                counters: Arc::clone(counters),
            },
        })
    }

    /// Which listener accepted it (an index into [`Worker::listeners`]).
    pub fn listener(&self) -> u16 {
        self.listener
    }

    /// The socket.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The TCP socket, if it is one.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// The socket and the guard that keeps it counted as active.
    pub fn into_parts(self) -> (Stream, ActiveGuard) {
        (self.stream, self.guard)
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
