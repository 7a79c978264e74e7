//! `basalt verify` and `basalt inspect` on the default image: the good image passes, and
//! damage in each place verify looks (root slots, ESP, backup GPT) is found and named, on
//! .raw and on .qcow2. `veritysetup`, `sfdisk` and `qemu-img` are the independent oracles.

mod common;

use anyhow::Context;
use basalt_api::layout::Partition;
use basalt_builder::image::DiskImage;
use basalt_builder::inspect::inspect;
use basalt_builder::verify::{verify, Report, Status};
use common::{copy_partition_bytes, copy_sparse, extract_from, flip_byte, image, partition, tool};
use std::path::{Path, PathBuf};

const BLOCK: u64 = 4096;

fn manifest() -> PathBuf {
    image().dir.join("manifest.json")
}

/// A writable copy of the good raw image in `dir`.
fn raw_copy(dir: &Path) -> anyhow::Result<PathBuf> {
    let copy = dir.join("copy.raw");
    copy_sparse(&image().raw, &copy)?;
    Ok(copy)
}

/// (status, subject) of every check, and the failed checks as printed.
fn verdict(r: &Report) -> (Vec<(Status, String)>, Vec<String>) {
    let all = r.checks.iter().map(|c| (c.status, c.subject.clone()));
    (all.collect(), r.failures().map(|c| c.to_string()).collect())
}

/// `veritysetup verify` of one slot of a raw image with only the parameters of the slot's
/// boot entry (what `inspect` reads, and all the kernel gets): no superblock.
fn veritysetup(raw: &Path, name: &str) -> anyhow::Result<String> {
    let info = inspect(raw)?;
    let slot = info
        .slots
        .iter()
        .find(|s| s.partition == name)
        .context("slot")?;
    let dir = tempfile::tempdir()?;
    let part = dir.path().join("part.img");
    extract_from(image(), raw, name, &part)?;
    let part = part.to_str().context("path")?;
    let data_blocks = slot.data_blocks.context("the slot has no slot.cfg")?;
    let salt = slot.salt.as_deref().context("salt")?;
    let root_hash = slot.root_hash.as_deref().context("root_hash")?;
    let params = [
        format!("--data-blocks={data_blocks}"),
        format!("--salt={salt}"),
        format!("--hash-offset={}", (data_blocks + 1) * BLOCK),
    ];
    let mut args = vec!["verify", "--no-superblock", "--format=1", "--hash=sha256"];
    args.extend(["--data-block-size=4096", "--hash-block-size=4096"]);
    args.extend(params.iter().map(String::as_str));
    args.extend([part, part, root_hash]);
    tool("veritysetup", &args)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn the_good_image_passes_veritysetup_and_basalt_verify() -> anyhow::Result<()> {
    let img = image();
    veritysetup(&img.raw, Partition::RootA.name())?;
    let report = verify(&img.raw, None)?;
    assert!(report.passed(), "{report}");
    let (checks, _) = verdict(&report);
    let want = [
        (Status::Ok, "primary GPT"),
        (Status::Ok, "backup GPT"),
        (Status::Ok, "GPT copies"),
        (Status::Ok, "ROOT-A (slot a)"),
        (Status::Skipped, "ROOT-B (slot b)"),
        (Status::Ok, Partition::Efi.name()),
    ];
    let want: Vec<_> = want.iter().map(|(s, n)| (*s, n.to_string())).collect();
    assert_eq!(checks, want, "{report}");
    assert!(
        report
            .to_string()
            .contains("ROOT-B (slot b): not populated"),
        "{report}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_byte_flipped_in_root_a_data_is_named_with_its_block() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = raw_copy(dir.path())?;
    let (root_a, _) = partition(image(), Partition::RootA.name())?;
    flip_byte(&raw, root_a + 1000 * BLOCK + 123)?;
    assert!(
        veritysetup(&raw, Partition::RootA.name()).is_err(),
        "the oracle misses it"
    );
    let report = verify(&raw, Some(&manifest()))?;
    let (_, failed) = verdict(&report);
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0].starts_with("FAIL  ROOT-A (slot a): data block 1000 (byte 4096000)"),
        "{report}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_populated_root_b_verifies_and_a_byte_flipped_in_it_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = raw_copy(dir.path())?;
    // Data, superblock and tree: the tree of a 1 GiB root is 8 MiB at most.
    let hash_offset = image().manifest["verity"]["hash_offset"]
        .as_u64()
        .context("hash_offset")?;
    copy_partition_bytes(
        image(),
        &raw,
        (Partition::RootA.name(), Partition::RootB.name()),
        hash_offset + (8 << 20),
    )?;
    // What an upgrade writes last: slot B's command line (its verity parameters) on the ESP.
    let cmdline_b = image().manifest["cmdline"]["b"]
        .as_str()
        .context("cmdline b")?;
    common::write_esp_file(
        image(),
        &raw,
        "boot/b/slot.cfg",
        format!("set basalt_args='{cmdline_b}'\n").as_bytes(),
    )?;
    veritysetup(&raw, Partition::RootB.name())?;
    let report = verify(&raw, Some(&manifest()))?;
    assert!(report.passed(), "{report}");
    let b = report
        .checks
        .iter()
        .find(|c| c.subject == "ROOT-B (slot b)")
        .context(Partition::RootB.name())?;
    assert_eq!(b.status, Status::Ok, "{report}");

    let (root_b, _) = partition(image(), Partition::RootB.name())?;
    flip_byte(&raw, root_b + 7 * BLOCK + 5)?;
    assert!(
        veritysetup(&raw, Partition::RootB.name()).is_err(),
        "the oracle misses it"
    );
    let report = verify(&raw, Some(&manifest()))?;
    let (_, failed) = verdict(&report);
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0].starts_with("FAIL  ROOT-B (slot b): data block 7 "),
        "{report}"
    );
    Ok(())
}

