//! The hardware watchdog a trial boot arms, where the machine has one: `/dev/watchdog`
//! after its driver is loaded (`i6300esb` for QEMU's `-device i6300esb`, where the kernel
//! builds it; Debian's cloud kernel does not, and then there is none). Fed while the trial
//! waits; closed with the magic `V` once the slot is marked good, so that it stops. A
//! trial that fails stops feeding it: if the orderly reboot hangs, it resets the machine.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Drivers tried, in order, before `/dev/watchdog` is opened.
pub const DRIVERS: &[&str] = &["i6300esb"];
/// The timeout asked of the device: a PID1 that stops feeding it for this long is reset.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How often it is fed.
pub const FEED_EVERY: Duration = Duration::from_secs(5);

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

pub struct Watchdog {
    file: File,
    /// What status shows: the device and its driver's identity.
    pub name: String,
}

impl Watchdog {
    /// Loads a driver if one is there and opens `/dev/watchdog`; `None` without one.
    pub fn arm(root: &Path) -> Option<Watchdog> {
        if let Ok(modules) = crate::kmod::modprobe::Modules::running(root) {
            for d in DRIVERS {
                let _ = modules.probe(&mut crate::sys::Real, root, d);
            }
        }
        let dev = root.join("dev/watchdog");
        // The device node appears through devtmpfs once the driver registered it.
        let mut file = None;
        for _ in 0..20 {
            if let Ok(f) = File::options().write(true).open(&dev) {
                file = Some(f);
                break;
            }
            if !dev.exists() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let file = file?;
        let mut secs = TIMEOUT.as_secs() as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int, which `secs` is.
        let _ = unsafe { wdioc_settimeout(file.as_raw_fd(), &mut secs) };
        let identity = std::fs::read_to_string(root.join("sys/class/watchdog/watchdog0/identity"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown driver".into());
        Some(Watchdog {
            file,
            name: format!("/dev/watchdog ({identity}, {secs} s)"),
        })
    }

    pub fn feed(&mut self) {
        let _ = self.file.write_all(b"\0");
    }

    /// The magic close: the driver stops the timer when `V` is the last byte written.
    pub fn disarm(mut self) {
        let _ = self.file.write_all(b"V");
        let _ = self.file.flush();
    }
}
