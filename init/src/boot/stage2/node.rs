//! The real node under stage 2: each step of [`Machine`] and [`Sources`] with syscalls,
//! files under `root` (`/` on a node) and threads. Failures are reported here, where
//! they happen, and the boot goes on.

use super::Machine;
use crate::boot::background::{self, Background};
use crate::boot::{kernel, mounts};
use crate::config_source::{Chosen, SourceError, Sources};
use crate::join::{self, Joiner, NetworkCheck, NodeHost, Retry};
use crate::k3s_warm;
use crate::kmod::modprobe::{ModprobeError, Modules};
use crate::kmod::parallel::{self, Finit, Loader};
use crate::net::metadata::{self, Metadata};
use crate::net::{self, sntp, NetworkUp};
use crate::node_api;
use crate::pid1::mailbox::{Command, Control, LineCounts};
use crate::pid1::supervise::Supervisor;
use crate::pid1::{console, panic, power, serve};
use crate::storage::state;
use crate::sys::System;
use basalt_api::config::MachineConfig;
use basalt_api::layout::Partition;
use basalt_api::milestone::Milestone;
use basalt_api::node::{ConfigReport, RejectedSource};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for the STATE partition (the root disk is already there).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the metadata service may take to become reachable (the DHCP lease first).
const METADATA_WAIT: Duration = Duration::from_secs(20);
/// How long time sync waits for the network; it is never fatal.
const TIME_SYNC_WAIT: Duration = Duration::from_secs(60);

/// The machine stage 2 runs on, and what PID1's main loop takes over after the boot.
/// Syscalls go through `sys` and paths start at `root`, as in stage 1's `Env`.
pub struct Node<'a> {
    sys: &'a mut dyn System,
    root: PathBuf,
    /// When stage 2 began (CLOCK_BOOTTIME, s), for the `exec-stage2` step.
    started: f64,
    state_mounted: bool,
    modules: Option<Arc<Modules>>,
    /// The module index being read, then the coldplug, while STATE mounts; taken by
    /// `read_module_index`.
    drivers: Option<std::thread::JoinHandle<Drivers>>,
    /// STATE's device name and its boot counter being written; joined by
    /// `read_module_index`.
    boot_count: Option<(String, state::BootCount)>,
    /// The coldplug's failures, once its thread is joined; reported by `coldplug`.
    coldplug_errors: Option<Vec<parallel::ParallelError>>,
    /// Set from the config when the network starts; metadata fills it in otherwise.
    hostname: Option<String>,
    up: NetworkUp,
    supervisor: Supervisor,
    /// Every captured line is counted, so that a followed log knows what is new.
    counts: Rc<LineCounts>,
    control: Control,
    commands: Receiver<Command>,
    joiner: Arc<Joiner>,
    /// Holds K3s's preparation back until standby; dropped to let it go.
    k3s_gate: Option<std::sync::mpsc::Sender<()>>,
}

impl<'a> Node<'a> {
    pub fn new(sys: &'a mut dyn System, root: PathBuf) -> Node<'a> {
        let counts = Rc::new(LineCounts::default());
        let sink_counts = Rc::clone(&counts);
        let supervisor = Supervisor::new(Box::new(move |name, line| {
            sink_counts.add(name);
            console::service_line(name, line);
        }));
        let (control, commands) = Control::new(Arc::new(serve::wake_main_loop));
        let joiner = Arc::new(Joiner::new(
            Box::new(NetworkCheck {
                timeout: join::CHECK_TIMEOUT,
            }),
            Box::new(NodeHost {
                root: root.clone(),
                control: control.clone(),
            }),
            Retry::default(),
        ));
        Node {
            sys,
            root,
            started: console::uptime(),
            state_mounted: false,
            modules: None,
            drivers: None,
            boot_count: None,
            coldplug_errors: None,
            hostname: None,
            up: NetworkUp::default(),
            supervisor,
            counts,
            control,
            commands,
            joiner,
            k3s_gate: None,
        }
    }

    /// What PID1's main loop owns from here on: the supervisor, the mailbox's receiving
    /// end and the line counts. The caller's thread becomes the main loop's: a panic in
    /// any other thread is handed to it from now on ([`panic`]).
    pub fn into_main_loop(self) -> (Supervisor, Receiver<Command>, Rc<LineCounts>) {
        panic::register_main_loop(self.control.clone());
        (self.supervisor, self.commands, self.counts)
    }
}

impl Machine for Node<'_> {
    fn mount_kernel_filesystems(&mut self) {
        for table in [mounts::EARLY, mounts::LATE] {
            if let Err(e) = mounts::apply(self.sys, &self.root, table) {
                console::error("stage 2 mounts", &e);
            }
        }
        // Stage 1's milestones, for the node API's boot timeline.
        console::import_milestones(&self.root.join("dev/kmsg"));
        // From stage 1's last milestone to here: the switch of root, the exec of this
        // binary off the verified root (its pages read on first touch) and its start.
        let mounted = Milestone::RootMounted.name();
        if let Some((_, at)) = console::milestones()
            .into_iter()
            .find(|(n, _)| n == mounted)
        {
            console::step("exec-stage2", at, (self.started - at).max(0.0));
        }
        // The module index is read off the root and the drivers of the devices present
        // are loaded while STATE mounts (which mostly waits for the disk): neither needs
        // STATE, and `read_module_index` joins them.
        let root = self.root.clone();
        match std::thread::Builder::new()
            .name("drivers".into())
            .spawn(move || index_and_coldplug(&root))
        {
            Ok(drivers) => self.drivers = Some(drivers),
            Err(e) => console::error("drivers: start the thread", &e),
        }
    }

