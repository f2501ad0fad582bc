//! A drain-correct HTTP server for workers: HTTP/1.1 and HTTP/2 over cleartext (told
//! apart by the HTTP/2 preface, as hyper-util's `auto` does), on the connections the
//! master passes.
//!
//! The point is the drain. A rolling reload must not lose a request, and with
//! keep-alive that takes more than hyper's graceful shutdown (which closes idle
//! keep-alive connections and connections whose first request was not read yet: a
//! client that sends a request at that moment loses it). Once the master says drain:
//!
//! - every connection already passed to the worker is served (the queued ones too);
//! - every HTTP/1 response carries `Connection: close`, so the client opens its next
//!   request on a new connection, which the master sends to another worker;
//! - HTTP/2 connections get GOAWAY at once (streams in flight finish);
//! - an HTTP/1 connection is closed once no byte went either way through a whole
//!   grace period (2 s by default), not at once: a request may be on its way;
//! - [`Server::serve`] returns once every connection is closed, or at the master's
//!   deadline; return from `main` then.
//!
//! A handler may answer before it has read the request's body (a `413` to a large
//! upload): the connection, closed after that answer, lingers if the body is still
//! coming in (what the client still sends is read and discarded, for up to 2 s), so
//! that the client gets the answer rather than a reset.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use rr_cluster::{Worker, http};
//!
//! # async fn demo() -> Result<(), rr_cluster::WorkerError> {
//! let worker = Worker::from_env().await?;
//! worker.install_panic_hook();
//! let hello = hyper::service::service_fn(|_req| async {
//!     Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
//!         bytes::Bytes::from_static(b"hello\n"),
//!     )))
//! });
//! http::serve(worker, hello).await
//! # }
//! ```
//!
//! An axum `Router` is a tower service: [`serve_tower`] (or [`Server::serve_tower`]).
//! There handlers see the client's address as the [`PeerAddr`] request extension, and,
//! with the `axum` feature, as `axum::extract::ConnectInfo<SocketAddr>`
//! ([`Server::connect_info`]; on by default for tower services, off for hyper
//! services, where it costs an allocation per request).

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming as IncomingBody;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio_util::either::Either;

use crate::worker::{Connection, Worker, WorkerError};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The client's address, as a request extension (`req.extensions().get::<PeerAddr>()`).
/// Absent for a connection from a Unix-socket listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Serves `service` on every connection the master passes to `worker` (with the
/// defaults of [`Server`]), then returns once drained.
pub async fn serve<S, B>(worker: Worker, service: S) -> Result<(), WorkerError>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::new(worker).serve(service).await
}

/// Serves a tower service (an axum `Router`, say) on every connection the master
/// passes to `worker`, then returns once drained.
pub async fn serve_tower<S, B>(worker: Worker, service: S) -> Result<(), WorkerError>
where
    S: tower_service::Service<Request<IncomingBody>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::new(worker).serve_tower(service).await
}

/// The HTTP server of a worker, with its settings.
#[derive(Debug)]
pub struct Server {
    worker: Worker,
    idle_grace: Duration,
    connect_info: Option<bool>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Server {
    /// A server for `worker`'s connections: HTTP/1.1 with keep-alive and HTTP/2 over
    /// cleartext, an idle grace of 2 s.
    pub fn new(worker: Worker) -> Server {
        Server {
            worker,
            idle_grace: Duration::from_secs(2),
            connect_info: None,
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
        }
    }

    /// Hands every request the client's address as a [`PeerAddr`] extension (and
    /// `axum::extract::ConnectInfo<SocketAddr>` with the `axum` feature). Default: on
    /// for [`Server::serve_tower`], off for [`Server::serve`].
    pub fn connect_info(mut self, on: bool) -> Server {
        self.connect_info = Some(on);
        self
    }

    /// Once draining, how long an HTTP/1 keep-alive connection must stay idle (no byte
    /// read or written) before it is closed (default 2 s; keep it at 1 s or more). A
    /// request that arrives meanwhile is answered with `Connection: close`.
    pub fn idle_grace(mut self, grace: Duration) -> Server {
        self.idle_grace = grace;
        self
    }

    /// hyper's HTTP/1 connection builder, for HTTP/1 settings (keep-alive, header
    /// limits, a timer for header read timeouts). Connections are served with
    /// upgrades (WebSocket) enabled. A header read timeout starts once a connection's
    /// first bytes arrived: before the drain, a connection that never says anything
    /// is kept, as by hyper without a timer (and hyper-util's `auto`).
    pub fn http1_mut(&mut self) -> &mut http1::Builder {
        &mut self.http1
    }

    /// hyper's HTTP/2 connection builder, for HTTP/2 settings (stream limits, window
    /// sizes, keep-alive pings with a timer).
    pub fn http2_mut(&mut self) -> &mut http2::Builder<TokioExecutor> {
        &mut self.http2
    }

    /// Says `Ready`, serves `service` (a hyper service) on every connection, and
    /// returns once the worker drained: every connection closed, or the master's
    /// deadline reached.
    pub async fn serve<S, B>(self, service: S) -> Result<(), WorkerError>
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Server {
            worker,
            idle_grace,
            connect_info,
            http1,
            http2,
        } = self;
        let connect_info = connect_info.unwrap_or(false);
        let builders = Arc::new((http1, http2));
        let drain = Arc::new(Drain::default());
        // Each connection's task is spawned by the task that takes the connection (off
        // the master's channel, or the shared listener): no queue and no task hop
        // between. If this future is dropped, so is `_direct`, and with it the handler.
        let _direct = {
            let (builders, drain) = (Arc::clone(&builders), Arc::clone(&drain));
            let runtime = tokio::runtime::Handle::current();
            worker
                .ready_with(move |conn| {
                    runtime.spawn(connection(
                        conn,
                        service.clone(),
                        Arc::clone(&builders),
                        Arc::clone(&drain),
                        idle_grace,
                        connect_info,
                    ));
                })
                .await?
        };
        // One task hears of the drain, raises the flag and wakes every connection:
        // connections do not each wait on the cancellation token, nor ask it (a lock
        // either way).
        let announcer = {
            let (drain, draining) = (Arc::clone(&drain), worker.draining());
            tokio::spawn(async move {
                draining.cancelled().await;
                drain.start();
            })
        };
        // The worker drains, and the last connection the master sent is spawned.
        worker.shutdown_signal().await;
        drop(announcer);
        // Every connection closed, or the deadline. Not every task done: a connection
        // upgraded (WebSocket) lives on in the application's hands, its task ended.
        worker.drained().await;
        Ok(())
    }

    /// [`Server::serve`] for a tower service (an axum `Router`).
    pub async fn serve_tower<S, B>(self, service: S) -> Result<(), WorkerError>
    where
        S: tower_service::Service<Request<IncomingBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let connect_info = self.connect_info.unwrap_or(true);
        self.connect_info(connect_info)
            .serve(TowerToHyperService::new(service))
            .await
    }
}

/// Serves one connection with the drain rules.
async fn connection<S, B>(
    conn: Connection,
    service: S,
    builders: Arc<(http1::Builder, http2::Builder<TokioExecutor>)>,
    drain: Arc<Drain>,
    idle_grace: Duration,
    connect_info: bool,
) where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let peer = if connect_info { conn.peer_addr() } else { None };
    serve_io(conn, service, peer, &builders, &drain, idle_grace).await;
}

