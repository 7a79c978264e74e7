//! Steps 8 to 10: the GPT disk, its qcow2 and raw.zst forms, then the manifest and SBOM,
//! and the outputs renamed into place together. Until then everything lives in a hidden
//! work folder inside the output folder ([`WorkDir`]), removed on every way out.

use super::boot::{Bootloader, Esp};
use super::kernel::{Initramfs, Kernel, RootModules};
use super::root::Root;
use super::{BuildError, BuildOptions, Ctx};
use crate::cache::Resolved;
use crate::disk::{self, Layout};
use crate::manifest::{self, Manifest};
use crate::spec::ImageSpec;
use crate::{cache, interrupt, sbom, zst};
use basalt_api::bootparams::VERITY_BLOCK_SIZE;
use basalt_api::layout::Partition;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hidden work folder `<out>/.<name>.build-*`: a `TempDir`, so it is removed however
/// the build ends, and registered with the interrupt handler for Ctrl-C.
pub struct WorkDir {
    dir: tempfile::TempDir,
    _partial: interrupt::Registered,
}

impl WorkDir {
    pub fn create(out_dir: &Path, name: &str) -> Result<WorkDir, BuildError> {
        std::fs::create_dir_all(out_dir).map_err(|e| BuildError::Write(out_dir.into(), e))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.build-"))
            .tempdir_in(out_dir)
            .map_err(|e| BuildError::Write(out_dir.into(), e))?;
        let _partial = interrupt::register(dir.path());
        Ok(WorkDir { dir, _partial })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// The raw disk: GPT, GRUB's boot code, and each partition's content stitched in.
pub fn disk_image(
    work: &WorkDir,
    layout: &Layout,
    bootloader: &Bootloader,
    esp: &Esp,
    root: &Root,
) -> Result<PathBuf, BuildError> {
    let raw = work.path("disk.raw");
    disk::write(
        &raw,
        layout,
        bootloader.boot_code,
        &[
            (Partition::Bios, &bootloader.core()),
            (Partition::Efi, &esp.esp_img),
            (Partition::RootA, &root.img),
            (Partition::State, &esp.state_img),
        ],
    )?;
    Ok(raw)
}

/// The disk in its three forms, still in the work folder.
pub struct Images {
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub zst: PathBuf,
    pub compressed: zst::Compressed,
}

pub fn compressed(work: &WorkDir, raw: PathBuf) -> Result<Images, BuildError> {
    let qcow2 = work.path("disk.qcow2");
    let zst = work.path("disk.raw.zst");
    // qemu-img and the zstd pass both only read the raw: they run side by side.
    let (converted, compressed) = std::thread::scope(|s| {
        let converting = s.spawn(|| to_qcow2(&raw, &qcow2));
        let compressed = zst::compress(&raw, &zst).map_err(|e| BuildError::Write(zst.clone(), e));
        let converted = converting
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (converted, compressed)
    });
    converted?;
    let compressed = compressed?;
    Ok(Images {
        raw,
        qcow2,
        zst,
        compressed,
    })
}

/// The upgrade bundle in the work folder, and its entry for the manifest.
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: basalt_api::bundle::Manifest,
}

/// `<name>.bundle`: slot A's root, kernel and initramfs with their manifest
/// ([`crate::bundle`]).
pub fn bundle(
    work: &WorkDir,
    identity: &basalt_api::bundle::Identity,
    kernel: &Kernel,
    initramfs: &Initramfs,
    root: &Root,
    esp: &Esp,
) -> Result<Bundle, BuildError> {
    let files = crate::bundle::PartFiles {
        root: &root.img,
        kernel: &kernel.vmlinuz,
        initrd: &initramfs.path,
    };
    let manifest = crate::bundle::manifest(
        identity.version.clone(),
        &root.verity,
        &esp.base_cmdline,
        identity.compat.clone(),
        &files,
    )?;
    let path = work.path("disk.bundle");
    crate::bundle::write(&path, &manifest, &files)?;
    Ok(Bundle { path, manifest })
}

/// What the manifest records of the earlier steps.
pub struct Parts<'a> {
    pub kernel: &'a Kernel,
    pub initramfs: &'a Initramfs,
    pub modules: &'a RootModules,
    pub root: &'a Root,
    pub esp: Esp,
    pub layout: Layout,
}

