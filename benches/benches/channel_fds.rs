//! Descriptors per second through a channel pair: a `ChannelWriter` task sends
//! `Connections` frames, each with its descriptors as `SCM_RIGHTS` in one `sendmsg`, and
//! a `ChannelReader` receives them and closes what it got (the kernel installs a new
//! descriptor per one sent, which the receiver owns). Both run on one current-thread
//! tokio runtime, as the two sides of a master and a worker would on one core each.
//!
//! `channel/fds/N`: frames of N descriptors; the time is per frame (so frames/s is its
//! inverse) and the throughput is in descriptors per second. `channel/frames/ping`: the
//! same loop with frames that carry no descriptor, for comparison.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rr_cluster::channel::{ChannelReader, ChannelWriter, from_std, split};
use rr_cluster::protocol::{ToWorker, frame};
use rr_cluster_benches::connections;

/// Sockets to pass: a few socket pairs, each end duplicated, so that 16 descriptors
/// name real sockets (as accepted connections would) without opening 16 connections.
fn sockets(n: usize) -> Vec<StdUnixStream> {
    let pairs: Vec<(StdUnixStream, StdUnixStream)> = (0..2)
        .map(|_| StdUnixStream::pair().expect("socketpair"))
        .collect();
    (0..n)
        .map(|i| {
            let (a, b) = &pairs[i % pairs.len()];
            if i % 2 == 0 { a } else { b }.try_clone().expect("dup")
        })
        .collect()
}

struct Pair {
    runtime: tokio::runtime::Runtime,
    reader: ChannelReader,
    writer: Arc<ChannelWriter>,
}

fn pair() -> Pair {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (a, b) = StdUnixStream::pair().expect("socketpair");
    let (reader, writer) = runtime.block_on(async {
        let (_, writer) = split(from_std(a).expect("tokio stream"));
        let (reader, _) = split(from_std(b).expect("tokio stream"));
        (reader, writer)
    });
    Pair {
        runtime,
        reader,
        writer,
    }
}

/// Sends `iters` copies of `frame` with `fds` and receives them all; the elapsed time.
fn run(pair: &mut Pair, iters: u64, frame: &[u8], fds: &[RawFd]) -> Duration {
    let Pair {
        runtime,
        reader,
        writer,
    } = pair;
    let frame = frame.to_vec();
    let fds = fds.to_vec();
    let writer = Arc::clone(writer);
    runtime.block_on(async move {
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..iters {
                writer.send(&frame, &fds).await.expect("send");
            }
        });
        let mut received = 0usize;
        for _ in 0..iters {
            let (_msg, got) = reader
                .recv::<ToWorker>()
                .await
                .expect("recv")
                .expect("a frame");
            received += got.len();
            // `got` is dropped here: the received duplicates are closed.
        }
        sender.await.expect("sender");
        let elapsed = start.elapsed();
        std::hint::black_box(received);
        elapsed
    })
}

fn channel_fds(c: &mut Criterion) {
    let socks = sockets(16);
    let raw: Vec<RawFd> = socks.iter().map(AsRawFd::as_raw_fd).collect();
    let mut pair = pair();

    let mut group = c.benchmark_group("channel/fds");
    for n in [1u16, 16] {
        let bytes = frame(&connections(n)).expect("encode");
        let fds = &raw[..usize::from(n)];
        group.throughput(Throughput::Elements(u64::from(n)));
        group.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| run(&mut pair, iters, &bytes, fds))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("channel/frames");
    group.throughput(Throughput::Elements(1));
    let ping = frame(&ToWorker::Ping).expect("encode");
    group.bench_function("ping", |b| {
        b.iter_custom(|iters| run(&mut pair, iters, &ping, &[]))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = channel_fds
}
criterion_main!(benches);
