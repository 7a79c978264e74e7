//! The steps of `basalt build` that make one intermediate each: root filesystem, GRUB
//! images, ESP contents, SBOM, STATE, qcow2. `build` decides when each runs or is reused.

use crate::build::{BuildError, RootInfo};
use crate::cache::Resolved;
use crate::spec::ImageSpec;
use crate::{disk, grub, rootfs, sbom, verity};
use basalt_api::bootparams::VERITY_BLOCK_SIZE;
use basalt_api::layout::Partition;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Squashfs of the root tree, padded to whole verity blocks, hash tree appended;
/// `root.img` and `root.json` in `dir`.
#[allow(clippy::too_many_arguments)]
pub fn make_root(
    dir: &Path,
    spec: &ImageSpec,
    inputs: &BTreeMap<String, Resolved>,
    ca_dir: &Path,
    init: &Path,
    kver: &str,
    moddir: &Path,
    graph: &crate::kmod::ModuleGraph,
    seed: &str,
    uuid: uuid::Uuid,
) -> Result<(), BuildError> {
    let os_release = format!(
        "NAME=basalt\nID=basalt\nPRETTY_NAME=\"basalt {v}\"\nVERSION_ID={v}\nBASALT_IMAGE={}\nBASALT_KERNEL={kver}\nBASALT_K3S={}\n",
        spec.name,
        spec.k3s.version,
        v = env!("CARGO_PKG_VERSION")
    );
    let tree = rootfs::tree(&rootfs::RootContent {
        init,
        k3s: &inputs["k3s"].path,
        k3s_images: &inputs["k3s-images"].path,
        ca_bundle: rootfs::ca_bundle(ca_dir).map_err(BuildError::Certs)?,
        os_release,
        kver,
        moddir,
        depmod: graph.depmod_files()?,
    })?;
    let img = dir.join("root.img");
    let squashfs_bytes = rootfs::write(&tree, &img)?;
    let salt: [u8; 32] = Sha256::digest(format!("basalt-verity-salt:{seed}")).into();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)?;
    let data_len = squashfs_bytes.div_ceil(VERITY_BLOCK_SIZE) * VERITY_BLOCK_SIZE;
    f.set_len(data_len)?;
    let info = verity::append(&mut f, data_len, &salt, *uuid.as_bytes())?;
    f.sync_all()?;
    let room = disk::Sectors::from_mib(spec.disk.root_mib).bytes();
    let size = f.metadata()?.len();
    if size > room {
        return Err(BuildError::RootTooLarge { size, room });
    }
    let meta = RootInfo {
        squashfs_bytes,
        data_blocks: info.data_blocks,
        root_hash: hex::encode(info.root_hash),
        salt: hex::encode(salt),
    };
    std::fs::write(
        dir.join("root.json"),
        serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
    )?;
    Ok(())
}

/// `BOOTX64.EFI`, the patched BIOS `core.img` and the MBR's `bootcode.bin` in `dir`.
pub fn make_grub(
    dir: &Path,
    grub_bios: &Path,
    grub_efi: &Path,
    bios: (u64, u64),
) -> Result<(), BuildError> {
    grub::mkimage(
        &grub::EFI,
        &grub::module_dir(grub_efi, &grub::EFI),
        "/EFI/BOOT",
        &dir.join("BOOTX64.EFI"),
    )?;
    let core_path = dir.join("core.img");
    let mut core = grub::mkimage(
        &grub::BIOS,
        &grub::module_dir(grub_bios, &grub::BIOS),
        "(hd0,gpt2)/EFI/BOOT",
        &core_path,
    )?;
    grub::patch_core(&mut core, bios.0, bios.1)?;
    std::fs::write(&core_path, &core)?;
    let boot_img_path = grub::module_dir(grub_bios, &grub::BIOS).join("boot.img");
    let boot_img = std::fs::read(&boot_img_path)
        .map_err(|e| grub::GrubError::Read(boot_img_path.clone(), e))?;
    std::fs::write(
        dir.join("bootcode.bin"),
        grub::bios_boot_code(&boot_img, bios.0, &boot_img_path)?,
    )?;
    Ok(())
}

