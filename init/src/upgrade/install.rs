//! Receiving a bundle: the tar is read as it arrives, never held whole. `manifest.json`
//! first (refused before any write if it does not fit this node), then `root.img`
//! straight into the inactive ROOT partition and the kernel and initramfs into temp files
//! in `/boot/<slot>/` on the ESP, each part and the whole body hashed on the way. At the
//! end: the whole bundle's sha256 against the one the client sent, each part's against
//! the manifest, the written slot read back and checked against the verity root hash.
//! Only then are the boot files renamed into place (`slot.cfg` last), the upgrade
//! recorded on STATE, and `next_entry` set in GRUB's environment. Nothing of the running
//! slot is written; a bundle refused at any point leaves GRUB's environment as it was.

use super::esp::{Esp, EspError, FILES};
use super::record::{self, Pending, Record, RecordError, SlotRecord};
use super::refuse::{self, Refusal};
use super::verity::{self, VerityError};
use basalt_api::bootparams::Slot;
use basalt_api::bundle::{BundleError, Identity, Manifest, INITRD, KERNEL, MANIFEST, ROOT};
use basalt_api::grubenv::NEXT_ENTRY;
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// `manifest.json` is a few hundred bytes; more is not a manifest.
const MANIFEST_MAX: u64 = 64 * 1024;
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("the bundle: {0}")]
    Bundle(String),
    #[error("bundle manifest")]
    Manifest(#[source] BundleError),
    #[error(
        "the bundle is truncated: {got} of the {expected} bytes announced arrived \
         (nothing was switched)"
    )]
    Truncated { got: u64, expected: u64 },
    #[error("the bundle's sha256 is {got}, not the expected {expected} (nothing was switched)")]
    Sha256 { expected: String, got: String },
    #[error("{part}: sha256 is {got}, the manifest says {expected} (nothing was switched)")]
    PartSha256 {
        part: &'static str,
        expected: String,
        got: String,
    },
    #[error("the written slot failed its verity check (nothing was switched)")]
    Verity(#[source] VerityError),
    #[error("this node's image identity ({path})")]
    Identity {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("receive the bundle")]
    Receive(#[source] io::Error),
    #[error("write {what} {dev}")]
    Write {
        what: &'static str,
        dev: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("find the disks: {0}")]
    Locate(String),
    #[error(transparent)]
    Esp(#[from] EspError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Fetch(#[from] super::fetch::FetchError),
}

impl InstallError {
    /// The HTTP status that answers it: 409 for the node's state, 400 for the bundle,
    /// 500 for the node's own failures.
    pub fn status(&self) -> u16 {
        match self {
            InstallError::Refused(Refusal::Pending(_)) => 409,
            InstallError::Refused(_)
            | InstallError::Bundle(_)
            | InstallError::Manifest(_)
            | InstallError::Truncated { .. }
            | InstallError::Sha256 { .. }
            | InstallError::PartSha256 { .. }
            | InstallError::Verity(_) => 400,
            InstallError::Receive(_) => 400,
            InstallError::Identity { .. }
            | InstallError::Locate(_)
            | InstallError::Write { .. }
            | InstallError::Esp(_)
            | InstallError::Record(_) => 500,
            InstallError::Fetch(e) => e.status(),
        }
    }
}

/// Where an upgrade writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The inactive slot.
    pub slot: Slot,
    /// Its ROOT partition (a file in tests) and that partition's size in bytes.
    pub slot_dev: PathBuf,
    pub slot_name: String,
    pub slot_bytes: u64,
    /// The ESP partition (a FAT image in tests).
    pub esp_dev: PathBuf,
    /// `/` (STATE's record is under it).
    pub root: PathBuf,
}

/// What the request says besides the body.
#[derive(Debug, Clone)]
pub struct Options {
    /// sha256 of the whole bundle, lowercase hex.
    pub sha256: String,
    pub allow_downgrade: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub slot: Slot,
    pub version: String,
    pub root_hash: String,
}

/// The body as it arrives, hashed and counted; a body that ends before its announced
/// length is an `UnexpectedEof` error to whatever reads it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    count: Rc<Cell<u64>>,
    length: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && self.count.get() < self.length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended before Content-Length",
            ));
        }
        self.hash.update(&buf[..n]);
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Copies `from` to `to`, hashing; returns the sha256 and the byte count.
fn copy_hashing(from: &mut dyn Read, to: &mut dyn Write) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let got = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..got]);
        to.write_all(&buf[..got])?;
        n += got as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Reads the running image's identity from its root.
