//! Worker output capture: each worker's stdout and stderr go through the master, line
//! by line, prefixed with the worker's slot and pid (text) or as fields (JSON), to the
//! master's own stdout and stderr or to log files.
//!
//! A worker that floods its output never blocks the master: readers hand lines to one
//! writer thread through a queue bounded in bytes, and lines that do not fit are
//! dropped, counted, and reported in the output itself. A broken or stuck destination
//! (a log reader that went away, a full disk) only loses worker lines: write errors are
//! counted and logged, never fatal.
//!
//! A worker's streams are read until they end, or for [`LINGER`] after the worker
//! exited (a descendant that left the worker's process group may hold them open for
//! good). When the master stops, it waits for those readers and then, for at most
//! [`FLUSH_TIMEOUT`], for the writer to write what is queued: a worker's last lines,
//! written as it drained, are not lost.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest line passed on; longer ones are split.
const MAX_LINE: usize = 16 * 1024;
/// Bytes of lines waiting for the writer, at most.
const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Lines waiting for the writer, at most.
const MAX_QUEUED_LINES: usize = 8192;
/// How long a worker's streams are still read after the worker exited.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// How long a stopping master waits for the writer to write the lines queued.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one log line about write errors per this interval.
const WRITE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    /// Wakes the writer to reopen its files (the request itself is a flag, which a
    /// full queue cannot lose).
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
    /// The log files are to be reopened before the next line.
    reopen: AtomicBool,
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

/// The writer thread's end: resolves once every line handed to it is written (every
/// [`OutputSink`] dropped, the queue emptied).
#[derive(Debug)]
pub(crate) struct WriterDone(tokio::sync::oneshot::Receiver<()>);

impl WriterDone {
    /// Waits for the writer to write what is queued, for at most `timeout` (its
    /// destination may be stuck: a pipe nobody reads).
    pub(crate) async fn wait(self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.0).await;
    }
}

