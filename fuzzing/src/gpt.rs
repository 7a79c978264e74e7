//! GPT reading, as `basalt inspect`/`verify` and STATE growth read a disk.

use basalt_api::gpt::{Table, ENTRY_SIZE, HEADER_SIZE, MAX_ENTRIES, SECTOR};
use basalt_api::layout::Sectors;
use std::io::Write;

/// The input is `flags` then a disk image (padded to whole sectors, at least three).
/// Flag bit 0 recomputes the primary header's CRC32s and bit 1 the backup's, so that
/// the fuzzer reaches the checks behind them instead of stopping at a checksum.
/// Properties: a table read is the copy it says it is, and within the bounds it checks.
pub fn table(data: &[u8]) {
    read(data);
}

/// [`table`], returning the table read (for the harness's own tests).
pub fn read(data: &[u8]) -> Option<Table> {
    let (&flags, image) = data.split_first()?;
    let disk = disk_image(flags, image)?;
    let sectors = disk.len() / SECTOR;
    let last = sectors as u64 - 1;
    let mut file = tempfile::tempfile().expect("temporary file");
    file.write_all(&disk).expect("write the disk");
    let table = Table::read(&file, Sectors(sectors as u64)).ok()?;
    let h = &table.header;
    assert_eq!(h.my_lba, if table.from_backup { last } else { 1 });
    assert!(h.num_entries >= 1 && h.num_entries <= MAX_ENTRIES);
    assert_eq!(table.entries.len(), h.num_entries as usize * ENTRY_SIZE);
    assert!(h.first_usable <= h.last_usable);
    for p in table.partitions() {
        assert!(p.number >= 1 && p.number <= h.num_entries);
    }
    Some(table)
}

/// `image` padded to whole sectors (at least three), with the primary's CRC32s
/// recomputed when `flags` bit 0 is set and the backup's (in the last sector) with bit 1.
pub fn disk_image(flags: u8, image: &[u8]) -> Option<Vec<u8>> {
    let sectors = image.len().div_ceil(SECTOR).max(3);
    let mut disk = image.to_vec();
    disk.resize(sectors * SECTOR, 0);
    if flags & 1 != 0 {
        fix_crcs(&mut disk, 1);
    }
    if flags & 2 != 0 {
        fix_crcs(&mut disk, sectors as u64 - 1);
    }
    Some(disk)
}

/// Recomputes the CRC32s of the header at `lba` (entry array, then header), when the
/// fields they cover lie within the disk.
fn fix_crcs(disk: &mut [u8], lba: u64) {
    let at = lba as usize * SECTOR;
    let Some(header) = disk.get(at..at + SECTOR) else {
        return;
    };
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().expect("8 bytes"));
    let count = u32_at(header, 80) as usize;
    let size = u32_at(header, 84) as usize;
    let start = (entries_lba as usize).saturating_mul(SECTOR);
    let len = count.saturating_mul(size);
    if let Some(entries) = disk.get(start..start.saturating_add(len)) {
        let crc = crc32fast::hash(entries);
        disk[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
    }
    disk[at + 16..at + 20].fill(0);
    let crc = crc32fast::hash(&disk[at..at + HEADER_SIZE]);
    disk[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
}
