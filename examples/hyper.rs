//! A hyper worker: answers "Hello from worker N" on HTTP/1.1 and HTTP/2 (h2c), with
//! the library's drain-correct server (no request is lost in a rolling reload).
//!
//! ```text
//! cargo build -p rr-cluster-examples --example hyper
//! cargo run -p rr-cluster-cli -- run --workers 2 -- target/debug/examples/hyper
//! curl http://127.0.0.1:8080/
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use rr_cluster::Worker;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let worker = Worker::from_env().await?;
    worker.install_panic_hook();
    let body = Bytes::from(format!("Hello from worker {}\n", worker.id()));
    let service = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    rr_cluster::http::serve(worker, service).await?;
    Ok(())
}
