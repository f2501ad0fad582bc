//! Running a load test: one task per connection, plus the fault injector and the
//! progress line; merging what they measured into a [`Report`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, Mode};
use crate::conn::Conn;
use crate::fault;
use crate::outcome::ErrorKind;
use crate::progress;
use crate::recorder::{Live, Recorder};
use crate::report::Report;

/// Why a run could not be carried out (failed requests are not errors: they are in
/// the [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Fault injection was asked for, but the master's control socket does not answer.
    #[error("fault injection needs the master's control socket: {0}")]
    Control(String),
    /// The tokio runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A connection task panicked.
    #[error("a load task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What every connection task shares.
#[derive(Debug)]
struct Plan {
    config: Config,
    request: Arc<[u8]>,
    measure_start: Instant,
    end: Instant,
    t0: Instant,
    live: Arc<Live>,
}

/// Runs the load test described by `config` on the current tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = rr_load::Config::builder("127.0.0.1:8080")
///     .connections(32)
///     .duration(std::time::Duration::from_secs(5))
///     .build()?;
/// let report = rr_load::run(config).await?;
/// println!("{}", report.to_table());
/// # Ok(()) }
/// ```
pub async fn run(config: Config) -> Result<Report, RunError> {
    if config.faults.enabled() {
        fault::status(&config.faults.control)
            .await
            .map_err(RunError::Control)?;
    }
    let t0 = Instant::now();
    let measure_start = t0 + config.warmup;
    let end = measure_start + config.duration;
    let live = Arc::new(Live::default());
    let plan = Arc::new(Plan {
        request: config.request_bytes().into(),
        config: config.clone(),
        measure_start,
        end,
        t0,
        live: Arc::clone(&live),
    });

    let tasks: Vec<_> = (0..config.connections)
        .map(|i| tokio::spawn(drive(i, Arc::clone(&plan))))
        .collect();
    let injector = config
        .faults
        .enabled()
        .then(|| tokio::spawn(fault::inject(config.faults.clone(), measure_start, end)));
    let progress = config
        .progress
        .then(|| tokio::spawn(progress::show(live, t0, measure_start, end)));

    let mut total = Recorder::new(config.faults.enabled());
    for task in tasks {
        total.merge(task.await?);
    }
    let log = match injector {
        Some(task) => Some(task.await?),
        None => None,
    };
    if let Some(task) = progress {
        task.abort();
        let _ = task.await;
        progress::clear();
    }
    Ok(Report::new(&config, total, log))
}

/// Builds a runtime with `config.threads` threads (a current-thread runtime for 1) and
/// runs the load test on it.
pub fn run_blocking(config: Config) -> Result<Report, RunError> {
    let mut builder = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.threads);
        b
    };
    let runtime = builder
        .enable_all()
        .thread_name("rr-load")
        .build()
        .map_err(RunError::Runtime)?;
    runtime.block_on(run(config))
}

fn micros(since: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(since).as_micros()).unwrap_or(u64::MAX)
}

/// One connection's loop: closed (next request when the last is done) or open (at
/// fixed intended times, `connections / rate` apart, staggered by `1 / rate`).
async fn drive(index: usize, plan: Arc<Plan>) -> Recorder {
    let config = &plan.config;
    let mut conn = Conn::new(
        config.addr,
        config.mode == Mode::KeepAlive,
        Arc::clone(&plan.request),
    );
    let mut rec = Recorder::new(config.faults.enabled());
    let schedule = config.rate.map(|rate| {
        let interval = Duration::from_secs_f64(config.connections as f64 / rate);
        let first = plan.t0 + Duration::from_secs_f64(index as f64 / rate);
        (interval, first)
    });
    let mut next_intended = schedule.map(|(_, first)| first);
    let deadline = tokio::time::sleep_until(plan.end);
    tokio::pin!(deadline);

    loop {
        let (intended, start) = match (&mut next_intended, schedule) {
            (Some(next), Some((interval, _))) => {
                let intended = *next;
                *next += interval;
                if intended >= plan.end {
                    break;
                }
                if Instant::now() < intended {
                    tokio::time::sleep_until(intended).await;
                }
                (intended, Instant::now())
            }
            _ => {
                let now = Instant::now();
                (now, now)
            }
        };
        if start >= plan.end {
            break;
        }
        deadline
            .as_mut()
            .reset((start + config.timeout).min(plan.end));
        let result = tokio::select! {
            biased;
            r = conn.request() => Some(r),
            () = &mut deadline => None,
        };
        let done = Instant::now();
        let outcome = match result {
            // Still in flight when the run ended: neither a success nor a failure.
            None if done >= plan.end => break,
            None => Err((ErrorKind::Timeout, None)),
            Some(Err(kind)) => Err((kind, None)),
            Some(Ok(reply)) if ErrorKind::status_is_success(reply.status) => Ok(reply),
            Some(Ok(reply)) => Err((ErrorKind::BadStatus, Some(reply.status))),
        };
        if outcome.is_err() {
            // A refused connect can fail without ever waiting: let the other
            // connections (and the timers) run.
            tokio::task::coop::consume_budget().await;
        }
        if intended < plan.measure_start {
            plan.live.add_warmup();
            continue;
        }
        plan.live.add(outcome.is_ok());
        match outcome {
            Ok(reply) => {
                rec.success(micros(intended, done), reply.worker.as_ref());
                rec.status(reply.status);
            }
            Err((kind, status)) => {
                if let Some(status) = status {
                    rec.status(status);
                }
                rec.failure(
                    kind,
                    micros(plan.measure_start, intended),
                    micros(plan.measure_start, done),
                );
            }
        }
    }
    rec.reconnects = conn.reconnects;
    rec
}
