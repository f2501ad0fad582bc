//! Choosing a worker for each accepted socket and sending it there.
//!
//! Sends never block: a worker whose channel is full is skipped (and watched until it
//! drains), and a send that fails because the worker is gone hands the same
//! descriptors to the next worker. Descriptors nobody could take stay with the caller,
//! which stops accepting until [`Dispatcher::subscribe`] says a worker has room.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::channel::{ChannelWriter, TrySendError};
use crate::protocol::{self, ToWorker};

/// How the master picks a worker for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Balance {
    /// Each connection to the next worker in turn (Node's `SCHED_RR`).
    #[default]
    RoundRobin,
    /// The worker with the fewest open connections, from its heartbeats plus what
    /// was sent to it since.
    LeastConnections,
}

impl std::str::FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "rr" => Ok(Balance::RoundRobin),
            "least-connections" | "lc" => Ok(Balance::LeastConnections),
            other => Err(format!(
                "unknown balance {other:?}: expected round-robin or least-connections"
            )),
        }
    }
}

/// The master's side of one worker's channel, as dispatch sees it.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) writer: Arc<ChannelWriter>,
    /// Connections sent to this worker.
    pub(crate) dispatched: AtomicU64,
    /// Open connections at the last heartbeat.
    pub(crate) active: AtomicU32,
    /// Connections sent since the last heartbeat.
    pub(crate) since_heartbeat: AtomicU32,
    /// A task waits for this channel to become writable again.
    watching: AtomicBool,
}

impl WorkerLink {
    pub(crate) fn new(id: u64, slot: u32, writer: Arc<ChannelWriter>) -> WorkerLink {
        WorkerLink {
            id,
            slot,
            writer,
            dispatched: AtomicU64::new(0),
            active: AtomicU32::new(0),
            since_heartbeat: AtomicU32::new(0),
            watching: AtomicBool::new(false),
        }
    }

    /// Records a heartbeat's count of open connections.
    pub(crate) fn heartbeat(&self, active: u32) {
        self.active.store(active, Ordering::Relaxed);
        self.since_heartbeat.store(0, Ordering::Relaxed);
    }

    fn load(&self) -> u32 {
        self.active
            .load(Ordering::Relaxed)
            .saturating_add(self.since_heartbeat.load(Ordering::Relaxed))
    }
}

/// Counters dispatch keeps for status and metrics.
#[derive(Debug, Default)]
pub(crate) struct DispatchStats {
    /// Connections accepted from every listener.
    pub(crate) accepted: AtomicU64,
    /// Accepted connections waiting for a worker.
    pub(crate) queued: AtomicUsize,
    /// Sends that failed because the worker was gone (the sockets went elsewhere).
    pub(crate) send_failures: AtomicU64,
    /// Sends skipped because the worker's channel was full.
    pub(crate) channel_full: AtomicU64,
    /// Accept errors (EMFILE and the like).
    pub(crate) accept_errors: AtomicU64,
}

/// The set of workers that take connections, and the choice among them.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    state: Mutex<State>,
    wake: watch::Sender<u64>,
    pub(crate) stats: DispatchStats,
}

#[derive(Debug)]
struct State {
    links: Vec<Arc<WorkerLink>>,
    cursor: usize,
    balance: Balance,
}

