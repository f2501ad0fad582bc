//! The worker lifecycle as a pure state machine: inputs (what happened) in, actions
//! (what to do) out. No I/O, no clock of its own: every call takes `now`, so tests drive
//! it with tokio's paused clock. docs/LIFECYCLE.md walks through the states.
//!
//! ```text
//! Starting --Ready--> Ready --drain--> Draining --exit--> gone (planned)
//! Starting --exit / ready timeout / channel closed--> boot failure: restart with
//!          backoff (counts toward the give-up limit)
//! Ready --Suicide--> Leaving: replacement spawned at once --exit--> gone
//! Ready --exit--> crashed: restart (never counts; a short-lived one waits a little)
//! Ready --late heartbeat / unacknowledged descriptors--> stalled (out of rotation)
//!       --heartbeat timeout (unless off)--> Hung: SIGKILL --exit--> restart
//! Ready --channel closed--> Lost: SIGKILL after 1 s --exit--> restart
//! Draining/Leaving --deadline--> SIGKILL
//! ```
//!
//! Each slot has a *current* worker and at most one *successor*: a replacement started
//! by a rolling reload or a recycle. The successor serves beside the current worker
//! once ready, then takes its place, and only then does the old one drain: a handover
//! never leaves the slot without a ready worker.
//!
//! Only *boot failures* (a worker that never said `Ready`) count toward the give-up
//! limit: more than `restart_limit` of them within `restart_window` is a give-up. A
//! worker that became ready was not a crash loop at boot; it is always replaced.
//! Exits are matched by worker id, never by slot.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::control::{WorkerState, WorkerStatus};
use crate::event::{Event, ExitInfo};

/// After a SIGKILL, how long until the master sends it again (a process in
/// uninterruptible sleep may take a while to die).
const REKILL_AFTER: Duration = Duration::from_secs(5);
/// A worker whose channel closed gets this long to exit by itself before SIGKILL.
const CHANNEL_CLOSED_GRACE: Duration = Duration::from_secs(1);
/// A ready worker that died young waits at most this long before its restart.
const READY_BACKOFF_CAP: Duration = Duration::from_secs(1);
/// A ready worker counts as healthy (replaced at once, its slot's backoff reset) once
/// it was ready for `max(min_uptime, HEALTHY_UPTIME_FLOOR)` (see
/// [`limits::MIN_HEALTHY_UPTIME`](super::limits::MIN_HEALTHY_UPTIME)).
const HEALTHY_UPTIME_FLOOR: Duration = super::limits::MIN_HEALTHY_UPTIME;

/// What the master does when the restart limit is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum GiveUpAction {
    /// Stop the pool and return a non-zero exit code.
    #[default]
    Exit,
    /// Keep serving with the workers still alive; do not restart any more. With no
    /// worker left, the listeners are paused so that clients are refused at once.
    Keep,
}

/// Timeouts and the restart policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Policy {
    pub(crate) restart_limit: usize,
    pub(crate) restart_window: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) min_uptime: Duration,
    pub(crate) ready_timeout: Duration,
    pub(crate) heartbeat_interval: Duration,
    /// `None`: a silent worker is never killed (a late one is still taken out of
    /// rotation).
    pub(crate) heartbeat_timeout: Option<Duration>,
    pub(crate) drain_timeout: Duration,
    pub(crate) on_give_up: GiveUpAction,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            restart_limit: 10,
            restart_window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            min_uptime: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Some(Duration::from_secs(10)),
            drain_timeout: Duration::from_secs(30),
            on_give_up: GiveUpAction::Exit,
        }
    }
}

impl Policy {
    /// The delay before the `n`-th consecutive quick restart of a slot (n >= 1).
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }

    /// How long after its last heartbeat a worker is taken out of rotation.
    fn late_after(interval: Duration) -> Duration {
        interval * 2 + Duration::from_millis(100)
    }
}

/// Something that happened, reported to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// The process of worker `id` runs as `pid`.
    Spawned { id: u64, pid: u32 },
    /// The process of worker `id` could not be started.
    SpawnFailed { id: u64, error: String },
    /// Worker `id` said `Ready`. `heartbeats`: it must send heartbeats from now on
    /// (a Node.js worker written without the package sends none until it opts in).
    Ready { id: u64, heartbeats: bool },
    /// Worker `id` sent a heartbeat.
    Heartbeat { id: u64, active: u32 },
    /// Worker `id` announced its end.
    Suicide { id: u64, reason: String },
    /// Worker `id`'s channel closed or broke the protocol.
    ChannelClosed { id: u64, error: Option<String> },
    /// Worker `id` holds descriptors it has not acknowledged for too long: out of
    /// rotation until [`Input::Resumed`].
    Stalled { id: u64, reason: String },
    /// Worker `id` made progress again.
    Resumed { id: u64 },
    /// Worker `id` stayed stalled for the heartbeat timeout: kill and replace it.
    Unresponsive { id: u64, reason: String },
    /// Worker `id` reached a recycle limit: replace it, drain-first.
    Recycle { id: u64, reason: String },
    /// Worker `id`'s process ended (reaped).
    Exited { id: u64, exit: ExitInfo },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Start a worker process for `slot`, known as `id`, with the configuration of
    /// `generation`.
    Spawn { slot: u32, id: u64, generation: u64 },
    /// Put worker `id` into the dispatch rotation, or take it out.
    Rotate { id: u64, on: bool },
    /// Send `Drain` to worker `id`.
    Drain { id: u64, deadline: Duration },
    /// SIGKILL worker `id` (and its process group).
    Kill { id: u64 },
    /// Tell users and logs.
    Publish(Event),
    /// Close the listeners' accept loops.
    StopAccepting,
    /// Refuse (`true`) or take again (`false`) connections: no worker is left `Ready`
    /// (late or stalled ones count as left) after a give-up with `on_give_up = keep`.
    Pause(bool),
    /// A reload was requested while another ran, and that one is over: start it now
    /// (the driver re-reads the configuration).
    StartQueuedReload,
    /// Every worker is gone after a stop: the master returns `code`.
    Exit { code: i32 },
}

/// Why a reload or scale request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    Stopping,
    OutOfRange { requested: usize, max: usize },
}

/// What a reload request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadStart {
    /// Rolling over to this generation.
    Started(u64),
    /// Another reload runs; this one follows it.
    Queued,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Starting,
    Ready,
    Draining,
    Leaving,
    Hung,
    Lost,
}

#[derive(Debug)]
struct Proc {
    slot: u32,
    generation: u64,
    pid: Option<u32>,
    state: ProcState,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    /// `Ready` arrived before the spawner reported the pid.
    ready_pending: Option<bool>,
    /// Heartbeats are expected.
    heartbeats: bool,
    last_heartbeat: Instant,
    heartbeat_interval: Duration,
    heartbeat_timeout: Option<Duration>,
    /// Out of rotation: the heartbeat is late.
    late: bool,
    /// Out of rotation: descriptors sent to it are not acknowledged.
    stalled: bool,
    /// What the dispatcher was last told.
    rotating: bool,
    /// Ready timeout, drain deadline, lost-channel grace or re-kill, by state.
    deadline: Option<Instant>,
    killed: bool,
    /// A kill was decided before the pid was known.
    kill_pending: bool,
    active: u32,
    /// When its channel closed.
    lost_at: Option<Instant>,
}

impl Proc {
    fn serving(&self) -> bool {
        self.state == ProcState::Ready && !self.late && !self.stalled
    }

    /// How long it had been ready when it stopped serving (`None`: never ready).
    fn uptime(&self, now: Instant) -> Option<Duration> {
        let end = self.lost_at.unwrap_or(now);
        self.ready_at.map(|t| end.saturating_duration_since(t))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Reload,
    Recycle(String),
}

#[derive(Debug, Clone)]
struct Successor {
    id: u64,
    purpose: Purpose,
}

#[derive(Debug, Default)]
struct Slot {
    current: Option<u64>,
    successor: Option<Successor>,
    restarts: u32,
    consecutive_failures: u32,
    restart_at: Option<Instant>,
    stopped: bool,
    /// A failed recycle is tried again no sooner than this.
    recycle_not_before: Option<Instant>,
    recycle_failures: u32,
}

#[derive(Debug)]
struct Reload {
    generation: u64,
    /// The configuration in effect before, for a rollback.
    previous_generation: u64,
    previous_policy: Policy,
    next_slot: u32,
    /// The new worker this reload waits for in a slot: ready, then settled for
    /// `min_uptime`, then it takes the slot.
    waiting: Option<(u32, u64)>,
    /// A rollback: only slots whose worker is of this (failed) generation.
    only: Option<u64>,
    /// The pool had given up before this reload, with these slots stopped: a failed
    /// reload gives them back (the slots it did not reach would stay empty, with no
    /// restart due and no give-up to show for it).
    gave_up_before: Option<Vec<bool>>,
}

/// The pool's lifecycle state.
#[derive(Debug)]
pub(crate) struct Supervisor {
    policy: Policy,
    target: usize,
    /// The generation whose configuration is in effect (new workers get it).
    generation: u64,
    next_generation: u64,
    next_id: u64,
    procs: BTreeMap<u64, Proc>,
    slots: Vec<Slot>,
    restart_log: VecDeque<Instant>,
    gave_up: bool,
    paused: bool,
    /// `Some(graceful)` once a stop began.
    stopping: Option<bool>,
    exit_code: i32,
    exited: bool,
    reload: Option<Reload>,
    reload_pending: bool,
    restarts_total: u64,
    give_ups: u64,
    out: Vec<Action>,
}

impl Supervisor {
    /// A pool of `workers` slots; call [`Supervisor::start`] to spawn them.
    pub(crate) fn new(policy: Policy, workers: usize) -> Supervisor {
        Supervisor {
            policy,
            target: workers,
            generation: 0,
            next_generation: 1,
            next_id: 1,
            procs: BTreeMap::new(),
            slots: Vec::new(),
            restart_log: VecDeque::new(),
            gave_up: false,
            paused: false,
            stopping: None,
            exit_code: 0,
            exited: false,
            reload: None,
            reload_pending: false,
            restarts_total: 0,
            give_ups: 0,
            out: Vec::new(),
        }
    }

    /// Spawns the first worker of every slot.
    pub(crate) fn start(&mut self, now: Instant) {
        for slot in 0..self.target {
            self.slots.push(Slot::default());
            self.spawn_current(now, slot as u32);
        }
    }

    /// The actions decided since the last call.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// The generation whose configuration is in effect.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn gave_up(&self) -> bool {
        self.gave_up
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Stopping at once (SIGQUIT, `stop --now`): nothing waits for a drain.
    pub(crate) fn stopping_now(&self) -> bool {
        self.stopping == Some(false)
    }

    pub(crate) fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// While a reload runs: the generation a failure rolls back to.
    pub(crate) fn rollback_generation(&self) -> Option<u64> {
        self.reload.as_ref().map(|r| r.previous_generation)
    }

    /// Restarts since the master started.
    pub(crate) fn restarts_total(&self) -> u64 {
        self.restarts_total
    }

