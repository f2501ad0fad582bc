//! `rr-cluster top`: a live view of a running pool over its control socket, in the
//! spirit of `pm2 monit` and htop. One row per worker (state, generation, uptime, CPU,
//! memory, connections per second with a sparkline of the last minute, restarts), the
//! pool's totals above, and keys: `r` reload, `+`/`-` scale by one, `q` quit.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use rr_cluster::control::{self, Request, Response, Status, WorkerState};

use crate::client::{bytes, human, percent};

/// Samples kept for each sparkline.
const HISTORY: usize = 60;
/// How long a key's answer stays on screen.
const MESSAGE_FOR: Duration = Duration::from_secs(10);
const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What the view keeps between refreshes.
#[derive(Debug, Default)]
struct View {
    status: Option<Status>,
    error: Option<String>,
    /// Connections per second by slot, oldest first.
    history: BTreeMap<u32, VecDeque<f64>>,
    total: VecDeque<f64>,
    message: Option<(Instant, String)>,
}

impl View {
    fn update(&mut self, status: Result<Status, String>) {
        match status {
            Ok(s) => {
                push(&mut self.total, s.connections_per_sec);
                let mut seen = Vec::new();
                for w in &s.workers {
                    if seen.contains(&w.slot) {
                        continue;
                    }
                    seen.push(w.slot);
                    let rate: f64 = s
                        .workers
                        .iter()
                        .filter(|x| x.slot == w.slot)
                        .map(|x| x.connections_per_sec)
                        .sum();
                    push(self.history.entry(w.slot).or_default(), rate);
                }
                self.history.retain(|slot, _| seen.contains(slot));
                self.status = Some(s);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }
}

fn push(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

/// The last `width` samples as block characters, scaled to their maximum.
fn sparkline(q: &VecDeque<f64>, width: usize) -> String {
    let max = q.iter().copied().fold(0.0f64, f64::max);
    let skip = q.len().saturating_sub(width);
    q.iter()
        .skip(skip)
        .map(|v| {
            if max <= 0.0 {
                BLOCKS[0]
            } else {
                let i = ((v / max) * (BLOCKS.len() - 1) as f64).round() as usize;
                BLOCKS[i.min(BLOCKS.len() - 1)]
            }
        })
        .collect()
}

fn state_style(state: WorkerState) -> Style {
    match state {
        WorkerState::Ready => Style::default().fg(Color::Green),
        WorkerState::Starting | WorkerState::Draining | WorkerState::Leaving => {
            Style::default().fg(Color::Yellow)
        }
        _ => Style::default().fg(Color::Red),
    }
}

fn draw(frame: &mut ratatui::Frame<'_>, view: &View, path: &Path) {
    let areas = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .split(frame.area());
    let mut header = Vec::new();
    match &view.status {
        Some(s) => {
            let mut flags = Vec::new();
            if s.reloading {
                flags.push("RELOADING");
            }
            if s.stopping {
                flags.push("STOPPING");
            }
            if s.gave_up {
                flags.push("GAVE UP");
            }
            if s.paused {
                flags.push("PAUSED");
            }
            header.push(Line::from(vec![
                Span::styled(
                    "rr-cluster top",
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(format!(
                    "  master {}  up {}  generation {}  workers {}  balance {}  {}",
                    s.master_pid,
                    human(s.uptime_ms),
                    s.generation,
                    s.target_workers,
                    s.balance,
                    flags.join(" ")
                )),
            ]));
            header.push(Line::raw(format!(
                "accepted {}  conn/s {:.0} {}  queued {}  restarts in window {}  master cpu {}  rss {}",
                s.accepted,
                s.connections_per_sec,
                sparkline(&view.total, 30),
                s.queued,
                s.restarts_in_window,
                percent(s.master_cpu_percent),
                bytes(s.master_rss_bytes)
            )));
            header.push(Line::raw(format!("listening {}", s.listeners.join(", "))));
        }
        None => header.push(Line::raw(format!("connecting to {} ...", path.display()))),
    }
    if let Some(e) = &view.error {
        header.push(Line::styled(e.clone(), Style::default().fg(Color::Red)));
    }
    frame.render_widget(Paragraph::new(header), areas[0]);

    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Min(10),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(8),
    ];
    let head = Row::new([
        "SLOT",
        "PID",
        "STATE",
        "GEN",
        "UPTIME",
        "CPU",
        "RSS",
        "CONN/S",
        "LAST MINUTE",
        "DISPATCHED",
        "ACTIVE",
        "RESTARTS",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row<'_>> = view
        .status
        .iter()
        .flat_map(|s| s.workers.iter())
        .map(|w| {
            let history = view
                .history
                .get(&w.slot)
                .map(|q| sparkline(q, 40))
                .unwrap_or_default();
            Row::new([
                Cell::from(w.slot.to_string()),
                Cell::from(w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string())),
                Cell::from(w.state.as_str()).style(state_style(w.state)),
                Cell::from(w.generation.to_string()),
                Cell::from(if w.pid.is_some() {
                    human(w.uptime_ms)
                } else {
                    "-".into()
                }),
                Cell::from(percent(w.cpu_percent)),
                Cell::from(bytes(w.rss_bytes)),
                Cell::from(format!("{:.0}", w.connections_per_sec)),
                Cell::from(history).style(Style::default().fg(Color::Cyan)),
                Cell::from(w.dispatched.to_string()),
                Cell::from(w.active.to_string()),
                Cell::from(w.restarts.to_string()),
            ])
        })
        .collect();
    let table = Table::new(rows, widths)
        .header(head)
        .block(Block::default().borders(Borders::TOP).title(" workers "));
    frame.render_widget(table, areas[1]);

    let mut keys = vec![Span::styled(
        "r reload  + scale up  - scale down  q quit",
        Style::default().add_modifier(Modifier::DIM),
    )];
    if let Some((at, message)) = &view.message {
        if at.elapsed() < MESSAGE_FOR {
            keys.push(Span::raw(format!("   {message}")));
        }
    }
    frame.render_widget(Paragraph::new(Line::from(keys)), areas[2]);
}

async fn status(path: &Path) -> Result<Status, String> {
    match control::request(path, &Request::Status).await {
        Ok(Response::Status(s)) => Ok(s),
        Ok(Response::Error { message } | Response::Busy { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn act(path: &Path, req: Request) -> String {
    match control::request(path, &req).await {
        Ok(Response::Ok { message }) => message,
        Ok(Response::Error { message } | Response::Busy { message }) => {
            format!("refused: {message}")
        }
        Ok(other) => format!("unexpected answer: {other:?}"),
        Err(e) => e.to_string(),
    }
}

/// What the async side tells the view.
#[derive(Debug)]
enum Update {
    Status(Result<Status, String>),
    Message(String),
    /// A signal came: restore the terminal and end.
    Quit,
}

/// How long the view waits for input before it looks for updates again: how soon a
/// refresh, an answer or a signal shows.
const TICK: Duration = Duration::from_millis(50);
/// Input events handled in one go before the view is redrawn.
const EVENTS_PER_DRAW: usize = 64;
/// Actions (r, +, -) waiting for the master at once; more keys are refused until
/// their answers come.
const PENDING_ACTIONS: usize = 4;

/// SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGTSTP, caught so that the terminal is
/// restored before exit. (In raw mode the keys send no signal: these come from
/// outside. SIGTSTP ends the view too, rather than stop it with the terminal raw and
/// on the alternate screen.)
#[derive(Debug)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    tstp: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            tstp: signal(Self::tstp())?,
        })
    }

    fn tstp() -> tokio::signal::unix::SignalKind {
        tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::TSTP.as_raw())
    }

    /// The number of the next signal. (A stream that ends, its driver gone, counts as
    /// its signal.)
    async fn recv(&mut self) -> i32 {
        use tokio::signal::unix::SignalKind;
        let kind = tokio::select! {
            _ = self.term.recv() => SignalKind::terminate(),
            _ = self.int.recv() => SignalKind::interrupt(),
            _ = self.hup.recv() => SignalKind::hangup(),
            _ = self.quit.recv() => SignalKind::quit(),
            _ = self.tstp.recv() => Self::tstp(),
        };
        kind.as_raw_value()
    }
}

/// The exit code for a view ended by signal `number`, as a shell would report it.
fn signal_exit(number: i32) -> ExitCode {
    ExitCode::from(u8::try_from(128 + number).unwrap_or(1))
}

/// Runs the view until `q`, Esc or Ctrl-C (or SIGTERM, SIGINT, SIGHUP, SIGQUIT,
/// SIGTSTP).
pub(crate) async fn main(path: PathBuf, every: Duration) -> ExitCode {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        crate::eprintln_safe(
            "rr-cluster: error: top needs a terminal (stdout is not one); use `rr-cluster status` in scripts",
        );
        return ExitCode::FAILURE;
    }
    let mut signals = match Signals::catch() {
        Ok(s) => s,
        Err(e) => {
            crate::eprintln_safe(&format!(
                "rr-cluster: error: cannot install signal handlers: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    // A first status before taking over the terminal: a wrong path is one line.
    let first = tokio::select! {
        s = status(&path) => s,
        n = signals.recv() => return signal_exit(n),
    };
    let first = match first {
        Ok(s) => s,
        Err(e) => {
            crate::eprintln_safe(&format!("rr-cluster: error: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // The view runs on a thread of its own (terminal input blocks); the requests to
    // the master run here, so a master slow to answer never holds up the keys.
    let (updates, from_master) = std::sync::mpsc::channel();
    let (actions, requests) = tokio::sync::mpsc::channel(PENDING_ACTIONS);
    let ui_path = path.clone();
    let mut ui =
        tokio::task::spawn_blocking(move || run_view(first, &ui_path, &from_master, &actions));
    let refresher = tokio::spawn(refresh(path.clone(), every, updates.clone()));
    let actor = tokio::spawn(act_on_keys(path, requests, updates.clone()));
    let code = tokio::select! {
        ended = &mut ui => view_exit(ended),
        n = signals.recv() => {
            let _ = updates.send(Update::Quit);
            // The view notices within a tick; a view stuck writing to a terminal
            // that went away is not waited for.
            if tokio::time::timeout(Duration::from_secs(2), &mut ui).await.is_err() {
                // The restore writes to the terminal too, and would block behind the
                // stuck view (the stdout lock, a terminal that takes nothing): on a
                // thread of its own, given half a second, then left behind.
                let (done, restored) = std::sync::mpsc::channel();
                let _ = std::thread::Builder::new()
                    .name("rr-cluster-top-restore".into())
                    .spawn(move || {
                        let _ = ratatui::try_restore();
                        let _ = done.send(());
                    });
                let _ = tokio::task::spawn_blocking(move || {
                    restored.recv_timeout(Duration::from_millis(500))
                })
                .await;
            }
            signal_exit(n)
        }
    };
    refresher.abort();
    actor.abort();
    code
}

fn view_exit(ended: Result<Result<(), String>, tokio::task::JoinError>) -> ExitCode {
    match ended {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            crate::eprintln_safe(&format!("rr-cluster: error: {e}"));
            ExitCode::FAILURE
        }
        Err(e) => {
            crate::eprintln_safe(&format!("rr-cluster: error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Asks for the status every `every` and hands it to the view, until the view ends.
async fn refresh(path: PathBuf, every: Duration, updates: std::sync::mpsc::Sender<Update>) {
    let mut ticker = tokio::time::interval(every);
    // A slow answer delays the next request instead of bunching them up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first status is already shown
    loop {
        ticker.tick().await;
        let s = status(&path).await;
        if updates.send(Update::Status(s)).is_err() {
            return;
        }
    }
}

/// Sends the keys' requests to the master and their answers (and a fresh status) to
/// the view, until the view ends.
async fn act_on_keys(
    path: PathBuf,
    mut requests: tokio::sync::mpsc::Receiver<Request>,
    updates: std::sync::mpsc::Sender<Update>,
) {
    while let Some(req) = requests.recv().await {
        let message = act(&path, req).await;
        if updates.send(Update::Message(message)).is_err() {
            return;
        }
        let s = status(&path).await;
        if updates.send(Update::Status(s)).is_err() {
            return;
        }
    }
}

/// Takes over the terminal, runs the view, and gives the terminal back.
fn run_view(
    first: Status,
    path: &Path,
    updates: &std::sync::mpsc::Receiver<Update>,
    actions: &tokio::sync::mpsc::Sender<Request>,
) -> Result<(), String> {
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            // Raw mode may be on already (the alternate screen failed).
            let _ = ratatui::try_restore();
            return Err(format!("cannot use the terminal: {e}"));
        }
    };
    let mut view = View::default();
    view.update(Ok(first));
    let result = view_loop(&mut terminal, &mut view, path, updates, actions);
    let _ = ratatui::try_restore();
    result
}

fn view_loop(
    terminal: &mut ratatui::DefaultTerminal,
    view: &mut View,
    path: &Path,
    updates: &std::sync::mpsc::Receiver<Update>,
    actions: &tokio::sync::mpsc::Sender<Request>,
) -> Result<(), String> {
    use std::sync::mpsc::TryRecvError;
    let mut dirty = true;
    let mut message_shown = false;
    loop {
        // What came from the master since the last turn (bounded: it sends a status
        // per interval and an answer per key).
        for _ in 0..EVENTS_PER_DRAW {
            match updates.try_recv() {
                Ok(Update::Status(s)) => view.update(s),
                Ok(Update::Message(m)) => view.message = Some((Instant::now(), m)),
                Ok(Update::Quit) | Err(TryRecvError::Disconnected) => return Ok(()),
                Err(TryRecvError::Empty) => break,
            }
            dirty = true;
        }
        // A key's answer disappears after a while.
        let showing = view
            .message
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < MESSAGE_FOR);
        if showing != message_shown {
            message_shown = showing;
            dirty = true;
        }
        if dirty {
            terminal
                .draw(|f| draw(f, view, path))
                .map_err(|e| e.to_string())?;
            dirty = false;
        }
        if !event::poll(TICK).map_err(|e| e.to_string())? {
            continue;
        }
        // The input there is now, in one go; any of it (a resize, a mouse move, an
        // unmapped key) leaves the refresh to its own schedule.
        for _ in 0..EVENTS_PER_DRAW {
            match event::read().map_err(|e| e.to_string())? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    let req = match key.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(());
                        }
                        KeyCode::Char('r') => Some(Request::Reload { wait: false }),
                        KeyCode::Char('+') | KeyCode::Char('=') => Some(Request::Scale {
                            workers: None,
                            by: Some(1),
                        }),
                        KeyCode::Char('-') => Some(Request::Scale {
                            workers: None,
                            by: Some(-1),
                        }),
                        _ => None,
                    };
                    if let Some(req) = req {
                        if actions.try_send(req).is_err() {
                            view.message = Some((
                                Instant::now(),
                                "busy: earlier keys still wait for the master".to_owned(),
                            ));
                            dirty = true;
                        }
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
            if !event::poll(Duration::ZERO).map_err(|e| e.to_string())? {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_to_their_maximum() {
        let q: VecDeque<f64> = [0.0, 5.0, 10.0].into_iter().collect();
        assert_eq!(sparkline(&q, 10), "▁▅█");
        let flat: VecDeque<f64> = [0.0, 0.0].into_iter().collect();
        assert_eq!(sparkline(&flat, 10), "▁▁");
        let long: VecDeque<f64> = (0..100).map(f64::from).collect();
        assert_eq!(sparkline(&long, 5).chars().count(), 5);
    }

    #[test]
    fn history_follows_the_slots() {
        let mut view = View::default();
        let mut s = Status {
            workers: vec![
                rr_cluster::control::WorkerStatus {
                    slot: 0,
                    connections_per_sec: 10.0,
                    ..Default::default()
                },
                rr_cluster::control::WorkerStatus {
                    slot: 1,
                    connections_per_sec: 20.0,
                    ..Default::default()
                },
            ],
            ..Status::default()
        };
        view.update(Ok(s.clone()));
        s.workers.pop();
        view.update(Ok(s));
        assert_eq!(view.history.len(), 1, "slot 1 was scaled away");
        assert_eq!(view.history[&0].len(), 2);
    }
}
