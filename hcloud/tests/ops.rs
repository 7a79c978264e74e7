//! `images`, `prune` and `cleanup` against the fake Hetzner API.

mod common;

use basalt_hcloud::fake::{Fault, Op};
use basalt_hcloud::ops;
use basalt_hcloud::upload::upload;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn labels(image: &str, version: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("basalt.io/image".to_owned(), image.to_owned()),
        ("basalt.io/version".to_owned(), version.to_owned()),
        (
            "basalt.io/sha256".to_owned(),
            format!("{:0>32}", version.replace('.', "")),
        ),
    ])
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_lists_by_selector_newest_first_across_pages() {
    if !basalt_hcloud::fake::available_or_skip("images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("small.img");
    std::fs::write(&file, b"snapshot bytes").unwrap();
    let fake = fake().await;
    // 60 snapshots of k3s-node (more than one page of 50), ages 60..1 minutes, and one other.
    for n in 0..60u64 {
        let age = Duration::from_secs(60 * (60 - n));
        fake.add_snapshot(&file, labels("k3s-node", &format!("0.1.{n}")), age)
            .await
            .unwrap();
    }
    fake.add_snapshot(&file, labels("other", "9.9.9"), Duration::ZERO)
        .await
        .unwrap();
    let client = client(&fake);
    let list = ops::images(&client, Some("basalt.io/image=k3s-node"))
        .await
        .unwrap();
    assert_eq!(list.len(), 60);
    assert_eq!(list[0].version.as_deref(), Some("0.1.59"), "newest first");
    assert_eq!(list[59].version.as_deref(), Some("0.1.0"));
    assert!(list.iter().all(|s| s.image.as_deref() == Some("k3s-node")));
    assert!(list[0].sha256.is_some() && list[0].image_size_gb.is_some());
    let pages = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /v1/images?"))
        .count();
    assert_eq!(pages, 2, "paginated");
    // Every basalt snapshot without a selector; none for a selector that matches none.
    assert_eq!(ops::images(&client, None).await.unwrap().len(), 61);
    assert!(ops::images(
        &client,
        Some("basalt.io/image!=k3s-node,basalt.io/image!=other")
    )
    .await
    .unwrap()
    .is_empty());
    // A bad selector is the API's error, named.
    let err = ops::images(&client, Some("a b")).await.unwrap_err();
    assert!(format!("{:#}", anyhow::Error::from(err)).contains("invalid_input"));
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_newest_and_any_snapshot_a_server_uses() {
    if !basalt_hcloud::fake::available_or_skip("prune") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("small.img");
    std::fs::write(&file, b"snapshot bytes").unwrap();
    let fake = fake().await;
    let mut ids = Vec::new();
    for n in 0..6u64 {
        let age = Duration::from_secs(3600 * (6 - n));
        ids.push(
            fake.add_snapshot(&file, labels("k3s-node", &format!("0.1.{n}")), age)
                .await
                .unwrap(),
        );
    }
    // ids[0] is the oldest; a server was created from ids[1] and still exists.
    fake.add_server("worker-1", ids[1]).await.unwrap();
    fake.inject(Op::DeleteImage, Fault::Code(423, "locked"), 1);
    let pruned = ops::prune(&client(&fake), 3, Some("basalt.io/image=k3s-node"))
        .await
        .unwrap();
    assert_eq!(pruned.kept, vec![ids[5], ids[4], ids[3]]);
    assert_eq!(pruned.in_use, vec![ids[1]]);
    let mut deleted = pruned.deleted.clone();
    deleted.sort();
    assert_eq!(deleted, vec![ids[0], ids[2]]);
    let mut left: Vec<u64> = fake.snapshots().iter().map(|s| s.id).collect();
    left.sort();
    assert_eq!(left, vec![ids[1], ids[3], ids[4], ids[5]]);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_what_an_interrupted_upload_left_by_label_and_age() {
    if !basalt_hcloud::fake::available_or_skip("cleanup") {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    // An upload whose cleanup could not delete: every delete fails for good.
    fake.inject(Op::DeleteServer, Fault::Code(403, "forbidden"), 100);
    fake.inject(Op::DeleteSshKey, Fault::Code(403, "forbidden"), 100);
    let err = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect_err("cleanup cannot delete");
    assert!(err.to_string().contains("basalt hcloud cleanup"), "{err}");
    assert_eq!(fake.servers().len(), 1);
    assert_eq!(fake.ssh_keys().len(), 1);
    // A server that is not basalt's is never touched.
    let other = fake.snapshots()[0].id;
    fake.add_server("someone-else", other).await.unwrap();
    let client = client(&fake);
    // Too young: an upload may still be running.
    let none = ops::cleanup(&client, Duration::from_secs(3600)).await;
    assert!(
        none.as_ref()
            .is_ok_and(|c| c.servers.is_empty() && c.ssh_keys.is_empty()),
        "{none:?}"
    );
    fake.clear_faults();
    let done = ops::cleanup(&client, Duration::ZERO).await.unwrap();
    assert_eq!(done.servers.len(), 1);
    assert!(done.servers[0].name.starts_with("basalt-upload-"));
    assert_eq!(done.ssh_keys.len(), 1);
    let left: Vec<String> = fake.servers().into_iter().map(|s| s.name).collect();
    assert_eq!(left, vec!["someone-else".to_owned()]);
    assert!(fake.ssh_keys().is_empty());
    fake.shutdown().await;
}
