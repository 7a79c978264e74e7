//! Growing STATE on a disk larger than the image (a cloud VM's disk usually is): the GPT
//! is rewritten so that STATE ends at the disk's last usable sector ([`gpt`]), the kernel
//! is told with `BLKPG_RESIZE_PARTITION` on the whole disk (`BLKRRPART` fails while ROOT-A
//! is in use under dm-verity), and the mounted ext4 grows online with
//! `EXT4_IOC_RESIZE_FS`.
//!
//! Each step looks at the disk and does only what is left, so a second boot has nothing
//! to do and a boot cut short is finished by the next one. The two ioctls go through
//! [`Resize`], so everything else is tested on files without root.

pub mod gpt;

use crate::storage::partition::BlockDev;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use gpt::MIN_GAIN;

/// 512-byte sectors: the unit of the GPT (the image is built with 512-byte logical
/// blocks) and of sysfs sizes; the contract's type, shared with the builder.
pub use basalt_api::layout::Sectors;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("read {0}")]
    Sysfs(PathBuf, #[source] io::Error),
    #[error("{path} holds {value:?}")]
    SysfsValue { path: PathBuf, value: String },
    #[error("{disk} has {size}-byte logical blocks; the image's GPT uses 512")]
    BlockSize { disk: String, size: u64 },
    #[error("open {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("partition table of {0}")]
    Gpt(PathBuf, #[source] gpt::GptError),
    #[error("the kernel has partition {number} of {disk} at sector {kernel}, the GPT at {table}")]
    StartMismatch {
        disk: String,
        number: u32,
        kernel: u64,
        table: u64,
    },
    #[error("tell the kernel that partition {number} of {disk} now has {sectors} sectors")]
    Blkpg {
        disk: PathBuf,
        number: u32,
        sectors: u64,
        #[source]
        source: io::Error,
    },
    #[error("read the ext4 superblock of {0}")]
    Superblock(PathBuf, #[source] io::Error),
    #[error("{0} holds no ext4 superblock")]
    NotExt4(PathBuf),
    #[error("grow the ext4 on {path} to {blocks} blocks")]
    ResizeFs {
        path: PathBuf,
        blocks: u64,
        #[source]
        source: io::Error,
    },
    #[error("statvfs {0}")]
    Statvfs(PathBuf, #[source] nix::errno::Errno),
}

/// The two ioctls, so that the rest runs against files in tests.
pub trait Resize {
    /// `BLKPG_RESIZE_PARTITION` on the whole-disk device `disk`.
    fn resize_partition(
        &mut self,
        disk: &Path,
        number: u32,
        start: Sectors,
        len: Sectors,
    ) -> io::Result<()>;
    /// `EXT4_IOC_RESIZE_FS` on the ext4 mounted at `mount_point`.
    fn resize_ext4(&mut self, mount_point: &Path, blocks: u64) -> io::Result<()>;
}

/// The kernel.
pub struct Ioctls;

impl Resize for Ioctls {
    fn resize_partition(
        &mut self,
        disk: &Path,
        number: u32,
        start: Sectors,
        len: Sectors,
    ) -> io::Result<()> {
        let disk = File::open(disk)?;
        ioctl::resize_partition(&disk, number, start.bytes(), len.bytes())
    }

    fn resize_ext4(&mut self, mount_point: &Path, blocks: u64) -> io::Result<()> {
        let dir = File::open(mount_point)?;
        ioctl::resize_ext4(&dir, blocks)
    }
}

/// The raw ioctls. Their structures come from `<linux/blkpg.h>` and `<linux/ext4.h>`,
/// which the `libc` crate does not carry.
mod ioctl {
    use libc::{c_char, c_int, c_longlong, c_void};
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `struct blkpg_partition`: offsets and lengths in bytes.
    #[repr(C)]
    struct BlkpgPartition {
        start: c_longlong,
        length: c_longlong,
        pno: c_int,
        devname: [c_char; 64],
        volname: [c_char; 64],
    }

    /// `struct blkpg_ioctl_arg`.
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: c_int,
        flags: c_int,
        datalen: c_int,
        data: *mut c_void,
    }

    const BLKPG_RESIZE_PARTITION: c_int = 3;

    // BLKPG is `_IO(0x12, 105)` although it passes a pointer, hence the `_bad` form.
    nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
    // EXT4_IOC_RESIZE_FS is `_IOW('f', 16, __u64)`: the new size in filesystem blocks.
    nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

    pub fn resize_partition(disk: &File, number: u32, start: u64, len: u64) -> io::Result<()> {
        let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let mut part = BlkpgPartition {
            start: start.try_into().map_err(invalid)?,
            length: len.try_into().map_err(invalid)?,
            pno: number.try_into().map_err(invalid)?,
            devname: [0; 64],
            volname: [0; 64],
        };
        let arg = BlkpgIoctlArg {
            op: BLKPG_RESIZE_PARTITION,
            flags: 0,
            datalen: std::mem::size_of::<BlkpgPartition>() as c_int,
            data: (&mut part as *mut BlkpgPartition).cast(),
        };
        // SAFETY: `arg` and the `part` it points to are initialised, of the kernel's
        // layout, and live until the call returns; the kernel only reads them.
        unsafe { blkpg(disk.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(io::Error::from)
    }

    pub fn resize_ext4(on: &File, blocks: u64) -> io::Result<()> {
        // SAFETY: the kernel reads one u64 from a valid pointer that outlives the call.
        unsafe { ext4_resize_fs(on.as_raw_fd(), &blocks) }
            .map(drop)
            .map_err(io::Error::from)
    }
}

/// Where the kernel has a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Kernel name of the whole disk, e.g. `vda`.
    pub disk: String,
    pub disk_size: Sectors,
    pub number: u32,
    pub start: Sectors,
    pub len: Sectors,
}

/// Reads the partition's number, start and size and its disk's size from sysfs
/// (`sys` is the sysfs root); the disk is the parent of the partition's device folder.
pub fn placement(sys: &Path, part: &str) -> Result<Placement, GrowError> {
    let dir = sys.join("class/block").join(part);
    let real = dir
        .canonicalize()
        .map_err(|e| GrowError::Sysfs(dir.clone(), e))?;
    let disk = real
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| GrowError::SysfsValue {
            path: dir.clone(),
            value: real.display().to_string(),
        })?;
    let disk_dir = sys.join("class/block").join(&disk);
    let block = read_number(&disk_dir.join("queue/logical_block_size"))?;
    if block != Sectors::SIZE {
        return Err(GrowError::BlockSize { disk, size: block });
    }
    let number = read_number(&dir.join("partition"))?;
    Ok(Placement {
        disk_size: Sectors(read_number(&disk_dir.join("size"))?),
        number: u32::try_from(number).map_err(|_| GrowError::SysfsValue {
            path: dir.join("partition"),
            value: number.to_string(),
        })?,
        start: Sectors(read_number(&dir.join("start"))?),
        len: Sectors(read_number(&dir.join("size"))?),
        disk,
    })
}

fn read_number(path: &Path) -> Result<u64, GrowError> {
    let text = std::fs::read_to_string(path).map_err(|e| GrowError::Sysfs(path.into(), e))?;
    text.trim().parse().map_err(|_| GrowError::SysfsValue {
        path: path.into(),
        value: text.trim().into(),
    })
}

/// A partition that was grown (or whose damaged primary GPT was restored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub from: Sectors,
    pub to: Sectors,
    /// The primary GPT was damaged and has been rebuilt from the backup.
    pub repaired: bool,
}

/// Grows partition `part` (GPT name `name`) to the end of its disk when it is the last
/// one and at least [`MIN_GAIN`] is to be had; `None` when there is nothing to do.
/// `sys` and `dev` are the sysfs and /dev roots.
pub fn grow_partition(
    ops: &mut dyn Resize,
    sys: &Path,
    dev: &Path,
    part: &BlockDev,
    name: &str,
) -> Result<Option<Grown>, GrowError> {
    let at = placement(sys, &part.name)?;
    let disk_path = dev.join(&at.disk);
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)
        .map_err(|e| GrowError::Open(disk_path.clone(), e))?;
    let gpt_err = |e| GrowError::Gpt(disk_path.clone(), e);
    let Some(plan) = gpt::plan(&disk, at.disk_size, at.number, name).map_err(gpt_err)? else {
        return Ok(None);
    };
    // The kernel's partition and the table's must be the same before either is moved.
    if plan.start != at.start {
        return Err(GrowError::StartMismatch {
            disk: at.disk,
            number: at.number,
            kernel: at.start.0,
            table: plan.start.0,
        });
    }
    plan.apply(&disk).map_err(gpt_err)?;
    drop(disk);
    ops.resize_partition(&disk_path, at.number, plan.start, plan.new_len)
        .map_err(|source| GrowError::Blkpg {
            disk: disk_path.clone(),
            number: at.number,
            sectors: plan.new_len.0,
            source,
        })?;
    Ok(Some(Grown {
        from: plan.old_len,
        to: plan.new_len,
        repaired: plan.repaired,
    }))
}

