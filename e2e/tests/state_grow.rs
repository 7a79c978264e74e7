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
