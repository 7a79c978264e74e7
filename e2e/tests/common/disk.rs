//! A node's disk read by independent tools, with the VM stopped: `sfdisk` finds the
//! partitions, mtools reads the ESP, `grub-editenv` reads GRUB's environment block,
//! `fsck.fat` checks the ESP, `unsquashfs` reads a slot's root.

use super::tool;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Byte offset and size of a partition, as `sfdisk --json` reads the GPT.
pub fn sfdisk_partition(raw: &Path, name: &str) -> anyhow::Result<(u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", raw.to_str().context("path")?])?)?;
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let p = table["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .find(|p| p["name"] == name)
        .with_context(|| format!("sfdisk: no partition {name}"))?;
    let start = p["start"].as_u64().context("start")?;
    let size = p["size"].as_u64().context("size")?;
    Ok((start * sector, size * sector))
}

/// mtools' `-i image@@offset`: the ESP inside the raw disk.
pub fn esp_arg(raw: &Path, esp_offset: u64) -> anyhow::Result<String> {
    Ok(format!("{}@@{esp_offset}", raw.to_str().context("path")?))
}

/// An mtools command, without its geometry checks (the ESP is a file system at an offset).
pub fn mtool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("run {program} (mtools)"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `grub-editenv list` of the disk's environment block (copied out with mtools into
/// `dir`).
pub fn grubenv_list(raw: &Path, esp_offset: u64, dir: &Path) -> anyhow::Result<String> {
    let esp = esp_arg(raw, esp_offset)?;
    let out = dir.join("grubenv.read");
    let _ = std::fs::remove_file(&out);
    let out_s = out.to_str().context("path")?;
    mtool("mcopy", &["-i", &esp, "::/EFI/BOOT/grubenv", out_s])?;
    tool("grub-editenv", &[out_s, "list"])
}

/// A disk image as QEMU left it (an overlay and its backing chain), written out as one
/// raw file `out`, which keeps its holes.
pub fn to_raw(disk: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    tool(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-O",
            "raw",
            disk.to_str().context("path")?,
            out.to_str().context("path")?,
        ],
    )?;
    Ok(out.to_path_buf())
}

/// Copies `len` bytes at `offset` of `raw` into `out` with `dd`.
fn dd_out(raw: &Path, offset: u64, len: u64, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        offset.is_multiple_of(4096),
        "offset {offset} is not 4 KiB aligned"
    );
    tool(
        "dd",
        &[
            &format!("if={}", raw.to_str().context("path")?),
            &format!("of={}", out.to_str().context("path")?),
            "bs=4096",
            &format!("skip={}", offset / 4096),
            &format!("count={}", len.div_ceil(4096)),
            "status=none",
        ],
    )
    .map(drop)
}

/// The ESP is a clean FAT (`fsck.fat -n` finds nothing to repair).
pub fn esp_fsck(raw: &Path, dir: &Path) -> anyhow::Result<()> {
    let (offset, size) = sfdisk_partition(raw, "EFI")?;
    let check = dir.join("esp.check");
    dd_out(raw, offset, size, &check)?;
    let out = tool("fsck.fat", &["-n", check.to_str().context("path")?]);
    let _ = std::fs::remove_file(&check);
    out.map(drop)
}

/// The first bytes of a partition.
pub fn partition_head(raw: &Path, name: &str, len: usize) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let (offset, _) = sfdisk_partition(raw, name)?;
    let mut buf = vec![0u8; len];
    std::fs::File::open(raw)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// `VERSION_ID` of the os-release on the squashfs at the start of `partition`
/// (`ROOT-A`), read with `unsquashfs` alone: no verity, no basalt code.
pub fn root_version(raw: &Path, partition: &str, dir: &Path) -> anyhow::Result<String> {
    let head = partition_head(raw, partition, 96)?;
    anyhow::ensure!(&head[..4] == b"hsqs", "{partition} holds no squashfs");
    // The superblock's bytes_used (offset 40, little endian).
    let used = u64::from_le_bytes(head[40..48].try_into()?);
    let (offset, size) = sfdisk_partition(raw, partition)?;
    anyhow::ensure!(
        used <= size,
        "{partition}: squashfs larger than its partition"
    );
    let fs = dir.join(format!("{partition}.squashfs"));
    dd_out(raw, offset, used, &fs)?;
    let text = tool(
        "unsquashfs",
        &["-cat", fs.to_str().context("path")?, "etc/os-release"],
    );
    let _ = std::fs::remove_file(&fs);
    let text = text?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_owned())
        .with_context(|| format!("{partition}: no VERSION_ID in os-release:\n{text}"))
}
