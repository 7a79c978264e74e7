//! GRUB for both firmwares, from Debian's GRUB packages: `BOOTX64.EFI` for UEFI, and for
//! BIOS a core image in the BIOS boot partition plus boot code in the MBR.
//!
//! The images are made by the host's `grub-mkimage` from the pinned packages' module
//! directories. `grub-bios-setup` is not used: it wants a block device and root; the two
//! fields it patches are written here instead (see `bios_boot_code` and `patch_core`).

use basalt_api::bootparams::TRIAL_HANG_ARGS;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error("run grub-mkimage for {target} (is grub-common installed?)")]
    Spawn {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("grub-mkimage for {target} failed: {stderr}")]
    Mkimage {
        target: &'static str,
        stderr: String,
    },
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("GRUB core image is {size} bytes; the BIOS boot partition holds {room}")]
    CoreTooLarge { size: usize, room: u64 },
    #[error("{0} is not a 512-byte GRUB boot sector")]
    BadBootImg(PathBuf),
}

const SECTOR: usize = 512;
/// Offsets in boot.img, from GRUB's `include/grub/i386/pc/boot.h`.
const KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const DRIVE_CHECK: usize = 0x66;
/// Where the MBR's disk signature and partition table start: boot code ends here.
const BOOT_CODE_END: usize = 0x1b8;
/// Blocklist entry at the end of core.img's first sector (`diskboot.S`): start (u64),
/// length in sectors (u16), load segment (u16).
const BLOCKLIST: usize = SECTOR - 12;
const KERNEL_SEGMENT: u16 = 0x820;
/// Reed-Solomon redundancy field of core.img's second sector; 0 means none.
const RS_REDUNDANCY: usize = 0x210;

const COMMON_MODULES: &[&str] = &[
    "part_gpt",
    "fat",
    "normal",
    "configfile",
    // load_env / save_env: the A/B slot choice in the environment block.
    "loadenv",
    "linux",
    "echo",
    "serial",
    "terminal",
    "test",
    "gzio",
];

/// What the images are made with besides the packages, for the store key of the GRUB
/// step: a changed module list makes new images (a cached GRUB without `loadenv` would
/// boot slot A whatever the environment block says).
pub fn modules_key() -> String {
    [COMMON_MODULES, BIOS.extra_modules, EFI.extra_modules]
        .map(|m| m.join(","))
        .join(";")
}

pub struct Firmware {
    pub target: &'static str,
    pub extra_modules: &'static [&'static str],
}

pub const BIOS: Firmware = Firmware {
    target: "i386-pc",
    // linux16: the kernel through its 16-bit entry (see `config`).
    extra_modules: &["biosdisk", "linux16"],
};
pub const EFI: Firmware = Firmware {
    target: "x86_64-efi",
    extra_modules: &["efi_gop", "all_video"],
};

/// Directory of the target's modules inside an unpacked GRUB package.
pub fn module_dir(unpacked: &Path, fw: &Firmware) -> PathBuf {
    unpacked.join("usr/lib/grub").join(fw.target)
}

/// Runs `grub-mkimage` and returns the image.
pub fn mkimage(
    fw: &Firmware,
    moddir: &Path,
    prefix: &str,
    out: &Path,
) -> Result<Vec<u8>, GrubError> {
    let mut cmd = Command::new("grub-mkimage");
    cmd.arg("-O")
        .arg(fw.target)
        .arg("-d")
        .arg(moddir)
        .arg("-p")
        .arg(prefix)
        .arg("-o")
        .arg(out);
    cmd.args(COMMON_MODULES).args(fw.extra_modules);
    let output = cmd.output().map_err(|source| GrubError::Spawn {
        target: fw.target,
        source,
    })?;
    if !output.status.success() {
        return Err(GrubError::Mkimage {
            target: fw.target,
            stderr: String::from_utf8_lossy(&output.stderr).trim().into(),
        });
    }
    std::fs::read(out).map_err(|e| GrubError::Read(out.into(), e))
}

