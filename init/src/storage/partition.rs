//! Finding a partition by its GPT name through sysfs, without udev: the kernel puts
//! `PARTNAME=` into each partition's `uevent`.
//!
//! Stage 1 looks for the root slot on any disk: dm-verity then refuses whatever does not
//! match the root hash on the command line. Stage 2 looks for STATE only on the disk that
//! holds the verified root ([`wait_on_root_disk`]): STATE has no hash to check, and an
//! attached volume with a partition named `STATE` must not bring its config, and its
//! `[api] ca`, to the node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `vda3`; the node is `/dev/<name>`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

impl BlockDev {
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("no partition named {name} appeared under {sys}/class/block within {timeout:?}")]
    NotFound {
        name: String,
        sys: PathBuf,
        timeout: Duration,
    },
    #[error("no partition named {name} on {disk}, the disk of the verified root ({sys}/block/{disk}), within {timeout:?}")]
    NotOnRootDisk {
        name: String,
        disk: String,
        sys: PathBuf,
        timeout: Duration,
    },
    #[error("the disk of the verified root: {why} (under {sys}/class/block)")]
    RootDisk { why: String, sys: PathBuf },
}

/// Looks once for a partition called `partname`; the first in kernel-name order wins.
pub fn find(sys_root: &Path, partname: &str) -> Option<BlockDev> {
    find_on(&sys_root.join("class/block"), partname)
}

fn parse_uevent(uevent: &str, partname: &str) -> Option<BlockDev> {
    let field = |key: &str| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    if field("PARTNAME")? != partname || field("DEVTYPE")? != "partition" {
        return None;
    }
    Some(BlockDev {
        name: field("DEVNAME")?.to_owned(),
        major: field("MAJOR")?.parse().ok()?,
        minor: field("MINOR")?.parse().ok()?,
    })
}

/// Polls until the partition appears, at most `timeout`.
pub fn wait(
    sys_root: &Path,
    partname: &str,
    timeout: Duration,
) -> Result<BlockDev, PartitionError> {
    poll(timeout, || find(sys_root, partname)).ok_or_else(|| PartitionError::NotFound {
        name: partname.into(),
        sys: sys_root.into(),
        timeout,
    })
}

/// Polls, at most `timeout`, for a partition called `partname` on the disk that holds the
/// device-mapper device `dm_name` (the verified root); a partition of that name on any
/// other disk is never taken.
pub fn wait_on_root_disk(
    sys_root: &Path,
    dm_name: &str,
    partname: &str,
    timeout: Duration,
) -> Result<BlockDev, PartitionError> {
    let disk = disk_under_dm(sys_root, dm_name)?;
    poll(timeout, || find_on(&disk, partname)).ok_or_else(|| PartitionError::NotOnRootDisk {
        name: partname.into(),
        disk: disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sys: sys_root.into(),
        timeout,
    })
}

