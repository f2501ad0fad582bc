//! An echo worker written with only the public `Worker` API: every byte a client sends
//! comes back on the same socket.
//!
//! ```text
//! cargo build -p rr-cluster-examples --example echo
//! cargo run -p rr-cluster-cli -- run --listen 127.0.0.1:9000 --workers 2 -- target/debug/examples/echo
//! nc 127.0.0.1 9000
//! ```

use rr_cluster::{Worker, WorkerError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), WorkerError> {
    let worker = Worker::from_env().await?;
    worker.install_panic_hook();
    let mut incoming = worker.ready().await?;
    while let Some(conn) = incoming.accept().await {
        tokio::spawn(async move {
            let (mut read, mut write) = tokio::io::split(conn);
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
    // Drain notice (or the master is gone): let open connections finish. An echo
    // connection has no natural end: one its client keeps open is cut at the drain
    // deadline. A protocol with requests ends its connections between them instead,
    // as `rr_cluster::http` does.
    worker.drained().await;
    Ok(())
}
