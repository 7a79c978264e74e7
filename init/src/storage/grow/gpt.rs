//! The GPT rewrite that moves the last partition's end, and the backup table, to the end
//! of a disk larger than the image.
//!
//! Written by hand rather than with the `gpt` crate (which the builder writes the image
//! with, and which the tests below read the result back with), for three reasons that
//! matter in PID1 on a disk in use:
//! - the crate writes the primary entry array first and flushes once at the end, so a
//!   power cut in between leaves neither copy valid; here the new backup is written and
//!   flushed before the primary is touched, so one copy is valid at every instant.
//!   That copy is only worth something because the image's kernel command line starts
//!   with `gpt` (the builder puts it there: `builder/src/build/boot.rs`, `FORCE_GPT`).
//!   Linux's `find_valid_gpt` (block/partitions/efi.c) reads the backup only to
//!   cross-check a valid primary, unless `force_gpt` is set; without `gpt` a primary
//!   whose entries were written but whose header was not (two writes, torn by a power
//!   cut) has a bad entries CRC and the kernel sees no partitions at all. With `gpt` it
//!   reads the header at the disk's last LBA, which phase 1 wrote and flushed, and
//!   `force_gpt` also skips the protective-MBR check (the MBR is rewritten in phase 2).
//!   basalt-init's own reader falls back to the backup in every case and rebuilds the
//!   primary on the next boot (`Plan::repaired`);
//! - it `assert!`s on tables it does not expect (entry size other than 128), and a panic
//!   in PID1 is a reboot loop;
//! - it packs the used entries at the start of the array when it writes, which would
//!   renumber partitions (`vda5`) after a gap.

use super::Sectors;
use basalt_api::gpt::{entry_name, read_at, u32_at, u64_at, ReadError, ENTRY_SIZE, SECTOR};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The table as read: the contract crate's reader (shared with `basalt inspect`/`verify`)
/// checks both copies; this module only plans and writes.
pub use basalt_api::gpt::{Header, HeaderFault, Table};

/// Less than this to gain and the table is left as it is: a disk a few sectors larger
/// than the image is not worth a rewrite.
pub const MIN_GAIN: Sectors = Sectors::from_mib(16);

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("read {len} bytes at byte {offset}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("write {len} bytes at byte {offset}")]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("flush the disk")]
    Flush(#[source] io::Error),
    #[error("GPT at LBA {lba}")]
    Header {
        lba: u64,
        #[source]
        fault: HeaderFault,
    },
    #[error("a disk of {0} sectors holds no GPT")]
    TooSmall(u64),
    #[error("no partition {number} named {name} in the table")]
    NotThere { number: u32, name: String },
    #[error("partition {number} is not the last on the disk")]
    NotLast { number: u32 },
    #[error(
        "partition {number} ends at LBA {end}, beyond the disk's last usable LBA {last_usable}"
    )]
    DiskTooSmall {
        number: u32,
        end: u64,
        last_usable: u64,
    },
}

/// The reader's errors, as this module has always named them.
impl From<ReadError> for GptError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Read {
                offset,
                len,
                source,
            } => GptError::Read {
                offset,
                len,
                source,
            },
            ReadError::Header { lba, fault } => GptError::Header { lba, fault },
            ReadError::TooSmall(size) => GptError::TooSmall(size),
        }
    }
}

fn unsupported(field: &'static str, value: u64) -> HeaderFault {
    HeaderFault::Unsupported { field, value }
}

/// Sectors to write at an LBA.
#[derive(Clone, PartialEq, Eq)]
pub struct Write {
    pub lba: u64,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes at LBA {}", self.bytes.len(), self.lba)
    }
}

/// The rewrite that grows one partition, in the order it must reach the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub number: u32,
    pub start: Sectors,
    pub old_len: Sectors,
    pub new_len: Sectors,
    /// The primary copy was damaged and is rebuilt from the backup.
    pub repaired: bool,
    /// Each phase is flushed before the next begins.
    pub phases: Vec<Vec<Write>>,
}

/// What it takes to grow partition `number` (which must be called `name`, and be the last
/// on the disk) to the end of a disk of `size` sectors; `None` when there is less than
/// [`MIN_GAIN`] to gain and the table is sound.
pub fn plan(disk: &File, size: Sectors, number: u32, name: &str) -> Result<Option<Plan>, GptError> {
    let table = Table::read(disk, size)?;
    let mut mbr = [0u8; SECTOR];
    read_at(disk, 0, &mut mbr)?;
    plan_table(&table, &mbr, size, number, name)
}

