//! A master in its own process, for tests that must kill the master itself.
//! `test-master <workers> <worker-program> [args...]`: listens on 127.0.0.1:0 and
//! prints `listening <addr>` and `ready <slot> <pid>` lines on stdout.

use std::io::Write;

use rr_cluster::{Event, Master, WorkerCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (workers, command) = match args.as_slice() {
        [n, program, rest @ ..] => (n.parse()?, WorkerCommand::new(program).args(rest)),
        _ => anyhow::bail!("usage: test-master <workers> <worker-program> [args...]"),
    };
    let master = Master::builder()
        .listen("127.0.0.1:0")
        .workers(workers)
        .command(command)
        .build()?;
    let mut events = master.events();
    let handle = master.start().await?;
    handle.forward_os_signals()?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", handle.local_addrs()[0])?;
    out.flush()?;
    loop {
        tokio::select! {
            code = handle.wait() => std::process::exit(code),
            event = events.recv() => {
                if let Ok(Event::WorkerReady { slot, pid, .. }) = event {
                    writeln!(out, "ready {slot} {pid}")?;
                    out.flush()?;
                }
            }
        }
    }
}
