//! `basalt-init testd`: a **test service**, the stand-in that proves PID1's supervision
//! before K3s's agent is started under it. It runs only when QEMU's host asks for it
//! with the fw_cfg entry `opt/basalt/test-service` (a hypervisor's host controls its
//! guest anyway; nothing in a cloud's API can set fw_cfg), as `/sbin/init testd MODE`.
//!
//! Mode `orphan`: prints that it started, leaves an orphaned grandchild that exits a
//! second later (PID1 inherits and must reap it), then looks through `/proc` for
//! zombies, reports them, and exits with status 3 so that the supervisor restarts it.

use crate::pid1::console;
use crate::pid1::supervise::{RestartPolicy, ServiceSpec, Supervisor};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// fw_cfg entry that turns the test service on; its content is the mode.
pub const FW_CFG: &str = basalt_api::layout::fw_cfg::TEST_SERVICE_SYSFS;
/// The first argument that selects this service (only honoured when not PID1).
pub const ARG: &str = "testd";
/// Exit status of a run, so that the supervisor has a failure to restart.
pub const EXIT_CODE: i32 = 3;

/// The mode the host asked for, if any.
pub fn requested(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join(FW_CFG)).ok()?;
    let mode = text.trim();
    (!mode.is_empty() && mode.len() <= 64).then(|| mode.to_owned())
}

/// Starts the service under `supervisor` when the host asked for it: proves starting,
/// output capture, restart with backoff and reaping of orphans before K3s's agent is the
/// real tenant.
pub fn start(supervisor: &mut Supervisor, root: &Path) {
    let Some(mode) = requested(root) else {
        return;
    };
    match supervisor.start(service(&mode)) {
        Ok(()) => console::info(&format!("service testd ({mode}) started under supervision")),
        Err(e) => console::error("service testd", &e),
    }
}

/// The service as the supervisor runs it: this binary, `testd MODE`.
fn service(mode: &str) -> ServiceSpec {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/sbin/init".into());
    ServiceSpec {
        name: "testd".into(),
        argv: vec![exe.to_string_lossy().into_owned(), ARG.into(), mode.into()],
        env: Vec::new(),
        restart: RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
            ..RestartPolicy::default()
        },
        stop_timeout: Duration::from_secs(5),
    }
}

/// `testd.panic=stage2` on the kernel command line: the kernel panics (sysrq `c`) as
/// soon as stage 2 has run its boot plan, before the upgrade check. A test image made to
/// crash, so that a test can see a new slot's panic end in the old slot (`panic=10`).
pub const PANIC_PARAM: &str = "testd.panic=stage2";

/// Crashes the kernel if its command line asks for it (see [`PANIC_PARAM`]); returns
/// otherwise.
pub fn panic_if_asked(root: &Path) {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    if !cmdline.split_whitespace().any(|w| w == PANIC_PARAM) {
        return;
    }
    console::warn(&format!(
        "testd: {PANIC_PARAM} on the kernel command line: crashing the kernel"
    ));
    console::flush(console::FLUSH_TIMEOUT);
    nix::unistd::sync();
    let trigger = root.join("proc/sysrq-trigger");
    if let Err(e) = std::fs::write(&trigger, b"c") {
        console::error(&format!("testd: write {}", trigger.display()), &e);
    }
}

