//! Building the agent double as a static binary for a test image, the way the builder
//! builds basalt-init (`basalt_build_support::static_build`): its own target directory,
//! so it neither waits on nor invalidates the caller's build.

use basalt_build_support::static_build::{StaticBuild, StaticBuildError};
use std::io;
use std::path::{Path, PathBuf};

/// Builds `k3s-agent-double` (release, statically linked) from the workspace at
/// `workspace` into `workspace/target/doubles`, and returns the binary's path. The
/// command is in [`basalt_build_support::static_build`], with `-p k3s-doubles --bin
/// k3s-agent-double --target-dir target/doubles`.
pub fn build_agent_double(workspace: &Path) -> io::Result<PathBuf> {
    let build = StaticBuild {
        workspace,
        package: "k3s-doubles",
        bin: Some("k3s-agent-double"),
        target_dir: workspace.join("target/doubles"),
        default_features: true,
    };
    let bin = build.run().map_err(|e| match e {
        StaticBuildError::Spawn(_, e) => e,
        StaticBuildError::Cargo(_, status) => {
            io::Error::other(format!("cargo build of k3s-agent-double failed ({status})"))
        }
    })?;
    if !is_static_elf(&std::fs::read(&bin)?) {
        return Err(io::Error::other(format!(
            "{} is not a static ELF executable",
            bin.display()
        )));
    }
    Ok(bin)
}

/// An ELF64 little-endian file without a `PT_INTERP` program header: nothing for the
/// kernel to hand it to, so it runs where no dynamic loader is installed.
fn is_static_elf(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, 64-bit class, little endian.
    if data.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let ph = phoff + i * usize::from(phentsize);
        u32_at(ph).is_some_and(|t| t != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_dynamic_executable_is_not_static() {
        // This test binary links glibc dynamically.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&me[..0x30]));
    }

    /// Slow (a release build with LTO): run with `--ignored`, as the QEMU tests' setup
    /// does through [`build_agent_double`] anyway.
    #[test]
    #[ignore = "builds a release binary; minutes on a small machine"]
    fn the_agent_double_builds_static_and_runs() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = build_agent_double(&workspace).unwrap();
        assert!(is_static_elf(&std::fs::read(&bin).unwrap()));
        let out = Command::new(&bin).arg("--version").output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(crate::LINE_PREFIX));
    }
}
