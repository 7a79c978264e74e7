//! Console output of PID1: one line per event, on the console (stdout, which the kernel
//! opened on /dev/console) and in the kernel log (/dev/kmsg), in one format:
//!
//! ```text
//! [basalt] <milestone> t=<seconds>      boot timeline (info)
//! [basalt] <message>                    info: rare, important state changes
//! [basalt] warning: <message>           warn: abnormal but harmless
//! [basalt] error: <context>: <chain>    error: an action failed
//! ```
//!
//! Info lines carry no tag: the boot timeline and the lines tools read (`footprint:`,
//! `join: agent exec`) predate levels and stay as they are. In the kernel log each line
//! has its level's priority (KERN_INFO, KERN_WARNING, KERN_ERR), so `dmesg --level=err`
//! finds PID1's errors.
//!
//! Nobody waits for the console: lines go through a bounded queue to a writer thread
//! ([`queue`]), and what does not fit is dropped and counted ([`dropped`]).

mod queue;

pub use queue::{Origin, QUEUE_LINES, SERVICE_LINES};

use basalt_api::milestone::{self, Milestone};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Every milestone of this boot as `(name, seconds since kernel start)`, in the order
/// reached: what the node API's status and metrics report.
static MILESTONES: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());

/// Seconds since the kernel started (CLOCK_BOOTTIME), the clock of the boot timeline.
pub fn uptime() -> f64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9,
        Err(_) => 0.0,
    }
}

/// Prints a milestone line of the boot timeline and records it.
pub fn milestone(m: Milestone) {
    let t = uptime();
    record(m.name(), t);
    write_line(&milestone::format(m, t), Level::Info, Origin::Pid1);
}

/// Every step of this boot that finished, as `(name, start, seconds taken)`, in the order
/// finished: what the node API's status reports beside the milestones.
static STEPS: Mutex<Vec<(String, f64, f64)>> = Mutex::new(Vec::new());

/// At most this many steps are kept (a boot has about twenty).
const STEPS_MAX: usize = 64;

/// Prints a step line (`[basalt] step <name> at=<start> took=<seconds>`) and records it.
pub fn step(name: &str, at: f64, took: f64) {
    {
        let mut all = STEPS.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() < STEPS_MAX {
            all.push((name.to_owned(), at, took));
        }
    }
    write_line(
        &milestone::format_step(name, at, took),
        Level::Info,
        Origin::Pid1,
    );
}

/// Runs `f` as the boot step `name`: its start and duration go to the console and to
/// [`steps`].
pub fn timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let at = uptime();
    let out = f();
    step(name, at, (uptime() - at).max(0.0));
    out
}

/// The steps finished so far, in the order finished.
pub fn steps() -> Vec<(String, f64, f64)> {
    STEPS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Writes a milestone already printed to the kernel log only: `init-start` comes before
/// stage 1 has mounted devtmpfs, so its first `/dev/kmsg` write finds no device, and
/// stage 2 reads the timeline back from the kernel log.
pub fn replay_to_kmsg(m: Milestone) {
    let recorded = milestones().into_iter().find(|(n, _)| n == m.name());
    if let Some((_, t)) = recorded {
        if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
            let _ = kmsg.write_all(format!("<6>{}\n", milestone::format(m, t)).as_bytes());
        }
    }
}

/// The milestones reached so far, oldest first.
pub fn milestones() -> Vec<(String, f64)> {
    MILESTONES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn record(name: &str, t: f64) {
    let mut all = MILESTONES.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded: a milestone reached again (a second `joined`) keeps its latest time.
    all.retain(|(n, _)| n != name);
    let at = all.partition_point(|(_, when)| *when <= t);
    all.insert(at, (name.to_owned(), t));
}

/// The kernel log holds at most this much of what stage 1 printed that we read back.
const KMSG_READ_MAX: usize = 1024 * 1024;

/// Records the milestones an earlier stage printed to the kernel log (stage 1 runs as
/// another program image, so its record is gone): reads `kmsg` (`/dev/kmsg`) without
/// blocking, from its start, and keeps the milestone lines of names not yet recorded.
/// Returns how many were added. Best effort: an unreadable log adds none.
pub fn import_milestones(kmsg: &Path) -> usize {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(kmsg)
    else {
        return 0;
    };
    let mut text = Vec::new();
    // /dev/kmsg returns one record per read; a regular file (tests) all of it.
    let mut buf = vec![0u8; 8192];
    while text.len() < KMSG_READ_MAX {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            // EPIPE: the record was overwritten while we read; the next one follows.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EAGAIN: nothing more for now.
            Err(_) => break,
        }
    }
    let mut added = 0;
    for l in String::from_utf8_lossy(&text).lines() {
        if let Some((name, t)) = milestone::parse(l) {
            if !milestones().iter().any(|(n, _)| n == name) {
                record(name, t);
                added += 1;
            }
        }
    }
    added
}

/// How much a line matters (Cloud Hypervisor's levels; PID1 logs no debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Rare, important state changes; the boot timeline.
    Info,
    /// Abnormal but harmless: the node goes on as it should.
    Warn,
    /// An action failed.
    Error,
}

