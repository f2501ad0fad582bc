//! A drain-correct HTTP server for workers: HTTP/1.1 and HTTP/2 over cleartext
//! (hyper-util's `auto` connection), on the connections the master passes.
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
//! - an HTTP/1 connection that stays idle is closed after a grace period (2 s by
//!   default), not at once: a request may be on its way;
//! - [`Server::serve`] returns once every connection is closed, or at the master's
//!   deadline; return from `main` then.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming as IncomingBody;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    builder: auto::Builder<TokioExecutor>,
}

impl Server {
    /// A server for `worker`'s connections: HTTP/1.1 with keep-alive and HTTP/2 over
    /// cleartext, an idle grace of 2 s.
    pub fn new(worker: Worker) -> Server {
        Server {
            worker,
            idle_grace: Duration::from_secs(2),
            connect_info: None,
            builder: auto::Builder::new(TokioExecutor::new()),
        }
    }

    /// Hands every request the client's address as a [`PeerAddr`] extension (and
    /// `axum::extract::ConnectInfo<SocketAddr>` with the `axum` feature). Default: on
    /// for [`Server::serve_tower`], off for [`Server::serve`].
    pub fn connect_info(mut self, on: bool) -> Server {
        self.connect_info = Some(on);
        self
    }

    /// Once draining, how long an idle HTTP/1 keep-alive connection is kept open
    /// before it is closed (default 2 s). A request that arrives meanwhile is answered
    /// with `Connection: close`.
    pub fn idle_grace(mut self, grace: Duration) -> Server {
        self.idle_grace = grace;
        self
    }

    /// hyper-util's connection builder, for HTTP/1 and HTTP/2 settings.
    pub fn builder_mut(&mut self) -> &mut auto::Builder<TokioExecutor> {
        &mut self.builder
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
            builder,
        } = self;
        let connect_info = connect_info.unwrap_or(false);
        let draining = worker.draining();
        let mut incoming = worker.ready().await?;
        let builder = Arc::new(builder);
        let tracker = TaskTracker::new();
        let wakers = Arc::new(Wakers::default());
        // One task hears of the drain and wakes every connection: connections do not
        // each wait on the cancellation token (a lock per poll).
        let announcer = {
            let (wakers, draining) = (Arc::clone(&wakers), draining.clone());
            tokio::spawn(async move {
                draining.cancelled().await;
                wakers.wake_all();
            })
        };
        while let Some(conn) = incoming.accept().await {
            tracker.spawn(connection(
                conn,
                service.clone(),
                Arc::clone(&builder),
                draining.clone(),
                wakers.register(),
                idle_grace,
                connect_info,
            ));
        }
        drop(announcer);
        tracker.close();
        tokio::select! {
            () = tracker.wait() => {}
            () = worker.drained() => {}
        }
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
    builder: Arc<auto::Builder<TokioExecutor>>,
    draining: CancellationToken,
    wake: Arc<AtomicWaker>,
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
    let h2 = Arc::new(AtomicBool::new(false));
    let service = DrainAware {
        inner: service,
        draining: draining.clone(),
        peer: if connect_info { conn.peer_addr() } else { None },
        h2: Arc::clone(&h2),
    };
    let http = builder.serve_connection_with_upgrades(TokioIo::new(ReadAhead::new(conn)), service);
    tokio::pin!(http);
    let served = std::future::poll_fn(|cx| {
        if http.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        wake.register(cx.waker());
        if draining.is_cancelled() {
            return Poll::Ready(false);
        }
        Poll::Pending
    })
    .await;
    if served {
        return;
    }
    if !h2.load(Ordering::Relaxed) {
        // HTTP/1: requests still arriving are answered with `Connection: close`; a
        // connection that stays idle through the grace is closed politely.
        tokio::select! {
            _ = http.as_mut() => return,
            () = tokio::time::sleep(idle_grace) => {}
        }
    }
    // HTTP/2: GOAWAY now, the streams in flight finish; HTTP/1: close once idle.
    http.as_mut().graceful_shutdown();
    let _ = http.await;
}

