//! The kernel filesystems as a table, applied by one idempotent function (Kata's
//! `mount.rs` pattern: "already mounted" is success).

use crate::sys::System;
use nix::errno::Errno;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NODEV_NOSUID_NOEXEC: MsFlags = MsFlags::MS_NODEV
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NOEXEC);

/// What stage 1 mounts before anything else; stage 1 moves them into the real root.
pub const EARLY: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NODEV_NOSUID_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NODEV_NOSUID_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NODEV.union(MsFlags::MS_NOSUID),
        data: Some("mode=0755"),
    },
];

/// What stage 2 adds on the read-only root.
pub const LATE: &[Mount] = &[Mount {
    source: "tmpfs",
    target: "/tmp",
    fstype: "tmpfs",
    flags: MsFlags::MS_NODEV.union(MsFlags::MS_NOSUID),
    data: Some("mode=1777"),
}];

#[derive(Debug, thiserror::Error)]
#[error("mount {fstype} on {target}")]
pub struct MountError {
    pub fstype: String,
    pub target: PathBuf,
    #[source]
    pub source: Errno,
}

/// Mounts each entry under `root`; an entry already mounted (EBUSY) counts as done.
pub fn apply(sys: &mut dyn System, root: &Path, table: &[Mount]) -> Result<(), MountError> {
    for m in table {
        let target = root.join(m.target.trim_start_matches('/'));
        // The directory may exist already (or be on a read-only root): ignore mkdir errors,
        // the mount itself reports what matters.
        let _ = sys.mkdir(&target);
        match sys.mount(m.source, &target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(MountError {
                    fstype: m.fstype.into(),
                    target,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Moves the early mounts under `new_root`, ready for the switch.
pub fn move_early(sys: &mut dyn System, new_root: &Path) -> Result<(), MountError> {
    for m in EARLY {
        let target = new_root.join(m.target.trim_start_matches('/'));
        sys.mount(m.target, &target, None, MsFlags::MS_MOVE, None)
            .map_err(|source| MountError {
                fstype: m.fstype.into(),
                target,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};

    #[test]
    fn applies_the_table_in_order_and_tolerates_already_mounted() {
        let mut sys = Recording {
            failing_mounts: vec![(PathBuf::from("/sys"), Errno::EBUSY)],
            ..Default::default()
        };
        apply(&mut sys, Path::new("/"), EARLY).expect("EBUSY is success");
        let targets: Vec<_> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { target, .. } => Some(target.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            ["/proc", "/sys", "/dev", "/run"].map(PathBuf::from)
        );
    }

    #[test]
    fn a_failing_mount_names_target_and_errno() {
        let mut sys = Recording {
            failing_mounts: vec![(PathBuf::from("/dev"), Errno::ENODEV)],
            ..Default::default()
        };
        let err = apply(&mut sys, Path::new("/"), EARLY).unwrap_err();
        assert_eq!(err.target, PathBuf::from("/dev"));
        assert_eq!(err.source, Errno::ENODEV);
        assert_eq!(err.to_string(), "mount devtmpfs on /dev");
    }
}
