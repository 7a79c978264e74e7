//! The GRUB side of A/B upgrades, without basalt's node side: slot B is filled by
//! independent tools from the image's own upgrade bundle (`tar` unpacks it, `sfdisk`
//! finds the partitions, `dd` writes ROOT-B, mtools writes `/boot/b/*` into the ESP,
//! `grub-editenv` arms `next_entry=b`). Under SeaBIOS and OVMF the disk then boots slot B
//! once, GRUB having cleared `next_entry` on the ESP itself (save_env), and the next boot
//! of the same disk is slot A again (`saved_entry=a`).
//!
//! Slot B holds the same root as A (building a second version would double the test's
//! time); which slot booted is proven by the kernel command line, which B's slot.cfg
//! extends with `loglevel=6` so that the kernel prints it on the console, and by GRUB's
//! own line for the entry it boots.

mod common;

use anyhow::Context;
use basalt_qemu::{Firmware, Vm, VmBuilder};
use common::disk::{esp_arg, grubenv_list, mtool, sfdisk_partition, to_raw};
use common::{copy_sparse, expect_line, image, tool};
use std::path::Path;
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);

/// A copy of the default image whose slot B holds the bundle's root, kernel and
/// initramfs, with `next_entry=b` armed. Returns the disk and the ESP's offset.
fn arm_slot_b(dir: &Path) -> anyhow::Result<(std::path::PathBuf, u64)> {
    let img = image();
    let raw = dir.join("ab.raw");
    copy_sparse(&img.raw, &raw)?;
    let bundle = img.dir.join("k3s-node.bundle");
    let parts = dir.join("bundle");
    std::fs::create_dir_all(&parts)?;
    let (bundle_s, parts_s) = (
        bundle.to_str().context("path")?,
        parts.to_str().context("path")?,
    );
    tool("tar", &["-xf", bundle_s, "-C", parts_s])?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(parts.join("manifest.json"))?)?;

    // ROOT-B: the root image at the start of the partition, nothing else touched.
    let (root_b, root_b_size) = sfdisk_partition(&raw, "ROOT-B")?;
    let root_img = parts.join("root.img");
    let root_len = std::fs::metadata(&root_img)?.len();
    anyhow::ensure!(root_len <= root_b_size, "root.img does not fit ROOT-B");
    anyhow::ensure!(root_b % 4096 == 0, "ROOT-B is not 4 KiB aligned");
    tool(
        "dd",
        &[
            &format!("if={}", root_img.to_str().context("path")?),
            &format!("of={}", raw.to_str().context("path")?),
            "bs=4096",
            &format!("seek={}", root_b / 4096),
            "conv=notrunc,sparse",
            "status=none",
        ],
    )?;

    // /boot/b on the ESP: kernel, initramfs, and slot.cfg last (as a node writes them).
    let (esp_offset, _) = sfdisk_partition(&raw, "EFI")?;
    let esp = esp_arg(&raw, esp_offset)?;
    let cmdline = manifest["cmdline"].as_str().context("cmdline")?;
    anyhow::ensure!(!cmdline.contains("basalt.slot="), "{cmdline}");
    // loglevel=6 after the spec's `quiet`: the kernel prints its command line.
    let slot_cfg = parts.join("slot.cfg");
    std::fs::write(
        &slot_cfg,
        format!("set basalt_args='{cmdline} basalt.slot=b loglevel=6'\n"),
    )?;
    mtool("mmd", &["-i", &esp, "::/boot/b"])?;
    for file in ["vmlinuz", "initrd.img", "slot.cfg"] {
        let src = parts.join(file);
        let dst = format!("::/boot/b/{file}");
        mtool("mcopy", &["-i", &esp, src.to_str().context("path")?, &dst])?;
    }

    // Arm the one-shot trial with grub-editenv on a copy of the block, copied back over it.
    let list = grubenv_list(&raw, esp_offset, dir)?;
    assert_eq!(list, "saved_entry=a\n", "the builder's block");
    let block = dir.join("grubenv");
    std::fs::copy(dir.join("grubenv.read"), &block)?;
    let block_s = block.to_str().context("path")?;
    tool("grub-editenv", &[block_s, "set", "next_entry=b"])?;
    mtool("mcopy", &["-o", "-i", &esp, block_s, "::/EFI/BOOT/grubenv"])?;
    let list = grubenv_list(&raw, esp_offset, dir)?;
    assert_eq!(list, "saved_entry=a\nnext_entry=b\n");
    // The ESP is still a clean FAT.
    let check = dir.join("esp.check");
    tool(
        "dd",
        &[
            &format!("if={}", raw.to_str().context("path")?),
            &format!("of={}", check.to_str().context("path")?),
            "bs=512",
            &format!("skip={}", esp_offset / 512),
            &format!(
                "count={}",
                img.manifest["layout"]["partitions"][1]["sectors"]
            ),
            "status=none",
        ],
    )?;
    tool("fsck.fat", &["-n", check.to_str().context("path")?])?;
    Ok((raw, esp_offset))
}

/// Boots `disk` until `[basalt] ready`; returns the console and the disk as the guest
/// left it (the harness's overlay written out as raw), the VM killed.
fn boot(
    disk: &Path,
    firmware: Firmware,
    out: &Path,
) -> anyhow::Result<(String, std::path::PathBuf)> {
    let mut vm: Vm = VmBuilder::new(disk).firmware(firmware).spawn()?;
    expect_line(&mut vm, "[basalt] ready t=", BOOT)?;
    let serial = vm.serial();
    vm.kill();
    let after = to_raw(vm.overlay(), out)?;
    Ok((serial, after))
}

