//! STATE growth's GPT plan (`init/src/storage/grow/gpt.rs`), cut after every sector.

use basalt_api::gpt::{Table, SECTOR};
use basalt_api::layout::Sectors;
use basalt_init::storage::grow::gpt::{plan, MIN_GAIN};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The partition grown: the last one, named as on a basalt image.
const NUMBER: u32 = 2;
const NAME: &str = "STATE";

/// The input is `flags`, how much the disk grew (in units of [`MIN_GAIN`] / 4), then a
/// disk image (CRC32s recomputed as in [`crate::gpt`]). When the growth has a plan, the
/// plan's writes reach a sparse copy of the grown disk one sector at a time, and after
/// each sector the table is read as basalt-init reads it (primary, else backup).
/// Properties: the disk never stops having a table; partition 2 is always its old size
/// or its planned new size, never anything else; every other entry is untouched; after
/// the last write the primary alone describes the grown disk.
pub fn growth(data: &[u8]) {
    grow(data);
}

/// [`growth`], returning the grown disk when there was a plan (for the harness's tests).
pub fn grow(data: &[u8]) -> Option<File> {
    let [flags, grow, image @ ..] = data else {
        return None;
    };
    let disk = crate::gpt::disk_image(*flags, image)?;
    let sectors = (disk.len() / SECTOR) as u64;
    let size = Sectors(sectors + u64::from(*grow) * (MIN_GAIN.0 / 4));
    let file = tempfile::tempfile().expect("temporary file");
    file.set_len(size.bytes()).expect("size the disk");
    file.write_all_at(&disk, 0).expect("write the disk");
    let Ok(Some(plan)) = plan(&file, size, NUMBER, NAME) else {
        return None;
    };
    let before = Table::read(&file, size).expect("a disk with a plan has a table");
    let others = |t: &Table| -> Vec<_> {
        t.partitions()
            .into_iter()
            .filter(|p| p.number != NUMBER)
            .map(|p| (p.number, p.first_lba, p.last_lba, p.type_guid, p.name))
            .collect()
    };
    let old_last = plan.start.0 + plan.old_len.0 - 1;
    let new_last = plan.start.0 + plan.new_len.0 - 1;
    let check = |file: &File, when: &str| -> Table {
        let t = Table::read(file, size).unwrap_or_else(|e| panic!("{when}: no table: {e}"));
        let p = t
            .partitions()
            .into_iter()
            .find(|p| p.number == NUMBER)
            .unwrap_or_else(|| panic!("{when}: partition {NUMBER} gone"));
        assert_eq!(p.first_lba, plan.start.0, "{when}");
        assert!(
            p.last_lba == old_last || p.last_lba == new_last,
            "{when}: partition {NUMBER} ends at {}, neither {old_last} nor {new_last}",
            p.last_lba
        );
        assert_eq!(others(&t), others(&before), "{when}: another entry changed");
        t
    };
    for (phase, writes) in plan.phases.iter().enumerate() {
        for w in writes {
            for (i, sector) in w.bytes.chunks(SECTOR).enumerate() {
                let lba = w.lba + i as u64;
                file.write_all_at(sector, lba * SECTOR as u64)
                    .expect("write a sector");
                check(&file, &format!("phase {phase}, after LBA {lba}"));
            }
        }
    }
    let after = check(&file, "after the plan");
    assert!(!after.from_backup, "the primary was not left whole");
    let p = after
        .partitions()
        .into_iter()
        .find(|p| p.number == NUMBER)
        .expect("partition");
    assert_eq!(p.last_lba, new_last);
    assert_eq!(
        after.header.alternate_lba,
        size.0 - 1,
        "the backup is not at the end"
    );
    Some(file)
}
