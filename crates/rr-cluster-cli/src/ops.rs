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

/// Serves `GET /metrics` until the master stops.
pub(crate) async fn serve_metrics(listener: TcpListener, handle: MasterHandle) {
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
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(metrics_answer(&req, &handle).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn metrics_answer(
    req: &Request<hyper::body::Incoming>,
    handle: &MasterHandle,
) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => match handle.metrics().await {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        ("GET", _) => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_owned(),
        ),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let kind = if status == StatusCode::OK {
        OPENMETRICS
    } else {
        "text/plain"
    };
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    resp
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the pool is doing:
/// READY=1 once the first full set of workers is ready, RELOADING=1/READY=1 around
/// reloads, STOPPING=1, STATUS= with the worker count, and WATCHDOG=1 while the master
/// answers when `WATCHDOG_USEC` is set.
pub(crate) async fn notify_systemd(mut events: broadcast::Receiver<Event>, handle: MasterHandle) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(handle.clone(), period / 2));
    }
    let mut ready_sent = false;
    let mut reloading = false;
    loop {
        let event = tokio::select! {
            _ = handle.wait() => return,
            event = events.recv() => event,
        };
        let event = match event {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            Err(broadcast::error::RecvError::Closed) => return,
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
        }
        let text = format!(
            "{ready}/{} workers ready, generation {}{}",
            status.target_workers,
            status.generation,
            if status.gave_up {
                ", gave up restarting"
            } else {
                ""
            }
        );
        states.push(NotifyState::Status(&text));
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
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
