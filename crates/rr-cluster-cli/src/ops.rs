//! What the binary adds around a running master: the Prometheus endpoint and the
//! systemd notifications (`sd_notify`).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rr_cluster::control::WorkerState;
use rr_cluster::{Event, MasterHandle};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Connections the metrics endpoint serves at once; more are closed unanswered (each
/// holds a descriptor of the master's, and its requests run on the master's thread).
const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a metrics connection may take to send a request's head, and how long it
/// may stay idle between requests.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (Prometheus), `GET /livez` (the master loop answers) and
/// `GET /readyz` (at least one worker ready and the master not stopping) until the
/// master stops.
pub(crate) async fn serve_metrics(listener: TcpListener, handle: MasterHandle) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let stream = tokio::select! {
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
        let Ok(slot) = std::sync::Arc::clone(&slots).try_acquire_owned() else {
            drop(stream); // at the limit: closed unanswered
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(metrics_answer(&req, &handle).await) }
            });
            // The timer makes hyper enforce the header timeout, which also ends a
            // connection left idle between requests.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
