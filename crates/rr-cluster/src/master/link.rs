//! The master's side of one worker's channel: [`WorkerLink`] (what dispatch and the
//! driver share about the worker) and the link task, which speaks the worker's dialect
//! and turns what it says into supervisor inputs.
//!
//! Inbound work is bounded per worker: heartbeats update atomics and reach the driver
//! at most one at a time, a worker that floods heartbeats is dropped, and application
//! messages go to a queue bounded in bytes (dropped and counted when full). A worker
//! can cost the master CPU, never unbounded memory.
//!
//! The link task also watches that the worker takes the descriptors sent to it: every
//! connection it is sent must be acknowledged (version-2 `Ack`, a heartbeat's
//! `served`, a `Pong` after a `Ping`, or Node's `NODE_HANDLE_ACK`). A worker that holds
//! unacknowledged descriptors without progress for a heartbeat interval is pinged; for
//! two intervals it is taken out of rotation (`Stalled`); for the heartbeat timeout it
//! is killed and replaced (`Unresponsive`). An acknowledgement counts for no more than
//! was sent: a count above what the channel carried is cut to it, and a Node.js ACK
//! or NACK when no handle waits for one is ignored.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dispatch::Dispatcher;
use super::supervisor::Input;
use crate::channel::{ChannelError, ChannelReader, ChannelWriter};
use crate::node::{self, FromNode};
use crate::protocol::{
    self, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Protocol, ToMaster, ToWorker,
};

/// Descriptors in flight to a version-2 worker before its first `Ack` (and at most,
/// whatever its capacity).
pub(crate) const WINDOW: u64 = protocol::WINDOW;
/// Un-ACKed handles in flight to a Node.js worker, at most (each ACK makes room for one
/// more, within what its last heartbeat's capacity allows).
pub(crate) const NODE_WINDOW: u64 = 128;
/// More heartbeats (or pongs) than this per heartbeat interval is a flood.
const MAX_BEATS_PER_INTERVAL: u32 = 50;

/// An application message from a worker (Node's `worker.on('message')`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerMessage {
    /// The worker's slot.
    pub slot: u32,
    /// The worker's id.
    pub id: u64,
    /// The bytes it sent (JSON text for a Node.js worker).
    pub payload: Vec<u8>,
}

/// Messages from workers to the application, bounded in bytes.
#[derive(Debug)]
pub(crate) struct MessageQueue {
    tx: mpsc::UnboundedSender<WorkerMessage>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<WorkerMessage>>>,
    taken: AtomicBool,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    pub(crate) dropped: AtomicU64,
}

/// The receiving end of [`MasterHandle::messages`](super::MasterHandle::messages).
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::UnboundedReceiver<WorkerMessage>,
    bytes: Arc<AtomicUsize>,
}

impl Messages {
    /// The next message; `None` once the master has stopped.
    pub async fn recv(&mut self) -> Option<WorkerMessage> {
        let msg = self.rx.recv().await?;
        self.bytes
            .fetch_sub(msg.payload.len() + 64, Ordering::Relaxed);
        Some(msg)
    }
}

impl MessageQueue {
    /// A queue that holds at most `max_messages` of the largest size.
    pub(crate) fn new(max_messages: usize) -> MessageQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        MessageQueue {
            tx,
            rx: Mutex::new(Some(rx)),
            taken: AtomicBool::new(false),
            bytes: Arc::new(AtomicUsize::new(0)),
            max_bytes: max_messages
                .saturating_mul(1024)
                .clamp(64 * 1024, 64 * 1024 * 1024),
            dropped: AtomicU64::new(0),
        }
    }

    /// The receiver, once.
    pub(crate) fn take(&self) -> Option<Messages> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        self.taken.store(true, Ordering::SeqCst);
        Some(Messages {
            rx,
            bytes: Arc::clone(&self.bytes),
        })
    }

    fn push(&self, msg: WorkerMessage) {
        if !self.taken.load(Ordering::Relaxed) {
            // Nobody listens: nothing to keep.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let size = msg.payload.len() + 64;
        if self.bytes.fetch_add(size, Ordering::Relaxed) + size > self.max_bytes
            || self.tx.send(msg).is_err()
        {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "message from a worker dropped: the application does not read MasterHandle::messages()"
                );
            }
        }
    }
}

/// What dispatch and the driver share about one worker.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub(crate) id: u64,
    pub(crate) slot: u32,
    pub(crate) protocol: Protocol,
    /// The negotiated binary protocol version (0 until `Ready`).
    version: AtomicU32,
    pub(crate) writer: Arc<ChannelWriter>,
    /// Descriptors sent to this worker.
    pub(crate) dispatched: AtomicU64,
    /// Descriptors the worker is known to have taken off its channel.
    confirmed: AtomicU64,
    /// `dispatched` may not go past this (in-flight window and the worker's capacity).
    limit: AtomicU64,
    /// Dispatch skipped this worker for lack of window: wake the accept loops when it
    /// grows.
    pub(crate) blocked: AtomicBool,
    /// Open connections at the last heartbeat.
    pub(crate) active: AtomicU32,
    /// `confirmed` at the last heartbeat: what was sent past it (in flight then, the
    /// worker's `active` does not count it, or sent since) is `dispatched - load_base`.
    /// Both counters only grow, so the estimate needs no write per connection and
    /// counts each one once, whatever thread records a heartbeat meanwhile.
    load_base: AtomicU64,
    /// `active + dispatched - load_base` is a load estimate: a binary worker (it must
    /// heartbeat), or a Node.js worker once it sent a heartbeat. A Node.js worker
    /// without the package never does.
    reports_load: AtomicBool,
    /// Connections the worker lost (its descriptor table was full), as it reports.
    pub(crate) lost: AtomicU64,
    /// Lines from a Node worker that are not JSON serde_json reads (dropped).
    unreadable: AtomicU64,
    /// A task waits for this channel to become writable again.
    pub(crate) watching: AtomicBool,
    /// A heartbeat input is on its way to the driver.
    pub(crate) heartbeat_queued: AtomicBool,
    /// `dispatched` at which the worker is recycled (`max_requests`).
    pub(crate) recycle_at: AtomicU64,
    /// Dispatch told the driver about `recycle_at`.
    pub(crate) recycle_signalled: AtomicBool,
    /// Dispatch found the worker's end closed; the link task reports it.
    pub(crate) gone: CancellationToken,
    gone_reason: Mutex<Option<String>>,
    /// Outgoing application messages (and the listener sockets for shared balancing),
    /// written in order by the outbox task.
    outbox: mpsc::Sender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Set once: the drain notice, sent before anything else still queued.
    drain: Mutex<Option<u64>>,
    drain_posted: Notify,
}

