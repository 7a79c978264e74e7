//! The one GPT reader: `basalt inspect`/`verify` read a built image with it, and
//! basalt-init reads the table it grows STATE in with it (init keeps its own
//! crash-ordered writer, `init/src/storage/grow/gpt.rs`).
//!
//! Hand-written over [`Sectors`] rather than with the `gpt` crate (which the builder
//! writes images with, and the tests read back with), because this crate is linked into
//! the static PID1:
//! - the `gpt` crate `assert!`s on tables it does not expect (an entry size other than
//!   128), and a panic in PID1 is a reboot loop; here every fault is a [`HeaderFault`];
//! - it brings `uuid`, `bitflags`, `crc` and `simple-bytes` into PID1 for what is ~150 lines
//!   of reading little-endian fields and two CRC32s (`crc32fast`, no dependencies of its
//!   own beyond `cfg-if`);
//! - it reads through `Read + Seek` on a handle it owns, where both callers here read
//!   with `pread` on a shared `&File`.
//!
//! The checks are the stricter union of the two readers this replaces: signature, header
//! size exactly 92, header CRC32, the header at the LBA it was read from, entries of
//! exactly 128 bytes, 1 to 4096 of them, first usable LBA not after the last, and the
//! entry array's CRC32. Every tool basalt meets (the `gpt` crate, sfdisk, sgdisk, the
//! kernel's own writer) writes such tables.

use crate::layout::Sectors;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// One sector, in bytes.
pub const SECTOR: usize = Sectors::SIZE as usize;
/// "EFI PART", the header's first 8 bytes.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The header's size: the 92 bytes of UEFI 2.10 §5.3.2 that every tool writes.
pub const HEADER_SIZE: usize = 92;
/// The size of one partition entry.
pub const ENTRY_SIZE: usize = 128;
/// Bounds the entry array read from disk (512 KiB); real tables have 128 entries.
pub const MAX_ENTRIES: u32 = 4096;

/// What is wrong with one copy of the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderFault {
    #[error("no \"EFI PART\" signature")]
    Signature,
    #[error("header CRC32 {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("partition entry array CRC32 {stored:#010x}, computed {computed:#010x}")]
    EntriesCrc { stored: u32, computed: u32 },
    #[error("header says it is at LBA {0}")]
    Misplaced(u64),
    #[error("unsupported {field} {value}")]
    Unsupported { field: &'static str, value: u64 },
}

/// Reading one copy, or the table, from a disk.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read {len} bytes at byte {offset}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("GPT at LBA {lba}")]
    Header {
        lba: u64,
        #[source]
        fault: HeaderFault,
    },
    #[error("a disk of {0} sectors holds no GPT")]
    TooSmall(u64),
}

/// A GPT header (UEFI 2.10 §5.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub revision: u32,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    /// As stored: the first three fields little-endian.
    pub disk_guid: [u8; 16],
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entries_crc: u32,
}

