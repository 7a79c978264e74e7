//! Steps 3 and 4: the Debian packages unpacked (kernel, GRUB, CA certificates), and the
//! initramfs (basalt-init with the storage and dm-verity modules stage 1 loads).

use super::{BuildError, Ctx};
use crate::store;
use crate::{deb, initramfs, kmod};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Debian inputs that are unpacked, each into its own store entry.
const UNPACKED: [&str; 4] = ["kernel", "grub-bios", "grub-efi", "ca-certificates"];

/// The unpacked packages and the kernel found in them.
pub struct Kernel {
    /// Each of [`UNPACKED`] by input name.
    pub unpacked: BTreeMap<&'static str, PathBuf>,
    pub version: String,
    /// `lib/modules/<version>` of the kernel package.
    pub moddir: PathBuf,
    pub vmlinuz: PathBuf,
    pub reused: bool,
}

pub fn unpack(ctx: &Ctx) -> Result<Kernel, BuildError> {
    let mut reused = true;
    let mut unpacked = BTreeMap::new();
    for name in UNPACKED {
        let input = &ctx.inputs[name];
        let (dir, was) = ctx.store.get_or_make("unpacked", &input.sha256, |dir| {
            deb::unpack(&input.path, dir).map_err(BuildError::from)
        })?;
        reused &= was;
        unpacked.insert(name, dir);
    }
    let kernel_dir = &unpacked["kernel"];
    let version = kernel_version(kernel_dir).map_err(BuildError::Kernel)?;
    let moddir = kernel_dir.join("lib/modules").join(&version);
    let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{version}"));
    Ok(Kernel {
        unpacked,
        version,
        moddir,
        vmlinuz,
        reused,
    })
}

/// The initramfs and the module graph it was cut from (the root needs it too).
pub struct Initramfs {
    pub path: PathBuf,
    /// The modules in it, in load order.
    pub modules: Vec<String>,
    pub graph: kmod::ModuleGraph,
    pub reused: bool,
}

pub fn initramfs(ctx: &Ctx, kernel: &Kernel) -> Result<Initramfs, BuildError> {
    let graph = kmod::ModuleGraph::load(&kernel.moddir)?;
    let closure = graph.closure(&ctx.spec.spec.kernel.initramfs_modules)?;
    let modules: Vec<String> = closure.iter().map(|m| m.name.clone()).collect();
    let key = store::key(
        "initramfs",
        &[
            &ctx.inputs["kernel"].sha256,
            &ctx.init.sha256,
            &modules.join(","),
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (dir, reused) = ctx.store.get_or_make("initramfs", &key, |dir| {
        initramfs::write(
            &initramfs::tree(&ctx.init.path, &kernel.version, &kernel.moddir, &closure),
            &dir.join("initrd.img"),
        )
        .map_err(BuildError::from)
    })?;
    Ok(Initramfs {
        path: dir.join("initrd.img"),
        modules,
        graph,
        reused,
    })
}

fn kernel_version(unpacked: &Path) -> std::io::Result<String> {
    let mut kvers: Vec<String> = std::fs::read_dir(unpacked.join("lib/modules"))?
        .flatten()
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kvers.sort();
    match kvers.as_slice() {
        [one]
            if unpacked
                .join("boot")
                .join(format!("vmlinuz-{one}"))
                .is_file() =>
        {
            Ok(one.clone())
        }
        _ => Err(std::io::Error::other(format!(
            "expected one kernel with its vmlinuz, found {kvers:?}"
        ))),
    }
}