/// Bytes the first read of a connection asks the kernel for.
const READ_AHEAD: usize = 4096;

/// A connection whose first read takes up to [`READ_AHEAD`] bytes at once.
///
/// hyper-util's `auto` connection starts with a read of at most 24 bytes (to tell the
/// HTTP/2 preface from HTTP/1), then hyper reads the rest of the request: two system
/// calls where one does, on every connection. Here the first read fills a buffer and
/// hands its bytes out from memory; once they are gone every read and write goes
/// straight to the connection.
#[derive(Debug)]
struct ReadAhead<I> {
    io: I,
    /// The read-ahead buffer, until it is used up (`None` afterwards, or before the
    /// first read when that read is large enough on its own).
    buf: Option<Box<[u8]>>,
    /// Bytes of `buf` not handed out yet: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Whether the first read completed.
    started: bool,
}

impl<I> ReadAhead<I> {
    fn new(io: I) -> ReadAhead<I> {
        ReadAhead {
            io,
            buf: None,
            start: 0,
            end: 0,
            started: false,
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
        if !this.started && out.remaining() < READ_AHEAD {
            let buf = this
                .buf
                .get_or_insert_with(|| vec![0; READ_AHEAD].into_boxed_slice());
            let mut ahead = tokio::io::ReadBuf::new(buf);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut ahead))?;
            this.started = true;
            this.start = 0;
            this.end = ahead.filled().len();
        }
        this.started = true;
        if let Some(buf) = &this.buf {
            let n = (this.end - this.start).min(out.remaining());
            out.put_slice(&buf[this.start..this.start + n]);
            this.start += n;
            if this.start == this.end {
                this.buf = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ReadAhead<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The wakers of the open connections, woken all at once when the worker drains.
#[derive(Debug, Default)]
struct Wakers {
    list: std::sync::Mutex<Vec<std::sync::Weak<AtomicWaker>>>,
}

impl Wakers {
    /// A waker slot for a new connection (dropped with it).
    fn register(&self) -> Arc<AtomicWaker> {
        let waker = Arc::new(AtomicWaker::new());
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() >= 64 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&waker));
        waker
    }

    fn wake_all(&self) {
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        for waker in list.iter().filter_map(std::sync::Weak::upgrade) {
            waker.wake();
        }
    }
}

/// Marks responses to requests that arrive once draining `Connection: close`
/// (HTTP/1), and hands handlers the client's address.
#[derive(Debug, Clone)]
struct DrainAware<S> {
    inner: S,
    draining: CancellationToken,
    peer: Option<SocketAddr>,
    h2: Arc<AtomicBool>,
}

impl<S, B> Service<Request<IncomingBody>> for DrainAware<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Either<S::Future, DrainAwareFuture<S::Future>>;

