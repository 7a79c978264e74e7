//! `basalt inspect`: what a built image holds, read from the image itself (not from its
//! manifest): the partition table, the boot slots (grub.cfg's entries, each slot's
//! `slot.cfg`, and the slot choice in GRUB's environment block, all on the ESP), and the
//! versions recorded in the active root's `/etc/os-release`.

use crate::image::{self, DiskImage, Fat, Format, GptPartition, ImageError, VeritySuperblock};
use basalt_api::bootparams::{BootParams, BootParamsError, VERITY_BLOCK_SIZE};
use basalt_api::layout::Sectors;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// GPT name of the ESP.
pub const ESP: &str = basalt_api::layout::Partition::Efi.name();
/// Where GRUB (both firmwares) reads its configuration on the ESP.
pub const GRUB_CFG: &str = crate::grub::GRUB_CFG;
/// GRUB's environment block on the ESP: `saved_entry`, `next_entry`.
pub const GRUBENV: &str = crate::grub::GRUBENV;
const OS_RELEASE: &str = "/etc/os-release";
const INIT: &str = "/sbin/init";
/// Enough of a bzImage to hold its setup header and version string.
const KERNEL_HEAD: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: the EFI partition holds no {GRUB_CFG}")]
    NoGrubCfg { path: PathBuf },
    #[error("{path}: {GRUB_CFG} has no `set default=`")]
    NoDefault { path: PathBuf },
    #[error("{path}: {GRUB_CFG} has no entry with --id {id} (the default)")]
    NoDefaultEntry { path: PathBuf, id: String },
    /// `id` names the entry and the file its command line is in.
    #[error("{path}: boot entry {id}")]
    BootParams {
        path: PathBuf,
        id: String,
        #[source]
        source: BootParamsError,
    },
    #[error("{path}: {partition} holds no {OS_RELEASE}")]
    NoOsRelease { path: PathBuf, partition: String },
    #[error("{path}: {OS_RELEASE} in {partition} has no {key}")]
    OsReleaseKey {
        path: PathBuf,
        partition: String,
        key: &'static str,
    },
}

/// `basalt inspect --json`. Field names are an interface for scripts: keep them stable.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// The image file as given.
    pub image: PathBuf,
    /// `raw` or `qcow2`.
    pub format: Format,
    /// Disk size in 512-byte sectors.
    pub sectors: Sectors,
    /// Disk GUID from the GPT header, uppercase.
    pub disk_guid: String,
    /// Used GPT entries: `number`, `name`, `type_guid`, `guid`, `first_lba`, `sectors`
    /// (sectors of 512 bytes; GUIDs uppercase as `sfdisk` prints them).
    pub partitions: Vec<GptPartition>,
    /// The slot GRUB boots by default: `a` or `b` (`saved_entry` of the environment block).
    pub active_slot: String,
    /// The slot GRUB boots once, next time (`next_entry`), if any.
    pub next_slot: Option<String>,
    pub slots: Vec<SlotInfo>,
    pub versions: Versions,
    /// The kernel modules on the active root.
    pub modules: ModulesInfo,
}

/// The kernel modules of the active root: `/lib/modules/<kernel>/modules.dep` read back,
/// and the bytes of the module files under that folder.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ModulesInfo {
    /// Module names (as `modprobe` knows them), sorted.
    pub names: Vec<String>,
    /// Bytes of the `.ko` files.
    pub bytes: u64,
}

/// The module names of a `modules.dep`, sorted: `kernel/net/netfilter/xt_nat.ko: …` →
/// `xt_nat`, with `-` as `_`.
pub fn module_names(modules_dep: &str) -> Vec<String> {
    let mut names: Vec<String> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(path, _)| {
            let file = path.trim().rsplit('/').next().unwrap_or(path);
            crate::kmod::normalize(file.split(".ko").next().unwrap_or(file))
        })
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