    fn mount_state(&mut self) -> bool {
        match state::mount(self.sys, &self.root, STATE_TIMEOUT) {
            Ok((device, count)) => {
                console::milestone(Milestone::StateMounted);
                console::info(&format!(
                    "STATE {} mounted on {}, boot {}",
                    device.name,
                    state::MOUNT_POINT,
                    count.number(),
                ));
                self.state_mounted = true;
                self.boot_count = Some((device.name, count));
            }
            // A node without STATE still serves read-only: say why and go on.
            Err(e) => console::error(Partition::State.name(), &e),
        }
        self.state_mounted
    }

    fn read_module_index(&mut self) {
        let (read, errors) = match self.drivers.take().map(std::thread::JoinHandle::join) {
            Some(Ok((read, errors))) => (read, Some(errors)),
            // Its thread could not start, or panicked (the panic hook has said why): the
            // index is read here, and `coldplug` loads the drivers.
            _ => (Modules::running(&self.root).map(Arc::new), None),
        };
        match read {
            Ok(m) => self.modules = Some(m),
            Err(e) => console::error("module index", &e),
        }
        self.coldplug_errors = errors;
        // The boot counter's write, which also went on beside the drivers.
        if let Some((name, count)) = self.boot_count.take() {
            if let Err(e) = count.wait() {
                console::warn(&state::not_counted(&name, &e));
            }
        }
    }

    /// In a thread of its own, with the real kernel; its failures fail the promotion
    /// that waits for it, with their reasons. The thread starts now, so that the slot a
    /// promotion waits on is filled before the node API can take one, but its work waits
    /// for [`Machine::release_k3s_prep`]: until standby, the vCPUs belong to the boot.
    fn start_k3s_prep(&mut self, state_mounted: bool) {
        let root = self.root.clone();
        let modules = self.modules.clone();
        let (gate, released) = std::sync::mpsc::channel::<()>();
        self.k3s_gate = Some(gate);
        let prep = Background::spawn("k3s-prep", move || {
            // Released when the sender is dropped (or sends): either way, go.
            let _ = released.recv();
            let errors = prepare_for_k3s(
                &mut crate::sys::Real,
                &Finit,
                &root,
                modules.as_deref(),
                state_mounted,
            );
            // After K3s's preparation, so as not to compete with it for the vCPUs.
            join::warm::spawn();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        });
        background::k3s_prep().set(prep);
    }

    fn release_k3s_prep(&mut self) {
        self.k3s_gate = None;
    }

    /// Its drivers were loaded by [`Machine::coldplug`].
    fn watch_power_button(&mut self) {
        power::watch_power_button(&self.root);
    }

