//! Stage 2: PID1 on the verified root. Reaps every zombie, never exits, and on SIGTERM
//! stops everything and powers off in order.
//!
//! [`boot`] is the plan: the order of the steps and when a step is skipped. Each step is
//! a method of [`Machine`], done by the real node ([`Node`]: syscalls, `/`, threads) and
//! by a recording fake in the tests, like stage 1's [`crate::sys::System`]. A step
//! reports its own failure and the boot goes on: a node that cannot do one thing still
//! serves what it can. After the plan, PID1 lives in [`crate::pid1::serve`].

mod node;

pub use node::{Node, STATE_TIMEOUT};

use crate::config_source::{self, Chosen, Sources};
use crate::pid1::{console, serve};
use crate::sys::Real;
use basalt_api::config::MachineConfig;
use basalt_api::milestone::Milestone;
use nix::sys::signal::SigSet;
use std::path::PathBuf;

/// The steps of stage 2, in the order [`boot`] takes them; plus the config sources'
/// own steps ([`Sources`]), which [`config_source::choose`] orders.
pub trait Machine: Sources {
    /// The kernel filesystems (both tables of [`crate::boot::mounts`]), and stage 1's
    /// milestones read back from the kernel log for the boot timeline.
    fn mount_kernel_filesystems(&mut self);
    /// STATE, grown to fill its disk the first time; whether it is mounted.
    fn mount_state(&mut self) -> bool;
    /// The running kernel's module index, read once for every load below. On a node it
    /// was read, and the coldplug's drivers loaded, in a thread started by
    /// [`Machine::mount_kernel_filesystems`], beside STATE's mount; this joins it, and
    /// the boot counter's write that [`Machine::mount_state`] left beside them.
    fn read_module_index(&mut self);
    /// Starts, in the background, what a promotion needs and standby does not: cgroup v2
    /// with its controllers, K3s's modules and sysctls, and (with STATE only) what a join
    /// needs that no credential does. The promotion waits for it
    /// ([`crate::boot::background`]); its steps report their own durations. Its work
    /// waits for [`Machine::release_k3s_prep`].
    fn start_k3s_prep(&mut self, state_mounted: bool);
    /// Lets the work of [`Machine::start_k3s_prep`] begin; once standby is reached, so
    /// that it takes no CPU from the boot.
    fn release_k3s_prep(&mut self);
    fn watch_power_button(&mut self);
    /// Ctrl-Alt-Del then arrives as SIGINT instead of an immediate reboot.
    fn disable_ctrl_alt_del(&mut self);
    /// Drivers for the devices present (the NIC, virtio-rng), and those found by name
    /// (the power button's, fw_cfg's), in one batch: on a node, loaded already beside
    /// STATE's mount, and only their failures are reported here.
    fn coldplug(&mut self);
    fn milestone(&mut self, milestone: Milestone);
    /// SNTP against `servers` in a thread of its own, once the network is up.
    fn start_time_sync(&mut self, servers: Vec<String>);
    /// The test service, when the host asked for it and basalt-init has it (the `testd`
    /// feature).
    fn start_test_service(&mut self);
    /// The node API, with the certificates of the config that won.
    fn start_api(&mut self, chosen: &Chosen);
    /// Entropy and PID1's memory, for the console and `bench boot`.
    fn report_resources(&mut self);
    /// Joins the cluster in a thread of its own, once the network is up.
    fn join(&mut self, config: MachineConfig);
}

/// Runs PID1's life; never returns.
pub fn run() -> ! {
    // Block everything first: signals are then taken one at a time with sigwait, and a
    // SIGTERM that arrives during setup waits instead of killing PID1.
    let all = SigSet::all();
    if let Err(e) = all.thread_block() {
        console::error("block signals", &e);
    }
    let mut sys = Real;
    let mut node = Node::new(&mut sys, PathBuf::from("/"));
    boot(&mut node);
    // A test image made to crash here (`testd.panic=stage2`; testd feature only).
    #[cfg(feature = "testd")]
    crate::testd::panic_if_asked(std::path::Path::new("/"));
    // A/B upgrades: a rollback to record, or this boot's trial (issue 16).
    crate::upgrade::start_boot_hook(PathBuf::from("/"));
    let (mut supervisor, commands, counts) = node.into_main_loop();
    serve::serve(&all, &mut supervisor, &commands, &counts)
}

