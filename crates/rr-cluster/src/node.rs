//! The Node.js dialect of the channel: what the master writes to, and reads from, a
//! worker started with Node's own IPC channel (`NODE_CHANNEL_FD`,
//! `NODE_CHANNEL_SERIALIZATION_MODE=json`). No I/O here.
//!
//! Both directions carry newline-delimited JSON. The master sends each accepted socket
//! as Node's internal handle message, one descriptor per `sendmsg`:
//!
//! ```text
//! {"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"rr":"connection","listener":0}}
//! ```
//!
//! which Node turns into `process.on('message', (msg, socket) => ...)`, answering
//! `{"cmd":"NODE_HANDLE_ACK"}` by itself. The rest is in docs/PROTOCOL.md, section
//! "Node.js workers".

use serde_json::Value;

/// Longest line either side may send (64 KiB, as a binary frame).
pub const MAX_LINE: usize = 64 * 1024;

/// How every handle message Node writes starts (`cmd` first): a line the master drops
/// (too long, or nested too deep to read) that starts so is still acknowledged.
pub const HANDLE_PREFIX: &[u8] = br#"{"cmd":"NODE_HANDLE","#;

/// Errors of the Node.js dialect.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeError {
    /// A line is not valid JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// A line is longer than [`MAX_LINE`].
    #[error("line of {len} bytes exceeds the limit of {max} bytes")]
    LineTooLong {
        /// Its length (so far).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An `rr` message with fields of the wrong type.
    #[error("bad {kind:?} message: {reason}")]
    BadMessage {
        /// The `rr` kind.
        kind: String,
        /// What is wrong.
        reason: String,
    },
    /// A user message that would be taken for one of the dialect's own messages (an
    /// object with an `rr` key, or a `cmd` starting with `NODE_`).
    #[error("a user message may not be an object with an \"rr\" key or a NODE_ \"cmd\"")]
    Reserved,
}

/// A message from a Node.js worker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FromNode {
    /// `{"rr":"ready"}`: the worker takes connections.
    Ready,
    /// `{"rr":"heartbeat","active":N}`, optionally with `"capacity":M`.
    Heartbeat {
        /// Connections open in the worker.
        active: u32,
        /// How many more connections it can take, if it says.
        capacity: Option<u32>,
    },
    /// `{"rr":"suicide","reason":"..."}`: replace me now.
    Suicide {
        /// Why (may be empty).
        reason: String,
    },
    /// `{"cmd":"NODE_HANDLE_ACK"}`: Node took a handle.
    HandleAck,
    /// `{"cmd":"NODE_HANDLE_NACK"}`: Node could not take a handle.
    HandleNack,
    /// `{"cmd":"NODE_HANDLE",...}`: the application sent a handle to the master. The
    /// master does not take handles, but answers [`handle_ack_line`]: Node holds every
    /// later message (heartbeats included) until the handle is acknowledged.
    Handle,
    /// Any other Node-internal message (`cmd` starting with `NODE_`), or an `rr`
    /// message of a kind this version does not know: ignored.
    Ignored,
    /// Anything else: an application message (compact JSON text).
    User(Vec<u8>),
}

fn escape(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The line that carries one accepted connection of listener `listener` (with its
/// descriptor, in the same `sendmsg`).
pub fn connection_line(listener: u16) -> Vec<u8> {
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{{\"rr\":\"connection\",\"listener\":{listener}}}}}\n"
    )
    .into_bytes()
}

/// The line that carries listener `listener`'s listening socket (shared balancing).
pub fn listener_line(listener: u16) -> Vec<u8> {
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Server\",\"msg\":{{\"rr\":\"listen\",\"listener\":{listener}}}}}\n"
    )
    .into_bytes()
}

/// Node's acknowledgement of a handle it was sent.
pub fn handle_ack_line() -> &'static [u8] {
    b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"
}

/// The drain notice.
pub fn drain_line(deadline_ms: u64) -> Vec<u8> {
    format!("{{\"rr\":\"drain\",\"deadline_ms\":{deadline_ms}}}\n").into_bytes()
}

/// An application message for the worker: `payload` must be one JSON value; it is sent
/// in compact form, so it arrives as one `process.on('message')` value.
pub fn user_line(payload: &[u8]) -> Result<Vec<u8>, NodeError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| NodeError::NotJson(e.to_string()))?;
    if reserved(&value) {
        return Err(NodeError::Reserved);
    }
    let mut line = serde_json::to_vec(&value).map_err(|e| NodeError::NotJson(e.to_string()))?;
    line.push(b'\n');
    if line.len() > MAX_LINE {
        return Err(NodeError::LineTooLong {
            len: line.len(),
            max: MAX_LINE,
        });
    }
    Ok(line)
}

