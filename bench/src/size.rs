//! `basalt bench size`: an image's logical and compressed (`.raw.zst`) size, broken down
//! by kernel, modules, K3s, basalt-init and everything else.
//!
//! The logical figures are exact (file sizes). How much of the `.raw.zst` each component
//! takes is an estimate, made the way each component is stored: root files by their
//! share of the root's stored blocks as [`content::squash`] recompresses them (small files in
//! shared fragments split by bytes), initramfs files by compressing each component alone with
//! zstd -19 and scaling to the real initramfs, ESP files by zstd at the `.raw.zst` level
//! alone. Already-compressed bytes then go through the `.raw.zst`'s zstd once more
//! (measured, not assumed). The remainder of the real `.raw.zst` is filesystem metadata,
//! the verity hash tree, GRUB's core image, the empty STATE and zeros.

use super::content::{self, ContentError, DefaultBoot, File, Squashed};
use basalt_builder::image::DiskImage;
use basalt_builder::rootfs::K3S_IMAGES;
use std::fmt;
use std::path::{Path, PathBuf};

/// The components a node image is made of, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Kernel,
    Modules,
    K3s,
    BasaltInit,
    OtherFiles,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Kernel,
        Component::Modules,
        Component::K3s,
        Component::BasaltInit,
        Component::OtherFiles,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Component::Kernel => "kernel",
            Component::Modules => "modules",
            Component::K3s => "K3s (binary + airgap images)",
            Component::BasaltInit => "basalt-init + basalt-stage1",
            Component::OtherFiles => "other files",
        }
    }
}

/// Which component a root filesystem file belongs to (path without a leading `/`).
pub fn classify_root(path: &str) -> Component {
    if path.starts_with("lib/modules/") {
        Component::Modules
    } else if path == "usr/local/bin/k3s" || path == K3S_IMAGES {
        Component::K3s
    } else if path == "sbin/init" {
        Component::BasaltInit
    } else {
        Component::OtherFiles
    }
}

/// Which component an initramfs file belongs to.
pub fn classify_initrd(path: &str) -> Component {
    if path.starts_with("lib/modules/") {
        Component::Modules
    } else if path == "init" {
        Component::BasaltInit
    } else {
        Component::OtherFiles
    }
}

/// Logical bytes and estimated `.raw.zst` bytes of each component.
#[derive(Debug, Clone)]
pub struct Breakdown {
    pub image: PathBuf,
    /// By [`Component::index`].
    pub logical: [u64; 5],
    pub compressed: [f64; 5],
    pub raw_logical: u64,
    /// The real `.raw.zst` beside the image, if there is one.
    pub raw_zst: Option<(PathBuf, u64)>,
    /// `bytes_used` of the image's root squashfs, and the data blocks as recompressed here.
    pub squashfs_bytes: u64,
    pub squashed_bytes: u64,
    /// Where the module and basalt-init bytes are: what the size work moves.
    pub parts: Parts,
}

/// The module files and the copies of basalt-init, where they are stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parts {
    /// `.ko` files under the root's `/lib/modules`, and their bytes.
    pub root_modules: (usize, u64),
    /// `.ko` files in the initramfs, and their bytes.
    pub initrd_modules: (usize, u64),
    /// Each copy of basalt-init: where, its bytes, and whether it still has a symbol table.
    pub init_copies: Vec<InitCopy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitCopy {
    pub place: &'static str,
    pub bytes: u64,
    pub symbols: bool,
}

impl Parts {
    /// From the root's and the initramfs's files.
    pub fn of(root: &[File], initrd: &[File]) -> Parts {
        let ko = |files: &[File]| {
            files
                .iter()
                .filter(|f| f.path.starts_with("lib/modules/") && f.path.ends_with(".ko"))
                .fold((0, 0), |(n, b), f| (n + 1, b + f.data.len() as u64))
        };
        let mut init_copies = vec![];
        for (place, files, path) in [
            ("root /sbin/init", root, "sbin/init"),
            ("initramfs /init", initrd, "init"),
        ] {
            if let Some(f) = files.iter().find(|f| f.path == path) {
                init_copies.push(InitCopy {
                    place,
                    bytes: f.data.len() as u64,
                    symbols: has_symbol_table(&f.data),
                });
            }
        }
        Parts {
            root_modules: ko(root),
            initrd_modules: ko(initrd),
            init_copies,
        }
    }
}

/// Whether an ELF file carries a `.symtab` section (what `strip` removes).
pub fn has_symbol_table(elf: &[u8]) -> bool {
    use object::{Object, ObjectSection};
    object::File::parse(elf)
        .map(|f| f.sections().any(|s| s.name() == Ok(".symtab")))
        .unwrap_or(false)
}

