//! Reloads: reading the new configuration through the hook, checking what a reload
//! may change, and starting the rolling restart under it.

use std::sync::Arc;

use tokio::time::Instant;

use super::command::{Outcome, Refusal};
use super::dispatch::Balance;
use super::driver::{Driver, reload_outcome, reload_refusal};
use crate::event::Event;

impl Driver {
    /// A reload: re-reads the configuration through the hook (a bad one is rejected
    /// and the pool is left alone), checks it (the worker command too:
    /// [`WorkerCommand::check`](super::WorkerCommand::check)), and rolls the workers
    /// over to it. A reload requested while another runs is queued; the configuration
    /// is read when it starts.
    ///
    /// A change of `workers` is applied (as a scale) before the rollout starts, and
    /// stays if the new generation then fails and rolls back: only the generation
    /// rolls back, not the worker count.
    pub(crate) fn reload(&mut self, now: Instant) -> Result<Outcome, Refusal> {
        if self.sm.stopping() {
            return Err(Refusal::Stopping);
        }
        let current = Arc::clone(self.settings());
        if self.sm.reloading() {
            return self
                .sm
                .reload(now, current.policy.clone())
                .map(reload_outcome)
                .map_err(reload_refusal);
        }
        let fresh = match &current.reload_hook {
            None => (*current).clone(),
            Some(hook) => {
                let fresh = hook().and_then(|b| b.validate().map_err(|e| e.to_string()));
                match fresh {
                    Ok(s) => s,
                    Err(reason) => return Err(self.reject(Refusal::ConfigRejected { reason })),
                }
            }
        };
        // A command that cannot start (a typo in `cwd`, a program gone) would only
        // crash-loop the new generation: refused before anything is started.
        if let Err(reason) = fresh.command.check() {
            let reason = format!("cannot start the worker command: {reason}");
            return Err(self.reject(Refusal::ConfigRejected { reason }));
        }
        if fresh.listen != current.listen {
            return Err(self.reject(Refusal::CannotChange {
                what: "the listen addresses",
            }));
        }
        if fresh.control != current.control {
            return Err(self.reject(Refusal::CannotChange {
                what: "the control socket",
            }));
        }
        if (fresh.balance == Balance::Shared) != (current.balance == Balance::Shared) {
            return Err(self.reject(Refusal::CannotChange {
                what: "balance = \"shared\"",
            }));
        }
        if fresh.output != current.output {
            tracing::warn!("output settings cannot change on reload; the old ones are kept");
        }
        // A runtime `scale` stays unless the configuration changed `workers`.
        if fresh.workers != self.configured_workers {
            self.configured_workers = fresh.workers;
            if fresh.workers != self.sm.target() {
                self.sm.scale(now, fresh.workers).map_err(reload_refusal)?;
            }
        }
        if fresh.balance != Balance::Shared {
            self.dispatcher.set_balance(fresh.balance);
        }
        let generation = self.sm.next_generation();
        let policy = fresh.policy.clone();
        let mut fresh = fresh;
        fresh.common.output = current.output.clone();
        fresh.common.reload_hook = current.reload_hook.clone();
        self.generations.insert(generation, Arc::new(fresh));
        let started = self.sm.reload(now, policy).map_err(reload_refusal);
        if started.is_err() {
            self.generations.remove(&generation);
        }
        started.map(reload_outcome)
    }

    /// Publishes a refused reload (and logs it) and returns the refusal.
    fn reject(&mut self, refusal: Refusal) -> Refusal {
        let reason = match &refusal {
            Refusal::ConfigRejected { reason } => reason.clone(),
            other => other.to_string(),
        };
        let event = Event::ReloadRejected { reason };
        event.log();
        let _ = self.events_sender().send(event);
        refusal
    }
}
