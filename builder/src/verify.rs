//! `basalt verify`: checks a built image offline, without root and without booting it:
//! both GPT copies, each root slot's dm-verity tree against the root hash that slot's boot
//! entry gives the kernel, and the ESP's files against the build's `manifest.json`.
//!
//! The tree is recomputed here rather than trusted, so a mismatch can name the partition
//! and the data or hash block; `veritysetup verify` is the oracle in the tests.

use crate::image::VeritySuperblock;
use crate::image::{self, DiskImage, Fat, Gpt, GptCopy, GptPartition, ImageError};
use crate::inspect;
use basalt_api::bootparams::{Verity, VERITY_BLOCK_SIZE};
use basalt_api::gpt::{Header, ENTRY_SIZE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const BS: usize = VERITY_BLOCK_SIZE as usize;
const DIGEST: usize = 32;
const PER_BLOCK: u64 = (BS / DIGEST) as u64;
/// Problems listed per check; the rest are only counted.
const SHOWN: usize = 8;
/// Data blocks read per step when hashing a root.
const CHUNK_BLOCKS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("read manifest {0}")]
    Manifest(PathBuf, #[source] io::Error),
    #[error("parse manifest {0}")]
    ManifestJson(PathBuf, #[source] serde_json::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Skipped,
    Warning,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub status: Status,
    /// What was checked: "primary GPT", "backup GPT", "GPT copies", "ROOT-A (slot a)", "EFI".
    pub subject: String,
    /// What was found; for a failure, one entry per problem.
    pub details: Vec<String>,
}

impl Check {
    fn new(status: Status, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            status,
            subject: subject.into(),
            details: vec![detail.into()],
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Failed => "FAIL",
            Status::Skipped => "skip",
            Status::Warning => "warn",
        };
        write!(
            f,
            "{status:<4}  {}: {}",
            self.subject,
            self.details.join("; ")
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Failed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

/// Checks `image` (.raw or .qcow2). `manifest` defaults to `manifest.json` beside the
/// image; when that one is missing the ESP check is skipped with a warning. Errors are
/// for what stops every check (the image or a named manifest cannot be read); anything
/// found wrong is a failed check in the report.
pub fn verify(image: &Path, manifest: Option<&Path>) -> Result<Report, VerifyError> {
    let manifest = load_manifest(image, manifest)?;
    let img = DiskImage::open(image)?;
    let mut checks = vec![];
    match check_gpt(&img, &mut checks) {
        Some(parts) => checks.extend(check_boot(&img, &parts, &manifest)),
        None => checks.push(Check::new(
            Status::Failed,
            "partitions",
            "no valid GPT copy to find them by",
        )),
    }
    Ok(Report {
        image: image.into(),
        checks,
    })
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Both GPT copies, then whether they agree. Returns the partitions of a good copy.
fn check_gpt(img: &DiskImage, checks: &mut Vec<Check>) -> Option<Vec<GptPartition>> {
    let last = img.sectors().0.saturating_sub(1);
    let primary = gpt_copy(img, GptCopy::Primary, (1, last), checks);
    let backup = gpt_copy(img, GptCopy::Backup, (last, 1), checks);
    if let (Some(p), Some(b)) = (&primary, &backup) {
        checks.push(compare_copies(p, b));
    }
    primary.or(backup).map(|g| g.partitions)
}

fn gpt_copy(
    img: &DiskImage,
    copy: GptCopy,
    (my, alternate): (u64, u64),
    checks: &mut Vec<Check>,
) -> Option<Gpt> {
    let subject = format!("{copy} GPT");
    let gpt = match img.gpt(copy) {
        Ok(g) => g,
        Err(ImageError::Gpt { lba, fault, .. }) => {
            checks.push(Check::new(
                Status::Failed,
                subject,
                format!("LBA {lba}: {fault}"),
            ));
            return None;
        }
        Err(e) => {
            checks.push(Check::new(Status::Failed, subject, chain(&e)));
            return None;
        }
    };
    // The reader refused a header that is not where it says it is (`Misplaced`).
    let h = &gpt.header;
    let mut problems = Problems::default();
    if h.alternate_lba != alternate {
        let other = h.alternate_lba;
        problems.push(format!(
            "header points at the other copy at LBA {other}, not {alternate}"
        ));
    }
    let array_end = h.entries_lba + h.entries_sectors();
    let array_in_use = array_end > h.first_usable && h.entries_lba <= h.last_usable;
    if h.entries_lba < 2 || array_in_use || (h.entries_lba..array_end).contains(&my) {
        let at = h.entries_lba;
        problems.push(format!(
            "entry array at LBA {at} overlaps the header or the usable area"
        ));
    }
    for p in &gpt.partitions {
        let end = p.first_lba.0 + p.sectors.0;
        if p.first_lba.0 < h.first_usable || end > h.last_usable + 1 || p.sectors.0 == 0 {
            let (n, name) = (p.number, &p.name);
            problems.push(format!(
                "partition {n} ({name}) lies outside the usable area"
            ));
        }
    }
    let n = gpt.partitions.len();
    checks.push(problems.into_check(subject, || {
        format!("header at LBA {my}, {n} partitions; signature and CRC32s match")
    }));
    Some(gpt)
}

fn compare_copies(p: &Gpt, b: &Gpt) -> Check {
    let mut problems = Problems::default();
    if p.entries != b.entries {
        let (x, y) = (p.entries.chunks(ENTRY_SIZE), b.entries.chunks(ENTRY_SIZE));
        let first = x.zip(y).position(|(x, y)| x != y).map_or(0, |i| i + 1);
        problems.push(format!(
            "partition entry {first} differs between the copies"
        ));
    }
    let key = |h: &Header| {
        let usable = (h.first_usable, h.last_usable);
        (h.disk_guid, usable, h.num_entries)
    };
    if key(&p.header) != key(&b.header) {
        problems.push("headers disagree on disk GUID, usable area or entry array size".into());
    }
    problems.into_check("GPT copies".into(), || {
        "primary and backup are identical".into()
    })
}

/// The root slots against their boot entries, then the ESP against the manifest.
fn check_boot(img: &DiskImage, parts: &[GptPartition], manifest: &ManifestFiles) -> Vec<Check> {
    let fat = match image::find(img, parts, inspect::ESP).and_then(|p| img.fat(p)) {
        Ok(f) => f,
        Err(e) => return vec![Check::new(Status::Failed, inspect::ESP, chain(&e))],
    };
    let mut checks = vec![];
    match inspect::boot_config(img, &fat) {
        Ok(config) => {
            let slots = config.slots;
            for part in parts.iter().filter(|p| p.name.starts_with("ROOT-")) {
                let slot = slots
                    .iter()
                    .find(|s| s.params.slot.partition_name() == part.name);
                let unconfigured = config
                    .unconfigured
                    .iter()
                    .find(|e| format!("ROOT-{}", e.id.to_uppercase()) == part.name);
                checks.push(match (slot, unconfigured) {
                    (Some(s), _) => check_slot(img, part, s.params.slot.as_str(), &s.params.verity),
                    (None, Some(e)) => Check::new(
                        Status::Skipped,
                        format!("{} (slot {})", part.name, e.id),
                        format!(
                            "not populated: no {} on the ESP (written by an upgrade)",
                            e.slot_cfg.as_deref().unwrap_or("slot.cfg")
                        ),
                    ),
                    (None, None) => Check::new(
                        Status::Warning,
                        &part.name,
                        "no boot entry in grub.cfg; not checked",
                    ),
                });
            }
            for s in &slots {
                let name = s.params.slot.partition_name();
                if !parts.iter().any(|p| p.name == name) {
                    let why = format!(
                        "boot entry {} boots it, but the GPT has no such partition",
                        s.entry.id
                    );
                    checks.push(Check::new(Status::Failed, name, why));
                }
            }
        }
        Err(e) => checks.push(Check::new(Status::Failed, "boot entries", chain(&e))),
    }
    checks.push(check_esp(&fat, manifest));
    checks
}

fn check_slot(img: &DiskImage, part: &GptPartition, slot: &str, v: &Verity) -> Check {
    let subject = format!("{} (slot {slot})", part.name);
    let tree = img
        .partition_reader(part)
        .map_err(|e| chain(&e))
        .and_then(|mut r| verity_tree(&mut r, part.size(), v).map_err(|e| format!("read: {e}")));
    match tree {
        Err(e) => Check::new(Status::Failed, subject, e),
        Ok(Tree::NotPopulated) => Check::new(
            Status::Skipped,
            subject,
            format!(
                "not populated (no dm-verity superblock at block {})",
                v.data_blocks
            ),
        ),
        Ok(Tree::Checked(p)) => p.into_check(subject, || {
            let (n, root) = (v.data_blocks, &v.root_hash);
            format!("dm-verity: {n} data blocks match root hash {root}")
        }),
    }
}

/// The first few problems and how many there were.
#[derive(Debug, Default)]
pub struct Problems {
    pub shown: Vec<String>,
    pub total: u64,
}

impl Problems {
    fn push(&mut self, p: String) {
        if self.shown.len() < SHOWN {
            self.shown.push(p);
        }
        self.total += 1;
    }

    /// Failed with the problems, else passed with `ok()`.
    fn into_check(self, subject: String, ok: impl FnOnce() -> String) -> Check {
        if self.total == 0 {
            return Check::new(Status::Ok, subject, ok());
        }
        Check {
            status: Status::Failed,
            subject,
            details: self.into_details(),
        }
    }

    fn into_details(mut self) -> Vec<String> {
        let more = self.total - self.shown.len() as u64;
        if more > 0 {
            self.shown.push(format!("and {more} more"));
        }
        self.shown
    }
}

#[derive(Debug)]
pub enum Tree {
    /// No superblock where the command line says the hash area starts.
    NotPopulated,
    Checked(Problems),
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Hash blocks per level, top level first (as on disk).
fn level_blocks(data_blocks: u64) -> Vec<u64> {
    let mut levels = vec![];
    let mut n = data_blocks;
    loop {
        n = n.div_ceil(PER_BLOCK).max(1);
        levels.push(n);
        if n == 1 {
            levels.reverse();
            return levels;
        }
    }
}

/// Recomputes the dm-verity tree of a partition (`dev`, `len` bytes) laid out as
/// `verity::append` and veritysetup write it, and compares it with the root hash `v`
/// from the command line. Block numbers in problems count 4096-byte blocks from the
/// partition's start.
pub fn verity_tree<D: Read + Seek>(dev: &mut D, len: u64, v: &Verity) -> io::Result<Tree> {
    let bad = |what| io::Error::new(io::ErrorKind::InvalidData, what);
    let salt = hex::decode(&v.salt).map_err(|_| bad("salt is not hex"))?;
    let root = hex::decode(&v.root_hash).map_err(|_| bad("root hash is not hex"))?;
    let n = v.data_blocks;
    let mut problems = Problems::default();
    let levels = level_blocks(n);
    let hash_blocks: u64 = levels.iter().sum();
    if (n + 1 + hash_blocks) * VERITY_BLOCK_SIZE > len {
        problems.push(format!(
            "{n} data blocks and their hash tree do not fit in the partition's {len} bytes"
        ));
        return Ok(Tree::Checked(problems));
    }
    let mut block = vec![0u8; BS];
    dev.seek(SeekFrom::Start(n * VERITY_BLOCK_SIZE))?;
    dev.read_exact(&mut block)?;
    let Some(sb) = VeritySuperblock::parse(&block) else {
        return Ok(Tree::NotPopulated);
    };
    check_superblock(&sb, n, &salt, &mut problems);
    let mut hash = vec![0u8; (hash_blocks as usize) * BS];
    dev.read_exact(&mut hash)?;
    let level0 = check_hash_levels(&hash, &levels, n, &salt, &root, &mut problems);
    check_data(dev, n, level0, &salt, &mut problems)?;
    Ok(Tree::Checked(problems))
}

fn check_superblock(sb: &VeritySuperblock, n: u64, salt: &[u8], problems: &mut Problems) {
    let describe = |format: u32, alg: &str, sizes: (u32, u32), blocks: u64, salt: &[u8]| {
        let salt = hex::encode(salt);
        format!("format {format}, {alg}, {sizes:?}-byte blocks, {blocks} data blocks, salt {salt}")
    };
    let sizes = (sb.data_block_size, sb.hash_block_size);
    let got = describe(sb.hash_type, &sb.algorithm, sizes, sb.data_blocks, &sb.salt);
    let want = describe(1, "sha256", (BS as u32, BS as u32), n, salt);
    if got != want {
        problems.push(format!(
            "superblock at block {n} ({got}) disagrees with the command line ({want})"
        ));
    }
}

/// Checks the top block against the root hash, each lower hash block against its digest
/// in the level above, and that digest areas are zero-padded. Returns level 0 and the
/// number of its first block.
fn check_hash_levels<'a>(
    hash: &'a [u8],
    levels: &[u64],
    n: u64,
    salt: &[u8],
    root: &[u8],
    problems: &mut Problems,
) -> (&'a [u8], u64) {
    let first_hash_block = n + 1;
    let mut starts = vec![0u64];
    for l in levels {
        starts.push(starts[starts.len() - 1] + l);
    }
    let level = |i: usize| &hash[starts[i] as usize * BS..starts[i + 1] as usize * BS];
    let depth = levels.len();
    let name = |i: usize| format!("level {}", depth - 1 - i);
    if salted(salt, level(0)) != root {
        problems.push(format!(
            "hash block {first_hash_block} (top, {}) does not match the root hash on the kernel command line",
            name(0)
        ));
    }
    for i in 0..depth {
        let children = levels.get(i + 1).copied().unwrap_or(n) as usize;
        let digests = level(i);
        for (b, blk) in digests.chunks(BS).enumerate() {
            let used = children
                .saturating_sub(b * PER_BLOCK as usize)
                .min(PER_BLOCK as usize);
            if blk[used * DIGEST..].iter().any(|&x| x != 0) {
                let at = first_hash_block + starts[i] + b as u64;
                problems.push(format!(
                    "hash block {at} ({}): bytes after its digests are not zero",
                    name(i)
                ));
            }
        }
        if i + 1 == depth {
            continue;
        }
        for (j, child) in level(i + 1).chunks(BS).enumerate() {
            if salted(salt, child) != digests[j * DIGEST..(j + 1) * DIGEST] {
                let at = first_hash_block + starts[i + 1] + j as u64;
                let parent = first_hash_block + starts[i] + j as u64 / PER_BLOCK;
                problems.push(format!(
                    "hash block {at} ({}) does not match its digest in hash block {parent}",
                    name(i + 1)
                ));
            }
        }
    }
    (level(depth - 1), first_hash_block + starts[depth - 1])
}

/// Hashes every data block and compares it with its digest in level 0.
fn check_data<D: Read + Seek>(
    dev: &mut D,
    n: u64,
    (level0, level0_start): (&[u8], u64),
    salt: &[u8],
    problems: &mut Problems,
) -> io::Result<()> {
    dev.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK_BLOCKS * BS];
    let mut j = 0u64;
    while j < n {
        let count = (n - j).min(CHUNK_BLOCKS as u64) as usize;
        dev.read_exact(&mut buf[..count * BS])?;
        for blk in buf[..count * BS].chunks(BS) {
            let at = j as usize * DIGEST;
            if salted(salt, blk) != level0[at..at + DIGEST] {
                problems.push(format!(
                    "data block {j} (byte {}) does not match its digest in hash block {}",
                    j * VERITY_BLOCK_SIZE,
                    level0_start + j / PER_BLOCK
                ));
            }
            j += 1;
        }
    }
    Ok(())
}

/// What the manifest says about the ESP.
#[derive(Debug)]
enum ManifestFiles {
    Loaded {
        path: PathBuf,
        files: BTreeMap<String, String>,
    },
    /// The default manifest path has no file.
    Missing(PathBuf),
    /// A manifest without `esp_files` (written before the builder recorded them).
    NoEspFiles(PathBuf),
}

#[derive(Deserialize)]
struct ManifestView {
    esp_files: Option<BTreeMap<String, String>>,
}

fn load_manifest(image: &Path, explicit: Option<&Path>) -> Result<ManifestFiles, VerifyError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => image.with_file_name("manifest.json"),
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok(ManifestFiles::Missing(path))
        }
        Err(e) => return Err(VerifyError::Manifest(path, e)),
    };
    let view: ManifestView =
        serde_json::from_slice(&text).map_err(|e| VerifyError::ManifestJson(path.clone(), e))?;
    Ok(match view.esp_files {
        Some(files) => ManifestFiles::Loaded { path, files },
        None => ManifestFiles::NoEspFiles(path),
    })
}

