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
//! The same cargo run builds basalt-stage1 (the package's second binary, stage 1 alone,
//! the initramfs's `/init`), which is embedded beside it.
//! `BASALT_EMBED_INIT=PATH` embeds a prebuilt static basalt-init instead, and
//! `BASALT_EMBED_STAGE1=PATH` a prebuilt basalt-stage1 (without it, the prebuilt
//! basalt-init is the initramfs's `/init` too).

use basalt_build_support::static_build::StaticBuild;
use std::path::{Path, PathBuf};

fn main() {
    basalt_build_support::probe(&[
        basalt_build_support::QEMU,
        basalt_build_support::ROOT,
        basalt_build_support::HCLOUD_FAKE,
    ]);
    let (init, stage1) = match std::env::var_os("BASALT_EMBED_INIT") {
        Some(path) => {
            let init = PathBuf::from(path);
            let stage1 =
                std::env::var_os("BASALT_EMBED_STAGE1").map_or(init.clone(), PathBuf::from);
            (init, stage1)
        }
        None => {
            let init = build_init();
            let stage1 = init.with_file_name("basalt-stage1");
            (init, stage1)
        }
    };
    println!("cargo::rerun-if-env-changed=BASALT_EMBED_INIT");
    println!("cargo::rerun-if-env-changed=BASALT_EMBED_STAGE1");
    println!("cargo::rustc-env=BASALT_EMBEDDED_INIT={}", init.display());
    println!(
        "cargo::rustc-env=BASALT_EMBEDDED_STAGE1={}",
        stage1.display()
    );
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
