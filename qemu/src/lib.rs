//! QEMU harness for basalt's end-to-end tests and for `basalt run`.
//!
//! It starts `qemu-system-x86_64` (q35, SeaBIOS or OVMF) on a disk image without ever writing
//! the image (each VM boots a throwaway qcow2 overlay), captures the guest's serial console to a
//! file, and lets a test poll that log with timeouts. It decides once per process whether KVM
//! really works here ([`detect_accel`]) and finds OVMF ([`ovmf`]).
//!
//! Boundary: this crate knows QEMU, firmware and serial logs — not basalt's images, API or boot
//! milestones; the tests under `tests/` bring those.
//!
//! ```no_run
//! # fn main() -> Result<(), basalt_qemu::HarnessError> {
//! use std::time::Duration;
//! use basalt_qemu::{Firmware, VmBuilder};
//!
//! let mut vm = VmBuilder::new("target/basalt.img").firmware(Firmware::Uefi).spawn()?;
//! let timeout = vm.accel().scale(Duration::from_secs(30));
//! let line = vm.wait_for("basalt: ready", timeout)?;
//! # let _ = line;
//! # Ok(())
//! # }
//! ```

mod accel;
mod error;
mod firmware;
mod overlay;
mod vm;

pub use accel::{boot_disk, detect_accel, Accel, ACCEL_ENV, BOOT_MESSAGE_MAX};
pub use error::HarnessError;
pub use firmware::{ovmf, Firmware, Ovmf, OVMF_CACHE_ENV, OVMF_OFFLINE_ENV};
pub use vm::{node_devices, Vm, VmBuilder};
