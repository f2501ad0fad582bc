//! The channel protocol between a master and its workers: messages, frame layout,
//! encoding and decoding. No I/O here; `channel` moves the bytes and descriptors.
//!
//! A frame is a little-endian `u32` payload length followed by that many bytes of a
//! bincode-2 encoded message ([`wire_config`]: little endian, fixed-width integers).
//! docs/PROTOCOL.md describes the byte layout of every message.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// The highest version of the binary channel protocol this crate speaks.
///
/// Versions are negotiated: the master offers the highest version it speaks in the
/// worker's environment ([`ENV_PROTOCOL`]); the worker answers [`ToMaster::Ready`] with
/// the version it chose (at most the offer). A master speaks every version from
/// [`MIN_PROTOCOL_VERSION`] on, so a worker written to version 1 keeps working.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest version a master still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The `version` field of [`ToWorker::Hello`]: the layout of the handshake, frozen at 1
/// in every protocol version so that a worker of any version can read it.
pub const HELLO_VERSION: u32 = 1;

/// Environment variable in which a master offers its highest protocol version
/// (decimal, e.g. `2`; absent means 1), or `node` for the Node.js dialect.
pub const ENV_PROTOCOL: &str = "RR_CLUSTER_PROTOCOL";

/// How a pool's workers speak to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Protocol {
    /// The binary frames of this module over `RR_CLUSTER_CHANNEL_FD` (any language).
    #[default]
    Binary,
    /// Node.js's own IPC channel (`NODE_CHANNEL_FD`, JSON lines, one descriptor per
    /// message): `process.on('message', (m, socket) => ...)` (see [`crate::node`]).
    Node,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "binary" => Ok(Protocol::Binary),
            "node" => Ok(Protocol::Node),
            other => Err(format!(
                "unknown worker protocol {other:?}: expected binary or node"
            )),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Binary => "binary",
            Protocol::Node => "node",
        })
    }
}

/// Largest payload a frame may carry (64 KiB); checked before allocating.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of the length prefix in front of every payload.
pub const HEADER_LEN: usize = 4;

/// Most descriptors one `Connections` frame may carry. The kernel allows 253
/// (`SCM_MAX_FD`) per `sendmsg`; a worker's share of a batch larger than this goes
/// in several frames.
pub const MAX_FDS_PER_FRAME: usize = 64;

/// The bincode configuration of every payload: little endian, fixed-width integers
/// (u32 enum tags, u64 lengths), and a decode limit equal to the frame limit.
pub type WireConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_FRAME_LEN>,
>;

/// The one bincode configuration used on the wire.
pub const fn wire_config() -> WireConfig {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_FRAME_LEN>()
}

/// What kind of socket a listener hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub enum ListenerKind {
    /// A TCP socket (IPv4 or IPv6).
    Tcp,
    /// A Unix domain stream socket.
    Unix,
}

/// One of the master's listeners, as announced to workers in [`ToWorker::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct ListenerInfo {
    /// Socket family of the connections this listener produces.
    pub kind: ListenerKind,
    /// The bound address, for display (`127.0.0.1:8080`, `/run/app.sock`).
    pub address: String,
}

/// The first frame a master sends on a new channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct Hello {
    /// Must be the first field: a worker of any version can read it. Always
    /// [`HELLO_VERSION`]; the session's version is negotiated in [`ToMaster::Ready`].
    pub version: u32,
    /// The worker's slot, `0..N`, stable across restarts of that slot.
    pub worker_id: u32,
    /// How many times the pool was reloaded when this worker was started.
    pub generation: u64,
    /// How often the worker must send [`ToMaster::Heartbeat`], in milliseconds.
    pub heartbeat_ms: u32,
    /// The master's listeners; `Connections::listener` indexes this list.
    pub listeners: Vec<ListenerInfo>,
}

