//! `rr-cluster hello-worker`: the bundled demo worker. An HTTP/1.1 server on the
//! sockets its master passes, answering every request with its slot and pid:
//!
//! ```text
//! HTTP/1.1 200 OK
//! x-worker-id: 1
//! x-worker-pid: 4243
//!
//! Hello from worker 1 (pid 4243)
//! ```
//!
//! `GET /sleep/<ms>` answers after `ms` milliseconds (at most 60 s): a slow request
//! for trying graceful stops and reloads.
//!
//! On drain it stops taking connections, answers the requests that arrive on open
//! keep-alive connections with `Connection: close` (so no client loses a request sent
//! while the worker leaves), closes connections that stay idle, and exits once every
//! connection is done.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rr_cluster::Worker;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After a drain notice, an idle keep-alive connection is closed after this long.
const IDLE_AFTER_DRAIN: Duration = Duration::from_secs(2);
/// The longest `/sleep/<ms>`.
const MAX_SLEEP_MS: u64 = 60_000;

#[derive(Debug, Clone)]
struct Identity {
    id: HeaderValue,
    pid: HeaderValue,
    body: Bytes,
}

pub(crate) async fn main() -> ExitCode {
    let worker = match Worker::from_env().await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("rr-cluster hello-worker: error: {e}");
            eprintln!("(the demo worker runs under `rr-cluster run`)");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    worker.install_panic_hook();
    let pid = std::process::id();
    let identity = Identity {
        id: HeaderValue::from(worker.id()),
        pid: HeaderValue::from(pid),
        body: Bytes::from(format!("Hello from worker {} (pid {pid})\n", worker.id())),
    };
    let draining = worker.draining();
    let mut incoming = match worker.ready().await {
        Ok(incoming) => incoming,
        Err(e) => {
            eprintln!("rr-cluster hello-worker: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tracker = TaskTracker::new();
    while let Some(conn) = incoming.accept().await {
        tracker.spawn(serve(conn, identity.clone(), draining.clone()));
    }
    tracker.close();
    tracker.wait().await;
    ExitCode::SUCCESS
}

async fn serve(conn: rr_cluster::Connection, identity: Identity, draining: CancellationToken) {
    let service_draining = draining.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let identity = identity.clone();
        let closing = service_draining.is_cancelled();
        async move { Ok::<_, Infallible>(answer(req, &identity, closing).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn), service);
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => return,
        () = draining.cancelled() => {}
    }
    // Draining: requests still arriving get `Connection: close`; a connection with no
    // request for a while is closed politely.
    tokio::select! {
        _ = http.as_mut() => {}
        () = tokio::time::sleep(IDLE_AFTER_DRAIN) => {
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    identity: &Identity,
    closing: bool,
) -> Response<Full<Bytes>> {
    let mut status = StatusCode::OK;
    let mut body = identity.body.clone();
    if let Some(ms) = req.uri().path().strip_prefix("/sleep/") {
        match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_SLEEP_MS => tokio::time::sleep(Duration::from_millis(ms)).await,
            _ => {
                status = StatusCode::BAD_REQUEST;
                body = Bytes::from_static(b"usage: /sleep/<milliseconds up to 60000>\n");
            }
        }
    }
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert("x-worker-id", identity.id.clone());
    headers.insert("x-worker-pid", identity.pid.clone());
    if closing {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