    /// Give-ups since the master started.
    pub(crate) fn give_ups(&self) -> u64 {
        self.give_ups
    }

    /// Boot failures counted in the window ending `now`.
    pub(crate) fn restarts_in_window(&self, now: Instant) -> usize {
        self.restart_log
            .iter()
            .filter(|t| now.duration_since(**t) < self.policy.restart_window)
            .count()
    }

    /// Worker processes alive (including draining ones).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.procs.len()
    }

    /// Whether worker `id` is its slot's current, ready worker (the one a recycle
    /// would replace).
    pub(crate) fn is_current_ready(&self, id: u64) -> bool {
        self.procs.get(&id).is_some_and(|p| {
            p.state == ProcState::Ready
                && self
                    .slots
                    .get(p.slot as usize)
                    .is_some_and(|s| s.current == Some(id) && s.successor.is_none())
        })
    }

    /// The earliest moment [`Supervisor::tick`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let procs = self.procs.values().flat_map(|p| {
            let mut d = [p.deadline, None, None];
            // The late check runs with the timeout off too: only the kill is off.
            if p.state == ProcState::Ready && p.heartbeats {
                if !p.late {
                    d[1] = Some(p.last_heartbeat + Policy::late_after(p.heartbeat_interval));
                }
                d[2] = p.heartbeat_timeout.map(|t| p.last_heartbeat + t);
            }
            d.into_iter().flatten()
        });
        let slots = self
            .slots
            .iter()
            .flat_map(|s| [s.restart_at, s.recycle_not_before])
            .flatten();
        // Only for a worker still ready: for one that left, the instant would pass and
        // stay past (the loop would spin until it exits).
        let settle = self
            .reload
            .as_ref()
            .and_then(|r| r.waiting)
            .and_then(|(_, id)| self.procs.get(&id))
            .filter(|p| p.state == ProcState::Ready)
            .and_then(|p| p.ready_at)
            .map(|t| t + self.policy.min_uptime);
        procs.chain(slots).chain(settle).min()
    }

    /// Applies one input.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Spawned { id, pid } => self.on_spawned(now, id, pid),
            Input::SpawnFailed { id, error } => {
                if let Some(p) = self.procs.get(&id) {
                    self.publish(Event::SpawnFailed {
                        slot: p.slot,
                        id,
                        error,
                    });
                }
                self.on_exit(now, id, None);
            }
            Input::Ready { id, heartbeats } => self.on_ready(now, id, heartbeats),
            Input::Heartbeat { id, active } => self.on_heartbeat(now, id, active),
            Input::Suicide { id, reason } => self.on_suicide(now, id, reason),
            Input::ChannelClosed { id, error } => self.on_channel_closed(now, id, error),
            Input::Stalled { id, reason } => {
                if let Some(p) = self.procs.get_mut(&id) {
                    if p.state == ProcState::Ready && !p.stalled {
                        p.stalled = true;
                        let slot = p.slot;
                        self.publish(Event::WorkerStalled { slot, id, reason });
                        self.sync_rotation(id);
                    }
                }
            }
            Input::Resumed { id } => {
                if let Some(p) = self.procs.get_mut(&id) {
                    if p.stalled {
                        p.stalled = false;
                        if p.serving() {
                            let slot = p.slot;
                            self.publish(Event::WorkerResumed { slot, id });
                        }
                        self.sync_rotation(id);
                    }
                }
            }
            Input::Unresponsive { id, reason } => {
                if self
                    .procs
                    .get(&id)
                    .is_some_and(|p| p.state == ProcState::Ready)
                {
                    self.hang(now, id, reason);
                }
            }
            Input::Recycle { id, reason } => self.on_recycle(now, id, reason),
            Input::Exited { id, exit } => self.on_exit(now, id, Some(exit)),
        }
        self.settle(now);
    }

    /// Acts on every deadline that has passed: ready and heartbeat timeouts, drain
    /// deadlines, restarts whose backoff is over, reloads whose new worker settled.
    pub(crate) fn tick(&mut self, now: Instant) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            let Some(p) = self.procs.get_mut(&id) else {
                continue;
            };
            let (slot, state, killed) = (p.slot, p.state, p.killed);
            if p.state == ProcState::Ready && p.heartbeats {
                let silent = now.saturating_duration_since(p.last_heartbeat);
                if p.heartbeat_timeout.is_some_and(|t| silent >= t) {
                    self.hang(
                        now,
                        id,
                        format!("no heartbeat for {}", humantime::format_duration(silent)),
                    );
                    continue;
                }
                if !p.late && silent >= Policy::late_after(p.heartbeat_interval) {
                    p.late = true;
                    self.publish(Event::WorkerStalled {
                        slot,
                        id,
                        reason: format!(
                            "no heartbeat for {}",
                            humantime::format_duration(truncate_ms(silent))
                        ),
                    });
                    self.sync_rotation(id);
                }
            }
            let Some(p) = self.procs.get_mut(&id) else {
                continue;
            };
            if p.deadline.is_none_or(|d| d > now) {
                continue;
            }
            match state {
                // Killed by a forced stop before it was ready: no timeout to report.
                ProcState::Starting if !killed => {
                    p.state = ProcState::Hung;
                    let timeout = self.policy.ready_timeout;
                    self.publish(Event::WorkerReadyTimeout { slot, id, timeout });
                }
                ProcState::Draining | ProcState::Leaving if !killed => {
                    let pid = p.pid.unwrap_or(0);
                    self.publish(Event::WorkerKilled { slot, id, pid });
                }
                _ => {}
            }
            self.kill(now, id);
        }
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            if s.restart_at.is_some_and(|t| t <= now) {
                s.restart_at = None;
                if self.stopping.is_none() && !self.gave_up {
                    self.spawn_current(now, slot as u32);
                }
            }
            let s = &mut self.slots[slot];
            if s.recycle_not_before.is_some_and(|t| t <= now) {
                s.recycle_not_before = None;
            }
        }
        self.settle(now);
    }

    /// After every input and tick: move a reload on, pause or resume the listeners,
    /// and finish a stop.
    ///
    /// The listeners are paused only when no worker is left `Ready` after a give-up. A
    /// `Ready` worker that is late or stalled still counts: it is out of rotation, but
    /// may come back any moment (a GC pause), and pausing would close the sockets the
    /// accept loop holds for it, as nothing does without a give-up.
    fn settle(&mut self, now: Instant) {
        self.step_reload(now);
        if self.stopping.is_none() {
            let left = self.procs.values().any(|p| p.state == ProcState::Ready);
            if self.gave_up && !left && !self.paused {
                self.paused = true;
                self.out.push(Action::Pause(true));
                self.publish(Event::ListenersPaused { paused: true });
            } else if self.paused && left {
                self.paused = false;
                self.out.push(Action::Pause(false));
                self.publish(Event::ListenersPaused { paused: false });
            }
        }
        self.check_stopped();
    }

    /// Starts a rolling reload into a new generation under `policy`. A reload
    /// requested while one is running is queued (several requests coalesce into one,
    /// which starts with [`Action::StartQueuedReload`]).
    pub(crate) fn reload(&mut self, now: Instant, policy: Policy) -> Result<ReloadStart, Refused> {
        if self.stopping.is_some() {
            return Err(Refused::Stopping);
        }
        if self.reload.is_some() {
            self.reload_pending = true;
            return Ok(ReloadStart::Queued);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let previous_policy = std::mem::replace(&mut self.policy, policy);
        let previous_generation = std::mem::replace(&mut self.generation, generation);
        // A reload is a fresh start: new code deserves a new restart budget.
        let gave_up_before = self
            .gave_up
            .then(|| self.slots.iter().map(|s| s.stopped).collect());
        self.gave_up = false;
        self.restart_log.clear();
        for s in &mut self.slots {
            s.stopped = false;
            s.consecutive_failures = 0;
        }
        self.publish(Event::ReloadStarted { generation });
        self.reload = Some(Reload {
            generation,
            previous_generation,
            previous_policy,
            next_slot: 0,
            waiting: None,
            only: None,
            gave_up_before,
        });
        self.settle(now);
        Ok(ReloadStart::Started(generation))
    }

    /// The generation a reload would get (for the driver's configuration map).
    pub(crate) fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Changes the number of workers: new slots start at once, removed slots drain
    /// (and a reload or recycle in progress in them ends).
    pub(crate) fn scale(&mut self, now: Instant, workers: usize) -> Result<(), Refused> {
        if self.stopping.is_some() {
            return Err(Refused::Stopping);
        }
        if workers == 0 || workers > super::MAX_WORKERS {
            return Err(Refused::OutOfRange {
                requested: workers,
                max: super::MAX_WORKERS,
            });
        }
        let from = self.target;
        self.target = workers;
        if workers > from {
            for slot in from..workers {
                if slot >= self.slots.len() {
                    self.slots.push(Slot::default());
                }
                self.spawn_current(now, slot as u32);
            }
        } else {
            for slot in workers..from {
                let Some(s) = self.slots.get_mut(slot) else {
                    continue;
                };
                let current = s.current.take();
                let successor = s.successor.take();
                for id in current.into_iter().chain(successor.map(|s| s.id)) {
                    self.drain(now, id);
                }
            }
            self.slots.truncate(workers);
            if let Some(r) = &mut self.reload {
                if r.waiting.is_some_and(|(slot, _)| slot as usize >= workers) {
                    r.waiting = None;
                }
            }
        }
        if from != workers {
            self.publish(Event::Scaled { from, to: workers });
        }
        self.settle(now);
        Ok(())
    }

    /// Stops the pool: drain every worker (`graceful`) or kill them all. A forced stop
    /// during a graceful one kills what is left.
    pub(crate) fn stop(&mut self, now: Instant, graceful: bool) {
        match self.stopping {
            Some(false) => return,
            Some(true) if graceful => return,
            Some(true) => {}
            None => self.out.push(Action::StopAccepting),
        }
        self.stopping = Some(graceful);
        self.reload = None;
        self.reload_pending = false;
        self.publish(Event::Stopping { graceful });
        for s in &mut self.slots {
            s.restart_at = None;
        }
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            if graceful {
                self.drain(now, id);
            } else if !self.procs.get(&id).is_some_and(|p| p.killed) {
                self.kill(now, id);
            }
        }
        self.check_stopped();
    }

    /// One row per live worker and per slot waiting for one.
    pub(crate) fn status(&self, now: Instant) -> Vec<WorkerStatus> {
        let mut rows: Vec<WorkerStatus> = self
            .procs
            .iter()
            .map(|(id, p)| WorkerStatus {
                slot: p.slot,
                id: *id,
                pid: p.pid,
                state: match p.state {
                    ProcState::Starting => WorkerState::Starting,
                    ProcState::Ready if p.late || p.stalled => WorkerState::Stalled,
                    ProcState::Ready => WorkerState::Ready,
                    ProcState::Draining => WorkerState::Draining,
                    ProcState::Leaving => WorkerState::Leaving,
                    ProcState::Hung => WorkerState::Hung,
                    ProcState::Lost => WorkerState::Lost,
                },
                generation: p.generation,
                uptime_ms: now.duration_since(p.spawned_at).as_millis() as u64,
                active: p.active,
                restarts: self.slots.get(p.slot as usize).map_or(0, |s| s.restarts),
                ..WorkerStatus::default()
            })
            .collect();
        for (slot, s) in self.slots.iter().enumerate() {
            if s.current.is_some() {
                continue;
            }
            let state = if s.restart_at.is_some() {
                WorkerState::Backoff
            } else {
                WorkerState::Stopped
            };
            rows.push(WorkerStatus {
                slot: slot as u32,
                state,
                generation: self.generation,
                restarts: s.restarts,
                ..WorkerStatus::default()
            });
        }
        rows.sort_by_key(|r| (r.slot, r.id));
        rows
    }

    fn publish(&mut self, event: Event) {
        self.out.push(Action::Publish(event));
    }

    fn new_proc(&mut self, now: Instant, slot: u32, generation: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.procs.insert(
            id,
            Proc {
                slot,
                generation,
                pid: None,
                state: ProcState::Starting,
                spawned_at: now,
                ready_at: None,
                ready_pending: None,
                heartbeats: false,
                last_heartbeat: now,
                heartbeat_interval: self.policy.heartbeat_interval,
                heartbeat_timeout: self.policy.heartbeat_timeout,
                late: false,
                stalled: false,
                rotating: false,
                deadline: Some(now + self.policy.ready_timeout),
                killed: false,
                kill_pending: false,
                active: 0,
                lost_at: None,
            },
        );
        self.out.push(Action::Spawn {
            slot,
            id,
            generation,
        });
        id
    }

    fn spawn_current(&mut self, now: Instant, slot: u32) -> u64 {
        let id = self.new_proc(now, slot, self.generation);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.current = Some(id);
            s.restart_at = None;
        }
        id
    }

    fn spawn_successor(&mut self, now: Instant, slot: u32, purpose: Purpose) -> u64 {
        // A recycle replaces a worker with one like it. While a reload runs, the
        // configuration it rolls out is for the reload's own successors: a slot not
        // rolled over yet keeps the one before, so that a failed reload leaves none of
        // the new configuration behind.
        let generation = match (&purpose, &self.reload) {
            (Purpose::Recycle(_), Some(r)) if r.only.is_none() => {
                let old = self.slots[slot as usize]
                    .current
                    .and_then(|id| self.procs.get(&id))
                    .map(|p| p.generation);
                if old == Some(r.generation) {
                    r.generation
                } else {
                    r.previous_generation
                }
            }
            _ => self.generation,
        };
        let id = self.new_proc(now, slot, generation);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.successor = Some(Successor { id, purpose });
        }
        id
    }

    /// Tells the dispatcher whether worker `id` takes connections, if that changed.
    fn sync_rotation(&mut self, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        let on = p.serving() && self.stopping.is_none();
        if p.rotating != on {
            p.rotating = on;
            self.out.push(Action::Rotate { id, on });
        }
    }

    fn kill(&mut self, now: Instant, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.killed = true;
        p.deadline = Some(now + REKILL_AFTER);
        if p.pid.is_some() {
            self.out.push(Action::Kill { id });
        } else {
            p.kill_pending = true;
        }
        self.sync_rotation(id);
    }

    /// A ready worker stopped answering: out of rotation, killed, replaced at its exit.
    fn hang(&mut self, now: Instant, id: u64, reason: String) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.state = ProcState::Hung;
        let (slot, pid) = (p.slot, p.pid.unwrap_or(0));
        self.sync_rotation(id);
        self.publish(Event::WorkerHung {
            slot,
            id,
            pid,
            reason,
        });
        self.kill(now, id);
    }

    /// Asks worker `id` to finish and exit (planned: no restart follows). The caller
    /// has detached it from its slot.
    fn drain(&mut self, now: Instant, id: u64) {
        let drain_timeout = self.policy.drain_timeout;
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        let slot = p.slot;
        match p.state {
            ProcState::Starting => {
                // Holds no connection yet: nothing to finish.
                p.state = ProcState::Draining;
                self.kill(now, id);
            }
            ProcState::Ready => {
                p.state = ProcState::Draining;
                p.deadline = Some(now + drain_timeout);
                self.sync_rotation(id);
                self.out.push(Action::Drain {
                    id,
                    deadline: drain_timeout,
                });
                self.publish(Event::WorkerDraining { slot, id });
            }
            ProcState::Draining | ProcState::Leaving => {
                // Already on its way out: a stop does not extend its deadline.
                p.state = ProcState::Draining;
                let limit = now + drain_timeout;
                if !p.killed {
                    p.deadline = Some(p.deadline.map_or(limit, |d| d.min(limit)));
                }
            }
            ProcState::Hung | ProcState::Lost => {}
        }
        self.detach(slot, id);
    }

    /// Worker `id` is no longer its slot's current worker or successor.
    fn detach(&mut self, slot: u32, id: u64) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            if s.current == Some(id) {
                s.current = None;
            }
            if s.successor.as_ref().is_some_and(|x| x.id == id) {
                s.successor = None;
            }
        }
    }

    fn on_spawned(&mut self, now: Instant, id: u64, pid: u32) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.pid = Some(pid);
        let (slot, generation) = (p.slot, p.generation);
        let kill = std::mem::take(&mut p.kill_pending);
        let ready = p.ready_pending.take();
        self.publish(Event::WorkerSpawned {
            slot,
            id,
            pid,
            generation,
        });
        if kill {
            self.kill(now, id);
        } else if let Some(heartbeats) = ready {
            self.on_ready(now, id, heartbeats);
        }
    }

    fn on_ready(&mut self, now: Instant, id: u64, heartbeats: bool) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if p.state != ProcState::Starting {
            return;
        }
        let Some(pid) = p.pid else {
            // The spawner's pid is the one to trust: wait for it.
            p.ready_pending = Some(heartbeats);
            return;
        };
        p.state = ProcState::Ready;
        p.ready_at = Some(now);
        p.heartbeats = heartbeats;
        p.last_heartbeat = now;
        p.deadline = None;
        let slot = p.slot;
        self.sync_rotation(id);
        self.publish(Event::WorkerReady { slot, id, pid });
        // A recycle's replacement takes over at once; a reload's waits to settle.
        let recycle = self
            .slots
            .get(slot as usize)
            .and_then(|s| s.successor.as_ref())
            .filter(|s| s.id == id)
            .and_then(|s| match &s.purpose {
                Purpose::Recycle(reason) => Some(reason.clone()),
                Purpose::Reload => None,
            });
        if let Some(reason) = recycle {
            if let Some(old) = self.promote(now, slot, id) {
                self.slots[slot as usize].recycle_failures = 0;
                self.publish(Event::Recycled {
                    slot,
                    old,
                    new: id,
                    reason,
                });
            }
        }
    }

    /// The successor `id` takes slot `slot`; the old current worker drains. Returns
    /// the old worker's id.
    fn promote(&mut self, now: Instant, slot: u32, id: u64) -> Option<u64> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.successor.as_ref().is_some_and(|x| x.id == id) {
            s.successor = None;
        }
        let old = s.current.replace(id).filter(|old| *old != id);
        if let Some(old) = old {
            self.drain(now, old);
        }
        old
    }

    fn on_heartbeat(&mut self, now: Instant, id: u64, active: u32) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.active = active;
        p.last_heartbeat = now;
        if p.state == ProcState::Ready {
            // A worker that heartbeats is held to it (a Node.js worker opts in with
            // its first heartbeat).
            p.heartbeats = true;
            if p.late {
                p.late = false;
                let slot = p.slot;
                if p.serving() {
                    self.publish(Event::WorkerResumed { slot, id });
                }
                self.sync_rotation(id);
            }
        }
    }

    fn on_channel_closed(&mut self, now: Instant, id: u64, error: Option<String>) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        let slot = p.slot;
        // A worker on its way out closes its channel as it should: nothing to say.
        if !matches!(p.state, ProcState::Starting | ProcState::Ready) {
            return;
        }
        p.state = ProcState::Lost;
        p.lost_at = Some(now);
        if !p.killed {
            let grace = now + CHANNEL_CLOSED_GRACE;
            p.deadline = Some(p.deadline.map_or(grace, |d| d.min(grace)));
        }
        self.sync_rotation(id);
        self.publish(Event::WorkerChannelClosed { slot, id, error });
    }

    fn on_suicide(&mut self, now: Instant, id: u64, reason: String) {
        let drain_timeout = self.policy.drain_timeout;
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if !matches!(p.state, ProcState::Starting | ProcState::Ready) {
            return;
        }
        let slot = p.slot;
        let was_ready = p.ready_at.is_some();
        let uptime = p.uptime(now);
        p.state = ProcState::Leaving;
        if !p.killed {
            p.deadline = Some(now + drain_timeout);
        }
        self.sync_rotation(id);
        // After every connection sent to it: the worker's `Incoming` ends here.
        self.out.push(Action::Drain {
            id,
            deadline: drain_timeout,
        });
        self.publish(Event::WorkerSuicide { slot, id, reason });
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.current == Some(id) {
            s.current = None;
            if let Some(next) = self.take_live_successor(now, slot) {
                // The replacement being prepared takes the slot now.
                self.slots[slot as usize].current = Some(next);
                if self
                    .procs
                    .get(&next)
                    .is_some_and(|p| p.state == ProcState::Ready)
                {
                    self.sync_rotation(next);
                }
            } else {
                // The worker a reload waits for (it took the slot early): the reload
                // fails first, so that the replacement is of the configuration before.
                if self
                    .reload
                    .as_ref()
                    .is_some_and(|r| r.waiting.is_some_and(|(_, w)| w == id))
                {
                    self.reload_failed(now, slot, "the new worker announced its end");
                }
                // A serving worker is replaced at once; one that announces its end
                // before it was ready is a boot failure like any other (backoff).
                self.restart(now, slot, was_ready, uptime, was_ready);
            }
        } else if s.successor.as_ref().is_some_and(|x| x.id == id) {
            let purpose = s.successor.take().map(|x| x.purpose);
            self.successor_failed(now, slot, id, purpose, "the new worker announced its end");
        }
    }

    fn on_recycle(&mut self, now: Instant, id: u64, reason: String) {
        if self.stopping.is_some() || !self.is_current_ready(id) {
            return;
        }
        let Some(p) = self.procs.get(&id) else {
            return;
        };
        let slot = p.slot;
        let s = &self.slots[slot as usize];
        if s.recycle_not_before.is_some() {
            return;
        }
        // A reload about to roll this slot over replaces it anyway.
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.waiting.is_some_and(|(w, _)| w == slot))
        {
            return;
        }
        self.publish(Event::RecycleStarted {
            slot,
            id,
            reason: reason.clone(),
        });
        self.spawn_successor(now, slot, Purpose::Recycle(reason));
    }

    /// Worker `id` is gone: reaped (`exit`) or never started (`None`).
    fn on_exit(&mut self, now: Instant, id: u64, exit: Option<ExitInfo>) {
        let Some(mut p) = self.procs.remove(&id) else {
            return;
        };
        let slot = p.slot;
        if p.rotating {
            p.rotating = false;
            self.out.push(Action::Rotate { id, on: false });
        }
        let (is_current, successor) = match self.slots.get_mut(slot as usize) {
            Some(s) if s.current == Some(id) => {
                s.current = None;
                (true, None)
            }
            Some(s) if s.successor.as_ref().is_some_and(|x| x.id == id) => {
                (false, s.successor.take().map(|x| x.purpose))
            }
            _ => (false, None),
        };
        let planned =
            matches!(p.state, ProcState::Draining | ProcState::Leaving) || self.stopping.is_some();
        let failure = !planned && (is_current || successor.is_some());
        if let Some(exit) = exit {
            self.publish(Event::WorkerExited {
                slot,
                id,
                pid: p.pid.unwrap_or(0),
                exit,
                planned,
                failure,
            });
        }
        let reason = match exit {
            Some(exit) => format!("the new worker ended with {exit}"),
            None => "the new worker could not be spawned".to_owned(),
        };
        if successor.is_some() {
            if !planned {
                self.successor_failed(now, slot, id, successor, &reason);
            }
            return;
        }
        if !failure {
            return;
        }
        if is_current {
            if let Some(next) = self.take_live_successor(now, slot) {
                // The replacement being prepared (reload or recycle) takes the slot
                // now, as after a suicide: no second replacement.
                self.slots[slot as usize].current = Some(next);
                if self
                    .procs
                    .get(&next)
                    .is_some_and(|p| p.state == ProcState::Ready)
                {
                    self.sync_rotation(next);
                }
                return;
            }
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.waiting.is_some_and(|(_, w)| w == id))
        {
            // The worker the reload waited for was the slot's current one (a suicide
            // handed it the slot early): the reload fails, the slot restarts.
            self.reload_failed(now, slot, &reason);
        }
        let was_ready = p.ready_at.is_some();
        let mut uptime = p.uptime(now);
        if exit.is_some_and(|e| e.killed_from_outside()) && was_ready && !p.killed {
            // Killed by an operator or the OOM killer after it served: not its fault.
            uptime = Some(Duration::MAX);
        }
        self.restart(now, slot, was_ready, uptime, false);
    }

    /// Takes `slot`'s successor to take the slot over: one starting or ready. One on
    /// its way out (hung, lost, announced its end: a failed reload's new worker, say)
    /// is let go of, its reload or recycle failed if that was not said yet: the slot is
    /// restarted instead, and that worker's exit counts for nothing.
    fn take_live_successor(&mut self, now: Instant, slot: u32) -> Option<u64> {
        let next = self.slots.get_mut(slot as usize)?.successor.take()?;
        let p = self.procs.get(&next.id)?;
        if matches!(p.state, ProcState::Starting | ProcState::Ready) {
            return Some(next.id);
        }
        let reason = end_reason(p);
        self.successor_failed(now, slot, next.id, Some(next.purpose), reason);
        None
    }

    /// The successor of `slot` (worker `id`) failed before it took over.
    fn successor_failed(
        &mut self,
        now: Instant,
        slot: u32,
        id: u64,
        purpose: Option<Purpose>,
        reason: &str,
    ) {
        let waited_for = self
            .reload
            .as_ref()
            .is_some_and(|r| r.waiting.is_some_and(|(_, w)| w == id));
        match purpose {
            Some(Purpose::Reload) if waited_for => self.reload_failed(now, slot, reason),
            Some(Purpose::Reload) => {}
            Some(Purpose::Recycle(_)) => {
                let s = &mut self.slots[slot as usize];
                s.recycle_failures += 1;
                let delay = self
                    .policy
                    .backoff(s.recycle_failures)
                    .max(Duration::from_secs(1));
                s.recycle_not_before = Some(now + delay);
                self.publish(Event::RecycleFailed {
                    slot,
                    reason: reason.to_owned(),
                });
            }
            None => {}
        }
    }

    /// The reload's new worker failed: the reload stops, the configuration in effect
    /// goes back to the previous one, and slots already rolled over roll back.
    fn reload_failed(&mut self, now: Instant, slot: u32, reason: &str) {
        let Some(r) = self.reload.take() else { return };
        self.publish(Event::ReloadFailed {
            generation: r.generation,
            slot,
            reason: reason.to_owned(),
        });
        if r.only.is_some() {
            // A rollback failed too: keep what runs.
            self.generation = r.previous_generation;
            self.policy = r.previous_policy;
            self.queue_pending();
            return;
        }
        self.generation = r.previous_generation;
        self.policy = r.previous_policy.clone();
        if let Some(stopped) = &r.gave_up_before {
            self.gave_up = true;
            for (s, was) in self.slots.iter_mut().zip(stopped) {
                // A restart the reload's new worker scheduled is dropped with it.
                if *was && s.current.is_none() && s.successor.is_none() {
                    s.restart_at = None;
                    s.stopped = true;
                }
            }
        }
        let rolled = self.slots.iter().any(|s| {
            s.current
                .and_then(|id| self.procs.get(&id))
                .is_some_and(|p| p.generation == r.generation)
        });
        if rolled {
            self.publish(Event::RollbackStarted {
                failed: r.generation,
                generation: r.previous_generation,
            });
            self.reload = Some(Reload {
                generation: r.previous_generation,
                previous_generation: r.previous_generation,
                previous_policy: r.previous_policy,
                next_slot: 0,
                waiting: None,
                only: Some(r.generation),
                gave_up_before: None,
            });
            self.step_reload(now);
        } else {
            self.queue_pending();
        }
    }

    fn queue_pending(&mut self) {
        if std::mem::take(&mut self.reload_pending) {
            self.out.push(Action::StartQueuedReload);
        }
    }

    /// Slot `slot` lost its current worker: restart it, unless a boot failure would
    /// exceed the limit. `was_ready`: the lost worker had said `Ready`; `uptime`: for
    /// how long. `immediate`: no backoff (a worker that announced its end is replaced
    /// at once).
    ///
    /// Only boot failures count toward the limit (the worker never became ready:
    /// a crash loop at start, as gunicorn halts on boot errors). A worker that became
    /// ready is always replaced: at once when it served for `min_uptime` (at least
    /// [`HEALTHY_UPTIME_FLOOR`]) or was killed from outside, after a short backoff (at
    /// most a second) when it died young.
    fn restart(
        &mut self,
        now: Instant,
        slot: u32,
        was_ready: bool,
        uptime: Option<Duration>,
        immediate: bool,
    ) {
        if self.stopping.is_some() || slot as usize >= self.slots.len() {
            return;
        }
        if self.gave_up {
            self.slots[slot as usize].stopped = true;
            return;
        }
        if !was_ready {
            let window = self.policy.restart_window;
            while self
                .restart_log
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                self.restart_log.pop_front();
            }
            if self.restart_log.len() >= self.policy.restart_limit {
                self.slots[slot as usize].stopped = true;
                self.give_up(now);
                return;
            }
            self.restart_log.push_back(now);
        }
        self.restarts_total += 1;
        let healthy_after = self.policy.min_uptime.max(HEALTHY_UPTIME_FLOOR);
        let healthy = was_ready && uptime.is_some_and(|u| u >= healthy_after);
        let s = &mut self.slots[slot as usize];
        s.restarts += 1;
        let delay = if healthy {
            s.consecutive_failures = 0;
            Duration::ZERO
        } else {
            s.consecutive_failures += 1;
            // At once, unless it is a habit: a worker that says Ready and then its end,
            // over and over (a dependency down), would be respawned without pause.
            if immediate && s.consecutive_failures <= 1 {
                Duration::ZERO
            } else if was_ready {
                self.policy
                    .backoff(s.consecutive_failures)
                    .min(READY_BACKOFF_CAP)
            } else {
                self.policy.backoff(s.consecutive_failures)
            }
        };
        let restarts_in_window = self.restarts_in_window(now);
        self.publish(Event::RestartScheduled {
            slot,
            delay,
            restarts_in_window,
        });
        if delay.is_zero() {
            self.spawn_current(now, slot);
        } else {
            self.slots[slot as usize].restart_at = Some(now + delay);
        }
    }

    fn give_up(&mut self, now: Instant) {
        self.gave_up = true;
        self.give_ups += 1;
        self.publish(Event::GiveUp {
            restarts: self.restart_log.len() + 1,
            window: self.policy.restart_window,
        });
        for s in &mut self.slots {
            s.restart_at = None;
            if s.current.is_none() {
                s.stopped = true;
            }
        }
        if self.policy.on_give_up == GiveUpAction::Exit {
            self.exit_code = 1;
            self.stop(now, true);
        }
    }

    /// Moves a rolling reload forward: one slot at a time, at most one extra process,
    /// each new worker ready and settled (`min_uptime`) before its predecessor drains.
    fn step_reload(&mut self, now: Instant) {
        let settle = self.policy.min_uptime;
        loop {
            let Some(r) = &mut self.reload else { return };
            if let Some((slot, id)) = r.waiting {
                let Some(p) = self.procs.get(&id) else {
                    // Gone without a failure being reported (scaled away): move on.
                    r.waiting = None;
                    continue;
                };
                if !matches!(p.state, ProcState::Starting | ProcState::Ready) {
                    // It left (Suicide), hung or lost its channel before it settled:
                    // it never will, and its exit would count as planned.
                    let reason = end_reason(p);
                    // It will never take the slot over.
                    if self.slots[slot as usize]
                        .successor
                        .as_ref()
                        .is_some_and(|x| x.id == id)
                    {
                        self.slots[slot as usize].successor = None;
                    }
                    self.reload_failed(now, slot, reason);
                    return;
                }
                let settled = p.state == ProcState::Ready
                    && p.ready_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= settle);
                if !settled {
                    return;
                }
                r.waiting = None;
                self.promote(now, slot, id);
                continue;
            }
            if r.next_slot as usize >= self.target {
                let generation = r.generation;
                let rollback = r.only.is_some();
                self.reload = None;
                if !rollback {
                    self.publish(Event::ReloadFinished { generation });
                }
                self.queue_pending();
                return;
            }
            // Wait until the previous slot's old worker is gone: never more than N+1.
            if self.procs.len() > self.target {
                return;
            }
            let (generation, only) = (r.generation, r.only);
            let slot = r.next_slot;
            r.next_slot += 1;
            let current = self.slots[slot as usize]
                .current
                .and_then(|id| self.procs.get(&id).map(|p| (id, p.generation)));
            let skip = match (only, current) {
                (Some(failed), Some((_, g))) => g != failed,
                (Some(_), None) => true,
                (None, Some((_, g))) => g == generation,
                (None, None) => false,
            };
            if skip {
                continue;
            }
            // A recycle in progress in this slot is overtaken by the reload.
            if let Some(old) = self.slots[slot as usize].successor.take() {
                self.drain(now, old.id);
            }
            let s = &mut self.slots[slot as usize];
            s.stopped = false;
            if current.is_none() {
                // Nothing serves here (backoff, or stopped after a give-up): start the
                // new worker as the slot's own.
                s.restart_at = None;
                self.spawn_current(now, slot);
                continue;
            }
            let new = self.spawn_successor(now, slot, Purpose::Reload);
            if let Some(r) = &mut self.reload {
                r.waiting = Some((slot, new));
            }
            return;
        }
    }

    fn check_stopped(&mut self) {
        if self.stopping.is_some() && self.procs.is_empty() && !self.exited {
            self.exited = true;
            self.publish(Event::Stopped {
                code: self.exit_code,
            });
            self.out.push(Action::Exit {
                code: self.exit_code,
            });
        }
    }
}

