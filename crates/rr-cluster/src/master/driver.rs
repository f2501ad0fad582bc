//! The one task that runs the supervisor: it feeds it inputs (worker messages, exits,
//! timers, commands) and carries out the actions it decides. Status and metrics live
//! in `status`, reloads in `reload`, each worker's channel in `link`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::builder::Settings;
use super::command::{Command, Outcome, Refusal, ScaleTo, StopMode};
use super::dispatch::{Balance, Dispatcher};
use super::link::{self, LinkContext, MessageQueue, Outgoing, WorkerLink};
use super::listen::{self, LocalAddr};
use super::output::{self, OutputSink, Stream};
use super::procstat::{self, Sample};
use super::spawn::{Job, Report, Spawner};
use super::supervisor::{Action, Input, ReloadStart, Supervisor};
use super::{MasterError, MasterHandle, MasterSignal, control};
use crate::channel;
use crate::event::Event;
use crate::node;
use crate::protocol::{self, HELLO_VERSION, Hello, ListenerInfo, Protocol, ToWorker};
use crate::sys;

/// How often CPU and memory are sampled, and recycle limits checked.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// A worker still starting after this long is checked for common misconfigurations.
const HINT_AFTER: Duration = Duration::from_secs(2);

/// The last two CPU/memory samples of a process.
pub(crate) type Samples = (Option<(Instant, Sample)>, Option<(Instant, Sample)>);

/// What the workers of one slot that are gone counted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GoneTotals {
    pub(crate) dispatched: u64,
    pub(crate) lost: u64,
    /// CPU seconds at each one's last sample.
    pub(crate) cpu_seconds: f64,
}

/// Someone waiting for a reload's end: its generation (`None` until a queued reload
/// starts) and where to answer.
pub(crate) type ReloadWaiter = (Option<u64>, oneshot::Sender<Result<Outcome, Refusal>>);

/// One worker process as the driver knows it.
#[derive(Debug)]
pub(crate) struct WorkerProc {
    pub(crate) link: Arc<WorkerLink>,
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) process: Option<sys::ProcessHandle>,
    pub(crate) spawned_at: Instant,
    /// The last two CPU/memory samples.
    pub(crate) samples: Samples,
    /// `dispatched` at the previous sample, for connections per second.
    pub(crate) dispatched_before: (Instant, u64),
    pub(crate) connections_per_sec: f64,
    /// This worker's `max_requests` (with its jitter).
    pub(crate) max_requests: Option<u64>,
    pub(crate) recycle_asked: bool,
    pub(crate) hinted: bool,
    /// Shared balancing: how many of the listeners the worker was handed, once in
    /// rotation (`None` before); the rest are handed at the next sample.
    pub(crate) listeners_handed: Option<usize>,
    /// In rotation (between `Rotate on` and `Rotate off`).
    pub(crate) in_rotation: bool,
    /// Cancelled when the process exited: its output is read for a little longer.
    pub(crate) exited: CancellationToken,
}

