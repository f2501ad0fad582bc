//! Prometheus metrics, rendered at scrape time from the master's own counters
//! (OpenMetrics text, crate `prometheus-client`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::control::{Status, WorkerState};

/// Counters the status does not carry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    /// Per slot, what workers that have exited counted.
    pub(crate) gone: Vec<(u32, super::driver::GoneTotals)>,
    pub(crate) restarts: u64,
    pub(crate) give_ups: u64,
    pub(crate) send_failures: u64,
    pub(crate) send_busy: u64,
    pub(crate) channel_full: u64,
    pub(crate) window_full: u64,
    pub(crate) accept_errors: u64,
    pub(crate) messages_dropped: u64,
    pub(crate) output_dropped: u64,
    pub(crate) output_write_errors: u64,
    /// Recycles by limit (`max_requests`, `max_memory`, `max_age`).
    pub(crate) recycles: std::collections::BTreeMap<String, u64>,
}

type Labels = Vec<(String, String)>;

fn worker_label(slot: u32) -> Labels {
    vec![("worker".to_owned(), slot.to_string())]
}

/// The exposition text.
pub(crate) fn render(status: &Status, totals: &Totals) -> String {
    let mut registry = Registry::with_prefix("rr_cluster");

    let counter = |value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        c
    };
    registry.register(
        "connections_accepted",
        "Connections accepted from every listener",
        counter(status.accepted),
    );

    let dispatched = Family::<Labels, Counter>::default();
    for (slot, gone) in &totals.gone {
        dispatched
            .get_or_create(&worker_label(*slot))
            .inc_by(gone.dispatched);
    }
    for w in &status.workers {
        dispatched
            .get_or_create(&worker_label(w.slot))
            .inc_by(w.dispatched);
    }
    registry.register(
        "connections_dispatched",
        "Connections handed to workers, by worker slot",
        dispatched,
    );
    registry.register(
        "dispatch_send_failures",
        "Sends that failed because the worker was gone (the sockets went to another worker)",
        counter(totals.send_failures),
    );
    registry.register(
        "dispatch_send_busy",
        "Sends that failed for a passing reason (ETOOMANYREFS, ENOBUFS) and were retried",
        counter(totals.send_busy),
    );
    registry.register(
        "dispatch_channel_full",
        "Sends stopped because a worker's channel (its socket buffer) was full",
        counter(totals.channel_full),
    );
    registry.register(
        "dispatch_window_full",
        "Times a worker was passed over because its in-flight window was used up (once each time it runs out, not per connection)",
        counter(totals.window_full),
    );
    registry.register(
        "worker_messages_dropped",
        "Application messages from workers dropped because nobody read them",
        counter(totals.messages_dropped),
    );
    registry.register(
        "worker_output_dropped_lines",
        "Lines of worker output dropped because workers wrote faster than the output took",
        counter(totals.output_dropped),
    );
    registry.register(
        "worker_output_write_errors",
        "Lines of worker output that could not be written (a broken pipe, a full disk)",
        counter(totals.output_write_errors),
    );
    let recycles = Family::<Labels, Counter>::default();
    for limit in ["max_requests", "max_memory", "max_age"] {
        let n = totals.recycles.get(limit).copied().unwrap_or(0);
        recycles
            .get_or_create(&vec![("reason".to_owned(), limit.to_owned())])
            .inc_by(n);
    }
    registry.register(
        "worker_recycles",
        "Workers replaced, drain-first, for reaching a recycle limit",
        recycles,
    );
    registry.register(
        "accept_errors",
        "accept() failures (EMFILE, ENFILE, ...)",
        counter(totals.accept_errors),
    );
    registry.register(
        "worker_restarts",
        "Worker restarts (crashes, failed starts, hangs, suicides)",
        counter(totals.restarts),
    );
    registry.register(
        "give_ups",
        "Times the restart limit was hit",
        counter(totals.give_ups),
    );

    let gauge = |value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        g
    };
    registry.register(
        "accept_queue_length",
        "Accepted connections a dispatch left waiting for an eligible worker",
        gauge(status.queued as i64),
    );
    registry.register(
        "target_workers",
        "Workers the master keeps",
        gauge(status.target_workers as i64),
    );
    registry.register(
        "generation",
        "Reloads the pool has been through",
        gauge(status.generation as i64),
    );

    let by_state = Family::<Labels, Gauge>::default();
    for state in [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Stalled,
        WorkerState::Draining,
        WorkerState::Leaving,
        WorkerState::Hung,
        WorkerState::Lost,
        WorkerState::Backoff,
        WorkerState::Stopped,
    ] {
        let n = status.workers.iter().filter(|w| w.state == state).count();
        by_state
            .get_or_create(&vec![("state".to_owned(), state.as_str().to_owned())])
            .set(n as i64);
    }
    registry.register("workers", "Worker slots and processes by state", by_state);

    let active = Family::<Labels, Gauge>::default();
    for w in status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
    {
        active
            .get_or_create(&worker_label(w.slot))
            .inc_by(i64::from(w.active));
    }
    registry.register(
        "worker_active_connections",
        "Open connections per ready worker, at its last heartbeat",
        active,
    );

    let cpu = Family::<Labels, Counter<f64>>::default();
    let rss = Family::<Labels, Gauge>::default();
    let lost = Family::<Labels, Counter>::default();
    for (slot, gone) in &totals.gone {
        let labels = worker_label(*slot);
        cpu.get_or_create(&labels).inc_by(gone.cpu_seconds);
        lost.get_or_create(&labels).inc_by(gone.lost);
    }
    for w in status.workers.iter().filter(|w| w.pid.is_some()) {
        let labels = worker_label(w.slot);
        if let Some(s) = w.cpu_seconds {
            cpu.get_or_create(&labels).inc_by(s);
        }
        if let Some(b) = w.rss_bytes {
            rss.get_or_create(&labels)
                .inc_by(i64::try_from(b).unwrap_or(i64::MAX));
        }
        lost.get_or_create(&labels).inc_by(w.lost);
    }
    registry.register(
        "worker_cpu_seconds",
        "CPU time (user + system) used by the worker processes of each slot, alive and gone (a gone one's at its last sample)",
        cpu,
    );
    registry.register(
        "worker_resident_bytes",
        "Resident memory of the worker processes, by slot",
        rss,
    );
    registry.register(
        "worker_lost_connections",
        "Connections the kernel dropped on their way to a worker whose descriptor table was full, by slot, alive and gone workers",
        lost,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::WorkerStatus;

    #[test]
    fn renders_known_values() {
        let w = |slot, dispatched, state| WorkerStatus {
            slot,
            id: u64::from(slot) + 1,
            pid: Some(100 + slot),
            state,
            uptime_ms: 1,
            dispatched,
            active: 2,
            cpu_seconds: Some(1.5),
            rss_bytes: Some(4096),
            ..WorkerStatus::default()
        };
        let status = Status {
            master_pid: 1,
            generation: 3,
            target_workers: 2,
            accepted: 1000,
            queued: 4,
            workers: vec![w(0, 400, WorkerState::Ready), w(1, 500, WorkerState::Ready)],
            ..Status::default()
        };
        let totals = Totals {
            gone: vec![(
                0,
                super::super::driver::GoneTotals {
                    dispatched: 100,
                    lost: 3,
                    cpu_seconds: 2.0,
                },
            )],
            restarts: 1,
            ..Totals::default()
        };
        let text = render(&status, &totals);
        for line in [
            "rr_cluster_connections_accepted_total 1000",
            "rr_cluster_connections_dispatched_total{worker=\"0\"} 500",
            "rr_cluster_connections_dispatched_total{worker=\"1\"} 500",
            "rr_cluster_worker_restarts_total 1",
            "rr_cluster_accept_queue_length 4",
            "rr_cluster_workers{state=\"ready\"} 2",
            "rr_cluster_workers{state=\"hung\"} 0",
            "rr_cluster_generation 3",
            "rr_cluster_worker_active_connections{worker=\"1\"} 2",
            "rr_cluster_worker_cpu_seconds_total{worker=\"1\"} 1.5",
            "rr_cluster_worker_cpu_seconds_total{worker=\"0\"} 3.5",
            "rr_cluster_worker_lost_connections_total{worker=\"0\"} 3",
            "rr_cluster_worker_resident_bytes{worker=\"0\"} 4096",
            "rr_cluster_worker_recycles_total{reason=\"max_requests\"} 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
