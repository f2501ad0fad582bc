//! Property tests of the frame decoder and of the channel's receiving half, through the
//! public API only.
//!
//! - Decoders (`peek_len`, `decode_payload::<ToWorker>`/`::<ToMaster>`, `decode_hello`)
//!   never panic on hostile input, reject what they must, and accept only canonical
//!   encodings.
//! - Every message round-trips through `frame` and `decode_payload`, with the size the
//!   documented layout gives it; truncated or extended payloads are errors.
//! - A `ChannelReader` fed arbitrary bytes (and descriptors) yields exactly the frames a
//!   reference model finds in them, then ends cleanly or with the model's error: never
//!   a panic, a hang or a leaked descriptor.
//!
//! Case counts default to 2000 per decoder property and 300 per channel property;
//! `PROPTEST_CASES=N` overrides them all. Each property prints how many cases ran
//! (`cargo test --test proptest_decode -- --show-output`).

use std::fmt::Debug;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use rr_cluster::channel::{ChannelError, from_std, split};
use rr_cluster::protocol::{
    HEADER_LEN, HELLO_VERSION, Hello, ListenerInfo, ListenerKind, MAX_FDS_PER_FRAME, MAX_FRAME_LEN,
    Message, ProtocolError, ToMaster, ToWorker, decode_hello, decode_payload, encode_frame, frame,
    peek_len,
};

const DECODER_CASES: u32 = 2000;
const CHANNEL_CASES: u32 = 300;
/// Bytes of `User` data that fill a frame exactly: tag (4) + length (8) + data.
const MAX_USER_DATA: usize = MAX_FRAME_LEN - 12;
/// How long one channel case may take before it counts as a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `test` over `strategy` for `default_cases` cases (or `PROPTEST_CASES`), panics
/// with the shrunk counterexample on failure, and prints how many cases ran.
fn check<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        source_file: Some(file!()),
        // A failing seed is saved beside this file, as proptest_decode.proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let ran = AtomicU32::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(value)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    println!("{name}: {} cases passed", ran.load(Ordering::Relaxed));
}

// --- strategies ---------------------------------------------------------------------

/// `User` data: mostly small and random, sometimes large, sometimes at the frame limit.
fn user_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => vec(any::<u8>(), 0..64),
        1 => (0..=MAX_USER_DATA + 16, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        1 => (MAX_USER_DATA - 2..=MAX_USER_DATA + 2, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

fn small_data() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9./:\\[\\]]{0,24}",
        "\\PC{0,16}",
        (0usize..2000).prop_map(|n| "é".repeat(n)),
    ]
}

fn listener_info() -> impl Strategy<Value = ListenerInfo> {
    (
        prop_oneof![Just(ListenerKind::Tcp), Just(ListenerKind::Unix)],
        text(),
    )
        .prop_map(|(kind, address)| ListenerInfo { kind, address })
}

fn hello(version: impl Strategy<Value = u32>) -> impl Strategy<Value = Hello> {
    (
        version,
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        vec(listener_info(), 0..6),
    )
        .prop_map(
            |(version, worker_id, generation, heartbeat_ms, listeners)| Hello {
                version,
                worker_id,
                generation,
                heartbeat_ms,
                listeners,
            },
        )
}

/// Every `ToWorker` variant; `Connections` claims a count drawn from `count`.
fn to_worker(
    count: impl Strategy<Value = u16> + 'static,
    data: impl Strategy<Value = Vec<u8>> + 'static,
) -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        hello(any::<u32>()).prop_map(ToWorker::Hello),
        (any::<u16>(), count)
            .prop_map(|(listener, count)| ToWorker::Connections { listener, count }),
        any::<u64>().prop_map(|deadline_ms| ToWorker::Drain { deadline_ms }),
        Just(ToWorker::Ping),
        data.prop_map(ToWorker::User),
        any::<u16>().prop_map(|listener| ToWorker::Listener { listener }),
    ]
}

/// Every `ToMaster` variant.
fn to_master(data: impl Strategy<Value = Vec<u8>> + 'static) -> impl Strategy<Value = ToMaster> {
    prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(pid, version)| ToMaster::Ready { pid, version }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(active, served)| ToMaster::Heartbeat { active, served }),
        text().prop_map(|reason| ToMaster::Suicide { reason }),
        Just(ToMaster::Pong),
        data.prop_map(ToMaster::User),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(received, lost, capacity)| {
            ToMaster::Ack {
                received,
                lost,
                capacity,
            }
        }),
    ]
}