/// Binds everything, starts the workers and the driver task.
pub(crate) async fn start(
    settings: Settings,
    events: broadcast::Sender<Event>,
) -> Result<MasterHandle, MasterError> {
    settings.command.check().map_err(MasterError::Command)?;
    let listeners = listen::bind_all(&settings.listen)
        .map_err(|(addr, source)| MasterError::Bind { addr, source })?;
    let addrs: Vec<LocalAddr> = listeners.iter().map(|l| l.local_addr().clone()).collect();
    let infos: Vec<ListenerInfo> = listeners.iter().map(listen::Listener::info).collect();

    let (commands_tx, commands) = mpsc::channel(64);
    let control_stop = CancellationToken::new();
    // Cancelled once the control socket's file is gone (at once without one).
    let control_closed = CancellationToken::new();
    let tasks = TaskTracker::new();
    if settings.control.is_none() {
        control_closed.cancel();
    }
    if let Some(path) = &settings.control {
        let listener = control::bind(path).map_err(|source| MasterError::Control {
            path: path.clone(),
            source,
        })?;
        tasks.spawn(control::serve(
            listener,
            path.clone(),
            commands_tx.clone(),
            control_stop.clone(),
            control_closed.clone(),
            tasks.clone(),
        ));
    }
    let (output, writer_done) = if settings.output.capture {
        let (sink, done) = OutputSink::start(
            settings.output.format,
            settings.output.stdout.clone(),
            settings.output.stderr.clone(),
        )
        .map_err(MasterError::Start)?;
        (Some(sink), Some(done))
    } else {
        (None, None)
    };

    let (reports_tx, reports) = mpsc::unbounded_channel();
    let spawner = Spawner::start(reports_tx).map_err(MasterError::Start)?;
    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let dispatcher = Dispatcher::new(settings.balance);
    let accept_stop = CancellationToken::new();
    let (paused_tx, paused) = watch::channel(false);
    let mut shared = Vec::new();
    let mut accept_loops = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        tracing::info!(listen = %listener.local_addr(), balance = %settings.balance, "listening");
        if settings.balance == Balance::Shared {
            // Workers accept themselves; the master keeps the socket to hand out.
            shared.push(listener.into_shared());
            continue;
        }
        accept_loops.push(tasks.spawn(listen::accept_loop(
            listener,
            index as u16,
            Arc::clone(&dispatcher),
            accept_stop.clone(),
            paused.clone(),
        )));
    }
    if settings.command.get_protocol() == Protocol::Binary && looks_like_node(&settings) {
        tracing::warn!(
            "the worker command looks like a Node.js program, but the pool speaks the binary \
             protocol: a Node.js app needs --worker-protocol node (or [worker] protocol = \"node\")"
        );
    }

    let (done_tx, done) = watch::channel(None);
    let messages = Arc::new(MessageQueue::new(settings.message_queue));
    let mut sm = Supervisor::new(settings.policy.clone(), settings.workers);
    sm.start(Instant::now());
    let settings = Arc::new(settings);
    let driver = Driver {
        sm,
        listeners: infos,
        shared,
        addrs: addrs.iter().map(ToString::to_string).collect(),
        workers: HashMap::new(),
        dispatcher,
        inputs_tx,
        inputs,
        reports,
        commands,
        spawner: Some(spawner),
        events: events.clone(),
        messages: Arc::clone(&messages),
        output,
        accept_stop,
        accept_loops,
        deferred: Vec::new(),
        stopping_accept: false,
        control_stop,
        control_closed,
        paused: paused_tx,
        tasks: tasks.clone(),
        started: Instant::now(),
        configured_workers: settings.workers,
        generations: BTreeMap::from([(0, Arc::clone(&settings))]),
        in_effect: 0,
        gone: BTreeMap::new(),
        reload_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        master_samples: (None, None),
        recycles: BTreeMap::new(),
        accepted_before: (Instant::now(), 0),
        connections_per_sec: 0.0,
    };
    let control = driver.settings().control.clone();
    tokio::spawn(async move {
        let code = driver.run().await;
        tasks.close();
        tasks.wait().await;
        // Every worker's output read (the driver and the readers dropped their ends of
        // the queue): what is queued is written before the master says it is done.
        if let Some(writer) = writer_done {
            writer.wait(output::FLUSH_TIMEOUT).await;
        }
        let _ = done_tx.send(Some(code));
    });
    Ok(MasterHandle {
        commands: commands_tx,
        events,
        messages,
        addrs: Arc::new(addrs),
        done,
        control,
        forwarding: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    })
}

fn looks_like_node(settings: &Settings) -> bool {
    let program = std::path::Path::new(settings.command.program());
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "node"
        || name == "nodejs"
        || name == "npm"
        || settings
            .command
            .get_args()
            .first()
            .is_some_and(|a| a.to_string_lossy().ends_with(".js"))
}