/// One boot entry of grub.cfg and the root partition it points at. The verity fields and
/// the command line are null while the slot has no slot.cfg (slot B before the first
/// upgrade).
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    /// `a` or `b`: the entry's id, and basalt.slot.
    pub slot: String,
    /// GPT name of the root partition, `ROOT-A` or `ROOT-B`.
    pub partition: String,
    pub active: bool,
    /// The partition holds a dm-verity superblock after basalt.verity.blocks data blocks.
    pub populated: bool,
    /// basalt.verity.root, basalt.verity.salt, basalt.verity.blocks.
    pub root_hash: Option<String>,
    pub salt: Option<String>,
    pub data_blocks: Option<u64>,
    /// Kernel and initramfs paths on the ESP.
    pub kernel: String,
    pub initrd: String,
    /// Version from the kernel file's bzImage header; null when the file is missing.
    pub kernel_version: Option<String>,
    /// The whole kernel command line (from slot.cfg).
    pub cmdline: Option<String>,
}

/// From `/etc/os-release` and `/sbin/init` of the active slot's root filesystem.
#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    /// The partition they were read from.
    pub source: String,
    /// BASALT_VERSION: the basalt release that built the image and its basalt-init
    /// (VERSION_ID in images from before image versions).
    pub basalt: String,
    /// VERSION_ID: the image's version (the spec's `version`).
    pub image_version: String,
    /// BASALT_IMAGE: the image spec's name.
    pub image: String,
    /// BASALT_KERNEL: kernel release, as in /lib/modules.
    pub kernel: String,
    /// BASALT_K3S.
    pub k3s: String,
    /// sha256 of /sbin/init (basalt-init), as manifest.json's basalt_init.sha256.
    pub basalt_init_sha256: String,
}

/// A `menuentry` of grub.cfg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub id: String,
    pub kernel: String,
    pub initrd: String,
    /// The words after the kernel on the `linux` line; [`boot_slots`] replaces it with
    /// the slot.cfg's command line.
    pub cmdline: String,
    /// The slot.cfg the entry sources (`source /boot/a/slot.cfg`), if any.
    pub slot_cfg: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubCfg {
    pub default: Option<String>,
    pub entries: Vec<BootEntry>,
}

/// Reads the parts of grub.cfg basalt writes (`grub::config`): a top-level `set default=`,
/// and per `menuentry … --id X {` its `source` (slot.cfg), `linux` and `initrd` lines.
pub fn parse_grub_cfg(text: &str) -> GrubCfg {
    let mut cfg = GrubCfg {
        default: None,
        entries: vec![],
    };
    let mut current: Option<BootEntry> = None;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), &mut current) {
            (Some("set"), None) => {
                if let Some(v) = line["set".len()..].trim().strip_prefix("default=") {
                    cfg.default
                        .get_or_insert(v.trim_matches(['"', '\'']).to_string());
                }
            }
            (Some("menuentry"), None) => {
                let id = words.skip_while(|w| *w != "--id").nth(1).unwrap_or("");
                current = Some(BootEntry {
                    id: id.to_string(),
                    kernel: String::new(),
                    initrd: String::new(),
                    cmdline: String::new(),
                    slot_cfg: None,
                });
            }
            (Some("if" | "source"), Some(e)) if line.contains("source ") => {
                let after = line.split_once("source ").map_or("", |(_, a)| a);
                let file = after.split_whitespace().next().unwrap_or("");
                e.slot_cfg = Some(file.trim_end_matches(';').to_string());
            }
            (Some("linux"), Some(e)) => {
                e.kernel = words.next().unwrap_or("").to_string();
                e.cmdline = words.collect::<Vec<_>>().join(" ");
            }
            (Some("initrd"), Some(e)) => e.initrd = words.next().unwrap_or("").to_string(),
            (Some("}"), Some(_)) => cfg.entries.extend(current.take()),
            _ => {}
        }
    }
    cfg
}

