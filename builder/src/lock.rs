//! The lock file: every input of a spec resolved to where it is, its sha256 and its size.
//!
//! `basalt lock SPEC` writes `<spec>.lock` next to the spec; `basalt build --locked`
//! refuses to build when spec and lock disagree, naming the input. Debian packages are
//! located through apt without downloading them; URL inputs are pinned from the spec.

use crate::apt::{self, AptError};
use crate::spec::{ImageSpec, Pinned, Source};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const LOCK_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    #[serde(rename = "input")]
    pub inputs: Vec<LockedInput>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LockedInput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Pool path of a Debian package below the archive root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("read lock file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("lock file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("no lock file {0}: run `basalt lock {1}`")]
    Missing(PathBuf, PathBuf),
    #[error("lock file {lock} disagrees with the spec on input {input}: {field} is {spec:?} in the spec, {locked:?} in the lock (run `basalt lock`)")]
    Disagrees {
        lock: PathBuf,
        input: String,
        field: &'static str,
        spec: String,
        locked: String,
    },
    #[error("input {input}")]
    Apt {
        input: String,
        #[source]
        source: AptError,
    },
    #[error("input {input}: the archive has sha256 {archive} for {package}={version}, the spec pins {spec}")]
    ArchiveMismatch {
        input: String,
        package: String,
        version: String,
        archive: String,
        spec: String,
    },
    #[error("input {0}: no size in the spec and {1} could not be asked for it")]
    NoSize(
        String,
        String,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    #[error("input {0}: not a Debian package; change its url and sha256 in the spec instead")]
    NotUpdatable(String),
    #[error("unknown input {0}")]
    UnknownInput(String),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("edit spec {0}: {1}")]
    EditSpec(PathBuf, String),
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// `images/k3s-node.toml` → `images/k3s-node.lock`.
pub fn lock_path(spec: &Path) -> PathBuf {
    spec.with_extension("lock")
}

impl Lock {
    pub fn load(path: &Path) -> Result<Self, LockError> {
        let text = std::fs::read_to_string(path).map_err(|e| LockError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| LockError::Parse(path.into(), e))
    }

    pub fn get(&self, name: &str) -> Option<&LockedInput> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Writes atomically: a temporary file beside it, then rename.
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let text = format!(
            "# Written by `basalt lock`: every input of the spec, resolved. Do not edit.\n{}",
            toml::to_string_pretty(self)
                .map_err(|e| LockError::Write(path.into(), std::io::Error::other(e)))?
        );
        write_atomic(path, text.as_bytes()).map_err(|e| LockError::Write(path.into(), e))
    }

    /// The lock's pins as the cache wants them, with snapshot fallbacks where possible.
    pub fn apply(&self, spec: &ImageSpec, pins: &mut [Pinned]) {
        for pin in pins {
            let Some(locked) = self.get(pin.name) else {
                continue;
            };
            if let (Some(snap), Some(file)) = (&spec.apt.snapshot, &locked.filename) {
                pin.fallback_url = Some(format!("{}/{file}", snap.trim_end_matches('/')));
            }
        }
    }
}

/// Resolves every input of the spec.
pub fn resolve(spec: &ImageSpec) -> Result<Lock, LockError> {
    let mut inputs = vec![];
    for pin in spec.inputs() {
        inputs.push(resolve_one(spec, &pin)?);
    }
    Ok(Lock {
        version: LOCK_VERSION,
        inputs,
    })
}

fn resolve_one(spec: &ImageSpec, pin: &Pinned) -> Result<LockedInput, LockError> {
    match &pin.source {
        Source::Deb { package, version } => {
            let entry =
                apt::locate(pin.name, package, version).map_err(|source| LockError::Apt {
                    input: pin.name.into(),
                    source,
                })?;
            if entry.sha256 != pin.sha256 {
                return Err(LockError::ArchiveMismatch {
                    input: pin.name.into(),
                    package: package.clone(),
                    version: version.clone(),
                    archive: entry.sha256,
                    spec: pin.sha256.clone(),
                });
            }
            Ok(LockedInput {
                name: pin.name.into(),
                package: Some(package.clone()),
                version: Some(version.clone()),
                filename: Some(entry.filename),
                url: None,
                sha256: entry.sha256,
                size: entry.size,
            })
        }
        Source::Url(url) => {
            let size = match url_size(spec, pin.name) {
                Some(size) => size,
                None => head_size(url)
                    .map_err(|e| LockError::NoSize(pin.name.into(), url.clone(), e))?,
            };
            Ok(LockedInput {
                name: pin.name.into(),
                package: None,
                version: None,
                filename: None,
                url: Some(url.clone()),
                sha256: pin.sha256.clone(),
                size,
            })
        }
    }
}

fn url_size(spec: &ImageSpec, name: &str) -> Option<u64> {
    match name {
        "k3s" => spec.k3s.binary.size,
        "k3s-images" => spec.k3s.images.size,
        _ => None,
    }
}

fn head_size(url: &str) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .build()?;
    let resp = client.head(url).send()?.error_for_status()?;
    resp.content_length()
        .ok_or_else(|| "no Content-Length".into())
}

