//! The builder's outputs besides the disk: raw.zst, sizes, SBOM, manifest records; and a
//! second build that reuses every intermediate.

mod common;

use anyhow::Context;
use common::image;
use sha2::{Digest, Sha256};
use std::io::Read;

fn sha256_of(mut r: impl Read) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn output<'a>(m: &'a serde_json::Value, file: &str) -> anyhow::Result<&'a serde_json::Value> {
    m["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .find(|o| o["file"] == file)
        .with_context(|| format!("output {file}"))
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn raw_zst_decompresses_to_the_raw_image() -> anyhow::Result<()> {
    let img = image();
    let zst = img.dir.join("k3s-node.raw.zst");
    let decoded = sha256_of(zstd::stream::read::Decoder::new(std::fs::File::open(
        &zst,
    )?)?)?;
    assert_eq!(
        decoded,
        output(&img.manifest, "k3s-node.raw")?["sha256"]
            .as_str()
            .context("sha")?
    );
    let sizes = &img.manifest["sizes"];
    assert_eq!(
        sizes["raw_zst"].as_u64(),
        Some(std::fs::metadata(&zst)?.len())
    );
    assert_eq!(
        sizes["raw_logical"].as_u64(),
        Some(std::fs::metadata(&img.raw)?.len())
    );
    let allocated = sizes["raw_allocated"].as_u64().context("allocated")?;
    assert!(
        allocated < sizes["raw_logical"].as_u64().context("logical")? / 4,
        "raw is not sparse: {sizes}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn sbom_lists_every_input_with_its_hash_and_declared_license() -> anyhow::Result<()> {
    let img = image();
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.dir.join("sbom.spdx.json"))?)?;
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    assert_eq!(sbom["dataLicense"], "CC0-1.0");
    let packages = sbom["packages"].as_array().context("packages")?;
    for input in img.manifest["inputs"].as_array().context("inputs")? {
        let sha = input["sha256"].as_str().context("sha")?;
        let p = packages
            .iter()
            .find(|p| p["checksums"][0]["checksumValue"] == sha)
            .with_context(|| format!("input {} missing from the SBOM", input["name"]))?;
        assert!(
            p["downloadLocation"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{p}"
        );
    }
    let kernel = packages
        .iter()
        .find(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("linux-image-"))
        })
        .context("kernel")?;
    assert_eq!(kernel["licenseDeclared"], "GPL-2.0-only");
    assert!(packages.iter().any(|p| p["name"] == "basalt-init"));
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn manifest_records_digests_timings_and_overrides() -> anyhow::Result<()> {
    let m = &image().manifest;
    let spec = std::fs::read(common::workspace().join("images/k3s-node.toml"))?;
    assert_eq!(
        m["spec_sha256"].as_str(),
        Some(hex::encode(Sha256::digest(&spec)).as_str())
    );
    let lock = std::fs::read(common::workspace().join("images/k3s-node.lock"))?;
    assert_eq!(
        m["lock_sha256"].as_str(),
        Some(hex::encode(Sha256::digest(&lock)).as_str())
    );
    let steps = m["steps"].as_array().context("steps")?;
    assert_eq!(steps.len(), 10, "{steps:?}");
    let k3s = m["inputs"]
        .as_array()
        .context("inputs")?
        .iter()
        .find(|i| i["name"] == "k3s")
        .context("k3s")?;
    assert_eq!(k3s["origin"]["kind"], "override");
    assert_eq!(k3s["origin"]["matches_pin"], false);
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_second_build_reuses_every_intermediate_and_gives_the_same_bytes() -> anyhow::Result<()> {
    let first = image();
    let second = common::build_into("again")?;
    for step in second.manifest["steps"].as_array().context("steps")? {
        let name = step["step"].as_str().unwrap_or("");
        let cacheable = !matches!(
            name,
            "basalt-init"
                | "disk image"
                | "qcow2 and raw.zst"
                | "manifest, SBOM, bundle and outputs"
        );
        if cacheable {
            assert_eq!(step["reused"], true, "step {name} was not reused: {step}");
        }
    }
    for file in [
        "k3s-node.raw",
        "k3s-node.qcow2",
        "k3s-node.raw.zst",
        "k3s-node.bundle",
    ] {
        assert_eq!(
            output(&first.manifest, file)?["sha256"],
            output(&second.manifest, file)?["sha256"],
            "{file}"
        );
    }
    Ok(())
}
