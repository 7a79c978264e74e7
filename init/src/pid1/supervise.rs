//! Service supervision for PID1: starts the services of a table, captures their output
//! into a bounded per-service log and a caller's sink (the console), restarts them with
//! exponential backoff, and stops them in order at shutdown.
//!
//! Synchronous and single-threaded: PID1 calls [`Supervisor::poll`] from its loop.
//!
//! **Reaping contract.** The supervisor never calls `waitpid`. PID1 reaps every process
//! with `waitpid(-1, WNOHANG)` (orphans included) and hands each exit to
//! [`Supervisor::reaped`]; a supervisor that waited on its own pids would race that loop
//! and one of the two would lose the exit. [`Supervisor::stop_all`] takes the reaper as a
//! closure for the same reason.

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Lines kept per service; older lines are dropped first.
pub const LOG_LINES: usize = 1000;
/// Bytes kept per service (sum of line lengths).
pub const LOG_BYTES: usize = 256 * 1024;
/// A line longer than this is cut into pieces, so one endless line cannot grow memory.
const MAX_LINE: usize = 4096;

/// When and how often a service that exited is started again.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Cap of the delay.
    pub max: Duration,
    /// Growth of the delay per consecutive failure.
    pub factor: f64,
    /// A run longer than this resets the delay to `initial`.
    pub reset_after: Duration,
    /// Consecutive failures after which the service stays `Failed`; `None` retries forever.
    pub give_up_after: Option<u32>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            factor: 2.0,
            reset_after: Duration::from_secs(10),
            give_up_after: None,
        }
    }
}

impl RestartPolicy {
    /// Delay before restart number `failures` (1-based) of a run of consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// One entry of the service table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    /// Program and arguments; `argv[0]` is the program (a path, or looked up in `PATH`).
    pub argv: Vec<String>,
    /// Added to the environment PID1 passes on.
    pub env: Vec<(String, String)>,
    pub restart: RestartPolicy,
    /// How long [`Supervisor::stop_all`] waits after SIGTERM; the larger of this and its
    /// own timeout wins.
    pub stop_timeout: Duration,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// Could not be started at all (spawn error, logged into the service's log).
    SpawnFailed,
}

impl Exit {
    /// The pid and exit of a `waitpid` result, or `None` for stops and continues.
    pub fn from_wait(status: WaitStatus) -> Option<(Pid, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Exit::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, Exit::Signal(sig))),
            _ => None,
        }
    }
}

/// State of one service as [`Supervisor::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Registered, to be spawned by the next [`Supervisor::poll`].
    Starting,
    Running {
        pid: Pid,
        since: Instant,
    },
    /// Exited; to be started again at `until`.
    Backoff {
        until: Instant,
        restarts: u32,
    },
    /// Stopped by [`Supervisor::stop_all`].
    Stopped,
    /// Gave up after [`RestartPolicy::give_up_after`] consecutive failures.
    Failed(Exit),
}

/// One row of [`Supervisor::status`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub state: State,
    /// Restarts since [`Supervisor::start`].
    pub restarts: u32,
    pub last_exit: Option<Exit>,
    /// Times at which restarts were started, oldest first (the last 64).
    pub restart_times: Vec<Instant>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("service {0}: already in the table")]
    Duplicate(String),
    #[error("service {0}: argv is empty")]
    EmptyArgv(String),
}

/// Where captured lines go besides the log buffer: `(service name, line)`.
pub type Sink = Box<dyn FnMut(&str, &str)>;

/// Bounded log of one service.
#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Ring {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > LOG_LINES || self.bytes > LOG_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

/// A non-blocking pipe from a child and the unfinished line read from it.
struct Stream<R> {
    pipe: Option<R>,
    partial: Vec<u8>,
}

impl<R: Read + AsRawFd> Stream<R> {
    fn new(pipe: Option<R>) -> Self {
        if let Some(p) = &pipe {
            // Without O_NONBLOCK a read would stall PID1 until the child writes.
            if let Ok(flags) = fcntl(p.as_raw_fd(), FcntlArg::F_GETFL) {
                let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
                let _ = fcntl(p.as_raw_fd(), FcntlArg::F_SETFL(flags));
            }
        }
        Self {
            pipe,
            partial: Vec::new(),
        }
    }