/// Something the outbox task writes.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An encoded frame or line, with descriptors.
    Bytes(Vec<u8>, Vec<std::os::fd::OwnedFd>),
}

impl WorkerLink {
    pub(crate) fn new(
        id: u64,
        slot: u32,
        protocol: Protocol,
        writer: Arc<ChannelWriter>,
    ) -> WorkerLink {
        let (outbox, outbox_rx) = mpsc::channel(1024);
        if protocol == Protocol::Node {
            // Node keeps one received handle across reads: see `channel`.
            writer.guard_exposed_handles();
        }
        WorkerLink {
            id,
            slot,
            protocol,
            version: AtomicU32::new(0),
            writer,
            dispatched: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            active: AtomicU32::new(0),
            load_base: AtomicU64::new(0),
            reports_load: AtomicBool::new(protocol == Protocol::Binary),
            lost: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            heartbeat_queued: AtomicBool::new(false),
            recycle_at: AtomicU64::new(u64::MAX),
            recycle_signalled: AtomicBool::new(false),
            gone: CancellationToken::new(),
            gone_reason: Mutex::new(None),
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            drain: Mutex::new(None),
            drain_posted: Notify::new(),
        }
    }

    /// The negotiated protocol version (binary dialect; 0 before `Ready`).
    pub(crate) fn version(&self) -> u32 {
        self.version.load(Ordering::Relaxed)
    }

    /// Records a heartbeat's count of open connections. What was sent and is not yet
    /// acknowledged is still on the worker's channel, outside its count: it stays in
    /// the load estimate (the caller records the heartbeat's acknowledgement first).
    pub(crate) fn heartbeat(&self, active: u32) {
        self.load_base
            .store(self.confirmed.load(Ordering::Relaxed), Ordering::Relaxed);
        self.active.store(active, Ordering::Relaxed);
        self.reports_load.store(true, Ordering::Relaxed);
    }

    /// Open connections, as least-connections balancing sees them: the last
    /// heartbeat's count plus what was in flight then and what was sent since
    /// (`dispatched` past `confirmed` at the heartbeat). `None` for a worker that never
    /// reported one (a Node.js worker without the package, or with it before its first
    /// heartbeat): what was sent to it is no load figure, since nothing ever takes off
    /// what it closed. Dispatch treats it as loaded as the least-loaded worker that
    /// does report, taking turns with it. Four loads, no write.
    pub(crate) fn load(&self) -> Option<u32> {
        self.reports_load.load(Ordering::Relaxed).then(|| {
            let since = self
                .dispatched
                .load(Ordering::Relaxed)
                .saturating_sub(self.load_base.load(Ordering::Relaxed));
            self.active
                .load(Ordering::Relaxed)
                .saturating_add(u32::try_from(since).unwrap_or(u32::MAX))
        })
    }

    /// Dispatch found too little window here: asks [`WorkerLink::set_limit`] to wake the
    /// accept loops when the window grows. `true` when it has already grown past
    /// `dispatched` (the caller wakes them itself).
    ///
    /// Taken only when a worker is window-limited, not per connection. Both sides
    /// write one atomic and then read the other (`blocked`, then `limit`, here; `limit`,
    /// then `blocked`, in `set_limit`): the store-buffering pattern. With
    /// release/acquire each side may read the other's old value (a store may wait in
    /// the store buffer while the later load goes ahead, x86 included): dispatch
    /// sees no room, `set_limit` sees `blocked == false`, nobody wakes the accept
    /// loop, and with every worker window-limited it waits for ever. With all four
    /// operations `SeqCst` they fall into one total order: if this load comes before
    /// `set_limit`'s swap of `limit`, this store comes before its swap of `blocked`,
    /// which then reads `true`; otherwise this load sees the new limit. A test cannot
    /// show the race reliably (it needs a store to be delayed between two
    /// instructions); this argument is the check.
    ///
    /// A Node.js link also has no room while an exposed handle waits for its ACK
    /// ([`ChannelWriter::handle_room`]); the ACK that clears it takes the flag the same
    /// way (`ack_handle`'s store, then the swap in `wake_if_blocked`, both `SeqCst`).
    pub(crate) fn wait_for_room(&self) -> bool {
        self.blocked.store(true, Ordering::SeqCst);
        self.limit.load(Ordering::SeqCst) > self.dispatched.load(Ordering::Relaxed)
            && (self.protocol != Protocol::Node || self.writer.handle_room() > 0)
    }

    /// How many more descriptors may be sent now. A Node.js link: at most one after a
    /// long run of lines without a handle, none while such a handle waits for its ACK
    /// (see `channel`); three more loads.
    pub(crate) fn budget(&self) -> u64 {
        let window = self.window();
        if self.protocol == Protocol::Node {
            window.min(self.writer.handle_room())
        } else {
            window
        }
    }

    /// What the in-flight window alone (no exposed-handle guard) lets through now.
    /// [`WorkerLink::budget`] at or below what `window` says means it is the guard that
    /// holds a Node.js link back, not the window: dispatch counts only the window's
    /// holds as `window_full`.
    pub(crate) fn window(&self) -> u64 {
        self.limit
            .load(Ordering::Acquire)
            .saturating_sub(self.dispatched.load(Ordering::Relaxed))
    }

    /// Descriptors sent and not yet acknowledged.
    pub(crate) fn unconfirmed(&self) -> u64 {
        self.dispatched
            .load(Ordering::Relaxed)
            .saturating_sub(self.confirmed.load(Ordering::Relaxed))
    }

    fn confirm(&self, received: u64) -> bool {
        self.confirmed.fetch_max(received, Ordering::AcqRel) < received
    }

    /// A count of descriptors received that a worker reports, cut to what the channel
    /// carried: more would open the window past its bound and hide a stall. (Not cut
    /// to `dispatched`, which dispatch raises only after the send: the worker may
    /// report a descriptor before.)
    fn at_most_sent(&self, received: u64) -> u64 {
        received.min(self.writer.fds_sent())
    }

    /// Sets the window; wakes dispatch if it was waiting for room here. `SeqCst`: see
    /// [`WorkerLink::wait_for_room`] (a swap costs the same as with `AcqRel` on x86
    /// and on ARMv8).
    fn set_limit(&self, limit: u64, dispatcher: &Weak<Dispatcher>) {
        let old = self.limit.swap(limit, Ordering::SeqCst);
        if limit > old {
            self.wake_if_blocked(dispatcher);
        }
    }