pub fn identity(root: &Path) -> Result<Identity, InstallError> {
    let path = root.join(basalt_api::bundle::IDENTITY_PATH);
    let bytes = std::fs::read(&path).map_err(|source| InstallError::Identity {
        path: path.clone(),
        source,
    })?;
    Identity::parse(&bytes).map_err(|e| InstallError::Identity {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })
}

/// Checks that the node may take an upgrade now (before the body is read).
pub fn precheck(booted: &str, t: &Target) -> Result<(), InstallError> {
    let env = Esp::open(&t.esp_dev)?.read_env()?;
    let rec = record::load(&t.root)?;
    refuse::idle(booted, &env, &rec)?;
    Ok(())
}

/// The sha256 the request expects of the whole bundle, lowercase.
pub fn expected_sha256(opts: &Options) -> Result<String, InstallError> {
    let expected = opts.sha256.to_ascii_lowercase();
    if expected.len() != 64 || hex::decode(&expected).is_err() {
        return Err(InstallError::Bundle(
            "the expected sha256 of the bundle (sha256=) must be 64 hex digits".into(),
        ));
    }
    Ok(expected)
}

/// Receives the bundle from `body` (`length` bytes announced) into `t`. See the module.
pub fn install(
    body: &mut dyn Read,
    length: u64,
    opts: &Options,
    booted: &str,
    running: &Identity,
    t: &Target,
) -> Result<Installed, InstallError> {
    let expected = expected_sha256(opts)?;
    precheck(booted, t)?;
    let slot = t.slot.as_str();
    let mut esp = Esp::open(&t.esp_dev)?;
    let result = receive(body, length, &expected, opts, running, t, &mut esp);
    if result.is_err() {
        // Temp files of an unfinished upgrade; the slot's own files stay as they were
        // (they are not bootable without their slot, which no longer matches them, but
        // nothing points at it either).
        let _ = esp.remove_temps(slot);
    }
    let (m, cfg) = result?;
    for (name, temp) in &FILES[..2] {
        esp.put_in_place(slot, temp, name)?;
    }
    esp.write_temp(slot, FILES[2].1, |w| w.write_all(cfg.as_bytes()))?;
    esp.put_in_place(slot, FILES[2].1, FILES[2].0)?;

    // Recorded before it is armed, so that every later boot knows what the slot holds.
    let mut rec = record::load(&t.root)?;
    let pending = Pending {
        slot: slot.to_owned(),
        version: m.version.to_string(),
        root_hash: m.root_hash.clone(),
        at: record::now(),
        armed: false,
    };
    rec.pending = Some(pending);
    record::save(&t.root, &rec)?;
    // A test's power cut between the write and the arming (testd feature only).
    #[cfg(feature = "testd")]
    crate::testd::upgrade_stall(&t.root, "armed-before");
    let mut env = esp.read_env()?;
    env.set(NEXT_ENTRY, slot)
        .map_err(|e| InstallError::Bundle(e.to_string()))?;
    esp.write_env(&env)?;
    if let Some(p) = rec.pending.as_mut() {
        p.armed = true;
    }
    record::save(&t.root, &rec)?;
    Ok(Installed {
        slot: t.slot,
        version: m.version.to_string(),
        root_hash: m.root_hash,
    })
}

