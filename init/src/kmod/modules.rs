//! Loading the initramfs module closure in the order the builder computed.

use crate::sys::System;
use std::path::{Path, PathBuf};

/// List of module files, dependencies first, one absolute path per line; written by the
/// builder into the initramfs.
pub const INITRD_MODULES: &str = "/etc/basalt/initrd-modules";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("read module list {0}")]
    List(PathBuf, #[source] std::io::Error),
    #[error("load module {0}")]
    Load(PathBuf, #[source] std::io::Error),
}

/// Loads every module of the list under `root`; one already loaded counts as done.
/// Returns how many were loaded.
pub fn load_list(sys: &mut dyn System, root: &Path, list: &Path) -> Result<usize, ModuleError> {
    let list_path = root.join(list.strip_prefix("/").unwrap_or(list));
    let text =
        std::fs::read_to_string(&list_path).map_err(|e| ModuleError::List(list_path.clone(), e))?;
    let mut loaded = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = root.join(line.trim_start_matches('/'));
        match sys.load_module(&path) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(ModuleError::Load(path, e)),
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use nix::errno::Errno;

    fn fixture(list: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc/basalt")).expect("mkdir");
        std::fs::write(dir.path().join("etc/basalt/initrd-modules"), list).expect("write");
        dir
    }

    #[test]
    fn loads_in_listed_order_and_skips_already_loaded() {
        let dir = fixture("/lib/m/a.ko\n\n/lib/m/b.ko\n");
        let b = dir.path().join("lib/m/b.ko");
        let mut sys = Recording {
            failing_modules: vec![(b.clone(), Errno::EEXIST)],
            ..Default::default()
        };
        let n = load_list(&mut sys, dir.path(), Path::new(INITRD_MODULES)).expect("loads");
        assert_eq!(n, 1);
        assert_eq!(
            sys.calls,
            vec![
                Call::LoadModule(dir.path().join("lib/m/a.ko")),
                Call::LoadModule(b)
            ]
        );
    }

    #[test]
    fn a_failing_module_is_named_and_stops_the_list() {
        let dir = fixture("/a.ko\n/b.ko\n/c.ko\n");
        let b = dir.path().join("b.ko");
        let mut sys = Recording {
            failing_modules: vec![(b.clone(), Errno::ENOEXEC)],
            ..Default::default()
        };
        let err = load_list(&mut sys, dir.path(), Path::new(INITRD_MODULES)).unwrap_err();
        assert!(
            matches!(&err, ModuleError::Load(p, _) if *p == b),
            "{err:?}"
        );
        assert_eq!(sys.calls.len(), 2);
    }

    #[test]
    fn a_missing_list_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_list(
            &mut Recording::default(),
            dir.path(),
            Path::new(INITRD_MODULES),
        )
        .unwrap_err();
        assert!(err.to_string().contains("initrd-modules"), "{err}");
    }
}
