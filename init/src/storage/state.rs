//! STATE: the writable ext4 partition that carries what a node keeps across boots
//! (machine config, node identity, `/var`). Stage 2 mounts it on `/var`, first growing it
//! to the end of a disk larger than the image ([`grow`]).

use crate::atomic_file;
use crate::pid1::console;
use crate::storage::grow::{self, GrowError, Resize, Sectors};
use crate::storage::partition::{self, BlockDev, NotFound};
use crate::sys::System;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GPT name of the partition.
pub const PARTITION: &str = basalt_api::layout::Partition::State.name();
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

/// A console line, gathered while mounting so that tests read what the console would.
#[derive(Debug)]
pub enum Note {
    Info(String),
    /// Growing failed; STATE is used as it is.
    Failed(&'static str, GrowError),
}

/// Finds STATE, grows it if its disk is larger, mounts it on `/var` under `root`, counts
/// the boot; says on the console what it grew and how large STATE is.
pub fn mount(sys: &mut dyn System, root: &Path, timeout: Duration) -> Result<Mounted, StateError> {
    let mut notes = Vec::new();
    let mounted = mount_with(sys, &mut grow::Ioctls, root, timeout, &mut notes);
    for note in &notes {
        match note {
            Note::Info(line) => console::info(line),
            Note::Failed(what, e) => console::error(what, e),
        }
    }
    mounted
}

/// [`mount`] with the resize ioctls and the console lines in the caller's hands. Growing
/// never fails the mount: its errors become notes.
pub fn mount_with(
    sys: &mut dyn System,
    ops: &mut dyn Resize,
    root: &Path,
    timeout: Duration,
    notes: &mut Vec<Note>,
) -> Result<Mounted, StateError> {
    let sys_root = root.join("sys");
    let device = partition::wait(&sys_root, PARTITION, timeout)?;
    let name = &device.name;
    let (just_grown, len) = grow_partition(ops, root, &device, notes);

    let target = root.join(MOUNT_POINT.trim_start_matches('/'));
    let dev_path = root.join("dev").join(name);
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

    if let Some(len) = len {
        match grow::grow_filesystem(ops, &dev_path, &target, len, just_grown) {
            Ok(Some(g)) => notes.push(Note::Info(format!(
                "STATE {name} ext4 grown from {} MiB to {} MiB",
                g.from.bytes() >> 20,
                g.to.bytes() >> 20
            ))),
            Ok(None) => {}
            Err(e) => notes.push(Note::Failed("grow the STATE filesystem", e)),
        }
    }
    match grow::usage(&target) {
        Ok(u) => notes.push(Note::Info(format!(
            "STATE {name}: {} MiB filesystem, {} MiB free",
            u.total >> 20,
            u.free >> 20
        ))),
        Err(e) => notes.push(Note::Failed("STATE size", e)),
    }
    let boot = count_boot(&target.join(BOOTS))?;
    Ok(Mounted { device, boot })
}

/// The partition step: whether STATE just grew, and its length for the ext4 step (`None`
/// when even sysfs cannot say).
fn grow_partition(
    ops: &mut dyn Resize,
    root: &Path,
    device: &BlockDev,
    notes: &mut Vec<Note>,
) -> (bool, Option<Sectors>) {
    let (sys, name) = (root.join("sys"), &device.name);
    match grow::grow_partition(ops, &sys, &root.join("dev"), device, PARTITION) {
        Ok(Some(g)) => {
            if g.repaired {
                notes.push(Note::Info(format!(
                    "STATE {name}: primary GPT restored from the backup"
                )));
            }
            if g.to != g.from {
                notes.push(Note::Info(format!(
                    "STATE {name} grown from {} MiB to {} MiB",
                    g.from.mib(),
                    g.to.mib()
                )));
            }
            (g.to > g.from, Some(g.to))
        }
        Ok(None) => match grow::placement(&sys, name) {
            Ok(at) => (false, Some(at.len)),
            Err(e) => {
                notes.push(Note::Failed("STATE size", e));
                (false, None)
            }
        },
        Err(e) => {
            notes.push(Note::Failed("grow STATE", e));
            // A partition the kernel already has grown (a boot cut short) still gets its
            // ext4 grown; a sysfs error was reported just now.
            (false, grow::placement(&sys, name).ok().map(|at| at.len))
        }
    }
}

/// Increments the counter file (a missing or unreadable one counts as 0).
pub fn count_boot(path: &Path) -> Result<u64, StateError> {
    let previous = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let boot = previous + 1;
    atomic_file::write(path, format!("{boot}\n").as_bytes())
        .map_err(|e| StateError::Write(path.into(), e))?;
    Ok(boot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::grow::fixture::{node, IMAGE, STATE_LEN, STATE_START};
    use crate::storage::grow::{Recording as Ioctls, Resized};
    use crate::sys::{Call, Recording};

    /// A node whose disk is `size` sectors, with `/var` to mount on.
    fn fake_root(size: Sectors) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        node(root.path(), size);
        std::fs::create_dir_all(root.path().join("var")).expect("mkdir");
        root
    }

    /// Resize ioctls that update the fake sysfs and superblock as the kernel would.
    fn kernel(root: &Path) -> Ioctls {
        Ioctls {
            sysfs: Some((root.join("sys"), "vda5".into())),
            ext4_dev: Some(root.join("dev/vda5")),
            ..Default::default()
        }
    }

    fn infos(notes: &[Note]) -> Vec<&str> {
        notes
            .iter()
            .map(|n| match n {
                Note::Info(line) => line.as_str(),
                Note::Failed(what, e) => panic!("{what}: {}", console::chain(e)),
            })
            .collect()
    }

    #[test]
    fn mounts_state_on_var_and_counts_boots() {
        let root = fake_root(IMAGE);
        let p = root.path();
        for expected in 1..=3 {
            let mut sys = Recording::default();
            let mut ops = kernel(p);
            let mut notes = vec![];
            let m = mount_with(&mut sys, &mut ops, p, Duration::from_millis(20), &mut notes)
                .expect("mounted");
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
            // A disk the image's size: nothing to grow, only the size line.
            assert_eq!(ops.calls, []);
            let lines = infos(&notes);
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(lines[0].starts_with("STATE vda5: "), "{lines:?}");
            assert!(lines[0].contains(" MiB filesystem, "), "{lines:?}");
        }
        assert_eq!(
            std::fs::read_to_string(p.join("var").join(BOOTS)).expect("read"),
            "3\n"
        );
    }

    #[test]
    fn first_boot_on_a_larger_disk_grows_state_and_the_second_finds_it_grown() {
        let size = Sectors(IMAGE.0 + Sectors::from_mib(1024).0);
        let root = fake_root(size);
        let p = root.path();
        let mut ops = kernel(p);
        let mut notes = vec![];
        let m = mount_with(
            &mut Recording::default(),
            &mut ops,
            p,
            Duration::from_millis(20),
            &mut notes,
        )
        .expect("mounted");
        assert_eq!(m.boot, 1);
        // 8 MiB, then to the last usable sector: 1024 MiB more, plus the image's 1 MiB
        // tail, less the 33 sectors of the backup GPT.
        let len = Sectors(size.0 - 33 - STATE_START.0);
        assert_eq!(len.mib(), 8 + 1024);
        let lines = infos(&notes);
        assert_eq!(lines[0], "STATE vda5 grown from 8 MiB to 1032 MiB");
        assert_eq!(lines[1], "STATE vda5 ext4 grown from 8 MiB to 1032 MiB");
        assert!(lines[2].starts_with("STATE vda5: "), "{lines:?}");
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            ops.calls,
            [
                Resized::Partition {
                    disk: p.join("dev/vda"),
                    number: 5,
                    start: STATE_START,
                    len,
                },
                Resized::Ext4 {
                    mount_point: p.join("var"),
                    blocks: len.bytes() / 4096,
                }
            ]
        );

        let mut again = kernel(p);
        let mut notes = vec![];
        let m = mount_with(
            &mut Recording::default(),
            &mut again,
            p,
            Duration::from_millis(20),
            &mut notes,
        )
        .expect("mounted");
        assert_eq!(m.boot, 2);
        assert_eq!(again.calls, []);
        let lines = infos(&notes);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("STATE vda5: "), "{lines:?}");
    }

    #[test]
    fn a_failed_grow_is_reported_and_state_is_mounted_as_it_is() {
        let root = fake_root(Sectors(IMAGE.0 + Sectors::from_mib(1024).0));
        let p = root.path();
        let mut ops = Ioctls {
            fail_blkpg: Some(nix::errno::Errno::EINVAL),
            ..kernel(p)
        };
        let mut sys = Recording::default();
        let mut notes = vec![];
        let m = mount_with(&mut sys, &mut ops, p, Duration::from_millis(20), &mut notes)
            .expect("mounted");
        assert_eq!(m.boot, 1);
        assert_eq!(sys.calls.len(), 1);
        assert!(
            matches!(
                &notes[0],
                Note::Failed("grow STATE", GrowError::Blkpg { number: 5, .. })
            ),
            "{notes:?}"
        );
        // The kernel still has the old size: no ext4 resize into space it cannot reach.
        assert!(
            !ops.calls.iter().any(|c| matches!(c, Resized::Ext4 { .. })),
            "{:?}",
            ops.calls
        );
        assert_eq!(
            std::fs::read_to_string(p.join("sys/class/block/vda5/size"))
                .expect("read")
                .trim(),
            STATE_LEN.0.to_string()
        );
        assert!(matches!(&notes[1], Note::Info(l) if l.starts_with("STATE vda5: ")));
    }

    #[test]
    fn a_failed_mount_names_the_device_and_counts_nothing() {
        let root = fake_root(IMAGE);
        let p = root.path();
        let mut sys = Recording {
            failing_mounts: vec![(p.join("var"), nix::errno::Errno::EINVAL)],
            ..Default::default()
        };
        let err = mount_with(
            &mut sys,
            &mut kernel(p),
            p,
            Duration::from_millis(20),
            &mut vec![],
        )
        .unwrap_err();
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
