//! The one error of `basalt build`: a variant per failing step, carrying the file or
//! input it concerns; the cause is its source.

use crate::spec::INPUT_NAMES;
use crate::{cache, deb, disk, esp, grub, initbuild, initramfs, kmod, lock, rootfs};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Lock(Box<lock::LockError>),
    #[error("--input {0}: unknown input (known: {known}, basalt-init, basalt-stage1)", known = INPUT_NAMES.join(", "))]
    UnknownInput(String),
    #[error(transparent)]
    Fetch(#[from] cache::FetchError),
    #[error("basalt-init")]
    Init(#[from] initbuild::InitBuildError),
    #[error(transparent)]
    TimeFloor(#[from] basalt_api::time_floor::TimeFloorError),
    #[error(transparent)]
    Deb(#[from] deb::DebError),
    #[error("kernel package")]
    Kernel(#[source] std::io::Error),
    #[error("kernel modules")]
    Kmod(#[from] kmod::KmodError),
    #[error("initramfs")]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("root filesystem")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("root filesystem tree")]
    Tree(#[from] crate::tree::CopyError),
    #[error("CA certificates from the ca-certificates package")]
    Certs(#[source] std::io::Error),
    #[error("root filesystem is {size} bytes with its hash tree; ROOT partitions hold {room} (raise disk.root_mib)")]
    RootTooLarge { size: u64, room: u64 },
    #[error(transparent)]
    Grub(#[from] grub::GrubError),
    #[error("EFI system partition")]
    Esp(#[from] esp::EspError),
    #[error("STATE filesystem: {0}")]
    State(String),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("upgrade bundle")]
    Bundle(#[from] crate::bundle::BundleError),
    #[error("qcow2 output {0}: {1}")]
    Qcow2(PathBuf, String),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("build files")]
    Io(#[from] std::io::Error),
}

impl From<lock::LockError> for BuildError {
    fn from(e: lock::LockError) -> Self {
        BuildError::Lock(Box::new(e))
    }
}
