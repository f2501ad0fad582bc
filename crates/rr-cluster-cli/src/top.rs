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
        if at.elapsed() < Duration::from_secs(10) {
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

/// Runs the view until `q`, Esc or Ctrl-C.
pub(crate) async fn main(path: PathBuf, every: Duration) -> ExitCode {
    // A first status before taking over the terminal: a wrong path is one line.
    let first = status(&path).await;
    if let Err(e) = &first {
        crate::eprintln_safe(&format!("rr-cluster: error: {e}"));
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Handle::current();
    let ui = tokio::task::spawn_blocking(move || {
        let mut terminal = ratatui::init();
        let mut view = View::default();
        view.update(first);
        let mut next = Instant::now() + every;
        let result = loop {
            if let Err(e) = terminal.draw(|f| draw(f, &view, &path)) {
                break Err(e.to_string());
            }
            let wait = next.saturating_duration_since(Instant::now());
            match event::poll(wait) {
                Ok(true) => {
                    let Ok(Event::Key(key)) = event::read() else {
                        continue;
                    };
                    if key.kind != KeyEventKind::Press {
                        continue;
                    }
                    let req = match key.code {
                        KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
                        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                            break Ok(());
                        }
                        KeyCode::Char('r') => Request::Reload { wait: false },
                        KeyCode::Char('+') | KeyCode::Char('=') => Request::Scale {
                            workers: None,
                            by: Some(1),
                        },
                        KeyCode::Char('-') => Request::Scale {
                            workers: None,
                            by: Some(-1),
                        },
                        _ => continue,
                    };
                    let message = runtime.block_on(act(&path, req));
                    view.message = Some((Instant::now(), message));
                    next = Instant::now();
                }
                Ok(false) => {}
                Err(e) => break Err(e.to_string()),
            }
            if Instant::now() >= next {
                view.update(runtime.block_on(status(&path)));
                next = Instant::now() + every;
            }
        };
        ratatui::restore();
        result
    });
    match ui.await {
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
