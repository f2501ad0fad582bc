//! The one task that runs the supervisor: it feeds it inputs (worker messages, exits,
//! timers, commands) and carries out the actions it decides.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::{Dispatcher, WorkerLink};
use super::listen::{self, LocalAddr};
use super::spawn::{Job, Spawner};
use super::supervisor::{Action, Input, Supervisor};
use super::{MasterError, MasterHandle, MasterSignal, Settings, control, metrics};
use crate::channel::{self, ChannelReader};
use crate::control::Status;
use crate::event::Event;
use crate::protocol::{Hello, ListenerInfo, PROTOCOL_VERSION, ToMaster, ToWorker};
use crate::sys;

/// Requests from handles, the control socket and signals.
#[derive(Debug)]
pub(crate) enum Command {
    Status(oneshot::Sender<Status>),
    Metrics(oneshot::Sender<String>),
    Reload(oneshot::Sender<Result<String, String>>),
    Scale(usize, oneshot::Sender<Result<String, String>>),
    Stop {
        graceful: bool,
    },
    Send {
        slot: Option<u32>,
        payload: Vec<u8>,
        reply: oneshot::Sender<usize>,
    },
    Signal(MasterSignal),
}

/// Binds everything, starts the workers and the driver task.
pub(crate) async fn start(
    settings: Settings,
    events: broadcast::Sender<Event>,
) -> Result<MasterHandle, MasterError> {
    let listeners = listen::bind_all(&settings.listen)
        .map_err(|(addr, source)| MasterError::Bind { addr, source })?;
    let addrs: Vec<LocalAddr> = listeners.iter().map(|l| l.local_addr().clone()).collect();
    let infos: Vec<ListenerInfo> = listeners.iter().map(listen::Listener::info).collect();

    let (commands_tx, commands) = mpsc::channel(64);
    let control_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
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
        ));
    }

    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let spawner = Spawner::start(inputs_tx.clone()).map_err(MasterError::Start)?;
    let dispatcher = Dispatcher::new(settings.balance);
    let accept_stop = CancellationToken::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        tracing::info!(listen = %listener.local_addr(), "listening");
        tasks.spawn(listen::accept_loop(
            listener,
            index as u16,
            Arc::clone(&dispatcher),
            accept_stop.clone(),
        ));
    }

    let (done_tx, done) = watch::channel(None);
    let mut sm = Supervisor::new(settings.policy.clone(), settings.workers);
    sm.start(Instant::now());
    let driver = Driver {
        sm,
        listeners: infos,
        addrs: addrs.iter().map(ToString::to_string).collect(),
        links: HashMap::new(),
        dispatcher,
        inputs_tx,
        inputs,
        commands,
        spawner: Some(spawner),
        events: events.clone(),
        accept_stop,
        control_stop,
        tasks: tasks.clone(),
        started: Instant::now(),
        settings,
        dispatched_by_gone: std::collections::BTreeMap::new(),
    };
    let control = driver.settings.control.clone();
    tokio::spawn(async move {
        let code = driver.run().await;
        tasks.close();
        tasks.wait().await;
        let _ = done_tx.send(Some(code));
    });
    Ok(MasterHandle {
        commands: commands_tx,
        events,
        addrs: Arc::new(addrs),
        done,
        control,
    })
}

struct Driver {
    sm: Supervisor,
    listeners: Vec<ListenerInfo>,
    addrs: Vec<String>,
    links: HashMap<u64, Arc<WorkerLink>>,
    dispatcher: Arc<Dispatcher>,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs: mpsc::UnboundedReceiver<Input>,
    commands: mpsc::Receiver<Command>,
    spawner: Option<Spawner>,
    events: broadcast::Sender<Event>,
    accept_stop: CancellationToken,
    control_stop: CancellationToken,
    tasks: TaskTracker,
    started: Instant,
    settings: Settings,
    /// Connections dispatched per slot by workers that are gone (for metrics).
    dispatched_by_gone: std::collections::BTreeMap<u32, u64>,
}

