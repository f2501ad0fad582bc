//! A worker for the end-to-end tests, driven by one command line per connection:
//!
//! - `id`: answers `<slot> <pid>`;
//! - `sleep <ms>`: answers `done <slot> <pid>` after `ms` milliseconds;
//! - `panic`: answers `panicking`, then panics in the handler (the panic hook tells
//!   the master, which replaces this worker);
//! - `exit <code>`: exits the process at once.
//!
//! Flags: `--crash-at-start <code>` exits before saying Ready; `--ready-delay <ms>`
//! waits before saying Ready.

use std::time::Duration;

use rr_cluster::Worker;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let worker = Worker::from_env().await?;
    if let Some(code) = flag("--crash-at-start") {
        std::process::exit(code as i32);
    }
    if let Some(ms) = flag("--ready-delay") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    worker.install_panic_hook();
    let slot = worker.id();
    let pid = std::process::id();
    let mut incoming = worker.ready().await?;
    while let Some(conn) = incoming.accept().await {
        tokio::spawn(async move {
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut words = line.split_whitespace();
            let answer = match (
                words.next(),
                words.next().and_then(|w| w.parse::<u64>().ok()),
            ) {
                (Some("id"), _) => format!("{slot} {pid}\n"),
                (Some("sleep"), Some(ms)) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    format!("done {slot} {pid}\n")
                }
                (Some("panic"), _) => {
                    let _ = conn.write_all(b"panicking\n").await;
                    let _ = conn.flush().await;
                    panic!("asked to panic");
                }
                (Some("exit"), Some(code)) => std::process::exit(code as i32),
                _ => "unknown command\n".to_owned(),
            };
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
    worker.drained().await;
    Ok(())
}