pub(crate) struct Driver {
    pub(crate) sm: Supervisor,
    listeners: Vec<ListenerInfo>,
    /// The listeners themselves, in shared balancing (handed to each worker).
    shared: Vec<listen::SharedListener>,
    pub(crate) addrs: Vec<String>,
    pub(crate) workers: HashMap<u64, WorkerProc>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs: mpsc::UnboundedReceiver<Input>,
    reports: mpsc::UnboundedReceiver<Report>,
    commands: mpsc::Receiver<Command>,
    spawner: Option<Spawner>,
    events: broadcast::Sender<Event>,
    pub(crate) messages: Arc<MessageQueue>,
    pub(crate) output: Option<OutputSink>,
    accept_stop: CancellationToken,
    /// The accept loops: a stop drains the workers only once these have ended (they
    /// dispatch what they hold first).
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    /// Actions that wait for the accept loops to end.
    deferred: Vec<Action>,
    /// The accept loops were told to stop: actions wait until they have ended.
    stopping_accept: bool,
    control_stop: CancellationToken,
    control_closed: CancellationToken,
    paused: watch::Sender<bool>,
    tasks: TaskTracker,
    pub(crate) started: Instant,
    /// `workers` of the configuration last read (a reload that leaves it unchanged
    /// keeps a runtime scale).
    pub(crate) configured_workers: usize,
    /// The configuration of each generation still in use.
    pub(crate) generations: BTreeMap<u64, Arc<Settings>>,
    /// The generation whose balance and recycle settings apply.
    in_effect: u64,
    /// Per slot, what workers that are gone counted (for metrics: counters that do
    /// not go down when a worker exits).
    pub(crate) gone: BTreeMap<u32, GoneTotals>,
    /// Waiting for a reload's end: `None` until the queued reload starts.
    pub(crate) reload_waiters: Vec<ReloadWaiter>,
    stop_waiters: Vec<oneshot::Sender<i32>>,
    pub(crate) master_samples: Samples,
    /// Recycles done, by limit.
    pub(crate) recycles: BTreeMap<String, u64>,
    pub(crate) accepted_before: (Instant, u64),
    pub(crate) connections_per_sec: f64,
}

impl Driver {
    pub(crate) fn events_sender(&self) -> &broadcast::Sender<Event> {
        &self.events
    }

    /// The configuration in effect.
    pub(crate) fn settings(&self) -> &Arc<Settings> {
        self.generations
            .get(&self.in_effect)
            .or_else(|| self.generations.values().next_back())
            .expect("the first configuration is always kept")
    }

    async fn run(mut self) -> i32 {
        let mut sample = tokio::time::interval(SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(code) = self.execute() {
                self.shutdown(code);
                return code;
            }
            let deadline = self.sm.next_deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let awaiting = self.awaiting_accept_loops();
            let accept_loops_end = async {
                for handle in &mut self.accept_loops {
                    if !handle.is_finished() {
                        let _ = handle.await;
                    }
                }
            };
            tokio::select! {
                biased;
                () = accept_loops_end, if awaiting => {}
                Some(report) = self.reports.recv() => self.report(report),
                Some(input) = self.inputs.recv() => self.input(input),
                Some(cmd) = self.commands.recv() => self.command(cmd),
                () = self.dispatcher.recycle_due() => self.check_recycle(),
                () = timer => self.sm.tick(Instant::now()),
                _ = sample.tick() => {
                    self.sample();
                    self.check_recycle();
                }
            }
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Spawned {
                id,
                process,
                stdout,
                stderr,
            } => {
                let pid = process.pid();
                if let Some(w) = self.workers.get_mut(&id) {
                    if let Some(sink) = &self.output {
                        if let Some(out) = stdout {
                            let exited = w.exited.clone();
                            sink.capture(&self.tasks, out, w.slot, pid, Stream::Stdout, exited);
                        }
                        if let Some(err) = stderr {
                            let exited = w.exited.clone();
                            sink.capture(&self.tasks, err, w.slot, pid, Stream::Stderr, exited);
                        }
                    }
                    w.process = Some(process);
                }
                self.sm.handle(Instant::now(), Input::Spawned { id, pid });
            }
            Report::Input(input) => self.input(input),
        }
    }

    fn input(&mut self, input: Input) {
        match &input {
            Input::Exited { id, .. } | Input::SpawnFailed { id, .. } => {
                if let Some(w) = self.workers.remove(id) {
                    let gone = self.gone.entry(w.slot).or_default();
                    gone.dispatched += w.link.dispatched.load(Ordering::Relaxed);
                    gone.lost += w.link.lost.load(Ordering::Relaxed);
                    if let Some((_, s)) = w.samples.1 {
                        // As the status showed it last (rounded alike): the sum
                        // does not move when the worker leaves the status.
                        gone.cpu_seconds += super::status::round(s.cpu.as_secs_f64());
                    }
                    // No descendant keeps the master waiting on this channel (and none
                    // outlives the worker in its process group: the reaper saw to it).
                    w.link.shutdown();
                    w.exited.cancel();
                }
                self.forget_unused_generations();
            }
            Input::Heartbeat { id, .. } => {
                if let Some(w) = self.workers.get(id) {
                    w.link.heartbeat_queued.store(false, Ordering::Release);
                }
            }
            _ => {}
        }
        self.sm.handle(Instant::now(), input);
    }