    /// Wakes dispatch if it waits for room here (the window grew, or an exposed
    /// handle was acknowledged).
    fn wake_if_blocked(&self, dispatcher: &Weak<Dispatcher>) {
        if self.blocked.swap(false, Ordering::SeqCst) {
            if let Some(d) = dispatcher.upgrade() {
                d.notify();
            }
        }
    }

    /// Opens the in-flight window (tests of dispatch without a link task).
    #[cfg(test)]
    pub(crate) fn open_window_for_tests(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Dispatch found the worker's end of the channel closed.
    pub(crate) fn mark_gone(&self, reason: String) {
        let mut r = self.gone_reason.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(reason);
        self.gone.cancel();
    }

    /// Queues an application message or listener socket; `false` when the outbox is
    /// full (the worker does not read its channel).
    pub(crate) fn post(&self, msg: Outgoing) -> bool {
        self.outbox.try_send(msg).is_ok()
    }

    /// Asks the worker to drain (ahead of queued messages, after every connection sent).
    pub(crate) fn post_drain(&self, deadline: Duration) {
        let ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let mut d = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Some(ms);
            self.drain_posted.notify_one();
        }
    }

    /// Closes the master's end: the link task's reader ends, and the worker (or a
    /// descendant still holding its end) sees end-of-file.
    pub(crate) fn shutdown(&self) {
        self.writer.shutdown();
    }
}

/// What a link task needs besides its link.
#[derive(Debug, Clone)]
pub(crate) struct LinkContext {
    pub(crate) inputs: mpsc::UnboundedSender<Input>,
    pub(crate) messages: Arc<MessageQueue>,
    pub(crate) dispatcher: Weak<Dispatcher>,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Option<Duration>,
}

/// Stall detection state of one link task.
#[derive(Debug)]
struct Watch {
    /// Since when descriptors have waited without progress.
    since: Option<Instant>,
    /// `dispatched` just before the `Ping` in flight went out (its `Pong` confirms up
    /// to it). One at a time: the worker answers Pings in order, and a late `Pong`
    /// must not take a later Ping's mark.
    ping_mark: Option<u64>,
    /// The worker's first `Suicide` went to the supervisor; later ones are dropped.
    suicide_sent: bool,
    stalled: bool,
    reported_unresponsive: bool,
    beats: u32,
    window_start: Instant,
    /// Node.js: `confirmed` at its last heartbeat plus the capacity that heartbeat
    /// announced, if it did: `dispatched` stays within it until the next heartbeat.
    /// Within it (and without one) each ACK slides the window of [`NODE_WINDOW`].
    capped_at: Option<u64>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            since: None,
            ping_mark: None,
            suicide_sent: false,
            stalled: false,
            reported_unresponsive: false,
            beats: 0,
            window_start: Instant::now(),
            capped_at: None,
        }
    }
}

/// Speaks to one worker until its channel ends.
pub(crate) async fn run(
    link: Arc<WorkerLink>,
    mut reader: ChannelReader,
    hello: Hello,
    ctx: LinkContext,
) {
    let id = link.id;
    let closed = |error: Option<String>| Input::ChannelClosed { id, error };
    if link.protocol == Protocol::Binary {
        if let Err(e) = link.writer.send_msg(&ToWorker::Hello(hello)).await {
            let _ = ctx.inputs.send(closed(Some(e.to_string())));
            return;
        }
    }
    // Only after the Hello: queued messages may go out now.
    let outbox = link
        .outbox_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(rx) = outbox {
        tokio::spawn(outbox_task(Arc::clone(&link), rx));
    }
    let every =
        (ctx.heartbeat_interval / 4).clamp(Duration::from_millis(25), Duration::from_millis(250));
    let mut check = tokio::time::interval(every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::new();
    let error = loop {
        let step = tokio::select! {
            biased;
            () = link.gone.cancelled() => {
                let reason = link.gone_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
                break reason;
            }
            _ = check.tick() => {
                stall_check(&link, &ctx, &mut watch);
                continue;
            }
            step = next(&link, &mut reader, &ctx, &mut watch) => step,
        };
        match step {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(e),
        }
    };
    // The peer is dropped, not the master: close its channel so the worker sees the
    // end, and let the supervisor replace it.
    link.shutdown();
    // The outbox task holds the link, whose sender keeps the outbox open: it would wait
    // for ever, and keep the channel's descriptor open with it.
    link.gone.cancel();
    let _ = ctx.inputs.send(closed(error));
}

/// Reads and handles one message. `Ok(false)` at a clean end of stream.
async fn next(
    link: &Arc<WorkerLink>,
    reader: &mut ChannelReader,
    ctx: &LinkContext,
    watch: &mut Watch,
) -> Result<bool, String> {
    match link.protocol {
        Protocol::Binary => match reader.recv::<ToMaster>().await {
            Ok(Some((msg, _))) => binary(link, ctx, watch, msg).map(|()| true),
            Ok(None) => Ok(false),
            Err(ChannelError::Closed) => Ok(false),
            Err(e) => Err(e.to_string()),
        },
        Protocol::Node => match reader.recv_line(node::MAX_LINE).await {
            Ok(Some(line)) => match node::decode_line(&line) {
                Ok(msg) => from_node(link, ctx, watch, msg).map(|()| true),
                // Node's own messages are always readable: this is an application's
                // (nested too deep, say). Dropped, not the worker's end.
                Err(node::NodeError::NotJson(e)) => {
                    let n = link.unreadable.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(worker = link.slot, id = link.id, dropped = n, error = %e, "a message from the worker is not JSON that can be read; dropped");
                    }
                    if reader.line_came_with_fds() || line.starts_with(node::HANDLE_PREFIX) {
                        answer_handle(link);
                    }
                    Ok(true)
                }
                Err(e) => Err(e.to_string()),
            },
            Ok(None) => Ok(false),
            Err(ChannelError::Closed) => Ok(false),
            // An application's message too long (Node's own are short): skipped to its
            // newline by the reader, dropped like one that cannot be read.
            Err(ChannelError::LineTooLong { len, max }) => {
                let n = link.unreadable.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        worker = link.slot,
                        id = link.id,
                        dropped = n,
                        len,
                        max,
                        "a message from the worker is longer than the limit; dropped"
                    );
                }
                if reader.line_came_with_fds()
                    || reader.too_long_line_head().starts_with(node::HANDLE_PREFIX)
                {
                    answer_handle(link);
                }
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        },
    }
}

