//! The one error type of the harness: a variant per failing step.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why the harness could not start, drive or observe a VM.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A QEMU program (`qemu-system-x86_64`, `qemu-img`) is not on `PATH`.
    #[error("{program} not found on PATH (install the qemu-system-x86 and qemu-utils packages)")]
    QemuNotFound { program: &'static str },

    /// The scratch directory of a VM could not be created.
    #[error("cannot create a temporary directory for the VM")]
    TempDir(#[source] io::Error),

    /// The copy-on-write overlay over `image` could not be created.
    #[error("cannot create a qcow2 overlay over {image}")]
    Overlay {
        image: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file the VM needs could not be prepared (`step` says which).
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// QEMU could not be started.
    #[error("cannot start {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },

    /// Asking the OS whether QEMU is still running failed.
    #[error("cannot check whether QEMU is still running")]
    Wait(#[source] io::Error),

    /// The condition was not met in time; QEMU is still running.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// QEMU exited before the condition was met.
    #[error("QEMU exited ({status}) while waiting for {what}{}", stderr_suffix(.stderr))]
    Exited {
        what: String,
        status: ExitStatus,
        stderr: String,
    },

    /// No OVMF firmware: both places it is looked for failed.
    #[error("no OVMF firmware: ovmf-prebuilt: {prebuilt}; debian ovmf package: {debian}")]
    Ovmf { prebuilt: String, debian: String },
}

fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {stderr}")
    }
}