    fn disable_ctrl_alt_del(&mut self) {
        if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
            console::error("disable ctrl-alt-del", &e);
        }
    }

    /// virtio-rng, where the hypervisor offers one, feeds the kernel's CRNG, which TLS
    /// and K3s need. The power button's drivers and fw_cfg's (the config source) load in
    /// the same batch.
    fn coldplug(&mut self) {
        let errors = match self.coldplug_errors.take() {
            Some(errors) => errors,
            None => match &self.modules {
                Some(modules) => console::timed("coldplug", || coldplug(&self.root, modules)),
                None => return,
            },
        };
        for e in &errors {
            console::error("coldplug", e);
        }
    }

    fn milestone(&mut self, milestone: Milestone) {
        console::milestone(milestone);
    }

    fn start_time_sync(&mut self, servers: Vec<String>) {
        start_time_sync(&self.root, servers, self.up.clone());
    }

    /// Only in a basalt-init built with the `testd` feature.
    fn start_test_service(&mut self) {
        #[cfg(feature = "testd")]
        crate::testd::start(&mut self.supervisor, &self.root);
    }

    fn start_api(&mut self, chosen: &Chosen) {
        let ctx = node_api::Context::new(
            self.root.clone(),
            self.control.clone(),
            Arc::clone(&self.joiner),
            self.up.clone(),
            Some(chosen.source.key().to_owned()),
            &chosen.config.api,
        );
        match ctx {
            Ok(ctx) => {
                ctx.set_config_report(config_report(chosen));
                if let Err(e) = node_api::start(Arc::new(ctx), chosen.config.api.listen) {
                    console::error("api: start", &e);
                }
            }
            // A warning, not an error: a config may carry placeholder certificates on purpose.
            Err(e) => console::warn(&format!("api: off: {}", console::chain(&e))),
        }
    }

    fn report_resources(&mut self) {
        report_entropy();
        report_footprint();
    }

    fn join(&mut self, config: MachineConfig) {
        let up = self.up.clone();
        if let Err(e) = self.joiner.join_at_boot(config, move |t| up.wait(t)) {
            console::error("join: start the join thread", &e);
        }
    }
}

impl Sources for Node<'_> {
    fn root(&self) -> &Path {
        &self.root
    }

    fn state_mounted(&self) -> bool {
        self.state_mounted
    }

    fn on_hetzner(&mut self) -> bool {
        metadata::on_hetzner(&self.root)
    }

    fn start_network(&mut self, config: Option<&MachineConfig>) {
        self.hostname = config
            .and_then(|c| c.node.hostname.as_ref())
            .map(|h| h.as_str().to_owned());
        set_hostname(self.hostname.as_deref());
        let network = config.map(|c| c.network.clone()).unwrap_or_default();
        self.up = net::start(&self.root, &network, self.hostname.clone());
    }

    fn fetch_metadata(&mut self) -> Option<Metadata> {
        if !self.up.wait(METADATA_WAIT) {
            console::warn("metadata: network not up; skipped");
            return None;
        }
        match metadata::fetch(metadata::BASE_URL, Duration::from_secs(2)) {
            Ok(m) => {
                let id = m
                    .instance_id
                    .map_or_else(|| "?".to_owned(), |i| i.to_string());
                console::info(&format!(
                    "metadata: Hetzner instance {id}, hostname {:?}",
                    m.hostname
                ));
                // Each item stands alone: the others are used all the same.
                for (_, why) in &m.failed {
                    console::warn(&format!("metadata: left out: {why}"));
                }
                Some(m)
            }
            Err(e) => {
                console::error("metadata", &e);
                None
            }
        }
    }

    fn apply_static_network(&mut self, config: &MachineConfig) {
        if let Some(iface) = net::first_ethernet(&self.root) {
            for e in net::apply_static(&iface, &config.network) {
                console::error("network", &e);
            }
        }
        if !config.network.dns.is_empty() {
            net::write_resolv_conf("the machine config", &config.network.dns);
        }
    }

    fn apply_metadata(&mut self, meta: &Metadata, config: Option<&MachineConfig>) {
        if self.hostname.is_none() && !meta.hostname.is_empty() {
            self.hostname = Some(meta.hostname.clone());
            set_hostname(self.hostname.as_deref());
        }
        let want_v6 = config.is_none_or(|c| c.network.ipv6_from_metadata);
        if let (true, Some((addr, prefix)), Some(iface)) =
            (want_v6, meta.ipv6, net::first_ethernet(&self.root))
        {
            match net::apply_ipv6(&iface, addr, prefix) {
                Ok(()) => console::info(&format!(
                    "network: {iface}: IPv6 {addr}/{prefix} via fe80::1 from metadata"
                )),
                Err(e) => console::error("network", &e),
            }
        }
    }

    fn rejected(&mut self, err: &SourceError) {
        console::error("machine config", err);
    }
}

