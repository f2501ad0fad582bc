//! The `rr-cluster` binary end to end: real master processes serving the demo
//! worker on 127.0.0.1 port 0, driven through flags, the control socket and signals.

mod common;
use common::missing_tool;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_rr-cluster");
const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rr-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `rr-cluster run`; SIGKILLs it on drop while it is alive (its workers die
/// with it: they are started with `PR_SET_PDEATHSIG`).
struct Running {
    child: Child,
    control: PathBuf,
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Flags for tests that count an exact round-robin split: heartbeats a minute apart
/// (and no heartbeat kill), so no heartbeat late on a loaded machine takes a worker
/// out of the rotation (two intervals and 100 ms late) while the test counts.
const SLOW_HEARTBEATS: [&str; 4] = ["--heartbeat-interval", "60s", "--heartbeat-timeout", "off"];

/// A port that was free a moment ago (a probe bound it and let it go): another test
/// may take it before the caller binds it, so callers try again on "address in use".
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    l.local_addr().expect("addr").port()
}

/// Copies the child's stderr to ours, line by line, from a thread; each line also goes
/// to the receiver (while it is kept), which disconnects at the end of the stream.
fn forward_stderr(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Whether any line still to come on `lines` (until its end, at most `within`) says
/// an address was in use.
fn said_address_in_use(lines: &std::sync::mpsc::Receiver<String>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("in use") => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// `rr-cluster run` (as [`Running::start`]) serving metrics on a port found free by a
/// probe: when a parallel test binds that port first, the master exits 2 (address in
/// use) and another port is tried. The pool and its metrics address.
fn start_with_metrics(control: &Path, args: &[&str]) -> (Running, SocketAddr) {
    let mut tried = Vec::new();
    for _ in 0..10 {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(BIN)
            .arg("run")
            .arg("--control")
            .arg(control)
            .args(args)
            .arg("--metrics")
            .arg(metrics.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rr-cluster");
        let mut pool = Running {
            child,
            control: control.to_owned(),
        };
        let lines = forward_stderr(&mut pool.child);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = pool.child.try_wait().expect("wait") {
                assert!(
                    said_address_in_use(&lines, WAIT),
                    "rr-cluster run exited ({status}) before it was ready"
                );
                tried.push(metrics);
                break;
            }
            if let Some(s) = pool.status() {
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                let target = s["target_workers"].as_u64().unwrap_or(0) as usize;
                if workers.len() == target && workers.iter().all(|w| w["state"] == "ready") {
                    return (pool, metrics);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            tried.last() == Some(&metrics),
            "pool not ready in time: {:?}",
            pool.status()
        );
    }
    panic!("every metrics port tried was in use: {tried:?}");
}

impl Running {
    fn start(control: &Path, args: &[&str]) -> Running {
        Running::start_with_stderr(control, args, Stdio::inherit())
    }

    fn start_with_stderr(control: &Path, args: &[&str], stderr: Stdio) -> Running {
        let child = Command::new(BIN)
            .arg("run")
            .arg("--control")
            .arg(control)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start rr-cluster");
        let mut r = Running {
            child,
            control: control.to_owned(),
        };
        r.wait_ready(None);
        r
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .expect("run rr-cluster client")
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = self.ctl(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until every worker is ready (and `n` of them, when given).
    fn wait_ready(&mut self, n: Option<usize>) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                let all_ready = workers.iter().all(|w| w["state"] == "ready");
                let target = s["target_workers"].as_u64().unwrap_or(0) as usize;
                if all_ready && workers.len() == n.unwrap_or(target) {
                    return s;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pool not ready in time: {:?}", self.status());
    }

    fn addr(&self) -> SocketAddr {
        let s = self.status().expect("status");
        s["listeners"][0]
            .as_str()
            .expect("listener")
            .parse()
            .expect("addr")
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("rr-cluster did not exit in time");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Our child, and not yet reaped: its pid is still its own.
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET with `Connection: close`; (status line, x-worker-id, body).
fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head.lines().next().unwrap_or("").to_owned();
    let worker = head
        .lines()
        .find_map(|l| l.strip_prefix("x-worker-id: "))
        .unwrap_or("")
        .to_owned();
    (status, worker, body.to_owned())
}

fn usage_error(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_is_one_line_and_exit_2_with_nothing_started() {
    let dir = Scratch::new("bad");
    let control = dir.path("ctl.sock");
    let c = control.to_str().expect("utf8");
    for (args, needle) in [
        (vec!["run", "--control", c, "--workers", "0"], "workers"),
        (
            vec!["run", "--control", c, "--listen", "nowhere"],
            "nowhere",
        ),
        (
            vec!["run", "--control", c, "--drain-timeout", "soon"],
            "soon",
        ),
        (
            vec!["run", "--control", c, "--config", "/nonexistent/rr.toml"],
            "/nonexistent/rr.toml",
        ),
        (
            vec!["run", "--control", c, "--metrics", "not-an-addr"],
            "not-an-addr",
        ),
    ] {
        let err = usage_error(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!control.exists(), "nothing started for {args:?}");
    }
    let config = dir.path("bad.toml");
    std::fs::write(&config, "workers = 2\n[timeouts]\ndrian = \"1s\"\n").expect("write");
    let err = usage_error(&[
        "run",
        "--control",
        c,
        "--config",
        config.to_str().expect("utf8"),
    ]);
    assert!(
        err.contains("bad.toml:3:1") && err.contains("drian"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // clap's own errors are exit 2 too.
    let err = usage_error(&["run", "--balance", "random"]);
    assert!(err.contains("random"), "{err}");
}

/// Review: with no subcommand the one line was the `about` text, and `scale` without
/// its number said "the following required arguments were not provided:" without
/// naming it (clap names it on the next line, which was dropped).
#[test]
fn no_subcommand_or_a_missing_argument_is_one_line_that_names_it() {
    let err = usage_error(&[]);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("subcommand") && err.contains("run, status, reload, scale, stop, top"),
        "{err}"
    );
    let err = usage_error(&["scale"]);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("missing <WORKERS>"), "{err}");
}

#[test]
fn demo_pool_answers_round_robin_and_reports_status() {
    let dir = Scratch::new("demo");
    let mut pool = Running::start(
        &dir.path("ctl.sock"),
        &[
            &["--listen", "127.0.0.1:0", "--workers", "2"],
            &SLOW_HEARTBEATS[..],
        ]
        .concat(),
    );
    let addr = pool.addr();
    let mut counts = [0usize; 2];
    for _ in 0..200 {
        let (status, worker, body) = get(addr, "/");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let slot: usize = worker.parse().expect("x-worker-id");
        assert!(
            body.starts_with(&format!("Hello from worker {slot} (pid ")),
            "{body}"
        );
        counts[slot] += 1;
    }
    assert_eq!(counts, [100, 100]);
    let table = String::from_utf8(pool.ctl(&["status"]).stdout).expect("utf8");
    assert!(
        table.contains("SLOT") && table.contains("DISPATCHED"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        2,
        "{table}"
    );
    let out = pool.ctl(&["stop"]);
    assert!(out.status.success());
    assert_eq!(pool.wait_exit(), 0);
    assert!(!dir.path("ctl.sock").exists(), "control socket removed");
}

#[test]
fn scale_two_four_one_shows_in_status() {
    let dir = Scratch::new("scale");
    let mut pool = Running::start(
        &dir.path("ctl.sock"),
        &["--listen", "127.0.0.1:0", "--workers", "2"],
    );
    assert!(pool.ctl(&["scale", "4"]).status.success());
    let s = pool.wait_ready(Some(4));
    assert_eq!(s["target_workers"], 4);
    assert!(pool.ctl(&["scale", "1"]).status.success());
    let s = pool.wait_ready(Some(1));
    assert_eq!(s["workers"][0]["slot"], 0);
    let out = pool.ctl(&["scale", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range 1..="));
    // SIGTTIN adds one.
    signal(pool.child.id(), Signal::TTIN);
    pool.wait_ready(Some(2));
}

#[test]
fn reload_with_a_broken_config_keeps_the_old_pool_serving() {
    let dir = Scratch::new("reload");
    let config = dir.path("rr-cluster.toml");
    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\nworkers = 2\n").expect("write");
    let cfg = config.to_str().expect("utf8");
    let mut pool = Running::start(&dir.path("ctl.sock"), &["--config", cfg]);
    let before = pool.wait_ready(None);
    let addr = pool.addr();

    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\nwrokers = 3\n").expect("write");
    let out = pool.ctl(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrokers") && err.contains("pool unchanged"),
        "{err}"
    );
    // SIGHUP with the same broken file: refused as well (and the pool is unchanged
    // however long we look: the generation stays 0 while another reload is refused).
    signal(pool.child.id(), Signal::HUP);
    let out = pool.ctl(&["reload", "--wait"]);
    assert!(!out.status.success(), "still refused");
    let after = pool.wait_ready(None);
    assert_eq!(after["generation"], 0);
    let pids = |s: &serde_json::Value| -> Vec<u64> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_u64())
            .collect()
    };
    assert_eq!(pids(&before), pids(&after));
    assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");

    // A fixed file reloads: three workers of generation 1.
    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\nworkers = 3\n").expect("write");
    signal(pool.child.id(), Signal::HUP);
    let deadline = Instant::now() + WAIT;
    let mut s = pool.wait_ready(None);
    while s["generation"] != 1
        || s["reloading"] == true
        || s["workers"].as_array().map_or(0, Vec::len) != 3
    {
        assert!(Instant::now() < deadline, "reload did not finish: {s}");
        std::thread::sleep(Duration::from_millis(50));
        s = pool.wait_ready(None);
    }
    assert!(
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .all(|w| w["generation"] == 1)
    );
    assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

/// Review: the demo pool's reload asked for this executable's path again; after the
/// binary was replaced in place (an upgrade) that was "/path/rr-cluster (deleted)",
/// and every reload failed and rolled back.
#[test]
fn a_demo_pool_reloads_after_its_binary_is_replaced_in_place() {
    // A hard link of the binary (same file system as the binary: no copy), replaced
    // by a new link while the master runs.
    let dir = Path::new(BIN)
        .parent()
        .expect("a directory")
        .join(format!("rr-cli-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let dir = Scratch(dir);
    let exe = dir.path("rr-cluster");
    std::fs::hard_link(BIN, &exe).expect("link the binary");
    let control = dir.path("ctl.sock");
    let child = Command::new(&exe)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--control",
        ])
        .arg(&control)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start rr-cluster");
    let mut pool = Running { child, control };
    pool.wait_ready(None);
    std::fs::remove_file(&exe).expect("unlink");
    std::fs::hard_link(BIN, &exe).expect("the new binary");
    let out = pool.ctl(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let s = pool.wait_ready(None);
    assert_eq!(s["generation"], 1, "{s}");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

#[test]
fn metrics_count_known_requests() {
    let dir = Scratch::new("metrics");
    let (mut pool, metrics) = start_with_metrics(
        &dir.path("ctl.sock"),
        &[
            &["--listen", "127.0.0.1:0", "--workers", "2"],
            &SLOW_HEARTBEATS[..],
        ]
        .concat(),
    );
    let addr = pool.addr();
    for _ in 0..37 {
        assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");
    }
    let (status, _, body) = get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.lines()
            .any(|l| l == "rr_cluster_connections_accepted_total 37"),
        "{body}"
    );
    // 37 round-robin over two workers: 19 and 18, the 19 to whichever worker became
    // ready (and so entered the rotation) first.
    let dispatched = |slot: u32| -> u64 {
        let prefix = format!("rr_cluster_connections_dispatched_total{{worker=\"{slot}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no dispatched count for worker {slot}: {body}"))
    };
    let mut split = [dispatched(0), dispatched(1)];
    split.sort_unstable();
    assert_eq!(split, [18, 19], "{body}");
    assert!(
        body.lines()
            .any(|l| l == "rr_cluster_workers{state=\"ready\"} 2"),
        "{body}"
    );
    let _ = pool.wait_ready(None);
    signal(pool.child.id(), Signal::INT);
    assert_eq!(pool.wait_exit(), 0);
}

/// The metrics endpoint kept every connection for ever, each a descriptor of the
/// master's: now at most 32 at once, and an idle one is closed after 10 s.
#[test]
fn the_metrics_endpoint_bounds_its_connections() {
    use std::io::Read;
    let dir = Scratch::new("metrics-bound");
    let (mut pool, addr) = start_with_metrics(
        &dir.path("ctl.sock"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
    );
    let mut idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    // Accepted in order: the last 8 are past the limit, closed unanswered (end of
    // stream); the first 32 are kept, until the header timeout (10 s) closes them too.
    let read = |s: &mut std::net::TcpStream, within: Duration| {
        s.set_read_timeout(Some(within)).expect("timeout");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            other => panic!("an idle metrics connection: {other:?}"),
        }
    };
    for s in &mut idle[32..] {
        assert!(read(s, Duration::from_secs(5)), "past the limit: closed");
    }
    for s in &mut idle[..32] {
        assert!(
            !read(s, Duration::from_millis(10)),
            "within the limit: kept"
        );
    }
    for s in &mut idle[..32] {
        assert!(
            read(s, Duration::from_secs(20)),
            "idle: closed by the header timeout"
        );
    }
    let (status, _, _) = get(addr, "/livez");
    assert_eq!(status, "HTTP/1.1 200 OK");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

#[test]
fn systemd_socket_activation_serves_through_the_inherited_socket() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists()) else {
        return missing_tool("systemd-socket-activate is not installed");
    };
    let dir = Scratch::new("systemd");
    let control = dir.path("ctl.sock");
    // systemd-socket-activate binds (and says so), then execs rr-cluster with
    // LISTEN_FDS=1 at the first connection; the master takes the socket instead of
    // binding. The port was free when probed: when a parallel test binds it first,
    // systemd-socket-activate exits (address in use) and another port is tried. Until
    // it says it listens, a connection could reach that other test's listener.
    let mut tried = Vec::new();
    let (mut pool, listen) = loop {
        assert!(tried.len() < 10, "every port tried was in use: {tried:?}");
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(&activate)
            .args([
                "-l",
                &listen,
                "-E",
                "RUST_LOG=warn",
                BIN,
                "run",
                "--workers",
                "2",
                "--control",
            ])
            .arg(&control)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start systemd-socket-activate");
        let lines = forward_stderr(&mut child);
        let pool = Running {
            child,
            control: control.clone(),
        };
        let deadline = Instant::now() + WAIT;
        let listening = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with("Listening on ") => break true,
                Ok(line) if line.contains("in use") => break false,
                Ok(_) => continue,
                Err(e) => panic!("systemd-socket-activate said neither: {e}"),
            }
        };
        if listening {
            break (pool, listen);
        }
        tried.push(listen);
    };
    let addr: SocketAddr = listen.parse().expect("addr");
    // The first request triggers the activation; it waits in the inherited backlog.
    let deadline = Instant::now() + WAIT;
    let first = loop {
        match TcpStream::connect(addr) {
            Ok(_) => break get(addr, "/"),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    assert_eq!(first.0, "HTTP/1.1 200 OK");
    let s = pool.wait_ready(None);
    assert_eq!(s["listeners"][0], listen.as_str(), "{s}");
    for _ in 0..10 {
        assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");
    }
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

#[test]
fn sd_notify_reports_ready_reloading_and_stopping() {
    let dir = Scratch::new("notify");
    let socket_path = dir.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let control = dir.path("ctl.sock");
    let child = Command::new(BIN)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--control",
        ])
        .arg(&control)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start");
    let mut pool = Running { child, control };
    let mut seen = String::new();
    let wait_for = |needle: &str, seen: &mut String| {
        let deadline = Instant::now() + WAIT;
        while !seen.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
            let mut buf = [0u8; 4096];
            if let Ok(n) = notify.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
        }
    };
    wait_for("READY=1", &mut seen);
    assert!(seen.contains("STATUS=2/2 workers ready"), "{seen}");
    pool.wait_ready(None);
    seen.clear();
    assert!(pool.ctl(&["reload"]).status.success());
    wait_for("RELOADING=1", &mut seen);
    assert!(seen.contains("MONOTONIC_USEC="), "{seen}");
    wait_for("READY=1", &mut seen);
    signal(pool.child.id(), Signal::TERM);
    wait_for("STOPPING=1", &mut seen);
    assert_eq!(pool.wait_exit(), 0);
}

/// Review: after a give-up with `on_give_up = keep`, READY=1 never went out (the
/// stopped slot never became ready) while EXTEND_TIMEOUT_USEC went out every 5 s
/// without end: `systemctl start` never returned.
#[test]
fn sd_notify_ready_after_a_give_up_that_keeps_the_pool() {
    let dir = Scratch::new("notify-give-up");
    let socket_path = dir.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let control = dir.path("ctl.sock");
    // A worker that always fails to boot: two boot failures are a give-up.
    let child = Command::new(BIN)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--restart-limit",
            "1",
            "--on-give-up",
            "keep",
            "--control",
        ])
        .arg(&control)
        .args(["--", "sh", "-c", "exit 3"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start");
    let mut pool = Running { child, control };
    // Every datagram, in order.
    let mut seen: Vec<String> = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = Instant::now() + WAIT;
        while !seen.iter().any(|m| m.contains(needle)) {
            assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
            let mut buf = [0u8; 4096];
            if let Ok(n) = notify.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen.clone()
    };
    wait_for("READY=1");
    signal(pool.child.id(), Signal::TERM);
    let seen = wait_for("STOPPING=1");
    assert_eq!(pool.wait_exit(), 0);
    let gave_up = seen
        .iter()
        .position(|m| m.contains("gave up restarting"))
        .unwrap_or_else(|| panic!("no give-up in the STATUS= lines: {seen:?}"));
    assert!(
        seen[gave_up..]
            .iter()
            .all(|m| !m.contains("EXTEND_TIMEOUT_USEC")),
        "extended after the give-up: {seen:?}"
    );
}

#[test]
fn under_load_kills_and_reloads_cost_only_requests_in_flight_on_killed_workers() {
    let dir = Scratch::new("faults");
    let control = dir.path("ctl.sock");
    // The default 2 workers: v0.1 gave up after 12 kills at this rate (issue 9.3).
    let mut pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "2"]);
    let addr = pool.addr();
    for (mode, kill) in [
        (rr_load::Mode::KeepAlive, true),
        (rr_load::Mode::Close, false),
    ] {
        let config = rr_load::Config::builder(addr.to_string())
            .connections(16)
            .mode(mode)
            .duration(Duration::from_secs(3))
            .kill_worker_every(kill.then_some(Duration::from_millis(500)))
            .reload_every((!kill).then_some(Duration::from_millis(700)))
            .control(Some(control.clone()))
            .progress(false)
            .build()
            .expect("config");
        let report = rr_load::run_blocking(config).expect("load run");
        let faults = report.faults.as_ref().expect("fault report");
        assert!(report.successes > 0, "{mode:?}: nothing served");
        assert_eq!(
            faults.failed_outside_windows,
            0,
            "{mode:?}: {}",
            report.to_table()
        );
        if kill {
            assert!(faults.kills >= 4, "{}", report.to_table());
        } else {
            // Reloads alone cost nothing: no connection refused or dropped.
            assert!(faults.reloads >= 3, "{}", report.to_table());
            assert_eq!(report.errors.total, 0, "{}", report.to_table());
        }
    }
    let s = pool.wait_ready(Some(2));
    assert_eq!(s["gave_up"], false, "the master keeps the pool: {s}");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

/// Issue 9.7: `--heartbeat-timeout` with any value panicked (clap's `Option<Option<T>>`),
/// and huge durations were accepted and then panicked at the first `now + d`.
#[test]
fn every_duration_flag_works_and_huge_ones_are_refused() {
    let dir = Scratch::new("durations");
    let control = dir.path("ctl.sock");
    let c = control.to_str().expect("utf8");
    for (flag, value) in [
        ("--drain-timeout", "10000000000000000000s"),
        ("--ready-timeout", "500000000000y"),
        ("--heartbeat-timeout", "99999999999d"),
        ("--restart-window", "99999999999d"),
        ("--max-age", "99999999999d"),
    ] {
        let err = usage_error(&["run", "--control", c, flag, value]);
        assert_eq!(err.trim_end().lines().count(), 1, "{flag}: {err}");
        assert!(!control.exists(), "nothing started for {flag}");
    }
    let config = dir.path("huge.toml");
    std::fs::write(&config, "[timeouts]\ndrain = \"500000000000y\"\n").expect("write");
    let err = usage_error(&[
        "run",
        "--control",
        c,
        "--config",
        config.to_str().expect("utf8"),
    ]);
    assert!(
        err.contains("huge.toml:2") && err.contains("out of range"),
        "{err}"
    );
    // The flag that used to panic now runs.
    let mut pool = Running::start(
        &control,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--heartbeat-timeout",
            "5s",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    assert_eq!(get(pool.addr(), "/").0, "HTTP/1.1 200 OK");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

/// Issue 13: a worker command that cannot be started is one line and exit 2 at once,
/// not 42 s of backoff; and clap's tip survives for `run node app.js`.
#[test]
fn a_command_that_cannot_start_fails_fast() {
    let dir = Scratch::new("enoent");
    let c = dir.path("ctl.sock");
    let started = Instant::now();
    let err = usage_error(&[
        "run",
        "--control",
        c.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
        "--",
        "/nonexistent/bin",
    ]);
    println!("/nonexistent/bin: exit 2 after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(err.contains("/nonexistent/bin"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let err = usage_error(&["run", "node", "app.js"]);
    assert!(err.contains("-- node"), "a hint to use `--`: {err}");
    let err = usage_error(&[
        "run",
        "--control",
        c.to_str().expect("utf8"),
        "--listen",
        "systemd",
    ]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("systemd") || err.contains("LISTEN_FDS"),
        "{err}"
    );
}

/// Issue 13: relative scaling, and `stop --wait` that returns once the pool stopped.
#[test]
fn scale_relative_and_stop_wait() {
    let dir = Scratch::new("relative");
    let mut pool = Running::start(
        &dir.path("ctl.sock"),
        &["--listen", "127.0.0.1:0", "--workers", "2"],
    );
    let out = pool.ctl(&["scale", "+1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "scaling from 2 to 3 workers"
    );
    pool.wait_ready(Some(3));
    let out = pool.ctl(&["scale", "-2"]);
    assert!(out.status.success(), "{out:?}");
    pool.wait_ready(Some(1));
    let out = pool.ctl(&["scale", "-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
    let out = pool.ctl(&["stop", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "stopped with exit code 0"
    );
    // Its control socket is gone by the time the answer came (`stop --wait &&
    // rr-cluster run` finds the path free), and the process ends right after.
    assert!(
        !dir.path("ctl.sock").exists(),
        "the control socket outlived the answer"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut exited = false;
    while Instant::now() < deadline {
        if pool.child.try_wait().expect("wait").is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(exited);
}

/// Issue 9.6: a broken stderr pipe (a log reader that went away) killed the master.
#[test]
fn a_broken_stderr_does_not_stop_the_pool() {
    let dir = Scratch::new("stderr");
    let control = dir.path("ctl.sock");
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--control",
        ])
        .arg(&control)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    // The log reader goes away at once.
    drop(child.stderr.take());
    let mut pool = Running { child, control };
    pool.wait_ready(None);
    let addr = pool.addr();
    // Lots of logging: reloads, requests, a scale.
    for _ in 0..3 {
        assert!(pool.ctl(&["reload", "--wait"]).status.success());
        assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");
    }
    assert!(pool.ctl(&["scale", "3"]).status.success());
    pool.wait_ready(Some(3));
    assert_eq!(get(addr, "/").0, "HTTP/1.1 200 OK");
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
    assert!(!dir.path("ctl.sock").exists(), "control socket removed");
}

/// Issue 9.11: the control socket refuses other users, never deletes a file that is not
/// a dead socket, bounds requests, and answers non-UTF-8 with an error.
#[test]
fn the_control_socket_is_the_masters_alone() {
    let dir = Scratch::new("control");
    // A regular file at the control path is left alone: exit 2, file intact.
    let file = dir.path("rr-cluster.toml");
    std::fs::write(&file, "workers = 2\n").expect("write");
    let err = usage_error(&[
        "run",
        "--control",
        file.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("intact"),
        "workers = 2\n"
    );

    let control = dir.path("ctl.sock");
    let pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "1"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&control)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Non-UTF-8 and oversized requests get an error line, not silence.
    let mut s = std::os::unix::net::UnixStream::connect(&control).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(b"\xff\xfe\n").expect("write");
    let mut answer = [0u8; 256];
    let n = s.read(&mut answer).expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).contains("not UTF-8"));
    let mut s = std::os::unix::net::UnixStream::connect(&control).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = s.write_all(&vec![b'x'; 100_000]);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    // Another user is refused, even when the file's mode would let it connect.
    if std::path::Path::new("/usr/bin/setpriv").exists() && rustix::process::getuid().is_root() {
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let as_nobody = |args: &[&str]| {
            Command::new("/usr/bin/setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .args(args)
                .output()
                .expect("run as nobody")
        };
        // The binary where `nobody` can run it: where it was built, or else a copy in
        // the scratch directory (a clone under root's private home is out of reach):
        // otherwise the refusal below would be setpriv's, not the master's.
        let bin = if as_nobody(&["test", "-x", BIN]).status.success() {
            BIN.to_owned()
        } else {
            let copy = dir.path("rr-cluster");
            std::fs::copy(BIN, &copy).expect("copy the binary");
            let copy = copy.to_str().expect("utf8").to_owned();
            assert!(
                as_nobody(&["test", "-x", &copy]).status.success(),
                "nobody can execute neither {BIN} nor {copy}"
            );
            copy
        };
        let out = as_nobody(&[&bin, "status", "--control", control.to_str().expect("utf8")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permission denied"), "{err}");
    } else if !rustix::process::getuid().is_root() {
        // A privilege, not a tool CI can install.
        eprintln!("SKIPPED: (part of the test) not root, to try the socket as another user");
    } else {
        missing_tool("(part of the test) setpriv, to try the socket as another user");
    }
    drop(pool);
}

/// Issue 13: `rr-cluster top` under tmux: it shows every worker, its keys act on the
/// pool, and `q` quits.
#[test]
fn top_shows_the_pool_and_its_keys_work() {
    if Command::new("tmux").arg("-V").output().is_err() {
        return missing_tool("tmux is not installed");
    }
    let dir = Scratch::new("top");
    let control = dir.path("ctl.sock");
    let mut pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "2"]);
    let s = pool.wait_ready(None);
    let pids: Vec<String> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].to_string())
        .collect();
    let session = format!("rr-top-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("run tmux");
    let top = format!("{BIN} top --interval 200ms --control {}", control.display());
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "30",
        &top,
    ]);
    assert!(out.status.success(), "{out:?}");
    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    let wait_for = |needle: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = capture();
            if needle(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "not on screen in time:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let screen =
        wait_for(&|s: &str| s.contains("SLOT") && pids.iter().all(|p| s.contains(p.as_str())));
    println!("{screen}");
    assert!(
        screen.contains("ready") && screen.contains("RSS"),
        "{screen}"
    );
    // `+`: one worker more.
    tmux(&["send-keys", "-t", &session, "+"]);
    wait_for(&|s: &str| s.contains("scaling from 2 to 3 workers"));
    let s = pool.wait_ready(Some(3));
    assert_eq!(s["target_workers"], 3);
    // `q`: the view ends, and the session with it.
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + WAIT;
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().nth(1))
                    == Some(pid.to_string().as_str())
            })
        })
        .collect()
}

/// Review: Ctrl-C on `rr-cluster conformance` left the worker running: it is in a
/// process group of its own (the terminal's SIGINT does not reach it), and the
/// conformance process died without stopping it.
#[test]
fn an_interrupted_conformance_run_stops_its_worker() {
    for (sig, code) in [(Signal::INT, 130), (Signal::TERM, 143)] {
        let mut child = Command::new(BIN)
            .args(["conformance", "--", "sleep", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rr-cluster conformance");
        let me = child.id();
        // The worker is started: it waits for a Ready that never comes (10 s).
        let deadline = Instant::now() + WAIT;
        let worker = loop {
            let sleeps: Vec<u32> = children_of(me)
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
                })
                .collect();
            if let [pid] = sleeps[..] {
                break pid;
            }
            assert!(Instant::now() < deadline, "no worker started");
            std::thread::sleep(Duration::from_millis(20));
        };
        signal(me, sig);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "conformance did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        // Reaped by conformance, or (unfixed) left running, an orphan.
        let left = std::fs::read_to_string(format!("/proc/{worker}/cmdline"))
            .is_ok_and(|c| c == "sleep\u{0}1000\u{0}");
        if left {
            signal(worker, Signal::KILL);
        }
        assert!(!left, "the worker outlived conformance ({status:?}): {err}");
        assert_eq!(status.code(), Some(code), "{err}");
        assert!(err.contains("interrupted"), "{err}");
    }
}

/// Review: SIGQUIT and SIGTSTP (from outside: the keys send none in raw mode) left the
/// terminal raw and on the alternate screen: SIGQUIT killed `top` unrestored, SIGTSTP
/// stopped it so.
#[test]
fn top_restores_the_terminal_on_sigquit_and_sigtstp() {
    if Command::new("tmux").arg("-V").output().is_err() {
        return missing_tool("tmux is not installed");
    }
    let dir = Scratch::new("top-signals");
    let control = dir.path("ctl.sock");
    let mut pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "1"]);
    // A tmux server of this test's own.
    let server = format!("rr-top-signals-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .expect("run tmux")
    };
    for (sig, name) in [(Signal::QUIT, "quit"), (Signal::TSTP, "tstp")] {
        // A shell runs top, then records how top ended and the terminal's modes.
        let report = dir.path(&format!("{name}.txt"));
        let script = format!(
            "{BIN} top --interval 200ms --control {}; echo \"exit $?\" > {r}.tmp; stty -a >> {r}.tmp; mv {r}.tmp {r}; read x",
            control.display(),
            r = report.display()
        );
        let session = format!("top-{name}");
        let out = tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "30",
            "sh",
            "-c",
            &script,
        ]);
        assert!(out.status.success(), "{out:?}");
        let shell: u32 = String::from_utf8_lossy(
            &tmux(&["list-panes", "-t", &session, "-F", "#{pane_pid}"]).stdout,
        )
        .trim()
        .parse()
        .expect("the pane's pid");
        // The view is up: the table is on screen.
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = tmux(&["capture-pane", "-p", "-t", &session]);
            if String::from_utf8_lossy(&screen.stdout).contains("SLOT") {
                break;
            }
            assert!(Instant::now() < deadline, "top not on screen: {screen:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let top = children_of(shell);
        assert_eq!(top.len(), 1, "top, the shell's one child: {top:?}");
        signal(top[0], sig);
        let deadline = Instant::now() + WAIT;
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&report) {
                break text;
            }
            if Instant::now() >= deadline {
                // Stopped (SIGTSTP unhandled): it cannot exit by itself meanwhile, so
                // its pid is still its own.
                if children_of(shell) == top {
                    signal(top[0], Signal::KILL);
                }
                let _ = tmux(&["kill-server"]);
                panic!("SIG{}: top did not end", name.to_uppercase());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let alternate = tmux(&["display-message", "-p", "-t", &session, "#{alternate_on}"]);
        let _ = tmux(&["kill-session", "-t", &session]);
        println!("SIG{}: {text}", name.to_uppercase());
        let modes: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == ';')
            .collect();
        assert!(
            modes.contains(&"icanon") && modes.contains(&"echo"),
            "SIG{}: the terminal was left raw: {text}",
            name.to_uppercase()
        );
        assert_eq!(
            String::from_utf8_lossy(&alternate.stdout).trim(),
            "0",
            "SIG{}: left on the alternate screen",
            name.to_uppercase()
        );
        let code = 128 + sig.as_raw();
        assert!(text.starts_with(&format!("exit {code}")), "{text}");
    }
    let _ = tmux(&["kill-server"]);
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}

/// Review B1, B4, B8: a heartbeat timeout under 3 intervals, a listen address given
/// twice (`systemd` twice adopted the same descriptors twice) and a memory limit under
/// 1 MiB are one line and exit 2, with nothing started.
#[test]
fn inconsistent_settings_are_refused_before_anything_starts() {
    let dir = Scratch::new("inconsistent");
    let control = dir.path("ctl.sock");
    let c = control.to_str().expect("utf8");
    let sock = dir.path("a.sock");
    let unix = format!("unix:{}", sock.display());
    for (args, needles) in [
        (
            vec![
                "--heartbeat-interval",
                "1s",
                "--heartbeat-timeout",
                "1001ms",
            ],
            vec![
                "timeouts.heartbeat_timeout",
                "1s 1ms",
                "interval 1s",
                "3 intervals",
            ],
        ),
        (
            vec!["--listen", "systemd", "--listen", "systemd"],
            vec!["listen", "systemd", "listed twice"],
        ),
        (
            vec!["--listen", &unix, "--listen", &unix],
            vec!["listen", "listed twice"],
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--max-memory", "1"],
            vec!["recycle.max_memory", "1 bytes", "1 MiB"],
        ),
    ] {
        let mut all = vec!["run", "--control", c];
        all.extend(&args);
        let err = usage_error(&all);
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!control.exists(), "nothing started for {args:?}");
        assert!(!sock.exists(), "nothing bound for {args:?}");
    }
    let config = dir.path("hb.toml");
    std::fs::write(
        &config,
        "listen = [\"127.0.0.1:0\"]\n[timeouts]\nheartbeat_interval = \"2s\"\nheartbeat_timeout = \"5s\"\n",
    )
    .expect("write");
    let err = usage_error(&[
        "run",
        "--control",
        c,
        "--config",
        config.to_str().expect("utf8"),
    ]);
    assert!(
        err.contains("timeouts.heartbeat_timeout") && err.contains("(6s)"),
        "{err}"
    );
    assert!(!control.exists());
}

/// The pid of each worker, from `status --json`.
fn worker_pids(status: &serde_json::Value) -> Vec<u32> {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

/// Review B3: with a command after `--`, the file's `[worker] env` and `cwd` were
/// dropped (and without `worker.command` the file was refused).
#[test]
fn the_files_worker_env_and_cwd_go_with_a_command_given_after_dashes() {
    let dir = Scratch::new("worker-env");
    let config = dir.path("rr-cluster.toml");
    let cwd = dir.path("app");
    std::fs::create_dir_all(&cwd).expect("mkdir");
    let expected_cwd = cwd.canonicalize().expect("canonical");
    // Without a command in the file, and with one the command line replaces.
    for file_command in ["", "command = [\"/nonexistent/app\"]\n"] {
        std::fs::write(
            &config,
            format!(
                "listen = [\"127.0.0.1:0\"]\nworkers = 2\n[worker]\n{file_command}env = {{ RR_REVIEW_MARK = \"from-the-file\" }}\ncwd = {:?}\n",
                cwd.to_str().expect("utf8")
            ),
        )
        .expect("write");
        let mut pool = Running::start(
            &dir.path("ctl.sock"),
            &[
                "--config",
                config.to_str().expect("utf8"),
                "--",
                BIN,
                "hello-worker",
            ],
        );
        let s = pool.wait_ready(Some(2));
        let pids = worker_pids(&s);
        assert_eq!(pids.len(), 2, "{s}");
        for pid in pids {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
            assert!(
                environ
                    .split(|b| *b == 0)
                    .any(|kv| kv == b"RR_REVIEW_MARK=from-the-file"),
                "worker {pid} lacks the file's env ({file_command:?})"
            );
            let dir = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
            assert_eq!(dir, expected_cwd, "worker {pid} ({file_command:?})");
        }
        assert_eq!(get(pool.addr(), "/").0, "HTTP/1.1 200 OK");
        signal(pool.child.id(), Signal::TERM);
        assert_eq!(pool.wait_exit(), 0);
    }
}

/// Review B6: a reload that changed the metrics address reported success and said
/// nothing; the address is kept, with a warning.
#[test]
fn a_reload_that_changes_the_metrics_address_warns_and_keeps_it() {
    let dir = Scratch::new("reload-metrics");
    let config = dir.path("rr-cluster.toml");
    let write = |metrics: &str| {
        std::fs::write(
            &config,
            format!("listen = [\"127.0.0.1:0\"]\nworkers = 1\nmetrics = \"{metrics}\"\n"),
        )
        .expect("write");
    };
    write("127.0.0.1:0");
    let log = dir.path("stderr.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let mut pool = Running::start_with_stderr(
        &dir.path("ctl.sock"),
        &["--config", config.to_str().expect("utf8")],
        Stdio::from(stderr),
    );
    // Unchanged: no warning.
    let out = pool.ctl(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    write("127.0.0.1:1");
    let out = pool.ctl(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("metrics address cannot change") || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        text.matches("metrics address cannot change").count(),
        1,
        "one warning, for the second reload only:\n{text}"
    );
    signal(pool.child.id(), Signal::TERM);
    assert_eq!(pool.wait_exit(), 0);
}