/// Stage 2 from the kernel filesystems to standby (or a join under way). Each step that
/// can take time prints its own duration (`[basalt] step <name> at=… took=…`), so a
/// slower milestone names the step that slowed it.
///
/// Standby needs the network (so the NIC's driver, coldplugged first), entropy (the
/// RNG's driver, with it), the config (fw_cfg's driver, with them) and the node API.
/// What only `k3s agent` needs is set up in the background once standby is reached, and
/// a promotion waits for that alone (its slot is filled before the node API starts).
pub fn boot(m: &mut dyn Machine) {
    console::timed("kernel-filesystems", || m.mount_kernel_filesystems());
    let state_mounted = console::timed("mount-state", || m.mount_state());
    // The index and the drivers were read and loaded beside STATE's mount, and the boot
    // counter synced beside both: what is left of them on the boot's path is this wait.
    console::timed("drivers-wait", || m.read_module_index());
    m.coldplug();
    m.start_k3s_prep(state_mounted);
    console::timed("power-button", || m.watch_power_button());
    m.disable_ctrl_alt_del();
    m.milestone(Milestone::Ready);
    let chosen = console::timed("config", || config_source::choose(m));
    m.start_time_sync(ntp_servers(chosen.as_ref()));
    if chosen.is_none() {
        console::info("machine config: none; standby with read-only endpoints");
    }
    m.start_test_service();
    // Every config has `[api]` (the key is required), so no config means no API.
    match &chosen {
        Some(chosen) => console::timed("api", || m.start_api(chosen)),
        None => console::info("api: off: no machine config, so no certificates to serve with"),
    }
    m.report_resources();
    m.milestone(Milestone::Standby);
    m.release_k3s_prep();
    // What a promotion's CA check can have done ahead (after K3s's preparation).
    let prefetch = chosen.as_ref().map(|c| c.config.prefetch_servers());
    crate::join::warm::set_servers(prefetch.unwrap_or_default());
    if let Some(chosen) = chosen.filter(|c| !c.config.is_standby()) {
        m.join(chosen.config);
    }
}

