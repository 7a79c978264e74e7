use super::capture::MAX_LINE;
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

#[test]
fn restart_now_starts_a_running_or_waiting_service_again_at_once() {
    let (mut sup, _) = supervisor();
    assert!(!sup.restart_now("nobody"));
    // Running: SIGTERM, then spawned again without the minute of backoff.
    sup.start(sh(
        "long",
        "echo run; exec sleep 60",
        policy(60_000, 60_000, 2.0),
    ))
    .expect("start");
    drive(&mut sup, Duration::from_secs(10), |s| {
        s.logs("long").len() == 1
    });
    let first = match state(&sup, "long").state {
        State::Running { pid, .. } => pid,
        other => panic!("not running: {other:?}"),
    };
    assert!(sup.restart_now("long"));
    drive(&mut sup, Duration::from_secs(10), |s| {
        matches!(state(s, "long").state, State::Running { pid, .. } if pid != first)
            && s.logs("long").len() == 2
    });
    let st = state(&sup, "long");
    assert_eq!(st.restarts, 0, "not counted as a supervisor restart");
    assert!(st.restart_times.is_empty());
    assert!(
        matches!(st.last_exit, Some(Exit::Signal(Signal::SIGTERM))) || st.last_exit == Some(STOLEN),
        "{st:?}"
    );

    // Waiting out a minute of backoff: spawned by the next poll.
    let log = run_once(&mut sup, "once", "echo ran");
    assert_eq!(log, ["ran"]);
    assert!(sup.restart_now("once"));
    assert_eq!(state(&sup, "once").state, State::Starting);
    drive(&mut sup, Duration::from_secs(10), |s| {
        s.logs("once").len() == 2
    });
    let pids = sup.pids();
    let _ = sup.stop_all(Duration::from_millis(300), &mut || reap_pids(&pids));
    assert!(!sup.restart_now("long"), "a stopped table restarts nothing");
}

#[test]
fn the_last_exit_line_is_the_exited_runs_not_the_next_runs_first() {
    let (mut sup, _) = supervisor();
    // Each run writes a first line, waits, then a last line and fails: once the next
    // run has started and written its first line, the log's last line is that one.
    sup.start(sh(
        "loop",
        "echo starting; sleep 0.2; echo refused >&2; exit 1",
        policy(10, 10, 1.0),
    ))
    .expect("start");
    drive(&mut sup, Duration::from_secs(20), |s| {
        state(s, "loop").restarts >= 1
            && matches!(state(s, "loop").state, State::Running { .. })
            && s.logs("loop").last().map(String::as_str) == Some("starting")
    });
    let st = state(&sup, "loop");
    assert_eq!(st.last_exit_line.as_deref(), Some("refused"), "{st:?}");
    assert!(exit_is(st.last_exit, Exit::Code(1)), "{st:?}");
}
