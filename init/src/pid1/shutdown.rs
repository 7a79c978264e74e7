//! Shutdown in order: services, then every other process, sync, what is mounted on
//! STATE, STATE itself, then power-off or reboot. Each step is logged.

use crate::join;
use crate::pid1::console;
use crate::pid1::reap::reap;
use crate::pid1::supervise::Supervisor;
use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How long processes get between SIGTERM and SIGKILL at shutdown.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long shutdown waits for PID1's own file writes in flight.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// Whether any child process remains (reaping those that exited).
fn children_remain() -> bool {
    let _ = reap();
    !matches!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    )
}

/// What is mounted on STATE's tree or from it (`/etc/rancher`, and whatever K3s mounted
/// under `/var`), deepest first, so that STATE itself can be unmounted.
fn unmount_on_state() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let targets = mounts_on_state(&mountinfo);
    for target in targets.iter().rev() {
        let done = nix::mount::umount(target.as_str())
            .or_else(|_| nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH));
        if let Err(e) = done {
            console::error(&format!("shutdown: unmount {target}"), &e);
        }
    }
    if !targets.is_empty() {
        console::info(&format!(
            "shutdown: {} mount(s) on STATE unmounted",
            targets.len()
        ));
    }
}

/// Mount points below STATE's and the rancher bind, in mountinfo order (parents first).
fn mounts_on_state(mountinfo: &str) -> Vec<String> {
    let state = crate::storage::state::MOUNT_POINT;
    let rancher = format!("/{}", join::RANCHER_MOUNT);
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| {
            let below = |base: &str| {
                m.strip_prefix(base)
                    .is_some_and(|rest| rest.starts_with('/'))
            };
            below(state) || *m == rancher || below(&rancher)
        })
        .map(str::to_owned)
        .collect()
}

fn describe(mode: RebootMode) -> &'static str {
    if mode == RebootMode::RB_AUTOBOOT {
        "reboot"
    } else {
        "power-off"
    }
}

/// Stops services (SIGTERM, bounded wait, SIGKILL), then every other process the same
/// way, syncs, unmounts STATE and powers off or reboots. Each step is logged.
pub fn shutdown(supervisor: &mut Supervisor, mode: RebootMode) -> ! {
    let what = describe(mode);
    console::info(&format!("shutdown ({what}): stopping services"));
    let killed = supervisor.stop_all(STOP_GRACE, &mut reap);
    for name in killed {
        console::warn(&format!("shutdown: service {name} needed SIGKILL"));
    }
    stop_the_rest(mode)
}

/// Shutdown without the supervisor, for a panic where the main loop cannot do it (the
/// main thread panicked, or did not answer): services are stopped with every other
/// process, then the same sync, unmounting and reboot as [`shutdown`].
pub fn emergency(mode: RebootMode) -> ! {
    console::warn(&format!(
        "emergency shutdown ({}): stopping every process",
        describe(mode)
    ));
    stop_the_rest(mode)
}

/// Every process but PID1 (SIGTERM, bounded wait, SIGKILL), sync, what is on STATE,
/// STATE, then `mode`.
fn stop_the_rest(mode: RebootMode) -> ! {
    let what = describe(mode);
    // PID1's own threads (the upgrade's boot check, standby's preparation) may be
    // writing to STATE: let those writes end, and refuse the next, before STATE goes.
    if !crate::atomic_file::close_writes(WRITE_WAIT) {
        console::warn("shutdown: a file write still ran after 5 s; going on");
    }
    console::info(&format!("shutdown ({what}): stopping processes"));
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while children_remain() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if children_remain() {
        console::warn("shutdown: killing what is left");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while children_remain() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    console::info("shutdown: syncing filesystems");
    nix::unistd::sync();
    unmount_on_state();
    // STATE is the one writable disk filesystem: leave it clean. Not mounted (stage 1,
    // or a boot without STATE) is nothing to report.
    match nix::mount::umount(crate::storage::state::MOUNT_POINT) {
        Ok(()) => console::info("shutdown: STATE unmounted"),
        Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => console::error("shutdown: unmount STATE", &e),
    }
    console::info(&format!("shutdown: {what}"));
    console::flush(console::FLUSH_TIMEOUT);
    loop {
        let _ = nix::sys::reboot::reboot(mode);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_mounted_on_state_is_found_parents_first() {
        let mountinfo = "\
22 1 253:0 / / ro,relatime - squashfs /dev/mapper/root ro
23 22 0:5 / /dev rw - devtmpfs devtmpfs rw
30 22 8:5 / /var rw,relatime - ext4 /dev/vda5 rw
31 22 8:5 /lib/basalt/rancher /etc/rancher rw,relatime - ext4 /dev/vda5 rw
32 30 0:40 / /var/lib/kubelet/pods/x/volumes/y rw - tmpfs tmpfs rw
33 22 0:41 / /variable rw - tmpfs tmpfs rw
34 22 0:42 / /etc/rancher-not rw - tmpfs tmpfs rw
";
        assert_eq!(
            mounts_on_state(mountinfo),
            ["/etc/rancher", "/var/lib/kubelet/pods/x/volumes/y"]
        );
    }
}