/// `line` with every `\uXXXX` escape of a lone UTF-16 surrogate replaced by `\ufffd`;
/// `None` when it has none.
fn repair_lone_surrogates(line: &[u8]) -> Option<Vec<u8>> {
    fn escape_at(line: &[u8], i: usize) -> Option<u16> {
        let hex = line.get(i..i + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let (high, low) = (0xD800..=0xDBFF, 0xDC00..=0xDFFF);
    let mut out = Vec::with_capacity(line.len());
    let mut repaired = false;
    let mut i = 0;
    while i < line.len() {
        if line[i] != b'\\' {
            out.push(line[i]);
            i += 1;
            continue;
        }
        match escape_at(line, i) {
            Some(u) if high.contains(&u) => {
                if escape_at(line, i + 6).is_some_and(|next| low.contains(&next)) {
                    out.extend_from_slice(&line[i..i + 12]);
                    i += 12;
                } else {
                    out.extend_from_slice(br"\ufffd");
                    repaired = true;
                    i += 6;
                }
            }
            Some(u) if low.contains(&u) => {
                out.extend_from_slice(br"\ufffd");
                repaired = true;
                i += 6;
            }
            // Any other escape (`\\` included) is two bytes, or a `\u` and four.
            _ => {
                let n = if escape_at(line, i).is_some() { 6 } else { 2 };
                out.extend_from_slice(&line[i..(i + n).min(line.len())]);
                i += n;
            }
        }
    }
    repaired.then_some(out)
}

fn reserved(value: &Value) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    object.contains_key("rr")
        || object
            .get("cmd")
            .and_then(Value::as_str)
            .is_some_and(|c| c.starts_with("NODE_"))
}

/// Decodes one line from a worker (without its newline).
pub fn decode_line(line: &[u8]) -> Result<FromNode, NodeError> {
    if line.len() > MAX_LINE {
        return Err(NodeError::LineTooLong {
            len: line.len(),
            max: MAX_LINE,
        });
    }
    // What Node writes for every connection handed over, exactly: no parse for it.
    if line == br#"{"cmd":"NODE_HANDLE_ACK"}"# {
        return Ok(FromNode::HandleAck);
    }
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        // Node writes a string cut inside a character (a lone UTF-16 surrogate) as a
        // `\ud83d` escape, valid JSON that serde_json refuses: such a message arrives
        // as JavaScript's `toWellFormed()` would make it, U+FFFD in place.
        Err(e) => repair_lone_surrogates(line)
            .and_then(|fixed| serde_json::from_slice(&fixed).ok())
            .ok_or_else(|| NodeError::NotJson(e.to_string()))?,
    };
    let Some(object) = value.as_object() else {
        return Ok(FromNode::User(compact(&value)));
    };
    if let Some(cmd) = object.get("cmd").and_then(Value::as_str) {
        match cmd {
            "NODE_HANDLE_ACK" => return Ok(FromNode::HandleAck),
            "NODE_HANDLE_NACK" => return Ok(FromNode::HandleNack),
            "NODE_HANDLE" => return Ok(FromNode::Handle),
            c if c.starts_with("NODE_") => return Ok(FromNode::Ignored),
            _ => {}
        }
    }
    let Some(kind) = object.get("rr") else {
        return Ok(FromNode::User(compact(&value)));
    };
    let kind = kind.as_str().unwrap_or_default();
    let bad = |reason: &str| NodeError::BadMessage {
        kind: kind.to_owned(),
        reason: reason.to_owned(),
    };
    let count = |key: &str| -> Result<Option<u32>, NodeError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(u32::try_from(n).unwrap_or(u32::MAX)))
                .ok_or_else(|| bad(&format!("{key} must be a non-negative integer"))),
        }
    };
    Ok(match kind {
        "ready" => FromNode::Ready,
        "heartbeat" => FromNode::Heartbeat {
            active: count("active")?.unwrap_or(0),
            capacity: count("capacity")?,
        },
        "suicide" => FromNode::Suicide {
            reason: match object.get("reason") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        },
        _ => FromNode::Ignored,
    })
}

