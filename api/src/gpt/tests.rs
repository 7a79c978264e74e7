//! The reader against tables written by `sfdisk` (util-linux), an independent writer,
//! and against headers damaged one field at a time.

use super::*;
use crate::layout::Partition;
use std::path::Path;
use std::process::Command;

/// The disk: 1 MiB before BIOS, the partitions of the contract's table, 1 MiB after.
const MIB: [u64; 5] = [1, 2, 4, 4, 8];
const DISK: Sectors = Sectors::from_mib(1 + 1 + 2 + 4 + 4 + 8 + 1);

fn sfdisk(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk (is util-linux's fdisk installed?)");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write sfdisk's stdin");
    drop(input);
    let out = child.wait_with_output().expect("sfdisk");
    assert!(out.status.success(), "sfdisk {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A disk of [`DISK`] sectors partitioned by sfdisk after the contract's table.
fn sfdisk_disk(path: &Path) {
    let f = File::create(path).expect("create");
    f.set_len(DISK.bytes()).expect("size");
    let mut script = String::from("label: gpt\nunit: sectors\n");
    let mut start = Sectors::from_mib(1);
    for (p, mib) in Partition::ALL.iter().zip(MIB) {
        let size = Sectors::from_mib(mib);
        script.push_str(&format!(
            "start={}, size={}, type={}, name=\"{}\"\n",
            start.0,
            size.0,
            p.type_guid(),
            p.name()
        ));
        start = Sectors(start.0 + size.0);
    }
    sfdisk(&[path.to_str().expect("utf-8")], Some(&script));
}

fn open(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open")
}

fn flip(f: &File, at: u64) {
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x40], at).expect("write");
}

#[test]
#[cfg_attr(basalt_skip_sfdisk, ignore = "needs sfdisk")]
fn reads_what_sfdisk_wrote_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    sfdisk_disk(&path);
    let json: serde_json::Value =
        serde_json::from_str(&sfdisk(&["--json", path.to_str().expect("utf-8")], None))
            .expect("sfdisk's JSON");
    let pt = &json["partitiontable"];

    let t = Table::read(&open(&path), DISK).expect("table");
    assert!(!t.from_backup);
    let h = &t.header;
    assert_eq!((h.my_lba, h.alternate_lba), (1, DISK.0 - 1));
    assert_eq!(Some(h.first_usable), pt["firstlba"].as_u64());
    assert_eq!(Some(h.last_usable), pt["lastlba"].as_u64());
    assert_eq!(Some(guid_string(&h.disk_guid).as_str()), pt["id"].as_str());

    let got: Vec<_> = t
        .partitions()
        .into_iter()
        .map(|e| {
            let size = e.sectors().0;
            let (ty, id) = (guid_string(&e.type_guid), guid_string(&e.guid));
            (e.number, e.first_lba, size, ty, id, e.name)
        })
        .collect();
    let want: Vec<_> = pt["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = |k: &str| p[k].as_str().expect(k).to_string();
            let n = |k: &str| p[k].as_u64().expect(k);
            (
                i as u32 + 1,
                n("start"),
                n("size"),
                s("type"),
                s("uuid"),
                s("name"),
            )
        })
        .collect();
    assert_eq!(got, want);
    // And the contract's table went through sfdisk unchanged.
    for (e, p) in t.partitions().iter().zip(Partition::ALL) {
        assert_eq!((e.number, e.name.as_str()), (p.number(), p.name()));
        assert_eq!(guid_string(&e.type_guid), p.type_guid());
    }

    let backup = read_copy(&open(&path), DISK.0 - 1).expect("backup");
    assert_eq!(backup.entries, t.entries);
    assert_eq!(
        (backup.header.my_lba, backup.header.alternate_lba),
        (DISK.0 - 1, 1)
    );
    assert_eq!(backup.header.entries_lba, DISK.0 - 33);
}

#[test]
#[cfg_attr(basalt_skip_sfdisk, ignore = "needs sfdisk")]
fn a_damaged_primary_is_replaced_by_the_backup_and_two_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    sfdisk_disk(&path);
    let f = open(&path);
    let good = Table::read(&f, DISK).expect("table");
    // The primary's first entry's name: the array's CRC32 no longer matches.
    flip(&f, 2 * 512 + 60);
    assert!(matches!(
        read_copy(&f, 1),
        Err(ReadError::Header {
            lba: 1,
            fault: HeaderFault::EntriesCrc { .. }
        })
    ));
    let t = Table::read(&f, DISK).expect("backup");
    assert!(t.from_backup);
    assert_eq!(t.entries, good.entries);
    assert_eq!(t.header.my_lba, DISK.0 - 1);
    // The backup header too: the primary's fault is the one reported.
    flip(&f, (DISK.0 - 1) * 512 + 40);
    let err = Table::read(&f, DISK).unwrap_err();
    assert!(
        matches!(
            err,
            ReadError::Header {
                lba: 1,
                fault: HeaderFault::EntriesCrc { .. }
            }
        ),
        "{err:?}"
    );
    // Read where it is not: the header says where it belongs.
    let moved = dir.path().join("moved.raw");
    sfdisk_disk(&moved);
    let m = open(&moved);
    let mut backup = [0u8; SECTOR];
    m.read_exact_at(&mut backup, (DISK.0 - 1) * 512)
        .expect("read");
    m.write_all_at(&backup, (DISK.0 - 2) * 512).expect("write");
    assert!(matches!(
        read_copy(&m, DISK.0 - 2),
        Err(ReadError::Header {
            fault: HeaderFault::Misplaced(lba),
            ..
        }) if lba == DISK.0 - 1
    ));
}

