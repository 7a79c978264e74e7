//! Steps 3 and 4: the Debian packages unpacked (kernel, GRUB, CA certificates), the
//! initramfs (basalt-stage1 with the storage and dm-verity modules stage 1 loads), and the
//! module tree the root ships (the spec's `[kernel] modules`, closed over dependencies).

use super::{BuildError, Ctx};
use crate::store;
use crate::{deb, initramfs, kmod};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Debian inputs that are unpacked, each into its own store entry.
const UNPACKED: [&str; 4] = ["kernel", "grub-bios", "grub-efi", "ca-certificates"];

/// The unpacked packages and the kernel found in them.
#[derive(Clone)]
pub struct Kernel {
    /// Each of [`UNPACKED`] by input name.
    pub unpacked: BTreeMap<&'static str, PathBuf>,
    pub version: String,
    /// `lib/modules/<version>` of the kernel package.
    pub moddir: PathBuf,
    pub vmlinuz: PathBuf,
    pub reused: bool,
}

/// Unpacks the packages side by side (each is one decompression on one core; the kernel's
/// is the largest), each into its own store entry.
pub fn unpack(ctx: &Ctx) -> Result<Kernel, BuildError> {
    let mut reused = true;
    let mut unpacked = BTreeMap::new();
    let results: Vec<_> = std::thread::scope(|s| {
        let running: Vec<_> = UNPACKED
            .iter()
            .map(|&name| {
                s.spawn(move || {
                    let input = &ctx.inputs[name];
                    ctx.store.get_or_make("unpacked", &input.sha256, |dir| {
                        deb::unpack(&input.path, dir).map_err(BuildError::from)
                    })
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for (name, result) in UNPACKED.into_iter().zip(results) {
        let (dir, was) = result?;
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
    let closure = graph.select(
        "kernel.initramfs_modules",
        &ctx.spec.spec.kernel.initramfs_modules,
    )?;
    let modules: Vec<String> = closure.iter().map(|m| m.name.clone()).collect();
    let key = store::key(
        "initramfs",
        &[
            &ctx.inputs["kernel"].sha256,
            &ctx.stage1.sha256,
            &modules.join(","),
            // Since stage 1 loads in parallel: the initramfs carries a modules.dep.
            "modules.dep",
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (dir, reused) = ctx.store.get_or_make("initramfs", &key, |dir| {
        let dep = graph.subset(&closure).depmod_files()?.dep;
        initramfs::write(
            &initramfs::tree(
                &ctx.stage1.path,
                &kernel.version,
                &kernel.moddir,
                &closure,
                &dep,
            ),
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

/// The part of the kernel's module tree the root ships.
pub struct RootModules {
    /// A `lib/modules/<version>` holding only the shipped modules (hard links into the
    /// unpacked package where the store allows), `modules.builtin` and a filtered
    /// `modules.order`; the index files are rendered from [`RootModules::graph`].
    pub moddir: PathBuf,
    /// The graph of the shipped modules alone.
    pub graph: kmod::ModuleGraph,
    /// The shipped modules by name, dependencies first.
    pub modules: Vec<String>,
    pub reused: bool,
}

/// Where the root's module list comes from, for error messages.
const MODULES_KEY: &str = "kernel.modules";

/// The spec's `[kernel] modules`, or [`kmod::DEFAULT_MODULES`], with the initramfs's
/// modules (stage 2 coldplugs their devices again and must find them), closed over
/// dependencies and soft dependencies.
pub fn root_modules(
    ctx: &Ctx,
    kernel: &Kernel,
    initramfs: &Initramfs,
) -> Result<RootModules, BuildError> {
    let mut wanted: Vec<String> = match &ctx.spec.spec.kernel.modules {
        Some(list) => list.clone(),
        None => kmod::DEFAULT_MODULES
            .iter()
            .map(|m| m.to_string())
            .collect(),
    };
    wanted.extend(initramfs.modules.iter().cloned());
    let graph = &initramfs.graph;
    let shipped = graph.select(MODULES_KEY, &wanted)?;
    let modules: Vec<String> = shipped.iter().map(|m| m.name.clone()).collect();
    let key = store::key(
        "modules",
        &[
            &ctx.inputs["kernel"].sha256,
            &modules.join(","),
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (dir, reused) = ctx.store.get_or_make("modules", &key, |dir| {
        stage_modules(&kernel.moddir, &shipped, dir).map_err(BuildError::from)
    })?;
    Ok(RootModules {
        moddir: dir.join("lib/modules").join(&kernel.version),
        graph: graph.subset(&shipped),
        modules,
        reused,
    })
}

/// Lays out `dir/lib/modules/<version>` with the shipped module files (hard-linked from
/// the unpacked package, copied where linking fails), `modules.builtin` and
/// `modules.builtin.modinfo` as they are, and `modules.order` cut to the shipped modules.
fn stage_modules(moddir: &Path, shipped: &[&kmod::Module], dir: &Path) -> std::io::Result<()> {
    let version = moddir
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: no version", moddir.display())))?;
    let out = dir.join("lib/modules").join(version);
    std::fs::create_dir_all(&out)?;
    for m in shipped {
        let (from, to) = (moddir.join(&m.rel_path), out.join(&m.rel_path));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
    }
    for name in ["modules.builtin", "modules.builtin.modinfo"] {
        let from = moddir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name))?;
        }
    }
    if let Ok(order) = std::fs::read_to_string(moddir.join("modules.order")) {
        let paths: std::collections::BTreeSet<String> = shipped
            .iter()
            .map(|m| m.rel_path.to_string_lossy().into_owned())
            .collect();
        let kept: String = order
            .lines()
            .filter(|l| paths.contains(*l))
            .map(|l| format!("{l}\n"))
            .collect();
        let path = out.join("modules.order");
        std::fs::write(&path, kept)?;
        // Written here, so its mode would follow the umask: set it as the package ships it,
        // or two builds under different umasks differ (e2e/tests/reproducible.rs).
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    Ok(())
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