/// Serves one connection (any byte stream) with the drain rules; `service` sees
/// `peer` as the client's address.
async fn serve_io<I, S, B>(
    io: I,
    service: S,
    peer: Option<SocketAddr>,
    builders: &(http1::Builder, http2::Builder<TokioExecutor>),
    drain: &Arc<Drain>,
    idle_grace: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let wake = drain.register();
    let mut io = ReadAhead::new(io, Arc::clone(&wake.slot));
    let service = DrainAware {
        inner: service,
        drain: Arc::clone(drain),
        peer,
        slot: &wake.slot,
    };
    // Which protocol: the first bytes tell. A connection that says nothing before the
    // drain gets the idle grace to do so, like an idle keep-alive connection. Before
    // the drain it may wait for ever, as with hyper alone (and hyper-util's `auto`):
    // hyper's header read timeout, with a timer, starts once the first bytes came.
    let sniffed = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = io.poll_sniff(cx) {
            return Poll::Ready(Some(r));
        }
        wake.register(cx.waker());
        if drain.is_draining() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    let sniffed = match sniffed {
        Some(r) => r,
        None => {
            // The grace begins again whenever bytes arrive (an HTTP/2 preface in
            // parts): only a connection silent through a whole grace is closed. At
            // most one new grace per byte of the preface.
            let mut grace = std::pin::pin!(tokio::time::sleep(idle_grace));
            let mut seen = io.buf.len();
            let sniffed = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = io.poll_sniff(cx) {
                    return Poll::Ready(Some(r));
                }
                while grace.as_mut().poll(cx).is_ready() {
                    if io.buf.len() == seen || idle_grace.is_zero() {
                        return Poll::Ready(None);
                    }
                    seen = io.buf.len();
                    let deadline = tokio::time::Instant::now() + idle_grace;
                    grace.as_mut().reset(deadline);
                }
                Poll::Pending
            })
            .await;
            match sniffed {
                Some(r) => r,
                None => return,
            }
        }
    };
    let (h1, h2) = builders;
    match sniffed {
        // HTTP/2's connection is twice HTTP/1's in size, and rare here: boxed, so that
        // it does not make every connection's task (moved on spawn) bigger.
        Ok(Protocol::Http2) => {
            let http = Box::pin(h2.serve_connection(TokioIo::new(io), service));
            Drive::new(http, true, drain, &wake.slot, idle_grace, |c| {
                c.get_mut().as_mut().graceful_shutdown()
            })
            .await;
        }
        Ok(Protocol::Http1) => {
            let http = h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            Drive::new(http, false, drain, &wake.slot, idle_grace, |c| {
                c.graceful_shutdown()
            })
            .await;
        }
        Err(_) => {}
    }
}

pin_project_lite::pin_project! {
    /// A hyper connection run to its end, shut down by the drain rules once the worker
    /// drains: HTTP/2 at once (GOAWAY; the streams in flight finish), HTTP/1 once it
    /// stays idle (no byte read or written) through a whole `idle_grace`: the grace
    /// begins with the drain, and again whenever it ends on a connection that was not
    /// idle. Requests still arriving are answered with `Connection: close` by
    /// [`DrainAware`]; one that outlasts a grace is answered with it by hyper (its
    /// graceful shutdown of a busy connection), which then closes.
    ///
    /// A future of its own rather than an `async fn`: an `async fn` would keep the
    /// connection twice in its state (the argument, then the pinned local), and every
    /// connection's task is moved when spawned.
    struct Drive<'a, C, F> {
        #[pin]
        http: C,
        h2: bool,
        drain: &'a Drain,
        slot: &'a Slot,
        idle_grace: Duration,
        graceful_shutdown: Option<F>,
        // Allocated only once draining (an HTTP/1 connection's grace).
        grace: Option<Pin<Box<Grace>>>,
    }
}

pin_project_lite::pin_project! {
    /// A draining HTTP/1 connection's idle grace.
    struct Grace {
        #[pin]
        sleep: tokio::time::Sleep,
        // The connection's traffic when this grace began.
        traffic: usize,
    }
}

impl Grace {
    fn new(slot: &Slot, idle_grace: Duration) -> Grace {
        Grace {
            sleep: tokio::time::sleep(idle_grace),
            traffic: slot.traffic(),
        }
    }

    /// Ready once no byte went either way through a whole grace; a grace that ends on
    /// a connection that was not idle begins again.
    fn poll_idle(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slot: &Slot,
        idle_grace: Duration,
    ) -> Poll<()> {
        let mut this = self.project();
        std::task::ready!(this.sleep.as_mut().poll(cx));
        let traffic = slot.traffic();
        if traffic == *this.traffic || idle_grace.is_zero() {
            return Poll::Ready(());
        }
        *this.traffic = traffic;
        let deadline = tokio::time::Instant::now() + idle_grace;
        this.sleep.as_mut().reset(deadline);
        this.sleep.poll(cx)
    }
}

impl<'a, C, F> Drive<'a, C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>),
{
    fn new(
        http: C,
        h2: bool,
        drain: &'a Drain,
        slot: &'a Slot,
        idle_grace: Duration,
        graceful_shutdown: F,
    ) -> Self {
        Drive {
            http,
            h2,
            drain,
            slot,
            idle_grace,
            graceful_shutdown: Some(graceful_shutdown),
            grace: None,
        }
    }
}

impl<C, F> Future for Drive<'_, C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>),
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.http.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let Some(shutdown) = this.graceful_shutdown.take() else {
            return Poll::Pending; // shut down already: the connection ends by itself
        };
        if this.grace.is_none() {
            this.slot.waker.register(cx.waker());
            if !this.drain.is_draining() {
                *this.graceful_shutdown = Some(shutdown);
                return Poll::Pending;
            }
            if !*this.h2 {
                *this.grace = Some(Box::pin(Grace::new(this.slot, *this.idle_grace)));
            }
        }
        if let Some(grace) = this.grace.as_mut() {
            if grace
                .as_mut()
                .poll_idle(cx, this.slot, *this.idle_grace)
                .is_pending()
            {
                *this.graceful_shutdown = Some(shutdown);
                return Poll::Pending;
            }
        }
        // Idle through a whole grace after the answer to a request with a body (its
        // writing is traffic), an HTTP/1 connection was kept open by hyper, which
        // does so only once the body was read to the end: closed now, it has nothing
        // to linger for (a pooled client may never close its end). A request still
        // under way (a slow handler moves no byte) keeps its linger.
        if this.slot.body.load(Ordering::Relaxed) == BODY_ANSWERED {
            this.slot.body.store(BODY_NONE, Ordering::Relaxed);
        }
        shutdown(this.http.as_mut());
        this.http.poll(cx).map(|_| ())
    }
}

/// The protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes the first read of a connection asks the kernel for.
const READ_AHEAD: usize = 4096;

thread_local! {
    /// Where the first reads of this thread's connections land: one buffer per thread,
    /// lent for the read only. A connection waiting for its first bytes holds no
    /// buffer, and the bytes it read are kept in an allocation of their own size.
    /// Requests of up to about 1 KiB are served from `malloc`'s per-thread cache; one
    /// of [`READ_AHEAD`] bytes per connection would make glibc consolidate its fast
    /// bins.
    static SCRATCH: std::cell::Cell<Option<Box<[u8]>>> = const { std::cell::Cell::new(None) };
}

/// A connection whose first bytes are read ahead, to tell the protocol, and then
/// handed to hyper from memory.
///
/// hyper-util's `auto` connection reads at most 24 bytes first (the length of the
/// HTTP/2 preface), then hyper reads the rest of the request: two system calls where
/// one does, and two wrappers (`auto`'s and its `Rewind`) on every later read and
/// poll. Here the first read takes up to [`READ_AHEAD`] bytes, the protocol is told
/// from them, and hyper's HTTP/1 or HTTP/2 connection is served directly; once the
/// buffered bytes are handed out, every read and write goes straight to the
/// connection, counted in the connection's [`Slot`] (a plain increment).
#[derive(Debug)]
struct ReadAhead<I> {
    io: I,
    /// Where the reads and writes are counted.
    slot: Arc<Slot>,
    /// The bytes read ahead (empty, with no storage, once handed out).
    buf: Vec<u8>,
    /// How many of them hyper has had.
    handed: usize,
    /// The connection said end of file while the protocol was told.
    eof: bool,
    /// The lingering close under way (allocated only for it).
    linger: Option<Pin<Box<Linger>>>,
}

impl<I> ReadAhead<I> {
    fn new(io: I, slot: Arc<Slot>) -> ReadAhead<I> {
        ReadAhead {
            io,
            slot,
            buf: Vec::new(),
            handed: 0,
            eof: false,
            linger: None,
        }
    }
}

