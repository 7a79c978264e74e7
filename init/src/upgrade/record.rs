//! What the node remembers of its slots and upgrades, on STATE: one small JSON file,
//! replaced whole (temp file, fsync, rename) at each change, so a power cut leaves the
//! old record or the new one. GRUB's environment block says which slot boots; this
//! record says what is in the slots and why the last rollback happened.

use basalt_api::node::Rollback;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Under STATE (mounted on `/var`).
pub const PATH: &str = "var/lib/basalt/upgrade.json";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: not a record of upgrades")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Record {
    /// What each slot (`a`, `b`) holds, as far as this node wrote or booted it.
    #[serde(default)]
    pub slots: BTreeMap<String, SlotRecord>,
    /// The slot an upgrade wrote and armed, until it is marked good or given up.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Why a trial boot gave up, written by that boot just before it rebooted.
    #[serde(default)]
    pub trial_failure: Option<TrialFailure>,
    #[serde(default)]
    pub last_rollback: Option<Rollback>,
    #[serde(default)]
    pub upgrades: u64,
    #[serde(default)]
    pub rollbacks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub version: Option<String>,
    pub root_hash: Option<String>,
    /// Booted and found healthy at least once (or the default slot at first sight).
    pub good: bool,
    /// Given up by a rollback.
    #[serde(default)]
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub slot: String,
    pub version: String,
    pub root_hash: String,
    pub at: u64,
    /// Set once `next_entry` points at the slot: before that, a boot that finds the
    /// record pending knows the upgrade was interrupted, not tried.
    #[serde(default)]
    pub armed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialFailure {
    pub slot: String,
    pub reason: String,
    pub at: u64,
}

pub fn path(root: &Path) -> PathBuf {
    root.join(PATH)
}

/// The record, or an empty one when there is none yet.
pub fn load(root: &Path) -> Result<Record, RecordError> {
    let p = path(root);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RecordError::Parse(p, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
        Err(e) => Err(RecordError::Read(p, e)),
    }
}

pub fn save(root: &Path, record: &Record) -> Result<(), RecordError> {
    let p = path(root);
    let mut bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| RecordError::Write(p.clone(), std::io::Error::other(e)))?;
    bytes.push(b'\n');
    crate::atomic_file::write(&p, &bytes).map_err(|e| RecordError::Write(p, e))
}

/// Seconds since the epoch, by the node's clock.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_record_is_empty_and_a_saved_one_reads_back() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(root.path()).expect("load"), Record::default());
        let r = Record {
            pending: Some(Pending {
                slot: "b".into(),
                version: "2.0.0".into(),
                root_hash: "ab".repeat(32),
                at: 5,
                armed: true,
            }),
            upgrades: 3,
            ..Record::default()
        };
        save(root.path(), &r).expect("save");
        assert_eq!(load(root.path()).expect("load"), r);
        std::fs::write(path(root.path()), "{").expect("write");
        let err = load(root.path()).unwrap_err();
        assert!(err.to_string().contains("upgrade.json"), "{err}");
    }
}
