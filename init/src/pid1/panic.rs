//! What a panic in PID1 does. Release builds abort on panic, and PID1 exiting is a
//! kernel panic with no explanation, so the hook logs the panic and reboots on purpose,
//! the same orderly way an API reboot does: services stopped, STATE unmounted.
//!
//! - A thread other than the main loop's (an API connection, the join worker, the
//!   console): the main loop is asked to reboot, as the API's reboot asks it, and the
//!   panicking thread waits in the hook (the process only aborts once the hook returns,
//!   and it never does). If the main loop has not rebooted within [`ORDERLY_WAIT`] (it may
//!   wait on a lock the panicking thread holds), the hook shuts down by itself.
//! - The main loop's thread, or before the main loop runs (stage 1, stage 2's boot):
//!   nobody else can stop the services, so the hook does: every process gets SIGTERM,
//!   then SIGKILL, STATE is synced and unmounted, then the reboot
//!   ([`shutdown::emergency`]).

use crate::pid1::console;
use crate::pid1::mailbox::{Control, Power};
use crate::pid1::shutdown::{self, STOP_GRACE};
use nix::sys::reboot::RebootMode;
use std::sync::OnceLock;
use std::thread::ThreadId;
use std::time::Duration;

/// How long a panicking thread waits for the main loop's orderly reboot: the loop's
/// shutdown waits at most twice [`STOP_GRACE`] for processes, then syncs and unmounts.
pub const ORDERLY_WAIT: Duration = Duration::from_secs(2 * STOP_GRACE.as_secs() + 10);

/// The main loop's handle and thread, once it runs.
static MAIN_LOOP: OnceLock<(Control, ThreadId)> = OnceLock::new();

/// Called on the main loop's thread as it takes over: from here on a panic elsewhere is
/// handed to the main loop.
pub fn register_main_loop(control: Control) {
    let _ = MAIN_LOOP.set((control, std::thread::current().id()));
}

/// What the hook does, apart from logging.
pub(crate) trait Env {
    /// Asks the main loop for an orderly reboot; `false` if it cannot be asked.
    fn ask_main_loop(&self) -> bool;
    /// Waits for the main loop's reboot to take the node down.
    fn wait(&self, how_long: Duration);
    /// Shuts down without the main loop.
    fn emergency(&self) -> !;
}

/// The hook's decision: `on_main_thread` is whether the panicking thread is the main
/// loop's; `main_loop` whether one runs.
pub(crate) fn handle(env: &dyn Env, main_loop: bool, on_main_thread: bool) -> ! {
    if main_loop && !on_main_thread && env.ask_main_loop() {
        console::warn("panic: rebooting through the main loop (services stopped, STATE unmounted)");
        env.wait(ORDERLY_WAIT);
        console::warn("panic: the main loop did not reboot; shutting down from the hook");
    }
    env.emergency()
}

struct Real<'a>(Option<&'a Control>);

impl Env for Real<'_> {
    fn ask_main_loop(&self) -> bool {
        self.0.is_some_and(|c| c.power(Power::Reboot).is_ok())
    }

    fn wait(&self, how_long: Duration) {
        std::thread::sleep(how_long);
    }

    fn emergency(&self) -> ! {
        shutdown::emergency(RebootMode::RB_AUTOBOOT)
    }
}

/// Installs the hook: log the panic, then reboot in order (see the module's comment).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        console::log(console::Level::Error, &format!("panic: {info}; rebooting"));
        let main = MAIN_LOOP.get();
        let here = std::thread::current().id();
        let on_main_thread = main.is_some_and(|(_, id)| *id == here);
        handle(&Real(main.map(|(c, _)| c)), main.is_some(), on_main_thread)
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid1::mailbox::Command;
    use std::sync::{Arc, Mutex};

    /// Records the hook's steps; its emergency shutdown ends the thread with a panic
    /// (the test runs `handle` in a thread of its own and expects that end).
    #[derive(Default)]
    struct Recording {
        steps: Mutex<Vec<String>>,
        main_loop_answers: bool,
    }

    impl Env for Recording {
        fn ask_main_loop(&self) -> bool {
            self.steps.lock().expect("lock").push("ask".into());
            self.main_loop_answers
        }
        fn wait(&self, how_long: Duration) {
            self.steps
                .lock()
                .expect("lock")
                .push(format!("wait {}s", how_long.as_secs()));
        }
        fn emergency(&self) -> ! {
            self.steps.lock().expect("lock").push("emergency".into());
            panic!("emergency shutdown");
        }
    }

    fn steps(main_loop_answers: bool, main_loop: bool, on_main_thread: bool) -> Vec<String> {
        let env = Arc::new(Recording {
            main_loop_answers,
            ..Recording::default()
        });
        let e = Arc::clone(&env);
        let ended = std::thread::spawn(move || {
            handle(e.as_ref(), main_loop, on_main_thread);
        })
        .join();
        assert!(ended.is_err(), "handle returned");
        let steps = env.steps.lock().expect("lock").clone();
        steps
    }

    #[test]
    fn a_panic_off_the_main_thread_asks_the_main_loop_and_falls_back_after_a_bound() {
        assert_eq!(
            steps(true, true, false),
            [
                "ask",
                &format!("wait {}s", ORDERLY_WAIT.as_secs()),
                "emergency"
            ]
        );
        assert!(ORDERLY_WAIT > 2 * STOP_GRACE, "the loop's shutdown fits");
    }

    #[test]
    fn the_main_thread_or_no_main_loop_shuts_down_from_the_hook() {
        assert_eq!(steps(true, true, true), ["emergency"]);
        assert_eq!(steps(true, false, false), ["emergency"]);
        // A main loop that cannot be asked (its receiver gone) is not waited for.
        assert_eq!(steps(false, true, false), ["ask", "emergency"]);
    }

    #[test]
    fn the_real_request_is_the_api_reboot_through_the_mailbox() {
        let woken = Arc::new(Mutex::new(0));
        let w = Arc::clone(&woken);
        let (control, commands) = Control::new(Arc::new(move || *w.lock().expect("lock") += 1));
        assert!(Real(Some(&control)).ask_main_loop());
        assert!(matches!(
            commands.try_recv(),
            Ok(Command::Power(Power::Reboot))
        ));
        assert_eq!(*woken.lock().expect("lock"), 1);
        drop(commands);
        assert!(!Real(Some(&control)).ask_main_loop(), "loop gone");
        assert!(!Real(None).ask_main_loop());
    }
}
