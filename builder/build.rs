//! Fingerprints the builder's own source so that the store of intermediates never hands
//! a new builder an entry made by older code (a root without a file the new code writes,
//! say). The package version alone does not change between commits.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let mut files = Vec::new();
    collect(&manifest.join("src"), &mut files);
    files.push(manifest.join("Cargo.toml"));
    files.sort();
    // FNV-1a over names and contents: a fingerprint, not a security boundary, and it
    // spares the build script a dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f.strip_prefix(&manifest).unwrap_or(f);
        let bytes = std::fs::read(f).unwrap_or_default();
        for b in rel.to_string_lossy().bytes().chain([0u8]).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rustc-env=BASALT_BUILDER_FINGERPRINT={h:016x}");
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}
