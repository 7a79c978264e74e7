//! Files replaced whole and crash-safely: the boot counter, the machine config saved to
//! STATE, K3s's config and token, `/run/resolv.conf`. A reader (or the next boot, after a
//! power cut) sees the old content or the new one, never a mix or a missing file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Temporary file beside the target, fsync, rename, fsync the folder: after a crash
/// the file holds either the old or the new content, never a mix.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_mode(path, bytes, 0o644)
}

/// [`write`] with the file's mode set from the start: secrets (the machine config
/// holds the API key and the join token) are never readable by others, not even
/// between create and rename.
pub fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    stage_mode(path, bytes, mode)?.commit()
}

/// The first half of [`write_mode`]: the temporary file written and synced beside
/// `path`, which is not touched until [`Staged::commit`]. Dropped uncommitted, the
/// temporary file is removed. One stage per path at a time.
pub fn stage_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<Staged> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    // A leftover from an interrupted write must not keep its old mode.
    let _ = std::fs::remove_file(&tmp);
    let staged = Staged {
        tmp: Some(tmp),
        path: path.to_path_buf(),
    };
    let tmp = staged.tmp.as_deref().unwrap_or(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(staged)
}

/// A file written aside by [`stage_mode`], waiting to replace its target.
#[derive(Debug)]
pub struct Staged {
    /// `None` once committed.
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl Staged {
    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary file over the target and syncs the folder.
    pub fn commit(mut self) -> std::io::Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        std::fs::rename(&tmp, &self.path)?;
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn replaces_the_content_creates_folders_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("a/b/file");
        write(&path, b"one").expect("first write");
        write(&path, b"two").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(mode(&path), 0o644);
        let names: Vec<_> = std::fs::read_dir(d.path().join("a/b"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["file"]);
    }

    #[test]
    fn a_staged_file_replaces_the_target_only_when_committed() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("config");
        write(&path, b"old").expect("write");
        let staged = stage_mode(&path, b"new", 0o600).expect("stage");
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        staged.commit().expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);

        drop(stage_mode(&path, b"dropped", 0o600).expect("stage"));
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["config"], "a dropped stage leaves nothing");
    }

    #[test]
    fn a_secret_gets_its_mode_even_over_a_leftover_temporary_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("token");
        let leftover = d.path().join(".token.tmp");
        std::fs::write(&leftover, b"old").expect("leftover");
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_mode(&path, b"secret", 0o600).expect("write");
        assert_eq!(mode(&path), 0o600);
        assert!(!leftover.exists());
    }
}
