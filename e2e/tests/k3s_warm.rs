//! Standby warms K3s, under QEMU with the K3s doubles (neither is K3s; see the README):
//! the image carries the **K3s agent double** as its `k3s`, which extracts its userspace
//! into `/var/lib/rancher/k3s/data/<hash>` at its first run and imports the airgap
//! images honouring K3s's `.cache.json`, as the real binary does; a **K3s server double**
//! on the host's loopback (10.0.2.2 from the guest) registers the node.
//!
//! After `standby`, in the background, basalt-init runs `k3s ctr --version`, which
//! extracts; the agent a promotion starts then finds its userspace and extracts nothing.
//! The agent imports the bundle once; after a reboot it skips it by K3s's cache, whose
//! key (the link's path, its size and mtime) standby kept stable.

mod common;

use basalt_api::node::JoinState;
use basalt_client::node::NodeClient;
use basalt_client::pki::Role;
use basalt_qemu::Vm;
use common::pki::{free_port, Pki};
use common::{boot_node, expect_line, reboot_from_state};
use k3s_doubles::userspace::{asset_dir, DATA_PREFIX};
use k3s_doubles::{K3sServerDouble, LINE_PREFIX};
use std::path::Path;
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// K3s's data dir on the node (basalt sets no other), on STATE.
const DATA_DIR: &str = "/var/lib/rancher/k3s";
/// Where the agent double's and the warm-up's lines appear on the console.
const AGENT: &str = "[basalt] [k3s] ";
const WARM: &str = "[basalt] [k3s-warm] ";

/// Polls until the node API answers and the join is `registered`.
fn wait_registered(vm: &Vm, client: &NodeClient) -> anyhow::Result<()> {
    let budget = vm.accel().scale(BOOT);
    common::upgrade::wait_status(vm, client, "join state registered", budget, |s| {
        s.join.state == JoinState::Registered
    })
    .map(drop)
}

/// The console lines of `vm` that start with `prefix`, the prefix taken off.
fn lines_of(vm: &Vm, prefix: &str) -> Vec<String> {
    vm.serial()
        .lines()
        .filter_map(|l| l.find(prefix).map(|at| l[at + prefix.len()..].to_owned()))
        .collect()
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn standby_extracts_k3s_so_the_promoted_agent_does_not_and_a_reboot_skips_the_import(
) -> anyhow::Result<()> {
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let img = common::join_image();
    let pki = Pki::with_clients("warm-1", &[("ops", Role::Client)])?;
    let port = free_port()?;
    let asset = asset_dir(Path::new(DATA_DIR));
    let extracted = format!("{WARM}{DATA_PREFIX} extracted {}: ", asset.display());

    // Standby: the warm-up extracts after `standby`, not before it.
    let mut vm = boot_node(&img.qcow2, port, Some(&pki.config("")), pki.dir.path())?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    expect_line(&mut vm, &extracted, BOOT)?;
    let serial = vm.serial();
    let (standby_at, extracted_at) = (serial.find("[basalt] standby t="), serial.find(&extracted));
    assert!(standby_at < extracted_at, "extracted before standby");
    expect_line(
        &mut vm,
        "[basalt] k3s: userspace extracted or found (",
        BOOT,
    )?;
    let serial = vm.serial();
    assert!(
        serial.contains(&format!("{WARM}k3s-double-ctr: ctr ")),
        "the double's ctr --version ran"
    );
    assert!(!serial.contains("k3s warm-up"), "a warm-up warning");
    assert!(
        !serial.contains(LINE_PREFIX),
        "no agent runs in standby, the warm-up only extracts"
    );

    // Promotion: the agent finds its userspace, imports the bundle once.
    let ops = pki.client("ops", port)?;
    let cluster = format!(
        "[cluster]\nserver = \"{}\"\ntoken = \"{}\"\n",
        server.url_for("10.0.2.2"),
        server.token("secret")
    );
    let applied = ops.apply(pki.config(&cluster))?;
    assert!(applied.body.applied, "{}", applied.raw);
    let found = format!(
        "{AGENT}{DATA_PREFIX} found {}: nothing to extract",
        asset.display()
    );
    expect_line(&mut vm, &found, BOOT)?;
    let imported = expect_line(
        &mut vm,
        &format!(
            "{AGENT}{LINE_PREFIX} images: imported {DATA_DIR}/agent/images/k3s-airgap-images-"
        ),
        BOOT,
    )?;
    expect_line(
        &mut vm,
        &format!("{AGENT}{LINE_PREFIX} images: cache on, 1 imported, 0 skipped"),
        BOOT,
    )?;
    wait_registered(&vm, &ops)?;
    let agent_data = lines_of(&vm, &format!("{AGENT}{DATA_PREFIX}"));
    assert_eq!(
        agent_data,
        vec![format!(" found {}: nothing to extract", asset.display())],
        "the promoted agent extracted"
    );
    let bundle = imported
        .split(" images: imported ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(bundle.ends_with(".tar.zst"), "{imported}");

    // Reboot: standby finds the userspace, the agent skips the bundle by K3s's cache.
    let (mut again, port2) = reboot_from_state(&mut vm, &ops, pki.dir.path(), BOOT)?;
    expect_line(
        &mut again,
        &format!(
            "{WARM}{DATA_PREFIX} found {}: nothing to extract",
            asset.display()
        ),
        BOOT,
    )?;
    expect_line(&mut again, &found, BOOT)?;
    expect_line(
        &mut again,
        &format!(
            "{AGENT}{LINE_PREFIX} images: skipped {bundle}: unchanged since its import (.cache.json)"
        ),
        BOOT,
    )?;
    expect_line(
        &mut again,
        &format!("{AGENT}{LINE_PREFIX} images: cache on, 0 imported, 1 skipped"),
        BOOT,
    )?;
    wait_registered(&again, &pki.client("ops", port2)?)?;
    let serial = again.serial();
    assert!(
        !serial.contains(&format!("{DATA_PREFIX} extracted")),
        "extracted again after a reboot"
    );
    Ok(())
}
