//! STATE on a disk larger than the image: the first boot grows the partition and its ext4
//! to the end of the disk, the next boot finds nothing to do, and the GPT left on the disk
//! passes `sgdisk -v`.

mod common;

use anyhow::Context;
use basalt_api::layout::Partition;
use basalt_qemu::{Vm, VmBuilder};
use common::{assert_no_errors, expect_line, image, partition, tool};
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// How much larger than the image the VM's disk is.
const EXTRA: u64 = 1 << 30;

/// The two numbers of `… A MiB <sep> B MiB …` after `prefix`.
fn two_mib(line: &str, prefix: &str, sep: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let (a, rest) = rest.split_once(" MiB")?;
    let rest = rest.strip_prefix(sep)?;
    let (b, _) = rest.split_once(" MiB")?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// `STATE vda5: N MiB filesystem, M MiB free`: (N, M).
fn size_line(vm: &mut Vm) -> anyhow::Result<(u64, u64)> {
    let line = expect_line(vm, "STATE vda5: ", BOOT)?;
    two_mib(&line, "STATE vda5: ", " filesystem, ").with_context(|| format!("size in {line:?}"))
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn state_grows_to_the_end_of_a_larger_disk_once() -> anyhow::Result<()> {
    let img = image();
    let image_bytes = std::fs::metadata(&img.raw)?.len();
    let (_, state_bytes) = partition(img, Partition::State.name())?;
    let state_mib = state_bytes >> 20;

    let mut first = VmBuilder::new(&img.qcow2)
        .disk_size(Some(image_bytes + EXTRA))
        .spawn()?;
    let line = expect_line(&mut first, "STATE vda5 grown from ", BOOT)?;
    let (from, to) = two_mib(&line, "grown from ", " to ").context("sizes")?;
    assert_eq!(from, state_mib, "{line}");
    // All of EXTRA, plus the image's tail past STATE, less the backup GPT's 33 sectors.
    assert!(
        (state_mib + 1024..=state_mib + 1025).contains(&to),
        "{line}"
    );
    let line = expect_line(&mut first, "STATE vda5 ext4 grown from ", BOOT)?;
    let (fs_from, fs_to) = two_mib(&line, "grown from ", " to ").context("sizes")?;
    assert_eq!((fs_from, fs_to), (from, to), "{line}");
    let (fs_mib, free_mib) = size_line(&mut first)?;
    // statvfs leaves out ext4's own metadata (inode tables above all).
    assert!(fs_mib > state_mib + 768 && fs_mib <= to, "{fs_mib} MiB");
    assert!(free_mib > 768 && free_mib <= fs_mib, "{free_mib} MiB free");
    let line = expect_line(&mut first, "mounted on /var, boot ", BOOT)?;
    assert!(line.trim_end().ends_with("boot 1"), "{line}");
    expect_line(&mut first, "[basalt] ready t=", BOOT)?;
    assert_no_errors(&first);
    first.kill();

    // The same disk, rebooted: grown already.
    let mut second = VmBuilder::new(first.overlay()).spawn()?;
    let (fs_again, _) = size_line(&mut second)?;
    let line = expect_line(&mut second, "mounted on /var, boot ", BOOT)?;
    assert!(
        line.trim_end().ends_with("boot 2"),
        "{line}\n{}",
        second.serial()
    );
    expect_line(&mut second, "[basalt] ready t=", BOOT)?;
    assert_eq!(fs_again, fs_mib);
    let serial = second.serial();
    assert!(!serial.contains(" grown from "), "{serial}");
    assert_no_errors(&second);
    second.kill();

    // An independent reader of the table the guest left: both copies valid, the backup
    // at the disk's end, STATE up to the last usable sector.
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("grown.raw");
    let (overlay, raw_str) = (
        second.overlay().to_str().context("path")?,
        raw.to_str().context("path")?,
    );
    tool("qemu-img", &["convert", "-O", "raw", overlay, raw_str])?;
    let sectors = std::fs::metadata(&raw)?.len() / 512;
    assert_eq!(sectors * 512, image_bytes + EXTRA);
    let verify = tool("sgdisk", &["-v", raw_str])?;
    assert!(verify.contains("No problems found"), "{verify}");
    let json: serde_json::Value = serde_json::from_str(&tool("sfdisk", &["--json", raw_str])?)?;
    let table = &json["partitiontable"];
    assert_eq!(table["lastlba"], sectors - 34, "{table}");
    let state = &table["partitions"][4];
    assert_eq!(state["name"], Partition::State.name());
    let end = state["start"].as_u64().context("start")? + state["size"].as_u64().context("size")?;
    assert_eq!(end - 1, sectors - 34, "{table}");
    Ok(())
}

/// One sector the growth changed, in the order the guest wrote it.
struct SectorWrite {
    lba: u64,
    bytes: Vec<u8>,
}

/// The guest's writes from a QEMU `virtio_blk_handle_write` trace, as (first sector,
/// sectors), in the order the guest issued them.
fn traced_writes(trace: &str) -> Vec<(u64, u64)> {
    trace
        .lines()
        .filter(|l| l.contains("virtio_blk_handle_write"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str| {
                let i = words.iter().position(|w| *w == key)?;
                words.get(i + 1)?.parse::<u64>().ok()
            };
            Some((after("sector")?, after("nsectors")?))
        })
        .collect()
}

fn sector(f: &std::fs::File, lba: u64) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 512];
    f.read_exact_at(&mut b, lba * 512)
        .with_context(|| format!("read sector {lba}"))?;
    Ok(b)
}

