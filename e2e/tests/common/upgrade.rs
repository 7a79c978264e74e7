//! What the A/B upgrade tests share: versions of `images/k3s-node.toml` built with the
//! K3s agent double, their bundles, and waiting on the node's status.

use super::{build_spec, dump, workspace, Image};
use basalt_api::node::{SlotInfo, Status};
use basalt_client::node::NodeClient;
use basalt_qemu::Vm;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `images/k3s-node.toml` with another `version` and `extra` kernel arguments, built
/// with the K3s agent double into `target/tmp/e2e/upgrade-<version>`.
pub fn build_version(
    version: &str,
    extra_cmdline: &[&str],
    double: &Path,
) -> anyhow::Result<Image> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    let specs = root.join(format!("upgrade-spec-{version}"));
    std::fs::create_dir_all(&specs)?;
    let src = workspace().join("images/k3s-node.toml");
    let text = std::fs::read_to_string(&src)?;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("version = ") && !out.contains("[kernel]") {
            continue;
        }
        if line.starts_with("cmdline = ") && !extra_cmdline.is_empty() {
            let extra: Vec<String> = extra_cmdline.iter().map(|a| format!(", \"{a}\"")).collect();
            out.push_str(&line.replacen(']', &format!("{}]", extra.concat()), 1));
        } else {
            out.push_str(line);
        }
        out.push('\n');
        if line.starts_with("name = ") {
            out.push_str(&format!("version = \"{version}\"\n"));
        }
    }
    let spec = specs.join("k3s-node.toml");
    std::fs::write(&spec, out)?;
    std::fs::copy(
        workspace().join("images/k3s-node.lock"),
        specs.join("k3s-node.lock"),
    )?;
    build_spec(
        &spec,
        &format!("upgrade-{version}"),
        &basalt_builder::cache::Cache::default_dir(),
        double,
    )
}

/// The upgrade bundle beside an image.
pub fn bundle(img: &Image) -> PathBuf {
    img.dir.join("k3s-node.bundle")
}

/// Polls status until `done` holds, for at most `budget` (the node may be rebooting in
/// between); on a timeout the serial log is printed.
pub fn wait_status(
    vm: &Vm,
    client: &NodeClient,
    what: &str,
    budget: Duration,
    done: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + budget;
    let mut last;
    loop {
        match client.status() {
            Ok(s) if done(&s.body) => return Ok(s.body),
            Ok(s) => last = s.raw,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(dump(
                vm,
                basalt_qemu::HarnessError::Timeout {
                    what: format!("{what}; last: {last}"),
                    timeout: budget,
                },
            ));
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
}

/// One slot of the status's upgrade section.
pub fn slot<'a>(s: &'a Status, name: &str) -> &'a SlotInfo {
    let u = s.upgrade.as_ref().expect("upgrade status");
    u.slots.iter().find(|x| x.name == name).expect("slot")
}

/// The reason a rollback carries when the new slot recorded none (init's
/// `upgrade::trial::NEVER_HEALTHY`).
pub const NEVER_HEALTHY: &str =
    "the new slot never became healthy: panic, verity failure or hang before PID1";

/// A node on `disk` (kept across its own reboots), its API forwarded to a fresh port.
pub struct Node {
    pub vm: Vm,
    pub ops: NodeClient,
    pub port: u16,
}

/// Starts a node on `disk` under `firmware`, rebooting in place, with `extra` QEMU args.
pub fn start(
    disk: &Path,
    firmware: basalt_qemu::Firmware,
    pki: &super::pki::Pki,
    extra: &[String],
) -> anyhow::Result<Node> {
    let port = super::pki::free_port()?;
    let mut args = basalt_qemu::node_devices(false, &[(port, basalt_api::node::DEFAULT_PORT)]);
    args.extend(extra.iter().cloned());
    let vm = basalt_qemu::VmBuilder::new(disk)
        .firmware(firmware)
        .reboots(true)
        .extra_args(args)
        .spawn()?;
    Ok(Node {
        vm,
        ops: pki.client("ops", port)?,
        port,
    })
}

