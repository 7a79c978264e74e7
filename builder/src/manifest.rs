//! `manifest.json`: every input with its sha256 and origin, every output with its
//! sha256, the partition table, the root hash and the kernel command lines.

use crate::cache::Resolved;
use crate::disk::Layout;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Manifest {
    pub basalt_version: String,
    pub name: String,
    pub spec: String,
    pub kernel_version: String,
    pub k3s_version: String,
    pub inputs: Vec<Resolved>,
    pub basalt_init: InitInfo,
    pub initramfs_modules: Vec<String>,
    pub root_hash: String,
    pub verity: VerityManifest,
    /// Kernel command line per slot.
    pub cmdline: BTreeMap<String, String>,
    /// sha256 of each file written into the ESP, by path.
    pub esp_files: BTreeMap<String, String>,
    pub layout: Layout,
    pub outputs: Vec<Output>,
    pub build_seconds: f64,
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
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}
