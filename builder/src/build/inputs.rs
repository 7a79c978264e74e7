//! The first two steps: the spec's inputs (lock, overrides, cache) and the static
//! basalt-init. Everything later is derived from what these return.

use super::{BuildError, BuildOptions, InitSource};
use crate::cache::{self, Cache, Resolved};
use crate::initbuild;
use crate::lock::{self, Lock};
use crate::progress::Progress;
use crate::spec::{ImageSpec, INPUT_NAMES};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The spec as read, and the lock that pinned it.
pub struct Spec {
    pub spec: ImageSpec,
    /// The spec file's bytes: part of the seed everything is derived from.
    pub text: Vec<u8>,
    /// The lock and its sha256, when one was used.
    pub lock: Option<(Lock, String)>,
}

impl Spec {
    pub fn load(opts: &BuildOptions) -> Result<Spec, BuildError> {
        let spec = ImageSpec::load(&opts.spec)?;
        let text =
            std::fs::read(&opts.spec).map_err(|e| BuildError::Write(opts.spec.clone(), e))?;
        let lock = load_lock(&spec, opts)?;
        Ok(Spec { spec, text, lock })
    }
}

/// The static basalt-init that goes into the image.
pub struct InitBinary {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The lock beside the spec and its sha256: required and checked with `--locked`,
/// otherwise used when it agrees and reported when it does not.
pub fn load_lock(
    spec: &ImageSpec,
    opts: &BuildOptions,
) -> Result<Option<(Lock, String)>, BuildError> {
    let path = lock::lock_path(&opts.spec);
    if !path.exists() {
        if opts.locked {
            return Err(lock::LockError::Missing(path, opts.spec.clone()).into());
        }
        return Ok(None);
    }
    let lock = Lock::load(&path)?;
    let sha = cache::hash_file(&path)
        .map_err(|e| lock::LockError::Read(path.clone(), e))?
        .0;
    match lock::check(spec, &lock, &path) {
        Ok(()) => Ok(Some((lock, sha))),
        Err(e) if opts.locked => Err(e.into()),
        Err(e) => {
            eprintln!("basalt: warning: {e}; building from the spec's pins");
            Ok(None)
        }
    }
}

/// Overrides first (named, checked), then the cache for everything else. Nothing is
/// fetched before the spec and every override have been checked.
pub fn resolve_inputs(
    spec: &ImageSpec,
    lock: Option<&Lock>,
    opts: &BuildOptions,
    progress: &Progress,
) -> Result<BTreeMap<String, Resolved>, BuildError> {
    for (name, _) in &opts.overrides {
        if name != "basalt-init" && !INPUT_NAMES.contains(&name.as_str()) {
            return Err(BuildError::UnknownInput(name.clone()));
        }
    }
    let cache = Cache::open(&opts.cache_dir)?;
    let mut pins = spec.inputs();
    if let Some(lock) = lock {
        lock.apply(spec, &mut pins);
    }
    let mut out = BTreeMap::new();
    for pin in pins {
        let resolved = match opts.overrides.iter().find(|(n, _)| n == pin.name) {
            Some((_, path)) => cache::local_override(&pin, path)?,
            None => cache.fetch(&pin)?,
        };
        let how = match (&resolved.origin, resolved.cached) {
            (cache::Origin::Override { .. }, _) => "local file (override)",
            (_, true) => "cached",
            (_, false) => "fetched",
        };
        progress.note(&format!(
            "{:<16} {} {how}",
            pin.name,
            &resolved.sha256[..12]
        ));
        out.insert(pin.name.to_string(), resolved);
    }
    Ok(out)
}

/// The static basalt-init for the image: `--input basalt-init=PATH`, else the source the
/// options name. An embedded one is written once to the cache, named by its sha256.
fn init_path(opts: &BuildOptions) -> Result<PathBuf, BuildError> {
    if let Some((_, p)) = opts.overrides.iter().find(|(n, _)| n == "basalt-init") {
        initbuild::check_static(p)?;
        return Ok(p.clone());
    }
    match opts.init {
        InitSource::SourceTree => Ok(initbuild::build(&initbuild::find_workspace(
            opts.spec.parent().unwrap_or(Path::new(".")),
        )?)?),
        InitSource::Embedded(bytes) => {
            Ok(initbuild::materialize(bytes, &opts.cache_dir.join("init"))?)
        }
    }
}

/// The static basalt-init ([`init_path`]) with its sha256 and size.
pub fn init_binary(opts: &BuildOptions) -> Result<InitBinary, BuildError> {
    let path = init_path(opts)?;
    let (sha256, size) =
        cache::hash_file(&path).map_err(|e| initbuild::InitBuildError::Read(path.clone(), e))?;
    Ok(InitBinary { path, sha256, size })
}
