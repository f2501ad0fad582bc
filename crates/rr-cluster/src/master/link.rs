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
//! is killed and replaced (`Unresponsive`).

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
/// Un-ACKed handles in flight to a Node.js worker, at most.
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
    /// Connections sent (successfully) since the last heartbeat.
    pub(crate) since_heartbeat: AtomicU32,
    /// `active + since_heartbeat` is a load estimate: a binary worker (it must
    /// heartbeat), or a Node.js worker once it sent a heartbeat. A Node.js worker
    /// without the package never does; its `since_heartbeat` only grows.
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
            since_heartbeat: AtomicU32::new(0),
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

    /// Records a heartbeat's count of open connections.
    pub(crate) fn heartbeat(&self, active: u32) {
        self.active.store(active, Ordering::Relaxed);
        self.since_heartbeat.store(0, Ordering::Relaxed);
        self.reports_load.store(true, Ordering::Relaxed);
    }

    /// Open connections, as least-connections balancing sees them: the last
    /// heartbeat's count plus what was sent since. `None` for a worker that never
    /// reported one (a Node.js worker without the package, or with it before its first
    /// heartbeat): what was sent to it is no load figure, since nothing ever takes
    /// off what it closed. Dispatch treats it as loaded as the least-loaded worker
    /// that does report, taking turns with it.
    pub(crate) fn load(&self) -> Option<u32> {
        self.reports_load.load(Ordering::Relaxed).then(|| {
            self.active
                .load(Ordering::Relaxed)
                .saturating_add(self.since_heartbeat.load(Ordering::Relaxed))
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
    pub(crate) fn wait_for_room(&self) -> bool {
        self.blocked.store(true, Ordering::SeqCst);
        self.limit.load(Ordering::SeqCst) > self.dispatched.load(Ordering::Relaxed)
    }

    /// How many more descriptors may be sent now.
    pub(crate) fn budget(&self) -> u64 {
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

    /// Sets the window; wakes dispatch if it was waiting for room here. `SeqCst`: see
    /// [`WorkerLink::wait_for_room`] (a swap costs the same as with `AcqRel` on x86
    /// and on ARMv8).
    fn set_limit(&self, limit: u64, dispatcher: &Weak<Dispatcher>) {
        let old = self.limit.swap(limit, Ordering::SeqCst);
        if limit > old && self.blocked.swap(false, Ordering::SeqCst) {
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
    let mut watch = Watch {
        since: None,
        ping_mark: None,
        suicide_sent: false,
        stalled: false,
        reported_unresponsive: false,
        beats: 0,
        window_start: Instant::now(),
    };
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
            beat(link, ctx, watch, Some(active))?;
            progress(link, ctx, watch, served);
        }
        ToMaster::Ack {
            received,
            lost,
            capacity,
        } if version >= 2 => {
            link.lost.store(lost, Ordering::Relaxed);
            progress(link, ctx, watch, received);
            let room = u64::from(capacity).min(WINDOW);
            link.set_limit(received.saturating_add(room), &ctx.dispatcher);
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
            link.set_limit(NODE_WINDOW, &ctx.dispatcher);
            // A Node.js worker without the package never heartbeats: it is held to
            // heartbeats only once it sends one.
            let _ = ctx.inputs.send(Input::Ready {
                id,
                heartbeats: false,
            });
        }
        FromNode::Heartbeat { active, capacity } => {
            beat(link, ctx, watch, Some(active))?;
            if let Some(capacity) = capacity {
                let base = link.confirmed.load(Ordering::Relaxed);
                let room = u64::from(capacity).min(NODE_WINDOW);
                link.set_limit(base.saturating_add(room), &ctx.dispatcher);
            }
        }
        FromNode::HandleAck | FromNode::HandleNack => {
            if matches!(msg, FromNode::HandleNack) {
                link.lost.fetch_add(1, Ordering::Relaxed);
            }
            let confirmed = link.confirmed.load(Ordering::Relaxed) + 1;
            progress(link, ctx, watch, confirmed);
            if link.version() != 0 {
                let room = link.limit.load(Ordering::Relaxed) + 1;
                link.set_limit(room, &ctx.dispatcher);
            }
        }
        FromNode::Suicide { reason } => suicide(ctx, watch, id, reason),
        FromNode::User(payload) => ctx.messages.push(WorkerMessage {
            slot: link.slot,
            id,
            payload,
        }),
        FromNode::Handle => {
            // Node holds every later message until its handle is acknowledged; the
            // descriptor itself was closed on arrival.
            let ack = node::handle_ack_line().to_vec();
            if link.writer.try_send(&ack, &[]).is_err() {
                link.post(Outgoing::Bytes(ack, Vec::new()));
            }
        }
        FromNode::Ignored => {}
    }
    Ok(())
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
        if link.writer.send(&bytes, &raw).await.is_err() {
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
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (_, writer) = channel::split(channel::from_std(a).expect("tokio"));
        let link = Arc::new(WorkerLink::new(1, 0, protocol, writer));
        let (inputs, rx) = mpsc::unbounded_channel();
        let ctx = LinkContext {
            inputs,
            messages: Arc::new(MessageQueue::new(16)),
            dispatcher: Weak::new(),
            heartbeat_interval: Duration::from_secs(3600),
            heartbeat_timeout: None,
        };
        (link, b, ctx, rx)
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
        Watch {
            since: None,
            ping_mark: None,
            suicide_sent: false,
            stalled: false,
            reported_unresponsive: false,
            beats: 0,
            window_start: Instant::now(),
        }
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
        link.since_heartbeat.store(5, Ordering::Relaxed);
        binary(&link, &ctx, &mut watch, ToMaster::Pong).expect("pong");
        assert_eq!(link.since_heartbeat.load(Ordering::Relaxed), 5, "not reset");
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
        link.since_heartbeat.store(7, Ordering::Relaxed);
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
        assert_eq!(link.load(), Some(2));
        link.since_heartbeat.store(1, Ordering::Relaxed);
        assert_eq!(link.load(), Some(3));
        // A binary worker must heartbeat: counted from the start.
        let (binary_link, _peer, _) = setup(Protocol::Binary);
        binary_link.since_heartbeat.store(4, Ordering::Relaxed);
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
