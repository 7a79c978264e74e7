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

use basalt_api::layout::fw_cfg;
use basalt_api::node::JoinState;
use basalt_client::node::{ClientOptions, Endpoint, NodeClient};
use basalt_client::pki::{Ca, CertRequest, Issued, Role, Validity};
use basalt_qemu::{Vm, VmBuilder};
use common::expect_line;
use k3s_doubles::userspace::{asset_dir, DATA_PREFIX};
use k3s_doubles::{K3sServerDouble, LINE_PREFIX};
use std::path::Path;
use std::time::{Duration, Instant};

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// K3s's data dir on the node (basalt sets no other), on STATE.
const DATA_DIR: &str = "/var/lib/rancher/k3s";
/// Where the agent double's and the warm-up's lines appear on the console.
const AGENT: &str = "[basalt] [k3s] ";
const WARM: &str = "[basalt] [k3s-warm] ";

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    node: Issued,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate()?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
        let request = |name: &str, role| CertRequest {
            name: name.into(),
            role,
            validity: Validity::days_from_now(30).expect("validity"),
        };
        let node = ca.issue(&request(
            "warm-1",
            Role::Node {
                ips: vec![],
                dns: vec![],
            },
        ))?;
        ca.issue(&request("ops", Role::Client))?
            .write(dir.path(), "ops", false)?;
        Ok(Pki { dir, ca, node })
    }

    fn client(&self, port: u16) -> anyhow::Result<NodeClient> {
        let path = |f: &str| self.dir.path().join(f);
        Ok(NodeClient::new(&ClientOptions {
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port,
            },
            ca: path("ca.pem"),
            cert: path("ops.pem"),
            key: path("ops.key"),
            name: Some("warm-1".into()),
        })?)
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "version = 1\n[node]\nhostname = \"warm-1\"\n{extra}\n[api]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
            self.ca.cert_pem(),
            self.node.cert_pem,
            self.node.key_pem
        )
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn boot(disk: &Path, port: u16, config: Option<&str>, dir: &Path) -> anyhow::Result<Vm> {
    let mut args = basalt_qemu::node_devices(false, &[(port, basalt_api::node::DEFAULT_PORT)]);
    if let Some(text) = config {
        let file = dir.join("config.toml");
        std::fs::write(&file, text)?;
        args.push("-fw_cfg".into());
        args.push(fw_cfg::qemu_arg(fw_cfg::CONFIG, &file));
    }
    Ok(VmBuilder::new(disk).extra_args(args).spawn()?)
}

/// Polls until the node API answers and the join is `registered`.
fn wait_registered(vm: &Vm, client: &NodeClient) -> anyhow::Result<()> {
    let budget = vm.accel().scale(BOOT);
    let deadline = Instant::now() + budget;
    loop {
        let state = client.status().ok().map(|s| s.body.join);
        if state
            .as_ref()
            .is_some_and(|j| j.state == JoinState::Registered)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(common::dump(
                vm,
                basalt_qemu::HarnessError::Timeout {
                    what: format!("join state registered; last {state:?}"),
                    timeout: budget,
                },
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
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
    let pki = Pki::new()?;
    let port = free_port()?;
    let asset = asset_dir(Path::new(DATA_DIR));
    let extracted = format!("{WARM}{DATA_PREFIX} extracted {}: ", asset.display());

    // Standby: the warm-up extracts after `standby`, not before it.
    let mut vm = boot(&img.qcow2, port, Some(&pki.config("")), pki.dir.path())?;
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
    let ops = pki.client(port)?;
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
    ops.reboot()?;
    vm.wait_exit(vm.accel().scale(BOOT))
        .map_err(|e| common::dump(&vm, e))?;
    let port2 = free_port()?;
    let mut again = boot(vm.overlay(), port2, None, pki.dir.path())?;
    expect_line(&mut again, "machine config from STATE", BOOT)?;
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
    wait_registered(&again, &pki.client(port2)?)?;
    let serial = again.serial();
    assert!(
        !serial.contains(&format!("{DATA_PREFIX} extracted")),
        "extracted again after a reboot"
    );
    Ok(())
}
