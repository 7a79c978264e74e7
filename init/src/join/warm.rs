//! Warming a promotion's path in standby: the CA check run once, end to end, against a
//! throwaway TLS server on the loopback ([`basalt_api::k3s::warm_up`]).
//!
//! Under QEMU's TCG the first CA check of a process costs several times a second one
//! against the same server: the TLS client, the key exchange, the signature checks and
//! the X.509 code run for the first time, and TCG translates each block of it on its
//! first execution (BENCHMARKS.md, issue 15 item 2). Reading PID1's binary into the page
//! cache (this module's first version, `join-warm`) did not help, since it runs nothing.
//! This runs the very code the promotion's check runs, once K3s's preparation is done,
//! in a thread at low priority; it also makes the check's client configuration, which
//! every later check reuses. Its failure only leaves the promotion slower: it is printed,
//! never fatal.

use crate::pid1::console;

/// The step's name in the boot timeline (`[basalt] step check-warm …`).
pub const STEP: &str = "check-warm";
/// The thread's nice value: below the boot's and the node API's (0).
const NICE: libc::c_int = 10;

/// Starts the warm-up in a thread of its own at nice [`NICE`].
pub fn spawn() {
    let spawned = std::thread::Builder::new().name(STEP.into()).spawn(|| {
        let tid = nix::unistd::gettid().as_raw() as libc::id_t;
        // SAFETY: setpriority with PRIO_PROCESS and a thread id sets that thread's
        // nice value only; it reads and writes no memory of ours.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) } != 0 {
            console::warn(&format!(
                "{STEP}: nice {NICE}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let warmed = console::timed(STEP, || basalt_api::k3s::warm_up(super::CHECK_TIMEOUT));
        match warmed {
            Ok(times) => console::info(&format!(
                "{STEP}: the CA check ran against a loopback server (ms: {})",
                times.describe()
            )),
            Err(e) => console::warn(&format!(
                "{STEP}: {} (a promotion's check runs cold)",
                console::chain(&e)
            )),
        }
    });
    if let Err(e) = spawned {
        console::warn(&format!("{STEP}: start its thread: {e}"));
    }
}
