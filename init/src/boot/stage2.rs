//! Stage 2: PID1 on the verified root. Reaps every zombie, never exits, and on SIGTERM
//! stops everything and powers off in order.

use crate::boot::kernel;
use crate::boot::mounts;
use crate::join::{Joiner, NetworkCheck, NodeHost, Retry};
use crate::kmod::modprobe;
use crate::net::sntp;
use crate::net::{self as network, metadata};
use crate::node_api as api;
use crate::pid1::console;
use crate::pid1::mailbox::{self, Command, Control, LineCounts, Power};
use crate::pid1::supervise::{Exit, RestartPolicy, ServiceSpec, Supervisor};
use crate::sys::Real;
use crate::{config_source, join, testd};
use basalt_api::config::MachineConfig;
use basalt_api::milestone::Milestone;
use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
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
    let root = Path::new("/");
    for table in [mounts::EARLY, mounts::LATE] {
        if let Err(e) = mounts::apply(&mut sys, root, table) {
            console::error("stage 2 mounts", &e);
        }
    }
    // Stage 1's milestones, for the node API's boot timeline.
    console::import_milestones(&root.join("dev/kmsg"));
    let state = crate::storage::state::mount(&mut sys, root, STATE_TIMEOUT);
    let state_mounted = state.is_ok();
    match state {
        Ok(m) => {
            console::milestone(Milestone::StateMounted);
            console::info(&format!(
                "STATE {} mounted on {}, boot {}",
                m.device.name,
                crate::storage::state::MOUNT_POINT,
                m.boot
            ));
        }
        // A node without STATE still serves read-only: say why and go on.
        Err(e) => console::error("STATE", &e),
    }
    // The module indexes, read once for every load below.
    let modules = match modprobe::Modules::running(root) {
        Ok(m) => Some(m),
        Err(e) => {
            console::error("module index", &e);
            None
        }
    };
    prepare_kernel_for_k3s(&mut sys, modules.as_ref());
    if state_mounted {
        join::prepare_standby(&mut sys, root);
    }
    crate::pid1::power::watch_power_button(Path::new("/"), modules.as_ref());
    // Ctrl-Alt-Del then arrives as SIGINT instead of an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        console::error("disable ctrl-alt-del", &e);
    }
    coldplug(&mut sys, root, modules.as_ref());
    console::milestone(Milestone::Ready);
    // Local sources first (STATE, fw_cfg); off Hetzner the kernel command line too, since
    // no metadata service comes before it.
    let hetzner = metadata::on_hetzner(root);
    let mut config = read_machine_config(&mut sys, state_mounted, modules.as_ref());
    if config.is_none() && !hetzner {
        config = report_found(config_source::from_cmdline(root, state_mounted));
    }
    let net = config
        .as_ref()
        .map(|(_, c)| c.network.clone())
        .unwrap_or_default();
    let mut hostname = config
        .as_ref()
        .and_then(|(_, c)| c.node.hostname.as_ref())
        .map(|h| h.as_str().to_owned());
    set_hostname(hostname.as_deref());
    let up = network::start(root, &net, hostname.clone());
    if hetzner {
        let meta = fetch_metadata(&up);
        if config.is_none() {
            config = match &meta {
                Some(m) => report_found(config_source::from_metadata(root, m, state_mounted)),
                None => None,
            };
            if config.is_none() {
                config = report_found(config_source::from_cmdline(root, state_mounted));
            }
            // A config that arrived over the network adds its static part now.
            if let Some((_, c)) = &config {
                if let Some(iface) = network::first_ethernet(root) {
                    for e in network::apply_static(&iface, &c.network) {
                        console::error("network", &e);
                    }
                }
                if !c.network.dns.is_empty() {
                    network::write_resolv_conf("the machine config", &c.network.dns);
                }
            }
        }
        if let Some(m) = &meta {
            if hostname.is_none() && !m.hostname.is_empty() {
                hostname = Some(m.hostname.clone());
                set_hostname(hostname.as_deref());
            }
            let want_v6 = config
                .as_ref()
                .is_none_or(|(_, c)| c.network.ipv6_from_metadata);
            if let (true, Some((addr, prefix)), Some(iface)) =
                (want_v6, m.ipv6, network::first_ethernet(root))
            {
                match network::apply_ipv6(&iface, addr, prefix) {
                    Ok(()) => console::info(&format!(
                        "network: {iface}: IPv6 {addr}/{prefix} via fe80::1 from metadata"
                    )),
                    Err(e) => console::error("network", &e),
                }
            }
        }
    }
    let ntp: Vec<String> = config
        .as_ref()
        .map(|(_, c)| c.network.ntp.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    start_time_sync(ntp, up.clone());
    if config.is_none() {
        console::info("machine config: none; standby with read-only endpoints");
    }
    // Every captured line is counted, so that a followed log knows what is new.
    let counts = Rc::new(LineCounts::default());
    let sink_counts = Rc::clone(&counts);
    let mut supervisor = Supervisor::new(Box::new(move |name, line| {
        sink_counts.add(name);
        console::info(&format!("[{name}] {line}"));
    }));
    if let Some(mode) = testd::requested(root) {
        start_test_service(&mut supervisor, &mode);
    }
    let (control, commands) = Control::new(Arc::new(wake_main_loop));
    let joiner = Arc::new(Joiner::new(
        Box::new(NetworkCheck {
            timeout: join::CHECK_TIMEOUT,
        }),
        Box::new(NodeHost {
            root: root.to_path_buf(),
            control: control.clone(),
        }),
        Retry::default(),
    ));
    start_api(config.as_ref(), control, &joiner, &up);
    report_entropy();
    report_footprint();
    console::milestone(Milestone::Standby);
    if let Some((_, c)) = config.filter(|(_, c)| !c.is_standby()) {
        let up = up.clone();
        if let Err(e) = joiner.join_at_boot(c, move |t| up.wait(t)) {
            console::error("join: start the join thread", &e);
        }
    }
    serve(&all, &mut supervisor, &commands, &counts)
}

