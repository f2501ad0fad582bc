//! A worker for measurements only: rr-cluster's `Worker` and `Connection` with hyper's
//! HTTP/1.1 server and the demo's answer, without `rr_cluster::http`. Next to the demo
//! worker (`rr-cluster hello-worker`), it isolates what the library's HTTP layer (the
//! drain rules, protocol sniffing) costs per request.
//!
//! `rr-cluster run --workers 2 -- target/release/bare-worker` (compare.sh: `rr-bare`).
//!
//! Not drain-correct: when the worker drains it stops taking connections and exits,
//! and the connections it still serves end with it. Use `rr_cluster::http` to serve.

use rr_cluster_benches::service::{Identity, serve_http1};

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare-worker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let worker = match rr_cluster::Worker::from_env().await {
            Ok(w) => w,
            Err(e) => {
                eprintln!("bare-worker: {e} (it runs under `rr-cluster run`)");
                return std::process::ExitCode::FAILURE;
            }
        };
        let identity = Identity::new(worker.id());
        let mut incoming = match worker.ready().await {
            Ok(incoming) => incoming,
            Err(e) => {
                eprintln!("bare-worker: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        while let Some(conn) = incoming.accept().await {
            tokio::spawn(serve_http1(conn, identity.clone()));
        }
        std::process::ExitCode::SUCCESS
    })
}
