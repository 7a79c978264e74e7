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

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

mod capture;

use capture::{Ring, Stream};
pub use capture::{LOG_BYTES, LOG_LINES};

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
    /// The last line the exited process wrote: what a crash loop is explained by, even
    /// once the next run has written lines of its own.
    pub last_exit_line: Option<String>,
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
    last_exit_line: Option<String>,
    restart_times: VecDeque<Instant>,
    /// Set by `stop_all`: an exit then means Stopped, not a restart.
    stopping: bool,
    /// Set by `restart_now`: the next exit starts the service again at once.
    restart_now: bool,
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
        if std::mem::take(&mut self.restart_now) {
            self.failures = 0;
            self.state = State::Starting;
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
            last_exit_line: None,
            restart_times: VecDeque::new(),
            stopping: false,
            restart_now: false,
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
        svc.last_exit_line = svc.log.lines.back().cloned();
        let since = match svc.state {
            State::Running { since, .. } => since,
            _ => now,
        };
        svc.exited(exit, since, now);
        true
    }

    /// Starts `name` again now, for a caller that changed what it runs with: a running
    /// service gets SIGTERM (to its process group) and is spawned again by the first
    /// [`poll`](Self::poll) after its exit; one waiting in backoff, or given up on, is
    /// spawned by the next poll. The backoff starts over. Not a supervisor restart: it is
    /// not counted in `restarts` nor `restart_times`. False for an unknown service or
    /// one being stopped.
    pub fn restart_now(&mut self, name: &str) -> bool {
        let Some(svc) = self.services.iter_mut().find(|s| s.spec.name == name) else {
            return false;
        };
        if svc.stopping {
            return false;
        }
        match svc.state {
            State::Running { pid, .. } => {
                svc.restart_now = true;
                let _ = killpg(pid, Signal::SIGTERM);
            }
            State::Backoff { .. } | State::Failed(_) | State::Stopped => {
                svc.failures = 0;
                svc.state = State::Starting;
            }
            State::Starting => {}
        }
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
                last_exit_line: s.last_exit_line.clone(),
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
mod tests;