fn poll(timeout: Duration, mut look: impl FnMut() -> Option<BlockDev>) -> Option<BlockDev> {
    let start = Instant::now();
    loop {
        if let Some(dev) = look() {
            return Some(dev);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The sysfs folder of the whole disk under the device-mapper device `dm_name`: the one
/// entry of the dm device's `slaves/` is the partition it sits on, whose folder sits in
/// its disk's (`/sys/devices/.../block/vda/vda3`).
pub fn disk_under_dm(sys_root: &Path, dm_name: &str) -> Result<PathBuf, PartitionError> {
    let err = |why: String| PartitionError::RootDisk {
        why,
        sys: sys_root.into(),
    };
    let class = sys_root.join("class/block");
    let mut entries: Vec<_> = std::fs::read_dir(&class)
        .map_err(|e| err(format!("read {}: {e}", class.display())))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let dm = entries
        .into_iter()
        .find(|dir| std::fs::read_to_string(dir.join("dm/name")).is_ok_and(|n| n.trim() == dm_name))
        .ok_or_else(|| err(format!("no device-mapper device named {dm_name}")))?;
    let slaves_dir = dm.join("slaves");
    let slaves: Vec<_> = std::fs::read_dir(&slaves_dir)
        .map_err(|e| err(format!("read {}: {e}", slaves_dir.display())))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let [part] = slaves.as_slice() else {
        return Err(err(format!(
            "{} lists {} devices, not the one partition under {dm_name}",
            slaves_dir.display(),
            slaves.len()
        )));
    };
    let real = part
        .canonicalize()
        .map_err(|e| err(format!("resolve {}: {e}", part.display())))?;
    // A partition's folder holds a `partition` file; its parent is the disk.
    if !real.join("partition").exists() {
        return Err(err(format!(
            "{dm_name} sits on {}, which is not a partition",
            real.display()
        )));
    }
    real.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| err(format!("{} has no parent disk", real.display())))
}

/// Looks once, among the devices in the sysfs folder `disk` (a disk's folder, or
/// `class/block` for every disk), for a partition called `partname`; the first in
/// kernel-name order wins.
pub fn find_on(disk: &Path, partname: &str) -> Option<BlockDev> {
    let mut entries: Vec<_> = std::fs::read_dir(disk)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries.iter().find_map(|dir| {
        let uevent = std::fs::read_to_string(dir.join("uevent")).ok()?;
        parse_uevent(&uevent, partname)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::layout::Partition;

    fn add(sys: &Path, dev: &str, uevent: &str) {
        let dir = sys.join("class/block").join(dev);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("uevent"), uevent).expect("write");
    }

    #[test]
    fn finds_the_named_partition_and_ignores_others() {
        let sys = tempfile::tempdir().expect("tempdir");
        add(
            sys.path(),
            "vda",
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        );
        add(
            sys.path(),
            "vda2",
            &format!(
                "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME={}\n",
                Partition::Efi
            ),
        );
        add(
            sys.path(),
            "vda3",
            &format!(
                "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME={}\n",
                Partition::RootA
            ),
        );
        let dev = find(sys.path(), Partition::RootA.name()).expect("found");
        assert_eq!(
            dev,
            BlockDev {
                name: "vda3".into(),
                major: 254,
                minor: 3
            }
        );
        assert_eq!(dev.dev_path(), PathBuf::from("/dev/vda3"));
        assert_eq!(find(sys.path(), Partition::RootB.name()), None);
    }

    #[test]
    fn wait_gives_up_after_the_bound_and_names_the_partition() {
        let sys = tempfile::tempdir().expect("tempdir");
        let root_a = Partition::RootA.name();
        let err = wait(sys.path(), root_a, Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains(root_a), "{err}");
    }

    /// A disk and its partitions as the kernel lays them out: the folders under
    /// `block/<disk>/`, linked from `class/block`.
    fn disk(sys: &Path, disk: &str, parts: &[(&str, &str)]) {
        let class = sys.join("class/block");
        std::fs::create_dir_all(&class).expect("mkdir");
        let dir = sys.join("block").join(disk);
        std::fs::create_dir_all(dir.join("queue")).expect("mkdir");
        std::fs::write(
            dir.join("uevent"),
            format!("MAJOR=8\nMINOR=0\nDEVNAME={disk}\nDEVTYPE=disk\n"),
        )
        .expect("write");
        std::os::unix::fs::symlink(format!("../../block/{disk}"), class.join(disk)).expect("link");
        for (n, (part, name)) in parts.iter().enumerate() {
            let p = dir.join(part);
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(
                p.join("uevent"),
                format!("MAJOR=8\nMINOR={}\nDEVNAME={part}\nDEVTYPE=partition\nPARTN={}\nPARTNAME={name}\n", n + 1, n + 1),
            )
            .expect("write");
            std::fs::write(p.join("partition"), format!("{}\n", n + 1)).expect("write");
            std::os::unix::fs::symlink(format!("../../block/{disk}/{part}"), class.join(part))
                .expect("link");
        }
    }

    /// The verified root, `dm_name`, over partition `part` of `disk`.
    fn verity_over(sys: &Path, dm_name: &str, disk: &str, part: &str) {
        let dm = sys.join("block/dm-0");
        std::fs::create_dir_all(dm.join("dm")).expect("mkdir");
        std::fs::create_dir_all(dm.join("slaves")).expect("mkdir");
        std::fs::write(dm.join("dm/name"), format!("{dm_name}\n")).expect("write");
        std::os::unix::fs::symlink(format!("../../{disk}/{part}"), dm.join("slaves").join(part))
            .expect("link");
        std::os::unix::fs::symlink("../../block/dm-0", sys.join("class/block/dm-0")).expect("link");
    }

    const DM: &str = "basalt-root";

    /// The image's disk (vda) and an attached volume (sda, first in name order) that has
    /// partitions named like the image's.
    fn two_disks(sys: &Path) {
        let state = Partition::State.name();
        disk(
            sys,
            "sda",
            &[("sda1", state), ("sda2", Partition::RootA.name())],
        );
        disk(
            sys,
            "vda",
            &[
                ("vda1", "BIOS"),
                ("vda2", Partition::Efi.name()),
                ("vda3", Partition::RootA.name()),
                ("vda4", Partition::RootB.name()),
                ("vda5", state),
            ],
        );
    }

    #[test]
    fn state_is_taken_only_from_the_verified_roots_disk() {
        let sys = tempfile::tempdir().expect("tempdir");
        two_disks(sys.path());
        verity_over(sys.path(), DM, "vda", "vda3");
        let state = Partition::State.name();
        // By name alone, the attached volume wins: the defect.
        assert_eq!(find(sys.path(), state).map(|d| d.name), Some("sda1".into()));
        let dev = wait_on_root_disk(sys.path(), DM, state, Duration::ZERO).expect("found");
        assert_eq!(dev.name, "vda5");
        // Verity over the volume's copy of the root: then the volume is the root's disk.
        let other = tempfile::tempdir().expect("tempdir");
        two_disks(other.path());
        verity_over(other.path(), DM, "sda", "sda2");
        let dev = wait_on_root_disk(other.path(), DM, state, Duration::ZERO).expect("found");
        assert_eq!(dev.name, "sda1");
    }

    #[test]
    fn a_state_on_another_disk_only_is_not_found_and_the_root_disk_is_named() {
        let sys = tempfile::tempdir().expect("tempdir");
        disk(sys.path(), "sda", &[("sda1", Partition::State.name())]);
        disk(sys.path(), "vda", &[("vda3", Partition::RootA.name())]);
        verity_over(sys.path(), DM, "vda", "vda3");
        let err = wait_on_root_disk(
            sys.path(),
            DM,
            Partition::State.name(),
            Duration::from_millis(30),
        )
        .unwrap_err();
        assert!(
            matches!(&err, PartitionError::NotOnRootDisk { disk, .. } if disk == "vda"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("STATE") && text.contains("verified root"),
            "{text}"
        );
    }

    #[test]
    fn without_the_verified_root_no_disk_is_trusted() {
        let sys = tempfile::tempdir().expect("tempdir");
        two_disks(sys.path());
        // No dm device at all, or one of another name.
        let err =
            wait_on_root_disk(sys.path(), DM, Partition::State.name(), Duration::ZERO).unwrap_err();
        assert!(
            matches!(&err, PartitionError::RootDisk { why, .. } if why.contains(DM)),
            "{err:?}"
        );
        verity_over(sys.path(), "something-else", "vda", "vda3");
        assert!(matches!(
            wait_on_root_disk(sys.path(), DM, Partition::State.name(), Duration::ZERO),
            Err(PartitionError::RootDisk { .. })
        ));
    }
}
