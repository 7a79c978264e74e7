//! The double's stand-in for the agent's airgap image import, modelled on K3s's
//! `pkg/agent/containerd` (`preloadImages`, and the image watcher and its import cache
//! in `watcher.go`, k3s-io/k3s#12237, #14266, #14284). **Not K3s**: there is no
//! containerd; an "import" reads the whole tarball, which is the part of K3s's import
//! that scales with the bundle, and unpacks nothing.
//!
//! What K3s does, and the double does the same way:
//! - after it has its config from the server and has started containerd, and before the
//!   kubelet, the agent imports every file of `<data-dir>/agent/images/` whose name ends
//!   in an archive suffix ([`SUPPORTED`]; `.txt` lists images to pull), in name order;
//! - with `<images>/.cache.json` present (K3s ≥ 1.30.13, 1.31.9, 1.32.5, 1.33.1), it
//!   records each imported file under its path with its size, mtime (`modTime`, Go's
//!   RFC 3339) and image names, and skips a file whose entry still matches. K3s never
//!   creates the file: it writes it back truncated, without `O_CREATE`, so without it
//!   the cache is off and everything is imported at every start. An empty file is an
//!   empty cache. Entries of files no longer there are dropped.
//!
//! The double imports again on any change of size or mtime (K3s since k3s-io/k3s#14284:
//! a change of size, or a newer mtime).

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::LINE_PREFIX;

/// K3s's import cache, in the images folder.
pub const IMPORT_CACHE: &str = ".cache.json";

/// The suffixes K3s imports (wharfie's `tarfile.SupportedExtensions`, and `.txt`).
pub const SUPPORTED: &[&str] = &[
    ".tar", ".tar.lz4", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".txt",
];

/// `<data-dir>/agent/images`.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("agent/images")
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Imported {
        path: PathBuf,
        bytes: u64,
        took: Duration,
    },
    /// Its cache entry matched: not read.
    Skipped { path: PathBuf },
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Whether `.cache.json` existed.
    pub cache: bool,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// The double's lines: one per file, then a summary.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Imported { path, bytes, took } => format!(
                    "{LINE_PREFIX} images: imported {} ({bytes} bytes read in {} ms; a double: \
                     no containerd)",
                    path.display(),
                    took.as_millis()
                ),
                Outcome::Skipped { path } => format!(
                    "{LINE_PREFIX} images: skipped {}: unchanged since its import ({IMPORT_CACHE})",
                    path.display()
                ),
            })
            .collect();
        let imported = self
            .outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Imported { .. }))
            .count();
        lines.push(format!(
            "{LINE_PREFIX} images: cache {}, {imported} imported, {} skipped",
            if self.cache { "on" } else { "off" },
            self.outcomes.len() - imported
        ));
        lines
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// Imports what K3s would from `dir` (see the module docs). A missing folder imports
/// nothing, as in K3s.
pub fn import(dir: &Path) -> Result<Report, ImportError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Report::default()),
        Err(e) => return Err(ImportError::Read(dir.to_path_buf(), e)),
    };
    let cache_path = dir.join(IMPORT_CACHE);
    let cache_text = match std::fs::read_to_string(&cache_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ImportError::Read(cache_path, e)),
    };
    let mut cache: serde_json::Map<String, serde_json::Value> = cache_text
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    let mut names: Vec<_> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut report = Report {
        cache: cache_text.is_some(),
        outcomes: Vec::new(),
    };
    let mut seen = Vec::new();
    for name in names {
        if !SUPPORTED.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let path = dir.join(&name);
        // Through a symlink, as os.Stat does.
        let meta = std::fs::metadata(&path).map_err(|e| ImportError::Read(path.clone(), e))?;
        if meta.is_dir() {
            continue;
        }
        let key = path.to_string_lossy().into_owned();
        let mod_time = go_time(meta.modified().unwrap_or(UNIX_EPOCH));
        seen.push(key.clone());
        let cached = cache.get(&key);
        let unchanged = report.cache
            && cached.and_then(|c| c["size"].as_u64()) == Some(meta.len())
            && cached.and_then(|c| c["modTime"].as_str()) == Some(mod_time.as_str());
        if unchanged {
            report.outcomes.push(Outcome::Skipped { path });
            continue;
        }
        let began = Instant::now();
        let bytes = read_all(&path).map_err(|e| ImportError::Read(path.clone(), e))?;
        report.outcomes.push(Outcome::Imported {
            path,
            bytes,
            took: began.elapsed(),
        });
        cache.insert(
            key,
            serde_json::json!({ "size": meta.len(), "modTime": mod_time, "images": [] }),
        );
    }
    if report.cache {
        cache.retain(|k, _| seen.contains(k));
        // K3s's syncCache: O_WRONLY|O_TRUNC, no O_CREATE.
        let text = serde_json::Value::Object(cache).to_string();
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&cache_path)
            .and_then(|mut f| io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| ImportError::Write(cache_path, e))?;
    }
    Ok(report)
}

