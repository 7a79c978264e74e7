//! `[provider.qemu]` of `pool.toml`.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::{DEFAULT_CPUS, DEFAULT_MEMORY_MIB};

/// `[provider.qemu]` in `pool.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuSettings {
    /// Image files, or directories whose `*.raw` files are images: one path or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub images: Vec<PathBuf>,
    /// Where the VMs' directories and the controller lock live (created if missing).
    pub state_dir: PathBuf,
    /// Guest memory per VM (default 1024).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Guest CPUs per VM (default 2).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// `bios` (the default, SeaBIOS) or `uefi` (OVMF).
    #[serde(default)]
    pub firmware: Option<FirmwareSetting>,
}

/// How the VMs boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareSetting {
    #[default]
    Bios,
    Uefi,
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

fn default_cpus() -> u32 {
    DEFAULT_CPUS
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(path)) => Ok(vec![path]),
        Ok(OneOrMany::Many(paths)) => Ok(paths),
        Err(_) => Err(serde::de::Error::custom(
            "images: expected a path or a list of paths",
        )),
    }
}
