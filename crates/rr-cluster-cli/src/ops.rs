//! What the binary adds around a running master: the Prometheus endpoint and the
//! systemd notifications (`sd_notify`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rr_cluster::control::WorkerState;
use rr_cluster::{Event, MasterHandle};
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Connections the metrics endpoint serves at once; more are closed unanswered (each
/// holds a descriptor of the master's, and its requests run on the master's thread),
/// unless one of them is stuck (see [`METRICS_STUCK_AFTER`]).
const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a metrics connection may take to send a request's head, and how long it
/// may stay idle between requests.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a metrics client may stay blocked (a client that asks and never
/// reads) before the connection is dropped.
const METRICS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one metrics connection may make: the last answer says `Connection: close`
/// (a client pipelining requests gets at most this many answers).
const METRICS_MAX_REQUESTS: u32 = 100;
/// How long one metrics connection may live: then it is closed after its request in
/// flight, or [`METRICS_WRITE_TIMEOUT`] later at the latest.
const METRICS_MAX_AGE: Duration = Duration::from_secs(120);
/// At the connection limit, a new connection takes the place of the one stuck longest:
/// no request in flight and nothing written for at least this long (blocked writing to
/// a client that does not read, idle, or sending its request too slowly). Probes keep
/// getting answers while clients hog the slots.
const METRICS_STUCK_AFTER: Duration = Duration::from_secs(1);

/// Serves `GET /metrics` (Prometheus), `GET /livez` (the master loop answers) and
/// `GET /readyz` (at least one worker ready and the master not stopping) until the
/// master stops: its last worker gone (`Stopped`), the port is free again, while the
/// master may still be writing its workers' last output.
pub(crate) async fn serve_metrics(listener: TcpListener, handle: MasterHandle) {
    let conns = Arc::new(Connections::new(
        MAX_METRICS_CONNECTIONS,
        METRICS_STUCK_AFTER,
    ));
    let mut events = handle.events();
    let stopped = async move {
        loop {
            match events.recv().await {
                Ok(Event::Stopped { .. }) | Err(broadcast::error::RecvError::Closed) => return,
                _ => {}
            }
        }
    };
    tokio::pin!(stopped);
    loop {
        let stream = tokio::select! {
            () = &mut stopped => return,
            _ = handle.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((id, state)) = conns.admit() else {
            drop(stream); // at the limit, none stuck: closed unanswered
            continue;
        };
        let handle = handle.clone();
        let conns = Arc::clone(&conns);
        tokio::spawn(async move {
            let _registered = Registered { conns: &conns, id };
            serve_connection(stream, handle, state).await;
        });
    }
}

/// One metrics connection, until it ends, is evicted or has lived
/// [`METRICS_MAX_AGE`].
async fn serve_connection(stream: TcpStream, handle: MasterHandle, state: Arc<ConnState>) {
    let evicted = state.evict.clone();
    let service = {
        let state = Arc::clone(&state);
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let handle = handle.clone();
            let state = Arc::clone(&state);
            async move {
                let busy = Busy::new(state);
                let mut resp = metrics_answer(&req, &handle).await;
                if busy.nth >= METRICS_MAX_REQUESTS {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(WriteTimeout::new(stream, state, METRICS_WRITE_TIMEOUT));
    // The timer makes hyper enforce the header timeout, which also ends a connection
    // left idle between requests.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(METRICS_HEADER_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = evicted.cancelled() => return,
        () = tokio::time::sleep(METRICS_MAX_AGE) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = evicted.cancelled() => {}
        () = tokio::time::sleep(METRICS_WRITE_TIMEOUT) => {}
    }
}

/// The metrics connections being served, and how far each got.
#[derive(Debug)]
struct Connections {
    limit: usize,
    stuck_after: Duration,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
}

/// One connection's progress, shared by its I/O, its service and the accept loop.
#[derive(Debug)]
struct ConnState {
    epoch: Instant,
    /// Requests being answered.
    in_flight: AtomicU32,
    /// Requests seen.
    requests: AtomicU32,
    /// When it was accepted, last wrote a byte or last finished a request (ms since
    /// `epoch`).
    progress_ms: AtomicU64,
    /// Cancelled to drop the connection in favour of a new one.
    evict: CancellationToken,
}

impl ConnState {
    fn now_ms(epoch: Instant) -> u64 {
        u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn progressed(&self) {
        self.progress_ms
            .store(Self::now_ms(self.epoch), Ordering::Relaxed);
    }
}

impl Connections {
    fn new(limit: usize, stuck_after: Duration) -> Self {
        Connections {
            limit,
            stuck_after,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection: a free one, or the one of the connection stuck
    /// longest (which is told to go); `None` at the limit with none stuck.
    fn admit(&self) -> Option<(u64, Arc<ConnState>)> {
        let now = ConnState::now_ms(self.epoch);
        let mut open = self.lock();
        if open.len() >= self.limit {
            let stuck_ms = u64::try_from(self.stuck_after.as_millis()).unwrap_or(u64::MAX);
            let victim = open
                .iter()
                .filter(|(_, c)| c.in_flight.load(Ordering::Relaxed) == 0)
                .map(|(id, c)| (*id, c.progress_ms.load(Ordering::Relaxed)))
                .filter(|(_, at)| now.saturating_sub(*at) >= stuck_ms)
                .min_by_key(|(_, at)| *at)
                .map(|(id, _)| id)?;
            if let Some(c) = open.remove(&victim) {
                tracing::debug!("metrics connection stuck: closed for a new one");
                c.evict.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            epoch: self.epoch,
            in_flight: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            progress_ms: AtomicU64::new(now),
            evict: CancellationToken::new(),
        });
        open.insert(id, Arc::clone(&state));
        Some((id, state))
    }
}

/// Frees a connection's place when its task ends.
struct Registered<'a> {
    conns: &'a Connections,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

/// A request being answered (a connection waiting for the master is not stuck).
struct Busy {
    state: Arc<ConnState>,
    /// Which request of the connection's this is, from 1.
    nth: u32,
}

impl Busy {
    fn new(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        let nth = state
            .requests
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        Busy { state, nth }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.state.progressed();
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream whose writes fail (`TimedOut`) once one has been blocked for `timeout`:
/// hyper's header timeout covers reading only, and a client that never reads would
/// otherwise hold its connection for ever. Records written bytes as progress.
struct WriteTimeout<T> {
    inner: T,
    state: Arc<ConnState>,
    timeout: Duration,
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn new(inner: T, state: Arc<ConnState>, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            state,
            timeout,
            blocked: None,
        }
    }

    fn guard(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>>
    where
        T: Unpin,
    {
        match write(Pin::new(&mut self.inner), cx) {
            Poll::Ready(result) => {
                self.blocked = None;
                if matches!(result, Ok(n) if n > 0) {
                    self.state.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let blocked = self
                    .blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match blocked.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.blocked = None;
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client does not read",
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().guard(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .guard(cx, |w, cx| w.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn metrics_answer(
    req: &Request<hyper::body::Incoming>,
    handle: &MasterHandle,
) -> Response<Full<Bytes>> {
    // Health answers within a second or not at all: a master whose loop does not
    // answer is not alive.
    let status = || tokio::time::timeout(Duration::from_secs(1), handle.status());
    let (status, body, kind) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => match handle.metrics().await {
            Ok(text) => (StatusCode::OK, text, OPENMETRICS),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"), TEXT),
        },
        ("GET", "/livez") => match status().await {
            Ok(Ok(_)) => (StatusCode::OK, "ok\n".to_owned(), TEXT),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the master loop does not answer\n".to_owned(),
                TEXT,
            ),
        },
        ("GET", "/readyz") => match status().await {
            Ok(Ok(s)) => {
                let ready = s
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Ready)
                    .count();
                if ready > 0 && !s.stopping && !s.paused {
                    (StatusCode::OK, format!("ok: {ready} workers ready\n"), TEXT)
                } else {
                    let why = if s.stopping {
                        "stopping".to_owned()
                    } else {
                        format!("{ready} workers ready")
                    };
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                        TEXT,
                    )
                }
            }
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the master loop does not answer\n".to_owned(),
                TEXT,
            ),
        },
        ("GET", _) => (
            StatusCode::NOT_FOUND,
            "see /metrics, /livez, /readyz\n".to_owned(),
            TEXT,
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_owned(),
            TEXT,
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    resp
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the pool is doing:
/// READY=1 once the first full set of workers is ready, RELOADING=1/READY=1 around
/// reloads, STOPPING=1, `STATUS=` only when it changes ("2/2 workers ready, generation
/// 0", "reloading (1/2), generation 1"), `EXTEND_TIMEOUT_USEC` every few seconds while a
/// slow pool starts, and WATCHDOG=1 while the master answers when `WATCHDOG_USEC` is
/// set.
pub(crate) async fn notify_systemd(mut events: broadcast::Receiver<Event>, handle: MasterHandle) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(handle.clone(), period / 2));
    }
    let mut ready_sent = false;
    let mut reloading = false;
    let mut last_status = String::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_extend = tokio::time::Instant::now();
    loop {
        let event = tokio::select! {
            _ = handle.wait() => return,
            event = events.recv() => match event {
                Ok(e) => Some(e),
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ticker.tick() => None,
        };
        let mut states: Vec<NotifyState<'_>> = Vec::new();
        match &event {
            Some(Event::ReloadStarted { .. }) => {
                reloading = true;
                states.push(NotifyState::Reloading);
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    states.push(now);
                }
            }
            Some(
                Event::ReloadFinished { .. }
                | Event::ReloadFailed { .. }
                | Event::ReloadRejected { .. },
            ) => {
                if reloading || matches!(event, Some(Event::ReloadRejected { .. })) {
                    states.push(NotifyState::Ready);
                }
                reloading = false;
            }
            Some(Event::Stopping { .. }) => states.push(NotifyState::Stopping),
            _ => {}
        }
        let Ok(status) = handle.status().await else {
            return;
        };
        let ready = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        if !ready_sent && ready >= status.target_workers {
            ready_sent = true;
            states.push(NotifyState::Ready);
        } else if !ready_sent && last_extend.elapsed() >= Duration::from_secs(5) {
            // A slow pool: ask systemd for more time than its start timeout.
            last_extend = tokio::time::Instant::now();
            states.push(NotifyState::ExtendTimeoutUsec(30_000_000));
        }
        let text = status_text(&status, reloading);
        if text != last_status {
            last_status.clone_from(&text);
            states.push(NotifyState::Status(&text));
        }
        if states.is_empty() {
            continue;
        }
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// The `STATUS=` line.
fn status_text(s: &rr_cluster::control::Status, reloading: bool) -> String {
    let ready = |w: &&rr_cluster::control::WorkerStatus| w.state == WorkerState::Ready;
    let suffix = if s.gave_up {
        ", gave up restarting"
    } else {
        ""
    };
    if reloading && s.reloading {
        let done = s
            .workers
            .iter()
            .filter(ready)
            .filter(|w| w.generation == s.generation)
            .count()
            .min(s.target_workers);
        format!(
            "reloading ({done}/{}), generation {}{suffix}",
            s.target_workers, s.generation
        )
    } else {
        let n = s.workers.iter().filter(ready).count();
        format!(
            "{n}/{} workers ready, generation {}{suffix}",
            s.target_workers, s.generation
        )
    }
}

async fn watchdog(handle: MasterHandle, every: Duration) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = handle.wait() => return,
            _ = ticker.tick() => {}
        }
        // Only a master whose driver answers is alive.
        if tokio::time::timeout(every, handle.status())
            .await
            .is_ok_and(|s| s.is_ok())
        {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Connections whose clock started two minutes ago (so "long ago" exists).
    fn aged(limit: usize) -> Connections {
        let mut conns = Connections::new(limit, Duration::from_secs(1));
        conns.epoch = Instant::now()
            .checked_sub(Duration::from_secs(120))
            .unwrap_or(conns.epoch);
        conns
    }

    fn progress_of(conns: &Connections, id: u64, ms: u64) {
        conns.lock()[&id].progress_ms.store(ms, Ordering::Relaxed);
    }

    #[test]
    fn at_the_limit_a_new_connection_replaces_the_one_stuck_longest() {
        let conns = aged(2);
        let (a, a_state) = conns.admit().expect("a place");
        let (b, b_state) = conns.admit().expect("a place");
        // Both just made progress: the third is refused.
        assert!(conns.admit().is_none());
        // Both stuck, `a` longer; `a` is busy answering, though: `b` goes.
        conns.lock()[&a].in_flight.store(1, Ordering::Relaxed);
        let now = ConnState::now_ms(conns.epoch);
        let long_ago = now.saturating_sub(60_000);
        progress_of(&conns, a, long_ago);
        progress_of(&conns, b, long_ago + 1);
        let (c, _) = conns.admit().expect("b's place");
        assert!(b_state.evict.is_cancelled() && !a_state.evict.is_cancelled());
        assert!(conns.lock().contains_key(&c) && !conns.lock().contains_key(&b));
        // `a` done: it is now the one stuck longest.
        conns.lock()[&a].in_flight.store(0, Ordering::Relaxed);
        assert!(conns.admit().is_some());
        assert!(a_state.evict.is_cancelled());
        assert_eq!(conns.lock().len(), 2);
    }

    #[tokio::test]
    async fn a_write_blocked_too_long_fails_and_progress_is_recorded() {
        let conns = aged(1);
        let (_, state) = conns.admit().expect("a place");
        state.progress_ms.store(0, Ordering::Relaxed);
        // A peer that never reads: 64 bytes of buffer.
        let (ours, _theirs) = tokio::io::duplex(64);
        let timeout = Duration::from_millis(200);
        let mut w = WriteTimeout::new(ours, Arc::clone(&state), timeout);
        let started = Instant::now();
        let chunk = [b'x'; 16];
        let mut written = 0usize;
        let err = loop {
            // Bounded: the buffer takes 64 bytes, then one write blocks until it fails.
            assert!(written <= 64, "wrote past the buffer");
            match tokio::time::timeout(Duration::from_secs(10), w.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => break e,
                Err(_) => panic!("a blocked write did not time out"),
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(written, 64);
        assert!(started.elapsed() >= timeout);
        assert!(
            state.progress_ms.load(Ordering::Relaxed) > 0,
            "the bytes written count as progress"
        );
    }
}