/// Checks that the lock pins exactly what the spec asks for.
pub fn check(spec: &ImageSpec, lock: &Lock, lock_file: &Path) -> Result<(), LockError> {
    let disagree = |input: &str, field, spec: &str, locked: &str| LockError::Disagrees {
        lock: lock_file.into(),
        input: input.into(),
        field,
        spec: spec.into(),
        locked: locked.into(),
    };
    if lock.version != LOCK_VERSION {
        return Err(disagree(
            "(all)",
            "lock version",
            &LOCK_VERSION.to_string(),
            &lock.version.to_string(),
        ));
    }
    let pins = spec.inputs();
    for pin in &pins {
        let locked = lock
            .get(pin.name)
            .ok_or_else(|| disagree(pin.name, "presence", "present", "absent"))?;
        if locked.sha256 != pin.sha256 {
            return Err(disagree(pin.name, "sha256", &pin.sha256, &locked.sha256));
        }
        match &pin.source {
            Source::Deb { package, version } => {
                let lp = locked.package.clone().unwrap_or_default();
                if &lp != package {
                    return Err(disagree(pin.name, "package", package, &lp));
                }
                let lv = locked.version.clone().unwrap_or_default();
                if &lv != version {
                    return Err(disagree(pin.name, "version", version, &lv));
                }
            }
            Source::Url(url) => {
                let lu = locked.url.clone().unwrap_or_default();
                if &lu != url {
                    return Err(disagree(pin.name, "url", url, &lu));
                }
            }
        }
    }
    if let Some(extra) = lock
        .inputs
        .iter()
        .find(|l| !pins.iter().any(|p| p.name == l.name))
    {
        return Err(disagree(&extra.name, "presence", "absent", "present"));
    }
    Ok(())
}

/// Table path of a Debian input in the spec.
fn spec_table(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "kernel" => &["kernel"],
        "grub-bios" => &["grub", "bios"],
        "grub-efi" => &["grub", "efi"],
        "ca-certificates" => &["ca_certificates"],
        _ => return None,
    })
}

/// Re-pins a Debian input to the archive's current version: edits the spec (keeping its
/// comments) and returns the new version.
pub fn update_spec(spec_path: &Path, name: &str) -> Result<String, LockError> {
    let spec = ImageSpec::load(spec_path)?;
    let pin = spec
        .inputs()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| LockError::UnknownInput(name.into()))?;
    let (Source::Deb { package, .. }, Some(table)) = (&pin.source, spec_table(name)) else {
        return Err(LockError::NotUpdatable(name.into()));
    };
    let apt_err = |source| LockError::Apt {
        input: name.into(),
        source,
    };
    let version = apt::candidate(package).map_err(apt_err)?;
    let entry = apt::locate(name, package, &version).map_err(apt_err)?;
    let edit_err = |why: String| LockError::EditSpec(spec_path.into(), why);
    let text =
        std::fs::read_to_string(spec_path).map_err(|e| LockError::Read(spec_path.into(), e))?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| edit_err(e.to_string()))?;
    let mut item = doc.as_item_mut();
    for key in table {
        item = item
            .get_mut(key)
            .ok_or_else(|| edit_err(format!("no [{}]", table.join("."))))?;
    }
    item["version"] = toml_edit::value(version.clone());
    item["sha256"] = toml_edit::value(entry.sha256);
    let new_text = doc.to_string();
    // Refuse to write a spec that would not load.
    ImageSpec::parse(&new_text, spec_path)?;
    write_atomic(spec_path, new_text.as_bytes())
        .map_err(|e| LockError::Write(spec_path.into(), e))?;
    Ok(version)
}

/// Temporary file in the same folder, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.toml");
        ImageSpec::load(&path).expect("spec")
    }

    fn committed_lock() -> Lock {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.lock");
        Lock::load(&path).expect("committed lock")
    }

    #[test]
    fn the_committed_lock_agrees_with_the_default_spec() {
        check(&spec(), &committed_lock(), Path::new("k3s-node.lock")).expect("agree");
    }

    #[test]
    fn a_disagreement_names_the_input_and_field() {
        let mut lock = committed_lock();
        lock.inputs
            .iter_mut()
            .find(|i| i.name == "grub-efi")
            .expect("grub-efi")
            .version = Some("0".into());
        let err = check(&spec(), &lock, Path::new("x.lock"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("input grub-efi") && err.contains("version"),
            "{err}"
        );

        let mut lock = committed_lock();
        lock.inputs.retain(|i| i.name != "k3s");
        let err = check(&spec(), &lock, Path::new("x.lock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("input k3s"), "{err}");
    }

    #[test]
    fn lock_round_trips_through_toml() {
        let lock = committed_lock();
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.lock");
        lock.write(&p).expect("write");
        assert_eq!(Lock::load(&p).expect("load"), lock);
    }

    #[test]
    fn snapshot_fallback_uses_the_locked_pool_path() {
        let mut s = spec();
        s.apt.snapshot = Some("https://snapshot.example/archive/debian/20261101T000000Z/".into());
        let mut pins = s.inputs();
        committed_lock().apply(&s, &mut pins);
        let kernel = pins.iter().find(|p| p.name == "kernel").expect("kernel");
        let url = kernel.fallback_url.as_deref().expect("fallback");
        assert!(
            url.starts_with("https://snapshot.example/archive/debian/20261101T000000Z/pool/main/"),
            "{url}"
        );
        assert!(pins
            .iter()
            .find(|p| p.name == "k3s")
            .expect("k3s")
            .fallback_url
            .is_none());
    }
}
