//! The cold path cluster-autoscaler's Hetzner provider takes, end to end: the image is
//! uploaded to the fake Hetzner API (a test double; its rescue system is a real sshd), a
//! server is created from the snapshot with a basalt machine config as its user-data, and
//! the fake's boot hook hands us the server's disk, which QEMU boots as Hetzner would: SMBIOS
//! manufacturer `Hetzner`, the metadata service at 169.254.169.254 (QEMU's guestfwd to the
//! fake's metadata endpoint for that server). The node reads its config from the user-data,
//! reaches standby, and joins the K3s server double (not K3s) with the agent double.

mod common;

use anyhow::Context;
use basalt_client::pki::{Ca, CertRequest, Role, Validity};
use basalt_hcloud::api::CreateServer;
use basalt_hcloud::client::{Client, Timing};
use basalt_hcloud::fake::{BootInfo, Fake, FakeOptions};
use basalt_hcloud::progress::Mode;
use basalt_hcloud::upload::{upload, UploadOptions};
use basalt_qemu::VmBuilder;
use common::expect_line;
use k3s_doubles::K3sServerDouble;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// QEMU's user network, moved to Hetzner's link-local range: libslirp forwards a guest
/// address only inside its own network, and the metadata service is 169.254.169.254.
const NET: &str = "169.254.0.0/16";
/// The host as the guest sees it on that network (where the K3s server double listens).
const HOST: &str = "169.254.0.2";

fn timing() -> Timing {
    Timing {
        call_timeout: Duration::from_secs(30),
        attempts: 6,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        rate_limit_max_wait: Duration::from_secs(5),
        action_poll: Duration::from_millis(50),
        action_timeout: Duration::from_secs(300),
    }
}

/// QEMU as a Hetzner server: SMBIOS vendor, metadata at 169.254.169.254:80 (a socat per
/// guest connection to the fake's metadata endpoint), a NIC and entropy.
fn hetzner_machine(boot: &BootInfo) -> Vec<String> {
    let netdev = format!(
        "user,id=n0,net={NET},host={HOST},guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:{}",
        boot.metadata
    );
    [
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
        "-device",
        "virtio-rng-pci",
        "-smbios",
        "type=1,manufacturer=Hetzner,product=vServer",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
#[cfg_attr(
    any(basalt_skip_qemu, basalt_skip_hcloud_fake),
    ignore = "needs QEMU, root, sshd, socat and loop devices: scripts/install-host-tools"
)]
fn a_server_from_the_uploaded_snapshot_boots_from_its_user_data_and_joins() -> anyhow::Result<()> {
    let img = common::join_image();
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let rt = tokio::runtime::Runtime::new()?;
    let raw_size = std::fs::metadata(&img.raw)?.len();
    let fake = rt.block_on(Fake::start(FakeOptions {
        disk_bytes: raw_size.next_multiple_of(1 << 30) + (1 << 30),
        action_time: Duration::from_millis(30),
        ..FakeOptions::default()
    }))?;
    let (booted, boots) = mpsc::channel::<BootInfo>();
    let booted = Mutex::new(booted);
    fake.set_boot_hook(Arc::new(move |b| {
        let _ = booted.lock().map(|tx| tx.send(b));
    }));
    let client = Client::new(&fake.endpoint(), fake.token(), timing())?;

    // Upload as `basalt hcloud upload` does.
    let mut options = UploadOptions::new(img.dir.join("k3s-node.raw.zst"));
    options.ssh_port = fake.ssh_port();
    options.progress = Mode::Quiet;
    options.shutdown_timeout = Duration::from_secs(10);
    let done = rt
        .block_on(upload(&client, &options, CancellationToken::new()))
        .context("upload to the fake")?;

    // Create a server from the snapshot as cluster-autoscaler's provider does: the machine
    // config as user-data, here with a [cluster] so that the node joins.
    let ca = Ca::generate()?;
    let node = ca.issue(&CertRequest {
        name: "cold-1".into(),
        role: Role::Node {
            ips: vec![],
            dns: vec![],
        },
        validity: Validity::days_from_now(30)?,
    })?;
    let config = format!(
        "version = 1\n[node]\nhostname = \"cold-1\"\n[cluster]\nserver = \"{}\"\ntoken = \"{}\"\n[api]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
        server.url_for(HOST),
        server.token("secret"),
        ca.cert_pem(),
        node.cert_pem,
        node.key_pem
    );
    let created = rt.block_on(client.create_server(&CreateServer {
        name: "cold-1".into(),
        server_type: "cx22".into(),
        image: done.snapshot.id.to_string(),
        location: Some("fsn1".into()),
        start_after_create: false,
        labels: BTreeMap::new(),
        user_data: Some(config.clone()),
    }))?;
    rt.block_on(client.server_action(created.id, "poweron", None))?;
    let boot = boots
        .recv_timeout(Duration::from_secs(60))
        .context("the fake's boot hook")?;
    assert_eq!(boot.user_data.as_deref(), Some(config.as_str()));

    let mut vm = VmBuilder::new(&boot.disk)
        .extra_args(hetzner_machine(&boot))
        .spawn()?;
    expect_line(
        &mut vm,
        "machine config from Hetzner metadata userdata: [cluster] present, joining",
        BOOT,
    )?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    expect_line(&mut vm, "[basalt] joined t=", BOOT)?;
    let line = expect_line(&mut vm, "k3s-agent-double: config ", BOOT)?;
    assert!(line.contains("node-name=cold-1"), "{line}");
    assert!(
        line.contains(&format!("server={}", server.url_for(HOST))),
        "{line}"
    );
    expect_line(&mut vm, "k3s-agent-double: ca-check passed", BOOT)?;
    common::assert_no_errors(&vm);
    drop(vm);

    rt.block_on(client.delete_server(created.id))?;
    assert!(fake.servers().is_empty(), "{:?}", fake.servers());
    assert!(fake.ssh_keys().is_empty(), "{:?}", fake.ssh_keys());
    rt.block_on(fake.shutdown());
    Ok(())
}