/// Messages from the master to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
#[non_exhaustive]
pub enum ToWorker {
    /// Handshake; always the first frame (variant tag 0).
    Hello(Hello),
    /// `count` accepted sockets of listener `listener` travel with this frame.
    Connections {
        /// Index into `Hello::listeners`.
        listener: u16,
        /// Number of descriptors this frame claims, at most [`MAX_FDS_PER_FRAME`].
        count: u16,
    },
    /// Stop taking connections, finish the ones in flight, exit before the deadline.
    Drain {
        /// Milliseconds from now after which the master kills the worker.
        deadline_ms: u64,
    },
    /// Asks for a [`ToMaster::Pong`], sent once the worker has read every frame before
    /// the `Ping` (a version-2 worker acknowledges their descriptors first). The master
    /// sends it to a worker that holds unacknowledged descriptors and has shown no
    /// progress for a heartbeat interval.
    Ping,
    /// An application message (Node's `worker.send`).
    User(Vec<u8>),
    /// Version 2: the listening socket of listener `listener` travels with this frame
    /// (one descriptor); the worker accepts connections from it itself (`balance =
    /// "shared"`) until it drains, and closes it first when it does.
    Listener {
        /// Index into `Hello::listeners`.
        listener: u16,
    },
}

/// Messages from a worker to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
#[non_exhaustive]
pub enum ToMaster {
    /// The worker takes connections from now on.
    Ready {
        /// The worker's process id.
        pid: u32,
        /// The protocol version the worker speaks.
        version: u32,
    },
    /// Liveness and load, sent every `Hello::heartbeat_ms`.
    Heartbeat {
        /// Connections the worker holds open now.
        active: u32,
        /// Connections the worker has received in all.
        served: u64,
    },
    /// The worker is going down: replace it now, send it nothing more.
    Suicide {
        /// Why, for the logs.
        reason: String,
    },
    /// Answer to [`ToWorker::Ping`].
    Pong,
    /// An application message (Node's `process.send`).
    User(Vec<u8>),
    /// Version 2: the worker's progress and room, sent right after `Ready`, once
    /// [`ack_after`] descriptors came off the channel since the last one, with every
    /// heartbeat, and before every [`ToMaster::Pong`].
    Ack {
        /// Descriptors taken off the channel since the worker started (counting the
        /// ones the kernel dropped, `lost`): the master's count of descriptors in
        /// flight is what it sent minus this.
        received: u64,
        /// Descriptors the kernel dropped because the worker's descriptor table was
        /// full (`MSG_CTRUNC`), since the worker started; their connections are lost.
        lost: u64,
        /// How many more connections the worker can take now, beyond those it holds
        /// and those counted in `received`. The master never has more than this in
        /// flight to the worker.
        capacity: u32,
    },
}

/// A version-2 worker sends an [`ToMaster::Ack`] at the latest after this many
/// received descriptors (after fewer when its window is small: [`ack_after`]).
pub const ACK_EVERY: u64 = 64;

/// Descriptors the master keeps in flight to a version-2 worker (sent, not yet
/// acknowledged), at most; fewer when the worker's last `Ack.capacity` is lower.
pub const WINDOW: u64 = 512;

/// After how many descriptors received since its last [`ToMaster::Ack`] a version-2
/// worker sends the next, given the `capacity` that `Ack` announced: a quarter of its
/// window (`min(WINDOW, capacity)`), at least 1 and at most [`ACK_EVERY`]: the worker
/// acknowledges before the master runs out of the window that `Ack` opened. (After an
/// `Ack` with capacity 0 the window stays shut until the next `Ack`, which the
/// heartbeat brings.)
pub const fn ack_after(capacity: u32) -> u64 {
    let window = if (capacity as u64) < WINDOW {
        capacity as u64
    } else {
        WINDOW
    };
    let quarter = window / 4;
    if quarter < 1 {
        1
    } else if quarter > ACK_EVERY {
        ACK_EVERY
    } else {
        quarter
    }
}

/// A message type that may travel on the channel.
///
/// Encoded with bincode's own derive (`Encode`/`Decode`): it checks every claimed
/// length against the frame limit before allocating, which the serde path does not.
/// The types also derive serde's traits, for users who log or store them.
pub trait Message: Encode + Decode<()> {
    /// How many descriptors travel with this message.
    fn fd_count(&self) -> usize;
}