/// Size of an ext4 filesystem, from its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4 {
    pub block_size: u64,
    pub blocks: u64,
}

impl Ext4 {
    const MAGIC: u16 = 0xef53;
    const INCOMPAT_64BIT: u32 = 0x80;

    /// Parses the 1024-byte superblock (found at byte 1024 of the device).
    pub fn parse(sb: &[u8; 1024]) -> Option<Ext4> {
        let u32_at = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
        if u16::from_le_bytes([sb[0x38], sb[0x39]]) != Self::MAGIC {
            return None;
        }
        let log = u32_at(0x18);
        // 1 KiB to 64 KiB are the sizes ext4 knows.
        if log > 6 {
            return None;
        }
        let mut blocks = u64::from(u32_at(0x04));
        if u32_at(0x60) & Self::INCOMPAT_64BIT != 0 {
            blocks |= u64::from(u32_at(0x150)) << 32;
        }
        Some(Ext4 {
            block_size: 1024 << log,
            blocks,
        })
    }

    /// Reads the superblock of `dev` (a mounted filesystem's superblock is read through
    /// the same page cache the kernel writes it in).
    pub fn read(dev: &Path) -> Result<Ext4, GrowError> {
        let mut sb = [0u8; 1024];
        File::open(dev)
            .and_then(|f| f.read_exact_at(&mut sb, 1024))
            .map_err(|e| GrowError::Superblock(dev.into(), e))?;
        Ext4::parse(&sb).ok_or_else(|| GrowError::NotExt4(dev.into()))
    }

