//! Reaping: PID1 inherits every orphan and must collect each exit, or zombies pile up.
//!
//! The main loop reaps with `waitpid(-1)`, so a thread that starts a child of its own and
//! wants its exit would race it. Such a thread starts the child with [`spawn_claimed`]:
//! whichever of the two reaps the child, the exit reaches the thread
//! ([`Claimed::try_exit`]).

use crate::pid1::supervise::Exit;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// Children whose exit a thread waits for, and where to send it.
static CLAIMS: Mutex<Vec<(Pid, Sender<Exit>)>> = Mutex::new(Vec::new());

/// Reaps every exited child without blocking and returns the exits (orphans included).
/// A claimed child's exit also goes to its claimant. It reaps under the claims' lock,
/// which [`spawn_claimed`] holds while it spawns: std's spawn itself waits for a child
/// whose exec failed, and panics if `waitpid(-1)` took that child first.
pub fn reap() -> Vec<(Pid, Exit)> {
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return out,
            Ok(status) => {
                if let Some((pid, exit)) = Exit::from_wait(status) {
                    hand_over(&mut claims, pid, exit);
                    out.push((pid, exit));
                }
            }
            Err(Errno::EINTR) => continue,
            // ECHILD: nothing left; anything else: stop for now, SIGCHLD comes again.
            Err(_) => return out,
        }
    }
}

/// Sends a reaped child's exit to the thread that claimed it, if one did.
fn hand_over(claims: &mut Vec<(Pid, Sender<Exit>)>, pid: Pid, exit: Exit) {
    if let Some(i) = claims.iter().position(|(p, _)| *p == pid) {
        let (_, to) = claims.swap_remove(i);
        let _ = to.send(exit);
    }
}

/// A child started by [`spawn_claimed`]. Dropping it gives up the claim (the child is
/// neither killed nor waited for).
pub struct Claimed {
    pub child: Child,
    exit: Receiver<Exit>,
}

/// How a claimed child ended, as far as can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exit(Exit),
    /// Reaped by someone that did not say how (not PID1's main loop, which always does).
    Unknown,
}

/// Spawns `cmd` and claims its exit. The claim is made under the same lock the reaper
/// hands exits over with, so even a child that ends at once is not missed.
pub fn spawn_claimed(cmd: &mut Command) -> std::io::Result<Claimed> {
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    let (to, exit) = mpsc::channel();
    claims.push((pid_of(&child), to));
    Ok(Claimed { child, exit })
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

impl Claimed {
    pub fn pid(&self) -> Pid {
        pid_of(&self.child)
    }

    /// The child's end once it has ended, without blocking (beyond a short wait for the
    /// main loop's hand-over when it reaped the child first).
    pub fn try_exit(&self) -> Option<Ended> {
        loop {
            match waitpid(self.pid(), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return None,
                Ok(status) => return Exit::from_wait(status).map(|(_, e)| Ended::Exit(e)),
                Err(Errno::EINTR) => continue,
                // ECHILD: reaped already, by the main loop, which sends the exit.
                Err(_) => {
                    return Some(
                        self.exit
                            .recv_timeout(Duration::from_secs(1))
                            .map_or(Ended::Unknown, Ended::Exit),
                    )
                }
            }
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let pid = self.pid();
        CLAIMS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(p, _)| *p != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ended(c: &Claimed) -> Ended {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = c.try_exit() {
                return e;
            }
            assert!(Instant::now() < deadline, "the child did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn claimed(pid: Pid) -> bool {
        CLAIMS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(p, _)| *p == pid)
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn the_claimant_reaps_its_own_child() {
        let c = spawn_claimed(&mut sh("exit 3")).expect("spawn");
        let pid = c.pid();
        assert!(claimed(pid));
        assert_eq!(ended(&c), Ended::Exit(Exit::Code(3)));
        drop(c);
        assert!(!claimed(pid), "the claim goes with it");
    }

    #[test]
    fn an_exit_the_main_loop_reaped_reaches_the_claimant() {
        let c = spawn_claimed(&mut sh("exit 7")).expect("spawn");
        // What the main loop does for this pid (reap() itself would take every test's
        // children): waitpid, then the hand-over.
        let status = waitpid(c.pid(), None).expect("waitpid");
        let (pid, exit) = Exit::from_wait(status).expect("an exit");
        hand_over(&mut CLAIMS.lock().expect("claims"), pid, exit);
        assert_eq!(c.try_exit(), Some(Ended::Exit(Exit::Code(7))));
        assert!(!claimed(c.pid()), "handed over, the claim is gone");
    }

    #[test]
    fn a_running_child_has_no_exit_yet() {
        let mut c = spawn_claimed(&mut sh("sleep 5")).expect("spawn");
        assert_eq!(c.try_exit(), None);
        c.child.kill().expect("kill");
        assert_eq!(
            ended(&c),
            Ended::Exit(Exit::Signal(nix::sys::signal::SIGKILL))
        );
    }
}