fn payload_of<M: Message>(msg: &M) -> Vec<u8> {
    frame(msg)
        .map(|f| f[HEADER_LEN..].to_vec())
        .unwrap_or_default()
}

fn le32(n: u32) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

/// Payloads a hostile or broken peer might send.
fn hostile_payload() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        to_worker(any::<u16>(), small_data()).prop_map(|m| payload_of(&m)),
        to_master(small_data()).prop_map(|m| payload_of(&m)),
    ];
    prop_oneof![
        // Noise.
        vec(any::<u8>(), 0..256),
        // A plausible tag, then noise.
        (0u32..7, vec(any::<u8>(), 0..96)).prop_map(|(tag, tail)| [le32(tag), tail].concat()),
        // A Hello of this or any version, then noise.
        (
            prop_oneof![Just(HELLO_VERSION), any::<u32>()],
            vec(any::<u8>(), 0..96)
        )
            .prop_map(|(version, tail)| [le32(0), le32(version), tail].concat()),
        // A tag, then a length or count that may lie, then a few bytes.
        (
            0u32..5,
            prop_oneof![any::<u64>(), 0u64..64],
            vec(any::<u8>(), 0..32)
        )
            .prop_map(|(tag, len, tail)| [le32(tag), len.to_le_bytes().to_vec(), tail].concat()),
        // A Hello whose listener count or address length lies.
        (any::<u64>(), vec(any::<u8>(), 0..48)).prop_map(|(count, tail)| {
            [
                le32(0),
                le32(HELLO_VERSION),
                le32(0),
                vec![0; 8],
                le32(0),
                count.to_le_bytes().to_vec(),
                tail,
            ]
            .concat()
        }),
        // A valid payload with a few bytes changed, cut short or extended.
        (
            valid,
            vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            prop_oneof![Just(None), any::<prop::sample::Index>().prop_map(Some)],
            vec(any::<u8>(), 0..3),
        )
            .prop_map(|(mut p, edits, cut, extra)| {
                if !p.is_empty() {
                    for (i, b) in edits {
                        let i = i.index(p.len());
                        p[i] = b;
                    }
                    if let Some(cut) = cut {
                        p.truncate(cut.index(p.len()));
                    }
                }
                p.extend(extra);
                p
            }),
        // Sizes around the frame limit.
        (MAX_FRAME_LEN - 8..=MAX_FRAME_LEN + 8, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

// --- the decoder properties -----------------------------------------------------------

fn prefix_of(p: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(p.get(..4)?.try_into().ok()?))
}

/// The checks every decoder must pass on any payload `p`.
fn decoders_hold_on(p: &[u8]) -> Result<(), TestCaseError> {
    // peek_len reads the first 4 bytes as a length and enforces the limit.
    match (peek_len(p), prefix_of(p)) {
        (Ok(None), None) => {}
        (Ok(Some(len)), Some(prefix)) => {
            prop_assert_eq!(len, prefix as usize);
            prop_assert!(len <= MAX_FRAME_LEN);
        }
        (Err(ProtocolError::MessageTooLarge { len, max }), Some(prefix)) => {
            prop_assert_eq!(len, prefix as usize);
            prop_assert!(len > MAX_FRAME_LEN && max == MAX_FRAME_LEN);
        }
        (other, prefix) => prop_assert!(false, "peek_len: {other:?} for prefix {prefix:?}"),
    }

    // Whatever decodes re-encodes to the same bytes: one encoding per message.
    let too_large = p.len() > MAX_FRAME_LEN;
    match decode_payload::<ToWorker>(p) {
        Ok(m) => {
            prop_assert!(!too_large);
            prop_assert!(m.fd_count() <= MAX_FDS_PER_FRAME);
            prop_assert_eq!(payload_of(&m), p, "{:?} is not canonical", m);
        }
        Err(ProtocolError::MessageTooLarge { .. }) => prop_assert!(too_large),
        Err(_) => prop_assert!(!too_large),
    }
    match decode_payload::<ToMaster>(p) {
        Ok(m) => {
            prop_assert!(!too_large);
            prop_assert_eq!(m.fd_count(), 0);
            prop_assert_eq!(payload_of(&m), p, "{:?} is not canonical", m);
        }
        Err(ProtocolError::MessageTooLarge { .. }) => prop_assert!(too_large),
        Err(_) => prop_assert!(!too_large),
    }

    // decode_hello: the version first, then exactly decode_payload's answer.
    let tag_and_version = p
        .get(..8)
        .map(|h| (prefix_of(h).unwrap_or(0), prefix_of(&h[4..]).unwrap_or(0)));
    match decode_hello(p) {
        Ok(hello) => {
            prop_assert_eq!(hello.version, HELLO_VERSION);
            prop_assert_eq!(payload_of(&ToWorker::Hello(hello)), p);
        }
        Err(ProtocolError::VersionMismatch { peer, ours }) => {
            prop_assert_eq!(tag_and_version, Some((0, peer)));
            prop_assert!(peer != HELLO_VERSION && ours == HELLO_VERSION);
        }
        Err(_) => {
            if let Some((0, version)) = tag_and_version {
                prop_assert_eq!(version, HELLO_VERSION, "a mismatch must be named");
            }
            prop_assert!(
                !matches!(
                    decode_payload::<ToWorker>(p),
                    Ok(ToWorker::Hello(Hello {
                        version: HELLO_VERSION,
                        ..
                    }))
                ),
                "decode_payload accepts this Hello"
            );
        }
    }
    Ok(())
}

#[test]
fn decoders_never_panic_on_hostile_input() {
    check("hostile payloads", DECODER_CASES, hostile_payload(), |p| {
        decoders_hold_on(&p)
    });
}

/// The payload size the documented layout gives a message.
fn documented_len_to_worker(m: &ToWorker) -> usize {
    match m {
        ToWorker::Hello(h) => {
            32 + h
                .listeners
                .iter()
                .map(|l| 12 + l.address.len())
                .sum::<usize>()
        }
        ToWorker::Connections { .. } => 8,
        ToWorker::Drain { .. } => 12,
        ToWorker::Ping => 4,
        ToWorker::User(data) => 12 + data.len(),
        ToWorker::Listener { .. } => 6,
        other => panic!("no documented layout for {other:?}"),
    }
}

fn documented_len_to_master(m: &ToMaster) -> usize {
    match m {
        ToMaster::Ready { .. } => 12,
        ToMaster::Heartbeat { .. } => 16,
        ToMaster::Suicide { reason } => 12 + reason.len(),
        ToMaster::Pong => 4,
        ToMaster::User(data) => 12 + data.len(),
        ToMaster::Ack { .. } => 24,
        other => panic!("no documented layout for {other:?}"),
    }
}

/// `msg` encodes to the documented size (or is refused for exceeding the limit), decodes
/// back to itself, and its cut or extended payloads are errors.
fn round_trips<M>(
    msg: &M,
    documented_len: usize,
    cut: prop::sample::Index,
) -> Result<(), TestCaseError>
where
    M: Message + PartialEq + Debug,
{
    let mut out = vec![0xAA];
    match encode_frame(msg, &mut out) {
        Ok(()) => prop_assert!(documented_len <= MAX_FRAME_LEN),
        Err(ProtocolError::MessageTooLarge { len, max }) => {
            prop_assert!(documented_len > MAX_FRAME_LEN);
            prop_assert_eq!((len, max), (documented_len, MAX_FRAME_LEN));
            prop_assert_eq!(out, vec![0xAA], "a refused frame leaves the buffer alone");
            prop_assert!(frame(msg).is_err());
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("encode: {e}"))),
    }
    let bytes = frame(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        &out[1..],
        &bytes[..],
        "encode_frame appends what frame returns"
    );
    prop_assert_eq!(bytes.len(), HEADER_LEN + documented_len);
    prop_assert_eq!(peek_len(&bytes).ok().flatten(), Some(documented_len));
    let payload = &bytes[HEADER_LEN..];
    let back: M = decode_payload(payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);

    let cut = cut.index(payload.len());
    prop_assert!(
        decode_payload::<M>(&payload[..cut]).is_err(),
        "cut at {}",
        cut
    );
    prop_assert!(decode_payload::<M>(&payload[..payload.len() - 1]).is_err());
    let mut longer = payload.to_vec();
    longer.push(0);
    let extended = decode_payload::<M>(&longer);
    if longer.len() > MAX_FRAME_LEN {
        prop_assert!(
            matches!(extended, Err(ProtocolError::MessageTooLarge { .. })),
            "{:?}",
            extended
        );
    } else {
        prop_assert!(
            matches!(extended, Err(ProtocolError::TrailingBytes { len, extra: 1 }) if len == payload.len()),
            "{:?}",
            extended
        );
    }
    Ok(())
}