#[test]
fn a_disk_too_small_for_a_gpt_and_a_short_read_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.raw");
    std::fs::write(&path, [0u8; 700]).expect("write");
    let f = open(&path);
    assert!(matches!(
        Table::read(&f, Sectors(2)),
        Err(ReadError::TooSmall(2))
    ));
    assert!(matches!(
        Table::read(&f, Sectors(8)),
        Err(ReadError::Read { offset: 512, .. })
    ));
}

fn header() -> Header {
    Header {
        revision: 0x0001_0000,
        my_lba: 1,
        alternate_lba: 999,
        first_usable: 34,
        last_usable: 965,
        disk_guid: [7; 16],
        entries_lba: 2,
        num_entries: 128,
        entries_crc: 0x1234_5678,
    }
}

#[test]
fn header_faults_are_told_apart() {
    let good = header().encode();
    assert_eq!(Header::parse(&good, 1), Ok(header()));
    type Case = (usize, u32, u64, fn(&HeaderFault) -> bool);
    let cases: [Case; 9] = [
        (0, u32::from_le_bytes(*b"XFI "), 1, |f| {
            *f == HeaderFault::Signature
        }),
        (40, 1, 1, |f| matches!(f, HeaderFault::HeaderCrc { .. })),
        // UEFI allows a longer header; no tool basalt meets writes one.
        (12, 93, 1, |f| {
            *f == HeaderFault::Unsupported {
                field: "header size",
                value: 93,
            }
        }),
        (200, 0, 2, |f| *f == HeaderFault::Misplaced(1)),
        (84, 0, 1, |f| {
            matches!(
                f,
                HeaderFault::Unsupported {
                    field: "entry size",
                    ..
                }
            )
        }),
        (84, 256, 1, |f| {
            matches!(
                f,
                HeaderFault::Unsupported {
                    field: "entry size",
                    value: 256
                }
            )
        }),
        (80, 0, 1, |f| {
            matches!(
                f,
                HeaderFault::Unsupported {
                    field: "entry count",
                    value: 0
                }
            )
        }),
        (80, MAX_ENTRIES + 1, 1, |f| {
            matches!(
                f,
                HeaderFault::Unsupported {
                    field: "entry count",
                    ..
                }
            )
        }),
        (40, 966, 1, |f| {
            matches!(
                f,
                HeaderFault::Unsupported {
                    field: "first usable LBA",
                    value: 966
                }
            )
        }),
    ];
    for (at, value, lba, want) in cases {
        let mut s = good;
        s[at..at + 4].copy_from_slice(&value.to_le_bytes());
        if !(at == 40 && value == 1) {
            // Keep the CRC right so that the later checks are reached.
            s[16..20].fill(0);
            let crc = crc32fast::hash(&s[..HEADER_SIZE]);
            s[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        let fault = Header::parse(&s, lba).unwrap_err();
        assert!(want(&fault), "bytes {at}.. = {value}: {fault:?}");
    }
}

#[test]
fn entries_are_parsed_with_their_numbers_and_unused_ones_skipped() {
    let mut array = vec![0u8; 4 * ENTRY_SIZE];
    let e = &mut array[2 * ENTRY_SIZE..3 * ENTRY_SIZE];
    e[..16].copy_from_slice(&[1; 16]);
    e[16..32].copy_from_slice(&[2; 16]);
    e[32..40].copy_from_slice(&100u64.to_le_bytes());
    e[40..48].copy_from_slice(&199u64.to_le_bytes());
    for (i, u) in "STATE".encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let got: Vec<_> = entries(&array).collect();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].number, got[0].name.as_str()), (3, "STATE"));
    assert_eq!((got[0].first_lba, got[0].sectors()), (100, Sectors(100)));
    assert_eq!(
        guid_string(&got[0].type_guid),
        "01010101-0101-0101-0101-010101010101"
    );
}

#[test]
fn guids_print_mixed_endian_as_sfdisk_does() {
    // The EFI system partition's type GUID as it lies on disk.
    let stored = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    assert_eq!(guid_string(&stored), Partition::Efi.type_guid());
}
