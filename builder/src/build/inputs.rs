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

/// The `--input` names of the two init binaries (not inputs of the spec).
pub const INIT_INPUTS: [&str; 2] = ["basalt-init", initbuild::STAGE1_BIN];

/// A static binary of basalt-init's package that goes into the image.
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
/// fetched before the spec and every override have been checked. The inputs are fetched
/// (or re-hashed from the cache) side by side: each `apt-get download` spends most of its
/// time starting up and waiting on the network, one after another 10 s of a cold build.
/// The notes and the first error come in the spec's order, whatever finishes first.
pub fn resolve_inputs(
    spec: &ImageSpec,
    lock: Option<&Lock>,
    opts: &BuildOptions,
    progress: &Progress,
) -> Result<BTreeMap<String, Resolved>, BuildError> {
    for (name, _) in &opts.overrides {
        if !INIT_INPUTS.contains(&name.as_str()) && !INPUT_NAMES.contains(&name.as_str()) {
            return Err(BuildError::UnknownInput(name.clone()));
        }
    }
    let cache = Cache::open(&opts.cache_dir)?;
    let mut pins = spec.inputs();
    if let Some(lock) = lock {
        lock.apply(spec, &mut pins);
    }
    let resolve =
        |pin: &crate::spec::Pinned| match opts.overrides.iter().find(|(n, _)| n == pin.name) {
            Some((_, path)) => cache::local_override(pin, path),
            None => cache.fetch(pin),
        };
    let results: Vec<_> = std::thread::scope(|s| {
        let running: Vec<_> = pins.iter().map(|pin| s.spawn(|| resolve(pin))).collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = BTreeMap::new();
    for (pin, resolved) in pins.iter().zip(results) {
        let resolved = resolved?;
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

/// The static basalt-init and basalt-stage1 for the image: `--input basalt-init=PATH`
/// and `--input basalt-stage1=PATH`, else the source the options name (both binaries).
/// Only `--input basalt-init=PATH`: that binary is the initramfs's `/init` too (it runs
/// stage 1 as well; the image is larger, 1.5 MiB compressed). An embedded binary is
/// written once to the cache, named by its sha256.
fn init_paths(opts: &BuildOptions) -> Result<(PathBuf, PathBuf), BuildError> {
    let given = |name: &str| -> Result<Option<PathBuf>, BuildError> {
        match opts.overrides.iter().find(|(n, _)| n == name) {
            Some((_, p)) => {
                initbuild::check_static(p)?;
                Ok(Some(p.clone()))
            }
            None => Ok(None),
        }
    };
    let (init, stage1) = (given("basalt-init")?, given(initbuild::STAGE1_BIN)?);
    if let Some(init) = init {
        let stage1 = stage1.unwrap_or_else(|| init.clone());
        return Ok((init, stage1));
    }
    let built = match opts.init {
        InitSource::SourceTree => initbuild::build(&initbuild::find_workspace(
            opts.spec.parent().unwrap_or(Path::new(".")),
        )?)?,
        InitSource::Embedded { init, stage1 } => {
            let dir = opts.cache_dir.join("init");
            initbuild::InitBinaries {
                init: initbuild::materialize(init, &dir, "basalt-init")?,
                stage1: initbuild::materialize(stage1, &dir, initbuild::STAGE1_BIN)?,
            }
        }
    };
    Ok((built.init, stage1.unwrap_or(built.stage1)))
}

fn init_binary(path: PathBuf) -> Result<InitBinary, BuildError> {
    let (sha256, size) =
        cache::hash_file(&path).map_err(|e| initbuild::InitBuildError::Read(path.clone(), e))?;
    Ok(InitBinary { path, sha256, size })
}

/// basalt-init and the initramfs's `/init` ([`init_paths`]), each with its sha256 and size.
pub fn init_binaries(opts: &BuildOptions) -> Result<(InitBinary, InitBinary), BuildError> {
    let (init, stage1) = init_paths(opts)?;
    Ok((init_binary(init)?, init_binary(stage1)?))
}