#[test]
fn every_to_worker_message_round_trips() {
    let strategy = (
        to_worker(0..=MAX_FDS_PER_FRAME as u16, user_data()),
        any::<prop::sample::Index>(),
    );
    check(
        "ToWorker round trip",
        DECODER_CASES,
        strategy,
        |(msg, cut)| round_trips(&msg, documented_len_to_worker(&msg), cut),
    );
}

#[test]
fn every_to_master_message_round_trips() {
    let strategy = (to_master(user_data()), any::<prop::sample::Index>());
    check(
        "ToMaster round trip",
        DECODER_CASES,
        strategy,
        |(msg, cut)| round_trips(&msg, documented_len_to_master(&msg), cut),
    );
}

#[test]
fn hello_handshake_properties() {
    let strategy = (hello(any::<u32>()), vec(any::<u8>(), 0..8));
    check(
        "Hello handshake",
        DECODER_CASES,
        strategy,
        |(hello, junk)| {
            let payload = payload_of(&ToWorker::Hello(hello.clone()));
            let mut with_junk = payload.clone();
            with_junk.extend_from_slice(&junk);
            if hello.version == HELLO_VERSION {
                let back =
                    decode_hello(&payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(back, hello);
                if !junk.is_empty() {
                    prop_assert!(
                        matches!(
                            decode_hello(&with_junk),
                            Err(ProtocolError::TrailingBytes { .. })
                        ),
                        "trailing bytes after a Hello"
                    );
                }
            } else {
                // Named as a mismatch even when the rest does not decode (a later version
                // may append fields).
                for p in [&payload, &with_junk, &payload[..8].to_vec()] {
                    prop_assert!(
                        matches!(
                            decode_hello(p),
                            Err(ProtocolError::VersionMismatch { peer, ours: HELLO_VERSION })
                                if peer == hello.version
                        ),
                        "a version mismatch must be named"
                    );
                }
            }
            Ok(())
        },
    );
}

#[test]
fn connections_beyond_the_fd_limit_are_refused() {
    let strategy = (any::<u16>(), (MAX_FDS_PER_FRAME as u16 + 1)..=u16::MAX);
    check(
        "Connections fd limit",
        DECODER_CASES,
        strategy,
        |(listener, count)| {
            let payload = payload_of(&ToWorker::Connections { listener, count });
            prop_assert_eq!(payload.len(), 8);
            let result = decode_payload::<ToWorker>(&payload);
            prop_assert!(
                matches!(result, Err(ProtocolError::TooManyFds { count: c, max: MAX_FDS_PER_FRAME }) if c == usize::from(count)),
                "{:?}",
                result
            );
            Ok(())
        },
    );
}

#[test]
fn a_frame_at_the_limit_decodes() {
    let msg = ToWorker::User(vec![7; MAX_USER_DATA]);
    let bytes = frame(&msg).expect("a frame of exactly MAX_FRAME_LEN");
    assert_eq!(bytes.len(), HEADER_LEN + MAX_FRAME_LEN);
    assert_eq!(
        decode_payload::<ToWorker>(&bytes[HEADER_LEN..]).expect("decode"),
        msg
    );
    let over = ToMaster::User(vec![7; MAX_USER_DATA + 1]);
    assert!(matches!(
        frame(&over),
        Err(ProtocolError::MessageTooLarge { len, max: MAX_FRAME_LEN }) if len == MAX_FRAME_LEN + 1
    ));
}

// --- the channel properties -----------------------------------------------------------

/// How a stream of frames ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// End of stream between two frames.
    Clean,
    /// The reader reported this error (its `Display`).
    Error(String),
}