/// How long a lingering close reads what the client still sends, at most.
const LINGER: Duration = Duration::from_secs(2);

/// How many bytes a lingering close reads (and discards), at most.
const LINGER_BYTES: usize = 8 << 20;

/// Bytes a lingering close asks the kernel for at a time.
const LINGER_READ: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// A lingering close: the answer is out and the sending side shut down (the client
    /// reads the end of file after the answer); then what the client still sends is
    /// read and discarded until it closes its side too, for [`LINGER`] or
    /// [`LINGER_BYTES`] at most.
    ///
    /// A handler may answer before it has read the request's body (a `413` to a large
    /// upload, a `401`): hyper then reads a little of the body and stops reading, and
    /// the connection closes once the answer is written. Closed with unread input, a
    /// TCP socket is reset (RST), and the kernel discards what of the answer the client
    /// has not read yet: a client that sends its whole body before it reads (most do)
    /// gets `ECONNRESET` (or `EPIPE`) instead of the answer. In a drain, where every
    /// connection closes after its answer, that is every such request.
    ///
    /// Only a connection whose last HTTP/1 request came with a body ([`Slot::body`])
    /// lingers, and a request without a body costs nothing more. A connection the drain
    /// closes because it stayed idle through a whole grace after its answer has read
    /// its last body to the end (hyper keeps a connection open only then): it closes
    /// at once, though a pooled client may never close its end. Another close after a body (the client
    /// asked for it, or the handler answered without reading all of it) lingers until
    /// the client's end of file, which comes at once from a client that read the
    /// answer, or the time or byte budget is out.
    #[derive(Debug)]
    struct Linger {
        #[pin]
        until: tokio::time::Sleep,
        // Bytes that may still be read.
        left: usize,
        buf: [u8; LINGER_READ],
    }
}

impl Linger {
    /// A linger that may read `left` bytes more.
    fn new(left: usize) -> Pin<Box<Linger>> {
        Box::pin(Linger {
            until: tokio::time::sleep(LINGER),
            left,
            buf: [0; LINGER_READ],
        })
    }

    /// Reads and discards until the client's end of file (or an error), the byte
    /// budget or the time is used up.
    fn poll_drain<I: tokio::io::AsyncRead + Unpin>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        io: &mut I,
    ) -> Poll<()> {
        let mut this = self.project();
        // Bounded: every turn reads at least one byte of the budget, or ends.
        while *this.left > 0 {
            let mut read = tokio::io::ReadBuf::new(&mut this.buf[..]);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    *this.left = this.left.saturating_sub(read.filled().len());
                }
                Poll::Ready(_) => *this.left = 0, // the end of file, or the socket failed
                Poll::Pending => {
                    if this.until.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *this.left = 0;
                }
            }
        }
        Poll::Ready(())
    }
}

impl<I: tokio::io::AsyncRead + Unpin> ReadAhead<I> {
    /// Reads until the bytes so far tell the HTTP/2 preface from anything else (which
    /// is served as HTTP/1: hyper answers what is not HTTP). Usually one read. End of
    /// file counts as HTTP/1, where hyper sees it and ends the connection.
    fn poll_sniff(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Protocol>> {
        loop {
            let n = self.buf.len().min(H2_PREFACE.len());
            if self.buf[..n] != H2_PREFACE[..n] {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            if n == H2_PREFACE.len() {
                return Poll::Ready(Ok(Protocol::Http2));
            }
            if self.eof {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            // Taken out of the thread's slot for the read, so that a nested use (an
            // `I` that is itself a `ReadAhead`) gets a buffer of its own.
            let mut scratch = SCRATCH
                .take()
                .unwrap_or_else(|| vec![0; READ_AHEAD].into_boxed_slice());
            let mut read = tokio::io::ReadBuf::new(&mut scratch);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut read);
            if let Poll::Ready(Ok(())) = polled {
                self.slot.count();
                self.buf.extend_from_slice(read.filled());
                self.eof = read.filled().is_empty();
            }
            SCRATCH.set(Some(scratch));
            std::task::ready!(polled)?;
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadAhead<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.handed < this.buf.len() {
            let rest = &this.buf[this.handed..];
            let n = rest.len().min(out.remaining());
            out.put_slice(&rest[..n]);
            this.handed += n;
            if this.handed == this.buf.len() {
                this.buf = Vec::new();
                this.handed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_read(cx, out);
        if polled.is_ready() {
            this.slot.count();
        }
        polled
    }
}

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for ReadAhead<I>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        if polled.is_ready() {
            this.slot.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if polled.is_ready() {
            this.slot.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Shuts the sending side down; then, if the last request came with a body,
    /// completes only once the [`Linger`] is over.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let linger = match &mut this.linger {
            Some(linger) => linger,
            None => {
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                if this.slot.body.load(Ordering::Relaxed) == BODY_NONE {
                    return Poll::Ready(Ok(()));
                }
                this.linger.insert(Linger::new(LINGER_BYTES))
            }
        };
        linger.as_mut().poll_drain(cx, &mut this.io).map(Ok)
    }
}

/// The worker's drain as its connections see it: a flag, and the wakers of the open
/// connections, woken all at once when it is raised.
#[derive(Debug, Default)]
struct Drain {
    draining: AtomicBool,
    wakers: std::sync::Mutex<Slots>,
}

/// The open connections' wakers, each in a slot a connection holds while it lives.
/// A closing connection empties its waker (and so lets go of its task) and frees its
/// slot; the slot's `Arc` stays for the next connection. Allocated and freed with
/// every connection, the wakers would cost `malloc` and `free` a call each; freed in
/// bulk, they would empty `malloc`'s per-thread cache for their size and fill its
/// fast bins, which the next large allocation then consolidates.
#[derive(Debug, Default)]
struct Slots {
    wakers: Vec<Arc<Slot>>,
    free: Vec<usize>,
}

/// A connection's slot: its task's waker, and its traffic.
#[derive(Debug, Default)]
struct Slot {
    waker: AtomicWaker,
    /// The reads and writes of the connection's [`ReadAhead`] that moved bytes (or
    /// saw the end of file), so that [`Drive`] tells an idle connection once
    /// draining. Counted by the connection's task alone, with a plain load and store
    /// (no locked instruction); an atomic so that the slot may be shared.
    traffic: AtomicUsize,
    /// Whether the last HTTP/1 request came with a body ([`BODY_NONE`],
    /// [`BODY_RUNNING`], [`BODY_ANSWERED`]; set by [`DrainAware`] for each request):
    /// some of it may be left unread when the connection closes, and the close then
    /// lingers ([`Linger`]). Cleared when the slot is freed, and by the drain's close
    /// of a connection idle since the answer ([`Drive`]).
    body: AtomicU8,
}

/// [`Slot::body`]: the last request had no body (or the connection is closed idle).
const BODY_NONE: u8 = 0;
/// [`Slot::body`]: the last request came with a body, and nothing was written since.
const BODY_RUNNING: u8 = 1;
/// [`Slot::body`]: the last request came with a body, and bytes were written since
/// (its answer, or a `100 Continue`).
const BODY_ANSWERED: u8 = 2;

impl Slot {
    fn traffic(&self) -> usize {
        self.traffic.load(Ordering::Relaxed)
    }

    #[inline]
    fn count(&self) {
        let t = self.traffic.load(Ordering::Relaxed);
        self.traffic.store(t.wrapping_add(1), Ordering::Relaxed);
    }

    /// A write moved bytes: traffic, and the answer to a request with a body has begun.
    #[inline]
    fn wrote(&self) {
        self.count();
        if self.body.load(Ordering::Relaxed) == BODY_RUNNING {
            self.body.store(BODY_ANSWERED, Ordering::Relaxed);
        }
    }
}

/// A connection's slot in the [`Drain`]; freed on drop.
struct Registration<'a> {
    drain: &'a Drain,
    index: usize,
    slot: Arc<Slot>,
}

impl std::ops::Deref for Registration<'_> {
    type Target = AtomicWaker;

    fn deref(&self) -> &AtomicWaker {
        &self.slot.waker
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // Emptied before the slot is freed: a free slot may serve the next connection
        // at once, and its waker must not be taken.
        drop(self.slot.waker.take());
        // Not carried over to the next connection, nor to a tunnel (the application's
        // shutdown of an upgraded connection does not linger).
        self.slot.body.store(BODY_NONE, Ordering::Relaxed);
        let mut slots = self.drain.slots();
        // A tunnel (an upgraded connection, in the application's hands) still counts
        // its traffic in the slot: the slot goes with it, a new one takes its place.
        if Arc::strong_count(&self.slot) > 2 {
            slots.wakers[self.index] = Arc::default();
        }
        slots.free.push(self.index);
    }
}

impl Drain {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A waker slot for a new connection, freed when the registration is dropped.
    fn register(&self) -> Registration<'_> {
        let mut slots = self.slots();
        let (index, slot) = match slots.free.pop() {
            Some(index) => (index, Arc::clone(&slots.wakers[index])),
            None => {
                let slot = Arc::new(Slot::default());
                slots.wakers.push(Arc::clone(&slot));
                (slots.wakers.len() - 1, slot)
            }
        };
        drop(slots);
        Registration {
            drain: self,
            index,
            slot,
        }
    }

    /// Whether the worker drains. A connection registers its waker first, then asks:
    /// it either sees the flag or is woken by [`Drain::start`].
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Raises the flag, then wakes every open connection.
    fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let slots = self.slots();
        for slot in &slots.wakers {
            slot.waker.wake();
        }
    }
}

