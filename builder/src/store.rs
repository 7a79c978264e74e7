//! Content-addressed store of build intermediates under the cache (`build/<step>-<key>/`):
//! the key is a hash of everything the step's output depends on, so an entry is reused
//! only when nothing that feeds it changed. Entries appear by rename, never half-written.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub struct Store {
    root: PathBuf,
}

/// The key of a step: sha256 over its name, its inputs' identities and the builder's
/// own source fingerprint (see `build.rs`), so that changed builder code never reuses an
/// entry made by older code.
pub fn key(step: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(step.as_bytes());
    h.update([0u8]);
    h.update(env!("BASALT_BUILDER_FINGERPRINT").as_bytes());
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Store {
    pub fn open(cache_root: &Path) -> std::io::Result<Self> {
        let root = cache_root.join("build");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(cache_root.join("tmp"))?;
        Ok(Store { root })
    }

    fn entry(&self, step: &str, key: &str) -> PathBuf {
        self.root.join(format!("{step}-{}", &key[..32]))
    }

    /// The folder of a finished entry, if there is one.
    pub fn get(&self, step: &str, key: &str) -> Option<PathBuf> {
        let dir = self.entry(step, key);
        dir.join(".complete").is_file().then_some(dir)
    }

    /// Runs `make` into a fresh folder and publishes it as the entry; returns the entry's
    /// folder. On error nothing is published.
    pub fn put<E>(
        &self,
        step: &str,
        key: &str,
        make: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E>
    where
        E: From<std::io::Error>,
    {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{step}-"))
            .tempdir_in(&self.root)?;
        let _partial = crate::interrupt::register(tmp.path());
        make(tmp.path())?;
        std::fs::write(tmp.path().join(".complete"), key)?;
        let dir = self.entry(step, key);
        let staged = tmp.keep();
        if let Err(e) = std::fs::rename(&staged, &dir) {
            let _ = std::fs::remove_dir_all(&staged);
            // Another build published the same entry first: that one is as good.
            if !dir.join(".complete").is_file() {
                return Err(e.into());
            }
        }
        Ok(dir)
    }

    /// `get` or `put`; the flag says whether the entry was reused.
    pub fn get_or_make<E>(
        &self,
        step: &str,
        key: &str,
        make: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(PathBuf, bool), E>
    where
        E: From<std::io::Error>,
    {
        match self.get(step, key) {
            Some(dir) => Ok((dir, true)),
            None => self.put(step, key, make).map(|d| (d, false)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_made_once_then_reused_and_keys_separate_inputs() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(d.path()).expect("store");
        let k = key("rootfs", &["a", "b"]);
        assert_ne!(k, key("rootfs", &["ab"]));
        let mut calls = 0;
        for expect_reused in [false, true] {
            let (dir, reused) = store
                .get_or_make::<std::io::Error>("rootfs", &k, |out| {
                    calls += 1;
                    std::fs::write(out.join("x"), "1")
                })
                .expect("entry");
            assert_eq!(reused, expect_reused);
            assert_eq!(std::fs::read_to_string(dir.join("x")).expect("x"), "1");
        }
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_failed_step_publishes_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(d.path()).expect("store");
        let k = key("esp", &[]);
        let r = store.put::<std::io::Error>("esp", &k, |out| {
            std::fs::write(out.join("half"), "x")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert!(store.get("esp", &k).is_none());
        let left: Vec<_> = std::fs::read_dir(d.path().join("build"))
            .expect("dir")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