/// `KEY=value` lines, quotes removed.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The version at the start of the kernel's version string in a bzImage's setup header
/// (Linux boot protocol 2.00+: `kernel_version` at 0x20e points at it, less 0x200).
pub fn bzimage_version(head: &[u8]) -> Option<String> {
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = usize::from(u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]));
    let s = head.get(ptr + 0x200..)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    std::str::from_utf8(&s[..end]).ok().map(str::to_string)
}

/// A slot as grub.cfg and its slot.cfg describe it: its entry (with the whole command
/// line) and the parameters on its command line.
#[derive(Debug, Clone)]
pub struct SlotBoot {
    pub entry: BootEntry,
    pub params: BootParams,
}

/// The boot configuration on the ESP.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The id of the entry GRUB boots by default.
    pub default: String,
    /// The id of the entry GRUB boots once, next time.
    pub next: Option<String>,
    /// Entries with a command line (their slot.cfg is there).
    pub slots: Vec<SlotBoot>,
    /// Entries whose slot.cfg is not on the ESP: nothing to boot there yet.
    pub unconfigured: Vec<BootEntry>,
}

/// `basalt_args` of a slot.cfg (`set basalt_args='…'`, as [`basalt_api::bundle::slot_cfg`]
/// writes it).
pub fn parse_slot_cfg(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("set basalt_args=")?;
        Some(v.trim().trim_matches(['\'', '"']).to_string())
    })
}

/// The boot configuration read from the ESP: the default entry's id and each slot that
/// has a command line.
pub fn boot_slots(img: &DiskImage, fat: &Fat) -> Result<(String, Vec<SlotBoot>), InspectError> {
    let cfg = boot_config(img, fat)?;
    Ok((cfg.default, cfg.slots))
}

/// grub.cfg's entries, each slot.cfg, and the slot choice as GRUB makes it: `saved_entry`
/// of the environment block when it names an entry, else grub.cfg's first entry (what
/// GRUB does with a missing or unreadable block); `next_entry` likewise. An image from
/// before the environment block has its command lines on the `linux` lines and its
/// default in `set default=`.
pub fn boot_config(img: &DiskImage, fat: &Fat) -> Result<BootConfig, InspectError> {
    let path = || img.path().to_path_buf();
    let text = fat
        .read(GRUB_CFG, None)?
        .ok_or_else(|| InspectError::NoGrubCfg { path: path() })?;
    let cfg = parse_grub_cfg(&String::from_utf8_lossy(&text));
    let env = fat
        .read(GRUBENV, None)?
        .and_then(|block| basalt_api::grubenv::GrubEnv::parse(&block).ok());
    let named = |v: Option<&str>| {
        v.filter(|id| cfg.entries.iter().any(|e| e.id == *id))
            .map(str::to_string)
    };
    let uses_env = cfg.entries.iter().any(|e| e.slot_cfg.is_some());
    let default = if uses_env {
        named(
            env.as_ref()
                .and_then(|e| e.get(basalt_api::grubenv::SAVED_ENTRY)),
        )
        .or_else(|| cfg.entries.first().map(|e| e.id.clone()))
    } else {
        cfg.default.clone()
    }
    .ok_or_else(|| InspectError::NoDefault { path: path() })?;
    let next = named(
        env.as_ref()
            .and_then(|e| e.get(basalt_api::grubenv::NEXT_ENTRY)),
    );
    let mut slots = vec![];
    let mut unconfigured = vec![];
    for mut entry in cfg.entries {
        let (cmdline, source) = match &entry.slot_cfg {
            Some(file) => match fat.read(file, None)? {
                Some(text) => (
                    parse_slot_cfg(&String::from_utf8_lossy(&text)).unwrap_or_default(),
                    file.clone(),
                ),
                None => {
                    unconfigured.push(entry);
                    continue;
                }
            },
            None => (entry.cmdline.clone(), GRUB_CFG.to_string()),
        };
        match BootParams::parse(&cmdline) {
            Ok(params) => {
                entry.cmdline = cmdline;
                slots.push(SlotBoot { entry, params });
            }
            Err(source_err) => {
                return Err(InspectError::BootParams {
                    path: path(),
                    id: format!("{} ({source})", entry.id),
                    source: source_err,
                })
            }
        }
    }
    if !slots.iter().any(|s| s.entry.id == default) {
        return Err(InspectError::NoDefaultEntry {
            path: path(),
            id: default,
        });
    }
    Ok(BootConfig {
        default,
        next,
        slots,
        unconfigured,
    })
}