/// The ESP's files: GRUB EFI, grub.cfg with both slots, slot A's kernel and initramfs.
pub fn esp_files(
    grub_dir: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    cmd_a: &str,
    cmd_b: &str,
) -> Result<Vec<(&'static str, Vec<u8>)>, BuildError> {
    let cfg = grub::config(
        "a",
        &[
            grub::Entry {
                id: "a",
                title: "basalt (slot A)",
                kernel: "/boot/a/vmlinuz",
                initrd: "/boot/a/initrd.img",
                cmdline: cmd_a,
            },
            // Slot B's kernel and initramfs are written by the first A/B upgrade.
            grub::Entry {
                id: "b",
                title: "basalt (slot B)",
                kernel: "/boot/b/vmlinuz",
                initrd: "/boot/b/initrd.img",
                cmdline: cmd_b,
            },
        ],
    );
    let read = |p: &Path| std::fs::read(p).map_err(|e| BuildError::Write(p.into(), e));
    Ok(vec![
        ("EFI/BOOT/BOOTX64.EFI", read(&grub_dir.join("BOOTX64.EFI"))?),
        ("EFI/BOOT/grub.cfg", cfg.into_bytes()),
        ("boot/a/vmlinuz", read(vmlinuz)?),
        ("boot/a/initrd.img", read(initrd)?),
    ])
}

pub fn write_sbom(
    out: &Path,
    spec: &ImageSpec,
    inputs: &BTreeMap<String, Resolved>,
    unpacked: &BTreeMap<&str, PathBuf>,
    seed: &str,
    init_sha: &str,
) -> Result<(), BuildError> {
    let debs: BTreeMap<&str, (&str, &str)> = [
        (
            "kernel",
            (&spec.kernel.deb.package, &spec.kernel.deb.version),
        ),
        (
            "grub-bios",
            (&spec.grub.bios.package, &spec.grub.bios.version),
        ),
        ("grub-efi", (&spec.grub.efi.package, &spec.grub.efi.version)),
        (
            "ca-certificates",
            (&spec.ca_certificates.package, &spec.ca_certificates.version),
        ),
    ]
    .into_iter()
    .map(|(k, (p, v))| (k, (p.as_str(), v.as_str())))
    .collect();
    let items: Vec<sbom::Item<'_>> = inputs
        .values()
        .map(|r| {
            let deb = debs.get(r.name.as_str());
            sbom::Item {
                input: r,
                version: deb
                    .map(|(_, v)| v.to_string())
                    .or_else(|| r.name.starts_with("k3s").then(|| spec.k3s.version.clone())),
                unpacked: unpacked.get(r.name.as_str()).map(PathBuf::as_path),
                package: deb.map(|(p, _)| p.to_string()),
            }
        })
        .collect();
    let doc = sbom::document(&spec.name, seed, &items, init_sha);
    let json = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(out, json).map_err(|e| BuildError::Write(out.into(), e))
}

/// An empty ext4 for STATE, made rootless by `mkfs.ext4` into a file with fixed UUID,
/// hash seed and time.
pub fn make_state(out: &Path, mib: u64, uuid: uuid::Uuid) -> Result<(), BuildError> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-L",
        Partition::State.name(),
        "-U",
        &uuid.to_string(),
        "-E",
    ])
    .arg(format!("root_owner=0:0,hash_seed={uuid}"))
    .arg(out)
    .arg(format!("{mib}M"))
    .env("E2FSPROGS_FAKE_TIME", "1");
    host_tool(cmd, "e2fsprogs").map_err(BuildError::State)
}

pub fn to_qcow2(raw: &Path, out: &Path) -> Result<(), BuildError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out);
    host_tool(cmd, "qemu-utils").map_err(BuildError::Qcow2)
}

/// Runs a host tool from Debian package `package`; the error is its stderr.
fn host_tool(mut cmd: Command, package: &str) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .output()
        .map_err(|e| format!("run {program} (is {package} installed?): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
