//! Builds the static basalt-init that `basalt` embeds, so that a `basalt` copied or
//! installed on its own builds images without the source tree (`--input basalt-init=PATH`
//! still overrides it). Also probes the host for what the CLI's tests need (see
//! `basalt-build-support`).
//!
//! basalt-init is built as the image library builds it from a checkout
//! (`basalt_builder::initbuild::build`, both through `basalt_build_support::static_build`):
//! release, `+crt-static` for the target only, but
//! without default features, so the test service (`testd`) is not in a release image, and
//! into its own `target/init-release`, so that the tests' build (with `testd`) never
//! overwrites the binary this one embeds.
//! `BASALT_EMBED_INIT=PATH` embeds a prebuilt static basalt-init instead.

use basalt_build_support::static_build::StaticBuild;
use std::path::{Path, PathBuf};

fn main() {
    basalt_build_support::probe(&[
        basalt_build_support::QEMU,
        basalt_build_support::ROOT,
        basalt_build_support::HCLOUD_FAKE,
    ]);
    let init = match std::env::var_os("BASALT_EMBED_INIT") {
        Some(path) => PathBuf::from(path),
        None => build_init(),
    };
    println!("cargo::rerun-if-env-changed=BASALT_EMBED_INIT");
    println!("cargo::rustc-env=BASALT_EMBEDDED_INIT={}", init.display());
}

fn build_init() -> PathBuf {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest
        .parent()
        .expect("cli/ sits in the workspace")
        .to_path_buf();
    // What basalt-init is built from: its crate, the crates it uses, the lock.
    for input in ["init", "api", "build-support", "Cargo.lock", "Cargo.toml"] {
        println!(
            "cargo::rerun-if-changed={}",
            workspace.join(input).display()
        );
    }
    let build = StaticBuild {
        workspace: &workspace,
        package: "basalt-init",
        bin: None,
        target_dir: target_root(&workspace).join("init-release"),
        default_features: false,
    };
    let mut command = build.command();
    // What the outer cargo (or clippy) set for its own build must not leak into this one.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(var);
    }
    match build.run_command(command) {
        Ok(bin) => bin,
        Err(e) => panic!(
            "static basalt-init: {e} ({:?})",
            std::error::Error::source(&e)
        ),
    }
}

/// The workspace's target folder: `CARGO_TARGET_DIR` when the outer build uses one,
/// else `<workspace>/target`.
fn target_root(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
}