    /// Reads what is available; returns complete lines. At EOF the pipe is closed and the
    /// unfinished line flushed.
    fn drain(&mut self, out: &mut Vec<String>) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8192];
        let eof = loop {
            match pipe.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            out.push(take_line(&mut self.partial));
                        } else {
                            self.partial.push(b);
                            if self.partial.len() >= MAX_LINE {
                                out.push(take_line(&mut self.partial));
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if eof {
            self.pipe = None;
            if !self.partial.is_empty() {
                out.push(take_line(&mut self.partial));
            }
        }
    }
}

fn take_line(partial: &mut Vec<u8>) -> String {
    let line = String::from_utf8_lossy(partial).into_owned();
    partial.clear();
    line
}

struct Service {
    spec: ServiceSpec,
    state: State,
    /// Kept so the pipes stay open; never waited on (see the module's reaping contract).
    child: Option<Child>,
    stdout: Stream<ChildStdout>,
    stderr: Stream<ChildStderr>,
    log: Ring,
    restarts: u32,
    /// Consecutive short runs, the exponent of the backoff.
    failures: u32,
    last_exit: Option<Exit>,
    restart_times: VecDeque<Instant>,
    /// Set by `stop_all`: an exit then means Stopped, not a restart.
    stopping: bool,
}

impl Service {
    fn drain(&mut self, sink: &mut Sink) {
        let mut lines = Vec::new();
        self.stdout.drain(&mut lines);
        self.stderr.drain(&mut lines);
        for line in lines {
            self.record(line, sink);
        }
    }

    fn record(&mut self, line: String, sink: &mut Sink) {
        sink(&self.spec.name, &line);
        self.log.push(line);
    }

    fn spawn(&mut self, now: Instant, sink: &mut Sink) {
        let mut cmd = Command::new(&self.spec.argv[0]);
        cmd.args(&self.spec.argv[1..])
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a stop reaches the service's children too. std's spawn
            // already empties the signal mask and restores SIGPIPE in the child, which
            // PID1 needs because it blocks every signal; no pre_exec is needed.
            .process_group(0);
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = Pid::from_raw(child.id() as i32);
                self.stdout = Stream::new(child.stdout.take());
                self.stderr = Stream::new(child.stderr.take());
                self.child = Some(child);
                self.state = State::Running { pid, since: now };
            }
            Err(e) => {
                self.record(format!("spawn {}: {e}", self.spec.argv[0]), sink);
                self.exited(Exit::SpawnFailed, now, now);
            }
        }
    }

    /// Moves to Backoff, Failed or Stopped after the process ended at `now`.
    fn exited(&mut self, exit: Exit, since: Instant, now: Instant) {
        self.child = None;
        self.last_exit = Some(exit);
        if self.stopping {
            self.state = State::Stopped;
            return;
        }
        if now.saturating_duration_since(since) > self.spec.restart.reset_after {
            self.failures = 0;
        }
        self.failures += 1;
        let policy = &self.spec.restart;
        if policy.give_up_after.is_some_and(|n| self.failures > n) {
            self.state = State::Failed(exit);
            return;
        }
        self.state = State::Backoff {
            until: now + policy.delay(self.failures),
            restarts: self.restarts,
        };
    }
}

/// Owns the services of the table. See the module docs for the reaping contract.
pub struct Supervisor {
    services: Vec<Service>,
    sink: Sink,
}

impl Supervisor {
    /// `sink` receives every captured line; PID1 prints it as `[name] line`.
    pub fn new(sink: Sink) -> Self {
        Self {
            services: Vec::new(),
            sink,
        }
    }

