//! basalt-floor: the init of `basalt bench boot`'s floor guest.
//!
//! Booted as `/init` of an initramfs that holds nothing else, with the image's own kernel,
//! it prints one line with the time since the kernel started and powers the VM off. That
//! is as early as any init can say "I run" on this kernel and VM: the floor the boot
//! benchmark compares basalt's milestones with.
//!
//! Boundary: no mounts, no modules, no devices beyond the console the kernel opened.
//! The marker's format is parsed by `basalt_builder::bench::floor::parse_marker`.

use nix::sys::reboot::{reboot, RebootMode};
use nix::time::{clock_gettime, ClockId};
use std::io::Write;

/// The line is `[basalt-floor] init t=<seconds since kernel start, 3 decimals>`.
const MARKER: &str = "[basalt-floor] init t=";

fn main() {
    // CLOCK_BOOTTIME is the clock basalt-init's milestones use: the two compare directly.
    let line = match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => format!(
            "{MARKER}{:.3}\n",
            ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9
        ),
        Err(e) => format!("[basalt-floor] error: clock_gettime: {e}\n"),
    };
    let mut out = std::io::stdout().lock();
    // Best effort: with no console there is nobody to tell.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
    drop(out);
    // Nothing was written to any disk: no sync is needed before powering off.
    if let Some(e) = reboot(RebootMode::RB_POWER_OFF).err() {
        let _ = writeln!(std::io::stdout(), "[basalt-floor] error: power off: {e}");
    }
    // PID1 must not exit (the kernel would panic): wait for the benchmark to kill QEMU.
    loop {
        std::thread::park();
    }
}
