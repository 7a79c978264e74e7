//! `basalt build`: the pipeline from a spec to the disk outputs.
//!
//! Everything is built in a work folder inside the output folder; the outputs are renamed
//! into place only when all of them are complete, and the work folder is removed on every
//! way out (a `TempDir`, and the interrupt handler for Ctrl-C). Nothing under an
//! output's final name is ever partial. Intermediates live in the cache's content-addressed
//! store ([`Store`]) and are reused when nothing that feeds them changed.

use crate::cache::{self, Cache, Resolved};
use crate::disk::{self, Layout};
use crate::lock::{self, Lock};
use crate::manifest::{self, Manifest};
use crate::progress::Progress;
use crate::spec::{ImageSpec, INPUT_NAMES};
use crate::steps::{esp_files, make_grub, make_root, make_state, to_qcow2, write_sbom};
use crate::store::{self, Store};
use crate::{deb, esp, grub, initbuild, initramfs, interrupt, kmod, rootfs, zst};
use basalt_api::bootparams::{BootParams, Slot, Verity, VERITY_BLOCK_SIZE};
use basalt_api::layout::Partition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BuildOptions {
    pub spec: PathBuf,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// `--input NAME=PATH`
    pub overrides: Vec<(String, PathBuf)>,
    /// `--locked`: the lock must exist and agree with the spec.
    pub locked: bool,
    /// Where basalt-init comes from unless `--input basalt-init=PATH` names a file.
    pub init: InitSource,
}