/// The MBR boot code: GRUB's boot.img told where core.img starts. Only the first 440
/// bytes are returned; disk signature and partition table belong to the protective MBR.
pub fn bios_boot_code(boot_img: &[u8], core_lba: u64, path: &Path) -> Result<[u8; 440], GrubError> {
    if boot_img.len() != SECTOR || boot_img[510..] != [0x55, 0xaa] {
        return Err(GrubError::BadBootImg(path.into()));
    }
    let mut code = [0u8; 440];
    code.copy_from_slice(&boot_img[..BOOT_CODE_END]);
    code[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    code[BOOT_DRIVE] = 0xff;
    // Hard disk: skip the check that trusts the BIOS's boot drive number (what
    // grub-bios-setup does for a non-floppy).
    code[DRIVE_CHECK] = 0x90;
    code[DRIVE_CHECK + 1] = 0x90;
    Ok(code)
}

/// Pads core.img to whole sectors and points its blocklist at the sectors that follow
/// its first one, stored contiguously from `core_lba`.
pub fn patch_core(core: &mut Vec<u8>, core_lba: u64, room: u64) -> Result<(), GrubError> {
    let sectors = core.len().div_ceil(SECTOR);
    if (sectors * SECTOR) as u64 > room || sectors < 2 {
        return Err(GrubError::CoreTooLarge {
            size: core.len(),
            room,
        });
    }
    core.resize(sectors * SECTOR, 0);
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    core[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&KERNEL_SEGMENT.to_le_bytes());
    // The entry before it terminates the list.
    core[BLOCKLIST - 12..BLOCKLIST].fill(0);
    core[RS_REDUNDANCY..RS_REDUNDANCY + 4].fill(0);
    Ok(())
}

/// Where grub.cfg and the environment block are on the ESP (GRUB's `$prefix` on both
/// firmwares), without the leading `/`.
pub const PREFIX_DIR: &str = "EFI/BOOT";
/// The environment block on the ESP: `$prefix/grubenv`, GRUB's default for `load_env`.
pub const GRUBENV: &str = "EFI/BOOT/grubenv";
/// grub.cfg on the ESP.
pub const GRUB_CFG: &str = "EFI/BOOT/grub.cfg";

/// One slot's boot entry of grub.cfg. Its files are `/boot/<id>/vmlinuz`,
/// `/boot/<id>/initrd.img` and `/boot/<id>/slot.cfg` (which sets `basalt_args`).
pub struct Entry<'a> {
    pub id: &'a str,
    pub title: &'a str,
}

/// The slot's kernel, initramfs and slot.cfg on the ESP.
pub fn slot_files(id: &str) -> [String; 3] {
    [
        format!("/boot/{id}/vmlinuz"),
        format!("/boot/{id}/initrd.img"),
        format!("/boot/{id}/slot.cfg"),
    ]
}