pub fn manifest(
    ctx: &Ctx,
    opts: &BuildOptions,
    parts: Parts<'_>,
    images: &Images,
    bundle: &Bundle,
) -> Result<Manifest, BuildError> {
    let spec = &ctx.spec.spec;
    let names = OutputNames::new(&spec.name);
    let outputs = vec![
        manifest::Output {
            file: names.raw.clone(),
            sha256: images.compressed.raw_sha256.clone(),
            size: std::fs::metadata(&images.raw)?.len(),
        },
        manifest::output(&names.qcow2, &images.qcow2)?,
        manifest::output(&names.zst, &images.zst)?,
        manifest::output(&names.bundle, &bundle.path)?,
    ];
    let verity = &parts.root.verity;
    Ok(Manifest {
        basalt_version: env!("CARGO_PKG_VERSION").into(),
        name: spec.name.clone(),
        version: bundle.manifest.version.to_string(),
        compat: bundle.manifest.compat.clone(),
        spec: opts.spec.display().to_string(),
        spec_sha256: cache::sha256_hex(&ctx.spec.text),
        lock_sha256: ctx.spec.lock.as_ref().map(|(_, sha)| sha.clone()),
        kernel_version: parts.kernel.version.clone(),
        k3s_version: spec.k3s.version.clone(),
        inputs: ctx.inputs.values().cloned().collect(),
        basalt_init: manifest::InitInfo {
            sha256: ctx.init.sha256.clone(),
            size: ctx.init.size,
            path: ctx.init.path.clone(),
        },
        basalt_stage1: manifest::InitInfo {
            sha256: ctx.stage1.sha256.clone(),
            size: ctx.stage1.size,
            path: ctx.stage1.path.clone(),
        },
        initramfs_modules: parts.initramfs.modules.clone(),
        modules: parts.modules.modules.clone(),
        root_hash: verity.root_hash.clone(),
        verity: manifest::VerityManifest {
            salt: verity.salt.clone(),
            data_blocks: verity.data_blocks,
            hash_offset: verity.data_blocks * VERITY_BLOCK_SIZE,
            squashfs_bytes: parts.root.info.squashfs_bytes,
        },
        cmdline: parts.esp.cmdline,
        esp_files: parts.esp.sums,
        layout: parts.layout,
        sizes: manifest::Sizes::measure(&images.raw, &images.qcow2, &images.zst)?,
        outputs,
        steps: vec![],
        build_seconds: 0.0,
    })
}

const SBOM: &str = "sbom.spdx.json";

/// The SBOM (SPDX) of every input, into the work folder.
pub fn sbom(ctx: &Ctx, work: &WorkDir, kernel: &Kernel) -> Result<(), BuildError> {
    write_sbom(
        &work.path(SBOM),
        &ctx.spec.spec,
        &ctx.inputs,
        &kernel.unpacked,
        &ctx.seed,
        &ctx.init.sha256,
    )
}

/// Writes the manifest into the work folder, then renames every output into
/// place: nothing appears under its final name before all of them are complete.
pub fn publish(
    ctx: &Ctx,
    work: &WorkDir,
    images: &Images,
    bundle: &Bundle,
    manifest: &Manifest,
    out_dir: &Path,
) -> Result<(), BuildError> {
    let spec = &ctx.spec.spec;
    let sbom = work.path(SBOM);
    let manifest_path = work.path("manifest.json");
    manifest
        .write(&manifest_path)
        .map_err(|e| BuildError::Write(manifest_path.clone(), e))?;
    let names = OutputNames::new(&spec.name);
    for (tmp, name) in [
        (&images.raw, names.raw.as_str()),
        (&images.qcow2, names.qcow2.as_str()),
        (&images.zst, names.zst.as_str()),
        (&bundle.path, names.bundle.as_str()),
        (&sbom, SBOM),
        (&manifest_path, "manifest.json"),
    ] {
        let dest = out_dir.join(name);
        std::fs::rename(tmp, &dest).map_err(|e| BuildError::Write(dest, e))?;
    }
    Ok(())
}

struct OutputNames {
    raw: String,
    qcow2: String,
    zst: String,
    bundle: String,
}

impl OutputNames {
    fn new(name: &str) -> Self {
        OutputNames {
            raw: format!("{name}.raw"),
            qcow2: format!("{name}.qcow2"),
            zst: format!("{name}.raw.zst"),
            bundle: format!("{name}.bundle"),
        }
    }
}

fn write_sbom(
    out: &Path,
    spec: &ImageSpec,
    inputs: &BTreeMap<String, Resolved>,
    unpacked: &BTreeMap<&str, PathBuf>,
    seed: &str,
    init_sha: &str,
) -> Result<(), BuildError> {
    let debs: BTreeMap<&str, (&str, &str)> = [
        (
            "kernel",
            (&spec.kernel.deb.package, &spec.kernel.deb.version),
        ),
        (
            "grub-bios",
            (&spec.grub.bios.package, &spec.grub.bios.version),
        ),
        ("grub-efi", (&spec.grub.efi.package, &spec.grub.efi.version)),
        (
            "ca-certificates",
            (&spec.ca_certificates.package, &spec.ca_certificates.version),
        ),
    ]
    .into_iter()
    .map(|(k, (p, v))| (k, (p.as_str(), v.as_str())))
    .collect();
    let items: Vec<sbom::Item<'_>> = inputs
        .values()
        .map(|r| {
            let deb = debs.get(r.name.as_str());
            sbom::Item {
                input: r,
                version: deb
                    .map(|(_, v)| v.to_string())
                    .or_else(|| r.name.starts_with("k3s").then(|| spec.k3s.version.clone())),
                unpacked: unpacked.get(r.name.as_str()).map(PathBuf::as_path),
                package: deb.map(|(p, _)| p.to_string()),
            }
        })
        .collect();
    let doc = sbom::document(&spec.name, seed, &items, init_sha);
    let json = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(out, json).map_err(|e| BuildError::Write(out.into(), e))
}

fn to_qcow2(raw: &Path, out: &Path) -> Result<(), BuildError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out);
    host_tool(cmd, "qemu-utils").map_err(|e| BuildError::Qcow2(out.to_path_buf(), e))
}

/// Runs a host tool from Debian package `package`; the error is its stderr.
pub(super) fn host_tool(mut cmd: Command, package: &str) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .output()
        .map_err(|e| format!("run {program} (is {package} installed?): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
