//! The `rr-cluster` binary end to end, for defects a review found: the metrics
//! endpoint under clients that never read, `top` without a terminal, killed by a
//! signal or facing a master that does not answer, signals during start-up, a warning
//! logged before the logs existed, and `scale` out of range. Real master processes
//! serve the demo worker on 127.0.0.1 port 0.

mod common;
use common::missing_tool;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_rr-cluster");
const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rr-review-{name}-{}", std::process::id()));
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

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Waits for a child of ours to exit, at most `within`; SIGKILLs it (while it is
/// alive) past that and returns `None`.
fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            signal(child.id(), Signal::KILL);
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `rr-cluster run`; SIGKILLs it on drop while it is alive (its workers die
/// with it).
struct Running {
    child: Child,
    control: PathBuf,
}

impl Running {
    fn spawn(control: &Path, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Running {
        let child = Command::new(BIN)
            .arg("run")
            .arg("--control")
            .arg(control)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start rr-cluster");
        Running {
            child,
            control: control.to_owned(),
        }
    }

    fn start(control: &Path, args: &[&str]) -> Running {
        let mut r = Running::spawn(control, args, &[], Stdio::inherit());
        r.wait_ready();
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

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let out = self.ctl(&["status", "--json"]);
            if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                if !workers.is_empty() && workers.iter().all(|w| w["state"] == "ready") {
                    return;
                }
            }
            assert!(
                self.child.try_wait().expect("wait").is_none(),
                "the master exited"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pool not ready in time");
    }

    fn stop(mut self) -> i32 {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), Signal::TERM);
        }
        let status = wait_child(&mut self.child, WAIT).expect("the master stops on SIGTERM");
        status.code().unwrap_or(-1)
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

/// A port that was free a moment ago (a probe bound it and let it go): another test
/// may take it before the caller binds it, so callers try again on "address in use".
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    l.local_addr().expect("addr").port()
}

/// `rr-cluster run` (as [`Running::start`]) serving metrics on a port found free by a
/// probe: when a parallel test binds that port first, the master exits (address in
/// use, said on its stderr) and another port is tried. The pool and its metrics
/// address.
fn start_with_metrics(dir: &Scratch, args: &[&str]) -> (Running, SocketAddr) {
    let control = dir.path("ctl.sock");
    let log = dir.path("master.log");
    let mut tried = Vec::new();
    for _ in 0..10 {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let addr = metrics.to_string();
        let mut all = args.to_vec();
        all.extend(["--metrics", addr.as_str()]);
        let mut pool = Running::spawn(&control, &all, &[], Stdio::from(stderr));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = pool.child.try_wait().expect("wait") {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    said.contains("in use"),
                    "rr-cluster run exited ({status}) before it was ready:\n{said}"
                );
                tried.push(metrics);
                break;
            }
            let out = pool.ctl(&["status", "--json"]);
            if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                if !workers.is_empty() && workers.iter().all(|w| w["state"] == "ready") {
                    return (pool, metrics);
                }
            }
            assert!(Instant::now() < deadline, "pool not ready in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("every metrics port tried was in use: {tried:?}");
}

/// A client socket with a tiny receive window, so that a client that does not read
/// blocks the server's writes soon.
fn connect_small_window(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    sockopt::set_socket_recv_buffer_size(&fd, 4096)?;
    rustix::net::connect(&fd, &addr)?;
    Ok(TcpStream::from(fd))
}

/// One GET with `Connection: close`: its status line, or `None` when the connection
/// was closed (or reset) unanswered, or no answer came within `within`.
fn try_get(addr: SocketAddr, path: &str, within: Duration) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().next()?;
    (!line.is_empty()).then(|| line.to_owned())
}