    pub fn bytes(self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }
}

/// The block count to grow `fs` to in a partition of `len`, if any. Right after the
/// partition grew, any gain; otherwise (a boot that grew the partition was cut short) at
/// least [`MIN_GAIN`], because the kernel may leave a last group too small for its
/// metadata unused and that remainder must not trigger a resize on every boot.
pub fn ext4_target(fs: Ext4, len: Sectors, just_grown: bool) -> Option<u64> {
    let target = len.bytes() / fs.block_size;
    let gain = target.checked_sub(fs.blocks).filter(|&g| g > 0)?;
    (just_grown || gain.saturating_mul(fs.block_size) >= MIN_GAIN.bytes()).then_some(target)
}

/// An ext4 that was grown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGrown {
    pub from: Ext4,
    pub to: Ext4,
}

/// Grows the ext4 on `dev`, mounted at `mount_point`, to fill its partition of `len`.
pub fn grow_filesystem(
    ops: &mut dyn Resize,
    dev: &Path,
    mount_point: &Path,
    len: Sectors,
    just_grown: bool,
) -> Result<Option<FsGrown>, GrowError> {
    let from = Ext4::read(dev)?;
    let Some(blocks) = ext4_target(from, len, just_grown) else {
        return Ok(None);
    };
    ops.resize_ext4(mount_point, blocks)
        .map_err(|source| GrowError::ResizeFs {
            path: mount_point.into(),
            blocks,
            source,
        })?;
    let to = Ext4::read(dev)?;
    Ok((to.blocks > from.blocks).then_some(FsGrown { from, to }))
}

/// Space of a mounted filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total: u64,
    pub free: u64,
}

pub fn usage(mount_point: &Path) -> Result<Usage, GrowError> {
    let st = nix::sys::statvfs::statvfs(mount_point)
        .map_err(|e| GrowError::Statvfs(mount_point.into(), e))?;
    let unit = st.fragment_size() as u64;
    Ok(Usage {
        total: (st.blocks() as u64).saturating_mul(unit),
        free: (st.blocks_free() as u64).saturating_mul(unit),
    })
}

/// Test double of [`Resize`] that answers as the kernel would: after `BLKPG` the
/// partition's sysfs `size` holds the new length, after the ext4 resize the device's
/// superblock holds the new block count.
#[cfg(test)]
#[derive(Default)]
pub struct Recording {
    pub calls: Vec<Resized>,
    /// sysfs root whose `class/block/<part>/size` BLKPG updates, and the partition.
    pub sysfs: Option<(PathBuf, String)>,
    /// The device whose superblock the ext4 resize updates.
    pub ext4_dev: Option<PathBuf>,
    pub fail_blkpg: Option<nix::errno::Errno>,
}

#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resized {
    Partition {
        disk: PathBuf,
        number: u32,
        start: Sectors,
        len: Sectors,
    },
    Ext4 {
        mount_point: PathBuf,
        blocks: u64,
    },
}

#[cfg(test)]
impl Resize for Recording {
    fn resize_partition(
        &mut self,
        disk: &Path,
        number: u32,
        start: Sectors,
        len: Sectors,
    ) -> io::Result<()> {
        self.calls.push(Resized::Partition {
            disk: disk.into(),
            number,
            start,
            len,
        });
        if let Some(e) = self.fail_blkpg {
            return Err(e.into());
        }
        if let Some((sys, part)) = &self.sysfs {
            std::fs::write(
                sys.join("class/block").join(part).join("size"),
                len.0.to_string(),
            )?;
        }
        Ok(())
    }

