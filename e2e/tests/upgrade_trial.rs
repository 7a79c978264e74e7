//! A/B upgrades under QEMU (issue 16): the two ends of a trial that only unit tests
//! covered before, and a power cut under OVMF.
//!
//! - **The watchdog resets a hung PID1.** v2's image carries `testd.hang=trial` on its
//!   command line: with the `testd` feature, the trial's thread of basalt-init stops for
//!   good right after it first fed the watchdog it armed (Debian's cloud kernel has no
//!   i6300esb driver, so `softdog`, asked for a 60 s timeout), as a deadlocked PID1
//!   would. Nothing else reboots the node: the kernel's softdog does
//!   (`softdog: Initiating system reboot`), about 60 s later, and GRUB boots slot A.
//! - **The operator gives up a trial.** A joined v1 whose K3s server then goes away takes
//!   v2: v2's trial waits for the agent to register again, which it never does; the
//!   operator's `POST /v1/rollback?reboot=1` ends the trial, the node reboots into v1,
//!   and status records the operator's reason with slot B not good.
//! - **A power cut during v2's first boot under OVMF** ends on v1 with a rollback.
//!
//! Three builds of `images/k3s-node.toml`, made once for the binary: v1 (`1.0.0`), v2
//! (`2.0.0`) and the hanging v2 (`2.0.0-hang`). Every end state is checked through the
//! node's API, on the serial console (GRUB's `basalt: booting slot <s>`), and on the disk
//! as QEMU left it (`grub-editenv` on the ESP's environment block).

mod common;

use anyhow::Context;
use basalt_client::pki::Role;
use basalt_qemu::Firmware;
use common::disk::root_version;
use common::expect_line;
use common::pki::Pki;
use common::upgrade::{
    build_version, bundle, config_arg, cut, expect_in_order, grubenv, slot, start, up_on, Node,
    NEVER_HEALTHY,
};
use common::Image;
use k3s_doubles::K3sServerDouble;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(90);

/// The timeout PID1 asks of the watchdog during a trial (init's
/// `upgrade::watchdog::TIMEOUT`).
const WATCHDOG: Duration = Duration::from_secs(60);

/// The reason of a trial given up by the operator (init's `upgrade::OPERATOR_ROLLBACK`).
const OPERATOR_ROLLBACK: &str =
    "rollback requested by the operator during the trial (basalt node rollback)";

/// What softdog says when it resets the machine (drivers/watchdog/softdog.c, 6.1:
/// `pr_crit("Initiating system reboot\n")` with `pr_fmt` `softdog: `).
const SOFTDOG_RESET: &str = "softdog: Initiating system reboot";

struct Versions {
    v1: Image,
    v2: Image,
    hangs: Image,
}

/// The three builds, once for the binary.
fn versions() -> &'static Versions {
    static VERSIONS: OnceLock<Versions> = OnceLock::new();
    VERSIONS.get_or_init(|| {
        let build = || -> anyhow::Result<Versions> {
            let double = k3s_doubles::build_agent_double(&common::workspace())?;
            Ok(Versions {
                v1: build_version("1.0.0", &[], &double)?,
                v2: build_version("2.0.0", &[], &double)?,
                hangs: build_version("2.0.0-hang", &["testd.hang=trial"], &double)?,
            })
        };
        build().unwrap_or_else(|e| panic!("building the upgrade versions: {e:#}"))
    })
}

/// One guest at a time: the tests of this binary share two slow CPUs.
fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    static GUEST: Mutex<()> = Mutex::new(());
    GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints the console lines that tell the story (seen with `--nocapture`).
fn show(node: &Node, what: &str) {
    let serial = node.vm.serial();
    let lines: Vec<&str> = serial
        .lines()
        .filter(|l| {
            [
                "basalt: booting slot",
                "upgrade:",
                "testd:",
                "softdog",
                "Kernel panic",
                "reboot:",
            ]
            .iter()
            .any(|n| l.contains(n))
        })
        .collect();
    eprintln!("----- {what}: serial lines -----\n{}", lines.join("\n"));
}