/// [`plan`] on a table already read; `mbr` is the disk's sector 0.
pub fn plan_table(
    table: &Table,
    mbr: &[u8; SECTOR],
    size: Sectors,
    number: u32,
    name: &str,
) -> Result<Option<Plan>, GptError> {
    let (index, first, last) = last_partition(table, number, name)?;
    let h = &table.header;
    let array = h.entries_sectors();
    let backup_lba = size.0.checked_sub(1).ok_or(GptError::TooSmall(size.0))?;
    let backup_entries_lba = backup_lba
        .checked_sub(array)
        .filter(|&l| l > h.first_usable)
        .ok_or(GptError::TooSmall(size.0))?;
    let last_usable = backup_entries_lba - 1;
    if last_usable < last {
        return Err(GptError::DiskTooSmall {
            number,
            end: last,
            last_usable,
        });
    }
    let grow = last_usable - last >= MIN_GAIN.0;
    if !grow && !table.from_backup {
        return Ok(None);
    }
    let new_last = if grow { last_usable } else { last };

    let mut entries = table.entries.clone();
    entries[index * ENTRY_SIZE + 40..index * ENTRY_SIZE + 48]
        .copy_from_slice(&new_last.to_le_bytes());
    let entries_crc = crc32fast::hash(&entries);
    // Rebuilt from the backup, the primary array goes where every tool puts it.
    let primary_entries_lba = if table.from_backup { 2 } else { h.entries_lba };
    if primary_entries_lba < 2 || primary_entries_lba.saturating_add(array) > h.first_usable {
        return Err(GptError::Header {
            lba: 1,
            fault: unsupported("entry array LBA", primary_entries_lba),
        });
    }
    let primary = Header {
        my_lba: 1,
        alternate_lba: backup_lba,
        last_usable,
        entries_lba: primary_entries_lba,
        entries_crc,
        ..h.clone()
    };
    let backup = Header {
        my_lba: backup_lba,
        alternate_lba: 1,
        entries_lba: backup_entries_lba,
        ..primary.clone()
    };

    let phases = phases(table, mbr, size, entries, &primary, &backup, last);
    Ok(Some(Plan {
        number,
        start: Sectors(first),
        old_len: Sectors(last + 1 - first),
        new_len: Sectors(new_last + 1 - first),
        repaired: table.from_backup,
        phases,
    }))
}

/// Where partition `number` lies, as `(index, first LBA, last LBA)`, once it is sure to be
/// the one called `name` and the last on the disk.
fn last_partition(table: &Table, number: u32, name: &str) -> Result<(usize, u64, u64), GptError> {
    let not_there = || GptError::NotThere {
        number,
        name: name.into(),
    };
    let index = (number as usize).checked_sub(1).ok_or_else(not_there)?;
    let entry = table.entry(index).ok_or_else(not_there)?;
    if entry[..16].iter().all(|&b| b == 0) || entry_name(entry) != name {
        return Err(not_there());
    }
    let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
    if last < first {
        return Err(GptError::Header {
            lba: table.header.my_lba,
            fault: unsupported("partition end LBA", last),
        });
    }
    if table
        .used()
        .any(|(i, e)| i != index && u64_at(e, 40) >= first)
    {
        return Err(GptError::NotLast { number });
    }
    Ok((index, first, last))
}

/// The writes, phase by phase: the new backup first, then the primary (and the
/// protective MBR), then the old backup header wiped; `last` is the partition's old end.
///
/// The order is what keeps the kernel seeing a table (with `gpt` on its command line; see
/// the module comment): until phase 1 is flushed, the old primary and its old backup are
/// untouched; once it is, the new backup at the disk's last LBA is complete, so a primary
/// torn in phase 2 (its entries and header are separate writes) is replaced by it; after
/// phase 2 the primary is whole and phase 3 only clears a sector nothing points at.
fn phases(
    table: &Table,
    mbr: &[u8; SECTOR],
    size: Sectors,
    entries: Vec<u8>,
    primary: &Header,
    backup: &Header,
    last: u64,
) -> Vec<Vec<Write>> {
    let h = &table.header;
    let mut second = vec![
        Write {
            lba: primary.entries_lba,
            bytes: entries.clone(),
        },
        Write {
            lba: 1,
            bytes: primary.encode().to_vec(),
        },
    ];
    if let Some(mbr) = protective_mbr(mbr, size) {
        second.push(Write {
            lba: 0,
            bytes: mbr.to_vec(),
        });
    }
    let mut phases = vec![
        vec![
            Write {
                lba: backup.entries_lba,
                bytes: entries,
            },
            Write {
                lba: backup.my_lba,
                bytes: backup.encode().to_vec(),
            },
        ],
        second,
    ];
    // The old backup header now lies inside the grown partition: wiped once the new
    // primary (which no longer points at it) is on disk, so no tool mistakes it for a table.
    let old = h.alternate_lba;
    if !table.from_backup && old > last && old < backup.entries_lba {
        phases.push(vec![Write {
            lba: old,
            bytes: vec![0; SECTOR],
        }]);
    }
    phases
}

