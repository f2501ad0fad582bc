//! The pool's status and metrics, assembled from the supervisor, the links and the
//! CPU/memory samples.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::driver::Driver;
use super::metrics;
use super::procstat;
use crate::control::Status;
use crate::sys;

impl Driver {
    pub(crate) fn status(&self) -> Status {
        let now = Instant::now();
        let mut workers = self.sm.status(now);
        for w in &mut workers {
            let Some(proc) = self.workers.get(&w.id) else {
                continue;
            };
            w.dispatched = proc.link.dispatched.load(Ordering::Relaxed);
            w.lost = proc.link.lost.load(Ordering::Relaxed);
            w.connections_per_sec = round(proc.connections_per_sec);
            if let Some((_, s)) = proc.samples.1 {
                w.rss_bytes = Some(s.rss);
                w.cpu_seconds = Some(round(s.cpu.as_secs_f64()));
            }
            if let (Some(a), Some(b)) = proc.samples {
                w.cpu_percent = procstat::cpu_percent(a, b).map(round);
            }
        }
        let stats = &self.dispatcher.stats;
        let settings = self.settings();
        let master_cpu_percent = match self.master_samples {
            (Some(a), Some(b)) => procstat::cpu_percent(a, b).map(round),
            _ => None,
        };
        let mut status = Status {
            master_pid: sys::getpid(),
            generation: self.sm.generation(),
            target_workers: self.sm.target(),
            reloading: self.sm.reloading(),
            gave_up: self.sm.gave_up(),
            stopping: self.sm.stopping(),
            paused: self.sm.paused(),
            balance: settings.balance.as_str().to_owned(),
            protocol: settings.command.get_protocol().to_string(),
            listeners: self.addrs.clone(),
            accepted: stats.accepted.load(Ordering::Relaxed),
            queued: stats.queued.load(Ordering::Relaxed),
            connections_per_sec: round(self.connections_per_sec),
            master_cpu_percent,
            master_rss_bytes: self.master_samples.1.map(|(_, s)| s.rss),
            restarts_in_window: self.sm.restarts_in_window(now),
            uptime_ms: now.duration_since(self.started).as_millis() as u64,
            workers,
        };
        status.workers.sort_by_key(|w| (w.slot, w.id));
        status
    }

    pub(crate) fn metrics(&self) -> String {
        let stats = &self.dispatcher.stats;
        let output = self.output.as_ref().map(|o| &o.stats);
        let totals = metrics::Totals {
            gone: self.gone.iter().map(|(slot, g)| (*slot, *g)).collect(),
            restarts: self.sm.restarts_total(),
            give_ups: self.sm.give_ups(),
            send_failures: stats.send_failures.load(Ordering::Relaxed),
            send_busy: stats.send_busy.load(Ordering::Relaxed),
            channel_full: stats.channel_full.load(Ordering::Relaxed),
            window_full: stats.window_full.load(Ordering::Relaxed),
            accept_errors: stats.accept_errors.load(Ordering::Relaxed),
            messages_dropped: self.messages.dropped.load(Ordering::Relaxed),
            output_dropped: output.map_or(0, |o| o.dropped.load(Ordering::Relaxed)),
            output_write_errors: output.map_or(0, |o| o.write_errors.load(Ordering::Relaxed)),
            recycles: self.recycles.clone(),
        };
        metrics::render(&self.status(), &totals)
    }
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
