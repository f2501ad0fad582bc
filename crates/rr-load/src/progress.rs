//! The live progress line on stderr, redrawn once a second.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::recorder::Live;

/// Redraws the line every second until aborted.
pub(crate) async fn show(live: Arc<Live>, t0: Instant, measure_start: Instant, end: Instant) {
    let mut tick = tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = (0, t0);
    loop {
        let now = tick.tick().await;
        let (requests, errors, warmup) = live.snapshot();
        let all = requests + warmup;
        let rate = (all - last.0) as f64 / now.duration_since(last.1).as_secs_f64().max(1e-9);
        last = (all, now);
        let line = if now < measure_start {
            format!(
                "\r\x1b[2K[warm-up {:.1}s/{:.1}s] {warmup} requests, {rate:.0} req/s",
                now.duration_since(t0).as_secs_f64(),
                measure_start.duration_since(t0).as_secs_f64()
            )
        } else if now < end {
            format!(
                "\r\x1b[2K[{:.1}s/{:.1}s] {requests} requests, {rate:.0} req/s, {errors} errors",
                now.duration_since(measure_start).as_secs_f64(),
                end.duration_since(measure_start).as_secs_f64()
            )
        } else {
            format!(
                "\r\x1b[2K[done, waiting for the requests in flight] {requests} requests, \
                 {errors} errors"
            )
        };
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }
}

/// Erases the progress line.
pub(crate) fn clear() {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"\r\x1b[2K");
    let _ = err.flush();
}
