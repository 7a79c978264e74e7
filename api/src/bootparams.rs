//! Kernel command-line parameters the builder writes into grub.cfg and stage 1 reads.
//!
//! `basalt.slot=a basalt.verity.root=<hex> basalt.verity.salt=<hex> basalt.verity.blocks=<n>`
//!
//! The slot names the root partition (`ROOT-A` / `ROOT-B` by GPT partition name). The
//! verity hash area starts right after the data blocks of that partition: one superblock
//! block in `veritysetup`'s format, then the hash tree, all in 4096-byte blocks.

use crate::layout::Partition;
use std::fmt;

/// dm-verity data and hash block size used by every basalt image.
pub const VERITY_BLOCK_SIZE: u64 = 4096;

/// An A/B root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// The slot's root partition.
    pub fn partition(self) -> Partition {
        match self {
            Slot::A => Partition::RootA,
            Slot::B => Partition::RootB,
        }
    }

    /// GPT partition name of the slot's root partition.
    pub fn partition_name(self) -> &'static str {
        self.partition().name()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// What stage 1 needs to open the verified root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verity {
    /// sha256 root hash, lowercase hex.
    pub root_hash: String,
    /// Salt, lowercase hex (may be empty).
    pub salt: String,
    /// Number of 4096-byte data blocks the hash tree covers.
    pub data_blocks: u64,
}

impl Verity {
    /// Offset in hash blocks of the hash tree from the start of the partition: the data,
    /// then one superblock block.
    pub fn hash_start_block(&self) -> u64 {
        self.data_blocks + 1
    }

    /// Length of the verified device in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * (VERITY_BLOCK_SIZE / 512)
    }
}

