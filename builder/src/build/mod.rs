//! `basalt build`: the pipeline from a spec to the disk outputs.
//!
//! Everything is built in a work folder inside the output folder; the outputs are renamed
//! into place only when all of them are complete, and the work folder is removed on every
//! way out (a `TempDir`, and the interrupt handler for Ctrl-C). Nothing under an
//! output's final name is ever partial. Intermediates live in the cache's content-addressed
//! store ([`Store`]) and are reused when nothing that feeds them changed.

mod boot;
mod error;
mod inputs;
mod kernel;
mod outputs;
mod root;

pub use error::BuildError;

use crate::disk::Layout;
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::store::Store;
use crate::{cache, interrupt};
use inputs::{InitBinary, Spec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub spec: PathBuf,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// `--input NAME=PATH`
    pub overrides: Vec<(String, PathBuf)>,
    /// `--locked`: the lock must exist and agree with the spec.
    pub locked: bool,
    /// Where basalt-init and basalt-stage1 come from unless `--input basalt-init=PATH`
    /// (and `--input basalt-stage1=PATH`) name files.
    pub init: InitSource,
}

/// Where the image's basalt-init (the root's `/sbin/init`) and basalt-stage1 (the
/// initramfs's `/init`, stage 1 alone) come from when no `--input basalt-init=PATH` is
/// given.
#[derive(Debug, Clone, Copy, Default)]
pub enum InitSource {
    /// Built (release, static) from the basalt source tree above the spec, or at
    /// `BASALT_SOURCE`: for tests and benchmarks that run from a checkout.
    #[default]
    SourceTree,
    /// Static binaries that the caller carries, as the `basalt` CLI embeds the ones built
    /// with it, so that an installed `basalt` needs no source tree.
    Embedded {
        init: &'static [u8],
        stage1: &'static [u8],
    },
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

/// What every step after the inputs reads: the spec, the resolved inputs, basalt-init,
/// the seed everything is derived from, and the store of intermediates.
struct Ctx {
    spec: Spec,
    inputs: BTreeMap<String, cache::Resolved>,
    init: InitBinary,
    /// The initramfs's `/init`: basalt-stage1, or basalt-init itself when only
    /// `--input basalt-init=PATH` was given.
    stage1: InitBinary,
    /// sha256 over the spec, every input, basalt-init, basalt-stage1, basalt's version and
    /// the time floor: same seed, same bytes.
    seed: String,
    store: Store,
    /// Written into the root's os-release for init's clock ([`basalt_api::time_floor`]).
    time_floor: u64,
}

impl Ctx {
    /// A UUID derived from the seed: a function of the inputs, never random.
    fn uuid(&self, what: &str) -> uuid::Uuid {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("basalt:{}:{what}", self.seed).as_bytes(),
        )
    }
}

/// The pipeline, one named step after another; each step is a function with typed inputs
/// and outputs, reused from the store when nothing that feeds it changed.
pub fn build(opts: &BuildOptions) -> Result<Manifest, BuildError> {
    let started = Instant::now();
    let mut progress = Progress::new(STEPS);
    let spec = Spec::load(opts)?;

    progress.start("inputs");
    let lock = spec.lock.as_ref().map(|(l, _)| l);
    let inputs = inputs::resolve_inputs(&spec.spec, lock, opts, &progress)?;
    // Reused: every input that is not a local override came from the cache.
    progress.finish(
        inputs
            .values()
            .all(|r| r.cached || matches!(r.origin, cache::Origin::Override { .. })),
    );

    progress.start("basalt-init");
    let (init, stage1) = inputs::init_binaries(opts)?;
    let time_floor =
        basalt_api::time_floor::for_build(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())?;
    let seed = seed(
        &spec.text,
        &inputs,
        &[&init.sha256, &stage1.sha256],
        time_floor,
    );
    let store = Store::open(&opts.cache_dir)?;
    let ctx = Ctx {
        spec,
        inputs,
        init,
        stage1,
        seed,
        store,
        time_floor,
    };
    let work = outputs::WorkDir::create(&opts.out_dir, &ctx.spec.spec.name)?;

    progress.start("unpack packages");
    let kernel = kernel::unpack(&ctx)?;
    progress.finish(kernel.reused);

    progress.start("initramfs");
    let initramfs = kernel::initramfs(&ctx, &kernel)?;
    progress.finish(initramfs.reused);

    progress.start("root filesystem (squashfs + dm-verity)");
    let modules = kernel::root_modules(&ctx, &kernel, &initramfs)?;
    // The root is made from the kernel as it ships there: only the selected modules.
    let shipped = kernel::Kernel {
        moddir: modules.moddir.clone(),
        ..kernel.clone()
    };
    // The partition plan is a function of the spec: the root's image identity names it.
    let layout = Layout::new(&ctx.spec.spec.disk, |what| ctx.uuid(what));
    let identity = basalt_api::bundle::Identity {
        format: basalt_api::bundle::FORMAT,
        version: ctx.spec.spec.version(),
        compat: crate::bundle::compat(&layout),
    };
    let root = root::root(&ctx, &shipped, &modules.graph, &identity)?;
    progress.finish(root.reused && modules.reused);

    progress.start("bootloader (GRUB for BIOS and UEFI)");
    let bootloader = boot::bootloader(&ctx, &kernel, &layout)?;
    progress.finish(bootloader.reused);

    progress.start("EFI system partition and STATE");
    let esp = boot::esp_and_state(&ctx, &bootloader, &kernel, &initramfs, &root)?;
    progress.finish(esp.reused);

    progress.start("disk image");
    let raw = outputs::disk_image(&work, &layout, &bootloader, &esp, &root)?;

    progress.start("qcow2 and raw.zst");
    let images = outputs::compressed(&work, raw)?;

    progress.start("manifest, SBOM, bundle and outputs");
    outputs::sbom(&ctx, &work, &kernel)?;
    let bundle = outputs::bundle(&work, &identity, &kernel, &initramfs, &root, &esp)?;
    let parts = outputs::Parts {
        kernel: &kernel,
        initramfs: &initramfs,
        modules: &modules,
        root: &root,
        esp,
        layout,
    };
    let manifest = outputs::manifest(&ctx, opts, parts, &images, &bundle)?;
    let manifest = manifest.with_timings(progress.timings(), started.elapsed().as_secs_f64());
    outputs::publish(&ctx, &work, &images, &bundle, &manifest, &opts.out_dir)?;
    Ok(manifest)
}

/// Everything below the inputs is derived from this: same inputs, same bytes.
fn seed(
    spec_text: &[u8],
    inputs: &BTreeMap<String, cache::Resolved>,
    init_shas: &[&str],
    time_floor: u64,
) -> String {
    let mut h = Sha256::new();
    h.update(spec_text);
    for r in inputs.values() {
        h.update(r.sha256.as_bytes());
    }
    for sha in init_shas {
        h.update(sha.as_bytes());
    }
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(time_floor.to_be_bytes());
    hex::encode(h.finalize())
}