    fn shutdown(&mut self, code: i32) {
        self.accept_stop.cancel();
        for w in self.workers.values() {
            w.link.shutdown();
            w.exited.cancel();
        }
        self.control_stop.cancel();
        // Answered once the control socket is gone: `stop --wait && rr-cluster run`
        // must not find it there.
        let waiters = std::mem::take(&mut self.stop_waiters);
        let closed = self.control_closed.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), closed.cancelled()).await;
            for waiter in waiters {
                let _ = waiter.send(code);
            }
        });
        // Ends the spawner thread (every child is gone by now).
        self.spawner = None;
    }

    /// The accept loops were told to stop and some have not ended yet; a stop at
    /// once (or one that turned into it) does not wait for them.
    fn awaiting_accept_loops(&self) -> bool {
        self.stopping_accept
            && !self.sm.stopping_now()
            && self.accept_loops.iter().any(|h| !h.is_finished())
    }

    /// Carries out the supervisor's actions; `Some(code)` when the master is done.
    fn execute(&mut self) -> Option<i32> {
        let mut exit = None;
        loop {
            if self.awaiting_accept_loops() {
                break; // the actions wait, in order, in `deferred` and the supervisor
            }
            self.stopping_accept = false;
            let actions = if self.deferred.is_empty() {
                self.sm.take_actions()
            } else {
                std::mem::take(&mut self.deferred)
            };
            if actions.is_empty() {
                break;
            }
            let mut actions = actions.into_iter();
            while let Some(action) = actions.next() {
                match action {
                    Action::Spawn {
                        slot,
                        id,
                        generation,
                    } => self.spawn(slot, id, generation),
                    Action::Rotate { id, on: true } => {
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.in_rotation = true;
                            if self.dispatcher.balance() == Balance::Shared {
                                let from = w.listeners_handed.unwrap_or(0);
                                w.listeners_handed =
                                    Some(hand_listeners(&self.shared, &w.link, from));
                            } else {
                                self.dispatcher.add(Arc::clone(&w.link));
                            }
                        }
                    }
                    Action::Rotate { id, on: false } => {
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.in_rotation = false;
                        }
                        self.dispatcher.remove(id);
                    }
                    Action::Drain { id, deadline } => {
                        if let Some(w) = self.workers.get(&id) {
                            w.link.post_drain(deadline);
                        }
                    }
                    Action::Kill { id } => {
                        if let Some(p) = self.workers.get(&id).and_then(|w| w.process.as_ref()) {
                            if let Err(e) = p.kill() {
                                tracing::error!(id, pid = p.pid(), error = %e, "cannot kill worker");
                            }
                        }
                    }
                    Action::Publish(event) => self.publish(event),
                    Action::StopAccepting => {
                        self.accept_stop.cancel();
                        // Shared balancing: the master's copies of the listening
                        // sockets close; each closes for good when the last worker
                        // closes its own, at its drain.
                        self.shared.clear();
                        self.stopping_accept = true;
                        if self.awaiting_accept_loops() {
                            // Sockets an accept loop holds go to workers still in
                            // rotation: what follows (their drain) waits for the loops.
                            // Events are told now.
                            let (events, rest): (Vec<Action>, Vec<Action>) =
                                actions.partition(|a| matches!(a, Action::Publish(_)));
                            for event in events {
                                if let Action::Publish(event) = event {
                                    self.publish(event);
                                }
                            }
                            self.deferred = rest;
                            break;
                        }
                    }
                    Action::Pause(on) => {
                        let _ = self.paused.send(on);
                    }
                    Action::StartQueuedReload => {
                        let started = self.reload(Instant::now());
                        if let Err(refusal) = started {
                            for (_, reply) in
                                self.reload_waiters.extract_if(.., |(g, _)| g.is_none())
                            {
                                let _ = reply.send(Err(refusal.clone()));
                            }
                        }
                    }
                    Action::Exit { code } => exit = Some(code),
                }
            }
        }
        self.apply_generation();
        exit
    }

    /// After a failed reload the previous configuration is in effect again.
    fn apply_generation(&mut self) {
        let g = self.sm.generation();
        if g != self.in_effect && self.generations.contains_key(&g) {
            self.in_effect = g;
            let balance = self.settings().balance;
            if balance != Balance::Shared {
                self.dispatcher.set_balance(balance);
            }
        }
    }

    fn forget_unused_generations(&mut self) {
        let in_use: std::collections::BTreeSet<u64> =
            self.workers.values().map(|w| w.generation).collect();
        // And the one a failed reload rolls back to, even with none of its workers
        // left (one died meanwhile): a rollback would otherwise start workers with the
        // failed configuration.
        let keep_from = self
            .in_effect
            .min(self.sm.generation())
            .min(self.sm.rollback_generation().unwrap_or(u64::MAX));
        self.generations
            .retain(|g, _| *g >= keep_from || in_use.contains(g));
    }

    fn spawn(&mut self, slot: u32, id: u64, generation: u64) {
        let Some(settings) = self
            .generations
            .get(&generation)
            .or_else(|| self.generations.get(&self.in_effect))
            .cloned()
        else {
            return self.spawn_failed(id, "no configuration for this generation".into());
        };
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => return self.spawn_failed(id, format!("socketpair: {e}")),
        };
        let stream = match channel::from_std(ours) {
            Ok(s) => s,
            Err(e) => return self.spawn_failed(id, format!("channel: {e}")),
        };
        let (reader, writer) = channel::split(stream);
        let protocol = settings.command.get_protocol();
        let link = Arc::new(WorkerLink::new(id, slot, protocol, writer));
        let policy = &settings.policy;
        let hello = Hello {
            version: HELLO_VERSION,
            worker_id: slot,
            generation,
            heartbeat_ms: u32::try_from(policy.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
            listeners: self.listeners.clone(),
        };
        let ctx = LinkContext {
            inputs: self.inputs_tx.clone(),
            messages: Arc::clone(&self.messages),
            dispatcher: Arc::downgrade(&self.dispatcher),
            heartbeat_interval: policy.heartbeat_interval,
            heartbeat_timeout: policy.heartbeat_timeout,
        };
        self.tasks
            .spawn(link::run(Arc::clone(&link), reader, hello, ctx));
        let recycle = &settings.recycle;
        let max_requests = recycle
            .max_requests
            .map(|n| n.saturating_add(jitter(recycle.max_requests_jitter, id)));
        if let Some(n) = max_requests {
            link.recycle_at.store(n, Ordering::Relaxed);
        }
        self.workers.insert(
            id,
            WorkerProc {
                link,
                slot,
                generation,
                process: None,
                spawned_at: Instant::now(),
                samples: (None, None),
                dispatched_before: (Instant::now(), 0),
                connections_per_sec: 0.0,
                max_requests,
                recycle_asked: false,
                hinted: false,
                listeners_handed: None,
                in_rotation: false,
                exited: CancellationToken::new(),
            },
        );
        let job = Job {
            id,
            slot,
            generation,
            command: settings.command.clone(),
            heartbeat_ms: u64::try_from(policy.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
            listeners_json: listeners_json(&self.listeners),
            capture: self.output.is_some(),
            channel: OwnedFd::from(theirs),
        };
        let refused = match &self.spawner {
            Some(spawner) => !spawner.spawn(job),
            None => true,
        };
        if refused {
            self.spawn_failed(id, "the spawner thread is gone".into());
        }
    }

    /// Logs an event, answers whoever waits for it, and hands it to every subscriber.
    fn publish(&mut self, event: Event) {
        event.log();
        match &event {
            Event::ReloadStarted { generation } => {
                for (g, _) in self.reload_waiters.iter_mut() {
                    g.get_or_insert(*generation);
                }
            }
            Event::ReloadFinished { generation } => {
                let g = *generation;
                for (_, reply) in self.reload_waiters.extract_if(.., |(w, _)| *w == Some(g)) {
                    let _ = reply.send(Ok(Outcome::Reloaded { generation: g }));
                }
            }
            Event::ReloadFailed {
                generation, reason, ..
            } => {
                let g = *generation;
                for (_, reply) in self.reload_waiters.extract_if(.., |(w, _)| *w == Some(g)) {
                    let _ = reply.send(Err(Refusal::ReloadFailed {
                        generation: g,
                        reason: reason.clone(),
                    }));
                }
            }
            Event::RecycleFailed { slot, .. } => {
                // The replacement failed: the worker it was to replace may be asked
                // again (the supervisor spaces the attempts out).
                let slot = *slot;
                let ids: Vec<u64> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.slot == slot && w.recycle_asked)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    if self.sm.is_current_ready(id) {
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.recycle_asked = false;
                        }
                    }
                }
            }
            Event::Recycled { reason, .. } => {
                let limit = reason.split(':').next().unwrap_or("other").to_owned();
                *self.recycles.entry(limit).or_default() += 1;
            }
            Event::WorkerReadyTimeout { id, .. } => {
                if let Some(hint) = self.misconfiguration_hint(*id) {
                    tracing::warn!("{hint}");
                }
            }
            _ => {}
        }
        let _ = self.events.send(event);
    }

    fn spawn_failed(&mut self, id: u64, error: String) {
        let _ = self.inputs_tx.send(Input::SpawnFailed { id, error });
    }

    fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Metrics(reply) => {
                let _ = reply.send(self.metrics());
            }
            Command::Reload { wait, reply } => match self.reload(now) {
                Ok(Outcome::Reloading { generation }) if wait => {
                    self.reload_waiters.push((Some(generation), reply));
                }
                Ok(Outcome::ReloadQueued) if wait => self.reload_waiters.push((None, reply)),
                other => {
                    let _ = reply.send(other);
                }
            },
            Command::Scale { to, reply } => {
                let _ = reply.send(self.scale(now, to));
            }
            Command::Stop { mode, wait } => {
                if let Some(w) = wait {
                    self.stop_waiters.push(w);
                }
                self.sm.stop(now, mode == StopMode::Graceful);
            }
            Command::Send {
                slot,
                payload,
                reply,
            } => {
                let _ = reply.send(self.send(slot, &payload));
            }
            Command::Signal(sig) => self.signal(now, sig),
        }
    }

    fn send(&self, slot: Option<u32>, payload: &[u8]) -> Result<usize, Refusal> {
        let mut sent = 0;
        let mut binary = None;
        let mut line = None;
        for w in self.workers.values() {
            if slot.is_some_and(|s| s != w.slot) {
                continue;
            }
            let bytes = match w.link.protocol {
                Protocol::Binary => binary
                    .get_or_insert_with(|| {
                        protocol::frame(&ToWorker::User(payload.to_vec()))
                            .map_err(|e| e.to_string())
                    })
                    .clone(),
                Protocol::Node => line
                    .get_or_insert_with(|| node::user_line(payload).map_err(|e| e.to_string()))
                    .clone(),
            }
            .map_err(|reason| Refusal::BadMessage { reason })?;
            if w.link.post(Outgoing::Bytes(bytes, Vec::new())) {
                sent += 1;
            }
        }
        Ok(sent)
    }

    fn scale(&mut self, now: Instant, to: ScaleTo) -> Result<Outcome, Refusal> {
        let from = self.sm.target();
        let target = match to {
            ScaleTo::Exactly(n) => i64::try_from(n).unwrap_or(i64::MAX),
            // Saturating: `by` comes from a control client, and may be any i64.
            ScaleTo::By(by) => i64::try_from(from).unwrap_or(i64::MAX).saturating_add(by),
        };
        let max = super::MAX_WORKERS;
        if target < 1 || target > max as i64 {
            return Err(Refusal::WorkersOutOfRange {
                requested: target,
                max,
            });
        }
        let to = target as usize;
        if to == from {
            return Ok(Outcome::Unchanged { workers: from });
        }
        self.sm.scale(now, to).map_err(refusal)?;
        Ok(Outcome::Scaling { from, to })
    }

    fn signal(&mut self, now: Instant, sig: MasterSignal) {
        tracing::info!(signal = ?sig, "signal");
        match sig {
            MasterSignal::Terminate => self.sm.stop(now, true),
            MasterSignal::Interrupt => {
                // A second Ctrl-C means "now".
                let graceful = !self.sm.stopping();
                self.sm.stop(now, graceful);
            }
            MasterSignal::Quit => self.sm.stop(now, false),
            MasterSignal::Hangup => {
                // A refusal is published (and logged) as an event.
                let _ = self.reload(now);
            }
            MasterSignal::IncreaseWorkers => {
                let _ = self.scale(now, ScaleTo::By(1));
            }
            MasterSignal::DecreaseWorkers => {
                let _ = self.scale(now, ScaleTo::By(-1));
            }
            MasterSignal::ReopenLogs => {
                if let Some(sink) = &self.output {
                    sink.reopen();
                }
            }
        }
    }

    /// Samples CPU and memory of the master and every worker, computes rates, and
    /// checks the memory and age recycle limits and misconfiguration hints.
    fn sample(&mut self) {
        let now = Instant::now();
        // Shared balancing: listeners a worker in rotation could not be handed yet.
        for w in self.workers.values_mut() {
            if let Some(handed) = w.listeners_handed {
                if w.in_rotation && handed < self.shared.len() {
                    w.listeners_handed = Some(hand_listeners(&self.shared, &w.link, handed));
                }
            }
        }
        // A recycle asked for and no longer under way without a `RecycleFailed` (its
        // replacement was overtaken by a reload, or scaled away): the worker, still its
        // slot's own, may be asked again. Otherwise it would never be recycled again.
        for (id, w) in &mut self.workers {
            if w.recycle_asked && self.sm.is_current_ready(*id) {
                w.recycle_asked = false;
            }
        }
        if let Some(s) = procstat::sample(sys::getpid()) {
            self.master_samples = (self.master_samples.1.take(), Some((now, s)));
        }
        let accepted = self.dispatcher.stats.accepted.load(Ordering::Relaxed);
        let (t0, a0) = self.accepted_before;
        let secs = now.duration_since(t0).as_secs_f64();
        if secs > 0.0 {
            self.connections_per_sec = accepted.saturating_sub(a0) as f64 / secs;
        }
        self.accepted_before = (now, accepted);
        let recycle = self.settings().recycle.clone();
        let mut recycles = Vec::new();
        let mut hints = Vec::new();
        for (id, w) in &mut self.workers {
            let Some(p) = &w.process else { continue };
            if let Some(s) = procstat::sample(p.pid()) {
                w.samples = (w.samples.1.take(), Some((now, s)));
                if let Some(max) = recycle.max_memory {
                    if s.rss > max && !w.recycle_asked && self.sm.is_current_ready(*id) {
                        recycles
                            .push((*id, format!("max_memory: resident {} bytes > {max}", s.rss)));
                    }
                }
            }
            let dispatched = w.link.dispatched.load(Ordering::Relaxed);
            let (t0, d0) = w.dispatched_before;
            let secs = now.duration_since(t0).as_secs_f64();
            if secs > 0.0 {
                w.connections_per_sec = dispatched.saturating_sub(d0) as f64 / secs;
            }
            w.dispatched_before = (now, dispatched);
            if let Some(age) = recycle.max_age {
                if now.duration_since(w.spawned_at) >= age
                    && !w.recycle_asked
                    && self.sm.is_current_ready(*id)
                {
                    recycles.push((
                        *id,
                        format!("max_age: older than {}", humantime::format_duration(age)),
                    ));
                }
            }
            if !w.hinted && w.link.version() == 0 && now.duration_since(w.spawned_at) >= HINT_AFTER
            {
                w.hinted = true;
                hints.push(*id);
            }
        }
        for (id, reason) in recycles {
            self.ask_recycle(id, reason);
        }
        for id in hints {
            if let Some(hint) = self.misconfiguration_hint(id) {
                tracing::warn!("{hint}");
            }
        }
    }

    /// Recycles workers that were handed their `max_requests`.
    fn check_recycle(&mut self) {
        let due: Vec<(u64, u64)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.recycle_asked)
            .filter_map(|(id, w)| {
                let max = w.max_requests?;
                (w.link.dispatched.load(Ordering::Relaxed) >= max).then_some((*id, max))
            })
            .collect();
        for (id, max) in due {
            if self.sm.is_current_ready(id) {
                self.ask_recycle(id, format!("max_requests: {max} connections"));
            }
        }
    }

    fn ask_recycle(&mut self, id: u64, reason: String) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.recycle_asked = true;
        }
        self.sm
            .handle(Instant::now(), Input::Recycle { id, reason });
        // A recycle that could not start now (its last replacement failed) is asked
        // again at the next check.
        if self.sm.is_current_ready(id) {
            if let Some(w) = self.workers.get_mut(&id) {
                w.recycle_asked = false;
            }
        }
    }

    /// Why a worker that does not get ready is likely misconfigured, if it looks so.
    fn misconfiguration_hint(&self, id: u64) -> Option<String> {
        let w = self.workers.get(&id)?;
        let pid = w.process.as_ref()?.pid();
        let settings = self.generations.get(&w.generation)?;
        if let Some(port) = listening_tcp_ports(pid).first() {
            return Some(format!(
                "worker {} (pid {pid}) listens on TCP port {port} itself: under rr-cluster a worker \
                 takes the connections the master passes it instead of binding a port{}",
                w.slot,
                if looks_like_node(settings) {
                    " (a Node.js app: run it with --worker-protocol node and hand its server to \
                     the rr-cluster-worker package, or emit the sockets it is passed)"
                } else {
                    ""
                }
            ));
        }
        if settings.command.get_protocol() == Protocol::Binary && looks_like_node(settings) {
            return Some(format!(
                "worker {} (pid {pid}) has not said Ready: it looks like a Node.js program, which \
                 needs --worker-protocol node (or [worker] protocol = \"node\")",
                w.slot
            ));
        }
        None
    }
}

