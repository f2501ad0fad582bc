//! Keeps docs/PROTOCOL.md honest.
//!
//! Every message variant has one fixed example here. For each, the test
//! 1. builds the frame byte by byte from the layout the document describes (fixed-width
//!    little-endian integers, `u32` variant tags, `u64` lengths and counts), an encoder
//!    independent of bincode;
//! 2. checks that it equals what `rr_cluster::protocol::frame` produces, and that the
//!    bytes decode back to the example;
//! 3. checks that the document holds exactly the rendered hex dump of that frame between
//!    `<!-- begin frame NAME -->` and `<!-- end frame NAME -->`.
//!
//! Version negotiation and the other statements a test can check are checked here and
//! in the end-to-end tests (tests/tests/protocol.rs); the Python package's tests check
//! its codec against the same dumps.
//!
//! Maintainers never edit those regions by hand: run
//! `UPDATE_PROTOCOL_DOC=1 cargo test -p rr-cluster --test protocol_doc` to rewrite them.

use std::fmt::Debug;
use std::path::PathBuf;

use rr_cluster::protocol::{
    ACK_EVERY, HEADER_LEN, HELLO_VERSION, Hello, ListenerInfo, ListenerKind, MAX_FDS_PER_FRAME,
    MAX_FRAME_LEN, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, ProtocolError, ToMaster,
    ToWorker, WINDOW, decode_hello, decode_payload, frame, peek_len,
};

/// Where the note of each dump line starts.
const NOTE_COLUMN: usize = 34;
/// Bytes of one dump line (a longer field continues on the next lines).
const BYTES_PER_LINE: usize = 16;

/// One field of a frame as the document describes it: its bytes and what they mean.
#[derive(Debug)]
struct Field {
    bytes: Vec<u8>,
    note: String,
}

fn u16_field(name: &str, value: u16) -> Field {
    Field {
        bytes: value.to_le_bytes().to_vec(),
        note: format!("{name} = {value} (u16)"),
    }
}

fn u32_field(name: &str, value: u32) -> Field {
    Field {
        bytes: value.to_le_bytes().to_vec(),
        note: format!("{name} = {value} (u32)"),
    }
}

fn u64_field(name: &str, value: u64) -> Field {
    Field {
        bytes: value.to_le_bytes().to_vec(),
        note: format!("{name} = {value} (u64)"),
    }
}

/// An enum variant tag: its index in declaration order, as a `u32`.
fn tag(name: &str, index: u32, variant: &str) -> Field {
    Field {
        bytes: index.to_le_bytes().to_vec(),
        note: format!("{name} = {index}: {variant} (u32 tag)"),
    }
}

/// A count of elements (`Vec<T>`), as a `u64`.
fn count(name: &str, n: usize) -> Field {
    Field {
        bytes: (n as u64).to_le_bytes().to_vec(),
        note: format!("{name}: count = {n} (u64)"),
    }
}

/// A `String`: `u64` byte length, then the UTF-8 bytes.
fn string(name: &str, value: &str) -> [Field; 2] {
    [
        Field {
            bytes: (value.len() as u64).to_le_bytes().to_vec(),
            note: format!("{name}: length = {} (u64)", value.len()),
        },
        Field {
            bytes: value.as_bytes().to_vec(),
            note: format!("{name} = {value:?} (UTF-8)"),
        },
    ]
}

/// A `Vec<u8>`: `u64` length, then the bytes.
fn bytes(name: &str, value: &[u8]) -> [Field; 2] {
    [
        Field {
            bytes: (value.len() as u64).to_le_bytes().to_vec(),
            note: format!("{name}: length = {} (u64)", value.len()),
        },
        Field {
            bytes: value.to_vec(),
            note: format!("{name} = {value:?} (bytes)"),
        },
    ]
}

/// One example message and its layout, field by field (without the length prefix).
#[derive(Debug)]
struct Example {
    /// `ToWorker::Hello`: names the region of the document.
    name: &'static str,
    /// `Debug` of the message.
    value: String,
    /// `protocol::frame` of the message.
    frame: Vec<u8>,
    fields: Vec<Field>,
}

impl Example {
    fn new<M: Message + Debug + PartialEq>(name: &'static str, msg: M, fields: Vec<Field>) -> Self {
        let frame = frame(&msg).expect("encode example");
        let len = peek_len(&frame)
            .expect("valid prefix")
            .expect("whole prefix");
        assert_eq!(len + HEADER_LEN, frame.len(), "{name}: length prefix");
        let back: M = decode_payload(&frame[HEADER_LEN..]).expect("decode example");
        assert_eq!(back, msg, "{name}: round trip");
        Example {
            name,
            value: format!("{msg:?}"),
            frame,
            fields,
        }
    }