impl OutputSink {
    /// Starts the writer thread.
    pub(crate) fn start(
        format: LogFormat,
        stdout: Option<PathBuf>,
        stderr: Option<PathBuf>,
    ) -> std::io::Result<(OutputSink, WriterDone)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(MAX_QUEUED_LINES);
        let stats = Arc::new(OutputStats::default());
        let writer = Writer::new(format, stdout, stderr, Arc::clone(&stats));
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("rr-cluster-output".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })?;
        Ok((OutputSink { tx, stats }, WriterDone(done)))
    }

    /// Reads `source` line by line, in a task of `tasks`, until it ends or [`LINGER`]
    /// after `exited` is cancelled, passing each line on.
    pub(crate) fn capture<R>(
        &self,
        tasks: &TaskTracker,
        source: R,
        slot: u32,
        pid: u32,
        stream: Stream,
        exited: CancellationToken,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let sink = self.clone();
        tasks.spawn(async move {
            let linger = async {
                exited.cancelled().await;
                tokio::time::sleep(LINGER).await;
            };
            // The linger first: a stream that always has data (a detached descendant
            // writing fast) makes `read_lines` use up the task's cooperative budget at
            // each poll, and a `Sleep` polled after it, with no budget left, would stay
            // pending for good (the master would never exit).
            tokio::select! {
                biased;
                () = linger => {}
                () = sink.read_lines(source, slot, pid, stream) => {}
            }
        });
    }

    async fn read_lines<R>(&self, source: R, slot: u32, pid: u32, stream: Stream)
    where
        R: AsyncRead + Unpin,
    {
        let mut reader = BufReader::with_capacity(MAX_LINE, source);
        let mut line = Vec::with_capacity(256);
        // The previous line was cut at MAX_LINE: its newline, if it comes next, is
        // not a line of its own.
        let mut cut = false;
        // The start of a character a cut line ended in, for the next line.
        let mut carry = Vec::new();
        loop {
            line.clear();
            line.append(&mut carry);
            match read_line_bounded(&mut reader, &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let whole = line.last() == Some(&b'\n');
                    if !whole && line.len() >= MAX_LINE {
                        let keep = complete_prefix(&line);
                        carry.extend_from_slice(&line[keep..]);
                        line.truncate(keep);
                    }
                    if !(cut && line == b"\n") {
                        self.push(slot, pid, stream, &line);
                    }
                    cut = !whole;
                }
            }
        }
    }

    fn push(&self, slot: u32, pid: u32, stream: Stream, line: &[u8]) {
        // Room first: a flood that is dropped costs no copy.
        let size = line.len() + 64;
        if self.stats.queued_bytes.load(Ordering::Relaxed) + size > MAX_QUEUED_BYTES {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
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

    /// Reopens the log files (logrotate's convention: on SIGUSR1), before the next
    /// line is written, however full the queue.
    pub(crate) fn reopen(&self) {
        self.stats.reopen.store(true, Ordering::Release);
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
            _ if available.len() >= room => (room, true),
            _ => (available.len(), false),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done || line.len() >= MAX_LINE {
            return Ok(line.len());
        }
    }
}

/// How much of `bytes` to keep so as not to end inside a UTF-8 character: all of it,
/// or up to the start of a character its last bytes begin and do not finish.
fn complete_prefix(bytes: &[u8]) -> usize {
    let len = bytes.len();
    let Some(start) = (len.saturating_sub(4)..len)
        .rev()
        .find(|&i| bytes[i] & 0xC0 != 0x80)
    else {
        return len; // no character starts there: not UTF-8, cut anywhere
    };
    let needs = match bytes[start] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    };
    if start + needs > len && start > 0 {
        start
    } else {
        len
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
    /// When write errors were last logged, and how many had been by then.
    logged_errors: Option<(std::time::Instant, u64)>,
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
            logged_errors: None,
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
            if self.stats.reopen.swap(false, Ordering::AcqRel) {
                self.reopen();
            }
            match msg {
                Message::Reopen => {}
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
                let mut v = serde_json::json!({
                    "timestamp": timestamp(std::time::SystemTime::now()),
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
        if let Err(e) = result {
            let errors = self.stats.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
            let now = std::time::Instant::now();
            let due = self
                .logged_errors
                .is_none_or(|(at, _)| now.duration_since(at) >= WRITE_ERROR_LOG_INTERVAL);
            if due {
                let since = errors - self.logged_errors.map_or(0, |(_, n)| n);
                self.logged_errors = Some((now, errors));
                tracing::error!(
                    stream = stream.name(),
                    error = %e,
                    lost = since,
                    "cannot write worker output; lines are lost"
                );
            }
        }
    }
}

/// RFC 3339 with milliseconds; seconds since the epoch when the clock is outside the
/// years 1970 to 9999, which the format cannot say.
fn timestamp(now: std::time::SystemTime) -> String {
    const YEAR_10000: u64 = 253_402_300_800;
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) if since.as_secs() < YEAR_10000 => {
            humantime::format_rfc3339_millis(now).to_string()
        }
        Ok(since) => format!("{:.3}", since.as_secs_f64()),
        Err(before) => format!("-{:.3}", before.duration().as_secs_f64()),
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

    /// The lines `data` comes out as, through a sink whose writer never runs.
    async fn lines_of(data: &[u8]) -> Vec<String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(MAX_QUEUED_LINES);
        let sink = OutputSink {
            tx,
            stats: Arc::new(OutputStats::default()),
        };
        sink.read_lines(data, 0, 1, Stream::Stdout).await;
        drop(sink);
        rx.into_iter()
            .filter_map(|m| match m {
                Message::Line { text, .. } => Some(text),
                Message::Reopen => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_longest_length_is_one_line() {
        let data = format!("{}\nnext\n", "x".repeat(MAX_LINE));
        let lines = lines_of(data.as_bytes()).await;
        assert_eq!(
            lines.len(),
            2,
            "{:?}",
            lines.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "next");
    }

    #[tokio::test]
    async fn a_long_line_is_not_cut_inside_a_character() {
        // One byte, then two-byte characters: MAX_LINE falls inside one.
        let data = format!("x{}\n", "é".repeat(MAX_LINE));
        let lines = lines_of(data.as_bytes()).await;
        assert!(lines.len() >= 2, "{}", lines.len());
        assert!(
            lines.iter().all(|l| !l.contains('\u{FFFD}')),
            "a character was cut"
        );
        let joined: String = lines.concat();
        assert_eq!(joined, data.trim_end());
        assert_eq!(complete_prefix(&[0xFF; 8]), 8, "not UTF-8: cut anywhere");
        assert_eq!(complete_prefix("aé".as_bytes()), 3);
        assert_eq!(complete_prefix(&"a😀".as_bytes()[..4]), 1);
    }

    #[tokio::test]
    async fn a_character_split_between_reads_is_not_cut_either() {
        // The line fills up over several reads; the last one starts with a character
        // that does not fit whole.
        let mut data = "x".repeat(MAX_LINE - 1).into_bytes();
        data.extend_from_slice("€€\n".as_bytes());
        let (mut tx, rx) = tokio::io::duplex(8 * 1024);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in data.chunks(1000) {
                tx.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
        });
        let (sink_tx, sink_rx) = std::sync::mpsc::sync_channel(MAX_QUEUED_LINES);
        let sink = OutputSink {
            tx: sink_tx,
            stats: Arc::new(OutputStats::default()),
        };
        sink.read_lines(rx, 0, 1, Stream::Stdout).await;
        feed.await.expect("fed");
        drop(sink);
        let lines: Vec<String> = sink_rx
            .into_iter()
            .filter_map(|m| match m {
                Message::Line { text, .. } => Some(text),
                Message::Reopen => None,
            })
            .collect();
        assert_eq!(
            lines.len(),
            2,
            "{:?}",
            lines.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(lines[0], "x".repeat(MAX_LINE - 1));
        assert_eq!(lines[1], "€€");
    }

    #[test]
    fn a_reopen_asked_while_the_queue_is_full_is_not_lost() {
        let dir = std::env::temp_dir().join(format!("rr-output-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("worker.log");
        let stats = Arc::new(OutputStats::default());
        let writer = Writer::new(LogFormat::Text, Some(log.clone()), None, Arc::clone(&stats));
        // logrotate moves the file, and the queue is full when SIGUSR1 comes.
        std::fs::rename(&log, dir.join("worker.log.1")).expect("rename");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let sink = OutputSink { tx, stats };
        sink.push(0, 1, Stream::Stdout, b"after the rotation\n");
        sink.reopen();
        drop(sink);
        writer.run(rx);
        let new = std::fs::read_to_string(&log).unwrap_or_default();
        let old = std::fs::read_to_string(dir.join("worker.log.1")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            new, "[worker 0 pid 1] after the rotation\n",
            "old file: {old:?}"
        );
    }

    #[test]
    fn timestamps_outside_the_format_do_not_panic() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_millis(1500)),
            "1970-01-01T00:00:01.500Z"
        );
        assert_eq!(timestamp(UNIX_EPOCH - Duration::from_secs(2)), "-2.000");
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(timestamp(far), "300000000000.000");
    }

    #[tokio::test(start_paused = true)]
    async fn output_held_open_after_the_worker_exited_is_let_go() {
        let tasks = TaskTracker::new();
        let (tx, _rx) = std::sync::mpsc::sync_channel(16);
        let sink = OutputSink {
            tx,
            stats: Arc::new(OutputStats::default()),
        };
        // A descendant outside the worker's group keeps the pipe open.
        let (source, _held) = tokio::io::duplex(64);
        let exited = CancellationToken::new();
        sink.capture(&tasks, source, 0, 1, Stream::Stdout, exited.clone());
        tasks.close();
        let waited = tokio::time::timeout(LINGER * 10, tasks.wait()).await;
        assert!(waited.is_err(), "read while the worker lives");
        exited.cancel();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(LINGER * 2, tasks.wait())
            .await
            .expect("let go after the linger");
        assert!(started.elapsed() >= LINGER);
    }

    /// Regression: a stream that never runs dry (a detached descendant of the worker
    /// writing fast) used up the task's budget in `read_lines` at each poll, and the
    /// linger's `Sleep`, polled after it, never fired: the master never exited.
    #[tokio::test]
    async fn a_stream_that_never_runs_dry_is_let_go_after_the_linger() {
        let tasks = TaskTracker::new();
        let (tx, _rx) = std::sync::mpsc::sync_channel(16);
        let sink = OutputSink {
            tx,
            stats: Arc::new(OutputStats::default()),
        };
        let exited = CancellationToken::new();
        sink.capture(
            &tasks,
            tokio::io::repeat(b'y'),
            0,
            1,
            Stream::Stdout,
            exited.clone(),
        );
        tasks.close();
        exited.cancel();
        let started = std::time::Instant::now();
        tokio::time::timeout(LINGER + Duration::from_secs(1), tasks.wait())
            .await
            .expect("let go within the linger");
        assert!(started.elapsed() >= LINGER);
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