impl Dispatcher {
    pub(crate) fn new(balance: Balance) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            state: Mutex::new(State {
                links: Vec::new(),
                cursor: 0,
                balance,
            }),
            wake: watch::Sender::new(0),
            stats: DispatchStats::default(),
        })
    }

    pub(crate) fn set_balance(&self, balance: Balance) {
        self.lock().balance = balance;
    }

    /// Puts a worker into rotation.
    pub(crate) fn add(&self, link: Arc<WorkerLink>) {
        let mut st = self.lock();
        if !st.links.iter().any(|l| l.id == link.id) {
            st.links.push(link);
        }
        drop(st);
        self.notify();
    }

    /// Takes a worker out of rotation: it gets no further socket.
    pub(crate) fn remove(&self, id: u64) {
        self.lock().links.retain(|l| l.id != id);
    }

    /// Workers in rotation.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().links.len()
    }

    /// A receiver that changes whenever a worker may have room again.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    fn notify(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the sockets in `fds` (accepted by listener `listener`) to workers, several
    /// per frame where one worker gets several. What no worker could take stays in
    /// `fds`, in order.
    pub(crate) fn dispatch(self: &Arc<Self>, listener: u16, fds: &mut Vec<OwnedFd>) {
        let mut st = self.lock();
        let balance = st.balance;
        let n = st.links.len();
        if n == 0 || fds.is_empty() {
            return;
        }
        let mut excluded = vec![false; n];
        let mut groups: Vec<Vec<OwnedFd>> = (0..n).map(|_| Vec::new()).collect();
        let mut gone: Vec<u64> = Vec::new();
        while !fds.is_empty() && excluded.iter().any(|x| !x) {
            // Assign each socket to a worker.
            for fd in fds.drain(..) {
                let State { links, cursor, .. } = &mut *st;
                let pick = match balance {
                    Balance::RoundRobin => next_round_robin(cursor, &excluded),
                    Balance::LeastConnections => {
                        let pick = least_loaded(links, cursor, &excluded);
                        links[pick].since_heartbeat.fetch_add(1, Ordering::Relaxed);
                        pick
                    }
                };
                groups[pick].push(fd);
            }
            // One frame per worker; failures go back to `fds` for another round.
            for (i, group) in groups.iter_mut().enumerate() {
                if group.is_empty() {
                    continue;
                }
                let link = &st.links[i];
                for chunk_start in (0..group.len()).step_by(protocol::MAX_FDS_PER_FRAME) {
                    let chunk_end = (chunk_start + protocol::MAX_FDS_PER_FRAME).min(group.len());
                    let chunk = &group[chunk_start..chunk_end];
                    match send_connections(link, listener, chunk) {
                        Ok(()) => {
                            link.dispatched
                                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                        Err(TrySendError::Full) => {
                            self.stats.channel_full.fetch_add(1, Ordering::Relaxed);
                            excluded[i] = true;
                            self.watch_writable(link);
                            fds.extend(group.drain(chunk_start..));
                            break;
                        }
                        Err(TrySendError::Closed(e)) => {
                            tracing::debug!(worker = link.slot, id = link.id, error = %e, "send failed; re-dispatching");
                            self.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                            excluded[i] = true;
                            gone.push(link.id);
                            fds.extend(group.drain(chunk_start..));
                            break;
                        }
                    }
                }
                // Sent: the kernel holds the descriptors; close the master's copies.
                group.clear();
            }
        }
        if !gone.is_empty() {
            st.links.retain(|l| !gone.contains(&l.id));
        }
    }

    /// Wakes the accept loops once `link` can take bytes again.
    fn watch_writable(self: &Arc<Self>, link: &Arc<WorkerLink>) {
        if link.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = Arc::clone(link);
        let dispatcher = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = link.writer.writable().await;
            link.watching.store(false, Ordering::Release);
            if let Some(d) = dispatcher.upgrade() {
                d.notify();
            }
        });
    }
}

fn send_connections(link: &WorkerLink, listener: u16, fds: &[OwnedFd]) -> Result<(), TrySendError> {
    let msg = ToWorker::Connections {
        listener,
        count: fds.len() as u16,
    };
    // 12 bytes; encoding cannot fail for this message.
    let frame =
        protocol::frame(&msg).map_err(|e| TrySendError::Closed(std::io::Error::other(e)))?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    link.writer.try_send(&frame, &raw)
}

/// The next index in turn that is not excluded (at least one is not).
fn next_round_robin(cursor: &mut usize, excluded: &[bool]) -> usize {
    let n = excluded.len();
    for _ in 0..n {
        let i = *cursor % n;
        *cursor = (i + 1) % n;
        if !excluded[i] {
            return i;
        }
    }
    0
}