/// Every file the manifest lists has its sha256; the ESP holds no other file.
fn check_esp(fat: &Fat, manifest: &ManifestFiles) -> Check {
    let subject = inspect::ESP;
    let (path, files) = match manifest {
        ManifestFiles::Loaded { path, files } => (path, files),
        ManifestFiles::Missing(p) => {
            let why = format!("no manifest at {}; ESP files not checked", p.display());
            return Check::new(Status::Warning, subject, why);
        }
        ManifestFiles::NoEspFiles(p) => {
            let why = format!("{} lists no esp_files; ESP files not checked", p.display());
            return Check::new(Status::Warning, subject, why);
        }
    };
    let mut problems = Problems::default();
    // The environment block is GRUB's and the node's to rewrite (a trial, a slot marked
    // good): it must be a block GRUB reads, not the bytes the builder wrote. A slot's
    // files that the manifest does not list were written by an upgrade.
    let mutable = |f: &str| f.eq_ignore_ascii_case(inspect::GRUBENV);
    let upgraded = |f: &str| {
        let f = f.to_ascii_lowercase();
        (f.starts_with("boot/a/") || f.starts_with("boot/b/"))
            && !files
                .keys()
                .any(|k| k.to_ascii_lowercase().starts_with(&f[..7]))
    };
    for (file, want) in files {
        match fat.read(file, None) {
            Ok(Some(bytes)) if mutable(file) => {
                if let Err(e) = basalt_api::grubenv::GrubEnv::parse(&bytes) {
                    problems.push(format!("{file}: {e}"));
                }
            }
            Ok(Some(bytes)) => {
                let got = hex::encode(Sha256::digest(&bytes));
                if &got != want {
                    problems.push(format!(
                        "{file}: sha256 {got} differs from the manifest's {want}"
                    ));
                }
            }
            Ok(None) => problems.push(format!("{file} is missing")),
            Err(e) => problems.push(chain(&e)),
        }
    }
    match fat.files() {
        Ok(found) => {
            for f in found
                .iter()
                .filter(|f| !files.keys().any(|k| k.eq_ignore_ascii_case(f)))
                .filter(|f| !upgraded(f))
            {
                problems.push(format!("{f} is not in the manifest"));
            }
        }
        Err(e) => problems.push(chain(&e)),
    }
    problems.into_check(subject.into(), || {
        format!("{} files match {}", files.len(), path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SALT: &[u8] = b"basalt-test-salt";

    /// `blocks` data blocks with distinct content, their tree, and the partition padded
    /// with `spare` zero blocks; the command-line parameters that go with it.
    fn device(blocks: usize, spare: usize) -> (Vec<u8>, Verity) {
        let mut data: Vec<u8> = (0..blocks * BS).map(|i| (i / BS + i % 7) as u8).collect();
        let mut dev = Cursor::new(std::mem::take(&mut data));
        let info =
            crate::verity::append(&mut dev, (blocks * BS) as u64, SALT, [7; 16]).expect("append");
        let mut bytes = dev.into_inner();
        bytes.resize(bytes.len() + spare * BS, 0);
        let v = Verity {
            root_hash: hex::encode(info.root_hash),
            salt: hex::encode(SALT),
            data_blocks: info.data_blocks,
        };
        (bytes, v)
    }

    fn problems(bytes: Vec<u8>, v: &Verity) -> Vec<String> {
        let len = bytes.len() as u64;
        match verity_tree(&mut Cursor::new(bytes), len, v).expect("tree") {
            Tree::Checked(p) => p.into_details(),
            Tree::NotPopulated => vec!["not populated".into()],
        }
    }

    #[test]
    fn level_counts_match_what_verity_writes() {
        for (blocks, hash_blocks) in [
            (1u64, 1u64),
            (128, 1),
            (129, 3),
            (128 * 128 + 1, 129 + 2 + 1),
        ] {
            let info = crate::verity::append(
                &mut Cursor::new(vec![0u8; blocks as usize * BS]),
                blocks * VERITY_BLOCK_SIZE,
                b"",
                [0; 16],
            )
            .expect("append");
            let sum: u64 = level_blocks(blocks).iter().sum();
            assert_eq!(sum, hash_blocks, "{blocks} data blocks");
            assert_eq!(
                (sum + 1) * VERITY_BLOCK_SIZE,
                info.hash_bytes,
                "{blocks} data blocks"
            );
        }
    }

    #[test]
    fn an_intact_tree_has_no_problems() {
        for blocks in [1, 5, 128, 300] {
            let (bytes, v) = device(blocks, 3);
            assert_eq!(problems(bytes, &v), Vec::<String>::new(), "{blocks} blocks");
        }
    }

    #[test]
    fn damage_is_named_by_block() {
        // 300 data blocks: superblock at 300, top level at 301, level 0 at 302..=304.
        let cases: [(usize, &str); 5] = [
            (
                5 * BS + 17,
                "data block 5 (byte 20480) does not match its digest in hash block 302",
            ),
            (
                299 * BS,
                "data block 299 (byte 1224704) does not match its digest in hash block 304",
            ),
            (
                303 * BS + 40,
                "hash block 303 (level 0) does not match its digest in hash block 301",
            ),
            (
                301 * BS,
                "hash block 301 (top, level 1) does not match the root hash",
            ),
            (
                304 * BS + 4095,
                "hash block 304 (level 0): bytes after its digests are not zero",
            ),
        ];
        for (at, want) in cases {
            let (mut bytes, v) = device(300, 0);
            bytes[at] ^= 0x01;
            let got = problems(bytes, &v);
            assert!(got.iter().any(|p| p.contains(want)), "byte {at}: {got:?}");
        }
    }

    #[test]
    fn a_wrong_root_hash_or_salt_is_reported() {
        let (bytes, mut v) = device(3, 0);
        v.root_hash = "00".repeat(32);
        let got = problems(bytes.clone(), &v);
        assert!(got[0].contains("does not match the root hash"), "{got:?}");
        let (_, mut v) = device(3, 0);
        v.salt = "ab".into();
        let got = problems(bytes, &v);
        assert!(got[0].contains("superblock at block 3"), "{got:?}");
    }

    #[test]
    fn many_problems_are_counted_not_all_listed() {
        let (mut bytes, v) = device(40, 0);
        for b in 0..40 {
            bytes[b * BS] ^= 0xff;
        }
        let got = problems(bytes, &v);
        assert_eq!(got.len(), SHOWN + 1);
        assert_eq!(got[SHOWN], format!("and {} more", 40 - SHOWN));
    }

    #[test]
    fn no_superblock_means_not_populated_and_too_small_is_a_problem() {
        let (_, v) = device(3, 0);
        let zeros = vec![0u8; 16 * BS];
        assert!(matches!(
            verity_tree(&mut Cursor::new(zeros), 16 * BS as u64, &v).expect("tree"),
            Tree::NotPopulated
        ));
        let got = problems(vec![0u8; 4 * BS], &v);
        assert!(got[0].contains("do not fit in the partition"), "{got:?}");
    }

    #[test]
    fn manifest_default_is_beside_the_image_and_may_be_missing() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("x.raw");
        let m = load_manifest(&img, None).expect("missing is fine");
        assert!(matches!(m, ManifestFiles::Missing(ref p) if p == &d.path().join("manifest.json")));
        let named = d.path().join("other.json");
        let err = load_manifest(&img, Some(&named)).unwrap_err();
        assert!(err.to_string().contains("other.json"), "{err}");
        std::fs::write(&named, r#"{"esp_files": {"boot/a/vmlinuz": "ab"}, "x": 1}"#)
            .expect("write");
        let m = load_manifest(&img, Some(&named)).expect("load");
        assert!(
            matches!(m, ManifestFiles::Loaded { ref files, .. } if files["boot/a/vmlinuz"] == "ab")
        );
        std::fs::write(&named, "{").expect("write");
        assert!(matches!(
            load_manifest(&img, Some(&named)),
            Err(VerifyError::ManifestJson(..))
        ));
    }

    #[test]
    fn report_fails_only_on_failed_checks() {
        let mut r = Report {
            image: "x.raw".into(),
            checks: vec![
                Check::new(Status::Ok, "primary GPT", "fine"),
                Check::new(Status::Skipped, "ROOT-B (slot b)", "not populated"),
                Check::new(Status::Warning, inspect::ESP, "no manifest"),
            ],
        };
        assert!(r.passed());
        r.checks.push(Check::new(
            Status::Failed,
            "ROOT-A (slot a)",
            "data block 3 …",
        ));
        assert!(!r.passed());
        assert!(r
            .to_string()
            .lines()
            .any(|l| l == "FAIL  ROOT-A (slot a): data block 3 …"));
    }
}