    /// The frame as the document describes it: length prefix, then the fields.
    fn spec_bytes(&self) -> Vec<u8> {
        let payload: Vec<u8> = self.fields.iter().flat_map(|f| f.bytes.clone()).collect();
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    /// The managed region of the document for this example (without the markers).
    fn render(&self) -> String {
        let mut lines = vec![
            format!("Example: `{}`", self.value),
            String::new(),
            "```text".to_owned(),
        ];
        let payload_len = self.frame.len() - HEADER_LEN;
        let prefix = Field {
            bytes: self.frame[..HEADER_LEN].to_vec(),
            note: format!("frame length = {payload_len} (u32)"),
        };
        for field in std::iter::once(&prefix).chain(&self.fields) {
            if field.bytes.is_empty() {
                // An empty string or byte vector: its length line says it all.
                continue;
            }
            for (i, chunk) in field.bytes.chunks(BYTES_PER_LINE).enumerate() {
                let hex = hex(chunk);
                let line = if i == 0 {
                    format!("{hex:<NOTE_COLUMN$}{}", field.note)
                } else {
                    hex
                };
                lines.push(line);
            }
        }
        lines.push("```".to_owned());
        lines.push(String::new());
        lines.push(format!(
            "All {} bytes: `{}`",
            self.frame.len(),
            hex(&self.frame)
        ));
        lines.join("\n")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn to_worker_examples() -> Vec<Example> {
    let hello = Hello {
        version: HELLO_VERSION,
        worker_id: 3,
        generation: 7,
        heartbeat_ms: 1000,
        listeners: vec![
            ListenerInfo {
                kind: ListenerKind::Tcp,
                address: "127.0.0.1:8080".into(),
            },
            ListenerInfo {
                kind: ListenerKind::Unix,
                address: "/run/app.sock".into(),
            },
        ],
    };
    let mut hello_fields = vec![
        tag("variant", 0, "Hello"),
        u32_field("version", hello.version),
        u32_field("worker_id", hello.worker_id),
        u64_field("generation", hello.generation),
        u32_field("heartbeat_ms", hello.heartbeat_ms),
        count("listeners", hello.listeners.len()),
    ];
    for (i, l) in hello.listeners.iter().enumerate() {
        let (index, name) = match l.kind {
            ListenerKind::Tcp => (0, "Tcp"),
            ListenerKind::Unix => (1, "Unix"),
        };
        hello_fields.push(tag(&format!("listeners[{i}].kind"), index, name));
        hello_fields.extend(string(&format!("listeners[{i}].address"), &l.address));
    }
    vec![
        Example::new("ToWorker::Hello", ToWorker::Hello(hello), hello_fields),
        Example::new(
            "ToWorker::Connections",
            ToWorker::Connections {
                listener: 1,
                count: 3,
            },
            vec![
                tag("variant", 1, "Connections"),
                u16_field("listener", 1),
                u16_field("count", 3),
            ],
        ),
        Example::new(
            "ToWorker::Drain",
            ToWorker::Drain {
                deadline_ms: 30_000,
            },
            vec![tag("variant", 2, "Drain"), u64_field("deadline_ms", 30_000)],
        ),
        Example::new(
            "ToWorker::Ping",
            ToWorker::Ping,
            vec![tag("variant", 3, "Ping")],
        ),
        Example::new("ToWorker::User", ToWorker::User(b"hi".to_vec()), {
            let mut f = vec![tag("variant", 4, "User")];
            f.extend(bytes("data", b"hi"));
            f
        }),
        Example::new(
            "ToWorker::Listener",
            ToWorker::Listener { listener: 0 },
            vec![tag("variant", 5, "Listener"), u16_field("listener", 0)],
        ),
    ]
}

fn to_master_examples() -> Vec<Example> {
    vec![
        Example::new(
            "ToMaster::Ready",
            ToMaster::Ready {
                pid: 4242,
                version: PROTOCOL_VERSION,
            },
            vec![
                tag("variant", 0, "Ready"),
                u32_field("pid", 4242),
                u32_field("version", PROTOCOL_VERSION),
            ],
        ),
        Example::new(
            "ToMaster::Heartbeat",
            ToMaster::Heartbeat {
                active: 3,
                served: 99,
            },
            vec![
                tag("variant", 1, "Heartbeat"),
                u32_field("active", 3),
                u64_field("served", 99),
            ],
        ),
        Example::new(
            "ToMaster::Suicide",
            ToMaster::Suicide {
                reason: "out of memory".into(),
            },
            {
                let mut f = vec![tag("variant", 2, "Suicide")];
                f.extend(string("reason", "out of memory"));
                f
            },
        ),
        Example::new(
            "ToMaster::Pong",
            ToMaster::Pong,
            vec![tag("variant", 3, "Pong")],
        ),
        Example::new("ToMaster::User", ToMaster::User(vec![0, 1, 2, 255]), {
            let mut f = vec![tag("variant", 4, "User")];
            f.extend(bytes("data", &[0, 1, 2, 255]));
            f
        }),
        Example::new(
            "ToMaster::Ack",
            ToMaster::Ack {
                received: 64,
                lost: 0,
                capacity: 960,
            },
            vec![
                tag("variant", 5, "Ack"),
                u64_field("received", 64),
                u64_field("lost", 0),
                u32_field("capacity", 960),
            ],
        ),
    ]
}

fn all_examples() -> Vec<Example> {
    let mut all = to_worker_examples();
    all.extend(to_master_examples());
    all
}

fn docs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_PROTOCOL_DOC").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Byte range of the text between `begin` and `end` in `doc`, if both markers are there.
fn region(doc: &str, begin: &str, end: &str) -> Option<std::ops::Range<usize>> {
    let start = doc.find(begin)? + begin.len();
    let stop = start + doc[start..].find(end)?;
    Some(start..stop)
}

/// Checks (or, when updating, rewrites) every managed region of the document.
fn check_or_update(doc: &mut String, regions: &[(String, String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (begin, end, body) in regions {
        let wanted = format!("\n{body}\n");
        match region(doc, begin, end) {
            None => problems.push(format!(
                "docs/PROTOCOL.md has no `{begin}` ... `{end}` region; add the two markers \
                 where it belongs and run with UPDATE_PROTOCOL_DOC=1"
            )),
            Some(range) if doc[range.clone()] == wanted => {}
            Some(range) if updating() => doc.replace_range(range, &wanted),
            Some(range) => problems.push(format!(
                "docs/PROTOCOL.md is out of date between `{begin}` and `{end}`; run \
                 `UPDATE_PROTOCOL_DOC=1 cargo test -p rr-cluster --test protocol_doc`.\n\
                 --- expected ---{wanted}--- found ---{}",
                &doc[range]
            )),
        }
    }
    problems
}

#[test]
fn examples_match_the_documented_layout() {
    for example in all_examples() {
        assert_eq!(
            example.spec_bytes(),
            example.frame,
            "{}: the layout in the document does not match the encoder",
            example.name
        );
    }
}

#[test]
fn examples_cover_every_variant() {
    // The examples hold tags 0..6 of each enum; tag 6 must be unknown to the decoder.
    // A new variant decodes from zeros (with trailing bytes) instead: add its example.
    let names: Vec<&str> = all_examples().iter().map(|e| e.name).collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("ToWorker::")).count(),
        6
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("ToMaster::")).count(),
        6
    );
    let mut payload = 6u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0; 64]);
    for result in [
        decode_payload::<ToWorker>(&payload).map(|m| format!("{m:?}")),
        decode_payload::<ToMaster>(&payload).map(|m| format!("{m:?}")),
    ] {
        match result {
            Err(ProtocolError::Malformed(e)) => {
                let text = e.to_string();
                assert!(
                    text.to_lowercase().contains("variant"),
                    "tag 6 should be an unknown variant, got {text}"
                );
            }
            other => panic!("tag 6 should be an unknown variant: {other:?}"),
        }
    }
}