/// Where the image's basalt-init comes from when no `--input basalt-init=PATH` is given.
#[derive(Debug, Clone, Copy, Default)]
pub enum InitSource {
    /// Built (release, static) from the basalt source tree above the spec, or at
    /// `BASALT_SOURCE`: for tests and benchmarks that run from a checkout.
    #[default]
    SourceTree,
    /// A static basalt-init that the caller carries, as the `basalt` CLI embeds the one
    /// built with it, so that an installed `basalt` needs no source tree.
    Embedded(&'static [u8]),
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Lock(Box<lock::LockError>),
    #[error("--input {0}: unknown input (known: {known}, basalt-init)", known = INPUT_NAMES.join(", "))]
    UnknownInput(String),
    #[error(transparent)]
    Fetch(#[from] cache::FetchError),
    #[error("basalt-init")]
    Init(#[from] initbuild::InitBuildError),
    #[error(transparent)]
    Deb(#[from] deb::DebError),
    #[error("kernel package")]
    Kernel(#[source] std::io::Error),
    #[error("kernel modules")]
    Kmod(#[from] kmod::KmodError),
    #[error("initramfs")]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("root filesystem")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("root filesystem tree")]
    Tree(#[from] crate::tree::CopyError),
    #[error("CA certificates from the ca-certificates package")]
    Certs(#[source] std::io::Error),
    #[error("root filesystem is {size} bytes with its hash tree; ROOT partitions hold {room} (raise disk.root_mib)")]
    RootTooLarge { size: u64, room: u64 },
    #[error(transparent)]
    Grub(#[from] grub::GrubError),
    #[error("EFI system partition")]
    Esp(#[from] esp::EspError),
    #[error("STATE filesystem: {0}")]
    State(String),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("qcow2 output: {0}")]
    Qcow2(String),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("build files")]
    Io(#[from] std::io::Error),
}

impl From<lock::LockError> for BuildError {
    fn from(e: lock::LockError) -> Self {
        BuildError::Lock(Box::new(e))
    }
}

/// Steps as the progress display counts them.
const STEPS: usize = 10;

/// What the root filesystem step leaves besides `root.img`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RootInfo {
    pub squashfs_bytes: u64,
    pub data_blocks: u64,
    pub root_hash: String,
    pub salt: String,
}

pub fn install_interrupt_handler() {
    interrupt::install();
}

/// The static basalt-init for the image: `--input basalt-init=PATH`, else the source the
/// options name. An embedded one is written once to the cache, named by its sha256.
fn init_binary(opts: &BuildOptions) -> Result<PathBuf, BuildError> {
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

pub fn build(opts: &BuildOptions) -> Result<Manifest, BuildError> {
    let started = Instant::now();
    let mut progress = Progress::new(STEPS);
    let spec = ImageSpec::load(&opts.spec)?;
    let spec_text =
        std::fs::read(&opts.spec).map_err(|e| BuildError::Write(opts.spec.clone(), e))?;
    let lock = load_lock(&spec, opts)?;

    progress.start("inputs");
    let inputs = resolve_inputs(&spec, lock.as_ref().map(|(l, _)| l), opts, &progress)?;
    // Reused: every input that is not a local override came from the cache.
    progress.finish(
        inputs
            .values()
            .all(|r| r.cached || matches!(r.origin, cache::Origin::Override { .. })),
    );

    progress.start("basalt-init");
    let init_path = init_binary(opts)?;
    let (init_sha, init_size) = cache::hash_file(&init_path)
        .map_err(|e| initbuild::InitBuildError::Read(init_path.clone(), e))?;

    // Everything below is derived from this seed: same inputs, same bytes.
    let seed = {
        let mut h = Sha256::new();
        h.update(&spec_text);
        for r in inputs.values() {
            h.update(r.sha256.as_bytes());
        }
        h.update(init_sha.as_bytes());
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        hex::encode(h.finalize())
    };
    let derive_uuid = |what: &str| {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("basalt:{seed}:{what}").as_bytes(),
        )
    };
    let store = Store::open(&opts.cache_dir)?;

    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| BuildError::Write(opts.out_dir.clone(), e))?;
    let work = tempfile::Builder::new()
        .prefix(&format!(".{}.build-", spec.name))
        .tempdir_in(&opts.out_dir)
        .map_err(|e| BuildError::Write(opts.out_dir.clone(), e))?;
    let _partial = interrupt::register(work.path());
    let w = work.path();

    progress.start("unpack packages");
    let mut all_reused = true;
    let mut unpacked = BTreeMap::new();
    for name in ["kernel", "grub-bios", "grub-efi", "ca-certificates"] {
        let input = &inputs[name];
        let (dir, reused) = store.get_or_make("unpacked", &input.sha256, |dir| {
            deb::unpack(&input.path, dir).map_err(BuildError::from)
        })?;
        all_reused &= reused;
        unpacked.insert(name, dir);
    }
    progress.finish(all_reused);
    let kernel_dir = &unpacked["kernel"];
    let kver = kernel_version(kernel_dir).map_err(BuildError::Kernel)?;
    let moddir = kernel_dir.join("lib/modules").join(&kver);
    let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{kver}"));

    progress.start("initramfs");
    let graph = kmod::ModuleGraph::load(&moddir)?;
    let closure = graph.closure(&spec.kernel.initramfs_modules)?;
    let module_names: Vec<String> = closure.iter().map(|m| m.name.clone()).collect();
    let key = store::key(
        "initramfs",
        &[
            &inputs["kernel"].sha256,
            &init_sha,
            &module_names.join(","),
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (initrd_dir, reused) = store.get_or_make("initramfs", &key, |dir| {
        initramfs::write(
            &initramfs::tree(&init_path, &kver, &moddir, &closure),
            &dir.join("initrd.img"),
        )
        .map_err(BuildError::from)
    })?;
    progress.finish(reused);
    let initrd = initrd_dir.join("initrd.img");

    progress.start("root filesystem (squashfs + dm-verity)");
    let (root_dir, reused) =
        store.get_or_make("rootfs", &store::key("rootfs", &[&seed]), |dir| {
            make_root(
                dir,
                &spec,
                &inputs,
                &unpacked["ca-certificates"],
                &init_path,
                &kver,
                &moddir,
                &graph,
                &seed,
                derive_uuid("verity"),
            )
        })?;
    progress.finish(reused);
    let root_img = root_dir.join("root.img");
    let root_info: RootInfo =
        serde_json::from_slice(&std::fs::read(root_dir.join("root.json"))?)
            .map_err(|e| BuildError::Write(root_dir.join("root.json"), e.into()))?;
    let verity = Verity {
        root_hash: root_info.root_hash.clone(),
        salt: root_info.salt.clone(),
        data_blocks: root_info.data_blocks,
    };

    progress.start("bootloader (GRUB for BIOS and UEFI)");
    let layout = Layout::new(&spec.disk, derive_uuid);
    let bios = layout.get(Partition::Bios);
    let bios = (bios.first_lba.0, bios.size());
    let grub_key = store::key(
        "grub",
        &[
            &inputs["grub-bios"].sha256,
            &inputs["grub-efi"].sha256,
            &format!("{bios:?}"),
            env!("CARGO_PKG_VERSION"),
        ],
    );
    let (grub_dir, reused) = store.get_or_make("grub", &grub_key, |dir| {
        make_grub(dir, &unpacked["grub-bios"], &unpacked["grub-efi"], bios)
    })?;
    progress.finish(reused);
    let boot_code: [u8; 440] = std::fs::read(grub_dir.join("bootcode.bin"))?
        .try_into()
        .map_err(|_| {
            BuildError::Write(
                grub_dir.join("bootcode.bin"),
                std::io::Error::other("not 440 bytes"),
            )
        })?;

    progress.start("EFI system partition and STATE");
    let cmdline = |slot| {
        let mut words = spec.kernel.cmdline.clone();
        words.push(
            BootParams {
                slot,
                verity: verity.clone(),
            }
            .to_string(),
        );
        words.join(" ")
    };
    let (cmd_a, cmd_b) = (cmdline(Slot::A), cmdline(Slot::B));
    let (esp_dir, reused) = store.get_or_make("esp", &store::key("esp", &[&seed]), |dir| {
        let files = esp_files(&grub_dir, &vmlinuz, &initrd, &cmd_a, &cmd_b)?;
        let volume_id = u32::from_le_bytes(
            derive_uuid("esp").as_bytes()[..4]
                .try_into()
                .unwrap_or_default(),
        );
        esp::write(
            &dir.join("esp.img"),
            disk::Sectors::from_mib(spec.disk.esp_mib).bytes(),
            volume_id,
            &files,
        )?;
        let sums: BTreeMap<String, String> = files
            .iter()
            .map(|(p, b)| (p.to_string(), cache::sha256_hex(b)))
            .collect();
        std::fs::write(
            dir.join("esp.json"),
            serde_json::to_vec_pretty(&sums).map_err(std::io::Error::other)?,
        )?;
        make_state(
            &dir.join("state.img"),
            spec.disk.state_mib,
            derive_uuid("state-fs"),
        )
    })?;
    progress.finish(reused);
    let esp_sums: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(esp_dir.join("esp.json"))?)
            .map_err(|e| BuildError::Write(esp_dir.join("esp.json"), e.into()))?;

    progress.start("disk image");
    let raw_tmp = w.join("disk.raw");
    let core = grub_dir.join("core.img");
    let (esp_img, state_img) = (esp_dir.join("esp.img"), esp_dir.join("state.img"));
    disk::write(
        &raw_tmp,
        &layout,
        boot_code,
        &[
            (Partition::Bios, &core),
            (Partition::Efi, &esp_img),
            (Partition::RootA, &root_img),
            (Partition::State, &state_img),
        ],
    )?;

    progress.start("qcow2 and raw.zst");
    let qcow_tmp = w.join("disk.qcow2");
    to_qcow2(&raw_tmp, &qcow_tmp)?;
    let zst_tmp = w.join("disk.raw.zst");
    let compressed =
        zst::compress(&raw_tmp, &zst_tmp).map_err(|e| BuildError::Write(zst_tmp.clone(), e))?;

    progress.start("manifest, SBOM and outputs");
    let names = OutputNames::new(&spec.name);
    let outputs = vec![
        manifest::Output {
            file: names.raw.clone(),
            sha256: compressed.raw_sha256.clone(),
            size: std::fs::metadata(&raw_tmp)?.len(),
        },
        manifest::output(&names.qcow2, &qcow_tmp)?,
        manifest::output(&names.zst, &zst_tmp)?,
    ];
    let sbom_tmp = w.join("sbom.spdx.json");
    write_sbom(&sbom_tmp, &spec, &inputs, &unpacked, &seed, &init_sha)?;
    let manifest = Manifest {
        basalt_version: env!("CARGO_PKG_VERSION").into(),
        name: spec.name.clone(),
        spec: opts.spec.display().to_string(),
        spec_sha256: cache::sha256_hex(&spec_text),
        lock_sha256: lock.as_ref().map(|(_, sha)| sha.clone()),
        kernel_version: kver.clone(),
        k3s_version: spec.k3s.version.clone(),
        inputs: inputs.values().cloned().collect(),
        basalt_init: manifest::InitInfo {
            sha256: init_sha,
            size: init_size,
            path: init_path,
        },
        initramfs_modules: module_names,
        root_hash: verity.root_hash.clone(),
        verity: manifest::VerityManifest {
            salt: verity.salt.clone(),
            data_blocks: verity.data_blocks,
            hash_offset: verity.data_blocks * VERITY_BLOCK_SIZE,
            squashfs_bytes: root_info.squashfs_bytes,
        },
        cmdline: BTreeMap::from([
            ("a".to_string(), cmd_a.clone()),
            ("b".to_string(), cmd_b.clone()),
        ]),
        esp_files: esp_sums,
        layout,
        sizes: manifest::Sizes::measure(&raw_tmp, &qcow_tmp, &zst_tmp)?,
        outputs,
        steps: vec![],
        build_seconds: 0.0,
    };
    let manifest = manifest.with_timings(progress.timings(), started.elapsed().as_secs_f64());
    let manifest_tmp = w.join("manifest.json");
    manifest
        .write(&manifest_tmp)
        .map_err(|e| BuildError::Write(manifest_tmp.clone(), e))?;
    for (tmp, name) in [
        (&raw_tmp, &names.raw),
        (&qcow_tmp, &names.qcow2),
        (&zst_tmp, &names.zst),
        (&sbom_tmp, &"sbom.spdx.json".to_string()),
        (&manifest_tmp, &"manifest.json".to_string()),
    ] {
        let dest = opts.out_dir.join(name);
        std::fs::rename(tmp, &dest).map_err(|e| BuildError::Write(dest, e))?;
    }
    Ok(manifest)
}

struct OutputNames {
    raw: String,
    qcow2: String,
    zst: String,
}

impl OutputNames {
    fn new(name: &str) -> Self {
        OutputNames {
            raw: format!("{name}.raw"),
            qcow2: format!("{name}.qcow2"),
            zst: format!("{name}.raw.zst"),
        }
    }
}

/// The lock beside the spec and its sha256: required and checked with `--locked`,
/// otherwise used when it agrees and reported when it does not.
fn load_lock(spec: &ImageSpec, opts: &BuildOptions) -> Result<Option<(Lock, String)>, BuildError> {
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
fn resolve_inputs(
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

fn kernel_version(unpacked: &Path) -> std::io::Result<String> {
    let mut kvers: Vec<String> = std::fs::read_dir(unpacked.join("lib/modules"))?
        .flatten()
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kvers.sort();
    match kvers.as_slice() {
        [one]
            if unpacked
                .join("boot")
                .join(format!("vmlinuz-{one}"))
                .is_file() =>
        {
            Ok(one.clone())
        }
        _ => Err(std::io::Error::other(format!(
            "expected one kernel with its vmlinuz, found {kvers:?}"
        ))),
    }
}