    fn resize_ext4(&mut self, mount_point: &Path, blocks: u64) -> io::Result<()> {
        self.calls.push(Resized::Ext4 {
            mount_point: mount_point.into(),
            blocks,
        });
        if let Some(dev) = &self.ext4_dev {
            let fs = Ext4::read(dev).map_err(io::Error::other)?;
            fixture::ext4(dev, fs.block_size, blocks);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A node's sysfs and /dev in a folder: the disk and STATE as files.
    use super::gpt::fixture as disk;
    use super::Sectors;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    pub use disk::{IMAGE, STATE_LEN, STATE_START};

    /// A minimal ext4 superblock (magic, block size, block count) at byte 1024 of `dev`.
    pub fn ext4(dev: &Path, block_size: u64, blocks: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dev)
            .expect("open");
        let mut sb = [0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&(block_size / 1024).trailing_zeros().to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        f.write_all_at(&sb, 1024).expect("write");
    }

    /// Under `root`: partition `part` (ROOT-A) of `disk` and the verified root over it,
    /// as the kernel shows them after stage 1: `sys/block/dm-0` named `basalt-root`,
    /// whose `slaves/` holds `part`, with their `sys/class/block` links.
    pub fn root_on(root: &Path, disk: &str, part: &str) {
        let sys = root.join("sys");
        let dir = sys.join("block").join(disk).join(part);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("uevent"),
            format!(
                "MAJOR=254\nMINOR=3\nDEVNAME={part}\nDEVTYPE=partition\nPARTN=3\nPARTNAME=ROOT-A\n"
            ),
        )
        .expect("write");
        std::fs::write(dir.join("partition"), "3\n").expect("write");
        let dm = sys.join("block/dm-0");
        std::fs::create_dir_all(dm.join("dm")).expect("mkdir");
        std::fs::create_dir_all(dm.join("slaves")).expect("mkdir");
        std::fs::write(
            dm.join("dm/name"),
            format!("{}\n", crate::boot::stage1::DM_NAME),
        )
        .expect("write");
        std::fs::write(
            dm.join("uevent"),
            "MAJOR=252\nMINOR=0\nDEVNAME=dm-0\nDEVTYPE=disk\n",
        )
        .expect("write");
        std::os::unix::fs::symlink(format!("../../{disk}/{part}"), dm.join("slaves").join(part))
            .expect("link");
        let class = sys.join("class/block");
        std::fs::create_dir_all(&class).expect("mkdir");
        for (name, to) in [
            (part.to_owned(), format!("../../block/{disk}/{part}")),
            ("dm-0".to_owned(), "../../block/dm-0".to_owned()),
        ] {
            if !class.join(&name).exists() {
                std::os::unix::fs::symlink(to, class.join(name)).expect("link");
            }
        }
    }

    /// Under `root`: `sys/block/vda/{size,queue/logical_block_size}`, `sys/block/vda/vda5`
    /// with `uevent`, `partition`, `start`, `size`, the `sys/class/block` links the kernel
    /// makes, `dev/vda` holding the image's GPT on a disk of `size`, and `dev/vda5` holding
    /// a 4 KiB-block ext4 superblock the size of STATE.
    pub fn node(root: &Path, size: Sectors) {
        let vda = root.join("sys/block/vda");
        let vda5 = vda.join("vda5");
        std::fs::create_dir_all(vda.join("queue")).expect("mkdir");
        std::fs::create_dir_all(&vda5).expect("mkdir");
        std::fs::write(vda.join("size"), size.0.to_string()).expect("write");
        std::fs::write(vda.join("queue/logical_block_size"), "512\n").expect("write");
        std::fs::write(
            vda5.join("uevent"),
            "MAJOR=254\nMINOR=5\nDEVNAME=vda5\nDEVTYPE=partition\nPARTN=5\nPARTNAME=STATE\n",
        )
        .expect("write");
        std::fs::write(vda5.join("partition"), "5\n").expect("write");
        std::fs::write(vda5.join("start"), format!("{}\n", STATE_START.0)).expect("write");
        std::fs::write(vda5.join("size"), format!("{}\n", STATE_LEN.0)).expect("write");
        let class = root.join("sys/class/block");
        std::fs::create_dir_all(&class).expect("mkdir");
        std::os::unix::fs::symlink("../../block/vda", class.join("vda")).expect("link");
        std::os::unix::fs::symlink("../../block/vda/vda5", class.join("vda5")).expect("link");
        root_on(root, "vda", "vda3");
        std::fs::create_dir_all(root.join("dev")).expect("mkdir");
        disk::disk(&root.join("dev/vda"), size);
        ext4(&root.join("dev/vda5"), 4096, STATE_LEN.bytes() / 4096);
    }
}

#[cfg(test)]
mod tests;
