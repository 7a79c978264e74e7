//! End to end: the default image passes independent checks of every format it contains,
//! boots under SeaBIOS and OVMF to `[basalt] ready`, and a damaged root is refused.

mod common;

use anyhow::Context;
use basalt_api::layout::fw_cfg;
use basalt_api::layout::Partition;
use basalt_qemu::{Firmware, VmBuilder};
use common::{expect_line, extract, image, partition, tool};
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn sfdisk_sees_the_five_named_partitions() -> anyhow::Result<()> {
    let img = image();
    let json: serde_json::Value = serde_json::from_str(&tool(
        "sfdisk",
        &["--json", img.raw.to_str().context("path")?],
    )?)?;
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    let names: Vec<_> = table["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .map(|p| p["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, Partition::ALL.map(|p| p.name()));
    assert_eq!(
        table["partitions"][0]["type"],
        "21686148-6449-6E6F-744E-656564454649"
    );
    assert_eq!(
        table["partitions"][1]["type"],
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn esp_is_a_clean_fat_filesystem() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let esp = dir.path().join("esp.img");
    extract(img, Partition::Efi.name(), &esp)?;
    let out = tool("fsck.fat", &["-n", esp.to_str().context("path")?])?;
    assert!(
        !out.contains("Leaving filesystem unchanged"),
        "fsck.fat found problems:\n{out}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn veritysetup_verifies_root_a_with_the_manifest_root_hash() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root-a.img");
    extract(img, Partition::RootA.name(), &root)?;
    let root = root.to_str().context("path")?;
    let hash = img.manifest["root_hash"].as_str().context("root_hash")?;
    let offset = format!("--hash-offset={}", img.manifest["verity"]["hash_offset"]);
    tool("veritysetup", &["verify", root, root, hash, &offset])?;
    // And the oracle can fail: a different root hash is refused.
    let wrong = "0".repeat(64);
    assert!(tool("veritysetup", &["verify", root, root, &wrong, &offset]).is_err());
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn qcow2_passes_qemu_img_check() -> anyhow::Result<()> {
    let img = image();
    tool("qemu-img", &["check", img.qcow2.to_str().context("path")?])?;
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn root_filesystem_holds_init_k3s_and_modules() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root-a.img");
    extract(img, Partition::RootA.name(), &root)?;
    let listing = tool("unsquashfs", &["-lln", root.to_str().context("path")?])?;
    let kver = img.manifest["kernel_version"]
        .as_str()
        .context("kernel_version")?;
    for want in [
        "squashfs-root/sbin/init",
        "squashfs-root/usr/local/bin/k3s",
        "squashfs-root/etc/os-release",
        "squashfs-root/etc/ssl/certs/ca-certificates.crt",
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(want))
            .with_context(|| format!("{want} missing:\n{listing}"))?;
        assert!(line.contains("root/root") || line.contains("0/0"), "{line}");
    }
    assert!(listing.contains(&format!("squashfs-root/lib/modules/{kver}/kernel")));
    // basalt-init answers as /sbin/modprobe.
    assert!(
        listing.contains("squashfs-root/sbin/modprobe -> "),
        "{listing}"
    );
    for index in ["modules.dep", "modules.alias"] {
        assert!(
            listing.contains(&format!("squashfs-root/lib/modules/{kver}/{index}")),
            "{index} missing"
        );
    }
    // The root ships the manifest's module list and nothing else: K3s's and the NIC's
    // modules with their dependencies, not the kernel package's whole tree.
    let mut shipped: Vec<String> = listing
        .lines()
        .filter(|l| l.contains(&format!("squashfs-root/lib/modules/{kver}/")))
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(|f| f.replace('-', "_"))
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = img.manifest["modules"]
        .as_array()
        .context("manifest modules")?
        .iter()
        .filter_map(|m| m.as_str().map(String::from))
        .collect();
    listed.sort();
    assert_eq!(shipped, listed);
    for needed in [
        "virtio_net",
        "virtio_rng",
        "br_netfilter",
        "nf_conntrack",
        "xt_conntrack",
    ] {
        assert!(listed.iter().any(|m| m == needed), "{needed} not shipped");
    }
    assert!(
        !listed.iter().any(|m| m == "btrfs"),
        "btrfs is not in the default list"
    );
    Ok(())
}

fn boot_to_ready(firmware: Firmware) -> anyhow::Result<()> {
    let img = image();
    let mut vm = VmBuilder::new(&img.qcow2).firmware(firmware).spawn()?;
    let mut milestones = vec![];
    for m in basalt_api::milestone::Milestone::ALL {
        let line = expect_line(&mut vm, &format!("[basalt] {} t=", m.name()), BOOT)?;
        let (name, t) = basalt_api::milestone::parse(&line)
            .with_context(|| format!("unparsable milestone line {line:?}"))?;
        milestones.push((name.to_string(), t));
    }
    // Guest times come in boot order.
    assert!(
        milestones.windows(2).all(|w| w[0].1 <= w[1].1),
        "{milestones:?}\n{}",
        vm.serial()
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn boots_with_seabios_to_ready() -> anyhow::Result<()> {
    boot_to_ready(Firmware::Bios)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn boots_with_ovmf_to_ready() -> anyhow::Result<()> {
    boot_to_ready(Firmware::Uefi)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_byte_flipped_in_root_a_stops_the_boot_with_a_verity_error() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let damaged = dir.path().join("damaged.raw");
    common::copy_sparse(&img.raw, &damaged)?;
    // Byte 100 of ROOT-A lies in the squashfs superblock, which the mount reads first.
    let (offset, _) = partition(img, Partition::RootA.name())?;
    common::flip_byte(&damaged, offset + 100)?;

    let mut vm = VmBuilder::new(&damaged).firmware(Firmware::Bios).spawn()?;
    let line = expect_line(&mut vm, "dm-verity rejected ROOT-A", BOOT)?;
    assert!(line.contains("corrupted"), "{line}");
    let serial = vm.serial();
    assert!(!serial.contains("[basalt] root-mounted"), "{serial}");
    assert!(!serial.contains("[basalt] ready"), "{serial}");
    // The node powers itself off instead of booting on.
    vm.wait_exit(vm.accel().scale(Duration::from_secs(30)))
        .map_err(|e| common::dump(&vm, e))?;
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn state_survives_a_reboot_of_the_same_disk() -> anyhow::Result<()> {
    let img = image();
    let mut first = VmBuilder::new(&img.qcow2)
        .firmware(Firmware::Bios)
        .spawn()?;
    let line = expect_line(&mut first, "mounted on /var, boot ", BOOT)?;
    assert!(line.trim_end().ends_with("boot 1"), "{line}");
    expect_line(&mut first, "[basalt] ready t=", BOOT)?;
    first.kill();
    // The second VM boots from the first one's overlay: the same disk, rebooted.
    let mut second = VmBuilder::new(first.overlay())
        .firmware(Firmware::Bios)
        .spawn()?;
    let line = expect_line(&mut second, "mounted on /var, boot ", BOOT)?;
    assert!(
        line.trim_end().ends_with("boot 2"),
        "{line}\n{}",
        second.serial()
    );
    Ok(())
}

/// A valid machine config for a standby node (certificates are framing only: nothing
/// checks them before the node API exists).
const STANDBY_CONFIG: &str = r#"version = 1
[node]
hostname = "warm-1"
[api]
ca = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
cert = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
"#;

fn fw_cfg_args(dir: &std::path::Path, config: &str) -> anyhow::Result<Vec<String>> {
    let file = dir.join("config.toml");
    std::fs::write(&file, config)?;
    Ok(vec![
        "-fw_cfg".into(),
        fw_cfg::qemu_arg(fw_cfg::CONFIG, &file),
    ])
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_malformed_config_over_fw_cfg_names_the_key_and_the_node_reaches_standby() -> anyhow::Result<()>
{
    let img = image();
    let dir = tempfile::tempdir()?;
    let bad = STANDBY_CONFIG.replace("[node]\n", "[node]\nsurprise = 1\n");
    let mut vm = VmBuilder::new(&img.qcow2)
        .extra_args(fw_cfg_args(dir.path(), &bad)?)
        .spawn()?;
    let line = expect_line(&mut vm, "error: machine config", BOOT)?;
    assert!(
        line.contains("fw_cfg") && line.contains("node.surprise"),
        "{line}"
    );
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_config_from_fw_cfg_is_kept_on_state_and_not_read_again() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let mut first = VmBuilder::new(&img.qcow2)
        .extra_args(fw_cfg_args(dir.path(), STANDBY_CONFIG)?)
        .spawn()?;
    expect_line(
        &mut first,
        &format!(
            "machine config from {}: no [cluster], standby",
            fw_cfg::CONFIG_LABEL
        ),
        BOOT,
    )?;
    expect_line(&mut first, "[basalt] standby t=", BOOT)?;
    first.kill();
    // Same disk, no fw_cfg this time: the config comes from STATE.
    let mut second = VmBuilder::new(first.overlay()).spawn()?;
    expect_line(
        &mut second,
        &format!(
            "machine config from {}: no [cluster], standby",
            Partition::State
        ),
        BOOT,
    )?;
    Ok(())
}
