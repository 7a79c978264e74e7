//! A wrong pin fails the build before anything is written: the error names the input and
//! both hashes, no output appears and the cache gains nothing.

mod common;

use basalt_builder::build::{build, BuildOptions};
use std::path::Path;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_wrong_sha256_names_input_and_hashes_and_leaves_nothing() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let spec_text = std::fs::read_to_string(common::workspace().join("images/k3s-node.toml"))?;
    let good = "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791";
    anyhow::ensure!(
        spec_text.contains(good),
        "the test expects the kernel pin {good}; update it with the spec"
    );
    let wrong = "1".repeat(64);
    let spec = work.path().join("bad.toml");
    std::fs::write(&spec, spec_text.replace(good, &wrong))?;
    let cache = work.path().join("cache");
    let out = work.path().join("out");
    let (k3s, images) = common::k3s_standins(&work.path().join("standins"))?;

    let err = build(&BuildOptions {
        spec,
        out_dir: out.clone(),
        cache_dir: cache.clone(),
        overrides: vec![("k3s".into(), k3s), ("k3s-images".into(), images)],
        locked: false,
        init: Default::default(),
    })
    .expect_err("a wrong pin must fail the build");
    let msg = format!("{err:#}");
    assert!(msg.contains("input kernel"), "{msg}");
    assert!(msg.contains(&wrong), "expected hash missing: {msg}");
    assert!(msg.contains(good), "actual hash missing: {msg}");
    assert!(
        !out.exists() || files_under(&out).is_empty(),
        "output left behind: {:?}",
        files_under(&out)
    );
    // The other inputs are fetched side by side with the kernel, so the good ones may be
    // in the cache; nothing there may be the refused kernel, and every entry must hold
    // what its name says (checked with sha256sum, not basalt's own hashing).
    for f in files_under(&cache) {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            name != good && name != wrong,
            "the refused kernel was cached: {}",
            f.display()
        );
        let sum = std::process::Command::new("sha256sum").arg(&f).output()?;
        let text = String::from_utf8_lossy(&sum.stdout);
        assert!(
            sum.status.success() && text.split_whitespace().next() == Some(name),
            "cache entry {} does not hold what its name says: {text}",
            f.display()
        );
    }
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn an_unknown_input_name_is_refused_before_any_fetch() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let err = build(&BuildOptions {
        spec: common::workspace().join("images/k3s-node.toml"),
        out_dir: work.path().join("out"),
        cache_dir: work.path().join("cache"),
        overrides: vec![("kernal".into(), work.path().join("x"))],
        locked: false,
        init: Default::default(),
    })
    .expect_err("unknown input");
    assert!(err.to_string().contains("--input kernal"), "{err}");
    assert!(!work.path().join("out").exists());
    Ok(())
}
