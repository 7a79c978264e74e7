use super::fixture::{node, IMAGE, STATE_LEN, STATE_START};
use super::*;
use basalt_api::layout::Partition;

const STATE: &str = Partition::State.name();

const GROWN: Sectors = Sectors(IMAGE.0 + Sectors::from_mib(1024).0);

fn vda5() -> BlockDev {
    BlockDev {
        name: "vda5".into(),
        major: 254,
        minor: 5,
    }
}

#[test]
fn placement_reads_the_partition_and_its_disk_from_sysfs() {
    let root = tempfile::tempdir().expect("tempdir");
    node(root.path(), GROWN);
    let at = placement(&root.path().join("sys"), "vda5").expect("placement");
    assert_eq!(
        at,
        Placement {
            disk: "vda".into(),
            disk_size: GROWN,
            number: 5,
            start: STATE_START,
            len: STATE_LEN,
        }
    );
    std::fs::write(
        root.path().join("sys/block/vda/queue/logical_block_size"),
        "4096\n",
    )
    .expect("write");
    let err = placement(&root.path().join("sys"), "vda5").unwrap_err();
    assert!(
        matches!(err, GrowError::BlockSize { size: 4096, .. }),
        "{err}"
    );
}

#[test]
fn grows_the_table_then_tells_the_kernel_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
    node(root.path(), GROWN);
    let mut ops = Recording {
        sysfs: Some((sys.clone(), "vda5".into())),
        ..Default::default()
    };
    let g = grow_partition(&mut ops, &sys, &dev, &vda5(), STATE)
        .expect("grow")
        .expect("grown");
    let to = Sectors(GROWN.0 - 34 + 1 - STATE_START.0);
    assert_eq!(
        g,
        Grown {
            from: STATE_LEN,
            to,
            repaired: false
        }
    );
    assert_eq!(
        ops.calls,
        [Resized::Partition {
            disk: dev.join("vda"),
            number: 5,
            start: STATE_START,
            len: to,
        }]
    );
    assert_eq!(
        grow_partition(&mut ops, &sys, &dev, &vda5(), STATE).expect("again"),
        None
    );
    assert_eq!(ops.calls.len(), 1);
}

#[test]
fn a_refused_blkpg_is_an_error_after_the_table_is_written() {
    let root = tempfile::tempdir().expect("tempdir");
    let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
    node(root.path(), GROWN);
    let mut ops = Recording {
        fail_blkpg: Some(nix::errno::Errno::EBUSY),
        ..Default::default()
    };
    let err = grow_partition(&mut ops, &sys, &dev, &vda5(), STATE).unwrap_err();
    assert!(matches!(err, GrowError::Blkpg { number: 5, .. }), "{err:?}");
    assert!(crate::pid1::console::chain(&err).contains("Device or resource busy"));
    // The table is grown all the same: the next boot's kernel reads it.
    assert_eq!(
        grow_partition(&mut Recording::default(), &sys, &dev, &vda5(), STATE).expect("again"),
        None
    );
}

#[test]
fn a_kernel_and_table_that_disagree_are_left_alone() {
    let root = tempfile::tempdir().expect("tempdir");
    let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
    node(root.path(), GROWN);
    std::fs::write(root.path().join("sys/block/vda/vda5/start"), "4096\n").expect("write");
    let before = std::fs::read(dev.join("vda")).expect("read");
    let mut ops = Recording::default();
    let err = grow_partition(&mut ops, &sys, &dev, &vda5(), STATE).unwrap_err();
    assert!(
        matches!(err, GrowError::StartMismatch { kernel: 4096, .. }),
        "{err}"
    );
    assert!(ops.calls.is_empty());
    assert!(std::fs::read(dev.join("vda")).expect("read") == before);
}

#[test]
fn ext4_target_cases() {
    let fs = Ext4 {
        block_size: 4096,
        blocks: 16384, // 64 MiB
    };
    let mib = Sectors::from_mib;
    let cases = [
        (mib(64), true, None),
        (mib(64), false, None),
        (Sectors(mib(64).0 + 7), true, None), // less than a block more
        (Sectors(mib(64).0 + 8), true, Some(16385)),
        (Sectors(mib(64).0 + 8), false, None),
        (mib(64 + 15), false, None),
        (mib(64 + 16), false, Some(16384 + 4096)),
        (mib(1088), true, Some(1088 * 256)),
        (mib(32), true, None), // never shrinks
    ];
    for (len, just_grown, want) in cases {
        assert_eq!(
            ext4_target(fs, len, just_grown),
            want,
            "{len:?} {just_grown}"
        );
    }
}

#[test]
fn reads_the_superblock_mkfs_ext4_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("state.img");
    for (size, args) in [
        ("48M", &[][..]),
        ("40M", &["-b", "1024", "-O", "64bit"][..]),
    ] {
        let _ = std::fs::remove_file(&img);
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(args)
            .arg(&img)
            .arg(size)
            .output()
            .expect("run mkfs.ext4 (e2fsprogs installed?)");
        assert!(out.status.success(), "{out:?}");
        let fs = Ext4::read(&img).expect("superblock");
        assert_eq!(
            fs.bytes(),
            std::fs::metadata(&img).expect("stat").len(),
            "{fs:?}"
        );
        if !args.is_empty() {
            assert_eq!(fs.block_size, 1024);
        }
    }
    std::fs::write(&img, vec![0u8; 4096]).expect("write");
    assert!(matches!(Ext4::read(&img), Err(GrowError::NotExt4(_))));
}

#[test]
fn grows_the_filesystem_only_when_there_is_room() {
    let root = tempfile::tempdir().expect("tempdir");
    node(root.path(), GROWN);
    let dev = root.path().join("dev/vda5");
    let mnt = root.path().join("var");
    let mut ops = Recording {
        ext4_dev: Some(dev.clone()),
        ..Default::default()
    };
    assert_eq!(
        grow_filesystem(&mut ops, &dev, &mnt, STATE_LEN, false).expect("same size"),
        None
    );
    let len = Sectors::from_mib(1000);
    let g = grow_filesystem(&mut ops, &dev, &mnt, len, true)
        .expect("grow")
        .expect("grown");
    assert_eq!(
        (g.from.bytes(), g.to.bytes()),
        (STATE_LEN.bytes(), len.bytes())
    );
    assert_eq!(
        ops.calls,
        [Resized::Ext4 {
            mount_point: mnt.clone(),
            blocks: 256_000
        }]
    );
    assert_eq!(
        grow_filesystem(&mut ops, &dev, &mnt, len, false).expect("again"),
        None
    );
    assert_eq!(ops.calls.len(), 1);
}

#[test]
fn usage_reports_a_filesystem_with_free_space_below_its_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let u = usage(dir.path()).expect("statvfs");
    assert!(u.total > 0 && u.free <= u.total, "{u:?}");
    assert!(matches!(
        usage(&dir.path().join("missing")),
        Err(GrowError::Statvfs(..))
    ));
}
