//! Feeds arbitrary bytes to the frame decoder: `peek_len`, `decode_payload` for both
//! message types and `decode_hello`, first as a stream of frames, then as one payload.
//!
//! Beyond "never panics", it checks what the decoders promise: lengths above the limit
//! are refused, whatever decodes re-encodes to exactly the same bytes (one encoding per
//! message), a decoded `Connections` claims at most `MAX_FDS_PER_FRAME` descriptors, and
//! a `Hello` of another version is named as a version mismatch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rr_cluster::protocol::{
    HEADER_LEN, MAX_FDS_PER_FRAME, MAX_FRAME_LEN, Message, HELLO_VERSION, ProtocolError,
    ToMaster, ToWorker, decode_hello, decode_payload, frame, peek_len,
};

fuzz_target!(|data: &[u8]| {
    // As a receiver sees it: frames one after another until one does not fit.
    let mut rest = data;
    loop {
        match peek_len(rest) {
            Ok(Some(len)) => {
                assert!(len <= MAX_FRAME_LEN);
                let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
                    break;
                };
                check_payload(payload);
                rest = &rest[HEADER_LEN + len..];
            }
            Ok(None) => {
                assert!(rest.len() < HEADER_LEN);
                break;
            }
            Err(ProtocolError::MessageTooLarge { len, .. }) => {
                assert!(len > MAX_FRAME_LEN);
                break;
            }
            Err(e) => panic!("peek_len: unexpected error {e}"),
        }
    }
    // The whole input as one payload.
    check_payload(data);
});

fn check_payload(payload: &[u8]) {
    if let Ok(msg) = decode_payload::<ToWorker>(payload) {
        assert!(msg.fd_count() <= MAX_FDS_PER_FRAME);
        assert_canonical(&msg, payload);
    }
    if let Ok(msg) = decode_payload::<ToMaster>(payload) {
        assert_eq!(msg.fd_count(), 0);
        assert_canonical(&msg, payload);
    }
    match decode_hello(payload) {
        Ok(hello) => {
            assert_eq!(hello.version, HELLO_VERSION);
            assert_canonical(&ToWorker::Hello(hello), payload);
        }
        Err(ProtocolError::VersionMismatch { peer, .. }) => {
            assert_eq!(payload[..4], [0, 0, 0, 0]);
            assert_eq!(payload[4..8], peer.to_le_bytes());
            assert_ne!(peer, HELLO_VERSION);
        }
        Err(_) => {}
    }
}

fn assert_canonical<M: Message + std::fmt::Debug>(msg: &M, payload: &[u8]) {
    let bytes = frame(msg).expect("a decoded message encodes");
    assert_eq!(
        &bytes[HEADER_LEN..],
        payload,
        "{msg:?} has another encoding"
    );
}
