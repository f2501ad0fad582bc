//! A worker for the end-to-end tests, driven by one command line per connection:
//!
//! - `id`: answers `<slot> <pid>`;
//! - `sleep <ms>`: answers `done <slot> <pid>` after `ms` milliseconds;
//! - `panic`: answers `panicking`, then panics in the handler (the panic hook tells
//!   the master, which replaces this worker);
//! - `exit <code>`: exits the process at once;
//! - `leak <KiB>`: keeps that much memory allocated, answers `leaked <slot> <pid>`;
//! - `hold`: answers `held <slot>` and keeps the connection open until the client
//!   closes it (an idle keep-alive connection).
//!
//! Flags: `--crash-at-start <code>` exits before saying Ready; `--crash-if-exists
//! <path>` exits 3 before Ready while that file exists; `--ready-delay <ms>`
//! waits before saying Ready; `--nofile <n>` lowers its descriptor limit first;
//! `--protocol <v>` speaks at most protocol version `v`; `--max-connections <n>`;
//! `--self-checks` checks `is_worker()` in a child and a
//! second `from_env()`, and exits 3 or 4 before Ready if either is wrong; `--print <text>` writes a line to stdout and stderr at start; `--linger` never exits
//! after a drain (the master's deadline must kill it); `--last-words <n>` writes `n`
//! lines to stdout once drained, just before it exits.
//!
//! Misbehaving workers, written against the raw channel: `--close-channel` closes its
//! channel after the handshake and lives on; `--flood` says Ready and then sends
//! heartbeats as fast as it can; `--no-read` says Ready and heartbeats but never reads
//! its channel again; `--spawn-child` starts `sleep 60` that inherits the environment
//! (and reports whether it believes it is a worker).

use std::path::Path;
use std::time::Duration;

use rr_cluster::protocol::ToMaster;
use rr_cluster::{Worker, channel};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Memory kept on purpose by `leak <KiB>`.
static LEAKED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let has = |name: &str| args.iter().any(|a| a == name);
    if has("--is-worker") {
        std::process::exit(i32::from(Worker::is_worker()));
    }
    if let Some(n) = flag("--nofile") {
        use rustix::process::{Resource, Rlimit, setrlimit};
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(n),
                maximum: Some(n),
            },
        )?;
    }
    if let Some(i) = args.iter().position(|a| a == "--print") {
        let text = args.get(i + 1).cloned().unwrap_or_default();
        println!("{text} (stdout)");
        eprintln!("{text} (stderr)");
    }
    if has("--close-channel") || has("--flood") || has("--no-read") {
        return raw(&args).await;
    }
    let mut builder = Worker::builder();
    if let Some(v) = flag("--protocol") {
        builder = builder.max_protocol_version(v as u32);
    }
    if let Some(n) = flag("--max-connections") {
        builder = builder.max_connections(n as u32);
    }
    let worker = builder.from_env().await?;
    if let Some(code) = flag("--crash-at-start") {
        std::process::exit(code as i32);
    }
    if let Some(i) = args.iter().position(|a| a == "--crash-if-exists") {
        // Boot failure while the file exists (a broken deploy, fixed later).
        if args.get(i + 1).is_some_and(|p| Path::new(p).exists()) {
            std::process::exit(3);
        }
    }
    if let Some(ms) = flag("--ready-delay") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if has("--self-checks") {
        // A child that inherits the environment (not the channel: it is
        // close-on-exec once adopted) must not believe it is a worker.
        let status = std::process::Command::new(std::env::current_exe()?)
            .arg("--is-worker")
            .status()?;
        if status.code() != Some(0) {
            eprintln!("a child of the worker believes it is a worker");
            std::process::exit(3);
        }
        // A second adoption is refused, and the first one still works.
        if !matches!(
            Worker::from_env().await,
            Err(rr_cluster::WorkerError::AlreadyAdopted)
        ) {
            eprintln!("a second from_env() was not refused");
            std::process::exit(4);
        }
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
                (Some("leak"), Some(kib)) => {
                    // Keeps `kib` KiB allocated (and touched) for the process's life.
                    let block = vec![1u8; (kib * 1024) as usize];
                    LEAKED.lock().unwrap_or_else(|p| p.into_inner()).push(block);
                    format!("leaked {slot} {pid}\n")
                }
                (Some("hold"), _) => {
                    let _ = conn.write_all(format!("held {slot}\n").as_bytes()).await;
                    let _ = conn.flush().await;
                    let mut rest = String::new();
                    let _ = conn.read_line(&mut rest).await;
                    return;
                }
                _ => "unknown command\n".to_owned(),
            };
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
    if has("--linger") {
        // Ignores the drain deadline: the master must kill it.
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    worker.drained().await;
    if let Some(n) = flag("--last-words") {
        // What a worker says as it leaves: every line must reach the master's output.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for i in 0..n {
            writeln!(out, "last words {i} of {n}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// Workers that break the rules, on the raw channel.
async fn raw(args: &[String]) -> anyhow::Result<()> {
    let has = |name: &str| args.iter().any(|a| a == name);
    let stream = std::os::unix::net::UnixStream::from(rr_cluster::worker::adopt_channel()?);
    let (mut reader, writer) = channel::split(channel::from_std(stream)?);
    let hello = reader
        .recv_hello()
        .await?
        .ok_or(anyhow::anyhow!("no hello"))?;
    if has("--close-channel") {
        drop(reader);
        drop(writer);
        // The channel is closed; the process lives on.
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    writer
        .send_msg(&ToMaster::Ready {
            pid: std::process::id(),
            version: 1,
        })
        .await?;
    if has("--flood") {
        let beat = ToMaster::Heartbeat {
            active: 0,
            served: 0,
        };
        loop {
            if writer.send_msg(&beat).await.is_err() {
                // Dropped by the master: linger like a broken worker would.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    }
    // --no-read: heartbeats forever, never another read.
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(hello.heartbeat_ms)));
    loop {
        tick.tick().await;
        let beat = ToMaster::Heartbeat {
            active: 0,
            served: 0,
        };
        if writer.send_msg(&beat).await.is_err() {
            return Ok(());
        }
        let _ = &reader;
    }
}
