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
//!
//! The same thread then rehearses the promotion's own preparation beside its check
//! (`prepare-warm`): the node's address read, and K3s's config rendered from a config with
//! a `[cluster]` and written aside on tmpfs, then removed.
//!
//! Then, for as long as the node is in standby, the same thread fetches and checks the CA
//! of each server the config names in `standby.servers` ([`set_servers`]), and again every
//! [`REFRESH`] ([`basalt_api::k3s::prefetch_server_ca`]): a promotion into one of them
//! sends its request on the connection the prefetch left open (or resumes its TLS
//! session if the server closed it) and finds the certificate work done, so its check is
//! one round trip (the floor issue 15 sets). The check itself is still made, in full, against
//! what the server sends at the promotion.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::pid1::console;

/// The step's name in the boot timeline (`[basalt] step check-warm …`).
pub const STEP: &str = "check-warm";
/// The thread's nice value: below the boot's and the node API's (0).
const NICE: libc::c_int = 10;

/// Starts the warm-up in a thread of its own at nice [`NICE`].
pub fn spawn() {
    let spawned = std::thread::Builder::new().name(STEP.into()).spawn(|| {
        if let Err(e) = nice_this_thread(NICE) {
            console::warn(&format!("{STEP}: nice {NICE}: {e}"));
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
        rehearse();
        prefetch_forever();
    });
    if let Err(e) = spawned {
        console::warn(&format!("{STEP}: start its thread: {e}"));
    }
}

/// Sets the calling thread's nice value (Linux: a thread's own, not its process's).
fn nice_this_thread(nice: libc::c_int) -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority with PRIO_PROCESS and a thread id sets that thread's nice
    // value only; it reads and writes no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The step's name in the boot timeline for the rehearsal of a promotion's preparation
/// (`[basalt] step prepare-warm …`).
pub const PREPARE_STEP: &str = "prepare-warm";
/// Where the rehearsal writes its copy of K3s's config aside: tmpfs, removed at once.
const REHEARSAL_DIR: &str = "/run/basalt";

/// The promotion's work beside its check, run once ([`super::node::rehearse_prepare`]).
fn rehearse() {
    let rehearsed = console::timed(PREPARE_STEP, || {
        super::node::rehearse_prepare(std::path::Path::new(REHEARSAL_DIR))
    });
    match rehearsed {
        Ok(json) => console::info(&format!(
            "{PREPARE_STEP}: K3s's config rendered and written aside ({} bytes, removed)",
            json.len()
        )),
        Err(e) => console::warn(&format!(
            "{PREPARE_STEP}: {} (a promotion's preparation runs cold)",
            console::chain(&e)
        )),
    }
}

/// The step's name on the console for the standby's prefetch.
pub const PREFETCH: &str = "prefetch";
/// How often a server's CA is fetched again while in standby: well within
/// [`basalt_api::k3s::PREFETCH_FRESH_FOR`], after which a prefetch is not used.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// The pause after a failed prefetch (the network may not be up yet).
const RETRY: Duration = Duration::from_secs(10);

/// The servers to prefetch, and the wake-up of [`prefetch_forever`] when they change.
static SERVERS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CHANGED: Condvar = Condvar::new();

/// The servers whose CA to fetch ahead: the config in force's `standby.servers`
/// ([`basalt_api::config::MachineConfig::prefetch_servers`]; none once it joins).
pub fn set_servers(servers: Vec<String>) {
    let mut current = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    if *current != servers {
        *current = servers;
        CHANGED.notify_all();
    }
}

/// Prefetches [`SERVERS`] now, then every [`REFRESH`] (every [`RETRY`] after a
/// failure), and at once when they change. Prints a server's outcome when it changes.
fn prefetch_forever() {
    let mut outcomes: HashMap<String, String> = HashMap::new();
    let mut done: Vec<String> = Vec::new();
    let mut pause = Duration::ZERO;
    loop {
        let servers = {
            let current = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
            let (current, _) = CHANGED
                .wait_timeout_while(current, pause, |s| *s == done)
                .unwrap_or_else(|e| e.into_inner());
            current.clone()
        };
        // A server no longer named (none once the node joins) needs no prefetch, nor
        // the connection its last one left open.
        for gone in done.iter().filter(|s| !servers.contains(s)) {
            basalt_api::k3s::forget_prefetch(gone);
        }
        let mut failed = false;
        for server in &servers {
            let (result, times) = basalt_api::k3s::prefetch_server_ca(server, super::CHECK_TIMEOUT);
            let outcome = match &result {
                Ok(hash) => format!("CA {hash} checked ahead"),
                Err(e) => {
                    failed = true;
                    format!("{} (a promotion's check runs in full)", console::chain(e))
                }
            };
            if outcomes.get(server) != Some(&outcome) {
                let line = format!("{PREFETCH}: {server}: {outcome} (ms: {})", times.describe());
                match result {
                    Ok(_) => console::info(&line),
                    Err(_) => console::warn(&line),
                }
                outcomes.insert(server.clone(), outcome);
            }
        }
        outcomes.retain(|s, _| servers.contains(s));
        done = servers;
        pause = match (done.is_empty(), failed) {
            // Nothing to do until the servers change.
            (true, _) => Duration::from_secs(24 * 3600),
            (false, true) => RETRY,
            (false, false) => REFRESH,
        };
    }
}
