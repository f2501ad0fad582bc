//! The demo worker's answer (`rr-cluster hello-worker`), for the reference servers:
//! the same status, headers and body, so that a comparison isolates rr-cluster's own
//! cost.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response};

/// The identity headers, named once, as the demo names them.
const X_WORKER_ID: HeaderName = HeaderName::from_static("x-worker-id");
const X_WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

/// What every response of worker `slot` carries.
#[derive(Debug, Clone)]
pub struct Identity {
    id: HeaderValue,
    pid: HeaderValue,
    body: Bytes,
}

impl Identity {
    /// The identity of this process as worker `slot`.
    pub fn new(slot: u32) -> Identity {
        let pid = std::process::id();
        Identity {
            id: HeaderValue::from(slot),
            pid: HeaderValue::from(pid),
            body: Bytes::from(format!("Hello from worker {slot} (pid {pid})\n")),
        }
    }

    /// The answer to any request.
    pub fn answer(&self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body.clone()));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(X_WORKER_ID, self.id.clone());
        headers.insert(X_WORKER_PID, self.pid.clone());
        resp
    }
}

/// Serves one connection with hyper's HTTP/1.1 server, keep-alive on.
pub async fn serve_http1<I>(io: I, identity: Identity)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
        let resp = identity.answer();
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// `--workers N --port P` style arguments: the value after `name`, parsed.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