/// The frames a correct reader finds in `bytes`, and how the stream ends. With
/// `fds_sent == false` no descriptors travel, so a frame that claims some ends it.
fn model(bytes: &[u8], fds_sent: bool) -> (Vec<ToWorker>, End) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    let end = loop {
        if rest.is_empty() {
            break End::Clean;
        }
        let len = match peek_len(rest) {
            Ok(Some(len)) => len,
            Ok(None) => {
                break End::Error(
                    ChannelError::TruncatedFrame {
                        buffered: rest.len(),
                    }
                    .to_string(),
                );
            }
            Err(e) => break End::Error(ChannelError::Protocol(e).to_string()),
        };
        if rest.len() < HEADER_LEN + len {
            break End::Error(
                ChannelError::TruncatedFrame {
                    buffered: rest.len(),
                }
                .to_string(),
            );
        }
        let msg = match decode_payload::<ToWorker>(&rest[HEADER_LEN..HEADER_LEN + len]) {
            Ok(msg) => msg,
            Err(e) => break End::Error(ChannelError::Protocol(e).to_string()),
        };
        if !fds_sent && msg.fd_count() > 0 {
            let claimed = msg.fd_count();
            break End::Error(
                ChannelError::MissingFds {
                    claimed,
                    available: 0,
                }
                .to_string(),
            );
        }
        frames.push(msg);
        rest = &rest[HEADER_LEN + len..];
    };
    (frames, end)
}

