//! QEMU as processes: running its tools, its machine arguments, and finding, checking and
//! stopping a VM's daemonized QEMU through `/proc`.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{QemuError, VmRecord, EXIT_POLL, EXIT_TIMEOUT, PIDFILE_TIMEOUT, PID_FILE};

/// A path as the value of a QEMU `key=value,…` option, where a literal comma is doubled.
pub(super) fn option_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

pub(super) fn free_port(vm: &str) -> Result<u16, QemuError> {
    let io_error = |source| QemuError::Io {
        step: "find a free port for the node API of VM",
        path: vm.into(),
        source,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error)?;
    Ok(listener.local_addr().map_err(io_error)?.port())
}

/// Runs a QEMU tool to completion; a failure carries the command line and its stderr.
pub(super) fn run(vm: &str, program: &'static str, mut command: Command) -> Result<(), QemuError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => QemuError::ToolMissing { program },
            _ => QemuError::Spawn {
                vm: vm.to_owned(),
                program,
                source,
            },
        })?;
    if output.status.success() {
        return Ok(());
    }
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Err(QemuError::Tool {
        vm: vm.to_owned(),
        command: format!("{program} {}", args.join(" ")),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

pub(super) fn read_pidfile(vm: &str, path: &Path) -> Result<u32, QemuError> {
    let deadline = Instant::now() + PIDFILE_TIMEOUT;
    loop {
        if let Some(pid) = fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(QemuError::Pidfile {
                vm: vm.to_owned(),
                path: path.to_path_buf(),
            });
        }
        std::thread::sleep(EXIT_POLL);
    }
}

/// The pid of this VM's running QEMU: the record's, else the pid file's, and only when
/// `/proc` confirms it.
pub(super) fn live_pid(dir: &Path, record: Option<&VmRecord>) -> Option<u32> {
    let from_file = || {
        fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    record
        .and_then(|r| r.pid)
        .or_else(from_file)
        .filter(|&pid| is_vm_qemu(Path::new("/proc"), pid, dir))
}

/// Whether process `pid` is QEMU started with `dir`'s pid file. A process that has exited
/// (also a zombie, whose command line is empty) is not.
pub(super) fn is_vm_qemu(proc_root: &Path, pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = fs::read(proc_root.join(pid.to_string()).join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_qemu = args.first().is_some_and(|argv0| {
        Path::new(std::ffi::OsStr::from_bytes(argv0))
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"qemu-system"))
    });
    let pidfile = dir.join(PID_FILE);
    let pidfile = pidfile.as_os_str().as_bytes();
    is_qemu
        && args
            .windows(2)
            .any(|w| w[0] == b"-pidfile" && w[1] == pidfile)
}

/// SIGTERM, then SIGKILL; returns once `pid` is no longer this VM's QEMU.
pub(super) fn stop_qemu(vm: &str, dir: &Path, pid: u32) -> Result<(), QemuError> {
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let target = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        match kill(target, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => {
                return Err(QemuError::Kill {
                    vm: vm.to_owned(),
                    pid,
                    source,
                })
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while is_vm_qemu(Path::new("/proc"), pid, dir) {
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(EXIT_POLL);
        }
        if !is_vm_qemu(Path::new("/proc"), pid, dir) {
            tracing::debug!(vm, pid, %signal, "QEMU exited");
            return Ok(());
        }
    }
    Err(QemuError::Stuck {
        vm: vm.to_owned(),
        pid,
    })
}
