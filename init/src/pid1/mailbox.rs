//! The way from API threads to PID1's main loop, which alone owns the [`Supervisor`]
//! (it is not `Send`, and only the main loop reaps). A thread sends a [`Command`] with a
//! reply channel and wakes the loop; the loop answers between two signal waits.

use crate::pid1::supervise::{Exit, ServiceSpec, State, Supervisor};
use basalt_api::node::ServiceInfo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a thread waits for the main loop's answer. The loop answers within
/// milliseconds unless it is shutting down.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Starting a service forks and execs in the loop; give it longer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the main loop is asked to do.
pub enum Command {
    /// The supervisor's services.
    Services(Sender<Vec<ServiceInfo>>),
    /// A service's captured lines from sequence number `from` on (all that are kept
    /// when `None`); `None` in the reply for an unknown service.
    Logs {
        service: String,
        from: Option<u64>,
        reply: Sender<Option<LogChunk>>,
    },
    /// Adds a service (unless one of that name exists) and spawns it at once; the reply
    /// says whether it runs.
    Start {
        spec: ServiceSpec,
        reply: Sender<Result<(), StartError>>,
    },
    /// One service's state and its last captured line, `None` for an unknown service.
    Service {
        name: String,
        reply: Sender<Option<ServiceRun>>,
    },
    /// Starts a service again now ([`Supervisor::restart_now`]); the reply says whether
    /// the service is known.
    Restart { name: String, reply: Sender<bool> },
    /// Stop everything and power off or reboot (the caller has answered its client).
    Power(Power),
}

/// One service as [`Command::Service`] reports it, its times as ages (an `Instant`
/// means nothing to the caller's clock reading, an age does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRun {
    /// How long the current process has run; `None` when none runs.
    pub running_for: Option<Duration>,
    /// The age of each supervisor restart kept, oldest first.
    pub restart_ages: Vec<Duration>,
    pub last_exit: Option<Exit>,
    /// The last line the service wrote.
    pub last_line: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Reboot,
    PowerOff,
}

/// Lines of one service's log and the sequence number of the next line to come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub lines: Vec<String>,
    pub next: u64,
}

/// Why a started service does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// Not taken under supervision (or the main loop did not answer).
    #[error("{0}")]
    Refused(String),
    /// Under supervision, but not running now (it could not be spawned, or exited):
    /// the supervisor restarts it with backoff.
    #[error("{0}")]
    NotRunning(String),
}

/// The main loop did not answer (it is shutting down, or gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("PID1's main loop did not answer")]
pub struct Unavailable;

/// Wakes the main loop out of its signal wait.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The API threads' handle on the main loop.
#[derive(Clone)]
pub struct Control {
    tx: Sender<Command>,
    wake: Waker,
}

impl Control {
    /// A handle and the receiving end, which the main loop drains with [`handle`].
    pub fn new(wake: Waker) -> (Control, Receiver<Command>) {
        let (tx, rx) = mpsc::channel();
        (Control { tx, wake }, rx)
    }

    fn call<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(Sender<T>) -> Command,
    ) -> Result<T, Unavailable> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(make(tx)).map_err(|_| Unavailable)?;
        (self.wake)();
        rx.recv_timeout(timeout).map_err(|_| Unavailable)
    }

    pub fn services(&self) -> Result<Vec<ServiceInfo>, Unavailable> {
        self.call(CALL_TIMEOUT, Command::Services)
    }

    pub fn logs(&self, service: &str, from: Option<u64>) -> Result<Option<LogChunk>, Unavailable> {
        self.call(CALL_TIMEOUT, |reply| Command::Logs {
            service: service.to_owned(),
            from,
            reply,
        })
    }

    /// Starts `spec` under supervision; `Err` says why it does not run. Idempotent: a
    /// service of that name already there is reported on, not started twice.
    pub fn start(&self, spec: ServiceSpec) -> Result<(), StartError> {
        self.call(START_TIMEOUT, |reply| Command::Start { spec, reply })
            .unwrap_or_else(|e| Err(StartError::Refused(e.to_string())))
    }

    /// `name`'s state, `None` for an unknown service.
    pub fn service(&self, name: &str) -> Result<Option<ServiceRun>, Unavailable> {
        self.call(CALL_TIMEOUT, |reply| Command::Service {
            name: name.to_owned(),
            reply,
        })
    }

    /// Starts `name` again now; `Ok(false)` for an unknown service.
    pub fn restart(&self, name: &str) -> Result<bool, Unavailable> {
        self.call(CALL_TIMEOUT, |reply| Command::Restart {
            name: name.to_owned(),
            reply,
        })
    }

    /// Asks for a power-off or reboot; returns at once.
    pub fn power(&self, power: Power) -> Result<(), Unavailable> {
        self.tx
            .send(Command::Power(power))
            .map_err(|_| Unavailable)?;
        (self.wake)();
        Ok(())
    }
}

