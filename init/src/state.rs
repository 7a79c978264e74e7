//! STATE: the writable ext4 partition that carries what a node keeps across boots
//! (machine config, node identity, `/var`). Stage 2 mounts it on `/var`.

use crate::partition::{self, BlockDev, NotFound};
use crate::sys::System;
use nix::mount::MsFlags;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GPT name of the partition.
pub const PARTITION: &str = "STATE";
/// Where it is mounted.
pub const MOUNT_POINT: &str = "/var";
/// Boot counter, relative to the mount point.
pub const BOOTS: &str = "lib/basalt/boots";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("find the STATE partition")]
    Find(#[from] NotFound),
    #[error("mount {device} (ext4) on {MOUNT_POINT}")]
    Mount {
        device: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// What stage 2 reports about STATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub device: BlockDev,
    /// This boot's number on this STATE (1 on first boot).
    pub boot: u64,
}

/// Finds STATE, mounts it on `/var` under `root`, counts the boot.
pub fn mount(sys: &mut dyn System, root: &Path, timeout: Duration) -> Result<Mounted, StateError> {
    let device = partition::wait(&root.join("sys"), PARTITION, timeout)?;
    let target = root.join(MOUNT_POINT.trim_start_matches('/'));
    let dev_path = root.join("dev").join(&device.name);
    sys.mount(
        &dev_path.to_string_lossy(),
        &target,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None,
    )
    .map_err(|source| StateError::Mount {
        device: dev_path.display().to_string(),
        source,
    })?;
    let boot = count_boot(&target.join(BOOTS))?;
    Ok(Mounted { device, boot })
}

/// Increments the counter file (a missing or unreadable one counts as 0).
pub fn count_boot(path: &Path) -> Result<u64, StateError> {
    let previous = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let boot = previous + 1;
    write_atomic(path, format!("{boot}\n").as_bytes())
        .map_err(|e| StateError::Write(path.into(), e))?;
    Ok(boot)
}

/// Temporary file beside the target, fsync, rename, fsync the folder: after a crash
/// the file holds either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};

    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let part = root.path().join("sys/class/block/vda5");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(
            part.join("uevent"),
            "MAJOR=254\nMINOR=5\nDEVNAME=vda5\nDEVTYPE=partition\nPARTNAME=STATE\n",
        )
        .expect("write");
        root
    }

    #[test]
    fn mounts_state_on_var_and_counts_boots() {
        let root = fake_root();
        let p = root.path();
        for expected in 1..=3 {
            let mut sys = Recording::default();
            let m = mount(&mut sys, p, Duration::from_millis(20)).expect("mounted");
            assert_eq!(m.boot, expected);
            assert_eq!(m.device.name, "vda5");
            assert_eq!(
                sys.calls,
                [Call::Mount {
                    source: p.join("dev/vda5").to_string_lossy().into_owned(),
                    target: p.join("var"),
                    fstype: Some("ext4".into()),
                    flags: MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                }]
            );
        }
        assert_eq!(
            std::fs::read_to_string(p.join("var").join(BOOTS)).expect("read"),
            "3\n"
        );
    }

    #[test]
    fn a_failed_mount_names_the_device_and_counts_nothing() {
        let root = fake_root();
        let p = root.path();
        let mut sys = Recording {
            failing_mounts: vec![(p.join("var"), nix::errno::Errno::EINVAL)],
            ..Default::default()
        };
        let err = mount(&mut sys, p, Duration::from_millis(20)).unwrap_err();
        assert!(err.to_string().contains("vda5"), "{err}");
        assert!(!p.join("var").join(BOOTS).exists());
    }

    #[test]
    fn a_garbled_counter_restarts_at_one_and_no_temp_file_is_left() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("lib/basalt/boots");
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, "garbage").expect("write");
        assert_eq!(count_boot(&f).expect("count"), 1);
        let names: Vec<_> = std::fs::read_dir(f.parent().expect("parent"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["boots"]);
    }
}
