//! The upgrade bundle: what `basalt build` writes next to the image so a running node can
//! fill its other root slot, and the image identity a node carries to compare bundles with.
//!
//! A bundle is one POSIX tar, its entries in this order so a node can stream it:
//!
//! 1. [`MANIFEST`] (`manifest.json`, a [`Manifest`]),
//! 2. [`ROOT`] (`root.img`): the bytes to write at the start of a ROOT partition, the
//!    squashfs and then its dm-verity superblock and tree, as the builder lays out ROOT-A;
//! 3. [`KERNEL`] (`vmlinuz`) and 4. [`INITRD`] (`initrd.img`), for `/boot/<slot>/` on the ESP.
//!
//! The image's root carries its own identity ([`Identity`], at [`IDENTITY_PATH`]): the same
//! `version` and `compat` as the manifest, so basalt-init can refuse a bundle for another
//! partition layout, or an older version, before it writes anything.

use crate::bootparams::{BootParams, Slot, VERITY_BLOCK_SIZE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this code reads and writes.
pub const FORMAT: u32 = 1;
/// The first entry of the tar.
pub const MANIFEST: &str = "manifest.json";
/// The slot's root: squashfs, then the verity superblock and tree.
pub const ROOT: &str = "root.img";
/// The kernel.
pub const KERNEL: &str = "vmlinuz";
/// The initramfs.
pub const INITRD: &str = "initrd.img";
/// The parts after the manifest, in tar order (and in [`Manifest::parts`] order).
pub const PARTS: [&str; 3] = [ROOT, KERNEL, INITRD];
/// Where the image identity is on the root, relative to `/`.
pub const IDENTITY_PATH: &str = "usr/lib/basalt/image.json";
/// The version of a spec that names none.
pub const DEFAULT_VERSION: &str = "0.0.0";
/// The kernel command-line key of the slot, which the manifest's `cmdline` must not hold.
const SLOT_KEY: &str = "basalt.slot=";

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The image's version (the spec's `version`).
    pub version: semver::Version,
    /// The dm-verity root hash of `root.img`, lowercase hex.
    pub root_hash: String,
    pub verity: VerityParams,
    /// The kernel command line without `basalt.slot=` (see [`Manifest::slot_cmdline`]).
    pub cmdline: String,
    /// `root.img`, `vmlinuz`, `initrd.img`, in that order.
    pub parts: Vec<Part>,
    pub compat: Compat,
}

/// Where the verity tree is in `root.img` (format 1, sha256, 4096-byte blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityParams {
    /// Lowercase hex, possibly empty.
    pub salt: String,
    /// 4096-byte data blocks the tree covers.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock in `root.img` (`veritysetup --hash-offset`):
    /// always `data_blocks * 4096` in a basalt image.
    pub hash_offset: u64,
}

/// One part of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub name: String,
    pub size: u64,
    /// sha256 of the part's bytes, lowercase hex.
    pub sha256: String,
}

/// The image a bundle fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compat {
    /// [`layout_id`] of the disk's partition table.
    pub layout: String,
    /// Bytes of one ROOT slot: `root.img` must fit.
    pub slot_size: u64,
}

/// The image identity on the root, at [`IDENTITY_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// [`FORMAT`].
    pub format: u32,
    pub version: semver::Version,
    pub compat: Compat,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: not JSON of the expected shape: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: format {found}, this basalt reads format {FORMAT}")]
    Format { what: &'static str, found: u32 },
    #[error("bundle manifest: `{key}` is {value:?}: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("bundle manifest: parts are {found:?}, expected {PARTS:?} in that order")]
    Parts { found: Vec<String> },
}