#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Image(#[from] basalt_builder::image::ImageError),
    #[error("{image}: {what}")]
    Measure {
        image: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The `.raw.zst` the build wrote beside `image` (`x.raw` or `x.qcow2` → `x.raw.zst`).
pub fn raw_zst_beside(image: &Path) -> Option<PathBuf> {
    let candidate = image.with_extension("raw.zst");
    candidate.is_file().then_some(candidate)
}

/// Reads the image and measures it; the root's recompression runs on `threads` threads.
pub fn measure(image: &Path, threads: usize) -> Result<Breakdown, SizeError> {
    let img = DiskImage::open(image)?;
    let boot = content::default_boot(&img)?;
    let root = content::root_files(&img, &boot.root_partition)?;
    let squashed = content::squash(&root, threads)?;
    breakdown(&img, &boot, &root, &squashed)
}

/// The breakdown from an already read and recompressed root.
pub fn breakdown(
    img: &DiskImage,
    boot: &DefaultBoot,
    root: &[File],
    squashed: &Squashed,
) -> Result<Breakdown, SizeError> {
    let err = |what| {
        move |source| SizeError::Measure {
            image: img.path().into(),
            what,
            source,
        }
    };
    let mut logical = [0u64; 5];
    let mut compressed = [0f64; 5];

    let blocks = squashed.blocks.iter().map(Vec::as_slice);
    let root_factor = ratio(
        content::zstd_size(blocks, basalt_builder::zst::LEVEL)
            .map_err(err("zstd of the root's blocks"))?,
        squashed.compressed_bytes(),
    );
    for (file, share) in root.iter().zip(&squashed.per_file) {
        let c = classify_root(&file.path).index();
        logical[c] += file.data.len() as u64;
        compressed[c] += share * root_factor;
    }

    let initrd = content::initramfs_files(&boot.initrd).map_err(err("initramfs"))?;
    add_initrd(boot, &initrd, &mut logical, &mut compressed).map_err(err("initramfs"))?;

    let same = |a: &str, b: &str| {
        a.trim_matches('/')
            .eq_ignore_ascii_case(b.trim_matches('/'))
    };
    for file in content::esp_files(img)? {
        if same(&file.path, &boot.initrd_path) {
            continue; // counted by its content above
        }
        let c = if same(&file.path, &boot.kernel_path) {
            Component::Kernel
        } else {
            Component::OtherFiles
        };
        logical[c.index()] += file.data.len() as u64;
        compressed[c.index()] +=
            content::zstd_size([file.data.as_slice()], basalt_builder::zst::LEVEL)
                .map_err(err("zstd of an ESP file"))? as f64;
    }

    let parts = img.table()?.partitions;
    let part = basalt_builder::image::find(img, &parts, &boot.root_partition)?;
    let superblock = img.read_vec(part.offset(), 48)?;
    let squashfs_bytes = u64::from_le_bytes(superblock[40..48].try_into().unwrap_or_default());
    let raw_zst = match raw_zst_beside(img.path()) {
        Some(p) => {
            let len = std::fs::metadata(&p)
                .map_err(err("size of the .raw.zst"))?
                .len();
            Some((p, len))
        }
        None => None,
    };
    Ok(Breakdown {
        image: img.path().into(),
        logical,
        compressed,
        raw_logical: img.sectors().bytes(),
        raw_zst,
        squashfs_bytes,
        squashed_bytes: squashed.compressed_bytes(),
        parts: Parts::of(root, &initrd),
    })
}

/// The initramfs's files by component: logical sizes exact, the real compressed file
/// shared out by what each component compresses to alone.
fn add_initrd(
    boot: &DefaultBoot,
    files: &[File],
    logical: &mut [u64; 5],
    compressed: &mut [f64; 5],
) -> std::io::Result<()> {
    let mut alone = [0u64; 5];
    for c in Component::ALL {
        let mine: Vec<&[u8]> = files
            .iter()
            .filter(|f| classify_initrd(&f.path) == c)
            .map(|f| f.data.as_slice())
            .collect();
        logical[c.index()] += mine.iter().map(|d| d.len() as u64).sum::<u64>();
        if !mine.is_empty() {
            alone[c.index()] = content::zstd_size(mine, 19)?;
        }
    }
    let stored = boot.initrd.len() as f64;
    let factor = ratio(
        content::zstd_size([boot.initrd.as_slice()], basalt_builder::zst::LEVEL)?,
        boot.initrd.len() as u64,
    );
    let total: u64 = alone.iter().sum();
    for c in Component::ALL {
        compressed[c.index()] += stored * ratio(alone[c.index()], total) * factor;
    }
    Ok(())
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image size {}", self.image.display())?;
        writeln!(
            f,
            "  {:<40}{:>14}{:>22}",
            "", "logical", "in .raw.zst (est.)"
        )?;
        for c in Component::ALL {
            writeln!(
                f,
                "  {:<40}{:>14}{:>22}",
                c.name(),
                mib(self.logical[c.index()] as f64),
                mib(self.compressed[c.index()])
            )?;
        }
        let files: u64 = self.logical.iter().sum();
        let est: f64 = self.compressed.iter().sum();
        let rest_label = "filesystems, hash tree, GRUB core, free";
        let total_zst = self.raw_zst.as_ref().map(|(_, n)| *n as f64);
        writeln!(
            f,
            "  {:<40}{:>14}{:>22}",
            rest_label,
            mib(self.raw_logical.saturating_sub(files) as f64),
            total_zst.map_or("n/a".into(), |t| mib(t - est))
        )?;
        writeln!(
            f,
            "  {:<40}{:>14}{:>22}",
            "whole image",
            mib(self.raw_logical as f64),
            total_zst.map_or("no .raw.zst beside the image".into(), mib)
        )?;
        let p = &self.parts;
        writeln!(
            f,
            "  modules: {} .ko on the root ({}), {} .ko in the initramfs ({})",
            p.root_modules.0,
            mib(p.root_modules.1 as f64),
            p.initrd_modules.0,
            mib(p.initrd_modules.1 as f64)
        )?;
        let copies: Vec<String> = p
            .init_copies
            .iter()
            .map(|c| {
                format!(
                    "{} {} ({})",
                    c.place,
                    mib(c.bytes as f64),
                    if c.symbols {
                        "with its symbol table"
                    } else {
                        "stripped"
                    }
                )
            })
            .collect();
        writeln!(
            f,
            "  init binaries: {}: {}",
            p.init_copies.len(),
            copies.join(", ")
        )?;
        writeln!(
            f,
            "  root squashfs: {} in the image (data and metadata), {} of data blocks as recompressed for the estimate",
            mib(self.squashfs_bytes as f64),
            mib(self.squashed_bytes as f64)
        )?;
        writeln!(
            f,
            "  logical: file sizes (kernel and basalt-init counted where they are stored: ESP; root and initramfs). \
in .raw.zst: estimated per component as stored (root: share of the squashfs blocks; initramfs: zstd -19 alone, scaled; ESP: zstd -{} alone), \
then through the .raw.zst's zstd; the remainder row is the real .raw.zst less those estimates.",
            basalt_builder::zst::LEVEL
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_classified_into_components() {
        let root = [
            (
                "lib/modules/6.1.0-1/kernel/fs/squashfs/squashfs.ko",
                Component::Modules,
            ),
            ("lib/modules/6.1.0-1/modules.dep", Component::Modules),
            ("usr/local/bin/k3s", Component::K3s),
            (K3S_IMAGES, Component::K3s),
            ("sbin/init", Component::BasaltInit),
            ("etc/ssl/certs/ca-certificates.crt", Component::OtherFiles),
            ("etc/os-release", Component::OtherFiles),
        ];
        for (path, want) in root {
            assert_eq!(classify_root(path), want, "{path}");
        }
        let initrd = [
            ("init", Component::BasaltInit),
            (
                "lib/modules/6.1.0-1/kernel/drivers/md/dm-mod.ko",
                Component::Modules,
            ),
            ("etc/basalt/initrd-modules", Component::OtherFiles),
        ];
        for (path, want) in initrd {
            assert_eq!(classify_initrd(path), want, "{path}");
        }
    }

    #[test]
    fn parts_count_module_files_and_init_copies_where_they_are() {
        let file = |path: &str, data: &[u8]| File {
            path: path.into(),
            data: data.to_vec(),
        };
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let root = [
            file("lib/modules/6.1.0-1/kernel/a.ko", b"aaaa"),
            file("lib/modules/6.1.0-1/kernel/b.ko", b"bb"),
            file("lib/modules/6.1.0-1/modules.dep", b"kernel/a.ko:\n"),
            file("sbin/init", &me),
        ];
        let initrd = [
            file("lib/modules/6.1.0-1/kernel/a.ko", b"aaaa"),
            file("init", b"not elf"),
        ];
        let p = Parts::of(&root, &initrd);
        assert_eq!(p.root_modules, (2, 6));
        assert_eq!(p.initrd_modules, (1, 4));
        assert_eq!(
            p.init_copies,
            [
                InitCopy {
                    place: "root /sbin/init",
                    bytes: me.len() as u64,
                    // A test binary keeps its symbols.
                    symbols: true,
                },
                InitCopy {
                    place: "initramfs /init",
                    bytes: 7,
                    symbols: false,
                },
            ]
        );
    }

    #[test]
    fn the_raw_zst_is_found_beside_raw_and_qcow2() {
        let d = tempfile::tempdir().expect("tempdir");
        let zst = d.path().join("node.raw.zst");
        assert_eq!(raw_zst_beside(&d.path().join("node.raw")), None);
        std::fs::write(&zst, b"x").expect("write");
        assert_eq!(
            raw_zst_beside(&d.path().join("node.raw")),
            Some(zst.clone())
        );
        assert_eq!(raw_zst_beside(&d.path().join("node.qcow2")), Some(zst));
    }
}
