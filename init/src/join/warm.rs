//! Warming a promotion's path in standby: PID1's own binary read into the page cache.
//!
//! `/sbin/init` lives on the compressed, verity-checked root. Its pages come in on first
//! touch, and a promotion is the first time PID1 runs its TLS client, its X.509 code, the
//! config render and the spawn: under TCG the first CA check took 413 ms against a 21 ms
//! round trip, almost all of it page faults that each decompressed a squashfs block and
//! hashed it through dm-verity (BENCHMARKS.md, issue 15 item 2). Reading the file once in
//! standby, in a background thread at low priority, does that work while nothing waits;
//! the promotion's faults then find the pages cached (minor faults). Nothing is mapped,
//! so PID1's VmRSS at standby does not change: the page cache holds the pages, and the
//! kernel may drop them again under pressure, as it may any clean page.

use crate::pid1::console;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// PID1's running binary, whichever path it was started from.
pub const SELF_EXE: &str = "/proc/self/exe";
/// The step's name in the boot timeline (`[basalt] step join-warm …`).
pub const STEP: &str = "join-warm";
/// The thread's nice value: below the boot's and the node API's (0).
const NICE: libc::c_int = 10;
/// Bytes per read: squashfs's block size, so each read decompresses whole blocks.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("open {0} to read it into the page cache")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("read {0} into the page cache")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("start the {STEP} thread")]
    Spawn(#[source] std::io::Error),
}

/// Reads every file of `paths` once, start to end, and returns the bytes read. The
/// kernel is told first that the whole file will be needed (`POSIX_FADV_WILLNEED`), so
/// its readahead works in large requests.
pub fn page_in(paths: &[&Path]) -> Result<u64, WarmError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for path in paths {
        let mut file =
            std::fs::File::open(path).map_err(|e| WarmError::Open(path.to_path_buf(), e))?;
        // Advice only: a file system without readahead still serves the reads below.
        let _ = nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WarmError::Read(path.to_path_buf(), e)),
            }
        }
    }
    Ok(total)
}

/// Starts the warm-up in a thread of its own at nice [`NICE`]; it prints its step when
/// done, or why it could not finish (never fatal: a promotion only runs slower).
pub fn spawn() {
    let spawned = std::thread::Builder::new().name(STEP.into()).spawn(|| {
        let tid = nix::unistd::gettid().as_raw() as libc::id_t;
        // SAFETY: setpriority with PRIO_PROCESS and a thread id sets that thread's
        // nice value only; it reads and writes no memory of ours.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) } != 0 {
            console::warn(&format!(
                "{STEP}: nice {NICE}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let read = console::timed(STEP, || page_in(&[Path::new(SELF_EXE)]));
        if let Err(e) = read {
            console::error(STEP, &e);
        }
    });
    if let Err(e) = spawned {
        console::error(STEP, &WarmError::Spawn(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_of_every_file_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, vec![7u8; CHUNK * 2 + 5]).expect("write a");
        std::fs::write(&b, b"abc").expect("write b");
        let read = page_in(&[&a, &b]).expect("read");
        assert_eq!(read, (CHUNK * 2 + 5 + 3) as u64);
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = page_in(&[Path::new("/nonexistent/basalt-warm")]).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/basalt-warm"),
            "{err}"
        );
    }

    #[test]
    fn the_running_binary_can_be_read() {
        let read = page_in(&[Path::new(SELF_EXE)]).expect("read self");
        assert!(read > 0);
    }
}