fn ntp_servers(chosen: Option<&Chosen>) -> Vec<String> {
    chosen
        .map(|c| {
            c.config
                .network
                .ntp
                .iter()
                .map(ToString::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_source::{Source, SourceError, FW_CFG, STATE_CONFIG};
    use crate::net::metadata::Metadata;
    use std::path::Path;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Step {
        MountKernelFilesystems,
        MountState,
        ReadModuleIndex,
        StartK3sPrep { state: bool },
        ReleaseK3sPrep,
        WatchPowerButton,
        DisableCtrlAltDel,
        Coldplug,
        Milestone(&'static str),
        OnHetzner,
        StartNetwork,
        Rejected(Source),
        StartTimeSync(Vec<String>),
        StartTestService,
        StartApi(Source),
        ReportResources,
        Join(String),
    }

    /// The machine as a list of the steps taken, with STATE and the sources scripted.
    struct Recording {
        root: tempfile::TempDir,
        state: bool,
        steps: Vec<Step>,
    }

    impl Recording {
        fn new(state: bool) -> Recording {
            Recording {
                root: tempfile::tempdir().expect("tempdir"),
                state,
                steps: Vec::new(),
            }
        }

        fn put(&self, rel: &str, text: &str) {
            let p = self.root.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }

        fn boot(mut self) -> Vec<Step> {
            boot(&mut self);
            self.steps
        }
    }

    impl Sources for Recording {
        fn root(&self) -> &Path {
            self.root.path()
        }
        fn state_mounted(&self) -> bool {
            self.state
        }
        fn on_hetzner(&mut self) -> bool {
            self.steps.push(Step::OnHetzner);
            false
        }
        fn start_network(&mut self, _: Option<&MachineConfig>) {
            self.steps.push(Step::StartNetwork);
        }
        fn fetch_metadata(&mut self) -> Option<Metadata> {
            unreachable!("not on Hetzner")
        }
        fn apply_static_network(&mut self, _: &MachineConfig) {
            unreachable!("not on Hetzner")
        }
        fn apply_metadata(&mut self, _: &Metadata, _: Option<&MachineConfig>) {
            unreachable!("not on Hetzner")
        }
        fn rejected(&mut self, err: &SourceError) {
            if let SourceError::Invalid(source, _) = err {
                self.steps.push(Step::Rejected(*source));
            }
        }
    }

    impl Machine for Recording {
        fn mount_kernel_filesystems(&mut self) {
            self.steps.push(Step::MountKernelFilesystems);
        }
        fn mount_state(&mut self) -> bool {
            self.steps.push(Step::MountState);
            self.state
        }
        fn read_module_index(&mut self) {
            self.steps.push(Step::ReadModuleIndex);
        }
        fn start_k3s_prep(&mut self, state_mounted: bool) {
            self.steps.push(Step::StartK3sPrep {
                state: state_mounted,
            });
        }
        fn release_k3s_prep(&mut self) {
            self.steps.push(Step::ReleaseK3sPrep);
        }
        fn watch_power_button(&mut self) {
            self.steps.push(Step::WatchPowerButton);
        }
        fn disable_ctrl_alt_del(&mut self) {
            self.steps.push(Step::DisableCtrlAltDel);
        }
        fn coldplug(&mut self) {
            self.steps.push(Step::Coldplug);
        }
        fn milestone(&mut self, milestone: Milestone) {
            self.steps.push(Step::Milestone(milestone.name()));
        }
        fn start_time_sync(&mut self, servers: Vec<String>) {
            self.steps.push(Step::StartTimeSync(servers));
        }
        fn start_test_service(&mut self) {
            self.steps.push(Step::StartTestService);
        }
        fn start_api(&mut self, chosen: &Chosen) {
            self.steps.push(Step::StartApi(chosen.source));
        }
        fn report_resources(&mut self) {
            self.steps.push(Step::ReportResources);
        }
        fn join(&mut self, config: MachineConfig) {
            let server = config.cluster.map(|c| c.server.as_str().to_owned());
            self.steps.push(Step::Join(server.unwrap_or_default()));
        }
    }

    const API: &str = "[api]\nca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\ncert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\nkey = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n";

    fn standby_config() -> String {
        format!("version = 1\n[network]\nntp = [\"10.0.2.2\"]\n{API}")
    }

    fn join_config() -> String {
        format!(
            "version = 1\n[node]\nhostname = \"w1\"\n{API}[cluster]\nserver = \"https://10.0.0.1:6443\"\ntoken = \"K10{}::server:secret\"\n",
            "ab".repeat(32)
        )
    }

    /// Every step up to `ready`, with STATE mounted or not.
    fn up_to_ready(state: bool) -> Vec<Step> {
        // The drivers before anything else; K3s's preparation started (not awaited,
        // and held back until standby) before `ready`, with STATE's part only with
        // STATE, so that its slot is filled before the node API can take a promotion.
        vec![
            Step::MountKernelFilesystems,
            Step::MountState,
            Step::ReadModuleIndex,
            Step::Coldplug,
            Step::StartK3sPrep { state },
            Step::WatchPowerButton,
            Step::DisableCtrlAltDel,
            Step::Milestone("ready"),
            Step::OnHetzner,
        ]
    }

    #[test]
    fn a_standby_config_from_fw_cfg_boots_to_standby_with_the_api_and_time_sync() {
        let node = Recording::new(true);
        node.put(FW_CFG, &standby_config());
        let steps = node.boot();
        let mut expected = up_to_ready(true);
        expected.extend([
            Step::StartNetwork,
            Step::StartTimeSync(vec!["10.0.2.2".into()]),
            Step::StartTestService,
            Step::StartApi(Source::FwCfg),
            Step::ReportResources,
            Step::Milestone("standby"),
            Step::ReleaseK3sPrep,
        ]);
        assert_eq!(steps, expected);
    }

    #[test]
    fn a_config_with_a_cluster_joins_after_standby() {
        let node = Recording::new(true);
        node.put(STATE_CONFIG, &join_config());
        let steps = node.boot();
        let tail = &steps[steps.len() - 5..];
        assert_eq!(
            tail,
            [
                Step::StartApi(Source::State),
                Step::ReportResources,
                Step::Milestone("standby"),
                Step::ReleaseK3sPrep,
                Step::Join("https://10.0.0.1:6443".into()),
            ]
        );
    }

    #[test]
    fn without_state_nothing_is_prepared_on_it_and_its_config_is_not_read() {
        let node = Recording::new(false);
        node.put(STATE_CONFIG, &join_config());
        let steps = node.boot();
        let mut expected = up_to_ready(false);
        expected.extend([
            Step::StartNetwork,
            Step::StartTimeSync(vec![]),
            Step::StartTestService,
            Step::ReportResources,
            Step::Milestone("standby"),
            Step::ReleaseK3sPrep,
        ]);
        assert_eq!(steps, expected);
    }

    #[test]
    fn an_invalid_state_config_is_reported_and_fw_cfg_serves_instead() {
        let node = Recording::new(true);
        node.put(
            STATE_CONFIG,
            &join_config().replace("[node]\n", "[node]\nx = 1\n"),
        );
        node.put(FW_CFG, &standby_config());
        let steps = node.boot();
        assert!(steps.contains(&Step::Rejected(Source::State)), "{steps:?}");
        assert!(steps.contains(&Step::StartApi(Source::FwCfg)), "{steps:?}");
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Join(_))),
            "{steps:?}"
        );
    }
}
