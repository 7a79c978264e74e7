//! Loading the initramfs's module closure: the names from the builder's list, each after
//! the modules it depends on (`modules.dep` beside them), on [`THREADS`] threads.

use super::modprobe::{name_of, ModprobeError, Modules};
use super::parallel::{self, Loader, ParallelError};
use std::path::{Path, PathBuf};

/// List of module files, dependencies first, one absolute path per line; written by the
/// builder into the initramfs, with a `modules.dep` of the same modules in their folder.
pub const INITRD_MODULES: &str = "/etc/basalt/initrd-modules";

/// Threads loading at once: the initramfs's modules form independent chains (virtio and
/// SCSI, device-mapper and dm-verity, squashfs), a node has at least two vCPUs, and a
/// load is mostly CPU (the signature check, relocation).
pub const THREADS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("read module list {0}")]
    List(PathBuf, #[source] std::io::Error),
    #[error("module list {0}: {1:?} is not under /lib/modules/<kernel version>/")]
    NotUnderModules(PathBuf, String),
    #[error("module index")]
    Index(#[source] ModprobeError),
    #[error("load the initramfs's modules{}", match more { 0 => String::new(), n => format!(" ({n} more failed besides this one)") })]
    Load {
        #[source]
        first: ParallelError,
        more: usize,
    },
}

/// Loads every module of the list under `root` and what it needs, along `modules.dep`
/// in the list's kernel folder, on [`THREADS`] threads; one already loaded counts as
/// done. Returns how many were loaded.
pub fn load_list(loader: &dyn Loader, root: &Path, list: &Path) -> Result<usize, ModuleError> {
    let list_path = root.join(list.strip_prefix("/").unwrap_or(list));
    let text =
        std::fs::read_to_string(&list_path).map_err(|e| ModuleError::List(list_path.clone(), e))?;
    let paths: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let Some(first) = paths.first() else {
        return Ok(0);
    };
    let kver = first
        .strip_prefix("/lib/modules/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(kver, _)| kver)
        .ok_or_else(|| ModuleError::NotUnderModules(list_path.clone(), (*first).to_owned()))?;
    let modules = Modules::open(root, kver).map_err(ModuleError::Index)?;
    let names: Vec<String> = paths.iter().map(|p| name_of(p)).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut outcome = parallel::load_all(loader, root, &modules, &names, THREADS);
    if outcome.errors.is_empty() {
        return Ok(outcome.loaded);
    }
    let more = outcome.errors.len() - 1;
    Err(ModuleError::Load {
        first: outcome.errors.swap_remove(0),
        more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid1::console::chain;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    const KVER: &str = "6.1.0-test";

    /// Writes the list and a `modules.dep` of `deps` (`(file, [its deps])`, paths
    /// relative to the kernel folder), as the builder does.
    fn fixture(list: &[&str], deps: &[(&str, &[&str])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("etc/basalt")).expect("mkdir");
        let list: String = list
            .iter()
            .map(|m| format!("/lib/modules/{KVER}/{m}\n"))
            .collect();
        std::fs::write(p.join("etc/basalt/initrd-modules"), list).expect("write");
        let moddir = p.join("lib/modules").join(KVER);
        std::fs::create_dir_all(&moddir).expect("mkdir");
        let dep: String = deps
            .iter()
            .map(|(m, d)| {
                format!(
                    "{m}:{}\n",
                    d.iter().map(|x| format!(" {x}")).collect::<String>()
                )
            })
            .collect();
        std::fs::write(moddir.join("modules.dep"), dep).expect("write");
        dir
    }

    /// A kernel that refuses a module loaded before one it needs (its own table, not
    /// `modules.dep` read back) and fails the modules asked to fail.
    #[derive(Default)]
    struct Kernel {
        needs: BTreeMap<&'static str, Vec<&'static str>>,
        failing: Vec<(&'static str, i32)>,
        loaded: Mutex<Vec<String>>,
    }

    impl Loader for Kernel {
        fn load(&self, path: &Path) -> std::io::Result<()> {
            let file = path
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            if let Some((_, errno)) = self.failing.iter().find(|(f, _)| *f == file) {
                return Err(std::io::Error::from_raw_os_error(*errno));
            }
            let mut loaded = self.loaded.lock().expect("lock");
            for need in self.needs.get(file.as_str()).into_iter().flatten() {
                if !loaded.iter().any(|l| l == need) {
                    // What the kernel says for a missing symbol.
                    return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
                }
            }
            loaded.push(file);
            Ok(())
        }
    }

    const LIST: &[&str] = &[
        "kernel/virtio_ring.ko",
        "kernel/virtio.ko",
        "kernel/virtio_blk.ko",
        "kernel/dm-mod.ko",
        "kernel/dm-verity.ko",
        "kernel/squashfs.ko",
    ];
    const DEPS: &[(&str, &[&str])] = &[
        ("kernel/virtio_ring.ko", &[]),
        ("kernel/virtio.ko", &["kernel/virtio_ring.ko"]),
        (
            "kernel/virtio_blk.ko",
            &["kernel/virtio.ko", "kernel/virtio_ring.ko"],
        ),
        ("kernel/dm-mod.ko", &[]),
        ("kernel/dm-verity.ko", &["kernel/dm-mod.ko"]),
        ("kernel/squashfs.ko", &[]),
    ];

    fn kernel() -> Kernel {
        Kernel {
            needs: BTreeMap::from([
                ("virtio.ko", vec!["virtio_ring.ko"]),
                ("virtio_blk.ko", vec!["virtio.ko", "virtio_ring.ko"]),
                ("dm-verity.ko", vec!["dm-mod.ko"]),
            ]),
            ..Kernel::default()
        }
    }

    #[test]
    fn every_module_loads_once_and_after_what_it_needs() {
        for _ in 0..20 {
            let dir = fixture(LIST, DEPS);
            let kernel = kernel();
            let n = load_list(&kernel, dir.path(), Path::new(INITRD_MODULES)).expect("loads");
            assert_eq!(n, LIST.len());
            let mut loaded = kernel.loaded.into_inner().expect("lock");
            loaded.sort();
            let mut want: Vec<String> = LIST
                .iter()
                .map(|m| m.trim_start_matches("kernel/").to_owned())
                .collect();
            want.sort();
            assert_eq!(loaded, want);
        }
    }

    #[test]
    fn a_module_already_loaded_counts_as_done() {
        let dir = fixture(LIST, DEPS);
        let kernel = Kernel {
            failing: vec![("squashfs.ko", libc::EEXIST)],
            ..kernel()
        };
        let n = load_list(&kernel, dir.path(), Path::new(INITRD_MODULES)).expect("loads");
        assert_eq!(n, LIST.len() - 1);
    }

    #[test]
    fn a_failing_module_is_named_and_stops_what_needs_it_only() {
        let dir = fixture(LIST, DEPS);
        let kernel = Kernel {
            failing: vec![("dm-mod.ko", libc::ENOEXEC)],
            ..kernel()
        };
        let err = load_list(&kernel, dir.path(), Path::new(INITRD_MODULES)).unwrap_err();
        let text = chain(&err);
        assert!(
            text.starts_with("load the initramfs's modules (1 more failed besides this one): "),
            "{text}"
        );
        assert!(text.contains("dm_mod"), "{text}");
        assert!(text.contains("dm-mod.ko"), "{text}");
        let loaded = kernel.loaded.into_inner().expect("lock");
        assert!(!loaded.iter().any(|m| m == "dm-verity.ko"), "{loaded:?}");
        assert!(loaded.iter().any(|m| m == "virtio_blk.ko"), "{loaded:?}");
    }

    #[test]
    fn a_missing_list_or_index_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_list(&kernel(), dir.path(), Path::new(INITRD_MODULES)).unwrap_err();
        assert!(chain(&err).contains("initrd-modules"), "{}", chain(&err));

        let dir = fixture(LIST, DEPS);
        let index = dir
            .path()
            .join("lib/modules")
            .join(KVER)
            .join("modules.dep");
        std::fs::remove_file(&index).expect("rm");
        let err = load_list(&kernel(), dir.path(), Path::new(INITRD_MODULES)).unwrap_err();
        assert!(
            chain(&err).contains(&index.display().to_string()),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn a_path_outside_the_kernels_folder_is_refused() {
        let dir = fixture(&[], &[]);
        std::fs::write(dir.path().join("etc/basalt/initrd-modules"), "/m/a.ko\n").expect("write");
        let err = load_list(&kernel(), dir.path(), Path::new(INITRD_MODULES)).unwrap_err();
        assert!(chain(&err).contains("/m/a.ko"), "{}", chain(&err));
    }
}
