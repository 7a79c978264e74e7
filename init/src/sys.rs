//! The syscalls that change the machine, behind a trait so the boot plan runs against a
//! recording fake in tests (as youki's `Syscall` trait does).

use nix::errno::Errno;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

pub trait System {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    fn mkdir(&mut self, path: &Path) -> std::io::Result<()>;
    fn load_module(&mut self, path: &Path) -> std::io::Result<()>;
    /// Makes `new_root` the root: move-mount it onto `/`, chroot, chdir.
    fn switch_root(&mut self, new_root: &Path) -> Result<(), Errno>;
}

/// The real machine.
pub struct Real;

impl System for Real {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(Some(source), target, fstype, flags, data)
    }

    fn mkdir(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn load_module(&mut self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::open(path)?;
        nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())
            .map_err(std::io::Error::from)
    }

    fn switch_root(&mut self, new_root: &Path) -> Result<(), Errno> {
        nix::unistd::chdir(new_root)?;
        nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
        nix::unistd::chroot(".")?;
        nix::unistd::chdir("/")
    }
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: String,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
    },
    Mkdir(PathBuf),
    LoadModule(PathBuf),
    SwitchRoot(PathBuf),
}

/// Test double: records every call and answers from a script of failures.
#[derive(Default)]
pub struct Recording {
    pub calls: Vec<Call>,
    /// Mount targets that fail with the given errno.
    pub failing_mounts: Vec<(PathBuf, Errno)>,
    /// Modules whose load fails with the given errno.
    pub failing_modules: Vec<(PathBuf, Errno)>,
}

impl System for Recording {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        _data: Option<&str>,
    ) -> Result<(), Errno> {
        self.calls.push(Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.map(Into::into),
            flags,
        });
        match self.failing_mounts.iter().find(|(t, _)| t == target) {
            Some((_, e)) => Err(*e),
            None => Ok(()),
        }
    }

    fn mkdir(&mut self, path: &Path) -> std::io::Result<()> {
        self.calls.push(Call::Mkdir(path.into()));
        Ok(())
    }

    fn load_module(&mut self, path: &Path) -> std::io::Result<()> {
        self.calls.push(Call::LoadModule(path.into()));
        match self.failing_modules.iter().find(|(p, _)| p == path) {
            Some((_, e)) => Err(std::io::Error::from(*e)),
            None => Ok(()),
        }
    }

    fn switch_root(&mut self, new_root: &Path) -> Result<(), Errno> {
        self.calls.push(Call::SwitchRoot(new_root.into()));
        Ok(())
    }
}
