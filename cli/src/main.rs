//! `basalt`: build images and boot them locally.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod hcloud;
mod pool;

/// The static basalt-init and basalt-stage1 built with this `basalt` (see build.rs): an
/// installed `basalt` builds images without the source tree. `--input basalt-init=PATH`
/// (and `--input basalt-stage1=PATH`) still override them.
const EMBEDDED_INIT: basalt_builder::build::InitSource =
    basalt_builder::build::InitSource::Embedded {
        init: include_bytes!(env!("BASALT_EMBEDDED_INIT")),
        stage1: include_bytes!(env!("BASALT_EMBEDDED_STAGE1")),
    };

use basalt_api::layout::fw_cfg;

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
        /// ca-certificates, k3s, k3s-images, basalt-init, basalt-stage1). Recorded in the manifest.
        #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_input)]
        inputs: Vec<(String, PathBuf)>,
        /// Refuse to build unless <spec>.lock exists and agrees with the spec.
        #[arg(long)]
        locked: bool,
    },
    /// Benchmarks (figures printed, nothing asserted).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Resolve every input of a spec into <spec>.lock next to it.
    Lock {
        spec: PathBuf,
        /// Re-pin this Debian input to the archive's current version (edits the spec).
        #[arg(long, value_name = "NAME")]
        update: Vec<String>,
    },
    /// Boot an image under QEMU with the console on this terminal (the image is not
    /// written: changes go to a throwaway overlay), with a user network (DHCP, no way
    /// out) and virtio-rng.
    Run {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// Boot with UEFI (OVMF) instead of legacy BIOS (SeaBIOS).
        #[arg(long)]
        uefi: bool,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// A machine config (TOML) for the node, passed as QEMU fw_cfg `opt/basalt/config`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Forward this port on the host's loopback to the node API (port 50000 in the guest).
        #[arg(long, value_name = "PORT")]
        api_port: Option<u16>,
        /// Open QEMU's user network: the guest reaches the host's loopback as 10.0.2.2 (a
        /// K3s server there) and the outside through QEMU's NAT. Closed by default.
        #[arg(long)]
        reach_host: bool,
    },
    /// Show what an image holds, read from the image: partitions, boot slots, versions.
    /// Given an upgrade bundle (.bundle), show its manifest and check every part's sha256.
    Inspect {
        /// A .raw or .qcow2 image, or a .bundle.
        image: PathBuf,
        /// Print JSON (field names documented on `inspect::ImageInfo`, `bundle::BundleInfo`).
        #[arg(long)]
        json: bool,
    },
    /// Check an image offline: both GPT copies, each slot's dm-verity tree against its
    /// boot entry's root hash, the ESP's files against the manifest. Exits non-zero on
    /// any mismatch.
    Verify {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// The build's manifest [default: manifest.json beside the image].
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// The pool CA: create it, issue client and node certificates.
    Pki {
        #[command(subcommand)]
        what: basalt_client::pki::cli::PkiCmd,
    },
    /// Talk to a node's API over mutual TLS: status, apply a config, logs, reboot, shutdown.
    Node(basalt_client::node::cli::NodeArgs),
    /// Hetzner Cloud: upload an image as a snapshot, list, prune, clean up.
    Hcloud(hcloud::HcloudArgs),
    /// The warm pool: run its controller (standby nodes, promoted on cluster-autoscaler's
    /// demand), or ask a running one for status, a promotion or a deletion.
    Pool(pool::PoolArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Cold-cache then warm-cache build of a spec; times per step and output sizes.
    Build {
        spec: PathBuf,
        /// Work folder for the two builds and their cache.
        #[arg(long, default_value = "out/bench")]
        out: PathBuf,
        /// As for `basalt build`.
        #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_input)]
        inputs: Vec<(String, PathBuf)>,
    },
    /// Boot timeline of an image against the floor (its kernel booted into a trivial init),
    /// both booted N times in the same run; and PID1's footprint.
    Boot {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// Boots of the image, and as many of the floor.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Boot with UEFI (OVMF) instead of legacy BIOS (SeaBIOS).
        #[arg(long)]
        uefi: bool,
        /// A prebuilt static basalt-floor [default: built from this source tree].
        #[arg(long, value_name = "PATH")]
        floor_init: Option<PathBuf>,
    },
    /// Promote → `k3s agent` exec latency and PID1's memory after a join: boots a
    /// standby node N times and joins it to the K3s server double. The image must carry
    /// the K3s agent double as its `k3s` (see the README).
    Join {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// Boots, each promoted once (twice as many with `--when both`).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// When to promote: `standby` (as soon as the node API answers), `prepared`
        /// (after K3s's background preparation and the warm-up have printed their steps),
        /// `prefetched` (prepared, with the server in the standby config's
        /// `standby.servers`, as the warm pool writes it), `both` (standby and prepared:
        /// each run boots once for each) or `all` (the three).
        #[arg(long, default_value = "both", value_parser = ["standby", "prepared", "prefetched", "both", "all"])]
        when: String,
    },
    /// A/B upgrade: the request (the bundle streamed, `reboot=1`) → the new slot at
    /// standby, against the floor in the same run: the bundle's bytes written and synced
    /// on the host, plus one boot of the floor (as `bench boot`).
    Upgrade {
        /// The image booted first (a .raw or .qcow2).
        image: PathBuf,
        /// A bundle of a newer version for the same layout (`basalt build` writes one).
        bundle: PathBuf,
        /// Upgrades, each from a fresh boot, and as many floors.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Boot with UEFI (OVMF) instead of legacy BIOS (SeaBIOS).
        #[arg(long)]
        uefi: bool,
        /// A prebuilt static basalt-floor [default: built from this source tree].
        #[arg(long, value_name = "PATH")]
        floor_init: Option<PathBuf>,
    },
    /// The warm pool: cluster-autoscaler's demand (gRPC NodeGroupIncreaseSize) → joined
    /// and → the agent reporting, a warm promote against a cold start, N times each, with
    /// the qemu provider. The image must carry the K3s agent double, as for `bench join`.
    Pool {
        /// A .raw or .qcow2 image.
        image: PathBuf,
        /// Warm promotes, and as many cold starts.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Upload throughput to the fake Hetzner API on loopback (its rescue a real sshd),
    /// against the floor: the same file sent over one plain SSH session to the same sshd
    /// and decompressed there. Needs root, openssh-server and zstd.
    Upload {
        /// A .raw.zst with manifest.json beside it.
        image: PathBuf,
        /// Uploads, and as many floor runs, alternating.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Logical and compressed size of an image by component: kernel, modules, K3s,
    /// basalt-init, everything else.
    Size {
        /// A .raw or .qcow2 image (its .raw.zst is looked for beside it).
        image: PathBuf,
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

fn firmware(uefi: bool) -> basalt_qemu::Firmware {
    if uefi {
        basalt_qemu::Firmware::Uefi
    } else {
        basalt_qemu::Firmware::Bios
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Build {
            spec,
            out,
            cache,
            inputs,
            locked,
        } => build(spec, out, cache, inputs, locked),
        Cmd::Bench { what } => bench(what),
        Cmd::Lock { spec, update } => lock(&spec, &update),
        Cmd::Run {
            image,
            uefi,
            memory,
            config,
            api_port,
            reach_host,
        } => run_vm(&image, uefi, memory, config, api_port, reach_host),
        Cmd::Inspect { image, json } if image.extension().is_some_and(|e| e == "bundle") => {
            let info = basalt_builder::bundle::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{info}");
            }
            Ok(())
        }
        Cmd::Inspect { image, json } => {
            let info = basalt_builder::inspect::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{info}");
            }
            Ok(())
        }
        Cmd::Verify { image, manifest } => {
            let report = basalt_builder::verify::verify(&image, manifest.as_deref())?;
            print!("{report}");
            let (failed, all) = (report.failures().count(), report.checks.len());
            anyhow::ensure!(
                failed == 0,
                "{}: {failed} of {all} checks failed",
                image.display()
            );
            Ok(())
        }
        Cmd::Pki { what } => Ok(basalt_client::pki::cli::run(what)?),
        Cmd::Node(args) => Ok(basalt_client::node::cli::run(args)?),
        Cmd::Hcloud(args) => Ok(hcloud::run(args)?),
        Cmd::Pool(args) => Ok(pool::run(args)?),
    }
}

fn build(
    spec: PathBuf,
    out: PathBuf,
    cache: Option<PathBuf>,
    inputs: Vec<(String, PathBuf)>,
    locked: bool,
) -> anyhow::Result<()> {
    basalt_builder::build::install_interrupt_handler();
    let opts = basalt_builder::build::BuildOptions {
        spec,
        out_dir: out.clone(),
        cache_dir: cache.unwrap_or_else(basalt_builder::cache::Cache::default_dir),
        overrides: inputs,
        locked,
        init: EMBEDDED_INIT,
    };
    let m = basalt_builder::build::build(&opts)?;
    for o in &m.outputs {
        println!("{}  {}", o.sha256, out.join(&o.file).display());
    }
    println!("root hash {}", m.root_hash);
    Ok(())
}

fn bench(what: BenchCmd) -> anyhow::Result<()> {
    use basalt_bench::{boot, join};
    match what {
        BenchCmd::Build { spec, out, inputs } => {
            basalt_builder::build::install_interrupt_handler();
            let runs = basalt_bench::build_twice(spec, out, inputs, EMBEDDED_INIT)?;
            let last = runs.last().context("no build ran")?;
            let (floor, sizes) = basalt_bench::build_floor(last)?;
            print!("{}", basalt_bench::report(&runs, &floor));
            print!("{sizes}");
        }
        BenchCmd::Boot {
            image,
            runs,
            uefi,
            floor_init,
        } => {
            let result = boot::run(&boot::BootBenchOptions {
                image,
                runs,
                firmware: firmware(uefi),
                floor_init,
            })?;
            print!("{result}");
        }
        BenchCmd::Join { image, runs, when } => {
            let when = join::When::parse_list(&when).map_err(anyhow::Error::msg)?;
            print!(
                "{}",
                join::run(&join::JoinBenchOptions { image, runs, when })?
            );
        }
        BenchCmd::Upgrade {
            image,
            bundle,
            runs,
            uefi,
            floor_init,
        } => {
            let opts = basalt_bench::upgrade::UpgradeBenchOptions {
                image,
                bundle,
                runs,
                firmware: firmware(uefi),
                floor_init,
            };
            print!("{}", basalt_bench::upgrade::run(&opts)?);
        }
        BenchCmd::Pool { image, runs } => {
            let opts = basalt_bench::pool::PoolBenchOptions { image, runs };
            print!("{}", basalt_bench::pool::run(&opts)?);
        }
        BenchCmd::Size { image } => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            print!("{}", basalt_bench::size::measure(&image, threads)?);
        }
        BenchCmd::Upload { image, runs } => {
            print!("{}", basalt_bench::upload::run(&image, runs)?);
        }
    }
    Ok(())
}

fn lock(spec: &Path, update: &[String]) -> anyhow::Result<()> {
    use basalt_builder::lock;
    for name in update {
        let version = lock::update_spec(spec, name)?;
        eprintln!(
            "basalt: {name} re-pinned to {version} in {}",
            spec.display()
        );
    }
    let parsed = basalt_builder::spec::ImageSpec::load(spec)?;
    let resolved = lock::resolve(&parsed)?;
    let path = lock::lock_path(spec);
    resolved.write(&path)?;
    for i in &resolved.inputs {
        println!(
            "{:<16} {}  {:>10}  {}",
            i.name,
            i.sha256,
            i.size,
            i.version.as_deref().or(i.url.as_deref()).unwrap_or("")
        );
    }
    eprintln!("basalt: wrote {}", path.display());
    Ok(())
}

/// `basalt run`: a user network (DHCP from QEMU, closed to the outside unless
/// `reach_host`) and entropy, as a node has them (what `bench boot` boots with too), the
/// config over fw_cfg.
fn run_vm(
    image: &Path,
    uefi: bool,
    memory: u32,
    config: Option<PathBuf>,
    api_port: Option<u16>,
    reach_host: bool,
) -> anyhow::Result<()> {
    let forwards: Vec<(u16, u16)> = api_port
        .map(|p| (p, basalt_api::node::DEFAULT_PORT))
        .into_iter()
        .collect();
    let mut args = basalt_qemu::node_devices(!reach_host, &forwards);
    if let Some(file) = config {
        let file = std::fs::canonicalize(&file)
            .with_context(|| format!("machine config {}", file.display()))?;
        basalt_api::config::MachineConfig::parse(
            &std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?,
        )
        .with_context(|| format!("machine config {}", file.display()))?;
        args.push("-fw_cfg".into());
        args.push(fw_cfg::qemu_arg(fw_cfg::CONFIG, &file));
    }
    let status = basalt_qemu::VmBuilder::new(image)
        .firmware(firmware(uefi))
        .memory_mib(memory)
        .extra_args(args)
        .run_interactive()
        .with_context(|| format!("boot {}", image.display()))?;
    anyhow::ensure!(status.success(), "QEMU exited with {status}");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The release profile strips basalt-init (see the workspace Cargo.toml): a symbol
    /// table would ship twice, in the initramfs and on the root.
    #[test]
    fn the_embedded_basalt_init_has_no_symbol_table() {
        let basalt_builder::build::InitSource::Embedded { init, stage1 } = EMBEDDED_INIT else {
            panic!("basalt embeds its basalt-init");
        };
        assert!(init.len() > 1 << 20, "{} bytes", init.len());
        for bytes in [init, stage1] {
            assert!(!basalt_bench::size::has_symbol_table(bytes));
        }
    }

    /// basalt-stage1 links only what stage 1 reaches: no node API, TLS or DHCP.
    #[test]
    fn the_embedded_stage1_is_a_fraction_of_basalt_init() {
        let basalt_builder::build::InitSource::Embedded { init, stage1 } = EMBEDDED_INIT else {
            panic!("basalt embeds its basalt-init");
        };
        if init == stage1 {
            return; // BASALT_EMBED_INIT without BASALT_EMBED_STAGE1 (see build.rs)
        }
        assert!(
            stage1.len() * 2 < init.len(),
            "basalt-stage1 {} bytes, basalt-init {} bytes",
            stage1.len(),
            init.len()
        );
    }
}
