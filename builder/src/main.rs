//! `basalt`: build images and boot them locally.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "basalt",
    version,
    about = "Build immutable Kubernetes node images and run them"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a disk image from an image spec.
    Build {
        /// The image spec (TOML), e.g. images/k3s-node.toml.
        spec: PathBuf,
        /// Output folder for <name>.raw, <name>.qcow2 and manifest.json.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Input cache folder [default: $BASALT_CACHE or ~/.cache/basalt].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Use a local file for an input: NAME=PATH (kernel, grub-bios, grub-efi,
        /// ca-certificates, k3s, k3s-images, basalt-init). Recorded in the manifest.
        #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_input)]
        inputs: Vec<(String, PathBuf)>,
    },
    /// Boot an image under QEMU with the console on this terminal (the image is not
    /// written: changes go to a throwaway overlay).
    Run {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// Boot with UEFI (OVMF) instead of legacy BIOS (SeaBIOS).
        #[arg(long)]
        uefi: bool,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
    },
}

fn parse_input(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("expected NAME=PATH, got {s:?}"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Build {
            spec,
            out,
            cache,
            inputs,
        } => {
            let opts = basalt_builder::build::BuildOptions {
                spec,
                out_dir: out.clone(),
                cache_dir: cache.unwrap_or_else(basalt_builder::cache::Cache::default_dir),
                overrides: inputs,
            };
            let m = basalt_builder::build::build(&opts)?;
            for o in &m.outputs {
                println!("{}  {}", o.sha256, out.join(&o.file).display());
            }
            println!("root hash {}", m.root_hash);
            Ok(())
        }
        Cmd::Run {
            image,
            uefi,
            memory,
        } => {
            let firmware = if uefi {
                basalt_qemu::Firmware::Uefi
            } else {
                basalt_qemu::Firmware::Bios
            };
            let status = basalt_qemu::VmBuilder::new(&image)
                .firmware(firmware)
                .memory_mib(memory)
                .run_interactive()
                .with_context(|| format!("boot {}", image.display()))?;
            anyhow::ensure!(status.success(), "QEMU exited with {status}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("basalt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