fn read_all(path: &Path) -> io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// A time as Go's `time.Time` marshals to JSON in UTC (RFC 3339 with nanoseconds,
/// trailing zeros dropped): `2026-06-23T18:05:52Z`, `1970-01-01T00:00:00.5Z`.
pub fn go_time(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn set_mtime(path: &Path, secs: u64) {
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    fn skipped(r: &Report) -> usize {
        r.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Skipped { .. }))
            .count()
    }

    #[test]
    fn go_times() {
        assert_eq!(go_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::from_secs(1_782_237_952)),
            "2026-06-23T18:05:52Z"
        );
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::from_millis(500)),
            "1970-01-01T00:00:00.5Z"
        );
        assert_eq!(
            go_time(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn without_the_cache_file_everything_is_imported_every_time() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a.tar.zst"), b"zstd bytes").unwrap();
        fs::write(d.path().join("notes.md"), b"not an image").unwrap();
        for _ in 0..2 {
            let r = import(d.path()).unwrap();
            assert!(!r.cache);
            assert_eq!(r.outcomes.len(), 1, "{r:?}");
            assert!(matches!(
                &r.outcomes[0],
                Outcome::Imported { bytes: 10, .. }
            ));
        }
        assert!(
            !d.path().join(IMPORT_CACHE).exists(),
            "K3s never creates it"
        );
    }

    #[test]
    fn with_the_cache_file_an_unchanged_tarball_is_skipped_and_a_changed_one_imported() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("k3s-airgap-images.tar.zst");
        fs::write(&bundle, b"zstd bytes").unwrap();
        set_mtime(&bundle, 0);
        fs::write(d.path().join(IMPORT_CACHE), b"").unwrap();

        let first = import(d.path()).unwrap();
        assert!(first.cache);
        assert_eq!(skipped(&first), 0, "{first:?}");
        let cache: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join(IMPORT_CACHE)).unwrap()).unwrap();
        let key = bundle.to_string_lossy().into_owned();
        assert_eq!(cache[&key]["size"], 10);
        assert_eq!(cache[&key]["modTime"], "1970-01-01T00:00:00Z");

        let second = import(d.path()).unwrap();
        assert_eq!(
            second.outcomes,
            vec![Outcome::Skipped {
                path: bundle.clone()
            }]
        );
        assert!(second.lines()[0].ends_with("unchanged since its import (.cache.json)"));
        assert_eq!(
            second.lines()[1],
            format!("{LINE_PREFIX} images: cache on, 0 imported, 1 skipped")
        );

        // A newer mtime, same size: imported again.
        set_mtime(&bundle, 10);
        assert_eq!(skipped(&import(d.path()).unwrap()), 0);
        // Another size: imported again.
        fs::write(&bundle, b"more zstd bytes").unwrap();
        set_mtime(&bundle, 10);
        assert_eq!(skipped(&import(d.path()).unwrap()), 0);
        assert_eq!(skipped(&import(d.path()).unwrap()), 1);
    }

    #[test]
    fn a_symlinked_tarball_is_keyed_by_its_path_and_gone_files_leave_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("root-images.tar.zst.bin");
        fs::write(&target, b"bundle").unwrap();
        let images = d.path().join("images");
        fs::create_dir(&images).unwrap();
        fs::write(images.join(IMPORT_CACHE), b"").unwrap();
        let old = images.join("k3s-airgap-images-aaaa.tar.zst");
        std::os::unix::fs::symlink(&target, &old).unwrap();
        import(&images).unwrap();
        assert_eq!(skipped(&import(&images).unwrap()), 1);

        // Another root: another name, the old link gone. Imported once, old entry dropped.
        fs::remove_file(&old).unwrap();
        let new = images.join("k3s-airgap-images-bbbb.tar.zst");
        std::os::unix::fs::symlink(&target, &new).unwrap();
        let r = import(&images).unwrap();
        assert_eq!(skipped(&r), 0);
        let cache: serde_json::Value =
            serde_json::from_slice(&fs::read(images.join(IMPORT_CACHE)).unwrap()).unwrap();
        let keys: Vec<_> = cache.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec![new.to_string_lossy().into_owned()]);
    }

    #[test]
    fn a_missing_folder_imports_nothing() {
        let d = tempfile::tempdir().unwrap();
        let r = import(&d.path().join("none")).unwrap();
        assert_eq!(r, Report::default());
        assert_eq!(
            r.lines(),
            vec![format!(
                "{LINE_PREFIX} images: cache off, 0 imported, 0 skipped"
            )]
        );
    }
}
