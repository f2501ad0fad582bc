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
    /// Connections dispatched per slot, by workers that have exited.
    pub(crate) dispatched_by_gone: Vec<(u32, u64)>,
    pub(crate) restarts: u64,
    pub(crate) give_ups: u64,
    pub(crate) send_failures: u64,
    pub(crate) channel_full: u64,
    pub(crate) accept_errors: u64,
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
    for (slot, n) in &totals.dispatched_by_gone {
        dispatched.get_or_create(&worker_label(*slot)).inc_by(*n);
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
        "dispatch_channel_full",
        "Sends skipped because a worker's channel was full",
        counter(totals.channel_full),
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
        "Accepted connections waiting for an eligible worker",
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
        WorkerState::Draining,
        WorkerState::Leaving,
        WorkerState::Hung,
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
            generation: 0,
            uptime_ms: 1,
            dispatched,
            active: 2,
            restarts: 0,
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
            dispatched_by_gone: vec![(0, 100)],
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
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
