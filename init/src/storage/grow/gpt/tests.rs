use super::fixture::{disk, disk_with, IMAGE, PARTS, STATE_LEN, STATE_START};
use super::*;
use std::path::Path;

const GROWN: Sectors = Sectors(IMAGE.0 + Sectors::from_mib(64).0);
const STATE: &str = basalt_api::layout::Partition::State.name();

/// One copy, its errors named as [`plan`]'s are.
fn read_copy(disk: &File, lba: u64) -> Result<Table, GptError> {
    Ok(basalt_api::gpt::read_copy(disk, lba)?)
}

fn open(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open")
}

fn grow(path: &Path, size: Sectors) -> Option<Plan> {
    let f = open(path);
    let plan = plan(&f, size, 5, STATE).expect("plan");
    if let Some(p) = &plan {
        p.apply(&f).expect("apply");
    }
    plan
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (installed?): {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both copies as the `gpt` crate, `sgdisk -v` and `sfdisk` see them.
fn assert_valid_and_state_ends_at(path: &Path, size: Sectors, state_last: u64) {
    let g = gpt::GptConfig::new()
        .only_valid_headers(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(path)
        .expect("both headers valid for the gpt crate");
    let (p, b) = (
        g.primary_header().expect("primary"),
        g.backup_header().expect("backup"),
    );
    assert_eq!((p.current_lba, p.backup_lba), (1, size.0 - 1));
    assert_eq!((b.current_lba, b.backup_lba), (size.0 - 1, 1));
    assert_eq!(b.part_start, size.0 - 33);
    assert_eq!(p.last_usable, size.0 - 34);
    assert_eq!(b.last_usable, p.last_usable);
    assert_eq!(p.crc32_parts, b.crc32_parts);
    let parts = g.partitions();
    let names: Vec<_> = parts.values().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PARTS.map(|(n, _)| n));
    assert_eq!(parts[&5].first_lba, STATE_START.0);
    assert_eq!(parts[&5].last_lba, state_last);
    assert_eq!(parts[&4].last_lba, STATE_START.0 - 1, "others untouched");

    let path = path.to_str().expect("utf-8");
    let v = tool("sgdisk", &["-v", path]);
    assert!(v.contains("No problems found"), "{v}");
    let json: String = tool("sfdisk", &["--json", path])
        .split_whitespace()
        .collect();
    assert!(
        json.contains(&format!("\"lastlba\":{},", size.0 - 34)),
        "{json}"
    );
    let state_size = state_last + 1 - STATE_START.0;
    assert!(
        json.contains(&format!(
            "\"start\":{},\"size\":{state_size},",
            STATE_START.0
        )),
        "{json}"
    );
}

#[test]
fn state_grows_to_the_last_usable_lba_and_both_copies_are_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    disk(&path, GROWN);
    let p = grow(&path, GROWN).expect("something to do");
    assert_eq!(p.start, STATE_START);
    assert_eq!(p.old_len, STATE_LEN);
    assert_eq!(p.new_len, Sectors(GROWN.0 - 34 + 1 - STATE_START.0));
    assert!(!p.repaired);
    assert_valid_and_state_ends_at(&path, GROWN, GROWN.0 - 34);

    // The protective MBR covers the grown disk; the old backup header is gone.
    let f = open(&path);
    let mut s = [0u8; SECTOR];
    f.read_exact_at(&mut s, 0).expect("read");
    assert_eq!(u32_at(&s, 446 + 12), (GROWN.0 - 1) as u32);
    f.read_exact_at(&mut s, (IMAGE.0 - 1) * 512).expect("read");
    assert_eq!(s, [0u8; SECTOR]);
}

#[test]
fn a_second_run_has_nothing_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    disk(&path, GROWN);
    assert!(grow(&path, GROWN).is_some());
    let before = std::fs::read(&path).expect("read");
    assert_eq!(grow(&path, GROWN), None);
    assert!(
        std::fs::read(&path).expect("read") == before,
        "disk changed"
    );
}

