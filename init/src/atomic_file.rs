//! Files replaced whole and crash-safely: the boot counter, the machine config saved to
//! STATE, K3s's config and token, `/run/resolv.conf`. A reader (or the next boot, after a
//! power cut) sees the old content or the new one, never a mix or a missing file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Whether files may still be written: shutdown closes it ([`close_writes`]) once the
/// writes in flight have ended, so that no thread (the upgrade's boot check, standby's
/// preparation) holds a file open on STATE when it is unmounted, or writes after it.
pub struct Gate(RwLock<bool>);

/// The error of a write refused because the node is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("not written: the node is shutting down")]
pub struct Closed;

impl Gate {
    pub const fn new() -> Gate {
        Gate(RwLock::new(false))
    }

    /// Held for one write; refused once the gate is closed.
    fn enter(&self) -> std::io::Result<Held<'_>> {
        self.hold().map_err(std::io::Error::other)
    }

    /// Held while a thread changes STATE by other means than this module's (folders,
    /// links, a bind mount: standby's preparation): [`Gate::close`] waits for it as for a
    /// write in flight. Refused once the gate is closed.
    pub fn hold(&self) -> Result<Held<'_>, Closed> {
        let open = self.0.read().unwrap_or_else(|e| e.into_inner());
        if *open {
            return Err(Closed);
        }
        Ok(Held { _open: open })
    }

    /// Waits up to `wait` for the writes in flight, then refuses any further one.
    /// Returns whether every write in flight had ended.
    pub fn close(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            match self.0.try_write() {
                Ok(mut closed) => {
                    *closed = true;
                    return true;
                }
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    *e.into_inner() = true;
                    return true;
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gate held open ([`Gate::hold`]) until dropped.
pub struct Held<'a> {
    _open: RwLockReadGuard<'a, bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

static GATE: Gate = Gate::new();

/// The node's gate, which shutdown closes ([`close_writes`]): for work on STATE that does
/// not go through this module ([`Gate::hold`]).
pub fn gate() -> &'static Gate {
    &GATE
}

/// Shutdown: waits up to `wait` for the writes in flight, then refuses every further
/// write with [`Closed`]. Returns whether the writes in flight had ended.
pub fn close_writes(wait: Duration) -> bool {
    GATE.close(wait)
}

/// Whether shutdown has closed writing ([`close_writes`]).
pub fn closed() -> bool {
    GATE.is_closed()
}

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
    stage(path, bytes, mode, true)
}

/// [`stage_mode`] without its fsync: for a file whose content must be in place at
/// once but need not survive a crash until [`Renamed::sync`] (K3s's config, which PID1
/// writes again before every start of the agent). Its [`Staged::commit`] syncs the file
/// too.
pub fn stage_mode_unsynced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<Staged> {
    stage(path, bytes, mode, false)
}

fn stage(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> std::io::Result<Staged> {
    use std::os::unix::fs::OpenOptionsExt;
    let _open = GATE.enter()?;
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
        synced: sync,
    };
    let tmp = staged.tmp.as_deref().unwrap_or(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    Ok(staged)
}

/// A file written aside by [`stage_mode`], waiting to replace its target.
#[derive(Debug)]
pub struct Staged {
    /// `None` once committed.
    tmp: Option<PathBuf>,
    path: PathBuf,
    /// Whether the temporary file's content was synced when written.
    synced: bool,
}

/// A file renamed into place by [`Staged::rename`], not yet made to survive a crash.
#[derive(Debug)]
#[must_use = "the rename is not durable until synced"]
pub struct Renamed {
    path: PathBuf,
    synced: bool,
}

impl Renamed {
    /// Syncs the file (if it was staged unsynced) and its folder: from here on the
    /// new content survives a crash.
    pub fn sync(self) -> std::io::Result<()> {
        let _open = GATE.enter()?;
        if !self.synced {
            std::fs::File::open(&self.path)?.sync_all()?;
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Staged {
    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary file over the target and syncs it and the folder.
    pub fn commit(self) -> std::io::Result<()> {
        self.rename()?.sync()
    }

    /// Renames the temporary file over the target: readers see the new content from
    /// now on; a crash before [`Renamed::sync`] may leave the old one.
    pub fn rename(mut self) -> std::io::Result<Renamed> {
        let _open = GATE.enter()?;
        let renamed = Renamed {
            path: self.path.clone(),
            synced: self.synced,
        };
        let Some(tmp) = self.tmp.take() else {
            return Ok(renamed);
        };
        std::fs::rename(&tmp, &self.path)?;
        Ok(renamed)
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
    fn a_closed_gate_waits_for_the_write_in_flight_then_refuses_the_next() {
        let gate = std::sync::Arc::new(Gate::new());
        let held = gate.enter().expect("open");
        // A write in flight: closing waits for it, and gives up after its wait.
        assert!(!gate.close(Duration::from_millis(50)));
        assert!(!gate.is_closed());
        let g = gate.clone();
        let closer = std::thread::spawn(move || g.close(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        assert!(closer.join().expect("closer"));
        assert!(gate.is_closed());
        let refused = gate.enter().map(|_| ()).expect_err("closed");
        assert!(
            refused.get_ref().is_some_and(|e| e.is::<Closed>()),
            "{refused}"
        );
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

        let unsynced = stage_mode_unsynced(&path, b"newer", 0o600).expect("stage unsynced");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let renamed = unsynced.rename().expect("rename");
        assert_eq!(std::fs::read(&path).expect("read"), b"newer");
        renamed.sync().expect("sync");
        assert_eq!(mode(&path), 0o600);

        drop(stage_mode(&path, b"dropped", 0o600).expect("stage"));
        assert_eq!(std::fs::read(&path).expect("read"), b"newer");
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