fn compact(value: &Value) -> Vec<u8> {
    // Serializing a parsed value cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Escapes `s` as a JSON string (with quotes), for log lines and tests.
pub fn json_string(s: &str) -> String {
    escape(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node writes `process.send({s: '😀'.slice(0, 1)})` with a lone surrogate escape:
    /// serde_json refused the line, and the worker's channel was closed for it.
    #[test]
    fn lone_surrogates_from_node_become_replacement_characters() {
        let user = |line: &[u8]| match decode_line(line) {
            Ok(FromNode::User(json)) => String::from_utf8(json).expect("utf8"),
            other => panic!("{other:?}"),
        };
        assert_eq!(user(br#"{"s":"\ud83d"}"#), "{\"s\":\"\u{fffd}\"}");
        assert_eq!(user(br#"{"s":"a\udc00b"}"#), "{\"s\":\"a\u{fffd}b\"}");
        assert_eq!(
            user(br#"["\ud83d\ude00","\ud83dx"]"#),
            "[\"\u{1f600}\",\"\u{fffd}x\"]"
        );
        // An escaped backslash is not an escape's start; a pair is no repair.
        assert_eq!(user(br#"{"s":"\\ud83d"}"#), "{\"s\":\"\\\\ud83d\"}");
        assert_eq!(repair_lone_surrogates(br#""\ud83d\ude00""#), None);
        // What is not JSON stays an error.
        assert!(matches!(
            decode_line(b"{\"s\":\"\\ud83d"),
            Err(NodeError::NotJson(_))
        ));
        assert!(matches!(decode_line(b"\\"), Err(NodeError::NotJson(_))));
    }

    #[test]
    fn lines_are_exactly_what_node_expects() {
        assert_eq!(
            connection_line(3),
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{\"rr\":\"connection\",\"listener\":3}}\n"
        );
        assert_eq!(
            drain_line(30000),
            b"{\"rr\":\"drain\",\"deadline_ms\":30000}\n"
        );
        // Each is one JSON value and one line.
        for line in [connection_line(0), listener_line(1), drain_line(5)] {
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            let v: Value = serde_json::from_slice(&line).expect("json");
            assert!(v.is_object());
        }
    }

    #[test]
    fn worker_messages_decode() {
        assert_eq!(decode_line(br#"{"rr":"ready"}"#), Ok(FromNode::Ready));
        assert_eq!(
            decode_line(br#"{"rr":"heartbeat","active":3}"#),
            Ok(FromNode::Heartbeat {
                active: 3,
                capacity: None
            })
        );
        assert_eq!(
            decode_line(br#"{"rr":"heartbeat","active":3,"capacity":100}"#),
            Ok(FromNode::Heartbeat {
                active: 3,
                capacity: Some(100)
            })
        );
        assert_eq!(
            decode_line(br#"{"rr":"suicide","reason":"boom"}"#),
            Ok(FromNode::Suicide {
                reason: "boom".into()
            })
        );
        assert_eq!(
            decode_line(br#"{"cmd":"NODE_HANDLE_ACK"}"#),
            Ok(FromNode::HandleAck)
        );
        // Not Node's exact bytes: the same message all the same.
        assert_eq!(
            decode_line(br#"{ "cmd" : "NODE_HANDLE_ACK", "x": 1 }"#),
            Ok(FromNode::HandleAck)
        );
        assert_eq!(
            decode_line(br#"{"cmd":"NODE_HANDLE_NACK"}"#),
            Ok(FromNode::HandleNack)
        );
        assert_eq!(
            decode_line(br#"{"cmd":"NODE_SOMETHING_NEW"}"#),
            Ok(FromNode::Ignored)
        );
        assert_eq!(decode_line(br#"{"rr":"future"}"#), Ok(FromNode::Ignored));
        assert_eq!(
            decode_line(br#"{ "hello" : [1, 2] }"#),
            Ok(FromNode::User(br#"{"hello":[1,2]}"#.to_vec()))
        );
        assert_eq!(decode_line(b"42"), Ok(FromNode::User(b"42".to_vec())));
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        assert!(matches!(decode_line(b"{"), Err(NodeError::NotJson(_))));
        assert!(matches!(
            decode_line(b"\xff\xfe"),
            Err(NodeError::NotJson(_))
        ));
        assert!(matches!(
            decode_line(br#"{"rr":"heartbeat","active":-1}"#),
            Err(NodeError::BadMessage { .. })
        ));
        assert!(matches!(
            decode_line(br#"{"rr":"heartbeat","active":"many"}"#),
            Err(NodeError::BadMessage { .. })
        ));
        let long = vec![b' '; MAX_LINE + 1];
        assert!(matches!(
            decode_line(&long),
            Err(NodeError::LineTooLong { .. })
        ));
    }

    #[test]
    fn user_messages_must_be_json_and_not_reserved() {
        assert_eq!(user_line(br#"{"a": 1}"#), Ok(b"{\"a\":1}\n".to_vec()));
        assert_eq!(user_line(b"\"hi\""), Ok(b"\"hi\"\n".to_vec()));
        // A string with a newline stays on one line (escaped).
        assert_eq!(user_line(b"\"a\\nb\""), Ok(b"\"a\\nb\"\n".to_vec()));
        assert!(matches!(user_line(b"hello"), Err(NodeError::NotJson(_))));
        assert_eq!(user_line(br#"{"rr":"drain"}"#), Err(NodeError::Reserved));
        assert_eq!(
            user_line(br#"{"cmd":"NODE_HANDLE"}"#),
            Err(NodeError::Reserved)
        );
        assert_eq!(json_string("a\"b"), "\"a\\\"b\"");
    }
}