/// Everything up to the verified slot and its boot files in temp files; returns the
/// manifest and the slot's `slot.cfg`.
fn receive(
    body: &mut dyn Read,
    length: u64,
    expected: &str,
    opts: &Options,
    running: &Identity,
    t: &Target,
    esp: &mut Esp,
) -> Result<(Manifest, String), InstallError> {
    let seen = Rc::new(Cell::new(0u64));
    let mut hashing = Hashing {
        inner: body.take(length),
        hash: Sha256::new(),
        count: Rc::clone(&seen),
        length,
    };
    let read_error = |e: io::Error| classify(e, &seen, length, InstallError::Receive);
    let mut part_sums: Vec<(&'static str, String)> = Vec::new();
    let manifest;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut entries = archive.entries().map_err(read_error)?;
        let mut next = |want: &'static str| -> Result<tar::Entry<'_, _>, InstallError> {
            let entry = entries
                .next()
                .ok_or_else(|| InstallError::Bundle(format!("the tar ends before {want}")))?
                .map_err(read_error)?;
            let path = entry.path().map_err(read_error)?;
            if path.to_str() != Some(want) {
                return Err(InstallError::Bundle(format!(
                    "entry {} where {want} should be (manifest.json, root.img, vmlinuz, \
                     initrd.img in that order)",
                    path.display()
                )));
            }
            Ok(entry)
        };
        // 1. The manifest, and every refusal that needs it, before any write.
        let mut entry = next(MANIFEST)?;
        if entry.size() > MANIFEST_MAX {
            return Err(InstallError::Bundle(format!(
                "{MANIFEST} is {} bytes, more than {MANIFEST_MAX}",
                entry.size()
            )));
        }
        let mut json = Vec::new();
        entry.read_to_end(&mut json).map_err(read_error)?;
        let m = Manifest::parse(&json).map_err(InstallError::Manifest)?;
        refuse::check(
            &m,
            running,
            (&t.slot_name, t.slot_bytes),
            opts.allow_downgrade,
        )?;
        let size_of = |name| m.part(name).map_or(0, |p| p.size);

        // 2. root.img into the partition; first the record says the slot holds nothing
        // good any more.
        let mut entry = next(ROOT)?;
        check_size(ROOT, entry.size(), size_of(ROOT))?;
        forget_slot(&t.root, t.slot.as_str())?;
        let mut dev = File::options()
            .write(true)
            .open(&t.slot_dev)
            .map_err(write_error("slot", &t.slot_dev))?;
        let (sum, n) = copy_hashing(&mut entry, &mut dev)
            .map_err(|e| classify(e, &seen, length, write_error("slot", &t.slot_dev)))?;
        check_size(ROOT, n, size_of(ROOT))?;
        dev.sync_all().map_err(write_error("slot", &t.slot_dev))?;
        drop(dev);
        part_sums.push((ROOT, sum));

        // 3, 4. The kernel and the initramfs into temp files on the ESP.
        for (part, (_, temp)) in [KERNEL, INITRD].into_iter().zip(FILES) {
            let mut entry = next(part)?;
            check_size(part, entry.size(), size_of(part))?;
            let mut got = None;
            esp.write_temp(t.slot.as_str(), temp, |w| {
                got = Some(copy_hashing(&mut entry, w)?);
                Ok(())
            })
            .map_err(|e| match e {
                EspError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
                    InstallError::Truncated {
                        got: seen.get(),
                        expected: length,
                    }
                }
                e => InstallError::Esp(e),
            })?;
            let (sum, n) = got.unwrap_or_default();
            check_size(part, n, size_of(part))?;
            part_sums.push((part, sum));
        }
        if let Some(extra) = entries.next() {
            let name = extra
                .ok()
                .and_then(|e| e.path().ok().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "?".into());
            return Err(InstallError::Bundle(format!(
                "an entry after initrd.img: {name}"
            )));
        }
        manifest = m;
    }
    // The tar's end blocks and anything else up to Content-Length, hashed too.
    io::copy(&mut hashing, &mut io::sink()).map_err(read_error)?;
    if seen.get() != length {
        return Err(InstallError::Truncated {
            got: seen.get(),
            expected: length,
        });
    }
    let got = hex::encode(hashing.hash.finalize());
    if got != expected {
        return Err(InstallError::Sha256 {
            expected: expected.to_owned(),
            got,
        });
    }
    for (part, sum) in part_sums {
        let want = manifest
            .part(part)
            .map(|p| p.sha256.clone())
            .unwrap_or_default();
        if sum != want {
            return Err(InstallError::PartSha256 {
                part,
                expected: want,
                got: sum,
            });
        }
    }
    verify_slot(&t.slot_dev, &manifest)?;
    let cfg = manifest.slot_cfg(t.slot);
    Ok((manifest, cfg))
}

/// Reads the written slot back from the device (not the page cache) and checks it.
fn verify_slot(dev: &Path, m: &Manifest) -> Result<(), InstallError> {
    let mut f = File::open(dev).map_err(write_error("slot", dev))?;
    // Drop what the page cache holds of it, so the check reads what the disk has.
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    f.seek(SeekFrom::Start(0))
        .map_err(write_error("slot", dev))?;
    verity::check(
        &mut f,
        &verity::Params {
            root_hash: m.root_hash.clone(),
            salt: m.verity.salt.clone(),
            data_blocks: m.verity.data_blocks,
            hash_offset: m.verity.hash_offset,
        },
    )
    .map_err(InstallError::Verity)
}

