//! Node style: one binary that is both the master and its workers, like
//! `if (cluster.isPrimary) { cluster.fork() } else { http.createServer(...) }`.
//! The master also greets every worker with a message, and prints their replies.
//!
//! ```text
//! cargo run -p rr-cluster-examples --example cluster
//! curl http://127.0.0.1:3000/
//! ```

use rr_cluster::{Event, Master, Worker, WorkerCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
                handle.send(Some(slot), b"hello, worker".to_vec()).await?;
            },
            Some(msg) = messages.recv() => {
                println!("worker {} says: {}", msg.slot, String::from_utf8_lossy(&msg.payload));
            }
        }
    }
}

async fn worker() -> anyhow::Result<()> {
    let worker = Worker::from_env().await?;
    let mut messages = worker.messages().expect("first call");
    let replier = worker.clone();
    tokio::spawn(async move {
        while let Some(msg) = messages.recv().await {
            let reply = format!("got {:?}", String::from_utf8_lossy(&msg));
            let _ = replier.send(reply.into_bytes()).await;
        }
    });
    let id = worker.id();
    let mut incoming = worker.ready().await?;
    while let Some(mut conn) = incoming.accept().await {
        tokio::spawn(async move {
            // A minimal HTTP/1.0-style answer: read the request head, reply, close.
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let body = format!("Hello from worker {id}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
    worker.drained().await;
    Ok(())
}
