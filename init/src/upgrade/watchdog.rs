//! The watchdog a trial boot arms: `/dev/watchdog` once a driver is loaded. First the
//! hardware's (`i6300esb` for QEMU's `-device i6300esb`, where the kernel builds it);
//! when that gives no `/dev/watchdog` (Debian's cloud kernel does not build i6300esb),
//! `softdog`, the kernel's software watchdog (a module in that kernel, shipped by the
//! builder's default module list): a kernel timer that restarts the machine when PID1
//! stops feeding it. It catches a hung PID1, not a hung kernel, which a panic (`panic=10`)
//! or the hardware's watchdog, where there is one, covers.
//!
//! Fed while the trial waits; closed with the magic `V` once the slot is marked good, so
//! that it stops. A trial that fails stops feeding it: if the orderly reboot hangs, it
//! resets the machine.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Drivers tried, in order, until `/dev/watchdog` appears: the hardware's, then the
/// software one.
pub const DRIVERS: &[&str] = &["i6300esb", SOFTDOG];
pub const SOFTDOG: &str = "softdog";
/// The timeout asked of the device: a PID1 that stops feeding it for this long is reset.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How often it is fed.
pub const FEED_EVERY: Duration = Duration::from_secs(5);
/// How long the device node may take to appear once its driver is loaded (devtmpfs).
const APPEAR: Duration = Duration::from_secs(1);

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

pub struct Watchdog {
    file: File,
    /// What status shows: the device and its driver's identity.
    pub name: String,
}

impl Watchdog {
    /// Loads the drivers in [`DRIVERS`] until `/dev/watchdog` is there, and opens it;
    /// `None` without one.
    pub fn arm(root: &Path) -> Option<Watchdog> {
        let modules = crate::kmod::modprobe::Modules::running(root).ok();
        Self::arm_with(root, &mut |driver| {
            modules
                .as_ref()
                .is_some_and(|m| m.probe(&mut crate::sys::Real, root, driver).is_ok())
        })
    }

    /// [`Watchdog::arm`] with `probe` loading a driver (true when it loaded).
    pub fn arm_with(root: &Path, probe: &mut dyn FnMut(&str) -> bool) -> Option<Watchdog> {
        let dev = root.join("dev/watchdog");
        let mut file = None;
        for driver in DRIVERS {
            if dev.exists() {
                break;
            }
            if !probe(driver) {
                continue;
            }
            // The node appears through devtmpfs once the driver registered it.
            let start = std::time::Instant::now();
            while !dev.exists() && start.elapsed() < APPEAR {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for _ in 0..20 {
            match File::options().write(true).open(&dev) {
                Ok(f) => {
                    file = Some(f);
                    break;
                }
                Err(_) if !dev.exists() => return None,
                // Busy (another opener) or not ready yet.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A root whose "driver" `loads` makes `dev/watchdog` (a plain file here) and its
    /// identity appear, as the kernel's devtmpfs and sysfs would.
    fn root_with(loads: &'static str) -> (tempfile::TempDir, impl FnMut(&str) -> bool) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("dev")).expect("dev");
        let root = dir.path().to_path_buf();
        let probe = move |driver: &str| {
            if driver != loads {
                return false;
            }
            let sys = root.join("sys/class/watchdog/watchdog0");
            std::fs::create_dir_all(&sys).expect("sys");
            std::fs::write(sys.join("identity"), format!("{driver} identity\n")).expect("id");
            std::fs::write(root.join("dev/watchdog"), b"").expect("dev");
            true
        };
        (dir, probe)
    }

    #[test]
    fn without_the_hardware_s_driver_the_trial_arms_softdog_and_feeds_it() {
        let (dir, mut load) = root_with(SOFTDOG);
        let mut tried = Vec::new();
        let mut dog = Watchdog::arm_with(dir.path(), &mut |d| {
            tried.push(d.to_owned());
            load(d)
        })
        .expect("armed");
        assert_eq!(tried, ["i6300esb", "softdog"]);
        assert!(dog.name.contains("softdog identity"), "{}", dog.name);
        dog.feed();
        dog.disarm();
        assert_eq!(
            std::fs::read(dir.path().join("dev/watchdog")).expect("dev"),
            b"\0V",
            "fed once, then the magic close"
        );
    }

    #[test]
    fn the_hardware_s_watchdog_is_preferred_and_none_is_none() {
        let (dir, mut load) = root_with("i6300esb");
        let mut tried = Vec::new();
        let dog = Watchdog::arm_with(dir.path(), &mut |d| {
            tried.push(d.to_owned());
            load(d)
        })
        .expect("armed");
        assert_eq!(tried, ["i6300esb"], "softdog is not loaded beside it");
        assert!(dog.name.contains("i6300esb"), "{}", dog.name);

        let (dir, _) = root_with("nothing");
        assert!(Watchdog::arm_with(dir.path(), &mut |_| false).is_none());
    }
}
