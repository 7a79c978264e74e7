//! The VM's files: JSON read back, and written atomically (temporary file, sync, rename).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::QemuError;

/// A JSON file, or `None` when it does not exist.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, QemuError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(QemuError::Io {
                step: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| QemuError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `value` to a temporary file beside `path`, syncs it and renames it over `path`:
/// a reader sees the old content or the new, never a torn one.
pub(super) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), QemuError> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| QemuError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_private(&tmp, &json).and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| QemuError::Io {
            step: "rename into place",
            path: path.to_path_buf(),
            source,
        })
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Creates (or truncates) `path` with mode 0600 and writes and syncs `bytes`.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), QemuError> {
    let io_error = |source| QemuError::Io {
        step: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut file: File = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