fn binary(
    link: &Arc<WorkerLink>,
    ctx: &LinkContext,
    watch: &mut Watch,
    msg: ToMaster,
) -> Result<(), String> {
    let id = link.id;
    let version = link.version();
    match msg {
        ToMaster::Ready { version: v, .. } => {
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) {
                return Err(format!(
                    "protocol version mismatch: the worker speaks version {v}, the master \
                     {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
                ));
            }
            if version != 0 {
                return Err("a second Ready".into());
            }
            link.version.store(v, Ordering::Relaxed);
            let limit = if v >= 2 { WINDOW } else { u64::MAX };
            link.set_limit(limit, &ctx.dispatcher);
            let _ = ctx.inputs.send(Input::Ready {
                id,
                heartbeats: true,
            });
        }
        ToMaster::Heartbeat { active, served } => {
            // The acknowledgement first: the load estimate keeps what is still in
            // flight after it.
            progress(link, ctx, watch, link.at_most_sent(served));
            beat(link, ctx, watch, Some(active))?;
        }
        ToMaster::Ack {
            received,
            lost,
            capacity,
        } if version >= 2 => {
            let received = link.at_most_sent(received);
            link.lost.store(lost, Ordering::Relaxed);
            progress(link, ctx, watch, received);
            let room = u64::from(capacity).min(WINDOW);
            link.set_limit(received.saturating_add(room), &ctx.dispatcher);
        }
        ToMaster::Ack { .. } if version == 0 => {
            return Err("Ack before Ready".into());
        }
        ToMaster::Ack { .. } => {
            return Err("Ack from a worker that speaks protocol version 1".into());
        }
        ToMaster::Pong => {
            // A sign of life, not a count: the load estimate stays as it is (a stalled
            // worker that answers a Ping must not look idle to least-connections).
            beat(link, ctx, watch, None)?;
            if let Some(mark) = watch.ping_mark.take() {
                progress(link, ctx, watch, mark);
            }
        }
        ToMaster::Suicide { reason } => suicide(ctx, watch, id, reason),
        ToMaster::User(payload) => ctx.messages.push(WorkerMessage {
            slot: link.slot,
            id,
            payload,
        }),
    }
    Ok(())
}

fn from_node(
    link: &Arc<WorkerLink>,
    ctx: &LinkContext,
    watch: &mut Watch,
    msg: FromNode,
) -> Result<(), String> {
    let id = link.id;
    match msg {
        FromNode::Ready => {
            if link.version() != 0 {
                return Ok(());
            }
            link.version.store(1, Ordering::Relaxed);
            link.set_limit(node_limit(link, watch), &ctx.dispatcher);
            // A Node.js worker without the package never heartbeats: it is held to
            // heartbeats only once it sends one.
            let _ = ctx.inputs.send(Input::Ready {
                id,
                heartbeats: false,
            });
        }
        FromNode::Heartbeat { active, capacity } => {
            beat(link, ctx, watch, Some(active))?;
            // As a binary `Ack`: room for `capacity` more beyond those taken (the ACKs
            // before this line), used up by the sliding window as ACKs come. Without
            // one, the sliding window alone again.
            watch.capped_at = capacity.map(|c| {
                link.confirmed
                    .load(Ordering::Relaxed)
                    .saturating_add(u64::from(c))
            });
            if link.version() != 0 {
                link.set_limit(node_limit(link, watch), &ctx.dispatcher);
            }
        }
        FromNode::HandleAck | FromNode::HandleNack => {
            // Listener lines (shared balancing) are handles too: their ACKs count
            // here, where no connection is ever dispatched.
            let Some(cleared) = link.writer.ack_handle() else {
                tracing::debug!(
                    worker = link.slot,
                    id = link.id,
                    "an ACK or NACK from the worker for no handle; ignored"
                );
                return Ok(());
            };
            if matches!(msg, FromNode::HandleNack) {
                link.lost.fetch_add(1, Ordering::Relaxed);
            }
            let confirmed = link.confirmed.load(Ordering::Relaxed) + 1;
            progress(link, ctx, watch, confirmed);
            // The window slides, within the last heartbeat's capacity if it announced
            // one (as a binary `Ack`'s, which carries it, every quarter window).
            if link.version() != 0 {
                link.set_limit(node_limit(link, watch), &ctx.dispatcher);
            }
            if cleared {
                // The exposed handle is in: the others may go (see `channel`).
                link.wake_if_blocked(&ctx.dispatcher);
            }
        }
        FromNode::Suicide { reason } => suicide(ctx, watch, id, reason),
        FromNode::User(payload) => ctx.messages.push(WorkerMessage {
            slot: link.slot,
            id,
            payload,
        }),
        FromNode::Handle => answer_handle(link),
        FromNode::Ignored => {}
    }
    Ok(())
}

/// A Node.js worker's window: `confirmed` plus [`NODE_WINDOW`], and no further than
/// `confirmed` at its last heartbeat plus the capacity that heartbeat announced, if it
/// did. Recomputed at each ACK: it never shrinks between heartbeats (`confirmed` only
/// grows), and a heartbeat's capacity of 2 still means 2 more connections, not 2 at a
/// time.
fn node_limit(link: &WorkerLink, watch: &Watch) -> u64 {
    let sliding = link
        .confirmed
        .load(Ordering::Relaxed)
        .saturating_add(NODE_WINDOW);
    watch.capped_at.map_or(sliding, |cap| sliding.min(cap))
}

/// Acknowledges a handle the worker sent (the master takes none: its descriptor was
/// closed on arrival), read or dropped: Node holds every later message (heartbeats
/// included) until its handle is acknowledged.
fn answer_handle(link: &Arc<WorkerLink>) {
    let ack = node::handle_ack_line();
    if link.writer.try_send(ack, &[]).is_err() {
        link.post(Outgoing::Bytes(ack.to_vec(), Vec::new()));
    }
}

/// Passes the worker's first `Suicide` on. The supervisor acts on the first only; a
/// worker that repeats it must not grow the driver's queue (each may carry 64 KiB).
fn suicide(ctx: &LinkContext, watch: &mut Watch, id: u64, reason: String) {
    if !std::mem::replace(&mut watch.suicide_sent, true) {
        let _ = ctx.inputs.send(Input::Suicide { id, reason });
    }
}

