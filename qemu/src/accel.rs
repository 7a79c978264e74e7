//! Which accelerator QEMU runs guests with, decided once per process by booting a probe guest.
//!
//! `/dev/kvm` existing is not enough: on the machines basalt is built on, nested KVM opens fine
//! and then hangs or aborts guests. So KVM is used only when a tiny guest, started with exactly
//! the arguments [`VmBuilder`](crate::VmBuilder) uses, prints to its serial port in time.

use std::fs::OpenOptions;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::HarnessError;
use crate::vm::VmBuilder;

/// `BASALT_ACCEL=kvm|tcg` skips the probe.
pub const ACCEL_ENV: &str = "BASALT_ACCEL";

const KVM_DEVICE: &str = "/dev/kvm";
const PROBE_TEXT: &str = "KVMOK";
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCG is roughly this many times slower than KVM at booting basalt.
const TCG_SLOWDOWN: u32 = 6;

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: slow, works everywhere.
    Tcg,
}

impl Accel {
    /// The name QEMU's `accel=` option takes.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// A timeout tuned for KVM, stretched for TCG.
    pub fn scale(self, base: Duration) -> Duration {
        match self {
            Accel::Kvm => base,
            Accel::Tcg => base.saturating_mul(TCG_SLOWDOWN),
        }
    }

    /// The `-machine`/`-cpu` arguments for this accelerator.
    pub fn machine_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-machine", "q35,accel=kvm", "-cpu", "host"],
            Accel::Tcg => &["-machine", "q35,accel=tcg"],
        }
    }
}

/// The accelerator for this process, decided on first use and cached.
///
/// `BASALT_ACCEL=kvm|tcg` wins. Otherwise KVM is chosen only when `/dev/kvm` opens read-write
/// and a probe guest (see [`boot_disk`]) booted under KVM prints to COM1 within 10 s; QEMU is
/// killed after the probe either way. The choice and its reason go to stderr once.
pub fn detect_accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| {
        let (accel, reason) = choose_accel();
        eprintln!("basalt-qemu: accelerator {} ({reason})", accel.name());
        accel
    })
}

