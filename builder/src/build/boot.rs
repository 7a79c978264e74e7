//! Steps 6 and 7: GRUB for both firmwares (the EFI binary, the BIOS core image patched
//! for the BIOS boot partition, the MBR's boot code), then the ESP (GRUB, the static
//! grub.cfg, the environment block with `saved_entry=a`, slot A's kernel, initramfs and
//! slot.cfg) and the empty STATE filesystem.

use super::kernel::{Initramfs, Kernel};
use super::root::Root;
use super::{BuildError, Ctx};
use crate::disk::Layout;
use crate::{cache, esp, grub, store};
use basalt_api::bootparams::{BootParams, Slot};
use basalt_api::bundle;
use basalt_api::grubenv::{GrubEnv, SAVED_ENTRY};
use basalt_api::layout::{Partition, Sectors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// GRUB's images for both firmwares.
pub struct Bootloader {
    pub dir: PathBuf,
    /// The 440 bytes of boot code for the protective MBR.
    pub boot_code: [u8; 440],
    pub reused: bool,
}

impl Bootloader {
    /// GRUB's BIOS core image, for the BIOS boot partition.
    pub fn core(&self) -> PathBuf {
        self.dir.join("core.img")
    }
}

pub fn bootloader(ctx: &Ctx, kernel: &Kernel, layout: &Layout) -> Result<Bootloader, BuildError> {
    let bios = layout.get(Partition::Bios);
    let bios = (bios.first_lba.0, bios.size());
    let key = store::key(
        "grub",
        &[
            &ctx.inputs["grub-bios"].sha256,
            &ctx.inputs["grub-efi"].sha256,
            &format!("{bios:?}"),
            &grub::modules_key(),
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (dir, reused) = ctx.store.get_or_make("grub", &key, |dir| {
        make_grub(
            dir,
            &kernel.unpacked["grub-bios"],
            &kernel.unpacked["grub-efi"],
            bios,
        )
    })?;
    let code_path = dir.join("bootcode.bin");
    let boot_code: [u8; 440] = std::fs::read(&code_path)?
        .try_into()
        .map_err(|_| BuildError::Write(code_path, std::io::Error::other("not 440 bytes")))?;
    Ok(Bootloader {
        dir,
        boot_code,
        reused,
    })
}

/// The ESP and STATE filesystem images, the ESP's file digests and both slots' command
/// lines.
pub struct Esp {
    pub esp_img: PathBuf,
    pub state_img: PathBuf,
    /// sha256 of each file on the ESP, by path.
    pub sums: BTreeMap<String, String>,
    /// The kernel command line of slot `a` and `b`.
    pub cmdline: BTreeMap<String, String>,
    /// The command line without `basalt.slot=` (the bundle's `cmdline`).
    pub base_cmdline: String,
    pub reused: bool,
}

pub fn esp_and_state(
    ctx: &Ctx,
    bootloader: &Bootloader,
    kernel: &Kernel,
    initramfs: &Initramfs,
    root: &Root,
) -> Result<Esp, BuildError> {
    let spec = &ctx.spec.spec;
    let base = base_cmdline(&spec.kernel.cmdline, &root.verity);
    let (cmd_a, cmd_b) = (
        bundle::slot_cmdline(&base, Slot::A),
        bundle::slot_cmdline(&base, Slot::B),
    );
    let key = store::key("esp", &[&ctx.seed]);
    let (dir, reused) = ctx.store.get_or_make("esp", &key, |dir| {
        let files = esp_files(&bootloader.dir, &kernel.vmlinuz, &initramfs.path, &base)?;
        let volume_id = u32::from_le_bytes(
            ctx.uuid("esp").as_bytes()[..4]
                .try_into()
                .unwrap_or_default(),
        );
        let size = Sectors::from_mib(spec.disk.esp_mib).bytes();
        esp::write(&dir.join("esp.img"), size, volume_id, &files)?;
        let sums: BTreeMap<String, String> = files
            .iter()
            .map(|(p, b)| (p.to_string(), cache::sha256_hex(b)))
            .collect();
        std::fs::write(
            dir.join("esp.json"),
            serde_json::to_vec_pretty(&sums).map_err(std::io::Error::other)?,
        )?;
        make_state(
            &dir.join("state.img"),
            spec.disk.state_mib,
            ctx.uuid("state-fs"),
        )
    })?;
    let sums_path = dir.join("esp.json");
    let sums = serde_json::from_slice(&std::fs::read(&sums_path)?)
        .map_err(|e| BuildError::Write(sums_path, e.into()))?;
    Ok(Esp {
        esp_img: dir.join("esp.img"),
        state_img: dir.join("state.img"),
        sums,
        cmdline: BTreeMap::from([("a".to_string(), cmd_a), ("b".to_string(), cmd_b)]),
        base_cmdline: base,
        reused,
    })
}

/// The parameter that makes Linux fall back to the backup GPT when the primary is bad.
///
/// Linux's `find_valid_gpt` (block/partitions/efi.c) reads the primary header and entries
/// first; it takes the backup at the disk's last LBA only if the primary is valid (to
/// cross-check it) or if `force_gpt` is set, and `force_gpt` is set by `gpt` on the
/// command line alone (`force_gpt_fn`, `__setup("gpt", ...)`). Without it a primary whose
/// entries CRC does not match (a torn write during STATE growth, whose header and entries
/// are two writes) means no partitions at all and a node that never boots. With it the
/// kernel uses the backup, which STATE growth writes and flushes before it touches the
/// primary (`init/src/storage/grow/gpt.rs`). `force_gpt` also skips the protective-MBR
/// check, which covers the instant the MBR's size field is being rewritten.
pub const FORCE_GPT: &str = "gpt";

/// The kernel command line of either slot without `basalt.slot=`: `gpt` first (see
/// [`FORCE_GPT`]; never twice), the spec's words, then the `basalt.verity.*` parameters.
/// [`bundle::slot_cmdline`] appends the slot.
pub fn base_cmdline(spec_words: &[String], verity: &basalt_api::bootparams::Verity) -> String {
    let mut words = vec![FORCE_GPT.to_string()];
    words.extend(spec_words.iter().filter(|w| *w != FORCE_GPT).cloned());
    let params = BootParams {
        slot: Slot::A,
        verity: verity.clone(),
    }
    .to_string();
    words.extend(
        params
            .split_whitespace()
            .filter(|w| !w.starts_with("basalt.slot="))
            .map(str::to_string),
    );
    words.join(" ")
}

/// `BOOTX64.EFI`, the patched BIOS `core.img` and the MBR's `bootcode.bin` in `dir`.
fn make_grub(
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

/// The ESP's files: GRUB EFI, the static grub.cfg, the environment block (`saved_entry=a`),
/// slot A's kernel, initramfs and slot.cfg. Slot B's files are written by the first A/B
/// upgrade (slot.cfg last); until then its entry boots nothing.
fn esp_files(
    grub_dir: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    base_cmdline: &str,
) -> Result<Vec<(&'static str, Vec<u8>)>, BuildError> {
    let cfg = grub::config(&grub::SLOTS);
    let mut env = GrubEnv::new();
    let env_err = |e| BuildError::Write(grub::GRUBENV.into(), std::io::Error::other(e));
    env.set(SAVED_ENTRY, Slot::A.as_str()).map_err(env_err)?;
    let block = env.to_block().map_err(env_err)?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| BuildError::Write(p.into(), e));
    Ok(vec![
        ("EFI/BOOT/BOOTX64.EFI", read(&grub_dir.join("BOOTX64.EFI"))?),
        (grub::GRUB_CFG, cfg.into_bytes()),
        // Written before the big files; a fresh FAT gives it consecutive clusters, and
        // GRUB's save_env rewrites it where it is.
        (grub::GRUBENV, block.to_vec()),
        ("boot/a/vmlinuz", read(vmlinuz)?),
        ("boot/a/initrd.img", read(initrd)?),
        (
            "boot/a/slot.cfg",
            bundle::slot_cfg(base_cmdline, Slot::A).into_bytes(),
        ),
    ])
}

/// An empty ext4 for STATE, made rootless by `mkfs.ext4` into a file with fixed UUID,
/// hash seed and time.
fn make_state(out: &Path, mib: u64, uuid: uuid::Uuid) -> Result<(), BuildError> {
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
    super::outputs::host_tool(cmd, "e2fsprogs").map_err(BuildError::State)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ImageSpec;

    fn params(slot: Slot) -> BootParams {
        BootParams {
            slot,
            verity: basalt_api::bootparams::Verity {
                root_hash: "ab".repeat(32),
                salt: "cd".repeat(32),
                data_blocks: 9,
            },
        }
    }

    #[test]
    fn every_slot_s_command_line_carries_gpt_first() {
        let spec =
            ImageSpec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.toml"))
                .expect("default spec");
        let base = base_cmdline(&spec.kernel.cmdline, &params(Slot::A).verity);
        assert!(!base.contains("basalt.slot"), "{base}");
        for slot in [Slot::A, Slot::B] {
            let cfg = bundle::slot_cfg(&base, slot);
            let line = cfg
                .lines()
                .find_map(|l| l.strip_prefix("set basalt_args='"))
                .and_then(|l| l.strip_suffix('\''))
                .expect("basalt_args");
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[0], "gpt", "{line}");
            assert_eq!(words.iter().filter(|w| **w == "gpt").count(), 1, "{line}");
            // The spec's words are kept, and the boot parameters still parse.
            for w in &spec.kernel.cmdline {
                assert!(words.contains(&w.as_str()), "{w} missing from {line}");
            }
            let parsed = BootParams::parse(line).expect("parses");
            assert_eq!(parsed, params(slot));
        }
    }

    #[test]
    fn gpt_in_the_spec_is_not_doubled() {
        let words = vec!["quiet".to_string(), "gpt".to_string()];
        let line = base_cmdline(&words, &params(Slot::A).verity);
        assert!(line.starts_with("gpt quiet basalt.verity.root="), "{line}");
        assert_eq!(line.matches("gpt").count(), 1, "{line}");
    }
}
