//! Stage 1: from the initramfs to the verified root.

use crate::boot::mounts::{self, MountError};
use crate::kmod::modules::{self, ModuleError};
use crate::kmod::parallel::{Finit, Loader};
use crate::pid1::console;
use crate::storage::dm;
use crate::storage::partition::{self, PartitionError};
use crate::sys::{Real, System};
use basalt_api::bootparams::{BootParams, BootParamsError};
use basalt_api::milestone::Milestone;
use nix::errno::Errno;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the verified root is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";
/// Name of the device-mapper device over the active slot.
pub const DM_NAME: &str = "basalt-root";
/// How long to wait for the root partition to appear.
pub const DISK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error("early mounts")]
    Mount(#[from] MountError),
    #[error("read {0}")]
    Cmdline(PathBuf, #[source] std::io::Error),
    #[error("boot parameters")]
    Params(#[from] BootParamsError),
    #[error("storage modules")]
    Modules(#[from] ModuleError),
    #[error("root disk")]
    Disk(#[from] PartitionError),
    #[error("set up dm-verity over {partition} ({device})")]
    Verity {
        partition: &'static str,
        device: String,
        #[source]
        source: dm::DmError,
    },
    #[error("dm-verity rejected {partition} ({device}): the root filesystem is corrupted (verity status {status:?})")]
    Corrupted {
        partition: &'static str,
        device: String,
        status: String,
    },
    #[error("mount verified root {device} on {NEW_ROOT}")]
    MountRoot {
        device: String,
        #[source]
        source: Errno,
    },
    #[error("switch root to {NEW_ROOT}")]
    SwitchRoot(#[source] Errno),
}

/// The machine below stage 1: syscalls, device-mapper and where /proc, /sys, /dev are.
pub struct Env<'a> {
    pub sys: &'a mut dyn System,
    /// Loads the initramfs's modules (several at once).
    pub loader: &'a dyn Loader,
    pub dm: &'a mut dyn VerityOpener,
    pub root: PathBuf,
    pub disk_timeout: Duration,
}

/// Device-mapper, as stage 1 uses it; a trait so the plan runs against a fake.
pub trait VerityOpener {
    /// Creates the verity device; returns its (major, minor).
    fn open(&mut self, name: &str, sectors: u64, params: &str) -> Result<(u32, u32), dm::DmError>;
    fn status(&mut self, name: &str) -> Result<String, dm::DmError>;
}

struct RealDm {
    dev_root: PathBuf,
}

impl VerityOpener for RealDm {
    fn open(&mut self, name: &str, sectors: u64, params: &str) -> Result<(u32, u32), dm::DmError> {
        let target = dm::Target {
            start: 0,
            sectors,
            kind: "verity",
            params,
        };
        dm::Control::open(&self.dev_root)?.create(name, &[target], true)
    }

    fn status(&mut self, name: &str) -> Result<String, dm::DmError> {
        dm::Control::open(&self.dev_root)?.status(name)
    }
}

/// Runs stage 1 and execs stage 2; never returns.
pub fn run() -> ! {
    console::milestone(Milestone::InitStart);
    let mut sys = Real;
    let mut dm = RealDm {
        dev_root: PathBuf::from("/dev"),
    };
    let mut env = Env {
        sys: &mut sys,
        loader: &Finit,
        dm: &mut dm,
        root: PathBuf::from("/"),
        disk_timeout: DISK_TIMEOUT,
    };
    if let Err(e) = boot(&mut env) {
        fatal(&e, Path::new("/"))
    }
    // The console queue does not survive the exec.
    console::flush(console::FLUSH_TIMEOUT);
    let err = exec_stage2();
    fatal(&err, Path::new("/"))
}

/// Whether this boot is the one-shot trial of a new slot: the slot on the command line
/// (`basalt.slot=`) is not GRUB's default (`saved_entry` in the ESP's environment
/// block). `None` when either cannot be read.
fn trial_boot(root: &Path) -> Option<bool> {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).ok()?;
    let params = BootParams::parse(&cmdline).ok()?;
    let esp = partition::find(&root.join("sys"), basalt_api::layout::Partition::Efi.name())?;
    let dev = root.join("dev").join(&esp.name);
    let env = crate::upgrade::esp::Esp::open(&dev).ok()?.read_env().ok()?;
    Some(crate::upgrade::trial::saved(&env) != params.slot.as_str())
}

/// Everything from the early mounts to the switch into the verified root.
pub fn boot(env: &mut Env<'_>) -> Result<BootParams, Stage1Error> {
    mounts::apply(env.sys, &env.root, mounts::EARLY)?;
    console::replay_to_kmsg(Milestone::InitStart);
    let cmdline_path = env.root.join("proc/cmdline");
    let cmdline = std::fs::read_to_string(&cmdline_path)
        .map_err(|e| Stage1Error::Cmdline(cmdline_path, e))?;
    let params = BootParams::parse(&cmdline)?;

    console::timed("initrd-modules", || {
        modules::load_list(env.loader, &env.root, Path::new(modules::INITRD_MODULES))
    })?;
    let partition = params.slot.partition_name();
    let part = console::timed("disk-wait", || {
        partition::wait(&env.root.join("sys"), partition, env.disk_timeout)
    })?;
    let device = format!("{} ({}:{})", part.name, part.major, part.minor);

    let table = dm::verity_params(&format!("{}:{}", part.major, part.minor), &params.verity);
    let (_, minor) = env
        .dm
        .open(DM_NAME, params.verity.data_sectors(), &table)
        .map_err(|source| Stage1Error::Verity {
            partition,
            device: device.clone(),
            source,
        })?;
    console::milestone(Milestone::RootVerified);
    // A test image made to hang here, in the kernel, on its trial boot
    // (`testd.hang=stage1-io`; testd feature only).
    #[cfg(feature = "testd")]
    crate::testd::hang_stage1_io_if_asked(
        &env.root,
        &format!("{}:{}", part.major, part.minor),
        || trial_boot(&env.root),
    );

    let new_root = env.root.join(NEW_ROOT.trim_start_matches('/'));
    let _ = env.sys.mkdir(&new_root);
    let dm_dev = env.root.join(format!("dev/dm-{minor}"));
    let mounted = env.sys.mount(
        &dm_dev.to_string_lossy(),
        &new_root,
        Some("squashfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    );
    if let Err(source) = mounted {
        // A verity failure surfaces as a plain I/O error from the filesystem; the target's
        // status tells the two apart.
        return Err(match env.dm.status(DM_NAME) {
            Ok(status) if status.trim() == "C" => Stage1Error::Corrupted {
                partition,
                device,
                status,
            },
            _ => Stage1Error::MountRoot {
                device: dm_dev.display().to_string(),
                source,
            },
        });
    }
    console::milestone(Milestone::RootMounted);

    mounts::move_early(env.sys, &new_root)?;
    env.sys
        .switch_root(&new_root)
        .map_err(Stage1Error::SwitchRoot)?;
    Ok(params)
}

fn exec_stage2() -> Errno {
    match nix::unistd::execv(c"/sbin/init", &[c"/sbin/init"]) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Stage 1 cannot go on: say why on the console and power off, so that the failure is
/// visible from outside (a stopped server) instead of a kernel panic loop. Except on the
/// trial boot of a new slot (a dm-verity failure of a slot written by an upgrade, say):
/// GRUB has already cleared that one-shot boot, so a reboot runs the good slot again,
/// which then records the rollback (issue 16: no human involved).
fn fatal(err: &dyn std::error::Error, root: &Path) -> ! {
    console::error("stage 1 failed", err);
    let trial = trial_boot(root) == Some(true);
    let (mode, what) = if trial {
        (
            nix::sys::reboot::RebootMode::RB_AUTOBOOT,
            "this is the trial boot of a new slot: rebooting into GRUB's default slot in 3 s",
        )
    } else {
        (
            nix::sys::reboot::RebootMode::RB_POWER_OFF,
            "powering off in 3 s",
        )
    };
    console::info(what);
    console::flush(console::FLUSH_TIMEOUT);
    std::thread::sleep(Duration::from_secs(3));
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(mode);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use basalt_api::bootparams::{Slot, Verity};
    use basalt_api::layout::Partition;

    struct FakeDm {
        opened: Vec<(String, u64, String)>,
        status: &'static str,
    }

    impl VerityOpener for FakeDm {
        fn open(
            &mut self,
            name: &str,
            sectors: u64,
            params: &str,
        ) -> Result<(u32, u32), dm::DmError> {
            self.opened.push((name.into(), sectors, params.into()));
            Ok((253, 0))
        }
        fn status(&mut self, _: &str) -> Result<String, dm::DmError> {
            Ok(self.status.into())
        }
    }

    /// Records the modules loaded, in the order loaded.
    #[derive(Default)]
    struct Loads(std::sync::Mutex<Vec<PathBuf>>);

    impl Loader for Loads {
        fn load(&self, path: &Path) -> std::io::Result<()> {
            self.0.lock().expect("lock").push(path.to_path_buf());
            Ok(())
        }
    }

    fn run(root: &Path, sys: &mut Recording, dm: &mut FakeDm) -> Result<BootParams, Stage1Error> {
        run_loading(root, sys, &Loads::default(), dm)
    }

    fn run_loading(
        root: &Path,
        sys: &mut Recording,
        loads: &Loads,
        dm: &mut FakeDm,
    ) -> Result<BootParams, Stage1Error> {
        boot(&mut Env {
            sys,
            loader: loads,
            dm,
            root: root.into(),
            disk_timeout: Duration::from_millis(30),
        })
    }

    fn params() -> BootParams {
        BootParams {
            slot: Slot::A,
            verity: Verity {
                root_hash: "cd".repeat(32),
                salt: "00".into(),
                data_blocks: 10,
            },
        }
    }

    /// A fake root with /proc/cmdline, sysfs with the slot's partition and a module list.
    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let p = root.path();
        std::fs::create_dir_all(p.join("proc")).expect("mkdir");
        std::fs::write(
            p.join("proc/cmdline"),
            format!("console=ttyS0 {}\n", params()),
        )
        .expect("write");
        let part = p.join("sys/class/block/vda3");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(
            part.join("uevent"),
            "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTNAME=ROOT-A\n",
        )
        .expect("write");
        std::fs::create_dir_all(p.join("etc/basalt")).expect("mkdir");
        std::fs::write(
            p.join("etc/basalt/initrd-modules"),
            "/lib/modules/6.1.0-t/kernel/dm-mod.ko\n/lib/modules/6.1.0-t/kernel/dm-verity.ko\n",
        )
        .expect("write");
        std::fs::create_dir_all(p.join("lib/modules/6.1.0-t")).expect("mkdir");
        std::fs::write(
            p.join("lib/modules/6.1.0-t/modules.dep"),
            "kernel/dm-mod.ko:\nkernel/dm-verity.ko: kernel/dm-mod.ko\n",
        )
        .expect("write");
        root
    }

    #[test]
    fn boot_plan_mounts_loads_opens_verity_mounts_root_and_switches() {
        let root = fake_root();
        let p = root.path();
        let mut sys = Recording::default();
        let mut dm = FakeDm {
            opened: vec![],
            status: "V",
        };
        let loads = Loads::default();
        assert_eq!(
            run_loading(p, &mut sys, &loads, &mut dm).expect("boots"),
            params()
        );

        let moddir = p.join("lib/modules/6.1.0-t/kernel");
        assert_eq!(
            loads.0.into_inner().expect("lock"),
            [moddir.join("dm-mod.ko"), moddir.join("dm-verity.ko")]
        );
        assert_eq!(
            dm.opened,
            [(
                DM_NAME.to_string(),
                80,
                format!(
                    "1 254:3 254:3 4096 4096 10 11 sha256 {} 00",
                    "cd".repeat(32)
                )
            )]
        );
        let root_mount = sys.calls.iter().find_map(|c| match c {
            Call::Mount {
                source,
                target,
                fstype,
                flags,
            } if *target == p.join("newroot") => Some((source.clone(), fstype.clone(), *flags)),
            _ => None,
        });
        let (source, fstype, flags) = root_mount.expect("root mounted");
        assert_eq!(source, p.join("dev/dm-0").to_string_lossy());
        assert_eq!(fstype.as_deref(), Some("squashfs"));
        assert!(flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(sys.calls.last(), Some(&Call::SwitchRoot(p.join("newroot"))));
    }

    #[test]
    fn a_corrupted_root_is_reported_as_a_verity_failure() {
        let root = fake_root();
        let p = root.path();
        let mut sys = Recording {
            failing_mounts: vec![(p.join("newroot"), Errno::EIO)],
            ..Default::default()
        };
        let mut dm = FakeDm {
            opened: vec![],
            status: "C",
        };
        let err = run(p, &mut sys, &mut dm).unwrap_err();
        assert!(
            matches!(
                err,
                Stage1Error::Corrupted {
                    partition: p,
                    ..
                } if p == Partition::RootA.name()
            ),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .contains(&format!("dm-verity rejected {}", Partition::RootA)));
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::SwitchRoot(_))));
    }

    #[test]
    fn a_missing_partition_stops_before_device_mapper() {
        let root = fake_root();
        let p = root.path();
        std::fs::remove_dir_all(p.join("sys/class/block/vda3")).expect("rm");
        let mut sys = Recording::default();
        let mut dm = FakeDm {
            opened: vec![],
            status: "V",
        };
        let err = run(p, &mut sys, &mut dm).unwrap_err();
        assert!(matches!(err, Stage1Error::Disk(_)), "{err:?}");
        assert!(dm.opened.is_empty());
    }
}
