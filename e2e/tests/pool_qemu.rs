//! The warm pool's `qemu` provider with real QEMU: VMs started detached over qcow2
//! overlays, found again by a new provider instance on the same state directory (as a
//! restarted controller would), and deleted with their QEMU.
//!
//! The first test boots the join image to standby and talks to its node API over the
//! forwarded port, checking the certificate's name; the second uses the harness's tiny
//! boot-sector guest to check the process handling quickly.

mod common;
use common::{console, process_runs};

use anyhow::Context;
use basalt_api::node::JoinState;
use basalt_client::node::{ClientOptions, Endpoint, NodeClient, NodeError};
use basalt_client::pki::{Ca, CertRequest, Role, Validity};
use basalt_pool::provider::{CreateServer, Provider, LABEL_IMAGE, LABEL_POOL, LABEL_STATE};
use basalt_pool::qemu::{QemuProvider, QemuSettings};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest boot budget on KVM; scaled for TCG as the harness does.
const BOOT: Duration = Duration::from_secs(60);
const POOL: &str = "e2e-pool";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn settings(images: PathBuf, state_dir: &Path) -> QemuSettings {
    QemuSettings {
        images: vec![images],
        state_dir: state_dir.to_path_buf(),
        memory_mib: 1024,
        cpus: 2,
        firmware: None,
    }
}

fn labels(image: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_POOL.to_owned(), POOL.to_owned()),
        (LABEL_STATE.to_owned(), "creating".to_owned()),
        (LABEL_IMAGE.to_owned(), image.to_owned()),
    ])
}

/// Deletes the VM if the test fails half way, so that no QEMU outlives the test.
struct Cleanup {
    settings: QemuSettings,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(provider) = QemuProvider::open(self.settings.clone()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
            if let Err(e) = rt.block_on(provider.delete(&self.name)) {
                eprintln!("cleanup of VM {}: {e}", self.name);
            }
        }
    }
}

/// The pool CA, the VM's node certificate (named by the VM) in a standby machine
/// config, and a client certificate for the controller.
struct Pki {
    dir: tempfile::TempDir,
    config: String,
}

