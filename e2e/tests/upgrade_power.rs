//! A/B upgrades under QEMU that go wrong (issue 16): power cuts (QEMU killed with
//! SIGKILL) at four points of an upgrade, a new slot whose kernel panics, a new slot
//! whose root is corrupted on disk after the node verified it, and the upgrade flow
//! under OVMF. Each ends on the slot named below, by itself, and never unbootable.
//!
//! Three builds of `images/k3s-node.toml`, made once for the binary: v1 (`1.0.0`), v2
//! (`2.0.0`), and a v2 whose kernel panics (`3.0.0-panic`: `testd.panic=stage2` on its
//! command line makes a basalt-init built with the `testd` feature crash the kernel
//! with sysrq `c` once stage 2 has run; the image's `panic=10` then reboots it).
//!
//! Every end state is seen from outside the node as well as through its API: the disk
//! as QEMU left it is written out as raw with `qemu-img`, `sfdisk` finds the partitions,
//! mtools and `grub-editenv` read GRUB's environment block, `fsck.fat -n` checks the
//! ESP, `unsquashfs` reads `VERSION_ID` from a slot's root; GRUB's own
//! `basalt: booting slot <s>` line on the serial console says which slot ran.
//!
//! | cut | expected end |
//! |---|---|
//! | during the slot write (our client sends half the bundle, then stalls) | v1, slot B empty, nothing armed |
//! | between the write and the arming (fw_cfg `opt/basalt/test-upgrade-stall=armed-before` stops the node there; `testd` feature only) | v1, the upgrade found interrupted, slot B not good, no rollback counted |
//! | during v2's first boot (kernel started: stage 1's `init-start` after GRUB's `booting slot b`) | v1, a rollback with the never-healthy reason |
//! | right after v2 marked itself good (its console says so) | v2, now GRUB's default |
//!
//! After each cut the node restarts without the machine config on fw_cfg: its API comes
//! up only from the config saved on STATE, so STATE is intact.

mod common;

use anyhow::Context;
use basalt_api::layout::fw_cfg;
use basalt_api::node::{Status, UpgradeStatus};
use basalt_client::pki::Role;
use basalt_qemu::Firmware;
use common::disk::{root_version, sfdisk_partition};
use common::pki::Pki;
use common::upgrade::{
    build_version, bundle, config_arg, cut, expect_in_order, grubenv, slot, start, up_on, Node,
    NEVER_HEALTHY,
};
use common::{expect_line, flip_byte, Image};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(90);

struct Versions {
    v1: Image,
    v2: Image,
    panics: Image,
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
                panics: build_version("3.0.0-panic", &["testd.panic=stage2"], &double)?,
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

/// [`cut`] of a node started from `previous`, a disk written out by an earlier cut:
/// removed once the new one is written (it backs QEMU's overlay until then).
fn cut_after(node: Node, dir: &Path, name: &str, previous: PathBuf) -> anyhow::Result<PathBuf> {
    let raw = cut(node, dir, name)?;
    std::fs::remove_file(&previous).with_context(|| format!("remove {}", previous.display()))?;
    Ok(raw)
}

/// [`up_on`] within the budget of a boot that may reboot on the way.
fn up(node: &mut Node, want: &str, version: &str, from_state: bool) -> anyhow::Result<Status> {
    let budget = node.vm.accel().scale(BOOT) * 2;
    up_on(node, want, version, from_state, budget)
}

/// A first boot of v1 on `firmware`, its machine config on fw_cfg (returned, written
/// into `dir`), up at standby on slot A.
fn v1_node(
    vs: &Versions,
    firmware: Firmware,
    pki: &Pki,
    dir: &Path,
) -> anyhow::Result<(Node, Vec<String>)> {
    let config = config_arg(&pki.config(""), dir)?;
    let mut node = start(&vs.v1.qcow2, firmware, pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    up(&mut node, "a", "1.0.0", false)?;
    Ok((node, config))
}

/// The upgrade section of `s`, whose counts are `(upgrades, rollbacks)`.
fn counted(s: &Status, counts: (u64, u64)) -> anyhow::Result<UpgradeStatus> {
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.upgrades, u.rollbacks), counts, "{u:?}");
    Ok(u)
}

