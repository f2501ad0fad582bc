//! Node style: one binary that is both the master and its workers, like
//! `if (cluster.isPrimary) { cluster.fork() } else { http.createServer(...) }`.
//! The master also greets every worker with a message, and prints their replies.
//!
//! ```text
//! cargo run -p rr-cluster-examples --example cluster
//! curl http://127.0.0.1:3000/
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use rr_cluster::{Event, Master, Worker, WorkerCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if Worker::is_worker() {
        return worker().await;
    }
    let master = Master::builder()
        .listen("127.0.0.1:3000")
        .workers(2)
        .command(WorkerCommand::current_exe()?)
        .build()?;
    let mut events = master.events();
    let handle = master.start().await?;
    handle.forward_os_signals()?;
    let mut messages = handle.messages().expect("first call");
    println!(
        "master {} listening on {}",
        std::process::id(),
        handle.local_addrs()[0]
    );
    loop {
        tokio::select! {
            code = handle.wait() => std::process::exit(code),
            event = events.recv() => if let Ok(Event::WorkerReady { slot, .. }) = event {
                // A message can fail (the worker left meanwhile, the master stops):
                // that is no reason to end the master.
                if let Err(e) = handle.send(Some(slot), b"hello, worker".to_vec()).await {
                    eprintln!("no hello for worker {slot}: {e}");
                }
            },
            Some(msg) = messages.recv() => {
                println!("worker {} says: {}", msg.slot, String::from_utf8_lossy(&msg.payload));
            }
        }
    }
}

async fn worker() -> anyhow::Result<()> {
    let worker = Worker::from_env().await?;
    worker.install_panic_hook();
    let mut messages = worker.messages().expect("first call");
    let replier = worker.clone();
    tokio::spawn(async move {
        while let Some(msg) = messages.recv().await {
            let reply = format!("got {:?}", String::from_utf8_lossy(&msg));
            let _ = replier.send(reply.into_bytes()).await;
        }
    });
    // The library's drain-correct HTTP server (keep-alive, HTTP/2): no request is lost
    // in a rolling reload or a stop.
    let body = Bytes::from(format!("Hello from worker {}\n", worker.id()));
    let service = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    rr_cluster::http::serve(worker, service).await?;
    Ok(())
}