fn bad(key: &'static str, value: impl ToString, why: impl ToString) -> BundleError {
    BundleError::Bad {
        key,
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// Lowercase hex of exactly `len` digits (any even length up to 512 when `len` is `None`).
fn check_hex(key: &'static str, value: &str, len: Option<usize>) -> Result<(), BundleError> {
    let hex = value
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match len {
        Some(n) if value.len() != n || !hex => Err(bad(
            key,
            value,
            format!("expected {n} lowercase hex digits"),
        )),
        None if !hex || !value.len().is_multiple_of(2) || value.len() > 512 => {
            Err(bad(key, value, "expected up to 256 bytes as lowercase hex"))
        }
        _ => Ok(()),
    }
}

impl Compat {
    fn validate(&self) -> Result<(), BundleError> {
        check_hex("compat.layout", &self.layout, Some(64))?;
        if self.slot_size == 0 || !self.slot_size.is_multiple_of(VERITY_BLOCK_SIZE) {
            return Err(bad(
                "compat.slot_size",
                self.slot_size,
                "expected a positive multiple of 4096",
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// Reads and validates `manifest.json`.
    pub fn parse(json: &[u8]) -> Result<Manifest, BundleError> {
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|source| BundleError::Json {
                what: "bundle manifest",
                source,
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// `manifest.json`'s bytes: pretty JSON ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks everything that does not need the parts' bytes: the format, hex fields, the
    /// parts' names and order, that `root.img` holds the verity tree where the manifest
    /// says and fits the slot, and that `cmdline` carries the same verity parameters and
    /// no slot.
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.format != FORMAT {
            return Err(BundleError::Format {
                what: "bundle manifest",
                found: self.format,
            });
        }
        check_hex("root_hash", &self.root_hash, Some(64))?;
        check_hex("verity.salt", &self.verity.salt, None)?;
        if self.verity.data_blocks == 0 {
            return Err(bad("verity.data_blocks", 0, "expected a positive count"));
        }
        let expected_offset = self.verity.data_blocks.checked_mul(VERITY_BLOCK_SIZE);
        if expected_offset != Some(self.verity.hash_offset) {
            return Err(bad(
                "verity.hash_offset",
                self.verity.hash_offset,
                "expected verity.data_blocks * 4096 (the tree follows the data)",
            ));
        }
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if names != PARTS {
            return Err(BundleError::Parts {
                found: names.into_iter().map(String::from).collect(),
            });
        }
        for part in &self.parts {
            check_hex("parts[].sha256", &part.sha256, Some(64))?;
        }
        self.compat.validate()?;
        let root = self.root_part().size;
        if root <= self.verity.hash_offset || !root.is_multiple_of(VERITY_BLOCK_SIZE) {
            return Err(bad(
                "parts[root.img].size",
                root,
                format!(
                    "expected whole 4096-byte blocks past the verity superblock at {}",
                    self.verity.hash_offset
                ),
            ));
        }
        if root > self.compat.slot_size {
            return Err(bad(
                "parts[root.img].size",
                root,
                format!("larger than the slot ({} bytes)", self.compat.slot_size),
            ));
        }
        if self.cmdline.contains(['\'', '\n', '\\']) {
            return Err(bad(
                "cmdline",
                &self.cmdline,
                "must not hold a quote, backslash or newline (it goes into a GRUB script)",
            ));
        }
        if self
            .cmdline
            .split_whitespace()
            .any(|w| w.starts_with(SLOT_KEY))
        {
            return Err(bad(
                "cmdline",
                &self.cmdline,
                "must not name the slot: the node adds basalt.slot=",
            ));
        }
        let params = BootParams::parse(&self.slot_cmdline(Slot::A))
            .map_err(|e| bad("cmdline", &self.cmdline, e))?;
        if params.verity.root_hash != self.root_hash
            || params.verity.salt != self.verity.salt
            || params.verity.data_blocks != self.verity.data_blocks
        {
            return Err(bad(
                "cmdline",
                &self.cmdline,
                "its basalt.verity.* parameters differ from root_hash and verity",
            ));
        }
        Ok(())
    }

    /// The part named `name`.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    fn root_part(&self) -> &Part {
        // validate() checked the order before calling this.
        &self.parts[0]
    }

    /// The whole kernel command line of `slot`: [`Manifest::cmdline`] and `basalt.slot=`.
    pub fn slot_cmdline(&self, slot: Slot) -> String {
        slot_cmdline(&self.cmdline, slot)
    }

    /// The slot's `slot.cfg` for the ESP (see [`slot_cfg`]).
    pub fn slot_cfg(&self, slot: Slot) -> String {
        slot_cfg(&self.cmdline, slot)
    }

    /// The identity an image built with this manifest carries.
    pub fn identity(&self) -> Identity {
        Identity {
            format: FORMAT,
            version: self.version.clone(),
            compat: self.compat.clone(),
        }
    }
}

impl Identity {
    /// Reads and validates `image.json`.
    pub fn parse(json: &[u8]) -> Result<Identity, BundleError> {
        let identity: Identity =
            serde_json::from_slice(json).map_err(|source| BundleError::Json {
                what: "image identity",
                source,
            })?;
        if identity.format != FORMAT {
            return Err(BundleError::Format {
                what: "image identity",
                found: identity.format,
            });
        }
        identity.compat.validate()?;
        Ok(identity)
    }

    /// `image.json`'s bytes: pretty JSON ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// `cmdline` (without a slot) with `basalt.slot=<slot>` appended.
pub fn slot_cmdline(cmdline: &str, slot: Slot) -> String {
    let cmdline = cmdline.trim();
    if cmdline.is_empty() {
        format!("{SLOT_KEY}{}", slot.as_str())
    } else {
        format!("{cmdline} {SLOT_KEY}{}", slot.as_str())
    }
}

/// `/boot/<slot>/slot.cfg`: the GRUB script grub.cfg sources before booting the slot. It
/// only sets `basalt_args`, the slot's whole kernel command line, single-quoted (a
/// command line with a quote, backslash or newline is refused by [`Manifest::validate`]).
pub fn slot_cfg(cmdline: &str, slot: Slot) -> String {
    format!(
        "# Written by basalt: the kernel command line of slot {}.\nset basalt_args='{}'\n",
        slot.as_str(),
        slot_cmdline(cmdline, slot)
    )
}

/// The ESP directory of a slot's boot files, without a leading `/` (`boot/a`).
pub fn slot_dir(slot: Slot) -> String {
    format!("boot/{}", slot.as_str())
}

/// One partition, as [`layout_id`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutPart<'a> {
    /// The GPT partition name.
    pub name: &'a str,
    /// The type GUID, upper case as [`crate::layout::type_guid`] has it.
    pub type_guid: &'a str,
    pub first_lba: u64,
    pub sectors: u64,
}

/// The id of a partition layout: sha256 (lowercase hex) of one line per partition,
/// `name type_guid first_lba sectors\n`, in table order. STATE's size is left out (`-`):
/// the node grows STATE to the disk's end on first boot, and no bundle cares. Partition
/// and disk GUIDs are left out too, so every disk of one layout has the same id. A node
/// can compute it from its own GPT ([`crate::gpt`]).
pub fn layout_id<'a>(parts: impl IntoIterator<Item = LayoutPart<'a>>) -> String {
    let mut hasher = Sha256::new();
    for p in parts {
        let sectors = if p.name == crate::layout::Partition::State.name() {
            "-".to_owned()
        } else {
            p.sectors.to_string()
        };
        hasher.update(
            format!(
                "{} {} {} {}\n",
                p.name,
                p.type_guid.to_ascii_uppercase(),
                p.first_lba,
                sectors
            )
            .as_bytes(),
        );
    }
    hex::encode(hasher.finalize())
}

/// A version from a spec or a manifest: semver, as `1.2.3` or `1.2.3-rc.1`.
pub fn parse_version(text: &str) -> Result<semver::Version, semver::Error> {
    semver::Version::parse(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let root_hash = "ab".repeat(32);
        Manifest {
            format: FORMAT,
            version: semver::Version::new(1, 2, 3),
            root_hash: root_hash.clone(),
            verity: VerityParams {
                salt: "01ff".into(),
                data_blocks: 100,
                hash_offset: 100 * 4096,
            },
            cmdline: format!(
                "console=ttyS0 basalt.verity.root={root_hash} basalt.verity.salt=01ff basalt.verity.blocks=100"
            ),
            parts: vec![
                Part {
                    name: ROOT.into(),
                    size: 103 * 4096,
                    sha256: "11".repeat(32),
                },
                Part {
                    name: KERNEL.into(),
                    size: 5000,
                    sha256: "22".repeat(32),
                },
                Part {
                    name: INITRD.into(),
                    size: 7000,
                    sha256: "33".repeat(32),
                },
            ],
            compat: Compat {
                layout: "cd".repeat(32),
                slot_size: 1 << 20,
            },
        }
    }

    #[test]
    fn json_round_trips_and_has_the_contract_field_names() {
        let m = sample();
        let json = m.to_json();
        assert_eq!(Manifest::parse(&json).expect("parse"), m);
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["version"], "1.2.3");
        assert_eq!(value["verity"]["hash_offset"], 409600);
        assert_eq!(value["parts"][1]["name"], "vmlinuz");
        assert_eq!(value["compat"]["slot_size"], 1 << 20);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = fn(&mut Manifest);
        let cases: &[(Edit, &str)] = &[
            (|m| m.format = 2, "format 2"),
            (|m| m.root_hash = "AB".repeat(32), "root_hash"),
            (|m| m.verity.salt = "1".into(), "verity.salt"),
            (|m| m.verity.hash_offset += 1, "verity.hash_offset"),
            (|m| m.parts.swap(1, 2), "expected [\"root.img\""),
            (|m| m.parts.truncate(2), "parts are"),
            (|m| m.parts[2].sha256 = "x".into(), "parts[].sha256"),
            (|m| m.parts[0].size = 100 * 4096, "parts[root.img].size"),
            (|m| m.parts[0].size = 103 * 4096 + 1, "parts[root.img].size"),
            (|m| m.compat.slot_size = 4096 * 50, "larger than the slot"),
            (|m| m.compat.layout = "x".into(), "compat.layout"),
            (
                |m| m.cmdline.push_str(" basalt.slot=a"),
                "must not name the slot",
            ),
            (|m| m.cmdline.push_str(" x='y'"), "quote"),
            (
                |m| m.cmdline = m.cmdline.replace("blocks=100", "blocks=99"),
                "differ",
            ),
            (
                |m| m.cmdline = m.cmdline.replace(" basalt.verity.salt=01ff", ""),
                "basalt.verity.salt",
            ),
        ];
        for (edit, needle) in cases {
            let mut m = sample();
            edit(&mut m);
            let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }

    #[test]
    fn version_must_be_semver() {
        let json = String::from_utf8(sample().to_json())
            .expect("utf-8")
            .replace("\"1.2.3\"", "\"1.2\"");
        let err = Manifest::parse(json.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("bundle manifest"), "{err}");
        assert!(parse_version("1.2").is_err());
        assert!(parse_version("1.10.0").expect("v") > parse_version("1.9.9").expect("v"));
        assert!(parse_version("2.0.0-rc.1").expect("v") < parse_version("2.0.0").expect("v"));
    }

    #[test]
    fn slot_cfg_sets_the_whole_command_line() {
        let m = sample();
        let cfg = m.slot_cfg(Slot::B);
        let line = cfg.lines().last().expect("line");
        assert_eq!(
            line,
            format!("set basalt_args='{} basalt.slot=b'", m.cmdline)
        );
        let params = BootParams::parse(&m.slot_cmdline(Slot::B)).expect("params");
        assert_eq!(params.slot, Slot::B);
        assert_eq!(slot_dir(Slot::B), "boot/b");
    }

    #[test]
    fn identity_round_trips_and_checks_its_format() {
        let id = sample().identity();
        assert_eq!(Identity::parse(&id.to_json()).expect("parse"), id);
        let mut other = id.clone();
        other.format = 7;
        let err = Identity::parse(&other.to_json()).unwrap_err().to_string();
        assert!(err.contains("image identity: format 7"), "{err}");
    }

    #[test]
    fn layout_id_ignores_state_size_but_not_other_sizes() {
        let parts = |state: u64, root: u64| {
            layout_id([
                LayoutPart {
                    name: "ROOT-A",
                    type_guid: crate::layout::type_guid::LINUX_ROOT_X86_64,
                    first_lba: 2048,
                    sectors: root,
                },
                LayoutPart {
                    name: "STATE",
                    type_guid: crate::layout::type_guid::LINUX_FS,
                    first_lba: 4096,
                    sectors: state,
                },
            ])
        };
        assert_eq!(parts(10, 2048), parts(99999, 2048));
        assert_ne!(parts(10, 2048), parts(10, 2049));
        assert_eq!(parts(10, 2048).len(), 64);
    }
}