fn refusal(r: super::supervisor::Refused) -> Refusal {
    match r {
        super::supervisor::Refused::Stopping => Refusal::Stopping,
        super::supervisor::Refused::OutOfRange { requested, max } => Refusal::WorkersOutOfRange {
            requested: requested as i64,
            max,
        },
    }
}

pub(crate) fn reload_outcome(r: ReloadStart) -> Outcome {
    match r {
        ReloadStart::Started(generation) => Outcome::Reloading { generation },
        ReloadStart::Queued => Outcome::ReloadQueued,
    }
}

pub(crate) fn reload_refusal(r: super::supervisor::Refused) -> Refusal {
    refusal(r)
}

/// Hands a worker a copy of the listening sockets from `from` on (shared balancing);
/// how many it has been handed in all. A copy that cannot be made now (the master is
/// out of descriptors) stops the handing, to be taken up again at the next sample; a
/// worker whose channel is gone is counted as handed everything (it is leaving).
fn hand_listeners(shared: &[listen::SharedListener], link: &Arc<WorkerLink>, from: usize) -> usize {
    if link.protocol == Protocol::Binary && link.version() < 2 {
        if from == 0 {
            tracing::error!(
                worker = link.slot,
                id = link.id,
                "balance = shared needs protocol version 2; this worker speaks version 1 and gets no connection"
            );
        }
        return shared.len().max(from);
    }
    for (index, listener) in shared.iter().enumerate().skip(from) {
        let fd = match listener.try_clone_fd() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(worker = link.slot, listener = index, error = %e, "cannot copy the listening socket for the worker; trying again in a second");
                return index;
            }
        };
        let bytes = match link.protocol {
            Protocol::Binary => match protocol::frame(&ToWorker::Listener {
                listener: index as u16,
            }) {
                Ok(b) => b,
                Err(_) => return shared.len(), // a fixed-size frame: cannot happen
            },
            Protocol::Node => node::listener_line(index as u16),
        };
        if !link.post(Outgoing::Bytes(bytes, vec![fd])) {
            tracing::warn!(
                worker = link.slot,
                "cannot hand the listener to the worker: its channel is closed"
            );
            return shared.len();
        }
    }
    shared.len().max(from)
}

