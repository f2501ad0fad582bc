//! Signals this test process sends to itself (a binary of its own: a signal raised
//! here reaches every test running in the process).

use std::time::Duration;

use rr_cluster::{Master, MasterHandle, StopMode, WorkerCommand};

/// Polls the master's target worker count until `ok` holds (at most 20 s).
async fn wait_target(handle: &MasterHandle, ok: impl Fn(usize) -> bool) -> usize {
    for _ in 0..2000 {
        let target = handle.status().await.expect("status").target_workers;
        if ok(target) {
            return target;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the target worker count never changed as expected");
}

/// Forwarding installed twice (the handle is `Clone`) delivered every signal twice:
/// one Ctrl-C was a "second SIGINT" and stopped at once. SIGTTIN shows it without
/// ending anything: one worker more per signal, not two.
#[tokio::test]
async fn forwarding_signals_twice_delivers_each_signal_once() {
    let master = Master::builder()
        .listen("127.0.0.1:0")
        .workers(1)
        .command(WorkerCommand::new("sleep").arg("600"))
        .capture_output(false)
        .build()
        .expect("build");
    let handle = master.start().await.expect("start");
    handle.forward_os_signals().expect("forward");
    handle
        .clone()
        .forward_os_signals()
        .expect("a second call is a no-op");
    let me = rustix::process::Pid::from_raw(std::process::id() as i32).expect("pid");
    for expected in [2, 3] {
        rustix::process::kill_process(me, rustix::process::Signal::TTIN).expect("raise");
        let target = wait_target(&handle, |n| n >= expected).await;
        assert_eq!(target, expected, "one worker more per SIGTTIN");
    }
    // Whatever was still on its way has arrived after one more signal's round trip.
    rustix::process::kill_process(me, rustix::process::Signal::TTOU).expect("raise");
    assert_eq!(wait_target(&handle, |n| n <= 2).await, 2);
    handle.stop(StopMode::Now).await.expect("stop");
    tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("stopped in time");
}
