//! Benchmarks of rr-cluster, through its public API only.
//!
//! # Layout
//!
//! - `benches/codec.rs`: encoding and decoding of single frames (`Connections`,
//!   `Heartbeat`, `Hello`, a 1 KiB `User`).
//! - `benches/channel_fds.rs`: frames and descriptors per second through a channel pair,
//!   a `ChannelWriter` sending `Connections` frames with 1 and 16 descriptors to a
//!   `ChannelReader`.
//! - `src/service.rs`: the demo worker's HTTP answer, for the reference servers.
//! - `src/bin/ref-fdpass.rs`: a minimal fd-passing master with hyper workers.
//! - `src/bin/ref-reuseport.rs`: hyper workers on one SO_REUSEPORT port.
//! - `compare.sh`: rr-cluster against those references and Node's cluster, with wrk.
//! - this library: the sample messages the criterion benchmarks use.
//!
//! Run `cargo bench -p rr-cluster-benches` (add `-- --quick` for a short run, or a
//! filter such as `-- codec/decode`).

pub mod service;

use rr_cluster::protocol::{HELLO_VERSION, Hello, ListenerInfo, ListenerKind, ToMaster, ToWorker};

/// Bytes of data in the [`user_1k`] message.
pub const USER_LEN: usize = 1024;

/// A handshake as a master with two listeners sends it.
pub fn hello() -> ToWorker {
    ToWorker::Hello(Hello {
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
    })
}

/// A `Connections` frame claiming `count` descriptors of listener 0.
pub fn connections(count: u16) -> ToWorker {
    ToWorker::Connections { listener: 0, count }
}

/// A worker's heartbeat.
pub fn heartbeat() -> ToMaster {
    ToMaster::Heartbeat {
        active: 12,
        served: 123_456,
    }
}

/// An application message of [`USER_LEN`] bytes.
pub fn user_1k() -> ToWorker {
    ToWorker::User((0..USER_LEN).map(|i| (i % 251) as u8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rr_cluster::protocol::{HEADER_LEN, decode_payload, frame};

    #[test]
    fn samples_round_trip() {
        for msg in [hello(), connections(16), user_1k()] {
            let bytes = frame(&msg).expect("encode");
            assert_eq!(
                decode_payload::<ToWorker>(&bytes[HEADER_LEN..]).expect("decode"),
                msg
            );
        }
        let bytes = frame(&heartbeat()).expect("encode");
        assert_eq!(
            decode_payload::<ToMaster>(&bytes[HEADER_LEN..]).expect("decode"),
            heartbeat()
        );
        assert_eq!(
            frame(&user_1k()).expect("encode").len(),
            HEADER_LEN + 12 + USER_LEN
        );
    }
}
