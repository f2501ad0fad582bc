//! An axum app run as a pool, master and workers in one binary (Node's
//! `cluster.fork()`): the master starts this same program as its workers, which serve
//! the Router with the library's drain-correct server.
//!
//! ```text
//! cargo run --release -p rr-cluster-examples --example axum -- --listen 127.0.0.1:3000 --workers 2
//! curl http://127.0.0.1:3000/            # Hello from worker 1 (pid 4243), you are 127.0.0.1:52044
//! kill -HUP <master pid>                 # rolling reload, no request lost
//! ```
//!
//! It takes `--listen ADDR`, `--workers N`, `--control PATH` and `--min-uptime D` as
//! `rr-cluster run` does, and obeys the same signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads,
//! SIGTTIN/SIGTTOU add or remove a worker. `rr-cluster status --control PATH` works on it.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use clap::Parser;
use rr_cluster::http::PeerAddr;
use rr_cluster::{Master, Worker, WorkerCommand};

#[derive(Debug, Parser)]
struct Args {
    /// Listen address (repeatable).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: Vec<String>,
    /// Number of workers [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// Control socket [default: rr-cluster's default path].
    #[arg(long)]
    control: Option<std::path::PathBuf>,
    /// How long each new worker serves beside the old one during a reload (e.g. 500ms)
    /// [default: 1s].
    #[arg(long, value_parser = rr_cluster::config::parse_duration)]
    min_uptime: Option<std::time::Duration>,
}

#[derive(Clone)]
struct Me {
    id: u32,
    pid: u32,
}

/// The client's address is there for TCP connections only (`PeerAddr`, or axum's
/// `ConnectInfo<SocketAddr>`): with `--listen unix:/path` there is none, so it is
/// optional (a required `ConnectInfo` would answer every such request with a 500).
async fn hello(State(me): State<Me>, client: Option<Extension<PeerAddr>>) -> impl IntoResponse {
    let client = match client {
        Some(Extension(PeerAddr(addr))) => addr.to_string(),
        None => "on a Unix socket".to_owned(),
    };
    (
        [("x-worker-id", me.id.to_string())],
        format!(
            "Hello from worker {} (pid {}), you are {client}\n",
            me.id, me.pid
        ),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if Worker::is_worker() {
        return worker().await;
    }
    // The library installs no logger: this is how to see its logs.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut builder = Master::builder()
        .listen_all(args.listen)
        .command(WorkerCommand::current_exe()?)
        .control_socket(
            args.control
                .unwrap_or_else(rr_cluster::control::default_socket_path),
        );
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    if let Some(d) = args.min_uptime {
        builder = builder.min_uptime(d);
    }
    std::process::exit(builder.build()?.run().await?);
}

async fn worker() -> anyhow::Result<()> {
    let worker = Worker::from_env().await?;
    worker.install_panic_hook();
    let me = Me {
        id: worker.id(),
        pid: std::process::id(),
    };
    let app = Router::new().route("/", get(hello)).with_state(me);
    rr_cluster::http::serve_tower(worker, app).await?;
    Ok(())
}
