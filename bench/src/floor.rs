//! The boot benchmark's floor: the image's own kernel booted by QEMU straight into a
//! trivial static init (`bench/floor/`, basalt-floor) that prints its uptime and powers off.
//! Its time is the least any init can take on this kernel, firmware and VM.

use basalt_builder::initbuild::{self, InitBuildError};
use basalt_builder::initramfs::{self, InitramfsError};
use basalt_builder::tree::Tree;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What basalt-floor prints (`floor/src/main.rs` writes the same text).
pub const MARKER: &str = "[basalt-floor] init t=";

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("basalt-floor")]
    Workspace(#[source] InitBuildError),
    #[error("build basalt-floor")]
    Build(#[source] InitBuildError),
    #[error("floor initramfs")]
    Initramfs(#[from] InitramfsError),
    #[error("write the floor's kernel {0}")]
    Kernel(PathBuf, #[source] std::io::Error),
}

/// The seconds on basalt-floor's marker line, if `line` holds one.
pub fn parse_marker(line: &str) -> Option<f64> {
    let rest = &line[line.find(MARKER)? + MARKER.len()..];
    let t: f64 = rest.trim_end().parse().ok()?;
    (t.is_finite() && t >= 0.0).then_some(t)
}

/// Builds basalt-floor from the workspace that holds `from` (or `BASALT_SOURCE`) the way
/// basalt-init is built: release, static, in its own target folder.
pub fn build_init(from: &Path) -> Result<PathBuf, FloorError> {
    let workspace = initbuild::find_workspace(from).map_err(FloorError::Workspace)?;
    initbuild::build_static(&workspace, "basalt-floor", "floor").map_err(FloorError::Build)
}

/// The floor's initramfs: `/dev/console` (the kernel opens it for init) and `/init`.
pub fn tree(init: &Path) -> Tree {
    let mut t = Tree::default();
    t.char_dev("dev/console", 5, 1, 0o600);
    t.file("init", init, 0o755);
    t
}

/// The image's command line without basalt's own parameters: the same console and log
/// level, nothing the floor's init would not read anyway.
pub fn cmdline(image_cmdline: &str) -> String {
    image_cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("basalt."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The files the floor boots from, in a folder that lives as long as this.
pub struct FloorBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Size of the static init and of the compressed initramfs, in bytes.
    pub init_bytes: u64,
    pub initrd_bytes: u64,
    _dir: tempfile::TempDir,
}

impl FloorBoot {
    /// Writes `kernel` and an initramfs around `init` into a temporary folder.
    pub fn prepare(kernel: &[u8], init: &Path, image_cmdline: &str) -> Result<Self, FloorError> {
        let dir = tempfile::Builder::new()
            .prefix("basalt-floor-")
            .tempdir()
            .map_err(|e| FloorError::Kernel(std::env::temp_dir(), e))?;
        let kernel_path = dir.path().join("vmlinuz");
        std::fs::write(&kernel_path, kernel)
            .map_err(|e| FloorError::Kernel(kernel_path.clone(), e))?;
        let initrd = dir.path().join("initrd.img");
        initramfs::write(&tree(init), &initrd)?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len());
        let init_bytes = size(init).map_err(|e| FloorError::Kernel(init.into(), e))?;
        let initrd_bytes = size(&initrd).map_err(|e| FloorError::Kernel(initrd.clone(), e))?;
        Ok(FloorBoot {
            kernel: kernel_path,
            initrd,
            cmdline: cmdline(image_cmdline),
            init_bytes,
            initrd_bytes,
            _dir: dir,
        })
    }

    /// QEMU's direct kernel boot of these files.
    pub fn qemu_args(&self) -> Vec<OsString> {
        vec![
            "-kernel".into(),
            self.kernel.clone().into(),
            "-initrd".into(),
            self.initrd.clone().into(),
            "-append".into(),
            self.cmdline.clone().into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_builder::tree::Content;

    #[test]
    fn the_marker_is_found_in_console_lines() {
        let cases = [
            ("[basalt-floor] init t=0.734", Some(0.734)),
            ("\x1b[0m[basalt-floor] init t=12.000\r", Some(12.0)),
            ("[basalt-floor] init t=", None),
            ("[basalt-floor] init t=-1.000", None),
            ("[basalt-floor] init t=1.0 extra", None),
            ("[basalt] ready t=1.000", None),
            ("[basalt-floor] error: power off: EPERM", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_marker(line), want, "{line:?}");
        }
    }

    #[test]
    fn the_marker_matches_what_basalt_floor_prints() {
        let src = include_str!("../floor/src/main.rs");
        assert!(src.contains(&format!("const MARKER: &str = {MARKER:?};")));
    }

    #[test]
    fn the_command_line_keeps_everything_but_basalt_parameters() {
        // As the builder writes it: `gpt` first (the floor keeps it; it reads the same disk).
        assert_eq!(
            cmdline("gpt console=tty0 console=ttyS0,115200n8 quiet panic=10 basalt.slot=a basalt.verity.root=ab basalt.verity.salt=cd basalt.verity.blocks=9"),
            "gpt console=tty0 console=ttyS0,115200n8 quiet panic=10"
        );
    }

    #[test]
    fn the_initramfs_holds_the_console_and_init_only() {
        let t = tree(Path::new("/x/basalt-floor"));
        let keys: Vec<_> = t.nodes.keys().cloned().collect();
        assert_eq!(keys, ["dev", "dev/console", "init"]);
        assert_eq!(
            t.nodes["init"].content,
            Content::File("/x/basalt-floor".into())
        );
    }
}
