//! Reaping: PID1 inherits every orphan and must collect each exit, or zombies pile up.

use crate::pid1::supervise::Exit;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Reaps every exited child without blocking and returns the exits (orphans included).
pub fn reap() -> Vec<(Pid, Exit)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return out,
            Ok(status) => out.extend(Exit::from_wait(status)),
            Err(Errno::EINTR) => continue,
            // ECHILD: nothing left; anything else: stop for now, SIGCHLD comes again.
            Err(_) => return out,
        }
    }
}
