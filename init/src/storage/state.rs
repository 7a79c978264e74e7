//! STATE: the writable ext4 partition that carries what a node keeps across boots
//! (machine config, node identity, `/var`). Stage 2 mounts it on `/var`, first growing it
//! to the end of a disk larger than the image ([`grow`]).

use crate::atomic_file;
use crate::boot::stage1::DM_NAME;
use crate::pid1::console;
use crate::storage::grow::{self, GrowError, Resize, Sectors};
use crate::storage::partition::{self, BlockDev, PartitionError};
use crate::sys::System;
use nix::errno::Errno;
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
    Find(#[from] PartitionError),
    #[error("mount {device} (ext4) on {MOUNT_POINT}")]
    Mount {
        device: String,
        #[source]
        source: Errno,
    },
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// What stage 2 reports about STATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub device: BlockDev,
    /// This boot's number on this STATE (1 on first boot); None when the counter could
    /// not be written (STATE full, out of inodes, read-only). STATE is mounted all the
    /// same: what it holds (the applied config above all) is still there to be read.
    pub boot: Option<u64>,
}

/// A console line, gathered while mounting so that tests read what the console would.
#[derive(Debug)]
pub enum Note {
    Info(String),
    /// Growing failed; STATE is used as it is.
    Failed(&'static str, GrowError),
    /// Something on STATE could not be written (the boot counter); STATE is used as it is.
    Warn(String),
}

/// Finds STATE on the disk of the verified root, grows it if its disk is larger, mounts
/// it on `/var` under `root`; says on the console what it grew and how large STATE is.
/// The boot is counted beside the boot ([`BootCount`]): the counter's two fsyncs wait on
/// the disk, and nothing before `ready` reads the counter.
pub fn mount(
    sys: &mut dyn System,
    root: &Path,
    timeout: Duration,
) -> Result<(BlockDev, BootCount), StateError> {
    let mut notes = Vec::new();
    let mounted = mount_only(sys, &mut grow::Ioctls, root, timeout, &mut notes);
    for note in &notes {
        match note {
            Note::Info(line) => console::info(line),
            Note::Failed(what, e) => console::error(what, e),
            Note::Warn(line) => console::warn(line),
        }
    }
    let (device, target) = mounted?;
    Ok((device, BootCount::start(target.join(BOOTS))))
}

/// This boot's number on STATE, known at once; its counter file written and synced in a
/// thread of its own (the step `mount-state.count`), which [`BootCount::wait`] joins.
pub struct BootCount {
    number: u64,
    path: PathBuf,
    write: Write,
}

/// The counter's write: in its thread, or done already when no thread could start.
enum Write {
    Beside(std::thread::JoinHandle<Result<(), StateError>>),
    Done(Result<(), StateError>),
}

impl BootCount {
    /// Starts writing the next number.
    pub fn start(path: PathBuf) -> BootCount {
        let number = next_boot(&path);
        let to = path.clone();
        let write = match std::thread::Builder::new()
            .name("boot-count".into())
            .spawn(move || console::timed("mount-state.count", || write_boot(&to, number)))
        {
            Ok(writer) => Write::Beside(writer),
            Err(_) => Write::Done(write_boot(&path, number)),
        };
        BootCount {
            number,
            path,
            write,
        }
    }