#[test]
fn documented_constants_hold() {
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(MIN_PROTOCOL_VERSION, 1);
    assert_eq!(HELLO_VERSION, 1);
    assert_eq!(ACK_EVERY, 64);
    assert_eq!(WINDOW, 512);
    assert_eq!(HEADER_LEN, 4);
    assert_eq!(MAX_FRAME_LEN, 65_536);
    assert_eq!(MAX_FDS_PER_FRAME, 64);
    // A Hello from a later version is named as such, whatever follows its version.
    let mut future = 0u32.to_le_bytes().to_vec();
    future.extend_from_slice(&2u32.to_le_bytes());
    future.extend_from_slice(b"anything");
    assert!(matches!(
        decode_hello(&future),
        Err(ProtocolError::VersionMismatch { peer: 2, ours: 1 })
    ));
}

#[test]
fn document_is_up_to_date() {
    let path = docs_dir().join("PROTOCOL.md");
    let original = std::fs::read_to_string(&path).expect("read docs/PROTOCOL.md");
    let regions: Vec<(String, String, String)> = all_examples()
        .iter()
        .map(|e| {
            (
                format!("<!-- begin frame {} -->", e.name),
                format!("<!-- end frame {} -->", e.name),
                e.render(),
            )
        })
        .collect();
    let mut doc = original.clone();
    let problems = check_or_update(&mut doc, &regions);
    if updating() && doc != original {
        std::fs::write(&path, &doc).expect("write docs/PROTOCOL.md");
        eprintln!("rewrote {} region(s) of {}", regions.len(), path.display());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
