//! The copy-on-write overlay that keeps a VM's writes out of the image under test.

use std::io;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::error::HarnessError;

pub(crate) const QEMU_IMG: &str = "qemu-img";

/// `qemu-img create -f qcow2 -b <image>`: the guest's writes land in `overlay`, never in `image`.
pub(crate) fn create_overlay(
    image: &Path,
    overlay: &Path,
    size: Option<u64>,
) -> Result<(), HarnessError> {
    let overlay_error = |source: io::Error| HarnessError::Overlay {
        image: image.to_path_buf(),
        source,
    };
    // qemu-img resolves a relative backing path against the overlay's directory, not ours.
    let backing = image.canonicalize().map_err(overlay_error)?;
    let format = image_format(&backing).map_err(|e| e.into_harness(overlay_error))?;
    let mut command = Command::new(QEMU_IMG);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
        .arg(&backing)
        .arg(overlay);
    if let Some(size) = size {
        command.arg(size.to_string());
    }
    run_tool(command).map_err(|e| e.into_harness(overlay_error))?;
    Ok(())
}

/// `qcow2` or `raw` from the file name, else whatever `qemu-img info` detects.
fn image_format(image: &Path) -> Result<String, ToolError> {
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => return Ok("qcow2".into()),
        Some("raw") => return Ok("raw".into()),
        _ => {}
    }
    let mut command = Command::new(QEMU_IMG);
    command.args(["info", "--output=json"]).arg(image);
    let info = run_tool(command)?;
    let info = String::from_utf8_lossy(&info.stdout);
    json_string_field(&info, "format")
        .ok_or_else(|| ToolError::Io(io::Error::other("qemu-img info reported no format")))
}

/// The first `"key": "value"` in `json`; enough for `qemu-img info`, whose first `format` is
/// the image's own (the backing image's comes later, nested).
pub(crate) fn json_string_field(json: &str, key: &str) -> Option<String> {
    let after_key = json.split_once(&format!("\"{key}\""))?.1;
    let value = after_key.trim_start().strip_prefix(':')?.trim_start();
    let value = value.strip_prefix('"')?;
    Some(value.split_once('"')?.0.to_string())
}

enum ToolError {
    NotFound(&'static str),
    Io(io::Error),
}

impl ToolError {
    fn into_harness(self, wrap: impl FnOnce(io::Error) -> HarnessError) -> HarnessError {
        match self {
            ToolError::NotFound(program) => HarnessError::QemuNotFound { program },
            ToolError::Io(e) => wrap(e),
        }
    }
}

/// Runs a `qemu-img` command; a failure carries its stderr.
fn run_tool(mut command: Command) -> Result<Output, ToolError> {
    let output = command.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ToolError::NotFound(QEMU_IMG)
        } else {
            ToolError::Io(e)
        }
    })?;
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(ToolError::Io(io::Error::other(format!(
        "{QEMU_IMG} {}: {}",
        output.status,
        stderr.trim()
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_format_comes_from_the_name_or_qemu_img() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, [0u8; 4096])?;
        let qcow2 = dir.path().join("cloud.img");
        let created = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("1M")
            .status()?;
        assert!(created.success());
        let format = |path: &Path| image_format(path);
        assert_eq!(format(&raw).ok().as_deref(), Some("raw"));
        assert_eq!(format(&qcow2).ok().as_deref(), Some("qcow2"));
        assert_eq!(format(Path::new("x.qcow2")).ok().as_deref(), Some("qcow2"));
        assert_eq!(format(Path::new("x.raw")).ok().as_deref(), Some("raw"));
        Ok(())
    }

    #[test]
    fn json_string_field_reads_the_first_match() {
        let json = r#"{ "virtual-size": 1, "format": "raw", "backing": { "format": "qcow2" } }"#;
        assert_eq!(json_string_field(json, "format").as_deref(), Some("raw"));
        assert_eq!(json_string_field(json, "missing"), None);
    }

    #[test]
    fn overlay_records_the_absolute_backing_image_and_its_format() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("cloud.img");
        let created = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("1M")
            .status()?;
        assert!(created.success());
        let overlay = dir.path().join("overlay.qcow2");
        // A relative image path must still end up absolute in the overlay.
        let relative = relative_to_cwd(&base)?;
        create_overlay(&relative, &overlay, Some(4 << 20))?;
        let info = Command::new(QEMU_IMG)
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()?;
        let info = String::from_utf8(info.stdout)?;
        assert_eq!(
            json_string_field(&info, "backing-filename").as_deref(),
            base.canonicalize()?.to_str()
        );
        assert_eq!(
            json_string_field(&info, "backing-filename-format").as_deref(),
            Some("qcow2")
        );
        assert!(info.contains("\"virtual-size\": 4194304,"), "{info}");
        Ok(())
    }

    /// `path` relative to the current directory, through enough `..` to reach `/`.
    fn relative_to_cwd(path: &Path) -> anyhow::Result<std::path::PathBuf> {
        let depth = std::env::current_dir()?.components().count() - 1;
        let mut relative: std::path::PathBuf = (0..depth).map(|_| "..").collect();
        relative.push(path.strip_prefix("/")?);
        Ok(relative)
    }
}