/// The node API when the config has one (every config does: `[api]` is required).
fn start_api(
    config: Option<&(config_source::Source, MachineConfig)>,
    control: Control,
    joiner: &Arc<Joiner>,
    up: &network::NetworkUp,
) {
    let Some((source, config)) = config else {
        console::info("api: off: no machine config, so no certificates to serve with");
        return;
    };
    let ctx = api::Context::new(
        Path::new("/").to_path_buf(),
        control,
        Arc::clone(joiner),
        up.clone(),
        Some(source_key(*source).to_owned()),
        &config.api,
    );
    match ctx {
        Ok(ctx) => {
            if let Err(e) = api::start(Arc::new(ctx), config.api.listen) {
                console::error("api: start", &e);
            }
        }
        // Info, not error: a config may carry placeholder certificates on purpose.
        Err(e) => console::info(&format!("api: off: {}", console::chain(&e))),
    }
}

/// The config source as the node API names it.
fn source_key(source: config_source::Source) -> &'static str {
    match source {
        config_source::Source::State => "state",
        config_source::Source::FwCfg => "fw_cfg",
        config_source::Source::Metadata => "metadata",
        config_source::Source::Cmdline => "cmdline",
    }
}

/// An API thread has queued a command: SIGUSR1 ends the main loop's signal wait. Only
/// the main thread takes signals (all are blocked everywhere, and it waits for them).
fn wake_main_loop() {
    let _ = kill(nix::unistd::getpid(), Signal::SIGUSR1);
}

fn set_hostname(name: Option<&str>) {
    if let Some(name) = name {
        if let Err(e) = nix::unistd::sethostname(name) {
            console::error("set hostname", &e);
        }
    }
}

/// How long the metadata service may take to become reachable (the DHCP lease first).
const METADATA_WAIT: Duration = Duration::from_secs(20);
/// How long time sync waits for the network; it is never fatal.
const TIME_SYNC_WAIT: Duration = Duration::from_secs(60);

