//! `basalt build`: the pipeline from a spec to the disk outputs.
//!
//! Everything happens in a work folder inside the output folder; the outputs are renamed
//! into place only when all of them are complete, and the work folder is removed on every
//! path out (it is a `TempDir`). Nothing under an output's final name is ever partial.

use crate::cache::{self, Cache, Resolved};
use crate::disk::{self, Layout};
use crate::manifest::{self, Manifest};
use crate::spec::{ImageSpec, INPUT_NAMES};
use crate::{deb, esp, grub, initbuild, initramfs, kmod, rootfs, verity};
use basalt_api::bootparams::{BootParams, Slot, Verity, VERITY_BLOCK_SIZE};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub struct BuildOptions {
    pub spec: PathBuf,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// `--input NAME=PATH`
    pub overrides: Vec<(String, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
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
    #[error("dm-verity hash tree")]
    Verity(#[source] std::io::Error),
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
    #[error("output folder {0}")]
    Out(PathBuf, #[source] std::io::Error),
}

/// Prints one progress line on stderr.
fn step(n: usize, what: &str) {
    eprintln!("basalt: [{n}/9] {what}");
}

pub fn build(opts: &BuildOptions) -> Result<Manifest, BuildError> {
    let started = Instant::now();
    let spec = ImageSpec::load(&opts.spec)?;
    let spec_text = std::fs::read(&opts.spec).unwrap_or_default();

    step(1, "inputs");
    let inputs = resolve_inputs(&spec, opts)?;

    step(2, "basalt-init");
    let init_path = match opts.overrides.iter().find(|(n, _)| n == "basalt-init") {
        Some((_, p)) => {
            initbuild::check_static(p)?;
            p.clone()
        }
        None => initbuild::build(&initbuild::find_workspace(
            opts.spec.parent().unwrap_or(Path::new(".")),
        )?)?,
    };
    let (init_sha, init_size) = cache::hash_file(&init_path)
        .map_err(|e| BuildError::Init(initbuild::InitBuildError::Read(init_path.clone(), e)))?;

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

    std::fs::create_dir_all(&opts.out_dir).map_err(|e| BuildError::Out(opts.out_dir.clone(), e))?;
    let work = tempfile::Builder::new()
        .prefix(&format!(".{}.build-", spec.name))
        .tempdir_in(&opts.out_dir)
        .map_err(|e| BuildError::Out(opts.out_dir.clone(), e))?;
    let w = work.path();

    step(3, "unpack packages");
    let unpack = |name: &str| -> Result<PathBuf, BuildError> {
        let dir = w.join("pkg").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| BuildError::Out(dir.clone(), e))?;
        deb::unpack(&inputs[name].path, &dir)?;
        Ok(dir)
    };
    let kernel_dir = unpack("kernel")?;
    let grub_bios = unpack("grub-bios")?;
    let grub_efi = unpack("grub-efi")?;
    let ca_dir = unpack("ca-certificates")?;
    let kver = kernel_version(&kernel_dir).map_err(BuildError::Kernel)?;
    let moddir = kernel_dir.join("lib/modules").join(&kver);
    let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{kver}"));

    step(4, "initramfs");
    let graph = kmod::ModuleGraph::load(&moddir)?;
    let closure = graph.closure(&spec.kernel.initramfs_modules)?;
    let initrd = w.join("initrd.img");
    initramfs::write(
        &initramfs::tree(&init_path, &kver, &moddir, &closure),
        &initrd,
    )?;

    step(5, "root filesystem (squashfs + dm-verity)");
    let os_release = format!(
        "NAME=basalt\nID=basalt\nPRETTY_NAME=\"basalt {v}\"\nVERSION_ID={v}\nBASALT_IMAGE={}\nBASALT_KERNEL={kver}\nBASALT_K3S={}\n",
        spec.name,
        spec.k3s.version,
        v = env!("CARGO_PKG_VERSION")
    );
    let tree = rootfs::tree(&rootfs::RootContent {
        init: &init_path,
        k3s: &inputs["k3s"].path,
        k3s_images: &inputs["k3s-images"].path,
        ca_bundle: rootfs::ca_bundle(&ca_dir).map_err(BuildError::Certs)?,
        os_release,
        kver: &kver,
        moddir: &moddir,
    })?;
    let root_img = w.join("root.img");
    let squashfs_len = rootfs::write(&tree, &root_img)?;
    let salt: [u8; 32] = Sha256::digest(format!("basalt-verity-salt:{seed}")).into();
    let vinfo = append_verity(
        &root_img,
        squashfs_len,
        &salt,
        *derive_uuid("verity").as_bytes(),
    )?;
    let root_room = disk::Sectors::from_mib(spec.disk.root_mib).bytes();
    let root_size = std::fs::metadata(&root_img)
        .map_err(BuildError::Verity)?
        .len();
    if root_size > root_room {
        return Err(BuildError::RootTooLarge {
            size: root_size,
            room: root_room,
        });
    }
    let verity = Verity {
        root_hash: hex::encode(vinfo.root_hash),
        salt: hex::encode(salt),
        data_blocks: vinfo.data_blocks,
    };

    step(6, "bootloader (GRUB for BIOS and UEFI)");
    let layout = Layout::new(&spec.disk, derive_uuid);
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
    let cfg = grub::config(
        "a",
        &[
            grub::Entry {
                id: "a",
                title: "basalt (slot A)",
                kernel: "/boot/a/vmlinuz",
                initrd: "/boot/a/initrd.img",
                cmdline: &cmd_a,
            },
            // Slot B's kernel and initramfs are written by the first A/B upgrade.
            grub::Entry {
                id: "b",
                title: "basalt (slot B)",
                kernel: "/boot/b/vmlinuz",
                initrd: "/boot/b/initrd.img",
                cmdline: &cmd_b,
            },
        ],
    );
    let efi_image = grub::mkimage(
        &grub::EFI,
        &grub::module_dir(&grub_efi, &grub::EFI),
        "/EFI/BOOT",
        &w.join("BOOTX64.EFI"),
    )?;
    let bios_part = layout
        .get("BIOS")
        .map(|p| (p.first_lba.0, p.size()))
        .unwrap_or((2048, 1 << 20));
    let mut core = grub::mkimage(
        &grub::BIOS,
        &grub::module_dir(&grub_bios, &grub::BIOS),
        "(hd0,gpt2)/EFI/BOOT",
        &w.join("core.img"),
    )?;
    grub::patch_core(&mut core, bios_part.0, bios_part.1)?;
    let core_path = w.join("core.img");
    std::fs::write(&core_path, &core).map_err(|e| BuildError::Out(core_path.clone(), e))?;
    let boot_img_path = grub::module_dir(&grub_bios, &grub::BIOS).join("boot.img");
    let boot_img = std::fs::read(&boot_img_path)
        .map_err(|e| grub::GrubError::Read(boot_img_path.clone(), e))?;
    let boot_code = grub::bios_boot_code(&boot_img, bios_part.0, &boot_img_path)?;

    step(7, "EFI system partition and STATE");
    let read = |p: &Path| std::fs::read(p).map_err(|e| BuildError::Out(p.into(), e));
    let esp_files = vec![
        ("EFI/BOOT/BOOTX64.EFI", efi_image),
        ("EFI/BOOT/grub.cfg", cfg.clone().into_bytes()),
        ("boot/a/vmlinuz", read(&vmlinuz)?),
        ("boot/a/initrd.img", read(&initrd)?),
    ];
    let esp_img = w.join("esp.img");
    let volume_id = u32::from_le_bytes(
        derive_uuid("esp").as_bytes()[..4]
            .try_into()
            .unwrap_or_default(),
    );
    esp::write(
        &esp_img,
        disk::Sectors::from_mib(spec.disk.esp_mib).bytes(),
        volume_id,
        &esp_files,
    )?;
    let state_img = w.join("state.img");
    make_state(&state_img, spec.disk.state_mib, derive_uuid("state-fs"))?;

    step(8, "disk image");
    let raw_tmp = w.join("disk.raw");
    disk::write(
        &raw_tmp,
        &layout,
        boot_code,
        &[
            ("BIOS", &core_path),
            ("EFI", &esp_img),
            ("ROOT-A", &root_img),
            ("STATE", &state_img),
        ],
    )?;
    let qcow_tmp = w.join("disk.qcow2");
    to_qcow2(&raw_tmp, &qcow_tmp)?;

    step(9, "manifest and outputs");
    let raw_name = format!("{}.raw", spec.name);
    let qcow_name = format!("{}.qcow2", spec.name);
    let outputs = vec![
        manifest::output(&raw_name, &raw_tmp).map_err(|e| BuildError::Out(raw_tmp.clone(), e))?,
        manifest::output(&qcow_name, &qcow_tmp)
            .map_err(|e| BuildError::Out(qcow_tmp.clone(), e))?,
    ];
    let manifest = Manifest {
        basalt_version: env!("CARGO_PKG_VERSION").into(),
        name: spec.name.clone(),
        spec: opts.spec.display().to_string(),
        kernel_version: kver.clone(),
        k3s_version: spec.k3s.version.clone(),
        inputs: inputs.into_values().collect(),
        basalt_init: manifest::InitInfo {
            sha256: init_sha,
            size: init_size,
            path: init_path,
        },
        initramfs_modules: closure.iter().map(|m| m.name.clone()).collect(),
        root_hash: verity.root_hash.clone(),
        verity: manifest::VerityManifest {
            salt: verity.salt.clone(),
            data_blocks: verity.data_blocks,
            hash_offset: verity.data_blocks * VERITY_BLOCK_SIZE,
            squashfs_bytes: squashfs_len,
        },
        cmdline: BTreeMap::from([("a".to_string(), cmd_a), ("b".to_string(), cmd_b)]),
        esp_files: esp_files
            .iter()
            .map(|(path, bytes)| (path.to_string(), cache::sha256_hex(bytes)))
            .collect(),
        layout,
        outputs,
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let manifest_tmp = w.join("manifest.json");
    manifest
        .write(&manifest_tmp)
        .map_err(|e| BuildError::Out(manifest_tmp.clone(), e))?;
    for (tmp, name) in [
        (&raw_tmp, raw_name.as_str()),
        (&qcow_tmp, qcow_name.as_str()),
        (&manifest_tmp, "manifest.json"),
    ] {
        let dest = opts.out_dir.join(name);
        std::fs::rename(tmp, &dest).map_err(|e| BuildError::Out(dest, e))?;
    }
    Ok(manifest)
}

/// Overrides first (named, checked), then the cache for everything else. Nothing is
/// fetched before the spec and every override have been checked.
fn resolve_inputs(
    spec: &ImageSpec,
    opts: &BuildOptions,
) -> Result<BTreeMap<String, Resolved>, BuildError> {
    for (name, _) in &opts.overrides {
        if name != "basalt-init" && !INPUT_NAMES.contains(&name.as_str()) {
            return Err(BuildError::UnknownInput(name.clone()));
        }
    }
    let cache = Cache::open(&opts.cache_dir)?;
    let mut out = BTreeMap::new();
    for pin in spec.inputs() {
        let resolved = match opts.overrides.iter().find(|(n, _)| n == pin.name) {
            Some((_, path)) => cache::local_override(&pin, path)?,
            None => cache.fetch(&pin)?,
        };
        let how = match (&resolved.origin, resolved.cached) {
            (cache::Origin::Override { .. }, _) => "local file (override)",
            (_, true) => "cached",
            (_, false) => "fetched",
        };
        eprintln!(
            "basalt:       {:<16} {} {}",
            pin.name,
            &resolved.sha256[..12],
            how
        );
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

/// Pads the squashfs to whole verity blocks and appends the hash tree.
fn append_verity(
    img: &Path,
    len: u64,
    salt: &[u8],
    uuid: [u8; 16],
) -> Result<verity::VerityInfo, BuildError> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .map_err(BuildError::Verity)?;
    let data_len = len.div_ceil(VERITY_BLOCK_SIZE) * VERITY_BLOCK_SIZE;
    f.set_len(data_len).map_err(BuildError::Verity)?;
    let info = verity::append(&mut f, data_len, salt, uuid).map_err(BuildError::Verity)?;
    f.sync_all().map_err(BuildError::Verity)?;
    Ok(info)
}

/// An empty ext4 for STATE, made rootless by `mkfs.ext4` into a file with fixed UUID,
/// hash seed and time.
fn make_state(out: &Path, mib: u64, uuid: uuid::Uuid) -> Result<(), BuildError> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "STATE", "-U", &uuid.to_string(), "-E"])
        .arg(format!("root_owner=0:0,hash_seed={uuid}"))
        .arg(out)
        .arg(format!("{mib}M"))
        .env("E2FSPROGS_FAKE_TIME", "1");
    host_tool(cmd, "e2fsprogs").map_err(BuildError::State)
}

fn to_qcow2(raw: &Path, out: &Path) -> Result<(), BuildError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out);
    host_tool(cmd, "qemu-utils").map_err(BuildError::Qcow2)
}

/// Runs a host tool from Debian package `package`; the error is its stderr.
fn host_tool(mut cmd: Command, package: &str) -> Result<(), String> {
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
