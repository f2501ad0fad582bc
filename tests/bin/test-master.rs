//! A master in its own process, for tests that must kill the master itself, starve it
//! of descriptors, run it as another user or measure its memory.
//!
//! `test-master [FLAGS] <workers> <worker-program> [args...]`: listens on 127.0.0.1
//! (port 0 unless `--port`) and prints `listening <addr>`, `ready <slot> <pid>` and
//! `event <name> <slot> <id>` lines on stdout.
//!
//! Flags (before the worker count):
//! - `--hog-fds`: once every worker is ready, lower the descriptor limit and fill the
//!   table with /dev/null (prints `hogged <n>`), so that every accept fails with
//!   EMFILE, until SIGUSR1 releases them (prints `released`);
//! - `--no-heartbeat`: no heartbeat timeout;
//! - `--nofile <n>`: lower the master's own descriptor limit at start;
//! - `--keep`: `on_give_up = keep`; `--limit <n>`: the restart limit;
//! - `--port <p>`: listen on this port;
//! - `--hb <interval-ms> <timeout-ms>`: heartbeat interval and timeout;
//! - `--control <path>`: serve a control socket there;
//! - `--protocol node`: the workers speak the Node.js dialect.
//!
//! SIGUSR2 prints the dispatch counters (`metric <name> <value>` lines, then
//! `metrics end`).

use std::io::Write;
use std::time::Duration;

use rr_cluster::{Event, GiveUpAction, Master, Protocol, WorkerCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut hog = false;
    let mut builder = Master::builder();
    let mut port = 0u16;
    let mut protocol = Protocol::Binary;
    loop {
        match args.first().map(String::as_str) {
            Some("--hog-fds") => {
                hog = true;
                args.remove(0);
            }
            Some("--no-heartbeat") => {
                builder = builder.heartbeat_timeout(None);
                args.remove(0);
            }
            Some("--keep") => {
                builder = builder.on_give_up(GiveUpAction::Keep);
                args.remove(0);
            }
            Some("--nofile") => {
                let n: u64 = args[1].parse()?;
                use rustix::process::{Resource, Rlimit, setrlimit};
                setrlimit(
                    Resource::Nofile,
                    Rlimit {
                        current: Some(n),
                        maximum: Some(n),
                    },
                )?;
                args.drain(..2);
            }
            Some("--limit") => {
                builder = builder
                    .restart_limit(args[1].parse()?)
                    .backoff_base(Duration::from_millis(10))
                    .backoff_max(Duration::from_millis(50));
                args.drain(..2);
            }
            Some("--port") => {
                port = args[1].parse()?;
                args.drain(..2);
            }
            Some("--hb") => {
                let interval: u64 = args[1].parse()?;
                let timeout: u64 = args[2].parse()?;
                builder = builder
                    .heartbeat_interval(Duration::from_millis(interval))
                    .heartbeat_timeout(Some(Duration::from_millis(timeout)));
                args.drain(..3);
            }
            Some("--control") => {
                builder = builder.control_socket(&args[1]);
                args.drain(..2);
            }
            Some("--protocol") => {
                protocol = args[1].parse().map_err(anyhow::Error::msg)?;
                args.drain(..2);
            }
            _ => break,
        }
    }
    let (workers, command) = match args.as_slice() {
        [n, program, rest @ ..] => (
            n.parse()?,
            WorkerCommand::new(program).args(rest).protocol(protocol),
        ),
        _ => anyhow::bail!("usage: test-master [flags] <workers> <worker-program> [args...]"),
    };
    let master = builder
        .listen(format!("127.0.0.1:{port}"))
        .workers(workers)
        .command(command)
        .build()?;
    let mut events = master.events();
    let handle = master.start().await?;
    handle.forward_os_signals()?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", handle.local_addrs()[0])?;
    out.flush()?;
    let mut ready = 0;
    let mut hogged: Vec<std::fs::File> = Vec::new();
    let mut release =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut report = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            code = handle.wait() => std::process::exit(code),
            _ = release.recv(), if hog => {
                hogged.clear();
                writeln!(out, "released")?;
                out.flush()?;
            }
            _ = report.recv() => {
                // `metric <name> <value>` for the dispatch counters.
                let text = handle.metrics().await.unwrap_or_default();
                for line in text.lines().filter(|l| l.starts_with("rr_cluster_dispatch_")) {
                    writeln!(out, "metric {line}")?;
                }
                writeln!(out, "metrics end")?;
                out.flush()?;
            }
            event = events.recv() => {
                let line = match event {
                    Ok(Event::WorkerReady { slot, pid, .. }) => {
                        ready += 1;
                        Some(format!("ready {slot} {pid}"))
                    }
                    Ok(Event::WorkerStalled { slot, id, .. }) => Some(format!("event stalled {slot} {id}")),
                    Ok(Event::WorkerResumed { slot, id }) => Some(format!("event resumed {slot} {id}")),
                    Ok(Event::WorkerHung { slot, id, .. }) => Some(format!("event hung {slot} {id}")),
                    Ok(Event::WorkerChannelClosed { slot, id, .. }) => Some(format!("event closed {slot} {id}")),
                    Ok(Event::GiveUp { .. }) => Some("event give-up 0 0".to_owned()),
                    Ok(Event::ListenersPaused { paused }) => Some(format!("event paused {paused} 0")),
                    _ => None,
                };
                if let Some(line) = line {
                    writeln!(out, "{line}")?;
                    if hog && ready == workers && hogged.is_empty() && line.starts_with("ready") {
                        hogged = hog_descriptors().await?;
                        writeln!(out, "hogged {}", hogged.len())?;
                    }
                    out.flush()?;
                }
            }
        }
    }
}

/// Lowers the descriptor limit and opens /dev/null until the table is full. Then
/// takes, for a while, any slot that frees up: a descriptor the master held for a
/// moment when the table filled (a /proc file it was reading, say) would otherwise
/// let every waiting connection through, one after the other.
async fn hog_descriptors() -> anyhow::Result<Vec<std::fs::File>> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: Some(256),
        },
    )?;
    let mut files = Vec::new();
    for round in 0..10 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while files.len() < 1024 {
            match std::fs::File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(_) => break,
            }
        }
    }
    Ok(files)
}