/// The verity superblock where the command line says it is; `None` when there is none
/// (the slot is not populated) or when it would lie past the partition's end.
pub fn superblock(
    img: &DiskImage,
    part: &GptPartition,
    data_blocks: u64,
) -> Result<Option<VeritySuperblock>, ImageError> {
    let at = data_blocks.saturating_mul(VERITY_BLOCK_SIZE);
    if at.saturating_add(VERITY_BLOCK_SIZE) > part.size() {
        return Ok(None);
    }
    let block = img.read_vec(part.offset() + at, VERITY_BLOCK_SIZE as usize)?;
    Ok(VeritySuperblock::parse(&block))
}

/// Everything `basalt inspect` shows.
pub fn inspect(path: &Path) -> Result<ImageInfo, InspectError> {
    let img = DiskImage::open(path)?;
    let gpt = img.table()?;
    let parts = gpt.partitions;
    let fat = img.fat(image::find(&img, &parts, ESP)?)?;
    let config = boot_config(&img, &fat)?;
    let default = config.default;
    let mut slots = vec![];
    let mut active = None;
    for b in config.slots {
        let part = image::find(&img, &parts, b.params.slot.partition_name())?;
        let kernel_head = fat.read(&b.entry.kernel, Some(KERNEL_HEAD))?;
        let is_active = b.entry.id == default;
        if is_active {
            active = Some(part.clone());
        }
        slots.push(SlotInfo {
            slot: b.params.slot.as_str().into(),
            partition: part.name.clone(),
            active: is_active,
            populated: superblock(&img, part, b.params.verity.data_blocks)?.is_some(),
            root_hash: Some(b.params.verity.root_hash),
            salt: Some(b.params.verity.salt),
            data_blocks: Some(b.params.verity.data_blocks),
            kernel: b.entry.kernel,
            initrd: b.entry.initrd,
            kernel_version: kernel_head.as_deref().and_then(bzimage_version),
            cmdline: Some(b.entry.cmdline),
        });
    }
    for e in config.unconfigured {
        use basalt_api::bootparams::Slot;
        let slot = match e.id.as_str() {
            "a" => Slot::A,
            "b" => Slot::B,
            _ => continue,
        };
        let part = image::find(&img, &parts, slot.partition_name())?;
        let kernel_head = fat.read(&e.kernel, Some(KERNEL_HEAD))?;
        slots.push(SlotInfo {
            slot: e.id.clone(),
            partition: part.name.clone(),
            active: false,
            populated: false,
            root_hash: None,
            salt: None,
            data_blocks: None,
            kernel: e.kernel,
            initrd: e.initrd,
            kernel_version: kernel_head.as_deref().and_then(bzimage_version),
            cmdline: None,
        });
    }
    slots.sort_by(|a, b| a.slot.cmp(&b.slot));
    let active = active.ok_or_else(|| InspectError::NoDefaultEntry {
        path: path.into(),
        id: default,
    })?;
    let versions = versions(&img, &active)?;
    let moddir = format!("/lib/modules/{}", versions.kernel);
    let dep_path = format!("{moddir}/modules.dep");
    let dep = img.squashfs_files(&active, &[dep_path.as_str()])?;
    let modules = ModulesInfo {
        names: dep
            .first()
            .and_then(Option::as_deref)
            .map(|d| module_names(&String::from_utf8_lossy(d)))
            .unwrap_or_default(),
        bytes: img
            .squashfs_sizes(&active, &moddir)?
            .iter()
            .filter(|(p, _)| p.ends_with(".ko"))
            .map(|(_, n)| n)
            .sum(),
    };
    Ok(ImageInfo {
        image: path.into(),
        format: img.format(),
        sectors: img.sectors(),
        disk_guid: basalt_api::gpt::guid_string(&gpt.header.disk_guid),
        active_slot: slots
            .iter()
            .find(|s| s.active)
            .map(|s| s.slot.clone())
            .unwrap_or_default(),
        next_slot: config.next,
        versions,
        modules,
        partitions: parts,
        slots,
    })
}