/// The least loaded index that is not excluded; ties go round-robin.
fn least_loaded(links: &[Arc<WorkerLink>], cursor: &mut usize, excluded: &[bool]) -> usize {
    let n = links.len();
    let mut best: Option<(u32, usize)> = None;
    for k in 0..n {
        let i = (*cursor + k) % n;
        if excluded[i] {
            continue;
        }
        let load = links[i].load();
        if best.is_none_or(|(b, _)| load < b) {
            best = Some((load, i));
        }
    }
    let pick = best.map_or(0, |(_, i)| i);
    *cursor = (pick + 1) % n;
    pick
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{self, ChannelReader};
    use crate::protocol::ToWorker;

    struct FakeWorker {
        reader: ChannelReader,
        _peer: std::os::unix::net::UnixStream,
    }

    fn link(id: u64) -> (Arc<WorkerLink>, FakeWorker) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let peer = b.try_clone().expect("clone");
        let (_, writer) = channel::split(channel::from_std(a).expect("tokio"));
        let (reader, _) = channel::split(channel::from_std(b).expect("tokio"));
        (
            Arc::new(WorkerLink::new(id, id as u32, writer)),
            FakeWorker {
                reader,
                _peer: peer,
            },
        )
    }

    fn sockets(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| {
                let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
                OwnedFd::from(a)
            })
            .collect()
    }

    async fn received(w: &mut FakeWorker) -> usize {
        let mut total = 0;
        while let Ok(Ok(Some((msg, fds)))) = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            w.reader.recv::<ToWorker>(),
        )
        .await
        {
            assert!(
                matches!(msg, ToWorker::Connections { count, .. } if usize::from(count) == fds.len())
            );
            total += fds.len();
        }
        total
    }

    async fn writable(links: &[&Arc<WorkerLink>]) {
        for l in links {
            l.writer.writable().await.expect("writable");
        }
    }

    #[tokio::test]
    async fn round_robin_is_exact_one_at_a_time_and_in_batches() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let (l1, mut w1) = link(1);
        let (l2, mut w2) = link(2);
        let (l3, mut w3) = link(3);
        writable(&[&l1, &l2, &l3]).await;
        for l in [&l1, &l2, &l3] {
            d.add(Arc::clone(l));
        }
        for _ in 0..30 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        let mut batch = sockets(31);
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        let counts = [
            received(&mut w1).await,
            received(&mut w2).await,
            received(&mut w3).await,
        ];
        assert_eq!(counts.iter().sum::<usize>(), 61);
        assert!(counts.iter().all(|c| *c == 20 || *c == 21), "{counts:?}");
        assert_eq!(l1.dispatched.load(Ordering::Relaxed) as usize, counts[0]);
    }

    #[tokio::test]
    async fn a_dead_worker_hands_its_sockets_to_the_next() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let (l1, w1) = link(1);
        let (l2, mut w2) = link(2);
        writable(&[&l1, &l2]).await;
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        drop(w1);
        let mut fds = sockets(10);
        d.dispatch(0, &mut fds);
        assert!(fds.is_empty(), "nothing lost");
        assert_eq!(received(&mut w2).await, 10);
        assert_eq!(d.len(), 1, "the dead worker left the rotation");
        assert_eq!(d.stats.send_failures.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn nothing_eligible_keeps_the_sockets() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let mut fds = sockets(3);
        d.dispatch(0, &mut fds);
        assert_eq!(fds.len(), 3);
        let (l1, w1) = link(1);
        writable(&[&l1]).await;
        d.add(Arc::clone(&l1));
        drop(w1);
        d.dispatch(0, &mut fds);
        assert_eq!(fds.len(), 3, "kept when every worker failed");
    }

    #[tokio::test]
    async fn a_full_channel_is_skipped_and_watched() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let (l1, mut w1) = link(1);
        let (l2, mut w2) = link(2);
        writable(&[&l1, &l2]).await;
        // Fill worker 1's channel with junk frames until it refuses.
        let junk = protocol::frame(&ToWorker::User(vec![0; 4000])).expect("encode");
        let mut filled = 0;
        while l1.writer.try_send(&junk, &[]).is_ok() {
            filled += 1;
            assert!(filled < 100_000);
        }
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        let mut wake = d.subscribe();
        wake.borrow_and_update();
        let mut fds = sockets(8);
        d.dispatch(0, &mut fds);
        assert!(fds.is_empty());
        assert_eq!(received(&mut w2).await, 8);
        assert!(d.stats.channel_full.load(Ordering::Relaxed) >= 1);
        // Worker 1 reads its backlog: the watcher wakes the accept loops.
        let mut drained = 0;
        while drained < filled {
            let (msg, _) = w1
                .reader
                .recv::<ToWorker>()
                .await
                .expect("ok")
                .expect("frame");
            assert!(matches!(msg, ToWorker::User(_)));
            drained += 1;
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.changed())
            .await
            .expect("woken")
            .expect("open");
    }

    #[tokio::test]
    async fn least_connections_prefers_the_idle_worker() {
        let d = Dispatcher::new(Balance::LeastConnections);
        let (l1, mut w1) = link(1);
        let (l2, mut w2) = link(2);
        writable(&[&l1, &l2]).await;
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        l1.heartbeat(10);
        l2.heartbeat(0);
        for _ in 0..14 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
        }
        // Worker 2 takes the first 10, then they alternate: 12 vs 2.
        assert_eq!(received(&mut w2).await, 12);
        assert_eq!(received(&mut w1).await, 2);
    }
}