/// Hetzner's metadata, once the network is up: hostname, IPv6, user-data.
fn fetch_metadata(up: &network::NetworkUp) -> Option<metadata::Metadata> {
    if !up.wait(METADATA_WAIT) {
        console::info("metadata: network not up; skipped");
        return None;
    }
    match metadata::fetch(metadata::BASE_URL, Duration::from_secs(2)) {
        Ok(m) => {
            console::info(&format!(
                "metadata: Hetzner instance {}, hostname {:?}",
                m.instance_id, m.hostname
            ));
            Some(m)
        }
        Err(e) => {
            console::error("metadata", &e);
            None
        }
    }
}

/// SNTP against the configured servers in a thread of its own once the network is up:
/// bounded, logged, never fatal. Success prints `time-synced`.
fn start_time_sync(servers: Vec<String>, up: network::NetworkUp) {
    if servers.is_empty() {
        console::info("time: no NTP servers in the config; clock left as the hypervisor set it");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("sntp".into())
        .spawn(move || {
            if !up.wait(TIME_SYNC_WAIT) {
                console::info("time: network not up; no sync");
                return;
            }
            match sntp::sync(&servers, Duration::from_secs(3), true) {
                Ok(s) => {
                    console::info(&format!(
                        "time: {} ({}) offset {} delay {:?}, clock {}",
                        s.server,
                        s.addr,
                        s.offset,
                        s.delay,
                        if s.clock_set { "stepped" } else { "kept" }
                    ));
                    console::milestone(Milestone::TimeSynced);
                }
                Err(e) => console::error("time sync", &e),
            }
        });
    if let Err(e) = spawned {
        console::error("start time sync", &e);
    }
}

/// Reports what a later config source found; the config if there was one.
fn report_found(
    found: Result<config_source::Found, config_source::SourceError>,
) -> Option<(config_source::Source, MachineConfig)> {
    match found {
        Ok(config_source::Found::None) => None,
        Ok(config_source::Found::Config(source, config)) => {
            console::info(&format!("machine config from {}", source.name()));
            Some((source, *config))
        }
        Err(e) => {
            console::error("machine config", &e);
            None
        }
    }
}

/// PID1's loop: signals one at a time, reaping (every exit also goes to the supervisor),
/// the supervisor's timers and output, and the node API's commands (which wake it with
/// SIGUSR1). Returns only through shutdown.
fn serve(
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

/// Drivers for the devices present: the NIC, and virtio-rng where the hypervisor offers
/// one (it feeds the kernel's CRNG, which TLS and K3s need).
fn coldplug(sys: &mut Real, root: &Path, modules: Option<&modprobe::Modules>) {
    if let Some(modules) = modules {
        network::coldplug(sys, root, modules);
    }
}

/// The test service under supervision (see `testd`): proves starting, output capture,
/// restart with backoff and reaping of orphans before K3s's agent is the real tenant.
fn start_test_service(supervisor: &mut Supervisor, mode: &str) {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/sbin/init".into());
    let spec = ServiceSpec {
        name: "testd".into(),
        argv: vec![
            exe.to_string_lossy().into_owned(),
            testd::ARG.into(),
            mode.into(),
        ],
        env: Vec::new(),
        restart: RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
            ..RestartPolicy::default()
        },
        stop_timeout: Duration::from_secs(5),
    };
    match supervisor.start(spec) {
        Ok(()) => console::info(&format!("service testd ({mode}) started under supervision")),
        Err(e) => console::error("service testd", &e),
    }
}

/// PID1's resident memory, read from its own `/proc/self/status` (the figure that
/// `basalt bench boot` reports): `footprint: PID1 VmRSS 1234 kB, VmHWM 2345 kB`.
fn report_footprint() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or_else(|| "?".to_owned(), |v| v.trim().to_owned())
    };
    console::info(&format!(
        "footprint: PID1 VmRSS {}, VmHWM {}",
        field("VmRSS:"),
        field("VmHWM:")
    ));
}