fn versions(img: &DiskImage, root: &GptPartition) -> Result<Versions, InspectError> {
    let files = img.squashfs_files(root, &[OS_RELEASE, INIT])?;
    let (os_release, init) = match files.as_slice() {
        [Some(os), init] => (parse_os_release(&String::from_utf8_lossy(os)), init),
        _ => {
            return Err(InspectError::NoOsRelease {
                path: img.path().into(),
                partition: root.name.clone(),
            })
        }
    };
    let get = |key: &'static str| {
        os_release
            .get(key)
            .cloned()
            .ok_or_else(|| InspectError::OsReleaseKey {
                path: img.path().into(),
                partition: root.name.clone(),
                key,
            })
    };
    Ok(Versions {
        source: root.name.clone(),
        basalt: get("BASALT_VERSION").or_else(|_| get("VERSION_ID"))?,
        image_version: get("VERSION_ID")?,
        image: get("BASALT_IMAGE")?,
        kernel: get("BASALT_KERNEL")?,
        k3s: get("BASALT_K3S")?,
        basalt_init_sha256: init
            .as_deref()
            .map(|b| hex::encode(Sha256::digest(b)))
            .unwrap_or_default(),
    })
}

impl fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image    {}", self.image.display())?;
        writeln!(
            f,
            "format   {}, {} sectors, disk GUID {}",
            self.format, self.sectors.0, self.disk_guid
        )?;
        writeln!(
            f,
            "\n #  {:<8} {:<36}  {:>10}  {:>10}",
            "name", "type GUID", "first LBA", "sectors"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "{:>2}  {:<8} {:<36}  {:>10}  {:>10}",
                p.number, p.name, p.type_guid, p.first_lba.0, p.sectors.0
            )?;
        }
        writeln!(f, "\nslot  partition  active  populated  kernel")?;
        for s in &self.slots {
            let yes = |b| if b { "yes" } else { "no" };
            let kernel = s.kernel_version.as_deref().unwrap_or("(missing)");
            writeln!(
                f,
                "{:<4}  {:<9}  {:<6}  {:<9}  {} {}",
                s.slot,
                s.partition,
                yes(s.active),
                yes(s.populated),
                s.kernel,
                kernel
            )?;
            match (&s.root_hash, &s.cmdline) {
                (Some(root_hash), Some(cmdline)) => {
                    writeln!(f, "      root hash {root_hash}")?;
                    writeln!(f, "      cmdline   {cmdline}")?;
                }
                _ => writeln!(f, "      no slot.cfg on the ESP: nothing to boot yet")?,
            }
        }
        let v = &self.versions;
        writeln!(f, "\nversions (from {}:{OS_RELEASE})", v.source)?;
        writeln!(f, "  image        {} {}", v.image, v.image_version)?;
        writeln!(f, "  basalt       {}", v.basalt)?;
        if let Some(next) = &self.next_slot {
            writeln!(f, "  next boot    slot {next}, once (next_entry)")?;
        }
        writeln!(f, "  kernel       {}", v.kernel)?;
        writeln!(f, "  k3s          {}", v.k3s)?;
        writeln!(f, "  basalt-init  sha256 {}", v.basalt_init_sha256)?;
        let m = &self.modules;
        writeln!(
            f,
            "\nkernel modules (from {}:/lib/modules/{}/modules.dep): {}, {:.1} MiB",
            v.source,
            v.kernel,
            m.names.len(),
            m.bytes as f64 / f64::from(1 << 20)
        )?;
        // Wrapped at about 100 columns.
        let mut line = String::from(" ");
        for name in &m.names {
            if line.len() + name.len() + 1 > 100 {
                writeln!(f, "{line}")?;
                line = String::from(" ");
            }
            line.push(' ');
            line.push_str(name);
        }
        if line.trim().is_empty() {
            Ok(())
        } else {
            write!(f, "{line}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_written_by_grub_reads_back() {
        let text = crate::grub::config(&crate::grub::SLOTS);
        let cfg = parse_grub_cfg(&text);
        let entry = |id: &str| BootEntry {
            id: id.into(),
            kernel: format!("/boot/{id}/vmlinuz"),
            initrd: format!("/boot/{id}/initrd.img"),
            // GRUB's trial arguments follow the slot's own (empty on a normal boot).
            cmdline: "${basalt_args} ${basalt_trial_args}".into(),
            slot_cfg: Some(format!("/boot/{id}/slot.cfg")),
        };
        assert_eq!(cfg.entries, [entry("a"), entry("b")]);
        // The static default is the first entry; the environment block chooses.
        assert_eq!(cfg.default.as_deref(), Some("0"));
    }

    #[test]
    fn slot_cfg_written_for_a_bundle_reads_back() {
        let cmdline = "gpt quiet basalt.verity.root=x";
        let text = basalt_api::bundle::slot_cfg(cmdline, basalt_api::bootparams::Slot::B);
        assert_eq!(
            parse_slot_cfg(&text).as_deref(),
            Some("gpt quiet basalt.verity.root=x basalt.slot=b")
        );
        assert_eq!(parse_slot_cfg("# nothing\n"), None);
    }

    #[test]
    fn an_old_grub_cfg_with_command_lines_still_reads() {
        let text = "set default=a\nmenuentry 'A' --id a {\n    linux /boot/a/vmlinuz quiet basalt.slot=a\n    initrd /boot/a/initrd.img\n}\n";
        let cfg = parse_grub_cfg(text);
        assert_eq!(cfg.default.as_deref(), Some("a"));
        assert_eq!(cfg.entries[0].cmdline, "quiet basalt.slot=a");
        assert_eq!(cfg.entries[0].slot_cfg, None);
    }

    #[test]
    fn grub_cfg_without_default_or_entries_is_seen_as_such() {
        let cfg = parse_grub_cfg("set timeout=0\nmenuentry 'x' {\n linux /k\n");
        assert_eq!(cfg.default, None);
        assert!(cfg.entries.is_empty(), "an unclosed entry does not count");
    }

    #[test]
    fn module_names_are_read_from_modules_dep_paths() {
        let dep = "kernel/net/netfilter/xt_nat.ko: kernel/net/netfilter/nf_nat.ko\n\
                   kernel/drivers/md/dm-mod.ko:\n\
                   kernel/fs/overlayfs/overlay.ko.xz:\n\n";
        assert_eq!(module_names(dep), ["dm_mod", "overlay", "xt_nat"]);
    }

    #[test]
    fn os_release_values_lose_their_quotes() {
        let m = parse_os_release("NAME=basalt\nPRETTY_NAME=\"basalt 0.1.0\"\nBASALT_K3S=v1\n");
        assert_eq!(m["PRETTY_NAME"], "basalt 0.1.0");
        assert_eq!(m["BASALT_K3S"], "v1");
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn bzimage_version_follows_the_setup_header_pointer() {
        let mut head = vec![0u8; 0x1000];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let s = b"6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        head[0x500..0x500 + s.len()].copy_from_slice(s);
        assert_eq!(
            bzimage_version(&head).as_deref(),
            Some("6.1.0-50-cloud-amd64")
        );
        head[0x202] = b'X';
        assert_eq!(bzimage_version(&head), None);
        assert_eq!(bzimage_version(&[0u8; 16]), None);
    }
}