/// Reads `reader` to its end: the frames (with how many descriptors came with each).
async fn drain(reader: &mut rr_cluster::channel::ChannelReader) -> (Vec<(ToWorker, usize)>, End) {
    let mut got = Vec::new();
    let end = loop {
        match reader.recv::<ToWorker>().await {
            Ok(Some((msg, fds))) => got.push((msg, fds.len())),
            Ok(None) => break End::Clean,
            Err(e) => break End::Error(e.to_string()),
        }
    };
    (got, end)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes `bytes` into one end of a socket pair (from a thread, then closes it) and
/// reads the other end through a `ChannelReader`.
fn through_channel(bytes: Vec<u8>) -> Result<(Vec<(ToWorker, usize)>, End), TestCaseError> {
    let (mut a, b) = StdUnixStream::pair().expect("socketpair");
    let writer = std::thread::spawn(move || {
        // Fails with EPIPE once the reader has given up: that is fine.
        let _ = a.write_all(&bytes);
    });
    let result = runtime().block_on(async move {
        let (mut reader, _writer) = split(from_std(b).expect("tokio stream"));
        tokio::time::timeout(CASE_TIMEOUT, drain(&mut reader)).await
    });
    writer.join().expect("writer thread");
    result.map_err(|_| TestCaseError::fail("the reader hung"))
}

/// Frames a peer might send: valid ones (claiming descriptors or not), noise, lying
/// length prefixes, oversized prefixes.
fn stream_chunk() -> impl Strategy<Value = Vec<u8>> {
    let data = prop_oneof![
        20 => small_data(),
        1 => (0..=MAX_USER_DATA, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ];
    prop_oneof![
        6 => to_worker(prop_oneof![4 => Just(0u16), 1 => 0..=70u16], data)
            .prop_map(|m| frame(&m).unwrap_or_default()),
        1 => vec(any::<u8>(), 0..16),
        1 => (0u32..64, vec(any::<u8>(), 0..64)).prop_map(|(len, tail)| [le32(len), tail].concat()),
        1 => hostile_payload().prop_map(|p| [le32(p.len() as u32), p].concat()),
        1 => any::<u32>().prop_map(le32),
    ]
}

fn byte_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..512),
        4 => vec(stream_chunk(), 0..8).prop_map(|chunks| chunks.concat()),
    ]
}

/// How many descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// A send of `bytes` in one `sendmsg`, with `fds` descriptors attached.
#[derive(Debug, Clone)]
struct Send {
    bytes: Vec<u8>,
    fds: usize,
}

