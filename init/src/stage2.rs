//! Stage 2: PID1 on the verified root. Reaps every zombie, never exits, and on SIGTERM
//! stops everything and powers off in order.

use crate::console;
use crate::mounts;
use crate::sys::Real;
use crate::{config_source, kernel, modprobe, network};
use basalt_api::milestone::Milestone;
use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the STATE partition (the root disk is already there).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long processes get between SIGTERM and SIGKILL at shutdown.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs PID1's life; never returns.
pub fn run() -> ! {
    // Block everything first: signals are then taken one at a time with sigwait, and a
    // SIGTERM that arrives during setup waits instead of killing PID1.
    let all = SigSet::all();
    if let Err(e) = all.thread_block() {
        console::error("block signals", &e);
    }
    let mut sys = Real;
    for table in [mounts::EARLY, mounts::LATE] {
        if let Err(e) = mounts::apply(&mut sys, Path::new("/"), table) {
            console::error("stage 2 mounts", &e);
        }
    }
    let state = crate::state::mount(&mut sys, Path::new("/"), STATE_TIMEOUT);
    let state_mounted = state.is_ok();
    match state {
        Ok(m) => {
            console::milestone(Milestone::StateMounted);
            console::info(&format!(
                "STATE {} mounted on {}, boot {}",
                m.device.name,
                crate::state::MOUNT_POINT,
                m.boot
            ));
        }
        // A node without STATE still serves read-only: say why and go on.
        Err(e) => console::error("STATE", &e),
    }
    prepare_kernel_for_k3s(&mut sys);
    // Ctrl-Alt-Del then arrives as SIGINT instead of an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        console::error("disable ctrl-alt-del", &e);
    }
    console::milestone(Milestone::Ready);
    // The hostname goes to the DHCP client once PID1 runs it (see `start_network`).
    let _hostname = read_machine_config(&mut sys, state_mounted);
    console::milestone(Milestone::Standby);
    loop {
        match all.wait() {
            Ok(Signal::SIGCHLD) => {
                reap();
            }
            Ok(Signal::SIGTERM) | Ok(Signal::SIGPWR) => shutdown(RebootMode::RB_POWER_OFF),
            Ok(Signal::SIGINT) => shutdown(RebootMode::RB_AUTOBOOT),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What K3s needs of the kernel, done before any credentials exist: cgroup v2 with all
/// controllers delegated, its modules, its sysctls. Failures are reported, not fatal.
fn prepare_kernel_for_k3s(sys: &mut Real) {
    let root = Path::new("/");
    if let Err(e) = kernel::mount_cgroup2(sys, root) {
        console::error("cgroup2", &e);
    }
    if let Err(e) = kernel::enable_controllers(root) {
        console::error("cgroup controllers", &e);
    }
    match modprobe::kernel_release(root) {
        Ok(kver) => {
            for e in kernel::load_modules(sys, root, &kver, kernel::K3S_MODULES) {
                console::error("module", &e);
            }
        }
        Err(e) => console::error("kernel release", &e),
    }
    // After the modules: the bridge sysctls exist once br_netfilter is loaded.
    for e in kernel::apply_sysctls(root, kernel::K3S_SYSCTLS) {
        console::error("sysctl", &e);
    }
}

/// Finds the machine config and says what it found. A bad config is reported (with the
/// key it trips on) and the node stays in standby rather than dying.
fn read_machine_config(sys: &mut Real, state_mounted: bool) -> Option<String> {
    let root = Path::new("/");
    // fw_cfg is a QEMU device; elsewhere the module finds nothing and that is fine.
    if let Ok(kver) = modprobe::kernel_release(root) {
        let _ = modprobe::probe(sys, root, &kver, "qemu_fw_cfg");
    }
    match config_source::load(root, state_mounted) {
        Ok(config_source::Found::None) => {
            console::info("machine config: none; standby with read-only endpoints");
            None
        }
        Ok(config_source::Found::Config(source, config)) => {
            let what = if config.is_standby() {
                "no [cluster], standby"
            } else {
                "[cluster] present; joining arrives with the node API"
            };
            console::info(&format!("machine config from {}: {what}", source.name()));
            let hostname = config.node.hostname.as_ref().map(|h| h.as_str().to_owned());
            if let Some(name) = &hostname {
                if let Err(e) = nix::unistd::sethostname(name) {
                    console::error("set hostname", &e);
                }
            }
            hostname
        }
        Err(e) => {
            console::error("machine config", &e);
            None
        }
    }
}

/// Drivers for the devices present, then DHCPv4 on the first Ethernet interface.
///
/// Not called yet: under QEMU user networking the DHCP thread produced no event at all
/// (neither a lease nor a retry) and that is still to be understood.
#[allow(dead_code)]
fn start_network(hostname: Option<String>) {
    let root = Path::new("/");
    if let Ok(kver) = modprobe::kernel_release(root) {
        network::coldplug(&mut Real, root, &kver);
    }
    // A NIC driver may take a moment to register its interface.
    let deadline = Instant::now() + Duration::from_secs(2);
    let iface = loop {
        match network::first_ethernet(root) {
            Some(iface) => break Some(iface),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => break None,
        }
    };
    match iface {
        Some(iface) => {
            if let Err(e) = network::spawn_dhcp(iface, hostname) {
                console::error("start the DHCP client", &e);
            }
        }
        None => console::info("network: no Ethernet interface"),
    }
}

/// Reaps every exited child; returns whether children remain. Never stops on an error
/// other than "no children".
pub fn reap() -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) => continue,
            Err(Errno::ECHILD) => return false,
            Err(Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Stops all processes (SIGTERM, bounded wait, SIGKILL), syncs and powers off or reboots.
fn shutdown(mode: RebootMode) -> ! {
    let what = if mode == RebootMode::RB_AUTOBOOT {
        "reboot"
    } else {
        "power-off"
    };
    console::info(&format!("shutdown ({what}): stopping processes"));
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while reap() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if reap() {
        console::info("shutdown: killing what is left");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while reap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    console::info("shutdown: syncing filesystems");
    nix::unistd::sync();
    // STATE is the one writable disk filesystem: leave it clean.
    match nix::mount::umount(crate::state::MOUNT_POINT) {
        Ok(()) => console::info("shutdown: STATE unmounted"),
        Err(e) => console::error("shutdown: unmount STATE", &e),
    }
    console::info(&format!("shutdown: {what}"));
    loop {
        let _ = nix::sys::reboot::reboot(mode);
        std::thread::sleep(Duration::from_secs(1));
    }
}
