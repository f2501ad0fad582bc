//! Choosing a worker for each accepted socket and sending it there.
//!
//! Sends never block and never lose a socket: a worker whose channel is full, whose
//! in-flight window is used up, or whose send failed for a passing reason
//! (`ETOOMANYREFS` when a non-root master has too many descriptors in flight) is
//! skipped for this batch and retried later; only a worker whose channel is closed is
//! taken out of rotation (and reported to the supervisor). Descriptors nobody could
//! take stay with the caller, which stops accepting until [`Dispatcher::subscribe`]
//! says a worker has room.
//!
//! The cost per connection does not grow with the number of workers for round-robin:
//! per-worker scratch space lives in the dispatcher and only touched entries are reset.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::link::WorkerLink;
use crate::channel::TrySendError;
use crate::node;
use crate::protocol::{self, MAX_FDS_PER_FRAME, Protocol};

/// How long a worker whose send failed for a passing reason is left alone.
const BUSY_RETRY: Duration = Duration::from_millis(10);
/// Descriptors per worker an accept loop aims for in one batch at saturation.
const PER_WORKER_BATCH: usize = 16;
/// Most connections one batch holds (a larger pool gets smaller shares per worker).
/// The master holds these descriptors until they are sent; 256 keeps it far below a
/// 1024-descriptor limit.
const MAX_BATCH: usize = 256;

/// How the master picks a worker for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Balance {
    /// Each connection to the next worker in turn (Node's `SCHED_RR`).
    #[default]
    RoundRobin,
    /// The worker with the fewest open connections, from its heartbeats plus what
    /// was sent to it since. A worker that never sent a heartbeat (a Node.js worker
    /// without the package) counts as loaded as the least-loaded one that did, and
    /// such workers take turns (round-robin among themselves).
    LeastConnections,
    /// The same client address to the same slot while the slot lives (jump
    /// consistent hashing over slots): a restart or a scale change moves only the
    /// affected share. Behind a proxy every client has the proxy's address.
    ClientIp,
    /// Every worker accepts on the listening socket itself (Node's `SCHED_NONE`): the
    /// master hands each worker the listener once and dispatches nothing. Fastest on
    /// new connections; the kernel, not the master, picks the worker.
    Shared,
}

impl Balance {
    /// The name used in configuration and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::ClientIp => "client-ip",
            Balance::Shared => "shared",
        }
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "rr" => Ok(Balance::RoundRobin),
            "least-connections" | "lc" => Ok(Balance::LeastConnections),
            "client-ip" | "ip-hash" => Ok(Balance::ClientIp),
            "shared" | "none" => Ok(Balance::Shared),
            other => Err(format!(
                "unknown balance {other:?}: expected round-robin, least-connections, client-ip or shared"
            )),
        }
    }
}

/// An accepted connection waiting for a worker.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) fd: OwnedFd,
    /// The client's address (TCP), for client-ip balancing.
    pub(crate) peer: Option<IpAddr>,
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
    /// Sends that failed for a passing reason (`ETOOMANYREFS`, `ENOBUFS`); retried.
    pub(crate) send_busy: AtomicU64,
    /// Sends skipped because a worker's channel was full.
    pub(crate) channel_full: AtomicU64,
    /// Sends skipped because a worker had as many connections in flight as it may.
    pub(crate) window_full: AtomicU64,
    /// Accept errors (EMFILE and the like).
    pub(crate) accept_errors: AtomicU64,
}

/// The set of workers that take connections, and the choice among them.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    state: Mutex<State>,
    wake: watch::Sender<u64>,
    retry_scheduled: AtomicBool,
    /// A worker reached its `max_requests`.
    recycle: tokio::sync::Notify,
    /// The connection line of each listener (Node.js dialect), built once.
    node_lines: Mutex<Vec<Arc<[u8]>>>,
    pub(crate) stats: DispatchStats,
}