/// grub.cfg: GRUB's output on the serial and VGA/framebuffer consoles, no menu delay, and
/// the A/B choice from the environment block. The same file for every image and node,
/// never rewritten:
///
/// - the default is the entry `saved_entry` names (`a` unless it says `b`); a missing or
///   unreadable block boots the first entry;
/// - `next_entry` is a one-shot trial: it is removed from the block on disk (`save_env`)
///   before its slot boots, so whatever ends that boot (panic, verity failure, watchdog
///   reset, power cut) comes back to `saved_entry`. If the removal cannot be written the
///   trial is not made at all (otherwise a bad slot would boot forever);
/// - each entry sources its slot.cfg first and boots nothing when it is missing; during a
///   trial, GRUB's `fallback` is the saved slot, which GRUB boots when the trial's entry
///   fails (a slot.cfg or kernel that is not there).
/// - the trial's entry (the one `basalt_try` names; not the fallback) gets
///   [`TRIAL_HANG_ARGS`] after the slot's own arguments: a kernel that hangs before PID1
///   arms its watchdog panics, and `panic=10` reboots into `saved_entry`. PID1 turns them
///   off once the slot is marked good; no other boot gets them.
///
/// Two choices made for the boot's speed (measured under TCG, SeaBIOS; BENCHMARKS.md):
///
/// - GRUB reads keys from the console (PC keyboard, or the firmware's console on UEFI),
///   not from the serial port: with `terminal_input serial console`, 3 s passed between
///   reading grub.cfg and opening the kernel. Its output still goes to both (the A/B tests
///   read `basalt: booting slot …` on the serial port), and the kernel's console is the
///   command line's.
/// - On BIOS the kernel is loaded with `linux16`/`initrd16`, at 1 MiB through the 16-bit
///   boot protocol, as QEMU's `-kernel` does. With `linux` (the 32-bit protocol), GRUB
///   read the kernel to 1 MiB and, at `boot`, its relocator moved the kernel's whole
///   `init_size` chunk (53 MiB) to the preferred 16 MiB one byte at a time, backwards
///   (`std; rep movsb`, seen in QEMU's monitor): 3.5 s or more of guest time under TCG.
///   UEFI keeps `linux` (GRUB's EFI loader; there is no `linux16` there).
pub fn config(entries: &[Entry<'_>]) -> String {
    let mut cfg = String::from(
        "# Written by basalt: the same on every node, never rewritten. The slot to boot is\n\
         # in the environment block next to this file (saved_entry, and next_entry once).\n\
         serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n\
         terminal_output serial console\n\
         set timeout_style=hidden\n\
         set timeout=0\n\
         set default=0\n\
         if load_env saved_entry next_entry; then\n",
    );
    for (i, e) in entries.iter().enumerate().skip(1) {
        cfg.push_str(&format!(
            "    if [ \"${{saved_entry}}\" = {} ]; then set default={i}; fi\n",
            e.id
        ));
    }
    cfg.push_str(
        "    if [ -n \"${next_entry}\" ]; then\n\
         \x20       set basalt_try=\"${next_entry}\"\n\
         \x20       unset next_entry\n\
         \x20       if save_env next_entry; then\n\
         \x20           set fallback=\"${default}\"\n",
    );
    for (i, e) in entries.iter().enumerate() {
        cfg.push_str(&format!(
            "            if [ \"${{basalt_try}}\" = {} ]; then set default={i}; fi\n",
            e.id
        ));
    }
    cfg.push_str("        fi\n    fi\nfi\n");
    let trial_args = TRIAL_HANG_ARGS.join(" ");
    for e in entries {
        let [kernel, initrd, slot_cfg] = slot_files(e.id);
        cfg.push_str(&format!(
            "\nmenuentry '{}' --id {} {{\n    \
             if source {slot_cfg}; then\n        \
             echo 'basalt: booting slot {}'\n        \
             set basalt_trial_args=\n        \
             if [ \"${{basalt_try}}\" = {} ]; then\n            \
             set basalt_trial_args='{trial_args}'\n            \
             echo 'basalt: trial boot of slot {}: a hung kernel panics and reboots'\n        \
             fi\n        \
             if [ \"${{grub_platform}}\" = pc ]; then\n            \
             linux16 {kernel} ${{basalt_args}} ${{basalt_trial_args}}\n            \
             initrd16 {initrd}\n        \
             else\n            \
             linux {kernel} ${{basalt_args}} ${{basalt_trial_args}}\n            \
             initrd {initrd}\n        \
             fi\n    \
             fi\n}}\n",
            e.title, e.id, e.id, e.id, e.id
        ));
    }
    cfg
}

/// The two slots' entries, slot A first (entry 0).
pub const SLOTS: [Entry<'static>; 2] = [
    Entry {
        id: "a",
        title: "basalt (slot A)",
    },
    Entry {
        id: "b",
        title: "basalt (slot B)",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_boot_img() -> Vec<u8> {
        let mut b = vec![0xeb; SECTOR];
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    #[test]
    fn boot_code_points_at_the_core_and_skips_the_drive_check() {
        let code = bios_boot_code(&fake_boot_img(), 2048, Path::new("boot.img")).expect("ok");
        assert_eq!(
            &code[KERNEL_SECTOR..KERNEL_SECTOR + 8],
            &2048u64.to_le_bytes()
        );
        assert_eq!(code[BOOT_DRIVE], 0xff);
        assert_eq!(&code[DRIVE_CHECK..DRIVE_CHECK + 2], &[0x90, 0x90]);
        assert_eq!(code[0], 0xeb);
    }

    #[test]
    fn a_bad_boot_img_is_named() {
        let err = bios_boot_code(&[0; 100], 2048, Path::new("/x/boot.img")).unwrap_err();
        assert!(err.to_string().contains("/x/boot.img"));
    }

    #[test]
    fn core_blocklist_covers_the_rest_of_the_core() {
        let mut core = vec![1u8; 3 * SECTOR + 10];
        patch_core(&mut core, 2048, 1 << 20).expect("fits");
        assert_eq!(core.len(), 4 * SECTOR);
        assert_eq!(&core[BLOCKLIST..BLOCKLIST + 8], &2049u64.to_le_bytes());
        assert_eq!(&core[BLOCKLIST + 8..BLOCKLIST + 10], &3u16.to_le_bytes());
        assert_eq!(
            &core[BLOCKLIST + 10..BLOCKLIST + 12],
            &0x820u16.to_le_bytes()
        );
        assert!(core[BLOCKLIST - 12..BLOCKLIST].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_core_larger_than_the_partition_is_refused() {
        let mut core = vec![0u8; 5000];
        assert!(matches!(
            patch_core(&mut core, 2048, 4096),
            Err(GrubError::CoreTooLarge { .. })
        ));
    }

    #[test]
    fn bios_boots_through_linux16_and_uefi_through_linux() {
        let cfg = config(&SLOTS);
        for id in ["a", "b"] {
            let entry = cfg
                .split_once(&format!("--id {id} {{"))
                .and_then(|(_, rest)| rest.split_once("\n}\n"))
                .map(|(body, _)| body)
                .expect("the entry");
            let pc = entry.find("= pc ]; then").expect("a BIOS branch");
            let l16 = entry
                .find(&format!("linux16 /boot/{id}/vmlinuz"))
                .expect("linux16");
            let i16 = entry
                .find(&format!("initrd16 /boot/{id}/initrd.img"))
                .expect("initrd16");
            let other = entry.find("else").expect("an EFI branch");
            let linux = entry
                .find(&format!("    linux /boot/{id}/vmlinuz"))
                .expect("linux");
            assert!(
                pc < l16 && l16 < i16 && i16 < other && other < linux,
                "{entry}"
            );
        }
        assert!(BIOS.extra_modules.contains(&"linux16"));
        // Keys from the console only; output on both.
        assert!(!cfg.contains("terminal_input serial"), "{cfg}");
        assert!(cfg.contains("terminal_output serial console\n"), "{cfg}");
    }

    /// Runs grub.cfg the way GRUB would for the few commands it uses: `env` is the
    /// environment block, `platform` GRUB's `grub_platform`; every slot.cfg exists and sets
    /// `basalt_args` to `args-<id>`. Returns the entry booted and its `linux16`/`linux`
    /// line (command and words, variables expanded and split as GRUB does).
    fn run_grub_cfg(cfg: &str, env: &[(&str, &str)], platform: &str) -> (String, Vec<String>) {
        use std::collections::HashMap;
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("grub_platform".into(), platform.into());
        let expand = |vars: &HashMap<String, String>, word: &str| -> String {
            let mut out = word.to_owned();
            while let Some(at) = out.find("${") {
                let end = out[at..].find('}').expect("closing brace") + at;
                let value = vars.get(&out[at + 2..end]).cloned().unwrap_or_default();
                out.replace_range(at..=end, &value);
            }
            out
        };
        let unquote = |v: &str| v.trim_matches('"').trim_matches('\'').to_owned();
        // One `[ ... ]` test, or one of the commands used as a condition.
        let cond = |vars: &mut HashMap<String, String>, c: &str| -> bool {
            if let Some(t) = c.strip_prefix("[ -n ") {
                return !expand(vars, &unquote(t.trim_end_matches(" ]"))).is_empty();
            }
            if let Some(t) = c.strip_prefix("[ ") {
                let (l, r) = t
                    .trim_end_matches(" ]")
                    .split_once(" = ")
                    .expect("a = test");
                return expand(vars, &unquote(l)) == unquote(r);
            }
            if c.starts_with("load_env") {
                for (k, v) in env {
                    vars.insert((*k).into(), (*v).into());
                }
                return true;
            }
            if let Some(path) = c.strip_prefix("source /boot/") {
                let id = path.split('/').next().expect("slot id");
                vars.insert("basalt_args".into(), format!("args-{id}"));
                return true;
            }
            assert!(c.starts_with("save_env"), "unknown condition {c}");
            true
        };
        let mut linux = None;
        // Runs lines; `active` is the stack of the enclosing ifs' truth.
        let mut exec = |vars: &mut HashMap<String, String>, lines: &[&str]| {
            let mut active: Vec<bool> = Vec::new();
            for raw in lines {
                let line = raw.trim();
                let on = active.iter().all(|a| *a);
                if let Some(rest) = line.strip_prefix("if ") {
                    if let Some((c, body)) = rest.split_once("; then ") {
                        // One-line `if C; then S; fi`.
                        let body = body.strip_suffix("; fi").expect("one-line if");
                        if on && cond(vars, c) {
                            let (k, v) = body
                                .strip_prefix("set ")
                                .and_then(|b| b.split_once('='))
                                .expect("one-line set");
                            vars.insert(k.into(), v.into());
                        }
                        continue;
                    }
                    let c = rest.strip_suffix("; then").expect("if ...; then");
                    active.push(on && cond(vars, c));
                    continue;
                }
                match line {
                    "fi" => {
                        active.pop().expect("fi without if");
                        continue;
                    }
                    "else" => {
                        let last = active.pop().expect("else without if");
                        let outer = active.iter().all(|a| *a);
                        // Taken when the outer ifs were and this one was not.
                        active.push(outer && !last);
                        continue;
                    }
                    _ => {}
                }
                if !on {
                    continue;
                }
                if let Some(kv) = line.strip_prefix("set ") {
                    let (k, v) = kv.split_once('=').expect("set k=v");
                    let v = if v.starts_with('\'') {
                        unquote(v)
                    } else {
                        expand(vars, &unquote(v))
                    };
                    vars.insert(k.into(), v);
                } else if let Some(k) = line.strip_prefix("unset ") {
                    vars.remove(k);
                } else if line.starts_with("linux") {
                    let words: Vec<String> = line
                        .split_whitespace()
                        .flat_map(|w| {
                            expand(vars, w)
                                .split_whitespace()
                                .map(str::to_owned)
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    linux = Some(words);
                }
            }
            assert!(active.is_empty(), "unbalanced if/fi");
        };
        let (top, entries) = cfg.split_once("\nmenuentry").expect("entries");
        exec(&mut vars, &top.lines().collect::<Vec<_>>());
        let entries = format!("\nmenuentry{entries}");
        let entries: Vec<&str> = entries.split("\nmenuentry ").skip(1).collect();
        let default: usize = vars["default"].parse().expect("numeric default");
        let entry = entries[default];
        let id = entry
            .split_once("--id ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .expect("id")
            .to_owned();
        let body: Vec<&str> = entry.lines().skip(1).filter(|l| *l != "}").collect();
        exec(&mut vars, &body);
        (id, linux.expect("a linux line"))
    }

    #[test]
    fn only_the_trial_boot_gets_the_hang_args_on_both_firmwares() {
        let cfg = config(&SLOTS);
        let hang = |words: &[String]| {
            TRIAL_HANG_ARGS
                .iter()
                .filter(|a| words.iter().any(|w| w == *a))
                .count()
        };
        for (platform, cmd) in [("pc", "linux16"), ("efi", "linux")] {
            // Normal boots: the default slot, with or without saved_entry.
            for (env, want) in [
                (&[("saved_entry", "a")][..], "a"),
                (&[("saved_entry", "b")][..], "b"),
                (&[][..], "a"),
            ] {
                let (id, words) = run_grub_cfg(&cfg, env, platform);
                assert_eq!(id, want, "{platform} {env:?}");
                assert_eq!(words[0], cmd);
                assert_eq!(words[1], format!("/boot/{want}/vmlinuz"));
                assert_eq!(words[2..], [format!("args-{want}")], "{platform} {env:?}");
                assert_eq!(hang(&words), 0, "a normal boot got trial args: {words:?}");
            }
            // Trials: the tried slot, the slot's own args first, then every trial arg.
            for (saved, next) in [("a", "b"), ("b", "a")] {
                let env = [("saved_entry", saved), ("next_entry", next)];
                let (id, words) = run_grub_cfg(&cfg, &env, platform);
                assert_eq!(id, next, "{platform} {env:?}");
                assert_eq!(words[0], cmd);
                assert_eq!(words[2], format!("args-{next}"));
                assert_eq!(
                    words[3..],
                    TRIAL_HANG_ARGS
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>(),
                    "{platform} {env:?}"
                );
            }
        }
    }

    #[test]
    fn config_matches_golden_file() {
        let cfg = config(&SLOTS);
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/grub.cfg");
        if std::env::var_os("BASALT_BLESS").is_some() {
            std::fs::write(&golden, &cfg).expect("bless");
        }
        assert_eq!(cfg, std::fs::read_to_string(&golden).expect("golden file"));
    }
}
