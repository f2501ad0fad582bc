//! End-to-end: rr-load against a tiny in-process server on 127.0.0.1:0.
//!
//! Every run is bounded by its `--duration` (and the server tasks by a lifetime of
//! their own), so no loop here can run away.

mod support;

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use rr_load::{Config, Mode, Report};
use support::Behavior;

fn run(config: Config) -> Report {
    rr_load::run_blocking(config).expect("run")
}

fn config(addr: std::net::SocketAddr, mode: Mode, ms: u64) -> rr_load::ConfigBuilder {
    Config::builder(addr.to_string())
        .connections(8)
        .mode(mode)
        .duration(Duration::from_millis(ms))
        .timeout(Duration::from_secs(2))
}

fn assert_balanced(r: &Report) {
    assert!(r.requests > 0, "no requests:\n{}", r.to_table());
    assert_eq!(r.errors.total, 0, "errors:\n{}", r.to_table());
    assert_eq!(r.successes, r.requests);
    assert_eq!(r.workers.len(), 2, "{}", r.to_table());
    for w in &r.workers {
        assert!(
            (40.0..=60.0).contains(&w.share_pct),
            "unbalanced:\n{}",
            r.to_table()
        );
        assert_eq!(w.pids.len(), 1);
    }
    assert_eq!(r.workers[0].id, "0");
    assert_eq!(r.workers[0].pids, [1000]);
    assert_eq!(r.workers[1].pids, [1001]);
    let busiest = r.busiest_worker.as_ref().expect("busiest worker");
    assert!(busiest.share_pct <= 60.0);
    // No master listens on the test server's address: the pool's size is unknown.
    assert_eq!((r.pool_workers, busiest.ratio_to_mean), (None, None));
    assert!(r.latency_us.count == r.successes && r.latency_us.p50 > 0);
    assert_eq!(r.statuses.get(&200), Some(&r.successes));
}

#[test]
fn both_modes_reach_two_workers_evenly() {
    let server = support::start(Behavior::Ok);
    for mode in [Mode::KeepAlive, Mode::Close] {
        let r = run(config(server.addr, mode, 1000).build().expect("config"));
        assert_balanced(&r);
        assert_eq!(r.settings.mode, mode);
        assert_eq!(r.reconnects, 0, "{mode}");
    }
}

#[test]
fn chunked_responses_and_two_threads() {
    let server = support::start(Behavior::Chunked);
    let r = run(config(server.addr, Mode::KeepAlive, 500)
        .threads(2)
        .build()
        .expect("config"));
    assert_balanced(&r);
}

/// The server closing a keep-alive connection after a complete response that says
/// `Connection: close` is not an error: the connection is reopened.
#[test]
fn server_side_close_after_response_is_not_an_error() {
    let server = support::start(Behavior::CloseEveryThird);
    let r = run(config(server.addr, Mode::KeepAlive, 500)
        .build()
        .expect("config"));
    assert_balanced(&r);
    assert!(r.reconnects > 0, "{}", r.to_table());
}

#[test]
fn open_loop_sends_at_the_rate() {
    let server = support::start(Behavior::Ok);
    let r = run(config(server.addr, Mode::KeepAlive, 1000)
        .rate(Some(200.0))
        .warmup(Duration::from_millis(300))
        .build()
        .expect("config"));
    assert_eq!(r.errors.total, 0, "{}", r.to_table());
    // Every send due within the measured second: those that left, plus those missed
    // (none here, since nothing failed).
    assert_eq!(r.requests, 200, "{}", r.to_table());
    let open = r.open_loop.as_ref().expect("open loop report");
    assert_eq!((open.scheduled, open.sent, open.missed), (200, 200, 0));
    assert_eq!(open.send_lag_us.count, 200);
    // The server saw the warm-up too.
    assert!(server.responses.load(std::sync::atomic::Ordering::Relaxed) > r.requests);
}

fn failing(behavior: Behavior, mode: Mode) -> Report {
    let server = support::start(behavior);
    let r = run(config(server.addr, mode, 300)
        .connections(4)
        .build()
        .expect("config"));
    assert!(r.requests > 0, "{behavior:?}: no requests");
    assert_eq!(r.successes, 0, "{behavior:?}:\n{}", r.to_table());
    assert_eq!(r.errors.total, r.requests);
    assert_eq!(r.latency_us.count, 0);
    r
}

/// Regression: a keep-alive response with more bytes than its Content-Length was a
/// success plus a reconnect.
#[test]
fn bytes_beyond_the_content_length_are_bad_responses() {
    let r = failing(Behavior::LongerThanLength, Mode::KeepAlive);
    assert_eq!(r.errors.bad_response, r.requests, "{}", r.to_table());
    assert_eq!(r.reconnects, 0, "{}", r.to_table());
}

