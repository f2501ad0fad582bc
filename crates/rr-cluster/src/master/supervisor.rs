//! The worker lifecycle as a pure state machine: inputs (what happened) in, actions
//! (what to do) out. No I/O, no clock of its own: every call takes `now`, so tests drive
//! it with tokio's paused clock. docs/LIFECYCLE.md walks through the states.
//!
//! ```text
//! Starting --Ready--> Ready --drain--> Draining --exit--> gone (planned)
//! Starting --exit / ready timeout--> failed: restart with backoff (counts)
//! Ready --Suicide--> Leaving: replacement spawned at once (counts) --exit--> gone
//! Ready --exit--> crashed: restart (counts; no delay after min_uptime)
//! Ready --no heartbeat--> Hung: SIGKILL --exit--> restart (counts)
//! Draining/Leaving --deadline--> SIGKILL
//! ```
//!
//! An *unstable* restart (the worker never became ready, or was ready for less than
//! `min_uptime`) counts against the limit: more than `restart_limit` of them within
//! `restart_window` is a give-up. Exits are matched by worker id, never by slot, so an
//! exit from an older worker of a slot never counts against its replacement.

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

/// What the master does when the restart limit is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum GiveUpAction {
    /// Stop the pool and return a non-zero exit code.
    #[default]
    Exit,
    /// Keep serving with the workers still alive; do not restart any more.
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
    /// `None`: heartbeats are not checked.
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
}

/// Something that happened, reported to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// The process of worker `id` runs as `pid`.
    Spawned { id: u64, pid: u32 },
    /// The process of worker `id` could not be started.
    SpawnFailed { id: u64, error: String },
    /// Worker `id` said `Ready`.
    Ready { id: u64, pid: u32 },
    /// Worker `id` sent a heartbeat.
    Heartbeat { id: u64, active: u32 },
    /// Worker `id` announced its end.
    Suicide { id: u64, reason: String },
    /// Worker `id`'s channel closed or broke the protocol.
    ChannelClosed { id: u64, error: Option<String> },
    /// Worker `id`'s process ended (reaped).
    Exited { id: u64, exit: ExitInfo },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Start a worker process for `slot`, known as `id`.
    Spawn { slot: u32, id: u64, generation: u64 },
    /// Put worker `id` into the dispatch rotation, or take it out.
    Rotate { id: u64, on: bool },
    /// Send `Drain` to worker `id`.
    Drain { id: u64, deadline: Duration },
    /// SIGKILL worker `id`.
    Kill { id: u64, pid: u32 },
    /// Tell users and logs.
    Publish(Event),
    /// Close the listeners' accept loops.
    StopAccepting,
    /// Every worker is gone after a stop: the master returns `code`.
    Exit { code: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Starting,
    Ready,
    Draining,
    Leaving,
    Hung,
}

#[derive(Debug)]
struct Proc {
    slot: u32,
    generation: u64,
    pid: Option<u32>,
    state: ProcState,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    /// Ready timeout, heartbeat timeout, drain deadline or re-kill, by state.
    deadline: Option<Instant>,
    killed: bool,
    /// A kill was decided before the pid was known.
    kill_pending: bool,
    active: u32,
}

#[derive(Debug, Default)]
struct Slot {
    current: Option<u64>,
    restarts: u32,
    consecutive_failures: u32,
    restart_at: Option<Instant>,
    stopped: bool,
}

#[derive(Debug)]
struct Reload {
    generation: u64,
    next_slot: u32,
    /// A new worker is starting in `slot`; `old` is drained once it is ready.
    waiting: Option<(u32, u64, Option<u64>)>,
}