/// A heartbeat (`Some(active)`) or a `Pong` (`None`): counted against the flood
/// limit, recorded (a heartbeat only: a `Pong` leaves the load estimate alone), passed
/// on (coalesced).
fn beat(
    link: &Arc<WorkerLink>,
    ctx: &LinkContext,
    watch: &mut Watch,
    active: Option<u32>,
) -> Result<(), String> {
    let now = Instant::now();
    if now.duration_since(watch.window_start) >= ctx.heartbeat_interval {
        watch.window_start = now;
        watch.beats = 0;
    }
    watch.beats += 1;
    if watch.beats > MAX_BEATS_PER_INTERVAL {
        return Err(format!(
            "heartbeat flood: more than {MAX_BEATS_PER_INTERVAL} in one heartbeat interval"
        ));
    }
    let active = match active {
        Some(active) => {
            link.heartbeat(active);
            active
        }
        None => link.active.load(Ordering::Relaxed),
    };
    if !link.heartbeat_queued.swap(true, Ordering::AcqRel) {
        let _ = ctx.inputs.send(Input::Heartbeat {
            id: link.id,
            active,
        });
    }
    Ok(())
}

/// The worker has taken `received` descriptors off its channel.
fn progress(link: &Arc<WorkerLink>, ctx: &LinkContext, watch: &mut Watch, received: u64) {
    if !link.confirm(received) {
        return;
    }
    // A Ping in flight stays so: its `Pong` confirms no more than its own mark.
    watch.since = (link.unconfirmed() > 0).then(Instant::now);
    if watch.stalled {
        watch.stalled = false;
        watch.reported_unresponsive = false;
        let _ = ctx.inputs.send(Input::Resumed { id: link.id });
    }
}

/// Pings, then takes out of rotation, then reports unresponsive a worker that leaves
/// descriptors unacknowledged.
fn stall_check(link: &Arc<WorkerLink>, ctx: &LinkContext, watch: &mut Watch) {
    if link.version() == 0 || link.unconfirmed() == 0 {
        watch.since = None;
        return;
    }
    let now = Instant::now();
    let since = *watch.since.get_or_insert(now);
    let waited = now.duration_since(since);
    let interval = ctx.heartbeat_interval;
    if waited >= interval && watch.ping_mark.is_none() && link.protocol == Protocol::Binary {
        // Taken before the Ping goes out: dispatch counts a frame once it is written,
        // so everything counted here is ahead of the Ping on the channel (a frame
        // written after it must not be confirmed by its `Pong`).
        let mark = link.dispatched.load(Ordering::Relaxed);
        if let Ok(frame) = protocol::frame(&ToWorker::Ping) {
            if link.writer.try_send(&frame, &[]).is_ok() {
                watch.ping_mark = Some(mark);
            }
        }
    }
    if waited >= interval * 2 && !watch.stalled {
        watch.stalled = true;
        let _ = ctx.inputs.send(Input::Stalled {
            id: link.id,
            reason: format!(
                "{} connections sent to it not taken for {}",
                link.unconfirmed(),
                humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
            ),
        });
    }
    // With the heartbeat check off, a stalled worker stays out of rotation, unkilled.
    let Some(timeout) = ctx.heartbeat_timeout else {
        return;
    };
    if watch.stalled && waited >= timeout && !watch.reported_unresponsive {
        watch.reported_unresponsive = true;
        let _ = ctx.inputs.send(Input::Unresponsive {
            id: link.id,
            reason: format!(
                "it stopped reading its channel ({} connections not taken for {})",
                link.unconfirmed(),
                humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
            ),
        });
    }
}

