//! Encoding and decoding of single frames: what each message costs the master and the
//! worker. Throughput is in messages per second.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rr_cluster::protocol::{
    HEADER_LEN, Message, decode_hello, decode_payload, encode_frame, frame,
};
use rr_cluster_benches::{connections, heartbeat, hello, user_1k};

fn encode_one<M: Message>(c: &mut Criterion, name: &str, msg: &M) {
    let mut group = c.benchmark_group("codec/encode");
    group.throughput(Throughput::Elements(1));
    // Into a reused buffer, as a sender batching frames does.
    let mut buf = Vec::with_capacity(4096);
    group.bench_function(name, |b| {
        b.iter(|| {
            buf.clear();
            encode_frame(black_box(msg), &mut buf).expect("encode");
            black_box(buf.len())
        })
    });
    group.finish();
}

fn decode_one<M: Message>(c: &mut Criterion, name: &str, msg: &M) {
    let bytes = frame(msg).expect("encode");
    let payload = &bytes[HEADER_LEN..];
    let mut group = c.benchmark_group("codec/decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter(|| decode_payload::<M>(black_box(payload)).expect("decode"))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let to_worker = [
        ("connections", connections(16)),
        ("hello", hello()),
        ("user_1k", user_1k()),
    ];
    let to_master = [("heartbeat", heartbeat())];
    for (name, msg) in &to_worker {
        encode_one(c, name, msg);
    }
    for (name, msg) in &to_master {
        encode_one(c, name, msg);
    }
    for (name, msg) in &to_worker {
        decode_one(c, name, msg);
    }
    for (name, msg) in &to_master {
        decode_one(c, name, msg);
    }
    // The worker's first frame goes through the version check first.
    let bytes = frame(&hello()).expect("encode");
    let mut group = c.benchmark_group("codec/decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hello_handshake", |b| {
        b.iter(|| decode_hello(black_box(&bytes[HEADER_LEN..])).expect("decode"))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