impl Message for ToWorker {
    fn fd_count(&self) -> usize {
        match self {
            ToWorker::Connections { count, .. } => usize::from(*count),
            ToWorker::Listener { .. } => 1,
            _ => 0,
        }
    }
}

impl Message for Hello {
    fn fd_count(&self) -> usize {
        0
    }
}

impl Message for ToMaster {
    fn fd_count(&self) -> usize {
        0
    }
}

/// Errors of encoding and decoding frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame announces (or would need) more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    /// The payload holds bytes after the message.
    #[error("{extra} trailing bytes after a {len}-byte message")]
    TrailingBytes {
        /// Bytes the message used.
        len: usize,
        /// Bytes left over.
        extra: usize,
    },
    /// A `Connections` frame claims more descriptors than a frame may carry.
    #[error("frame claims {count} descriptors, at most {max} allowed")]
    TooManyFds {
        /// Claimed count.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {peer}, we speak {ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Appends one frame (length prefix and payload) holding `msg` to `out`.
pub fn encode_frame<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = bincode::encode_into_std_write(msg, out, wire_config()) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(ProtocolError::MessageTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let prefix = u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes();
    out[start..start + HEADER_LEN].copy_from_slice(&prefix);
    Ok(())
}

/// One frame holding `msg`, as a new buffer.
pub fn frame<M: Message>(msg: &M) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(32);
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Reads the length prefix at the start of `buf`.
///
/// `Ok(None)`: fewer than [`HEADER_LEN`] bytes. A length above [`MAX_FRAME_LEN`] is an
/// error, reported before anything is allocated for the payload.
pub fn peek_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let Some(prefix) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut le = [0u8; HEADER_LEN];
    le.copy_from_slice(prefix);
    let len = u32::from_le_bytes(le) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::MessageTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(Some(len))
}

/// Decodes one whole payload (without its length prefix) into a message.
///
/// The payload must be consumed exactly, and a claimed descriptor count must be within
/// [`MAX_FDS_PER_FRAME`].
pub fn decode_payload<M: Message>(payload: &[u8]) -> Result<M, ProtocolError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::MessageTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (msg, used): (M, usize) = bincode::decode_from_slice(payload, wire_config())?;
    if used != payload.len() {
        return Err(ProtocolError::TrailingBytes {
            len: used,
            extra: payload.len() - used,
        });
    }
    let count = msg.fd_count();
    if count > MAX_FDS_PER_FRAME {
        return Err(ProtocolError::TooManyFds {
            count,
            max: MAX_FDS_PER_FRAME,
        });
    }
    Ok(msg)
}

/// Decodes the first frame a worker receives, the handshake.
///
/// A `Hello` whose version is not [`HELLO_VERSION`] is reported as
/// [`ProtocolError::VersionMismatch`], even when the rest of it does not decode.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, ProtocolError> {
    // Tag (u32, 0 = Hello) then version (u32): stable across versions.
    if let (Some(tag), Some(version)) = (payload.get(0..4), payload.get(4..8)) {
        let tag = u32::from_le_bytes([tag[0], tag[1], tag[2], tag[3]]);
        let version = u32::from_le_bytes([version[0], version[1], version[2], version[3]]);
        if tag == 0 && version != HELLO_VERSION {
            return Err(ProtocolError::VersionMismatch {
                peer: version,
                ours: HELLO_VERSION,
            });
        }
    }
    match decode_payload::<ToWorker>(payload)? {
        ToWorker::Hello(hello) => Ok(hello),
        other => Err(ProtocolError::Malformed(
            bincode::error::DecodeError::OtherString(format!(
                "expected Hello as the first frame, got {}",
                variant_name(&other)
            )),
        )),
    }
}

fn variant_name(msg: &ToWorker) -> &'static str {
    match msg {
        ToWorker::Hello(_) => "Hello",
        ToWorker::Connections { .. } => "Connections",
        ToWorker::Drain { .. } => "Drain",
        ToWorker::Ping => "Ping",
        ToWorker::User(_) => "User",
        ToWorker::Listener { .. } => "Listener",
    }
}

