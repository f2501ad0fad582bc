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
//! for trying graceful stops and reloads. Like any request, one still running at the
//! drain deadline (`drain_timeout`, 30 s by default) is cut when the worker is killed.
//!
//! It serves through `rr_cluster::http`, the library's drain-correct server: on drain,
//! requests that arrive on open keep-alive connections get `Connection: close`, idle
//! connections are closed after a grace, and it exits once every connection is done.

use std::convert::Infallible;
use std::future::{Future, Ready};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use rr_cluster::Worker;
use tokio_util::either::Either;
/// The longest `/sleep/<ms>`.
const MAX_SLEEP_MS: u64 = 60_000;
/// The identity headers, named once: a `&str` name would be parsed (and validated) at
/// every insert, hundreds of instructions per response.
const X_WORKER_ID: HeaderName = HeaderName::from_static("x-worker-id");
const X_WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

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
    match rr_cluster::http::serve(worker, identity).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::eprintln_safe(&format!("rr-cluster hello-worker: error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The demo's answer: immediate for every path but `/sleep/<ms>`.
type Answer = Either<
    Ready<Result<Response<Full<Bytes>>, Infallible>>,
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>,
>;

impl hyper::service::Service<Request<hyper::body::Incoming>> for Identity {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Answer {
        let Some(ms) = req.uri().path().strip_prefix("/sleep/") else {
            return Either::Left(std::future::ready(Ok(self.answer(StatusCode::OK, None))));
        };
        let resp = match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_SLEEP_MS => {
                let resp = self.answer(StatusCode::OK, None);
                return Either::Right(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(resp)
                }));
            }
            _ => self.answer(
                StatusCode::BAD_REQUEST,
                Some(Bytes::from_static(
                    b"usage: /sleep/<milliseconds up to 60000>\n",
                )),
            ),
        };
        Either::Left(std::future::ready(Ok(resp)))
    }
}

impl Identity {
    fn answer(&self, status: StatusCode, body: Option<Bytes>) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(body.unwrap_or_else(|| self.body.clone())));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(X_WORKER_ID, self.id.clone());
        headers.insert(X_WORKER_PID, self.pid.clone());
        resp
    }
}