    fn call(&self, mut req: Request<IncomingBody>) -> Self::Future {
        let h1 = req.version() < Version::HTTP_2;
        if !h1 {
            self.h2.store(true, Ordering::Relaxed);
        }
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(PeerAddr(peer));
            #[cfg(feature = "axum")]
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        // Until the drain, the service's own future, untouched. A request that arrives
        // before the drain and ends after it keeps its keep-alive: the client's next
        // request, within the idle grace, is answered with `Connection: close`.
        if !h1 || !self.draining.is_cancelled() {
            return Either::Left(self.inner.call(req));
        }
        Either::Right(DrainAwareFuture {
            inner: self.inner.call(req),
        })
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainAware`].
    #[derive(Debug)]
    struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
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
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
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

    #[tokio::test]
    async fn a_short_first_read_costs_one_read_of_the_connection() {
        let request: Vec<u8> = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            .iter()
            .copied()
            .cycle()
            .take(5000)
            .collect();
        let mut io = ReadAhead::new(counted(&request));
        // hyper-util's preface check, then hyper's own reads.
        let mut preface = [0u8; 24];
        assert_eq!(io.read(&mut preface).await.expect("read"), 24);
        let mut rest = vec![0u8; 8192];
        let n = io.read(&mut rest).await.expect("read");
        assert_eq!(n, READ_AHEAD - 24, "what the first read took, from memory");
        assert_eq!(io.io.reads, 1);
        let m = io.read(&mut rest[n..]).await.expect("read");
        assert_eq!(
            m,
            request.len() - READ_AHEAD,
            "then straight from the connection"
        );
        assert_eq!(io.io.reads, 2);
        let mut all = preface.to_vec();
        all.extend_from_slice(&rest[..n + m]);
        assert_eq!(all, request);
        assert_eq!(io.read(&mut rest).await.expect("eof"), 0);
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(io.io.written, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    /// hyper-util's protocol detection still works through `ReadAhead`: an HTTP/2
    /// client (prior knowledge) and an HTTP/1.1 keep-alive client, two requests each
    /// on one connection.
    #[tokio::test]
    async fn both_protocols_are_served_through_the_read_ahead() {
        use http_body_util::{BodyExt, Empty, Full};
        let service = hyper::service::service_fn(|req: Request<IncomingBody>| async move {
            let path = bytes::Bytes::from(req.uri().path().to_owned());
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(path)))
        });
        for h2 in [true, false] {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(ReadAhead::new(server)), service);
                conn.await.is_ok()
            });
            let client = TokioIo::new(client);
            let exchange = async {
                let mut bodies = Vec::new();
                if h2 {
                    let (mut send, conn) =
                        hyper::client::conn::http2::handshake(TokioExecutor::new(), client)
                            .await
                            .expect("HTTP/2 handshake");
                    let driver = tokio::spawn(conn);
                    for path in ["/one", "/two"] {
                        let req = Request::get(format!("http://test{path}"))
                            .body(Empty::<bytes::Bytes>::new())
                            .expect("request");
                        let resp = send.send_request(req).await.expect("HTTP/2 response");
                        assert_eq!(resp.version(), Version::HTTP_2);
                        bodies.push(resp.into_body().collect().await.expect("body").to_bytes());
                    }
                    drop(send);
                    let _ = driver.await;
                } else {
                    let (mut send, conn) = hyper::client::conn::http1::handshake(client)
                        .await
                        .expect("HTTP/1 handshake");
                    let driver = tokio::spawn(conn);
                    for path in ["/one", "/two"] {
                        let req = Request::get(path)
                            .header(http::header::HOST, "test")
                            .body(Empty::<bytes::Bytes>::new())
                            .expect("request");
                        let resp = send.send_request(req).await.expect("HTTP/1.1 response");
                        assert_eq!(resp.version(), Version::HTTP_11);
                        bodies.push(resp.into_body().collect().await.expect("body").to_bytes());
                    }
                    drop(send);
                    let _ = driver.await;
                }
                bodies
            };
            // A read-ahead that lost bytes would leave both sides waiting.
            let bodies = tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .expect("both answers in time");
            assert_eq!(bodies, ["/one", "/two"], "h2: {h2}");
            assert!(
                tokio::time::timeout(Duration::from_secs(5), served)
                    .await
                    .expect("the server ends with its client")
                    .expect("server task"),
                "h2: {h2}"
            );
        }
    }

    #[tokio::test]
    async fn a_large_first_read_and_an_empty_connection_go_straight_through() {
        let mut io = ReadAhead::new(counted(b"hello"));
        let mut buf = vec![0u8; READ_AHEAD];
        assert_eq!(io.read(&mut buf).await.expect("read"), 5);
        assert!(io.buf.is_none());
        assert_eq!(&buf[..5], b"hello");

        let mut io = ReadAhead::new(counted(b""));
        let mut small = [0u8; 24];
        assert_eq!(io.read(&mut small).await.expect("eof"), 0);
        assert_eq!(io.read(&mut small).await.expect("eof again"), 0);
        assert!(io.buf.is_none());
    }
}
