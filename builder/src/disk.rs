//! The disk: GPT with the five partitions of the design, protective MBR carrying GRUB's
//! boot code, partition images stitched in at their offsets. No loop devices, no root.

use basalt_api::layout::Partition;
use gpt::disk::LogicalBlockSize;
use gpt::partition::Partition as GptEntry;
use gpt::partition_types::{self, Type};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use basalt_api::layout::Sectors;

/// First partition starts at 1 MiB; everything is 1 MiB aligned.
pub const FIRST_LBA: Sectors = Sectors(2048);
/// Room after the last partition for the backup GPT (33 sectors), rounded to 1 MiB.
const TAIL: Sectors = Sectors(2048);

#[derive(Debug, Clone, Serialize)]
pub struct PartitionPlan {
    #[serde(skip)]
    pub partition: Partition,
    pub number: u32,
    pub name: &'static str,
    #[serde(serialize_with = "ser_type")]
    pub type_guid: Type,
    pub guid: uuid::Uuid,
    pub first_lba: Sectors,
    pub sectors: Sectors,
}

fn ser_type<S: serde::Serializer>(t: &Type, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.guid.to_string().to_uppercase())
}

impl PartitionPlan {
    pub fn offset(&self) -> u64 {
        self.first_lba.bytes()
    }
    pub fn size(&self) -> u64 {
        self.sectors.bytes()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub disk_guid: uuid::Uuid,
    pub total: Sectors,
    pub partitions: Vec<PartitionPlan>,
}

impl Layout {
    /// The contract's partitions in GPT order ([`Partition::ALL`]), each sized from the
    /// spec; `guid(name)` gives each GUID (derived by the caller, so that they are a
    /// function of the inputs).
    pub fn new(disk: &crate::spec::Disk, guid: impl Fn(&str) -> uuid::Uuid) -> Self {
        let mut next = FIRST_LBA;
        let partitions = Partition::ALL
            .into_iter()
            .map(|partition| {
                let sectors = Sectors::from_mib(size_mib(disk, partition));
                let p = PartitionPlan {
                    partition,
                    number: partition.number(),
                    name: partition.name(),
                    type_guid: gpt_type(partition),
                    guid: guid(partition.name()),
                    first_lba: next,
                    sectors,
                };
                next = Sectors(next.0 + sectors.0);
                p
            })
            .collect();
        Layout {
            disk_guid: guid("disk"),
            total: Sectors(next.0 + TAIL.0),
            partitions,
        }
    }

    /// The plan of `partition`: every layout holds every partition of the contract.
    pub fn get(&self, partition: Partition) -> &PartitionPlan {
        &self.partitions[(partition.number() - 1) as usize]
    }
}

/// Each partition's size in MiB: the BIOS boot partition is 1 MiB, the rest the spec says.
fn size_mib(disk: &crate::spec::Disk, partition: Partition) -> u64 {
    match partition {
        Partition::Bios => 1,
        Partition::Efi => disk.esp_mib,
        Partition::RootA | Partition::RootB => disk.root_mib,
        Partition::State => disk.state_mib,
    }
}

/// The `gpt` crate's type for each partition (a test checks it against the contract's GUID).
fn gpt_type(partition: Partition) -> Type {
    match partition {
        Partition::Bios => partition_types::BIOS,
        Partition::Efi => partition_types::EFI,
        Partition::RootA | Partition::RootB => partition_types::LINUX_ROOT_X64,
        Partition::State => partition_types::LINUX_FS,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("write disk image {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("write partition table of {0}")]
    Gpt(PathBuf, #[source] gpt::GptError),
    #[error("write protective MBR of {0}")]
    Mbr(PathBuf, #[source] gpt::mbr::MBRError),
    #[error("content for {partition} is {size} bytes; the partition holds {room}")]
    TooLarge {
        partition: String,
        size: u64,
        room: u64,
    },
    #[error("read partition content {0}")]
    Content(PathBuf, #[source] std::io::Error),
    #[error("copy {from} into {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the sparse raw disk: partition table, boot code, and each partition's content.
pub fn write(
    out: &Path,
    layout: &Layout,
    boot_code: [u8; 440],
    contents: &[(Partition, &Path)],
) -> Result<(), DiskError> {
    let ioerr = |e| DiskError::Io(out.into(), e);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(ioerr)?;
    file.set_len(layout.total.bytes()).map_err(ioerr)?;

    for (partition, src) in contents {
        let part = layout.get(*partition);
        let size = std::fs::metadata(src)
            .map_err(|e| DiskError::Content(src.to_path_buf(), e))?
            .len();
        if size > part.size() {
            return Err(DiskError::TooLarge {
                partition: partition.name().into(),
                size,
                room: part.size(),
            });
        }
        copy_sparse(src, &mut file, part.offset()).map_err(|source| DiskError::Copy {
            from: src.to_path_buf(),
            to: out.into(),
            source,
        })?;
    }

    let mut gdisk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(&mut file, Some(layout.disk_guid))
        .map_err(|e| DiskError::Gpt(out.into(), e))?;
    // Keep the usual 128-entry array: unused slots are zero entries.
    let mut entries: BTreeMap<u32, GptEntry> = (1..=128).map(|i| (i, GptEntry::zero())).collect();
    for p in &layout.partitions {
        entries.insert(
            p.number,
            GptEntry {
                part_type_guid: p.type_guid.clone(),
                part_guid: p.guid,
                first_lba: p.first_lba.0,
                last_lba: p.first_lba.0 + p.sectors.0 - 1,
                flags: 0,
                name: p.name.into(),
            },
        );
    }
    gdisk
        .update_partitions(entries)
        .map_err(|e| DiskError::Gpt(out.into(), e))?;
    gdisk.write().map_err(|e| DiskError::Gpt(out.into(), e))?;

    let mut mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(layout.total.0 - 1).unwrap_or(u32::MAX),
    );
    mbr.set_bootcode(boot_code);
    mbr.overwrite_lba0(&mut file)
        .map_err(|e| DiskError::Mbr(out.into(), e))?;
    file.sync_all().map_err(ioerr)
}

/// Copies `src` into `dst` at `offset`, seeking over all-zero blocks so the image stays
/// sparse.
fn copy_sparse(src: &Path, dst: &mut std::fs::File, offset: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::open(src)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = offset;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))?;
            dst.write_all(&buf[..n])?;
        }
        pos += n as u64;
    }
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let disk = crate::spec::Disk {
            esp_mib: 16,
            root_mib: 64,
            state_mib: 16,
        };
        Layout::new(&disk, |n| {
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, n.as_bytes())
        })
    }

