//! `manifest.json`: every input with its sha256 and origin, every output with its
//! sha256 (the disk in its forms and the upgrade bundle), the partition table, the root
//! hash and the kernel command lines.

use crate::cache::Resolved;
use crate::disk::Layout;
use crate::progress::StepTiming;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Manifest {
    pub basalt_version: String,
    pub name: String,
    /// The spec's `version` (semver), as in os-release VERSION_ID and the bundle.
    pub version: String,
    /// The partition layout id and slot size upgrade bundles must match
    /// (as `/usr/lib/basalt/image.json` on the root has them).
    pub compat: basalt_api::bundle::Compat,
    pub spec: String,
    pub spec_sha256: String,
    /// sha256 of the lock file the build used, if any.
    pub lock_sha256: Option<String>,
    pub kernel_version: String,
    pub k3s_version: String,
    pub inputs: Vec<Resolved>,
    /// basalt-init: the root's `/sbin/init`.
    pub basalt_init: InitInfo,
    /// The initramfs's `/init`: basalt-stage1 (stage 1 alone), or basalt-init itself when
    /// the build was given `--input basalt-init=PATH` without `--input basalt-stage1=PATH`.
    pub basalt_stage1: InitInfo,
    pub initramfs_modules: Vec<String>,
    /// The kernel modules the root ships under `/lib/modules/<kernel_version>`: the spec's
    /// `[kernel] modules` (or the builder's default) closed over their dependencies.
    pub modules: Vec<String>,
    pub root_hash: String,
    pub verity: VerityManifest,
    /// Kernel command line per slot.
    pub cmdline: BTreeMap<String, String>,
    /// sha256 of each file written into the ESP, by path.
    pub esp_files: BTreeMap<String, String>,
    pub layout: Layout,
    pub sizes: Sizes,
    pub outputs: Vec<Output>,
    /// Wall time of each step, and whether its result was reused from the cache.
    pub steps: Vec<StepTiming>,
    pub build_seconds: f64,
}

/// Sizes in bytes of the disk as written and as uploaded.
#[derive(Debug, Serialize)]
pub struct Sizes {
    /// The raw disk's logical size (what a VM sees).
    pub raw_logical: u64,
    /// Blocks the sparse raw file really occupies.
    pub raw_allocated: u64,
    pub qcow2: u64,
    /// `.raw.zst`, what an upload transfers.
    pub raw_zst: u64,
}

impl Sizes {
    pub fn measure(raw: &Path, qcow2: &Path, zst: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let raw_meta = std::fs::metadata(raw)?;
        Ok(Sizes {
            raw_logical: raw_meta.len(),
            raw_allocated: raw_meta.blocks() * 512,
            qcow2: std::fs::metadata(qcow2)?.len(),
            raw_zst: std::fs::metadata(zst)?.len(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct InitInfo {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct VerityManifest {
    pub salt: String,
    pub data_blocks: u64,
    /// Byte offset of the verity superblock inside ROOT-A (what `veritysetup --hash-offset` takes).
    pub hash_offset: u64,
    pub squashfs_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub file: String,
    pub sha256: String,
    /// Logical size in bytes.
    pub size: u64,
}

pub fn output(name: &str, path: &Path) -> std::io::Result<Output> {
    let (sha256, size) = crate::cache::hash_file(path)?;
    Ok(Output {
        file: name.into(),
        sha256,
        size,
    })
}

impl Manifest {
    pub fn with_timings(mut self, steps: Vec<StepTiming>, seconds: f64) -> Self {
        self.steps = steps;
        self.build_seconds = seconds;
        self
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}
