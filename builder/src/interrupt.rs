//! Ctrl-C during a build: the partial work folders registered here are removed before the
//! process exits, so an interrupted build leaves nothing behind (outputs only ever appear
//! by rename at the very end).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PARTIAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A folder to remove if the build is interrupted, for as long as the guard lives.
pub struct Registered(PathBuf);

pub fn register(path: &Path) -> Registered {
    if let Ok(mut v) = PARTIAL.lock() {
        v.push(path.to_path_buf());
    }
    Registered(path.to_path_buf())
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut v) = PARTIAL.lock() {
            v.retain(|p| p != &self.0);
        }
    }
}

/// Installs the SIGINT/SIGTERM handler (CLI only; tests keep the default).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        let paths = PARTIAL.lock().map(|v| v.clone()).unwrap_or_default();
        for p in &paths {
            let _ = std::fs::remove_dir_all(p);
        }
        eprintln!(
            "basalt: interrupted; removed {} partial work folder(s), no output written",
            paths.len()
        );
        std::process::exit(130);
    });
}