fn choose_accel() -> (Accel, String) {
    match std::env::var(ACCEL_ENV).as_deref() {
        Ok("kvm") => return (Accel::Kvm, format!("{ACCEL_ENV}=kvm")),
        Ok("tcg") => return (Accel::Tcg, format!("{ACCEL_ENV}=tcg")),
        Ok(other) => eprintln!("basalt-qemu: ignoring {ACCEL_ENV}={other:?} (want kvm or tcg)"),
        Err(_) => {}
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(KVM_DEVICE) {
        return (Accel::Tcg, format!("{KVM_DEVICE}: {e}"));
    }
    match probe(Accel::Kvm, PROBE_TIMEOUT) {
        Ok(took) => (Accel::Kvm, format!("KVM probe guest ran in {took:.1?}")),
        Err(e) => (Accel::Tcg, format!("KVM probe guest failed: {e}")),
    }
}

/// Boots the probe guest under `accel`; returns how long it took to print.
pub(crate) fn probe(accel: Accel, timeout: Duration) -> Result<Duration, HarnessError> {
    let dir = tempfile::Builder::new()
        .prefix("basalt-accel-probe-")
        .tempdir()
        .map_err(HarnessError::TempDir)?;
    let image = dir.path().join("probe.img");
    std::fs::write(&image, boot_disk(PROBE_TEXT)).map_err(|source| HarnessError::Io {
        step: "write probe image",
        path: image.clone(),
        source,
    })?;
    let start = Instant::now();
    // Dropping the Vm kills QEMU, also when the guest hung.
    let mut vm = VmBuilder::new(&image).accel(accel).spawn()?;
    // The probe guest prints its text without a newline, and `wait_for` waits for whole
    // lines: look for the bytes themselves.
    vm.wait_until(timeout, |serial| serial.contains(PROBE_TEXT).then_some(()))?;
    Ok(start.elapsed())
}

const SECTOR: usize = 512;
/// SeaBIOS will not boot a disk smaller than one CHS cylinder (16 heads x 63 sectors).
const BOOT_DISK_SIZE: usize = 1 << 20;
const LOAD_ADDRESS: u16 = 0x7c00;

/// Real-mode code at 0x7c00: print the NUL-terminated string that follows to COM1, then halt.
const PRINT_AND_HALT: [u8; 23] = [
    0xfa, // cli
    0xfc, // cld
    0x31, 0xc0, // xor ax, ax
    0x8e, 0xd8, // mov ds, ax
    0xba, 0xf8, 0x03, // mov dx, 0x3f8          ; COM1 data port
    0xbe, 0x00, 0x00, // mov si, <message>       ; patched below
    0xac, // next: lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz halt
    0xee, // out dx, al
    0xeb, 0xf8, // jmp next
    0xf4, // halt: hlt
    0xeb, 0xfd, // jmp halt
];
const MESSAGE_OPERAND: usize = 10;

/// The longest message [`boot_disk`] keeps.
pub const BOOT_MESSAGE_MAX: usize = SECTOR - 2 - PRINT_AND_HALT.len() - 1;

/// A 1 MiB raw disk image whose boot sector writes `message` to COM1 and halts.
///
/// This is the accelerator probe guest; tests use it as the smallest bootable image. Messages
/// longer than [`BOOT_MESSAGE_MAX`] bytes are cut.
pub fn boot_disk(message: &str) -> Vec<u8> {
    let mut disk = vec![0u8; BOOT_DISK_SIZE];
    let code = PRINT_AND_HALT.len();
    disk[..code].copy_from_slice(&PRINT_AND_HALT);
    let operand = (LOAD_ADDRESS + code as u16).to_le_bytes();
    disk[MESSAGE_OPERAND..MESSAGE_OPERAND + 2].copy_from_slice(&operand);
    let message = &message.as_bytes()[..message.len().min(BOOT_MESSAGE_MAX)];
    // The bytes after the message are still zero: that is its terminator.
    disk[code..code + message.len()].copy_from_slice(message);
    disk[SECTOR - 2..SECTOR].copy_from_slice(&[0x55, 0xaa]);
    disk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_disk_is_a_bootable_sector_with_the_message() {
        let disk = boot_disk("hello\r\n");
        assert_eq!(disk.len(), BOOT_DISK_SIZE);
        assert_eq!(&disk[510..512], &[0x55, 0xaa]);
        let at = usize::from(u16::from_le_bytes([disk[10], disk[11]]) - LOAD_ADDRESS);
        assert_eq!(&disk[at..at + 8], b"hello\r\n\0");
    }

    #[test]
    fn boot_disk_cuts_long_messages_and_keeps_the_signature() {
        let disk = boot_disk(&"x".repeat(1000));
        assert_eq!(&disk[510..512], &[0x55, 0xaa]);
        assert_eq!(disk[509], 0, "message must stay NUL-terminated");
    }

    #[test]
    fn scale_stretches_only_tcg() {
        let base = Duration::from_secs(10);
        assert_eq!(Accel::Kvm.scale(base), base);
        assert_eq!(Accel::Tcg.scale(base), Duration::from_secs(60));
    }

    #[test]
    fn probe_guest_runs_under_tcg() -> anyhow::Result<()> {
        let took = probe(Accel::Tcg, Accel::Tcg.scale(PROBE_TIMEOUT))?;
        assert!(took < Accel::Tcg.scale(PROBE_TIMEOUT));
        Ok(())
    }

    #[test]
    fn detect_accel_is_decided_once() {
        let first = detect_accel();
        assert_eq!(detect_accel(), first);
        if OpenOptions::new()
            .read(true)
            .write(true)
            .open(KVM_DEVICE)
            .is_err()
            && std::env::var_os(ACCEL_ENV).is_none()
        {
            assert_eq!(first, Accel::Tcg);
        }
    }
}
