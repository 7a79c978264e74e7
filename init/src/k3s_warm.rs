//! What standby does for K3s beyond files and links: it has the image's `k3s` extract
//! its userspace onto STATE, so that the promoted agent does not.
//!
//! K3s's `k3s` binary carries containerd, runc, the CNI plugins and its own inner
//! binaries as one embedded zstd tarball. Every `k3s` command that runs something first
//! calls `extract` (`cmd/k3s/main.go`, `stageAndRun`): when
//! `<data-dir>/data/<sha256 of the tarball>/bin/k3s` exists it goes on at once,
//! otherwise it unpacks the tarball under the flock `<data-dir>/data/.lock` into
//! `<hash>-tmp`, verifies every file against the tarball's `.sha256sums` and `.links`,
//! and renames it into place: hundreds of MB written and hashed, seconds on a cloud
//! vCPU. `k3s ctr --version` is the cheapest command that does that and nothing else:
//! `ctr` is declared with `SkipFlagParsing`, so `--version` reaches the bundled `ctr`,
//! which prints its version without talking to containerd. (`k3s --version` and
//! `k3s agent --help` are answered by urfave/cli before any action and extract
//! nothing.)
//!
//! [`warm`] runs it with the agent's environment (the same data dir:
//! `/var/lib/rancher/k3s` on STATE, as basalt sets no other), its output to the console
//! as the `k3s-warm` lines, bounded by [`TIMEOUT`]. It is part of K3s's background
//! preparation, after standby (never on its path), and a promotion waits for it as for
//! the rest. A timeout kills it: K3s removes a leftover `<hash>-tmp` before it extracts
//! and renames only a verified tree, so the agent then extracts at its start as it would
//! have anyway. Its failure is reported and fails nothing for the same reason.
//!
//! The airgap image import cannot be done here: K3s imports from
//! `<data-dir>/agent/images` into containerd, which the agent starts only after the
//! server has validated its token and sent its config (`pkg/agent/run.go`). Standby
//! only keeps the bundle's path and mtime stable and K3s's `.cache.json` on
//! ([`crate::join::prepare_standby`]), so that every start after the first skips it.

use crate::pid1::reap::{self, Ended};
use crate::pid1::supervise::Exit;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The arguments: the cheapest `k3s` command that extracts and does nothing else.
pub const ARGS: [&str; 2] = ["ctr", "--version"];
/// The name its lines carry on the console (`[basalt] [k3s-warm] …`).
pub const LOG_NAME: &str = "k3s-warm";
/// How long it may take. K3s's extraction takes seconds on a cloud vCPU; this bounds it
/// well within what a promotion waits for K3s's whole preparation.
pub const TIMEOUT: Duration = Duration::from_secs(90);

// The promotion's wait covers the other steps and the kill too.
const _: () = assert!(
    TIMEOUT.as_secs() + 20 < crate::boot::background::K3S_PREP_WAIT.as_secs(),
    "the warm-up must end before a promotion stops waiting for K3s's preparation"
);

/// How long a killed warm-up may take to go.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What [`warm`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warmed {
    /// The image carries no `k3s`.
    NoK3s,
    /// The image's `k3s` is not a program the kernel runs (`ENOEXEC`): a stand-in
    /// file, as in images built without a real K3s. Nothing to warm.
    NotAProgram,
    /// It ran and exited 0 (or was reaped without a word, which PID1 never does).
    Ran { took: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("start {0} {args}", args = ARGS.join(" "))]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("{bin} {args} ended with {exit} after {took:?}", bin = .bin.display(), args = ARGS.join(" "))]
    Failed {
        bin: PathBuf,
        exit: String,
        took: Duration,
    },
    #[error(
        "{bin} {args} still ran after {0:?}: killed; the agent extracts at its start",
        .timeout, bin = .bin.display(), args = ARGS.join(" ")
    )]
    Timeout { bin: PathBuf, timeout: Duration },
}