#[derive(Debug)]
struct State {
    links: Vec<Arc<WorkerLink>>,
    cursor: usize,
    balance: Balance,
    /// Per link: index into `groups` in the current call (`usize::MAX`: none).
    group_of: Vec<usize>,
    /// Per link: skipped in the current call.
    excluded: Vec<bool>,
    /// Per slot (client-ip): the link serving it, if any.
    by_slot: Vec<Option<usize>>,
    /// Links excluded in the current call, to reset.
    excluded_list: Vec<usize>,
    /// Scratch: the sockets being assigned, the groups of the current round, and
    /// spare group buffers. Groups keep each socket's peer, for a retry after a
    /// failed send.
    pending: Vec<Accepted>,
    groups: Vec<(usize, Vec<Accepted>)>,
    spare: Vec<Vec<Accepted>>,
}

impl Dispatcher {
    pub(crate) fn new(balance: Balance) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            state: Mutex::new(State {
                links: Vec::new(),
                cursor: 0,
                balance,
                group_of: Vec::new(),
                excluded: Vec::new(),
                by_slot: Vec::new(),
                excluded_list: Vec::new(),
                pending: Vec::new(),
                groups: Vec::new(),
                spare: Vec::new(),
            }),
            wake: watch::Sender::new(0),
            retry_scheduled: AtomicBool::new(false),
            recycle: tokio::sync::Notify::new(),
            node_lines: Mutex::new(Vec::new()),
            stats: DispatchStats::default(),
        })
    }

    pub(crate) fn set_balance(&self, balance: Balance) {
        self.lock().balance = balance;
    }

    pub(crate) fn balance(&self) -> Balance {
        self.lock().balance
    }

    /// Puts a worker into rotation.
    pub(crate) fn add(&self, link: Arc<WorkerLink>) {
        let mut st = self.lock();
        if !st.links.iter().any(|l| l.id == link.id) {
            st.links.push(link);
            st.reindex();
        }
        drop(st);
        self.notify();
    }

    /// Takes a worker out of rotation: it gets no further socket.
    pub(crate) fn remove(&self, id: u64) {
        let mut st = self.lock();
        st.links.retain(|l| l.id != id);
        st.reindex();
        let none_left = st.links.is_empty();
        drop(st);
        if none_left {
            // A stopping accept loop waiting for room hears that none will come.
            self.notify();
        }
    }

    /// Workers in rotation.
    pub(crate) fn len(&self) -> usize {
        self.lock().links.len()
    }

    /// How many connections an accept loop takes off the backlog before it
    /// dispatches: enough that at saturation each worker's share of a batch fills a
    /// frame of [`PER_WORKER_BATCH`] descriptors (one `sendmsg`, at most one wake-up
    /// of the worker, per that many connections, whatever the pool's size), within
    /// [`MAX_FDS_PER_FRAME`] and [`MAX_BATCH`]. Below saturation the backlog empties
    /// first and batches stay small.
    pub(crate) fn batch_limit(&self) -> usize {
        (self.lock().links.len() * PER_WORKER_BATCH).clamp(MAX_FDS_PER_FRAME, MAX_BATCH)
    }

    /// A receiver that changes whenever a worker may have room again.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Wakes the accept loops: a worker may take sockets again.
    pub(crate) fn notify(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Completes when a worker was handed its `max_requests`.
    pub(crate) async fn recycle_due(&self) {
        self.recycle.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node_line(&self, listener: u16) -> Arc<[u8]> {
        let mut lines = self.node_lines.lock().unwrap_or_else(|p| p.into_inner());
        while lines.len() <= usize::from(listener) {
            let l = lines.len() as u16;
            lines.push(node::connection_line(l).into());
        }
        Arc::clone(&lines[usize::from(listener)])
    }

    /// Sends the sockets in `batch` (accepted by listener `listener`) to workers,
    /// several per frame where one worker gets several. What no worker could take
    /// stays in `batch`, in order. Allocation-free in the steady state: the scratch
    /// space lives in the dispatcher.
    pub(crate) fn dispatch(self: &Arc<Self>, listener: u16, batch: &mut Vec<Accepted>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.links.is_empty() || batch.is_empty() {
            return;
        }
        let balance = st.balance;
        let mut busy = false;
        let mut gone = false;
        for _round in 0..=st.links.len() {
            if batch.is_empty() || st.excluded_list.len() == st.links.len() {
                break;
            }
            // Assign each socket to a worker that is not excluded.
            let mut pending = std::mem::take(&mut st.pending);
            std::mem::swap(batch, &mut pending);
            for accepted in pending.drain(..) {
                // Least-connections counts a socket once it is sent (`send_group`);
                // until then `pick` adds the group's length.
                let Some(pick) = st.pick(balance, accepted.peer) else {
                    batch.push(accepted);
                    continue;
                };
                let g = st.group_of[pick];
                if g == usize::MAX {
                    st.group_of[pick] = st.groups.len();
                    let mut fds = st.spare.pop().unwrap_or_default();
                    fds.push(accepted);
                    st.groups.push((pick, fds));
                } else {
                    st.groups[g].1.push(accepted);
                }
            }
            st.pending = pending;
            // One send per worker (Node.js: one per socket); what fails goes back.
            while let Some((i, mut fds)) = st.groups.pop() {
                st.group_of[i] = usize::MAX;
                let link = Arc::clone(&st.links[i]);
                let assigned = fds.len();
                let result = self.send_group(&link, listener, &mut fds, &mut busy);
                if balance == Balance::LeastConnections {
                    // Only what was sent: what goes back is counted where it goes.
                    let sent = u32::try_from(assigned - fds.len()).unwrap_or(u32::MAX);
                    link.since_heartbeat.fetch_add(sent, Ordering::Relaxed);
                }
                if let Some(is_gone) = result {
                    st.exclude(i);
                    gone |= is_gone;
                    batch.append(&mut fds);
                }
                st.spare.push(fds);
            }
        }
        while let Some(i) = st.excluded_list.pop() {
            st.excluded[i] = false;
        }
        if gone {
            st.links.retain(|l| !l.gone.is_cancelled());
            st.reindex();
        }
        drop(guard);
        if busy {
            self.retry_soon();
        }
    }

    /// Sends `fds` to one worker, taking the sent ones out of `fds`. `None` when all
    /// went; otherwise whether the worker is gone.
    fn send_group(
        self: &Arc<Self>,
        link: &Arc<WorkerLink>,
        listener: u16,
        fds: &mut Vec<Accepted>,
        busy: &mut bool,
    ) -> Option<bool> {
        let budget = usize::try_from(link.budget()).unwrap_or(usize::MAX);
        if budget < fds.len() {
            self.stats.window_full.fetch_add(1, Ordering::Relaxed);
            // Re-check: an acknowledgement may have raised the window meanwhile.
            if link.wait_for_room() {
                self.notify();
            }
        }
        let allowed = budget.min(fds.len());
        let mut sent = 0;
        let mut failure = None;
        while sent < allowed {
            let result = match link.protocol {
                Protocol::Binary => {
                    let n = (allowed - sent).min(protocol::MAX_FDS_PER_FRAME);
                    send_connections(link, listener, &fds[sent..sent + n]).map(|()| n)
                }
                Protocol::Node => {
                    // TCP_NODELAY: inherited from the listener (see `listen::bind_tcp`).
                    let line = self.node_line(listener);
                    link.writer
                        .try_send(&line, &[fds[sent].fd.as_raw_fd()])
                        .map(|()| 1)
                }
            };
            match result {
                Ok(n) => {
                    sent += n;
                    let total = link.dispatched.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    if total >= link.recycle_at.load(Ordering::Relaxed)
                        && !link.recycle_signalled.swap(true, Ordering::AcqRel)
                    {
                        self.recycle.notify_one();
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Sent: the kernel holds those descriptors; close the master's copies.
        fds.drain(..sent);
        let is_gone = match failure {
            None => false,
            Some(TrySendError::Full) => {
                self.stats.channel_full.fetch_add(1, Ordering::Relaxed);
                self.watch_writable(link);
                false
            }
            Some(TrySendError::Busy(e)) => {
                let n = self.stats.send_busy.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(worker = link.slot, id = link.id, error = %e, count = n, "send to worker failed for now; retrying");
                }
                *busy = true;
                false
            }
            Some(TrySendError::Closed(e)) => {
                tracing::warn!(worker = link.slot, id = link.id, error = %e, "worker's channel closed; its sockets go to another worker");
                self.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                link.mark_gone(format!("send failed: {e}"));
                true
            }
        };
        if fds.is_empty() { None } else { Some(is_gone) }
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

    /// Wakes the accept loops shortly, to retry sends that failed for now.
    fn retry_soon(self: &Arc<Self>) {
        if self.retry_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let dispatcher = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(BUSY_RETRY).await;
            if let Some(d) = dispatcher.upgrade() {
                d.retry_scheduled.store(false, Ordering::Release);
                d.notify();
            }
        });
    }
}

impl State {
    /// Skips link `i` for the rest of the current call.
    fn exclude(&mut self, i: usize) {
        if !self.excluded[i] {
            self.excluded[i] = true;
            self.excluded_list.push(i);
        }
    }

    /// Rebuilds the per-link scratch space after the rotation changed.
    fn reindex(&mut self) {
        let n = self.links.len();
        self.group_of.clear();
        self.group_of.resize(n, usize::MAX);
        self.excluded.clear();
        self.excluded.resize(n, false);
        self.by_slot.clear();
        for (i, l) in self.links.iter().enumerate() {
            let slot = l.slot as usize;
            if self.by_slot.len() <= slot {
                self.by_slot.resize(slot + 1, None);
            }
            // A slot's newer worker (a reload's or recycle's replacement) wins.
            if self.by_slot[slot].is_none_or(|j| self.links[j].id < l.id) {
                self.by_slot[slot] = Some(i);
            }
        }
        if n > 0 {
            self.cursor %= n;
        } else {
            self.cursor = 0;
        }
    }

    /// The worker for the next socket, skipping excluded ones.
    fn pick(&mut self, balance: Balance, peer: Option<IpAddr>) -> Option<usize> {
        let n = self.links.len();
        match balance {
            Balance::RoundRobin | Balance::Shared => {
                for _ in 0..n {
                    let i = self.cursor % n;
                    self.cursor = (i + 1) % n;
                    if !self.excluded[i] {
                        return Some(i);
                    }
                }
                None
            }
            Balance::LeastConnections => {
                // The first (from the cursor) of the least-loaded workers that report a
                // load, as (load, position, index); and the first that does not.
                let mut best: Option<(u32, usize, usize)> = None;
                let mut silent: Option<(usize, usize)> = None;
                for k in 0..n {
                    let i = (self.cursor + k) % n;
                    if self.excluded[i] {
                        continue;
                    }
                    let Some(load) = self.links[i].load() else {
                        if silent.is_none() {
                            silent = Some((k, i));
                        }
                        if best.is_none() {
                            // First eligible from the cursor: it ties the minimum
                            // whatever comes after.
                            break;
                        }
                        continue;
                    };
                    // Plus what this call assigned to it and has not sent yet.
                    let g = self.group_of[i];
                    let assigned = if g == usize::MAX {
                        0
                    } else {
                        u32::try_from(self.groups[g].1.len()).unwrap_or(u32::MAX)
                    };
                    let load = load.saturating_add(assigned);
                    if best.is_none_or(|(b, _, _)| load < b) {
                        best = Some((load, k, i));
                    }
                }
                // A silent worker counts as loaded as the least-loaded reporting one:
                // on a tie, the first from the cursor (so silent ones take turns).
                let pick = match (best, silent) {
                    (Some((_, kb, ib)), Some((ks, is))) => {
                        if ks < kb {
                            is
                        } else {
                            ib
                        }
                    }
                    (Some((_, _, i)), None) | (None, Some((_, i))) => i,
                    (None, None) => return None,
                };
                self.cursor = (pick + 1) % n;
                Some(pick)
            }
            Balance::ClientIp => {
                let Some(ip) = peer else {
                    return self.pick(Balance::RoundRobin, None);
                };
                let slots = self.by_slot.len() as u32;
                // Jump consistent hashing over slots; a slot without a worker (or an
                // excluded one) sends its share on along a fixed chain, so only the
                // affected share moves, and comes back when the slot does.
                let mut key = hash_ip(ip);
                for _ in 0..16 {
                    let slot = jump_hash(key, slots) as usize;
                    if let Some(i) = self.by_slot[slot] {
                        if !self.excluded[i] {
                            return Some(i);
                        }
                    }
                    key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
                }
                self.pick(Balance::RoundRobin, None)
            }
        }
    }
}

/// FNV-1a over the address bytes, mixed.
fn hash_ip(ip: IpAddr) -> u64 {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lamping and Veach's jump consistent hash: a bucket in `0..buckets` for `key`;
/// growing `buckets` by one moves only `1/buckets` of the keys.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// One `Connections` frame with `fds` (at most [`protocol::MAX_FDS_PER_FRAME`]), built on
/// the stack: 12 bytes, `len = 8`, tag 1, `listener`, `count` (docs/PROTOCOL.md).
fn send_connections(
    link: &WorkerLink,
    listener: u16,
    fds: &[Accepted],
) -> Result<(), TrySendError> {
    let count = fds.len().min(protocol::MAX_FDS_PER_FRAME);
    let mut frame = [0u8; 12];
    frame[0..4].copy_from_slice(&8u32.to_le_bytes());
    frame[4..8].copy_from_slice(&1u32.to_le_bytes());
    frame[8..10].copy_from_slice(&listener.to_le_bytes());
    frame[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    let mut raw = [0 as RawFd; protocol::MAX_FDS_PER_FRAME];
    for (slot, accepted) in raw.iter_mut().zip(fds) {
        *slot = accepted.fd.as_raw_fd();
    }
    link.writer.try_send(&frame, &raw[..count])
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

    fn link_with(id: u64, slot: u32, limit_open: bool) -> (Arc<WorkerLink>, FakeWorker) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let peer = b.try_clone().expect("clone");
        let (_, writer) = channel::split(channel::from_std(a).expect("tokio"));
        let (reader, _) = channel::split(channel::from_std(b).expect("tokio"));
        let link = Arc::new(WorkerLink::new(id, slot, Protocol::Binary, writer));
        if limit_open {
            link.open_window_for_tests(u64::MAX);
        }
        (
            link,
            FakeWorker {
                reader,
                _peer: peer,
            },
        )
    }

    fn link(id: u64) -> (Arc<WorkerLink>, FakeWorker) {
        link_with(id, id as u32, true)
    }

    /// A Node.js-dialect link with an open window (the fake worker does not read).
    fn node_link(id: u64) -> (Arc<WorkerLink>, FakeWorker) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let peer = b.try_clone().expect("clone");
        let (_, writer) = channel::split(channel::from_std(a).expect("tokio"));
        let (reader, _) = channel::split(channel::from_std(b).expect("tokio"));
        let link = Arc::new(WorkerLink::new(id, id as u32, Protocol::Node, writer));
        link.open_window_for_tests(u64::MAX);
        (
            link,
            FakeWorker {
                reader,
                _peer: peer,
            },
        )
    }

    fn sent(link: &WorkerLink) -> u64 {
        link.dispatched.load(Ordering::Relaxed)
    }

    fn sockets(n: usize) -> Vec<Accepted> {
        (0..n)
            .map(|i| {
                let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
                Accepted {
                    fd: OwnedFd::from(a),
                    peer: Some(IpAddr::from([127, 0, 0, (i % 4) as u8 + 2])),
                }
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
    async fn a_full_batch_is_one_frame_per_worker_whatever_the_pool_size() {
        let d = Dispatcher::new(Balance::RoundRobin);
        assert_eq!(d.batch_limit(), MAX_FDS_PER_FRAME);
        let mut workers = Vec::new();
        for id in 0..16 {
            let (l, w) = link(id);
            writable(&[&l]).await;
            d.add(l);
            workers.push(w);
        }
        assert_eq!(d.batch_limit(), 16 * PER_WORKER_BATCH);
        let mut batch = sockets(d.batch_limit());
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        for w in &mut workers {
            let (msg, fds) =
                tokio::time::timeout(Duration::from_secs(5), w.reader.recv::<ToWorker>())
                    .await
                    .expect("a frame in time")
                    .expect("readable")
                    .expect("not closed");
            assert!(
                matches!(msg, ToWorker::Connections { count, .. } if usize::from(count) == PER_WORKER_BATCH)
            );
            assert_eq!(fds.len(), PER_WORKER_BATCH);
        }
        for id in 16..40 {
            let (l, w) = link(id);
            d.add(l);
            workers.push(w);
        }
        assert_eq!(d.batch_limit(), MAX_BATCH);
    }

    #[tokio::test]
    async fn a_dead_worker_hands_its_sockets_to_the_next_and_is_reported() {
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
        assert!(l1.gone.is_cancelled(), "the link task hears of it");
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
        assert_eq!(d.len(), 2, "a full worker stays in rotation");
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
    async fn the_in_flight_window_bounds_what_a_worker_holds() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let (l1, mut w1) = link_with(1, 0, false);
        let (l2, mut w2) = link(2);
        writable(&[&l1, &l2]).await;
        l1.open_window_for_tests(5);
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        let mut fds = sockets(40);
        d.dispatch(0, &mut fds);
        assert!(fds.is_empty());
        assert_eq!(received(&mut w1).await, 5, "no more than its window");
        assert_eq!(received(&mut w2).await, 35);
        assert!(l1.blocked.load(Ordering::Relaxed));
        assert!(d.stats.window_full.load(Ordering::Relaxed) >= 1);
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

    #[tokio::test]
    async fn least_connections_counts_only_what_was_sent() {
        let d = Dispatcher::new(Balance::LeastConnections);
        let (l1, _w1) = link_with(1, 0, false);
        let (l2, _w2) = link(2);
        writable(&[&l1, &l2]).await;
        l1.open_window_for_tests(2);
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        l1.heartbeat(0);
        l2.heartbeat(0);
        // One batch: 5 and 5 assigned; worker 1's window takes 2, its other 3 go back
        // and then to worker 2.
        let mut batch = sockets(10);
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        assert_eq!((sent(&l1), sent(&l2)), (2, 8));
        assert_eq!(
            l1.since_heartbeat.load(Ordering::Relaxed),
            2,
            "not the 5 assigned"
        );
        assert_eq!(l2.since_heartbeat.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn least_connections_takes_turns_among_workers_that_never_heartbeat() {
        // Node.js workers without the package: what was sent is no load. A restarted
        // worker joins the rotation instead of taking everything until it has had as
        // many connections as the others had in their lifetime.
        let d = Dispatcher::new(Balance::LeastConnections);
        let (l1, _w1) = node_link(1);
        let (l2, _w2) = node_link(2);
        let (l3, _w3) = node_link(3);
        writable(&[&l1, &l2, &l3]).await;
        d.add(Arc::clone(&l1));
        d.add(Arc::clone(&l2));
        for _ in 0..60 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        assert_eq!((sent(&l1), sent(&l2)), (30, 30));
        d.add(Arc::clone(&l3));
        for _ in 0..30 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        assert_eq!((sent(&l1), sent(&l2), sent(&l3)), (40, 40, 10));
        assert_eq!(l3.load(), None);
    }

    #[tokio::test]
    async fn a_worker_that_never_heartbeats_ties_the_least_loaded_one() {
        let d = Dispatcher::new(Balance::LeastConnections);
        let (l1, _w1) = node_link(1);
        let (l2, _w2) = node_link(2);
        let (l3, _w3) = node_link(3);
        writable(&[&l1, &l2, &l3]).await;
        for l in [&l1, &l2, &l3] {
            d.add(Arc::clone(l));
        }
        l1.heartbeat(5);
        l2.heartbeat(3);
        assert_eq!(l1.load(), Some(5));
        // Worker 3 is as loaded as worker 2, whose load grows: they take turns until
        // worker 2 reaches worker 1.
        for _ in 0..4 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        assert_eq!((sent(&l1), sent(&l2), sent(&l3)), (0, 2, 2));
        assert_eq!(l2.load(), Some(5));
    }

    #[tokio::test]
    async fn a_socket_put_back_keeps_its_client_address() {
        let d = Dispatcher::new(Balance::ClientIp);
        // Slot 0's worker has no window: everything sent there comes back.
        let (l0, _w0) = link_with(1, 0, false);
        let (l1, _w1) = link_with(2, 1, true);
        let (l2, _w2) = link_with(3, 2, true);
        writable(&[&l0, &l1, &l2]).await;
        for l in [&l0, &l1, &l2] {
            d.add(Arc::clone(l));
        }
        let ip = (0..=255u8)
            .map(|i| IpAddr::from([10, 1, i, 7]))
            .find(|ip| {
                let mut st = d.lock();
                st.pick(Balance::ClientIp, Some(*ip)) == Some(0)
            })
            .expect("an address of slot 0");
        let mut batch: Vec<Accepted> = sockets(6)
            .into_iter()
            .map(|a| Accepted {
                fd: a.fd,
                peer: Some(ip),
            })
            .collect();
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        // The retry follows the address's fallback chain: one worker, not turns.
        let got = (sent(&l0), sent(&l1), sent(&l2));
        assert!(got == (0, 6, 0) || got == (0, 0, 6), "{got:?}");
    }

    #[test]
    fn connections_frames_built_by_hand_match_the_encoder() {
        for (listener, count) in [(0u16, 1u16), (3, 64), (65535, 17)] {
            let expected =
                protocol::frame(&ToWorker::Connections { listener, count }).expect("encode");
            let mut frame = [0u8; 12];
            frame[0..4].copy_from_slice(&8u32.to_le_bytes());
            frame[4..8].copy_from_slice(&1u32.to_le_bytes());
            frame[8..10].copy_from_slice(&listener.to_le_bytes());
            frame[10..12].copy_from_slice(&count.to_le_bytes());
            assert_eq!(frame.as_slice(), expected.as_slice());
        }
    }

    #[test]
    fn jump_hash_moves_only_the_new_share() {
        let keys: Vec<u64> = (0..10_000u64)
            .map(|k| hash_ip(IpAddr::from((k as u32).to_be_bytes())))
            .collect();
        let before: Vec<u32> = keys.iter().map(|k| jump_hash(*k, 4)).collect();
        let after: Vec<u32> = keys.iter().map(|k| jump_hash(*k, 5)).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // About a fifth move, all of them to the new bucket.
        assert!((1500..2500).contains(&moved), "{moved}");
        assert!(before.iter().zip(&after).all(|(a, b)| a == b || *b == 4));
        let mut counts = [0usize; 5];
        for b in &after {
            counts[*b as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (1500..2500).contains(c)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn client_ip_keeps_each_address_on_one_slot_and_moves_only_a_dead_slots_share() {
        let d = Dispatcher::new(Balance::ClientIp);
        let mut links = Vec::new();
        let mut workers = Vec::new();
        for slot in 0..4u32 {
            let (l, w) = link_with(u64::from(slot) + 1, slot, true);
            links.push(l);
            workers.push(w);
        }
        writable(&links.iter().collect::<Vec<_>>()).await;
        for l in &links {
            d.add(Arc::clone(l));
        }
        let home = |d: &Arc<Dispatcher>, ip: IpAddr| {
            let mut st = d.lock();
            st.pick(Balance::ClientIp, Some(ip))
                .map(|i| st.links[i].slot)
        };
        let ips: Vec<IpAddr> = (0..64u8).map(|i| IpAddr::from([10, 0, i, 1])).collect();
        let first: Vec<Option<u32>> = ips.iter().map(|ip| home(&d, *ip)).collect();
        assert_eq!(
            first,
            ips.iter().map(|ip| home(&d, *ip)).collect::<Vec<_>>()
        );
        // Slot 1's worker dies: only its addresses move.
        d.remove(2);
        let during: Vec<Option<u32>> = ips.iter().map(|ip| home(&d, *ip)).collect();
        for (a, b) in first.iter().zip(&during) {
            if *a != Some(1) {
                assert_eq!(a, b);
            } else {
                assert_ne!(*b, Some(1));
            }
        }
        // Its replacement comes back: they return.
        let (l, _w) = link_with(9, 1, true);
        d.add(l);
        let after: Vec<Option<u32>> = ips.iter().map(|ip| home(&d, *ip)).collect();
        assert_eq!(first, after);
        drop(workers);
    }
}