/// QEMU's `-fw_cfg` for the machine config `text`, written into `dir`.
pub fn config_arg(text: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
    use basalt_api::layout::fw_cfg;
    let file = dir.join("config.toml");
    std::fs::write(&file, text)?;
    Ok(vec![
        "-fw_cfg".into(),
        fw_cfg::qemu_arg(fw_cfg::CONFIG, &file),
    ])
}

/// The power cut: QEMU killed (SIGKILL), the disk as it left it written out as raw
/// into `dir/<name>.raw`.
pub fn cut(mut node: Node, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    node.vm.kill();
    super::disk::to_raw(node.vm.overlay(), &dir.join(format!("{name}.raw")))
}

/// GRUB's environment block on a stopped disk, after `fsck.fat -n` found the ESP clean.
pub fn grubenv(raw: &Path, dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    super::disk::esp_fsck(raw, dir).with_context(|| format!("the ESP of {}", raw.display()))?;
    let (esp, _) = super::disk::sfdisk_partition(raw, "EFI")?;
    super::disk::grubenv_list(raw, esp, dir)
}

/// Waits until every needle is on the console, each after the one before it, for at
/// most `base` scaled for the accelerator.
pub fn expect_in_order(vm: &mut Vm, needles: &[&str], base: Duration) -> anyhow::Result<()> {
    let timeout = vm.accel().scale(base);
    expect_in_order_within(vm, needles, timeout)
}

/// [`expect_in_order`] for at most `timeout`, as it is (for a budget that is partly
/// guest time, which the accelerator does not stretch).
pub fn expect_in_order_within(
    vm: &mut Vm,
    needles: &[&str],
    timeout: Duration,
) -> anyhow::Result<()> {
    let owned: Vec<String> = needles.iter().map(|s| s.to_string()).collect();
    vm.wait_until(timeout, |serial| {
        let mut rest = serial;
        for n in &owned {
            let at = rest.find(n.as_str())?;
            rest = &rest[at + n.len()..];
        }
        Some(())
    })
    .map_err(|e| dump(vm, e))
}

/// The slot GRUB booted last, from its own `basalt: booting slot <s>` console line.
pub fn grub_booted(serial: &str) -> Option<&str> {
    serial
        .rmatch_indices("basalt: booting slot ")
        .next()
        .and_then(|(at, m)| serial.get(at + m.len()..at + m.len() + 1))
}

/// The node is up on `want` (`a`/`b`) running `version`, within `budget`: its API
/// answering, GRUB's last boot being that slot and its default, nothing armed, nothing
/// the node could not read; with `from_state`, its config read from STATE.
pub fn up_on(
    node: &mut Node,
    want: &str,
    version: &str,
    from_state: bool,
    budget: Duration,
) -> anyhow::Result<Status> {
    use anyhow::Context;
    let s = wait_status(
        &node.vm,
        &node.ops,
        &format!("the node API up on slot {want}"),
        budget,
        |s| s.upgrade.as_ref().is_some_and(|u| !u.booted.is_empty()),
    )?;
    let serial = node.vm.serial();
    assert_eq!(
        grub_booted(&serial),
        Some(want),
        "GRUB's last boot:\n{serial}"
    );
    let u = s.upgrade.clone().context("upgrade status")?;
    assert_eq!(u.error, None, "{u:?}");
    assert_eq!((s.slot.as_str(), u.booted.as_str()), (want, want), "{u:?}");
    assert_eq!(
        u.default_slot.as_deref(),
        Some(want),
        "GRUB's default: {u:?}"
    );
    assert_eq!(u.next_boot, None, "armed: {u:?}");
    assert_eq!(slot(&s, want).version.as_deref(), Some(version), "{u:?}");
    assert_eq!(slot(&s, want).state, "active", "{u:?}");
    if from_state {
        assert_eq!(s.config_source.as_deref(), Some("state"), "STATE's config");
    }
    Ok(s)
}