/// The kernel's "Kernel command line:" line on the console.
fn kernel_cmdline(serial: &str) -> Option<&str> {
    serial
        .lines()
        .find_map(|l| l.split_once("Kernel command line: ").map(|(_, c)| c.trim()))
}

fn trial_boots_b_once_then_a(firmware: Firmware) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (armed, esp_offset) = arm_slot_b(dir.path())?;

    // First boot: GRUB takes next_entry=b, clears it on disk, boots slot B.
    let (serial, after) = boot(&armed, firmware, &dir.path().join("after-1.raw"))?;
    assert!(serial.contains("basalt: booting slot b"), "{serial}");
    assert!(!serial.contains("basalt: booting slot a"), "{serial}");
    let cmdline = kernel_cmdline(&serial).with_context(|| format!("no command line:\n{serial}"))?;
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    assert!(words.contains(&"basalt.slot=b"), "{cmdline}");
    assert!(!words.contains(&"basalt.slot=a"), "{cmdline}");
    // GRUB's save_env removed the trial from the block: only the good slot is left.
    let list = grubenv_list(&after, esp_offset, dir.path())?;
    assert_eq!(list, "saved_entry=a\n", "after the trial boot");
    drop(std::fs::remove_file(&armed));

    // Second boot of the same disk: slot A, the saved entry, with its own command line.
    let (serial, after2) = boot(&after, firmware, &dir.path().join("after-2.raw"))?;
    assert!(serial.contains("basalt: booting slot a"), "{serial}");
    assert!(!serial.contains("basalt: booting slot b"), "{serial}");
    // Slot A's command line keeps the spec's `quiet`: the kernel does not print it.
    assert_eq!(kernel_cmdline(&serial), None, "{serial}");
    assert_eq!(
        grubenv_list(&after2, esp_offset, dir.path())?,
        "saved_entry=a\n"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn seabios_boots_the_armed_slot_b_once_then_slot_a() -> anyhow::Result<()> {
    trial_boots_b_once_then_a(Firmware::Bios)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn ovmf_boots_the_armed_slot_b_once_then_slot_a() -> anyhow::Result<()> {
    trial_boots_b_once_then_a(Firmware::Uefi)
}

/// The bundle beside the image, checked by independent tools: `tar` unpacks it,
/// `veritysetup verify` checks its root against the manifest's root hash, `unsquashfs`
/// reads the version and identity on that root; `inspect` refuses a copy with a flipped
/// byte or cut short, naming the part.
#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn the_bundle_matches_its_manifest_by_independent_tools() -> anyhow::Result<()> {
    let img = image();
    let bundle = img.dir.join("k3s-node.bundle");
    let info = basalt_builder::bundle::inspect(&bundle)?;
    let listed = img.manifest["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .find(|o| o["file"] == "k3s-node.bundle")
        .context("the image manifest lists the bundle")?;
    assert_eq!(listed["sha256"], info.sha256.as_str());
    assert_eq!(img.manifest["root_hash"], info.manifest.root_hash.as_str());
    assert_eq!(img.manifest["version"], info.manifest.version.to_string());

    let dir = tempfile::tempdir()?;
    let parts = dir.path();
    let (bundle_s, parts_s) = (
        bundle.to_str().context("path")?,
        parts.to_str().context("path")?,
    );
    let listing = tool("tar", &["-tvf", bundle_s])?;
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(
        names,
        ["manifest.json", "root.img", "vmlinuz", "initrd.img"]
    );
    tool("tar", &["-xf", bundle_s, "-C", parts_s])?;
    let root = parts.join("root.img");
    let root_s = root.to_str().context("path")?;
    let offset = format!("--hash-offset={}", info.manifest.verity.hash_offset);
    tool(
        "veritysetup",
        &["verify", root_s, root_s, &info.manifest.root_hash, &offset],
    )?;
    let wrong = "0".repeat(64);
    assert!(tool("veritysetup", &["verify", root_s, root_s, &wrong, &offset]).is_err());
    for (file, want) in [("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img")] {
        let bytes = std::fs::read(parts.join(file))?;
        let part = info.manifest.part(want).context("part")?;
        assert_eq!(basalt_builder::cache::sha256_hex(&bytes), part.sha256);
    }
    // The version and identity on the root, as basalt-init will read them.
    let os_release = tool("unsquashfs", &["-cat", root_s, "etc/os-release"])?;
    let version = info.manifest.version.to_string();
    assert!(
        os_release.contains(&format!("VERSION_ID={version}\n")),
        "{os_release}"
    );
    let identity = tool("unsquashfs", &["-cat", root_s, "usr/lib/basalt/image.json"])?;
    let identity = basalt_api::bundle::Identity::parse(identity.as_bytes())?;
    assert_eq!(identity.version, info.manifest.version);
    assert_eq!(identity.compat, info.manifest.compat);

    // A flipped byte inside root.img, and the bundle cut inside the kernel.
    let bytes = std::fs::read(&bundle)?;
    let tampered = parts.join("tampered.bundle");
    let mut copy = bytes.clone();
    let root_at = 512 + info.manifest.to_json().len().div_ceil(512) * 512 + 512;
    copy[root_at + 4096 * 3 + 17] ^= 0x01;
    std::fs::write(&tampered, &copy)?;
    let err = basalt_builder::bundle::inspect(&tampered)
        .expect_err("a flipped byte")
        .to_string();
    assert!(err.contains("part root.img has sha256"), "{err}");
    let root_len = info.manifest.parts[0].size as usize;
    let cut = root_at + root_len.div_ceil(512) * 512 + 512 + 1000;
    std::fs::write(&tampered, &bytes[..cut])?;
    let err = basalt_builder::bundle::inspect(&tampered)
        .expect_err("cut short")
        .to_string();
    assert!(err.contains("vmlinuz"), "{err}");
    Ok(())
}