#[test]
fn less_than_the_minimum_gain_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    // The disk whose last usable LBA is `gain` sectors past STATE's end.
    let state_last = STATE_START.0 + STATE_LEN.0 - 1;
    let size = |gain: u64| Sectors(state_last + gain + 34);
    for gain in [0, 1, MIN_GAIN.0 - 1] {
        disk(&path, size(gain).max(IMAGE));
        assert_eq!(grow(&path, size(gain).max(IMAGE)), None, "{gain}");
    }
    // One sector more and it grows: the threshold is exactly MIN_GAIN.
    disk(&path, size(MIN_GAIN.0));
    let p = grow(&path, size(MIN_GAIN.0)).expect("grows");
    assert_eq!(p.new_len.0 - p.old_len.0, MIN_GAIN.0);
    assert_valid_and_state_ends_at(&path, size(MIN_GAIN.0), state_last + MIN_GAIN.0);
}

#[test]
fn refusals_name_their_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    let mut after = PARTS.to_vec();
    after.push(("EXTRA", 1));
    disk_with(&path, &after, Sectors(IMAGE.0 + Sectors::from_mib(64).0));
    let f = open(&path);
    let size = Sectors(IMAGE.0 + Sectors::from_mib(64).0);
    assert!(matches!(
        plan(&f, size, 5, STATE),
        Err(GptError::NotLast { number: 5 })
    ));
    assert!(matches!(
        plan(&f, size, 4, STATE),
        Err(GptError::NotThere { number: 4, .. })
    ));
    assert!(matches!(
        plan(&f, size, 9, STATE),
        Err(GptError::NotThere { number: 9, .. })
    ));
    assert!(matches!(
        plan(&f, size, 0, STATE),
        Err(GptError::NotThere { number: 0, .. })
    ));
    // A disk smaller than the table says: STATE would not fit.
    disk(&path, GROWN);
    let f = open(&path);
    // An entry that ends before it starts.
    let mut t = Table::read(&f, GROWN).expect("table");
    t.entries[4 * ENTRY_SIZE + 40..4 * ENTRY_SIZE + 48].copy_from_slice(&1u64.to_le_bytes());
    assert!(matches!(
        plan_table(&t, &[0; SECTOR], GROWN, 5, STATE),
        Err(GptError::Header {
            fault: HeaderFault::Unsupported {
                field: "partition end LBA",
                value: 1
            },
            ..
        })
    ));
    assert!(matches!(
        plan(&f, Sectors(STATE_START.0 + 100), 5, STATE),
        Err(GptError::DiskTooSmall { number: 5, .. })
    ));
}

/// A power cut after any single write leaves a table the kernel accepts: the primary,
/// or else the backup in the disk's last sector.
#[test]
fn every_prefix_of_the_writes_leaves_a_valid_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    disk(&path, GROWN);
    let f = open(&path);
    let p = plan(&f, GROWN, 5, STATE).expect("plan").expect("grows");
    let writes: Vec<&Write> = p.phases.iter().flatten().collect();
    assert!(writes.len() >= 4, "{writes:?}");
    for w in writes {
        f.write_all_at(&w.bytes, w.lba * 512).expect("write");
        let primary = read_copy(&f, 1);
        let backup = read_copy(&f, GROWN.0 - 1);
        assert!(
            primary.is_ok() || backup.is_ok(),
            "after the write at LBA {}: {primary:?} / {backup:?}",
            w.lba
        );
    }
    // Primary entries written, primary header not: the kernel's fallback is the new
    // backup, and the next boot restores the primary from it.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let path2 = dir2.path().join("disk.raw");
    disk(&path2, GROWN);
    let f2 = open(&path2);
    let p2 = plan(&f2, GROWN, 5, STATE).expect("plan").expect("grows");
    for w in &p2.phases[0] {
        f2.write_all_at(&w.bytes, w.lba * 512).expect("write");
    }
    let entries = &p2.phases[1][0];
    f2.write_all_at(&entries.bytes, entries.lba * 512)
        .expect("write");
    assert!(matches!(
        read_copy(&f2, 1),
        Err(GptError::Header {
            lba: 1,
            fault: HeaderFault::EntriesCrc { .. }
        })
    ));
    let repair = grow(&path2, GROWN).expect("repair");
    assert!(repair.repaired);
    assert_eq!(
        repair.old_len, repair.new_len,
        "already grown in the backup"
    );
    assert_valid_and_state_ends_at(&path2, GROWN, GROWN.0 - 34);
    assert_eq!(grow(&path2, GROWN), None);
}