/// Stops the upgrade for good at `point` when the host's fw_cfg entry
/// [`basalt_api::layout::fw_cfg::TEST_UPGRADE_STALL`] names it, so that a test can cut
/// the power exactly there. Returns at once otherwise.
pub fn upgrade_stall(root: &Path, point: &str) {
    let path = root.join(basalt_api::layout::fw_cfg::TEST_UPGRADE_STALL_SYSFS);
    let Ok(asked) = std::fs::read_to_string(path) else {
        return;
    };
    if asked.trim() != point {
        return;
    }
    console::warn(&format!("testd: upgrade stalled at {point}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Entry point of `/sbin/init testd MODE`; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let say = |msg: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "testd: {msg}");
        let _ = out.flush();
    };
    match args.first().map(String::as_str) {
        Some("orphan") => {}
        other => {
            say(&format!("unknown mode {other:?}; known: orphan"));
            return 2;
        }
    }
    say(&format!("started, pid {}", std::process::id()));
    match leave_orphan(Duration::from_secs(1)) {
        Ok(grandchild) => say(&format!("orphaned grandchild pid {grandchild}")),
        Err(e) => say(&format!("fork: {e}")),
    }
    std::thread::sleep(Duration::from_secs(3));
    let zombies = zombies(Path::new("/proc"));
    say(&format!("zombies: {} {zombies:?}", zombies.len()));
    say(&format!("exiting with status {EXIT_CODE}"));
    EXIT_CODE
}

/// Forks a child that forks a grandchild and exits at once, so the grandchild's parent
/// becomes PID1; the grandchild exits after `linger`. Returns the grandchild's pid.
fn leave_orphan(linger: Duration) -> nix::Result<i32> {
    let (read, write) = nix::unistd::pipe()?;
    // SAFETY: testd is single-threaded when it forks, and the children only sleep,
    // write to a pipe and `_exit`.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(read);
            // SAFETY: as above.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    std::thread::sleep(linger);
                    // SAFETY: `_exit` skips atexit handlers and stdio of the parent.
                    unsafe { libc::_exit(0) }
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = nix::unistd::write(&write, &child.as_raw().to_le_bytes());
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        ForkResult::Parent { child } => {
            drop(write);
            let _ = waitpid(child, None);
            let mut buf = [0u8; 4];
            let n = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&read), &mut buf)?;
            if n != 4 {
                return Err(nix::errno::Errno::EIO);
            }
            Ok(i32::from_le_bytes(buf))
        }
    }
}

/// Pids in state Z (zombie) under `proc`.
pub fn zombies(proc: &Path) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut out: Vec<Pid> = entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            (state_of(&stat) == Some('Z')).then(|| Pid::from_raw(pid))
        })
        .collect();
    out.sort();
    out
}

/// The state field of `/proc/PID/stat`: the first character after the command's
/// closing parenthesis (the command itself may hold spaces and parentheses).
fn state_of(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// `testd.hang=<point>` on the kernel command line (`cmdline`): the calling thread stops
/// at `point` for good, as if deadlocked (`trial`: the trial's thread, right after it fed
/// the watchdog, so the watchdog is never fed again). A test image made to hang, so that
/// a test can see the watchdog reset a stuck trial into the old slot. Returns at once
/// otherwise.
pub fn hang_if_asked(cmdline: &str, point: &str) {
    let asked = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("testd.hang="))
        .any(|p| p == point);
    if !asked {
        return;
    }
    console::warn(&format!(
        "testd: testd.hang={point} on the kernel command line: this thread hangs for good \
         and feeds nothing from now on"
    ));
    loop {
        std::thread::park();
    }
}

/// `testd.hang=stage1-io` on the kernel command line: on the trial boot of a new slot,
/// stage 1 blocks itself in the kernel the way a stuck disk does, before the trial's
/// watchdog is armed: a dm-linear device over the first 4 KiB of `device` (the root
/// partition, `major:minor`) is read while active, suspended, then those same bytes are
/// written back through the page cache and `fsync`ed. The fsync waits for the page's
/// writeback in TASK_UNINTERRUPTIBLE with no timeout, for ever (the queued write never
/// reaches the disk). A read does not do: a buffered read waits killable, and a direct
/// read (`O_DIRECT`, `submit_bio_wait`) wakes every half hung-task timeout on purpose
/// (`blk_io_schedule`), both of which the hung-task detector ignores. So only the
/// kernel's hang detection of a trial (GRUB's `hung_task_panic=1`) can end this boot. Not
/// a trial (the old slot booted again, or `trial` could not tell): returns at once.
pub const HANG_PARAM: &str = "testd.hang=stage1-io";

