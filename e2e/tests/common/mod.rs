//! Shared fixture of the end-to-end tests: the default image, built once per test binary
//! from `images/k3s-node.toml` with clearly named stand-ins for the K3s downloads (GitHub
//! is unreachable from the machines these tests run on).

#![allow(dead_code)]

pub mod disk;
pub mod pki;
pub mod upgrade;

use anyhow::Context;
use basalt_builder::build::{build, BuildOptions};
use basalt_qemu::{HarnessError, Vm};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub struct Image {
    pub dir: PathBuf,
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub manifest: serde_json::Value,
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Files standing in for the K3s binary and airgap images. They are never executed in
/// these tests; the name says what they are.
pub fn k3s_standins(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let bin = dir.join("k3s-standin");
    let images = dir.join("k3s-airgap-images-standin.tar.zst");
    std::fs::write(
        &bin,
        "basalt test stand-in for the k3s binary (not executable)\n",
    )?;
    std::fs::write(&images, "basalt test stand-in for the k3s airgap images\n")?;
    Ok((bin, images))
}

/// The default image, built once for the whole test binary.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    IMAGE.get_or_init(|| match build_default() {
        Ok(img) => img,
        Err(e) => panic!("building the default image failed: {e:#}"),
    })
}

fn build_default() -> anyhow::Result<Image> {
    build_into("out")
}

/// Builds the default image into `target/tmp/e2e/<name>` with the shared cache.
pub fn build_into(name: &str) -> anyhow::Result<Image> {
    build_with(name, &basalt_builder::cache::Cache::default_dir())
}

/// Builds the default image into `target/tmp/e2e/<name>` with the given cache.
pub fn build_with(name: &str, cache: &Path) -> anyhow::Result<Image> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    let (k3s, _) = k3s_standins(&root.join("standins"))?;
    build_with_k3s(name, cache, &k3s)
}

/// Builds the default image into `target/tmp/e2e/<name>` with `k3s` as the K3s binary
/// (a stand-in, or the K3s agent double that the join tests run).
pub fn build_with_k3s(name: &str, cache: &Path, k3s: &Path) -> anyhow::Result<Image> {
    build_spec(&workspace().join("images/k3s-node.toml"), name, cache, k3s)
}

/// Builds `spec` (with its lock beside it) into `target/tmp/e2e/<name>` with `k3s` as the
/// K3s binary.
pub fn build_spec(spec: &Path, name: &str, cache: &Path, k3s: &Path) -> anyhow::Result<Image> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    let dir = root.join(name);
    let (_, images) = k3s_standins(&root.join("standins"))?;
    let opts = BuildOptions {
        spec: spec.to_path_buf(),
        out_dir: dir.clone(),
        cache_dir: cache.to_path_buf(),
        overrides: vec![
            ("k3s".into(), k3s.to_path_buf()),
            ("k3s-images".into(), images),
        ],
        // The committed lock must agree with the spec: what a release pipeline runs.
        locked: true,
        init: Default::default(),
    };
    build(&opts).with_context(|| format!("basalt build {}", spec.display()))?;
    let manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    Ok(Image {
        raw: dir.join("k3s-node.raw"),
        qcow2: dir.join("k3s-node.qcow2"),
        dir,
        manifest,
    })
}

/// The default image with the K3s agent double as its `k3s`, built once per binary.
pub fn join_image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let double = k3s_doubles::build_agent_double(&workspace())
            .unwrap_or_else(|e| panic!("building the K3s agent double: {e}"));
        build_with_k3s(
            "join",
            &basalt_builder::cache::Cache::default_dir(),
            &double,
        )
        .unwrap_or_else(|e| panic!("building the join image: {e:#}"))
    })
}

/// Waits for a console line; on failure prints the whole serial log (and what QEMU said)
/// before returning the error.
pub fn expect_line(vm: &mut Vm, what: &str, base: Duration) -> anyhow::Result<String> {
    let timeout = vm.accel().scale(base);
    vm.wait_for(what, timeout).map_err(|e| dump(vm, e))
}

/// No `[basalt] error` line anywhere on the console.
pub fn assert_no_errors(vm: &Vm) {
    let serial = vm.serial();
    let errors: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("[basalt] error"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n{serial}");
}

pub fn dump(vm: &Vm, e: HarnessError) -> anyhow::Error {
    eprintln!(
        "----- serial log -----\n{}\n----- QEMU output -----\n{}\n-----",
        vm.serial(),
        vm.qemu_output()
    );
    anyhow::Error::new(e)
}

/// Runs a host tool; returns its stdout, or an error with its stderr.
pub fn tool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Byte offset and size of a partition, from the manifest's layout.
pub fn partition(img: &Image, name: &str) -> anyhow::Result<(u64, u64)> {
    let parts = img.manifest["layout"]["partitions"]
        .as_array()
        .context("layout.partitions")?;
    let p = parts
        .iter()
        .find(|p| p["name"] == name)
        .with_context(|| format!("partition {name}"))?;
    let first = p["first_lba"].as_u64().context("first_lba")?;
    let sectors = p["sectors"].as_u64().context("sectors")?;
    Ok((first * 512, sectors * 512))
}

/// Copies a partition's bytes out of the raw image into `out`.
pub fn extract(img: &Image, name: &str, out: &Path) -> anyhow::Result<()> {
    extract_from(img, &img.raw, name, out)
}

/// Copies an image keeping its holes (the default image is 2.2 GB, mostly sparse).
pub fn copy_sparse(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let (src, dst) = (src.to_str().context("path")?, dst.to_str().context("path")?);
    tool("cp", &["--sparse=always", src, dst]).map(drop)
}

/// Inverts every bit of the byte at `offset` of a file.
pub fn flip_byte(path: &Path, offset: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset)?;
    f.write_all_at(&[b[0] ^ 0xff], offset)?;
    f.sync_all()?;
    Ok(())
}