/// After a power cut: the node restarted on `raw` with `extra` QEMU arguments, `line` on
/// its console first (if any), then [`up_on`] slot `want` running `version` with STATE's
/// config, `(upgrades, rollbacks)` counted as `counts`.
fn restart(
    raw: &Path,
    pki: &Pki,
    extra: &[String],
    line: Option<&str>,
    (want, version): (&str, &str),
    counts: (u64, u64),
) -> anyhow::Result<(Node, Status, UpgradeStatus)> {
    let mut node = start(raw, Firmware::Bios, pki, extra)?;
    if let Some(line) = line {
        expect_line(&mut node.vm, line, BOOT * 2)?;
    }
    let s = up(&mut node, want, version, true)?;
    let u = counted(&s, counts)?;
    Ok((node, s, u))
}

/// The last rollback was from slot B running `version`, for the never-healthy reason,
/// and slot B is failed.
fn rolled_back_from_b(s: &Status, u: &UpgradeStatus, version: &str) -> anyhow::Result<()> {
    let rb = u.last_rollback.clone().context("last rollback")?;
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref(), rb.reason.as_str()),
        ("b", Some(version), NEVER_HEALTHY)
    );
    assert_eq!(slot(s, "b").state, "failed", "{u:?}");
    Ok(())
}

/// A body that sends the first half of `file` at once, then says so and sends nothing
/// more until released (then fails): a client stopped in the middle of the slot write.
struct HalfThenStall {
    file: std::fs::File,
    left: u64,
    told: Option<mpsc::Sender<()>>,
    release: Arc<AtomicBool>,
}