/// Blocks for ever if the command line asks for it (see [`HANG_PARAM`]) and `trial` says
/// this is a trial boot; returns otherwise (also when the hang cannot be set up).
pub fn hang_stage1_io_if_asked(root: &Path, device: &str, trial: impl FnOnce() -> Option<bool>) {
    use std::io::{Read, Seek};
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    if !cmdline.split_whitespace().any(|w| w == HANG_PARAM) {
        return;
    }
    if trial() != Some(true) {
        console::info(&format!(
            "testd: {HANG_PARAM} on the kernel command line, but this is no trial boot: not hanging"
        ));
        return;
    }
    const NAME: &str = "testd-hang";
    let control = match crate::storage::dm::Control::open(&root.join("dev")) {
        Ok(c) => c,
        Err(e) => return console::error("testd: hang: device-mapper", &e),
    };
    let table = format!("{device} 0");
    let target = crate::storage::dm::Target {
        start: 0,
        sectors: 8,
        kind: "linear",
        params: &table,
    };
    let minor = match control.create(NAME, &[target], false) {
        Ok((_, minor)) => minor,
        Err(e) => return console::error("testd: hang: create the dm-linear device", &e),
    };
    let dev = root.join(format!("dev/dm-{minor}"));
    let mut block = [0u8; 4096];
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .and_then(|mut f| f.read_exact(&mut block).map(|()| f));
    let mut file = match opened {
        Ok(f) => f,
        Err(e) => return console::error(&format!("testd: hang: read {}", dev.display()), &e),
    };
    if let Err(e) = control.suspend(NAME) {
        return console::error("testd: hang: suspend the dm-linear device", &e);
    }
    console::warn(&format!(
        "testd: {HANG_PARAM} on the kernel command line: PID1 writes {} (suspended) \
         back and fsyncs it, blocking uninterruptibly before the trial's watchdog is armed",
        dev.display()
    ));
    console::flush(console::FLUSH_TIMEOUT);
    // The same bytes: nothing would change on the disk even if the write got there.
    let done = file
        .rewind()
        .and_then(|()| file.write_all(&block))
        .and_then(|()| file.sync_all());
    // Only reached if the device is resumed (or the write failed at once).
    match done {
        Ok(()) => console::warn("testd: hang: the fsync returned"),
        Err(e) => console::error(&format!("testd: hang: write {}", dev.display()), &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state_of("42 (a) b) Z 1 42"), Some('Z'));
        assert_eq!(state_of("7 (sleep) S 1 7"), Some('S'));
        assert_eq!(state_of("garbage"), None);
    }

    #[test]
    fn zombies_are_found_from_a_proc_tree() {
        let d = tempfile::tempdir().unwrap();
        for (pid, stat) in [("10", "10 (x) Z 1"), ("11", "11 (y) R 1"), ("self", "")] {
            std::fs::create_dir_all(d.path().join(pid)).unwrap();
            std::fs::write(d.path().join(pid).join("stat"), stat).unwrap();
        }
        assert_eq!(zombies(d.path()), vec![Pid::from_raw(10)]);
    }

    #[test]
    // The zombie is the point; waitpid below reaps it.
    #[allow(clippy::zombie_processes)]
    fn an_unreaped_child_shows_as_a_zombie_in_the_real_proc() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !zombies(Path::new("/proc")).contains(&pid) {
            assert!(std::time::Instant::now() < deadline, "no zombie seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = waitpid(pid, None);
        assert!(!zombies(Path::new("/proc")).contains(&pid));
    }

    #[test]
    fn requested_reads_the_mode_from_fw_cfg() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(requested(d.path()), None);
        let p = d.path().join(FW_CFG);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "orphan\n").unwrap();
        assert_eq!(requested(d.path()).as_deref(), Some("orphan"));
    }
}