/// Issue 14 item 3: STATE growth cut after every sector it writes. The order comes from
/// QEMU's trace of the guest's block writes (`virtio_blk_handle_write`, one event per
/// request as the guest issued it), the content from the raw diff of the disk before and
/// after the growth (an oracle independent of basalt's planner). Every prefix of those
/// sector writes that changes the disk is applied to a copy of the pre-growth disk, which
/// must then boot to standby: Linux only reads the backup GPT when the primary is torn
/// because the image's command line starts with `gpt` (block/partitions/efi.c,
/// `force_gpt`), and the growth writes the new backup before the primary.
///
/// A torn multi-sector write is modelled as its sectors in ascending order, which is the
/// order the cut "after every sector" walks; the untouched sectors of a write (zeros that
/// stay zeros) give no new disk state and are not booted.
#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn state_growth_cut_after_every_sector_still_boots() -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    /// Enough over MIN_GAIN (16 MiB) to grow, small enough to keep the copies cheap.
    const MORE: u64 = 64 << 20;
    let img = image();
    for slot in ["a", "b"] {
        let line = img.manifest["cmdline"][slot].as_str().context("cmdline")?;
        assert!(line.starts_with("gpt "), "slot {slot}: {line}");
    }
    let image_bytes = std::fs::metadata(&img.raw)?.len();
    let (_, state_bytes) = partition(img, Partition::State.name())?;
    let state_mib = state_bytes >> 20;
    let (old_n, new_n) = (image_bytes / 512, (image_bytes + MORE) / 512);

    let dir = tempfile::tempdir()?;
    let before = dir.path().join("before.raw");
    common::copy_sparse(&img.raw, &before)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&before)?
        .set_len(image_bytes + MORE)?;

    // One boot with the guest's writes traced.
    let trace = dir.path().join("writes.trace");
    let mut arg = std::ffi::OsString::from("enable=virtio_blk_handle_write,file=");
    arg.push(&trace);
    let mut vm = VmBuilder::new(&before)
        .extra_args([std::ffi::OsString::from("-trace"), arg])
        .spawn()?;
    expect_line(&mut vm, "STATE vda5 grown from ", BOOT)?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    vm.kill();
    let after = dir.path().join("after.raw");
    let (overlay, after_str) = (
        vm.overlay().to_str().context("path")?,
        after.to_str().context("path")?,
    );
    tool("qemu-img", &["convert", "-O", "raw", overlay, after_str])?;

    // The GPT areas: MBR, primary header and entries; the old backup; the new backup.
    let areas = [0..34, old_n - 33..old_n, new_n - 33..new_n];
    let in_areas = |lba: u64| areas.iter().any(|a| a.contains(&lba));
    let (b, a) = (std::fs::File::open(&before)?, std::fs::File::open(&after)?);
    let writes = traced_writes(&std::fs::read_to_string(&trace)?);
    anyhow::ensure!(
        !writes.is_empty(),
        "no virtio_blk_handle_write events in {}",
        trace.display()
    );
    let mut changes: Vec<SectorWrite> = Vec::new();
    for (first, count) in writes {
        for lba in (first..first + count).filter(|&l| in_areas(l)) {
            let (old, new) = (sector(&b, lba)?, sector(&a, lba)?);
            if old == new {
                continue;
            }
            // The raw diff gives only a sector's last content: one write per sector.
            anyhow::ensure!(
                changes.iter().all(|c| c.lba != lba),
                "sector {lba} changed by two writes"
            );
            changes.push(SectorWrite { lba, bytes: new });
        }
    }
    // Every GPT-area sector that differs was seen in the trace.
    for lba in areas.iter().cloned().flatten() {
        if sector(&b, lba)? != sector(&a, lba)? {
            assert!(
                changes.iter().any(|c| c.lba == lba),
                "sector {lba} changed, but no traced write touched it"
            );
        }
    }
    let order: Vec<u64> = changes.iter().map(|c| c.lba).collect();
    eprintln!("growth changed these sectors, in this order: {order:?}");
    // The backup at the new end (header included) before any primary sector.
    let first_primary = order.iter().position(|&l| l < 34).context("no primary")?;
    assert!(
        order[..first_primary].contains(&(new_n - 1)),
        "backup header not before the primary: {order:?}"
    );
    drop(a);
    std::fs::remove_file(&after)?;

    // Every prefix (the full growth included; the empty one is the boot above).
    let mut restored = Vec::new();
    for k in 1..=changes.len() {
        let variant = dir.path().join("variant.raw");
        common::copy_sparse(&before, &variant)?;
        {
            let f = std::fs::OpenOptions::new().write(true).open(&variant)?;
            for c in &changes[..k] {
                f.write_all_at(&c.bytes, c.lba * 512)?;
            }
            f.sync_all()?;
        }
        let mut vm = VmBuilder::new(&variant).spawn()?;
        let cut = format!("cut after {k} of {} ({:?})", changes.len(), &order[..k]);
        // Not `size_line`: a torn primary adds `STATE vda5: primary GPT restored …` first.
        let line = expect_line(&mut vm, " MiB filesystem, ", BOOT).with_context(|| cut.clone())?;
        let (fs_mib, _) = two_mib(&line, "STATE vda5: ", " filesystem, ")
            .with_context(|| format!("{cut}: size in {line:?}"))?;
        expect_line(&mut vm, "[basalt] standby t=", BOOT).with_context(|| cut.clone())?;
        assert_no_errors(&vm);
        if vm.serial().contains("primary GPT restored from the backup") {
            restored.push(k);
        }
        // STATE old-sized or grown, nothing in between.
        assert!(
            fs_mib <= state_mib || fs_mib > state_mib + (MORE >> 20) / 2,
            "{cut}: STATE filesystem {fs_mib} MiB\n{}",
            vm.serial()
        );
        eprintln!("{cut}: standby, STATE filesystem {fs_mib} MiB");
        vm.kill();
        drop(vm);
        std::fs::remove_file(&variant)?;
    }
    // The cuts that tear the primary were booted from the backup (the kernel reads it only
    // with `gpt`), and basalt-init rebuilt the primary from it.
    assert!(
        !restored.is_empty(),
        "no cut left a torn primary: {order:?}"
    );
    eprintln!("booted from the backup GPT after cuts {restored:?}");
    Ok(())
}