/// Says whether the kernel's CRNG is ready: until it is, getrandom(2) blocks, and with
/// it TLS and K3s. A VM without RDRAND or virtio-rng can wait minutes.
fn report_entropy() {
    let mut byte = [0u8; 1];
    // SAFETY: one byte into a valid buffer; GRND_NONBLOCK never blocks.
    let n = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    if n == 1 {
        console::info("entropy: kernel CRNG ready");
    } else {
        console::info("entropy: kernel CRNG not ready yet (no RDRAND or virtio-rng?)");
    }
}

/// What K3s needs of the kernel, done before any credentials exist: cgroup v2 with all
/// controllers delegated, its modules, its sysctls. Failures are reported, not fatal.
fn prepare_kernel_for_k3s(sys: &mut Real, modules: Option<&modprobe::Modules>) {
    let root = Path::new("/");
    if let Err(e) = kernel::mount_cgroup2(sys, root) {
        console::error("cgroup2", &e);
    }
    if let Err(e) = kernel::enable_controllers(root) {
        console::error("cgroup controllers", &e);
    }
    if let Some(modules) = modules {
        for e in kernel::load_modules_from(sys, root, modules, kernel::K3S_MODULES) {
            console::error("module", &e);
        }
    }
    // After the modules: the bridge sysctls exist once br_netfilter is loaded.
    for e in kernel::apply_sysctls(root, kernel::K3S_SYSCTLS) {
        console::error("sysctl", &e);
    }
}

/// Finds the machine config and says what it found. A bad config is reported (with the
/// key it trips on) and the node stays in standby rather than dying.
fn read_machine_config(
    sys: &mut Real,
    state_mounted: bool,
    modules: Option<&modprobe::Modules>,
) -> Option<(config_source::Source, MachineConfig)> {
    let root = Path::new("/");
    // fw_cfg is a QEMU device; elsewhere the module finds nothing and that is fine.
    if let Some(modules) = modules {
        let _ = modules.probe(sys, root, "qemu_fw_cfg");
    }
    match config_source::load(root, state_mounted) {
        Ok(config_source::Found::None) => {
            console::info("machine config: none in STATE or fw_cfg");
            None
        }
        Ok(config_source::Found::Config(source, config)) => {
            let what = if config.is_standby() {
                "no [cluster], standby"
            } else {
                "[cluster] present, joining"
            };
            console::info(&format!("machine config from {}: {what}", source.name()));
            Some((source, *config))
        }
        Err(e) => {
            console::error("machine config", &e);
            None
        }
    }
}

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

/// Stops services (SIGTERM, bounded wait, SIGKILL), then every other process the same
/// way, syncs, unmounts STATE and powers off or reboots. Each step is logged.
fn shutdown(supervisor: &mut Supervisor, mode: RebootMode) -> ! {
    let what = if mode == RebootMode::RB_AUTOBOOT {
        "reboot"
    } else {
        "power-off"
    };
    console::info(&format!("shutdown ({what}): stopping services"));
    let killed = supervisor.stop_all(STOP_GRACE, &mut reap);
    for name in killed {
        console::info(&format!("shutdown: service {name} needed SIGKILL"));
    }
    console::info(&format!("shutdown ({what}): stopping processes"));
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while children_remain() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if children_remain() {
        console::info("shutdown: killing what is left");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while children_remain() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    console::info("shutdown: syncing filesystems");
    nix::unistd::sync();
    unmount_on_state();
    // STATE is the one writable disk filesystem: leave it clean.
    match nix::mount::umount(crate::storage::state::MOUNT_POINT) {
        Ok(()) => console::info("shutdown: STATE unmounted"),
        Err(e) => console::error("shutdown: unmount STATE", &e),
    }
    console::info(&format!("shutdown: {what}"));
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
        assert_eq!(source_key(config_source::Source::FwCfg), "fw_cfg");
    }
}