#[test]
fn abrupt_closes_are_classified() {
    for mode in [Mode::KeepAlive, Mode::Close] {
        let r = failing(Behavior::Reset, mode);
        assert_eq!(
            r.errors.reset,
            r.requests,
            "reset {mode}:\n{}",
            r.to_table()
        );
        let r = failing(Behavior::CloseSilently, mode);
        assert_eq!(
            r.errors.closed,
            r.requests,
            "closed {mode}:\n{}",
            r.to_table()
        );
        let r = failing(Behavior::Garbage, mode);
        assert_eq!(
            r.errors.bad_response,
            r.requests,
            "garbage {mode}:\n{}",
            r.to_table()
        );
        let r = failing(Behavior::Truncated, mode);
        assert_eq!(
            r.errors.bad_response,
            r.requests,
            "truncated {mode}:\n{}",
            r.to_table()
        );
    }
}

#[test]
fn refused_and_timeout_are_classified() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = run(Config::builder(format!("127.0.0.1:{port}"))
        .connections(2)
        .duration(Duration::from_millis(200))
        .build()
        .expect("config"));
    assert!(r.errors.refused > 0);
    assert_eq!(r.errors.refused, r.errors.total, "{}", r.to_table());
    assert_eq!(r.successes, 0);

    let server = support::start(Behavior::Hang);
    let r = run(config(server.addr, Mode::KeepAlive, 700)
        .connections(2)
        .timeout(Duration::from_millis(200))
        .build()
        .expect("config"));
    // 2 connections, 4 timeouts each (at 200, 400, 600 and, waited for after the end,
    // 800 ms). A busy machine may delay the last ones past the end: they never start.
    assert!((6..=8).contains(&r.errors.timeout), "{}", r.to_table());
    assert_eq!(r.errors.total, r.errors.timeout);
}

/// A server that freezes near the end of the run: the requests it never answers are
/// waited for (up to the timeout) and counted as timeouts, not dropped.
#[test]
fn a_stall_at_the_end_is_counted_not_dropped() {
    let server = support::start(Behavior::StallAfter(10));
    // The timeout is longer than the run: no timeout can fire before the end.
    let r = run(config(server.addr, Mode::KeepAlive, 500)
        .connections(2)
        .timeout(Duration::from_secs(1))
        .build()
        .expect("config"));
    // 10 answers (loopback round trips, well within 500 ms), then each connection's
    // next request hangs.
    assert_eq!(r.successes, 10, "{}", r.to_table());
    assert_eq!(r.errors.timeout, 2, "{}", r.to_table());
    assert_eq!(r.errors.total, 2, "{}", r.to_table());
    assert_eq!(r.requests, 12, "{}", r.to_table());
}

/// Open loop: the sends a stuck connection should have made before the end are counted
/// as `missed`, so `requests` is every send scheduled within the measured run.
#[test]
fn open_loop_counts_the_sends_a_stall_prevented() {
    let server = support::start(Behavior::StallAfter(10));
    // 200/s on 2 connections: each sends every 10 ms (offset 5 ms), 100 sends in 500 ms.
    let r = run(config(server.addr, Mode::KeepAlive, 500)
        .connections(2)
        .rate(Some(200.0))
        .timeout(Duration::from_secs(1))
        .build()
        .expect("config"));
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(r.requests, 100, "{}", r.to_table());
    assert_eq!(r.successes, 10, "{}", r.to_table());
    assert_eq!(r.errors.timeout, 2, "{}", r.to_table());
    assert_eq!(json["errors"]["missed"], 88, "{}", r.to_table());
    assert_eq!(r.errors.total, 90, "{}", r.to_table());
    let open = &json["open_loop"];
    assert_eq!(open["scheduled"], 100, "{open}");
    assert_eq!(open["sent"], 12, "{open}");
    assert_eq!(open["missed"], 88, "{open}");
    assert_eq!(open["target_rps"], 200.0, "{open}");
    assert!(r.to_table().contains("88 missed"), "{}", r.to_table());
}

/// With nothing listening, a closed loop waits between connects (1 ms doubling to
/// 100 ms): in 300 ms a connection can try at most 9 times (0, 1, 3, 7, 15, 31, 63,
/// 127, 227 ms), and a slower machine only tries fewer times. Without the backoff it
/// tried thousands of times.
#[test]
fn refused_connects_back_off() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = run(Config::builder(format!("127.0.0.1:{port}"))
        .connections(2)
        .duration(Duration::from_millis(300))
        .build()
        .expect("config"));
    assert!(r.errors.refused > 0, "{}", r.to_table());
    assert!(r.errors.refused <= 2 * 9, "{}", r.to_table());
    assert_eq!(r.errors.refused, r.errors.total, "{}", r.to_table());
}

