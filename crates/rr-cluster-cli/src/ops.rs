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
/// READY=1 once the start settled (the first full set of workers ready, or, after a
/// give-up with `on_give_up = keep`, no slot left starting or waiting for a restart),
/// RELOADING=1/READY=1 around reloads, STOPPING=1, `STATUS=` only when it changes ("2/2
/// workers ready, generation 0", "reloading (1/2), generation 1"),
/// `EXTEND_TIMEOUT_USEC` every few seconds while a slow pool starts (never once the
/// master stops; STOPPING=1 at the latest when it ends), and WATCHDOG=1 while the master answers when `WATCHDOG_USEC` is set.
/// What to send is decided by [`Notifier`]; this task only feeds it.
pub(crate) async fn notify_systemd(mut events: broadcast::Receiver<Event>, handle: MasterHandle) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(handle.clone(), period / 2));
    }
    let mut notifier = Notifier::new(Instant::now());
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    // The master ends (a stop with no worker left to drain can be over before this
    // task looks): STOPPING=1 if it has not gone out.
    let farewell = |notifier: &Notifier| {
        if !notifier.stopping_sent {
            let _ = sd_notify::notify(&[NotifyState::Stopping]);
        }
    };
    loop {
        let event = tokio::select! {
            _ = handle.wait() => return farewell(&notifier),
            event = events.recv() => match event {
                Ok(e) => Some(e),
                // Missed events: the statuses of the next turns catch up.
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return farewell(&notifier),
            },
            _ = ticker.tick() => None,
        };
        let Ok(status) = handle.status().await else {
            return farewell(&notifier);
        };
        let notes = notifier.step(event.as_ref(), &status, Instant::now());
        let mut states: Vec<NotifyState<'_>> = Vec::new();
        if notes.reloading {
            states.push(NotifyState::Reloading);
            if let Ok(now) = NotifyState::monotonic_usec_now() {
                states.push(now);
            }
        }
        if notes.ready {
            states.push(NotifyState::Ready);
        }
        if notes.stopping {
            states.push(NotifyState::Stopping);
        }
        if notes.extend {
            states.push(NotifyState::ExtendTimeoutUsec(EXTEND_BY_USEC));
        }
        if let Some(text) = &notes.status {
            states.push(NotifyState::Status(text));
        }
        if states.is_empty() {
            continue;
        }
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// How often a slow start asks systemd for more time, and how much each time.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY_USEC: u32 = 30_000_000;

/// What one turn of [`notify_systemd`] sends.
#[derive(Debug, Default, PartialEq)]
struct Notes {
    /// RELOADING=1 (with MONOTONIC_USEC).
    reloading: bool,
    ready: bool,
    stopping: bool,
    /// EXTEND_TIMEOUT_USEC.
    extend: bool,
    /// STATUS=, when it changed.
    status: Option<String>,
}

/// The systemd notifications as a pure state machine: fed each event (or `None` on a
/// tick or after missed events) with the status that follows it, it says what to send.
/// What it remembers is checked against the status on every turn, so that a missed
/// event (a lagging receiver) delays a notification by a tick instead of losing it.
#[derive(Debug)]
struct Notifier {
    ready_sent: bool,
    stopping_sent: bool,
    /// RELOADING=1 went out and its READY=1 not yet.
    reloading: bool,
    last_status: String,
    last_extend: Instant,
}

impl Notifier {
    fn new(now: Instant) -> Notifier {
        Notifier {
            ready_sent: false,
            stopping_sent: false,
            reloading: false,
            last_status: String::new(),
            last_extend: now,
        }
    }

    fn step(
        &mut self,
        event: Option<&Event>,
        status: &rr_cluster::control::Status,
        now: Instant,
    ) -> Notes {
        let mut notes = Notes::default();
        match event {
            // A reload while the pool still starts is not systemd's business: the
            // start's own READY=1 comes once the pool is ready (RELOADING=1, then the
            // reload's READY=1, would end `systemctl start` early).
            Some(Event::ReloadStarted { .. }) if self.ready_sent => {
                self.reloading = true;
                notes.reloading = true;
            }
            Some(Event::ReloadFinished { .. } | Event::ReloadFailed { .. }) => {
                notes.ready = std::mem::take(&mut self.reloading);
            }
            Some(Event::ReloadRejected { .. }) => {
                // systemd waits for READY=1 after its own reload request (a SIGHUP
                // that was refused), whether or not RELOADING=1 went out. Not while
                // the pool still starts, though: READY=1 then would end `systemctl
                // start` before any worker is ready; the start's own READY=1 comes
                // once the pool is.
                let reloading = std::mem::take(&mut self.reloading);
                notes.ready = self.ready_sent || reloading;
            }
            _ => {}
        }
        // The end of a reload whose event was missed. (Not in the turn of its
        // RELOADING=1: READY=1 in the same message would be ambiguous; the next turn
        // catches it.)
        if self.reloading && !status.reloading && !notes.reloading {
            self.reloading = false;
            notes.ready = true;
        }
        if status.stopping || matches!(event, Some(Event::Stopping { .. })) {
            notes.stopping = !std::mem::replace(&mut self.stopping_sent, true);
        }
        if !self.ready_sent && !self.stopping_sent {
            let ready = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            // After a give-up no slot is restarted: once none is still starting (or
            // waiting for a restart), this is the pool the service runs with.
            let settling = status
                .workers
                .iter()
                .any(|w| matches!(w.state, WorkerState::Starting | WorkerState::Backoff));
            if ready >= status.target_workers || (status.gave_up && !settling) {
                self.ready_sent = true;
                notes.ready = true;
            } else if now.saturating_duration_since(self.last_extend) >= EXTEND_EVERY {
                // A slow pool: ask systemd for more time than its start timeout. (After
                // a give-up only while a worker still starts: bounded by its ready
                // timeout, since nothing is restarted any more.)
                self.last_extend = now;
                notes.extend = true;
            }
        }
        let text = status_text(status, self.reloading);
        if text != self.last_status {
            self.last_status.clone_from(&text);
            notes.status = Some(text);
        }
        notes
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

    fn pool(target: usize, states: &[WorkerState]) -> rr_cluster::control::Status {
        rr_cluster::control::Status {
            target_workers: target,
            workers: states
                .iter()
                .enumerate()
                .map(|(slot, &state)| rr_cluster::control::WorkerStatus {
                    slot: slot as u32,
                    state,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Review: after a give-up with `on_give_up = keep` the stopped slots never became
    /// ready, so READY=1 never went out and EXTEND_TIMEOUT_USEC kept `systemctl start`
    /// waiting forever.
    #[test]
    fn a_give_up_settles_the_start_and_ends_the_extensions() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut n = Notifier::new(t0);
        let starting = pool(2, &[WorkerState::Starting, WorkerState::Backoff]);
        assert!(!n.step(None, &starting, at(1)).ready);
        assert!(
            n.step(None, &starting, at(5)).extend,
            "a slow start is extended"
        );
        assert!(
            !n.step(None, &starting, at(6)).extend,
            "every 5 s, not every tick"
        );
        // Given up: one slot still starting (bounded by the ready timeout: nothing is
        // restarted), then none.
        let mut gave_up = pool(2, &[WorkerState::Starting, WorkerState::Stopped]);
        gave_up.gave_up = true;
        let notes = n.step(None, &gave_up, at(7));
        assert!(!notes.ready, "{notes:?}");
        assert!(notes.status.is_some_and(|s| s.contains("gave up")));
        gave_up.workers[0].state = WorkerState::Stopped;
        let notes = n.step(None, &gave_up, at(12));
        assert!(notes.ready && !notes.extend, "{notes:?}");
        for s in 13..100 {
            assert_eq!(n.step(None, &gave_up, at(s)), Notes::default(), "at {s} s");
        }
    }

    #[test]
    fn a_start_that_stops_is_not_extended() {
        let t0 = Instant::now();
        let mut n = Notifier::new(t0);
        let mut s = pool(1, &[WorkerState::Starting]);
        n.step(None, &s, t0);
        let notes = n.step(
            Some(&Event::Stopping { graceful: true }),
            &s,
            t0 + Duration::from_secs(1),
        );
        assert!(notes.stopping && !notes.ready, "{notes:?}");
        s.stopping = true;
        for sec in 2..100 {
            let notes = n.step(None, &s, t0 + Duration::from_secs(sec));
            assert!(
                !notes.extend && !notes.stopping && !notes.ready,
                "{notes:?}"
            );
        }
    }

    #[test]
    fn a_missed_stopping_event_is_caught_up_by_the_status() {
        let t0 = Instant::now();
        let mut n = Notifier::new(t0);
        let mut s = pool(1, &[WorkerState::Ready]);
        assert!(n.step(None, &s, t0).ready);
        s.stopping = true;
        assert!(n.step(None, &s, t0).stopping);
        assert!(
            !n.step(Some(&Event::Stopping { graceful: true }), &s, t0)
                .stopping
        );
    }

    /// Review: a lagging event receiver that missed `ReloadFinished` left RELOADING=1
    /// without its READY=1.
    #[test]
    fn a_missed_reload_end_still_gets_its_ready() {
        let t0 = Instant::now();
        let mut n = Notifier::new(t0);
        let mut s = pool(1, &[WorkerState::Ready]);
        assert!(n.step(None, &s, t0).ready);
        s.reloading = true;
        let notes = n.step(Some(&Event::ReloadStarted { generation: 1 }), &s, t0);
        assert!(notes.reloading && !notes.ready, "{notes:?}");
        assert!(!n.step(None, &s, t0).ready, "still reloading");
        // The `ReloadFinished` was missed (`Lagged`): the next turn's status says so.
        s.reloading = false;
        s.generation = 1;
        let notes = n.step(None, &s, t0);
        assert!(notes.ready && !notes.reloading, "{notes:?}");
        // The event, if it comes after all, sends nothing twice.
        let notes = n.step(Some(&Event::ReloadFinished { generation: 1 }), &s, t0);
        assert!(!notes.ready, "{notes:?}");
        // A reload over before its status was asked: READY=1 the next turn, not in
        // the same message as RELOADING=1.
        let notes = n.step(Some(&Event::ReloadStarted { generation: 2 }), &s, t0);
        assert!(notes.reloading && !notes.ready, "{notes:?}");
        assert!(n.step(None, &s, t0).ready);
    }

    /// Review: a rejected reload (a SIGHUP with a bad configuration) while a slow pool
    /// was still starting sent READY=1, and `systemctl start` returned before any
    /// worker was ready.
    #[test]
    fn a_reload_rejected_during_the_start_does_not_say_ready() {
        let t0 = Instant::now();
        let mut n = Notifier::new(t0);
        let mut s = pool(2, &[WorkerState::Starting, WorkerState::Starting]);
        assert!(!n.step(None, &s, t0).ready);
        let rejected = Event::ReloadRejected {
            reason: "bad config".into(),
        };
        let notes = n.step(Some(&rejected), &s, t0);
        assert!(!notes.ready, "{notes:?}");
        s.workers[0].state = WorkerState::Ready;
        assert!(!n.step(None, &s, t0).ready, "one of two");
        s.workers[1].state = WorkerState::Ready;
        assert!(n.step(None, &s, t0).ready, "the start's READY=1");
        // Once started, a rejected reload gets the READY=1 systemd waits for.
        assert!(n.step(Some(&rejected), &s, t0).ready);
    }

    /// Review (fifth round): a reload accepted while the pool still started sent
    /// RELOADING=1, and its end (failed or not) READY=1 before any worker was ready.
    #[test]
    fn a_reload_during_the_start_leaves_the_ready_to_the_start() {
        let t0 = Instant::now();
        let mut n = Notifier::new(t0);
        let mut s = pool(2, &[WorkerState::Starting, WorkerState::Starting]);
        assert!(!n.step(None, &s, t0).ready);
        let started = Event::ReloadStarted { generation: 1 };
        s.reloading = true;
        let notes = n.step(Some(&started), &s, t0);
        assert!(!notes.reloading && !notes.ready, "{notes:?}");
        let failed = Event::ReloadFailed {
            generation: 1,
            slot: 0,
            reason: "boot failure".into(),
        };
        s.reloading = false;
        let notes = n.step(Some(&failed), &s, t0);
        assert!(!notes.ready, "{notes:?}");
        assert!(!n.step(None, &s, t0).ready, "nothing ready yet");
        s.workers[0].state = WorkerState::Ready;
        s.workers[1].state = WorkerState::Ready;
        assert!(n.step(None, &s, t0).ready, "the start's READY=1");
        // Once started, a reload is announced and ends with READY=1.
        s.reloading = true;
        assert!(n.step(Some(&started), &s, t0).reloading);
        s.reloading = false;
        assert!(n.step(Some(&failed), &s, t0).ready);
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
