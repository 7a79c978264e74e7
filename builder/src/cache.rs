//! Inputs: a content-addressed cache of sha256-named files, filled from Debian's archive
//! (`apt-get download`) or HTTPS, and local overrides (`--input NAME=PATH`).
//!
//! A file enters the cache only after its sha256 matched the pin: downloads go to a
//! temporary file under the cache's `tmp/` and are renamed into `sha256/<hex>` at the
//! end; on any error the temporary file is removed.

use crate::spec::{Pinned, Source};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cache {0}")]
    Cache(PathBuf, #[source] std::io::Error),
    #[error("input {name}: sha256 mismatch for {origin}: expected {expected}, got {actual}")]
    Mismatch {
        name: String,
        origin: String,
        expected: String,
        actual: String,
    },
    #[error("input {name}: download {url} failed (supply the file with --input {name}=PATH)")]
    Download {
        name: String,
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("input {name} (supply the file with --input {name}=PATH)")]
    Apt {
        name: String,
        #[source]
        source: crate::apt::AptError,
    },
    #[error("input {name}: read {path}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where an input came from, as recorded in the manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    Apt {
        package: String,
        version: String,
    },
    Url {
        url: String,
    },
    /// `--input NAME=PATH`; `pinned_sha256` is what the spec asked for.
    Override {
        path: PathBuf,
        pinned_sha256: String,
        matches_pin: bool,
    },
}

/// One input ready for use.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub origin: Origin,
    /// Whether the file was already in the cache.
    pub cached: bool,
}

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `BASALT_CACHE`, else `$XDG_CACHE_HOME/basalt`, else `~/.cache/basalt`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("BASALT_CACHE") {
            return dir.into();
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Path::new(&dir).join("basalt");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Path::new(&home).join(".cache/basalt")
    }

    pub fn open(root: &Path) -> Result<Self, FetchError> {
        for dir in ["sha256", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|e| FetchError::Cache(root.join(dir), e))?;
        }
        Ok(Cache { root: root.into() })
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    /// Returns the pinned input from the cache, fetching it first if needed.
    pub fn fetch(&self, pin: &Pinned) -> Result<Resolved, FetchError> {
        let path = self.path_of(&pin.sha256);
        let origin = match &pin.source {
            Source::Deb { package, version } => Origin::Apt {
                package: package.clone(),
                version: version.clone(),
            },
            Source::Url(url) => Origin::Url { url: url.clone() },
        };
        if path.exists() {
            // Re-hash: a cache entry is trusted no more than a download.
            let (sha256, size) = hash_file(&path).map_err(|e| self.read_err(pin.name, &path, e))?;
            if sha256 == pin.sha256 {
                return Ok(Resolved {
                    name: pin.name.into(),
                    path,
                    sha256,
                    size,
                    origin,
                    cached: true,
                });
            }
            // A damaged entry is dropped and fetched again.
            let _ = std::fs::remove_file(&path);
        }
        let tmp = tempfile::Builder::new()
            .prefix(pin.name)
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| FetchError::Cache(self.root.join("tmp"), e))?;
        let (file, origin_text) = match &pin.source {
            Source::Deb { package, version } => (
                self.fetch_deb(pin, package, version, tmp.path())?,
                format!("Debian package {package}={version}"),
            ),
            Source::Url(url) => (http_download(pin.name, url, tmp.path())?, url.clone()),
        };
        let (sha256, size) = hash_file(&file).map_err(|e| self.read_err(pin.name, &file, e))?;
        if sha256 != pin.sha256 {
            return Err(FetchError::Mismatch {
                name: pin.name.into(),
                origin: origin_text,
                expected: pin.sha256.clone(),
                actual: sha256,
            });
        }
        std::fs::rename(&file, &path).map_err(|e| FetchError::Cache(path.clone(), e))?;
        Ok(Resolved {
            name: pin.name.into(),
            path,
            sha256,
            size,
            origin,
            cached: false,
        })
    }

    /// apt first; a package that has left the archive comes from the snapshot archive
    /// when the spec names one and the lock knows its pool path.
    fn fetch_deb(
        &self,
        pin: &Pinned,
        package: &str,
        version: &str,
        dir: &Path,
    ) -> Result<PathBuf, FetchError> {
        match crate::apt::download(pin.name, package, version, dir) {
            Ok(p) => Ok(p),
            Err(crate::apt::AptError::LeftArchive { .. }) if pin.fallback_url.is_some() => {
                let url = pin.fallback_url.as_deref().unwrap_or_default();
                eprintln!("basalt: {} left the archive; fetching {url}", pin.name);
                http_download(pin.name, url, dir)
            }
            Err(source) => Err(FetchError::Apt {
                name: pin.name.into(),
                source,
            }),
        }
    }

    fn read_err(&self, name: &str, path: &Path, source: std::io::Error) -> FetchError {
        FetchError::Read {
            name: name.into(),
            path: path.into(),
            source,
        }
    }
}