/// A server that accepts and closes at once gets the same backoff.
#[test]
fn immediate_closes_back_off() {
    let server = support::start(Behavior::CloseSilently);
    let r = run(config(server.addr, Mode::Close, 300)
        .connections(2)
        .build()
        .expect("config"));
    assert!(r.errors.closed > 0, "{}", r.to_table());
    assert!(r.errors.closed <= 2 * 9, "{}", r.to_table());
    assert_eq!(r.errors.closed, r.errors.total, "{}", r.to_table());
}

/// Reconnects during the warm-up are not reported, like everything else in it.
#[test]
fn warmup_reconnects_are_not_counted() {
    let server = support::start(Behavior::CloseFirst(10));
    let r = run(config(server.addr, Mode::KeepAlive, 200)
        .connections(2)
        .warmup(Duration::from_millis(300))
        .build()
        .expect("config"));
    // The 10 closing responses (and the reconnects after them) came in the warm-up:
    // loopback round trips, well within 300 ms.
    assert!(
        server.responses.load(std::sync::atomic::Ordering::Relaxed) > r.requests + 10,
        "{}",
        r.to_table()
    );
    assert_eq!(r.errors.total, 0, "{}", r.to_table());
    assert_eq!(r.reconnects, 0, "{}", r.to_table());
}

/// Fault injection against a fake master whose "workers" are `sleep` processes: the
/// injector kills only the ready workers' pids, in turn, and asks for reloads.
#[test]
fn faults_kill_listed_workers_and_reload() {
    let server = support::start(Behavior::Ok);
    let mut children: Vec<std::process::Child> = (0..2)
        .map(|_| {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep")
        })
        .collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let dir = std::env::temp_dir();
    let master = support::fake_master(&dir, pids.clone(), server.addr);
    let r = run(config(server.addr, Mode::KeepAlive, 1200)
        .kill_worker_every(Some(Duration::from_millis(300)))
        .reload_every(Some(Duration::from_millis(450)))
        .control(Some(master.path.clone()))
        .build()
        .expect("config"));
    let statuses: Vec<_> = children
        .iter_mut()
        .map(|c| {
            // Already killed by rr-load; this kill is only a safety net for a failure.
            let _ = c.kill();
            c.wait().expect("wait")
        })
        .collect();
    let faults = r.faults.as_ref().expect("fault report");
    assert_eq!(faults.kills, 3, "{}", r.to_table());
    assert_eq!(faults.reloads, 2, "{}", r.to_table());
    assert_eq!(master.reloads.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Slots are taken in turn: 0, 1, 0.
    let killed: Vec<u32> = faults.events.iter().filter_map(|e| e.pid).collect();
    assert_eq!(killed, [pids[0], pids[1], pids[0]]);
    for status in statuses {
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    // The HTTP server is not the killed processes: nothing failed.
    assert_eq!(r.errors.total, 0);
    assert_eq!(faults.failed_in_windows + faults.failed_outside_windows, 0);
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["faults"]["events"][0]["action"], "kill_worker");
    // A kill ends when it happens; a reload when the master's status (polled every
    // 100 ms) no longer shows it running.
    for e in &faults.events {
        match e.action {
            rr_load::fault::FaultAction::Reload => {
                if let Some(until) = e.until_ms {
                    assert!(until >= e.at_ms + 100.0, "{e:?}");
                }
            }
            _ => assert_eq!(e.until_ms, Some(e.at_ms)),
        }
    }
    let first_reload = faults
        .events
        .iter()
        .find(|e| e.action == rr_load::fault::FaultAction::Reload);
    assert!(
        first_reload.and_then(|e| e.until_ms).is_some(),
        "{}",
        r.to_table()
    );
    // The master listens on the address loaded: its pool of 2 is the mean's.
    assert_eq!(r.pool_workers, Some(2));
    let ratio = r.busiest_worker.as_ref().and_then(|b| b.ratio_to_mean);
    assert!(
        ratio.is_some_and(|x| (1.0..1.2).contains(&x)),
        "{}",
        r.to_table()
    );
}

#[test]
fn fault_injection_without_a_master_fails_fast() {
    let err = rr_load::run_blocking(
        Config::builder("127.0.0.1:9")
            .kill_worker_every(Some(Duration::from_secs(1)))
            .control(Some("/nonexistent/rr-load.sock".into()))
            .build()
            .expect("config"),
    )
    .expect_err("no master");
    assert!(matches!(err, rr_load::RunError::Control(_)), "{err}");
}