/// The module index, and the coldplug's failures.
type Drivers = (
    Result<Arc<Modules>, ModprobeError>,
    Vec<parallel::ParallelError>,
);

/// Reads the module index, then loads the drivers of the devices present and those
/// found by name ([`coldplug`]); each is a step of the boot timeline.
fn index_and_coldplug(root: &Path) -> Drivers {
    match console::timed("module-index", || Modules::running(root)) {
        Ok(modules) => {
            let modules = Arc::new(modules);
            let errors = console::timed("coldplug", || coldplug(root, &modules));
            (Ok(modules), errors)
        }
        Err(e) => (Err(e), Vec::new()),
    }
}

/// The drivers of the devices present, and the power button's and fw_cfg's by name.
fn coldplug(root: &Path, modules: &Modules) -> Vec<parallel::ParallelError> {
    let by_name: Vec<&str> = power::MODULES
        .iter()
        .copied()
        .chain([FW_CFG_MODULE])
        .collect();
    net::coldplug(&Finit, root, modules, &by_name, MODULE_THREADS).1
}

/// fw_cfg's driver, which shows QEMU's fw_cfg files (a config source) in sysfs. fw_cfg
/// is a QEMU device; elsewhere the module finds nothing, and that is fine.
const FW_CFG_MODULE: &str = "qemu_fw_cfg";

/// Threads that load modules at once: a node has at least two vCPUs, and a module's
/// load is mostly CPU (relocation, signature check, reading it off the root).
const MODULE_THREADS: usize = 2;

/// What K3s needs of the kernel, done before any credentials exist: cgroup v2 with all
/// controllers delegated, then the modules (in parallel), then the sysctls (the bridge
/// sysctls exist once br_netfilter is loaded); and with STATE, what a join needs on it
/// ([`join::prepare_standby`]), then K3s's userspace extracted onto it ([`k3s_warm`]).
/// Each part is a step of the boot timeline. Returns the failures, each printed and each
/// naming its module, key or file; the warm-up's are printed only (the agent extracts at
/// its start in any case).
pub fn prepare_for_k3s(
    sys: &mut dyn System,
    loader: &dyn Loader,
    root: &Path,
    modules: Option<&Modules>,
    state_mounted: bool,
) -> Vec<String> {
    let mut errors: Vec<String> = Vec::new();
    let mut failed = |what: &str, e: &dyn std::error::Error| {
        console::error(what, e);
        errors.push(format!("{what}: {}", console::chain(e)));
    };
    console::timed("cgroups", || {
        if let Err(e) = kernel::mount_cgroup2(sys, root) {
            failed("cgroup2", &e);
        }
        if let Err(e) = kernel::enable_controllers(root) {
            failed("cgroup controllers", &e);
        }
    });
    if let Some(modules) = modules {
        let outcome = console::timed("k3s-modules", || {
            parallel::load_all(loader, root, modules, kernel::K3S_MODULES, MODULE_THREADS)
        });
        for e in &outcome.errors {
            failed("k3s modules", e);
        }
    }
    console::timed("k3s-sysctls", || {
        for e in kernel::apply_sysctls(root, kernel::K3S_SYSCTLS) {
            failed("sysctl", &e);
        }
    });
    if state_mounted {
        console::timed("standby-prep", || join::prepare_standby(sys, root));
        // Last: the other steps are what the agent needs at once.
        console::timed(k3s_warm::LOG_NAME, || warm_k3s(root));
    }
    errors
}

