//! A/B upgrades under QEMU (issue 16): a new slot that hangs in the kernel before PID1
//! arms the trial's watchdog rolls back by itself, through the kernel hang detection GRUB
//! gives a trial boot only (`hung_task_panic=1`, a 60 s hung-task timeout, `panic=10`);
//! and a good new slot turns that detection off once it is marked good.
//!
//! Three builds of `images/k3s-node.toml`: v1 (`1.0.0`), v2 (`2.0.0`), and a v3 that
//! hangs (`3.0.0-hang`: `testd.hang=stage1-io` on its command line makes a basalt-init
//! built with the `testd` feature, on its trial boot, write back and fsync a block of a
//! suspended dm-linear device in stage 1: PID1 waits uninterruptibly for ever, as on a
//! stuck disk).
//!
//! v1 → v3 (hangs; the kernel reports the blocked task and panics; GRUB boots slot A
//! again; v1 records the rollback) → v2 (healthy; marked good; the trial's hang
//! detection turned off). The end state is also read from the stopped disk with
//! `grub-editenv`.

mod common;

use anyhow::Context;
use basalt_api::node::Status;
use basalt_client::pki::Role;
use basalt_qemu::Firmware;
use common::disk::root_version;
use common::pki::Pki;
use common::upgrade::{
    build_version, bundle, config_arg, cut, expect_in_order_within, grubenv, slot, start,
    wait_status, Node, NEVER_HEALTHY,
};
use common::{expect_line, Image};
use std::time::{Duration, Instant};

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(90);
/// The hang is found between 60 and 120 s after it starts (the trial's
/// `hung_task_timeout_secs`, looked at every 60 s), in guest time, which is not scaled.
const HANG_FOUND: Duration = Duration::from_secs(150);

/// PID1's line once a good trial turned the kernel's hang detection off (init's
/// `upgrade::hang`).
const DISARMED: &str = "upgrade: the trial's kernel hang detection is off: \
     hung_task_panic=0 softlockup_panic=0";

/// The console lines holding `needle`.
fn lines_with(serial: &str, needle: &str) -> Vec<String> {
    serial
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The node's status once its API answers on slot `want` and GRUB's default is `want`.
fn up_on(node: &Node, want: &str, version: &str) -> anyhow::Result<Status> {
    let budget = node.vm.accel().scale(BOOT) * 2;
    let s = wait_status(
        &node.vm,
        &node.ops,
        &format!("the node API up on slot {want}, GRUB's default"),
        budget,
        |s| {
            s.upgrade.as_ref().is_some_and(|u| {
                u.booted == want && u.default_slot.as_deref() == Some(want) && u.trial.is_none()
            })
        },
    )?;
    let u = s.upgrade.clone().context("upgrade status")?;
    assert_eq!(u.error, None, "{u:?}");
    assert_eq!(u.next_boot, None, "armed: {u:?}");
    assert_eq!(slot(&s, want).version.as_deref(), Some(version), "{u:?}");
    assert_eq!(slot(&s, want).state, "active", "{u:?}");
    Ok(s)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_new_slot_that_hangs_before_its_watchdog_rolls_back_and_a_good_one_disarms(
) -> anyhow::Result<()> {
    let double = k3s_doubles::build_agent_double(&common::workspace())?;
    let v1: Image = build_version("1.0.0", &[], &double)?;
    let v2: Image = build_version("2.0.0", &[], &double)?;
    let hangs: Image = build_version("3.0.0-hang", &["testd.hang=stage1-io"], &double)?;

    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("hang-1", &[("ops", Role::Client)])?;
    let config = config_arg(&pki.config(""), work)?;
    let mut node = start(&v1.qcow2, Firmware::Bios, &pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    up_on(&node, "a", "1.0.0")?;

    // v3 hangs in stage 1 of its trial, before the watchdog: only the kernel's hang
    // detection, which GRUB gave this boot alone, gets the node out.
    let began = Instant::now();
    let r = node.ops.upgrade(&bundle(&hangs), false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "3.0.0-hang")
    );
    let budget = node.vm.accel().scale(BOOT * 3) + HANG_FOUND;
    expect_in_order_within(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "basalt: trial boot of slot b",
            "testd: testd.hang=stage1-io on the kernel command line",
            "blocked for more than",
            "Kernel panic - not syncing: hung_task: blocked tasks",
            "basalt: booting slot a",
            "upgrade: rolled back from slot b",
        ],
        budget,
    )?;
    let serial = node.vm.serial();
    for needle in [
        "basalt: booting slot",
        "basalt: trial boot",
        "testd: testd.hang",
        "blocked for more than",
        "Kernel panic",
        "upgrade: rolled back",
    ] {
        eprintln!("serial: {:?}", lines_with(&serial, needle));
    }
    eprintln!(
        "hang: upgrade request to the rollback seen: {:.0} s",
        began.elapsed().as_secs_f64()
    );
    // The rollback boot of slot A is a normal one: GRUB gave it no trial arguments.
    let after_panic = &serial[serial.rfind("basalt: booting slot a").context("slot a")?..];
    assert!(!after_panic.contains("basalt: trial boot"), "{after_panic}");
    let s = up_on(&node, "a", "1.0.0")?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), (0, 1), "{u:?}");
    let rb = u.last_rollback.clone().context("last rollback")?;
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref(), rb.reason.as_str()),
        ("b", Some("3.0.0-hang"), NEVER_HEALTHY)
    );
    assert_eq!(slot(&s, "b").state, "failed", "{u:?}");

    // A good v2: its trial is marked good and turns the hang detection off, once.
    let r = node.ops.upgrade(&bundle(&v2), false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0")
    );
    let budget = node.vm.accel().scale(BOOT * 3);
    expect_in_order_within(
        &mut node.vm,
        &[
            "upgrade: rolled back from slot b",
            "basalt: booting slot b",
            "basalt: trial boot of slot b",
            "upgrade: slot b is on trial",
            "upgrade: slot b is healthy and marked good",
            DISARMED,
        ],
        budget,
    )?;
    let s = up_on(&node, "b", "2.0.0")?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), (1, 1), "{u:?}");
    assert_eq!(slot(&s, "a").state, "good", "{u:?}");
    let serial = node.vm.serial();
    let disarmed = lines_with(&serial, "kernel hang detection is off");
    eprintln!("serial: {disarmed:?}");
    // Only the good trial had anything to turn off: v1's boots (the first, and the one
    // after the rollback) were normal boots without GRUB's trial arguments.
    assert_eq!(disarmed.len(), 1, "{disarmed:?}");
    assert!(
        disarmed[0].contains("hung_task_timeout_secs=120"),
        "{disarmed:?}"
    );
    assert!(!disarmed[0].contains("could not write"), "{disarmed:?}");

    // Stopped, the disk says the same: v2 is GRUB's default, nothing armed.
    let raw = cut(node, work, "end")?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=b\n");
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0");
    assert_eq!(root_version(&raw, "ROOT-A", work)?, "1.0.0");
    Ok(())
}
