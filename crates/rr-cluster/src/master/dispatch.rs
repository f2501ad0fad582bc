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
//! The cost per connection does not grow with the number of workers for round-robin
//! while workers have room: per-worker scratch space lives in the dispatcher and only
//! touched entries are reset. A worker whose in-flight window is used up is passed over
//! when it is picked, before any socket is grouped for it: its window is read (two
//! loads), nothing is sent, and it is marked as waited for once
//! ([`WorkerLink::wait_for_room`]) until an `Ack` reopens it. So when every window is
//! shut and each `Ack` frees a slot, a connection costs reads of the windows passed
//! over on the way to the open one, not a failed send to each worker.

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
/// Most accepted connections the accept loops hold together, whatever the number of
/// listeners (a larger pool gets smaller shares per worker). The master holds these
/// descriptors until they are sent; 256 keeps it far below a 1024-descriptor limit.
/// See [`Dispatcher::reserve`].
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
    /// it had not taken off its channel then and what was sent to it since. A worker that never sent a heartbeat (a Node.js worker
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
    /// Accepted connections waiting for a worker: those a dispatch could not place,
    /// in all accept loops together ([`Dispatcher::queue`]); never more than
    /// [`MAX_BATCH`]. Neither the room an accept loop reserved for the batch it is
    /// taking off its backlog nor that batch before its dispatch counts here.
    pub(crate) queued: AtomicUsize,
    /// Sends that failed because the worker was gone (the sockets went elsewhere).
    pub(crate) send_failures: AtomicU64,
    /// Sends that failed for a passing reason (`ETOOMANYREFS`, `ENOBUFS`); retried.
    pub(crate) send_busy: AtomicU64,
    /// Sends stopped because a worker's channel (its socket buffer) was full: once
    /// per worker per dispatch that met it (the channel is then watched until
    /// writable). Not a Node.js link held by the exposed-handle guard (see `channel`).
    pub(crate) channel_full: AtomicU64,
    /// Times a worker was passed over because it had as many connections in flight
    /// as it may: once each time its window runs out (dispatch then waits for it to
    /// grow), not once per connection that found it shut. Not a Node.js link held by
    /// the exposed-handle guard while its window has room.
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
    /// Workers in rotation (`State::links.len()`), read without the lock.
    in_rotation: AtomicUsize,
    /// Sockets the accept loops hold (waiting for a worker, or accepted and not yet
    /// dispatched) plus the room they reserved for the batch they are accepting; at
    /// most [`MAX_BATCH`]. See [`Dispatcher::reserve`].
    held: AtomicUsize,
    /// An accept loop found [`MAX_BATCH`] sockets held and waits for
    /// [`Dispatcher::release`] to wake it.
    held_waiter: AtomicBool,
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
    /// Workers found out of window and marked as waited for in the current call.
    shut_found: u64,
    /// Calls of [`State::pick`], each a walk over the rotation at worst (tests).
    #[cfg(test)]
    picks: u64,
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
                shut_found: 0,
                #[cfg(test)]
                picks: 0,
                pending: Vec::new(),
                groups: Vec::new(),
                spare: Vec::new(),
            }),
            wake: watch::Sender::new(0),
            retry_scheduled: AtomicBool::new(false),
            in_rotation: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            held_waiter: AtomicBool::new(false),
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
            self.reindex(&mut st);
        }
        drop(st);
        self.notify();
    }

    /// Takes a worker out of rotation: it gets no further socket.
    pub(crate) fn remove(&self, id: u64) {
        let mut st = self.lock();
        st.links.retain(|l| l.id != id);
        self.reindex(&mut st);
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

    /// Rebuilds the per-link scratch space after the rotation changed.
    fn reindex(&self, st: &mut State) {
        st.reindex();
        self.in_rotation.store(st.links.len(), Ordering::Relaxed);
    }

    /// How many connections an accept loop takes off the backlog before it
    /// dispatches: enough that at saturation each worker's share of a batch fills a
    /// frame of [`PER_WORKER_BATCH`] descriptors (one `sendmsg`, at most one wake-up
    /// of the worker, per that many connections, whatever the pool's size), within
    /// [`MAX_FDS_PER_FRAME`] and [`MAX_BATCH`]. Below saturation the backlog empties
    /// first and batches stay small.
    pub(crate) fn batch_limit(&self) -> usize {
        (self.in_rotation.load(Ordering::Relaxed) * PER_WORKER_BATCH)
            .clamp(MAX_FDS_PER_FRAME, MAX_BATCH)
    }

    /// Room for the accept loop's next batch: up to [`Dispatcher::batch_limit`]
    /// sockets, within what the accept loops together may hold ([`MAX_BATCH`]), taken
    /// at once (`held`; `stats.queued` reports only sockets left waiting,
    /// [`Dispatcher::queue`]). 0 when they hold that many already: the loop then waits
    /// ([`Dispatcher::wait_for_held_room`]). The caller gives back what it did not
    /// accept, and what it sent at once, with [`Dispatcher::release`]. Per batch, one
    /// compare-and-swap; the limit is read without the dispatcher's lock
    /// (`in_rotation`).
    pub(crate) fn reserve(&self) -> usize {
        let limit = self.batch_limit();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < MAX_BATCH).then(|| held + limit.min(MAX_BATCH - held))
            })
            .map_or(0, |held| limit.min(MAX_BATCH - held))
    }

    /// Gives back `n` of the room taken by [`Dispatcher::reserve`] (sockets sent at
    /// once, or never accepted), and wakes the accept loops if one waits for room
    /// under [`MAX_BATCH`].
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        // SeqCst, with `wait_for_held_room`: the store-buffering pattern of
        // `WorkerLink::wait_for_room`. Either that load sees this decrement, or this
        // load sees its flag.
        self.held.fetch_sub(n, Ordering::SeqCst);
        if self.held_waiter.load(Ordering::SeqCst) && self.held_waiter.swap(false, Ordering::SeqCst)
        {
            self.notify();
        }
    }

    /// `n` sockets of an accept loop's batch found no worker and wait in the loop
    /// (counted in `stats.queued`; their room stays taken). Only when some are left
    /// over, not per connection.
    pub(crate) fn queue(&self, n: usize) {
        if n > 0 {
            self.stats.queued.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `n` of the sockets [`Dispatcher::queue`] counted were sent or closed: they
    /// wait no more, and their room is given back ([`Dispatcher::release`]).
    pub(crate) fn dequeue(&self, n: usize) {
        if n > 0 {
            self.stats.queued.fetch_sub(n, Ordering::Relaxed);
            self.release(n);
        }
    }

    /// [`Dispatcher::reserve`] found no room: asks [`Dispatcher::release`] to wake the
    /// accept loops when some is given back. `true` when there is room already. The
    /// caller marks its [`Dispatcher::subscribe`] receiver seen before this call.
    pub(crate) fn wait_for_held_room(&self) -> bool {
        self.held_waiter.store(true, Ordering::SeqCst);
        self.held.load(Ordering::SeqCst) < MAX_BATCH
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
            let mut rest = pending.drain(..);
            for accepted in rest.by_ref() {
                // Every worker is excluded (each window shut, say): the rest stays, in
                // order, without a walk over the rotation for each.
                if st.excluded_list.len() == st.links.len() {
                    batch.push(accepted);
                    break;
                }
                // Least-connections counts a socket once it is sent (`dispatched`);
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
            batch.extend(rest);
            st.pending = pending;
            // One send per worker (Node.js: one per socket); what fails goes back.
            while let Some((i, mut fds)) = st.groups.pop() {
                st.group_of[i] = usize::MAX;
                let link = Arc::clone(&st.links[i]);
                // Least-connections counts what was sent (`dispatched`, raised per
                // send): what goes back is counted where it goes.
                let result = self.send_group(&link, listener, &mut fds, &mut busy);
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
        if st.shut_found > 0 {
            self.stats
                .window_full
                .fetch_add(st.shut_found, Ordering::Relaxed);
            st.shut_found = 0;
        }
        if gone {
            st.links.retain(|l| !l.gone.is_cancelled());
            self.reindex(st);
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
            // The window shrank since `pick` (an `Ack` with less capacity), or the
            // exposed-handle guard (Node.js) holds the link: only the first counts.
            if link.window() < fds.len() as u64 {
                self.stats.window_full.fetch_add(1, Ordering::Relaxed);
            }
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
            Some(e) => self.send_failed(link, e, busy),
        };
        if fds.is_empty() { None } else { Some(is_gone) }
    }

    /// What a failed send means for the worker: `true` when it is gone.
    fn send_failed(
        self: &Arc<Self>,
        link: &Arc<WorkerLink>,
        e: TrySendError,
        busy: &mut bool,
    ) -> bool {
        match e {
            TrySendError::Full
                if link.protocol == Protocol::Node && link.writer.handle_room() == 0 =>
            {
                // Not the socket buffer but the exposed-handle guard: application
                // messages written since `budget` made this group's first line an
                // exposed one. No full channel, nothing to watch (it is writable): the
                // ACK that clears the guard wakes the accept loops (`wait_for_room`
                // asks it to, or says it came already).
                if link.wait_for_room() {
                    self.notify();
                }
                false
            }
            TrySendError::Full => {
                self.stats.channel_full.fetch_add(1, Ordering::Relaxed);
                self.watch_writable(link);
                false
            }
            TrySendError::Busy(e) => {
                let n = self.stats.send_busy.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(worker = link.slot, id = link.id, error = %e, count = n, "send to worker failed for now; retrying");
                }
                *busy = true;
                false
            }
            TrySendError::Closed(e) => {
                tracing::warn!(worker = link.slot, id = link.id, error = %e, "worker's channel closed; its sockets go to another worker");
                self.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                link.mark_gone(format!("send failed: {e}"));
                true
            }
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

    /// Whether link `i` may take one more socket in the current call: its window's
    /// budget exceeds what the call assigned it so far. One that may not is excluded
    /// for the rest of the call and, unless it already is, marked as waited for
    /// ([`WorkerLink::wait_for_room`]: its next `Ack` wakes the accept loops), counted
    /// in `shut_found` unless its window has room (a Node.js link that the
    /// exposed-handle guard holds until its ACK: not a shut window). The budget can only shrink under dispatch's feet by an `Ack`
    /// with less capacity; `send_group` checks it again.
    ///
    /// Once marked, a shut worker costs dispatch its two window loads and the flag's
    /// until it reopens: the flag stays set until `WorkerLink::set_limit` takes it,
    /// when the window grows, and wakes the accept loops (which mark their receiver
    /// seen before they dispatch, so a flag read stale here comes with a wake-up).
    fn has_room(&mut self, i: usize) -> bool {
        let g = self.group_of[i];
        let assigned = if g == usize::MAX {
            0
        } else {
            self.groups[g].1.len() as u64
        };
        let link = &self.links[i];
        if link.budget() > assigned {
            return true;
        }
        if !link.blocked.load(Ordering::Relaxed) {
            // A Node.js link whose window has room is held by the exposed-handle
            // guard (see `channel`): waited for the same way, not a shut window.
            if link.window() <= assigned {
                self.shut_found += 1;
            }
            // `true`: the window grew meanwhile (the flag stays set: a later growth
            // wakes the loops for nothing, once).
            if link.wait_for_room() && link.budget() > assigned {
                return true;
            }
        }
        self.exclude(i);
        false
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

    /// The worker for the next socket, skipping excluded ones and those without room
    /// in their window ([`State::has_room`]).
    fn pick(&mut self, balance: Balance, peer: Option<IpAddr>) -> Option<usize> {
        #[cfg(test)]
        {
            self.picks += 1;
        }
        let n = self.links.len();
        match balance {
            Balance::RoundRobin | Balance::Shared => {
                for _ in 0..n {
                    let i = self.cursor % n;
                    self.cursor = (i + 1) % n;
                    if !self.excluded[i] && self.has_room(i) {
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
                    if self.excluded[i] || !self.has_room(i) {
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
                        if !self.excluded[i] && self.has_room(i) {
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

/// FNV-1a over the address bytes (an IPv4-mapped IPv6 address as its IPv4 one), on
/// the stack.
fn hash_ip(ip: IpAddr) -> u64 {
    let mut buf = [0u8; 16];
    let bytes: &[u8] = match ip {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            &buf[..4]
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                buf[..4].copy_from_slice(&v4.octets());
                &buf[..4]
            }
            None => {
                buf = v6.octets();
                &buf
            }
        },
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
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
        assert_eq!(l1.load(), Some(2), "not the 5 assigned");
        assert_eq!(l2.load(), Some(8));
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
        // Dispatch passes over slot 0 (no window): its home is found from the hash.
        let ip = (0..=255u8)
            .map(|i| IpAddr::from([10, 1, i, 7]))
            .find(|ip| jump_hash(hash_ip(*ip), 3) == 0)
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

    /// Regression: with every window shut but one, each connection (each `Ack` frees a
    /// slot and wakes the accept loop) was grouped for worker after worker and failed in
    /// `send_group` for each: about one failed send, with its atomics, per worker in
    /// rotation, per connection.
    #[tokio::test]
    async fn shut_windows_are_passed_over_not_sent_to_one_by_one() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let mut links = Vec::new();
        let mut workers = Vec::new();
        for id in 0..256 {
            let (l, w) = link_with(id, id as u32, false);
            links.push(l);
            workers.push(w);
        }
        let (open, mut open_worker) = link(256);
        writable(&[&open]).await;
        links.insert(128, Arc::clone(&open));
        for l in &links {
            d.add(Arc::clone(l));
        }
        // The first two connections (one turn of the rotation) find the shut windows
        // and mark each as waited for.
        for _ in 0..2 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        assert_eq!(
            links
                .iter()
                .filter(|l| l.blocked.load(Ordering::Relaxed))
                .count(),
            256,
            "every shut worker is waited for"
        );
        let before = d.stats.window_full.load(Ordering::Relaxed);
        for _ in 0..20 {
            let mut one = sockets(1);
            d.dispatch(0, &mut one);
            assert!(one.is_empty());
        }
        let more = d.stats.window_full.load(Ordering::Relaxed) - before;
        assert!(
            more <= 2,
            "20 connections found {more} shut windows (256 shut workers)"
        );
        assert_eq!(received(&mut open_worker).await, 22);
        assert!(links.iter().all(|l| Arc::ptr_eq(l, &open) || sent(l) == 0));
        drop(workers);
    }

    #[tokio::test]
    async fn the_accept_loops_together_hold_at_most_max_batch() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let mut wake = d.subscribe();
        // No worker: each loop may take a frame's worth.
        let mut rooms = Vec::new();
        for _ in 0..5 {
            rooms.push(d.reserve());
        }
        assert_eq!(rooms, [64, 64, 64, 64, 0]);
        assert_eq!(d.held.load(Ordering::Relaxed), MAX_BATCH);
        wake.borrow_and_update();
        assert!(!d.wait_for_held_room(), "full");
        // A loop that sends or closes some wakes the one waiting.
        d.release(10);
        tokio::time::timeout(Duration::from_secs(5), wake.changed())
            .await
            .expect("woken")
            .expect("open");
        assert_eq!(d.reserve(), 10);
        d.release(MAX_BATCH);
        assert_eq!(d.held.load(Ordering::Relaxed), 0);
        // Nobody waits: no wake-up.
        wake.borrow_and_update();
        d.release(0);
        assert_eq!(d.reserve(), 64);
        d.release(64);
        assert!(!wake.has_changed().expect("open"));
    }

    /// Regression: `queued` (status, `accept_queue_length`) counted the whole room an
    /// accept loop reserved for its batch, 64 or 256 while 0 or 1 socket waited.
    #[tokio::test]
    async fn reserved_room_is_not_reported_as_queued() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let queued = || d.stats.queued.load(Ordering::Relaxed);
        let room = d.reserve();
        assert_eq!(room, 64);
        assert_eq!(queued(), 0, "reserved, nothing accepted yet");
        // 3 accepted, none placed (no worker): they wait, in their room.
        let mut batch = sockets(3);
        d.dispatch(0, &mut batch);
        d.release(room - batch.len());
        d.queue(batch.len());
        assert_eq!(queued(), 3);
        assert_eq!(d.held.load(Ordering::Relaxed), 3);
        // A worker takes 2 of them (its window), then the last.
        let (l, _w) = link_with(1, 1, false);
        writable(&[&l]).await;
        l.open_window_for_tests(2);
        d.add(Arc::clone(&l));
        let before = batch.len();
        d.dispatch(0, &mut batch);
        d.dequeue(before - batch.len());
        assert_eq!((queued(), d.held.load(Ordering::Relaxed)), (1, 1));
        l.open_window_for_tests(3);
        d.dispatch(0, &mut batch);
        d.dequeue(1);
        assert!(batch.is_empty());
        assert_eq!((queued(), d.held.load(Ordering::Relaxed)), (0, 0));
    }

    /// Regression: once every worker was excluded (each window shut), each socket
    /// left still walked the whole rotation: 256 x 256 window checks per wake-up.
    #[tokio::test]
    async fn once_every_worker_is_excluded_the_rest_of_the_batch_stays_unpicked() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let mut links = Vec::new();
        for id in 0..8 {
            let (l, w) = link_with(id, id as u32, false);
            d.add(Arc::clone(&l));
            links.push((l, w));
        }
        let mut batch = sockets(100);
        let order: Vec<RawFd> = batch.iter().map(|a| a.fd.as_raw_fd()).collect();
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::ClientIp,
        ] {
            d.set_balance(balance);
            d.lock().picks = 0;
            d.dispatch(0, &mut batch);
            let kept: Vec<RawFd> = batch.iter().map(|a| a.fd.as_raw_fd()).collect();
            assert_eq!(kept, order, "{balance}: kept, in order");
            // One pick (client-ip's falls back to a round-robin one), not one per socket.
            let picks = d.lock().picks;
            assert!(picks <= 2, "{balance}: {picks} walks over the rotation");
        }
    }

    /// The exposed-handle guard of a Node.js link refusing a send is no full
    /// channel: counted as one, it also spawned a writability watch that woke the
    /// accept loops at once (the channel is writable), for nothing.
    #[tokio::test]
    async fn a_send_the_handle_guard_holds_is_not_a_full_channel() {
        let d = Dispatcher::new(Balance::RoundRobin);
        let (l, _w) = node_link(1);
        writable(&[&l]).await;
        // A long run of lines without a handle, then an exposed handle line.
        let line = node::user_line(format!("\"{}\"", "m".repeat(1021)).as_bytes()).expect("line");
        for _ in 0..33 {
            l.writer.try_send(&line, &[]).expect("sent");
        }
        let fd = sockets(1).pop().expect("one");
        l.writer
            .try_send(&node::connection_line(0), &[fd.fd.as_raw_fd()])
            .expect("the exposed one goes");
        assert_eq!(l.writer.handle_room(), 0);
        let mut busy = false;
        let held = l
            .writer
            .try_send(&node::connection_line(0), &[fd.fd.as_raw_fd()]);
        let e = held.expect_err("held by the guard");
        assert!(matches!(e, TrySendError::Full));
        assert!(!d.send_failed(&l, e, &mut busy), "not gone");
        assert_eq!(d.stats.channel_full.load(Ordering::Relaxed), 0);
        assert!(!l.watching.load(Ordering::Relaxed), "no writability watch");
        assert!(l.blocked.load(Ordering::Relaxed), "its ACK wakes dispatch");
        assert!(!busy);
    }

    #[test]
    fn jump_hash_moves_only_the_new_share() {
        // An IPv4-mapped IPv6 address is its IPv4 address.
        let v4 = std::net::Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V6(v4.to_ipv6_mapped()))
        );
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
