//! CPU time and resident memory of processes, from `/proc` (no system call beyond
//! reading two small files per process).

use std::time::Duration;

use tokio::time::Instant;

/// What `/proc` says about one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// User plus system CPU time.
    pub(crate) cpu: Duration,
    /// Resident memory, bytes.
    pub(crate) rss: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/statm`. `None` when the process is gone
/// (or `/proc` is not there).
pub(crate) fn sample(pid: u32) -> Option<Sample> {
    // Bytes, not a string: the command name is whatever the process was exec'd as, cut
    // at 15 bytes (possibly inside a character), or set by the process itself.
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    parse(&stat, &statm)
}

fn parse(stat: &[u8], statm: &str) -> Option<Sample> {
    // "pid (comm) state ppid ...": comm may hold spaces, parentheses and any byte; the
    // fields after the last ')' are fixed, and ASCII. utime and stime are the 12th and
    // 13th after it.
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let ticks = utime + stime;
    let cpu =
        Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let rss = pages * rustix::param::page_size() as u64;
    Some(Sample { cpu, rss })
}

/// CPU use between two samples, in percent of one core.
pub(crate) fn cpu_percent(before: (Instant, Sample), after: (Instant, Sample)) -> Option<f64> {
    let wall = after.0.checked_duration_since(before.0)?.as_secs_f64();
    if wall <= 0.0 {
        return None;
    }
    let cpu = after.1.cpu.checked_sub(before.1.cpu)?.as_secs_f64();
    Some(100.0 * cpu / wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_odd_command_names() {
        let stat = "4242 (my (odd) worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200";
        let hz = rustix::param::clock_ticks_per_second();
        let s = parse(stat.as_bytes(), "5000 300 100 10 0 200 0").expect("parse");
        assert_eq!(
            s.cpu,
            Duration::from_secs(300 / hz) + Duration::from_nanos((300 % hz) * 1_000_000_000 / hz)
        );
        assert_eq!(s.rss, 300 * rustix::param::page_size() as u64);
        assert!(parse(b"garbage", "").is_none());
        // A name cut inside a character ("приложение" is 20 bytes; the kernel keeps 15).
        let mut cut = b"4243 (".to_vec();
        cut.extend_from_slice(&"приложение".as_bytes()[..15]);
        cut.extend_from_slice(
            b") S 1 4243 4243 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200",
        );
        assert_eq!(parse(&cut, "5000 300 100 10 0 200 0"), Some(s));
    }

    #[test]
    fn samples_a_process_whose_name_is_not_utf8() {
        // exec'd through a link whose name the kernel cuts inside a character.
        let dir = std::env::temp_dir().join(format!("rr-procstat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tempdir");
        let link = dir.join("приложение");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/bin/sleep", &link).expect("symlink");
        let mut child = std::process::Command::new(&link)
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let stat = std::fs::read(format!("/proc/{pid}/stat")).expect("stat");
        let sampled = sample(pid);
        // Killed by its pid while it is known to be alive (not yet waited for).
        child.kill().expect("kill");
        child.wait().expect("wait");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            std::str::from_utf8(&stat).is_err(),
            "the name should not be UTF-8"
        );
        assert!(sampled.is_some_and(|s| s.rss > 0), "{sampled:?}");
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss > 0);
    }
}