    /// The number this boot has once [`BootCount::wait`] says it is written.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Waits for the counter's write: the number, or why the boot is not counted.
    pub fn wait(self) -> Result<u64, StateError> {
        let written = match self.write {
            Write::Done(written) => written,
            Write::Beside(writer) => writer.join().unwrap_or_else(|_| {
                Err(StateError::Write(
                    self.path,
                    std::io::Error::other("its writer panicked"),
                ))
            }),
        };
        written.map(|()| self.number)
    }
}

/// [`mount`] with the resize ioctls and the console lines in the caller's hands. Only
/// finding and mounting STATE can fail: growing it and counting the boot are notes, so a
/// full or read-only STATE is still mounted and its saved config still read.
pub fn mount_with(
    sys: &mut dyn System,
    ops: &mut dyn Resize,
    root: &Path,
    timeout: Duration,
    notes: &mut Vec<Note>,
) -> Result<Mounted, StateError> {
    let (device, target) = mount_only(sys, ops, root, timeout, notes)?;
    let boot = match console::timed("mount-state.count", || count_boot(&target.join(BOOTS))) {
        Ok(n) => Some(n),
        Err(e) => {
            notes.push(Note::Warn(not_counted(&device.name, &e)));
            None
        }
    };
    Ok(Mounted { device, boot })
}

/// The warning for a boot whose counter could not be written.
pub fn not_counted(name: &str, e: &StateError) -> String {
    format!(
        "STATE {name}: boot not counted ({}); STATE is used as it is",
        console::chain(e)
    )
}

/// Finds, grows and mounts STATE: [`mount_with`] without the boot counter. Returns the
/// device and the mount point under `root`.
fn mount_only(
    sys: &mut dyn System,
    ops: &mut dyn Resize,
    root: &Path,
    timeout: Duration,
    notes: &mut Vec<Note>,
) -> Result<(BlockDev, PathBuf), StateError> {
    let sys_root = root.join("sys");
    // Only on the verified root's disk: an attached volume's STATE never wins.
    let device = console::timed("mount-state.find", || {
        partition::wait_on_root_disk(&sys_root, DM_NAME, PARTITION, timeout)
    })?;
    let name = &device.name;
    let (just_grown, len) = console::timed("mount-state.grow-partition", || {
        grow_partition(ops, root, &device, notes)
    });

    let target = root.join(MOUNT_POINT.trim_start_matches('/'));
    let dev_path = root.join("dev").join(name);
    let source = dev_path.to_string_lossy();
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let mount_at = console::uptime();
    let mounted = match sys.mount(&source, &target, Some("ext4"), flags, None) {
        // A read-only device (or a filesystem the kernel will only open read-only):
        // STATE read-only still holds the applied config.
        Err(e @ (Errno::EROFS | Errno::EACCES)) => {
            notes.push(Note::Warn(format!(
                "STATE {name}: read-write mount refused ({e}); mounted read-only"
            )));
            sys.mount(
                &source,
                &target,
                Some("ext4"),
                flags | MsFlags::MS_RDONLY,
                None,
            )
        }
        other => other,
    };
    console::step("mount-state.ext4", mount_at, console::uptime() - mount_at);
    mounted.map_err(|source| StateError::Mount {
        device: dev_path.display().to_string(),
        source,
    })?;

    let grow_at = console::uptime();
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
    console::step(
        "mount-state.grow-ext4",
        grow_at,
        console::uptime() - grow_at,
    );
    Ok((device, target))
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

/// Increments the counter file (a missing or unreadable one counts as 0), replaced
/// whole and synced ([`atomic_file::write`]). Not writing it unsynced saves about 0.1 s
/// under TCG, but then a power cut within seconds of the boot loses that boot's count
/// (e2e `state_survives_a_reboot_of_the_same_disk` kills the VM right after `ready`).
pub fn count_boot(path: &Path) -> Result<u64, StateError> {
    let boot = next_boot(path);
    write_boot(path, boot)?;
    Ok(boot)
}

/// The counter's next number: 1 when the file is missing or unreadable.
fn next_boot(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1
}

/// Replaces the counter with `boot`, whole and synced.
fn write_boot(path: &Path, boot: u64) -> Result<(), StateError> {
    atomic_file::write(path, format!("{boot}\n").as_bytes())
        .map_err(|e| StateError::Write(path.into(), e))
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
                Note::Warn(line) => panic!("{line}"),
            })
            .collect()
    }

    #[test]
    fn the_boot_count_is_known_at_once_and_written_beside() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("boots");
        std::fs::write(&f, "4\n").expect("write");
        let count = BootCount::start(f.clone());
        assert_eq!(count.number(), 5);
        assert_eq!(count.wait().expect("written"), 5);
        assert_eq!(std::fs::read_to_string(&f).expect("read"), "5\n");

        // Under a file, not a folder: the write fails and says where.
        let bad = f.join("boots");
        let count = BootCount::start(bad.clone());
        assert_eq!(count.number(), 1);
        let err = count.wait().expect_err("not a folder");
        let line = not_counted("vda5", &err);
        assert!(line.contains("boot not counted"), "{line}");
        assert!(line.contains(&bad.display().to_string()), "{line}");
        assert_eq!(std::fs::read_to_string(&f).expect("read"), "5\n");
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
            assert_eq!(m.boot, Some(expected));
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
        assert_eq!(m.boot, Some(1));
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
        assert_eq!(m.boot, Some(2));
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
        assert_eq!(m.boot, Some(1));
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
    fn an_attached_volume_with_a_state_partition_is_never_mounted() {
        let root = fake_root(IMAGE);
        let p = root.path();
        // sda sorts before vda: by name alone, the volume's STATE would win.
        let sda1 = p.join("sys/block/sda/sda1");
        std::fs::create_dir_all(&sda1).expect("mkdir");
        std::fs::write(
            sda1.join("uevent"),
            "MAJOR=8\nMINOR=1\nDEVNAME=sda1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=STATE\n",
        )
        .expect("write");
        std::fs::write(sda1.join("partition"), "1\n").expect("write");
        std::os::unix::fs::symlink("../../block/sda/sda1", p.join("sys/class/block/sda1"))
            .expect("link");
        let mut sys = Recording::default();
        let m = mount_with(
            &mut sys,
            &mut kernel(p),
            p,
            Duration::from_millis(20),
            &mut vec![],
        )
        .expect("mounted");
        assert_eq!(m.device.name, "vda5");
        assert!(
            matches!(&sys.calls[..], [Call::Mount { source, .. }] if source.ends_with("dev/vda5")),
            "{:?}",
            sys.calls
        );
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

/// STATE as a real ext4 on a loop device: only a kernel filesystem says what a full, an
/// inode-less or a read-only STATE does to the boot. Needs root (mount, losetup) and
/// mkfs.ext4; skipped without them, except under CI.
#[cfg(test)]
mod on_ext4 {
    use super::*;
    use crate::config_source::{self, Found, Source, STATE_CONFIG};
    use crate::storage::grow::fixture::{node, IMAGE, STATE_LEN};
    use crate::storage::grow::Recording as Ioctls;
    use crate::sys::Real;
    use std::process::Command;

    const SAVED: &str = "version = 1\n[node]\nhostname = \"saved\"\n[api]\nca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\ncert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\nkey = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n";

    /// Whether this test can run; false (with a note) when it cannot, and a failure under
    /// CI, which must never pass by skipping.
    fn can_run() -> bool {
        // SAFETY: geteuid(2) takes nothing and always succeeds.
        let root = unsafe { libc::geteuid() } == 0;
        let tools = ["mkfs.ext4", "losetup"].iter().all(|t| {
            Command::new(t)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if root && tools {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "the STATE-on-ext4 tests need root, mkfs.ext4 and losetup under CI"
        );
        eprintln!("skipped: needs root, mkfs.ext4 and losetup");
        false
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().expect("spawn");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A loop device over an image file; detached on drop.
    struct Loop(PathBuf);

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    /// A mount made here; lazily unmounted on drop, so a failed assertion leaks nothing.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Trouble {
        Full,
        NoInodes,
        ReadOnly,
    }

    /// Writes files of each size in turn into `dir` until the filesystem refuses one.
    fn fill(dir: &Path, sizes: &[usize]) {
        use std::io::Write;
        for (n, &size) in sizes.iter().enumerate() {
            let data = vec![0x5a; size];
            for i in 0.. {
                let written = std::fs::File::create(dir.join(format!("fill{n}-{i}")))
                    .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
                if let Err(e) = written {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    break;
                }
            }
        }
    }

    /// A node whose STATE is a real ext4 that holds an applied config and a boot counter
    /// at 4, in the given trouble (read-only: the loop device itself, as a write-protected
    /// disk is); STATE is not mounted yet.
    fn node_in(trouble: Trouble) -> Option<(tempfile::TempDir, Loop)> {
        if !can_run() {
            return None;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let p = root.path();
        node(p, IMAGE);
        std::fs::create_dir_all(p.join("var")).expect("mkdir");
        let image = p.join("state.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(STATE_LEN.bytes()))
            .expect("image");
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-b", "4096"]);
        if trouble == Trouble::NoInodes {
            mkfs.args(["-N", "16"]);
        }
        run(mkfs.arg(&image));
        let attach = |read_only: bool| {
            let mut losetup = Command::new("losetup");
            losetup.args(["--find", "--show"]);
            if read_only {
                losetup.arg("--read-only");
            }
            Loop(PathBuf::from(run(losetup.arg(&image))))
        };
        let dev = attach(false);

        let prep = p.join("prep");
        std::fs::create_dir_all(&prep).expect("mkdir");
        Real.mount(
            &dev.0.to_string_lossy(),
            &prep,
            Some("ext4"),
            MsFlags::empty(),
            None,
        )
        .expect("mount for preparing");
        let mounted = Mount(prep.clone());
        let saved = prep.join(STATE_CONFIG.trim_start_matches("var/"));
        atomic_file::write_mode(&saved, SAVED.as_bytes(), 0o600).expect("save config");
        atomic_file::write(&prep.join(BOOTS), b"4\n").expect("counter");
        match trouble {
            Trouble::Full => fill(&prep, &[64 * 1024, 4096, 1]),
            Trouble::NoInodes => fill(&prep, &[0]),
            Trouble::ReadOnly => {}
        }
        if trouble != Trouble::ReadOnly {
            // The trouble is real: not even a small new file fits.
            let e = std::fs::write(prep.join("one-more"), b"x").expect_err("STATE has room");
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
        drop(mounted);
        let dev = if trouble == Trouble::ReadOnly {
            drop(dev);
            attach(true)
        } else {
            dev
        };
        // STATE is that device: the fixture's file gives way to it.
        std::fs::remove_file(p.join("dev/vda5")).expect("rm");
        std::os::unix::fs::symlink(&dev.0, p.join("dev/vda5")).expect("link");
        Some((root, dev))
    }

    fn boots_with_its_saved_config(trouble: Trouble) {
        let Some((root, _dev)) = node_in(trouble) else {
            return;
        };
        let p = root.path();
        let mut ops = Ioctls::default();
        let mut notes = vec![];
        let mounted = mount_with(&mut Real, &mut ops, p, Duration::ZERO, &mut notes);
        let _var = Mount(p.join("var"));
        let m = mounted.unwrap_or_else(|e| panic!("{trouble:?}: {}", console::chain(&e)));
        assert_eq!(m.boot, None, "{trouble:?}");
        let warnings: Vec<_> = notes
            .iter()
            .filter_map(|n| match n {
                Note::Warn(line) => Some(line.as_str()),
                _ => None,
            })
            .collect();
        let counted = warnings.last().copied().unwrap_or_default();
        assert!(
            counted.contains("boot not counted") && counted.contains(BOOTS),
            "{trouble:?}: {notes:?}"
        );
        if trouble == Trouble::ReadOnly {
            assert!(
                warnings.len() == 2 && warnings[0].contains("mounted read-only"),
                "{notes:?}"
            );
        } else {
            assert_eq!(warnings.len(), 1, "{trouble:?}: {notes:?}");
        }
        // The counter is as it was, and the applied config is what this boot uses.
        assert_eq!(
            std::fs::read_to_string(p.join("var").join(BOOTS)).expect("counter"),
            "4\n"
        );
        match config_source::read(p, Source::State, true) {
            Ok(Found::Config(Source::State, c, _)) => assert_eq!(
                c.node.hostname.as_ref().map(|h| h.as_str()),
                Some("saved"),
                "{trouble:?}"
            ),
            Ok(_) => panic!("{trouble:?}: no config on STATE"),
            Err(e) => panic!("{trouble:?}: {}", console::chain(&e)),
        }
    }

    #[test]
    fn a_full_state_is_mounted_and_its_config_used() {
        boots_with_its_saved_config(Trouble::Full);
    }

    #[test]
    fn a_state_out_of_inodes_is_mounted_and_its_config_used() {
        boots_with_its_saved_config(Trouble::NoInodes);
    }

    #[test]
    fn a_read_only_state_is_mounted_and_its_config_used() {
        boots_with_its_saved_config(Trouble::ReadOnly);
    }
}