/// The version a worker speaks under a master that offers `offered` (from
/// [`ENV_PROTOCOL`]; `None` when the variable is absent), given the highest version
/// the worker itself speaks. `Err` names what is wrong with the offer.
pub fn negotiate(offered: Option<&str>, ours: u32) -> Result<u32, String> {
    let offered = match offered {
        None => MIN_PROTOCOL_VERSION,
        Some("node") => {
            return Err(format!(
                "{ENV_PROTOCOL}=node: this pool speaks the Node.js dialect; run the pool with \
                 the binary protocol (--worker-protocol binary) for this worker"
            ));
        }
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= MIN_PROTOCOL_VERSION)
            .ok_or_else(|| format!("{ENV_PROTOCOL}={v:?} is not a protocol version"))?,
    };
    Ok(offered.min(ours).max(MIN_PROTOCOL_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ToWorker {
        ToWorker::Hello(Hello {
            version: HELLO_VERSION,
            worker_id: 3,
            generation: 7,
            heartbeat_ms: 1000,
            listeners: vec![ListenerInfo {
                kind: ListenerKind::Tcp,
                address: "127.0.0.1:8080".into(),
            }],
        })
    }

    fn all_to_worker() -> Vec<ToWorker> {
        vec![
            hello(),
            ToWorker::Connections {
                listener: 1,
                count: 5,
            },
            ToWorker::Drain {
                deadline_ms: 30_000,
            },
            ToWorker::Ping,
            ToWorker::User(b"hi".to_vec()),
            ToWorker::Listener { listener: 2 },
        ]
    }

    fn all_to_master() -> Vec<ToMaster> {
        vec![
            ToMaster::Ready {
                pid: 42,
                version: PROTOCOL_VERSION,
            },
            ToMaster::Ready {
                pid: 42,
                version: 1,
            },
            ToMaster::Heartbeat {
                active: 3,
                served: 99,
            },
            ToMaster::Suicide {
                reason: "out of memory".into(),
            },
            ToMaster::Pong,
            ToMaster::User(vec![0, 1, 2, 255]),
            ToMaster::Ack {
                received: 64,
                lost: 1,
                capacity: 960,
            },
        ]
    }

    fn roundtrip<M: Message + PartialEq + std::fmt::Debug>(msg: M) {
        let bytes = frame(&msg).expect("encode");
        let len = peek_len(&bytes).expect("len").expect("complete prefix");
        assert_eq!(len + HEADER_LEN, bytes.len());
        let back: M = decode_payload(&bytes[HEADER_LEN..]).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn every_message_round_trips() {
        all_to_worker().into_iter().for_each(roundtrip);
        all_to_master().into_iter().for_each(roundtrip);
    }

    #[test]
    fn an_ack_is_due_after_a_quarter_of_the_window_within_bounds() {
        assert_eq!(ack_after(u32::MAX), ACK_EVERY);
        assert_eq!(
            ack_after(960),
            64,
            "the default capacity: RLIMIT_NOFILE 1024 less 64"
        );
        assert_eq!(ack_after(256), 64);
        assert_eq!(ack_after(200), 50);
        assert_eq!(ack_after(16), 4);
        assert_eq!(ack_after(7), 1);
        assert_eq!(
            ack_after(0),
            1,
            "a full worker acknowledges every descriptor"
        );
    }

    #[test]
    fn layout_is_fixed_little_endian() {
        let bytes = frame(&ToWorker::Connections {
            listener: 1,
            count: 2,
        })
        .expect("encode");
        // len = 8: tag u32 = 1, listener u16 = 1, count u16 = 2
        assert_eq!(bytes, [8, 0, 0, 0, 1, 0, 0, 0, 1, 0, 2, 0]);
    }

    #[test]
    fn oversized_prefix_is_rejected_before_allocation() {
        let mut bytes = vec![0u8; 8];
        bytes[..4].copy_from_slice(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
        assert!(matches!(
            peek_len(&bytes),
            Err(ProtocolError::MessageTooLarge { len, max }) if len == MAX_FRAME_LEN + 1 && max == MAX_FRAME_LEN
        ));
        assert!(matches!(peek_len(&[1, 2, 3]), Ok(None)));
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let msg = ToMaster::User(vec![7; MAX_FRAME_LEN]);
        let mut out = vec![9];
        assert!(matches!(
            encode_frame(&msg, &mut out),
            Err(ProtocolError::MessageTooLarge { .. })
        ));
        assert_eq!(out, [9], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn truncated_payloads_are_errors() {
        for msg in all_to_worker() {
            let bytes = frame(&msg).expect("encode");
            let payload = &bytes[HEADER_LEN..];
            for cut in 0..payload.len() {
                assert!(
                    decode_payload::<ToWorker>(&payload[..cut]).is_err(),
                    "{msg:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_errors() {
        let mut bytes = frame(&ToMaster::Pong).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode_payload::<ToMaster>(&bytes[HEADER_LEN..]),
            Err(ProtocolError::TrailingBytes { len: 4, extra: 1 })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: [&[u8]; 5] = [
            &[],
            &[0xff; 4],
            &[9, 0, 0, 0],
            // User with a length of u64::MAX
            &[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            // Suicide with invalid UTF-8
            &[2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xc3],
        ];
        for case in cases {
            assert!(decode_payload::<ToMaster>(case).is_err(), "{case:?}");
            assert!(decode_payload::<ToWorker>(case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn too_many_fds_claimed_is_an_error() {
        let bytes = frame(&ToWorker::Connections {
            listener: 0,
            count: (MAX_FDS_PER_FRAME + 1) as u16,
        })
        .expect("encode");
        assert!(matches!(
            decode_payload::<ToWorker>(&bytes[HEADER_LEN..]),
            Err(ProtocolError::TooManyFds { .. })
        ));
    }

    #[test]
    fn hello_version_mismatch_is_named() {
        let mut bytes = frame(&hello()).expect("encode");
        bytes[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&99u32.to_le_bytes());
        // A future Hello may grow fields this version cannot decode.
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            decode_hello(&bytes[HEADER_LEN..]),
            Err(ProtocolError::VersionMismatch {
                peer: 99,
                ours: HELLO_VERSION
            })
        ));
        let ok = frame(&hello()).expect("encode");
        assert_eq!(decode_hello(&ok[HEADER_LEN..]).expect("hello").worker_id, 3);
        let ping = frame(&ToWorker::Ping).expect("encode");
        assert!(decode_hello(&ping[HEADER_LEN..]).is_err());
    }
}

#[cfg(test)]
mod negotiation {
    use super::*;

    #[test]
    fn a_worker_speaks_the_lower_of_the_two_versions() {
        // An old master sets nothing: version 1, whatever the worker speaks.
        assert_eq!(negotiate(None, 2), Ok(1));
        assert_eq!(negotiate(Some("2"), 2), Ok(2));
        // A newer master offers more than this worker knows.
        assert_eq!(negotiate(Some("7"), 2), Ok(2));
        // A worker written to version 1 under a version-2 master.
        assert_eq!(negotiate(Some("2"), 1), Ok(1));
        assert!(negotiate(Some("0"), 2).is_err());
        assert!(negotiate(Some("two"), 2).is_err());
        let node = negotiate(Some("node"), 2).expect_err("node dialect");
        assert!(node.contains("--worker-protocol"), "{node}");
    }

    #[test]
    fn version_two_messages_keep_the_version_one_tags() {
        // Tags 0..=4 are unchanged; version 2 only adds tag 5 in each direction.
        let ack = frame(&ToMaster::Ack {
            received: 1,
            lost: 0,
            capacity: 2,
        })
        .expect("encode");
        assert_eq!(&ack[HEADER_LEN..HEADER_LEN + 4], &5u32.to_le_bytes());
        let listener = frame(&ToWorker::Listener { listener: 3 }).expect("encode");
        assert_eq!(listener, [6, 0, 0, 0, 5, 0, 0, 0, 3, 0]);
        assert_eq!(ToWorker::Listener { listener: 3 }.fd_count(), 1);
    }
}
