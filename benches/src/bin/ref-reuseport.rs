//! The SO_REUSEPORT reference: N processes each listen on the same port with
//! `SO_REUSEPORT` (the kernel spreads new connections by a hash of the 4-tuple) and
//! serve with hyper on a current-thread runtime, the demo worker's answer.
//! `balance = "shared"` is measured against this.
//!
//! `ref-reuseport --port P --workers N` (SIGTERM stops it and its workers).

use std::os::unix::process::CommandExt;

use rr_cluster_benches::service::{Identity, arg, serve_http1};

fn main() -> std::io::Result<()> {
    let port: u16 = arg("--port", 8080);
    if let Ok(slot) = std::env::var("REF_WORKER_SLOT") {
        return worker(port, slot.parse().unwrap_or(0));
    }
    let workers: usize = arg("--workers", 2);
    let mut children = Vec::new();
    for slot in 0..workers {
        children.push(
            std::process::Command::new(std::env::current_exe()?)
                .args(["--port", &port.to_string()])
                .env("REF_WORKER_SLOT", slot.to_string())
                .process_group(0)
                .spawn()?,
        );
    }
    // Stop the workers with the parent.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        Ok::<_, std::io::Error>(())
    })?;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

fn worker(port: u16, slot: u32) -> std::io::Result<()> {
    let identity = Identity::new(slot);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.set_reuseaddr(true)?;
        socket.bind(([127, 0, 0, 1], port).into())?;
        let listener = socket.listen(4096)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_http1(stream, identity.clone()));
        }
    })
}