impl Header {
    /// Parses and checks the header in `sector`, read from `lba`.
    pub fn parse(sector: &[u8; SECTOR], lba: u64) -> Result<Header, HeaderFault> {
        if &sector[..8] != SIGNATURE {
            return Err(HeaderFault::Signature);
        }
        let size = u32_at(sector, 12);
        if size as usize != HEADER_SIZE {
            return Err(unsupported("header size", size.into()));
        }
        let stored = u32_at(sector, 16);
        let mut zeroed = [0u8; HEADER_SIZE];
        zeroed.copy_from_slice(&sector[..HEADER_SIZE]);
        zeroed[16..20].fill(0);
        let computed = crc32fast::hash(&zeroed);
        if stored != computed {
            return Err(HeaderFault::HeaderCrc { stored, computed });
        }
        let entry_size = u32_at(sector, 84);
        if entry_size as usize != ENTRY_SIZE {
            return Err(unsupported("entry size", entry_size.into()));
        }
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&sector[56..72]);
        let h = Header {
            revision: u32_at(sector, 8),
            my_lba: u64_at(sector, 24),
            alternate_lba: u64_at(sector, 32),
            first_usable: u64_at(sector, 40),
            last_usable: u64_at(sector, 48),
            disk_guid,
            entries_lba: u64_at(sector, 72),
            num_entries: u32_at(sector, 80),
            entries_crc: u32_at(sector, 88),
        };
        if h.my_lba != lba {
            return Err(HeaderFault::Misplaced(h.my_lba));
        }
        if h.num_entries == 0 || h.num_entries > MAX_ENTRIES {
            return Err(unsupported("entry count", h.num_entries.into()));
        }
        if h.first_usable > h.last_usable {
            return Err(unsupported("first usable LBA", h.first_usable));
        }
        Ok(h)
    }

    /// The header's sector, CRC32 filled in: what [`Header::parse`] reads back.
    pub fn encode(&self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(SIGNATURE);
        s[8..12].copy_from_slice(&self.revision.to_le_bytes());
        s[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        s[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        s[32..40].copy_from_slice(&self.alternate_lba.to_le_bytes());
        s[40..48].copy_from_slice(&self.first_usable.to_le_bytes());
        s[48..56].copy_from_slice(&self.last_usable.to_le_bytes());
        s[56..72].copy_from_slice(&self.disk_guid);
        s[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        s[80..84].copy_from_slice(&self.num_entries.to_le_bytes());
        s[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        s[88..92].copy_from_slice(&self.entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&s[..HEADER_SIZE]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// Bytes of the entry array.
    pub fn entries_len(&self) -> usize {
        self.num_entries as usize * ENTRY_SIZE
    }

    /// Sectors the entry array takes.
    pub fn entries_sectors(&self) -> u64 {
        self.entries_len().div_ceil(SECTOR) as u64
    }
}

fn unsupported(field: &'static str, value: u64) -> HeaderFault {
    HeaderFault::Unsupported { field, value }
}

/// A used entry of the array (type GUID not all zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based index in the entry array (`/dev/vda<number>`).
    pub number: u32,
    /// As stored: the first three fields little-endian.
    pub type_guid: [u8; 16],
    /// As stored: the first three fields little-endian.
    pub guid: [u8; 16],
    pub first_lba: u64,
    /// Inclusive, as the GPT stores it.
    pub last_lba: u64,
    pub name: String,
}

impl Entry {
    /// Sectors from the first LBA to the last (0 for an entry that ends before it starts).
    pub fn sectors(&self) -> Sectors {
        Sectors((self.last_lba + 1).saturating_sub(self.first_lba))
    }
}

/// A GUID as stored on disk (first three fields little-endian) in its usual text form,
/// upper case as `sfdisk` prints it and as [`crate::layout::type_guid`] spells it.
pub fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// The partition's name in a 128-byte entry: UTF-16LE up to the first NUL.
pub fn entry_name(entry: &[u8]) -> String {
    let units: Vec<u16> = entry[56..128]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Whether a 128-byte entry is in use (its type GUID is not all zero).
pub fn entry_used(entry: &[u8]) -> bool {
    entry[..16].iter().any(|&b| b != 0)
}

/// The used entries of an entry array, with their 0-based index and raw bytes.
pub fn raw_entries(array: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    array
        .chunks_exact(ENTRY_SIZE)
        .enumerate()
        .filter(|(_, e)| entry_used(e))
}

/// The used entries of an entry array, parsed.
pub fn entries(array: &[u8]) -> impl Iterator<Item = Entry> + '_ {
    raw_entries(array).map(|(i, e)| {
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&e[..16]);
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&e[16..32]);
        Entry {
            number: i as u32 + 1,
            type_guid,
            guid,
            first_lba: u64_at(e, 32),
            last_lba: u64_at(e, 40),
            name: entry_name(e),
        }
    })
}

/// One valid copy of the table: header and entry array.
#[derive(Debug, Clone)]
pub struct Table {
    pub header: Header,
    pub entries: Vec<u8>,
    /// The primary was damaged and this is the backup from the disk's last sector.
    pub from_backup: bool,
}

impl Table {
    /// The primary copy, else the backup in the disk's last sector (where the kernel looks
    /// too) of a disk of `size` sectors. When neither is valid, the primary's fault.
    pub fn read(disk: &File, size: Sectors) -> Result<Table, ReadError> {
        let last = size.0.checked_sub(1).filter(|&l| l >= 2);
        let Some(last) = last else {
            return Err(ReadError::TooSmall(size.0));
        };
        match read_copy(disk, 1) {
            Ok(table) => Ok(table),
            Err(primary @ ReadError::Header { .. }) => match read_copy(disk, last) {
                Ok(table) => Ok(Table {
                    from_backup: true,
                    ..table
                }),
                Err(_) => Err(primary),
            },
            Err(e) => Err(e),
        }
    }

    /// The 128 bytes of entry `index` (0-based; partition number - 1).
    pub fn entry(&self, index: usize) -> Option<&[u8]> {
        self.entries
            .get(index * ENTRY_SIZE..(index + 1) * ENTRY_SIZE)
    }

    /// The used entries, with their 0-based index.
    pub fn used(&self) -> impl Iterator<Item = (usize, &[u8])> {
        raw_entries(&self.entries)
    }

    /// The used entries, parsed.
    pub fn partitions(&self) -> Vec<Entry> {
        entries(&self.entries).collect()
    }
}

/// The copy whose header is at `lba`: header checked, entry array read and checked
/// against the header's CRC32. (`from_backup` is false; [`Table::read`] sets it.)
pub fn read_copy(disk: &File, lba: u64) -> Result<Table, ReadError> {
    let fault = |fault| ReadError::Header { lba, fault };
    let mut sector = [0u8; SECTOR];
    read_at(disk, lba, &mut sector)?;
    let header = Header::parse(&sector, lba).map_err(fault)?;
    let mut entries = vec![0u8; header.entries_len()];
    read_at(disk, header.entries_lba, &mut entries)?;
    let computed = crc32fast::hash(&entries);
    if computed != header.entries_crc {
        return Err(fault(HeaderFault::EntriesCrc {
            stored: header.entries_crc,
            computed,
        }));
    }
    Ok(Table {
        header,
        entries,
        from_backup: false,
    })
}

/// Fills `buf` from the disk at `lba`.
pub fn read_at(disk: &File, lba: u64, buf: &mut [u8]) -> Result<(), ReadError> {
    let offset = lba.saturating_mul(Sectors::SIZE);
    disk.read_exact_at(buf, offset)
        .map_err(|source| ReadError::Read {
            offset,
            len: buf.len(),
            source,
        })
}

/// The little-endian `u32` at byte `at`.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The little-endian `u64` at byte `at`.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests;
