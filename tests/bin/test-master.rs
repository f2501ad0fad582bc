//! A master in its own process, for tests that must kill the master itself or starve
//! it of descriptors.
//!
//! `test-master [--hog-fds] [--no-heartbeat] <workers> <worker-program> [args...]`:
//! listens on 127.0.0.1:0 and prints `listening <addr>` and `ready <slot> <pid>` lines
//! on stdout. With `--hog-fds`, once every worker is ready it lowers its descriptor
//! limit and fills its table with /dev/null (prints `hogged <n>`), so that every
//! accept fails with EMFILE, until SIGUSR1 releases them (prints `released`).

use std::io::Write;

use rr_cluster::{Event, Master, WorkerCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut flag = |name: &str| {
        let found = args.first().is_some_and(|a| a == name);
        if found {
            args.remove(0);
        }
        found
    };
    let hog = flag("--hog-fds");
    let no_heartbeat = flag("--no-heartbeat");
    let (workers, command) = match args.as_slice() {
        [n, program, rest @ ..] => (n.parse()?, WorkerCommand::new(program).args(rest)),
        _ => anyhow::bail!("usage: test-master <workers> <worker-program> [args...]"),
    };
    let master = Master::builder()
        .listen("127.0.0.1:0")
        .workers(workers)
        .command(command)
        .heartbeat_timeout((!no_heartbeat).then_some(std::time::Duration::from_secs(10)))
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
    loop {
        tokio::select! {
            code = handle.wait() => std::process::exit(code),
            _ = release.recv() => {
                hogged.clear();
                writeln!(out, "released")?;
                out.flush()?;
            }
            event = events.recv() => {
                if let Ok(Event::WorkerReady { slot, pid, .. }) = event {
                    writeln!(out, "ready {slot} {pid}")?;
                    ready += 1;
                    if hog && ready == workers {
                        hogged = hog_descriptors()?;
                        writeln!(out, "hogged {}", hogged.len())?;
                    }
                    out.flush()?;
                }
            }
        }
    }
}

/// Lowers the descriptor limit and opens /dev/null until the table is full.
fn hog_descriptors() -> anyhow::Result<Vec<std::fs::File>> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: Some(256),
        },
    )?;
    let mut files = Vec::new();
    while files.len() < 1024 {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(_) => break,
        }
    }
    Ok(files)
}