/// Runs `bin ctr --version` with exactly `env`, in `/`, in a process group of its own,
/// passing each line it prints (stdout and stderr) to `line`; kills the group after
/// `timeout`. See the module docs.
pub fn warm(
    bin: &Path,
    env: &[(String, String)],
    timeout: Duration,
    line: &mut dyn FnMut(&str),
) -> Result<Warmed, WarmError> {
    if !bin.exists() {
        return Ok(Warmed::NoK3s);
    }
    let began = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.args(ARGS)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut claimed = match reap::spawn_claimed(&mut cmd) {
        Ok(c) => c,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOEXEC) => return Ok(Warmed::NotAProgram),
        Err(e) => return Err(WarmError::Spawn(bin.to_path_buf(), e)),
    };
    let (to, lines) = mpsc::channel::<String>();
    if let Some(out) = claimed.child.stdout.take() {
        forward(out, to.clone());
    }
    if let Some(err) = claimed.child.stderr.take() {
        forward(err, to);
    }
    let deadline = began + timeout;
    let ended = loop {
        while let Ok(l) = lines.try_recv() {
            line(&l);
        }
        if let Some(ended) = claimed.try_exit() {
            break Some(ended);
        }
        if Instant::now() >= deadline {
            break None;
        }
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(20)) {
            line(&l);
        }
    };
    let ended = match ended {
        Some(e) => e,
        None => {
            let _ = nix::sys::signal::killpg(claimed.pid(), nix::sys::signal::Signal::SIGKILL);
            let gone = Instant::now() + KILL_WAIT;
            while claimed.try_exit().is_none() && Instant::now() < gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            drain(&lines, line);
            return Err(WarmError::Timeout {
                bin: bin.to_path_buf(),
                timeout,
            });
        }
    };
    drain(&lines, line);
    let took = began.elapsed();
    match ended {
        Ended::Exit(Exit::Code(0)) | Ended::Unknown => Ok(Warmed::Ran { took }),
        Ended::Exit(exit) => Err(WarmError::Failed {
            bin: bin.to_path_buf(),
            exit: crate::pid1::mailbox::exit_text(exit),
            took,
        }),
    }
}

/// Reads `from` line by line into `to` in a thread of its own, until EOF.
fn forward(from: impl Read + Send + 'static, to: mpsc::Sender<String>) {
    let _ = std::thread::Builder::new()
        .name("k3s-warm-out".into())
        .spawn(move || {
            for l in BufReader::new(from).lines().map_while(Result::ok) {
                if to.send(l).is_err() {
                    return;
                }
            }
        });
}

/// The lines still in the pipes once the process has ended (a short wait: whatever a
/// descendant still holding them writes later is not waited for).
fn drain(lines: &mpsc::Receiver<String>, line: &mut dyn FnMut(&str)) {
    while let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
        line(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable script standing in for `k3s`, in a temporary folder.
    fn script(body: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k3s");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    }

    fn env() -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("MARK".into(), "warm".into()),
        ]
    }

    fn run(bin: &Path, timeout: Duration) -> (Result<Warmed, WarmError>, Vec<String>) {
        let mut seen = Vec::new();
        let r = warm(bin, &env(), timeout, &mut |l| seen.push(l.to_owned()));
        (r, seen)
    }

    #[test]
    fn it_runs_ctr_version_with_the_given_environment_and_passes_its_lines_on() {
        let (_d, bin) = script(
            "echo \"args=$*\"; echo \"mark=$MARK home=${HOME:-none} cwd=$(pwd)\"; echo oops >&2",
        );
        let (r, mut seen) = run(&bin, Duration::from_secs(20));
        assert!(matches!(r, Ok(Warmed::Ran { .. })), "{r:?}");
        seen.sort();
        assert_eq!(
            seen,
            vec![
                "args=ctr --version".to_string(),
                "mark=warm home=none cwd=/".into(),
                "oops".into()
            ]
        );
    }

    #[test]
    fn a_failure_is_reported_with_its_exit() {
        let (_d, bin) = script("echo 'extracting data: no space left on device'; exit 1");
        let (r, seen) = run(&bin, Duration::from_secs(20));
        let err = r.expect_err("exit 1");
        assert!(matches!(err, WarmError::Failed { .. }), "{err:?}");
        assert!(
            err.to_string().contains("ctr --version ended with exit 1"),
            "{err}"
        );
        assert_eq!(seen, vec!["extracting data: no space left on device"]);
    }

    #[test]
    fn past_the_timeout_its_whole_group_is_killed() {
        // A child of the script holds the pipe too: the group's kill takes both.
        let (d, bin) = script("echo started; sleep 30 & echo $! > \"$0.child\"; wait");
        let began = Instant::now();
        let (r, seen) = run(&bin, Duration::from_millis(500));
        let err = r.expect_err("timeout");
        assert!(matches!(err, WarmError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("killed"), "{err}");
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(seen, vec!["started"]);
        let child: i32 = std::fs::read_to_string(d.path().join("k3s.child"))
            .expect("child pid")
            .trim()
            .parse()
            .expect("pid");
        // The sleep was killed with its group (and, orphaned, reaped by init here).
        std::thread::sleep(Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "the script's child survived");
    }

    #[test]
    fn a_stand_in_that_is_no_program_is_not_a_failure() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("k3s");
        std::fs::write(&path, "a stand-in for the K3s binary, not a program\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (r, seen) = run(&path, Duration::from_secs(1));
        assert_eq!(r.expect("a stand-in"), Warmed::NotAProgram);
        assert!(seen.is_empty(), "{seen:?}");
    }

    #[test]
    fn an_image_without_k3s_runs_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let (r, seen) = run(&d.path().join("k3s"), Duration::from_secs(1));
        assert_eq!(r.expect("no k3s"), Warmed::NoK3s);
        assert!(seen.is_empty());
    }
}
