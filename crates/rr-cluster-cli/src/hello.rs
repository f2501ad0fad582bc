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
//! It serves through `rr_cluster::http`, the library's drain-correct server: on drain,
//! requests that arrive on open keep-alive connections get `Connection: close`, idle
//! connections are closed after a grace, and it exits once every connection is done.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use rr_cluster::Worker;
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
            crate::eprintln_safe(&format!("rr-cluster hello-worker: error: {e}"));
            crate::eprintln_safe("(the demo worker runs under `rr-cluster run`)");
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
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let identity = identity.clone();
        async move { Ok::<_, Infallible>(answer(req, &identity).await) }
    });
    match rr_cluster::http::serve(worker, service).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::eprintln_safe(&format!("rr-cluster hello-worker: error: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn answer(req: Request<hyper::body::Incoming>, identity: &Identity) -> Response<Full<Bytes>> {
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
    resp
}