/// Byte offset in the image of the 512 bytes at `at` (sector-aligned) of an ESP file: the
/// bytes read through FAT are looked up sector by sector in the partition.
fn esp_file_offset(raw: &Path, file: &str, at: u64) -> anyhow::Result<u64> {
    let img = DiskImage::open(raw)?;
    let parts = img.table()?.partitions;
    let esp = parts
        .iter()
        .find(|p| p.name == Partition::Efi.name())
        .context(Partition::Efi.name())?;
    let bytes = img.fat(esp)?.read(file, None)?.context("file missing")?;
    let chunk = bytes
        .get(at as usize..at as usize + 512)
        .context("file too short")?;
    let whole = img.read_vec(esp.offset(), esp.size() as usize)?;
    let mut hits = whole.chunks(512).enumerate().filter(|(_, s)| *s == chunk);
    let (i, _) = hits.next().context("chunk not found in the partition")?;
    anyhow::ensure!(hits.next().is_none(), "chunk found twice");
    Ok(esp.offset() + i as u64 * 512)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_byte_flipped_in_the_esp_kernel_names_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = raw_copy(dir.path())?;
    let at = esp_file_offset(&raw, "boot/a/vmlinuz", 1 << 20)?;
    flip_byte(&raw, at + 100)?;
    let report = verify(&raw, Some(&manifest()))?;
    let (_, failed) = verdict(&report);
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0].starts_with("FAIL  EFI: boot/a/vmlinuz: sha256 "),
        "{report}"
    );
    // Without a manifest the ESP is not checked, and verify says so.
    let report = verify(&raw, None)?;
    assert!(report.passed(), "{report}");
    let efi = report
        .checks
        .iter()
        .find(|c| c.subject == Partition::Efi.name())
        .context(Partition::Efi.name())?;
    assert_eq!(efi.status, Status::Warning, "{report}");
    assert!(efi.details[0].contains("no manifest at"), "{report}");
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_byte_flipped_in_the_backup_gpt_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = raw_copy(dir.path())?;
    let last = std::fs::metadata(&raw)?.len() / 512 - 1;
    // In the first entry of the backup array, which sits just before the backup header.
    flip_byte(&raw, (last - 32) * 512 + 60)?;
    let out = std::process::Command::new("sfdisk")
        .arg("--verify")
        .arg(&raw)
        .output()?;
    let sfdisk = String::from_utf8_lossy(&out.stderr);
    assert!(
        sfdisk.contains("backup GPT table is corrupt"),
        "the oracle misses it: {sfdisk}"
    );
    let report = verify(&raw, Some(&manifest()))?;
    let (_, failed) = verdict(&report);
    assert_eq!(failed.len(), 1, "{report}");
    assert!(failed[0].starts_with("FAIL  backup GPT: "), "{report}");
    assert!(
        failed[0].contains("partition entry array CRC32"),
        "{report}"
    );
    // And in the backup header itself.
    flip_byte(&raw, (last - 32) * 512 + 60)?;
    flip_byte(&raw, last * 512 + 40)?;
    let report = verify(&raw, Some(&manifest()))?;
    let (_, failed) = verdict(&report);
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0].starts_with(&format!("FAIL  backup GPT: LBA {last}: header CRC32")),
        "{report}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn qcow2_gives_the_same_verdicts_as_raw() -> anyhow::Result<()> {
    let img = image();
    let good = verify(&img.qcow2, None)?;
    assert!(good.passed(), "{good}");
    assert_eq!(verdict(&good), verdict(&verify(&img.raw, None)?));

    let dir = tempfile::tempdir()?;
    let raw = raw_copy(dir.path())?;
    let (root_a, _) = partition(img, Partition::RootA.name())?;
    flip_byte(&raw, root_a + 42 * BLOCK)?;
    let qcow = dir.path().join("damaged.qcow2");
    let (r, q) = (
        raw.to_str().context("path")?,
        qcow.to_str().context("path")?,
    );
    tool(
        "qemu-img",
        &["convert", "-q", "-f", "raw", "-O", "qcow2", r, q],
    )?;
    let from_raw = verify(&raw, Some(&manifest()))?;
    let from_qcow = verify(&qcow, Some(&manifest()))?;
    assert!(!from_qcow.passed(), "{from_qcow}");
    assert_eq!(verdict(&from_qcow), verdict(&from_raw));
    assert!(
        verdict(&from_qcow).1[0].contains("ROOT-A (slot a): data block 42 "),
        "{from_qcow}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn inspect_json_agrees_with_sfdisk_and_the_manifest() -> anyhow::Result<()> {
    let img = image();
    let json = serde_json::to_value(inspect(&img.raw)?)?;
    let sfdisk: serde_json::Value = serde_json::from_str(&tool(
        "sfdisk",
        &["--json", img.raw.to_str().context("path")?],
    )?)?;
    let table = &sfdisk["partitiontable"];
    assert_eq!(json["disk_guid"], table["id"]);
    let theirs = table["partitions"]
        .as_array()
        .context("sfdisk partitions")?;
    let ours = json["partitions"]
        .as_array()
        .context("inspect partitions")?;
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(
            (
                &o["name"],
                &o["first_lba"],
                &o["sectors"],
                &o["type_guid"],
                &o["guid"]
            ),
            (&t["name"], &t["start"], &t["size"], &t["type"], &t["uuid"]),
        );
    }

    let m = &img.manifest;
    // The module list read back from the image's modules.dep is the manifest's.
    let mut listed: Vec<&str> = m["modules"]
        .as_array()
        .context("manifest modules")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    listed.sort();
    let names: Vec<&str> = json["modules"]["names"]
        .as_array()
        .context("inspect modules")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(names, listed);
    assert!(json["modules"]["bytes"].as_u64().unwrap_or(0) > 0);
    assert_eq!(json["active_slot"], "a");
    let slots = json["slots"].as_array().context("slots")?;
    let slot = |s: &str| slots.iter().find(|x| x["slot"] == s).context("slot");
    let (a, b) = (slot("a")?, slot("b")?);
    assert_eq!(
        (&a["partition"], &a["active"], &a["populated"]),
        (&Partition::RootA.name().into(), &true.into(), &true.into())
    );
    assert_eq!(
        (&b["partition"], &b["active"], &b["populated"]),
        (
            &Partition::RootB.name().into(),
            &false.into(),
            &false.into()
        )
    );
    assert_eq!(a["root_hash"], m["root_hash"]);
    assert_eq!(a["cmdline"], m["cmdline"]["a"]);
    // Slot B has no slot.cfg until an upgrade writes one: nothing to boot there.
    assert_eq!(b["cmdline"], serde_json::Value::Null);
    assert_eq!(b["root_hash"], serde_json::Value::Null);
    assert_eq!(json["next_slot"], serde_json::Value::Null);
    assert_eq!(json["versions"]["image_version"], m["version"]);
    // The kernel version three ways: os-release, the bzImage header, the manifest.
    let v = &json["versions"];
    assert_eq!(v["kernel"], m["kernel_version"]);
    assert_eq!(a["kernel_version"], m["kernel_version"]);
    assert_eq!(b["kernel_version"], serde_json::Value::Null);
    assert_eq!(v["k3s"], m["k3s_version"]);
    assert_eq!(v["basalt"], m["basalt_version"]);
    assert_eq!(v["basalt_init_sha256"], m["basalt_init"]["sha256"]);

    // The qcow2 holds the same.
    let mut q = serde_json::to_value(inspect(&img.qcow2)?)?;
    assert_eq!(q["format"], "qcow2");
    q["format"] = json["format"].clone();
    q["image"] = json["image"].clone();
    assert_eq!(q, json);
    Ok(())
}