/// The pool's lifecycle state.
#[derive(Debug)]
pub(crate) struct Supervisor {
    policy: Policy,
    target: usize,
    generation: u64,
    next_id: u64,
    procs: BTreeMap<u64, Proc>,
    slots: Vec<Slot>,
    restart_log: VecDeque<Instant>,
    gave_up: bool,
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
            next_id: 1,
            procs: BTreeMap::new(),
            slots: Vec::new(),
            restart_log: VecDeque::new(),
            gave_up: false,
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
            self.spawn(now, slot as u32);
        }
    }

    /// The actions decided since the last call.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// Replaces timeouts and restart policy (a reload with a new configuration).
    pub(crate) fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub(crate) fn target(&self) -> usize {
        self.target
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn gave_up(&self) -> bool {
        self.gave_up
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    pub(crate) fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// Restarts since the master started.
    pub(crate) fn restarts_total(&self) -> u64 {
        self.restarts_total
    }

    /// Give-ups since the master started.
    pub(crate) fn give_ups(&self) -> u64 {
        self.give_ups
    }

    /// Restarts counted in the window ending `now`.
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

    /// The earliest moment [`Supervisor::tick`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let procs = self.procs.values().filter_map(|p| p.deadline);
        let slots = self.slots.iter().filter_map(|s| s.restart_at);
        procs.chain(slots).min()
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
            Input::Ready { id, pid } => self.on_ready(now, id, pid),
            Input::Heartbeat { id, active } => {
                let timeout = self.policy.heartbeat_timeout;
                if let Some(p) = self.procs.get_mut(&id) {
                    p.active = active;
                    if p.state == ProcState::Ready {
                        p.deadline = timeout.map(|t| now + t);
                    }
                }
            }
            Input::Suicide { id, reason } => self.on_suicide(now, id, reason),
            Input::ChannelClosed { id, error } => {
                let Some(p) = self.procs.get_mut(&id) else {
                    return;
                };
                let slot = p.slot;
                if matches!(p.state, ProcState::Starting | ProcState::Ready) {
                    let grace = now + CHANNEL_CLOSED_GRACE;
                    p.deadline = Some(p.deadline.map_or(grace, |d| d.min(grace)));
                    self.out.push(Action::Rotate { id, on: false });
                }
                self.publish(Event::WorkerChannelClosed { slot, id, error });
            }
            Input::Exited { id, exit } => self.on_exit(now, id, Some(exit)),
        }
        self.step_reload(now);
        self.check_stopped();
    }

    /// Acts on every deadline that has passed: ready and heartbeat timeouts, drain
    /// deadlines, and restarts whose backoff is over.
    pub(crate) fn tick(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(p) = self.procs.get_mut(&id) else {
                continue;
            };
            let (slot, pid, state, killed) = (p.slot, p.pid.unwrap_or(0), p.state, p.killed);
            match state {
                ProcState::Starting => {
                    p.state = ProcState::Hung;
                    self.publish(Event::WorkerReadyTimeout { slot, id });
                }
                ProcState::Ready => {
                    p.state = ProcState::Hung;
                    self.out.push(Action::Rotate { id, on: false });
                    self.publish(Event::WorkerHung { slot, id, pid });
                }
                ProcState::Draining | ProcState::Leaving if !killed => {
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
                    self.spawn(now, slot as u32);
                }
            }
        }
        self.step_reload(now);
        self.check_stopped();
    }

    /// Starts a rolling reload into a new generation. A reload requested while one is
    /// running is queued (several requests coalesce into one).
    pub(crate) fn reload(&mut self, now: Instant) -> Result<String, String> {
        if self.stopping.is_some() {
            return Err("the master is stopping".into());
        }
        if self.reload.is_some() {
            self.reload_pending = true;
            return Ok("a reload is in progress; another one will follow it".into());
        }
        self.generation += 1;
        // A reload is a fresh start: new code deserves a new restart budget.
        self.gave_up = false;
        self.restart_log.clear();
        for s in &mut self.slots {
            s.stopped = false;
            s.consecutive_failures = 0;
        }
        self.publish(Event::ReloadStarted {
            generation: self.generation,
        });
        self.reload = Some(Reload {
            generation: self.generation,
            next_slot: 0,
            waiting: None,
        });
        self.step_reload(now);
        Ok(format!(
            "rolling {} workers over to generation {}",
            self.target, self.generation
        ))
    }

    /// Changes the number of workers: new slots start at once, removed slots drain.
    pub(crate) fn scale(&mut self, now: Instant, workers: usize) -> Result<String, String> {
        if self.stopping.is_some() {
            return Err("the master is stopping".into());
        }
        if workers == 0 {
            return Err("a pool needs at least one worker".into());
        }
        if workers > super::MAX_WORKERS {
            return Err(format!(
                "{workers} workers is more than the limit of {}",
                super::MAX_WORKERS
            ));
        }
        let from = self.target;
        self.target = workers;
        if workers > from {
            for slot in from..workers {
                if slot >= self.slots.len() {
                    self.slots.push(Slot::default());
                }
                self.spawn(now, slot as u32);
            }
        } else {
            for slot in workers..from {
                if let Some(id) = self.slots.get(slot).and_then(|s| s.current) {
                    self.drain(now, id);
                }
            }
            self.slots.truncate(workers);
        }
        if from != workers {
            self.publish(Event::Scaled { from, to: workers });
        }
        self.step_reload(now);
        Ok(format!("scaling from {from} to {workers} workers"))
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
                    ProcState::Ready => WorkerState::Ready,
                    ProcState::Draining => WorkerState::Draining,
                    ProcState::Leaving => WorkerState::Leaving,
                    ProcState::Hung => WorkerState::Hung,
                },
                generation: p.generation,
                uptime_ms: now.duration_since(p.spawned_at).as_millis() as u64,
                dispatched: 0,
                active: p.active,
                restarts: self.slots.get(p.slot as usize).map_or(0, |s| s.restarts),
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
                id: 0,
                pid: None,
                state,
                generation: self.generation,
                uptime_ms: 0,
                dispatched: 0,
                active: 0,
                restarts: s.restarts,
            });
        }
        rows.sort_by_key(|r| (r.slot, r.id));
        rows
    }

    fn publish(&mut self, event: Event) {
        self.out.push(Action::Publish(event));
    }

    fn spawn(&mut self, now: Instant, slot: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.procs.insert(
            id,
            Proc {
                slot,
                generation: self.generation,
                pid: None,
                state: ProcState::Starting,
                spawned_at: now,
                ready_at: None,
                deadline: Some(now + self.policy.ready_timeout),
                killed: false,
                kill_pending: false,
                active: 0,
            },
        );
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.current = Some(id);
            s.restart_at = None;
        }
        self.out.push(Action::Spawn {
            slot,
            id,
            generation: self.generation,
        });
        id
    }

    fn kill(&mut self, now: Instant, id: u64) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.killed = true;
        p.deadline = Some(now + REKILL_AFTER);
        match p.pid {
            Some(pid) => self.out.push(Action::Kill { id, pid }),
            None => p.kill_pending = true,
        }
    }

    /// Asks worker `id` to finish and exit (planned: no restart follows).
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
                self.out.push(Action::Rotate { id, on: false });
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
            ProcState::Hung => {}
        }
        self.release_slot(slot, id);
    }

    /// If worker `id` is its slot's current worker, the slot no longer has one.
    /// Returns whether it was current (only the current worker's end can count as a
    /// failure of the slot).
    fn release_slot(&mut self, slot: u32, id: u64) -> bool {
        match self.slots.get_mut(slot as usize) {
            Some(s) if s.current == Some(id) => {
                s.current = None;
                true
            }
            _ => false,
        }
    }

    fn on_spawned(&mut self, now: Instant, id: u64, pid: u32) {
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        p.pid = Some(pid);
        let (slot, generation) = (p.slot, p.generation);
        let pending = std::mem::take(&mut p.kill_pending);
        self.publish(Event::WorkerSpawned {
            slot,
            id,
            pid,
            generation,
        });
        if pending {
            self.kill(now, id);
        }
    }

    fn on_ready(&mut self, now: Instant, id: u64, pid: u32) {
        let heartbeat = self.policy.heartbeat_timeout;
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        if p.state != ProcState::Starting {
            return;
        }
        p.pid.get_or_insert(pid);
        p.state = ProcState::Ready;
        p.ready_at = Some(now);
        p.deadline = heartbeat.map(|t| now + t);
        let (slot, pid) = (p.slot, p.pid.unwrap_or(pid));
        self.out.push(Action::Rotate { id, on: true });
        self.publish(Event::WorkerReady { slot, id, pid });

        if let Some(r) = &mut self.reload {
            if let Some((_, new, old)) = r.waiting {
                if new == id {
                    r.waiting = None;
                    if let Some(old) = old {
                        self.drain(now, old);
                    }
                }
            }
        }
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
        let uptime = p.ready_at.map(|t| now.duration_since(t));
        p.state = ProcState::Leaving;
        if !p.killed {
            p.deadline = Some(now + drain_timeout);
        }
        self.out.push(Action::Rotate { id, on: false });
        // After every connection sent to it: the worker's `Incoming` ends here.
        self.out.push(Action::Drain {
            id,
            deadline: drain_timeout,
        });
        self.publish(Event::WorkerSuicide { slot, id, reason });
        if self.release_slot(slot, id) {
            let in_reload = self.abort_reload_for(id, "the new worker announced its end");
            if !in_reload {
                self.restart(now, slot, uptime, true);
            }
        }
    }

    /// Worker `id` is gone: reaped (`exit`) or never started (`None`).
    fn on_exit(&mut self, now: Instant, id: u64, exit: Option<ExitInfo>) {
        let Some(p) = self.procs.remove(&id) else {
            return;
        };
        let slot = p.slot;
        let current = self.release_slot(slot, id);
        if matches!(p.state, ProcState::Starting | ProcState::Ready) {
            self.out.push(Action::Rotate { id, on: false });
        }
        let planned =
            matches!(p.state, ProcState::Draining | ProcState::Leaving) || self.stopping.is_some();
        let failure = !planned && current;
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
        if failure {
            let reason = match exit {
                Some(exit) => format!("the new worker ended with {exit}"),
                None => "the new worker could not be spawned".to_owned(),
            };
            if !self.abort_reload_for(id, &reason) {
                let uptime = p.ready_at.map(|t| now.duration_since(t));
                self.restart(now, slot, uptime, false);
            }
        }
    }

    /// If `id` is the new worker a reload waits for, the reload fails: the old worker
    /// becomes the slot's current one again. Returns whether that happened and the old
    /// worker is still serving (then the failure does not count as a restart).
    fn abort_reload_for(&mut self, id: u64, reason: &str) -> bool {
        let Some(r) = &self.reload else { return false };
        let Some((slot, new, old)) = r.waiting else {
            return false;
        };
        if new != id {
            return false;
        }
        let generation = r.generation;
        self.reload = None;
        self.publish(Event::ReloadFailed {
            generation,
            slot,
            reason: reason.to_owned(),
        });
        let old_serving = old.filter(|old| {
            self.procs
                .get(old)
                .is_some_and(|p| matches!(p.state, ProcState::Starting | ProcState::Ready))
        });
        match (old_serving, self.slots.get_mut(slot as usize)) {
            (Some(old), Some(s)) => {
                s.current = Some(old);
                true
            }
            _ => false,
        }
    }

    /// Slot `slot` lost its worker: restart it, unless that would exceed the limit.
    /// `uptime`: how long the lost worker had been ready (`None`: never ready).
    /// `immediate`: no backoff (a worker that announced its end is replaced at once).
    ///
    /// Only *unstable* restarts count toward the limit: the worker never became ready,
    /// or was ready for less than `min_uptime`. That is a crash loop; a worker that
    /// served for a while and then died (OOM kill, a stray SIGKILL) is replaced however
    /// often it happens, so a burst of such deaths never stops the pool.
    fn restart(&mut self, now: Instant, slot: u32, uptime: Option<Duration>, immediate: bool) {
        if self.stopping.is_some() || slot as usize >= self.slots.len() {
            return;
        }
        if self.gave_up {
            self.slots[slot as usize].stopped = true;
            return;
        }
        let healthy = uptime.is_some_and(|u| u >= self.policy.min_uptime);
        if !healthy {
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
        let s = &mut self.slots[slot as usize];
        s.restarts += 1;
        let delay = if healthy {
            s.consecutive_failures = 0;
            Duration::ZERO
        } else {
            s.consecutive_failures += 1;
            if immediate {
                Duration::ZERO
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
            self.spawn(now, slot);
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

    /// Moves a rolling reload forward: at most one extra process at a time, each new
    /// worker ready before its predecessor drains.
    fn step_reload(&mut self, now: Instant) {
        loop {
            let Some(r) = &mut self.reload else { return };
            if r.waiting.is_some() {
                return;
            }
            if r.next_slot as usize >= self.target {
                let generation = r.generation;
                self.reload = None;
                self.publish(Event::ReloadFinished { generation });
                if std::mem::take(&mut self.reload_pending) {
                    let _ = self.reload(now);
                }
                return;
            }
            // Wait until the previous slot's old worker is gone: never more than N+1.
            if self.procs.len() > self.target {
                return;
            }
            let generation = r.generation;
            let slot = r.next_slot;
            r.next_slot += 1;
            let old = self.slots.get(slot as usize).and_then(|s| s.current);
            if old.is_some_and(|id| {
                self.procs
                    .get(&id)
                    .is_some_and(|p| p.generation >= generation)
            }) {
                continue;
            }
            if let Some(s) = self.slots.get_mut(slot as usize) {
                s.stopped = false;
            }
            let new = self.spawn(now, slot);
            if let Some(r) = &mut self.reload {
                r.waiting = Some((slot, new, old));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a supervisor the way the master does, with fake processes: every spawn
    /// gets a pid at once, and the test decides what each worker does.
    struct Harness {
        sm: Supervisor,
        actions: Vec<Action>,
        next_pid: u32,
    }

    impl Harness {
        fn new(policy: Policy, workers: usize) -> Harness {
            let mut h = Harness {
                sm: Supervisor::new(policy, workers),
                actions: Vec::new(),
                next_pid: 1000,
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
                    if let Action::Spawn { id, .. } = a {
                        self.next_pid += 1;
                        self.sm.handle(
                            Instant::now(),
                            Input::Spawned {
                                id,
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
            self.input(Input::Ready { id, pid: 0 });
        }

        fn crash(&mut self, id: u64) {
            self.input(Input::Exited {
                id,
                exit: ExitInfo {
                    code: Some(1),
                    signal: None,
                },
            });
        }

        fn position(&self, f: impl Fn(&Action) -> bool) -> usize {
            self.actions.iter().position(f).expect("action present")
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
            heartbeat_timeout: Some(Duration::from_secs(2)),
            drain_timeout: Duration::from_secs(3),
            on_give_up: GiveUpAction::Exit,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn limit_plus_one_failures_give_up_exactly_once() {
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

    #[tokio::test(start_paused = true)]
    async fn give_up_keep_serves_with_the_rest() {
        let policy = Policy {
            on_give_up: GiveUpAction::Keep,
            restart_limit: 1,
            heartbeat_timeout: None,
            ..quick_policy()
        };
        let mut h = Harness::new(policy, 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.crash(a);
        h.advance(Duration::from_secs(1)).await;
        let a2 = h.last_spawn(0);
        h.crash(a2);
        h.advance(Duration::from_secs(5)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
        assert!(!h.actions.iter().any(|a| matches!(a, Action::Exit { .. })));
        let rows = h.sm.status(Instant::now());
        assert_eq!(rows[0].state, WorkerState::Stopped);
        assert_eq!(rows[1].state, WorkerState::Ready);
        // A reload re-arms the pool.
        h.sm.reload(Instant::now()).expect("reload");
        h.pump();
        assert_eq!(h.last_spawn(0), a2 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_outside_the_window_do_not_accumulate() {
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
    async fn deaths_of_healthy_workers_never_give_up() {
        let mut h = Harness::new(quick_policy(), 1);
        // 50 kills of a worker that had been ready for 1.5 s (> min_uptime), far more
        // than the limit of 3 in a minute: each is replaced at once, no give-up.
        for _ in 0..50 {
            let id = h.last_spawn(0);
            h.ready(id);
            h.input(Input::Heartbeat { id, active: 0 });
            h.advance(Duration::from_millis(1500)).await;
            h.input(Input::Exited {
                id,
                exit: ExitInfo {
                    code: None,
                    signal: Some(9),
                },
            });
        }
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 0);
        assert_eq!(h.spawns().len(), 51);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.sm.restarts_total(), 50);
        // But a worker that dies 0.5 s after becoming ready is unstable: it counts.
        for _ in 0..4 {
            let id = h.last_spawn(0);
            h.ready(id);
            h.advance(Duration::from_millis(500)).await;
            h.crash(id);
            h.advance(Duration::from_secs(2)).await;
        }
        assert_eq!(h.count_events(|e| matches!(e, Event::GiveUp { .. })), 1);
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
        let scheduled: Vec<u64> = h
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::RestartScheduled { delay, .. } => Some(delay.as_millis() as u64),
                _ => None,
            })
            .collect();
        assert_eq!(scheduled, [100, 200, 400, 800, 1000, 1000]);

        // A worker that stayed up for min_uptime resets the backoff: immediate restart.
        let id = h.last_spawn(0);
        h.ready(id);
        for _ in 0..3 {
            h.input(Input::Heartbeat { id, active: 0 });
            h.advance(Duration::from_millis(500)).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_leaving_worker_is_killed_at_the_drain_deadline() {
        let mut h = Harness::new(quick_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        h.input(Input::Suicide {
            id: old,
            reason: "bye".into(),
        });
        let new = h.last_spawn(0);
        h.ready(new);
        h.input(Input::Heartbeat { id: new, active: 0 });
        h.advance(Duration::from_millis(2900)).await;
        assert!(
            !h.actions
                .iter()
                .any(|a| matches!(a, Action::Kill { id, .. } if *id == old))
        );
        h.advance(Duration::from_millis(200)).await;
        assert!(
            h.actions
                .iter()
                .any(|a| matches!(a, Action::Kill { id, .. } if *id == old))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_worker_is_hung_killed_and_restarted() {
        let mut h = Harness::new(quick_policy(), 1);
        let id = h.last_spawn(0);
        h.ready(id);
        h.advance(Duration::from_millis(1500)).await;
        h.input(Input::Heartbeat { id, active: 3 });
        h.advance(Duration::from_millis(1900)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::WorkerHung { .. })), 0);
        h.advance(Duration::from_millis(200)).await;
        assert_eq!(h.count_events(|e| matches!(e, Event::WorkerHung { .. })), 1);
        let out = h.position(|a| *a == Action::Rotate { id, on: false });
        let kill = h.position(|a| matches!(a, Action::Kill { id: k, .. } if *k == id));
        assert!(out < kill);
        h.input(Input::Exited {
            id,
            exit: ExitInfo {
                code: None,
                signal: Some(9),
            },
        });
        // Ready for 3.6 s > min_uptime: restarted at once.
        assert_eq!(h.spawns().len(), 2);
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
        h.crash(id);
        h.advance(Duration::from_millis(150)).await;
        assert_eq!(h.spawns().len(), 2);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn exit_of_a_replaced_worker_does_not_count() {
        let mut h = Harness::new(quick_policy(), 1);
        let old = h.last_spawn(0);
        h.ready(old);
        h.sm.reload(Instant::now()).expect("reload");
        h.pump();
        let new = h.last_spawn(0);
        h.ready(new);
        // The old generation dies badly while draining: no restart, nothing counted.
        h.crash(old);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.spawns().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rolling_reload_never_exceeds_n_plus_one() {
        let mut h = Harness::new(quick_policy(), 3);
        for slot in 0..3 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        let max_live = std::cell::Cell::new(h.sm.live());
        h.sm.reload(Instant::now()).expect("reload");
        h.pump();
        for slot in 0..3u32 {
            let new = h.last_spawn(slot);
            assert_eq!(h.sm.procs[&new].generation, 1);
            max_live.set(max_live.get().max(h.sm.live()));
            h.ready(new);
            // The old one of this slot drains only now.
            let old =
                h.sm.procs
                    .iter()
                    .find(|(_, p)| p.slot == slot && p.generation == 0)
                    .map(|(id, _)| *id)
                    .expect("old still alive");
            assert_eq!(h.sm.procs[&old].state, ProcState::Draining);
            // No spawn for the next slot while the old one lives.
            assert_eq!(h.spawns().len(), 3 + slot as usize + 1);
            h.input(Input::Exited {
                id: old,
                exit: ExitInfo {
                    code: Some(0),
                    signal: None,
                },
            });
        }
        assert!(max_live.get() <= 4);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFinished { generation: 1 })),
            1
        );
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reloads_during_a_reload_coalesce_into_one() {
        let mut h = Harness::new(quick_policy(), 1);
        let a = h.last_spawn(0);
        h.ready(a);
        h.sm.reload(Instant::now()).expect("reload");
        h.sm.reload(Instant::now()).expect("queued");
        h.sm.reload(Instant::now()).expect("queued");
        h.pump();
        let mut ids = vec![a];
        for _ in 0..2 {
            let new = h.last_spawn(0);
            h.ready(new);
            let old = *ids.last().expect("old");
            h.crash(old);
            ids.push(new);
        }
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadStarted { .. })),
            2
        );
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFinished { .. })),
            2
        );
        assert!(!h.sm.reloading());
        assert_eq!(h.sm.generation(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_reload_keeps_the_old_worker() {
        let mut h = Harness::new(quick_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.ready(b);
        h.sm.reload(Instant::now()).expect("reload");
        h.pump();
        let new = h.last_spawn(0);
        h.crash(new);
        assert_eq!(
            h.count_events(|e| matches!(e, Event::ReloadFailed { .. })),
            1
        );
        assert!(!h.sm.reloading());
        assert_eq!(h.sm.slots[0].current, Some(a));
        assert_eq!(h.sm.procs[&a].state, ProcState::Ready);
        assert_eq!(h.sm.restarts_in_window(Instant::now()), 0);
        assert_eq!(h.spawns().len(), 3, "no retry, slot 1 untouched");
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_and_down() {
        let mut h = Harness::new(quick_policy(), 2);
        h.sm.scale(Instant::now(), 4).expect("scale");
        h.pump();
        assert_eq!(h.spawns().len(), 4);
        for slot in 0..4 {
            let id = h.last_spawn(slot);
            h.ready(id);
        }
        h.sm.scale(Instant::now(), 1).expect("scale");
        h.pump();
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
        let err =
            h.sm.scale(Instant::now(), 1025)
                .expect_err("over the limit");
        assert!(err.contains("1024"), "{err}");
        assert_eq!(h.sm.target(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn graceful_stop_drains_then_exits_zero() {
        let mut h = Harness::new(quick_policy(), 2);
        let (a, b) = (h.last_spawn(0), h.last_spawn(1));
        h.ready(a);
        h.sm.stop(Instant::now(), true);
        h.pump();
        assert!(h.actions.contains(&Action::StopAccepting));
        assert!(
            h.actions
                .iter()
                .any(|x| matches!(x, Action::Drain { id, .. } if *id == a))
        );
        // b was still starting: killed, nothing to drain.
        assert!(
            h.actions
                .iter()
                .any(|x| matches!(x, Action::Kill { id, .. } if *id == b))
        );
        h.crash(b);
        assert!(!h.actions.iter().any(|x| matches!(x, Action::Exit { .. })));
        // a outlives the drain deadline: killed.
        h.advance(Duration::from_secs(4)).await;
        assert!(
            h.actions
                .iter()
                .any(|x| matches!(x, Action::Kill { id, .. } if *id == a))
        );
        h.crash(a);
        assert!(h.actions.contains(&Action::Exit { code: 0 }));
        assert_eq!(h.spawns().len(), 2, "no restart while stopping");
        assert!(h.sm.reload(Instant::now()).is_err());
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
    async fn closed_channel_takes_the_worker_out_and_kills_it_if_it_lingers() {
        let mut h = Harness::new(quick_policy(), 1);
        let id = h.last_spawn(0);
        h.ready(id);
        h.input(Input::ChannelClosed {
            id,
            error: Some("malformed".into()),
        });
        assert!(h.actions.contains(&Action::Rotate { id, on: false }));
        h.advance(Duration::from_millis(1100)).await;
        assert!(
            h.actions
                .iter()
                .any(|a| matches!(a, Action::Kill { id: k, .. } if *k == id))
        );
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
