//! The kernel's hang detection of a trial boot, turned off once the slot is good.
//!
//! GRUB boots a trial with [`TRIAL_HANG_ARGS`] (see `builder/src/grub.rs`): a kernel that
//! hangs before PID1 arms its watchdog, or PID1 stuck in the kernel, panics, and
//! `panic=10` reboots into the old slot. Once the slot is marked good those panics are
//! only a risk (a K3s workload's stuck NFS read must not reboot a node), so PID1 writes
//! the kernel's defaults back: `hung_task_panic`, `softlockup_panic` and
//! `hardlockup_panic` 0, `hung_task_timeout_secs` 120.
//!
//! Only when this boot's command line carries GRUB's trial arguments: on any other boot
//! (a normal one) nothing is written, so an operator's own `hung_task_panic=1` on a
//! slot's command line stays.

use basalt_api::bootparams::{has_trial_hang_args, HUNG_TASK_TIMEOUT_SECS, TRIAL_HANG_ARGS};
use std::path::{Path, PathBuf};

/// Where the settings are, under the root.
const DIR: &str = "proc/sys/kernel";

/// The settings the trial arguments change, and the value each has after the trial.
pub fn settings() -> [(&'static str, String); 4] {
    [
        ("hung_task_panic", "0".into()),
        ("softlockup_panic", "0".into()),
        ("hardlockup_panic", "0".into()),
        ("hung_task_timeout_secs", HUNG_TASK_TIMEOUT_SECS.to_string()),
    ]
}

/// One setting to write back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub name: &'static str,
    pub path: PathBuf,
    pub value: String,
}

/// What turning them off would write under `root`: nothing unless `/proc/cmdline` carries
/// the trial arguments; then each setting whose file is there and whose value differs
/// from its default (a setting the kernel does not have, `hardlockup_panic` without a
/// hard-lockup detector, is left out).
pub fn plan(root: &Path) -> Vec<Write> {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    if !has_trial_hang_args(&cmdline) {
        return Vec::new();
    }
    settings()
        .into_iter()
        .filter_map(|(name, value)| {
            let path = root.join(DIR).join(name);
            match std::fs::read_to_string(&path) {
                Ok(now) if now.trim() == value => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                // Another value, or unreadable: written (a failure is then reported).
                _ => Some(Write { name, path, value }),
            }
        })
        .collect()
}

/// What [`disarm`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Disarmed {
    /// `name=value` written.
    pub written: Vec<String>,
    /// `name: error` of the writes that failed.
    pub failed: Vec<String>,
}

impl Disarmed {
    /// The console line, or `None` when nothing was to be done (a normal boot).
    pub fn line(&self) -> Option<String> {
        if self.written.is_empty() && self.failed.is_empty() {
            return None;
        }
        let mut line = format!(
            "upgrade: the trial's kernel hang detection is off: {}",
            if self.written.is_empty() {
                "nothing written".to_owned()
            } else {
                self.written.join(" ")
            }
        );
        if !self.failed.is_empty() {
            line.push_str(&format!("; could not write {}", self.failed.join(", ")));
        }
        Some(line)
    }
}

/// Writes the defaults back (see [`plan`]); a failed write is reported, not fatal.
pub fn disarm(root: &Path) -> Disarmed {
    let mut out = Disarmed::default();
    for w in plan(root) {
        match std::fs::write(&w.path, format!("{}\n", w.value)) {
            Ok(()) => out.written.push(format!("{}={}", w.name, w.value)),
            Err(e) => out
                .failed
                .push(format!("{} ({}): {e}", w.name, w.path.display())),
        }
    }
    out
}

/// [`disarm`], said on the console: one line when something was done, a warning when a
/// write failed, nothing on a normal boot.
pub fn disarm_and_say(root: &Path) {
    let done = disarm(root);
    if let Some(line) = done.line() {
        if done.failed.is_empty() {
            crate::pid1::console::info(&line);
        } else {
            crate::pid1::console::warn(&line);
        }
    }
}

/// The arguments, for messages.
pub fn args() -> String {
    TRIAL_HANG_ARGS.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with `cmdline` and the kernel's settings as a trial boot leaves them.
    fn root(cmdline: &str, settings: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join(DIR)).expect("mkdir");
        std::fs::write(d.path().join("proc/cmdline"), cmdline).expect("cmdline");
        for (name, value) in settings {
            std::fs::write(d.path().join(DIR).join(name), format!("{value}\n")).expect("w");
        }
        d
    }

    fn read(d: &tempfile::TempDir, name: &str) -> String {
        std::fs::read_to_string(d.path().join(DIR).join(name))
            .expect("read")
            .trim()
            .to_owned()
    }

    const ARMED: &[(&str, &str)] = &[
        ("hung_task_panic", "1"),
        ("softlockup_panic", "1"),
        ("hardlockup_panic", "1"),
        ("hung_task_timeout_secs", "60"),
    ];

    #[test]
    fn a_trial_boot_marked_good_gets_the_kernel_defaults_back() {
        let d = root(&format!("quiet basalt.slot=b {}\n", args()), ARMED);
        let done = disarm(d.path());
        assert_eq!(done.failed, Vec::<String>::new());
        assert_eq!(
            done.written,
            [
                "hung_task_panic=0",
                "softlockup_panic=0",
                "hardlockup_panic=0",
                "hung_task_timeout_secs=120"
            ]
        );
        for (name, want) in [
            ("hung_task_panic", "0"),
            ("softlockup_panic", "0"),
            ("hardlockup_panic", "0"),
            ("hung_task_timeout_secs", "120"),
        ] {
            assert_eq!(read(&d, name), want, "{name}");
        }
        let line = done.line().expect("a line");
        assert!(line.contains("hung_task_timeout_secs=120"), "{line}");
        // Done once: a second look finds nothing to write.
        assert_eq!(plan(d.path()), Vec::new());
    }

    #[test]
    fn a_normal_boot_writes_nothing_even_with_an_operators_own_settings() {
        let d = root("quiet panic=10 hung_task_panic=1 basalt.slot=a\n", ARMED);
        let done = disarm(d.path());
        assert_eq!(done, Disarmed::default());
        assert_eq!(done.line(), None);
        assert_eq!(read(&d, "hung_task_panic"), "1");
        assert_eq!(read(&d, "hung_task_timeout_secs"), "60");
    }

    #[test]
    fn settings_the_kernel_lacks_are_skipped_and_a_failed_write_is_reported() {
        // No hard-lockup detector (no hardlockup_panic); softlockup_panic already 0;
        // hung_task_panic cannot be written (a directory stands in for it).
        let d = root(
            &format!("basalt.slot=b {}", args()),
            &[("softlockup_panic", "0"), ("hung_task_timeout_secs", "60")],
        );
        std::fs::create_dir(d.path().join(DIR).join("hung_task_panic")).expect("mkdir");
        let done = disarm(d.path());
        assert_eq!(done.written, ["hung_task_timeout_secs=120"]);
        assert_eq!(done.failed.len(), 1, "{:?}", done.failed);
        assert!(
            done.failed[0].starts_with("hung_task_panic"),
            "{:?}",
            done.failed
        );
        let line = done.line().expect("a line");
        assert!(line.contains("could not write hung_task_panic"), "{line}");
        assert!(!d.path().join(DIR).join("hardlockup_panic").exists());
    }
}
