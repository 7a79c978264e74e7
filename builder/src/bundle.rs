//! The upgrade bundle `<name>.bundle` (format in [`basalt_api::bundle`]): written by
//! `basalt build` next to the disk image, read back by `basalt inspect FILE.bundle`.
//!
//! The tar is reproducible bit for bit: POSIX ustar headers with mode 0644, uid and gid 0,
//! no user or group names, mtime 0, entries in the fixed order of the format.

use crate::disk::Layout;
use basalt_api::bootparams::{Verity, VERITY_BLOCK_SIZE};
use basalt_api::bundle::{self as api, Compat, LayoutPart, Manifest, Part, VerityParams};
use basalt_api::layout::Partition;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("write bundle {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("bundle {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: api::BundleError,
    },
    #[error("bundle {path}: not a tar, or cut off before entry {index}: {source}")]
    Tar {
        path: PathBuf,
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {path}: entry {index} is {found:?}, expected {expected}")]
    Order {
        path: PathBuf,
        index: usize,
        found: String,
        expected: &'static str,
    },
    #[error("bundle {path}: part {part} is missing (the bundle ends after {after})")]
    Missing {
        path: PathBuf,
        part: &'static str,
        after: String,
    },
    #[error("bundle {path}: part {part} is truncated: {got} of {want} bytes")]
    Truncated {
        path: PathBuf,
        part: &'static str,
        got: u64,
        want: u64,
    },
    #[error("bundle {path}: part {part} is {got} bytes in the tar, the manifest says {want}")]
    Size {
        path: PathBuf,
        part: &'static str,
        got: u64,
        want: u64,
    },
    #[error("bundle {path}: part {part} has sha256 {got}, the manifest says {want} (tampered or damaged)")]
    Sha256 {
        path: PathBuf,
        part: &'static str,
        got: String,
        want: String,
    },
    #[error("bundle {path}: an entry {found:?} follows the last part")]
    Extra { path: PathBuf, found: String },
}

/// The image's [`Compat`]: the layout id of its partition table and the size of a slot.
pub fn compat(layout: &Layout) -> Compat {
    let type_guids: Vec<String> = layout
        .partitions
        .iter()
        .map(|p| p.partition.type_guid().to_string())
        .collect();
    Compat {
        layout: api::layout_id(layout.partitions.iter().zip(&type_guids).map(|(p, t)| {
            LayoutPart {
                name: p.name,
                type_guid: t,
                first_lba: p.first_lba.0,
                sectors: p.sectors.0,
            }
        })),
        slot_size: layout.get(Partition::RootA).size(),
    }
}

/// The files of a bundle's parts, in [`api::PARTS`] order.
pub struct PartFiles<'a> {
    pub root: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

impl PartFiles<'_> {
    fn paths(&self) -> [(&'static str, &Path); 3] {
        [
            (api::ROOT, self.root),
            (api::KERNEL, self.kernel),
            (api::INITRD, self.initrd),
        ]
    }
}

/// The manifest of a bundle of `files`: each part hashed.
pub fn manifest(
    version: semver::Version,
    verity: &Verity,
    cmdline: &str,
    compat: Compat,
    files: &PartFiles<'_>,
) -> Result<Manifest, BundleError> {
    let mut parts = vec![];
    for (name, path) in files.paths() {
        let (sha256, size) =
            crate::cache::hash_file(path).map_err(|e| BundleError::Read(path.into(), e))?;
        parts.push(Part {
            name: name.into(),
            size,
            sha256,
        });
    }
    Ok(Manifest {
        format: api::FORMAT,
        version,
        root_hash: verity.root_hash.clone(),
        verity: VerityParams {
            salt: verity.salt.clone(),
            data_blocks: verity.data_blocks,
            hash_offset: verity.data_blocks * VERITY_BLOCK_SIZE,
        },
        cmdline: cmdline.into(),
        parts,
        compat,
    })
}

fn header(name: &str, size: u64) -> std::io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

/// Writes the bundle at `out`: the manifest (validated first), then each part.
pub fn write(out: &Path, manifest: &Manifest, files: &PartFiles<'_>) -> Result<(), BundleError> {
    manifest
        .validate()
        .map_err(|source| BundleError::Manifest {
            path: out.into(),
            source,
        })?;
    let werr = |e| BundleError::Write(out.into(), e);
    let file = std::fs::File::create(out).map_err(werr)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let json = manifest.to_json();
    tar.append(
        &header(api::MANIFEST, json.len() as u64).map_err(werr)?,
        json.as_slice(),
    )
    .map_err(werr)?;
    for ((name, path), part) in files.paths().into_iter().zip(&manifest.parts) {
        let f = std::fs::File::open(path).map_err(|e| BundleError::Read(path.into(), e))?;
        // The size the manifest was made with: a file that changed since is an error
        // (tar would otherwise write a header that lies).
        let len = f
            .metadata()
            .map_err(|e| BundleError::Read(path.into(), e))?
            .len();
        if len != part.size {
            return Err(BundleError::Read(
                path.into(),
                std::io::Error::other(format!(
                    "{name} changed while the bundle was written ({len} bytes, was {})",
                    part.size
                )),
            ));
        }
        tar.append(&header(name, part.size).map_err(werr)?, f)
            .map_err(werr)?;
    }
    let mut w = tar.into_inner().map_err(werr)?;
    w.flush().map_err(werr)?;
    w.into_inner()
        .map_err(|e| werr(e.into_error()))?
        .sync_all()
        .map_err(werr)
}

/// `basalt inspect FILE.bundle --json`. Field names are an interface: keep them stable.
#[derive(Debug, Clone, Serialize)]
pub struct BundleInfo {
    pub bundle: PathBuf,
    /// sha256 of the whole file (what `POST /v1/upgrade` is given).
    pub sha256: String,
    pub size: u64,
    pub manifest: Manifest,
    /// Each part, checked against the manifest: all of them matched, or inspect failed.
    pub parts_verified: Vec<String>,
}

/// Counts and hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Reads a bundle as a node streams it: the manifest first, then each part in order,
/// hashed; any difference from the manifest is an error naming the part.
pub fn inspect(path: &Path) -> Result<BundleInfo, BundleError> {
    let file = std::fs::File::open(path).map_err(|e| BundleError::Read(path.into(), e))?;
    let mut whole = Hashing {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        len: 0,
    };
    let manifest = {
        let mut archive = tar::Archive::new(&mut whole);
        read_entries(path, &mut archive)?
    };
    // The rest of the file (tar's end blocks) counts for the whole-file hash.
    std::io::copy(&mut whole, &mut std::io::sink())
        .map_err(|e| BundleError::Read(path.into(), e))?;
    Ok(BundleInfo {
        bundle: path.into(),
        sha256: hex::encode(whole.hasher.finalize()),
        size: whole.len,
        parts_verified: manifest.parts.iter().map(|p| p.name.clone()).collect(),
        manifest,
    })
}

fn read_entries<R: Read>(
    path: &Path,
    archive: &mut tar::Archive<R>,
) -> Result<Manifest, BundleError> {
    let tar_err = |index, source| BundleError::Tar {
        path: path.into(),
        index,
        source,
    };
    let mut entries = archive.entries().map_err(|e| tar_err(0, e))?;
    let names = std::iter::once(api::MANIFEST).chain(api::PARTS);
    let mut manifest: Option<Manifest> = None;
    let mut last = String::from("nothing");
    for (index, expected) in names.enumerate() {
        let mut entry = match entries.next() {
            Some(e) => e.map_err(|e| tar_err(index, e))?,
            None => {
                return Err(BundleError::Missing {
                    path: path.into(),
                    part: expected,
                    after: last,
                })
            }
        };
        let found = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if found != expected {
            return Err(BundleError::Order {
                path: path.into(),
                index,
                found,
                expected,
            });
        }
        let want = entry.header().size().map_err(|e| tar_err(index, e))?;
        let mut reader = Hashing {
            inner: &mut entry,
            hasher: Sha256::new(),
            len: 0,
        };
        let mut json = vec![];
        let copied = if index == 0 {
            reader.read_to_end(&mut json).map(|_| ())
        } else {
            std::io::copy(&mut reader, &mut std::io::sink()).map(|_| ())
        };
        let got = reader.len;
        if copied.is_err() || got < want {
            return Err(BundleError::Truncated {
                path: path.into(),
                part: expected,
                got,
                want,
            });
        }
        let sha = hex::encode(reader.hasher.finalize());
        if index == 0 {
            manifest = Some(
                Manifest::parse(&json).map_err(|source| BundleError::Manifest {
                    path: path.into(),
                    source,
                })?,
            );
        } else if let Some(part) = manifest.as_ref().and_then(|m| m.part(expected)) {
            if got != part.size {
                return Err(BundleError::Size {
                    path: path.into(),
                    part: expected,
                    got,
                    want: part.size,
                });
            }
            if sha != part.sha256 {
                return Err(BundleError::Sha256 {
                    path: path.into(),
                    part: expected,
                    got: sha,
                    want: part.sha256.clone(),
                });
            }
        }
        last = expected.to_string();
    }
    if let Some(extra) = entries.next() {
        let found = extra
            .ok()
            .and_then(|e| e.path().ok().map(|p| p.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "(unreadable)".into());
        return Err(BundleError::Extra {
            path: path.into(),
            found,
        });
    }
    // Validated by Manifest::parse at entry 0, which every path above passed.
    manifest.ok_or_else(|| BundleError::Missing {
        path: path.into(),
        part: api::MANIFEST,
        after: "nothing".into(),
    })
}

impl fmt::Display for BundleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "bundle   {}", self.bundle.display())?;
        writeln!(f, "sha256   {} ({} bytes)", self.sha256, self.size)?;
        writeln!(f, "version  {}", m.version)?;
        writeln!(f, "root     verity root hash {}", m.root_hash)?;
        writeln!(
            f,
            "         {} data blocks, hash tree at byte {}, salt {}",
            m.verity.data_blocks, m.verity.hash_offset, m.verity.salt
        )?;
        writeln!(f, "cmdline  {}", m.cmdline)?;
        writeln!(
            f,
            "compat   layout {}, slot {} bytes",
            m.compat.layout, m.compat.slot_size
        )?;
        writeln!(f, "\npart        {:>12}  sha256", "bytes")?;
        for p in &m.parts {
            writeln!(f, "{:<10}  {:>12}  {}  ok", p.name, p.size, p.sha256)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        manifest: Manifest,
    }

    impl Fixture {
        fn files(&self) -> PartFiles<'_> {
            PartFiles {
                root: self.path("root.img"),
                kernel: self.path("vmlinuz"),
                initrd: self.path("initrd.img"),
            }
        }
        fn path(&self, name: &str) -> &'static Path {
            Box::leak(self.dir.path().join(name).into_boxed_path())
        }
    }

    /// Parts with made-up bytes and a manifest whose verity fields are consistent.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_blocks = 3u64;
        let mut root = vec![0x5au8; ((data_blocks + 2) * VERITY_BLOCK_SIZE) as usize];
        root[100] = 1;
        std::fs::write(dir.path().join("root.img"), &root).expect("root");
        std::fs::write(dir.path().join("vmlinuz"), vec![7u8; 3000]).expect("kernel");
        std::fs::write(dir.path().join("initrd.img"), vec![9u8; 1500]).expect("initrd");
        let verity = Verity {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            data_blocks,
        };
        let cmdline = format!(
            "gpt console=ttyS0 basalt.verity.root={} basalt.verity.salt={} basalt.verity.blocks={data_blocks}",
            verity.root_hash, verity.salt
        );
        let compat = Compat {
            layout: "ef".repeat(32),
            slot_size: 1 << 20,
        };
        let mut f = Fixture {
            dir,
            manifest: Manifest {
                format: 0,
                version: semver::Version::new(0, 0, 0),
                root_hash: String::new(),
                verity: VerityParams {
                    salt: String::new(),
                    data_blocks: 0,
                    hash_offset: 0,
                },
                cmdline: String::new(),
                parts: vec![],
                compat: compat.clone(),
            },
        };
        f.manifest = manifest(
            semver::Version::new(1, 2, 3),
            &verity,
            &cmdline,
            compat,
            &f.files(),
        )
        .expect("manifest");
        f
    }

    #[test]
    fn a_bundle_reads_back_and_is_reproducible() {
        let f = fixture();
        let (a, b) = (f.dir.path().join("a.bundle"), f.dir.path().join("b.bundle"));
        write(&a, &f.manifest, &f.files()).expect("write a");
        write(&b, &f.manifest, &f.files()).expect("write b");
        let bytes = std::fs::read(&a).expect("read");
        assert_eq!(bytes, std::fs::read(&b).expect("read"));
        let info = inspect(&a).expect("inspect");
        assert_eq!(info.manifest, f.manifest);
        assert_eq!(info.sha256, crate::cache::sha256_hex(&bytes));
        assert_eq!(info.size, bytes.len() as u64);
        assert_eq!(info.parts_verified, api::PARTS);
        // Entry order and fixed metadata, read by the tar crate's own reader.
        let mut archive = tar::Archive::new(bytes.as_slice());
        let entries: Vec<(String, u32, u64, u64)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").display().to_string(),
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                    h.mtime().expect("mtime"),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["manifest.json", "root.img", "vmlinuz", "initrd.img"]
        );
        assert!(entries.iter().all(|e| (e.1, e.2, e.3) == (0o644, 0, 0)));
    }

    #[test]
    fn a_flipped_byte_names_its_part() {
        let f = fixture();
        let path = f.dir.path().join("x.bundle");
        write(&path, &f.manifest, &f.files()).expect("write");
        let mut bytes = std::fs::read(&path).expect("read");
        // The kernel's bytes are all 7: flip one of them.
        let at = bytes
            .windows(3000)
            .position(|w| w.iter().all(|&b| b == 7))
            .expect("kernel bytes");
        bytes[at + 1234] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("part vmlinuz has sha256"), "{err}");
        assert!(err.contains("x.bundle"), "{err}");
    }

    #[test]
    fn a_truncated_bundle_names_the_part_it_stops_in() {
        let f = fixture();
        let path = f.dir.path().join("t.bundle");
        write(&path, &f.manifest, &f.files()).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        // Cut inside root.img: after the manifest's header and data and root.img's header.
        let root_at = bytes
            .windows(512)
            .position(|w| w.iter().all(|&b| b == 0x5a))
            .expect("root bytes");
        std::fs::write(&path, &bytes[..root_at + 5000]).expect("cut");
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("root.img"), "{err}");
        assert!(
            err.contains("truncated") || err.contains("cut off"),
            "{err}"
        );
        // Cut between parts: the next part is missing.
        let init_hdr = bytes.len() - 1024 - 1536 - 512;
        std::fs::write(&path, &bytes[..init_hdr]).expect("cut");
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("initrd.img"), "{err}");
    }

    #[test]
    fn a_manifest_that_lies_about_a_size_is_refused() {
        let mut f = fixture();
        f.manifest.parts[2].size += 1;
        let path = f.dir.path().join("s.bundle");
        let err = write(&path, &f.manifest, &f.files()).unwrap_err();
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(err.to_string().contains("initrd.img"), "{err}");
        assert!(
            source
                .as_deref()
                .unwrap_or("")
                .contains("initrd.img changed"),
            "{source:?}"
        );
    }
}