/// Why a new worker no longer in state `Starting` or `Ready` will never take over.
fn end_reason(p: &Proc) -> &'static str {
    match (p.state, p.ready_at) {
        (ProcState::Hung, None) => "the new worker did not get ready in time",
        (ProcState::Hung, Some(_)) => "the new worker stopped answering",
        (ProcState::Lost, _) => "the new worker's channel closed",
        _ => "the new worker announced its end",
    }
}

fn truncate_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a supervisor the way the master does, with fake processes: every spawn
    /// gets a pid at once, and the test decides what each worker does.
    struct Harness {
        sm: Supervisor,
        actions: Vec<Action>,
        next_pid: u32,
        /// Answer spawns with `Spawned` at once.
        auto_spawned: bool,
    }

    impl Harness {
        fn new(policy: Policy, workers: usize) -> Harness {
            let mut h = Harness {
                sm: Supervisor::new(policy, workers),
                actions: Vec::new(),
                next_pid: 1000,
                auto_spawned: true,
            };
            h.sm.start(Instant::now());
            h.pump();
            h
        }

        /// Collects actions, answering each Spawn with a Spawned (as the driver does).
        fn pump(&mut self) {
            loop {
                let batch = self.sm.take_actions();
                if batch.is_empty() {
                    return;
                }
                for a in batch {
                    if let (Action::Spawn { id, .. }, true) = (&a, self.auto_spawned) {
                        self.next_pid += 1;
                        self.sm.handle(
                            Instant::now(),
                            Input::Spawned {
                                id: *id,
                                pid: self.next_pid,
                            },
                        );
                    }
                    self.actions.push(a);
                }
            }
        }

        fn input(&mut self, input: Input) {
            self.sm.handle(Instant::now(), input);
            self.pump();
        }

        fn tick(&mut self) {
            self.sm.tick(Instant::now());
            self.pump();
        }

        fn reload(&mut self) -> ReloadStart {
            let policy = self.sm.policy.clone();
            let r = self.sm.reload(Instant::now(), policy).expect("reload");
            self.pump();
            r
        }

        fn scale(&mut self, n: usize) {
            self.sm.scale(Instant::now(), n).expect("scale");
            self.pump();
        }

        /// Advances the paused clock, ticking at every deadline on the way.
        async fn advance(&mut self, by: Duration) {
            let end = Instant::now() + by;
            for _ in 0..10_000 {
                match self.sm.next_deadline() {
                    Some(d) if d <= end => {
                        let step = d.saturating_duration_since(Instant::now());
                        tokio::time::advance(step).await;
                        self.tick();
                    }
                    _ => break,
                }
            }
            let rest = end.saturating_duration_since(Instant::now());
            tokio::time::advance(rest).await;
            self.tick();
        }

        fn spawns(&self) -> Vec<(u32, u64)> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Spawn { slot, id, .. } => Some((*slot, *id)),
                    _ => None,
                })
                .collect()
        }

        fn last_spawn(&self, slot: u32) -> u64 {
            self.spawns()
                .iter()
                .rev()
                .find(|(s, _)| *s == slot)
                .map(|(_, id)| *id)
                .expect("a spawn for the slot")
        }

        fn events(&self) -> Vec<&Event> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Publish(e) => Some(e),
                    _ => None,
                })
                .collect()
        }

        fn count_events(&self, f: impl Fn(&Event) -> bool) -> usize {
            self.events().into_iter().filter(|e| f(e)).count()
        }

        fn ready(&mut self, id: u64) {
            self.input(Input::Ready {
                id,
                heartbeats: true,
            });
        }

        fn crash(&mut self, id: u64) {
            self.exit(id, Some(1), None);
        }

        fn exit(&mut self, id: u64, code: Option<i32>, signal: Option<i32>) {
            self.input(Input::Exited {
                id,
                exit: ExitInfo { code, signal },
            });
        }

        fn position(&self, f: impl Fn(&Action) -> bool) -> usize {
            self.actions.iter().position(f).expect("action present")
        }

        fn has(&self, f: impl Fn(&Action) -> bool) -> bool {
            self.actions.iter().any(f)
        }

        fn state(&self, id: u64) -> Option<ProcState> {
            self.sm.procs.get(&id).map(|p| p.state)
        }

        fn rotating(&self, id: u64) -> bool {
            // Replays the rotation actions, as the dispatcher would.
            let mut on = false;
            for a in &self.actions {
                if let Action::Rotate { id: i, on: o } = a {
                    if *i == id {
                        on = *o;
                    }
                }
            }
            on
        }

        /// Ready workers, rolled past the settle time of any reload.
        async fn settle_reload(&mut self) {
            self.advance(self.sm.policy.min_uptime).await;
        }
    }

    fn quick_policy() -> Policy {
        Policy {
            restart_limit: 3,
            restart_window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            min_uptime: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Some(Duration::from_secs(2)),
            drain_timeout: Duration::from_secs(3),
            on_give_up: GiveUpAction::Exit,
        }
    }

    /// Heartbeats out of the way: the harness's workers send none, and with a
    /// one-hour interval none is ever late within a test.
    fn no_heartbeat_policy() -> Policy {
        Policy {
            heartbeat_interval: Duration::from_secs(3600),
            heartbeat_timeout: None,
            ..quick_policy()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn limit_plus_one_boot_failures_give_up_exactly_once() {
        let policy = quick_policy();
        let limit = policy.restart_limit;
        let mut h = Harness::new(policy, 1);
        for _ in 0..=limit {
            let id = h.last_spawn(0);
            h.crash(id);
            h.advance(Duration::from_secs(2)).await;
        }
        assert_eq!(
            h.spawns().len(),
            limit + 1,
            "initial spawn + limit restarts"
        );
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
        // Nothing spawns afterwards, however long we wait.
        h.advance(Duration::from_secs(120)).await;
        assert_eq!(h.spawns().len(), limit + 1);
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
        // on_give_up = Exit: with no worker left the master exits non-zero.
        assert!(h.actions.contains(&Action::Exit { code: 1 }));
    }

    /// Regression (v0.1, issue 9.3): killing a worker every 500 ms on a 2-worker pool
    /// made the master give up after 12 kills and exit. Workers that became ready are
    /// not boot failures: they are replaced, however often, with a bounded delay.
    #[tokio::test(start_paused = true)]
    async fn killing_ready_workers_every_500ms_never_gives_up() {
        let mut h = Harness::new(Policy::default(), 2);
        for slot in 0..2 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        for k in 0..100u32 {
            let slot = k % 2;
            let victim = h.last_spawn(slot);
            h.advance(Duration::from_millis(500)).await;
            h.exit(victim, None, Some(9));
            // The replacement starts at once and says Ready a few ms later.
            let new = h.last_spawn(slot);
            assert_ne!(new, victim, "replaced at once after kill {k}");
            h.advance(Duration::from_millis(5)).await;
            h.ready(new);
        }
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 0);
        assert!(!h.has(|a| matches!(a, Action::Exit { .. })));
        assert_eq!(h.sm.restarts_total(), 100);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        // A ready worker that crashes young by itself waits, but at most a second,
        // and never gives up either.
        for _ in 0..20 {
            let id = h.last_spawn(0);
            h.crash(id);
            h.advance(READY_BACKOFF_CAP).await;
            let new = h.last_spawn(0);
            assert_ne!(new, id);
            h.ready(new);
        }
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 0);
        let delays: Vec<Duration> = h
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::RestartScheduled { delay, .. } => Some(*delay),
                _ => None,
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= READY_BACKOFF_CAP), "{delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn give_up_keep_serves_with_the_rest_then_pauses_with_none_left() {
        let policy = Policy {
            on_give_up: GiveUpAction::Keep,
            restart_limit: 1,
            ..no_heartbeat_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(b);
        // Slot 0 never boots: 2 boot failures > limit 1.
        h.crash(a);
        h.advance(Duration::from_secs(1)).await;
        let a2 = h.last_spawn(0);
        h.crash(a2);
        h.advance(Duration::from_secs(5)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
        assert!(!h.has(|a| matches!(a, Action::Exit { .. })));
        let rows = h.sm.status(Instant::now());
        assert_eq!(rows[0].state, WorkerState::Stopped);
        assert_eq!(rows[1].state, WorkerState::Ready);
        assert!(
            !h.has(|a| matches!(a, Action::Pause(true))),
            "b still serves"
        );
        // b dies: not restarted after a give-up; nothing serves, so the listeners
        // are paused (clients refused, not left hanging).
        h.crash(b);
        assert!(h.actions.contains(&Action::Pause(true)));
        assert_eq!(h.spawns().len(), 3);
        // A reload re-arms the pool; the first ready worker resumes the listeners.
        h.reload();
        let fresh = h.last_spawn(0);
        h.ready(fresh);
        assert!(h.actions.contains(&Action::Pause(false)));
    }

    /// Review (fifth round): after a give-up with `keep`, the last worker being only
    /// late on its heartbeats (a GC pause) or stalled paused the listeners, which
    /// closed the sockets the accept loop held for it; without a give-up the same
    /// stall just queues. Only a pool with no `Ready` worker left is paused.
    #[tokio::test(start_paused = true)]
    async fn give_up_keep_never_pauses_for_a_late_or_stalled_worker() {
        let policy = Policy {
            on_give_up: GiveUpAction::Keep,
            restart_limit: 0,
            heartbeat_timeout: None,
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(b);
        // Limit 0: the first boot failure gives up.
        h.crash(a);
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
        let paused = |h: &Harness| h.has(|a| matches!(a, Action::Pause(true)));
        // Stalled (descriptors unacknowledged): out of rotation, not paused.
        h.input(Input::Stalled {
            id: b,
            reason: "descriptors unacknowledged".into(),
        });
        assert!(!h.rotating(b));
        assert!(!paused(&h), "a stalled worker paused the listeners");
        h.input(Input::Resumed { id: b });
        assert!(h.rotating(b));
        // Late: no heartbeat for 2 intervals + 100 ms.
        h.advance(Duration::from_secs(2)).await;
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerStalled { id, .. } if *id == b)),
            2
        );
        assert!(!h.rotating(b));
        assert!(!paused(&h), "a late worker paused the listeners");
        h.input(Input::Heartbeat { id: b, active: 0 });
        assert!(h.rotating(b));
        // Gone: nothing is left, the listeners are paused.
        h.crash(b);
        assert!(paused(&h));
    }

    /// After a give-up (keep), a reload that failed before it reached the stopped
    /// slots left them empty with no restart due, and the pool no longer said it had
    /// given up.
    #[tokio::test(start_paused = true)]
    async fn a_failed_reload_after_a_give_up_gives_the_give_up_back() {
        let policy = Policy {
            on_give_up: GiveUpAction::Keep,
            restart_limit: 1,
            ..no_heartbeat_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        // Slot 1 never boots: 2 boot failures > limit 1.
        h.crash(b);
        h.advance(Duration::from_secs(1)).await;
        let b2 = h.last_spawn(1);
        h.crash(b2);
        h.advance(Duration::from_secs(5)).await;
        assert!(h.sm.gave_up());
        let spawns = h.spawns().len();
        // The reload's first new worker (slot 0) fails.
        h.reload();
        let n0 = h.last_spawn(0);
        h.crash(n0);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { generation: 1, .. })),
            1
        );
        assert!(h.sm.gave_up(), "given up again, as before the reload");
        let rows = h.sm.status(Instant::now());
        assert_eq!(rows[0].state, WorkerState::Ready);
        assert_eq!(rows[1].state, WorkerState::Stopped);
        h.advance(Duration::from_secs(60)).await;
        assert_eq!(h.spawns().len(), spawns + 1, "only the reload's worker");
        // A later reload re-arms the pool.
        h.reload();
        assert!(!h.sm.gave_up());
    }

    /// A reload's new worker whose channel closed (the reload failed) stayed the
    /// slot's successor until reaped: a suicide of the slot's worker then handed the
    /// slot to it, so nothing replaced that worker, and the dead one's exit counted as
    /// a boot failure.
    #[tokio::test(start_paused = true)]
    async fn a_failed_reloads_dead_worker_never_takes_the_slot_over() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.advance(Duration::from_secs(2)).await;
        h.reload();
        let b = h.last_spawn(0);
        h.input(Input::ChannelClosed { id: b, error: None });
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { .. })),
            1
        );
        h.input(Input::Suicide {
            id: a,
            reason: "leaving".to_owned(),
        });
        let c = h.last_spawn(0);
        assert!(c != a && c != b, "a replacement at once");
        assert_eq!(h.sm.slots[0].current, Some(c));
        h.advance(Duration::from_secs(1)).await;
        h.exit(b, None, Some(9));
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.sm.slots[0].current, Some(c));
        assert_eq!(h.last_spawn(0), c, "no second replacement");
    }

    /// A recycle's replacement that lost its channel, then the slot's worker crashed:
    /// the dead replacement does not take the slot, the recycle fails, the slot is
    /// restarted.
    #[tokio::test(start_paused = true)]
    async fn a_dead_recycle_replacement_never_takes_the_slot_over() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.advance(Duration::from_secs(2)).await;
        h.input(Input::Recycle {
            id: a,
            reason: "memory".to_owned(),
        });
        let r = h.last_spawn(0);
        assert_ne!(r, a);
        h.input(Input::ChannelClosed { id: r, error: None });
        h.crash(a);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::RecycleFailed { .. })),
            1
        );
        let c = h.last_spawn(0);
        assert!(c != a && c != r, "a replacement at once");
        assert_eq!(h.sm.slots[0].current, Some(c));
        h.advance(Duration::from_secs(1)).await;
        h.exit(r, None, Some(9));
        assert_eq!(h.sm.slots[0].current, Some(c));
        assert_eq!(h.last_spawn(0), c, "no second replacement");
        assert_eq!(
            h.count_events(|e| matches!(e, Event::RecycleFailed { .. })),
            1
        );
    }

    /// A recycle started while a reload ran got the reload's configuration; when the
    /// reload failed, that worker kept the rejected configuration for good.
    #[tokio::test(start_paused = true)]
    async fn a_recycle_during_a_reload_keeps_the_configuration_in_effect_before() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.advance(Duration::from_secs(2)).await;
        h.reload();
        let n0 = h.last_spawn(0);
        h.input(Input::Recycle {
            id: b,
            reason: "memory".to_owned(),
        });
        let r = h.last_spawn(1);
        assert_ne!(r, b);
        assert_eq!(h.sm.procs[&r].generation, 0);
        h.crash(n0);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { generation: 1, .. })),
            1
        );
        h.ready(r);
        assert_eq!(h.sm.slots[1].current, Some(r));
        assert_eq!(h.sm.procs[&r].generation, 0);
        assert!(h.has(|x| matches!(
            x,
            Action::Spawn {
                id,
                generation: 0,
                ..
            } if *id == r
        )));
    }

    /// After a give-up (keep), a failed reload gave the give-up back, but a restart
    /// the reload's own worker in a stopped slot had scheduled stayed, shown as a
    /// backoff for a restart that never came.
    #[tokio::test(start_paused = true)]
    async fn a_failed_reload_after_a_give_up_drops_its_pending_restart() {
        let policy = Policy {
            on_give_up: GiveUpAction::Keep,
            restart_limit: 1,
            ..no_heartbeat_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(b);
        h.crash(a);
        h.advance(Duration::from_secs(1)).await;
        let a2 = h.last_spawn(0);
        h.crash(a2);
        h.advance(Duration::from_secs(5)).await;
        assert!(h.sm.gave_up());
        h.reload();
        // Slot 0 had nothing: its new worker is its own. Slot 1's is a successor.
        let (n0, n1) = (h.last_spawn(0), h.last_spawn(1));
        h.crash(n0);
        assert!(h.sm.slots[0].restart_at.is_some());
        h.crash(n1);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { generation: 1, .. })),
            1
        );
        assert!(h.sm.gave_up());
        let rows = h.sm.status(Instant::now());
        assert_eq!(rows[0].state, WorkerState::Stopped);
        assert!(h.sm.slots[0].stopped);
    }

    /// A forced stop's kill of a worker still starting is no ready timeout.
    #[tokio::test(start_paused = true)]
    async fn a_forced_stop_reports_no_ready_timeout() {
        let mut h = Harness::new(quick_policy(), 1);
        h.sm.stop(Instant::now(), false);
        h.pump();
        h.advance(Duration::from_secs(6)).await;
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerReadyTimeout { .. })),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn boot_failures_outside_the_window_do_not_accumulate() {
        let policy = Policy {
            restart_limit: 2,
            restart_window: Duration::from_secs(10),
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 1);
        for _ in 0..6 {
            // Crashes at start, 6 s apart: never more than 2 in any 10 s window.
            h.advance(Duration::from_secs(6)).await;
            let id = h.last_spawn(0);
            h.crash(id);
        }
        h.advance(Duration::from_secs(2)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 0);
        assert_eq!(h.spawns().len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_resets_after_min_uptime() {
        let policy = Policy {
            restart_limit: 100,
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 1);
        let mut delays = Vec::new();
        for _ in 0..6 {
            let id = h.last_spawn(0);
            let before = Instant::now();
            h.crash(id);
            let spawns = h.spawns().len();
            for _ in 0..100 {
                if h.spawns().len() > spawns {
                    break;
                }
                h.advance(Duration::from_millis(10)).await;
            }
            delays.push(Instant::now().duration_since(before).as_millis() as u64);
        }
        // 100, 200, 400, 800, then capped at 1000 (measured in 10 ms steps).
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);

        // A worker that stayed up for min_uptime resets the backoff: immediate restart.
        let id = h.last_spawn(0);
        h.ready(id);
        for _ in 0..3 {
            h.input(Input::Heartbeat { id, active: 0 });
            h.advance(Duration::from_millis(400)).await;
        }
        let spawns = h.spawns().len();
        h.crash(id);
        assert_eq!(h.spawns().len(), spawns + 1, "restarted without delay");
        let next = h.last_spawn(0);
        h.crash(next);
        assert!(matches!(
            h.events().last(),
            Some(Event::RestartScheduled { delay, .. }) if *delay == Duration::from_millis(100)
        ));
    }

    /// Review (fifth round): with `min_uptime` 0 (set for fast reloads) every ready
    /// worker counted as healthy: one that said Ready and exited at once was
    /// respawned without delay, forever. Health is judged against at least
    /// `limits::MIN_HEALTHY_UPTIME` (1 s).
    #[tokio::test(start_paused = true)]
    async fn ready_then_dead_at_once_backs_off_even_with_min_uptime_zero() {
        let policy = Policy {
            min_uptime: Duration::ZERO,
            ..no_heartbeat_policy()
        };
        let mut h = Harness::new(policy, 1);
        let delays = |h: &Harness| -> Vec<Duration> {
            h.events()
                .iter()
                .filter_map(|e| match e {
                    Event::RestartScheduled { delay, .. } => Some(*delay),
                    _ => None,
                })
                .collect()
        };
        for _ in 0..3 {
            let id = h.last_spawn(0);
            h.ready(id);
            h.crash(id);
            h.advance(READY_BACKOFF_CAP).await;
            assert_ne!(h.last_spawn(0), id, "replaced within the cap");
        }
        assert_eq!(
            delays(&h),
            [100, 200, 400].map(Duration::from_millis),
            "backoff doubles"
        );
        assert_eq!(h.sm.restarts_total(), 3);
        assert_eq!(h.sm.status(Instant::now())[0].restarts, 3);
        // Ready workers never count toward the give-up limit.
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 0);
        // One that served for the floor is healthy again: replaced at once.
        let id = h.last_spawn(0);
        h.ready(id);
        h.advance(Duration::from_secs(1)).await;
        h.crash(id);
        assert_eq!(delays(&h).last(), Some(&Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn suicide_spawns_the_replacement_before_the_old_exit() {
        let mut h = Harness::new(quick_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        h.input(Input::Suicide {
            id: old,
            reason: "leaking".into(),
        });
        let new = h.last_spawn(0);
        assert_ne!(new, old, "replacement spawned at once");
        let out = h.position(|a| *a == Action::Rotate { id: old, on: false });
        let spawn = h.position(|a| matches!(a, Action::Spawn { id, .. } if *id == new));
        assert!(
            out < spawn,
            "no sockets to the old worker once it said Suicide"
        );
        h.ready(new);
        // The old one exits by itself later: planned, no further spawn.
        h.crash(old);
        assert_eq!(h.spawns().len(), 2);
        assert_eq!(
            h.count_events(
                |e| matches!(e, Event::WorkerExited { id, planned: true, .. } if *id == old)
            ),
            1
        );
    }

    /// A worker that says Ready and then announces its end, over and over, was replaced
    /// at once every time: a stream of spawns with no pause and no give-up.
    #[tokio::test(start_paused = true)]
    async fn young_suicides_in_a_row_back_off() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let first = h.last_spawn(0);
        h.ready(first);
        h.input(Input::Suicide {
            id: first,
            reason: "database down".into(),
        });
        let second = h.last_spawn(0);
        assert_ne!(second, first, "the first one is replaced at once");
        h.ready(second);
        h.input(Input::Suicide {
            id: second,
            reason: "database down".into(),
        });
        assert_eq!(h.last_spawn(0), second, "the second one is not");
        assert!(matches!(
            h.events().last(),
            Some(Event::RestartScheduled { delay, .. }) if !delay.is_zero()
        ));
        h.advance(Duration::from_secs(1)).await;
        let third = h.last_spawn(0);
        assert_ne!(third, second, "replaced after the backoff");
        // A worker that served for min_uptime is replaced at once again.
        h.ready(third);
        h.advance(Duration::from_secs(2)).await;
        h.input(Input::Suicide {
            id: third,
            reason: "leaking".into(),
        });
        assert_ne!(h.last_spawn(0), third);
    }

    #[tokio::test(start_paused = true)]
    async fn a_suicide_before_ready_backs_off_like_a_boot_failure() {
        let mut h = Harness::new(quick_policy(), 1);
        let first = h.last_spawn(0);
        h.input(Input::Suicide {
            id: first,
            reason: "bad config".into(),
        });
        assert_eq!(h.spawns().len(), 1, "no replacement at once");
        assert!(h.has(|a| matches!(
            a,
            Action::Publish(Event::RestartScheduled { delay, .. })
                if *delay == Duration::from_millis(100)
        )));
        h.advance(Duration::from_millis(100)).await;
        assert_eq!(h.spawns().len(), 2, "replaced after the backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn a_young_worker_the_master_killed_is_not_killed_from_outside() {
        // min_uptime longer than the heartbeat timeout: the hung worker died young.
        let policy = Policy {
            min_uptime: Duration::from_secs(10),
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 1);
        let id = h.last_spawn(0);
        h.ready(id);
        h.advance(Duration::from_secs(2)).await;
        assert!(h.has(|a| *a == Action::Kill { id }), "hung: killed");
        h.exit(id, None, Some(9));
        assert!(
            h.has(|a| matches!(
                a,
                Action::Publish(Event::RestartScheduled { delay, .. }) if !delay.is_zero()
            )),
            "the master's own SIGKILL is no operator's: backoff applies"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_while_a_replacement_is_on_its_way_promotes_the_replacement() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.advance(Duration::from_secs(2)).await;
        h.input(Input::Recycle {
            id: a,
            reason: "max_requests 10".into(),
        });
        let b = h.last_spawn(0);
        assert_ne!(a, b);
        h.crash(a);
        assert_eq!(h.spawns().len(), 2, "no third process for the slot");
        assert_eq!(h.sm.slots[0].current, Some(b));
        h.ready(b);
        assert!(h.rotating(b));
        h.advance(Duration::from_secs(2)).await;
        assert_eq!(h.spawns().len(), 2);
        assert_eq!(h.sm.slots[0].current, Some(b));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_worker_is_killed_at_the_drain_deadline() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        h.input(Input::Suicide {
            id: old,
            reason: "bye".into(),
        });
        let new = h.last_spawn(0);
        h.ready(new);
        h.advance(Duration::from_millis(2900)).await;
        assert!(!h.has(|a| *a == Action::Kill { id: old }));
        h.advance(Duration::from_millis(200)).await;
        assert!(h.has(|a| *a == Action::Kill { id: old }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_heartbeat_takes_the_worker_out_then_the_timeout_kills_it() {
        let mut h = Harness::new(quick_policy(), 1);
        let id = h.last_spawn(0);
        h.ready(id);
        assert!(h.rotating(id));
        h.advance(Duration::from_millis(500)).await;
        h.input(Input::Heartbeat { id, active: 3 });
        // Late after 2 intervals + 100 ms: out of rotation, not killed.
        h.advance(Duration::from_millis(1050)).await;
        assert!(h.rotating(id));
        h.advance(Duration::from_millis(100)).await;
        assert!(!h.rotating(id), "late: no new connections");
        assert_eq!(h.sm.status(Instant::now())[0].state, WorkerState::Stalled);
        // It shows life: back in rotation.
        h.input(Input::Heartbeat { id, active: 3 });
        assert!(h.rotating(id));
        // Silent for the whole timeout: hung, killed, replaced at its exit.
        h.advance(Duration::from_millis(2100)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::WorkerHung { .. })), 1);
        let out = h.position(|a| *a == Action::Rotate { id, on: false });
        let kill = h.position(|a| *a == Action::Kill { id });
        assert!(out < kill);
        h.exit(id, None, Some(9));
        assert_eq!(h.spawns().len(), 2);
    }

    /// Review B2: with the heartbeat timeout off, a worker whose heartbeat was late
    /// kept getting connections; it is taken out of rotation as with a timeout, and
    /// only the kill is off.
    #[tokio::test(start_paused = true)]
    async fn with_the_timeout_off_a_late_worker_is_out_of_rotation_but_never_killed() {
        let policy = Policy {
            heartbeat_timeout: None,
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        // Late after 2 intervals + 100 ms (the policy's interval is 500 ms).
        h.advance(Duration::from_millis(1050)).await;
        assert!(h.rotating(a) && h.rotating(b));
        h.input(Input::Heartbeat { id: b, active: 0 });
        h.advance(Duration::from_millis(100)).await;
        assert!(!h.rotating(a), "late: no new connections");
        assert!(h.rotating(b), "b showed life");
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerStalled { id, .. } if *id == a)),
            1
        );
        assert_eq!(h.sm.status(Instant::now())[0].state, WorkerState::Stalled);
        // Silent for far longer than any timeout: still alive, still out.
        h.advance(Duration::from_secs(3600)).await;
        assert!(!h.has(|x| matches!(x, Action::Kill { .. })), "never killed");
        assert_eq!(h.count_events(|e| matches!(e, Event::WorkerHung { .. })), 0);
        assert!(!h.rotating(a));
        assert_eq!(h.state(a), Some(ProcState::Ready));
        // It shows life: back in rotation.
        h.input(Input::Heartbeat { id: a, active: 0 });
        assert!(h.rotating(a));
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerResumed { id, .. } if *id == a)),
            1
        );
        assert_eq!(h.sm.next_deadline().map(|d| d > Instant::now()), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_worker_is_out_of_rotation_until_it_resumes() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.input(Input::Stalled {
            id: a,
            reason: "12 descriptors unacknowledged for 2s".into(),
        });
        assert!(!h.rotating(a) && h.rotating(b));
        h.input(Input::Resumed { id: a });
        assert!(h.rotating(a));
        h.input(Input::Stalled {
            id: a,
            reason: "again".into(),
        });
        h.input(Input::Unresponsive {
            id: a,
            reason: "stopped reading its channel".into(),
        });
        assert!(h.has(|x| *x == Action::Kill { id: a }));
        h.exit(a, None, Some(9));
        // Killed by the master while young: replaced after a short backoff.
        h.advance(Duration::from_secs(1)).await;
        let a2 = h.last_spawn(0);
        assert_ne!(a2, a, "replaced");
    }

    #[tokio::test(start_paused = true)]
    async fn ready_timeout_kills_and_counts() {
        let mut h = Harness::new(quick_policy(), 1);
        let id = h.last_spawn(0);
        h.advance(Duration::from_secs(6)).await;
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerReadyTimeout { .. })),
            1
        );
        h.exit(id, None, Some(9));
        h.advance(Duration::from_millis(150)).await;
        assert_eq!(h.spawns().len(), 2);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 1);
    }

    /// Regression (v0.1, issue 9.4): a worker that closed its channel but kept running
    /// was restarted 23 times in 25 s without ever counting, shown as `ready`.
    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_before_ready_is_a_boot_failure_and_gives_up() {
        let mut h = Harness::new(quick_policy(), 1);
        for _ in 0..4 {
            let id = h.last_spawn(0);
            h.input(Input::ChannelClosed { id, error: None });
            assert_eq!(h.sm.status(Instant::now())[0].state, WorkerState::Lost);
            // It lingers: killed after the grace, then reaped.
            h.advance(Duration::from_millis(1100)).await;
            assert!(h.has(|a| *a == Action::Kill { id }));
            h.exit(id, None, Some(9));
            h.advance(Duration::from_secs(2)).await;
        }
        assert_eq!(h.spawns().len(), 4, "limit 3: four spawns, then give up");
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_after_ready_takes_it_out_and_kills_it_if_it_lingers() {
        let mut h = Harness::new(quick_policy(), 1);
        let id = h.last_spawn(0);
        h.ready(id);
        h.input(Input::ChannelClosed {
            id,
            error: Some("malformed".into()),
        });
        assert!(!h.rotating(id));
        h.advance(Duration::from_millis(1100)).await;
        assert!(h.has(|a| *a == Action::Kill { id }));
    }

    #[tokio::test(start_paused = true)]
    async fn ready_before_spawned_waits_for_the_spawners_pid() {
        let mut h = Harness::new(quick_policy(), 1);
        h.auto_spawned = false;
        h.scale(2);
        let id = h.last_spawn(1);
        // The worker's Ready overtakes the spawner's report: not trusted alone.
        h.ready(id);
        assert!(!h.rotating(id));
        assert_eq!(
            h.count_events(|e| matches!(e, Event::WorkerReady { .. })),
            0
        );
        h.input(Input::Spawned { id, pid: 4242 });
        assert!(h.rotating(id));
        let spawned = h.position(
            |a| matches!(a, Action::Publish(Event::WorkerSpawned { id: i, .. }) if *i == id),
        );
        let ready = h.position(|a| matches!(a, Action::Publish(Event::WorkerReady { id: i, pid: 4242, .. }) if *i == id));
        assert!(
            spawned < ready,
            "spawned, then ready, with the spawner's pid"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exit_of_a_replaced_worker_does_not_count() {
        let mut h = Harness::new(quick_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        h.reload();
        let new = h.last_spawn(0);
        h.ready(new);
        h.settle_reload().await;
        assert_eq!(h.state(old), Some(ProcState::Draining));
        // The old generation dies badly while draining: no restart, nothing counted.
        h.crash(old);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.spawns().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rolling_reload_settles_each_new_worker_and_never_exceeds_n_plus_one() {
        let mut h = Harness::new(no_heartbeat_policy(), 3);
        for slot in 0..3 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        let mut max_live = h.sm.live();
        assert_eq!(h.reload(), ReloadStart::Started(1));
        for slot in 0..3u32 {
            let new = h.last_spawn(slot);
            assert_eq!(h.sm.procs[&new].generation, 1);
            max_live = max_live.max(h.sm.live());
            let old =
                h.sm.procs
                    .iter()
                    .find(|(_, p)| p.slot == slot && p.generation == 0)
                    .map(|(id, _)| *id)
                    .expect("old still alive");
            h.ready(new);
            // Both serve while the new one settles; the old one drains only after.
            assert!(h.rotating(new) && h.rotating(old));
            h.advance(Duration::from_millis(900)).await;
            assert_eq!(h.state(old), Some(ProcState::Ready));
            h.advance(Duration::from_millis(100)).await;
            assert_eq!(h.state(old), Some(ProcState::Draining));
            assert!(!h.rotating(old));
            // No spawn for the next slot while the old one lives.
            assert_eq!(h.spawns().len(), 3 + slot as usize + 1);
            h.exit(old, Some(0), None);
        }
        assert!(max_live <= 4);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFinished { generation: 1 })),
            1
        );
        assert_eq!(h.sm.generation(), 1);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reloads_during_a_reload_coalesce_into_one_queued() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        assert_eq!(h.reload(), ReloadStart::Started(1));
        assert_eq!(h.reload(), ReloadStart::Queued);
        assert_eq!(h.reload(), ReloadStart::Queued);
        let new = h.last_spawn(0);
        h.ready(new);
        h.settle_reload().await;
        h.exit(a, Some(0), None);
        assert_eq!(
            h.actions
                .iter()
                .filter(|x| **x == Action::StartQueuedReload)
                .count(),
            1
        );
        assert!(!h.sm.reloading());
        assert_eq!(h.sm.generation(), 1);
    }

    /// The reload waited for a new worker that took its slot early (the old one said
    /// Suicide) and then left too, before it settled: the master's loop spun on the
    /// settle instant until that worker exited, and the reload then finished as if it
    /// had succeeded.
    #[tokio::test(start_paused = true)]
    async fn a_new_worker_that_leaves_before_it_settles_fails_the_reload() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        assert_eq!(h.reload(), ReloadStart::Started(1));
        let new = h.last_spawn(0);
        h.ready(new);
        h.input(Input::Suicide {
            id: old,
            reason: "leaving".into(),
        });
        h.input(Input::Suicide {
            id: new,
            reason: "cannot reach its database".into(),
        });
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { generation: 1, .. })),
            1
        );
        assert_eq!(h.sm.generation(), 0);
        let replacement = h.last_spawn(0);
        assert_ne!(replacement, new, "the slot is restarted");
        assert_eq!(
            h.sm.procs[&replacement].generation, 0,
            "with the configuration before the reload"
        );
        h.advance(Duration::from_secs(2)).await;
        assert!(
            h.sm.next_deadline().is_none_or(|d| d > Instant::now()),
            "no deadline in the past: the loop would spin"
        );
        h.exit(new, Some(0), None);
        h.exit(old, Some(0), None);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFinished { generation: 1 })),
            0
        );
    }

    /// Regression (v0.1, issue 9.5): a queued reload was lost after a failed reload,
    /// and the generation went up although the reload failed.
    #[tokio::test(start_paused = true)]
    async fn a_failed_reload_keeps_the_old_workers_the_generation_and_the_queued_reload() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.reload();
        assert_eq!(h.reload(), ReloadStart::Queued);
        let new = h.last_spawn(0);
        h.crash(new);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { generation: 1, .. })),
            1
        );
        assert!(!h.sm.reloading());
        assert_eq!(
            h.sm.generation(),
            0,
            "the failed generation is not in effect"
        );
        assert_eq!(h.sm.slots[0].current, Some(a));
        assert_eq!(h.state(a), Some(ProcState::Ready));
        assert!(h.rotating(a));
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.spawns().len(), 3, "no retry, slot 1 untouched");
        assert!(h.actions.contains(&Action::StartQueuedReload));
        // The next reload gets a fresh generation number.
        assert_eq!(h.reload(), ReloadStart::Started(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_worker_that_crashes_while_settling_fails_the_reload() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.reload();
        let new = h.last_spawn(0);
        h.ready(new);
        h.advance(Duration::from_millis(500)).await;
        h.crash(new);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { .. })),
            1
        );
        assert_eq!(h.state(a), Some(ProcState::Ready), "never drained");
        assert!(h.rotating(a));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_that_fails_halfway_rolls_the_first_slots_back() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.reload();
        let a1 = h.last_spawn(0);
        h.ready(a1);
        h.settle_reload().await;
        h.exit(a, Some(0), None);
        let b1 = h.last_spawn(1);
        h.crash(b1);
        assert_eq!(
            h.count_events(|e| matches!(
                e,
                Event::RollbackStarted {
                    failed: 1,
                    generation: 0
                }
            )),
            1
        );
        // Slot 0 gets a generation-0 worker again, drain-first.
        let a2 = h.last_spawn(0);
        assert_eq!(h.sm.procs[&a2].generation, 0);
        h.ready(a2);
        h.settle_reload().await;
        assert_eq!(h.state(a1), Some(ProcState::Draining));
        h.exit(a1, Some(0), None);
        assert!(!h.sm.reloading());
        assert!(
            h.sm.status(Instant::now())
                .iter()
                .all(|w| w.generation == 0 && w.state == WorkerState::Ready)
        );
    }

    /// Regression (v0.1, issue 9.5): `reload` then `scale 1` while slot 1's new
    /// worker was starting left the reload stuck forever and a generation-0 worker in
    /// rotation that was never drained.
    #[tokio::test(start_paused = true)]
    async fn scaling_down_during_a_reload_finishes_it_and_drains_the_removed_slot() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.reload();
        let a1 = h.last_spawn(0);
        h.ready(a1);
        h.settle_reload().await;
        h.exit(a, Some(0), None);
        let b1 = h.last_spawn(1);
        assert_ne!(b1, b);
        // Slot 1's new worker is starting; scale to 1.
        h.scale(1);
        assert!(
            h.has(|x| *x == Action::Kill { id: b1 }),
            "the new one is killed"
        );
        assert_eq!(h.state(b), Some(ProcState::Draining), "the old one drains");
        assert!(!h.rotating(b));
        h.exit(b1, None, Some(9));
        h.exit(b, Some(0), None);
        assert!(!h.sm.reloading(), "the reload finished");
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFinished { generation: 1 })),
            1
        );
        // And later reloads run.
        assert_eq!(h.reload(), ReloadStart::Started(2));
        assert_eq!(h.sm.live(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn scaling_down_while_a_reload_waits_in_the_removed_slot() {
        let mut h = Harness::new(no_heartbeat_policy(), 3);
        for slot in 0..3 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        h.reload();
        let a1 = h.last_spawn(0);
        // Scale to 1 while slot 0's successor starts: slots 1 and 2 drain, the
        // reload goes on with slot 0 only.
        h.scale(1);
        h.ready(a1);
        h.settle_reload().await;
        let rows = h.sm.status(Instant::now());
        assert_eq!(
            rows.iter()
                .filter(|w| w.state == WorkerState::Draining)
                .count(),
            3
        );
        for id in rows
            .iter()
            .filter(|w| w.state == WorkerState::Draining)
            .map(|w| w.id)
            .collect::<Vec<_>>()
        {
            h.exit(id, Some(0), None);
        }
        assert!(!h.sm.reloading());
        assert_eq!(h.sm.live(), 1);
        assert_eq!(h.sm.slots[0].current, Some(a1));
    }

    #[tokio::test(start_paused = true)]
    async fn recycling_replaces_drain_first() {
        let mut h = Harness::new(no_heartbeat_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.input(Input::Recycle {
            id: a,
            reason: "max_requests 1000".into(),
        });
        let b = h.last_spawn(0);
        assert_ne!(a, b);
        assert_eq!(
            h.state(a),
            Some(ProcState::Ready),
            "serves until b is ready"
        );
        // A second trigger while one runs does nothing.
        h.input(Input::Recycle {
            id: a,
            reason: "again".into(),
        });
        assert_eq!(h.spawns().len(), 2);
        h.ready(b);
        assert_eq!(h.state(a), Some(ProcState::Draining));
        assert_eq!(h.count_events(|e| matches!(e, Event::Recycled { .. })), 1);
        h.exit(a, Some(0), None);
        assert_eq!(h.spawns().len(), 2, "a planned exit");
        // A replacement that fails keeps the old worker, and retries later.
        h.input(Input::Recycle {
            id: b,
            reason: "max_age".into(),
        });
        let c = h.last_spawn(0);
        h.crash(c);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::RecycleFailed { .. })),
            1
        );
        assert_eq!(h.state(b), Some(ProcState::Ready));
        h.input(Input::Recycle {
            id: b,
            reason: "max_age".into(),
        });
        assert_eq!(h.spawns().len(), 3, "not before the retry delay");
        h.advance(Duration::from_secs(1)).await;
        h.input(Input::Recycle {
            id: b,
            reason: "max_age".into(),
        });
        assert_eq!(h.spawns().len(), 4);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_and_down() {
        let mut h = Harness::new(quick_policy(), 2);
        h.scale(4);
        assert_eq!(h.spawns().len(), 4);
        for slot in 0..4 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        h.scale(1);
        let drains = h
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Drain { .. }))
            .count();
        assert_eq!(drains, 3);
        // Drained workers exiting are planned: nothing restarts.
        for slot in 1..4 {
            let id = h.last_spawn(slot);
            h.crash(id);
        }
        assert_eq!(h.spawns().len(), 4);
        assert_eq!(h.sm.status(Instant::now()).len(), 1);
        assert!(h.sm.scale(Instant::now(), 0).is_err());
        // The same bound as the configuration: scale cannot go past it either.
        assert_eq!(
            h.sm.scale(Instant::now(), 1025),
            Err(Refused::OutOfRange {
                requested: 1025,
                max: 1024
            })
        );
        assert_eq!(h.sm.target(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn graceful_stop_drains_then_exits_zero() {
        let mut h = Harness::new(no_heartbeat_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.sm.stop(Instant::now(), true);
        h.pump();
        assert!(h.actions.contains(&Action::StopAccepting));
        assert!(h.has(|x| matches!(x, Action::Drain { id, .. } if *id == a)));
        // b was still starting: killed, nothing to drain.
        assert!(h.has(|x| *x == Action::Kill { id: b }));
        h.crash(b);
        assert!(!h.has(|x| matches!(x, Action::Exit { .. })));
        // a outlives the drain deadline: killed.
        h.advance(Duration::from_secs(4)).await;
        assert!(h.has(|x| *x == Action::Kill { id: a }));
        h.crash(a);
        assert!(h.actions.contains(&Action::Exit { code: 0 }));
        assert_eq!(h.spawns().len(), 2, "no restart while stopping");
        assert_eq!(
            h.sm.reload(Instant::now(), quick_policy()),
            Err(Refused::Stopping)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forced_stop_kills_everything() {
        let mut h = Harness::new(quick_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.sm.stop(Instant::now(), true);
        h.sm.stop(Instant::now(), false);
        h.pump();
        let kills = h
            .actions
            .iter()
            .filter(|x| matches!(x, Action::Kill { .. }))
            .count();
        assert_eq!(kills, 2);
        assert_eq!(h.count_events(|e| matches!(e, Event::Stopping { .. })), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_settings_are_per_worker() {
        // A reload that shortens the heartbeat timeout applies it to the new
        // generation only: the old workers keep the timeout they were started with.
        let mut h = Harness::new(
            Policy {
                heartbeat_timeout: Some(Duration::from_secs(10)),
                heartbeat_interval: Duration::from_secs(1),
                ..quick_policy()
            },
            2,
        );
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        let short = Policy {
            heartbeat_timeout: Some(Duration::from_secs(2)),
            heartbeat_interval: Duration::from_millis(500),
            ..quick_policy()
        };
        h.sm.reload(Instant::now(), short).expect("reload");
        h.pump();
        // 3 s without heartbeats: over the new timeout, under the old one.
        h.advance(Duration::from_secs(3)).await;
        assert!(!h.has(|x| *x == Action::Kill { id: b }), "old worker kept");
    }

    #[test]
    fn backoff_saturates() {
        let p = Policy {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            ..Policy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_secs(1));
        assert_eq!(p.backoff(3), Duration::from_secs(4));
        assert_eq!(p.backoff(100), Duration::from_secs(30));
        assert_eq!(p.backoff(0), Duration::from_secs(1));
    }
}
