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
    match sys::raise_nofile_limit() {
        Ok(sys::NofileRaise::Raised { from, to }) => {
            tracing::debug!(
                from,
                to,
                "raised the soft limit on open descriptors to the hard limit"
            );
        }
        Ok(sys::NofileRaise::AtHardLimit(limit)) => {
            tracing::debug!(
                ?limit,
                "the soft limit on open descriptors is the hard limit"
            );
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot raise the soft limit on open descriptors");
        }
    }
    let listeners = listen::bind_all(&settings.listen)
        .map_err(|(addr, source)| MasterError::Bind { addr, source })?;
    let addrs: Vec<LocalAddr> = listeners.iter().map(|l| l.local_addr().clone()).collect();
    let infos: Vec<ListenerInfo> = listeners.iter().map(listen::Listener::info).collect();

    let (commands_tx, commands) = mpsc::channel(64);
    let control_stop = CancellationToken::new();
    // Cancelled once the control socket's file is gone (at once without one).
    let control_closed = CancellationToken::new();
    let tasks = TaskTracker::new();
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
    #[cfg(test)]
    if tests::FAIL_AFTER_THREADS.get() {
        return Err(MasterError::Start(std::io::Error::other("injected")));
    }
    // The control socket last: nothing after it can fail, and nothing would stop a
    // server started before a failure (its socket would answer "stopping" for the
    // runtime's life, and a retried start would find it live).
    match &settings.control {
        Some(path) => {
            let socket = control::bind(path).map_err(|source| MasterError::Control {
                path: path.clone(),
                source,
            })?;
            tasks.spawn(control::serve(
                socket,
                commands_tx.clone(),
                control_stop.clone(),
                control_closed.clone(),
                tasks.clone(),
            ));
        }
        None => control_closed.cancel(),
    }
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
        // Commands still queued are answered, not dropped: a `stop --wait` that came
        // as the last worker went gets the exit code, anything else "stopping".
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Stop { wait: Some(w), .. } => self.stop_waiters.push(w),
                Command::Reload { reply, .. } | Command::Scale { reply, .. } => {
                    let _ = reply.send(Err(Refusal::Stopping));
                }
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(Refusal::Stopping));
                }
                // Dropped: the asker is told the master is stopping.
                Command::Status(_)
                | Command::Metrics(_)
                | Command::Stop { wait: None, .. }
                | Command::Signal(_) => {}
            }
        }
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
                    self.forget_gone_reload_waiters();
                    self.reload_waiters.push((Some(generation), reply));
                }
                Ok(Outcome::ReloadQueued) if wait => {
                    self.forget_gone_reload_waiters();
                    self.reload_waiters.push((None, reply));
                }
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

    /// Drops the reload waiters whose asker went away (a control client that gave up
    /// and retries would otherwise pile them up until the reload ends).
    fn forget_gone_reload_waiters(&mut self) {
        self.reload_waiters.retain(|(_, reply)| !reply.is_closed());
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
            MasterSignal::IncreaseWorkers | MasterSignal::DecreaseWorkers => {
                let by = if sig == MasterSignal::IncreaseWorkers {
                    1
                } else {
                    -1
                };
                if let Err(refusal) = self.scale(now, ScaleTo::By(by)) {
                    tracing::warn!(signal = ?sig, %refusal, "scale by signal refused");
                }
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

/// Lines of a `/proc/<pid>/net/tcp` table read at most (its listening sockets).
const MAX_LISTEN_LINES: usize = 16_384;

/// The TCP ports the process listens on itself, from /proc (its socket inodes against
/// the LISTEN entries of its network namespace).
///
/// Runs on the driver, so it reads only the head of each table: the kernel lists a
/// namespace's listening sockets first (`tcp_seq_start`/`tcp_seq_next` walk the
/// listening hash, which holds only sockets in LISTEN, before the established hash),
/// so the first line in another state ends them. Under `Connection: close` load the
/// rest of the table (TIME_WAIT sockets) can be tens of megabytes.
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
        if let Ok(file) = std::fs::File::open(format!("/proc/{pid}/net/{table}")) {
            listening_ports_in(std::io::BufReader::new(file), &inodes, &mut ports);
        }
    }
    ports
}