/// How many lines each service has written since boot, counted by the supervisor's
/// sink: with the supervisor's bounded log this numbers every kept line, so a follower
/// asks for "from line n on". Never panics: a re-entrant use is skipped, not fatal.
#[derive(Debug, Default)]
pub struct LineCounts(RefCell<HashMap<String, u64>>);

impl LineCounts {
    pub fn add(&self, service: &str) {
        if let Ok(mut map) = self.0.try_borrow_mut() {
            *map.entry(service.to_owned()).or_default() += 1;
        }
    }

    pub fn get(&self, service: &str) -> u64 {
        self.0
            .try_borrow()
            .ok()
            .and_then(|m| m.get(service).copied())
            .unwrap_or(0)
    }
}

/// Answers one command in the main loop; a power request is returned for the loop to
/// carry out (it owns the shutdown sequence).
pub fn handle(cmd: Command, sup: &mut Supervisor, counts: &LineCounts) -> Option<Power> {
    // A requester that gave up has dropped its receiver; the send error means nothing.
    match cmd {
        Command::Services(reply) => {
            let _ = reply.send(services(sup));
        }
        Command::Logs {
            service,
            from,
            reply,
        } => {
            let _ = reply.send(logs(sup, counts, &service, from));
        }
        Command::Start { spec, reply } => {
            let _ = reply.send(start(sup, spec));
        }
        Command::Service { name, reply } => {
            let _ = reply.send(service_run(sup, &name, Instant::now()));
        }
        Command::Restart { name, reply } => {
            let known = sup.restart_now(&name);
            // Spawns at once what is due (a service that was not running).
            sup.poll(Instant::now());
            let _ = reply.send(known);
        }
        Command::Power(p) => return Some(p),
    }
    None
}

fn services(sup: &Supervisor) -> Vec<ServiceInfo> {
    sup.status()
        .into_iter()
        .map(|s| ServiceInfo {
            name: s.name,
            state: state_name(&s.state).into(),
            restarts: s.restarts,
            last_exit: s.last_exit.map(exit_text),
        })
        .collect()
}

fn service_run(sup: &Supervisor, name: &str, now: Instant) -> Option<ServiceRun> {
    let s = sup.status().into_iter().find(|s| s.name == name)?;
    Some(ServiceRun {
        running_for: match s.state {
            State::Running { since, .. } => Some(now.saturating_duration_since(since)),
            _ => None,
        },
        restart_ages: s
            .restart_times
            .iter()
            .map(|t| now.saturating_duration_since(*t))
            .collect(),
        last_exit: s.last_exit,
        // The exited run's last line: by the time a crash loop is reported, the next run
        // may already have written its first lines.
        last_line: s.last_exit_line.or_else(|| sup.logs(name).pop()),
    })
}

fn logs(
    sup: &Supervisor,
    counts: &LineCounts,
    service: &str,
    from: Option<u64>,
) -> Option<LogChunk> {
    if !sup.status().iter().any(|s| s.name == service) {
        return None;
    }
    let kept = sup.logs(service);
    let total = counts.get(service).max(kept.len() as u64);
    // Sequence number of the oldest kept line.
    let first = total - kept.len() as u64;
    let skip = from.map_or(0, |f| f.saturating_sub(first).min(kept.len() as u64)) as usize;
    Some(LogChunk {
        lines: kept.into_iter().skip(skip).collect(),
        next: total,
    })
}

fn start(sup: &mut Supervisor, spec: ServiceSpec) -> Result<(), StartError> {
    let name = spec.name.clone();
    if !sup.status().iter().any(|s| s.name == name) {
        sup.start(spec)
            .map_err(|e| StartError::Refused(e.to_string()))?;
        sup.poll(Instant::now());
    }
    let status = sup.status();
    match status.iter().find(|s| s.name == name).map(|s| &s.state) {
        Some(State::Running { .. }) => Ok(()),
        state => Err(StartError::NotRunning(
            sup.logs(&name).pop().unwrap_or_else(|| {
                format!("service {name} is {}", state.map_or("gone", state_name))
            }),
        )),
    }
}

/// The supervisor's state as the API names it.
pub fn state_name(state: &State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Running { .. } => "running",
        State::Backoff { .. } => "backoff",
        State::Stopped => "stopped",
        State::Failed(_) => "failed",
    }
}