/// The slot is about to be overwritten: it holds no good image from now on.
fn forget_slot(root: &Path, slot: &str) -> Result<(), InstallError> {
    let mut rec: Record = record::load(root)?;
    rec.slots.insert(
        slot.to_owned(),
        SlotRecord {
            version: None,
            root_hash: None,
            good: false,
            failed: false,
        },
    );
    record::save(root, &rec)?;
    Ok(())
}

fn check_size(part: &'static str, got: u64, want: u64) -> Result<(), InstallError> {
    if got != want {
        return Err(InstallError::Bundle(format!(
            "{part} is {got} bytes, the manifest says {want}"
        )));
    }
    Ok(())
}

/// A short body shows as an unexpected end wherever it is read: a truncated bundle.
fn classify(
    e: io::Error,
    seen: &Cell<u64>,
    length: u64,
    otherwise: impl FnOnce(io::Error) -> InstallError,
) -> InstallError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        InstallError::Truncated {
            got: seen.get(),
            expected: length,
        }
    } else {
        otherwise(e)
    }
}

fn write_error(what: &'static str, dev: &Path) -> impl Fn(io::Error) -> InstallError {
    let dev = dev.to_path_buf();
    move |source| InstallError::Write {
        what,
        dev: dev.clone(),
        source,
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::upgrade::esp;
    use basalt_api::bundle::{Compat, Part, VerityParams, FORMAT};
    use basalt_api::grubenv::SAVED_ENTRY;

    const SLOT_BYTES: u64 = 1 << 20;
    const LAYOUT: &str = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A bundle's parts and manifest, to be edited before [`Parts::tar`].
    pub struct Parts {
        pub manifest: Manifest,
        pub root: Vec<u8>,
        pub kernel: Vec<u8>,
        pub initrd: Vec<u8>,
    }

    impl Parts {
        pub fn new(version: &str) -> Parts {
            let (root, p) = verity::tests::slot(40, &[0, 0xff]);
            let kernel = b"kernel of version ".repeat(300);
            let initrd = format!("initrd {version}").repeat(500).into_bytes();
            let manifest = Manifest {
                format: FORMAT,
                version: version.parse().expect("semver"),
                root_hash: p.root_hash.clone(),
                verity: VerityParams {
                    salt: p.salt.clone(),
                    data_blocks: p.data_blocks,
                    hash_offset: p.hash_offset,
                },
                cmdline: format!(
                    "console=ttyS0 panic=10 basalt.verity.root={} basalt.verity.salt={} basalt.verity.blocks={}",
                    p.root_hash, p.salt, p.data_blocks
                ),
                parts: vec![],
                compat: Compat {
                    layout: LAYOUT.into(),
                    slot_size: SLOT_BYTES,
                },
            };
            let mut parts = Parts {
                manifest,
                root,
                kernel,
                initrd,
            };
            parts.sum();
            parts
        }

        /// The manifest's parts from the bytes as they are now.
        pub fn sum(&mut self) {
            self.manifest.parts = [
                (ROOT, &self.root),
                (KERNEL, &self.kernel),
                (INITRD, &self.initrd),
            ]
            .iter()
            .map(|(n, b)| Part {
                name: (*n).into(),
                size: b.len() as u64,
                sha256: sha(b),
            })
            .collect();
        }

        pub fn tar(&self) -> Vec<u8> {
            let mut b = tar::Builder::new(Vec::new());
            let json = self.manifest.to_json();
            for (name, bytes) in [
                (MANIFEST, &json),
                (ROOT, &self.root),
                (KERNEL, &self.kernel),
                (INITRD, &self.initrd),
            ] {
                let mut h = tar::Header::new_ustar();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, name, bytes.as_slice())
                    .expect("append");
            }
            b.into_inner().expect("tar")
        }
    }

    /// A node in a folder: its identity, STATE's folder, slot B as a file, the ESP as a
    /// FAT image with `saved_entry=a`.
    pub struct Node {
        pub dir: tempfile::TempDir,
        pub target: Target,
    }

    impl Node {
        pub fn new(version: &str) -> Node {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            let id = Parts::new(version).manifest.identity();
            let idp = root.join(basalt_api::bundle::IDENTITY_PATH);
            std::fs::create_dir_all(idp.parent().expect("parent")).expect("mkdir");
            std::fs::write(&idp, id.to_json()).expect("identity");
            std::fs::create_dir_all(root.join("var/lib/basalt")).expect("state");
            let slot_dev = root.join("slot-b.img");
            std::fs::write(&slot_dev, vec![0u8; SLOT_BYTES as usize]).expect("slot");
            let esp_dev = root.join("esp.img");
            esp::test_image(&esp_dev, &[(SAVED_ENTRY, "a")]);
            Node {
                target: Target {
                    slot: Slot::B,
                    slot_dev,
                    slot_name: "ROOT-B (vda4)".into(),
                    slot_bytes: SLOT_BYTES,
                    esp_dev,
                    root: root.to_path_buf(),
                },
                dir,
            }
        }

        pub fn install(
            &self,
            bundle: &[u8],
            sha: &str,
            allow_downgrade: bool,
        ) -> Result<Installed, InstallError> {
            self.install_body(bundle, bundle.len() as u64, sha, allow_downgrade)
        }

        pub fn install_body(
            &self,
            body: &[u8],
            length: u64,
            sha: &str,
            allow_downgrade: bool,
        ) -> Result<Installed, InstallError> {
            let running = identity(&self.target.root).expect("identity");
            install(
                &mut &body[..],
                length,
                &Options {
                    sha256: sha.into(),
                    allow_downgrade,
                },
                "a",
                &running,
                &self.target,
            )
        }

        pub fn env(&self) -> basalt_api::grubenv::GrubEnv {
            Esp::open(&self.target.esp_dev)
                .expect("esp")
                .read_env()
                .expect("env")
        }

        pub fn file(&self, path: &str) -> Option<Vec<u8>> {
            Esp::open(&self.target.esp_dev)
                .expect("esp")
                .read_file(path)
                .expect("read")
        }

        pub fn slot(&self) -> Vec<u8> {
            std::fs::read(&self.target.slot_dev).expect("slot")
        }

        /// Nothing switched: GRUB's env as built, no boot files of slot B, no temps.
        pub fn assert_untouched(&self) {
            let env = self.env();
            assert_eq!(env.get(SAVED_ENTRY), Some("a"));
            assert_eq!(env.get(NEXT_ENTRY), None);
            for (name, temp) in FILES {
                assert_eq!(self.file(&format!("boot/b/{name}")), None, "{name}");
                assert_eq!(self.file(&format!("boot/b/{temp}")), None, "{temp}");
            }
            assert_eq!(
                self.file("boot/a/slot.cfg").as_deref(),
                Some(&b"set basalt_args=a"[..]),
                "the running slot's files are untouched"
            );
            assert_eq!(record::load(&self.target.root).expect("rec").pending, None);
        }
    }

    #[test]
    fn a_good_bundle_is_written_verified_and_armed_once() {
        let node = Node::new("1.0.0");
        let parts = Parts::new("2.0.0");
        let bundle = parts.tar();
        let done = node
            .install(&bundle, &sha(&bundle), false)
            .expect("installed");
        assert_eq!(
            done,
            Installed {
                slot: Slot::B,
                version: "2.0.0".into(),
                root_hash: parts.manifest.root_hash.clone()
            }
        );
        assert_eq!(&node.slot()[..parts.root.len()], &parts.root[..]);
        assert_eq!(node.file("boot/b/vmlinuz"), Some(parts.kernel.clone()));
        assert_eq!(node.file("boot/b/initrd.img"), Some(parts.initrd.clone()));
        let cfg = String::from_utf8(node.file("boot/b/slot.cfg").expect("cfg")).expect("utf8");
        assert!(cfg.contains("basalt.slot=b'"), "{cfg}");
        assert!(cfg.contains(&parts.manifest.root_hash), "{cfg}");
        for (_, temp) in FILES {
            assert_eq!(node.file(&format!("boot/b/{temp}")), None);
        }
        let env = node.env();
        assert_eq!(
            env.get(SAVED_ENTRY),
            Some("a"),
            "the default stays the old slot"
        );
        assert_eq!(env.get(NEXT_ENTRY), Some("b"));
        let rec = record::load(&node.target.root).expect("rec");
        let p = rec.pending.expect("pending");
        assert_eq!(
            (p.slot.as_str(), p.version.as_str(), p.armed),
            ("b", "2.0.0", true)
        );

        // A second one while this one is pending.
        let again = Parts::new("3.0.0").tar();
        let err = node.install(&again, &sha(&again), false).unwrap_err();
        assert_eq!(err.status(), 409, "{err}");
        assert!(err.to_string().contains("already pending"), "{err}");
    }

    #[test]
    fn a_bundle_whose_sha256_differs_is_refused_and_nothing_is_switched() {
        let node = Node::new("1.0.0");
        let bundle = Parts::new("2.0.0").tar();
        let mut tampered = bundle.clone();
        // A byte of the kernel, whose sha256 in the manifest then no longer holds either.
        let at = bundle.len() / 2;
        tampered[at] ^= 1;
        let err = node.install(&tampered, &sha(&bundle), false).unwrap_err();
        assert!(matches!(err, InstallError::Sha256 { .. }), "{err}");
        assert_eq!(err.status(), 400);
        node.assert_untouched();
        // The same tampered bundle with its own sha256: the part's sum catches it.
        let err = node.install(&tampered, &sha(&tampered), false).unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::PartSha256 { .. } | InstallError::Bundle(_)
            ),
            "{err}"
        );
        node.assert_untouched();
    }

    #[test]
    fn a_truncated_bundle_is_refused_and_nothing_is_switched() {
        let node = Node::new("1.0.0");
        let bundle = Parts::new("2.0.0").tar();
        for cut in [100, 5000, bundle.len() - 3000, bundle.len() - 1] {
            let err = node
                .install_body(&bundle[..cut], bundle.len() as u64, &sha(&bundle), false)
                .unwrap_err();
            assert!(
                matches!(err, InstallError::Truncated { got, expected } if got == cut as u64 && expected == bundle.len() as u64),
                "cut at {cut}: {err}"
            );
            node.assert_untouched();
        }
    }

    #[test]
    fn a_flipped_byte_in_root_img_is_refused_before_the_switch() {
        let node = Node::new("1.0.0");
        let mut parts = Parts::new("2.0.0");
        parts.root[4096 * 7 + 100] ^= 0x20;
        // The attacker (or a broken builder) fixed every sha256: only verity can tell.
        parts.sum();
        let bundle = parts.tar();
        let err = node.install(&bundle, &sha(&bundle), false).unwrap_err();
        assert!(matches!(err, InstallError::Verity(_)), "{err}");
        assert!(
            crate::pid1::console::chain(&err).contains("root hash"),
            "{}",
            crate::pid1::console::chain(&err)
        );
        node.assert_untouched();
        assert!(
            !record::load(&node.target.root).expect("rec").slots["b"].good,
            "the overwritten slot is not good"
        );
    }

    #[test]
    fn another_layout_or_an_older_version_is_refused_before_any_write() {
        let node = Node::new("1.5.0");
        let mut parts = Parts::new("2.0.0");
        parts.manifest.compat.layout = "ee".repeat(32);
        let bundle = parts.tar();
        let err = node.install(&bundle, &sha(&bundle), false).unwrap_err();
        assert!(
            matches!(err, InstallError::Refused(Refusal::Layout { .. })),
            "{err}"
        );
        assert!(
            node.slot().iter().all(|&b| b == 0),
            "nothing written to the slot"
        );
        node.assert_untouched();

        let older = Parts::new("1.4.9").tar();
        let err = node.install(&older, &sha(&older), false).unwrap_err();
        assert!(
            matches!(err, InstallError::Refused(Refusal::Downgrade { .. })),
            "{err}"
        );
        assert!(node.slot().iter().all(|&b| b == 0));
        node.assert_untouched();
        node.install(&older, &sha(&older), true).expect("allowed");
        assert_eq!(node.env().get(NEXT_ENTRY), Some("b"));
    }

    #[test]
    fn the_expected_sha256_and_the_entry_order_are_required() {
        let node = Node::new("1.0.0");
        let bundle = Parts::new("2.0.0").tar();
        let err = node.install(&bundle, "xyz", false).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_cksum();
        b.append_data(&mut h, "root.img", &b"abc"[..])
            .expect("append");
        let wrong = b.into_inner().expect("tar");
        let err = node.install(&wrong, &sha(&wrong), false).unwrap_err();
        assert!(
            err.to_string().contains("where manifest.json should be"),
            "{err}"
        );
        node.assert_untouched();
    }
}
