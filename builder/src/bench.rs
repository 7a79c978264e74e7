//! `basalt bench build`: wall time of a cold-cache build (every input fetched, every
//! intermediate made) and of a warm-cache build right after it, with the output sizes.
//! Figures are printed, never asserted: speed lives in benchmarks, not tests.

use crate::build::{build, BuildError, BuildOptions};
use crate::manifest::Manifest;
use std::path::PathBuf;
use std::time::Instant;

pub struct BenchRun {
    pub label: &'static str,
    pub seconds: f64,
    pub manifest: Manifest,
}

/// Builds twice into `out/cold` and `out/warm` with a fresh cache under `out/cache`.
pub fn build_twice(
    spec: PathBuf,
    out: PathBuf,
    overrides: Vec<(String, PathBuf)>,
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
        };
        let started = Instant::now();
        let manifest = build(&opts)?;
        runs.push(BenchRun {
            label,
            seconds: started.elapsed().as_secs_f64(),
            manifest,
        });
    }
    Ok(runs)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The report as printed: times per run and step, then sizes.
pub fn report(runs: &[BenchRun]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "machine: {} cores\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    ));
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