    /// Adds a service; it is spawned by the next [`poll`](Self::poll).
    pub fn start(&mut self, spec: ServiceSpec) -> Result<(), Error> {
        if spec.argv.is_empty() {
            return Err(Error::EmptyArgv(spec.name));
        }
        if self.services.iter().any(|s| s.spec.name == spec.name) {
            return Err(Error::Duplicate(spec.name));
        }
        self.services.push(Service {
            spec,
            state: State::Starting,
            child: None,
            stdout: Stream::new(None),
            stderr: Stream::new(None),
            log: Ring::default(),
            restarts: 0,
            failures: 0,
            last_exit: None,
            restart_times: VecDeque::new(),
            stopping: false,
        });
        Ok(())
    }

    /// Non-blocking: drains output, spawns services that are due. Returns the earliest
    /// pending restart, so the caller can bound its wait; output needs polling as well
    /// (PID1 should come back within ~100 ms while services run).
    pub fn poll(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for svc in &mut self.services {
            svc.drain(&mut self.sink);
            match svc.state {
                State::Starting if !svc.stopping => svc.spawn(now, &mut self.sink),
                State::Backoff { until, .. } if until <= now && !svc.stopping => {
                    svc.restarts += 1;
                    if svc.restart_times.len() == 64 {
                        svc.restart_times.pop_front();
                    }
                    svc.restart_times.push_back(now);
                    svc.spawn(now, &mut self.sink);
                }
                _ => {}
            }
            if let State::Backoff { until, .. } = svc.state {
                next = Some(next.map_or(until, |n| n.min(until)));
            }
        }
        next
    }

    /// Tells the supervisor that `pid` ended. Returns false if `pid` is no service's
    /// (an orphan PID1 reaped); such exits are ignored.
    pub fn reaped(&mut self, pid: Pid, exit: Exit) -> bool {
        let now = Instant::now();
        let Some(svc) = self
            .services
            .iter_mut()
            .find(|s| matches!(s.state, State::Running { pid: p, .. } if p == pid))
        else {
            return false;
        };
        // The child has ended, so whatever it wrote is in the pipe now.
        svc.drain(&mut self.sink);
        let since = match svc.state {
            State::Running { since, .. } => since,
            _ => now,
        };
        svc.exited(exit, since, now);
        true
    }