/// A stable pseudo-random `0..=max` for worker `id` (no randomness source needed).
fn jitter(max: u64, id: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(sys::getpid());
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    // `max` may be u64::MAX (then `0..max` will do).
    x % max.saturating_add(1)
}

fn listeners_json(listeners: &[ListenerInfo]) -> String {
    let items: Vec<serde_json::Value> = listeners
        .iter()
        .map(|l| {
            serde_json::json!({
                "kind": match l.kind {
                    protocol::ListenerKind::Tcp => "tcp",
                    protocol::ListenerKind::Unix => "unix",
                },
                "address": l.address,
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// The TCP ports the process listens on itself, from /proc (its socket inodes against
/// the LISTEN entries of its network namespace).
fn listening_tcp_ports(pid: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut inodes = std::collections::HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return ports;
    };
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if let Some(n) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                inodes.insert(n);
            }
        }
    }
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is "IP:PORT" in hex; st 0A is LISTEN; inode is field 9.
            if f.len() > 9 && f[3] == "0A" {
                let inode: u64 = f[9].parse().unwrap_or(0);
                if inodes.contains(&inode) {
                    if let Some(port) = f[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                    {
                        ports.push(port);
                    }
                }
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let values: std::collections::BTreeSet<u64> = (1..200).map(|id| jitter(50, id)).collect();
        assert!(values.iter().all(|v| *v <= 50));
        assert!(values.len() > 20, "{values:?}");
        assert_eq!(jitter(0, 7), 0);
        // Any bound a flag takes (`max + 1` overflowed: a division by zero).
        let _ = jitter(u64::MAX, 7);
    }

    #[test]
    fn a_process_listening_itself_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listening_tcp_ports(std::process::id()).contains(&port));
    }
}