/// `exit 1`, `signal 9`, `spawn failed`.
pub fn exit_text(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit {c}"),
        Exit::Signal(s) => format!("signal {}", s as i32),
        Exit::SpawnFailed => "spawn failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid1::supervise::RestartPolicy;
    use std::rc::Rc;

    fn sh(name: &str, script: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![],
            restart: RestartPolicy {
                initial: Duration::from_secs(60),
                ..RestartPolicy::default()
            },
            stop_timeout: Duration::from_millis(100),
        }
    }

    fn supervisor(counts: &Rc<LineCounts>) -> Supervisor {
        let c = counts.clone();
        Supervisor::new(Box::new(move |name, _| c.add(name)))
    }

    /// Polls until the service's output is in (the test does not reap: it only reads).
    fn wait_lines(sup: &mut Supervisor, name: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while sup.logs(name).len() < n {
            assert!(Instant::now() < deadline, "{:?}", sup.logs(name));
            sup.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn start_runs_the_service_and_logs_are_numbered_for_followers() {
        let counts = Rc::new(LineCounts::default());
        let mut sup = supervisor(&counts);
        let (tx, rx) = mpsc::channel();
        let cmd = Command::Start {
            spec: sh("svc", "echo one; echo two; sleep 0.2; echo three; sleep 5"),
            reply: tx,
        };
        assert_eq!(handle(cmd, &mut sup, &counts), None);
        assert_eq!(rx.recv().expect("reply"), Ok(()));
        // Started again: reported on, not spawned twice.
        assert_eq!(start(&mut sup, sh("svc", "exit 9")), Ok(()));
        assert_eq!(sup.pids().len(), 1);
        wait_lines(&mut sup, "svc", 2);
        let all = logs(&sup, &counts, "svc", None).expect("known");
        assert_eq!(all.lines[..2], ["one", "two"]);
        let next = all.next;
        wait_lines(&mut sup, "svc", 3);
        let more = logs(&sup, &counts, "svc", Some(next)).expect("known");
        assert_eq!(more.lines, ["three"]);
        assert_eq!(more.next, 3);
        assert_eq!(
            logs(&sup, &counts, "svc", Some(3))
                .expect("known")
                .lines
                .len(),
            0
        );
        assert_eq!(logs(&sup, &counts, "nope", None), None);
        let infos = services(&sup);
        assert_eq!(infos[0].name, "svc");
        assert_eq!(infos[0].state, "running");
        kill_all(&sup);
    }

    #[test]
    fn a_service_that_cannot_start_is_reported_with_the_reason() {
        let counts = Rc::new(LineCounts::default());
        let mut sup = supervisor(&counts);
        let mut spec = sh("missing", "");
        spec.argv = vec!["/nonexistent/basalt-agent".into()];
        let err = start(&mut sup, spec.clone()).expect_err("cannot run");
        assert!(
            matches!(&err, StartError::NotRunning(e) if e.contains("/nonexistent/basalt-agent")),
            "{err:?}"
        );
        // Asked again: the same answer, and still one service.
        assert_eq!(start(&mut sup, spec.clone()), Err(err));
        assert_eq!(sup.status().len(), 1);
        spec.name = "empty".into();
        spec.argv.clear();
        assert!(matches!(start(&mut sup, spec), Err(StartError::Refused(_))));
    }

    fn kill_all(sup: &Supervisor) {
        for pid in sup.pids() {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }

    #[test]
    fn lines_dropped_from_the_log_are_skipped_not_repeated() {
        let counts = Rc::new(LineCounts::default());
        let mut sup = supervisor(&counts);
        start(&mut sup, sh("svc", "echo a; echo b; sleep 5")).expect("runs");
        wait_lines(&mut sup, "svc", 2);
        // As if eight older lines had left the bounded log already: a, b are 8 and 9.
        for _ in 0..8 {
            counts.add("svc");
        }
        let all = logs(&sup, &counts, "svc", None).expect("known");
        assert_eq!(all.lines, ["a", "b"]);
        assert_eq!(all.next, 10);
        let lost = logs(&sup, &counts, "svc", Some(3)).expect("known");
        assert_eq!(lost.lines, ["a", "b"]);
        let last = logs(&sup, &counts, "svc", Some(9)).expect("known");
        assert_eq!(last.lines, ["b"]);
        assert_eq!(counts.get("other"), 0);
        assert_eq!(exit_text(Exit::Code(1)), "exit 1");
        assert_eq!(
            exit_text(Exit::Signal(nix::sys::signal::Signal::SIGKILL)),
            "signal 9"
        );
        kill_all(&sup);
    }

    #[test]
    fn power_goes_back_to_the_loop_and_calls_fail_when_it_is_gone() {
        let (control, rx) = Control::new(Arc::new(|| {}));
        control.power(Power::Reboot).expect("queued");
        let counts = LineCounts::default();
        let mut sup = Supervisor::new(Box::new(|_, _| {}));
        let cmd = rx.recv().expect("command");
        assert_eq!(handle(cmd, &mut sup, &counts), Some(Power::Reboot));
        drop(rx);
        assert_eq!(control.services(), Err(Unavailable));
        assert!(control.start(sh("a", "true")).is_err());
    }
}
