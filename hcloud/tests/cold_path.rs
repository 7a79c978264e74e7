//! What the QEMU cold-path test will stand on: a server created in the fake from an
//! uploaded snapshot gets the snapshot's bytes on its disk, its user-data and Hetzner's
//! metadata paths, and power-on without rescue calls the boot hook.

mod common;

use basalt_hcloud::api::CreateServer;
use basalt_hcloud::fake::BootInfo;
use basalt_hcloud::upload::upload;
use common::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_from_the_snapshot_boots_its_bytes_with_metadata_and_user_data() {
    if !basalt_hcloud::fake::available_or_skip("cold path") {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(
        dir.path(),
        "k3s-node",
        8 * MIB,
        &[(0, MIB), (5 * MIB, 4096)],
    );
    let fake = fake().await;
    let booted: Arc<Mutex<Vec<BootInfo>>> = Arc::default();
    let seen = booted.clone();
    fake.set_boot_hook(Arc::new(move |b| seen.lock().unwrap().push(b)));
    let client = client(&fake);
    let done = upload(&client, &options(&fake, &img.zst), CancellationToken::new())
        .await
        .expect("upload");

    let config = "version = 1\n[node]\nhostname = \"worker-1\"\n";
    let server = client
        .create_server(&CreateServer {
            name: "worker-1".into(),
            server_type: "cx22".into(),
            image: done.snapshot.id.to_string(),
            location: Some("fsn1".into()),
            start_after_create: false,
            labels: BTreeMap::new(),
            user_data: Some(config.into()),
        })
        .await
        .expect("create from the snapshot");
    assert_eq!(server.image.as_ref().map(|i| i.id), Some(done.snapshot.id));
    client
        .server_action(server.id, "poweron", None)
        .await
        .expect("power on");

    let boots = booted.lock().unwrap().clone();
    assert_eq!(boots.len(), 1, "the boot hook ran once");
    let b = &boots[0];
    assert_eq!(b.server, server.id);
    assert_eq!(
        sha256sum(&b.disk, Some(img.size)),
        img.sha256,
        "the snapshot's bytes"
    );
    assert_eq!(b.user_data.as_deref(), Some(config));

    let get = |path: &str| {
        let url = format!("http://{}/hetzner/v1/{path}", b.metadata);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    assert_eq!(get("userdata").await, config);
    assert_eq!(get("metadata/hostname").await, "worker-1");
    assert_eq!(get("metadata/instance-id").await, server.id.to_string());
    assert!(get("metadata/network-config").await.contains("ipv6: true"));
    assert!(get("metadata")
        .await
        .contains(&format!("instance-id: {}", server.id)));
    client.delete_server(server.id).await.unwrap();
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}