impl Driver {
    async fn run(mut self) -> i32 {
        loop {
            if let Some(code) = self.execute() {
                self.shutdown();
                return code;
            }
            let deadline = self.sm.next_deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(input) = self.inputs.recv() => {
                    if let Input::Exited { id, .. } | Input::SpawnFailed { id, .. } = &input {
                        if let Some(link) = self.links.remove(id) {
                            *self.dispatched_by_gone.entry(link.slot).or_default() +=
                                link.dispatched.load(Ordering::Relaxed);
                        }
                    }
                    self.sm.handle(Instant::now(), input);
                }
                Some(cmd) = self.commands.recv() => self.command(cmd),
                () = timer => self.sm.tick(Instant::now()),
            }
        }
    }

    fn shutdown(&mut self) {
        self.accept_stop.cancel();
        self.control_stop.cancel();
        // Ends the spawner thread (every child is gone by now).
        self.spawner = None;
    }

    /// Carries out the supervisor's actions; `Some(code)` when the master is done.
    fn execute(&mut self) -> Option<i32> {
        let mut exit = None;
        for action in self.sm.take_actions() {
            match action {
                Action::Spawn {
                    slot,
                    id,
                    generation,
                } => self.spawn(slot, id, generation),
                Action::Rotate { id, on: true } => {
                    if let Some(link) = self.links.get(&id) {
                        self.dispatcher.add(Arc::clone(link));
                    }
                }
                Action::Rotate { id, on: false } => self.dispatcher.remove(id),
                Action::Drain { id, deadline } => {
                    if let Some(link) = self.links.get(&id) {
                        let deadline_ms = deadline.as_millis() as u64;
                        self.post(link, ToWorker::Drain { deadline_ms });
                    }
                }
                Action::Kill { id, pid } => {
                    if let Err(e) = sys::kill(pid, sys::Signal::Kill) {
                        tracing::error!(id, pid, error = %e, "cannot kill worker");
                    }
                }
                Action::Publish(event) => self.publish(event),
                Action::StopAccepting => self.accept_stop.cancel(),
                Action::Exit { code } => exit = Some(code),
            }
        }
        exit
    }

    fn spawn(&mut self, slot: u32, id: u64, generation: u64) {
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => return self.spawn_failed(id, format!("socketpair: {e}")),
        };
        let stream = match channel::from_std(ours) {
            Ok(s) => s,
            Err(e) => return self.spawn_failed(id, format!("channel: {e}")),
        };
        let (reader, writer) = channel::split(stream);
        let link = Arc::new(WorkerLink::new(id, slot, writer));
        self.links.insert(id, Arc::clone(&link));
        let hello = Hello {
            version: PROTOCOL_VERSION,
            worker_id: slot,
            generation,
            heartbeat_ms: self.settings.heartbeat_interval.as_millis() as u32,
            listeners: self.listeners.clone(),
        };
        self.tasks.spawn(link_task(
            link,
            reader,
            hello,
            self.inputs_tx.clone(),
            self.events.clone(),
        ));
        let job = Job {
            id,
            slot,
            generation,
            command: self.settings.command.clone(),
            channel: OwnedFd::from(theirs),
        };
        let refused = match &self.spawner {
            Some(spawner) => spawner.spawn(job).is_err(),
            None => true,
        };
        if refused {
            self.spawn_failed(id, "the spawner thread is gone".into());
        }
    }

    /// Logs an event and hands it to every subscriber.
    fn publish(&self, event: Event) {
        event.log();
        let _ = self.events.send(event);
    }

    /// Sends `msg` to a worker from a tracked task: the driver never waits on a
    /// worker's channel.
    fn post(&self, link: &WorkerLink, msg: ToWorker) {
        let writer = Arc::clone(&link.writer);
        self.tasks.spawn(async move { writer.send_msg(&msg).await });
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
            Command::Reload(reply) => {
                let _ = reply.send(self.reload(now));
            }
            Command::Scale(n, reply) => {
                let _ = reply.send(self.sm.scale(now, n));
            }
            Command::Stop { graceful } => self.sm.stop(now, graceful),
            Command::Send {
                slot,
                payload,
                reply,
            } => {
                let mut sent = 0;
                for link in self.links.values() {
                    if slot.is_none_or(|s| s == link.slot) {
                        self.post(link, ToWorker::User(payload.clone()));
                        sent += 1;
                    }
                }
                let _ = reply.send(sent);
            }
            Command::Signal(sig) => self.signal(now, sig),
        }
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
                let n = self.sm.target() + 1;
                let _ = self.sm.scale(now, n.min(super::MAX_WORKERS));
            }
            MasterSignal::DecreaseWorkers => {
                let n = self.sm.target().saturating_sub(1).max(1);
                let _ = self.sm.scale(now, n);
            }
        }
    }

    /// A reload: re-reads the configuration through the hook (a bad one is rejected
    /// and the pool is left alone), applies it, and rolls the workers over.
    fn reload(&mut self, now: Instant) -> Result<String, String> {
        if self.sm.stopping() {
            return Err("the master is stopping".into());
        }
        if let Some(hook) = self.settings.reload_hook.clone() {
            let fresh = hook().and_then(|b| b.validate().map_err(|e| e.to_string()));
            let fresh = match fresh {
                Ok(s) => s,
                Err(reason) => {
                    self.publish(Event::ReloadRejected {
                        reason: reason.clone(),
                    });
                    return Err(format!("reload rejected, pool unchanged: {reason}"));
                }
            };
            if fresh.listen != self.settings.listen {
                tracing::warn!(
                    "listen addresses cannot change on reload; restart the master to change them"
                );
            }
            self.dispatcher.set_balance(fresh.balance);
            self.sm.set_policy(fresh.policy.clone());
            if fresh.workers != self.sm.target() {
                self.sm.scale(now, fresh.workers)?;
            }
            self.settings = Settings {
                listen: self.settings.listen.clone(),
                control: self.settings.control.clone(),
                reload_hook: self.settings.reload_hook.clone(),
                ..fresh
            };
        }
        self.sm.reload(now)
    }

    fn metrics(&self) -> String {
        let stats = &self.dispatcher.stats;
        let totals = metrics::Totals {
            dispatched_by_gone: self
                .dispatched_by_gone
                .iter()
                .map(|(slot, n)| (*slot, *n))
                .collect(),
            restarts: self.sm.restarts_total(),
            give_ups: self.sm.give_ups(),
            send_failures: stats.send_failures.load(Ordering::Relaxed),
            channel_full: stats.channel_full.load(Ordering::Relaxed),
            accept_errors: stats.accept_errors.load(Ordering::Relaxed),
        };
        metrics::render(&self.status(), &totals)
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let mut workers = self.sm.status(now);
        for w in &mut workers {
            if let Some(link) = self.links.get(&w.id) {
                w.dispatched = link.dispatched.load(Ordering::Relaxed);
            }
        }
        let stats = &self.dispatcher.stats;
        Status {
            master_pid: sys::getpid(),
            generation: self.sm.generation(),
            target_workers: self.sm.target(),
            reloading: self.sm.reloading(),
            gave_up: self.sm.gave_up(),
            stopping: self.sm.stopping(),
            listeners: self.addrs.clone(),
            accepted: stats.accepted.load(Ordering::Relaxed),
            queued: stats.queued.load(Ordering::Relaxed),
            restarts_in_window: self.sm.restarts_in_window(now),
            uptime_ms: now.duration_since(self.started).as_millis() as u64,
            workers,
        }
    }
}

