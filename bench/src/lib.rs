//! Benchmarks. Figures are printed, never asserted: speed lives in benchmarks, not tests.
//! Each measures against a floor, the work no implementation could skip on the same
//! machine, because on shared and noisy machines the ratio holds where seconds do not.
//!
//! - `basalt bench build` ([`build_twice`], [`build_floor`]): a cold-cache and a
//!   warm-cache build, against the time to read every input and compress the root's
//!   content with the root's compressor.
//! - `basalt bench boot` ([`boot`]): the boot timeline, against the image's kernel booted
//!   into a trivial init ([`floor`]); and PID1's footprint.
//! - `basalt bench size` ([`size`]): the image's size by component.
//! - `basalt bench upload` ([`upload`]): upload throughput to the fake Hetzner API,
//!   against one plain SSH stream of the same file to the same sshd.
//! - `basalt bench pool` ([`pool`]): the warm pool, demand → joined, a warm promote
//!   against a cold start (create, boot, join) in the same run.

pub mod boot;
mod boot_report;
pub mod content;
pub mod floor;
pub mod join;
pub mod pool;
pub mod size;
pub mod stats;
pub mod upgrade;
pub mod upload;

use basalt_builder::build::{build, BuildError, BuildOptions, InitSource};
use basalt_builder::image::DiskImage;
use basalt_builder::manifest::Manifest;
use content::{ContentError, Squashed};
use size::{Breakdown, SizeError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BuildBenchError {
    #[error("read input {0}")]
    ReadInput(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Image(#[from] basalt_builder::image::ImageError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// `N cores, <CPU model>` of this machine.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub struct BenchRun {
    pub label: &'static str,
    pub seconds: f64,
    pub manifest: Manifest,
    /// The raw disk this build wrote.
    pub raw: PathBuf,
}

/// Builds twice into `out/cold` and `out/warm` with a fresh cache under `out/cache`.
// The library's own error, passed through as `build` returns it; clippy flags its size here
// though not in the library, whose `build` returns the same type.
#[allow(clippy::result_large_err)]
pub fn build_twice(
    spec: PathBuf,
    out: PathBuf,
    overrides: Vec<(String, PathBuf)>,
    init: InitSource,
) -> Result<Vec<BenchRun>, BuildError> {
    let cache = out.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).map_err(|e| BuildError::Write(cache.clone(), e))?;
    }
    let mut runs = vec![];
    for label in ["cold", "warm"] {
        let opts = BuildOptions {
            spec: spec.clone(),
            out_dir: out.join(label),
            cache_dir: cache.clone(),
            overrides: overrides.clone(),
            locked: false,
            init,
        };
        let started = Instant::now();
        let manifest = build(&opts)?;
        let raw = opts.out_dir.join(format!("{}.raw", manifest.name));
        runs.push(BenchRun {
            label,
            seconds: started.elapsed().as_secs_f64(),
            manifest,
            raw,
        });
    }
    Ok(runs)
}

/// The build's floor: every input read once (from the page cache the builds just
/// warmed) and the root's content compressed as the image's squashfs is, on all cores.
pub struct BuildFloor {
    pub input_bytes: u64,
    pub read_inputs: Duration,
    pub squashed: Squashed,
}

impl BuildFloor {
    pub fn seconds(&self) -> f64 {
        (self.read_inputs + self.squashed.wall).as_secs_f64()
    }
}

/// Measures the floor for the inputs of `run`, and the size breakdown of its image (which
/// needs the same recompression of the root).
pub fn build_floor(run: &BenchRun) -> Result<(BuildFloor, Breakdown), BuildBenchError> {
    let img = DiskImage::open(&run.raw)?;
    let boot = content::default_boot(&img)?;
    let root = content::root_files(&img, &boot.root_partition)?;
    let mut paths: Vec<&Path> = run
        .manifest
        .inputs
        .iter()
        .map(|i| i.path.as_path())
        .collect();
    paths.push(&run.manifest.basalt_init.path);
    if run.manifest.basalt_stage1.path != run.manifest.basalt_init.path {
        paths.push(&run.manifest.basalt_stage1.path);
    }
    let started = Instant::now();
    let mut input_bytes = 0;
    for p in paths {
        input_bytes += read_all(p).map_err(|e| BuildBenchError::ReadInput(p.into(), e))?;
    }
    let read_inputs = started.elapsed();
    let squashed = content::squash(&root, threads())?;
    let breakdown = size::breakdown(&img, &boot, &root, &squashed)?;
    Ok((
        BuildFloor {
            input_bytes,
            read_inputs,
            squashed,
        },
        breakdown,
    ))
}

/// Reads a file to its end through one buffer; returns its length.
fn read_all(path: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The report as printed: times per run and step, the floor and ratios, then sizes.
pub fn report(runs: &[BenchRun], floor: &BuildFloor) -> String {
    let mut s = String::new();
    s.push_str(&format!("machine: {}\n", machine()));
    for r in runs {
        s.push_str(&format!("{} cache build: {:.1} s\n", r.label, r.seconds));
        for step in &r.manifest.steps {
            let note = if step.reused { " (reused)" } else { "" };
            s.push_str(&format!(
                "    {:<40} {:>7.2} s{note}\n",
                step.step, step.seconds
            ));
        }
    }
    let sq = &floor.squashed;
    s.push_str(&format!(
        "floor: {:.1} s = read all inputs ({}) {:.2} s + compress the root's content ({} → {}, as the squashfs: {}, 128 KiB blocks, small files packed, {} stored raw) {:.1} s on {} threads ({:.1} s CPU)\n",
        floor.seconds(),
        mib(floor.input_bytes),
        floor.read_inputs.as_secs_f64(),
        mib(sq.input_bytes),
        mib(sq.compressed_bytes()),
        basalt_builder::rootfs::blocks::CODEC.describe(),
        mib(sq.raw_bytes()),
        sq.wall.as_secs_f64(),
        sq.threads,
        sq.cpu.as_secs_f64()
    ));
    for r in runs {
        s.push_str(&format!(
            "{} build / floor: {:.2}x\n",
            r.label,
            r.seconds / floor.seconds()
        ));
    }
    s.push_str("    (a warm build reuses the compressed root from its cache, so it may come in under the floor)\n");
    if let Some(r) = runs.last() {
        let z = &r.manifest.sizes;
        s.push_str(&format!(
            "sizes: raw logical {}, raw allocated {}, raw.zst {}, qcow2 {}\n",
            mib(z.raw_logical),
            mib(z.raw_allocated),
            mib(z.raw_zst),
            mib(z.qcow2)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_all_counts_every_byte() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; (3 << 20) + 5]).expect("write");
        assert_eq!(read_all(&p).expect("read"), (3 << 20) + 5);
        assert!(read_all(&d.path().join("missing")).is_err());
    }

    #[test]
    fn machine_names_cores_and_cpu() {
        let m = machine();
        assert!(m.contains(" cores, "), "{m}");
    }
}