/// Adds to `ports` the ports of the LISTEN entries of a `/proc/net/tcp`-style table
/// whose inode is in `inodes`. Stops at the first entry in another state (the
/// listening sockets come first), or after [`MAX_LISTEN_LINES`].
fn listening_ports_in(
    table: impl std::io::BufRead,
    inodes: &std::collections::HashSet<u64>,
    ports: &mut Vec<u16>,
) {
    for line in table.lines().skip(1).take(MAX_LISTEN_LINES) {
        let Ok(line) = line else { return };
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address is "IP:PORT" in hex; st 0A is LISTEN; inode is field 9.
        if f.len() <= 9 || f[3] != "0A" {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{Master, WorkerCommand};

    thread_local! {
        /// `start` fails once its threads run, before the control socket (a failure
        /// there cannot be caused otherwise: a thread that cannot be started).
        pub(super) static FAIL_AFTER_THREADS: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// A driver for `settings`, as `start` makes it, without listeners, workers,
    /// threads or a control socket; and the sender of its commands.
    fn test_driver(settings: Settings) -> (Driver, mpsc::Sender<Command>) {
        let (commands_tx, commands) = mpsc::channel(64);
        let (inputs_tx, inputs) = mpsc::unbounded_channel();
        let (_, reports) = mpsc::unbounded_channel();
        let (paused, _) = watch::channel(false);
        let control_closed = CancellationToken::new();
        control_closed.cancel();
        let mut sm = Supervisor::new(settings.policy.clone(), settings.workers);
        sm.start(Instant::now());
        let settings = Arc::new(settings);
        let driver = Driver {
            sm,
            listeners: Vec::new(),
            shared: Vec::new(),
            addrs: Vec::new(),
            workers: HashMap::new(),
            dispatcher: Dispatcher::new(settings.balance),
            inputs_tx,
            inputs,
            reports,
            commands,
            spawner: None,
            events: broadcast::channel(16).0,
            messages: Arc::new(MessageQueue::new(settings.message_queue)),
            output: None,
            accept_stop: CancellationToken::new(),
            accept_loops: Vec::new(),
            deferred: Vec::new(),
            stopping_accept: false,
            control_stop: CancellationToken::new(),
            control_closed,
            paused,
            tasks: TaskTracker::new(),
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
        (driver, commands_tx)
    }

    fn master(workers: usize) -> Master {
        Master::builder()
            .listen("127.0.0.1:0")
            .workers(workers)
            .command(WorkerCommand::new("true"))
            .build()
            .expect("valid")
    }

    /// What a tracing subscriber was given: one line per event, its level and fields.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<String>>>);

    impl Logs {
        fn lines(&self) -> Vec<String> {
            self.0.lock().expect("logs").clone()
        }
    }

    impl tracing::Subscriber for Logs {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Line(String);
            impl tracing::field::Visit for Line {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push_str(&format!(" {}={value:?}", field.name()));
                }
            }
            let mut line = Line(event.metadata().level().to_string());
            event.record(&mut line);
            self.0.lock().expect("logs").push(line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Regression: the control server was started before the output and spawner
    /// threads; when one of those failed, it kept the socket bound and answering
    /// "stopping" for the runtime's life, and a retried start found it live.
    #[tokio::test]
    async fn a_start_that_fails_leaves_no_control_socket_behind() {
        let dir = std::env::temp_dir().join(format!("rr-driver-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let with_control = || {
            Master::builder()
                .listen("127.0.0.1:0")
                .command(WorkerCommand::new("true"))
                .control_socket(&path)
                .build()
                .expect("valid")
        };
        FAIL_AFTER_THREADS.set(true);
        let failed = with_control().start().await;
        FAIL_AFTER_THREADS.set(false);
        assert!(
            matches!(failed, Err(MasterError::Start(_))),
            "{:?}",
            failed.map(|_| ())
        );
        let connected = tokio::net::UnixStream::connect(&path).await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            connected.is_err(),
            "a control socket still served after the failed start"
        );
    }

    /// Regression: commands queued when the driver ended were dropped: a
    /// `stop --wait` that came as the last worker went was told "the master is
    /// stopping" and exited 1, though the master stopped with 0.
    #[tokio::test]
    async fn commands_queued_at_the_end_are_answered() {
        let (mut driver, commands) = test_driver(master(1).settings);
        let (stop_tx, stop_rx) = oneshot::channel();
        commands
            .try_send(Command::Stop {
                mode: StopMode::Graceful,
                wait: Some(stop_tx),
            })
            .expect("queued");
        let (reload_tx, reload_rx) = oneshot::channel();
        commands
            .try_send(Command::Reload {
                wait: true,
                reply: reload_tx,
            })
            .expect("queued");
        driver.shutdown(3);
        drop(driver);
        let code = tokio::time::timeout(Duration::from_secs(5), stop_rx)
            .await
            .expect("in time");
        assert_eq!(code, Ok(3), "the stop waiter gets the exit code");
        assert_eq!(reload_rx.await.expect("answered"), Err(Refusal::Stopping));
        assert!(
            commands
                .try_send(Command::Signal(MasterSignal::Terminate))
                .is_err(),
            "nothing is queued after the end"
        );
    }

    /// A `reload --wait` whose client went away (it timed out, and retries) is not
    /// kept waiting until the reload ends.
    #[tokio::test]
    async fn reload_waiters_whose_asker_went_are_forgotten() {
        let (mut driver, _commands) = test_driver(master(1).settings);
        for _ in 0..3 {
            let (reply, rx) = oneshot::channel();
            driver.command(Command::Reload { wait: true, reply });
            drop(rx); // the client gave up
        }
        let (reply, mut rx) = oneshot::channel();
        driver.command(Command::Reload { wait: true, reply });
        assert!(rx.try_recv().is_err(), "waits for the reload");
        assert_eq!(driver.reload_waiters.len(), 1);
    }

    /// Regression: a SIGTTIN or SIGTTOU that could not be carried out (out of range,
    /// or while stopping) left no trace.
    #[test]
    fn a_refused_scale_by_signal_is_logged() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = rt.enter();
        let (mut driver, _commands) = test_driver(master(1).settings);
        let logs = Logs::default();
        tracing::subscriber::with_default(logs.clone(), || {
            // One worker: one fewer is out of range.
            driver.signal(Instant::now(), MasterSignal::DecreaseWorkers);
            driver.sm.stop(Instant::now(), true);
            driver.signal(Instant::now(), MasterSignal::IncreaseWorkers);
        });
        let refused: Vec<String> = logs
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("WARN") && l.contains("refused"))
            .collect();
        assert_eq!(refused.len(), 2, "{:?}", logs.lines());
        assert!(refused[0].contains("out of range"), "{refused:?}");
        assert!(refused[1].contains("stopping"), "{refused:?}");
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let values: std::collections::BTreeSet<u64> = (1..200).map(|id| jitter(50, id)).collect();
        assert!(values.iter().all(|v| *v <= 50));
        assert!(values.len() > 20, "{values:?}");
        assert_eq!(jitter(0, 7), 0);
        // Any bound a flag takes (`max + 1` overflowed: a division by zero).
        let _ = jitter(u64::MAX, 7);
    }

    /// A `/proc/net/tcp` table: a header, `listen` LISTEN entries (inodes 1000..),
    /// then `others` TIME_WAIT entries, made as they are read; counts the lines read.
    struct Table {
        listen: usize,
        others: usize,
        made: usize,
        pending: Vec<u8>,
    }

    impl std::io::Read for Table {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pending.is_empty() {
                let n = self.made;
                let line = if n == 0 {
                    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n".to_owned()
                } else if n <= self.listen {
                    format!(
                        "{n:4}: 0100007F:{:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {} 1 0000000000000000 100 0 0 10 0\n",
                        8000 + n,
                        999 + n
                    )
                } else if n <= self.listen + self.others {
                    format!(
                        "{n:4}: 0100007F:1F90 0100007F:{:04X} 06 00000000:00000000 03:00000F4B 00000000     0        0 0 3 0000000000000000\n",
                        n % 60_000
                    )
                } else {
                    return Ok(0);
                };
                self.made += 1;
                self.pending = line.into_bytes();
            }
            let k = buf.len().min(self.pending.len());
            buf[..k].copy_from_slice(&self.pending[..k]);
            self.pending.drain(..k);
            Ok(k)
        }
    }

    /// Regression: the hint read the whole table on the driver (tens of megabytes of
    /// TIME_WAIT entries under `Connection: close` load), stalling every accept.
    #[test]
    fn the_listening_scan_stops_after_the_listening_entries() {
        let mut table = Table {
            listen: 3,
            others: 1_000_000,
            made: 0,
            pending: Vec::new(),
        };
        let inodes = std::collections::HashSet::from([1000, 1002]);
        let mut ports = Vec::new();
        listening_ports_in(std::io::BufReader::new(&mut table), &inodes, &mut ports);
        assert_eq!(ports, vec![8001, 8003]);
        // The header, the listeners, what one buffer holds beyond them.
        assert!(table.made < 200, "read {} lines", table.made);
    }

    #[test]
    fn a_process_listening_itself_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listening_tcp_ports(std::process::id()).contains(&port));
    }
}
