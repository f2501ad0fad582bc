//! A hyper HTTP/1.1 worker in thirty lines: answers "Hello from worker N".
//!
//! ```text
//! cargo build -p rr-cluster-examples --example hello
//! cargo run -p rr-cluster-cli -- run --workers 2 -- target/debug/examples/hello
//! curl http://127.0.0.1:8080/
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use rr_cluster::Worker;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let worker = Worker::from_env().await?;
    worker.install_panic_hook();
    let body = Bytes::from(format!("Hello from worker {}\n", worker.id()));
    let mut incoming = worker.ready().await?;
    while let Some(conn) = incoming.accept().await {
        let body = body.clone();
        let service = hyper::service::service_fn(move |_req| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
        });
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let _ = http.serve_connection(TokioIo::new(conn), service).await;
        });
    }
    worker.drained().await;
    Ok(())
}
