//! Worker output capture: each worker's stdout and stderr go through the master, line
//! by line, prefixed with the worker's slot and pid (text) or as fields (JSON), to the
//! master's own stdout and stderr or to log files.
//!
//! A worker that floods its output never blocks the master: readers hand lines to one
//! writer thread through a queue bounded in bytes, and lines that do not fit are
//! dropped, counted, and reported in the output itself. A broken or stuck destination
//! (a log reader that went away) only loses worker lines: write errors are counted,
//! never fatal.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest line passed on; longer ones are split.
const MAX_LINE: usize = 16 * 1024;
/// Bytes of lines waiting for the writer, at most.
const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Lines waiting for the writer, at most.
const MAX_QUEUED_LINES: usize = 8192;

/// How the master writes logs and worker output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines: `[worker 0 pid 4242] the worker's line`.
    #[default]
    Text,
    /// One JSON object per line: `{"timestamp":..,"worker":0,"pid":4242,"stream":"stdout","line":..}`.
    Json,
}

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

enum Message {
    Line {
        slot: u32,
        pid: u32,
        stream: Stream,
        text: String,
    },
    Reopen,
}

/// Counters of the output path.
#[derive(Debug, Default)]
pub(crate) struct OutputStats {
    /// Lines dropped because the writer could not keep up.
    pub(crate) dropped: AtomicU64,
    /// Lines that could not be written (broken pipe, full disk).
    pub(crate) write_errors: AtomicU64,
    queued_bytes: AtomicUsize,
}

/// The reading side: cheap to clone, one per worker stream.
#[derive(Debug, Clone)]
pub(crate) struct OutputSink {
    tx: SyncSender<Message>,
    pub(crate) stats: Arc<OutputStats>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line { slot, stream, .. } => write!(f, "Line({slot}, {stream:?})"),
            Message::Reopen => f.write_str("Reopen"),
        }
    }
}

impl OutputSink {
    /// Starts the writer thread.
    pub(crate) fn start(
        format: LogFormat,
        stdout: Option<PathBuf>,
        stderr: Option<PathBuf>,
    ) -> std::io::Result<OutputSink> {
        let (tx, rx) = std::sync::mpsc::sync_channel(MAX_QUEUED_LINES);
        let stats = Arc::new(OutputStats::default());
        let writer = Writer::new(format, stdout, stderr, Arc::clone(&stats));
        std::thread::Builder::new()
            .name("rr-cluster-output".into())
            .spawn(move || writer.run(rx))?;
        Ok(OutputSink { tx, stats })
    }

