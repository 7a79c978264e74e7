//! The pool's controller lock: `.lock-<pool>.json` in the state directory, holder and
//! heartbeat, replaced atomically under an exclusive `flock` of `.lock-<pool>.flock`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::files::{read_json, unix_ms, write_json_atomic};
use super::{check_name, Inner, QemuError};

/// `.lock-<pool>.json`: who holds the pool's controller lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LockRecord {
    pub(super) holder: String,
    pub(super) heartbeat_unix_ms: u64,
}

impl Inner {
    pub(super) fn lock(&self, pool: &str, holder: &str, ttl: Duration) -> Result<bool, QemuError> {
        check_name("pool", pool)?;
        let guard_path = self.state_dir.join(format!(".lock-{pool}.flock"));
        let guard = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&guard_path)
            .map_err(|source| QemuError::Io {
                step: "open",
                path: guard_path.clone(),
                source,
            })?;
        // Held until the end of this call: read, decide and write as one step.
        let _guard = Flock::lock(guard, FlockArg::LockExclusive).map_err(|(_, source)| {
            QemuError::Flock {
                path: guard_path.clone(),
                source,
            }
        })?;
        let path = self.state_dir.join(format!(".lock-{pool}.json"));
        let now = unix_ms(SystemTime::now());
        let free = match read_json::<LockRecord>(&path)? {
            None => true,
            Some(held) if held.holder == holder => true,
            // A heartbeat from the future (the clock went back) counts as fresh.
            Some(held) => u128::from(now.saturating_sub(held.heartbeat_unix_ms)) >= ttl.as_millis(),
        };
        if free {
            write_json_atomic(
                &path,
                &LockRecord {
                    holder: holder.to_owned(),
                    heartbeat_unix_ms: now,
                },
            )?;
        }
        Ok(free)
    }
}
