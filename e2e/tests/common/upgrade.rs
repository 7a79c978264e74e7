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