impl Level {
    /// What follows the prefix on the line.
    fn tag(self) -> &'static str {
        match self {
            Level::Info => "",
            Level::Warn => "warning: ",
            Level::Error => "error: ",
        }
    }

    /// The kernel log's priority (syslog levels: 3 err, 4 warning, 6 info).
    fn kmsg_priority(self) -> u8 {
        match self {
            Level::Info => 6,
            Level::Warn => 4,
            Level::Error => 3,
        }
    }
}

/// The console line of a message at `level`.
pub fn format_line(level: Level, msg: &str) -> String {
    format!("{} {}{msg}", milestone::PREFIX, level.tag())
}

/// Informational line.
pub fn info(msg: &str) {
    log(Level::Info, msg);
}

/// Something abnormal that the node goes on from.
pub fn warn(msg: &str) {
    log(Level::Warn, msg);
}

/// An error with its whole source chain, printed once.
pub fn error(context: &str, err: &dyn std::error::Error) {
    log(Level::Error, &format!("{context}: {}", chain(err)));
}

/// One line at `level`, on the console and in the kernel log.
pub fn log(level: Level, msg: &str) {
    write_line(&format_line(level, msg), level, Origin::Pid1);
}

/// `err: cause: cause` in one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// A supervised service's output line, as `[name] line`: queued for the console within
/// the service share of the queue, and written to the kernel log.
pub fn service_line(service: &str, line: &str) {
    write_line(
        &format_line(Level::Info, &format!("[{service}] {line}")),
        Level::Info,
        Origin::Service,
    );
}

/// Lines the console queue dropped since boot because the console did not keep up.
pub fn dropped() -> u64 {
    match CONSOLE.get() {
        Some(Some(q)) => q.dropped(),
        _ => 0,
    }
}

/// Waits, at most `timeout`, until every queued line is on the console: before stage 1
/// execs stage 2 (the queue would be lost with the program image), and before a reboot.
/// Returns whether everything was written.
pub fn flush(timeout: Duration) -> bool {
    match CONSOLE.get() {
        Some(Some(q)) => q.flush(timeout),
        _ => true,
    }
}

/// How long [`flush`] waits where PID1 is about to exec or reboot: a console that takes
/// longer has lost those lines, which the kernel log still has.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The console's queue, made with its writer thread at the first line; `None` when the
/// thread could not be started, and lines are then written synchronously.
static CONSOLE: OnceLock<Option<&'static queue::Queue>> = OnceLock::new();

fn console() -> Option<&'static queue::Queue> {
    *CONSOLE.get_or_init(|| {
        // Leaked once: the queue lives as long as PID1.
        let q: &'static queue::Queue = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                // Signals are the main loop's alone (it takes them with sigtimedwait); a
                // thread that left them open could die of a SIGUSR1 meant as a wake-up.
                let _ = nix::sys::signal::SigSet::all().thread_block();
                q.run(&mut std::io::stdout())
            })
            .ok()
            .map(|_| q)
    })
}

fn write_line(text: &str, level: Level, origin: Origin) {
    // Both writes are best effort: PID1 must not stop because a console is missing.
    match console() {
        Some(q) => {
            q.push(text.to_owned(), origin);
        }
        None => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }
    if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
        // Info (<6>) stays out of a quiet console, where stdout already showed it.
        let priority = level.kmsg_priority();
        let _ = kmsg.write_all(format!("<{priority}>{text}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn milestones_from_the_kernel_log_are_recorded_in_time_order() {
        // The record is global and other tests reach real milestones (stage 1's plan):
        // names of this test's own keep it independent of the order tests run in.
        let dir = tempfile::tempdir().expect("tempdir");
        let kmsg = dir.path().join("kmsg");
        std::fs::write(
            &kmsg,
            "6,1,500000,-;[basalt] test-early t=0.500\n\
             6,2,600000,-;Run /init as init process\n\
             6,3,900000,-;[basalt] test-late t=0.900\n\
             6,4,950000,-;[basalt] error: not a milestone\n",
        )
        .expect("write");
        assert_eq!(import_milestones(&kmsg), 2);
        // Read again: nothing is recorded twice.
        assert_eq!(import_milestones(&kmsg), 0);
        let all = milestones();
        let pos = |name: &str| all.iter().position(|(n, _)| n == name);
        let (a, b) = (pos("test-early"), pos("test-late"));
        assert!(a.is_some() && b.is_some() && a < b, "{all:?}");
        assert!(all.windows(2).all(|w| w[0].1 <= w[1].1), "{all:?}");
        assert_eq!(import_milestones(&dir.path().join("missing")), 0);
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime();
        let b = uptime();
        assert!(a > 0.0 && b >= a);
    }

    #[test]
    fn every_level_has_one_line_format() {
        assert_eq!(
            format_line(Level::Info, "api: listening"),
            "[basalt] api: listening"
        );
        assert_eq!(
            format_line(Level::Warn, "metadata: network not up; skipped"),
            "[basalt] warning: metadata: network not up; skipped"
        );
        assert_eq!(
            format_line(Level::Error, "machine config: bad"),
            "[basalt] error: machine config: bad"
        );
        // The QEMU tests take any `[basalt] error` for a failed boot: a warning is not one.
        assert!(!format_line(Level::Warn, "x").contains("[basalt] error"));
        let priorities = [Level::Info, Level::Warn, Level::Error].map(Level::kmsg_priority);
        assert_eq!(priorities, [6, 4, 3]);
    }
}