impl Pki {
    fn new(vm: &str) -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate()?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
        let node = ca.issue(&CertRequest {
            name: vm.into(),
            role: Role::Node {
                ips: vec![],
                dns: vec![],
            },
            validity: Validity::days_from_now(1)?,
        })?;
        ca.issue(&CertRequest {
            name: "controller".into(),
            role: Role::Client,
            validity: Validity::days_from_now(1)?,
        })?
        .write(dir.path(), "controller", false)?;
        // Standby: [api], no [cluster].
        let config = format!(
            "version = 1\n[node]\nhostname = \"{vm}\"\n[api]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
            ca.cert_pem(),
            node.cert_pem,
            node.key_pem
        );
        Ok(Pki { dir, config })
    }

    /// A node API client to `api` that checks the node's certificate names `name`.
    fn client(&self, api: SocketAddr, name: &str) -> anyhow::Result<NodeClient> {
        let path = |f: &str| self.dir.path().join(f);
        Ok(NodeClient::new(&ClientOptions {
            endpoint: Endpoint {
                host: api.ip().to_string(),
                port: api.port(),
            },
            ca: path("ca.pem"),
            cert: path("controller.pem"),
            key: path("controller.key"),
            name: Some(name.into()),
        })?)
    }
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_pool_vm_reaches_standby_is_found_again_by_a_new_provider_and_is_deleted() -> anyhow::Result<()>
{
    let img = common::join_image();
    let state = tempfile::tempdir()?;
    let settings = settings(img.raw.clone(), state.path());
    let rt = runtime()?;
    let vm = "e2e-pool-1";
    let pki = Pki::new(vm)?;

    let provider = QemuProvider::open(settings.clone())?;
    let images = rt.block_on(provider.images())?;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(Path::new(&images[0].id), img.raw.canonicalize()?);
    assert_eq!(
        images[0].version.as_deref(),
        img.manifest["basalt_version"].as_str(),
        "the version comes from the manifest beside the image"
    );

    let cleanup = Cleanup {
        settings: settings.clone(),
        name: vm.into(),
    };
    let created = rt.block_on(provider.create(&CreateServer {
        name: vm.into(),
        image: images[0].id.clone(),
        labels: labels(&images[0].id),
        user_data: pki.config.clone(),
    }))?;
    let api = created.api.context("a created VM has its API address")?;
    assert!(api.ip().is_loopback(), "{api}");
    let info = provider.inspect(vm)?.context("inspect the new VM")?;
    let pid = info.pid.context("the new VM's QEMU runs")?;

    // The node API over the forwarded port: health until it answers, then standby.
    let client = pki.client(api, vm)?;
    let timeout = basalt_qemu::detect_accel().scale(BOOT);
    let deadline = Instant::now() + timeout;
    let health = loop {
        match client.health() {
            Ok(h) => break h,
            Err(e) if Instant::now() > deadline => {
                eprintln!("----- console -----\n{}\n-----", console(&info.console));
                anyhow::bail!("VM {vm}: no node API health at {api} after {timeout:?}: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let status = client.status()?.body;
    assert_eq!(
        status.join.state,
        JoinState::Standby,
        "{status:?} {health:?}"
    );
    assert!(
        console(&info.console).contains("[basalt] standby t="),
        "the serial console is captured in the VM's directory"
    );
    // The name is checked: a client expecting another node refuses this one.
    let wrong = pki.client(api, "e2e-pool-2")?.status();
    assert!(
        matches!(wrong, Err(NodeError::Tls { .. })),
        "{:?}",
        wrong.map(|r| r.raw)
    );

    // A restarted controller: a new provider on the same state directory.
    drop(provider);
    let reopened = QemuProvider::open(settings)?;
    let servers = rt.block_on(reopened.servers(POOL))?;
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0].name, vm);
    assert_eq!(servers[0].labels, labels(&images[0].id));
    assert_eq!(servers[0].api, Some(api));
    assert_eq!(
        reopened.provider_id(&servers[0]),
        format!("basalt-qemu://{vm}")
    );
    assert!(rt.block_on(reopened.servers("another-pool"))?.is_empty());
    assert_eq!(
        pki.client(api, vm)?.status()?.body.join.state,
        JoinState::Standby
    );

    // Delete: QEMU is gone (checked through /proc, not the provider), the directory too.
    assert!(process_runs(pid));
    rt.block_on(reopened.delete(vm))?;
    assert!(!process_runs(pid), "QEMU pid {pid} still runs");
    assert!(!info.dir.exists(), "{} remains", info.dir.display());
    assert!(rt.block_on(reopened.servers(POOL))?.is_empty());
    std::mem::forget(cleanup);
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_vm_whose_qemu_died_stays_listed_without_an_api_until_deleted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("tiny.raw");
    std::fs::write(&image, basalt_qemu::boot_disk("POOL-VM-UP\r\n"))?;
    let state = dir.path().join("state");
    let settings = settings(image.clone(), &state);
    let rt = runtime()?;
    let provider = QemuProvider::open(settings.clone())?;
    let image_id = rt.block_on(provider.images())?[0].id.clone();

    let mut pids = Vec::new();
    let mut cleanups = Vec::new();
    for vm in ["tiny-1", "tiny-2"] {
        cleanups.push(Cleanup {
            settings: settings.clone(),
            name: vm.into(),
        });
        let server = rt.block_on(provider.create(&CreateServer {
            name: vm.into(),
            image: image_id.clone(),
            labels: labels(&image_id),
            user_data: "version = 1\n".into(),
        }))?;
        assert!(server.api.is_some());
        let info = provider.inspect(vm)?.context("inspect")?;
        let deadline = Instant::now() + basalt_qemu::detect_accel().scale(Duration::from_secs(20));
        while !console(&info.console).contains("POOL-VM-UP") {
            anyhow::ensure!(Instant::now() < deadline, "VM {vm}: nothing on its console");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The machine config went in as the fw_cfg file, and the overlay is backed by the image.
        let config = std::fs::read_to_string(info.dir.join("config.toml"))?;
        assert_eq!(config, "version = 1\n");
        let overlay = common::tool(
            "qemu-img",
            &[
                "info",
                "-U",
                "--output=json",
                &info.dir.join("overlay.qcow2").display().to_string(),
            ],
        )?;
        assert!(
            overlay.contains(&format!("\"backing-filename\": \"{image_id}\"")),
            "{overlay}"
        );
        pids.push(info.pid.context("QEMU runs")?);
    }
    // Both VMs run detached from the test (another session), each on its own port.
    let session = |pid: &str| -> anyhow::Result<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after_name = stat.rsplit_once(')').context("stat")?.1;
        // state, ppid, pgrp, session
        Ok(after_name
            .split_whitespace()
            .nth(3)
            .context("stat session")?
            .to_owned())
    };
    for &pid in &pids {
        assert_ne!(session(&pid.to_string())?, session("self")?, "QEMU {pid}");
    }
    let servers = rt.block_on(provider.servers(POOL))?;
    assert_ne!(servers[0].api, servers[1].api);

    // QEMU of tiny-1 dies behind the provider's back.
    common::tool("kill", &["-KILL", &pids[0].to_string()])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_runs(pids[0]) {
        anyhow::ensure!(Instant::now() < deadline, "QEMU did not die");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reopened = QemuProvider::open(settings)?;
    let servers = rt.block_on(reopened.servers(POOL))?;
    let apis: Vec<(&str, bool)> = servers
        .iter()
        .map(|s| (s.name.as_str(), s.api.is_some()))
        .collect();
    assert_eq!(apis, [("tiny-1", false), ("tiny-2", true)]);
    assert_eq!(servers[0].labels, labels(&image_id), "labels unchanged");

    for vm in ["tiny-1", "tiny-2"] {
        rt.block_on(reopened.delete(vm))?;
    }
    assert!(!process_runs(pids[1]), "QEMU of tiny-2 still runs");
    assert!(rt.block_on(reopened.servers(POOL))?.is_empty());
    let left: Vec<_> = std::fs::read_dir(&state)?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    cleanups.into_iter().for_each(std::mem::forget);
    Ok(())
}
