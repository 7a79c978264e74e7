//! basalt-init for the image: built from this source tree as a static binary, embedded in
//! the program that builds (the `basalt` CLI), or taken from `--input basalt-init=PATH`;
//! whichever, it must be statically linked. The same holds for basalt-stage1, the
//! initramfs's `/init` (stage 1 alone, a second binary of the basalt-init package, built
//! with it): `--input basalt-stage1=PATH`.

use basalt_build_support::static_build::{StaticBuild, StaticBuildError};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InitBuildError {
    #[error("cannot find the basalt source tree above {0} (set BASALT_SOURCE, or pass --input basalt-init=PATH)")]
    NoWorkspace(PathBuf),
    #[error(transparent)]
    Build(#[from] StaticBuildError),
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a static x86-64 ELF executable (it has an ELF interpreter or is not ELF)")]
    NotStatic(PathBuf),
}

/// The workspace root: `BASALT_SOURCE`, else the first ancestor of `from` that holds
/// `init/Cargo.toml` next to a `Cargo.toml`.
pub fn find_workspace(from: &Path) -> Result<PathBuf, InitBuildError> {
    if let Some(dir) = std::env::var_os("BASALT_SOURCE") {
        return Ok(dir.into());
    }
    let start = std::path::absolute(from).unwrap_or_else(|_| from.into());
    start
        .ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join("init/Cargo.toml").is_file())
        .map(Path::to_path_buf)
        .ok_or(InitBuildError::NoWorkspace(start))
}

/// The binary of the basalt-init package that runs stage 1 alone (`init/src/bin/`): the
/// initramfs's `/init`. The root keeps the full basalt-init, which stage 1 execs.
pub const STAGE1_BIN: &str = "basalt-stage1";

/// The two binaries of the basalt-init package that go into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitBinaries {
    /// basalt-init: `/sbin/init` of the root (stage 2, and stage 1 too).
    pub init: PathBuf,
    /// basalt-stage1: `/init` of the initramfs.
    pub stage1: PathBuf,
}

/// Builds basalt-init and basalt-stage1 (release, static; one cargo run builds both
/// binaries of the package) and returns their paths.
pub fn build(workspace: &Path) -> Result<InitBinaries, InitBuildError> {
    let init = build_static(workspace, "basalt-init", "init")?;
    let stage1 = init.with_file_name(STAGE1_BIN);
    check_static(&stage1)?;
    Ok(InitBinaries { init, stage1 })
}

/// Builds the workspace package `package` (its binary of the same name) release and
/// statically linked (`basalt_build_support::static_build`, as the CLI's build script and
/// the K3s agent double are built), into `target/<target_dir>` so that it neither waits
/// on nor invalidates the caller's own build, and checks that the result is static.
pub fn build_static(
    workspace: &Path,
    package: &str,
    target_dir: &str,
) -> Result<PathBuf, InitBuildError> {
    let bin = StaticBuild {
        workspace,
        package,
        bin: None,
        target_dir: workspace.join("target").join(target_dir),
        default_features: true,
    }
    .run()?;
    check_static(&bin)?;
    Ok(bin)
}

/// Writes an embedded binary to `dir/<sha256>/<name>` (once: an existing file is reused),
/// checks that it is static, and returns its path. Written to a temporary file and
/// renamed, so an interrupted write never leaves a truncated binary under that name.
pub fn materialize(bytes: &[u8], dir: &Path, name: &str) -> Result<PathBuf, InitBuildError> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let folder = dir.join(hex::encode(Sha256::digest(bytes)));
    let path = folder.join(name);
    if !path.is_file() {
        std::fs::create_dir_all(&folder).map_err(|e| InitBuildError::Write(folder.clone(), e))?;
        let write = || -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(&folder)?;
            tmp.write_all(bytes)?;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o755))?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|e| InitBuildError::Write(path.clone(), e))?;
    }
    check_static(&path)?;
    Ok(path)
}

/// Refuses a binary that would need a dynamic loader: the initramfs has none.
pub fn check_static(bin: &Path) -> Result<(), InitBuildError> {
    use object::Object;
    let data = std::fs::read(bin).map_err(|e| InitBuildError::Read(bin.into(), e))?;
    let file = object::File::parse(&*data).map_err(|_| InitBuildError::NotStatic(bin.into()))?;
    let static_exe = file.architecture() == object::Architecture::X86_64
        && file.section_by_name(".interp").is_none()
        && file.kind() == object::ObjectKind::Executable
        || (file.kind() == object::ObjectKind::Dynamic
            && file.section_by_name(".interp").is_none()
            && file.entry() != 0);
    if static_exe {
        Ok(())
    } else {
        Err(InitBuildError::NotStatic(bin.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamically_linked_binary_is_refused() {
        // The test binary itself links glibc dynamically.
        let me = std::env::current_exe().expect("exe");
        assert!(matches!(
            check_static(&me),
            Err(InitBuildError::NotStatic(_))
        ));
    }

    #[test]
    fn a_non_elf_file_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("init");
        std::fs::write(&f, b"#!/bin/sh\n").expect("write");
        assert!(matches!(
            check_static(&f),
            Err(InitBuildError::NotStatic(_))
        ));
    }

    #[test]
    fn an_embedded_init_is_written_once_by_its_hash_and_must_be_static() {
        let d = tempfile::tempdir().expect("tempdir");
        let err = materialize(b"#!/bin/sh\n", d.path(), "basalt-init")
            .expect_err("a script is not static");
        assert!(matches!(err, InitBuildError::NotStatic(_)), "{err:?}");
        // Named by the sha256 of the bytes, as sha256sum computes it.
        let folders: Vec<_> = std::fs::read_dir(d.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        let out = std::process::Command::new("sha256sum")
            .arg(d.path().join(&folders[0]).join("basalt-init"))
            .output()
            .expect("sha256sum");
        let sum = String::from_utf8_lossy(&out.stdout);
        assert_eq!(folders.len(), 1);
        assert!(sum.starts_with(&folders[0]), "{sum} vs {folders:?}");
    }

    #[test]
    fn the_workspace_is_found_from_the_spec_folder() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        if std::env::var_os("BASALT_SOURCE").is_none() {
            let ws = find_workspace(&images).expect("found");
            assert!(ws.join("init/Cargo.toml").is_file());
        }
    }
}