/// Marks responses to requests that arrive once draining `Connection: close`
/// (HTTP/1; not a tunnel's `101` or CONNECT `2xx`), hands handlers the client's
/// address, and tells the connection's [`Slot`] whether the last HTTP/1 request came
/// with a body (which the handler may leave unread: see [`Linger`]).
#[derive(Debug, Clone)]
struct DrainAware<'a, S> {
    inner: S,
    drain: Arc<Drain>,
    peer: Option<SocketAddr>,
    slot: &'a Slot,
}

impl<S, B> Service<Request<IncomingBody>> for DrainAware<'_, S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Either<S::Future, DrainAwareFuture<S::Future>>;

    fn call(&self, mut req: Request<IncomingBody>) -> Self::Future {
        let h1 = req.version() < Version::HTTP_2;
        if h1 {
            // A request without a body (every GET) costs a test of the body's kind and
            // a store. hyper reads the next request only once this one's body is done:
            // whatever an earlier body left is behind us. A tunnel's bytes after its
            // `101` or `2xx` are the application's, not a body to discard.
            let body = !req.body().is_end_stream()
                && req.method() != http::Method::CONNECT
                && !req.headers().contains_key(http::header::UPGRADE);
            let body = if body { BODY_RUNNING } else { BODY_NONE };
            self.slot.body.store(body, Ordering::Relaxed);
        }
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(PeerAddr(peer));
            #[cfg(feature = "axum")]
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        // Until the drain, the service's own future, untouched. A request that arrives
        // before the drain and ends after it keeps its keep-alive (unless it outlasts a
        // grace: then hyper's graceful shutdown marks it `Connection: close`): the
        // connection is closed only once idle through a whole grace after the answer,
        // and the client's next request, within it, is answered with `Connection: close`.
        if !h1 || !self.drain.is_draining() {
            return Either::Left(self.inner.call(req));
        }
        let connect = req.method() == http::Method::CONNECT;
        Either::Right(DrainAwareFuture {
            inner: self.inner.call(req),
            connect,
        })
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainAware`].
    #[derive(Debug)]
    struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
        // The request is a CONNECT.
        connect: bool,
    }
}

impl<F, B, E> Future for DrainAwareFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        // A tunnel's answer (an upgrade's `101`, a CONNECT's `2xx`) is left alone: the
        // connection leaves HTTP, and `Connection: close` would replace an upgrade's
        // `Connection: upgrade`, which a WebSocket client requires.
        let status = response.status();
        let tunnel = status == http::StatusCode::SWITCHING_PROTOCOLS
            || (*this.connect && status.is_success());
        if !tunnel {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(feature = "axum")]
mod axum_listener {
    use super::*;
    use crate::worker::Incoming;

    /// `axum::serve(incoming, app)`: the master's connections as an axum listener
    /// (the address is the client's; `0.0.0.0:0` for a Unix-socket connection).
    ///
    /// After the worker drains, `accept` never completes: use
    /// `with_graceful_shutdown(worker.shutdown_signal())`. axum's graceful shutdown
    /// closes idle keep-alive connections at once, so a client may lose a request
    /// sent at that moment: [`serve_tower`] is the zero-loss way to serve a `Router`.
    impl axum::serve::Listener for Incoming {
        type Io = Connection;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Connection, SocketAddr) {
            match Incoming::accept(self).await {
                Some(conn) => {
                    let addr = conn
                        .peer_addr()
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    (conn, addr)
                }
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> std::io::Result<SocketAddr> {
            Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
        }
    }

    impl Incoming {
        /// The listener wrapped so that `into_make_service_with_connect_info::<SocketAddr>()`
        /// works with `axum::serve` (axum implements `Connected` for the address of a
        /// tapped listener).
        pub fn with_connect_info(self) -> axum::serve::TapIo<Incoming, fn(&mut Connection)> {
            use axum::serve::ListenerExt;
            fn nothing(_: &mut Connection) {}
            self.tap_io(nothing as fn(&mut Connection))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::tests::fake_master;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

    /// A connection that holds `data` and counts the reads that reach it.
    struct Counted {
        data: Vec<u8>,
        pos: usize,
        reads: usize,
        written: Vec<u8>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            let n = (this.data.len() - this.pos).min(out.remaining());
            out.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.get_mut().written.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn counted(data: &[u8]) -> Counted {
        Counted {
            data: data.to_vec(),
            pos: 0,
            reads: 0,
            written: Vec::new(),
        }
    }

    /// A connection that hands out `data` at most `chunk` bytes per read.
    fn chunked(data: &[u8], chunk: usize) -> Chunked {
        Chunked {
            inner: counted(data),
            chunk,
        }
    }

    struct Chunked {
        inner: Counted,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            let n = this.chunk.min(out.remaining());
            let mut limited = ReadBuf::new(out.initialize_unfilled_to(n));
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let got = limited.filled().len();
            out.advance(got);
            Poll::Ready(Ok(()))
        }
    }

    async fn sniff<I: AsyncRead + Unpin>(io: &mut ReadAhead<I>) -> Protocol {
        std::future::poll_fn(|cx| io.poll_sniff(cx))
            .await
            .expect("sniff")
    }

    #[tokio::test]
    async fn the_first_read_tells_the_protocol_and_is_handed_out_from_memory() {
        let request: Vec<u8> = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            .iter()
            .copied()
            .cycle()
            .take(5000)
            .collect();
        let mut io = ReadAhead::new(counted(&request), Arc::default());
        assert_eq!(sniff(&mut io).await, Protocol::Http1);
        assert_eq!(io.io.reads, 1, "one read tells HTTP/1");
        // hyper's reads: first from memory, then from the connection.
        let mut rest = vec![0u8; 8192];
        let n = io.read(&mut rest).await.expect("read");
        assert_eq!(n, READ_AHEAD, "what the first read took, from memory");
        assert_eq!(io.io.reads, 1);
        assert_eq!(io.buf.capacity(), 0, "the buffer goes once used up");
        let m = io.read(&mut rest[n..]).await.expect("read");
        assert_eq!(
            m,
            request.len() - READ_AHEAD,
            "then straight from the connection"
        );
        assert_eq!(io.io.reads, 2);
        assert_eq!(&rest[..n + m], &request[..]);
        assert_eq!(io.read(&mut rest).await.expect("eof"), 0);
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(io.io.written, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[test]
    fn a_closed_connection_gives_back_its_waker_slot_at_once() {
        struct Task;
        impl std::task::Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let drain = Drain::default();
        let first = drain.register();
        // Connections come and go one at a time: one slot, and one allocation, serves
        // them all, and each lets go of its task's waker as it ends.
        let storage = {
            let second = drain.register();
            Arc::as_ptr(&second.slot)
        };
        for _ in 0..1000 {
            let next = drain.register();
            assert_eq!(Arc::as_ptr(&next.slot), storage);
            assert_eq!(Arc::strong_count(&next.slot), 2, "the slot's and ours");
            let task = Arc::new(Task);
            next.register(&std::task::Waker::from(Arc::clone(&task)));
            assert_eq!(Arc::strong_count(&task), 2, "the connection's waker");
            drop(next);
            assert_eq!(Arc::strong_count(&task), 1, "let go of with the connection");
            let slots = drain.slots();
            assert_eq!(Arc::strong_count(&slots.wakers[1]), 1, "kept by the slot");
        }
        assert_eq!(drain.slots().wakers.len(), 2);
        drop(first);
        assert_eq!(drain.slots().free.len(), 2);
        // The drain wakes what registers in a reused slot.
        let again = drain.register();
        let task = Arc::new(Task);
        again.register(&std::task::Waker::from(Arc::clone(&task)));
        drain.start();
        assert_eq!(
            Arc::strong_count(&task),
            1,
            "woken (a waker is used up by waking)"
        );
    }

    /// A connection whose first read finds nothing yet.
    struct Later {
        inner: Counted,
        waited: bool,
    }

    impl AsyncRead for Later {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if !this.waited {
                this.waited = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Pin::new(&mut this.inner).poll_read(cx, out)
        }
    }

    #[tokio::test]
    async fn a_connection_holds_only_the_bytes_it_read_ahead() {
        let request = b"GET /first HTTP/1.1\r\n\r\n";
        let mut io = ReadAhead::new(
            Later {
                inner: counted(request),
                waited: false,
            },
            Arc::default(),
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(io.poll_sniff(&mut cx).is_pending());
        assert_eq!(
            io.buf.capacity(),
            0,
            "waiting for its first bytes: no buffer"
        );
        let scratch = SCRATCH
            .take()
            .expect("the thread's buffer is back in its slot");
        assert_eq!(scratch.len(), READ_AHEAD);
        SCRATCH.set(Some(scratch));

        assert_eq!(sniff(&mut io).await, Protocol::Http1);
        assert_eq!(io.buf, request, "what the read took");
        assert!(
            io.buf.capacity() < READ_AHEAD,
            "kept in an allocation of its size"
        );
        let mut out = [0u8; 64];
        assert_eq!(io.read(&mut out[..4]).await.expect("read"), 4);
        assert_eq!(io.buf.len(), request.len(), "partly handed out: kept");
        let n = io.read(&mut out[4..]).await.expect("read");
        assert_eq!(&out[..4 + n], request);
        assert_eq!(io.buf.capacity(), 0, "handed out: freed");
        assert_eq!(io.read(&mut out).await.expect("eof"), 0);
        assert_eq!(io.io.inner.reads, 2, "one read ahead, then the end of file");
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_however_it_arrives() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
        for chunk in [1, 5, 23, 24, 4096] {
            let mut io = ReadAhead::new(chunked(&h2, chunk), Arc::default());
            assert_eq!(sniff(&mut io).await, Protocol::Http2, "chunk {chunk}");
            assert_eq!(
                io.io.inner.reads,
                H2_PREFACE.len().div_ceil(chunk),
                "chunk {chunk}"
            );
            let mut all = Vec::new();
            io.read_to_end(&mut all).await.expect("read");
            assert_eq!(all, h2, "nothing lost, chunk {chunk}");
        }
        // Not the preface: told at the first byte that differs, even one at a time.
        let almost = b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut io = ReadAhead::new(chunked(almost, 1), Arc::default());
        assert_eq!(sniff(&mut io).await, Protocol::Http1);
        assert_eq!(io.io.inner.reads, 12, "`PRI * HTTP/` (11 bytes), then `1`");
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, almost);
        // A short HTTP/1 request and an empty connection.
        for data in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"P", b""] {
            let mut io = ReadAhead::new(counted(data), Arc::default());
            assert_eq!(sniff(&mut io).await, Protocol::Http1);
            let mut all = Vec::new();
            io.read_to_end(&mut all).await.expect("read");
            assert_eq!(all, data);
            assert_eq!(io.read(&mut [0u8; 16]).await.expect("eof again"), 0);
        }
    }

    /// Hands the worker one TCP connection; the client's end comes back.
    async fn hand_connection(writer: &Arc<crate::channel::ChannelWriter>) -> std::net::TcpStream {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let frame = crate::protocol::frame(&crate::protocol::ToWorker::Connections {
            listener: 0,
            count: 1,
        })
        .expect("frame");
        writer
            .send(&frame, &[server.as_raw_fd()])
            .await
            .expect("send");
        client
    }

    /// What the client gets for one request, until the server closes the connection
    /// (its end of file, or a reset); a panic if it does not within 10 s (a connection
    /// left hanging is neither answered nor closed).
    async fn answer(client: std::net::TcpStream) -> Vec<u8> {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut client = client;
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // A connection closed at once may refuse the request: what it answers counts.
            let _ = client.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut got = Vec::new();
            match client.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!(
                    "neither answered nor closed: {e} (after {:?})",
                    String::from_utf8_lossy(&got)
                ),
            }
            got
        })
        .await
        .expect("client")
    }

    #[tokio::test]
    async fn a_dropped_server_takes_its_handler_out_of_the_worker() {
        use crate::protocol::ToMaster;
        let (mut reader, writer, worker) = fake_master().await;
        // The application keeps its `Worker` (for messages, say): the worker lives on.
        let kept = worker.clone();
        let serving = tokio::spawn(Server::new(worker).serve(path_service()));
        let ready = tokio::time::timeout(Duration::from_secs(10), reader.recv::<ToMaster>())
            .await
            .expect("in time")
            .expect("read")
            .expect("a frame");
        assert!(matches!(ready.0, ToMaster::Ready { .. }), "{:?}", ready.0);
        // Served while the server runs.
        let got = answer(hand_connection(&writer).await).await;
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        assert!(got.ends_with(b"/x"));
        // The application drops the server (a select! against ctrl-c, say): later
        // connections are closed, not spawned onto a runtime nobody waits on.
        serving.abort();
        assert!(serving.await.expect_err("aborted").is_cancelled());
        let got = answer(hand_connection(&writer).await).await;
        assert!(
            got.is_empty(),
            "closed unanswered: {}",
            String::from_utf8_lossy(&got)
        );
        assert!(!kept.draining().is_cancelled(), "not a drain");
    }

    /// Upgrades (`101`, `Upgrade: echo`) and echoes on the upgraded connection until
    /// the client closes it.
    #[tokio::test]
    async fn serve_returns_only_once_upgraded_connections_are_closed() {
        use crate::protocol::{ToMaster, ToWorker};
        use std::io::{Read, Write};
        let (mut reader, writer, worker) = fake_master().await;
        let echo = hyper::service::service_fn(|mut req: Request<IncomingBody>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(upgraded) = on.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::new()));
            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
            let headers = resp.headers_mut();
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(http::header::UPGRADE, HeaderValue::from_static("echo"));
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut serving = tokio::spawn(Server::new(worker).serve(echo));
        let ready = tokio::time::timeout(Duration::from_secs(10), reader.recv::<ToMaster>())
            .await
            .expect("in time")
            .expect("read")
            .expect("a frame");
        assert!(matches!(ready.0, ToMaster::Ready { .. }), "{:?}", ready.0);
        let client = hand_connection(&writer).await;
        let client = tokio::task::spawn_blocking(move || {
            let mut client = client;
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            client
                .write_all(
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
                )
                .expect("write");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(client.read(&mut byte).expect("read"), 1, "the head");
                head.push(byte[0]);
            }
            assert!(
                head.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            client
        })
        .await
        .expect("client");
        writer
            .send_msg(&ToWorker::Drain {
                deadline_ms: 60_000,
            })
            .await
            .expect("drain");
        // The upgraded connection is open: the server does not return (it did, at once).
        let early = tokio::time::timeout(Duration::from_millis(500), &mut serving).await;
        assert!(
            early.is_err(),
            "serve returned with an upgraded connection open"
        );
        // Still served, then closed by the client: now the server returns.
        tokio::task::spawn_blocking(move || {
            let mut client = client;
            client.write_all(b"ping").expect("write");
            let mut got = [0u8; 4];
            client.read_exact(&mut got).expect("echo");
            assert_eq!(&got, b"ping");
        })
        .await
        .expect("client");
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("serve returns once the upgraded connection closed")
            .expect("no panic")
            .expect("ok");
    }

    /// Answers `413` at once, the request's body unread.
    fn too_large() -> impl Service<
        Request<IncomingBody>,
        Response = Response<http_body_util::Full<bytes::Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        hyper::service::service_fn(|_req: Request<IncomingBody>| async move {
            let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"too large",
            )));
            *resp.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
            Ok::<_, std::convert::Infallible>(resp)
        })
    }

    /// A handler that answers at once without reading a large body (a `413` to a 1 MiB
    /// upload): hyper read a little of it and closed the connection once the answer was
    /// out, the kernel reset it for the unread input, and the client, which sends its
    /// whole body before it reads, got ECONNRESET or EPIPE, never the answer. The close
    /// lingers now.
    #[tokio::test]
    async fn an_answer_given_before_the_body_was_read_reaches_the_client() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut client = std::net::TcpStream::connect(addr).expect("connect");
            let timeout = Some(Duration::from_secs(10));
            client.set_read_timeout(timeout).expect("timeout");
            client.set_write_timeout(timeout).expect("timeout");
            let body = vec![b'x'; 1 << 20];
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            client
                .write_all(head.as_bytes())
                .and_then(|()| client.write_all(&body))
                .map_err(|e| format!("sending the body: {e}"))?;
            let mut got = Vec::new();
            client
                .read_to_end(&mut got)
                .map_err(|e| format!("reading the answer: {e}"))?;
            Ok::<_, String>(got)
        });
        let (server, _) = listener.accept().await.expect("accept");
        let drain = Arc::new(Drain::default());
        let served = spawn_serve_with(server, too_large(), &drain, Duration::from_secs(2));
        let got = match client.await.expect("client") {
            Ok(got) => got,
            Err(e) => panic!("no answer: {e}"),
        };
        assert!(
            got.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection ends once the client closed")
            .expect("served");
    }

    /// Review (fifth round): the drain's close of a connection idle through its grace
    /// turned the linger off, but a handler that takes longer than the grace moves no
    /// byte: its `413` to an upload it never read then went out on a connection closed
    /// with unread input, and the client's upload was cut (a reset, on a socket). The
    /// linger is turned off only for a connection idle since its answer.
    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_to_an_unread_upload_during_a_drain_still_lingers() {
        let exchange = async {
            let drain = Arc::new(Drain::default());
            drain.start();
            // Five idle graces pass while the handler works, its request's body unread.
            let slow = hyper::service::service_fn(|_req: Request<IncomingBody>| async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"too large",
                )));
                *resp.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
                Ok::<_, std::convert::Infallible>(resp)
            });
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, slow, &drain, Duration::from_millis(100));
            let (writer, rx) = upload(client, 256 * 1024).await;
            assert_eq!(
                writer.await.expect("writer"),
                256 * 1024,
                "the whole upload is taken after the answer (the 413)"
            );
            drop(rx);
            served.await.expect("served");
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .expect("in time");
    }

    /// Sends a request with a 100 MiB body that [`too_large`] leaves unread, and as
    /// much of the body as `send` says (written by a task of its own, which returns how
    /// much it sent); reads the answer until the server's end of file. The client's
    /// reading half comes back: the client's end is open until both are dropped.
    async fn upload(
        client: tokio::io::DuplexStream,
        send: usize,
    ) -> (
        tokio::task::JoinHandle<usize>,
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
    ) {
        let (mut rx, mut tx) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n";
            tx.write_all(head).await.expect("head");
            let chunk = [b'x'; 64 * 1024];
            let send = send.min(64 << 20);
            let mut sent = 0;
            // Bounded: `send` bytes (64 MiB at most), or until the server closes.
            while sent < send {
                let n = chunk.len().min(send - sent);
                if tx.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
            sent
        });
        let mut got = Vec::new();
        // Until the answer's end: the server shut its side down.
        let mut buf = [0u8; 1024];
        for _ in 0..100 {
            let n = rx.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        (writer, rx)
    }

    /// The lingering close costs a request without a body nothing: a `Connection:
    /// close` GET's connection ends as soon as its answer is out, while the client
    /// still holds its end. One whose body was left unread ends when the client closes
    /// its side, after [`LINGER`] if it never does, and after [`LINGER_BYTES`] if it
    /// sends without end.
    #[tokio::test(start_paused = true)]
    async fn only_a_body_left_unread_makes_the_close_linger_and_not_for_ever() {
        let exchange = async {
            let drain = Arc::new(Drain::default());
            let grace = Duration::from_secs(2);

            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve(server, &drain, grace);
            let started = tokio::time::Instant::now();
            client
                .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert!(got.ends_with(b"/x"), "{}", String::from_utf8_lossy(&got));
            served.await.expect("served");
            assert_eq!(
                started.elapsed(),
                Duration::ZERO,
                "no linger without a body"
            );
            drop(client);

            // The client closes its side once it has the answer: the linger ends.
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, too_large(), &drain, grace);
            let started = tokio::time::Instant::now();
            let (writer, rx) = upload(client, 256 * 1024).await;
            assert_eq!(writer.await.expect("writer"), 256 * 1024, "all sent");
            drop(rx);
            served.await.expect("served");
            assert_eq!(started.elapsed(), Duration::ZERO, "until the client's end");

            // The client holds its end open and sends nothing more: `LINGER`.
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, too_large(), &drain, grace);
            let started = tokio::time::Instant::now();
            let (writer, rx) = upload(client, 100 * 1024).await;
            assert_eq!(writer.await.expect("writer"), 100 * 1024, "all sent");
            served.await.expect("served");
            assert_eq!(started.elapsed(), LINGER, "at most LINGER");
            drop(rx);

            // The client sends without end: `LINGER_BYTES`, then closed.
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, too_large(), &drain, grace);
            let started = tokio::time::Instant::now();
            let (writer, rx) = upload(client, usize::MAX).await;
            served.await.expect("served");
            assert!(started.elapsed() < LINGER, "{:?}", started.elapsed());
            let sent = writer.await.expect("writer");
            assert!(
                (LINGER_BYTES..LINGER_BYTES + 1024 * 1024).contains(&sent),
                "{sent}"
            );
            drop(rx);
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .expect("in time");
    }

    /// Reads the request's body to its end, then answers with its length.
    fn read_body() -> impl Service<
        Request<IncomingBody>,
        Response = Response<http_body_util::Full<bytes::Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        hyper::service::service_fn(|req: Request<IncomingBody>| async move {
            use http_body_util::BodyExt;
            let len = match req.into_body().collect().await {
                Ok(body) => body.to_bytes().len(),
                Err(_) => usize::MAX,
            };
            let said = bytes::Bytes::from(format!("read {len} bytes"));
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(said)))
        })
    }

    /// Regression: the close lingered after every request that came with a body, read
    /// to its end or not. In a drain, the keep-alive connection of a pooled client
    /// (which never closes an idle connection) was closed `LINGER` after its idle
    /// grace, not at its end, and every worker's drain took as much longer.
    #[tokio::test(start_paused = true)]
    async fn a_body_read_to_its_end_leaves_the_close_nothing_to_linger_for() {
        let exchange = async {
            let drain = Arc::new(Drain::default());
            let grace = Duration::from_secs(2);
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, read_body(), &drain, grace);
            client
                .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
                .await
                .expect("write");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Until the whole answer is in (a keep-alive one: the connection stays).
            for _ in 0..100 {
                if got.ends_with(b"read 5 bytes") {
                    break;
                }
                let n = client.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(
                got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"read 5 bytes"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            // The client holds its end open, and neither sends nor reads.
            let started = tokio::time::Instant::now();
            drain.start();
            served.await.expect("served");
            assert_eq!(started.elapsed(), grace, "closed at the idle grace's end");
            drop(client);
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .expect("in time");
    }

    /// How long [`path_service`] takes to answer `/slow`.
    const SLOW: Duration = Duration::from_secs(2);

    /// Answers with the request's path (`/slow` after [`SLOW`], `/slower` after twice
    /// that).
    fn path_service() -> impl Service<
        Request<IncomingBody>,
        Response = Response<http_body_util::Full<bytes::Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        hyper::service::service_fn(|req: Request<IncomingBody>| async move {
            match req.uri().path() {
                "/slow" => tokio::time::sleep(SLOW).await,
                "/slower" => tokio::time::sleep(2 * SLOW).await,
                _ => {}
            }
            let path = bytes::Bytes::from(req.uri().path().to_owned());
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(path)))
        })
    }

    /// Serves `io` as the worker serves a connection; the task ends with it.
    fn spawn_serve(
        io: tokio::io::DuplexStream,
        drain: &Arc<Drain>,
        idle_grace: Duration,
    ) -> tokio::task::JoinHandle<()> {
        spawn_serve_with(io, path_service(), drain, idle_grace)
    }

    /// [`spawn_serve`] with a service of the test's.
    fn spawn_serve_with<I, S, B>(
        io: I,
        inner: S,
        drain: &Arc<Drain>,
        idle_grace: Duration,
    ) -> tokio::task::JoinHandle<()>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let drain = Arc::clone(drain);
        tokio::spawn(async move {
            let builders = (
                http1::Builder::new(),
                http2::Builder::new(TokioExecutor::new()),
            );
            serve_io(io, inner, None, &builders, &drain, idle_grace).await;
        })
    }

    type H1Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;
    type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

    async fn h1_client(io: tokio::io::DuplexStream) -> (H1Sender, tokio::task::JoinHandle<()>) {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP/1 handshake");
        (
            send,
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        )
    }

    async fn h2_client(io: tokio::io::DuplexStream) -> (H2Sender, tokio::task::JoinHandle<()>) {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("HTTP/2 handshake");
        (
            send,
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        )
    }

    fn get(path: &str) -> Request<http_body_util::Empty<bytes::Bytes>> {
        Request::get(format!("http://test{path}"))
            .header(http::header::HOST, "test")
            .body(http_body_util::Empty::new())
            .expect("request")
    }

    /// Sends `GET path`; the response's `Connection` header and body.
    async fn h1_get(send: &mut H1Sender, path: &str) -> (Option<HeaderValue>, bytes::Bytes) {
        use http_body_util::BodyExt;
        let resp = send
            .send_request(get(path))
            .await
            .expect("HTTP/1.1 response");
        assert_eq!(resp.version(), Version::HTTP_11);
        let close = resp.headers().get(CONNECTION).cloned();
        (
            close,
            resp.into_body().collect().await.expect("body").to_bytes(),
        )
    }

    async fn h2_get(send: &mut H2Sender, path: &str) -> bytes::Bytes {
        use http_body_util::BodyExt;
        let resp = send.send_request(get(path)).await.expect("HTTP/2 response");
        assert_eq!(resp.version(), Version::HTTP_2);
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    /// Both protocols are served through the read-ahead: an HTTP/2 client (prior
    /// knowledge) and an HTTP/1.1 keep-alive client, two requests each on one
    /// connection. A read-ahead that lost bytes would leave both sides waiting: the
    /// test fails within 10 s instead.
    #[tokio::test]
    async fn both_protocols_are_served_through_the_read_ahead() {
        let drain = Arc::new(Drain::default());
        let exchange = async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve(server, &drain, Duration::from_secs(2));
            let (mut send, driver) = h2_client(client).await;
            assert_eq!(h2_get(&mut send, "/one").await, "/one");
            assert_eq!(h2_get(&mut send, "/two").await, "/two");
            drop(send);
            let _ = driver.await;
            served
                .await
                .expect("the HTTP/2 connection ends with its client");

            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve(server, &drain, Duration::from_secs(2));
            let (mut send, driver) = h1_client(client).await;
            assert_eq!(h1_get(&mut send, "/one").await, (None, "/one".into()));
            assert_eq!(h1_get(&mut send, "/two").await, (None, "/two".into()));
            drop(send);
            let _ = driver.await;
            served
                .await
                .expect("the HTTP/1 connection ends with its client");
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("both protocols answered in time");
    }

    /// Once the worker drains: an HTTP/1 keep-alive connection's next request is
    /// answered with `Connection: close`; an HTTP/2 connection gets GOAWAY; a
    /// connection that has said nothing yet gets the idle grace to send its request,
    /// and is closed at its end if it does not.
    #[tokio::test(start_paused = true)]
    async fn the_drain_rules_hold_for_both_protocols_and_for_silent_connections() {
        tokio::time::timeout(Duration::from_secs(60), drain_rules())
            .await
            .expect("every connection ended in time");
    }

    async fn drain_rules() {
        let grace = Duration::from_secs(2);
        let drain = Arc::new(Drain::default());

        let (h1_io, server) = tokio::io::duplex(64 * 1024);
        let h1_served = spawn_serve(server, &drain, grace);
        let (mut h1, h1_driver) = h1_client(h1_io).await;
        assert_eq!(h1_get(&mut h1, "/before").await, (None, "/before".into()));

        let (h2_io, server) = tokio::io::duplex(64 * 1024);
        let h2_served = spawn_serve(server, &drain, grace);
        let (mut h2, h2_driver) = h2_client(h2_io).await;
        assert_eq!(h2_get(&mut h2, "/before").await, "/before");

        let (mut silent, server) = tokio::io::duplex(64 * 1024);
        let silent_served = spawn_serve(server, &drain, grace);
        let (late_io, server) = tokio::io::duplex(64 * 1024);
        let late_served = spawn_serve(server, &drain, grace);
        tokio::task::yield_now().await;

        let started = tokio::time::Instant::now();
        drain.start();

        // HTTP/2: GOAWAY at once, so the connection ends.
        h2_served
            .await
            .expect("HTTP/2 connection ends once draining");
        let _ = h2_driver.await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "HTTP/2 goes away at once"
        );

        // HTTP/1: the request that arrives now is answered, with `Connection: close`.
        let (close, body) = h1_get(&mut h1, "/during").await;
        assert_eq!(close, Some(HeaderValue::from_static("close")));
        assert_eq!(body, "/during");
        h1_served
            .await
            .expect("HTTP/1 connection ends after its answer");
        let _ = h1_driver.await;

        // A connection whose request comes within the grace is served.
        tokio::time::sleep(grace / 2).await;
        let (mut late, late_driver) = h1_client(late_io).await;
        let (close, body) = h1_get(&mut late, "/late").await;
        assert_eq!(close, Some(HeaderValue::from_static("close")));
        assert_eq!(body, "/late");
        late_served.await.expect("the late connection ends");
        let _ = late_driver.await;

        // A connection that stays silent is closed at the end of the grace.
        silent_served.await.expect("the silent connection ends");
        assert_eq!(started.elapsed(), grace, "closed when the grace ran out");
        let mut buf = [0u8; 16];
        assert_eq!(silent.read(&mut buf).await.expect("end of file"), 0);
    }

    /// Answers CONNECT with `200` and anything else with `101` (`Upgrade: echo`), then
    /// echoes on the upgraded connection until the client closes it.
    fn tunnel_service() -> impl Service<
        Request<IncomingBody>,
        Response = Response<http_body_util::Full<bytes::Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        hyper::service::service_fn(|mut req: Request<IncomingBody>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::new()));
            if req.method() != http::Method::CONNECT {
                *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                let headers = resp.headers_mut();
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(http::header::UPGRADE, HeaderValue::from_static("echo"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        })
    }

    /// A request that began before the drain and ends just before the grace would
    /// have run out keeps its keep-alive: the connection then gets a whole grace of
    /// idleness. The client's next request, sent a little later, is answered (it was
    /// lost: the grace ran from the drain), and a connection that sends nothing more
    /// is closed a whole grace after its last answer, not sooner.
    #[tokio::test(start_paused = true)]
    async fn the_idle_grace_runs_from_the_last_traffic_not_from_the_drain() {
        tokio::time::timeout(Duration::from_secs(60), idle_grace_from_last_traffic())
            .await
            .expect("every connection ended in time");
    }

    async fn idle_grace_from_last_traffic() {
        let grace = Duration::from_secs(2);
        let drain = Arc::new(Drain::default());
        let (io, server) = tokio::io::duplex(64 * 1024);
        let next_served = spawn_serve(server, &drain, grace);
        let (mut next, next_driver) = h1_client(io).await;
        let (io, server) = tokio::io::duplex(64 * 1024);
        let quiet_served = spawn_serve(server, &drain, grace);
        let (mut quiet, quiet_driver) = h1_client(io).await;
        // Both requests begin before the drain, and end 10 ms before the grace would.
        let begun = tokio::time::Instant::now();
        let slow_next = tokio::spawn(async move {
            let got = h1_get(&mut next, "/slow").await;
            (next, got)
        });
        let slow_quiet = tokio::spawn(async move {
            let got = h1_get(&mut quiet, "/slow").await;
            (quiet, got)
        });
        tokio::time::sleep(SLOW + Duration::from_millis(10) - grace).await;
        let started = tokio::time::Instant::now();
        drain.start();

        let (mut next, got) = slow_next.await.expect("answered");
        assert_eq!(
            got,
            (None, "/slow".into()),
            "begun before the drain: kept alive"
        );
        assert_eq!(begun.elapsed(), SLOW);
        let answered = started.elapsed();
        assert_eq!(answered, grace - Duration::from_millis(10));
        // The client's next request, sent once the grace would have run out.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (close, body) = h1_get(&mut next, "/next").await;
        assert_eq!(close, Some(HeaderValue::from_static("close")));
        assert_eq!(body, "/next");
        next_served.await.expect("ends after its answer");
        let _ = next_driver.await;

        // The other connection stays idle: closed a whole grace after its answer.
        let (quiet, got) = slow_quiet.await.expect("answered");
        assert_eq!(got, (None, "/slow".into()));
        quiet_served.await.expect("the quiet connection ends");
        let closed = started.elapsed();
        assert!(
            closed >= answered + grace && closed <= answered + 2 * grace,
            "closed {closed:?} after the drain, answered at {answered:?}"
        );
        drop(quiet);
        let _ = quiet_driver.await;
    }
    /// A request that began before the drain and outlasts the grace (no byte moves
    /// while its answer is made) is answered with `Connection: close` (by hyper's
    /// graceful shutdown, which the grace's end calls), so that the client sends its
    /// next request on a new connection, rather than kept alive and then closed.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_outlasts_the_grace_is_answered_with_connection_close() {
        let exchange = async {
            let grace = Duration::from_secs(2);
            let drain = Arc::new(Drain::default());
            let (io, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve(server, &drain, grace);
            let (mut send, driver) = h1_client(io).await;
            let slower = tokio::spawn(async move {
                let got = h1_get(&mut send, "/slower").await;
                (send, got)
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            let started = tokio::time::Instant::now();
            drain.start();
            let (send, got) = slower.await.expect("answered");
            assert_eq!(
                got,
                (Some(HeaderValue::from_static("close")), "/slower".into())
            );
            assert!(started.elapsed() > grace, "outlasted the grace");
            served.await.expect("ends after its answer");
            drop(send);
            let _ = driver.await;
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .expect("in time");
    }

    /// Reads what the server sends until `end` ends it (or the server closes).
    async fn read_until(client: &mut tokio::io::DuplexStream, end: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..1000 {
            if got.ends_with(end) {
                break;
            }
            let n = client.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Once draining, a request head (HTTP/1) or a preface (HTTP/2, on a connection
    /// silent until then) that arrives in parts across the end of the grace is served:
    /// bytes arrived, so the connection was not idle. (The grace closed both, with the
    /// part read.)
    #[tokio::test(start_paused = true)]
    async fn what_arrives_in_parts_across_the_end_of_the_grace_is_served() {
        tokio::time::timeout(Duration::from_secs(60), in_parts())
            .await
            .expect("every connection ended in time");
    }

    async fn in_parts() {
        let grace = Duration::from_secs(2);
        let drain = Arc::new(Drain::default());
        let (mut h1, server) = tokio::io::duplex(64 * 1024);
        let h1_served = spawn_serve(server, &drain, grace);
        h1.write_all(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let got = read_until(&mut h1, b"/before").await;
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        let (mut h2, server) = tokio::io::duplex(64 * 1024);
        let h2_served = spawn_serve(server, &drain, grace);
        tokio::task::yield_now().await;

        drain.start();
        tokio::time::sleep(grace * 3 / 4).await;
        let _ = h1.write_all(b"GET /parts HTTP/1.1\r\n").await;
        let _ = h2.write_all(&H2_PREFACE[..10]).await;
        tokio::time::sleep(grace / 2).await;
        let _ = h1.write_all(b"Host: x\r\n\r\n").await;
        let _ = h2.write_all(&H2_PREFACE[10..]).await;
        let _ = h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await; // SETTINGS

        let mut got = Vec::new();
        h1.read_to_end(&mut got).await.expect("read");
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(got.starts_with("http/1.1 200"), "{got}");
        assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
        assert!(got.ends_with("/parts"), "{got}");
        h1_served.await.expect("the HTTP/1 connection ends");

        // The server's SETTINGS, then its GOAWAY: served as HTTP/2.
        let mut head = [0u8; 9];
        h2.read_exact(&mut head)
            .await
            .expect("the server's first frame");
        assert_eq!(head[3], 4, "a SETTINGS frame: {head:?}");
        drop(h2);
        h2_served.await.expect("the HTTP/2 connection ends");
    }

    /// Once draining, an upgrade's `101` keeps its `Connection: upgrade`, and a
    /// CONNECT's `200` gets no `Connection: close` (both got `Connection: close`,
    /// which breaks a WebSocket handshake); both tunnels work.
    #[tokio::test]
    async fn tunnels_opened_during_the_drain_are_not_marked_close() {
        tokio::time::timeout(Duration::from_secs(10), tunnels_in_drain())
            .await
            .expect("in time");
    }

    async fn tunnels_in_drain() {
        let drain = Arc::new(Drain::default());
        drain.start();
        for connect in [false, true] {
            let (io, server) = tokio::io::duplex(64 * 1024);
            let served = spawn_serve_with(server, tunnel_service(), &drain, Duration::from_secs(2));
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .expect("HTTP/1 handshake");
            let driver = tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            let req = if connect {
                Request::connect("x:443").header(http::header::HOST, "x:443")
            } else {
                Request::get("/")
                    .header(http::header::HOST, "x")
                    .header(CONNECTION, "upgrade")
                    .header(http::header::UPGRADE, "echo")
            };
            let req = req
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let mut resp = send.send_request(req).await.expect("response");
            let connection: Vec<_> = resp.headers().get_all(CONNECTION).iter().collect();
            if connect {
                assert_eq!(resp.status(), http::StatusCode::OK);
                assert!(connection.is_empty(), "CONNECT: {connection:?}");
            } else {
                assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
                assert_eq!(connection, ["upgrade"], "101");
            }
            let mut tunnel = TokioIo::new(hyper::upgrade::on(&mut resp).await.expect("upgraded"));
            // The HTTP connection is done; the tunnel lives on in the application's hands,
            // and with it the slot its traffic is counted in: a new one took its place.
            served.await.expect("served");
            assert!(
                drain
                    .slots()
                    .wakers
                    .iter()
                    .all(|slot| Arc::strong_count(slot) == 1),
                "a tunnel's slot is not handed to the next connection"
            );
            tunnel.write_all(b"ping").await.expect("write");
            let mut got = [0u8; 4];
            tunnel.read_exact(&mut got).await.expect("echo");
            assert_eq!(&got, b"ping");
            drop(tunnel);
            let _ = driver.await;
        }
    }
}
