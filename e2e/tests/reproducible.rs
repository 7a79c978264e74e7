//! Bit-for-bit reproducibility: two builds of the same locked spec, in different output
//! folders, at different times, with different caches (so no intermediate is shared) and
//! different umasks, give identical `.raw`, `.qcow2`, `.raw.zst` and `.bundle`.
//!
//! Alone in its test binary because it changes the process umask.

mod common;

use anyhow::Context;

fn sums(m: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    Ok(m["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .map(|o| {
            (
                o["file"].as_str().unwrap_or("").to_string(),
                o["sha256"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn two_builds_give_identical_images() -> anyhow::Result<()> {
    let cache_a = tempfile::tempdir()?;
    let cache_b = tempfile::tempdir()?;
    // SAFETY: umask(2) only sets the process file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o022) };
    let a = common::build_with("repro-a", cache_a.path());
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: as above.
    unsafe { libc::umask(0o077) };
    let b = common::build_with("repro-b", cache_b.path());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let (a, b) = (a?, b?);
    let (sa, sb) = (sums(&a.manifest)?, sums(&b.manifest)?);
    assert_eq!(sa.len(), 4, "{sa:?}");
    assert_eq!(sa, sb);
    assert_eq!(a.manifest["root_hash"], b.manifest["root_hash"]);
    assert_eq!(
        std::fs::read(a.dir.join("sbom.spdx.json"))?,
        std::fs::read(b.dir.join("sbom.spdx.json"))?
    );
    Ok(())
}
