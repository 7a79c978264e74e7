//! PID1's main loop, where it spends the node's life: signals one at a time, reaping,
//! the supervisor's timers and output, and the commands other threads send through the
//! mailbox.

use crate::pid1::console;
use crate::pid1::mailbox::{self, Command, LineCounts, Power};
use crate::pid1::reap::reap;
use crate::pid1::shutdown::shutdown;
use crate::pid1::supervise::Supervisor;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, SigSet, Signal};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// An API thread has queued a command: SIGUSR1 ends the main loop's signal wait. Only
/// the main thread takes signals (all are blocked everywhere, and it waits for them).
pub fn wake_main_loop() {
    let _ = kill(nix::unistd::getpid(), Signal::SIGUSR1);
}

/// PID1's loop: signals one at a time, reaping (every exit also goes to the supervisor),
/// the supervisor's timers and output, and the node API's commands (which wake it with
/// SIGUSR1). Returns only through shutdown.
pub fn serve(
    all: &SigSet,
    supervisor: &mut Supervisor,
    commands: &Receiver<Command>,
    counts: &LineCounts,
) -> ! {
    let mut restarts: Vec<u32> = Vec::new();
    loop {
        while let Ok(cmd) = commands.try_recv() {
            match mailbox::handle(cmd, supervisor, counts) {
                Some(Power::Reboot) => shutdown(supervisor, RebootMode::RB_AUTOBOOT),
                Some(Power::PowerOff) => shutdown(supervisor, RebootMode::RB_POWER_OFF),
                None => {}
            }
        }
        let now = Instant::now();
        let next_restart = supervisor.poll(now);
        report_restarts(supervisor, &mut restarts);
        // While services run, come back often enough to move their output along.
        let mut wait = if supervisor.pids().is_empty() {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(100)
        };
        if let Some(at) = next_restart {
            wait = wait.min(at.saturating_duration_since(now));
        }
        match wait_signal(all, wait) {
            Some(Signal::SIGCHLD) => {
                for (pid, exit) in reap() {
                    if supervisor.reaped(pid, exit) {
                        console::info(&format!("service exit: pid {pid}, {exit:?}"));
                    }
                }
            }
            Some(Signal::SIGTERM) | Some(Signal::SIGPWR) => {
                shutdown(supervisor, RebootMode::RB_POWER_OFF)
            }
            Some(Signal::SIGINT) => shutdown(supervisor, RebootMode::RB_AUTOBOOT),
            Some(_) | None => {}
        }
    }
}

/// Reports each restart the supervisor makes, with its count.
fn report_restarts(supervisor: &Supervisor, seen: &mut Vec<u32>) {
    let status = supervisor.status();
    seen.resize(status.len(), 0);
    for (s, last) in status.iter().zip(seen.iter_mut()) {
        if s.restarts > *last {
            *last = s.restarts;
            console::info(&format!(
                "service {} restarted (restart {}, last exit {:?})",
                s.name, s.restarts, s.last_exit
            ));
        }
    }
}

/// sigtimedwait(2) over `set`: the signal, or `None` when `timeout` passes (or on EINTR).
/// nix wraps only the untimed sigwait.
fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` is a valid sigset for the call's duration, `ts` a valid timespec, and
    // a null siginfo pointer is allowed.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if n <= 0 {
        return None;
    }
    Signal::try_from(n).ok()
}