/// How long a node may take to come up with its API, rebooting on the way.
fn up_budget(node: &Node) -> Duration {
    node.vm.accel().scale(BOOT) * 2
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_trial_whose_pid1_hangs_is_reset_by_the_watchdog_into_v1() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("hang-1", &[("ops", Role::Client)])?;
    let config = config_arg(&pki.config(""), work)?;
    let mut node = start(&vs.v1.qcow2, Firmware::Bios, &pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    let budget = up_budget(&node);
    up_on(&mut node, "a", "1.0.0", false, budget)?;

    let r = node.ops.upgrade(&bundle(&vs.hangs), false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0-hang")
    );
    expect_in_order(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "upgrade: slot b is on trial",
            "testd: testd.hang=trial on the kernel command line",
        ],
        BOOT * 3,
    )?;
    let hung = Instant::now();
    let on_trial = node.vm.serial();
    let armed = on_trial
        .lines()
        .rfind(|l| l.contains("upgrade: slot b is on trial"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        armed.contains("(watchdog: /dev/watchdog (Software Watchdog, 60 s))"),
        "the trial armed softdog for 60 s: {armed}"
    );

    // Hung, but only the trial's thread: the API answers and says so, until the reset.
    let s = common::upgrade::wait_status(
        &node.vm,
        &node.ops,
        "the API of the hung trial",
        WATCHDOG / 2,
        |s| s.upgrade.as_ref().is_some_and(|u| u.booted == "b"),
    )?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!(u.default_slot.as_deref(), Some("a"), "{u:?}");
    assert!(u.trial.is_some(), "on trial: {u:?}");
    assert!(
        u.watchdog.as_deref().is_some_and(|w| w.contains("60 s")),
        "{u:?}"
    );
    assert_eq!(slot(&s, "b").state, "trial", "{u:?}");

    // Nothing else reboots it: softdog, once it has not been fed for its timeout. The
    // guest's timers run on the host's clock under TCG too, so this wait is not scaled.
    node.vm
        .wait_until(WATCHDOG + Duration::from_secs(40), |serial| {
            serial.contains(SOFTDOG_RESET).then_some(())
        })
        .map_err(|e| common::dump(&node.vm, e))?;
    let after = hung.elapsed();
    assert!(
        after >= WATCHDOG - Duration::from_secs(10),
        "reset {after:?} after the hang: sooner than the watchdog's timeout"
    );
    expect_in_order(
        &mut node.vm,
        &[
            "testd: testd.hang=trial on the kernel command line",
            SOFTDOG_RESET,
            "basalt: booting slot a",
            "upgrade: rolled back from slot b",
        ],
        BOOT * 3,
    )?;
    let serial = node.vm.serial();
    let trial_boot = &serial[serial.find("basalt: booting slot b").unwrap_or(0)..];
    assert!(
        !trial_boot.contains("Kernel panic") && !trial_boot.contains("reboot: Restarting"),
        "the trial boot ended some other way than softdog's reset:\n{trial_boot}"
    );
    let s = up_on(&mut node, "a", "1.0.0", false, budget)?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), (0, 1), "{u:?}");
    let rb = u.last_rollback.clone().context("last rollback")?;
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref(), rb.reason.as_str()),
        ("b", Some("2.0.0-hang"), NEVER_HEALTHY)
    );
    assert_eq!(slot(&s, "b").state, "failed", "{u:?}");
    assert_eq!(u.watchdog, None, "no trial, no watchdog: {u:?}");

    show(&node, "hang");
    // Stopped, the disk says the same.
    let raw = cut(node, work, "hang")?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=a\n");
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0-hang");
    eprintln!("softdog reset {after:?} after the hang was seen");
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn an_operator_gives_up_a_trial_and_the_node_reboots_into_v1() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("giveup-1", &[("ops", Role::Client)])?;
    let config = config_arg(&pki.config(""), work)?;
    let mut node = start(&vs.v1.qcow2, Firmware::Bios, &pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    let budget = up_budget(&node);
    up_on(&mut node, "a", "1.0.0", false, budget)?;

    // Joined on v1, the config with its [cluster] saved on STATE; then the K3s server
    // goes away, so a new slot's trial can never see the agent register again.
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let cluster = format!(
        "[cluster]\nserver = \"{}\"\ntoken = \"{}\"\n",
        server.url_for("10.0.2.2"),
        server.token("secret")
    );
    let applied = node.ops.apply(pki.config(&cluster))?;
    assert!(applied.body.applied, "{}", applied.raw);
    common::upgrade::wait_status(&node.vm, &node.ops, "registered on v1", budget, |s| {
        s.join.state == basalt_api::node::JoinState::Registered
    })?;
    drop(server);

    let r = node.ops.upgrade(&bundle(&vs.v2), false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0")
    );
    expect_in_order(
        &mut node.vm,
        &["basalt: booting slot b", "upgrade: slot b is on trial"],
        BOOT * 3,
    )?;
    let s = common::upgrade::wait_status(&node.vm, &node.ops, "v2 on trial", budget, |s| {
        s.upgrade.as_ref().is_some_and(|u| u.booted == "b")
    })?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!(u.default_slot.as_deref(), Some("a"), "{u:?}");
    assert!(
        u.trial.as_deref().is_some_and(|t| t.starts_with("waiting")),
        "{u:?}"
    );
    assert_eq!(slot(&s, "b").state, "trial", "{u:?}");
    // Still waiting a little later: the trial cannot pass by itself here.
    std::thread::sleep(Duration::from_secs(5));
    let s = node.ops.status()?.body;
    assert_ne!(
        s.join.state,
        basalt_api::node::JoinState::Registered,
        "{:?}",
        s.join
    );
    assert_eq!(slot(&s, "b").state, "trial", "{:?}", s.upgrade);

    // The operator gives it up, with a reboot.
    let r = node.ops.rollback(true)?;
    assert_eq!(r.body.slot, "a", "{}", r.raw);
    assert!(r.body.rebooting, "{}", r.raw);
    assert!(
        r.body.message.contains("the trial is given up"),
        "{}",
        r.raw
    );
    expect_in_order(
        &mut node.vm,
        &[
            "upgrade: the trial of slot b is given up by the operator; slot a boots next",
            "basalt: booting slot a",
            &format!("upgrade: rolled back from slot b: {OPERATOR_ROLLBACK}"),
        ],
        BOOT * 3,
    )?;
    let serial = node.vm.serial();
    let trial_boot = &serial[serial.find("basalt: booting slot b").unwrap_or(0)..];
    assert!(
        !trial_boot.contains("is healthy and marked good") && !trial_boot.contains(SOFTDOG_RESET),
        "{trial_boot}"
    );
    let s = up_on(&mut node, "a", "1.0.0", true, budget)?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), (0, 1), "{u:?}");
    let rb = u.last_rollback.clone().context("last rollback")?;
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref(), rb.reason.as_str()),
        ("b", Some("2.0.0"), OPERATOR_ROLLBACK)
    );
    assert_eq!(slot(&s, "b").state, "failed", "not good: {u:?}");

    show(&node, "operator rollback");
    let raw = cut(node, work, "giveup")?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=a\n");
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn ovmf_a_power_cut_during_v2_s_first_boot_ends_on_v1() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("uefi-cut-1", &[("ops", Role::Client)])?;
    let config = config_arg(&pki.config(""), work)?;
    let mut node = start(&vs.v1.qcow2, Firmware::Uefi, &pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    let budget = up_budget(&node);
    up_on(&mut node, "a", "1.0.0", false, budget)?;
    // Saved on STATE: the node restarts below without it on fw_cfg.
    let applied = node.ops.apply(pki.config(""))?;
    assert!(applied.body.applied, "{}", applied.raw);

    node.ops.upgrade(&bundle(&vs.v2), false, true)?;
    expect_in_order(
        &mut node.vm,
        &["basalt: booting slot b", "[basalt] init-start t="],
        BOOT * 2,
    )?;
    show(&node, "OVMF, v2's first boot");
    let raw = cut(node, work, "uefi-first-boot")?;
    // GRUB cleared next_entry itself before booting slot B.
    assert_eq!(grubenv(&raw, work)?, "saved_entry=a\n");
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0");

    let mut node = start(&raw, Firmware::Uefi, &pki, &[])?;
    expect_line(&mut node.vm, "upgrade: rolled back from slot b", BOOT * 2)?;
    let s = up_on(&mut node, "a", "1.0.0", true, budget)?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), (0, 1), "{u:?}");
    let rb = u.last_rollback.clone().context("last rollback")?;
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref(), rb.reason.as_str()),
        ("b", Some("2.0.0"), NEVER_HEALTHY)
    );
    assert_eq!(slot(&s, "b").state, "failed", "{u:?}");
    show(&node, "OVMF cut");
    let raw2 = cut(node, work, "uefi-after")?;
    assert_eq!(grubenv(&raw2, work)?, "saved_entry=a\n");
    std::fs::remove_file(&raw).context("remove the first cut's disk")?;
    Ok(())
}