/// Sends `sends` through a `ChannelWriter` and reads them through a `ChannelReader`.
fn through_channel_with_fds(
    sends: Vec<Send>,
    files: &[File],
) -> Result<(Vec<(ToWorker, usize)>, End), TestCaseError> {
    let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let (a, b) = StdUnixStream::pair().expect("socketpair");
    runtime().block_on(async move {
        let (_, writer) = split(from_std(a).expect("tokio stream"));
        let (mut reader, _reader_writer) = split(from_std(b).expect("tokio stream"));
        let sender = tokio::spawn(async move {
            for send in sends {
                if writer.send(&send.bytes, &raw[..send.fds]).await.is_err() {
                    break;
                }
            }
        });
        let got = tokio::time::timeout(CASE_TIMEOUT, drain(&mut reader)).await;
        // Closing the reader ends a sender still waiting on a full socket.
        drop(reader);
        drop(_reader_writer);
        let sent = tokio::time::timeout(CASE_TIMEOUT, sender).await;
        let got = got.map_err(|_| TestCaseError::fail("the reader hung"))?;
        sent.map_err(|_| TestCaseError::fail("the sender hung"))?
            .map_err(|e| TestCaseError::fail(format!("sender panicked: {e}")))?;
        Ok(got)
    })
}

const FILES: usize = 6;

fn well_formed_sends() -> impl Strategy<Value = Vec<Send>> {
    vec(
        to_worker(0..=FILES as u16, small_data()).prop_map(|m| Send {
            bytes: frame(&m).expect("small frame"),
            fds: m.fd_count(),
        }),
        0..12,
    )
}

fn arbitrary_sends() -> impl Strategy<Value = Vec<Send>> {
    vec(
        (
            prop_oneof![
                3 => stream_chunk(),
                1 => vec(stream_chunk(), 2..4).prop_map(|c| c.concat()),
            ],
            prop_oneof![2 => Just(0usize), 1 => 0..=FILES],
        )
            .prop_map(|(bytes, fds)| Send { bytes, fds }),
        0..10,
    )
}

/// All channel properties run in this one test, one after the other, so that the count
/// of open descriptors is not disturbed by another test's sockets (the other tests of
/// this file open none): after every case it must be back to the baseline.
#[test]
fn channel_reader_ends_in_frames_or_an_error() {
    // The first runtime creates tokio's process-wide signal pipe; count after it.
    drop(runtime());
    let baseline = open_fds();

    check(
        "channel, bytes only",
        CHANNEL_CASES,
        byte_stream(),
        |bytes| {
            let (frames, end) = model(&bytes, false);
            let (got, got_end) = through_channel(bytes)?;
            prop_assert_eq!(open_fds(), baseline, "descriptors leaked");
            let expected: Vec<(ToWorker, usize)> = frames.into_iter().map(|m| (m, 0)).collect();
            prop_assert_eq!(got, expected);
            prop_assert_eq!(got_end, end);
            Ok(())
        },
    );

    let files: Vec<File> = (0..FILES)
        .map(|_| File::open("/dev/null").expect("open /dev/null"))
        .collect();
    check(
        "channel, well-formed frames with descriptors",
        CHANNEL_CASES,
        well_formed_sends(),
        |sends| {
            let bytes: Vec<u8> = sends.iter().flat_map(|s| s.bytes.clone()).collect();
            let (frames, end) = model(&bytes, true);
            prop_assert_eq!(end, End::Clean);
            let expected: Vec<(ToWorker, usize)> = frames
                .into_iter()
                .zip(sends.iter().map(|s| s.fds))
                .collect();
            let (got, got_end) = through_channel_with_fds(sends, &files)?;
            prop_assert_eq!(open_fds(), baseline + FILES, "descriptors leaked");
            prop_assert_eq!(got, expected);
            prop_assert_eq!(got_end, End::Clean);
            Ok(())
        },
    );

    check(
        "channel, arbitrary bytes and descriptors",
        CHANNEL_CASES,
        arbitrary_sends(),
        |sends| {
            let bytes: Vec<u8> = sends.iter().flat_map(|s| s.bytes.clone()).collect();
            let (frames, _) = model(&bytes, true);
            let (got, _end) = through_channel_with_fds(sends, &files)?;
            prop_assert_eq!(open_fds(), baseline + FILES, "descriptors leaked");
            prop_assert!(got.len() <= frames.len(), "more frames than the bytes hold");
            for ((msg, fds), expected) in got.iter().zip(&frames) {
                prop_assert_eq!(msg, expected);
                prop_assert_eq!(
                    *fds,
                    msg.fd_count(),
                    "each frame gets exactly the descriptors it claims"
                );
            }
            Ok(())
        },
    );
    drop(files);
    assert_eq!(
        open_fds(),
        baseline,
        "descriptors leaked by the channel properties"
    );
}