/// Uses a local file in place of a pinned input.
pub fn local_override(pin: &Pinned, path: &Path) -> Result<Resolved, FetchError> {
    let (sha256, size) = hash_file(path).map_err(|source| FetchError::Read {
        name: pin.name.into(),
        path: path.into(),
        source,
    })?;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.into());
    Ok(Resolved {
        name: pin.name.into(),
        origin: Origin::Override {
            path: path.clone(),
            pinned_sha256: pin.sha256.clone(),
            matches_pin: sha256 == pin.sha256,
        },
        path,
        sha256,
        size,
        cached: false,
    })
}

fn http_download(name: &str, url: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| FetchError::Download {
        name: name.into(),
        url: url.into(),
        source,
    };
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(std::time::Duration::from_secs(1800))
        .build()
        .map_err(|e| fail(e.into()))?;
    let mut resp = client
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(e.into()))?;
    let expected_len = resp.content_length();
    let path = dir.join("download");
    let mut file = std::fs::File::create(&path).map_err(|e| fail(e.into()))?;
    // A progress bar on a terminal, nothing otherwise (the step line says what is fetched).
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(expected_len.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "basalt:       {msg} {bytes}/{total_bytes} {bar:30} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(name.to_string());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let copied =
        std::io::copy(&mut bar.wrap_read(&mut resp), &mut file).map_err(|e| fail(e.into()))?;
    bar.finish_and_clear();
    file.sync_all().map_err(|e| fail(e.into()))?;
    if let Some(len) = expected_len {
        if copied != len {
            return Err(fail(
                format!("truncated: got {copied} of {len} bytes").into(),
            ));
        }
    }
    Ok(path)
}

/// sha256 (hex) and length of a file, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.write_all(&buf[..n])?;
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_pin(url: &str, sha256: &str) -> Pinned {
        Pinned {
            name: "k3s",
            source: Source::Url(url.into()),
            sha256: sha256.into(),
            fallback_url: None,
        }
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = walk(dir);
        v.sort();
        v
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .flat_map(|e| {
                        let p = e.path();
                        if p.is_dir() {
                            walk(&p)
                        } else {
                            vec![p]
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_cached_file_with_the_right_hash_is_used_without_fetching() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let sha = sha256_hex(b"hello");
        std::fs::write(cache.path_of(&sha), b"hello").expect("write");
        // An unreachable URL proves nothing was downloaded.
        let r = cache
            .fetch(&url_pin("https://127.0.0.1:9/none", &sha))
            .expect("cached");
        assert!(r.cached);
        assert_eq!(r.size, 5);
    }

    #[test]
    fn a_failed_download_names_input_url_and_the_way_around_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let err = cache
            .fetch(&url_pin("https://127.0.0.1:9/k3s", &"0".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("input k3s"), "{err}");
        assert!(err.contains("https://127.0.0.1:9/k3s"), "{err}");
        assert!(err.contains("--input k3s=PATH"), "{err}");
        assert_eq!(entries(dir.path()), Vec::<PathBuf>::new());
    }

    /// A one-shot HTTP server on loopback answering with `declared` as Content-Length and
    /// `body` as the bytes actually sent.
    fn serve_once(body: &'static [u8], declared: usize) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(body);
            }
        });
        format!("http://{addr}/k3s")
    }

    #[test]
    fn a_download_with_the_pinned_hash_enters_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let url = serve_once(b"k3s bytes", 9);
        let r = cache
            .fetch(&url_pin(&url, &sha256_hex(b"k3s bytes")))
            .expect("fetched");
        assert!(!r.cached);
        assert_eq!(std::fs::read(&r.path).expect("read"), b"k3s bytes");
        assert_eq!(r.path, cache.path_of(&sha256_hex(b"k3s bytes")));
    }

    #[test]
    fn a_download_with_another_hash_names_url_and_both_hashes_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let url = serve_once(b"not k3s", 7);
        let pinned = "2".repeat(64);
        let err = cache
            .fetch(&url_pin(&url, &pinned))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&url) && err.contains(&pinned) && err.contains(&sha256_hex(b"not k3s")),
            "{err}"
        );
        assert_eq!(entries(dir.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_truncated_download_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let url = serve_once(b"only half", 100);
        let err = cache
            .fetch(&url_pin(&url, &sha256_hex(b"only half")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("input k3s") && err.contains(&url), "{err}");
        assert_eq!(entries(dir.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn an_override_records_both_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("k3s");
        std::fs::write(&file, b"stand-in").expect("write");
        let r = local_override(&url_pin("https://x/k3s", &"1".repeat(64)), &file).expect("ok");
        assert_eq!(r.sha256, sha256_hex(b"stand-in"));
        assert_eq!(
            r.origin,
            Origin::Override {
                path: file.clone(),
                pinned_sha256: "1".repeat(64),
                matches_pin: false
            }
        );
    }
}