    /// Stops every service: SIGTERM to each process group, waits up to the larger of
    /// `timeout` and the service's `stop_timeout`, then SIGKILL, then waits `timeout`
    /// again. `reap` must collect exited processes without blocking (PID1: its
    /// `waitpid(-1, WNOHANG)` loop) and return them. Returns the names that needed
    /// SIGKILL. Services whose exit never arrives are reported Stopped all the same.
    pub fn stop_all(
        &mut self,
        timeout: Duration,
        reap: &mut dyn FnMut() -> Vec<(Pid, Exit)>,
    ) -> Vec<String> {
        let start = Instant::now();
        for svc in &mut self.services {
            svc.stopping = true;
            match svc.state {
                State::Running { pid, .. } => {
                    let _ = killpg(pid, Signal::SIGTERM);
                }
                State::Starting | State::Backoff { .. } => svc.state = State::Stopped,
                State::Stopped | State::Failed(_) => {}
            }
        }
        let mut killed = Vec::new();
        let deadline_of = |svc: &Service| start + timeout.max(svc.spec.stop_timeout);
        loop {
            self.collect(reap);
            let now = Instant::now();
            let mut waiting = false;
            for svc in &mut self.services {
                if let State::Running { pid, .. } = svc.state {
                    if now >= deadline_of(svc) && !killed.contains(&svc.spec.name) {
                        let _ = killpg(pid, Signal::SIGKILL);
                        killed.push(svc.spec.name.clone());
                    }
                    waiting = true;
                }
            }
            let last = self.services.iter().map(deadline_of).max().unwrap_or(start);
            if !waiting || now >= last + timeout {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for svc in &mut self.services {
            svc.drain(&mut self.sink);
            if matches!(svc.state, State::Running { .. }) {
                svc.child = None;
                svc.state = State::Stopped;
            }
        }
        killed
    }

    fn collect(&mut self, reap: &mut dyn FnMut() -> Vec<(Pid, Exit)>) {
        for (pid, exit) in reap() {
            self.reaped(pid, exit);
        }
        for svc in &mut self.services {
            svc.drain(&mut self.sink);
        }
    }

    /// State of every service, in table order.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.services
            .iter()
            .map(|s| ServiceStatus {
                name: s.spec.name.clone(),
                state: s.state.clone(),
                restarts: s.restarts,
                last_exit: s.last_exit,
                restart_times: s.restart_times.iter().copied().collect(),
            })
            .collect()
    }

    /// Captured lines of `name`, oldest first; empty for an unknown service.
    pub fn logs(&self, name: &str) -> Vec<String> {
        self.services
            .iter()
            .find(|s| s.spec.name == name)
            .map(|s| s.log.lines.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Pids of running services, for a caller that reaps per pid.
    pub fn pids(&self) -> Vec<Pid> {
        self.services
            .iter()
            .filter_map(|s| match s.state {
                State::Running { pid, .. } => Some(pid),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use std::cell::RefCell;
    use std::rc::Rc;

    type Seen = Rc<RefCell<Vec<(String, String)>>>;

    /// The test is the reaper. Only the given pids are waited for, because other tests
    /// of this binary run their own children in parallel threads. A pid another test's
    /// `waitpid(-1)` already took (ECHILD) comes back as `STOLEN`.
    fn reap_pids(pids: &[Pid]) -> Vec<(Pid, Exit)> {
        let mut out = Vec::new();
        for &pid in pids {
            loop {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(ws) => out.extend(Exit::from_wait(ws)),
                    Err(Errno::EINTR) => continue,
                    Err(_) => out.push((pid, STOLEN)),
                }
                break;
            }
        }
        out
    }

    const STOLEN: Exit = Exit::Code(-1);

    fn supervisor() -> (Supervisor, Seen) {
        let seen: Seen = Rc::default();
        let s = seen.clone();
        let sink: Sink = Box::new(move |name, line| {
            s.borrow_mut().push((name.to_string(), line.to_string()));
        });
        (Supervisor::new(sink), seen)
    }

    fn policy(initial_ms: u64, max_ms: u64, factor: f64) -> RestartPolicy {
        RestartPolicy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            factor,
            reset_after: Duration::from_secs(10),
            give_up_after: None,
        }
    }

    fn sh(name: &str, script: &str, restart: RestartPolicy) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![],
            restart,
            stop_timeout: Duration::from_millis(100),
        }
    }

    fn state(sup: &Supervisor, name: &str) -> ServiceStatus {
        sup.status()
            .into_iter()
            .find(|s| s.name == name)
            .expect("service in status")
    }

    /// Polls and reaps until `done` holds; fails the test after `timeout`.
    fn drive(sup: &mut Supervisor, timeout: Duration, done: impl Fn(&Supervisor) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            sup.poll(Instant::now());
            for (pid, exit) in reap_pids(&sup.pids()) {
                sup.reaped(pid, exit);
            }
            if done(sup) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "condition not reached in {timeout:?}: {:?}",
                sup.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exit_is(exit: Option<Exit>, want: Exit) -> bool {
        exit == Some(want) || exit == Some(STOLEN)
    }

    /// Runs `script` once (the restart is a minute away) and returns the log.
    fn run_once(sup: &mut Supervisor, name: &str, script: &str) -> Vec<String> {
        sup.start(sh(name, script, policy(60_000, 60_000, 2.0)))
            .expect("start");
        drive(sup, Duration::from_secs(20), |s| {
            matches!(state(s, name).state, State::Backoff { .. })
        });
        sup.logs(name)
    }

    #[test]
    fn stdout_and_stderr_land_in_the_log_and_the_sink() {
        let (mut sup, seen) = supervisor();
        let mut log = run_once(&mut sup, "echo", "echo a; echo b >&2");
        log.sort();
        assert_eq!(log, ["a", "b"]);
        let mut sunk = seen.borrow().clone();
        sunk.sort();
        assert_eq!(
            sunk,
            [("echo".into(), "a".into()), ("echo".into(), "b".into())]
        );
        assert!(exit_is(state(&sup, "echo").last_exit, Exit::Code(0)));
        assert!(sup.logs("nope").is_empty());
    }

    #[test]
    fn children_start_with_no_blocked_signals_and_default_sigpipe() {
        // PID1 blocks every signal and Rust ignores SIGPIPE; neither may leak into services.
        let mask = nix::sys::signal::SigSet::all();
        mask.thread_block().expect("block");
        let (mut sup, _) = supervisor();
        let log = run_once(&mut sup, "sig", "grep -E '^Sig(Blk|Ign)' /proc/self/status");
        mask.thread_unblock().expect("unblock");
        let field = |name: &str| {
            let line = log.iter().find(|l| l.starts_with(name)).expect("field");
            u64::from_str_radix(line[name.len()..].trim(), 16).expect("hex")
        };
        assert_eq!(field("SigBlk:"), 0, "{log:?}");
        assert_eq!(field("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{log:?}");
    }

    #[test]
    fn a_failing_service_is_restarted_with_capped_exponential_backoff() {
        let (mut sup, _) = supervisor();
        sup.start(sh("fail", "exit 3", policy(50, 300, 2.0)))
            .expect("start");
        drive(&mut sup, Duration::from_secs(20), |s| {
            state(s, "fail").restarts >= 6
        });
        let st = state(&sup, "fail");
        assert!(exit_is(st.last_exit, Exit::Code(3)), "{st:?}");
        let gaps: Vec<Duration> = st.restart_times.windows(2).map(|w| w[1] - w[0]).collect();
        // Restart n+1 follows restart n by the run time plus delay(n+1).
        let want_ms = [100, 200, 300, 300, 300];
        assert!(gaps.len() >= want_ms.len(), "{gaps:?}");
        for (gap, want) in gaps.iter().zip(want_ms) {
            let want = Duration::from_millis(want);
            assert!(
                *gap >= want,
                "gap {gap:?} shorter than backoff {want:?}: {gaps:?}"
            );
            // Uncapped, the last gaps would be 800 ms and 1.6 s.
            assert!(
                *gap < want + Duration::from_millis(400),
                "gap {gap:?} not capped: {gaps:?}"
            );
        }
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let (mut sup, _) = supervisor();
        let mut p = policy(50, 10_000, 4.0);
        p.reset_after = Duration::from_millis(100);
        sup.start(sh("slow", "sleep 0.2; exit 1", p))
            .expect("start");
        drive(&mut sup, Duration::from_secs(20), |s| {
            state(s, "slow").restarts >= 4
        });
        let times = state(&sup, "slow").restart_times;
        for w in times.windows(2) {
            // Without the reset the third gap would be 0.2 s + 3.2 s.
            let gap = w[1] - w[0];
            assert!(
                gap < Duration::from_millis(1000),
                "backoff not reset: {times:?}"
            );
        }
    }

    #[test]
    fn the_log_keeps_the_newest_lines_within_its_bounds() {
        let (mut sup, seen) = supervisor();
        let script = "i=0; while [ $i -lt 1500 ]; do echo line$i; i=$((i+1)); done";
        let log = run_once(&mut sup, "chatty", script);
        assert_eq!(log.len(), LOG_LINES);
        assert_eq!(log.first().map(String::as_str), Some("line500"));
        assert_eq!(log.last().map(String::as_str), Some("line1499"));
        // The sink saw everything, the log only the newest.
        assert_eq!(seen.borrow().len(), 1500);

        let mut ring = Ring::default();
        for i in 0..300 {
            ring.push(format!("{i:04}{}", "x".repeat(1020)));
        }
        assert_eq!(ring.lines.len(), LOG_BYTES / 1024);
        assert!(ring.bytes <= LOG_BYTES);
        assert!(ring.lines.front().is_some_and(|l| l.starts_with("0044")));

        // An endless line is cut into bounded pieces.
        let script = "head -c 10000 /dev/zero | tr '\\0' x";
        let lens: Vec<usize> = run_once(&mut sup, "long", script)
            .iter()
            .map(String::len)
            .collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 10000 - 2 * MAX_LINE]);
    }

    #[test]
    fn stop_all_kills_what_ignores_sigterm_and_reports_stopped() {
        let (mut sup, _) = supervisor();
        for (name, script) in [
            ("stubborn", "trap '' TERM; echo ready; sleep 30"),
            ("polite", "echo ready; exec sleep 30"),
        ] {
            sup.start(sh(name, script, policy(50, 50, 1.0)))
                .expect("start");
        }
        // Signals only count once the trap is set.
        drive(&mut sup, Duration::from_secs(10), |s| {
            s.logs("stubborn") == ["ready"] && s.logs("polite") == ["ready"]
        });
        let pids = sup.pids();
        assert_eq!(pids.len(), 2);
        let t0 = Instant::now();
        let timeout = Duration::from_millis(300);
        let killed = sup.stop_all(timeout, &mut || reap_pids(&pids));
        let took = t0.elapsed();
        assert_eq!(killed, ["stubborn"]);
        assert!(took >= timeout, "SIGKILL before the timeout: {took:?}");
        assert!(took < Duration::from_secs(10), "stop took {took:?}");
        for st in sup.status() {
            assert_eq!(st.state, State::Stopped, "{st:?}");
        }
        let exit = |name| state(&sup, name).last_exit;
        assert!(exit_is(exit("stubborn"), Exit::Signal(Signal::SIGKILL)));
        assert!(exit_is(exit("polite"), Exit::Signal(Signal::SIGTERM)));
        // Stopped services are not restarted.
        sup.poll(Instant::now() + Duration::from_secs(60));
        assert!(sup.pids().is_empty());
    }

    #[test]
    fn status_follows_the_life_of_a_service() {
        let (mut sup, _) = supervisor();
        let mut p = policy(20, 20, 1.0);
        p.give_up_after = Some(2);
        sup.start(sh("flaky", "exit 3", p)).expect("start");
        assert_eq!(state(&sup, "flaky").state, State::Starting);
        sup.poll(Instant::now());
        // Running until the exit is reaped, however fast the process is.
        assert!(matches!(state(&sup, "flaky").state, State::Running { .. }));
        drive(&mut sup, Duration::from_secs(10), |s| {
            matches!(state(s, "flaky").state, State::Backoff { restarts: 0, .. })
        });
        drive(&mut sup, Duration::from_secs(10), |s| {
            matches!(state(s, "flaky").state, State::Failed(_))
        });
        let st = state(&sup, "flaky");
        assert_eq!(st.restarts, 2);
        assert!(
            matches!(st.state, State::Failed(e) if e == Exit::Code(3) || e == STOLEN),
            "{st:?}"
        );

        assert_eq!(
            sup.start(sh("flaky", "true", RestartPolicy::default())),
            Err(Error::Duplicate("flaky".into()))
        );
        let mut empty = sh("empty", "", RestartPolicy::default());
        empty.argv.clear();
        assert_eq!(sup.start(empty), Err(Error::EmptyArgv("empty".into())));

        let mut missing = sh("missing", "", policy(60_000, 60_000, 2.0));
        missing.argv = vec!["/nonexistent/basalt-test".into()];
        sup.start(missing).expect("start");
        sup.poll(Instant::now());
        let st = state(&sup, "missing");
        assert!(matches!(st.state, State::Backoff { .. }), "{st:?}");
        assert_eq!(st.last_exit, Some(Exit::SpawnFailed));
        assert!(sup.logs("missing")[0].starts_with("spawn /nonexistent/basalt-test"));

        assert!(sup
            .stop_all(Duration::from_millis(100), &mut Vec::new)
            .is_empty());
        assert_eq!(state(&sup, "missing").state, State::Stopped);
        assert!(matches!(state(&sup, "flaky").state, State::Failed(_)));
    }

    #[test]
    fn backoff_delays_grow_by_the_factor_up_to_the_cap() {
        let p = policy(100, 1000, 3.0);
        let got: Vec<u128> = (1..=5).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(got, [100, 300, 900, 1000, 1000]);
        assert_eq!(policy(100, 1000, 2.0).delay(10_000).as_millis(), 1000);
    }
}
