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
    assert!(busiest.ratio_to_mean < 1.2);
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
    assert!(
        (170..=205).contains(&r.requests),
        "expected about 200 requests:\n{}",
        r.to_table()
    );
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
    // 2 connections, 3 timeouts each (at 200, 400 and 600 ms); the requests still in
    // flight at the end are not counted. A busy machine may delay the last ones.
    assert!((4..=6).contains(&r.errors.timeout), "{}", r.to_table());
    assert_eq!(r.errors.total, r.errors.timeout);
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
    let master = support::fake_master(&dir, pids.clone());
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