/// Copies `len` bytes from one partition of the raw image at `path` to the start of
/// another, skipping all-zero chunks so the file stays sparse.
pub fn copy_partition_bytes(
    img: &Image,
    path: &Path,
    (from, to): (&str, &str),
    len: u64,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let ((src, src_size), (dst, dst_size)) = (partition(img, from)?, partition(img, to)?);
    anyhow::ensure!(len <= src_size.min(dst_size), "{len} bytes do not fit");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], src + done)?;
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], dst + done)?;
        }
        done += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Copies a partition's bytes out of any raw image with the default layout (a damaged
/// copy, say) into `out`.
pub fn extract_from(img: &Image, raw: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let (offset, size) = partition(img, name)?;
    let mut src = std::fs::File::open(raw)?;
    src.seek(SeekFrom::Start(offset))?;
    let mut dst = std::fs::File::create(out)?;
    std::io::copy(&mut (&mut src).take(size), &mut dst)?;
    dst.flush()?;
    Ok(())
}

/// Whether `pid` is still a running process, read from `/proc/<pid>/stat` (a zombie left
/// unreaped by whoever adopted a daemonized QEMU counts as gone).
pub fn process_runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// A serial console log as text so far (empty before QEMU has written it).
pub fn console(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Writes `bytes` as `file` (`boot/b/slot.cfg`) into the ESP of a raw image with the
/// default layout, with mtools (an independent FAT writer), making its folder if needed.
pub fn write_esp_file(img: &Image, raw: &Path, file: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let (offset, _) = partition(img, "EFI")?;
    let esp = format!("{}@@{offset}", raw.to_str().context("path")?);
    let src = tempfile::NamedTempFile::new()?;
    std::fs::write(src.path(), bytes)?;
    let run = |program: &str, args: &[&str]| -> anyhow::Result<std::process::Output> {
        let out = std::process::Command::new(program)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .with_context(|| format!("run {program} (mtools)"))?;
        Ok(out)
    };
    if let Some((dir, _)) = file.rsplit_once('/') {
        // mmd fails when the folder exists: that is fine.
        run("mmd", &["-i", &esp, &format!("::/{dir}")])?;
    }
    let dst = format!("::/{file}");
    let out = run(
        "mcopy",
        &["-o", "-i", &esp, src.path().to_str().context("path")?, &dst],
    )?;
    anyhow::ensure!(
        out.status.success(),
        "mcopy {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A node on `disk` with its API forwarded to `port` on the host's loopback (QEMU's
/// user network: the guest reaches the host's loopback as 10.0.2.2, where the K3s
/// server double listens), and `config`, if any, as the machine config on fw_cfg
/// (written into `dir`).
pub fn boot_node(disk: &Path, port: u16, config: Option<&str>, dir: &Path) -> anyhow::Result<Vm> {
    let mut args = basalt_qemu::node_devices(false, &[(port, basalt_api::node::DEFAULT_PORT)]);
    if let Some(text) = config {
        let file = dir.join("config.toml");
        std::fs::write(&file, text)?;
        args.push("-fw_cfg".into());
        args.push(basalt_api::layout::fw_cfg::qemu_arg(
            basalt_api::layout::fw_cfg::CONFIG,
            &file,
        ));
    }
    Ok(basalt_qemu::VmBuilder::new(disk).extra_args(args).spawn()?)
}

/// Reboots the node through its API (`-no-reboot` turns that into QEMU's exit), then
/// boots the same disk (`vm`'s overlay, so keep `vm`) without fw_cfg, its API forwarded
/// to a fresh port, and waits until it has read its machine config from STATE.
pub fn reboot_from_state(
    vm: &mut Vm,
    ops: &basalt_client::node::NodeClient,
    dir: &Path,
    base: Duration,
) -> anyhow::Result<(Vm, u16)> {
    ops.reboot()?;
    let timeout = vm.accel().scale(base);
    vm.wait_exit(timeout).map_err(|e| dump(vm, e))?;
    let port = pki::free_port()?;
    let mut again = boot_node(vm.overlay(), port, None, dir)?;
    expect_line(&mut again, "machine config from STATE", base)?;
    Ok((again, port))
}