    #[test]
    fn partitions_are_contiguous_and_mib_aligned() {
        let l = layout();
        let names: Vec<_> = l.partitions.iter().map(|p| p.name).collect();
        assert_eq!(names, Partition::ALL.map(Partition::name));
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].first_lba.0 + w[0].sectors.0, w[1].first_lba.0);
        }
        assert!(l.partitions.iter().all(|p| p.first_lba.0 % 2048 == 0));
        assert_eq!(
            l.total,
            Sectors(2048 + 2048 * (1 + 16 + 64 + 64 + 16) + 2048)
        );
    }

    #[test]
    fn written_table_reads_back_with_names_and_guids() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = layout();
        let content = d.path().join("efi");
        std::fs::write(&content, b"FATDATA").expect("write");
        let img = d.path().join("disk.raw");
        write(&img, &l, [0xAB; 440], &[(Partition::Efi, &content)]).expect("disk");
        let g = gpt::GptConfig::new().open(&img).expect("read gpt");
        assert_eq!(*g.guid(), l.disk_guid);
        let read: Vec<_> = g
            .partitions()
            .values()
            .map(|p| (p.name.clone(), p.part_guid, p.first_lba))
            .collect();
        let want: Vec<_> = l
            .partitions
            .iter()
            .map(|p| (p.name.to_string(), p.guid, p.first_lba.0))
            .collect();
        assert_eq!(read, want);
        let bytes = std::fs::read(&img).expect("read");
        assert_eq!(&bytes[..440], &[0xAB; 440][..]);
        assert_eq!(&bytes[510..512], &[0x55, 0xAA]);
        let efi = l.get(Partition::Efi).offset() as usize;
        assert_eq!(&bytes[efi..efi + 7], b"FATDATA");
    }

    #[test]
    fn the_gpt_crates_types_are_the_contracts_type_guids() {
        for p in Partition::ALL {
            assert_eq!(
                gpt_type(p).guid.to_string().to_uppercase(),
                p.type_guid(),
                "{p}"
            );
        }
    }

    #[test]
    fn oversized_content_names_the_partition() {
        let d = tempfile::tempdir().expect("tempdir");
        let content = d.path().join("big");
        std::fs::write(&content, vec![1u8; 2 << 20]).expect("write");
        let err = write(
            &d.path().join("x.raw"),
            &layout(),
            [0; 440],
            &[(Partition::Bios, &content)],
        )
        .unwrap_err();
        assert!(
            matches!(err, DiskError::TooLarge { ref partition, .. } if partition == Partition::Bios.name()),
            "{err}"
        );
    }
}