impl Read for HalfThenStall {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left > 0 {
            let n = buf.len().min(64 << 10).min(self.left as usize);
            let n = self.file.read(&mut buf[..n])?;
            self.left -= n as u64;
            return Ok(n);
        }
        if let Some(told) = self.told.take() {
            let _ = told.send(());
        }
        while !self.release.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::other("the test client stopped sending"))
    }
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn power_cuts_during_an_upgrade_end_on_v1_or_v2_never_unbootable() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("cut-1", &[("ops", Role::Client)])?;
    let v2 = bundle(&vs.v2);
    let v2_sha = basalt_client::node::sha256_file(&v2)?;
    let stall = vec![
        "-fw_cfg".to_string(),
        format!("name={},string=armed-before", fw_cfg::TEST_UPGRADE_STALL),
    ];

    // v1, its config applied and so saved on STATE.
    let (node, _) = v1_node(vs, Firmware::Bios, &pki, work)?;
    let applied = node.ops.apply(pki.config(""))?;
    assert!(applied.body.applied, "{}", applied.raw);

    // 1. During the slot write: half of v2's bundle sent, then nothing; power cut.
    let (told, half_sent) = mpsc::channel();
    let release = Arc::new(AtomicBool::new(false));
    let file = std::fs::File::open(&v2)?;
    let len = file.metadata()?.len();
    let body = HalfThenStall {
        file,
        left: len / 2,
        told: Some(told),
        release: release.clone(),
    };
    let client = pki.raw_client("ops", node.port)?;
    let url = format!("https://cut-1:{}/v1/upgrade?sha256={v2_sha}", node.port);
    let sender = std::thread::spawn(move || {
        client
            .post(url)
            .body(reqwest::blocking::Body::sized(body, len))
            .send()
            .map(|r| r.status().as_u16())
    });
    half_sent
        .recv_timeout(node.vm.accel().scale(BOOT))
        .context("the first half of the bundle was never read")?;
    // The node writes what it received into slot B meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let raw = cut(node, work, "cut-write")?;
    release.store(true, Ordering::SeqCst);
    let answer = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    assert!(
        answer.is_err(),
        "the node answered a half bundle: {answer:?}"
    );
    assert_eq!(
        grubenv(&raw, work)?,
        "saved_entry=a\n",
        "cut during the write"
    );
    assert_eq!(root_version(&raw, "ROOT-A", work)?, "1.0.0");
    // Expected: v1, nothing recorded of slot B. Restarted with the stall point set, for
    // the next cut.
    let (mut node, s, u) = restart(&raw, &pki, &stall, None, ("a", "1.0.0"), (0, 0))?;
    assert_eq!(slot(&s, "b").state, "empty", "{u:?}");

    // 2. Between the write and the arming: the node stops there (testd's stall point),
    // the slot written and verified, the upgrade recorded but not armed.
    let client = pki.client("ops", node.port)?;
    let stalled_upload = v2.clone();
    let sender =
        std::thread::spawn(move || client.upgrade(&stalled_upload, false, false).map(|r| r.raw));
    expect_line(
        &mut node.vm,
        "testd: upgrade stalled at armed-before",
        BOOT * 2,
    )?;
    let raw = cut_after(node, work, "cut-before-arming", raw)?;
    let answer = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    assert!(answer.is_err(), "the stalled node answered: {answer:?}");
    assert_eq!(grubenv(&raw, work)?, "saved_entry=a\n", "cut before arming");
    assert_eq!(
        root_version(&raw, "ROOT-B", work)?,
        "2.0.0",
        "slot B written"
    );
    assert_eq!(root_version(&raw, "ROOT-A", work)?, "1.0.0");
    // Expected: v1; the upgrade found interrupted, no rollback, slot B not good.
    let (mut node, s, u) = restart(
        &raw,
        &pki,
        &[],
        Some("upgrade: the upgrade of slot b was interrupted before it was armed"),
        ("a", "1.0.0"),
        (0, 0),
    )?;
    assert_eq!(slot(&s, "b").state, "empty", "{u:?}");

    // 3. During v2's first boot: armed, rebooted, GRUB took the one-shot entry, the
    // kernel runs stage 1; power cut.
    let r = node.ops.upgrade(&v2, false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0")
    );
    expect_in_order(
        &mut node.vm,
        &["basalt: booting slot b", "[basalt] init-start t="],
        BOOT * 2,
    )?;
    let raw = cut_after(node, work, "cut-first-boot", raw)?;
    // GRUB cleared next_entry itself before booting slot B.
    assert_eq!(
        grubenv(&raw, work)?,
        "saved_entry=a\n",
        "cut in v2's first boot"
    );
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0");
    // Expected: v1, and a rollback without a recorded reason.
    let (mut node, s, u) = restart(
        &raw,
        &pki,
        &[],
        Some("upgrade: rolled back from slot b"),
        ("a", "1.0.0"),
        (0, 1),
    )?;
    rolled_back_from_b(&s, &u, "2.0.0")?;

    // 4. Right after v2 marked itself good; power cut.
    node.ops.upgrade(&v2, false, true)?;
    expect_in_order(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "upgrade: slot b is healthy and marked good",
        ],
        BOOT * 3,
    )?;
    let raw = cut_after(node, work, "cut-after-good", raw)?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=b\n", "cut after good");
    // Expected: v2, GRUB's default now, the upgrade counted.
    let (mut node, s, u) = restart(&raw, &pki, &[], None, ("b", "2.0.0"), (1, 1))?;
    assert_eq!(slot(&s, "a").state, "good", "{u:?}");
    assert_eq!(slot(&s, "a").version.as_deref(), Some("1.0.0"));
    node.vm.kill();
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_new_slot_that_panics_or_fails_verity_rolls_back_by_itself() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("bad-1", &[("ops", Role::Client)])?;
    let (mut node, config) = v1_node(vs, Firmware::Bios, &pki, work)?;

    // A kernel panic in the new slot: panic=10 reboots, GRUB boots the saved slot A.
    let r = node.ops.upgrade(&bundle(&vs.panics), false, true)?;
    assert_eq!(r.body.slot, "b");
    expect_in_order(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "testd: testd.panic=stage2 on the kernel command line",
            "Kernel panic - not syncing: sysrq triggered crash",
            "basalt: booting slot a",
            "upgrade: rolled back from slot b",
        ],
        BOOT * 3,
    )?;
    let s = up(&mut node, "a", "1.0.0", false)?;
    rolled_back_from_b(&s, &counted(&s, (0, 1))?, "3.0.0-panic")?;

    // A verity failure: v2 written, verified and armed; the VM stopped; one byte of
    // slot B's first block flipped on the disk (past the squashfs superblock, so only
    // dm-verity can tell); the next boot tries slot B once.
    let r = node.ops.upgrade(&bundle(&vs.v2), false, false)?;
    assert_eq!(r.body.slot, "b");
    let s = node.ops.status()?.body;
    assert_eq!(s.upgrade.and_then(|u| u.next_boot).as_deref(), Some("b"));
    let raw = cut(node, work, "armed")?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=a\nnext_entry=b\n");
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0");
    let (root_b, _) = sfdisk_partition(&raw, "ROOT-B")?;
    flip_byte(&raw, root_b + 1000)?;
    let mut node = start(&raw, Firmware::Bios, &pki, &config)?;
    expect_in_order(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "data block 0 is corrupted",
            "basalt: booting slot a",
            "upgrade: rolled back from slot b",
        ],
        BOOT * 3,
    )?;
    let s = up(&mut node, "a", "1.0.0", false)?;
    rolled_back_from_b(&s, &counted(&s, (0, 2))?, "2.0.0")?;
    node.vm.kill();
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn ovmf_upgrades_v1_to_v2_and_boots_v2_from_then_on() -> anyhow::Result<()> {
    let vs = versions();
    let _guest = one_guest();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let pki = Pki::with_clients("uefi-1", &[("ops", Role::Client)])?;
    let (mut node, config) = v1_node(vs, Firmware::Uefi, &pki, work)?;

    let r = node.ops.upgrade(&bundle(&vs.v2), false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0")
    );
    expect_in_order(
        &mut node.vm,
        &[
            "basalt: booting slot b",
            "upgrade: slot b is on trial",
            "upgrade: slot b is healthy and marked good",
        ],
        BOOT * 3,
    )?;
    let s = common::upgrade::wait_status(
        &node.vm,
        &node.ops,
        "v2 good",
        node.vm.accel().scale(BOOT),
        |s| {
            s.upgrade
                .as_ref()
                .is_some_and(|u| u.default_slot.as_deref() == Some("b"))
        },
    )?;
    let u = s.upgrade.clone().context("upgrade")?;
    assert_eq!((u.booted.as_str(), u.upgrades), ("b", 1), "{u:?}");
    assert_eq!(slot(&s, "b").version.as_deref(), Some("2.0.0"));
    assert_eq!(slot(&s, "a").state, "good", "{u:?}");

    // Stopped, the disk says the same; and OVMF's next boot of it is slot B.
    let raw = cut(node, work, "uefi")?;
    assert_eq!(grubenv(&raw, work)?, "saved_entry=b\n");
    assert_eq!(root_version(&raw, "ROOT-B", work)?, "2.0.0");
    assert_eq!(root_version(&raw, "ROOT-A", work)?, "1.0.0");
    let mut node = start(&raw, Firmware::Uefi, &pki, &config)?;
    expect_line(&mut node.vm, "[basalt] standby t=", BOOT)?;
    up(&mut node, "b", "2.0.0", false)?;
    node.vm.kill();
    Ok(())
}