/// Writes queued messages in order; the drain notice overtakes them.
async fn outbox_task(link: Arc<WorkerLink>, mut rx: mpsc::Receiver<Outgoing>) {
    loop {
        let drain = { *link.drain.lock().unwrap_or_else(|p| p.into_inner()) };
        if let Some(ms) = drain {
            let sent = match link.protocol {
                Protocol::Binary => {
                    link.writer
                        .send_msg(&ToWorker::Drain { deadline_ms: ms })
                        .await
                }
                Protocol::Node => {
                    let sent = link.writer.send(&node::drain_line(ms), &[]).await;
                    // Node sees end-of-file after the drain notice ('disconnect'): a
                    // worker written without the package exits once idle.
                    link.writer.shutdown_write();
                    sent
                }
            };
            if let Err(e) = sent {
                tracing::debug!(worker = link.slot, id = link.id, error = %e, "drain notice not sent");
            }
            return;
        }
        let msg = tokio::select! {
            biased;
            () = link.drain_posted.notified() => continue,
            () = link.gone.cancelled() => return,
            msg = rx.recv() => msg,
        };
        let Some(Outgoing::Bytes(bytes, fds)) = msg else {
            return;
        };
        let raw: Vec<_> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        // A listener line may wait for a Node.js worker's ACK (see `channel`), which a
        // worker that is gone never sends.
        let sent = tokio::select! {
            sent = link.writer.send(&bytes, &raw) => sent,
            () = link.gone.cancelled() => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel;

    fn setup(protocol: Protocol) -> (Arc<WorkerLink>, std::os::unix::net::UnixStream, LinkContext) {
        let (link, peer, ctx, _) = setup_with_inputs(protocol);
        (link, peer, ctx)
    }

    /// [`setup`], and the supervisor's end of the inputs.
    fn setup_with_inputs(
        protocol: Protocol,
    ) -> (
        Arc<WorkerLink>,
        std::os::unix::net::UnixStream,
        LinkContext,
        mpsc::UnboundedReceiver<Input>,
    ) {
        let (link, peer, ctx, rx, _) = setup_with_reader(protocol);
        (link, peer, ctx, rx)
    }

    /// [`setup_with_inputs`], and the master's reader.
    fn setup_with_reader(
        protocol: Protocol,
    ) -> (
        Arc<WorkerLink>,
        std::os::unix::net::UnixStream,
        LinkContext,
        mpsc::UnboundedReceiver<Input>,
        ChannelReader,
    ) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (reader, writer) = channel::split(channel::from_std(a).expect("tokio"));
        let link = Arc::new(WorkerLink::new(1, 0, protocol, writer));
        let (inputs, rx) = mpsc::unbounded_channel();
        let ctx = LinkContext {
            inputs,
            messages: Arc::new(MessageQueue::new(16)),
            dispatcher: Weak::new(),
            heartbeat_interval: Duration::from_secs(3600),
            heartbeat_timeout: None,
        };
        (link, b, ctx, rx, reader)
    }

    fn dev_null() -> std::os::fd::OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    /// Sends `n` connections as dispatch does (the peer does not read them).
    fn send_connections(link: &WorkerLink, n: usize) {
        use std::os::fd::AsRawFd;
        for _ in 0..n {
            let fd = dev_null();
            match link.protocol {
                Protocol::Node => link
                    .writer
                    .try_send(&node::connection_line(0), &[fd.as_raw_fd()])
                    .expect("sent"),
                Protocol::Binary => {
                    let frame = protocol::frame(&ToWorker::Connections {
                        listener: 0,
                        count: 1,
                    })
                    .expect("frame");
                    link.writer
                        .try_send(&frame, &[fd.as_raw_fd()])
                        .expect("sent");
                }
            }
            link.dispatched.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn node_msg(link: &Arc<WorkerLink>, ctx: &LinkContext, w: &mut Watch, msg: FromNode) {
        from_node(link, ctx, w, msg).expect("handled");
    }

    fn node_beat(capacity: Option<u32>) -> FromNode {
        FromNode::Heartbeat {
            active: 0,
            capacity,
        }
    }

    fn accepted(n: usize) -> Vec<super::super::dispatch::Accepted> {
        (0..n)
            .map(|_| super::super::dispatch::Accepted {
                fd: dev_null(),
                peer: None,
            })
            .collect()
    }

    /// `{"rr":"heartbeat","active":100,"capacity":0}` shut the window; a later heartbeat
    /// without `capacity` (optional) left it shut for good: the worker stayed in
    /// rotation, heartbeating, and got no connection again.
    #[tokio::test]
    async fn a_heartbeat_without_capacity_reopens_the_window_a_capacity_of_0_shut() {
        let (link, _peer, ctx) = setup(Protocol::Node);
        let mut w = watch();
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        assert_eq!(link.budget(), NODE_WINDOW);
        node_msg(&link, &ctx, &mut w, node_beat(Some(0)));
        assert_eq!(link.budget(), 0);
        node_msg(&link, &ctx, &mut w, node_beat(None));
        assert_eq!(link.budget(), NODE_WINDOW, "the sliding window again");
        // ... and ACKs slide it again.
        send_connections(&link, 3);
        node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        assert_eq!(link.budget(), NODE_WINDOW - 2);
    }

    /// Each ACK raised the limit by one: `capacity: 2` meant 2 un-ACKed at a time, not
    /// 2 more connections as in the binary dialect.
    #[tokio::test]
    async fn a_node_capacity_bounds_connections_as_a_binary_one_does() {
        let (link, _peer, ctx) = setup(Protocol::Node);
        let mut w = watch();
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        node_msg(&link, &ctx, &mut w, node_beat(Some(2)));
        assert_eq!(link.budget(), 2);
        send_connections(&link, 2);
        node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        assert_eq!(
            link.budget(),
            0,
            "the 2 are taken; the next heartbeat says more"
        );
        assert_eq!(link.unconfirmed(), 0);
        node_msg(&link, &ctx, &mut w, node_beat(Some(1)));
        assert_eq!(link.budget(), 1);
        // Never more than the sliding window.
        node_msg(&link, &ctx, &mut w, node_beat(Some(100_000)));
        assert_eq!(link.budget(), NODE_WINDOW);
    }

    /// Regression: with a capacity in force an ACK moved only `confirmed`, so a worker
    /// announcing `capacity: 1000` every second got at most 128 connections per
    /// heartbeat interval (a pool of 4 topped out near 512 connections a second).
    #[tokio::test]
    async fn acks_slide_the_node_window_within_the_heartbeats_capacity() {
        let (link, peer, ctx) = setup(Protocol::Node);
        // The worker's end reads the lines (and closes their descriptors), then ACKs.
        let (mut worker, _) = channel::split(channel::from_std(peer).expect("tokio"));
        let mut w = watch();
        let mut ack = async |n: u64, w: &mut Watch| {
            for _ in 0..n {
                let line = tokio::time::timeout(Duration::from_secs(10), worker.recv_line(1024))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(line.is_some());
                node_msg(&link, &ctx, w, FromNode::HandleAck);
            }
        };
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        node_msg(&link, &ctx, &mut w, node_beat(Some(1000)));
        assert_eq!(link.budget(), NODE_WINDOW);
        send_connections(&link, 128);
        assert_eq!(link.budget(), 0, "128 un-ACKed at most");
        ack(128, &mut w).await;
        assert!(link.budget() > 0, "the ACKs made room");
        assert_eq!(link.budget(), NODE_WINDOW);
        // Up to the heartbeat's 1000 in all, not beyond until the next one.
        for _ in 0..6 {
            send_connections(&link, 128);
            ack(128, &mut w).await;
        }
        assert_eq!(link.budget(), 1000 - 7 * 128);
        send_connections(&link, 1000 - 7 * 128);
        ack(1000 - 7 * 128, &mut w).await;
        assert_eq!(link.unconfirmed(), 0);
        assert_eq!(link.budget(), 0, "the 1000 announced are used up");
        node_msg(&link, &ctx, &mut w, node_beat(Some(3)));
        assert_eq!(link.budget(), 3, "the next heartbeat says more");
    }

    /// Node queues every later message (heartbeats, suicide, the application's) until
    /// its handle is acknowledged: a NODE_HANDLE line the master dropped unanswered
    /// silenced the worker until it was killed for a heartbeat timeout.
    #[tokio::test]
    async fn a_dropped_handle_line_from_node_is_still_acknowledged() {
        use sendfd::SendWithFd;
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let (link, mut peer, ctx, _rx, mut reader) = setup_with_reader(Protocol::Node);
        let mut w = watch();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let ack = node::handle_ack_line();
        let mut next_line = async |reader: &mut ChannelReader| {
            tokio::time::timeout(Duration::from_secs(10), next(&link, reader, &ctx, &mut w))
                .await
                .expect("in time")
                .expect("the channel stays")
        };
        let send = |peer: &std::os::unix::net::UnixStream, line: &[u8], fd: bool| {
            let fds = if fd { vec![dev_null()] } else { Vec::new() };
            let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let n = peer.send_with_fd(line, &raw).expect("send");
            assert_eq!(n, line.len());
        };
        let handle = |msg: &str| {
            format!(r#"{{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{msg}}}"#).into_bytes()
        };
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        // Too long, with its descriptor.
        let long = handle(&format!("\"{}\"", "x".repeat(node::MAX_LINE)));
        send(&peer, &[&long[..], b"\n"].concat(), true);
        assert!(next_line(&mut reader).await);
        let mut got = vec![0; ack.len()];
        peer.read_exact(&mut got)
            .expect("ACK for the line too long");
        assert_eq!(got, ack);
        // Nested too deep to read, without a descriptor (it is Node's handle message).
        send(&peer, &[&handle(&deep)[..], b"\n"].concat(), false);
        assert!(next_line(&mut reader).await);
        peer.read_exact(&mut got)
            .expect("ACK for the line nested too deep");
        assert_eq!(got, ack);
        // Unreadable, with a descriptor.
        send(&peer, format!("{deep}\n").as_bytes(), true);
        assert!(next_line(&mut reader).await);
        peer.read_exact(&mut got)
            .expect("ACK for the line that came with a handle");
        assert_eq!(got, ack);
        // An application's message too long, or unreadable: no ACK.
        let user = format!("{{\"a\":\"{}\"}}\n", "y".repeat(node::MAX_LINE));
        peer.write_all(user.as_bytes()).expect("write");
        peer.write_all(format!("{deep}\n").as_bytes())
            .expect("write");
        peer.write_all(b"{\"rr\":\"ready\"}\n").expect("write");
        for _ in 0..3 {
            assert!(next_line(&mut reader).await);
        }
        assert_eq!(link.version(), 1, "read up to the Ready");
        peer.set_nonblocking(true).expect("nonblocking");
        let mut one = [0u8; 1];
        assert_eq!(
            peer.read(&mut one)
                .map_err(|e| e.kind())
                .expect_err("no more"),
            std::io::ErrorKind::WouldBlock
        );
        assert_eq!(link.unreadable.load(Ordering::Relaxed), 5);
    }

    /// Node keeps one received handle across reads: a connection line cut by a 64 KiB
    /// read (after a long run of other lines) got the descriptor of the next line when
    /// that came in the read that completed it. The first client hung; the second line
    /// was NACKed.
    #[tokio::test]
    async fn a_handle_after_a_long_run_of_lines_goes_alone_until_its_ack() {
        let (link, _peer, mut ctx) = setup(Protocol::Node);
        let d =
            super::super::dispatch::Dispatcher::new(super::super::dispatch::Balance::RoundRobin);
        ctx.dispatcher = Arc::downgrade(&d);
        let mut w = watch();
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        // A capacity in force: the window stays within its 100; the ACK below clears
        // the guard.
        node_msg(&link, &ctx, &mut w, node_beat(Some(100)));
        d.add(Arc::clone(&link));
        // Back to back after short runs: no limit.
        let mut batch = accepted(3);
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        for _ in 0..3 {
            node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        }
        // More than 32 KiB of application messages, then two connections.
        let line = node::user_line(format!("\"{}\"", "m".repeat(1021)).as_bytes()).expect("line");
        assert_eq!(line.len(), 1024);
        for _ in 0..33 {
            link.writer.try_send(&line, &[]).expect("sent");
        }
        assert_eq!(link.budget(), 1);
        let mut wake = d.subscribe();
        wake.borrow_and_update();
        let mut batch = accepted(2);
        d.dispatch(0, &mut batch);
        assert_eq!(batch.len(), 1, "one handle goes before the ACK");
        assert_eq!(link.dispatched.load(Ordering::Relaxed), 4);
        assert_eq!(link.budget(), 0);
        wake.borrow_and_update();
        d.dispatch(0, &mut batch);
        assert_eq!(batch.len(), 1, "still held");
        node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        assert!(wake.has_changed().expect("open"), "the ACK wakes dispatch");
        assert_eq!(link.budget(), 96);
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        assert_eq!(link.dispatched.load(Ordering::Relaxed), 5);
        // The guard's holds are neither a shut window nor a full channel.
        assert_eq!(d.stats.window_full.load(Ordering::Relaxed), 0);
        assert_eq!(d.stats.channel_full.load(Ordering::Relaxed), 0);
        assert!(
            !link.watching.load(Ordering::Relaxed),
            "no writability watch"
        );
    }

    /// An ACK with nothing owed raised the window past 128 and hid a stall; a binary
    /// count above what was sent opened the window without bound.
    #[tokio::test]
    async fn acknowledgements_count_for_no_more_than_was_sent() {
        let (link, _peer, ctx) = setup(Protocol::Node);
        let mut w = watch();
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        for _ in 0..10 {
            node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
            node_msg(&link, &ctx, &mut w, FromNode::HandleNack);
        }
        assert_eq!(link.limit.load(Ordering::Relaxed), NODE_WINDOW);
        assert_eq!(link.lost.load(Ordering::Relaxed), 0);
        send_connections(&link, 2);
        for _ in 0..10 {
            node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        }
        assert_eq!(link.budget(), NODE_WINDOW);
        send_connections(&link, 1);
        assert_eq!(link.unconfirmed(), 1, "the third is not taken");

        let (link, _peer, ctx) = setup(Protocol::Binary);
        let ready = ToMaster::Ready { pid: 1, version: 2 };
        binary(&link, &ctx, &mut w, ready).expect("ready");
        send_connections(&link, 5);
        let ack = ToMaster::Ack {
            received: 1000,
            lost: 0,
            capacity: 10,
        };
        binary(&link, &ctx, &mut w, ack).expect("ack");
        assert_eq!(link.budget(), 10);
        let beat = ToMaster::Heartbeat {
            active: 0,
            served: 1000,
        };
        binary(&link, &ctx, &mut w, beat).expect("heartbeat");
        send_connections(&link, 3);
        assert_eq!(link.unconfirmed(), 3);
    }

    /// A heartbeat's `active` does not count the connections still on the worker's
    /// channel; least-connections took them for gone and sent a burst.
    #[tokio::test]
    async fn a_heartbeat_keeps_what_is_in_flight_in_the_load() {
        let (link, _peer, ctx) = setup(Protocol::Binary);
        let mut w = watch();
        let ready = ToMaster::Ready { pid: 1, version: 2 };
        binary(&link, &ctx, &mut w, ready).expect("ready");
        let d = super::super::dispatch::Dispatcher::new(
            super::super::dispatch::Balance::LeastConnections,
        );
        d.add(Arc::clone(&link));
        let mut batch = accepted(10);
        d.dispatch(0, &mut batch);
        assert!(batch.is_empty());
        let beat = |active, served| ToMaster::Heartbeat { active, served };
        binary(&link, &ctx, &mut w, beat(0, 0)).expect("heartbeat");
        assert_eq!(link.load(), Some(10));
        binary(&link, &ctx, &mut w, beat(4, 10)).expect("heartbeat");
        assert_eq!(link.load(), Some(4));

        let (link, _peer, ctx) = setup(Protocol::Node);
        node_msg(&link, &ctx, &mut w, FromNode::Ready);
        send_connections(&link, 3);
        node_msg(&link, &ctx, &mut w, FromNode::HandleAck);
        node_msg(&link, &ctx, &mut w, node_beat(None));
        assert_eq!(link.load(), Some(2));
    }

    /// Regression: dispatch raised `dispatched` per send and added the batch to the
    /// load estimate only after the whole group: a heartbeat recorded in between (by
    /// the link task, on another thread) took the batch as in flight, and the later
    /// add counted it a second time until the next heartbeat.
    #[tokio::test]
    async fn a_heartbeat_between_a_send_and_its_count_does_not_count_it_twice() {
        let (link, _peer, _) = setup(Protocol::Binary);
        // What `send_group` records per send; then a heartbeat, before dispatch is done
        // with the group.
        link.dispatched.fetch_add(5, Ordering::Relaxed);
        link.heartbeat(0);
        // Dispatch records nothing more for the group: the 5 in flight count once.
        assert_eq!(link.load(), Some(5));
    }

    #[tokio::test]
    async fn an_ack_before_ready_is_named_so() {
        let (link, _peer, ctx) = setup(Protocol::Binary);
        let ack = ToMaster::Ack {
            received: 0,
            lost: 0,
            capacity: 1,
        };
        let e = binary(&link, &ctx, &mut watch(), ack).expect_err("a violation");
        assert_eq!(e, "Ack before Ready");
    }

    /// Inputs queued so far.
    fn drain_inputs(rx: &mut mpsc::UnboundedReceiver<Input>) -> Vec<Input> {
        let mut got = Vec::new();
        while let Ok(input) = rx.try_recv() {
            got.push(input);
        }
        got
    }

    fn watch() -> Watch {
        Watch::new()
    }

    #[tokio::test]
    async fn a_pong_keeps_the_load_estimate_and_counts_against_the_flood_limit() {
        let (link, _peer, ctx) = setup(Protocol::Binary);
        let mut watch = watch();
        let beat = ToMaster::Heartbeat {
            active: 3,
            served: 0,
        };
        binary(&link, &ctx, &mut watch, beat).expect("heartbeat");
        link.dispatched.store(5, Ordering::Relaxed);
        assert_eq!(link.load(), Some(8));
        binary(&link, &ctx, &mut watch, ToMaster::Pong).expect("pong");
        assert_eq!(link.load(), Some(8), "not reset");
        assert_eq!(link.active.load(Ordering::Relaxed), 3);
        // Two so far; pongs count towards the 50 per interval.
        for _ in 2..MAX_BEATS_PER_INTERVAL {
            binary(&link, &ctx, &mut watch, ToMaster::Pong).expect("pong");
        }
        assert!(binary(&link, &ctx, &mut watch, ToMaster::Pong).is_err());
    }

    #[tokio::test]
    async fn a_node_worker_reports_a_load_from_its_first_heartbeat() {
        let (link, _peer, ctx) = setup(Protocol::Node);
        assert_eq!(link.load(), None);
        link.dispatched.store(7, Ordering::Relaxed);
        assert_eq!(link.load(), None, "what was sent is no load");
        from_node(
            &link,
            &ctx,
            &mut watch(),
            FromNode::Heartbeat {
                active: 2,
                capacity: None,
            },
        )
        .expect("heartbeat");
        // 2 open, and the 7 not ACKed are still on its channel.
        assert_eq!(link.load(), Some(9));
        link.dispatched.store(8, Ordering::Relaxed);
        assert_eq!(link.load(), Some(10));
        // A binary worker must heartbeat: counted from the start.
        let (binary_link, _peer, _) = setup(Protocol::Binary);
        binary_link.dispatched.store(4, Ordering::Relaxed);
        assert_eq!(binary_link.load(), Some(4));
    }

    /// A worker that repeats `Suicide` (up to 64 KiB each) used to grow the driver's
    /// unbounded queue by one input per frame.
    #[tokio::test]
    async fn only_the_first_suicide_reaches_the_supervisor() {
        let (link, _peer, ctx, mut rx) = setup_with_inputs(Protocol::Binary);
        let mut w = watch();
        for i in 0..10 {
            let reason = format!("bye {i}");
            binary(&link, &ctx, &mut w, ToMaster::Suicide { reason }).expect("suicide");
        }
        assert_eq!(
            drain_inputs(&mut rx),
            [Input::Suicide {
                id: 1,
                reason: "bye 0".into()
            }]
        );

        let (link, _peer, ctx, mut rx) = setup_with_inputs(Protocol::Node);
        let mut w = watch();
        for i in 0..10 {
            let reason = format!("bye {i}");
            from_node(&link, &ctx, &mut w, FromNode::Suicide { reason }).expect("suicide");
        }
        assert_eq!(drain_inputs(&mut rx).len(), 1);
    }

    /// A `Pong` answers the Ping before it: progress made meanwhile must not let a
    /// later Ping's mark be confirmed by it (descriptors the worker has not read).
    #[tokio::test]
    async fn a_late_pong_confirms_only_its_own_ping() {
        let (link, _peer, mut ctx) = setup(Protocol::Binary);
        ctx.heartbeat_interval = Duration::from_millis(10);
        let mut w = watch();
        link.version.store(2, Ordering::Relaxed);
        let long_ago = || Instant::now().checked_sub(Duration::from_millis(15));
        link.dispatched.store(5, Ordering::Relaxed);
        w.since = long_ago();
        stall_check(&link, &ctx, &mut w);
        assert_eq!(w.ping_mark, Some(5), "pinged");
        // A heartbeat confirms those 5; 5 more go out, and wait long enough to be
        // pinged about.
        let beat = ToMaster::Heartbeat {
            active: 0,
            served: 5,
        };
        binary(&link, &ctx, &mut w, beat).expect("heartbeat");
        link.dispatched.store(10, Ordering::Relaxed);
        w.since = long_ago();
        stall_check(&link, &ctx, &mut w);
        // The Pong to the first Ping: the worker had read 5 when it answered.
        binary(&link, &ctx, &mut w, ToMaster::Pong).expect("pong");
        assert_eq!(link.unconfirmed(), 5, "the later 5 are not confirmed");
    }

    #[tokio::test]
    async fn a_window_that_grew_before_dispatch_blocked_is_seen_by_it() {
        let (link, _peer, _) = setup(Protocol::Binary);
        let d = Dispatcher::new(super::super::dispatch::Balance::RoundRobin);
        let weak = Arc::downgrade(&d);
        let mut wake = d.subscribe();
        wake.borrow_and_update();
        // No room, nothing since: dispatch waits; a later Ack wakes it.
        assert!(!link.wait_for_room());
        link.set_limit(4, &weak);
        assert!(wake.has_changed().expect("open"), "woken");
        assert!(!link.blocked.load(Ordering::Relaxed));
        // Room arrived first: dispatch sees it itself.
        link.dispatched.store(4, Ordering::Relaxed);
        link.set_limit(6, &weak);
        assert!(link.wait_for_room());
    }
}