/// Sector 0 with the protective partition (type 0xEE) covering the whole disk again; `None`
/// when it already does or when sector 0 is not a plain protective MBR (a hybrid MBR is
/// left alone).
fn protective_mbr(mbr: &[u8; SECTOR], size: Sectors) -> Option<[u8; SECTOR]> {
    let record = 446;
    if mbr[510..] != [0x55, 0xaa] || mbr[record + 4] != 0xee {
        return None;
    }
    if mbr[record + 16..510].iter().any(|&b| b != 0) {
        return None;
    }
    let want = u32::try_from(size.0 - 1).unwrap_or(u32::MAX);
    if u32_at(mbr, record + 12) == want {
        return None;
    }
    let mut out = *mbr;
    out[record + 12..record + 16].copy_from_slice(&want.to_le_bytes());
    Some(out)
}

impl Plan {
    /// Writes the phases in order, flushing the disk after each.
    pub fn apply(&self, disk: &File) -> Result<(), GptError> {
        for phase in &self.phases {
            for w in phase {
                let offset = w.lba.saturating_mul(Sectors::SIZE);
                disk.write_all_at(&w.bytes, offset)
                    .map_err(|source| GptError::Write {
                        offset,
                        len: w.bytes.len(),
                        source,
                    })?;
            }
            disk.sync_all().map_err(GptError::Flush)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    //! Disk images laid out like the builder's, written with the `gpt` crate.
    use super::super::Sectors;
    use basalt_api::layout::Partition as Part;
    use gpt::disk::LogicalBlockSize;
    use gpt::partition::Partition;
    use gpt::partition_types;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// The contract's partitions (name, MiB), starting at 1 MiB.
    pub const PARTS: [(&str, u64); 5] = [
        (Part::Bios.name(), 1),
        (Part::Efi.name(), 2),
        (Part::RootA.name(), 4),
        (Part::RootB.name(), 4),
        (Part::State.name(), 8),
    ];
    pub const STATE_START: Sectors = Sectors::from_mib(1 + 1 + 2 + 4 + 4);
    pub const STATE_LEN: Sectors = Sectors::from_mib(8);
    /// The image: partitions plus 1 MiB for the backup table.
    pub const IMAGE: Sectors = Sectors::from_mib(1 + 1 + 2 + 4 + 4 + 8 + 1);

    /// Writes the image to `path` with `parts` (name, MiB) from 1 MiB on, then makes the
    /// file `size` sectors long (a larger disk).
    pub fn disk_with(path: &Path, parts: &[(&str, u64)], size: Sectors) {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create disk");
        let total: u64 = 1 + 1 + parts.iter().map(|(_, m)| m).sum::<u64>();
        file.set_len(Sectors::from_mib(total).bytes())
            .expect("size");
        let mut disk = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(LogicalBlockSize::Lb512)
            .create_from_device(&mut file, Some(uuid::Uuid::from_u128(7)))
            .expect("gpt");
        let mut entries: BTreeMap<u32, Partition> =
            (1..=128).map(|i| (i, Partition::zero())).collect();
        let mut next = Sectors::from_mib(1);
        for (i, (name, mib)) in parts.iter().enumerate() {
            let len = Sectors::from_mib(*mib);
            entries.insert(
                i as u32 + 1,
                Partition {
                    part_type_guid: partition_types::LINUX_FS,
                    part_guid: uuid::Uuid::from_u128(100 + i as u128),
                    first_lba: next.0,
                    last_lba: next.0 + len.0 - 1,
                    flags: 0,
                    name: (*name).into(),
                },
            );
            next = Sectors(next.0 + len.0);
        }
        disk.update_partitions(entries).expect("partitions");
        disk.write().expect("write gpt");
        gpt::mbr::ProtectiveMBR::with_lb_size(
            u32::try_from(Sectors::from_mib(total).0 - 1).expect("small"),
        )
        .overwrite_lba0(&mut file)
        .expect("mbr");
        file.set_len(size.bytes()).expect("grow");
    }

    /// The default layout on a disk of `size` sectors.
    pub fn disk(path: &Path, size: Sectors) {
        disk_with(path, &PARTS, size)
    }
}

#[cfg(test)]
mod tests;