/// Speaks to one worker: sends the handshake, then turns its frames into inputs.
async fn link_task(
    link: Arc<WorkerLink>,
    mut reader: ChannelReader,
    hello: Hello,
    inputs: mpsc::UnboundedSender<Input>,
    events: broadcast::Sender<Event>,
) {
    let id = link.id;
    let closed = |error: Option<String>| Input::ChannelClosed { id, error };
    if let Err(e) = link.writer.send_msg(&ToWorker::Hello(hello)).await {
        let _ = inputs.send(closed(Some(e.to_string())));
        return;
    }
    loop {
        let msg = match reader.recv::<ToMaster>().await {
            Ok(Some((msg, _))) => msg,
            Ok(None) => {
                let _ = inputs.send(closed(None));
                return;
            }
            Err(e) => {
                // The peer is dropped, not the master: close its channel so the worker
                // sees the end, and let the supervisor replace it.
                link.writer.shutdown();
                let _ = inputs.send(closed(Some(e.to_string())));
                return;
            }
        };
        let input = match msg {
            ToMaster::Ready { version, .. } if version != PROTOCOL_VERSION => {
                link.writer.shutdown();
                let _ = inputs.send(closed(Some(format!(
                    "protocol version mismatch: worker speaks {version}, master {PROTOCOL_VERSION}"
                ))));
                return;
            }
            ToMaster::Ready { pid, .. } => Input::Ready { id, pid },
            ToMaster::Heartbeat { active, .. } => {
                link.heartbeat(active);
                Input::Heartbeat { id, active }
            }
            ToMaster::Suicide { reason } => Input::Suicide { id, reason },
            ToMaster::Pong => continue,
            ToMaster::User(payload) => {
                let _ = events.send(Event::Message {
                    slot: link.slot,
                    id,
                    payload,
                });
                continue;
            }
        };
        if inputs.send(input).is_err() {
            return;
        }
    }
}