    /// Reads `source` line by line until it ends, passing each line on.
    pub(crate) fn capture<R>(&self, source: R, slot: u32, pid: u32, stream: Stream)
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let sink = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(MAX_LINE, source);
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                match read_line_bounded(&mut reader, &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => sink.push(slot, pid, stream, &line),
                }
            }
        });
    }

    fn push(&self, slot: u32, pid: u32, stream: Stream, line: &[u8]) {
        let text = String::from_utf8_lossy(line)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        let size = text.len() + 64;
        let queued = self.stats.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if queued + size > MAX_QUEUED_BYTES {
            self.stats.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let msg = Message::Line {
            slot,
            pid,
            stream,
            text,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(msg) {
            self.stats.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reopens the log files (logrotate's convention: on SIGUSR1).
    pub(crate) fn reopen(&self) {
        let _ = self.tx.try_send(Message::Reopen);
    }
}

/// Reads up to and including a newline, at most [`MAX_LINE`] bytes.
async fn read_line_bounded<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let room = MAX_LINE - line.len();
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(pos) if pos < room => (pos + 1, true),
            _ => (available.len().min(room), available.len() >= room),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done || line.len() >= MAX_LINE {
            return Ok(line.len());
        }
    }
}

struct Writer {
    format: LogFormat,
    stdout_path: Option<PathBuf>,
    stderr_path: Option<PathBuf>,
    stdout_file: Option<File>,
    stderr_file: Option<File>,
    stats: Arc<OutputStats>,
    reported_drops: u64,
}

impl Writer {
    fn new(
        format: LogFormat,
        stdout_path: Option<PathBuf>,
        stderr_path: Option<PathBuf>,
        stats: Arc<OutputStats>,
    ) -> Writer {
        let mut w = Writer {
            format,
            stdout_path,
            stderr_path,
            stdout_file: None,
            stderr_file: None,
            stats,
            reported_drops: 0,
        };
        w.reopen();
        w
    }

    fn reopen(&mut self) {
        let open = |path: &Option<PathBuf>| {
            path.as_ref().and_then(|p| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| tracing::error!(path = %p.display(), error = %e, "cannot open the worker log"))
                    .ok()
            })
        };
        self.stdout_file = open(&self.stdout_path);
        self.stderr_file = open(&self.stderr_path);
    }

    fn run(mut self, rx: Receiver<Message>) {
        for msg in rx {
            match msg {
                Message::Reopen => self.reopen(),
                Message::Line {
                    slot,
                    pid,
                    stream,
                    text,
                } => {
                    self.stats
                        .queued_bytes
                        .fetch_sub(text.len() + 64, Ordering::Relaxed);
                    self.report_drops(stream);
                    let line = self.render(Some((slot, pid)), stream, &text);
                    self.write(stream, &line);
                }
            }
        }
    }

    fn report_drops(&mut self, stream: Stream) {
        let dropped = self.stats.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_drops {
            let text = format!(
                "dropped {} lines of worker output (workers wrote faster than the output could take)",
                dropped - self.reported_drops
            );
            self.reported_drops = dropped;
            let line = self.render(None, stream, &text);
            self.write(stream, &line);
        }
    }

    fn render(&self, source: Option<(u32, u32)>, stream: Stream, text: &str) -> Vec<u8> {
        let mut out = match (self.format, source) {
            (LogFormat::Text, Some((slot, pid))) => format!("[worker {slot} pid {pid}] {text}"),
            (LogFormat::Text, None) => format!("[rr-cluster] {text}"),
            (LogFormat::Json, source) => {
                let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                let mut v = serde_json::json!({
                    "timestamp": now.to_string(),
                    "stream": stream.name(),
                    "line": text,
                });
                if let Some((slot, pid)) = source {
                    v["worker"] = slot.into();
                    v["pid"] = pid.into();
                } else {
                    v["source"] = "rr-cluster".into();
                }
                v.to_string()
            }
        }
        .into_bytes();
        out.push(b'\n');
        out
    }

    fn write(&mut self, stream: Stream, line: &[u8]) {
        let result = match stream {
            Stream::Stdout => match (&mut self.stdout_file, &mut self.stderr_file) {
                (Some(f), _) => f.write_all(line),
                (None, _) => std::io::stdout().lock().write_all(line),
            },
            Stream::Stderr => match (&mut self.stderr_file, &mut self.stdout_file) {
                (Some(f), _) => f.write_all(line),
                // Without a stderr file, stderr joins the stdout file when there is one.
                (None, Some(f)) if self.stderr_path.is_none() => f.write_all(line),
                _ => std::io::stderr().lock().write_all(line),
            },
        };
        if result.is_err() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_split_and_short_ones_kept_whole() {
        let data = format!("short\n{}\nlast", "x".repeat(MAX_LINE + 10));
        let mut reader = BufReader::new(data.as_bytes());
        let mut lines = Vec::new();
        for _ in 0..10 {
            let mut line = Vec::new();
            if read_line_bounded(&mut reader, &mut line)
                .await
                .expect("read")
                == 0
            {
                break;
            }
            lines.push(line);
        }
        assert_eq!(lines[0], b"short\n");
        assert_eq!(lines[1].len(), MAX_LINE);
        assert_eq!(lines[2], b"xxxxxxxxxx\n");
        assert_eq!(lines[3], b"last");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn lines_are_prefixed_or_fielded() {
        let stats = Arc::new(OutputStats::default());
        let text = Writer::new(LogFormat::Text, None, None, Arc::clone(&stats));
        assert_eq!(
            text.render(Some((1, 42)), Stream::Stdout, "hello"),
            b"[worker 1 pid 42] hello\n"
        );
        let json = Writer::new(LogFormat::Json, None, None, stats);
        let line = json.render(Some((1, 42)), Stream::Stderr, "he said \"hi\"");
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["worker"], 1);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["line"], "he said \"hi\"");
    }

    #[test]
    fn a_flood_is_dropped_and_counted_not_queued_without_bound() {
        // A writer that never runs: the queue fills, then lines are dropped.
        let (tx, _rx) = std::sync::mpsc::sync_channel(MAX_QUEUED_LINES);
        let sink = OutputSink {
            tx,
            stats: Arc::new(OutputStats::default()),
        };
        let line = vec![b'y'; 1000];
        for _ in 0..20_000 {
            sink.push(0, 1, Stream::Stdout, &line);
        }
        let dropped = sink.stats.dropped.load(Ordering::Relaxed);
        assert!(dropped > 10_000, "{dropped}");
        assert!(sink.stats.queued_bytes.load(Ordering::Relaxed) <= MAX_QUEUED_BYTES);
    }
}