/// Review 1: a client that pipelines `GET /metrics` and never reads held its slot for
/// ever (hyper's header timeout does not cover writes); 32 of them took every slot,
/// and health probes were closed unanswered. Now a connection gets at most 100 answers,
/// a write blocked for 10 s ends it, and a stuck one gives its slot to a newcomer.
#[test]
fn probes_are_answered_while_clients_pipeline_metrics_and_never_read() {
    let dir = Scratch::new("pipeline");
    let (pool, addr) = start_with_metrics(&dir, &["--listen", "127.0.0.1:0", "--workers", "1"]);
    assert_eq!(
        try_get(addr, "/livez", WAIT).as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    // 40 clients, each asking for /metrics 1000 times in one go (some 4 MB of answers,
    // more than the socket buffers hold) and never reading.
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    let mut hogs = Vec::new();
    for _ in 0..40 {
        let Ok(mut s) = connect_small_window(addr) else {
            continue;
        };
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        // Past the limit, or closed after its last answer: a failed write is fine.
        let _ = s.write_all(&request);
        hogs.push(s);
    }
    assert!(hogs.len() >= 32, "only {} connections", hogs.len());
    // A probe is answered within a bounded wait (before: never, all slots held).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempts = 0u32;
    let answered = loop {
        attempts += 1;
        if let Some(line) = try_get(addr, "/livez", Duration::from_secs(2)) {
            break Some(line);
        }
        if Instant::now() >= deadline || attempts >= 200 {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        answered.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "no probe answered in {attempts} attempts"
    );
    assert_eq!(
        try_get(addr, "/readyz", WAIT).as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    drop(hogs);
    assert_eq!(pool.stop(), 0);
}

/// Review 7: `scale 0` or `scale 5000` reached the master and exited 1; they are bad
/// input, refused up front with one line and exit 2 (the control socket need not
/// exist). In-range values still go to the master.
#[test]
fn scale_out_of_range_is_bad_input() {
    let dir = Scratch::new("scale");
    let control = dir.path("nowhere.sock");
    for n in ["0", "5000", "1025", "+1024", "-1024", "+99999999999"] {
        let out = Command::new(BIN)
            .args(["scale", n, "--control"])
            .arg(&control)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "scale {n}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "scale {n}: {err}");
        assert!(err.contains("1024"), "scale {n}: {err}");
    }
    for n in ["1", "1024", "+1023", "-1023"] {
        let out = Command::new(BIN)
            .args(["scale", n, "--control"])
            .arg(&control)
            .output()
            .expect("run");
        // No master there: a failure to connect, not bad input.
        assert_eq!(out.status.code(), Some(1), "scale {n}: {out:?}");
    }
}

/// Review 6: the socket-activation mismatch warning was logged before the logs were
/// set up, so never shown.
#[test]
fn the_socket_activation_mismatch_warning_is_shown() {
    let dir = Scratch::new("listen-fds");
    let log = dir.path("stderr.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut pool = Running::spawn(
        &dir.path("ctl.sock"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")],
        Stdio::from(file),
    );
    pool.wait_ready();
    assert_eq!(pool.stop(), 0);
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        text.contains("LISTEN_FDS=1 is set for process 1"),
        "no warning in: {text}"
    );
}

/// The signals a process catches (`SigCgt` in /proc/PID/status).
fn caught_signals(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Review 5: the master caught its signals only after it had started, so a SIGTERM
/// or SIGHUP while it started killed it and left the control socket behind. By the
/// time the control socket exists, they are caught.
#[test]
fn signals_are_caught_before_the_control_socket_exists() {
    let Some(_) = caught_signals(std::process::id()) else {
        return missing_tool("/proc/PID/status (no /proc)");
    };
    let dir = Scratch::new("early-signals");
    let control = dir.path("ctl.sock");
    let mut pool = Running::spawn(
        &control,
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[],
        Stdio::inherit(),
    );
    let deadline = Instant::now() + WAIT;
    // Polled closely (the socket appears within milliseconds of the start), and
    // bounded in count as in time.
    let mut polls = 0u64;
    while !control.exists() {
        polls += 1;
        assert!(
            Instant::now() < deadline && polls < 100_000_000,
            "no control socket"
        );
        std::thread::yield_now();
    }
    let caught = caught_signals(pool.child.id()).expect("SigCgt");
    for sig in [Signal::TERM, Signal::INT, Signal::HUP, Signal::QUIT] {
        let bit = 1u64 << (sig.as_raw() - 1);
        assert_ne!(caught & bit, 0, "{sig:?} not caught yet: {caught:x}");
    }
    pool.wait_ready();
    assert_eq!(pool.stop(), 0);
    assert!(!control.exists(), "control socket removed");
}

/// Review 2: `top` with no terminal panicked (`ratatui::init`); now one line, exit 1.
#[test]
fn top_without_a_terminal_is_one_line_not_a_panic() {
    let dir = Scratch::new("top-no-tty");
    let control = dir.path("ctl.sock");
    let pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "1"]);
    // Without a controlling terminal too (setsid), as under a service manager or cron.
    let setsid = Path::new("/usr/bin/setsid");
    let mut cmd = if setsid.exists() {
        let mut c = Command::new(setsid);
        c.arg(BIN);
        c
    } else {
        Command::new(BIN)
    };
    let mut child = cmd
        .arg("top")
        .arg("--control")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run top");
    let status = wait_child(&mut child, WAIT).expect("top ends at once without a terminal");
    let mut err = String::new();
    let mut out = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("terminal"), "{err}");
    assert!(out.is_empty(), "nothing written to stdout: {out:?}");
    assert_eq!(pool.stop(), 0);
}

/// A tmux server of the test's own (`tmux -L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(name: &str) -> Option<Tmux> {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmux {
            socket: format!("rr-review-{name}-{}", std::process::id()),
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", session]).stdout)
            .into_owned()
    }

    fn wait_for(&self, session: &str, within: Duration, what: &dyn Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen(session);
            if what(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "not on screen in time:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn format(&self, session: &str, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", session, format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts `top` in a new session, in a shell that reports, once it ends, its exit
    /// code and whether the terminal was left raw; returns top's pid.
    fn start_top(&self, session: &str, control: &Path) -> u32 {
        let script = format!(
            "{BIN} top --interval 200ms --control {}; echo \"top exited $?\"; \
             if stty -a | tr ' ' '\\n' | grep -qx -- -icanon; then echo TTY-LEFT-RAW; \
             else echo TTY-COOKED; fi; exec cat",
            control.display()
        );
        let out = self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "160",
            "-y",
            "30",
            &script,
        ]);
        assert!(out.status.success(), "{out:?}");
        self.wait_for(session, WAIT, &|s| s.contains("SLOT"));
        assert_eq!(self.format(session, "#{alternate_on}"), "1");
        let shell: u32 = self
            .format(session, "#{pane_pid}")
            .parse()
            .expect("pane pid");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .expect("the shell's children");
        let top: u32 = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("top's pid");
        let comm = std::fs::read_to_string(format!("/proc/{top}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "rr-cluster", "pid {top} is top");
        top
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Reviews 3 and 4: `top` killed by SIGTERM left the terminal raw and in the alternate
/// screen; and while the master did not answer, a request blocked the view for up to
/// 10 s, `q` included.
#[test]
fn top_quits_promptly_and_restores_the_terminal() {
    let Some(tmux) = Tmux::new("top") else {
        return missing_tool("tmux is not installed");
    };
    if !Path::new("/proc/self/task").exists() {
        return missing_tool("/proc");
    }
    let dir = Scratch::new("top");
    let control = dir.path("ctl.sock");
    let mut pool = Running::start(&control, &["--listen", "127.0.0.1:0", "--workers", "1"]);

    // A master that stopped answering: `r` sends a reload that hangs, and `q` still
    // quits at once (before: after the 10 s request timeout).
    tmux.start_top("hang", &control);
    signal(pool.child.id(), Signal::STOP);
    tmux.run(&["send-keys", "-t", "hang", "r"]);
    tmux.run(&["send-keys", "-t", "hang", "q"]);
    // Waited for less than the 10 s a request to the master may take: `q` does not
    // wait for the reload's answer (the master stays stopped meanwhile).
    let screen = tmux.wait_for("hang", Duration::from_secs(8), &|s| s.contains("TTY-"));
    if let Ok(None) = pool.child.try_wait() {
        signal(pool.child.id(), Signal::CONT);
    }
    assert!(screen.contains("top exited 0"), "{screen}");
    assert!(screen.contains("TTY-COOKED"), "{screen}");
    pool.wait_ready();

    // SIGTERM from outside: the terminal is restored before top exits.
    let top = tmux.start_top("term", &control);
    // Not our child (the tmux shell's): still top, just before the signal.
    let comm = std::fs::read_to_string(format!("/proc/{top}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "rr-cluster", "pid {top} is still top");
    signal(top, Signal::TERM);
    let screen = tmux.wait_for("term", WAIT, &|s| s.contains("TTY-"));
    assert!(screen.contains("top exited 143"), "{screen}");
    assert!(screen.contains("TTY-COOKED"), "{screen}");
    assert_eq!(tmux.format("term", "#{alternate_on}"), "0", "{screen}");
    assert_eq!(pool.stop(), 0);
}