/// Has the image's `k3s` extract its userspace onto STATE now ([`k3s_warm`]), on the
/// node only (`root` is `/`): a test's root must not run a K3s on the host. Its failure
/// is reported, not returned: the agent extracts at its start in any case.
fn warm_k3s(root: &Path) {
    if root != Path::new("/") {
        return;
    }
    let env = join::agent_spec().env;
    let mut line = |l: &str| console::service_line(k3s_warm::LOG_NAME, l);
    match k3s_warm::warm(Path::new(join::K3S_BIN), &env, k3s_warm::TIMEOUT, &mut line) {
        Ok(k3s_warm::Warmed::NoK3s) => {}
        Ok(k3s_warm::Warmed::NotAProgram) => console::info(&format!(
            "k3s: {} is not a program (a stand-in): nothing to extract",
            join::K3S_BIN
        )),
        Ok(k3s_warm::Warmed::Ran { took }) => console::info(&format!(
            "k3s: userspace extracted or found ({} {}, {} ms)",
            join::K3S_BIN,
            k3s_warm::ARGS.join(" "),
            took.as_millis()
        )),
        Err(e) => console::warn(&format!("k3s warm-up: {}", console::chain(&e))),
    }
}

/// The node API's account of what went wrong with the config sources at boot.
fn config_report(chosen: &Chosen) -> ConfigReport {
    ConfigReport {
        rejected: chosen
            .rejected
            .iter()
            .map(|r| RejectedSource {
                source: r.source.key().to_owned(),
                reason: r.reason.clone(),
            })
            .collect(),
        warnings: chosen.warnings.clone(),
    }
}

fn set_hostname(name: Option<&str>) {
    if let Some(name) = name {
        if let Err(e) = nix::unistd::sethostname(name) {
            console::error("set hostname", &e);
        }
    }
}

/// SNTP against the configured servers in a thread of its own once the network is up:
/// bounded, logged, never fatal. Success prints `time-synced`.
fn start_time_sync(root: &Path, servers: Vec<String>, up: NetworkUp) {
    if servers.is_empty() {
        console::info("time: no NTP servers in the config; clock left as the hypervisor set it");
        return;
    }
    // The image's time floor, from the verified root (basalt_api::time_floor).
    let os_release = std::fs::read_to_string(root.join(basalt_api::time_floor::OS_RELEASE_PATH));
    let policy = sntp::StepPolicy::from_os_release(os_release.as_deref().ok());
    let spawned = std::thread::Builder::new()
        .name("sntp".into())
        .spawn(move || {
            if !up.wait(TIME_SYNC_WAIT) {
                console::warn("time: network not up; no sync");
                return;
            }
            match sntp::sync(&servers, Duration::from_secs(3), policy, true) {
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
        console::warn("entropy: kernel CRNG not ready yet (no RDRAND or virtio-rng?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};

    #[test]
    fn the_real_steps_work_under_the_root_they_are_given() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut sys = Recording::default();
        let mut node = Node::new(&mut sys, root.path().into());
        node.mount_kernel_filesystems();
        // Without a module index nothing is loaded or coldplugged.
        node.coldplug();
        assert!(!node.state_mounted());
        drop(node);
        prepare_for_k3s(&mut sys, &Refusing, root.path(), None, false);
        let targets: Vec<_> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { target, .. } => Some(target.clone()),
                _ => None,
            })
            .collect();
        let expected: Vec<_> = mounts::EARLY
            .iter()
            .chain(mounts::LATE)
            .map(|m| root.path().join(m.target.trim_start_matches('/')))
            .chain([root.path().join("sys/fs/cgroup")])
            .collect();
        assert_eq!(targets, expected);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::LoadModule(_))));
    }

    /// A kernel that takes no module.
    struct Refusing;

    impl Loader for Refusing {
        fn load(&self, _: &Path) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::ENOEXEC))
        }
    }

    #[test]
    fn k3s_prep_reports_each_failure_by_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let moddir = root.path().join("lib/modules/6.1.0-1");
        std::fs::create_dir_all(&moddir).expect("mkdir");
        std::fs::write(
            moddir.join("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko:\n",
        )
        .expect("dep");
        let modules = Modules::open(root.path(), "6.1.0-1").expect("index");
        let mut sys = Recording::default();
        let errors = prepare_for_k3s(&mut sys, &Refusing, root.path(), Some(&modules), false);
        let all = errors.join("\n");
        assert!(
            all.contains("k3s modules: module overlay: load ") && all.contains("overlay.ko"),
            "{all}"
        );
        // Not in this index: named too.
        assert!(
            all.contains("k3s modules: module br_netfilter: module br_netfilter not found"),
            "{all}"
        );
        assert!(all.contains("sysctl: sysctl net.ipv4.ip_forward"), "{all}");
        assert!(all.contains("cgroup controllers"), "{all}");
    }
}