/// The basalt parameters of one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub slot: Slot,
    pub verity: Verity,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    #[error("kernel command line lacks `{0}`")]
    Missing(&'static str),
    #[error("kernel command line has a bad value for `{key}`: {value:?} ({why})")]
    Bad {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// How long a task may wait uninterruptibly (a stuck disk) during a trial boot before the
/// kernel's hung-task detector panics it: half the kernel's default of 120 s, so that a hang
/// is caught (between 60 and 120 s after it starts: the detector looks every 60 s) well
/// within the trial's own 300 s health budget, yet far above any wait of a healthy boot
/// (a SCSI command times out and is retried after 30 s; no boot step reads for a minute).
pub const TRIAL_HUNG_TASK_TIMEOUT_SECS: u64 = 60;
/// The kernel's own default of `kernel.hung_task_timeout_secs`
/// (`CONFIG_DEFAULT_HUNG_TASK_TIMEOUT`), restored once a trial slot is marked good.
pub const HUNG_TASK_TIMEOUT_SECS: u64 = 120;

/// Kernel arguments GRUB adds to the one-shot trial boot of a new slot, and to no other
/// boot, so that a kernel that hangs before PID1 can arm its watchdog panics, and the
/// panic reboots into GRUB's saved (good) slot. Names as Linux 6.1 takes them:
///
/// - `panic=10`: reboot 10 s after a panic, whatever the slot's own command line says;
/// - `softlockup_panic=1` (`__setup` in kernel/watchdog.c): a CPU stuck in the kernel for
///   20 s (2 × `watchdog_thresh`) panics;
/// - `nmi_watchdog=panic` (kernel/watchdog.c, `hardlockup_panic_setup`): a CPU stuck
///   with interrupts off panics, where the perf NMI hard-lockup detector runs; without a
///   PMU (QEMU under TCG) that detector is simply off and the word does nothing;
/// - `hung_task_panic=1` (an alias of `kernel.hung_task_panic`, fs/proc/proc_sysctl.c) and
///   `sysctl.kernel.hung_task_timeout_secs=60` (the `sysctl.` command-line form, Linux
///   5.8 and later, `do_sysctl_args`): a task blocked uninterruptibly for 60 s panics.
///   Both are applied by `do_sysctl_args`, after the initcalls and before PID1 starts.
///
/// Added after the slot's own arguments, so they win over its `panic=`.
pub const TRIAL_HANG_ARGS: &[&str] = &[
    "panic=10",
    "softlockup_panic=1",
    "nmi_watchdog=panic",
    "hung_task_panic=1",
    "sysctl.kernel.hung_task_timeout_secs=60",
];

/// Whether GRUB added [`TRIAL_HANG_ARGS`] to this command line (every one of them).
pub fn has_trial_hang_args(cmdline: &str) -> bool {
    TRIAL_HANG_ARGS
        .iter()
        .all(|a| cmdline.split_whitespace().any(|w| w == *a))
}

const SLOT: &str = "basalt.slot";
const ROOT: &str = "basalt.verity.root";
const SALT: &str = "basalt.verity.salt";
const BLOCKS: &str = "basalt.verity.blocks";

impl BootParams {
    /// Reads the parameters out of a whole kernel command line; other words are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, BootParamsError> {
        let get = |key: &'static str| {
            cmdline
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
                .next_back()
                .ok_or(BootParamsError::Missing(key))
        };
        let bad = |key, value: &str, why| BootParamsError::Bad {
            key,
            value: value.to_owned(),
            why,
        };
        let slot = match get(SLOT)? {
            "a" => Slot::A,
            "b" => Slot::B,
            other => return Err(bad(SLOT, other, "expected a or b")),
        };
        let root_hash = get(ROOT)?;
        if root_hash.len() != 64 || !is_lower_hex(root_hash) {
            return Err(bad(ROOT, root_hash, "expected 64 lowercase hex digits"));
        }
        let salt = get(SALT)?;
        if !salt.len().is_multiple_of(2) || salt.len() > 512 || !is_lower_hex(salt) {
            return Err(bad(SALT, salt, "expected up to 256 bytes as lowercase hex"));
        }
        let blocks = get(BLOCKS)?;
        let data_blocks = match blocks.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad(BLOCKS, blocks, "expected a positive block count")),
        };
        Ok(BootParams {
            slot,
            verity: Verity {
                root_hash: root_hash.to_owned(),
                salt: salt.to_owned(),
                data_blocks,
            },
        })
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for BootParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SLOT}={} {ROOT}={} {SALT}={} {BLOCKS}={}",
            self.slot.as_str(),
            self.verity.root_hash,
            self.verity.salt,
            self.verity.data_blocks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trial_hang_args_carry_the_trial_timeout_and_are_recognised_only_whole() {
        let timeout =
            format!("sysctl.kernel.hung_task_timeout_secs={TRIAL_HUNG_TASK_TIMEOUT_SECS}");
        assert!(TRIAL_HANG_ARGS.contains(&timeout.as_str()));
        let trial = format!("quiet panic=10 basalt.slot=b {}", TRIAL_HANG_ARGS.join(" "));
        assert!(has_trial_hang_args(&trial));
        assert!(!has_trial_hang_args("quiet panic=10 basalt.slot=a"));
        // An operator's own single setting is not GRUB's trial.
        assert!(!has_trial_hang_args(
            "quiet hung_task_panic=1 basalt.slot=a"
        ));
    }

    fn sample() -> BootParams {
        BootParams {
            slot: Slot::B,
            verity: Verity {
                root_hash: "ab".repeat(32),
                salt: "01ff".into(),
                data_blocks: 1234,
            },
        }
    }

    #[test]
    fn display_then_parse_round_trips_among_other_words() {
        let line = format!("console=ttyS0 {} quiet", sample());
        assert_eq!(BootParams::parse(&line), Ok(sample()));
    }

    #[test]
    fn hash_tree_starts_after_data_and_superblock() {
        assert_eq!(sample().verity.hash_start_block(), 1235);
        assert_eq!(sample().verity.data_sectors(), 1234 * 8);
    }

    #[test]
    fn errors_name_the_parameter() {
        let good = sample().to_string();
        let cases = [
            (good.replace("basalt.slot=b", ""), "basalt.slot"),
            (
                good.replace("basalt.slot=b", "basalt.slot=c"),
                "basalt.slot",
            ),
            (good.replace(&"ab".repeat(32), "abc"), "basalt.verity.root"),
            (good.replace("01ff", "1ff"), "basalt.verity.salt"),
            (good.replace("1234", "0"), "basalt.verity.blocks"),
            (good.replace("1234", "x"), "basalt.verity.blocks"),
        ];
        for (line, key) in cases {
            let err = BootParams::parse(&line).unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }
}
